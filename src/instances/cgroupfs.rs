//! The cgroupfs backend: instance cgroups as plain directories `/<root>/<name>` in the
//! cgroup filesystems (kernel interface: cgroup v1 controller hierarchies, or the cgroup v2
//! unified hierarchy; files as in Documentation/admin-guide/cgroup-v1 and cgroup-v2.rst).
//!
//! - v1 (legacy or hybrid): the directory is made in the hierarchies of the controllers we
//!   limit or account (cpu, cpuacct, memory, pids, blkio; co-mounted ones once). runc later
//!   creates `<root>/<name>/<container-id>` in *every* mounted hierarchy (cpuset, devices,
//!   freezer, name=systemd, …), so destroy removes `<root>/<name>` from every hierarchy.
//! - v2: the directory is made under the cgroup2 mount and the controllers are enabled in
//!   `cgroup.subtree_control` of the mount root and of `<root>` (not of the instance itself:
//!   a v2 cgroup with enabled subtree controllers may not hold processes, and runc enables
//!   them itself when it creates the container cgroup below).
//!
//! Traps:
//! - The memory limit files must be written in an order that keeps
//!   `memory.memsw.limit_in_bytes >= memory.limit_in_bytes` (see `limits.rs`).
//! - `memory.memsw.*` exist only with swap accounting; `blkio.weight` only with CFQ/BFQ.
//!   An explicit limit that needs a missing file fails with NotSupported; a reset skips it.
//! - Writing a limit below current usage: v1 `memory.limit_in_bytes` returns EBUSY when it
//!   cannot reclaim; v2 OOM-kills.
//! - `rmdir` fails with EBUSY while a process is inside; destroy checks first (Busy with the
//!   pids) or, with `force`, SIGKILLs every process and waits until the cgroups are empty.
//! - Ownership: every directory create makes is tagged right after its `mkdir` with the
//!   xattr `trusted.dindhelper=<state id>` (see `tag.rs`; [`CgroupfsBackend::with_owner`]).
//!   A directory that exists already and carries another state id's tag is never claimed
//!   (Conflict); the start-up reconcile lists the instance directories with their tags
//!   ([`SliceBackend::present`]) and removes only its own leftovers
//!   ([`SliceBackend::remove_leftover`]).

use std::path::{Path, PathBuf};

use super::cgroup::{self, CgroupMounts};
use super::limits::{CgroupWrite, Limits};
use super::tag::{self, Owner};
use super::{BackendKind, Change, DockerCgroupDriver, InstanceError, Present, SliceBackend};

/// The directory under every hierarchy that holds the instances.
pub const DEFAULT_ROOT: &str = "dind";

/// v1 controllers whose hierarchy gets the instance directory at create.
const V1_CONTROLLERS: &[&str] = &["cpu", "cpuacct", "memory", "pids", "blkio"];
/// v2 controllers enabled for the instances.
const V2_CONTROLLERS: &[&str] = &["cpu", "memory", "pids", "io"];

#[derive(Debug, Clone)]
pub struct CgroupfsBackend {
    mounts: CgroupMounts,
    root: String,
    v1: bool,
    /// The state id written into `trusted.dindhelper` of every directory create makes.
    owner: Option<String>,
}

impl CgroupfsBackend {
    /// Detect the layout from `/proc/self/mountinfo`. `root` is the directory that holds
    /// the instances under each hierarchy (`dind`; tests use their own).
    pub fn detect(root: &str) -> Result<Self, InstanceError> {
        Self::with_mounts(CgroupMounts::detect()?, root)
    }

