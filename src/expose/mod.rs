//! Devices a tenant can be given and lose: a loop device and its partitions made to appear
//! in a container's /dev, granted exactly in its device cgroup, and taken away again
//! (containers have no udev: moby#27886).
//!
//! An exposure is a resource ([`Exposure`], kept in the loop record): the container (id,
//! name, init pid + start time), the cgroup and how it was granted ([`Grant`]), the nodes
//! made and the exact rules granted, and the backing file's identity at that moment.
//! [`expose`] makes it, [`revoke`] undoes it: nodes unlinked inside the container's /dev,
//! the grant withdrawn. `ops` revokes before a loop number can be handed out again.
//!
//! Files: [`nodes`] (mount namespace, mknod/unlink), [`cgroup_v1`] (devices.allow/deny),
//! [`cgroup_v2`] + [`bpf`] + [`program`] (BPF_PROG_TYPE_CGROUP_DEVICE programs).
//!
//! Traps (per file in their headers); here:
//! - Partition minors are read from sysfs at the moment of exposing ([`host_nodes`]),
//!   never from an older record: blkext minors (major 259) are global and reused.
//! - A container that is gone (init pid dead, or the pid reused: start time differs) has
//!   lost its mount namespace and its cgroup (the runtime deletes it; a restart makes a
//!   fresh one with the spec's rules): revoking it is a no-op, reported as such.
//! - Nodes are owned root:root mode 0660 (an image's `disk` group is unknowable). With
//!   user-namespace remapping root in the container is not host root and cannot open them.

pub mod bpf;
pub mod cgroup_v1;
pub mod cgroup_v2;
pub mod follow;
pub mod nodes;
pub mod program;

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{kind_of_errno, Classify, Kind};
use crate::netns::{self, NetnsError, Ns, Target};
use program::DevRule;

/// A block device node: name under /dev, major, minor.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeviceNode {
    pub name: String,
    pub major: u32,
    pub minor: u32,
}

/// How the container's cgroup was granted the devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Grant {
    /// cgroup v1 devices controller directory; the exposure's rules were written to
    /// `devices.allow`.
    V1 { path: PathBuf },
    /// cgroup v2 directory whose device program was replaced by `base` + the grants.
    V2 {
        path: PathBuf,
        /// The runtime's rules the program is rebuilt from (see `cgroup_v2`).
        base: Vec<DevRule>,
        /// Where `base` came from: the bundle's config.json, or "reconstructed: …".
        base_source: String,
    },
    /// Nothing written: the container's rules already allow every device (privileged).
    Unneeded { why: String },
}

impl Grant {
    pub fn describe(&self) -> String {
        match self {
            Grant::V1 { path } => format!("v1:{}", path.display()),
            Grant::V2 { path, .. } => format!("v2:{}", path.display()),
            Grant::Unneeded { why } => format!("none: {why}"),
        }
    }
}

/// One exposure of one loop device in one container (a durable record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exposure {
    /// Full Docker id.
    pub container_id: String,
    pub container_name: String,
    /// The container's init process, pid + start time (pid reuse cannot fool a revoke).
    pub pid: i32,
    pub pid_start_time: u64,
    pub grant: Grant,
    /// Nodes made under the container's /dev (names as seen inside).
    pub nodes: Vec<DeviceNode>,
    /// Exact rules granted, `b MAJ:MIN rwm`.
    pub rules: Vec<String>,
    /// Identity of the backing file when exposed (st_dev, st_ino).
    pub backing_dev: u64,
    pub backing_inode: u64,
    /// The name given with the `as` option (None: the host's `loopN`).
    #[serde(default)]
    pub alias: Option<String>,
    /// Option `follow`: partition-table writes are followed (see `ops::devices`).
    #[serde(default)]
    pub follow: bool,
    /// Intent recorded before the kernel is touched (crash consistency): set and saved
    /// before the nodes/grant are made or withdrawn, cleared (or the exposure removed)
    /// when that finished. A daemon killed in between leaves it set; the start-up
    /// reconcile finishes the operation (see `ops::devices::settle_pending`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Pending>,
}

