//! The systemd backend: one transient slice `dind-<name>.slice` per instance, made through
//! systemd's manager on D-Bus (org.freedesktop.systemd1.Manager, see
//! org.freedesktop.systemd1(5)). This is the only D-Bus client in the domain; zbus stays in
//! this file (errors are turned into [`InstanceError::Systemd`] with a [`Kind`]).
//!
//! - systemd's dash rule places `dind-<name>.slice` under `dind.slice`; that parent needs
//!   no unit file (systemd loads an implicit slice). Dashes *inside* the name would add
//!   levels (`dind-a-b.slice` lies in `dind-a.slice`), so they are escaped as `\x2d`
//!   ([`super::slice_unit`]). The cgroup path is `/dind.slice/<unit>` in every hierarchy
//!   systemd manages.
//! - Create: `Subscribe` once, open the `JobRemoved` stream *before* `StartTransientUnit`
//!   (a fast job may finish before the reply arrives), then wait for the JobRemoved of the
//!   returned job path (bounded by [`JOB_TIMEOUT`]); its result must be `done`.
//!   `UnitExists` (already loaded, e.g. recreated from state): `SetUnitProperties(runtime)`
//!   and `StartUnit` (no-op when active).
//! - Properties are all of type `t`; `u64::MAX` means infinity/unset, so a full property
//!   list replaces the limits (see `limits.rs`).
//! - Destroy: without force, Busy while any process is in the slice's cgroups; with
//!   force, SIGKILL every process there first; then `StopUnit(name, "replace")` + wait.
//!   Killing first matters: stopping a slice stops the units in it (docker's
//!   `docker-<id>.scope` with the systemd driver) with SIGTERM and their stop timeout
//!   (90 s; a container's PID 1 ignores SIGTERM, measured: the job outlived our 30 s
//!   bound), and never touches processes placed by hand (docker's cgroupfs driver).
//! - `exists` = the unit is loaded *and* active/activating: a stopped transient slice may
//!   stay loaded (while a failed unit inside is remembered).
//! - Transient units vanish when systemd restarts or the host reboots: the daemon
//!   recreates them from its state (create is idempotent).
//! - Ownership: `StartTransientUnit` sets `Description=dindhelper instance <name> (state
//!   <state id>)` in the same call that makes the unit (atomic: no unit exists without
//!   it). The start-up reconcile lists `dind-*.slice` with `ListUnitsByPatterns` (which
//!   returns the Description) and stops only units carrying its own state id. An existing
//!   unit re-used by create keeps its Description (`SetUnitProperties` takes cgroup
//!   properties, not Description, at runtime).
//! - dockerd's cgroup driver decides the `--cgroup-parent` syntax: systemd driver
//!   `dind-<name>.slice`, cgroupfs driver `/dind.slice/dind-<name>.slice`.

use std::path::PathBuf;
use std::time::Duration;

use futures_util::StreamExt;
use zbus::zvariant::{OwnedObjectPath, Value};

use super::cgroup::{self, CgroupMounts};
use super::limits::Limits;
use super::{slice_unit, BackendKind, Change, DockerCgroupDriver, InstanceError, SliceBackend};
use crate::error::Kind;

