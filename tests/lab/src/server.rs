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

/// Connects from inside network namespace `netns` to `addr` over TCP and
/// returns what the server sent before closing.
pub fn tcp_request(netns: &str, addr: SocketAddr, timeout: Duration) -> Result<String> {
    in_netns(netns, move || {
        let mut stream = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("TCP connect to {addr}"))?;
        stream.set_read_timeout(Some(timeout))?;
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .with_context(|| format!("reading from {addr}"))?;
        Ok(answer.trim_end().to_string())
    })
}

/// Sends one UDP datagram from inside `netns` to `addr` and returns the answer.
pub fn udp_request(netns: &str, addr: SocketAddr, timeout: Duration) -> Result<String> {
    in_netns(netns, move || {
        let sock = UdpSocket::bind(("0.0.0.0", 0))?;
        sock.set_read_timeout(Some(timeout))?;
        sock.send_to(b"hello\n", addr)
            .with_context(|| format!("UDP send to {addr}"))?;
        let mut buf = [0u8; 2048];
        let (n, _) = sock
            .recv_from(&mut buf)
            .with_context(|| format!("UDP answer from {addr}"))?;
        Ok(String::from_utf8_lossy(&buf[..n]).trim_end().to_string())
    })
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
