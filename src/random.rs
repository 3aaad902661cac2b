//! Random ids (state id, mapping ids) from `getrandom(2)`.
//!
//! Kernel interface: `getrandom(buf, len, 0)`: blocks only until the pool is initialized
//! at boot, then never fails for lengths up to 256 bytes except with EINTR.
//!
//! Traps: the old code opened `/dev/urandom` and left the buffer at zeros when that
//! failed (no /dev in a sandbox, fd limit): every id became `0000…`, so mapping ids and
//! state ids collided. Here a failure is an error (or a panic for callers that cannot
//! fail), never a predictable id.

/// `n` random bytes.
pub fn bytes(n: usize) -> std::io::Result<Vec<u8>> {
    let mut b = vec![0u8; n];
    let mut got = 0;
    while got < n {
        // SAFETY: writes at most n - got bytes into the buffer from offset got.
        let r = unsafe { libc::getrandom(b[got..].as_mut_ptr().cast(), n - got, 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        got += r as usize;
    }
    Ok(b)
}

/// `n` random bytes as lower-case hex (2n characters).
pub fn hex(n: usize) -> std::io::Result<String> {
    Ok(bytes(n)?.iter().map(|x| format!("{x:02x}")).collect())
}

/// [`hex`] for callers that cannot report an error: getrandom(2) failing means a kernel
/// older than 3.17 or a seccomp filter that forbids it; refusing to go on beats a
/// predictable id.
pub fn hex_or_panic(n: usize) -> String {
    hex(n).unwrap_or_else(|e| panic!("getrandom(2) failed: {e}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_random_hex_never_zeros() {
        let a = super::hex(8).unwrap();
        let b = super::hex(8).unwrap();
        assert_eq!(a.len(), 16);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert_ne!(a, "0".repeat(16));
    }
}
