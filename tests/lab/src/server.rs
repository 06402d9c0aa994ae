//! The tiny server every lab pod runs (`lab serve`), and the clients tests
//! use to reach it from inside a namespace.
//!
//! Protocol, on TCP and UDP alike: the server answers `<pod name>\n`. Over
//! TCP it does so as soon as a connection is accepted, then closes; over
//! UDP it answers every datagram. Knowing *which* pod answered is what lets
//! tests check routing and load-balancing.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::sys::in_netns;

/// Runs the pod server until the process is killed.
pub fn serve(name: &str, port: u16) -> Result<()> {
    let tcp =
        TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("binding TCP port {port}"))?;
    let udp =
        UdpSocket::bind(("0.0.0.0", port)).with_context(|| format!("binding UDP port {port}"))?;
    let reply = format!("{name}\n");
    let udp_reply = reply.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        loop {
            match udp.recv_from(&mut buf) {
                Ok((_, peer)) => {
                    let _ = udp.send_to(udp_reply.as_bytes(), peer);
                }
                Err(e) => eprintln!("udp: {e}"),
            }
        }
    });
    let bulk_port = port
        .checked_add(1)
        .context("no port above the server's for bulk transfers")?;
    let bulk = TcpListener::bind(("0.0.0.0", bulk_port))
        .with_context(|| format!("binding TCP port {bulk_port}"))?;
    std::thread::spawn(move || {
        for conn in bulk.incoming().flatten() {
            std::thread::spawn(move || {
                if let Err(e) = serve_bulk(conn) {
                    eprintln!("bulk: {e:#}");
                }
            });
        }
    });
    for conn in tcp.incoming() {
        match conn {
            Ok(mut stream) => {
                let _ = stream.write_all(reply.as_bytes());
            }
            Err(e) => eprintln!("tcp: {e}"),
        }
    }
    Ok(())
}

/// The bulk protocol on `port + 1`: the client sends one line, `send N`
/// (the server streams N bytes and closes) or `recv` (the server counts
/// what the client sends until it shuts down its side, and answers the
/// count). Full-size segments both ways: what an MTU test needs.
fn serve_bulk(mut stream: TcpStream) -> Result<()> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte)? == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
        if line.len() > 64 {
            bail!("request line too long");
        }
    }
    let line = String::from_utf8_lossy(&line).into_owned();
    let chunk = [0x5au8; 64 * 1024];
    if let Some(n) = line.strip_prefix("send ") {
        let mut left: u64 = n.trim().parse().context("send N: N is not a number")?;
        while left > 0 {
            let k = usize::try_from(left.min(chunk.len() as u64)).unwrap_or(chunk.len());
            stream.write_all(&chunk[..k])?;
            left -= k as u64;
        }
        Ok(())
    } else if line == "recv" {
        let mut buf = vec![0u8; 64 * 1024];
        let mut total: u64 = 0;
        loop {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        stream.write_all(format!("{total}\n").as_bytes())?;
        Ok(())
    } else {
        bail!("unknown bulk request {line:?}")
    }
}

/// Downloads `bytes` from a lab pod's bulk port (`addr` is that port) from
/// inside `netns`; returns how many bytes arrived.
pub fn bulk_download(netns: &str, addr: SocketAddr, bytes: u64, timeout: Duration) -> Result<u64> {
    in_netns(netns, move || {
        let mut stream = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("TCP connect to {addr}"))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.write_all(format!("send {bytes}\n").as_bytes())?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut total: u64 = 0;
        loop {
            let n = stream
                .read(&mut buf)
                .with_context(|| format!("reading from {addr} after {total} bytes"))?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        Ok(total)
    })
}

/// Uploads `bytes` to a lab pod's bulk port from inside `netns`; returns
/// how many bytes the server says it received.
pub fn bulk_upload(netns: &str, addr: SocketAddr, bytes: u64, timeout: Duration) -> Result<u64> {
    in_netns(netns, move || {
        let mut stream = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("TCP connect to {addr}"))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.write_all(b"recv\n")?;
        let chunk = [0xa5u8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let k = usize::try_from(left.min(chunk.len() as u64)).unwrap_or(chunk.len());
            stream
                .write_all(&chunk[..k])
                .with_context(|| format!("writing to {addr}, {left} bytes left"))?;
            left -= k as u64;
        }
        stream.shutdown(std::net::Shutdown::Write)?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        answer
            .trim()
            .parse()
            .with_context(|| format!("server answered {answer:?}"))
    })
}

