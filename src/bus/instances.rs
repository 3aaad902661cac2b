//! `org.dindhelper1.Instances` at `/org/dindhelper1` (beside the Manager interface) and one
//! `org.dindhelper1.Instance` object per instance at `/org/dindhelper1/instance/<name>`
//! (name escaped like systemd's bus labels). Each method: authorize (polkit action
//! `org.dindhelper1.instances`, plus `-others` when the instance belongs to another uid),
//! convert, call one `ops::instances` function, (re)export the object, map the error.
//!
//! Limits travel as `a{sv}` with the knobs of `instances::limits::KNOBS`, any integer
//! type; a negative or out-of-range value is InvalidArgs naming the knob. In SetLimits a
//! knob given as the string `"default"` is reset (no limit / kernel default).

use super::auth::{Action, Authorizer, Caller, Details};
use super::error::BusError;
use super::objects::{escape_label, image_path, loop_path, ImageObject, LoopObject};
use super::options::{describe, interactive, Options, Opts};
use crate::instances::limits::KNOBS;
use crate::instances::{DockerCgroupDriver, Limits};
use crate::ops::{self, instances::LimitsUpdate, Core};
use crate::state::InstanceRecord;
use std::collections::HashMap;
use std::sync::Arc;
use zbus::interface;
use zbus::message::Header;
use zbus::object_server::ObjectServer;
use zbus::zvariant::{OwnedObjectPath, OwnedValue, Value};

pub struct Instances {
    pub core: Arc<Core>,
    pub auth: Arc<Authorizer>,
    /// Shared with the Manager: shutdown waits for calls in flight.
    pub gate: Arc<tokio::sync::RwLock<()>>,
    /// Captures and ports of an instance, cleared by DestroyInstance.
    pub teardown: ops::instances::Teardown,
}

pub fn instance_path(name: &str) -> OwnedObjectPath {
    OwnedObjectPath::try_from(format!("/org/dindhelper1/instance/{}", escape_label(name)))
        .expect("valid path")
}

fn int_of(v: &Value<'_>) -> Option<i128> {
    Some(match v {
        Value::U8(n) => *n as i128,
        Value::U16(n) => *n as i128,
        Value::U32(n) => *n as i128,
        Value::U64(n) => *n as i128,
        Value::I16(n) => *n as i128,
        Value::I32(n) => *n as i128,
        Value::I64(n) => *n as i128,
        _ => return None,
    })
}

/// Read the limit knobs of an `a{sv}` (marking them known to `o`). `allow_reset`: a knob
/// given as the string "default" is reset.
pub fn read_limits(o: &mut Opts<'_>, allow_reset: bool) -> Result<LimitsUpdate, BusError> {
    let mut upd = LimitsUpdate::default();
    for knob in KNOBS {
        let Some(v) = o.value(knob) else { continue };
        match (int_of(v), v) {
            (Some(n), _) => upd.set.set(knob, n).map_err(BusError::map)?,
            (None, Value::Str(s)) if allow_reset && s.as_str() == "default" => {
                upd.reset.push((*knob).to_owned())
            }
            (None, v) => {
                return Err(BusError::InvalidArgs(format!(
                    "limit {knob:?} must be an integer{}, got type {}",
                    if allow_reset { " or \"default\"" } else { "" },
                    v.value_signature()
                )))
            }
        }
    }
    Ok(upd)
}

/// Limits as `a{sv}`: only the knobs that are set (`u` for cpu_quota_percent, `i` for
/// oom_score_adj, `t` for the rest).
pub fn limits_dict(l: &Limits) -> HashMap<String, OwnedValue> {
    let mut m = HashMap::new();
    let mut put = |k: &str, v: Value<'static>| {
        m.insert(
            k.to_owned(),
            OwnedValue::try_from(v).expect("plain values convert"),
        );
    };
    if let Some(v) = l.cpu_quota_percent {
        put("cpu_quota_percent", Value::U32(v));
    }
    for (k, v) in [
        ("cpu_weight", l.cpu_weight),
        ("memory_max", l.memory_max),
        ("memory_high", l.memory_high),
        ("memory_swap_max", l.memory_swap_max),
        ("tasks_max", l.tasks_max),
        ("io_weight", l.io_weight),
    ] {
        if let Some(v) = v {
            put(k, Value::U64(v));
        }
    }
    if let Some(v) = l.oom_score_adj {
        put("oom_score_adj", Value::I32(v));
    }
    m
}

