//! The ports domain's data: errors, mappings (the persisted intent), publish requests,
//! change notifications and reconcile decisions. Pure data, no I/O.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::rules::{Protocol, RuleSpec};
use crate::docker::DockerError;
use crate::error::{Classify, Kind};

/// Errors of the ports module.
#[derive(Debug, thiserror::Error)]
pub enum PortsError {
    #[error("invalid arguments: {reason}")]
    InvalidArgs { reason: String },
    #[error("no such container: {container}")]
    ContainerNotFound { container: String },
    #[error("no such mapping: {id}")]
    MappingNotFound { id: String },
    #[error("container {container} is not running; start it before publishing a port")]
    NotRunning { container: String },
    #[error("{reason}")]
    Conflict { reason: String },
    #[error("not supported: {reason}")]
    NotSupported { reason: String },
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error("{command} failed (exit {status}): {stderr}")]
    Iptables {
        command: String,
        status: i32,
        stderr: String,
    },
    #[error("cannot run {command}: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A name from Docker (bridge interface) that cannot be a Linux interface name, or that
    /// would change the meaning of a firewall rule: refused, nothing is written.
    #[error("refusing {what} {name:?} from Docker: {reason}")]
    UnsafeName {
        what: &'static str,
        name: String,
        reason: &'static str,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

impl Classify for PortsError {
    fn kind(&self) -> Kind {
        match self {
            PortsError::InvalidArgs { .. } => Kind::InvalidArgs,
            PortsError::ContainerNotFound { .. } | PortsError::MappingNotFound { .. } => {
                Kind::NotFound
            }
            PortsError::NotRunning { .. } | PortsError::Conflict { .. } => Kind::Conflict,
            PortsError::NotSupported { .. } | PortsError::UnsafeName { .. } => Kind::NotSupported,
            PortsError::Docker(e) => e.kind(),
            PortsError::Spawn { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                Kind::NotSupported
            }
            _ => Kind::Failed,
        }
    }
}

/// Which address families a mapping asks for (Publish option `family`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// IPv4, and IPv6 too where the container has an IPv6 address on the network, Docker
    /// publishes IPv6 (ip6tables has its DOCKER chain, or nftables' ip6 docker-bridges
    /// table exists) and no IPv4 `host_ip` is given. Decided again at each start of the
    /// container. The default.
    #[default]
    Auto,
    /// IPv4 only.
    Ipv4,
    /// IPv4 and IPv6, or an error (NotSupported without Docker's IPv6 publishing,
    /// InvalidArgs without a container IPv6 address or with a `host_ip`).
    Both,
    /// IPv6 only, or an error (as `Both`); what an IPv6 `host_ip` (also `::`) means.
    /// The container still needs its IPv4 address on the network (IPv6-only networks are
    /// not supported: the mapping resolves its network by that address).
    Ipv6,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Auto => "auto",
            Family::Ipv4 => "ipv4",
            Family::Both => "both",
            Family::Ipv6 => "ipv6",
        }
    }

    /// `auto` (also ""), `ipv4`, `both` or `ipv6`.
    pub fn parse(s: &str) -> Option<Family> {
        match s {
            "" | "auto" => Some(Family::Auto),
            "ipv4" => Some(Family::Ipv4),
            "both" => Some(Family::Both),
            "ipv6" => Some(Family::Ipv6),
            _ => None,
        }
    }
}

/// Where a mapping stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MappingState {
    /// Rules are written for this container address behind this bridge (and for its IPv6
    /// address when `ip6` is set: the mapping holds both families).
    Active {
        ip: Ipv4Addr,
        bridge: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ip6: Option<Ipv6Addr>,
    },
    /// The container is stopped; no rules; they come back when it starts.
    Waiting,
    /// The container runs but is no longer attached to the mapping's network (`docker
    /// network disconnect`); no rules; they come back, with its new address, when it is
    /// connected again.
    Disconnected,
    /// The container runs but the mapping cannot be applied (network gone, …).
    Error(String),
}

