//! TUN offloads, as pure functions over byte buffers (no I/O here).
//!
//! With `IFF_VNET_HDR` every frame on the TUN fd starts with a
//! `virtio_net_hdr`. After `TUNSETOFFLOAD` (TSO4/TSO6, USO) the kernel hands
//! us TCP/UDP *super-packets* of up to 64 KiB with one set of headers and a
//! segment size; [`split`] cuts them into MTU-sized IP packets with correct
//! IPv4 header, TCP/UDP header and checksums, ready to encrypt one by one.
//! The other way, [`GroBatch`] collects decrypted packets and coalesces the
//! TCP segments of one flow (in-order, same ACK, same options), and where
//! asked the UDP datagrams of one flow (equal sizes, a shorter last one),
//! into one super-packet described by a vnet header, written with a single
//! `writev` (the payloads are gathered straight from the packets' slots, no
//! copy).
//!
//! This follows wireguard-go's `tun/offload_linux.go` (`gsoSplit`,
//! `tcpGRO`, `udpGRO`), simplified: segments are only appended, never
//! prepended.

use std::fmt;

/// `sizeof(struct virtio_net_hdr)`.
pub const VNET_HDR_LEN: usize = 10;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum at `csum_start +
/// csum_offset` holds only the pseudo-header sum (`CHECKSUM_PARTIAL`).
pub const VNET_F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
pub const GSO_TCPV6: u8 = 4;
/// `VIRTIO_NET_HDR_GSO_UDP_L4` (USO).
pub const GSO_UDP_L4: u8 = 5;
/// `VIRTIO_NET_HDR_GSO_ECN` bit.
pub const GSO_ECN: u8 = 0x80;

const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_CWR: u8 = 0x80;

/// `struct virtio_net_hdr` (native byte order, as the TUN uses by default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioNetHdr {
    /// `VNET_F_*` flags.
    pub flags: u8,
    /// `GSO_*` type.
    pub gso_type: u8,
    /// Length of all headers (IP + transport).
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where the transport header starts (= IP header length here).
    pub csum_start: u16,
    /// Offset of the checksum field from `csum_start`.
    pub csum_offset: u16,
}

impl VirtioNetHdr {
    /// Reads a header from the first [`VNET_HDR_LEN`] bytes.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let b = b.get(..VNET_HDR_LEN)?;
        let u = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    /// The header as bytes.
    pub fn encode(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b
    }
}

/// Why a frame from the TUN could not be split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitError {
    /// Shorter than its headers say, or offsets point outside it.
    Malformed(&'static str),
    /// A GSO type or IP version we do not handle.
    Unsupported(u8),
    /// More segments than output slots.
    TooManySegments,
    /// A segment does not fit an output slot.
    SlotTooSmall,
}

impl fmt::Display for SplitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SplitError::Malformed(why) => write!(f, "malformed offload frame: {why}"),
            SplitError::Unsupported(t) => write!(f, "unsupported GSO type or IP version {t}"),
            SplitError::TooManySegments => f.write_str("more segments than output slots"),
            SplitError::SlotTooSmall => f.write_str("segment larger than an output slot"),
        }
    }
}

impl std::error::Error for SplitError {}

/// Adds `data` as big-endian 16-bit words to a one's-complement
/// accumulator (odd length: the last byte is the high half of a word).
pub fn csum_add(data: &[u8], mut acc: u64) -> u64 {
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        acc += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    let rest = words.remainder();
    let mut i = 0;
    if rest.len() >= 2 {
        acc += u64::from(u16::from_be_bytes([rest[0], rest[1]]));
        i = 2;
    }
    if i < rest.len() {
        acc += u64::from(rest[i]) << 8;
    }
    acc
}

/// Folds an accumulator to 16 bits (not complemented).
pub fn csum_fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Pseudo-header sum for TCP/UDP over IPv4 (`addrs` = 8 bytes) or IPv6
/// (`addrs` = 32 bytes): source and destination, protocol, L4 length.
pub fn pseudo_sum(proto: u8, addrs: &[u8], l4_len: usize) -> u64 {
    csum_add(addrs, u64::from(proto) + l4_len as u64)
}

/// Offsets and length of the address pair in an IP packet.
fn addr_range(v6: bool) -> std::ops::Range<usize> {
    if v6 {
        8..40
    } else {
        12..20
    }
}

/// Whether the IPv4 header checksum of `pkt` verifies.
pub fn ipv4_header_valid(pkt: &[u8]) -> bool {
    let ihl = usize::from(pkt.first().map_or(0, |b| b & 0x0f)) * 4;
    ihl >= 20 && pkt.len() >= ihl && csum_fold(csum_add(&pkt[..ihl], 0)) == 0xffff
}

/// Whether the TCP or UDP checksum of the IP packet `pkt` (transport header
/// at `l4`) verifies.
pub fn l4_checksum_valid(pkt: &[u8], l4: usize, proto: u8) -> bool {
    let v6 = pkt.first().is_some_and(|b| b >> 4 == 6);
    if pkt.len() < l4 || pkt.len() < addr_range(v6).end {
        return false;
    }
    let acc = pseudo_sum(proto, &pkt[addr_range(v6)], pkt.len() - l4);
    csum_fold(csum_add(&pkt[l4..], acc)) == 0xffff
}

/// Output of [`split`]: where the packets are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// One ordinary packet, left in place (its checksum completed if the
    /// kernel asked for it).
    InPlace(usize),
    /// `n` packets written to the output slots.
    Segments(usize),
}

