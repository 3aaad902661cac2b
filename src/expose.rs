//! Create a loop device's node and its partition nodes inside a container's /dev and allow
//! them in its device cgroup (containers have no udev: moby#27886).
//!
//! Kernel interfaces: `setns(CLONE_NEWNS)` via `crate::netns`, `openat2`, `mknodat`,
//! `fstatat`, `unlinkat`, `getdents` (read_dir), cgroup v1 `devices.allow`/`devices.deny`,
//! `/proc/<pid>/cgroup`, `/sys/class/block/<dev>/dev`.
//!
//! Traps:
//! - The mount namespace is entered on a dedicated thread that first `unshare(CLONE_FS)`
//!   (else `setns` fails with EINVAL); that also gives the thread a private umask, set to 0 so
//!   `mknodat` creates exactly 0660. After `setns` "/" is the container's root.
//! - The container owns its /dev: it may have replaced entries with symlinks. /dev is opened
//!   with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, every node is handled with `*at` calls
//!   without following links, and only block devices are ever removed.
//! - Partitions of a loop device without `max_part` use the extended major 259 (blkext) with
//!   minors allocated globally (`/sys/class/block/loop0p1/dev` = `259:0` on this kernel). A
//!   minor can be reused by another device after a partition is deleted, so the cgroup v1
//!   rules are exact (`b 259:M rwm`), never `259:*` (that would also open the host's NVMe
//!   partitions to a container holding CAP_MKNOD, which Docker grants by default), and stale
//!   minors are denied again.
//! - cgroup v1: one rule per write(2) to `devices.allow`. cgroup v2 has no such file: the
//!   device policy is an eBPF program attached by the runtime and cannot be extended here.
//!   Nodes are created only when the caller vouches that the container was started with rules
//!   that allow the majors (see [`docker_rules_allow`]), else NotSupported with the advice.
//! - Nodes are owned root:root mode 0660 (an image's `disk` group is unknowable). With
//!   user-namespace remapping root in the container is not host root and cannot open them.

use std::collections::BTreeSet;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

use nix::errno::Errno;
use nix::fcntl::{openat2, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstatat, mknodat, Mode, SFlag};

use crate::error::{kind_of_errno, Classify, Kind};
use crate::netns::{self, NetnsError, Ns, Target};

/// The advice given on cgroup v2 hosts.
pub const V2_ADVICE: &str =
    "start the container with --device-cgroup-rule 'b 7:* rmw' --device-cgroup-rule 'b 259:* rmw'";