    pub fn with_mounts(mounts: CgroupMounts, root: &str) -> Result<Self, InstanceError> {
        let root = root.trim_matches('/').to_owned();
        if root.is_empty()
            || root
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(InstanceError::NotSupported {
                what: "cgroup root".into(),
                why: format!("{root:?} is not a relative path"),
            });
        }
        let v1 = mounts.is_v1();
        if !v1 && mounts.unified.is_none() {
            return Err(InstanceError::NotSupported {
                what: "cgroupfs backend".into(),
                why: "neither cgroup v1 controllers nor cgroup2 are mounted".into(),
            });
        }
        Ok(CgroupfsBackend {
            mounts,
            root,
            v1,
            owner: None,
        })
    }

    /// Tag every directory this backend creates with `state_id` (the daemon's state dir).
    pub fn with_owner(mut self, state_id: &str) -> Self {
        self.owner = Some(state_id.to_owned()).filter(|s| !s.is_empty());
        self
    }

    /// Tag a directory made now (or claim an untagged one of a recorded instance).
    fn tag(&self, dir: &Path) -> Result<(), InstanceError> {
        let Some(id) = &self.owner else { return Ok(()) };
        match tag::set(dir, id) {
            Ok(tag::Set::Done) => Ok(()),
            Ok(tag::Set::Unsupported) => {
                tracing::warn!(dir = %dir.display(), "cgroupfs keeps no xattrs here: instance cgroup left untagged (intent records still cover a crash)");
                Ok(())
            }
            Err(e) => Err(InstanceError::io(
                &format!("setxattr {}", tag::XATTR),
                dir,
                e,
            )),
        }
    }

    /// Refuse a directory that exists already and carries another state id's tag.
    fn check_not_foreign(&self, name: &str, dir: &Path) -> Result<(), InstanceError> {
        let Some(id) = &self.owner else { return Ok(()) };
        match tag::get(dir).map_err(|e| InstanceError::io("getxattr", dir, e))? {
            Some(Owner::Tagged(t)) if &t != id => Err(InstanceError::Foreign {
                name: name.to_owned(),
                what: dir.display().to_string(),
                owner: t,
            }),
            _ => Ok(()),
        }
    }

    /// Who made instance `name`'s directories: the first tag found on a directory create
    /// makes, else Untagged; None when none of them exists.
    fn owner_of(&self, name: &str) -> Result<Option<Owner>, InstanceError> {
        let mut seen = None;
        for d in self.all_dirs(name) {
            match tag::get(&d).map_err(|e| InstanceError::io("getxattr", &d, e))? {
                Some(Owner::Tagged(t)) => return Ok(Some(Owner::Tagged(t))),
                Some(Owner::Untagged) => seen = Some(Owner::Untagged),
                None => {}
            }
        }
        Ok(seen)
    }

    pub fn mounts(&self) -> &CgroupMounts {
        &self.mounts
    }

    /// The instance directory in the hierarchy mounted at `mount`.
    fn dir_in(&self, mount: &Path, name: &str) -> PathBuf {
        mount.join(&self.root).join(name)
    }

    /// Directories created at create time (v1: one per limited hierarchy; v2: one).
    pub fn instance_dirs(&self, name: &str) -> Vec<PathBuf> {
        if self.v1 {
            let mut mounts: Vec<&PathBuf> = V1_CONTROLLERS
                .iter()
                .filter_map(|c| self.mounts.v1.get(*c))
                .collect();
            mounts.sort();
            mounts.dedup();
            mounts.into_iter().map(|m| self.dir_in(m, name)).collect()
        } else {
            vec![self.dir_in(self.unified(), name)]
        }
    }

    /// Every directory the instance may have (v1: in all hierarchies runc uses).
    fn all_dirs(&self, name: &str) -> Vec<PathBuf> {
        let mut mounts = if self.v1 {
            self.mounts.v1_mount_points()
        } else {
            Vec::new()
        };
        if let Some(u) = &self.mounts.unified {
            mounts.push(u.clone());
        }
        mounts.iter().map(|m| self.dir_in(m, name)).collect()
    }

    fn unified(&self) -> &Path {
        self.mounts
            .unified
            .as_deref()
            .expect("checked in with_mounts")
    }

    /// The directory in which a write for `controller` lands.
    fn dir_for(&self, controller: &str, name: &str) -> Option<PathBuf> {
        if self.v1 {
            self.mounts.v1.get(controller).map(|m| self.dir_in(m, name))
        } else {
            Some(self.dir_in(self.unified(), name))
        }
    }

    /// The directory of `controller` for instance `name` (for tests and diagnostics).
    pub fn controller_dir(&self, controller: &str, name: &str) -> Option<PathBuf> {
        self.dir_for(controller, name)
    }

    fn enable_v2_controllers(&self) -> Result<(), InstanceError> {
        let mount = self.unified().to_owned();
        let mut dirs = vec![mount.clone()];
        let mut p = mount;
        for comp in self.root.split('/') {
            p = p.join(comp);
            // The instance root (`dind`) is made here, before its subtree_control is set.
            cgroup::mkdir_cgroup(&p)?;
            dirs.push(p.clone());
        }
        for d in dirs {
            let avail = cgroup::read_file(&d.join("cgroup.controllers"))?;
            let on = cgroup::read_file(&d.join("cgroup.subtree_control"))?;
            for c in V2_CONTROLLERS {
                let has = |s: &str| s.split_whitespace().any(|x| x == *c);
                if has(&avail) && !has(&on) {
                    cgroup::write_file(&d.join("cgroup.subtree_control"), &format!("+{c}"))?;
                }
            }
        }
        Ok(())
    }

    fn plan(&self, limits: &Limits) -> Result<Vec<CgroupWrite>, InstanceError> {
        Ok(if self.v1 {
            limits.to_cgroup_v1_files()?
        } else {
            limits.to_cgroup_v2_files()
        })
    }

    fn apply(&self, name: &str, plan: &[CgroupWrite]) -> Result<(), InstanceError> {
        for w in plan {
            let dir = self.dir_for(w.controller, name);
            let target = dir.as_ref().and_then(|d| {
                let main = d.join(w.file);
                if main.exists() {
                    return Some((main, w.value.as_str()));
                }
                let (f, v) = w.fallback.as_ref()?;
                let f = d.join(f);
                f.exists().then_some((f, v.as_str()))
            });
            match target {
                Some((f, v)) => cgroup::write_file(&f, v)?,
                None if w.required => {
                    return Err(InstanceError::NotSupported {
                        what: format!(
                            "limit file {}{}",
                            w.file,
                            w.fallback
                                .as_ref()
                                .map_or(String::new(), |(f, _)| format!(" or {f}"))
                        ),
                        why: format!(
                            "the {} controller does not offer it here (value {})",
                            w.controller, w.value
                        ),
                    })
                }
                None => {
                    tracing::debug!(file = w.file, "cgroup file absent; reset skipped")
                }
            }
        }
        Ok(())
    }
}