/// A published port (the intent, plus its current state).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    pub id: String,
    pub container_id: String,
    pub container_name: String,
    pub protocol: Protocol,
    /// The host address the DNAT is restricted to (None: every address). An IPv6 address
    /// goes with family `ipv6` only, an IPv4 one never with `ipv6` or `both`.
    pub host_ip: Option<IpAddr>,
    pub host_port: u16,
    pub container_port: u16,
    /// Docker network name the DNAT points into.
    pub network: String,
    pub owner_uid: u32,
    pub instance: Option<String>,
    /// The families asked for (state files written before IPv6 support: `auto`).
    #[serde(default)]
    pub family: Family,
    pub state: MappingState,
}

impl Mapping {
    /// The rule parameters when active. Family `ipv6` without a host address is host
    /// address `::` there (IPv6 only, every address: Docker's `-p [::]:H:C`).
    pub fn spec(&self) -> Option<RuleSpec> {
        let host_ip = match (self.family, self.host_ip) {
            (Family::Ipv6, None) => Some(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
            (_, h) => h,
        };
        match &self.state {
            MappingState::Active { ip, bridge, ip6 } => Some(RuleSpec {
                id: self.id.clone(),
                protocol: self.protocol,
                host_ip,
                host_port: self.host_port,
                container_ip: *ip,
                container_ip6: *ip6,
                container_port: self.container_port,
                bridge: bridge.clone(),
            }),
            _ => None,
        }
    }

    /// The families that have rules now: `ipv4` unless the family is `ipv6`, `ipv6` when
    /// active with an IPv6 address; none unless active.
    pub fn families(&self) -> Vec<&'static str> {
        match &self.state {
            MappingState::Active { ip6, .. } => {
                let mut v = Vec::new();
                if self.family != Family::Ipv6 {
                    v.push("ipv4");
                }
                if ip6.is_some() {
                    v.push("ipv6");
                }
                v
            }
            _ => vec![],
        }
    }

    /// The container address the IPv4 rules point at (None: not active, or IPv6 only).
    pub fn container_ip4(&self) -> Option<Ipv4Addr> {
        match &self.state {
            MappingState::Active { ip, .. } if self.family != Family::Ipv6 => Some(*ip),
            _ => None,
        }
    }

    /// The host addresses this mapping takes traffic on in one family: None = none of
    /// that family, Some(None) = every address, Some(Some(a)) = `a` only. `auto` counts as
    /// IPv6 too (it gains IPv6 when the container restarts with an address).
    fn on(&self, v6: bool) -> Option<Option<IpAddr>> {
        let wrong = if v6 { Family::Ipv4 } else { Family::Ipv6 };
        match self.host_ip {
            _ if self.family == wrong => None,
            Some(a) if a.is_ipv6() != v6 => None,
            Some(a) if a.is_unspecified() => Some(None),
            a => Some(a),
        }
    }

    /// `other` would take traffic this mapping takes (or the reverse): same protocol and
    /// host port, and a host address in common in a family both use. An IPv4-only and an
    /// IPv6-only mapping of one port do not collide.
    pub(crate) fn collides_with(&self, other: &Mapping) -> bool {
        let overlap = |a: Option<Option<IpAddr>>, b: Option<Option<IpAddr>>| match (a, b) {
            (Some(x), Some(y)) => x.is_none() || y.is_none() || x == y,
            _ => false,
        };
        self.protocol == other.protocol
            && self.host_port == other.host_port
            && (overlap(self.on(false), other.on(false)) || overlap(self.on(true), other.on(true)))
    }
}

/// A publish call's arguments, unvalidated (as they come from the bus).
#[derive(Debug, Clone, Default)]
pub struct PublishRequest {
    /// Container name or id.
    pub container: String,
    /// "tcp" or "udp".
    pub protocol: String,
    pub host_port: u32,
    pub container_port: u32,
    /// Host address to restrict the DNAT to ("" / None / "0.0.0.0": every address; an
    /// IPv6 address makes the mapping IPv6 only, `::` on every IPv6 address).
    pub host_ip: Option<String>,
    /// Docker network when the container has several.
    pub network: Option<String>,
    pub owner_uid: u32,
    pub instance: Option<String>,
    /// `auto` (None / ""), `ipv4`, `both` or `ipv6` (see [`Family`]).
    pub family: Option<String>,
}

