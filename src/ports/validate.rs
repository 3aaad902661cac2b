//! Checking what comes in before anything is written: the caller's publish arguments
//! ([`validate`]), the container's network as Docker reports it ([`resolve_network`]),
//! names from Docker that end up in firewall rule text ([`check_ifname`]) and host ports
//! that are taken already ([`external_conflict`]).
//!
//! Trap: a bridge name comes from dockerd (`com.docker.network.bridge.name` is chosen by
//! whoever may create networks) and is written into `iptables-restore` input. A name with
//! whitespace or a newline would add options or whole rules to the batch; `+` is the
//! iptables interface wildcard (`-o br+` matches every interface starting with `br`).
//! Only names the kernel accepts as interface names and that mean one interface in a rule
//! pass.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::rules::Protocol;
use super::sockets;
use super::types::{Family, Mapping, PortsError, PublishRequest};
use crate::docker::{ContainerInfo, PublishedPort};

/// Linux `IFNAMSIZ` (16) including the terminating NUL.
pub const IFNAMSIZ: usize = 16;

/// An interface name that is safe to put into a firewall rule: what the kernel's
/// `dev_valid_name()` accepts (1..=15 bytes, not `.`/`..`, no `/`, `:` or whitespace),
/// narrowed to `[A-Za-z0-9_.-]` so no quote, backslash, `!`, `#`, `+` (iptables wildcard),
/// control or non-ASCII character can change the rule's meaning.
pub fn check_ifname(name: &str) -> Result<(), PortsError> {
    let refuse = |reason: &'static str| PortsError::UnsafeName {
        what: "bridge interface name",
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(refuse("empty"));
    }
    if name.len() >= IFNAMSIZ {
        return Err(refuse("longer than 15 bytes (IFNAMSIZ)"));
    }
    if name == "." || name == ".." {
        return Err(refuse("not a valid interface name"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err(refuse(
            "only letters, digits, '_', '.' and '-' are accepted in a firewall rule",
        ));
    }
    Ok(())
}

fn invalid(reason: impl Into<String>) -> PortsError {
    PortsError::InvalidArgs {
        reason: reason.into(),
    }
}

pub(crate) struct Validated {
    pub container: String,
    pub protocol: Protocol,
    pub host_port: u16,
    pub container_port: u16,
    pub host_ip: Option<IpAddr>,
    pub network: Option<String>,
    pub owner_uid: u32,
    pub instance: Option<String>,
    pub family: Family,
}

/// The family and host address a mapping keeps: an IPv6 host address (also `::`) makes
/// it IPv6 only (family `auto` becomes `ipv6`), `0.0.0.0` means every address; the
/// combinations no rule set can hold are InvalidArgs.
fn host_family(
    family: Family,
    host_ip: Option<IpAddr>,
) -> Result<(Family, Option<IpAddr>), PortsError> {
    match (family, host_ip) {
        (f, None) => Ok((f, None)),
        (f, Some(IpAddr::V4(a))) if a.is_unspecified() => match f {
            Family::Ipv6 => Err(invalid(
                "host_ip 0.0.0.0 (every IPv4 address) cannot go with family \"ipv6\": leave \
                 host_ip empty, or give \"::\" or an IPv6 address",
            )),
            f => Ok((f, None)),
        },
        (Family::Auto | Family::Ipv4, Some(a @ IpAddr::V4(_))) => Ok((family, Some(a))),
        (Family::Both, Some(IpAddr::V4(_))) => Err(invalid(
            "family \"both\" cannot go with an IPv4 host_ip (the IPv6 rule would match every \
             host address): leave host_ip empty or use family \"ipv4\"",
        )),
        (Family::Ipv6, Some(IpAddr::V4(_))) => Err(invalid(
            "family \"ipv6\" cannot go with an IPv4 host_ip: give an IPv6 host_ip, or leave \
             it empty",
        )),
        (Family::Auto | Family::Ipv6, Some(IpAddr::V6(a))) => {
            Ok((Family::Ipv6, (!a.is_unspecified()).then_some(IpAddr::V6(a))))
        }
        (Family::Ipv4, Some(IpAddr::V6(_))) => Err(invalid(
            "family \"ipv4\" cannot go with an IPv6 host_ip: give an IPv4 host_ip, or use \
             family \"ipv6\"",
        )),
        (Family::Both, Some(IpAddr::V6(_))) => Err(invalid(
            "family \"both\" cannot go with an IPv6 host_ip (the IPv4 rule would match every \
             host address): leave host_ip empty or use family \"ipv6\"",
        )),
    }
}

pub(crate) fn validate(r: &PublishRequest) -> Result<Validated, PortsError> {
    let protocol = Protocol::parse(&r.protocol).ok_or_else(|| {
        invalid(format!(
            "protocol must be \"tcp\" or \"udp\", not {:?}",
            r.protocol
        ))
    })?;
    let port = |what: &str, p: u32| -> Result<u16, PortsError> {
        match u16::try_from(p) {
            Ok(v) if v != 0 => Ok(v),
            _ => Err(invalid(format!("{what} must be 1..65535, not {p}"))),
        }
    };
    let host_port = port("host port", r.host_port)?;
    let container_port = port("container port", r.container_port)?;
    let host_ip = match r.host_ip.as_deref() {
        None | Some("") => None,
        Some(s) => Some(s.parse::<IpAddr>().map_err(|_| {
            invalid(format!(
                "host_ip {s:?} is not an IPv4 or IPv6 address (IPv6 without brackets)"
            ))
        })?),
    };
    if let Some(IpAddr::V6(a)) = host_ip {
        if a.is_loopback() || a.is_multicast() || (a.segments()[0] & 0xffc0) == 0xfe80 {
            return Err(invalid(format!(
                "host_ip {a} cannot be published: a DNAT matches packets arriving for a \
                 global or unique-local host address (not loopback, link-local or multicast)"
            )));
        }
        if a.to_ipv4_mapped().is_some() {
            return Err(invalid(format!(
                "host_ip {a} is an IPv4-mapped address: give the IPv4 address"
            )));
        }
    }
    if r.container.is_empty() {
        return Err(invalid("container must not be empty"));
    }
    let asked = Family::parse(r.family.as_deref().unwrap_or("")).ok_or_else(|| {
        invalid(format!(
            "family must be \"auto\", \"ipv4\", \"both\" or \"ipv6\", not {:?}",
            r.family.as_deref().unwrap_or("")
        ))
    })?;
    let (family, host_ip) = host_family(asked, host_ip)?;
    Ok(Validated {
        container: r.container.clone(),
        protocol,
        host_port,
        container_port,
        host_ip,
        network: r.network.clone().filter(|n| !n.is_empty()),
        owner_uid: r.owner_uid,
        instance: r.instance.clone().filter(|n| !n.is_empty()),
        family,
    })
}

/// The container's IPv6 address the mapping's rules also point at (None: IPv4 only), for
/// a mapping of `family` on `network` (resolved already). `docker_v6`: the backend
/// publishes IPv6 ([`super::Firewall::ipv6`]).
pub(crate) fn pick_ip6(
    info: &ContainerInfo,
    network: &str,
    family: Family,
    host_ip: Option<IpAddr>,
    docker_v6: bool,
) -> Result<Option<Ipv6Addr>, PortsError> {
    let ip6 = info
        .networks
        .iter()
        .find(|a| a.network_name == network)
        .and_then(|a| a.ip6);
    let name = family.as_str();
    match family {
        Family::Ipv4 => Ok(None),
        Family::Auto => Ok(ip6.filter(|_| docker_v6 && host_ip.is_none())),
        Family::Both | Family::Ipv6 => {
            if !docker_v6 {
                return Err(PortsError::NotSupported {
                    reason: format!(
                        "Docker does not publish IPv6 here (ip6tables has no DOCKER chain \
                         in its nat table, or with the nftables backend there is no table \
                         ip6 docker-bridges: dockerd runs without ip6tables, or the host has \
                         no IPv6): family \"{name}\" cannot be held; use \"auto\" or \"ipv4\""
                    ),
                });
            }
            if let Some(IpAddr::V4(_)) = host_ip {
                return Err(invalid(format!(
                    "family \"{name}\" cannot go with an IPv4 host_ip"
                )));
            }
            ip6.map(Some).ok_or_else(|| {
                invalid(format!(
                    "container {} has no IPv6 address on network {network} (family \"{name}\")",
                    info.name
                ))
            })
        }
    }
}

/// The network of `info` a mapping uses: (name, ip, bridge).
pub(crate) fn resolve_network(
    info: &ContainerInfo,
    wanted: Option<&str>,
) -> Result<(String, Ipv4Addr, String), PortsError> {
    if info.network_mode == "host" {
        return Err(invalid(format!(
            "container {} uses the host network: its ports are the host's already; nothing to publish",
            info.name
        )));
    }
    let att = match wanted {
        Some(n) => info
            .networks
            .iter()
            .find(|a| a.network_name == n)
            .ok_or_else(|| {
                invalid(format!(
                    "container {} is not attached to network {n:?} (attached: {})",
                    info.name,
                    names(info)
                ))
            })?,
        None => match info.networks.as_slice() {
            [one] => one,
            [] => return Err(invalid(format!("container {} has no network", info.name))),
            _ => {
                return Err(invalid(format!(
                    "container {} is attached to several networks ({}): pass option \"network\"",
                    info.name,
                    names(info)
                )))
            }
        },
    };
    let bridge = att
        .bridge_interface
        .clone()
        .ok_or_else(|| PortsError::NotSupported {
            reason: format!(
                "network {} of container {} is not a bridge network",
                att.network_name, info.name
            ),
        })?;
    check_ifname(&bridge)?;
    let ip = att.ip.ok_or_else(|| {
        invalid(format!(
            "container {} has no IPv4 address on network {}",
            info.name, att.network_name
        ))
    })?;
    Ok((att.network_name.clone(), ip, bridge))
}

fn names(info: &ContainerInfo) -> String {
    info.networks
        .iter()
        .map(|a| a.network_name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A mapping's host port taken by Docker (`-p`) or by a bound socket in the namespace.
pub(crate) fn external_conflict(
    m: &Mapping,
    docker_ports: &[PublishedPort],
    bound: &[sockets::Bound],
) -> Option<PortsError> {
    if let Some(p) = docker_ports.iter().find(|p| {
        p.protocol == m.protocol.as_str()
            && p.public_port == m.host_port
            && match (m.host_ip, p.ip.parse::<IpAddr>()) {
                (Some(want), Ok(ip)) => ip.is_unspecified() || ip == want,
                _ => true,
            }
    }) {
        return Some(PortsError::Conflict {
            reason: format!(
                "host port {}/{} is already published by Docker (container {})",
                m.host_port,
                m.protocol,
                &p.container_id[..p.container_id.len().min(12)]
            ),
        });
    }
    bound
        .iter()
        .find(|b| b.collides(m.protocol, m.host_ip, m.host_port))
        .map(|b| PortsError::Conflict {
            reason: format!(
                "host port {}/{} is in use by a socket bound to {}",
                m.host_port, m.protocol, b.addr
            ),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docker::NetworkAttachment;
    use crate::error::{Classify, Kind};
    use crate::ports::types::MappingState;

    fn info(mode: &str, nets: Vec<NetworkAttachment>) -> ContainerInfo {
        ContainerInfo {
            id: "c1".into(),
            name: "web".into(),
            running: true,
            pid: 1,
            network_mode: mode.into(),
            networks: nets,
        }
    }

    fn att(name: &str, ip: Option<[u8; 4]>, br: Option<&str>) -> NetworkAttachment {
        NetworkAttachment {
            network_name: name.into(),
            network_id: format!("id-{name}"),
            ip: ip.map(Ipv4Addr::from),
            ip6: None,
            bridge_interface: br.map(Into::into),
        }
    }

    #[test]
    fn validation() {
        let ok = PublishRequest {
            container: "web".into(),
            protocol: "tcp".into(),
            host_port: 8080,
            container_port: 80,
            ..Default::default()
        };
        assert!(validate(&ok).is_ok());
        for bad in [
            PublishRequest {
                protocol: "sctp".into(),
                ..ok.clone()
            },
            PublishRequest {
                host_port: 0,
                ..ok.clone()
            },
            PublishRequest {
                container_port: 70000,
                ..ok.clone()
            },
            PublishRequest {
                host_ip: Some("::1".into()),
                ..ok.clone()
            },
            PublishRequest {
                host_ip: Some("[2001:db8::1]".into()),
                ..ok.clone()
            },
            PublishRequest {
                host_ip: Some("10.0.0".into()),
                ..ok.clone()
            },
            PublishRequest {
                container: "".into(),
                ..ok.clone()
            },
        ] {
            assert_eq!(validate(&bad).err().unwrap().kind(), Kind::InvalidArgs);
        }
        let v = validate(&PublishRequest {
            host_ip: Some("0.0.0.0".into()),
            ..ok
        })
        .unwrap();
        assert_eq!(v.host_ip, None);
    }

    #[test]
    fn network_resolution() {
        let i = info(
            "default",
            vec![att("bridge", Some([172, 17, 0, 2]), Some("docker0"))],
        );
        assert_eq!(
            resolve_network(&i, None).unwrap(),
            (
                "bridge".into(),
                Ipv4Addr::new(172, 17, 0, 2),
                "docker0".into()
            )
        );
        let host = info("host", vec![att("host", None, None)]);
        let e = resolve_network(&host, None).unwrap_err();
        assert_eq!(e.kind(), Kind::InvalidArgs);
        assert!(e.to_string().contains("host network"));
        let two = info(
            "default",
            vec![
                att("a", Some([10, 1, 0, 2]), Some("br-a")),
                att("b", Some([10, 2, 0, 2]), Some("br-b")),
            ],
        );
        assert!(resolve_network(&two, None)
            .unwrap_err()
            .to_string()
            .contains("several"));
        assert_eq!(resolve_network(&two, Some("b")).unwrap().2, "br-b");
        assert_eq!(
            resolve_network(&two, Some("c")).unwrap_err().kind(),
            Kind::InvalidArgs
        );
        let ov = info("default", vec![att("ov", Some([10, 3, 0, 2]), None)]);
        assert_eq!(
            resolve_network(&ov, None).unwrap_err().kind(),
            Kind::NotSupported
        );
    }

    #[test]
    fn family_option_and_ipv6_choice() {
        use crate::error::{Classify, Kind};
        let base = PublishRequest {
            container: "web".into(),
            protocol: "tcp".into(),
            host_port: 8080,
            container_port: 80,
            ..Default::default()
        };
        for (given, want) in [
            (None, Family::Auto),
            (Some(""), Family::Auto),
            (Some("auto"), Family::Auto),
            (Some("ipv4"), Family::Ipv4),
            (Some("both"), Family::Both),
            (Some("ipv6"), Family::Ipv6),
        ] {
            let r = PublishRequest {
                family: given.map(Into::into),
                ..base.clone()
            };
            assert_eq!(validate(&r).unwrap().family, want, "{given:?}");
        }
        for bad in ["IPv6", "IPv4", "v4", "both ", "inet"] {
            let r = PublishRequest {
                family: Some(bad.into()),
                ..base.clone()
            };
            assert_eq!(
                validate(&r).err().unwrap().kind(),
                Kind::InvalidArgs,
                "{bad}"
            );
        }
        let r = PublishRequest {
            family: Some("both".into()),
            host_ip: Some("10.0.0.1".into()),
            ..base.clone()
        };
        assert_eq!(validate(&r).err().unwrap().kind(), Kind::InvalidArgs);

        let a6: Ipv6Addr = "fd00:1::2".parse().unwrap();
        let mut with6 = att("v6net", Some([10, 1, 0, 2]), Some("br-v6"));
        with6.ip6 = Some(a6);
        let i6 = info("default", vec![with6]);
        let i4 = info(
            "default",
            vec![att("v6net", Some([10, 1, 0, 2]), Some("br-v6"))],
        );
        let h = Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)));
        // auto: IPv6 only when everything is there
        assert_eq!(
            pick_ip6(&i6, "v6net", Family::Auto, None, true).unwrap(),
            Some(a6)
        );
        assert_eq!(
            pick_ip6(&i6, "v6net", Family::Auto, None, false).unwrap(),
            None
        );
        assert_eq!(pick_ip6(&i6, "v6net", Family::Auto, h, true).unwrap(), None);
        assert_eq!(
            pick_ip6(&i4, "v6net", Family::Auto, None, true).unwrap(),
            None
        );
        assert_eq!(
            pick_ip6(&i6, "other", Family::Auto, None, true).unwrap(),
            None
        );
        // ipv4: never
        assert_eq!(
            pick_ip6(&i6, "v6net", Family::Ipv4, None, true).unwrap(),
            None
        );
        // both: IPv6 or an error that says what is missing
        assert_eq!(
            pick_ip6(&i6, "v6net", Family::Both, None, true).unwrap(),
            Some(a6)
        );
        let e = pick_ip6(&i6, "v6net", Family::Both, None, false).unwrap_err();
        assert_eq!(e.kind(), Kind::NotSupported);
        assert!(e.to_string().contains("ip6tables"), "{e}");
        let e = pick_ip6(&i4, "v6net", Family::Both, None, true).unwrap_err();
        assert_eq!(e.kind(), Kind::InvalidArgs);
        assert!(e.to_string().contains("no IPv6 address"), "{e}");
        // ipv6: as both (IPv6 or a named error), with or without an IPv6 host address
        let h6 = Some("2001:db8:99::1".parse().unwrap());
        for h in [None, h6] {
            assert_eq!(
                pick_ip6(&i6, "v6net", Family::Ipv6, h, true).unwrap(),
                Some(a6)
            );
        }
        let e = pick_ip6(&i6, "v6net", Family::Ipv6, h6, false).unwrap_err();
        assert_eq!(e.kind(), Kind::NotSupported);
        assert!(e.to_string().contains("ip6 docker-bridges"), "{e}");
        assert!(e.to_string().contains("\"ipv6\""), "{e}");
        let e = pick_ip6(&i4, "v6net", Family::Ipv6, None, true).unwrap_err();
        assert_eq!(e.kind(), Kind::InvalidArgs);
        assert!(e.to_string().contains("no IPv6 address"), "{e}");
    }

    #[test]
    fn an_ipv6_host_ip_makes_an_ipv6_only_mapping_and_impossible_pairs_are_named() {
        let base = PublishRequest {
            container: "web".into(),
            protocol: "tcp".into(),
            host_port: 8080,
            container_port: 80,
            ..Default::default()
        };
        let v = |host: &str, family: &str| {
            validate(&PublishRequest {
                host_ip: Some(host.into()),
                family: Some(family.into()),
                ..base.clone()
            })
        };
        let h6: IpAddr = "2001:db8:99::1".parse().unwrap();
        let h4: IpAddr = "10.0.0.1".parse().unwrap();
        // an IPv6 host address: family ipv6 (auto becomes ipv6)
        for f in ["", "auto", "ipv6"] {
            let x = v("2001:db8:99::1", f).unwrap();
            assert_eq!((x.family, x.host_ip), (Family::Ipv6, Some(h6)), "{f:?}");
        }
        // "::": IPv6 only, every address (Docker's -p [::]:H:C)
        for f in ["", "ipv6"] {
            let x = v("::", f).unwrap();
            assert_eq!((x.family, x.host_ip), (Family::Ipv6, None), "{f:?}");
        }
        // "0.0.0.0": every address, the family as asked
        for (f, want) in [("", Family::Auto), ("both", Family::Both)] {
            let x = v("0.0.0.0", f).unwrap();
            assert_eq!((x.family, x.host_ip), (want, None), "{f:?}");
        }
        // an IPv4 host address stays with auto / ipv4
        let x = v("10.0.0.1", "ipv4").unwrap();
        assert_eq!((x.family, x.host_ip), (Family::Ipv4, Some(h4)));
        // pairs no rule set can hold: InvalidArgs naming both sides
        for (host, family, says) in [
            (
                "2001:db8:99::1",
                "ipv4",
                "family \"ipv4\" cannot go with an IPv6 host_ip",
            ),
            (
                "::",
                "ipv4",
                "family \"ipv4\" cannot go with an IPv6 host_ip",
            ),
            (
                "2001:db8:99::1",
                "both",
                "family \"both\" cannot go with an IPv6 host_ip",
            ),
            (
                "10.0.0.1",
                "ipv6",
                "family \"ipv6\" cannot go with an IPv4 host_ip",
            ),
            (
                "10.0.0.1",
                "both",
                "family \"both\" cannot go with an IPv4 host_ip",
            ),
            ("0.0.0.0", "ipv6", "cannot go with family \"ipv6\""),
            ("::1", "ipv6", "not loopback, link-local or multicast"),
            ("fe80::1", "", "not loopback, link-local or multicast"),
            ("ff02::1", "", "not loopback, link-local or multicast"),
            ("::ffff:10.0.0.1", "", "IPv4-mapped"),
        ] {
            let e = v(host, family)
                .err()
                .unwrap_or_else(|| panic!("{host} {family}"));
            assert_eq!(e.kind(), Kind::InvalidArgs, "{host} {family}: {e}");
            assert!(e.to_string().contains(says), "{host} {family}: {e}");
        }
    }

    #[test]
    fn collisions() {
        let m = Mapping {
            id: "x".into(),
            container_id: "c".into(),
            container_name: "w".into(),
            protocol: Protocol::Tcp,
            host_ip: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))),
            host_port: 80,
            container_port: 80,
            network: "bridge".into(),
            owner_uid: 0,
            instance: None,
            family: Family::Auto,
            state: MappingState::Waiting,
        };
        let on = |proto: Protocol, host_ip: Option<IpAddr>, port: u16, family: Family| Mapping {
            protocol: proto,
            host_ip,
            host_port: port,
            family,
            id: "y".into(),
            ..m.clone()
        };
        let v4 = |a: u8| Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, a)));
        let any6 = Some(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED));
        let a6 = Some(IpAddr::V6("2001:db8::1".parse().unwrap()));
        let auto = Family::Auto;
        assert!(m.collides_with(&on(Protocol::Tcp, None, 80, auto)));
        assert!(m.collides_with(&on(Protocol::Tcp, v4(1), 80, auto)));
        assert!(!m.collides_with(&on(Protocol::Tcp, v4(2), 80, auto)));
        assert!(!m.collides_with(&on(Protocol::Udp, None, 80, auto)));
        assert!(!m.collides_with(&on(Protocol::Tcp, None, 81, auto)));
        // families: an IPv4-only and an IPv6-only mapping of one port share nothing
        let all4 = on(Protocol::Tcp, None, 80, Family::Ipv4);
        let all6 = on(Protocol::Tcp, None, 80, Family::Ipv6);
        assert!(!all4.collides_with(&all6) && !all6.collides_with(&all4));
        assert!(!m.collides_with(&all6), "{m:?} is IPv4 (its host_ip)");
        assert!(all6.collides_with(&on(Protocol::Tcp, any6, 80, Family::Ipv6)));
        assert!(all6.collides_with(&on(Protocol::Tcp, a6, 80, Family::Ipv6)));
        assert!(
            all6.collides_with(&on(Protocol::Tcp, None, 80, auto)),
            "auto may gain IPv6"
        );
        assert!(all6.collides_with(&on(Protocol::Tcp, None, 80, Family::Both)));
        assert!(
            !all6.collides_with(&on(Protocol::Tcp, v4(0), 80, auto)),
            "0.0.0.0 is IPv4"
        );
        assert!(all4.collides_with(&on(Protocol::Tcp, v4(0), 80, auto)));
        assert!(!on(Protocol::Tcp, a6, 80, Family::Ipv6).collides_with(&on(
            Protocol::Tcp,
            Some(IpAddr::V6("2001:db8::2".parse().unwrap())),
            80,
            Family::Ipv6
        )));
    }
    #[test]
    fn interface_names_follow_the_kernel_and_mean_one_interface() {
        for ok in ["docker0", "br-0123456789ab", "bridge1", "br_x.100", "a"] {
            assert!(check_ifname(ok).is_ok(), "{ok:?} refused");
        }
        for bad in [
            "",
            ".",
            "..",
            "0123456789abcdef", // 16 bytes: IFNAMSIZ with the NUL is 16
            "br 0",
            "br\t0",
            "br0\n-A",
            "br\"0",
            "br'0",
            "br/0",
            "br:0",
            "br+",
            "br!",
            "brü",
        ] {
            let e = check_ifname(bad).expect_err(bad);
            assert_eq!(e.kind(), Kind::NotSupported, "{bad:?}");
        }
    }

    /// Security: a bridge name from Docker reached iptables-restore text unchecked; a name
    /// with a newline adds whole rules to the batch. It must be refused before any rule is
    /// built (fails without `check_ifname` in `resolve_network`).
    #[test]
    fn a_bridge_name_that_would_inject_rules_is_refused() {
        for evil in [
            "br0\n-A INPUT -j ACCEPT",
            "docker0 -j ACCEPT",
            "br\"0",
            "docker+",
        ] {
            let i = info(
                "default",
                vec![att("evil", Some([172, 18, 0, 2]), Some(evil))],
            );
            let e = resolve_network(&i, None).expect_err(evil);
            assert_eq!(e.kind(), Kind::NotSupported, "{evil:?}: {e}");
            assert!(e.to_string().contains("bridge interface name"), "{e}");
        }
    }
}
