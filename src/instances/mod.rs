//! DinD instances: one cgroup subtree (a systemd slice, or a plain cgroup directory) per
//! instance with CPU, memory, task and IO limits, plus the oom_score_adj of its processes.
//!
//! - [`limits`]: the knobs, their validation and pure translations (systemd properties,
//!   cgroup v2 files, cgroup v1 files).
//! - [`SliceBackend`]: create / set_limits / destroy / exists for one instance, with three
//!   implementations picked at start by [`pick_backend`]: [`systemd::SystemdBackend`]
//!   (PID 1 is systemd and the system bus answers), [`cgroupfs::CgroupfsBackend`] on the
//!   unified hierarchy (v2) or on the v1 controller hierarchies (legacy/hybrid).
//! - [`adopt_container`]: check that a container's main process lies inside the instance
//!   cgroup and give every process of the container the instance's oom_score_adj.
//!
//! Where containers go (`docker run --cgroup-parent`, see [`SliceBackend::cgroup_parent`]):
//! - dockerd with the **cgroupfs** driver joins the parent and the container id
//!   (`<parent>/<id>`) and runc resolves an *absolute* path under each controller's mount
//!   point; a *relative* path is taken relative to runc's own cgroup (under dockerd's), so
//!   the value is always absolute: `/dind/<name>` (cgroupfs backend) or
//!   `/dind.slice/dind-<name>.slice` (systemd backend).
//! - dockerd with the **systemd** driver needs a slice unit name: `dind-<name>.slice`
//!   (docker expands it to the path `dind.slice/dind-<name>.slice` and creates
//!   `docker-<id>.scope` under it). Only meaningful with the systemd backend.
//!
//! Ownership: every cgroup/slice a backend creates carries the daemon's state id (cgroupfs:
//! xattr `trusted.dindhelper`, see [`tag`]; systemd: the slice's Description), so the
//! start-up reconcile removes only its own leftovers ([`SliceBackend::present`],
//! [`SliceBackend::remove_leftover`]) and never another daemon's or another tool's.
//!
//! Destroy refuses (Busy, naming the pids) while processes are inside, unless `force`:
//! then the cgroupfs backend SIGKILLs every process of the subtree and the systemd backend
//! lets `StopUnit` do the same (systemd kills what is in a slice it stops).

pub mod cgroup;
pub mod cgroupfs;
pub mod limits;
pub mod systemd;
pub mod tag;

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{kind_of_errno, Classify, Kind};
use crate::names::NameError;
pub use limits::{LimitError, Limits};

/// Everything that can go wrong with instances.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Limit(#[from] LimitError),
    #[error("instance {name:?} does not exist")]
    NotFound { name: String },
    #[error(
        "instance {name:?} still has processes {pids:?} in {cgroup}; stop its containers \
         first or destroy with force"
    )]
    Busy {
        name: String,
        cgroup: String,
        pids: Vec<u32>,
    },
    #[error(
        "container process {pid} is in cgroup {cgroup}, outside instance {name:?} \
         ({instance_cgroup}); run the container with --cgroup-parent={cgroup_parent}"
    )]
    NotInInstance {
        name: String,
        pid: u32,
        cgroup: String,
        instance_cgroup: String,
        cgroup_parent: String,
    },
    #[error("process {pid} does not exist")]
    NoProcess { pid: u32 },
    #[error("{what} is not supported on this host: {why}")]
    NotSupported { what: String, why: String },
    #[error("{op} {path}: {source}")]
    Io {
        op: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("systemd {op} {unit}: {message}")]
    Systemd {
        op: &'static str,
        unit: String,
        message: String,
        kind: Kind,
    },
    #[error("timed out after {secs} s waiting for {what}")]
    Timeout { what: String, secs: u64 },
    #[error("{} failures: {}", .0.len(), list(.0))]
    Many(Vec<InstanceError>),
    #[error(
        "instance {name:?}: {what} belongs to someone else (owner tag {owner:?}); not touched"
    )]
    Foreign {
        name: String,
        what: String,
        owner: String,
    },
}

