//! The DNS server in-process on loopback: records built as `sdn-tunnel-core`
//! would, queried over real UDP and TCP sockets.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_server::proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use sdn_tunnel_core::dns::{DnsRecords, RecordData, Zone};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use super::*;

fn zone(entries: &[(&str, Vec<RecordData>)]) -> Zone {
    Zone {
        records: entries
            .iter()
            .map(|(n, d)| (n.to_string(), d.iter().cloned().collect::<BTreeSet<_>>()))
            .collect(),
    }
}

fn addr(s: &str) -> RecordData {
    RecordData::Addr(s.parse().unwrap())
}

/// west has `web` and a 60-endpoint headless `big`; the merged zone has
/// east's and west's `web`.
fn records() -> DnsRecords {
    let big: Vec<RecordData> = (0..60)
        .map(|i| addr(&format!("10.2.1.{}", i + 1)))
        .collect();
    let mut zones = BTreeMap::new();
    zones.insert(
        "cluster.west".to_string(),
        zone(&[
            ("web.demo.svc.cluster.west", vec![addr("10.102.0.10")]),
            (
                "_http._tcp.web.demo.svc.cluster.west",
                vec![RecordData::Srv {
                    port: 80,
                    target: "web.demo.svc.cluster.west".into(),
                }],
            ),
            ("big.demo.svc.cluster.west", big),
        ]),
    );
    zones.insert(
        "cluster.east".to_string(),
        zone(&[("web.demo.svc.cluster.east", vec![addr("10.101.0.10")])]),
    );
    zones.insert(
        "cluster.all".to_string(),
        zone(&[(
            "web.demo.svc.cluster.all",
            vec![
                addr("10.101.0.10"),
                addr("10.102.0.10"),
                addr("fd00:102::10"),
            ],
        )]),
    );
    DnsRecords {
        zones,
        ..Default::default()
    }
}

async fn serve(records: &DnsRecords, upstream: Option<Upstream>) -> (DnsHandler, SocketAddr) {
    let fwd: Option<Arc<dyn ZoneHandler>> = upstream.map(|u| {
        Arc::new(forwarder(&[u], Path::new("/nonexistent")).unwrap().unwrap())
            as Arc<dyn ZoneHandler>
    });
    let (catalog, errors) = build_catalog(records, 5, 1, fwd);
    assert!(errors.is_empty(), "{errors:?}");
    let handler = DnsHandler::new(catalog);
    let (mut server, bound) = bind("127.0.0.1:0".parse().unwrap(), handler.clone())
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = server.block_until_done().await;
    });
    (handler, bound)
}

use std::path::Path;

fn query(name: &str, rtype: RecordType, edns: bool) -> Message {
    let mut m = Message::new(4242, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(4096);
        m.set_edns(e);
    }
    m
}

