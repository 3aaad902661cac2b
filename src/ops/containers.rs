//! The one container resolver: a Docker container name or id → its id, its init process
//! pinned by pid + start time, network namespace, state, network mode, cgroup and device
//! cgroup rules. Captures, ExposeToContainer and AdoptContainer resolve through it; the
//! ports manager holds the same [`Docker`] client ([`Containers::docker`]).
//!
//! Interfaces: dockerd's Engine API (`GET /containers/<ref>/json`, through
//! [`crate::docker`]), `/proc/<pid>/stat` (start time), `/proc/<pid>/ns/net`,
//! `/proc/<pid>/cgroup`.
//!
//! Traps:
//! - A container can restart between the inspect and the use of its pid, and the pid can
//!   then name another process. So: inspect, read the init pid's start time, inspect again
//!   by the full id — same id, still running, same pid — and read the start time again.
//!   Callers act on the pinned [`Target`], whose `verify` they may call again later.
//! - A name reaches dockerd's request line: anything but `[A-Za-z0-9][A-Za-z0-9_.-]*`
//!   (≤ 128) is refused before a request is made (InvalidArgs).
//! - A stopped container has pid 0 (never pin pid 0: it is "no process", and `/proc/0`
//!   does not exist). Busy for captures and ExposeToContainer (start it and retry); the
//!   caller may classify it differently (AdoptContainer answers Conflict).

use crate::docker::{Docker, DockerError, NetworkAttachment};
use crate::error::{Classify, Kind};
use crate::netns::{NetnsError, Target};

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error(
        "container {0:?}: expected a Docker name or id ([A-Za-z0-9][A-Za-z0-9_.-]*, at most 128)"
    )]
    BadRef(String),
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error("container {name} is not running")]
    NotRunning { name: String },
    #[error("container {name} changed while it was resolved (restarted?); try again")]
    Changed { name: String },
    #[error(transparent)]
    Target(#[from] NetnsError),
}

impl Classify for ContainerError {
    fn kind(&self) -> Kind {
        match self {
            ContainerError::BadRef(_) => Kind::InvalidArgs,
            ContainerError::Docker(e) => e.kind(),
            ContainerError::NotRunning { .. } | ContainerError::Changed { .. } => Kind::Busy,
            ContainerError::Target(e) => e.kind(),
        }
    }
}

/// A running container, resolved and pinned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    /// Full Docker id.
    pub id: String,
    /// Without the leading `/`.
    pub name: String,
    /// The init process, pinned by pid + start time.
    pub target: Target,
    /// State.Status (`running` here; `paused` containers count as running too).
    pub status: String,
    /// HostConfig.NetworkMode (`default`, `bridge`, `host`, `none`, `container:<id>`, …).
    pub network_mode: String,
    pub networks: Vec<NetworkAttachment>,
    /// (st_dev, st_ino) of `/proc/<pid>/ns/net`; compare with [`netns_of`] of another pid.
    pub netns: Option<(u64, u64)>,
    /// The init process's cgroup path: the cgroup v2 (`0::`) line of `/proc/<pid>/cgroup`,
    /// else the first line's path.
    pub cgroup: Option<String>,
    /// HostConfig.CgroupParent (`--cgroup-parent`), "" when unset.
    pub cgroup_parent: String,
    /// HostConfig.DeviceCgroupRules (`--device-cgroup-rule`).
    pub device_cgroup_rules: Vec<String>,
}

/// Docker container names and ids: `[A-Za-z0-9][A-Za-z0-9_.-]{0,127}`.
pub fn check_ref(c: &str) -> Result<(), ContainerError> {
    let ok = !c.is_empty()
        && c.len() <= 128
        && c.as_bytes()[0].is_ascii_alphanumeric()
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ContainerError::BadRef(c.to_owned()))
    }
}

/// (st_dev, st_ino) of a process's network namespace.
pub fn netns_of(pid: i32) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// The cgroup path of a process: the unified (`0::`) line, else the first line.
pub fn parse_proc_cgroup(text: &str) -> Option<String> {
    let path = |l: &str| l.splitn(3, ':').nth(2).map(str::to_owned);
    text.lines()
        .find(|l| l.starts_with("0::"))
        .and_then(path)
        .or_else(|| text.lines().next().and_then(path))
}

/// The resolver. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Containers {
    docker: Docker,
}

impl Containers {
    pub fn new(docker: Docker) -> Containers {
        Containers { docker }
    }

    /// The Docker client (shared with the ports manager).
    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    /// Resolve a running container and pin its init process (see the module header).
    pub async fn resolve(&self, name_or_id: &str) -> Result<Container, ContainerError> {
        check_ref(name_or_id)?;
        let first = self.docker.inspect_details(name_or_id).await?;
        let info = &first.info;
        if !info.running || info.pid == 0 {
            return Err(ContainerError::NotRunning {
                name: name_or_id.to_owned(),
            });
        }
        let pid = i32::try_from(info.pid).map_err(|_| ContainerError::Changed {
            name: name_or_id.to_owned(),
        })?;
        let target = Target::of_pid(pid)?;
        let again = self.docker.inspect(&info.id).await?;
        if again.id != info.id || !again.running || again.pid != info.pid {
            return Err(ContainerError::Changed {
                name: name_or_id.to_owned(),
            });
        }
        let netns = netns_of(pid);
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .ok()
            .and_then(|t| parse_proc_cgroup(&t));
        // After the /proc reads: they belong to the pinned process.
        target.verify()?;
        Ok(Container {
            id: first.info.id,
            name: first.info.name,
            target,
            status: first.status,
            network_mode: first.info.network_mode,
            networks: again.networks,
            netns,
            cgroup,
            cgroup_parent: first.cgroup_parent,
            device_cgroup_rules: first.device_cgroup_rules,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs() {
        assert!(check_ref("web_1.a-b").is_ok());
        assert!(check_ref("0123abcd").is_ok());
        assert!(check_ref(&"a".repeat(128)).is_ok());
        for bad in [
            "",
            "../x",
            "a/b",
            "-x",
            "a b",
            "a?x",
            "pid:3",
            &"a".repeat(129),
        ] {
            let e = check_ref(bad).unwrap_err();
            assert_eq!(e.kind(), Kind::InvalidArgs, "{bad}");
        }
    }

    #[test]
    fn proc_cgroup_lines() {
        let v1 = "12:devices:/docker/abc\n0::/system.slice/docker-abc.scope\n";
        assert_eq!(
            parse_proc_cgroup(v1).as_deref(),
            Some("/system.slice/docker-abc.scope")
        );
        assert_eq!(
            parse_proc_cgroup("5:cpu,cpuacct:/dind/lab/abc\n").as_deref(),
            Some("/dind/lab/abc")
        );
        assert_eq!(parse_proc_cgroup(""), None);
    }

    #[tokio::test]
    async fn bad_refs_never_reach_dockerd_and_no_dockerd_is_failed() {
        let c = Containers::new(Docker::new("/nonexistent/docker.sock"));
        let e = c.resolve("../etc").await.unwrap_err();
        assert_eq!(e.kind(), Kind::InvalidArgs);
        let e = c.resolve("web").await.unwrap_err();
        assert_eq!(e.kind(), Kind::Failed);
        assert!(matches!(e, ContainerError::Docker(ref d) if d.is_unreachable()));
    }

    #[test]
    fn own_netns_is_readable() {
        let me = std::process::id() as i32;
        assert!(netns_of(me).is_some());
        assert_eq!(netns_of(me), netns_of(me));
    }
}