/// Connects from inside network namespace `netns` to `addr` over TCP and
/// returns what the server sent before closing.
pub fn tcp_request(netns: &str, addr: SocketAddr, timeout: Duration) -> Result<String> {
    in_netns(netns, move || tcp_ask(addr, timeout))
}

/// [`tcp_request`] from this process's own network namespace (what `lab
/// request` runs inside a real pod).
pub fn tcp_ask(addr: SocketAddr, timeout: Duration) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("TCP connect to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .with_context(|| format!("reading from {addr}"))?;
    Ok(answer.trim_end().to_string())
}

/// Sends one UDP datagram from inside `netns` to `addr` and returns the answer.
pub fn udp_request(netns: &str, addr: SocketAddr, timeout: Duration) -> Result<String> {
    in_netns(netns, move || udp_ask(addr, timeout))
}

/// [`udp_request`] from this process's own network namespace.
pub fn udp_ask(addr: SocketAddr, timeout: Duration) -> Result<String> {
    let sock = UdpSocket::bind(("0.0.0.0", 0))?;
    sock.set_read_timeout(Some(timeout))?;
    sock.send_to(b"hello\n", addr)
        .with_context(|| format!("UDP send to {addr}"))?;
    let mut buf = [0u8; 2048];
    let (n, _) = sock
        .recv_from(&mut buf)
        .with_context(|| format!("UDP answer from {addr}"))?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim_end().to_string())
}

/// Asks `addr` over TCP every `interval` for at most `duration`, printing
/// one line per answer or failure (`ok <ms since start> <answer>` / `fail
/// <ms> <error>`), then `longest-gap-ms <n>` (the longest time between two
/// answers) and `outages <n>`. With `until_recovered`, it stops early once
/// an outage is over (20 answers in a row after a failure). Fails when the
/// last probes failed (traffic did not come back in time). What `lab probe`
/// runs in a real pod during a disruption.
pub fn probe(
    addr: SocketAddr,
    interval: Duration,
    duration: Duration,
    until_recovered: bool,
    out: &mut impl Write,
) -> Result<Duration> {
    let started = Instant::now();
    let mut last_ok: Option<Instant> = None;
    let mut longest = Duration::ZERO;
    let (mut failing, mut outages, mut in_a_row) = (false, 0u32, 0u32);
    while started.elapsed() < duration {
        let tick = Instant::now();
        let ms = started.elapsed().as_millis();
        match tcp_ask(addr, interval.max(Duration::from_millis(100))) {
            Ok(a) => {
                let now = Instant::now();
                if let Some(prev) = last_ok {
                    longest = longest.max(now - prev);
                }
                if failing {
                    outages += 1;
                    failing = false;
                    in_a_row = 0;
                }
                in_a_row += 1;
                last_ok = Some(now);
                writeln!(out, "ok {ms} {a}")?;
                if until_recovered && outages > 0 && in_a_row >= 20 {
                    break;
                }
            }
            Err(e) => {
                failing = true;
                writeln!(out, "fail {ms} {e:#}")?;
            }
        }
        out.flush()?;
        if let Some(rest) = interval.checked_sub(tick.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    let Some(last) = last_ok else {
        bail!("no answer from {addr} in {duration:?}");
    };
    if failing {
        bail!(
            "{addr} stopped answering {} ms before the end of the probe",
            last.elapsed().as_millis()
        );
    }
    writeln!(out, "longest-gap-ms {}", longest.as_millis())?;
    writeln!(out, "outages {outages}")?;
    Ok(longest)
}

/// Waits until a TCP server answers at `addr` from inside `netns`.
pub fn wait_listening(netns: &str, addr: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    while Instant::now() < deadline {
        match tcp_request(netns, addr, Duration::from_millis(500)) {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match last {
        Some(e) => Err(e.context(format!("no server at {addr} after {timeout:?}"))),
        None => bail!("no server at {addr} after {timeout:?}"),
    }
}
