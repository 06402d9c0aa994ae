//! Deleting conntrack entries over ctnetlink (`NETLINK_NETFILTER`): a dump,
//! a filter, and one delete per entry. Plain netlink messages, built and
//! parsed here; see `linux/netfilter/nfnetlink_conntrack.h`.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    bind, recv, send, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};
use nix::sys::time::TimeVal;

use sdn_tunnel_core::services::{Frontend, Protocol};

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// One direction of a conntrack entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tuple {
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// The attributes in `buf`: (type without flags, payload).
pub fn attrs(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            break;
        }
        out.push((ty, &buf[4..len]));
        buf = &buf[align4(len).min(buf.len())..];
    }
    out
}

fn ip(payload: &[u8]) -> Option<IpAddr> {
    match payload.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::new(
            payload[0], payload[1], payload[2], payload[3],
        ))),
        16 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(payload);
            Some(IpAddr::V6(Ipv6Addr::from(a)))
        }
        _ => None,
    }
}

fn be16(p: &[u8]) -> u16 {
    if p.len() >= 2 {
        u16::from_be_bytes([p[0], p[1]])
    } else {
        0
    }
}

/// Parses the payload of a `CTA_TUPLE_*` attribute.
pub fn tuple(payload: &[u8]) -> Tuple {
    let mut t = Tuple::default();
    for (ty, p) in attrs(payload) {
        match ty {
            CTA_TUPLE_IP => {
                for (k, v) in attrs(p) {
                    match k {
                        1 | 3 => t.src = ip(v),
                        2 | 4 => t.dst = ip(v),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (k, v) in attrs(p) {
                    match k {
                        CTA_PROTO_NUM => t.proto = v.first().copied().unwrap_or(0),
                        CTA_PROTO_SRC_PORT => t.sport = be16(v),
                        CTA_PROTO_DST_PORT => t.dport = be16(v),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    t
}

fn proto_num(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

/// Whether an entry (original, reply) is a connection of `f` that was
/// DNATed to `e`.
pub fn matches(orig: &Tuple, reply: &Tuple, f: &Frontend, e: &SocketAddr) -> bool {
    orig.proto == proto_num(f.protocol)
        && orig.dst == Some(f.ip)
        && orig.dport == f.port
        && reply.src == Some(e.ip())
        && reply.sport == e.port()
}

fn message(ty: u16, flags: u16, family: u8, seq: u32, attrs: &[u8]) -> Vec<u8> {
    let len = 16 + 4 + attrs.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_ne_bytes());
    m.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | ty).to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[family, 0, 0, 0]);
    m.extend_from_slice(attrs);
    m
}

fn open() -> io::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
    setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(2, 0))?;
    Ok(fd)
}

/// Reads replies to request `seq` until DONE (dump) or the ACK; calls
/// `each` with every message's type and payload (after `nfgenmsg`).
fn read_replies(fd: &OwnedFd, seq: u32, mut each: impl FnMut(u16, &[u8])) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        let mut rest = &buf[..n];
        while rest.len() >= 16 {
            let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let ty = u16::from_ne_bytes([rest[4], rest[5]]);
            let mseq = u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]);
            if len < 16 || len > rest.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "bad netlink length",
                ));
            }
            let body = &rest[16..len];
            rest = &rest[align4(len).min(rest.len())..];
            if mseq != seq {
                continue;
            }
            match ty {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let code = body
                        .get(..4)
                        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                        .unwrap_or(0);
                    return if code == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::from_raw_os_error(-code))
                    };
                }
                _ => each(ty & 0xff, body.get(4..).unwrap_or_default()),
            }
        }
    }
}