fn list(errs: &[InstanceError]) -> String {
    errs.iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

impl InstanceError {
    pub(crate) fn io(op: &str, path: &Path, source: io::Error) -> Self {
        InstanceError::Io {
            op: op.to_owned(),
            path: path.to_owned(),
            source,
        }
    }

    /// One error stays itself; several become `Many`; none is `Ok`.
    pub fn collect(mut errs: Vec<InstanceError>) -> Result<(), InstanceError> {
        match errs.len() {
            0 => Ok(()),
            1 => Err(errs.remove(0)),
            _ => Err(InstanceError::Many(errs)),
        }
    }
}

impl Classify for InstanceError {
    fn kind(&self) -> Kind {
        match self {
            InstanceError::Name(e) => e.kind(),
            InstanceError::Limit(e) => e.kind(),
            InstanceError::NotFound { .. } | InstanceError::NoProcess { .. } => Kind::NotFound,
            InstanceError::Busy { .. } => Kind::Busy,
            InstanceError::NotInInstance { .. } => Kind::Conflict,
            InstanceError::NotSupported { .. } => Kind::NotSupported,
            InstanceError::Io { source, .. } => match source.raw_os_error() {
                Some(n) => kind_of_errno(nix::errno::Errno::from_raw(n)),
                None => Kind::Failed,
            },
            InstanceError::Systemd { kind, .. } => *kind,
            InstanceError::Timeout { .. } => Kind::Failed,
            InstanceError::Foreign { .. } => Kind::Conflict,
            InstanceError::Many(v) => v.first().map_or(Kind::Failed, |e| e.kind()),
        }
    }
}

/// Which backend manages the instance cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    Systemd,
    CgroupfsV2,
    CgroupfsV1,
}

/// dockerd's `--exec-opt native.cgroupdriver` (`docker info -f {{.CgroupDriver}}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DockerCgroupDriver {
    Cgroupfs,
    Systemd,
}

/// What a create or destroy did (idempotent calls say whether anything changed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Created / removed now.
    Done,
    /// Already there (create: limits re-applied) / already gone (destroy).
    Unchanged,
}

/// An instance cgroup/slice found on the host, with who made it (for the start-up reconcile).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Present {
    pub name: String,
    /// `Tagged(state id)` or `Untagged`.
    pub owner: tag::Owner,
}

/// One backend for instance cgroups. No backend-specific type appears here.
/// All calls are blocking (the bus layer runs them through `spawn_blocking`).
pub trait SliceBackend: Send + Sync {
    fn kind(&self) -> BackendKind;
    /// Create the instance cgroup/slice with these limits. Existing: re-apply the limits
    /// (so the daemon can recreate instances from its state at start).
    fn create(&self, name: &str, limits: &Limits) -> Result<Change, InstanceError>;
    /// Replace the limits of an existing instance (a `None` knob is reset). NotFound if absent.
    fn set_limits(&self, name: &str, limits: &Limits) -> Result<(), InstanceError>;
    /// Remove the instance. Busy (with the pids) while processes are inside, unless
    /// `force`, which kills them. Absent = `Unchanged`.
    fn destroy(&self, name: &str, force: bool) -> Result<Change, InstanceError>;
    fn exists(&self, name: &str) -> Result<bool, InstanceError>;
    /// The instance's cgroup path relative to the root of each hierarchy
    /// (as `/proc/<pid>/cgroup` shows it), e.g. `/dind/lab1`.
    fn cgroup_path(&self, name: &str) -> String;
    /// The value for `docker run --cgroup-parent` given dockerd's cgroup driver.
    fn cgroup_parent(
        &self,
        name: &str,
        driver: DockerCgroupDriver,
    ) -> Result<String, InstanceError>;
    /// Whether `/proc/<pid>/cgroup` should be judged on the v1 controller lines.
    fn v1_layout(&self) -> bool;
    /// The state id this backend tags what it creates with (None: untagged).
    fn owner_tag(&self) -> Option<&str>;
    /// Every instance cgroup/slice under this backend's root, ours or not, with its tag.
    fn present(&self) -> Result<Vec<Present>, InstanceError>;
    /// Remove a leftover that no record claims, only when it is ours: tagged with our
    /// state id, or untagged and `untagged_too` (an intent record says we were creating
    /// it). Never kills: processes inside are Busy. Another's is `Foreign`; absent is
    /// `Unchanged`.
    fn remove_leftover(&self, name: &str, untagged_too: bool) -> Result<Change, InstanceError>;
    /// Who made instance `name`'s cgroup/slice, by its tag; None when it does not exist.
    fn owner(&self, name: &str) -> Result<Option<tag::Owner>, InstanceError> {
        Ok(self
            .present()?
            .into_iter()
            .find(|p| p.name == name)
            .map(|p| p.owner))
    }
}

/// An instance as the daemon's state keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub name: String,
    pub limits: Limits,
    /// `dind-<name>.slice`, dashes of the name escaped (see [`slice_unit`]); the unit name
    /// with the systemd backend, a stable label otherwise.
    pub slice_unit: String,
    /// The value for `docker run --cgroup-parent`.
    pub cgroup_parent: String,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
}

