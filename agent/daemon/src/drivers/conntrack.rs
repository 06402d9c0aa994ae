//! Deleting conntrack entries over ctnetlink (`NETLINK_NETFILTER`): a dump,
//! a filter, and one delete per entry.
//!
//! The messages are `netlink-packet-netfilter`'s (the dump request, the
//! entries with their tuples, the delete by original tuple) in
//! `netlink-packet-core`'s framing. That crate carries no socket, and the
//! `conntrack` crate (the other candidate) can only dump, not delete: the
//! socket, the sequence numbers and the wait for `DONE` or the ACK are
//! here, over `nix`.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Tuple as CtTuple,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use nix::sys::socket::{
    bind, recv, send, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};
use nix::sys::time::TimeVal;
use sdn_tunnel_core::services::{Frontend, Protocol};
use tracing::debug;

/// Length of `struct nlmsghdr`.
const NLMSG_HDRLEN: usize = 16;

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

/// The addresses, protocol and ports of a `CTA_TUPLE_*` attribute.
pub fn tuple(parts: &[CtTuple]) -> Tuple {
    let mut t = Tuple::default();
    for part in parts {
        match part {
            CtTuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => t.src = Some(*a),
                        IPTuple::DestinationAddress(a) => t.dst = Some(*a),
                        _ => {}
                    }
                }
            }
            CtTuple::Proto(fields) => {
                for f in fields {
                    match f {
                        ProtoTuple::Protocol(p) => t.proto = u8::from(*p),
                        ProtoTuple::SourcePort(p) => t.sport = *p,
                        ProtoTuple::DestinationPort(p) => t.dport = *p,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    t
}

/// The original and reply tuples of an entry, and the original tuple's
/// attribute as the kernel sent it (what a delete names the entry by).
pub fn entry(attrs: Vec<ConntrackAttribute>) -> Option<(Tuple, Tuple, Vec<CtTuple>)> {
    let mut orig = None;
    let mut reply = Tuple::default();
    for a in attrs {
        match a {
            ConntrackAttribute::CtaTupleOrig(t) => orig = Some(t),
            ConntrackAttribute::CtaTupleReply(t) => reply = tuple(&t),
            _ => {}
        }
    }
    orig.map(|raw| (tuple(&raw), reply, raw))
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

/// A ctnetlink request, framed.
fn request(family: NetfilterProtoFamily, msg: ConntrackMessage, flags: u16, seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut m = NetlinkMessage::new(
        header,
        NetlinkPayload::InnerMessage(NetfilterMessage::new(
            NetfilterHeader::new(family, 0, 0),
            msg,
        )),
    );
    m.finalize();
    let mut buf = vec![0u8; m.buffer_len()];
    m.serialize(&mut buf);
    buf
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
/// `each` with every conntrack message. An entry that does not parse is
/// skipped.
fn read_replies(fd: &OwnedFd, seq: u32, mut each: impl FnMut(ConntrackMessage)) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        let mut rest = &buf[..n];
        while rest.len() >= NLMSG_HDRLEN {
            let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            if len < NLMSG_HDRLEN || len > rest.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "bad netlink length",
                ));
            }
            let one = &rest[..len];
            rest = &rest[align4(len).min(rest.len())..];
            let msg = match NetlinkMessage::<NetfilterMessage>::deserialize(one) {
                Ok(m) => m,
                Err(e) => {
                    debug!(error = %e, "unparsable ctnetlink message skipped");
                    continue;
                }
            };
            if msg.header.sequence_number != seq {
                continue;
            }
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => {
                    return match e.code {
                        None => Ok(()),
                        Some(_) => Err(e.to_io()),
                    };
                }
                NetlinkPayload::InnerMessage(NetfilterMessage {
                    inner: NetfilterMessageInner::Conntrack(m),
                    ..
                }) => each(m),
                _ => {}
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
    let mut victims: Vec<(NetfilterProtoFamily, Vec<CtTuple>)> = Vec::new();
    let mut seq = 1;
    for (family, is_v4) in [
        (NetfilterProtoFamily::IPv4, true),
        (NetfilterProtoFamily::IPv6, false),
    ] {
        if !pairs.iter().any(|(f, _)| f.ip.is_ipv4() == is_v4) {
            continue;
        }
        seq += 1;
        let req = request(
            family,
            ConntrackMessage::Get(Vec::new()),
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
        );
        send(fd.as_raw_fd(), &req, MsgFlags::empty())?;
        read_replies(&fd, seq, |m| {
            let ConntrackMessage::New(attrs) = m else {
                return;
            };
            if let Some((orig, reply, raw)) = entry(attrs) {
                if pairs.iter().any(|(f, e)| matches(&orig, &reply, f, e)) {
                    victims.push((family, raw));
                }
            }
        })?;
    }
    let mut deleted = 0;
    for (family, raw) in victims {
        seq += 1;
        let req = request(
            family,
            ConntrackMessage::Delete(vec![ConntrackAttribute::CtaTupleOrig(raw)]),
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
        );
        send(fd.as_raw_fd(), &req, MsgFlags::empty())?;
        match read_replies(&fd, seq, |_| {}) {
            Ok(()) => deleted += 1,
            // gone meanwhile (timed out, or deleted by someone else)
            Err(e) if e.raw_os_error() == Some(2) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use netlink_packet_core::ParseableParametrized;
    use sdn_tunnel_core::services::{Frontend, Protocol};

    use super::*;

    /// ctnetlink's IPCTNL_MSG_CT_NEW in subsystem NFNL_SUBSYS_CTNETLINK.
    const CT_NEW: u16 = 1 << 8;

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
        let ip = [nla(1 | nested, &[nla(1, &src), nla(2, &dst)].concat())].concat();
        let pr = [
            nla(1, &[proto]),
            nla(2, &sport.to_be_bytes()),
            nla(3, &dport.to_be_bytes()),
        ]
        .concat();
        [ip, nla(2 | nested, &pr)].concat()
    }

    /// An entry as the kernel sends it: nfgenmsg (AF_INET), then the
    /// original and reply tuples.
    fn kernel_entry(orig: Vec<u8>, reply: Vec<u8>) -> Vec<u8> {
        [
            vec![2, 0, 0, 0],
            nla(1 | 0x8000, &orig),
            nla(2 | 0x8000, &reply),
        ]
        .concat()
    }

    #[test]
    fn conntrack_tuples_parse_and_match_the_dnat_of_a_frontend() {
        // client 10.1.1.7:40000 -> 10.102.0.10:53, DNATed to 10.2.1.5:5353
        let orig = ct_tuple([10, 1, 1, 7], [10, 102, 0, 10], 17, 40000, 53);
        let reply = ct_tuple([10, 2, 1, 5], [10, 1, 1, 7], 17, 5353, 40000);
        let raw = kernel_entry(orig, reply);
        let msg = NetfilterMessage::parse_with_param(&raw, CT_NEW).unwrap();
        let NetfilterMessageInner::Conntrack(ConntrackMessage::New(attrs)) = msg.inner else {
            panic!("not a conntrack entry: {msg:?}");
        };
        let (o, r, orig_attr) = entry(attrs).unwrap();
        assert_eq!(o.dst, Some("10.102.0.10".parse().unwrap()));
        assert_eq!((o.proto, o.sport, o.dport), (17, 40000, 53));
        assert_eq!(r.src, Some("10.2.1.5".parse().unwrap()));
        assert_eq!(tuple(&orig_attr), o);
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
        // truncated input: no panic; an entry without its tuples matches nothing
        for cut in 0..raw.len() {
            if let Ok(m) = NetfilterMessage::parse_with_param(&raw[..cut], CT_NEW) {
                if let NetfilterMessageInner::Conntrack(ConntrackMessage::New(a)) = m.inner {
                    let _ = entry(a);
                }
            }
        }
    }

    #[test]
    fn requests_are_framed_with_their_sequence_and_flags() {
        let t = vec![CtTuple::Proto(vec![ProtoTuple::Protocol(
            netlink_packet_netfilter::conntrack::Protocol::Udp,
        )])];
        let raw = request(
            NetfilterProtoFamily::IPv4,
            ConntrackMessage::Delete(vec![ConntrackAttribute::CtaTupleOrig(t.clone())]),
            NLM_F_REQUEST | NLM_F_ACK,
            7,
        );
        assert_eq!(
            u32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]) as usize,
            raw.len()
        );
        // type: NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE
        assert_eq!(u16::from_ne_bytes([raw[4], raw[5]]), (1 << 8) | 2);
        let back = NetlinkMessage::<NetfilterMessage>::deserialize(&raw).unwrap();
        assert_eq!(back.header.sequence_number, 7);
        assert_eq!(back.header.flags, NLM_F_REQUEST | NLM_F_ACK);
        let NetlinkPayload::InnerMessage(m) = back.payload else {
            panic!("no inner message");
        };
        assert_eq!(
            m.inner,
            NetfilterMessageInner::Conntrack(ConntrackMessage::Delete(vec![
                ConntrackAttribute::CtaTupleOrig(t)
            ]))
        );
    }
}