async fn udp_raw(server: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(bytes, server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    match tokio::time::timeout(Duration::from_millis(700), sock.recv(&mut buf)).await {
        Ok(Ok(n)) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

async fn udp(server: SocketAddr, q: &Message) -> Message {
    let raw = udp_raw(server, &q.to_vec().unwrap())
        .await
        .expect("an answer");
    Message::from_vec(&raw).unwrap()
}

async fn tcp(server: SocketAddr, q: &Message) -> Message {
    let mut s = TcpStream::connect(server).await.unwrap();
    let bytes = q.to_vec().unwrap();
    let len = u16::try_from(bytes.len()).unwrap();
    s.write_all(&len.to_be_bytes()).await.unwrap();
    s.write_all(&bytes).await.unwrap();
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await.unwrap();
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut buf).await.unwrap();
    Message::from_vec(&buf).unwrap()
}

fn ips(m: &Message) -> BTreeSet<IpAddr> {
    m.answers
        .iter()
        .filter_map(|r: &Record| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

fn set(v: &[&str]) -> BTreeSet<IpAddr> {
    v.iter().map(|s| s.parse().unwrap()).collect()
}

#[tokio::test]
async fn answers_cluster_and_merged_zones() {
    let (_, srv) = serve(&records(), None).await;
    let r = udp(
        srv,
        &query("web.demo.svc.cluster.west.", RecordType::A, false),
    )
    .await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.metadata.authoritative);
    assert_eq!(ips(&r), set(&["10.102.0.10"]));
    assert!(r.answers.iter().all(|a| a.ttl == 5), "{:?}", r.answers);
    // Case does not matter.
    let r = udp(
        srv,
        &query("WEB.Demo.svc.Cluster.West.", RecordType::A, false),
    )
    .await;
    assert_eq!(ips(&r), set(&["10.102.0.10"]));

    let r = udp(
        srv,
        &query("web.demo.svc.cluster.all.", RecordType::A, true),
    )
    .await;
    assert_eq!(ips(&r), set(&["10.101.0.10", "10.102.0.10"]));
    let r = udp(
        srv,
        &query("web.demo.svc.cluster.all.", RecordType::AAAA, true),
    )
    .await;
    assert_eq!(ips(&r), set(&["fd00:102::10"]));

    let r = udp(
        srv,
        &query(
            "_http._tcp.web.demo.svc.cluster.west.",
            RecordType::SRV,
            false,
        ),
    )
    .await;
    let srv_rr: Vec<(u16, String)> = r
        .answers
        .iter()
        .filter_map(|a| match &a.data {
            RData::SRV(s) => Some((s.port, s.target.to_string())),
            _ => None,
        })
        .collect();
    assert_eq!(srv_rr, vec![(80, "web.demo.svc.cluster.west.".to_string())]);

    // TCP too.
    let r = tcp(
        srv,
        &query("web.demo.svc.cluster.east.", RecordType::A, false),
    )
    .await;
    assert_eq!(ips(&r), set(&["10.101.0.10"]));
}

#[tokio::test]
async fn unknown_names_in_our_zones_are_nxdomain_with_a_short_negative_ttl() {
    let (_, srv) = serve(&records(), None).await;
    for name in [
        "nope.demo.svc.cluster.west.",
        "web.other.svc.cluster.all.",
        "x.cluster.east.",
    ] {
        let r = udp(srv, &query(name, RecordType::A, false)).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain, "{name}");
        let soa = r
            .authorities
            .iter()
            .find_map(|a| match &a.data {
                RData::SOA(s) => Some(s.minimum),
                _ => None,
            })
            .expect("SOA in the authority section");
        assert_eq!(soa, 5);
    }
    // A name that exists, another type: no error, no answer.
    let r = udp(
        srv,
        &query("web.demo.svc.cluster.west.", RecordType::AAAA, false),
    )
    .await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.answers.is_empty());
    // Without a forwarder, other names are refused.
    let r = udp(srv, &query("example.org.", RecordType::A, false)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
}

#[tokio::test]
async fn large_answers_truncate_over_udp_and_fit_with_edns_or_tcp() {
    let (_, srv) = serve(&records(), None).await;
    let name = "big.demo.svc.cluster.west.";
    let r = udp(srv, &query(name, RecordType::A, false)).await;
    assert!(
        r.metadata.truncation,
        "60 A records do not fit in 512 bytes"
    );
    assert!(ips(&r).len() < 60);
    let r = udp(srv, &query(name, RecordType::A, true)).await;
    assert!(!r.metadata.truncation);
    assert_eq!(ips(&r).len(), 60);
    let r = tcp(srv, &query(name, RecordType::A, false)).await;
    assert_eq!(ips(&r).len(), 60);
}

#[tokio::test]
async fn garbage_does_not_hurt_other_clients() {
    let (_, srv) = serve(&records(), None).await;
    // Too short for a header: dropped.
    assert!(udp_raw(srv, &[1, 2, 3]).await.is_none());
    // A header announcing a question that is not there: FORMERR.
    let mut bad = vec![0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
    bad.extend_from_slice(&[0x3f, b'a', b'b']);
    let r = udp_raw(srv, &bad)
        .await
        .expect("an answer to a parseable header");
    let r = Message::from_vec(&r).unwrap();
    assert_eq!(r.metadata.id, 0x1234);
    assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    // Random bytes, many times, and a response sent as a query.
    for i in 0..50u8 {
        let junk: Vec<u8> = (0..(20 + usize::from(i) * 7))
            .map(|j| (j as u8).wrapping_mul(31).wrapping_add(i))
            .collect();
        let _ = udp_raw(srv, &junk).await;
    }
    // A response sent as a query is dropped (no reflection).
    let mut resp = query("web.demo.svc.cluster.west.", RecordType::A, false);
    resp.metadata.message_type = MessageType::Response;
    assert!(udp_raw(srv, &resp.to_vec().unwrap()).await.is_none());
    // Two questions in one query: FORMERR.
    let mut two = query("web.demo.svc.cluster.west.", RecordType::A, false);
    two.add_query(Query::query(
        Name::from_ascii("web.demo.svc.cluster.east.").unwrap(),
        RecordType::A,
    ));
    let r = udp(srv, &two).await;
    assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    // Garbage over TCP: the connection goes, the server stays.
    {
        let mut s = TcpStream::connect(srv).await.unwrap();
        s.write_all(&[0, 5, 1, 2, 3, 4, 5]).await.unwrap();
    }
    // Good queries still answer, on both transports.
    let r = udp(
        srv,
        &query("web.demo.svc.cluster.west.", RecordType::A, false),
    )
    .await;
    assert_eq!(ips(&r), set(&["10.102.0.10"]));
    let r = tcp(
        srv,
        &query("web.demo.svc.cluster.west.", RecordType::A, false),
    )
    .await;
    assert_eq!(ips(&r), set(&["10.102.0.10"]));
}

#[tokio::test]
async fn replacing_the_records_changes_the_answers() {
    let (handler, srv) = serve(&records(), None).await;
    let mut rec = records();
    rec.zones.insert(
        "cluster.all".into(),
        zone(&[("web.demo.svc.cluster.all", vec![addr("10.101.0.10")])]),
    );
    rec.zones.remove("cluster.west");
    handler.replace(build_catalog(&rec, 5, 2, None).0);
    let r = udp(
        srv,
        &query("web.demo.svc.cluster.all.", RecordType::A, false),
    )
    .await;
    assert_eq!(ips(&r), set(&["10.101.0.10"]));
    // A zone that is gone is no longer ours.
    let r = udp(
        srv,
        &query("web.demo.svc.cluster.west.", RecordType::A, false),
    )
    .await;
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
}

/// A fake upstream on loopback answering every A query with 192.0.2.53.
async fn fake_upstream() -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut r = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
            r.metadata.recursion_desired = q.metadata.recursion_desired;
            r.metadata.recursion_available = true;
            for query in &q.queries {
                r.add_query(query.clone());
                if query.query_type() == RecordType::A {
                    r.add_answer(Record::from_rdata(
                        query.name().clone(),
                        30,
                        RData::A("192.0.2.53".parse::<std::net::Ipv4Addr>().unwrap().into()),
                    ));
                }
            }
            if let Ok(bytes) = r.to_vec() {
                let _ = sock.send_to(&bytes, from).await;
            }
        }
    });
    addr
}