/// A negative oom_score_adj makes the instance's processes the last the OOM killer picks
/// (-1000: never): the kernel reserves lowering it for CAP_SYS_RESOURCE, so the daemon
/// asks `org.dindhelper1.instances-oom-protect` on top of `instances`.
async fn oom_protect_check(
    auth: &Authorizer,
    hdr: &Header<'_>,
    caller: &Caller,
    oom_score_adj: Option<i32>,
    inter: bool,
    details: &Details,
) -> Result<(), BusError> {
    match oom_score_adj {
        Some(v) if v < 0 => {
            auth.check_with(
                hdr,
                caller,
                Action::InstancesOomProtect,
                false,
                inter,
                details,
            )
            .await
        }
        _ => Ok(()),
    }
}

fn driver_option(o: &mut Opts<'_>) -> Result<Option<DockerCgroupDriver>, BusError> {
    match o.string("docker_cgroup_driver")?.as_deref() {
        None => Ok(None),
        Some("cgroupfs") => Ok(Some(DockerCgroupDriver::Cgroupfs)),
        Some("systemd") => Ok(Some(DockerCgroupDriver::Systemd)),
        Some(other) => Err(BusError::InvalidArgs(format!(
            "option docker_cgroup_driver must be \"cgroupfs\" or \"systemd\", got {other:?}"
        ))),
    }
}

/// One row of ListInstances: object, name, slice unit, cgroup parent, owner uid, limits.
pub type InstanceRow = (
    OwnedObjectPath,
    String,
    String,
    String,
    u32,
    HashMap<String, OwnedValue>,
);

impl Instances {
    async fn publish(&self, server: &ObjectServer, name: &str) {
        let path = instance_path(name);
        let _ = server.remove::<InstanceObject, _>(&path).await;
        if let Ok(rec) = ops::instances::get(&self.core, name).await {
            let backend = self
                .core
                .instances
                .backend_kind()
                .map(|k| {
                    serde_json::to_value(k)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default()
                })
                .unwrap_or_default();
            if let Err(e) = server
                .at(
                    &path,
                    InstanceObject {
                        rec,
                        backend,
                        auth: self.auth.clone(),
                    },
                )
                .await
            {
                tracing::error!(error = %e, %path, "cannot export instance object");
            }
        }
    }

    /// Export every instance in state (at start).
    pub async fn publish_all(&self, server: &ObjectServer) {
        for i in ops::instances::list(&self.core).await {
            self.publish(server, &i.instance.name).await;
        }
    }

    /// The base action, then `-others` when the instance belongs to another uid. An
    /// instance without record: NotFound when nothing of it is left; leftovers that are
    /// only the caller's loop devices need no more; a slice/cgroup without record (or
    /// devices of other uids) needs `-others`.
    async fn authorize(
        &self,
        hdr: &Header<'_>,
        caller: &Caller,
        name: &str,
        inter: bool,
        leftovers_ok: bool,
    ) -> Result<(), BusError> {
        self.auth
            .check_caller(hdr, caller, Action::Instances, false, inter)
            .await?;
        crate::names::check_instance_name(name).map_err(BusError::map)?;
        let owner = match ops::instances::get(&self.core, name).await {
            Ok(r) => r.owner_uid,
            Err(e) if !leftovers_ok => return Err(BusError::map(e)),
            Err(e) => match ops::instances::leftover_owner(&self.core, name).await {
                None => return Err(BusError::map(e)),
                Some(Some(uid)) => uid,
                Some(None) => u32::MAX,
            },
        };
        if owner != caller.uid {
            let details: Details = vec![
                ("instance", name.to_owned()),
                ("instance_owner", owner.to_string()),
            ];
            self.auth
                .check_with(hdr, caller, Action::Instances, true, inter, &details)
                .await?;
        }
        Ok(())
    }
}

