//! Sockets bound in a network namespace: through sock_diag netlink (`diag.rs`), else from
//! `/proc/thread-self/net/{tcp,tcp6,udp,udp6}`.
//!
//! Interface: procfs. `/proc/net` is a link to `/proc/self/net`, which shows the netns of
//! the *thread group leader*; a thread that has `setns()`ed must read
//! `/proc/thread-self/net/...` to see its own namespace. Addresses are hex in host byte
//! order per 32-bit word (little-endian here), ports hex big-endian.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::rules::Protocol;

/// A bound socket: listening TCP sockets and every bound UDP socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bound {
    pub protocol: Protocol,
    pub addr: IpAddr,
    pub port: u16,
}

impl Bound {
    /// True when this socket takes traffic for `port` on `host_ip` (None: every address).
    pub fn collides(&self, protocol: Protocol, host_ip: Option<IpAddr>, port: u16) -> bool {
        if self.protocol != protocol || self.port != port {
            return false;
        }
        match host_ip {
            None => true,
            Some(IpAddr::V4(ip)) => {
                self.addr.is_unspecified()
                    || self.addr == IpAddr::V4(ip)
                    || self.addr == IpAddr::V6(ip.to_ipv6_mapped())
            }
            // a socket on 0.0.0.0 takes no IPv6 traffic; one on :: does
            Some(IpAddr::V6(ip)) => {
                self.addr == IpAddr::V6(Ipv6Addr::UNSPECIFIED) || self.addr == IpAddr::V6(ip)
            }
        }
    }
}

fn parse_addr(hex: &str) -> Option<IpAddr> {
    match hex.len() {
        8 => {
            let v = u32::from_str_radix(hex, 16).ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(v.swap_bytes())))
        }
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                let w = u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).ok()?;
                b[i * 4..i * 4 + 4].copy_from_slice(&w.swap_bytes().to_be_bytes());
            }
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

/// Parses one `/proc/net/{tcp,udp}[6]` file. TCP: only LISTEN (0A); UDP: every socket.
pub fn parse_proc_net(text: &str, protocol: Protocol) -> Vec<Bound> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 {
            continue;
        }
        if protocol == Protocol::Tcp && f[3] != "0A" {
            continue;
        }
        let Some((a, p)) = f[1].split_once(':') else {
            continue;
        };
        let (Some(addr), Ok(port)) = (parse_addr(a), u16::from_str_radix(p, 16)) else {
            continue;
        };
        out.push(Bound {
            protocol,
            addr,
            port,
        });
    }
    out
}

/// Reads the bound sockets of the calling thread's network namespace: through sock_diag
/// netlink (cheap, see `diag.rs`), or from procfs when that fails (e.g. no `udp_diag`).
pub fn read_bound() -> std::io::Result<Vec<Bound>> {
    match super::diag::read_bound() {
        Ok(v) => Ok(v),
        Err(e) => {
            tracing::debug!(error = %e, "sock_diag dump failed; reading /proc/thread-self/net");
            read_bound_procfs()
        }
    }
}

/// The same from `/proc/thread-self/net/{tcp,tcp6,udp,udp6}`.
pub fn read_bound_procfs() -> std::io::Result<Vec<Bound>> {
    let mut out = Vec::new();
    for (file, proto) in [
        ("tcp", Protocol::Tcp),
        ("tcp6", Protocol::Tcp),
        ("udp", Protocol::Udp),
        ("udp6", Protocol::Udp),
    ] {
        match std::fs::read_to_string(format!("/proc/thread-self/net/{file}")) {
            Ok(t) => out.extend(parse_proc_net(&t, proto)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {} // no IPv6
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_listen_only() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n\
   1: 0100007F:0035 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n\
   2: 0100007F:A000 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n";
        let b = parse_proc_net(t, Protocol::Tcp);
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].port, 8080);
        assert!(b[0].addr.is_unspecified());
        assert_eq!(b[1].addr, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert!(b[0].collides(Protocol::Tcp, None, 8080));
        assert!(b[0].collides(
            Protocol::Tcp,
            Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))),
            8080
        ));
        assert!(!b[0].collides(Protocol::Udp, None, 8080));
        assert!(!b[1].collides(
            Protocol::Tcp,
            Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))),
            53
        ));
        assert!(b[1].collides(Protocol::Tcp, None, 53));
    }

    #[test]
    fn parses_v6() {
        let t = "hdr\n   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 0 0 0 0 0\n";
        let b = parse_proc_net(t, Protocol::Tcp);
        assert_eq!(b[0].addr, IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert_eq!(b[0].port, 8080);
    }

    #[test]
    fn an_ipv6_host_ip_collides_with_sockets_that_take_its_traffic() {
        let h6: IpAddr = "2001:db8:99::1".parse().unwrap();
        let on = |addr: IpAddr| Bound {
            protocol: Protocol::Tcp,
            addr,
            port: 80,
        };
        assert!(on(IpAddr::V6(Ipv6Addr::UNSPECIFIED)).collides(Protocol::Tcp, Some(h6), 80));
        assert!(on(h6).collides(Protocol::Tcp, Some(h6), 80));
        // 0.0.0.0 takes no IPv6 traffic; another IPv6 address is another address
        assert!(!on(IpAddr::V4(Ipv4Addr::UNSPECIFIED)).collides(Protocol::Tcp, Some(h6), 80));
        let other: IpAddr = "2001:db8:99::2".parse().unwrap();
        assert!(!on(other).collides(Protocol::Tcp, Some(h6), 80));
    }
}
