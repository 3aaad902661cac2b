//! Hairpin: a container reaching its *own* published port through a host address.
//!
//! Interface: `ip` (rtnetlink) run in two namespaces: the container's (`/proc/PID/ns/net`,
//! to find the interface holding its address and the peer index of that veth) and
//! dockerd's (to find the bridge port with that index and set `hairpin on` on it).
//!
//! Traps:
//! - br_netfilter (Docker loads it; `bridge-nf-call-iptables=1`) runs the nat PREROUTING
//!   hook on *bridged* frames. When the DNAT's new destination sits behind the same bridge,
//!   the kernel bridges the frame instead of routing it (`br_nf_pre_routing_finish`,
//!   "bridged DNAT"), and a bridge never sends a frame back out of the port it came in on
//!   unless that port has `hairpin_mode`. So the rules alone let every client in, other
//!   containers included, but not the container itself.
//! - Docker sets `hairpin_mode` only with `--userland-proxy=false`; with its default proxy,
//!   docker-proxy answers the hairpin on the host. There is no proxy behind our ports, so
//!   we set it on the container's port as Docker's no-proxy mode does. Side effect (the
//!   same as Docker's): frames the container floods (broadcasts) come back to it.
//! - The veth is Docker's and is re-created with each container start: done once per
//!   (container, pid), again after a restart (reconcile sees the new pid). It is left on
//!   when the last mapping goes (the port disappears with the container anyway).
//! - Best effort: a failure is logged, the publish goes on (only the hairpin is missing).

use std::net::Ipv4Addr;
use std::path::Path;

use super::iptables::{run_prog, sbin, NetnsContext};
use super::types::PortsError;
use super::validate::check_ifname;

/// The interface of `ip -o -4 addr show` output that holds `ip`.
pub fn iface_with_addr(addr_out: &str, ip: Ipv4Addr) -> Option<String> {
    let want = format!("{ip}/");
    addr_out.lines().find_map(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        let i = w.iter().position(|x| *x == "inet")?;
        w.get(i + 1)
            .filter(|a| a.starts_with(&want))
            .and_then(|_| w.get(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_owned())
    })
}

/// The peer ifindex of a veth from `ip -o link show dev X` (`2: eth0@if7: <...`).
pub fn peer_index(link_out: &str) -> Option<u32> {
    let name = link_out.split_whitespace().nth(1)?;
    name.trim_end_matches(':').split_once("@if")?.1.parse().ok()
}

/// The name of interface `index` in `ip -o link show` output, when its master is `bridge`.
pub fn port_name(links_out: &str, index: u32, bridge: &str) -> Option<String> {
    let prefix = format!("{index}: ");
    let master = format!(" master {bridge} ");
    links_out
        .lines()
        .find(|l| l.starts_with(&prefix) && l.contains(&master))
        .and_then(|l| l.split_whitespace().nth(1))
        .map(|n| {
            n.trim_end_matches(':')
                .split('@')
                .next()
                .unwrap_or("")
                .to_owned()
        })
}

/// Set `hairpin on` on the bridge port of the container (init `pid`) that holds `ip`.
pub async fn ensure(
    netns: &NetnsContext,
    pid: u32,
    ip: Ipv4Addr,
    bridge: &str,
) -> Result<String, PortsError> {
    let fail = |what: String| PortsError::Internal(format!("hairpin for {ip}: {what}"));
    if pid == 0 {
        return Err(fail("the container has no pid".into()));
    }
    let ip_prog = sbin("ip");
    let ctr = NetnsContext::open(Path::new(&format!("/proc/{pid}/ns/net")))?;
    let addrs = run_prog(&ctr, &ip_prog, &["-o", "-4", "addr", "show"], None).await?;
    let dev = iface_with_addr(&addrs, ip)
        .ok_or_else(|| fail("no interface holds it in the container".into()))?;
    check_ifname(&dev)?;
    let link = run_prog(&ctr, &ip_prog, &["-o", "link", "show", "dev", &dev], None).await?;
    let index = peer_index(&link).ok_or_else(|| fail(format!("{dev} is not a veth")))?;
    let links = run_prog(netns, &ip_prog, &["-o", "link", "show"], None).await?;
    let port = port_name(&links, index, bridge)
        .ok_or_else(|| fail(format!("no port of {bridge} has index {index}")))?;
    check_ifname(&port)?;
    run_prog(
        netns,
        &ip_prog,
        &[
            "link",
            "set",
            "dev",
            &port,
            "type",
            "bridge_slave",
            "hairpin",
            "on",
        ],
        None,
    )
    .await?;
    Ok(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ip_output() {
        let addrs = "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever\n\
                     9: eth0    inet 192.0.2.2/24 brd 192.0.2.255 scope global eth0\\       valid_lft forever\n";
        assert_eq!(
            iface_with_addr(addrs, Ipv4Addr::new(192, 0, 2, 2)).as_deref(),
            Some("eth0")
        );
        assert_eq!(iface_with_addr(addrs, Ipv4Addr::new(192, 0, 2, 3)), None);
        assert_eq!(
            peer_index("9: eth0@if12: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500"),
            Some(12)
        );
        assert_eq!(peer_index("1: lo: <LOOPBACK,UP> mtu 65536"), None);
        let links = "12: vethab12@if9: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue master bridge1 state UP\n\
                     13: vcl@if2: <BROADCAST> mtu 1500 qdisc noqueue state UP\n";
        assert_eq!(port_name(links, 12, "bridge1").as_deref(), Some("vethab12"));
        assert_eq!(port_name(links, 12, "docker0"), None);
        assert_eq!(port_name(links, 13, "bridge1"), None);
    }
}