/// Longest wait for a start/stop job of a slice.
pub const JOB_TIMEOUT: Duration = Duration::from_secs(30);

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
trait Manager {
    fn start_transient_unit(
        &self,
        name: &str,
        mode: &str,
        properties: &[(&str, Value<'_>)],
        aux: &[(&str, &[(&str, Value<'_>)])],
    ) -> zbus::Result<OwnedObjectPath>;

    fn start_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;

    fn set_unit_properties(
        &self,
        name: &str,
        runtime: bool,
        properties: &[(&str, Value<'_>)],
    ) -> zbus::Result<()>;

    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;

    fn get_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;

    #[allow(clippy::type_complexity)]
    fn list_units_by_patterns(
        &self,
        states: &[&str],
        patterns: &[&str],
    ) -> zbus::Result<
        Vec<(
            String,
            String,
            String,
            String,
            String,
            String,
            OwnedObjectPath,
            u32,
            String,
            OwnedObjectPath,
        )>,
    >;

    fn subscribe(&self) -> zbus::Result<()>;

    #[zbus(signal)]
    fn job_removed(
        &self,
        id: u32,
        job: zbus::zvariant::ObjectPath<'_>,
        unit: &str,
        result: &str,
    ) -> zbus::Result<()>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1"
)]
trait Unit {
    #[zbus(property)]
    fn active_state(&self) -> zbus::Result<String>;
}

/// Instances as transient systemd slices.
pub struct SystemdBackend {
    handle: tokio::runtime::Handle,
    /// Always `Some` until drop (taken there inside the runtime: dropping a proxy
    /// spawns a RemoveMatch task, which panics outside a tokio context).
    proxy: Option<ManagerProxy<'static>>,
    mounts: CgroupMounts,
    /// The state id put into the Description of every slice create makes.
    owner: Option<String>,
}

/// The Description of an instance slice made by the daemon of `state_id`.
pub fn description(name: &str, state_id: &str) -> String {
    format!("dindhelper instance {name} (state {state_id})")
}

/// The state id in a slice's Description (see [`description`]); None: not one of ours.
pub fn owner_of_description(desc: &str) -> Option<&str> {
    let rest = desc.strip_prefix("dindhelper instance ")?;
    let (_, id) = rest.rsplit_once(" (state ")?;
    id.strip_suffix(')')
}

/// The instance name of a unit `dind-<escaped name>.slice` (None for anything else, e.g.
/// `dind.slice` itself or a name that is no valid instance name).
pub fn instance_of_unit(unit: &str) -> Option<String> {
    let n = unit.strip_prefix("dind-")?.strip_suffix(".slice")?;
    let n = n.replace("\\x2d", "-");
    crate::names::check_instance_name(&n).ok()?;
    (super::slice_unit(&n) == unit).then_some(n)
}

impl Drop for SystemdBackend {
    fn drop(&mut self) {
        let _guard = self.handle.enter();
        drop(self.proxy.take());
    }
}

fn dbus_err(op: &'static str, unit: &str, e: zbus::Error) -> InstanceError {
    let (kind, message) = match &e {
        zbus::Error::MethodError(name, detail, _) => {
            let kind = match name.as_str() {
                "org.freedesktop.systemd1.NoSuchUnit" => Kind::NotFound,
                "org.freedesktop.systemd1.UnitExists" => Kind::Conflict,
                "org.freedesktop.DBus.Error.AccessDenied"
                | "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired" => {
                    Kind::NotAuthorized
                }
                "org.freedesktop.DBus.Error.InvalidArgs" => Kind::InvalidArgs,
                "org.freedesktop.DBus.Error.ServiceUnknown"
                | "org.freedesktop.DBus.Error.UnknownMethod" => Kind::NotSupported,
                _ => Kind::Failed,
            };
            (
                kind,
                format!("{}: {}", name.as_str(), detail.as_deref().unwrap_or("")),
            )
        }
        other => (Kind::Failed, other.to_string()),
    };
    InstanceError::Systemd {
        op,
        unit: unit.to_owned(),
        message,
        kind,
    }
}

fn is_method_error(e: &zbus::Error, name: &str) -> bool {
    matches!(e, zbus::Error::MethodError(n, _, _) if n.as_str() == name)
}

impl SystemdBackend {
    /// Connect to systemd on the system bus. `handle`: the tokio runtime that drives the
    /// connection; the blocking trait methods `block_on` it, so call them from a
    /// `spawn_blocking` thread or a plain thread, never from async code.
    pub fn connect_system(handle: tokio::runtime::Handle) -> Result<Self, InstanceError> {
        Self::connect(handle, None)
    }

    /// Connect to systemd's manager at a bus address (`None` = system bus), subscribe to
    /// its signals and check that it answers.
    pub fn connect(
        handle: tokio::runtime::Handle,
        address: Option<&str>,
    ) -> Result<Self, InstanceError> {
        let h = handle.clone();
        h.block_on(Self::connect_async(handle, address))
    }

    /// As [`SystemdBackend::connect`], for async code (the daemon's startup). The trait
    /// methods stay blocking: call them through `spawn_blocking`.
    pub async fn connect_async(
        handle: tokio::runtime::Handle,
        address: Option<&str>,
    ) -> Result<Self, InstanceError> {
        let mounts = CgroupMounts::detect()?;
        let conn = match address {
            None => zbus::Connection::system().await,
            Some(a) => match zbus::connection::Builder::address(a) {
                Ok(b) => b.build().await,
                Err(e) => Err(e),
            },
        }
        .map_err(|e| dbus_err("connect", "", e))?;
        let proxy = ManagerProxy::new(&conn)
            .await
            .map_err(|e| dbus_err("proxy", "", e))?;
        proxy
            .subscribe()
            .await
            .map_err(|e| dbus_err("Subscribe", "", e))?;
        Ok(SystemdBackend {
            handle,
            proxy: Some(proxy),
            mounts,
            owner: None,
        })
    }

    /// Put `state_id` into the Description of every slice this backend creates.
    pub fn with_owner(mut self, state_id: &str) -> Self {
        self.owner = Some(state_id.to_owned()).filter(|s| !s.is_empty());
        self
    }

    fn proxy(&self) -> &ManagerProxy<'static> {
        self.proxy.as_ref().expect("proxy is present until drop")
    }

    fn props(limits: &Limits) -> Vec<(&'static str, Value<'static>)> {
        limits
            .to_systemd_properties()
            .into_iter()
            .map(|p| (p.name, Value::U64(p.value)))
            .collect()
    }

    /// Run a job-returning call with the JobRemoved stream opened before it, and wait for
    /// the job's end. Ok(None) when `call` reported `NoSuchUnit` and `absent_ok`.
    async fn run_job<F, Fut>(
        &self,
        op: &'static str,
        unit: &str,
        call: F,
    ) -> Result<OwnedObjectPath, InstanceError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = zbus::Result<OwnedObjectPath>>,
    {
        let mut stream = self
            .proxy()
            .receive_job_removed()
            .await
            .map_err(|e| dbus_err("AddMatch JobRemoved", unit, e))?;
        let job = call().await.map_err(|e| dbus_err(op, unit, e))?;
        let wait = async {
            while let Some(sig) = stream.next().await {
                let Ok(args) = sig.args() else { continue };
                if args.job().as_str() == job.as_str() {
                    return Some(args.result().to_string());
                }
            }
            None
        };
        match tokio::time::timeout(JOB_TIMEOUT, wait).await {
            Ok(Some(r)) if r == "done" => Ok(job),
            Ok(Some(r)) => Err(InstanceError::Systemd {
                op,
                unit: unit.to_owned(),
                message: format!("job {} ended with result {r:?}", job.as_str()),
                kind: Kind::Failed,
            }),
            Ok(None) => Err(InstanceError::Systemd {
                op,
                unit: unit.to_owned(),
                message: "the bus connection closed while waiting for the job".into(),
                kind: Kind::Failed,
            }),
            Err(_) => Err(InstanceError::Timeout {
                what: format!("systemd job {} ({op} {unit})", job.as_str()),
                secs: JOB_TIMEOUT.as_secs(),
            }),
        }
    }

    fn remove_leftover_dirs(&self, dirs: &[PathBuf]) -> Result<(), InstanceError> {
        let mut errs = Vec::new();
        for d in dirs {
            if let Err(e) = cgroup::rmdir_tree(d) {
                errs.push(e);
            }
        }
        InstanceError::collect(errs)
    }

    fn cgroup_dirs(&self, name: &str) -> Vec<PathBuf> {
        let rel = self.cgroup_path(name);
        let mut mounts = self.mounts.v1_mount_points();
        mounts.extend(self.mounts.unified.clone());
        mounts
            .into_iter()
            .map(|m| m.join(rel.trim_start_matches('/')))
            .collect()
    }
}

impl SliceBackend for SystemdBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Systemd
    }

    fn create(&self, name: &str, limits: &Limits) -> Result<Change, InstanceError> {
        crate::names::check_instance_name(name)?;
        limits.validate(super::ncpu())?;
        let unit = slice_unit(name);
        let props = Self::props(limits);
        // The owner tag goes in with the unit itself (one call: no untagged moment).
        let mut start_props = props.clone();
        if let Some(id) = &self.owner {
            start_props.push(("Description", Value::from(description(name, id))));
        }
        self.handle.block_on(async {
            let started = self
                .run_job("StartTransientUnit", &unit, || {
                    let aux: &[(&str, &[(&str, Value<'_>)])] = &[];
                    self.proxy()
                        .start_transient_unit(&unit, "fail", &start_props, aux)
                })
                .await;
            match started {
                Ok(_) => Ok(Change::Done),
                Err(InstanceError::Systemd {
                    kind: Kind::Conflict,
                    ..
                }) => {
                    self.proxy()
                        .set_unit_properties(&unit, true, &props)
                        .await
                        .map_err(|e| dbus_err("SetUnitProperties", &unit, e))?;
                    self.run_job("StartUnit", &unit, || {
                        self.proxy().start_unit(&unit, "fail")
                    })
                    .await?;
                    Ok(Change::Unchanged)
                }
                Err(e) => Err(e),
            }
        })
    }

    fn set_limits(&self, name: &str, limits: &Limits) -> Result<(), InstanceError> {
        crate::names::check_instance_name(name)?;
        limits.validate(super::ncpu())?;
        if !self.exists(name)? {
            return Err(InstanceError::NotFound {
                name: name.to_owned(),
            });
        }
        let unit = slice_unit(name);
        let props = Self::props(limits);
        self.handle.block_on(async {
            self.proxy()
                .set_unit_properties(&unit, true, &props)
                .await
                .map_err(|e| dbus_err("SetUnitProperties", &unit, e))
        })
    }

    fn destroy(&self, name: &str, force: bool) -> Result<Change, InstanceError> {
        crate::names::check_instance_name(name)?;
        let dirs = self.cgroup_dirs(name);
        if !self.exists(name)? {
            // Stopped already; a forced destroy still clears stray leftovers.
            if force {
                cgroup::ensure_empty(name, &dirs, true)?;
                self.remove_leftover_dirs(&dirs)?;
            }
            return Ok(Change::Unchanged);
        }
        // Without force: Busy while anything runs. With force: SIGKILL everything first;
        // StopUnit alone would wait for each scope's stop timeout (90 s by default: a
        // container's PID 1 ignores SIGTERM) and leave stray processes (cgroupfs driver).
        cgroup::ensure_empty(name, &dirs, force)?;
        let unit = slice_unit(name);
        let stopped = self.handle.block_on(async {
            match self
                .run_job("StopUnit", &unit, || {
                    self.proxy().stop_unit(&unit, "replace")
                })
                .await
            {
                Ok(_) => Ok(Change::Done),
                Err(InstanceError::Systemd {
                    kind: Kind::NotFound,
                    ..
                }) => Ok(Change::Unchanged),
                Err(e) => Err(e),
            }
        })?;
        // Cgroups that no unit owns (made by runc for docker's cgroupfs driver) stay
        // behind after the stop: remove them (empty now).
        if force {
            self.remove_leftover_dirs(&dirs)?;
        }
        Ok(stopped)
    }

    fn exists(&self, name: &str) -> Result<bool, InstanceError> {
        crate::names::check_instance_name(name)?;
        let unit = slice_unit(name);
        self.handle.block_on(async {
            let path = match self.proxy().get_unit(&unit).await {
                Ok(p) => p,
                Err(e) if is_method_error(&e, "org.freedesktop.systemd1.NoSuchUnit") => {
                    return Ok(false)
                }
                Err(e) => return Err(dbus_err("GetUnit", &unit, e)),
            };
            // A stopped unit can stay loaded (e.g. while a failed unit in it is remembered).
            let u = UnitProxy::builder(self.proxy().inner().connection())
                .path(path)
                .map_err(|e| dbus_err("Unit proxy", &unit, e))?
                .cache_properties(zbus::proxy::CacheProperties::No)
                .build()
                .await
                .map_err(|e| dbus_err("Unit proxy", &unit, e))?;
            let state = u
                .active_state()
                .await
                .map_err(|e| dbus_err("Get ActiveState", &unit, e))?;
            Ok(matches!(
                state.as_str(),
                "active" | "activating" | "reloading"
            ))
        })
    }

    fn cgroup_path(&self, name: &str) -> String {
        format!("/dind.slice/{}", slice_unit(name))
    }

    fn cgroup_parent(
        &self,
        name: &str,
        driver: DockerCgroupDriver,
    ) -> Result<String, InstanceError> {
        Ok(match driver {
            DockerCgroupDriver::Systemd => slice_unit(name),
            DockerCgroupDriver::Cgroupfs => self.cgroup_path(name),
        })
    }

    fn owner_tag(&self) -> Option<&str> {
        self.owner.as_deref()
    }

    fn present(&self) -> Result<Vec<super::Present>, InstanceError> {
        let units = self.handle.block_on(async {
            self.proxy()
                .list_units_by_patterns(&[], &["dind-*.slice"])
                .await
                .map_err(|e| dbus_err("ListUnitsByPatterns", "dind-*.slice", e))
        })?;
        let mut out = Vec::new();
        for u in units {
            let (unit, desc, active) = (&u.0, &u.1, &u.3);
            if !matches!(active.as_str(), "active" | "activating" | "reloading") {
                continue;
            }
            let Some(name) = instance_of_unit(unit) else {
                continue;
            };
            let owner = match owner_of_description(desc) {
                Some(id) => super::tag::Owner::Tagged(id.to_owned()),
                None => super::tag::Owner::Untagged,
            };
            out.push(super::Present { name, owner });
        }
        Ok(out)
    }

    fn remove_leftover(&self, name: &str, untagged_too: bool) -> Result<Change, InstanceError> {
        crate::names::check_instance_name(name)?;
        let Some(p) = self.present()?.into_iter().find(|p| p.name == name) else {
            return Ok(Change::Unchanged);
        };
        let ours = match &p.owner {
            super::tag::Owner::Tagged(t) => Some(t.as_str()) == self.owner.as_deref(),
            super::tag::Owner::Untagged => untagged_too,
        };
        if !ours {
            return Err(InstanceError::Foreign {
                name: name.to_owned(),
                what: slice_unit(name),
                owner: match p.owner {
                    super::tag::Owner::Tagged(t) => t,
                    super::tag::Owner::Untagged => "untagged".into(),
                },
            });
        }
        self.destroy(name, false)
    }

    /// systemd tracks its units on the unified hierarchy whenever one is mounted (hybrid
    /// and unified layouts; inside a container the v1 controllers may even be read-only
    /// and unused), so `/proc/<pid>/cgroup` is judged on the `0::` line then.
    fn v1_layout(&self) -> bool {
        self.mounts.unified.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn description_carries_the_state_id() {
        let d = description("lab-1", "0a1b2c");
        assert_eq!(d, "dindhelper instance lab-1 (state 0a1b2c)");
        assert_eq!(owner_of_description(&d), Some("0a1b2c"));
        assert_eq!(owner_of_description("Slice /dind/lab-1"), None);
        assert_eq!(owner_of_description("dind-lab.slice"), None);
    }

    #[test]
    fn unit_names_map_back_to_instances() {
        assert_eq!(instance_of_unit("dind-lab.slice").as_deref(), Some("lab"));
        assert_eq!(
            instance_of_unit(&slice_unit("lab-1")).as_deref(),
            Some("lab-1")
        );
        // Not an escaped instance name: a sub-slice of instance "lab", or dind.slice.
        assert_eq!(instance_of_unit("dind-lab-1.slice"), None);
        assert_eq!(instance_of_unit("dind.slice"), None);
        assert_eq!(instance_of_unit("dind-A.slice"), None);
    }
}