/// An exposure change in progress (see [`Exposure::pending`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pending {
    /// ExposeToContainer (or a followed table) is making nodes and grants: the record
    /// holds the union of the earlier exposure and the planned one, so whatever the
    /// interrupted call made is named.
    Expose,
    /// A revoke (RevokeFromContainer, Detach, DestroyInstance) is withdrawing them.
    Revoke,
}

impl Exposure {
    pub fn target(&self) -> Target {
        Target {
            pid: self.pid,
            start_time: self.pid_start_time,
        }
    }

    /// The granted rules as [`DevRule`]s (for rebuilding a v2 program).
    pub fn dev_rules(&self) -> Vec<DevRule> {
        self.nodes
            .iter()
            .map(|n| DevRule::block(n.major, n.minor))
            .collect()
    }

    /// Does `c` (a name, a full id or an id prefix of at least 4 characters) name this
    /// exposure's container?
    pub fn is_container(&self, c: &str) -> bool {
        c == self.container_name
            || c.trim_start_matches('/') == self.container_name
            || (c.len() >= 4 && self.container_id.starts_with(c))
    }
}

/// What [`expose`] did, for the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExposeReport {
    pub created: Vec<String>,
    pub replaced: Vec<String>,
    pub unchanged: Vec<String>,
    pub removed: Vec<String>,
    /// Rules written to devices.deny (v1) / dropped from the program (v2).
    pub denied: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExposeError {
    #[error("invalid device node {name:?}: {why}")]
    InvalidNode { name: String, why: &'static str },
    #[error("{0}")]
    NotSupported(String),
    #[error("the container's /dev is the host's /dev (bind mount): nodes made there would be made on the host")]
    HostDev,
    #[error("/dev/{name} in the container is already another node")]
    NameTaken { name: String },
    #[error("{path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{op} on {path}: {source}")]
    Bpf {
        op: &'static str,
        path: PathBuf,
        source: nix::errno::Errno,
    },
    #[error("the kernel refused the device program ({source}): {log}")]
    BpfLoad {
        source: nix::errno::Errno,
        log: String,
    },
    #[error("{path}: {source}")]
    Sysfs {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{op} /dev/{name} in the container: {source}")]
    Node {
        op: &'static str,
        name: String,
        source: nix::errno::Errno,
    },
    #[error(transparent)]
    Target(#[from] NetnsError),
}

impl Classify for ExposeError {
    fn kind(&self) -> Kind {
        match self {
            ExposeError::InvalidNode { .. } => Kind::InvalidArgs,
            ExposeError::NotSupported(_) => Kind::NotSupported,
            ExposeError::HostDev | ExposeError::NameTaken { .. } => Kind::Conflict,
            ExposeError::Sysfs { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                Kind::NotFound
            }
            ExposeError::Node { source, .. } => kind_of_errno(*source),
            ExposeError::Target(e) => e.kind(),
            _ => Kind::Failed,
        }
    }
}

fn parse_dev(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// The host kernel's view: `loopN` and its partitions from /sys/class/block.
pub fn host_nodes(disk: &str) -> Result<(DeviceNode, Vec<DeviceNode>), ExposeError> {
    check_disk_name(disk)?;
    let read = |name: &str| -> Result<DeviceNode, ExposeError> {
        let path = PathBuf::from(format!("/sys/class/block/{name}/dev"));
        let s = std::fs::read_to_string(&path).map_err(|source| ExposeError::Sysfs {
            path: path.clone(),
            source,
        })?;
        let (major, minor) = parse_dev(&s).ok_or_else(|| ExposeError::Sysfs {
            path,
            source: std::io::Error::other("unparsable"),
        })?;
        Ok(DeviceNode {
            name: name.to_owned(),
            major,
            minor,
        })
    };
    let d = read(disk)?;
    let dir = PathBuf::from(format!("/sys/class/block/{disk}"));
    let mut parts = Vec::new();
    for e in std::fs::read_dir(&dir).map_err(|source| ExposeError::Sysfs { path: dir, source })? {
        let Ok(e) = e else { continue };
        let n = e.file_name().to_string_lossy().into_owned();
        if is_partition_of(disk, &n) {
            parts.push(read(&n)?);
        }
    }
    parts.sort();
    Ok((d, parts))
}

fn check_disk_name(disk: &str) -> Result<(), ExposeError> {
    let ok = disk
        .strip_prefix("loop")
        .is_some_and(|n| !n.is_empty() && n.len() <= 7 && n.bytes().all(|b| b.is_ascii_digit()));
    if ok {
        Ok(())
    } else {
        Err(ExposeError::InvalidNode {
            name: disk.to_owned(),
            why: "must be loopN",
        })
    }
}

/// `loop3p12` is a partition of `loop3`.
pub fn is_partition_of(disk: &str, name: &str) -> bool {
    name.strip_prefix(disk)
        .and_then(|r| r.strip_prefix('p'))
        .is_some_and(|n| !n.is_empty() && n.len() <= 4 && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The container's devices cgroup (v1) from /proc/<pid>/cgroup, or None on a v2-only view.
pub fn parse_devices_cgroup(proc_cgroup: &str) -> Option<String> {
    proc_cgroup.lines().find_map(|l| {
        let mut it = l.splitn(3, ':');
        let (_, ctrls, path) = (it.next()?, it.next()?, it.next()?);
        ctrls
            .split(',')
            .any(|c| c == "devices")
            .then(|| path.to_owned())
    })
}

fn rule(n: &DeviceNode) -> String {
    DevRule::block(n.major, n.minor).to_string()
}

/// Check an `as` name: `[A-Za-z0-9_-]{1,32}`, starting with a letter.
pub fn check_alias(alias: &str) -> Result<(), ExposeError> {
    let ok = !alias.is_empty()
        && alias.len() <= 32
        && alias.as_bytes()[0].is_ascii_alphabetic()
        && alias
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ExposeError::InvalidNode {
            name: alias.to_owned(),
            why: "a name under /dev: [A-Za-z0-9_-], at most 32, starting with a letter",
        })
    }
}

/// The kernel's rule for partition names: `disk` → `disk1`, `loop0` → `loop0p1`.
pub fn partition_name(disk: &str, number: &str) -> String {
    if disk.ends_with(|c: char| c.is_ascii_digit()) {
        format!("{disk}p{number}")
    } else {
        format!("{disk}{number}")
    }
}

/// Is `name` a partition node name of `disk` (by the kernel's rule above)?
pub fn is_partition_name(disk: &str, name: &str) -> bool {
    let rest = if disk.ends_with(|c: char| c.is_ascii_digit()) {
        name.strip_prefix(disk).and_then(|r| r.strip_prefix('p'))
    } else {
        name.strip_prefix(disk)
    };
    rest.is_some_and(|n| !n.is_empty() && n.len() <= 4 && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The nodes as named inside the container: the host's `loopN`/`loopNpK`, or with `alias`
/// `alias`/`alias[p]K`.
pub fn inner_nodes(
    disk: &DeviceNode,
    partitions: &[DeviceNode],
    alias: Option<&str>,
) -> Vec<DeviceNode> {
    let inner_disk = alias.unwrap_or(&disk.name).to_owned();
    let mut v = vec![DeviceNode {
        name: inner_disk.clone(),
        ..disk.clone()
    }];
    for p in partitions {
        let k = p
            .name
            .strip_prefix(&disk.name)
            .and_then(|r| r.strip_prefix('p'))
            .unwrap_or_default();
        v.push(DeviceNode {
            name: partition_name(&inner_disk, k),
            ..p.clone()
        });
    }
    v
}

/// The container side of an exposure.
#[derive(Debug, Clone)]
pub struct Container {
    pub target: Target,
    pub id: String,
    pub name: String,
}

/// Everything [`expose`] needs; `ops` gathers it.
#[derive(Debug, Clone)]
pub struct ExposeRequest {
    pub container: Container,
    /// The host's view at this moment (see [`host_nodes`]).
    pub disk: DeviceNode,
    pub partitions: Vec<DeviceNode>,
    pub alias: Option<String>,
    /// The earlier exposure of the same device in the same container, if any.
    pub previous: Option<Exposure>,
    /// v2: the grants of the container's other exposures (kept in the rebuilt program).
    pub other_grants: Vec<DevRule>,
    /// v2: the runtime's rules when the bundle cannot be found, with how they were made.
    pub v2_fallback: Option<(Vec<DevRule>, String)>,
    pub backing_dev: u64,
    pub backing_inode: u64,
}

/// Where the container's device policy lives.
enum Policy {
    V1(PathBuf),
    V2(PathBuf),
}

fn policy_of(target: Target) -> Result<Policy, ExposeError> {
    let cg_file = PathBuf::from(format!("/proc/{}/cgroup", target.pid));
    let cg = std::fs::read_to_string(&cg_file).map_err(|_| NetnsError::Gone { pid: target.pid })?;
    target.verify()?;
    if let Some(rel) = parse_devices_cgroup(&cg) {
        let dir = cgroup_v1::dir_of(&rel);
        if !dir.join("devices.allow").exists() {
            return Err(ExposeError::NotSupported(format!(
                "no devices cgroup for pid {} ({} is missing)",
                target.pid,
                dir.display()
            )));
        }
        return Ok(Policy::V1(dir));
    }
    let rel = cgroup_v2::parse_unified(&cg).ok_or_else(|| {
        ExposeError::NotSupported(format!(
            "no cgroup of pid {} in {}",
            target.pid,
            cg_file.display()
        ))
    })?;
    let root = cgroup_v2::unified_root().ok_or_else(|| {
        ExposeError::NotSupported("no devices controller (v1) and no cgroup2 mount".into())
    })?;
    Ok(Policy::V2(root.join(rel.trim_start_matches('/'))))
}

/// What [`expose`] will make, decided without touching anything: the nodes as named
/// inside the container, their exact rules and the grant kind. The operations layer
/// records it as the intent before [`expose`] runs.
pub fn plan(req: &ExposeRequest) -> Result<Exposure, ExposeError> {
    check_disk_name(&req.disk.name)?;
    for p in &req.partitions {
        if !is_partition_of(&req.disk.name, &p.name) {
            return Err(ExposeError::InvalidNode {
                name: p.name.clone(),
                why: "not a partition name of the device",
            });
        }
    }
    if let Some(a) = &req.alias {
        check_alias(a)?;
    }
    let target = req.container.target;
    let policy = policy_of(target)?;
    let wanted = inner_nodes(&req.disk, &req.partitions, req.alias.as_deref());
    let devs: Vec<(u32, u32)> = wanted.iter().map(|n| (n.major, n.minor)).collect();

    // Decide the grant before touching anything.
    let grant = match &policy {
        Policy::V1(dir) => {
            if cgroup_v1::allows_all(dir)? {
                Grant::Unneeded {
                    why: "the container's devices cgroup allows every device (privileged)".into(),
                }
            } else {
                Grant::V1 { path: dir.clone() }
            }
        }
        Policy::V2(dir) => {
            let (base, base_source) = match cgroup_v2::bundle_rules(target.pid) {
                Some((file, rules)) => (rules, file.display().to_string()),
                None => req.v2_fallback.clone().ok_or_else(|| {
                    ExposeError::NotSupported(
                        "cgroup v2: the container's OCI bundle (config.json) was not found and \
                         its device rules cannot be reconstructed"
                            .into(),
                    )
                })?,
            };
            if cgroup_v2::already_allowed(&base, &devs) {
                Grant::Unneeded {
                    why: "the container's device rules allow every device (privileged)".into(),
                }
            } else {
                Grant::V2 {
                    path: dir.clone(),
                    base,
                    base_source,
                }
            }
        }
    };

    Ok(Exposure {
        container_id: req.container.id.clone(),
        container_name: req.container.name.clone(),
        pid: target.pid,
        pid_start_time: target.start_time,
        grant,
        rules: wanted.iter().map(rule).collect(),
        nodes: wanted,
        backing_dev: req.backing_dev,
        backing_inode: req.backing_inode,
        alias: req.alias.clone(),
        follow: false,
        pending: None,
    })
}

/// Make the device's nodes exist in the container (named as `inner_nodes` says), remove
/// stale partition nodes of it, and grant exactly those devices; withdraw what an earlier
/// exposure granted and is no longer wanted. Refusals (host /dev, a taken `as` name,
/// stopped container) change nothing.
pub fn expose(req: ExposeRequest) -> Result<(Exposure, ExposeReport), ExposeError> {
    let planned = plan(&req)?;
    let target = req.container.target;
    let grant = planned.grant;
    let wanted = planned.nodes;

    // Nodes (inside the mount namespace). Names this device had before may be replaced;
    // with `as`, a name held by any other node is a Conflict (checked before any change).
    let host_dev = nodes::host_dev_id()?;
    let prev_nodes: Vec<DeviceNode> = req
        .previous
        .as_ref()
        .map(|p| p.nodes.clone())
        .unwrap_or_default();
    let inner_disk = wanted[0].name.clone();
    let prev_disk = prev_nodes.first().map(|n| n.name.clone());
    let (w2, prev2, alias) = (wanted.clone(), prev_nodes.clone(), req.alias.is_some());
    let synced = netns::run_in(target, &[Ns::Mnt], move || {
        if alias {
            for n in &w2 {
                let ours = prev2.iter().any(|p| p.name == n.name);
                if !ours && nodes::name_taken(host_dev, &n.name, n.major, n.minor)? {
                    return Err(ExposeError::NameTaken {
                        name: n.name.clone(),
                    });
                }
            }
        }
        let prev_names: BTreeSet<String> = prev2.iter().map(|n| n.name.clone()).collect();
        let stale = |name: &str| {
            is_partition_name(&inner_disk, name)
                || prev_names.contains(name)
                || prev_disk
                    .as_deref()
                    .is_some_and(|d| is_partition_name(d, name))
        };
        nodes::sync(host_dev, &w2, &stale)
    })??;

    let wanted_rules: Vec<String> = wanted.iter().map(rule).collect();
    let mut stale_rules: Vec<String> = synced.removed.iter().map(rule).collect();
    if let Some(p) = &req.previous {
        stale_rules.extend(p.rules.iter().cloned());
    }
    stale_rules.sort();
    stale_rules.dedup();
    stale_rules.retain(|r| !wanted_rules.contains(r));

    let granted = match &grant {
        Grant::V1 { path } => cgroup_v1::write_rules(path, false, &stale_rules)
            .and_then(|()| cgroup_v1::write_rules(path, true, &wanted_rules)),
        Grant::V2 { path, base, .. } => {
            let mut grants = req.other_grants.clone();
            grants.extend(wanted.iter().map(|n| DevRule::block(n.major, n.minor)));
            cgroup_v2::apply(path, base, &grants).and_then(|r| {
                r.map(|_| ())
                    .ok_or(ExposeError::Target(NetnsError::Gone { pid: target.pid }))
            })
        }
        Grant::Unneeded { .. } => Ok(()),
    };
    if let Err(e) = granted {
        // Nothing left behind: the nodes just made go again.
        let made: Vec<DeviceNode> = wanted
            .iter()
            .filter(|n| synced.created.contains(&n.name))
            .cloned()
            .collect();
        if let Err(e2) = netns::run_in(target, &[Ns::Mnt], move || nodes::remove(host_dev, &made)) {
            tracing::error!(error = %e2, "rollback of exposed nodes failed");
        }
        return Err(e);
    }
    let exposure = Exposure {
        container_id: req.container.id.clone(),
        container_name: req.container.name.clone(),
        pid: target.pid,
        pid_start_time: target.start_time,
        grant,
        nodes: wanted,
        rules: wanted_rules,
        backing_dev: req.backing_dev,
        backing_inode: req.backing_inode,
        alias: req.alias.clone(),
        follow: false,
        pending: None,
    };
    let report = ExposeReport {
        created: synced.created,
        replaced: synced.replaced,
        unchanged: synced.unchanged,
        removed: synced.removed.into_iter().map(|n| n.name).collect(),
        denied: stale_rules,
    };
    Ok((exposure, report))
}

/// What [`revoke`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoked {
    /// The grant withdrawn (the rules named) and the nodes removed; `nodes_left` says why
    /// nodes could not be removed (they open nothing any more).
    Withdrawn {
        nodes: Vec<String>,
        rules: Vec<String>,
        nodes_left: Option<String>,
    },
    /// The container (its init process) is gone: nothing of the exposure is left.
    ContainerGone,
}

/// Undo an exposure: unlink its nodes in the container's /dev, withdraw the grant (v1:
/// `devices.deny` of each exact rule; v2: program rebuilt from the base rules and
/// `keep` — the grants of the container's other exposures).
pub fn revoke(exp: &Exposure, keep: &[DevRule]) -> Result<Revoked, ExposeError> {
    let target = exp.target();
    if target.verify().is_err() {
        return Ok(Revoked::ContainerGone);
    }
    // The grant first: it is what protects the device; a node left behind without a
    // grant opens nothing (and both are tried whatever the other did).
    let withdrawn = match &exp.grant {
        Grant::V1 { path } => cgroup_v1::deny(path, &exp.rules),
        Grant::V2 { path, base, .. } => cgroup_v2::apply(path, base, keep).map(|r| r.is_some()),
        Grant::Unneeded { .. } => Ok(true),
    };
    let host_dev = nodes::host_dev_id()?;
    let list = exp.nodes.clone();
    let removed = netns::run_in(target, &[Ns::Mnt], move || nodes::remove(host_dev, &list));
    if target.verify().is_err() {
        return Ok(Revoked::ContainerGone);
    }
    withdrawn?;
    let (nodes, nodes_left) = match removed {
        Ok(Ok(r)) => (r, None),
        Ok(Err(e)) => (Vec::new(), Some(e.to_string())),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    Ok(Revoked::Withdrawn {
        nodes,
        rules: if matches!(exp.grant, Grant::Unneeded { .. }) {
            Vec::new()
        } else {
            exp.rules.clone()
        },
        nodes_left,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names() {
        assert!(is_partition_of("loop3", "loop3p1"));
        assert!(is_partition_of("loop3", "loop3p128"));
        assert!(!is_partition_of("loop3", "loop31p1"));
        assert!(!is_partition_of("loop3", "loop3p"));
        assert!(!is_partition_of("loop3", "loop3p1/../x"));
        assert!(!is_partition_of("loop3", "loop3"));
    }

    #[test]
    fn devices_cgroup_from_proc() {
        let v1 = "9:name=systemd:/docker/abc\n5:devices:/docker/abc\n0::/docker/abc\n";
        assert_eq!(parse_devices_cgroup(v1).as_deref(), Some("/docker/abc"));
        let multi = "3:cpu,devices:/x\n";
        assert_eq!(parse_devices_cgroup(multi).as_deref(), Some("/x"));
        assert_eq!(
            parse_devices_cgroup("0::/system.slice/docker-abc.scope\n"),
            None
        );
    }

    #[test]
    fn alias_names_follow_the_kernel_rule() {
        assert_eq!(partition_name("disk", "1"), "disk1");
        assert_eq!(partition_name("loop0", "2"), "loop0p2");
        assert!(is_partition_name("disk", "disk12"));
        assert!(!is_partition_name("disk", "disk"));
        assert!(!is_partition_name("disk", "diskp1"));
        assert!(is_partition_name("loop0", "loop0p1"));
        assert!(!is_partition_name("loop0", "loop01"));
        let d = DeviceNode {
            name: "loop7".into(),
            major: 7,
            minor: 7,
        };
        let p = DeviceNode {
            name: "loop7p2".into(),
            major: 259,
            minor: 9,
        };
        let v = inner_nodes(&d, std::slice::from_ref(&p), Some("disk"));
        assert_eq!(v[0].name, "disk");
        assert_eq!(v[1].name, "disk2");
        assert_eq!((v[1].major, v[1].minor), (259, 9));
        let v = inner_nodes(&d, std::slice::from_ref(&p), Some("loop0"));
        assert_eq!(v[1].name, "loop0p2");
        let v = inner_nodes(&d, &[p], None);
        assert_eq!(v[1].name, "loop7p2");
        assert!(check_alias("disk").is_ok());
        for bad in ["", "../x", "a/b", "1disk", "x.y", &"a".repeat(33)] {
            assert_eq!(
                check_alias(bad).unwrap_err().kind(),
                Kind::InvalidArgs,
                "{bad}"
            );
        }
    }

    fn req(disk: DeviceNode, parts: Vec<DeviceNode>) -> ExposeRequest {
        ExposeRequest {
            container: Container {
                target: Target {
                    pid: std::process::id() as i32,
                    start_time: 0,
                },
                id: "x".into(),
                name: "x".into(),
            },
            disk,
            partitions: parts,
            alias: None,
            previous: None,
            other_grants: vec![],
            v2_fallback: None,
            backing_dev: 0,
            backing_inode: 0,
        }
    }

    #[test]
    fn invalid_names_are_invalid_args() {
        let d = DeviceNode {
            name: "sda".into(),
            major: 8,
            minor: 0,
        };
        assert_eq!(
            expose(req(d, vec![])).unwrap_err().kind(),
            Kind::InvalidArgs
        );
        let d = DeviceNode {
            name: "loop1".into(),
            major: 7,
            minor: 1,
        };
        let p = DeviceNode {
            name: "loop2p1".into(),
            major: 259,
            minor: 0,
        };
        assert_eq!(
            expose(req(d, vec![p])).unwrap_err().kind(),
            Kind::InvalidArgs
        );
        assert_eq!(parse_dev("259:3\n"), Some((259, 3)));
    }

    #[test]
    fn exposure_records_roundtrip_and_name_their_container() {
        let e = Exposure {
            container_id: "0123456789abcdef".into(),
            container_name: "lab-01".into(),
            pid: 42,
            pid_start_time: 7,
            grant: Grant::V2 {
                path: "/sys/fs/cgroup/x".into(),
                base: program::docker_defaults(),
                base_source: "reconstructed".into(),
            },
            nodes: vec![DeviceNode {
                name: "loop3".into(),
                major: 7,
                minor: 3,
            }],
            rules: vec!["b 7:3 rwm".into()],
            backing_dev: 1,
            backing_inode: 2,
            alias: None,
            follow: true,
            pending: None,
        };
        let j = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<Exposure>(&j).unwrap(), e);
        assert!(e.is_container("lab-01") && e.is_container("/lab-01"));
        assert!(e.is_container("0123") && !e.is_container("012") && !e.is_container("lab"));
        assert_eq!(e.dev_rules(), vec![DevRule::block(7, 3)]);
    }
}