impl SliceBackend for CgroupfsBackend {
    fn kind(&self) -> BackendKind {
        if self.v1 {
            BackendKind::CgroupfsV1
        } else {
            BackendKind::CgroupfsV2
        }
    }

    fn create(&self, name: &str, limits: &Limits) -> Result<Change, InstanceError> {
        crate::names::check_instance_name(name)?;
        limits.validate(super::ncpu())?;
        let plan = self.plan(limits)?;
        if !self.v1 {
            self.enable_v2_controllers()?;
        }
        let mut created = Vec::new();
        let mut result = Ok(());
        for d in self.instance_dirs(name) {
            // Tag right after the mkdir: the gap is covered by the caller's intent record.
            let step = match cgroup::mkdir_cgroup(&d) {
                Ok(true) => {
                    created.push(d.clone());
                    self.tag(&d)
                }
                // Existing: another daemon's is refused; an untagged one belongs to a
                // recorded instance being made again (or made before tags): claim it.
                Ok(false) => self.check_not_foreign(name, &d).and_then(|()| self.tag(&d)),
                Err(e) => Err(e),
            };
            if let Err(e) = step {
                result = Err(e);
                break;
            }
        }
        let result = result.and_then(|()| self.apply(name, &plan));
        match result {
            Ok(()) if created.is_empty() => Ok(Change::Unchanged),
            Ok(()) => Ok(Change::Done),
            Err(e) => {
                // Roll back what this call created; report both failures.
                let mut errs = vec![e];
                for d in created.iter().rev() {
                    if let Err(e) = cgroup::rmdir_tree(d) {
                        errs.push(e);
                    }
                }
                Err(InstanceError::collect(errs).unwrap_err())
            }
        }
    }

    fn set_limits(&self, name: &str, limits: &Limits) -> Result<(), InstanceError> {
        crate::names::check_instance_name(name)?;
        limits.validate(super::ncpu())?;
        if !self.exists(name)? {
            return Err(InstanceError::NotFound {
                name: name.to_owned(),
            });
        }
        let plan = self.plan(limits)?;
        self.apply(name, &plan)
    }

    fn destroy(&self, name: &str, force: bool) -> Result<Change, InstanceError> {
        crate::names::check_instance_name(name)?;
        let dirs: Vec<PathBuf> = self.all_dirs(name);
        cgroup::ensure_empty(name, &dirs, force)?;
        let mut removed = false;
        let mut errs = Vec::new();
        for d in self.all_dirs(name) {
            match cgroup::rmdir_tree(&d) {
                Ok(r) => removed |= r,
                Err(e) => errs.push(e),
            }
        }
        InstanceError::collect(errs)?;
        Ok(if removed {
            Change::Done
        } else {
            Change::Unchanged
        })
    }

    fn exists(&self, name: &str) -> Result<bool, InstanceError> {
        crate::names::check_instance_name(name)?;
        Ok(self.instance_dirs(name).iter().any(|d| d.is_dir()))
    }

    fn owner_tag(&self) -> Option<&str> {
        self.owner.as_deref()
    }

