//! Small syscall helpers shared by the I/O primitives.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

/// Turns a `-1`-on-error libc return value into an `io::Result`.
pub(crate) fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Same as [`cvt`] for `ssize_t` results.
pub(crate) fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// Waits until `fd` has one of `events` (`POLLIN`, `POLLOUT`) or the
/// timeout passes (`None`: wait forever). Returns whether it became ready.
pub(crate) fn poll_one(
    fd: RawFd,
    events: libc::c_short,
    timeout: Option<Duration>,
) -> io::Result<bool> {
    let ms: libc::c_int = match timeout {
        None => -1,
        Some(d) => d.as_millis().min(libc::c_int::MAX as u128) as libc::c_int,
    };
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    loop {
        // SAFETY: `pfd` is a valid, exclusively borrowed pollfd and we pass
        // a count of exactly one.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(r > 0);
    }
}

/// Copies an interface name into the fixed `ifr_name` field, validating it.
pub(crate) fn ifr_name(name: &str) -> io::Result<[libc::c_char; libc::IFNAMSIZ]> {
    let bytes = name.as_bytes();
    if bytes.is_empty()
        || bytes.len() >= libc::IFNAMSIZ
        || bytes
            .iter()
            .any(|&b| b == 0 || b == b'/' || b == b':' || b.is_ascii_whitespace())
        || name == "."
        || name == ".."
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid interface name {name:?} (1..15 bytes, no '/', ':', whitespace)"),
        ));
    }
    let mut out = [0 as libc::c_char; libc::IFNAMSIZ];
    for (o, &b) in out.iter_mut().zip(bytes) {
        *o = b as libc::c_char;
    }
    Ok(out)
}

/// Reads the NUL-terminated `ifr_name` back into a `String`.
pub(crate) fn ifr_name_to_string(name: &[libc::c_char; libc::IFNAMSIZ]) -> String {
    let bytes: Vec<u8> = name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Hands memory freed inside the allocator back to the kernel (glibc keeps
/// freed heap for reuse: after a thousand peers are removed, their sessions
/// would stay in the process' RSS). Cheap when there is nothing to return;
/// call it after large removals, not per packet.
pub fn release_free_memory() {
    // SAFETY: malloc_trim only walks and trims glibc's own free lists; it
    // takes no pointer and is thread-safe (it locks every arena).
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_validated() {
        assert!(ifr_name("wg0").is_ok());
        assert!(ifr_name("a-fifteen-chars").is_ok());
        assert!(ifr_name("sixteen-chars-xx").is_err());
        assert!(ifr_name("").is_err());
        assert!(ifr_name("a/b").is_err());
        assert!(ifr_name("a b").is_err());
        assert!(ifr_name("..").is_err());
        let n = ifr_name("wg7").unwrap();
        assert_eq!(ifr_name_to_string(&n), "wg7");
    }
}