/// A block device node: name under /dev, major, minor.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DeviceNode {
    pub name: String,
    pub major: u32,
    pub minor: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupOutcome {
    /// cgroup v1: the rules written to devices.allow / devices.deny.
    V1 {
        path: PathBuf,
        allowed: Vec<String>,
        denied: Vec<String>,
    },
    /// cgroup v2: nothing written; the caller said the container's rules allow the majors.
    V2RulesTrusted,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExposeReport {
    pub created: Vec<String>,
    pub replaced: Vec<String>,
    pub unchanged: Vec<String>,
    pub removed: Vec<String>,
    pub cgroup: CgroupOutcome,
}

#[derive(Debug, thiserror::Error)]
pub enum ExposeError {
    #[error("invalid device node {name:?}: {why}")]
    InvalidNode { name: String, why: &'static str },
    #[error("{0}")]
    CgroupV2(&'static str),
    #[error("no devices cgroup for pid {pid} in /proc/{pid}/cgroup")]
    NoDevicesCgroup { pid: i32 },
    #[error("{path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
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
        source: Errno,
    },
    #[error(transparent)]
    Target(#[from] NetnsError),
}

impl Classify for ExposeError {
    fn kind(&self) -> Kind {
        match self {
            ExposeError::InvalidNode { .. } => Kind::InvalidArgs,
            ExposeError::CgroupV2(_) | ExposeError::NoDevicesCgroup { .. } => Kind::NotSupported,
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

/// Do Docker `--device-cgroup-rule`s (HostConfig.DeviceCgroupRules) allow read+write on
/// block devices of every major in `majors` (any minor)?
pub fn docker_rules_allow(rules: &[String], majors: &[u32]) -> bool {
    majors.iter().all(|&m| {
        rules.iter().any(|r| {
            let f: Vec<&str> = r.split_whitespace().collect();
            match f.as_slice() {
                ["a", ..] => true,
                [t, dev, acc] if (*t == "b" || *t == "a") => {
                    let Some((maj, min)) = dev.split_once(':') else {
                        return false;
                    };
                    (maj == "*" || maj.parse() == Ok(m))
                        && min == "*"
                        && acc.contains('r')
                        && acc.contains('w')
                }
                _ => false,
            }
        })
    })
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
    format!("b {}:{} rwm", n.major, n.minor)
}

/// Make /dev/<disk> and /dev/<disk>pM exist in `target`'s mount namespace exactly as given,
/// remove stale `<disk>p*` nodes, and allow the devices in its cgroup (v1). On cgroup v2 the
/// nodes are only made when `v2_rules_allow` (the caller checked the container's rules).
pub fn expose(
    target: Target,
    disk: &DeviceNode,
    partitions: &[DeviceNode],
    v2_rules_allow: bool,
) -> Result<ExposeReport, ExposeError> {
    check_disk_name(&disk.name)?;
    for p in partitions {
        if !is_partition_of(&disk.name, &p.name) {
            return Err(ExposeError::InvalidNode {
                name: p.name.clone(),
                why: "not a partition name of the device",
            });
        }
    }
    // Which cgroup version does the container use?
    let cg_file = PathBuf::from(format!("/proc/{}/cgroup", target.pid));
    let cg = std::fs::read_to_string(&cg_file).map_err(|_| NetnsError::Gone { pid: target.pid })?;
    target.verify()?;
    let devices_cg = parse_devices_cgroup(&cg);
    if devices_cg.is_none() && !v2_rules_allow {
        return Err(ExposeError::CgroupV2(V2_ADVICE));
    }

    let mut wanted: Vec<DeviceNode> = vec![disk.clone()];
    wanted.extend(partitions.iter().cloned());
    let disk_name = disk.name.clone();
    let nodes = netns::run_in(target, &[Ns::Mnt], move || sync_nodes(&disk_name, &wanted))??;

    let cgroup = match devices_cg {
        None => CgroupOutcome::V2RulesTrusted,
        Some(rel) => {
            let base = PathBuf::from("/sys/fs/cgroup/devices").join(rel.trim_start_matches('/'));
            if !base.join("devices.allow").exists() {
                return Err(ExposeError::NoDevicesCgroup { pid: target.pid });
            }
            let wanted_rules: BTreeSet<String> =
                std::iter::once(disk).chain(partitions).map(rule).collect();
            // Deny stale minors first (a wanted one may reuse a stale minor: allow wins).
            let denied: Vec<String> = nodes
                .stale
                .iter()
                .map(rule)
                .filter(|r| !wanted_rules.contains(r))
                .collect();
            write_rules(&base.join("devices.deny"), &denied)?;
            let allowed: Vec<String> = wanted_rules.into_iter().collect();
            write_rules(&base.join("devices.allow"), &allowed)?;
            CgroupOutcome::V1 {
                path: base,
                allowed,
                denied,
            }
        }
    };
    Ok(ExposeReport {
        created: nodes.created,
        replaced: nodes.replaced,
        unchanged: nodes.unchanged,
        removed: nodes.stale.into_iter().map(|n| n.name).collect(),
        cgroup,
    })
}

fn write_rules(path: &std::path::Path, rules: &[String]) -> Result<(), ExposeError> {
    use std::io::Write;
    if rules.is_empty() {
        return Ok(());
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|source| ExposeError::Cgroup {
            path: path.to_owned(),
            source,
        })?;
    for r in rules {
        // one rule per write(2)
        f.write_all(r.as_bytes())
            .map_err(|source| ExposeError::Cgroup {
                path: path.to_owned(),
                source,
            })?;
    }
    Ok(())
}

struct NodeSync {
    created: Vec<String>,
    replaced: Vec<String>,
    unchanged: Vec<String>,
    stale: Vec<DeviceNode>,
}

/// Names in a directory given by fd (no /proc needed: the container's /proc does not show
/// this thread).
fn list_dir(dir: &OwnedFd) -> Result<Vec<String>, Errno> {
    let fd = nix::unistd::dup(dir)?;
    // SAFETY: fdopendir takes ownership of the dup'ed fd; closedir releases both.
    unsafe {
        let d = libc::fdopendir(std::os::fd::IntoRawFd::into_raw_fd(fd));
        if d.is_null() {
            return Err(Errno::last());
        }
        let mut names = Vec::new();
        loop {
            let e = libc::readdir(d);
            if e.is_null() {
                break;
            }
            let name = std::ffi::CStr::from_ptr((*e).d_name.as_ptr());
            names.push(name.to_string_lossy().into_owned());
        }
        libc::closedir(d);
        Ok(names)
    }
}

/// Runs inside the container's mount namespace (thread with private fs struct).
fn sync_nodes(disk: &str, wanted: &[DeviceNode]) -> Result<NodeSync, ExposeError> {
    nix::sys::stat::umask(Mode::empty());
    let nerr = |op, name: &str| {
        let name = name.to_owned();
        move |source| ExposeError::Node { op, name, source }
    };
    let root = nix::fcntl::open(
        "/",
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(nerr("open", "/"))?;
    let dev: OwnedFd = openat2(
        root.as_fd(),
        "dev",
        OpenHow::new()
            .flags(OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS),
    )
    .map_err(nerr("open", ""))?;

    let mut out = NodeSync {
        created: vec![],
        replaced: vec![],
        unchanged: vec![],
        stale: vec![],
    };
    let want_names: BTreeSet<&str> = wanted.iter().map(|n| n.name.as_str()).collect();
    // Stale partition nodes: scan /dev for <disk>pN not wanted.
    let entries = list_dir(&dev).map_err(nerr("readdir", ""))?;
    for name in entries {
        if !is_partition_of(disk, &name) || want_names.contains(name.as_str()) {
            continue;
        }
        let st = fstatat(dev.as_fd(), name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(nerr("stat", &name))?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFBLK {
            continue; // not ours to remove
        }
        nix::unistd::unlinkat(
            dev.as_fd(),
            name.as_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        )
        .map_err(nerr("unlink", &name))?;
        out.stale.push(DeviceNode {
            name,
            major: nix::sys::stat::major(st.st_rdev) as u32,
            minor: nix::sys::stat::minor(st.st_rdev) as u32,
        });
    }
    for n in wanted {
        let rdev = nix::sys::stat::makedev(n.major as u64, n.minor as u64);
        let mut replaced = false;
        match fstatat(dev.as_fd(), n.name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => {
                let is_blk =
                    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFBLK;
                if is_blk && st.st_rdev == rdev && st.st_mode & 0o7777 == 0o660 {
                    out.unchanged.push(n.name.clone());
                    continue;
                }
                nix::unistd::unlinkat(
                    dev.as_fd(),
                    n.name.as_str(),
                    nix::unistd::UnlinkatFlags::NoRemoveDir,
                )
                .map_err(nerr("unlink", &n.name))?;
                replaced = true;
            }
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(nerr("stat", &n.name)(e)),
        }
        mknodat(
            dev.as_fd(),
            n.name.as_str(),
            SFlag::S_IFBLK,
            Mode::from_bits_truncate(0o660),
            rdev,
        )
        .map_err(nerr("mknod", &n.name))?;
        if replaced {
            out.replaced.push(n.name.clone());
        } else {
            out.created.push(n.name.clone());
        }
    }
    Ok(out)
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
    fn docker_rules() {
        let r = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(docker_rules_allow(
            &r(&["b 7:* rmw", "b 259:* rmw"]),
            &[7, 259]
        ));
        assert!(docker_rules_allow(&r(&["b *:* rwm"]), &[7, 259]));
        assert!(docker_rules_allow(&r(&["a"]), &[7, 259]));
        assert!(!docker_rules_allow(&r(&["b 7:* rmw"]), &[7, 259]));
        assert!(!docker_rules_allow(
            &r(&["b 7:* m", "b 259:* rmw"]),
            &[7, 259]
        ));
        assert!(!docker_rules_allow(
            &r(&["b 7:0 rwm", "b 259:* rmw"]),
            &[7, 259]
        ));
        assert!(!docker_rules_allow(
            &r(&["c 7:* rwm", "b 259:* rwm"]),
            &[7, 259]
        ));
    }

    #[test]
    fn invalid_names_are_invalid_args() {
        let t = Target {
            pid: std::process::id() as i32,
            start_time: 0,
        };
        let d = DeviceNode {
            name: "sda".into(),
            major: 8,
            minor: 0,
        };
        assert_eq!(
            expose(t, &d, &[], true).unwrap_err().kind(),
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
            expose(t, &d, &[p], true).unwrap_err().kind(),
            Kind::InvalidArgs
        );
        assert_eq!(parse_dev("259:3\n"), Some((259, 3)));
    }
}