/// Deletes the conntrack entries of every `(frontend, endpoint)` pair,
/// in the calling thread's network namespace. Returns how many went.
pub fn delete_flows(pairs: &[(Frontend, SocketAddr)]) -> io::Result<usize> {
    if pairs.is_empty() {
        return Ok(0);
    }
    let fd = open()?;
    let mut victims: Vec<(u8, Vec<u8>)> = Vec::new();
    let mut seq = 1;
    for (family, is_v4) in [(libc_af_inet(), true), (libc_af_inet6(), false)] {
        if !pairs.iter().any(|(f, _)| f.ip.is_ipv4() == is_v4) {
            continue;
        }
        seq += 1;
        let req = message(
            IPCTNL_MSG_CT_GET,
            NLM_F_REQUEST | NLM_F_DUMP,
            family,
            seq,
            &[],
        );
        send(fd.as_raw_fd(), &req, MsgFlags::empty())?;
        read_replies(&fd, seq, |ty, payload| {
            if ty != IPCTNL_MSG_CT_NEW {
                return;
            }
            let mut orig_raw = None;
            let (mut orig, mut reply) = (Tuple::default(), Tuple::default());
            let mut at = 0;
            for (t, p) in attrs(payload) {
                // keep the raw original tuple attribute for the delete
                let len = 4 + p.len();
                if t == CTA_TUPLE_ORIG {
                    orig = tuple(p);
                    orig_raw = payload.get(at..at + len).map(<[u8]>::to_vec);
                } else if t == CTA_TUPLE_REPLY {
                    reply = tuple(p);
                }
                at += align4(len);
            }
            if let Some(raw) = orig_raw {
                if pairs.iter().any(|(f, e)| matches(&orig, &reply, f, e)) {
                    victims.push((family, raw));
                }
            }
        })?;
    }
    let mut deleted = 0;
    for (family, raw) in victims {
        seq += 1;
        let req = message(
            IPCTNL_MSG_CT_DELETE,
            NLM_F_REQUEST | NLM_F_ACK,
            family,
            seq,
            &raw,
        );
        send(fd.as_raw_fd(), &req, MsgFlags::empty())?;
        match read_replies(&fd, seq, |_, _| {}) {
            Ok(()) => deleted += 1,
            // gone meanwhile (timed out, or deleted by someone else)
            Err(e) if e.raw_os_error() == Some(2) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

fn libc_af_inet() -> u8 {
    2
}

fn libc_af_inet6() -> u8 {
    10
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use sdn_tunnel_core::services::{Frontend, Protocol};

    use super::*;

    fn nla(ty: u16, payload: &[u8]) -> Vec<u8> {
        let len = u16::try_from(4 + payload.len()).unwrap();
        let mut v = len.to_ne_bytes().to_vec();
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(payload);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    fn ct_tuple(src: [u8; 4], dst: [u8; 4], proto: u8, sport: u16, dport: u16) -> Vec<u8> {
        let nested = 0x8000;
        let ip = [nla(1, &src), nla(2, &dst)].concat();
        let pr = [
            nla(1, &[proto]),
            nla(2, &sport.to_be_bytes()),
            nla(3, &dport.to_be_bytes()),
        ]
        .concat();
        [nla(1 | nested, &ip), nla(2 | nested, &pr)].concat()
    }

    #[test]
    fn conntrack_tuples_parse_and_match_the_dnat_of_a_frontend() {
        // client 10.1.1.7:40000 -> 10.102.0.10:53, DNATed to 10.2.1.5:5353
        let orig = ct_tuple([10, 1, 1, 7], [10, 102, 0, 10], 17, 40000, 53);
        let reply = ct_tuple([10, 2, 1, 5], [10, 1, 1, 7], 17, 5353, 40000);
        let entry = [nla(1 | 0x8000, &orig), nla(2 | 0x8000, &reply)].concat();
        let parsed = attrs(&entry);
        assert_eq!(parsed.len(), 2);
        let o = tuple(parsed[0].1);
        let r = tuple(parsed[1].1);
        assert_eq!(o.dst, Some("10.102.0.10".parse().unwrap()));
        assert_eq!((o.proto, o.sport, o.dport), (17, 40000, 53));
        assert_eq!(r.src, Some("10.2.1.5".parse().unwrap()));
        let f = Frontend {
            ip: "10.102.0.10".parse().unwrap(),
            protocol: Protocol::Udp,
            port: 53,
        };
        assert!(matches(&o, &r, &f, &"10.2.1.5:5353".parse().unwrap()));
        assert!(!matches(&o, &r, &f, &"10.2.1.6:5353".parse().unwrap()));
        let tcp = Frontend {
            protocol: Protocol::Tcp,
            ..f
        };
        assert!(!matches(&o, &r, &tcp, &"10.2.1.5:5353".parse().unwrap()));
        // truncated input: no panic, nothing parsed past the damage
        assert!(attrs(&entry[..3]).is_empty());
        assert_eq!(attrs(&entry[..entry.len() - 4]).len(), 1);
    }
}
