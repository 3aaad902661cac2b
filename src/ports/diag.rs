//! Bound sockets through netlink `NETLINK_SOCK_DIAG` (`SOCK_DIAG_BY_FAMILY` dumps of
//! `inet_diag_req_v2`), the interface `ss` uses.
//!
//! Why not only `/proc/net/tcp`: reading it walks the kernel's whole TCP established hash
//! (global, sized by RAM, not per netns) once per read chunk, from the start each time
//! (`tcp_seq_start` → `established_get_first`). Profiled under the ports benchmark that walk
//! was a fifth of the daemon's CPU. A dump that asks for LISTEN sockets only walks the
//! listening hash and stops (`inet_diag_dump_icsk`).
//!
//! Traps:
//! - the socket belongs to the netns of the thread that creates it: call on the thread
//!   that entered the namespace (as for `/proc/thread-self/net`);
//! - UDP dumps need `udp_diag` (a module on some kernels): callers fall back to procfs on
//!   any error here;
//! - `inet_diag_sockid` ports are big-endian; addresses are network order, IPv4 in the
//!   first 4 bytes of the 16-byte field; messages are 4-byte aligned.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::rules::Protocol;
use super::sockets::Bound;

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCP_LISTEN_MASK: u32 = 1 << 10;
const ALL_STATES: u32 = u32::MAX;

/// The dump request for one family and protocol (pure; unit-tested).
pub fn request(family: u8, protocol: Protocol, seq: u32) -> Vec<u8> {
    let (proto, states) = match protocol {
        Protocol::Tcp => (libc::IPPROTO_TCP as u8, TCP_LISTEN_MASK),
        Protocol::Udp => (libc::IPPROTO_UDP as u8, ALL_STATES),
    };
    let len: u32 = 16 + 56;
    let mut b = Vec::with_capacity(len as usize);
    b.extend_from_slice(&len.to_ne_bytes());
    b.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    b.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    b.extend_from_slice(&[family, proto, 0, 0]);
    b.extend_from_slice(&states.to_ne_bytes());
    b.extend_from_slice(&[0u8; 48]); // inet_diag_sockid: match everything
    b
}

/// Parse a buffer of netlink messages. Ok(true) when the dump is complete.
pub fn parse(buf: &[u8], protocol: Protocol, out: &mut Vec<Bound>) -> std::io::Result<bool> {
    let mut off = 0;
    while off + 16 <= buf.len() {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
        let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap());
        if len < 16 || off + len > buf.len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "truncated netlink message",
            ));
        }
        let body = &buf[off + 16..off + len];
        match ty {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let code = body
                    .get(..4)
                    .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
                    .unwrap_or(-libc::EIO);
                if code != 0 {
                    return Err(std::io::Error::from_raw_os_error(-code));
                }
            }
            SOCK_DIAG_BY_FAMILY if body.len() >= 72 => {
                let family = body[0];
                let port = u16::from_be_bytes([body[4], body[5]]);
                let src = &body[8..24];
                let addr = if family == libc::AF_INET as u8 {
                    IpAddr::V4(Ipv4Addr::new(src[0], src[1], src[2], src[3]))
                } else {
                    let a: [u8; 16] = src.try_into().unwrap();
                    IpAddr::V6(Ipv6Addr::from(a))
                };
                out.push(Bound {
                    protocol,
                    addr,
                    port,
                });
            }
            _ => {}
        }
        off += (len + 3) & !3;
    }
    Ok(false)
}

/// Dump one family/protocol from the calling thread's network namespace.
fn dump(family: u8, protocol: Protocol, out: &mut Vec<Bound>) -> std::io::Result<()> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let req = request(family, protocol, 1);
    // SAFETY: send(2) of a buffer we own.
    let n = unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        // SAFETY: recv(2) into a buffer we own, within its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 || parse(&buf[..n as usize], protocol, out)? {
            return Ok(());
        }
    }
}

/// Listening TCP and bound UDP sockets (v4 and v6) of the calling thread's netns.
pub fn read_bound() -> std::io::Result<Vec<Bound>> {
    let mut out = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        for proto in [Protocol::Tcp, Protocol::Udp] {
            dump(family, proto, &mut out)?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout() {
        let r = request(libc::AF_INET as u8, Protocol::Tcp, 7);
        assert_eq!(r.len(), 72);
        assert_eq!(u32::from_ne_bytes(r[0..4].try_into().unwrap()), 72);
        assert_eq!(u16::from_ne_bytes(r[4..6].try_into().unwrap()), 20);
        assert_eq!(u32::from_ne_bytes(r[8..12].try_into().unwrap()), 7);
        assert_eq!(r[16], libc::AF_INET as u8);
        assert_eq!(r[17], libc::IPPROTO_TCP as u8);
        assert_eq!(u32::from_ne_bytes(r[20..24].try_into().unwrap()), 1 << 10);
        let u = request(libc::AF_INET6 as u8, Protocol::Udp, 1);
        assert_eq!(u[17], libc::IPPROTO_UDP as u8);
        assert_eq!(u32::from_ne_bytes(u[20..24].try_into().unwrap()), u32::MAX);
    }

    fn msg(ty: u16, body: &[u8]) -> Vec<u8> {
        let len = 16 + body.len();
        let mut b = (len as u32).to_ne_bytes().to_vec();
        b.extend_from_slice(&ty.to_ne_bytes());
        b.extend_from_slice(&[0u8; 10]);
        b.extend_from_slice(body);
        while b.len() % 4 != 0 {
            b.push(0);
        }
        b
    }

    #[test]
    fn parses_v4_v6_done_and_errors() {
        let mut v4 = vec![0u8; 72];
        v4[0] = libc::AF_INET as u8;
        v4[4..6].copy_from_slice(&8080u16.to_be_bytes());
        v4[8..12].copy_from_slice(&[10, 99, 0, 1]);
        let mut v6 = vec![0u8; 72];
        v6[0] = libc::AF_INET6 as u8;
        v6[4..6].copy_from_slice(&53u16.to_be_bytes());
        v6[23] = 1; // ::1
        let mut buf = msg(SOCK_DIAG_BY_FAMILY, &v4);
        buf.extend(msg(SOCK_DIAG_BY_FAMILY, &v6));
        let mut out = Vec::new();
        assert!(!parse(&buf, Protocol::Tcp, &mut out).unwrap());
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].addr, IpAddr::V4(Ipv4Addr::new(10, 99, 0, 1)));
        assert_eq!(out[0].port, 8080);
        assert_eq!(out[1].addr, IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert!(parse(&msg(NLMSG_DONE, &[0; 4]), Protocol::Tcp, &mut out).unwrap());
        let e = parse(
            &msg(NLMSG_ERROR, &(-libc::ENOENT).to_ne_bytes()),
            Protocol::Udp,
            &mut out,
        )
        .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    }

    /// The real kernel: a listener bound here shows up (runs in the test's own netns;
    /// binds 127.0.0.1 on an ephemeral port, no privileges needed).
    #[test]
    fn sees_a_real_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let b = read_bound().expect("sock_diag dump");
        assert!(
            b.iter().any(|x| x.protocol == Protocol::Tcp
                && x.port == port
                && x.addr == IpAddr::V4(Ipv4Addr::LOCALHOST)),
            "listener 127.0.0.1:{port} not in {b:?}"
        );
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let uport = u.local_addr().unwrap().port();
        let b = read_bound().unwrap();
        assert!(b
            .iter()
            .any(|x| x.protocol == Protocol::Udp && x.port == uport));
    }
}