#[interface(name = "org.dindhelper1.Instances")]
impl Instances {
    /// Create instance `name` (`[a-z0-9-]{1,48}`) with the limits in `limits_and_options`
    /// (plus options `docker_cgroup_driver` s, `interactive` b). Returns the instance
    /// object, its slice unit and the value for the docker run option `cgroup-parent`.
    /// (No double dash in these doc comments: zbus puts them in XML comments.)
    #[zbus(out_args("instance", "slice_unit", "cgroup_parent"))]
    async fn create_instance(
        &self,
        name: String,
        limits_and_options: Options,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<(OwnedObjectPath, String, String), BusError> {
        let args = format!("{name} {}", describe(&limits_and_options)).to_string();
        let hdr = &hdr;
        super::audited(
            &self.auth,
            &self.gate,
            hdr,
            "CreateInstance",
            &args,
            |caller| async move {
                let options = &limits_and_options;
                let mut o = Opts::new(options);
                let limits = read_limits(&mut o, false)?.set;
                let driver = driver_option(&mut o)?;
                let inter = interactive(options)?;
                o.finish()?;
                let details: Details = vec![("instance", name.clone())];
                self.auth
                    .check_with(hdr, &caller, Action::Instances, false, inter, &details)
                    .await?;
                oom_protect_check(
                    &self.auth,
                    hdr,
                    &caller,
                    limits.oom_score_adj,
                    inter,
                    &details,
                )
                .await?;
                let exempt = crate::config::quota_exempt(caller.uid, caller.uid);
                let rec = ops::instances::create_limited(
                    &self.core, caller.uid, &name, limits, driver, exempt,
                )
                .await
                .map_err(BusError::map)?;
                self.publish(server, &name).await;
                Ok((
                    instance_path(&name),
                    rec.instance.slice_unit,
                    rec.instance.cgroup_parent,
                ))
            },
        )
        .await
    }

    /// Change limits live: named knobs are set, a knob given as "default" is reset, the
    /// others keep their value.
    async fn set_limits(
        &self,
        name: String,
        limits: Options,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<(), BusError> {
        let args = format!("{name} {}", describe(&limits)).to_string();
        let hdr = &hdr;
        super::audited(
            &self.auth,
            &self.gate,
            hdr,
            "SetLimits",
            &args,
            |caller| async move {
                let mut o = Opts::new(&limits);
                let upd = read_limits(&mut o, true)?;
                let inter = interactive(&limits)?;
                o.finish()?;
                self.authorize(hdr, &caller, &name, inter, false).await?;
                let details: Details = vec![("instance", name.clone())];
                oom_protect_check(
                    &self.auth,
                    hdr,
                    &caller,
                    upd.set.oom_score_adj,
                    inter,
                    &details,
                )
                .await?;
                ops::instances::set_limits(&self.core, &name, &upd)
                    .await
                    .map_err(BusError::map)?;
                self.publish(server, &name).await;
                Ok(())
            },
        )
        .await
    }

    /// Instances: object, name, slice unit, cgroup parent, owner uid, limits. Callers
    /// outside the provisioning group get their own instances only.
    async fn list_instances(
        &self,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<Vec<InstanceRow>, BusError> {
        let who = self.auth.viewer(&hdr).await?;
        Ok(ops::instances::list(&self.core)
            .await
            .into_iter()
            .filter(|r| who.sees(r.owner_uid))
            .map(|r| {
                (
                    instance_path(&r.instance.name),
                    r.instance.name.clone(),
                    r.instance.slice_unit.clone(),
                    r.instance.cgroup_parent.clone(),
                    r.owner_uid,
                    limits_dict(&r.instance.limits),
                )
            })
            .collect())
    }

    /// Check that `container` (Docker name or id, or `pid:N`) runs inside the instance
    /// (else Conflict naming the docker run option `cgroup-parent` to use) and give every process of it
    /// the instance's oom_score_adj. Returns the container id, its cgroup, the adjusted
    /// pids and the value.
    #[zbus(out_args("container_id", "cgroup", "pids", "oom_score_adj"))]
    async fn adopt_container(
        &self,
        name: String,
        container: String,
        options: Options,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<(String, String, Vec<u32>, i32), BusError> {
        let args = format!("{name} {container}").to_string();
        let hdr = &hdr;
        super::audited(
            &self.auth,
            &self.gate,
            hdr,
            "AdoptContainer",
            &args,
            |caller| async move {
                let inter = interactive(&options)?;
                Opts::new(&options).finish()?;
                self.authorize(hdr, &caller, &name, inter, false).await?;
                // Owned targets: adopting a container that is in another uid's instance, or
                // in none, needs instances-others (the provisioning group adopts for tenants).
                let id = super::authorize_container(
                    &self.auth,
                    &self.core,
                    hdr,
                    &caller,
                    Action::Instances,
                    &container,
                    inter,
                    vec![("instance", name.clone())],
                )
                .await?;
                let (id, a) = ops::instances::adopt(&self.core, &name, &id)
                    .await
                    .map_err(BusError::map)?;
                self.publish(server, &name).await;
                Ok((id, a.cgroup, a.pids, a.oom_score_adj))
            },
        )
        .await
    }

    /// Tear the instance down (its loop devices; with `delete_images` b their images;
    /// its slice, `force` b kills processes still inside). Returns what it did; on
    /// failure the error lists what was done and every failure.
    async fn destroy_instance(
        &self,
        name: String,
        options: Options,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<Vec<String>, BusError> {
        let args = format!("{name} {}", describe(&options)).to_string();
        let hdr = &hdr;
        super::audited(
            &self.auth,
            &self.gate,
            hdr,
            "DestroyInstance",
            &args,
            |caller| async move {
                let mut o = Opts::new(&options);
                let opts = ops::instances::DestroyOptions {
                    delete_images: o.bool("delete_images")?.unwrap_or(false),
                    force: o.bool("force")?.unwrap_or(false),
                };
                let inter = interactive(&options)?;
                o.finish()?;
                self.authorize(hdr, &caller, &name, inter, true).await?;
                let before = {
                    let st = self.core.state.lock().await;
                    let loops: Vec<_> = st
                        .loops
                        .iter()
                        .filter(|l| l.instance.as_deref() == Some(name.as_str()))
                        .map(|l| (l.number, l.image.clone()))
                        .collect();
                    loops
                };
                let r = ops::instances::destroy(&self.core, &name, opts, &self.teardown).await;
                // Drop the objects of detached devices and deleted images, refresh the rest.
                {
                    let st = self.core.state.lock().await.clone();
                    for (n, img) in &before {
                        if !st.loops.iter().any(|l| l.number == *n) {
                            let _ = server.remove::<LoopObject, _>(&loop_path(*n)).await;
                        }
                        if let Some((uid, img)) = img {
                            if !st
                                .images
                                .iter()
                                .any(|i| i.owner_uid == *uid && &i.name == img)
                            {
                                let _ = server
                                    .remove::<ImageObject, _>(&image_path(*uid, img))
                                    .await;
                            }
                        }
                    }
                }
                let m = super::manager::Manager {
                    core: self.core.clone(),
                    auth: self.auth.clone(),
                    gate: self.gate.clone(),
                };
                m.publish_all(server).await;
                self.publish(server, &name).await;
                r.map_err(BusError::map)
            },
        )
        .await
    }
}

/// One instance, read-only.
pub struct InstanceObject {
    pub rec: InstanceRecord,
    pub backend: String,
    /// Every getter is owner-only (see [`super::visibility`]).
    pub auth: Arc<Authorizer>,
}

impl InstanceObject {
    async fn shown(&self, hdr: Option<&Header<'_>>) -> zbus::fdo::Result<()> {
        super::visibility::owner_only(&self.auth, hdr, self.rec.owner_uid).await
    }
}

#[interface(name = "org.dindhelper1.Instance")]
impl InstanceObject {
    #[zbus(property)]
    async fn name(&self, #[zbus(header)] hdr: Option<Header<'_>>) -> zbus::fdo::Result<String> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.rec.instance.name.clone())
    }
    /// `dind-<name>.slice` (dashes escaped); the systemd unit with the systemd backend.
    #[zbus(property)]
    async fn slice_unit(
        &self,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<String> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.rec.instance.slice_unit.clone())
    }
    /// The value for the docker run option `cgroup-parent`.
    #[zbus(property)]
    async fn cgroup_parent(
        &self,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<String> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.rec.instance.cgroup_parent.clone())
    }
    /// The knobs that are set (a{sv}).
    #[zbus(property)]
    async fn limits(
        &self,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<HashMap<String, OwnedValue>> {
        self.shown(hdr.as_ref()).await?;
        Ok(limits_dict(&self.rec.instance.limits))
    }
    /// The oom_score_adj adopted containers get (default +500).
    #[zbus(property)]
    async fn oom_score_adj(
        &self,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<i32> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.rec.instance.limits.effective_oom_score_adj())
    }
    #[zbus(property)]
    async fn owner_uid(&self, #[zbus(header)] hdr: Option<Header<'_>>) -> zbus::fdo::Result<u32> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.rec.owner_uid)
    }
    /// Adopted containers (Docker ids, or `pid:N`).
    #[zbus(property)]
    async fn containers(
        &self,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<Vec<String>> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.rec.containers.clone())
    }
    /// `systemd`, `cgroupfs-v2` or `cgroupfs-v1`.
    #[zbus(property)]
    async fn backend(&self, #[zbus(header)] hdr: Option<Header<'_>>) -> zbus::fdo::Result<String> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.backend.clone())
    }
    /// Seconds since the Unix epoch.
    #[zbus(property)]
    async fn created_at(&self, #[zbus(header)] hdr: Option<Header<'_>>) -> zbus::fdo::Result<u64> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.rec.instance.created_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, Value<'static>)]) -> Options {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OwnedValue::try_from(v.clone()).unwrap()))
            .collect()
    }

    #[test]
    fn limits_from_any_integer_type_and_named_errors() {
        let m = opts(&[
            ("cpu_quota_percent", Value::I32(50)),
            ("memory_max", Value::U64(1 << 30)),
            ("tasks_max", Value::U32(100)),
            ("oom_score_adj", Value::I32(-10)),
        ]);
        let mut o = Opts::new(&m);
        let u = read_limits(&mut o, false).unwrap();
        assert!(o.finish().is_ok());
        assert_eq!(u.set.cpu_quota_percent, Some(50));
        assert_eq!(u.set.memory_max, Some(1 << 30));
        assert_eq!(u.set.oom_score_adj, Some(-10));
        let d = limits_dict(&u.set);
        assert_eq!(d.len(), 4);

        let m = opts(&[("memory_max", Value::I64(-1))]);
        let e = read_limits(&mut Opts::new(&m), false).unwrap_err();
        assert!(
            matches!(e, BusError::InvalidArgs(ref s) if s.contains("memory_max") && s.contains("negative")),
            "{e:?}"
        );

        let m = opts(&[("tasks_max", Value::from("default"))]);
        assert!(read_limits(&mut Opts::new(&m), false).is_err());
        let u = read_limits(&mut Opts::new(&m), true).unwrap();
        assert_eq!(u.reset, vec!["tasks_max".to_owned()]);

        let m = opts(&[("memroy_max", Value::U64(1))]);
        let mut o = Opts::new(&m);
        read_limits(&mut o, false).unwrap();
        assert!(matches!(o.finish(), Err(BusError::InvalidArgs(s)) if s.contains("memroy_max")));
    }

    #[test]
    fn instance_paths_are_escaped() {
        assert_eq!(
            instance_path("lab-1").as_str(),
            "/org/dindhelper1/instance/lab_2d1"
        );
    }
}
