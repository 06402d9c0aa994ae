//! A minimal DNS client for the checks: an A query, its answer's rcode and
//! addresses. Enough to ask `tunnel-dns` what a pod would get, without a
//! resolver library between the test and the wire.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use anyhow::{bail, Context, Result};

/// Record type A.
pub const A: u16 = 1;
pub const NOERROR: u8 = 0;
pub const NXDOMAIN: u8 = 3;

/// A query for `name`, type A, class IN, recursion desired.
pub fn encode_query(id: u16, name: &str) -> Result<Vec<u8>> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD, one question
    for label in name.trim_end_matches('.').split('.') {
        q.push(u8::try_from(label.len()).context("label too long")?);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&A.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    Ok(q)
}

/// The offset just past the (possibly compressed) name at `i`.
pub fn skip_name(b: &[u8], mut i: usize) -> Result<usize> {
    loop {
        let len = *b.get(i).context("name past the end")?;
        if len & 0xc0 == 0xc0 {
            return Ok(i + 2);
        }
        if len == 0 {
            return Ok(i + 1);
        }
        i += 1 + usize::from(len);
    }
}

fn u16_at(b: &[u8], i: usize) -> Result<u16> {
    Ok(u16::from_be_bytes([
        *b.get(i).context("short answer")?,
        *b.get(i + 1).context("short answer")?,
    ]))
}

/// The id, rcode and A records of a response.
pub fn decode_answer(b: &[u8]) -> Result<(u16, u8, BTreeSet<Ipv4Addr>)> {
    if b.len() < 12 {
        bail!("{} bytes: not a DNS message", b.len());
    }
    let id = u16_at(b, 0)?;
    let rcode = b[3] & 0x0f;
    let (qd, an) = (u16_at(b, 4)?, u16_at(b, 6)?);
    let mut i = 12;
    for _ in 0..qd {
        i = skip_name(b, i)? + 4;
    }
    let mut ips = BTreeSet::new();
    for _ in 0..an {
        i = skip_name(b, i)?;
        let rtype = u16_at(b, i)?;
        let rdlen = usize::from(u16_at(b, i + 8)?);
        let data = b
            .get(i + 10..i + 10 + rdlen)
            .context("rdata past the end")?;
        if rtype == A && rdlen == 4 {
            ips.insert(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        i += 10 + rdlen;
    }
    Ok((id, rcode, ips))
}