/// `dind-<name>.slice` with every `-` of the name escaped as `\x2d` (systemd-escape).
///
/// systemd's dash rule makes every dash of a slice name a level of the hierarchy:
/// `dind-lab-1.slice` would sit in `dind.slice/dind-lab.slice/dind-lab-1.slice`, i.e.
/// *inside instance "lab"* (stopping "lab" would stop "lab-1"). Escaped, every instance
/// is a direct child of `dind.slice`: `dind-lab\x2d1.slice`, cgroup
/// `/dind.slice/dind-lab\x2d1.slice` (checked in a booted systemd 252). runc's slice
/// expansion for docker's systemd driver splits on literal dashes only, so the escaped
/// name is also the right `--cgroup-parent` there.
pub fn slice_unit(name: &str) -> String {
    format!("dind-{}.slice", name.replace('-', "\\x2d"))
}

impl Instance {
    /// Validate and describe a new instance (does not create anything).
    pub fn new(
        name: &str,
        limits: Limits,
        backend: &dyn SliceBackend,
        driver: DockerCgroupDriver,
    ) -> Result<Self, InstanceError> {
        crate::names::check_instance_name(name)?;
        limits.validate(ncpu())?;
        Ok(Instance {
            name: name.to_owned(),
            cgroup_parent: backend.cgroup_parent(name, driver)?,
            slice_unit: slice_unit(name),
            limits,
            created_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        })
    }
}

/// Number of online CPUs (for the CPU quota range).
pub fn ncpu() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

/// Pick the backend this host supports: systemd when PID 1 is systemd
/// (`/run/systemd/system` exists) and its manager answers on the system bus; else
/// cgroupfs on v1 controllers (legacy/hybrid) or on the unified hierarchy.
/// `handle` is the runtime the systemd D-Bus connection lives on. Blocking: call it
/// outside async code (or use [`pick_backend_async`]).
pub fn pick_backend(
    handle: &tokio::runtime::Handle,
) -> Result<Box<dyn SliceBackend>, InstanceError> {
    handle.block_on(pick_backend_async(handle.clone(), ""))
}

/// [`pick_backend`] for async code. The returned backend's methods are blocking
/// (`spawn_blocking`); the systemd one drives its connection on `handle`. What it creates
/// is tagged with `state_id` (the daemon's; "" = untagged).
pub async fn pick_backend_async(
    handle: tokio::runtime::Handle,
    state_id: &str,
) -> Result<Box<dyn SliceBackend>, InstanceError> {
    if Path::new("/run/systemd/system").exists() {
        match systemd::SystemdBackend::connect_async(handle, None).await {
            Ok(b) => return Ok(Box::new(b.with_owner(state_id))),
            Err(e) => tracing::warn!(
                error = %e,
                "PID 1 is systemd but its manager does not answer on the system bus; using cgroupfs"
            ),
        }
    }
    Ok(Box::new(
        cgroupfs::CgroupfsBackend::detect(cgroupfs::DEFAULT_ROOT)?.with_owner(state_id),
    ))
}

/// What [`adopt_container`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adopted {
    /// The container's cgroup (path of its main process, as `/proc/<pid>/cgroup` shows).
    pub cgroup: String,
    /// Every process that got the oom_score_adj.
    pub pids: Vec<u32>,
    pub oom_score_adj: i32,
}