/// Splits one frame read from a vnet-header TUN. `pkt` is the frame without
/// its vnet header (modified in place), `hdr` the decoded header. Segments
/// go to `out` in slots of `stride` bytes, their lengths to `sizes`.
pub fn split(
    pkt: &mut [u8],
    hdr: &VirtioNetHdr,
    out: &mut [u8],
    stride: usize,
    sizes: &mut [usize],
) -> Result<Split, SplitError> {
    if hdr.gso_type == GSO_NONE {
        if hdr.flags & VNET_F_NEEDS_CSUM != 0 {
            let start = usize::from(hdr.csum_start);
            let at = start + usize::from(hdr.csum_offset);
            if at + 2 > pkt.len() || start > at {
                return Err(SplitError::Malformed("checksum offset outside the packet"));
            }
            // The field holds the pseudo-header sum: complete it.
            let initial = u16::from_be_bytes([pkt[at], pkt[at + 1]]);
            pkt[at] = 0;
            pkt[at + 1] = 0;
            let c = !csum_fold(csum_add(&pkt[start..], u64::from(initial)));
            pkt[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
        return Ok(Split::InPlace(pkt.len()));
    }
    let version = pkt.first().map_or(0, |b| b >> 4);
    let gso = hdr.gso_type & !GSO_ECN;
    let v6 = match (version, gso) {
        (4, GSO_TCPV4 | GSO_UDP_L4) => false,
        (6, GSO_TCPV6 | GSO_UDP_L4) => true,
        (4 | 6, t) => return Err(SplitError::Unsupported(t)),
        (v, _) => return Err(SplitError::Unsupported(v)),
    };
    let tcp = gso != GSO_UDP_L4;
    let iph = usize::from(hdr.csum_start);
    if v6 {
        if iph < 40 {
            return Err(SplitError::Malformed("IPv6 transport offset below 40"));
        }
    } else if iph < 20 || iph != usize::from(pkt[0] & 0x0f) * 4 {
        return Err(SplitError::Malformed("IPv4 header length"));
    }
    // Do not trust hdr_len (it can cover a whole packet on forwarding):
    // derive it from the transport header.
    let hl = if tcp {
        let doff = *pkt
            .get(iph + 12)
            .ok_or(SplitError::Malformed("short TCP header"))?;
        let tcph = usize::from(doff >> 4) * 4;
        if !(20..=60).contains(&tcph) {
            return Err(SplitError::Malformed("TCP header length"));
        }
        iph + tcph
    } else {
        iph + 8
    };
    let csum_at = iph + if tcp { 16 } else { 6 };
    if pkt.len() < hl || csum_at + 2 > pkt.len() {
        return Err(SplitError::Malformed("shorter than its headers"));
    }
    let gso_size = usize::from(hdr.gso_size);
    if gso_size == 0 {
        return Err(SplitError::Malformed("zero segment size"));
    }
    if hl + gso_size.min(pkt.len() - hl) > stride {
        return Err(SplitError::SlotTooSmall);
    }
    let payload = pkt.len() - hl;
    let count = payload.div_ceil(gso_size).max(1);
    if count > sizes.len() || count * stride > out.len() {
        return Err(SplitError::TooManySegments);
    }
    let first_seq = if tcp {
        u32::from_be_bytes([pkt[iph + 4], pkt[iph + 5], pkt[iph + 6], pkt[iph + 7]])
    } else {
        0
    };
    let ipv4_id = u16::from_be_bytes([pkt[4], pkt[5]]);
    let addrs = addr_range(v6);
    for (i, size) in sizes.iter_mut().enumerate().take(count) {
        let data_start = hl + i * gso_size;
        let data_end = (data_start + gso_size).min(pkt.len());
        let seg_len = data_end - data_start;
        let total = hl + seg_len;
        *size = total;
        let o = &mut out[i * stride..i * stride + total];
        o[..hl].copy_from_slice(&pkt[..hl]);
        o[hl..].copy_from_slice(&pkt[data_start..data_end]);
        if v6 {
            o[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
        } else {
            o[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            o[4..6].copy_from_slice(&ipv4_id.wrapping_add(i as u16).to_be_bytes());
            o[10] = 0;
            o[11] = 0;
            let c = !csum_fold(csum_add(&o[..iph], 0));
            o[10..12].copy_from_slice(&c.to_be_bytes());
        }
        if tcp {
            let seq = first_seq.wrapping_add((i * gso_size) as u32);
            o[iph + 4..iph + 8].copy_from_slice(&seq.to_be_bytes());
            if i > 0 {
                o[iph + 13] &= !TCP_CWR;
            }
            if data_end != pkt.len() {
                o[iph + 13] &= !(TCP_FIN | TCP_PSH);
            }
        } else {
            o[iph + 4..iph + 6].copy_from_slice(&((total - iph) as u16).to_be_bytes());
        }
        o[csum_at] = 0;
        o[csum_at + 1] = 0;
        let proto = if tcp { PROTO_TCP } else { PROTO_UDP };
        let acc = pseudo_sum(proto, &pkt[addrs.clone()], total - iph);
        let mut c = !csum_fold(csum_add(&o[iph..], acc));
        if !tcp && c == 0 {
            c = 0xffff;
        }
        o[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
    }
    Ok(Split::Segments(count))
}

/// What [`GroBatch::coalesce`] found for a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Written on its own with an empty vnet header.
    Single,
    /// First packet of flow entry `n`.
    Head(u16),
    /// Merged into an earlier head.
    Member,
}

#[derive(Clone, Copy, Debug)]
struct Flow {
    udp: bool,
    /// Addresses (IPv4 in the first 8 bytes), ports, ACK number.
    addrs: [u8; 32],
    ports: u32,
    ack: u32,
    v6: bool,
    head: u16,
    tail: u16,
    members: u16,
    iph: u16,
    tcph: u16,
    mss: u16,
    payload: usize,
    next_seq: u32,
    /// No more segments may follow (PSH seen, shorter segment, checksum).
    closed: bool,
    head_checked: bool,
}

/// Most segments in one coalesced super-packet.
pub const GRO_MAX_SEGMENTS: usize = 64;

/// Decrypted packets on their way into the TUN, with the GRO state that
/// coalesces them; all storage is allocated once in [`GroBatch::new`].
pub struct GroBatch {
    buf: Box<[u8]>,
    stride: usize,
    lens: Vec<usize>,
    roles: Vec<Role>,
    next: Vec<u16>,
    flows: Vec<Flow>,
    count: usize,
}

/// One frame to write: a vnet header and the pieces of the packet.
pub struct Frame<'a> {
    /// The vnet header to put in front.
    pub hdr: [u8; VNET_HDR_LEN],
    /// The head packet (headers and first payload).
    pub head: &'a [u8],
    batch: &'a GroBatch,
    next: u16,
}

impl<'a> Frame<'a> {
    /// Payloads of the merged segments after the head, in order.
    pub fn tails(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        let batch = self.batch;
        let hl = if self.hdr[1] == GSO_NONE {
            0
        } else {
            usize::from(u16::from_ne_bytes([self.hdr[2], self.hdr[3]]))
        };
        let mut at = self.next;
        std::iter::from_fn(move || {
            if at == u16::MAX {
                return None;
            }
            let i = usize::from(at);
            at = batch.next[i];
            Some(&batch.packet(i)[hl..])
        })
    }

    /// Total length of the frame without the vnet header.
    pub fn len(&self) -> usize {
        self.head.len() + self.tails().map(<[u8]>::len).sum::<usize>()
    }

    /// Whether the frame is empty (never, for frames from a batch).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The frame flattened into `out` (vnet header included), for tests
    /// and for writers without `writev`.
    pub fn flatten_into(&self, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&self.hdr);
        out.extend_from_slice(self.head);
        for t in self.tails() {
            out.extend_from_slice(t);
        }
    }
}

impl GroBatch {
    /// Room for `capacity` packets of at most `stride` bytes each.
    pub fn new(capacity: usize, stride: usize) -> Self {
        assert!(
            capacity > 0 && capacity < usize::from(u16::MAX),
            "bad GRO batch capacity"
        );
        assert!(stride >= 60, "slots must hold at least IP and TCP headers");
        Self {
            buf: vec![0u8; capacity * stride].into_boxed_slice(),
            stride,
            lens: vec![0; capacity],
            roles: vec![Role::Single; capacity],
            next: vec![u16::MAX; capacity],
            flows: Vec::with_capacity(capacity),
            count: 0,
        }
    }

    /// Packets queued.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether the batch is full.
    pub fn is_full(&self) -> bool {
        self.count == self.lens.len()
    }

    /// Drops everything queued.
    pub fn clear(&mut self) {
        self.count = 0;
        self.flows.clear();
    }

    /// The slot for the next packet (`stride` bytes; empty when full):
    /// write (decrypt) a packet into it, then [`GroBatch::commit`] it.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.is_full() {
            return &mut [];
        }
        let at = self.count * self.stride;
        &mut self.buf[at..at + self.stride]
    }

    /// Queues the first `len` bytes of the spare slot.
    pub fn commit(&mut self, len: usize) -> bool {
        if self.is_full() || len > self.stride {
            return false;
        }
        self.lens[self.count] = len;
        self.count += 1;
        true
    }

    /// Copies a packet in; false when full or the packet is too long.
    pub fn push(&mut self, pkt: &[u8]) -> bool {
        if self.is_full() || pkt.len() > self.stride {
            return false;
        }
        self.spare()[..pkt.len()].copy_from_slice(pkt);
        self.commit(pkt.len())
    }

    /// Packet `i` as queued (after [`GroBatch::coalesce`], a head carries the
    /// rewritten headers of its super-packet).
    pub fn packet(&self, i: usize) -> &[u8] {
        &self.buf[i * self.stride..i * self.stride + self.lens[i]]
    }

    /// Every queued packet as its own frame (no coalescing), for a TUN
    /// without offloads or with `gro` off.
    pub fn plain(&mut self) {
        for i in 0..self.count {
            self.roles[i] = Role::Single;
            self.next[i] = u16::MAX;
        }
        self.flows.clear();
    }

    /// Groups the queued TCP segments of each flow into super-packets and
    /// rewrites the heads' headers; returns the number of frames.
    pub fn coalesce(&mut self) -> usize {
        self.coalesce_with(false)
    }

    /// Like [`GroBatch::coalesce`], and with `udp` also the UDP datagrams
    /// of each flow (for a TUN that accepted USO).
    pub fn coalesce_with(&mut self, udp: bool) -> usize {
        self.plain();
        let mut frames = 0;
        for i in 0..self.count {
            if self.try_merge(i, udp) {
                self.roles[i] = Role::Member;
            } else {
                frames += 1;
            }
        }
        for f in 0..self.flows.len() {
            let flow = self.flows[f];
            if flow.members > 1 {
                self.finish_head(&flow);
            } else {
                self.roles[usize::from(flow.head)] = Role::Single;
            }
        }
        frames
    }

    /// The frames to write, in packet order (call after `coalesce` or
    /// `plain`).
    pub fn frames(&self) -> impl Iterator<Item = Frame<'_>> + '_ {
        (0..self.count).filter_map(move |i| match self.roles[i] {
            Role::Member => None,
            Role::Single => Some(Frame {
                hdr: [0; VNET_HDR_LEN],
                head: self.packet(i),
                batch: self,
                next: u16::MAX,
            }),
            Role::Head(f) => {
                let flow = &self.flows[usize::from(f)];
                let hdr = VirtioNetHdr {
                    flags: VNET_F_NEEDS_CSUM,
                    gso_type: match (flow.udp, flow.v6) {
                        (true, _) => GSO_UDP_L4,
                        (false, true) => GSO_TCPV6,
                        (false, false) => GSO_TCPV4,
                    },
                    hdr_len: flow.iph + flow.tcph,
                    gso_size: flow.mss,
                    csum_start: flow.iph,
                    csum_offset: if flow.udp { 6 } else { 16 },
                };
                Some(Frame {
                    hdr: hdr.encode(),
                    head: self.packet(i),
                    batch: self,
                    next: self.next[i],
                })
            }
        })
    }

    /// Tries to append packet `i` to an open flow; otherwise, if it is a
    /// candidate, opens a flow with it as head. Returns whether merged.
    fn try_merge(&mut self, i: usize, udp: bool) -> bool {
        let Some(c) = candidate(self.packet(i), udp) else {
            return false;
        };
        let pkt_payload = self.lens[i] - c.iph - c.tcph;
        let found = self.flows.iter().rposition(|f| {
            f.udp == c.udp
                && f.v6 == c.v6
                && f.ports == c.ports
                && f.ack == c.ack
                && f.addrs == c.addrs
        });
        if let Some(fi) = found {
            let f = self.flows[fi];
            if self.can_append(&f, i, &c, pkt_payload) {
                let f = &mut self.flows[fi];
                let tail = usize::from(f.tail);
                f.tail = i as u16;
                f.members += 1;
                f.payload += pkt_payload;
                f.next_seq = f.next_seq.wrapping_add(pkt_payload as u32);
                f.head_checked = true;
                if c.psh
                    || pkt_payload < usize::from(f.mss)
                    || usize::from(f.members) == GRO_MAX_SEGMENTS
                {
                    f.closed = true;
                }
                self.next[tail] = i as u16;
                return true;
            }
            // Whatever stopped the merge, later segments of the flow go to
            // the new entry opened below.
            self.flows[fi].closed = true;
        }
        let idx = self.flows.len() as u16;
        self.flows.push(Flow {
            udp: c.udp,
            addrs: c.addrs,
            ports: c.ports,
            ack: c.ack,
            v6: c.v6,
            head: i as u16,
            tail: i as u16,
            members: 1,
            iph: c.iph as u16,
            tcph: c.tcph as u16,
            mss: pkt_payload as u16,
            payload: pkt_payload,
            next_seq: c.seq.wrapping_add(pkt_payload as u32),
            closed: c.psh,
            head_checked: false,
        });
        self.roles[i] = Role::Head(idx);
        false
    }

    fn can_append(&self, f: &Flow, i: usize, c: &Candidate, payload: usize) -> bool {
        if f.closed
            || (!c.udp && c.seq != f.next_seq)
            || payload > usize::from(f.mss)
            || c.iph != usize::from(f.iph)
            || c.tcph != usize::from(f.tcph)
            || usize::from(f.iph + f.tcph) + f.payload + payload > 65_535
        {
            return false;
        }
        let head = self.packet(usize::from(f.head));
        let pkt = self.packet(i);
        if !ip_headers_match(head, pkt, f.v6) {
            return false;
        }
        if !c.udp {
            let opts = c.iph + 20..c.iph + c.tcph;
            if head[opts.clone()] != pkt[opts] {
                return false;
            }
        }
        // Never let a corrupt segment be "repaired" by the checksum the
        // kernel computes for the super-packet.
        let proto = if c.udp { PROTO_UDP } else { PROTO_TCP };
        if !f.head_checked && !l4_checksum_valid(head, c.iph, proto) {
            return false;
        }
        l4_checksum_valid(pkt, c.iph, proto)
    }

    /// Rewrites the head's IP length, IP checksum, PSH flag (TCP) or length
    /// (UDP) and the checksum field (pseudo-header sum, `CHECKSUM_PARTIAL`).
    fn finish_head(&mut self, flow: &Flow) {
        let mut psh = false;
        let mut at = self.next[usize::from(flow.head)];
        while at != u16::MAX && !flow.udp {
            let p = self.packet(usize::from(at));
            psh |= p[usize::from(flow.iph) + 13] & TCP_PSH != 0;
            at = self.next[usize::from(at)];
        }
        let iph = usize::from(flow.iph);
        let total = iph + usize::from(flow.tcph) + flow.payload;
        let h = usize::from(flow.head);
        let start = h * self.stride;
        let pkt = &mut self.buf[start..start + self.lens[h]];
        if flow.v6 {
            pkt[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
        } else {
            pkt[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            pkt[10] = 0;
            pkt[11] = 0;
            let c = !csum_fold(csum_add(&pkt[..iph], 0));
            pkt[10..12].copy_from_slice(&c.to_be_bytes());
        }
        let (proto, csum_at) = if flow.udp {
            pkt[iph + 4..iph + 6].copy_from_slice(&((total - iph) as u16).to_be_bytes());
            (PROTO_UDP, iph + 6)
        } else {
            if psh {
                pkt[iph + 13] |= TCP_PSH;
            }
            (PROTO_TCP, iph + 16)
        };
        let partial = csum_fold(pseudo_sum(proto, &pkt[addr_range(flow.v6)], total - iph));
        pkt[csum_at..csum_at + 2].copy_from_slice(&partial.to_be_bytes());
    }
}

struct Candidate {
    udp: bool,
    v6: bool,
    iph: usize,
    tcph: usize,
    addrs: [u8; 32],
    ports: u32,
    ack: u32,
    seq: u32,
    psh: bool,
}

/// Whether `pkt` is a segment GRO may merge: plain IPv4 (no options, not a
/// fragment) or IPv6 without extension headers, lengths consistent, some
/// payload; TCP with only ACK (and PSH) set, or (when `udp`) UDP with a
/// consistent length and a checksum.
fn candidate(pkt: &[u8], udp: bool) -> Option<Candidate> {
    let v6 = match pkt.first()? >> 4 {
        4 => false,
        6 => true,
        _ => return None,
    };
    let proto = if v6 { *pkt.get(6)? } else { *pkt.get(9)? };
    if proto == PROTO_UDP && udp {
        return udp_candidate(pkt, v6);
    }
    if proto != PROTO_TCP {
        return None;
    }
    let iph = if v6 {
        if pkt.len() < 60 {
            return None;
        }
        if usize::from(u16::from_be_bytes([pkt[4], pkt[5]])) != pkt.len() - 40 {
            return None;
        }
        40
    } else {
        if pkt.len() < 40 || !plain_ipv4(pkt) {
            return None;
        }
        20
    };
    let tcph = usize::from(pkt[iph + 12] >> 4) * 4;
    if !(20..=60).contains(&tcph) || pkt.len() <= iph + tcph {
        return None;
    }
    let flags = pkt[iph + 13];
    let psh = match flags {
        TCP_ACK => false,
        f if f == TCP_ACK | TCP_PSH => true,
        _ => return None,
    };
    let mut addrs = [0u8; 32];
    let r = addr_range(v6);
    addrs[..r.len()].copy_from_slice(&pkt[r]);
    let be32 = |at: usize| u32::from_be_bytes([pkt[at], pkt[at + 1], pkt[at + 2], pkt[at + 3]]);
    Some(Candidate {
        udp: false,
        v6,
        iph,
        tcph,
        addrs,
        ports: be32(iph),
        seq: be32(iph + 4),
        ack: be32(iph + 8),
        psh,
    })
}

/// IPv4 without options, total length matching, not a fragment.
fn plain_ipv4(pkt: &[u8]) -> bool {
    pkt.len() >= 20
        && pkt[0] & 0x0f == 5
        && usize::from(u16::from_be_bytes([pkt[2], pkt[3]])) == pkt.len()
        // More-fragments flag or a fragment offset.
        && pkt[6] & 0x3f == 0
        && pkt[7] == 0
}

fn udp_candidate(pkt: &[u8], v6: bool) -> Option<Candidate> {
    let iph = if v6 {
        if usize::from(u16::from_be_bytes([pkt[4], pkt[5]])) != pkt.len().checked_sub(40)? {
            return None;
        }
        40
    } else {
        if !plain_ipv4(pkt) {
            return None;
        }
        20
    };
    if pkt.len() <= iph + 8 {
        return None;
    }
    let udp_len = usize::from(u16::from_be_bytes([pkt[iph + 4], pkt[iph + 5]]));
    // A zero checksum (allowed over IPv4) cannot be verified: keep it apart.
    if udp_len != pkt.len() - iph || (pkt[iph + 6] == 0 && pkt[iph + 7] == 0) {
        return None;
    }
    let mut addrs = [0u8; 32];
    let r = addr_range(v6);
    addrs[..r.len()].copy_from_slice(&pkt[r]);
    Some(Candidate {
        udp: true,
        v6,
        iph,
        tcph: 8,
        addrs,
        ports: u32::from_be_bytes([pkt[iph], pkt[iph + 1], pkt[iph + 2], pkt[iph + 3]]),
        ack: 0,
        seq: 0,
        psh: false,
    })
}

/// IP header fields that must agree for two segments to merge.
fn ip_headers_match(a: &[u8], b: &[u8], v6: bool) -> bool {
    if v6 {
        // Version + traffic class, and hop limit.
        a[0] == b[0] && a[1] >> 4 == b[1] >> 4 && a[7] == b[7]
    } else {
        // TOS, DF/reserved bits, TTL.
        a[1] == b[1] && a[6] >> 5 == b[6] >> 5 && a[8] == b[8]
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    const SRC4: [u8; 4] = [10, 1, 0, 2];
    const DST4: [u8; 4] = [10, 1, 0, 1];
    const SRC6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    const DST6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

    /// An IP header for `proto` carrying `l4_len` bytes.
    fn ip_header(v6: bool, proto: u8, l4_len: usize) -> Vec<u8> {
        if v6 {
            let mut h = vec![0u8; 40];
            h[0] = 0x60;
            h[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
            h[6] = proto;
            h[7] = 64;
            h[8..24].copy_from_slice(&SRC6);
            h[24..40].copy_from_slice(&DST6);
            h
        } else {
            let mut h = vec![0u8; 20];
            h[0] = 0x45;
            h[2..4].copy_from_slice(&((20 + l4_len).min(65_535) as u16).to_be_bytes());
            h[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
            h[6] = 0x40; // DF
            h[8] = 64;
            h[9] = proto;
            h[12..16].copy_from_slice(&SRC4);
            h[16..20].copy_from_slice(&DST4);
            let c = !csum_fold(csum_add(&h, 0));
            h[10..12].copy_from_slice(&c.to_be_bytes());
            h
        }
    }

    /// A TCP segment with valid checksums.
    pub(crate) fn tcp_packet(
        v6: bool,
        seq: u32,
        ack: u32,
        flags: u8,
        opts: &[u8],
        payload: &[u8],
    ) -> Vec<u8> {
        let tcph = 20 + opts.len();
        let mut p = ip_header(v6, PROTO_TCP, tcph + payload.len());
        let iph = p.len();
        let mut t = vec![0u8; tcph];
        t[0..2].copy_from_slice(&5555u16.to_be_bytes());
        t[2..4].copy_from_slice(&80u16.to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&ack.to_be_bytes());
        t[12] = ((tcph / 4) as u8) << 4;
        t[13] = flags;
        t[14..16].copy_from_slice(&65535u16.to_be_bytes());
        t[20..].copy_from_slice(opts);
        p.extend_from_slice(&t);
        p.extend_from_slice(payload);
        let acc = pseudo_sum(PROTO_TCP, &p[addr_range(v6)], p.len() - iph);
        let c = !csum_fold(csum_add(&p[iph..], acc));
        p[iph + 16..iph + 18].copy_from_slice(&c.to_be_bytes());
        p
    }

    /// A UDP datagram from 10.1.0.2:4000 (or fd00::2) to port 51820 with
    /// valid checksums and the given IPv4 ID.
    pub(crate) fn udp_packet(v6: bool, id: u16, payload: &[u8]) -> Vec<u8> {
        let mut p = ip_header(v6, PROTO_UDP, 8 + payload.len());
        if !v6 {
            p[4..6].copy_from_slice(&id.to_be_bytes());
            p[10] = 0;
            p[11] = 0;
            let c = !csum_fold(csum_add(&p, 0));
            p[10..12].copy_from_slice(&c.to_be_bytes());
        }
        let iph = p.len();
        p.extend_from_slice(&4000u16.to_be_bytes());
        p.extend_from_slice(&51820u16.to_be_bytes());
        p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(payload);
        let acc = pseudo_sum(PROTO_UDP, &p[addr_range(v6)], p.len() - iph);
        let mut c = !csum_fold(csum_add(&p[iph..], acc));
        if c == 0 {
            c = 0xffff;
        }
        p[iph + 6..iph + 8].copy_from_slice(&c.to_be_bytes());
        p
    }

    /// A TSO super-packet as the kernel hands it over: one header set, the
    /// TCP checksum field holding only the pseudo-header sum.
    fn tso_frame(
        v6: bool,
        seq: u32,
        flags: u8,
        opts: &[u8],
        payload: &[u8],
        mss: u16,
    ) -> (VirtioNetHdr, Vec<u8>) {
        let mut p = tcp_packet(v6, seq, 77, flags, opts, payload);
        let iph = if v6 { 40 } else { 20 };
        let partial = csum_fold(pseudo_sum(PROTO_TCP, &p[addr_range(v6)], p.len() - iph));
        p[iph + 16..iph + 18].copy_from_slice(&partial.to_be_bytes());
        let hdr = VirtioNetHdr {
            flags: VNET_F_NEEDS_CSUM,
            gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
            hdr_len: (iph + 20 + opts.len()) as u16,
            gso_size: mss,
            csum_start: iph as u16,
            csum_offset: 16,
        };
        (hdr, p)
    }

    fn set_ipv4_id(p: &mut [u8], id: u16) {
        p[4..6].copy_from_slice(&id.to_be_bytes());
        p[10] = 0;
        p[11] = 0;
        let c = !csum_fold(csum_add(&p[..20], 0));
        p[10..12].copy_from_slice(&c.to_be_bytes());
    }

    fn split_all(hdr: &VirtioNetHdr, frame: &mut [u8], stride: usize) -> Vec<Vec<u8>> {
        let mut out = vec![0u8; 256 * stride];
        let mut sizes = vec![0usize; 256];
        match split(frame, hdr, &mut out, stride, &mut sizes).expect("split") {
            Split::InPlace(n) => vec![frame[..n].to_vec()],
            Split::Segments(k) => (0..k)
                .map(|i| out[i * stride..i * stride + sizes[i]].to_vec())
                .collect(),
        }
    }

    fn tcp_payload(p: &[u8]) -> &[u8] {
        let iph = if p[0] >> 4 == 6 { 40 } else { 20 };
        &p[iph + usize::from(p[iph + 12] >> 4) * 4..]
    }

    fn seq_of(p: &[u8]) -> u32 {
        let iph = if p[0] >> 4 == 6 { 40 } else { 20 };
        u32::from_be_bytes(p[iph + 4..iph + 8].try_into().unwrap())
    }

    fn valid_tcp(p: &[u8]) -> bool {
        let v6 = p[0] >> 4 == 6;
        let iph = if v6 { 40 } else { 20 };
        (v6 || ipv4_header_valid(p)) && l4_checksum_valid(p, iph, PROTO_TCP)
    }

    /// Coalesces `pkts` and splits every resulting frame again.
    fn coalesce_then_split(pkts: &[Vec<u8>], stride: usize) -> (usize, usize, Vec<Vec<u8>>) {
        coalesce_then_split_with(pkts, stride, false)
    }

    fn coalesce_then_split_with(
        pkts: &[Vec<u8>],
        stride: usize,
        udp: bool,
    ) -> (usize, usize, Vec<Vec<u8>>) {
        let mut b = GroBatch::new(pkts.len(), stride);
        for p in pkts {
            assert!(b.push(p));
        }
        let frames = b.coalesce_with(udp);
        let mut coalesced = 0;
        let mut again = Vec::new();
        let mut flat = Vec::new();
        let mut seen = 0;
        for f in b.frames() {
            seen += 1;
            f.flatten_into(&mut flat);
            let hdr = VirtioNetHdr::decode(&flat).unwrap();
            if hdr.gso_type != GSO_NONE {
                coalesced += 1;
                assert!(flat.len() - VNET_HDR_LEN <= 65_535);
            }
            again.extend(split_all(&hdr, &mut flat[VNET_HDR_LEN..], stride));
        }
        assert_eq!(seen, frames);
        (frames, coalesced, again)
    }

    const TIMESTAMPS: [u8; 12] = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn tso_split_then_gro_coalesce_round_trips(
            v6 in any::<bool>(),
            len in 1usize..30_000,
            mss in 200u16..=1460,
            seq in any::<u32>(),
            with_opts in any::<bool>(),
            psh in any::<bool>(),
            fill in any::<u8>(),
        ) {
            let payload: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(fill)).collect();
            let opts: &[u8] = if with_opts { &TIMESTAMPS } else { &[] };
            let flags = TCP_ACK | if psh { TCP_PSH } else { 0 };
            let (hdr, mut frame) = tso_frame(v6, seq, flags, opts, &payload, mss);
            let stride = 1600;
            let pkts = split_all(&hdr, &mut frame, stride);
            let count = len.div_ceil(usize::from(mss));
            prop_assert_eq!(pkts.len(), count);
            let mut joined = Vec::new();
            for (i, p) in pkts.iter().enumerate() {
                prop_assert!(valid_tcp(p), "segment {} has a bad checksum", i);
                prop_assert!(tcp_payload(p).len() <= usize::from(mss));
                prop_assert_eq!(seq_of(p), seq.wrapping_add((i * usize::from(mss)) as u32));
                let iph = if v6 { 40 } else { 20 };
                let last = i + 1 == count;
                prop_assert_eq!(p[iph + 13] & TCP_PSH != 0, psh && last);
                joined.extend_from_slice(tcp_payload(p));
            }
            prop_assert_eq!(&joined, &payload);

            let (frames, coalesced, again) = coalesce_then_split(&pkts, stride);
            prop_assert!(again == pkts, "re-splitting the coalesced frames gives the same packets");
            let hl = (if v6 { 40 } else { 20 }) + 20 + opts.len();
            let per_frame = GRO_MAX_SEGMENTS.min((65_535 - hl) / usize::from(mss));
            prop_assert_eq!(frames, count.div_ceil(per_frame));
            if count > 1 {
                prop_assert!(coalesced >= 1);
            }
        }

        #[test]
        fn uso_split_gives_valid_datagrams(
            v6 in any::<bool>(),
            len in 1usize..20_000,
            seg in 100u16..=1472,
        ) {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut p = ip_header(v6, PROTO_UDP, 8 + len);
            let iph = p.len();
            p.extend_from_slice(&4000u16.to_be_bytes());
            p.extend_from_slice(&51820u16.to_be_bytes());
            p.extend_from_slice(&((8 + len).min(65_535) as u16).to_be_bytes());
            let partial = csum_fold(pseudo_sum(PROTO_UDP, &p[addr_range(v6)], 8 + len));
            p.extend_from_slice(&partial.to_be_bytes());
            p.extend_from_slice(&payload);
            let hdr = VirtioNetHdr {
                flags: VNET_F_NEEDS_CSUM,
                gso_type: GSO_UDP_L4,
                hdr_len: (iph + 8) as u16,
                gso_size: seg,
                csum_start: iph as u16,
                csum_offset: 6,
            };
            let out = split_all(&hdr, &mut p, 1600);
            prop_assert_eq!(out.len(), len.div_ceil(usize::from(seg)));
            let mut joined = Vec::new();
            for d in &out {
                prop_assert!(v6 || ipv4_header_valid(d));
                prop_assert!(l4_checksum_valid(d, iph, PROTO_UDP));
                prop_assert_eq!(usize::from(u16::from_be_bytes([d[iph + 4], d[iph + 5]])), d.len() - iph);
                joined.extend_from_slice(&d[iph + 8..]);
            }
            prop_assert_eq!(joined, payload);
        }

        #[test]
        fn udp_gro_then_split_round_trips(
            v6 in any::<bool>(),
            count in 1usize..100,
            size in 1usize..1400,
            last in 1usize..1400,
        ) {
            let last = last.min(size);
            let pkts: Vec<Vec<u8>> = (0..count)
                .map(|i| {
                    let len = if i + 1 == count { last } else { size };
                    udp_packet(v6, 0x4000u16.wrapping_add(i as u16), &vec![i as u8; len])
                })
                .collect();
            let (frames, coalesced, again) = coalesce_then_split_with(&pkts, 1600, true);
            prop_assert!(again == pkts, "re-splitting the coalesced datagrams gives them back");
            // Greedy packing: a frame takes datagrams while it has fewer than
            // GRO_MAX_SEGMENTS and the super-packet stays within 64 KiB (the
            // short last datagram may still fit where a full one would not).
            let hl = if v6 { 48 } else { 28 };
            let mut expected = 0;
            let (mut in_frame, mut bytes) = (0usize, hl);
            for p in &pkts {
                let l = p.len() - hl;
                if in_frame == 0 || in_frame == GRO_MAX_SEGMENTS || bytes + l > 65_535 {
                    expected += 1;
                    (in_frame, bytes) = (0, hl);
                }
                in_frame += 1;
                bytes += l;
            }
            prop_assert_eq!(frames, expected);
            prop_assert_eq!(coalesced > 0, count > 1);
            // Without `udp`, nothing is coalesced.
            let (frames, coalesced, _) = coalesce_then_split_with(&pkts, 1600, false);
            prop_assert_eq!((frames, coalesced), (count, 0));
        }

        #[test]
        fn split_never_panics_on_garbage(
            frame in proptest::collection::vec(any::<u8>(), 0..3000),
            hdr in proptest::collection::vec(any::<u8>(), VNET_HDR_LEN),
            stride in 1usize..2000,
        ) {
            let hdr = VirtioNetHdr::decode(&hdr).unwrap();
            let mut frame = frame;
            let mut out = vec![0u8; 16 * stride];
            let mut sizes = [0usize; 16];
            let _ = split(&mut frame, &hdr, &mut out, stride, &mut sizes);
        }

        #[test]
        fn coalesce_never_panics_and_keeps_every_packet(
            pkts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 1..20),
        ) {
            let mut b = GroBatch::new(pkts.len(), 256);
            for p in &pkts {
                prop_assert!(b.push(p));
            }
            b.coalesce_with(true);
            let total: usize = b.frames().map(|f| 1 + f.tails().count()).sum();
            prop_assert_eq!(total, pkts.len());
        }
    }

    #[test]
    fn udp_gro_refuses_unsafe_merges() {
        let d = |i: u16, len: usize| udp_packet(false, i, &vec![9; len]);
        let frames = |pkts: Vec<Vec<u8>>| coalesce_then_split_with(&pkts, 1600, true).0;
        assert_eq!(frames(vec![d(0, 500), d(1, 500), d(2, 300)]), 1);
        // A longer datagram after a shorter one, and anything after a short
        // tail, start a new super-packet.
        assert_eq!(frames(vec![d(0, 500), d(1, 600)]), 2);
        assert_eq!(frames(vec![d(0, 500), d(1, 300), d(2, 300)]), 2);
        // Corrupt checksum, zero checksum, other port.
        let mut bad = d(1, 500);
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(frames(vec![d(0, 500), bad, d(2, 500)]), 3);
        let mut zero = d(1, 500);
        zero[26] = 0;
        zero[27] = 0;
        assert_eq!(frames(vec![d(0, 500), zero]), 2);
        let mut other = d(1, 500);
        other[20..22].copy_from_slice(&4001u16.to_be_bytes());
        let acc = pseudo_sum(PROTO_UDP, &other[12..20], other.len() - 20);
        other[26] = 0;
        other[27] = 0;
        let c = !csum_fold(csum_add(&other[20..], acc));
        other[26..28].copy_from_slice(&c.to_be_bytes());
        assert!(l4_checksum_valid(&other, 20, PROTO_UDP));
        assert_eq!(frames(vec![d(0, 500), other, d(2, 500)]), 2);
    }

    #[test]
    fn vnet_header_round_trip() {
        let h = VirtioNetHdr {
            flags: 1,
            gso_type: GSO_TCPV6,
            hdr_len: 72,
            gso_size: 1388,
            csum_start: 40,
            csum_offset: 16,
        };
        assert_eq!(VirtioNetHdr::decode(&h.encode()), Some(h));
        assert_eq!(VirtioNetHdr::decode(&[0; 9]), None);
    }

    #[test]
    fn partial_checksum_is_completed_in_place() {
        let mut p = tcp_packet(false, 1, 2, TCP_ACK | TCP_PSH, &[], b"hello");
        let partial = csum_fold(pseudo_sum(PROTO_TCP, &p[12..20], p.len() - 20));
        p[36..38].copy_from_slice(&partial.to_be_bytes());
        assert!(!valid_tcp(&p));
        let hdr = VirtioNetHdr {
            flags: VNET_F_NEEDS_CSUM,
            csum_start: 20,
            csum_offset: 16,
            ..VirtioNetHdr::default()
        };
        let n = p.len();
        assert_eq!(
            split(&mut p, &hdr, &mut [], 1, &mut []),
            Ok(Split::InPlace(n))
        );
        assert!(valid_tcp(&p));
        let bad = VirtioNetHdr {
            csum_offset: 60,
            ..hdr
        };
        assert!(matches!(
            split(&mut p, &bad, &mut [], 1, &mut []),
            Err(SplitError::Malformed(_))
        ));
    }

    #[test]
    fn split_rejects_what_it_cannot_do() {
        let (hdr, frame) = tso_frame(false, 0, TCP_ACK, &[], &[7; 5000], 1000);
        let mut out = vec![0u8; 10 * 1100];
        let mut sizes = [0usize; 10];
        let mut f = frame.clone();
        assert_eq!(
            split(&mut f, &hdr, &mut out, 1100, &mut sizes[..4]),
            Err(SplitError::TooManySegments)
        );
        let mut f = frame.clone();
        assert_eq!(
            split(&mut f, &hdr, &mut out, 500, &mut sizes),
            Err(SplitError::SlotTooSmall)
        );
        let mut f = frame.clone();
        let v6_type = VirtioNetHdr {
            gso_type: GSO_TCPV6,
            ..hdr
        };
        assert_eq!(
            split(&mut f, &v6_type, &mut out, 1100, &mut sizes),
            Err(SplitError::Unsupported(GSO_TCPV6))
        );
        let mut f = frame;
        let zero = VirtioNetHdr { gso_size: 0, ..hdr };
        assert!(matches!(
            split(&mut f, &zero, &mut out, 1100, &mut sizes),
            Err(SplitError::Malformed(_))
        ));
    }

    #[test]
    fn gro_merges_per_flow_and_keeps_others_apart() {
        let mss = 1000;
        let seg = |v6: bool, i: u32, ack: u32, flags: u8| {
            let payload = vec![i as u8; mss as usize];
            let mut p = tcp_packet(v6, 1000 + i * mss, ack, flags, &[], &payload);
            if !v6 {
                // Consecutive IPv4 IDs, as a sender's TSO produces them.
                set_ipv4_id(&mut p, 0x1234 + i as u16);
            }
            p
        };
        // Two interleaved flows (v4 and v6) and a UDP packet in between.
        let mut udp = ip_header(false, PROTO_UDP, 8);
        udp.extend_from_slice(&[0, 1, 0, 2, 0, 8, 0, 0]);
        let pkts = vec![
            seg(false, 0, 5, TCP_ACK),
            seg(true, 0, 5, TCP_ACK),
            seg(false, 1, 5, TCP_ACK),
            udp,
            seg(true, 1, 5, TCP_ACK),
            seg(false, 2, 5, TCP_ACK | TCP_PSH),
            seg(true, 2, 5, TCP_ACK),
        ];
        let (frames, coalesced, again) = coalesce_then_split(&pkts, 1600);
        assert_eq!((frames, coalesced), (3, 2));
        // Per flow, the order and bytes survive (frames come in head order).
        let expect: Vec<Vec<u8>> = vec![
            pkts[0].clone(),
            pkts[2].clone(),
            pkts[5].clone(),
            pkts[1].clone(),
            pkts[4].clone(),
            pkts[6].clone(),
            pkts[3].clone(),
        ];
        assert!(
            again == expect,
            "per-flow packets differ after the round trip"
        );
    }

    #[test]
    fn gro_refuses_unsafe_merges() {
        let mss = 500usize;
        let seg = |i: usize, ack: u32, flags: u8| {
            tcp_packet(
                false,
                (i * mss) as u32,
                ack,
                flags,
                &[],
                &vec![i as u8; mss],
            )
        };
        let frames = |pkts: Vec<Vec<u8>>| coalesce_then_split(&pkts, 1600).0;
        // A corrupt segment is neither merged nor merged into.
        let mut bad = seg(1, 9, TCP_ACK);
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        assert_eq!(frames(vec![seg(0, 9, TCP_ACK), bad, seg(2, 9, TCP_ACK)]), 3);
        // Different ACK numbers, a gap in sequence, PSH before the end, a
        // longer segment after a shorter one, SYN/FIN flags.
        assert_eq!(frames(vec![seg(0, 1, TCP_ACK), seg(1, 2, TCP_ACK)]), 2);
        assert_eq!(frames(vec![seg(0, 1, TCP_ACK), seg(2, 1, TCP_ACK)]), 2);
        assert_eq!(
            frames(vec![seg(0, 1, TCP_ACK | TCP_PSH), seg(1, 1, TCP_ACK)]),
            2
        );
        let short = tcp_packet(false, 0, 1, TCP_ACK, &[], &[1; 100]);
        let after = tcp_packet(false, 100, 1, TCP_ACK, &[], &[1; 500]);
        assert_eq!(frames(vec![short, after]), 2);
        assert_eq!(
            frames(vec![seg(0, 1, TCP_ACK | TCP_FIN), seg(1, 1, TCP_ACK)]),
            2
        );
        // Control: the same segments with nothing wrong merge.
        assert_eq!(
            frames(vec![
                seg(0, 9, TCP_ACK),
                seg(1, 9, TCP_ACK),
                seg(2, 9, TCP_ACK)
            ]),
            1
        );
    }
}