#[tokio::test]
async fn other_names_are_forwarded_upstream() {
    let up = fake_upstream().await;
    let (_, srv) = serve(&records(), Some(Upstream(up))).await;
    let r = udp(srv, &query("something.example.org.", RecordType::A, false)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(ips(&r), set(&["192.0.2.53"]));
    // Our zones are still ours, not the upstream's.
    let r = udp(
        srv,
        &query("nope.demo.svc.cluster.west.", RecordType::A, false),
    )
    .await;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
}

#[test]
fn flags_have_the_documented_defaults() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        dns: DnsConfig,
    }
    let cli = Cli::try_parse_from(["dns"]).unwrap();
    assert_eq!(cli.dns.listen, "0.0.0.0:53".parse().unwrap());
    assert_eq!(cli.dns.ttl, 5);
    assert_eq!(cli.dns.merged_zone, "cluster.all");
    assert_eq!(cli.dns.policy().max_status_age_secs, 15);
    let cli = Cli::try_parse_from([
        "dns",
        "--upstream",
        "10.0.0.1,10.0.0.2:5353",
        "--merged-zone",
        "clusters.example",
        "--status-max-age",
        "3s",
    ])
    .unwrap();
    assert_eq!(cli.dns.upstream.len(), 2);
    assert_eq!(cli.dns.policy().merged_zone, "clusters.example");
    assert_eq!(cli.dns.policy().max_status_age_secs, 3);
}

#[tokio::test]
async fn a_zone_that_cannot_be_built_leaves_the_others_served() {
    let mut rec = records();
    rec.zones.insert(
        "bad..zone".into(),
        zone(&[("x.bad..zone", vec![addr("10.9.9.9")])]),
    );
    rec.zones.insert(
        "cluster.odd".into(),
        zone(&[(
            "svc.cluster.odd",
            vec![RecordData::Srv {
                port: 1,
                target: "not..a..name".into(),
            }],
        )]),
    );
    let (catalog, errors) = build_catalog(&rec, 5, 1, None);
    assert_eq!(errors.len(), 2, "{errors:?}");
    let handler = DnsHandler::new(catalog);
    let (mut server, srv) = bind("127.0.0.1:0".parse().unwrap(), handler).await.unwrap();
    tokio::spawn(async move {
        let _ = server.block_until_done().await;
    });
    let r = udp(
        srv,
        &query("web.demo.svc.cluster.west.", RecordType::A, false),
    )
    .await;
    assert_eq!(ips(&r), set(&["10.102.0.10"]));
    let r = udp(
        srv,
        &query("web.demo.svc.cluster.all.", RecordType::A, false),
    )
    .await;
    assert_eq!(ips(&r).len(), 2);
}