/// Check that the container whose main process is `pid` lies inside instance `name`
/// (else `NotInInstance` → Conflict, naming the `--cgroup-parent` to use), then write
/// `oom_score_adj` to every process in the container's cgroup and the cgroups below it.
/// Call again after the container restarts (new processes).
pub fn adopt_container(
    backend: &dyn SliceBackend,
    name: &str,
    pid: u32,
    oom_score_adj: i32,
    driver: DockerCgroupDriver,
) -> Result<Adopted, InstanceError> {
    let mounts = cgroup::CgroupMounts::detect()?;
    let v1 = backend.v1_layout();
    let inst = backend.cgroup_path(name);
    let lines = cgroup::read_proc_cgroup(pid)?;
    let outside =
        cgroup::lines_outside(&lines, v1, &inst).map_err(|why| InstanceError::NotSupported {
            what: format!("cgroup of process {pid}"),
            why,
        })?;
    if let Some(l) = outside.first() {
        return Err(InstanceError::NotInInstance {
            name: name.to_owned(),
            pid,
            cgroup: l.path.clone(),
            instance_cgroup: inst,
            cgroup_parent: backend.cgroup_parent(name, driver)?,
        });
    }
    // The container's own cgroup directory, in a hierarchy where every process shows up.
    let (mount, path) = if v1 {
        let ctrl = ["pids", "memory", "cpu"]
            .into_iter()
            .find(|c| mounts.v1.contains_key(*c))
            .ok_or_else(|| InstanceError::NotSupported {
                what: "cgroup v1 layout".into(),
                why: "no pids, memory or cpu hierarchy is mounted".into(),
            })?;
        let line = lines
            .iter()
            .find(|l| l.controllers.iter().any(|c| c == ctrl))
            .ok_or_else(|| InstanceError::NotSupported {
                what: format!("cgroup of process {pid}"),
                why: format!("no {ctrl} line in /proc/{pid}/cgroup"),
            })?;
        (mounts.v1[ctrl].clone(), line.path.clone())
    } else {
        let line = lines.iter().find(|l| l.id == 0).expect("checked above");
        let mount = mounts
            .unified
            .clone()
            .ok_or_else(|| InstanceError::NotSupported {
                what: "cgroup v2 layout".into(),
                why: "no cgroup2 mount".into(),
            })?;
        (mount, line.path.clone())
    };
    let dir = mount.join(path.trim_start_matches('/'));
    let mut pids = cgroup::procs_in_tree(&dir)?;
    if !pids.contains(&pid) {
        pids.push(pid);
    }
    let mut done = Vec::new();
    let mut errs = Vec::new();
    for p in pids {
        // A listed pid may have exited and been reused since: write only while it is
        // still inside the container's cgroup (the window left is the write itself).
        match cgroup::read_proc_cgroup(p) {
            Ok(l) if cgroup::lines_outside(&l, v1, &path).is_ok_and(|o| o.is_empty()) => {}
            Ok(_) | Err(InstanceError::NoProcess { .. }) if p != pid => continue,
            Ok(_) => {
                return Err(InstanceError::NotInInstance {
                    name: name.to_owned(),
                    pid,
                    cgroup: path.clone(),
                    instance_cgroup: inst.clone(),
                    cgroup_parent: backend.cgroup_parent(name, driver)?,
                })
            }
            Err(e) => {
                errs.push(e);
                continue;
            }
        }
        match cgroup::set_oom_score_adj(p, oom_score_adj) {
            Ok(()) => done.push(p),
            // Exited between listing and writing: nothing to adjust.
            Err(InstanceError::NoProcess { .. }) if p != pid => {}
            Err(e) => errs.push(e),
        }
    }
    InstanceError::collect(errs)?;
    Ok(Adopted {
        cgroup: path,
        pids: done,
        oom_score_adj,
    })
}

/// Set one process's oom_score_adj (-1000..=1000).
pub fn set_oom_score_adj(pid: u32, value: i32) -> Result<(), InstanceError> {
    if !(-1000..=1000).contains(&value) {
        return Err(LimitError {
            knob: "oom_score_adj".into(),
            value: value.to_string(),
            why: "must be in -1000..=1000".into(),
        }
        .into());
    }
    cgroup::set_oom_score_adj(pid, value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_unit_names() {
        assert_eq!(slice_unit("lab"), "dind-lab.slice");
        assert_eq!(slice_unit("lab-1"), r"dind-lab\x2d1.slice");
        assert_eq!(slice_unit("a-b-c"), r"dind-a\x2db\x2dc.slice");
    }

    #[test]
    fn errors_classify() {
        let e = InstanceError::Busy {
            name: "a".into(),
            cgroup: "/dind/a".into(),
            pids: vec![1, 2],
        };
        assert_eq!(e.kind(), Kind::Busy);
        assert!(e.to_string().contains("[1, 2]"));
        let e = InstanceError::io(
            "rmdir",
            Path::new("/x"),
            io::Error::from_raw_os_error(libc::EBUSY),
        );
        assert_eq!(e.kind(), Kind::Busy);
        let e = InstanceError::NotInInstance {
            name: "a".into(),
            pid: 7,
            cgroup: "/docker/x".into(),
            instance_cgroup: "/dind/a".into(),
            cgroup_parent: "/dind/a".into(),
        };
        assert_eq!(e.kind(), Kind::Conflict);
        assert!(e.to_string().contains("--cgroup-parent=/dind/a"));
        assert!(InstanceError::collect(vec![]).is_ok());
        let many = InstanceError::collect(vec![
            InstanceError::NotFound { name: "a".into() },
            InstanceError::NoProcess { pid: 1 },
        ])
        .unwrap_err();
        assert!(many.to_string().starts_with("2 failures"));
    }

    #[test]
    fn instance_serde_round_trip() {
        let i = Instance {
            name: "a".into(),
            limits: Limits {
                memory_max: Some(1 << 30),
                ..Default::default()
            },
            slice_unit: slice_unit("a"),
            cgroup_parent: "/dind/a".into(),
            created_at: 1,
        };
        let s = serde_json::to_string(&i).unwrap();
        assert_eq!(serde_json::from_str::<Instance>(&s).unwrap(), i);
    }

    #[test]
    fn set_oom_score_adj_checks_range() {
        assert_eq!(
            set_oom_score_adj(1, 1001).unwrap_err().kind(),
            Kind::InvalidArgs
        );
    }
}