/// A change the bus layer turns into signals / property updates and persists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MappingChange {
    Added(Mapping),
    Updated(Mapping),
    Removed(Mapping),
}

/// What reconcile did for one mapping id (for logging).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub mapping_id: String,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Rules were already right.
    Unchanged,
    /// Rules added / removed to match (missing rules, new container IP, duplicates).
    Repaired { added: usize, removed: usize },
    /// Container stopped: rules removed, mapping waits.
    Waiting { removed: usize },
    /// Container destroyed: mapping dropped, rules removed.
    Dropped { removed: usize },
    /// Tagged rules of an id state does not know: removed.
    OrphanRemoved { removed: usize },
    /// Mapping cannot be applied (state Error).
    Error(String),
    /// Docker could not be asked; rules left as they are.
    Skipped(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_serde_roundtrip() {
        let m = Mapping {
            id: "0011223344556677".into(),
            container_id: "c1".into(),
            container_name: "web".into(),
            protocol: Protocol::Udp,
            host_ip: Some(IpAddr::V4(Ipv4Addr::new(10, 99, 0, 1))),
            host_port: 53,
            container_port: 53,
            network: "bridge".into(),
            owner_uid: 1000,
            instance: Some("lab1".into()),
            family: Family::Auto,
            state: MappingState::Active {
                ip: Ipv4Addr::new(172, 17, 0, 2),
                bridge: "docker0".into(),
                ip6: None,
            },
        };
        let j = serde_json::to_string(&m).unwrap();
        assert!(j.contains("\"udp\""));
        assert!(
            !j.contains("ip6"),
            "an IPv4-only state file stays as it was: {j}"
        );
        let back: Mapping = serde_json::from_str(&j).unwrap();
        assert_eq!(back, m);
        // a state file from before IPv6 support (no family, no ip6) loads as auto / IPv4
        let old = j.replace(",\"family\":\"auto\"", "");
        assert!(!old.contains("family"));
        let back: Mapping = serde_json::from_str(&old).unwrap();
        assert_eq!(back, m);
        let m6 = Mapping {
            family: Family::Both,
            state: MappingState::Active {
                ip: Ipv4Addr::new(172, 17, 0, 2),
                bridge: "docker0".into(),
                ip6: Some("fd00::2".parse().unwrap()),
            },
            ..m.clone()
        };
        let back: Mapping = serde_json::from_str(&serde_json::to_string(&m6).unwrap()).unwrap();
        assert_eq!(back, m6);
        assert_eq!(
            m6.spec().unwrap().container_ip6,
            Some("fd00::2".parse().unwrap())
        );
        assert_eq!(m6.families(), ["ipv4", "ipv6"]);
        // family ipv6: host address `::` in the spec (IPv6 rules only), no IPv4 address shown
        let only6 = Mapping {
            family: Family::Ipv6,
            host_ip: None,
            ..m6.clone()
        };
        assert_eq!(
            only6.spec().unwrap().host_ip,
            Some(IpAddr::V6(Ipv6Addr::UNSPECIFIED))
        );
        assert_eq!(only6.families(), ["ipv6"]);
        assert_eq!(only6.container_ip4(), None);
        let j = serde_json::to_string(&only6).unwrap();
        assert!(j.contains("\"family\":\"ipv6\""), "{j}");
        let back: Mapping = serde_json::from_str(&j).unwrap();
        assert_eq!(back, only6);
        let h6 = Mapping {
            host_ip: Some("2001:db8:99::1".parse().unwrap()),
            ..only6
        };
        assert_eq!(h6.spec().unwrap().host_ip, h6.host_ip);
        let back: Mapping = serde_json::from_str(&serde_json::to_string(&h6).unwrap()).unwrap();
        assert_eq!(back, h6);
        let d = Mapping {
            state: MappingState::Disconnected,
            ..m.clone()
        };
        let j = serde_json::to_string(&d).unwrap();
        assert!(j.contains("\"disconnected\""), "{j}");
        assert_eq!(d.spec(), None);
        let w = Mapping {
            state: MappingState::Waiting,
            ..m
        };
        let back: Mapping = serde_json::from_str(&serde_json::to_string(&w).unwrap()).unwrap();
        assert_eq!(back.state, MappingState::Waiting);
    }
}