    fn present(&self) -> Result<Vec<Present>, InstanceError> {
        let mut names = std::collections::BTreeSet::new();
        let mut mounts = if self.v1 {
            self.mounts.v1_mount_points()
        } else {
            Vec::new()
        };
        mounts.extend(self.mounts.unified.clone());
        for m in mounts {
            let dir = m.join(&self.root);
            let rd = match std::fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(InstanceError::io("list", &dir, e)),
            };
            for ent in rd.flatten() {
                let n = ent.file_name().to_string_lossy().into_owned();
                if ent.file_type().is_ok_and(|t| t.is_dir())
                    && crate::names::check_instance_name(&n).is_ok()
                {
                    names.insert(n);
                }
            }
        }
        let mut out = Vec::new();
        for name in names {
            if let Some(owner) = self.owner_of(&name)? {
                out.push(Present { name, owner });
            }
        }
        Ok(out)
    }

    fn owner(&self, name: &str) -> Result<Option<Owner>, InstanceError> {
        crate::names::check_instance_name(name)?;
        self.owner_of(name)
    }

    fn remove_leftover(&self, name: &str, untagged_too: bool) -> Result<Change, InstanceError> {
        crate::names::check_instance_name(name)?;
        let ours = match self.owner_of(name)? {
            None => return Ok(Change::Unchanged),
            Some(Owner::Tagged(t)) => Some(t.as_str()) == self.owner.as_deref(),
            Some(Owner::Untagged) => untagged_too,
        };
        if !ours {
            return Err(InstanceError::Foreign {
                name: name.to_owned(),
                what: self.cgroup_path(name),
                owner: match self.owner_of(name)? {
                    Some(Owner::Tagged(t)) => t,
                    _ => "untagged".into(),
                },
            });
        }
        // Never kill anything here: processes inside mean someone uses it (Busy).
        self.destroy(name, false)
    }

    fn cgroup_path(&self, name: &str) -> String {
        format!("/{}/{name}", self.root)
    }

    fn cgroup_parent(
        &self,
        name: &str,
        driver: DockerCgroupDriver,
    ) -> Result<String, InstanceError> {
        match driver {
            DockerCgroupDriver::Cgroupfs => Ok(self.cgroup_path(name)),
            DockerCgroupDriver::Systemd => Err(InstanceError::NotSupported {
                what: "dockerd's systemd cgroup driver with the cgroupfs instance backend".into(),
                why: "the instance is no systemd slice; run dockerd with \
                      --exec-opt native.cgroupdriver=cgroupfs"
                    .into(),
            }),
        }
    }

    fn v1_layout(&self) -> bool {
        self.v1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hybrid() -> CgroupfsBackend {
        let m = CgroupMounts::parse(
            "\
32 31 0:29 / /cg/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /cg/memory rw - cgroup cgroup rw,memory
36 31 0:33 / /cg/devices rw - cgroup cgroup rw,devices
39 31 0:36 / /cg/pids rw - cgroup cgroup rw,pids
41 31 0:38 / /cg/unified rw - cgroup2 cgroup2 rw
",
        )
        .unwrap();
        CgroupfsBackend::with_mounts(m, "/dind/").unwrap()
    }

    #[test]
    fn v1_dirs_and_parent() {
        let b = hybrid();
        assert_eq!(b.kind(), BackendKind::CgroupfsV1);
        assert_eq!(
            b.instance_dirs("a"),
            vec![
                PathBuf::from("/cg/cpu,cpuacct/dind/a"),
                PathBuf::from("/cg/memory/dind/a"),
                PathBuf::from("/cg/pids/dind/a"),
            ]
        );
        // Destroy also looks at devices (runc made dirs there) and the unified mount.
        assert_eq!(b.all_dirs("a").len(), 5);
        assert_eq!(b.cgroup_path("a"), "/dind/a");
        assert_eq!(
            b.cgroup_parent("a", DockerCgroupDriver::Cgroupfs).unwrap(),
            "/dind/a"
        );
        assert!(b.cgroup_parent("a", DockerCgroupDriver::Systemd).is_err());
        assert_eq!(
            b.dir_for("memory", "a"),
            Some(PathBuf::from("/cg/memory/dind/a"))
        );
        assert_eq!(b.dir_for("blkio", "a"), None);
    }

    #[test]
    fn v2_dirs() {
        let m = CgroupMounts::parse("30 23 0:26 / /cg rw - cgroup2 cgroup2 rw\n").unwrap();
        let b = CgroupfsBackend::with_mounts(m, "dind").unwrap();
        assert_eq!(b.kind(), BackendKind::CgroupfsV2);
        assert_eq!(b.instance_dirs("x"), vec![PathBuf::from("/cg/dind/x")]);
        assert_eq!(b.dir_for("memory", "x"), Some(PathBuf::from("/cg/dind/x")));
    }

    #[test]
    fn bad_roots_are_refused() {
        for r in ["", "/", "a/../b", "a//b"] {
            assert!(CgroupfsBackend::with_mounts(CgroupMounts::default(), r).is_err());
        }
        assert!(CgroupfsBackend::with_mounts(CgroupMounts::default(), "dind").is_err());
    }

    #[test]
    fn bad_names_and_limits_fail_before_touching_anything() {
        let b = hybrid();
        assert!(matches!(
            b.create("../x", &Limits::default()),
            Err(InstanceError::Name(_))
        ));
        let l = Limits {
            memory_max: Some(1),
            ..Default::default()
        };
        assert!(matches!(b.create("a", &l), Err(InstanceError::Limit(_))));
    }
}
