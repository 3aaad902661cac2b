//! DinD instances: create / set limits / adopt a container / destroy, with the state
//! bookkeeping around the domain's [`SliceBackend`] (see `crate::instances`).
//!
//! - The backend is picked once at start ([`crate::instances::pick_backend_async`]); when
//!   none works (no cgroup filesystem), every instance call answers NotSupported with the
//!   reason, and the rest of the daemon serves normally.
//! - dockerd's cgroup driver decides the `--cgroup-parent` value: the config's
//!   `docker_cgroup_driver`, else `systemd` with the systemd backend and `cgroupfs`
//!   otherwise; CreateInstance may override it per instance (option `docker_cgroup_driver`).
//! - A record is written only after the slice/cgroup exists; a failed save removes the
//!   slice again (a failed rollback reports both errors).
//! - SetLimits merges: knobs not named keep their value; a reset is explicit.
//! - Destroy never stops at the first failure and returns what it did; the record goes
//!   only when every step succeeded, so a retry (e.g. with `force`) finds it.
//! - Containers are resolved to (id, main pid): `pid:N` is handled here; names/ids go to
//!   the daemon's one resolver ([`super::containers`], pid pinned by start time). A stopped
//!   container is Conflict here ("start it first"), as for Publish.

use super::{blocking, Core, OpsError};
use crate::error::Kind;
use crate::instances::{
    self, BackendKind, Change, DockerCgroupDriver, Instance, Limits, SliceBackend,
};
use crate::state::{self, InstanceRecord, State};
use std::sync::Arc;

/// A container resolved to its Docker id (or `pid:N`) and the pid of its main process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedContainer {
    pub id: String,
    pub pid: u32,
}

/// What the instance operations need besides the state: the slice backend (or why there
/// is none) and the configured docker cgroup driver. (Containers resolve through
/// `Core::containers`.)
pub struct InstanceCtx {
    backend: Result<Arc<dyn SliceBackend>, String>,
    driver: Option<DockerCgroupDriver>,
}

impl InstanceCtx {
    pub fn new(
        backend: Result<Arc<dyn SliceBackend>, String>,
        driver: Option<DockerCgroupDriver>,
    ) -> Self {
        InstanceCtx { backend, driver }
    }

    pub fn backend(&self) -> Result<Arc<dyn SliceBackend>, OpsError> {
        self.backend.clone().map_err(|why| OpsError::NotSupported {
            what: "instances (no cgroup/slice backend)".into(),
            why,
        })
    }

    pub fn backend_kind(&self) -> Option<BackendKind> {
        self.backend.as_ref().ok().map(|b| b.kind())
    }

    /// The driver to use when the caller names none.
    pub fn default_driver(&self) -> DockerCgroupDriver {
        default_driver(self.driver, self.backend_kind())
    }
}

/// Config first; else systemd with the systemd backend, cgroupfs otherwise.
pub fn default_driver(
    configured: Option<DockerCgroupDriver>,
    backend: Option<BackendKind>,
) -> DockerCgroupDriver {
    configured.unwrap_or(match backend {
        Some(BackendKind::Systemd) => DockerCgroupDriver::Systemd,
        _ => DockerCgroupDriver::Cgroupfs,
    })
}

/// A partial limits update: knobs to set, knobs to reset to the default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LimitsUpdate {
    pub set: Limits,
    pub reset: Vec<String>,
}

/// The limits after `upd`: named knobs replaced, reset knobs `None`, others kept.
pub fn merge_limits(old: &Limits, upd: &LimitsUpdate) -> Result<Limits, OpsError> {
    let mut l = old.clone();
    macro_rules! take {
        ($($f:ident),*) => {$(
            if upd.set.$f.is_some() { l.$f = upd.set.$f; }
        )*};
    }
    take!(
        cpu_quota_percent,
        cpu_weight,
        memory_max,
        memory_high,
        memory_swap_max,
        tasks_max,
        io_weight,
        oom_score_adj
    );
    for k in &upd.reset {
        match k.as_str() {
            "cpu_quota_percent" => l.cpu_quota_percent = None,
            "cpu_weight" => l.cpu_weight = None,
            "memory_max" => l.memory_max = None,
            "memory_high" => l.memory_high = None,
            "memory_swap_max" => l.memory_swap_max = None,
            "tasks_max" => l.tasks_max = None,
            "io_weight" => l.io_weight = None,
            "oom_score_adj" => l.oom_score_adj = None,
            other => {
                return Err(OpsError::Invalid(format!(
                    "unknown limit {other:?}; known: {}",
                    instances::limits::KNOBS.join(", ")
                )))
            }
        }
    }
    Ok(l)
}

fn find<'a>(st: &'a State, name: &str) -> Option<&'a InstanceRecord> {
    st.instances.iter().find(|i| i.instance.name == name)
}

fn not_found(name: &str) -> OpsError {
    OpsError::NotFound {
        what: "instance",
        name: name.to_owned(),
    }
}

pub async fn get(core: &Core, name: &str) -> Result<InstanceRecord, OpsError> {
    let st = core.state.lock().await;
    find(&st, name).cloned().ok_or_else(|| not_found(name))
}

pub async fn list(core: &Core) -> Vec<InstanceRecord> {
    core.state.lock().await.instances.clone()
}

/// Create the instance's slice/cgroup with `limits` and record it for `owner_uid`.
/// Conflict when it is recorded already, or when its slice/cgroup exists on the host
/// without a record (another tool's, or a leftover: DestroyInstance removes it).
pub async fn create(
    core: &Arc<Core>,
    owner_uid: u32,
    name: &str,
    limits: Limits,
    driver: Option<DockerCgroupDriver>,
) -> Result<InstanceRecord, OpsError> {
    create_limited(core, owner_uid, name, limits, driver, owner_uid == 0).await
}

/// [`create`] with the per-uid limit `max_instances_per_uid` checked under the state lock
/// unless `exempt` (root acting for uid 0, see `config::quota_exempt`).
pub async fn create_limited(
    core: &Arc<Core>,
    owner_uid: u32,
    name: &str,
    limits: Limits,
    driver: Option<DockerCgroupDriver>,
    exempt: bool,
) -> Result<InstanceRecord, OpsError> {
    crate::names::check_instance_name(name)?;
    let backend = core.instances.backend()?;
    let driver = driver.unwrap_or_else(|| core.instances.default_driver());
    let inst = Instance::new(name, limits, &*backend, driver)?;
    let mut st = core.state.lock().await;
    if find(&st, name).is_some() {
        return Err(OpsError::Conflict {
            what: format!("instance {name:?}"),
            why: "exists already (SetLimits changes its limits)".into(),
        });
    }
    let owned = st
        .instances
        .iter()
        .filter(|i| i.owner_uid == owner_uid)
        .count();
    if !exempt && owned >= core.cfg.max_instances_per_uid {
        return Err(OpsError::Limit(format!(
            "uid {owner_uid} already owns {owned} instances (max_instances_per_uid = {})",
            core.cfg.max_instances_per_uid
        )));
    }
    let (b, n) = (backend.clone(), name.to_owned());
    if blocking(move || Ok(b.exists(&n)?)).await? {
        return Err(OpsError::Conflict {
            what: format!("instance {name:?}"),
            why: format!(
                "its cgroup {} exists on the host but dindhelper has no record of it; \
                 DestroyInstance removes the leftover",
                backend.cgroup_path(name)
            ),
        });
    }
    // Intent first: the cgroupfs backend tags each directory right after its mkdir, and a
    // kill in between would leave an untagged one that only this intent claims.
    let intent = super::intent::begin(core.store.dir(), INTENT, name)?;
    let (b, n, l) = (backend.clone(), name.to_owned(), inst.limits.clone());
    if let Err(e) = blocking(move || Ok(b.create(&n, &l)?)).await {
        // The backend rolled back what it made (a failed rollback is in `e`; then the
        // intent stays and the next start removes what is left).
        if !matches!(&e, OpsError::Instance(instances::InstanceError::Many(_))) {
            intent.done();
        }
        return Err(e);
    }
    let rec = InstanceRecord {
        instance: inst,
        owner_uid,
        containers: Vec::new(),
    };
    st.instances.push(rec.clone());
    if let Err(e) = core.record(&st, &[state::Change::Instance(rec.clone())]) {
        st.instances.retain(|i| i.instance.name != name);
        let (b, n) = (backend.clone(), name.to_owned());
        if let Err(e2) = blocking(move || Ok(b.destroy(&n, true)?)).await {
            tracing::error!(error = %e2, instance = name, "rollback of instance creation failed");
            return Err(OpsError::Teardown {
                done: Vec::new(),
                errors: vec![e, e2],
            });
        }
        intent.done();
        return Err(e);
    }
    intent.done();
    Ok(rec)
}

/// Intent kind of CreateInstance (see `ops::intent`).
const INTENT: &str = "instance";

/// Merge `upd` into the instance's limits and apply them live. When oom_score_adj
/// changes, the adopted containers get the new value (best effort, logged).
pub async fn set_limits(
    core: &Arc<Core>,
    name: &str,
    upd: &LimitsUpdate,
) -> Result<InstanceRecord, OpsError> {
    crate::names::check_instance_name(name)?;
    let backend = core.instances.backend()?;
    let mut st = core.state.lock().await;
    let old = find(&st, name).cloned().ok_or_else(|| not_found(name))?;
    let new = merge_limits(&old.instance.limits, upd)?;
    new.validate(instances::ncpu())
        .map_err(instances::InstanceError::from)?;
    let (b, n, l) = (backend.clone(), name.to_owned(), new.clone());
    // Recorded but gone underneath (systemd restarted and dropped the transient slice,
    // the cgroup was removed by hand): make it again with the new limits.
    blocking(move || match b.set_limits(&n, &l) {
        Err(instances::InstanceError::NotFound { .. }) => {
            tracing::warn!(instance = %n, "slice/cgroup was gone: recreated with the new limits");
            b.create(&n, &l).map(|_| ()).map_err(OpsError::from)
        }
        r => r.map_err(OpsError::from),
    })
    .await?;
    let rec = st
        .instances
        .iter_mut()
        .find(|i| i.instance.name == name)
        .expect("found above");
    rec.instance.limits = new.clone();
    let rec = rec.clone();
    if let Err(e) = core.record(&st, &[state::Change::Instance(rec.clone())]) {
        if let Some(r) = st.instances.iter_mut().find(|i| i.instance.name == name) {
            r.instance.limits = old.instance.limits.clone();
        }
        let (b, n, l) = (
            backend.clone(),
            name.to_owned(),
            old.instance.limits.clone(),
        );
        if let Err(e2) = blocking(move || Ok(b.set_limits(&n, &l)?)).await {
            return Err(OpsError::Teardown {
                done: Vec::new(),
                errors: vec![e, e2],
            });
        }
        return Err(e);
    }
    drop(st);
    if new.effective_oom_score_adj() != old.instance.limits.effective_oom_score_adj() {
        for c in &rec.containers {
            match adopt_resolved(core, &backend, &rec, c).await {
                Ok(a) => tracing::info!(instance = name, container = %c, pids = ?a.1.pids,
                    oom_score_adj = a.1.oom_score_adj, "oom_score_adj re-applied"),
                Err(e) => tracing::warn!(instance = name, container = %c, error = %e,
                    "cannot re-apply oom_score_adj (container gone or restarted?)"),
            }
        }
    }
    Ok(rec)
}

/// Parse `pid:N`.
fn parse_pid_ref(container: &str) -> Option<Result<u32, OpsError>> {
    let n = container.strip_prefix("pid:")?;
    Some(
        n.parse::<u32>()
            .ok()
            .filter(|p| *p > 1)
            .ok_or_else(|| OpsError::Invalid(format!("{container:?}: pid:N needs a pid > 1"))),
    )
}

/// Resolve a container reference (Docker name/id, or `pid:N`) the way AdoptContainer does;
/// the bus layer uses it to find who owns a target before acting on it.
pub async fn resolve_container(
    core: &Core,
    container: &str,
) -> Result<ResolvedContainer, OpsError> {
    resolve(core, container).await
}

async fn resolve(core: &Core, container: &str) -> Result<ResolvedContainer, OpsError> {
    match parse_pid_ref(container) {
        Some(p) => {
            let pid = p?;
            Ok(ResolvedContainer {
                id: format!("pid:{pid}"),
                pid,
            })
        }
        None => {
            use super::containers::ContainerError;
            let c = core
                .containers
                .resolve(container)
                .await
                .map_err(|e| match e {
                    ContainerError::BadRef(_) => OpsError::Invalid(format!(
                        "container {container:?}: expected a Docker name or id \
                         ([A-Za-z0-9][A-Za-z0-9_.-]*) or pid:N"
                    )),
                    ContainerError::NotRunning { .. } => OpsError::Container {
                        container: container.to_owned(),
                        why: "is not running (start it first)".into(),
                        kind: Kind::Conflict,
                    },
                    e => OpsError::Container {
                        container: container.to_owned(),
                        kind: crate::error::Classify::kind(&e),
                        why: e.to_string(),
                    },
                })?;
            Ok(ResolvedContainer {
                id: c.id,
                pid: c.target.pid as u32,
            })
        }
    }
}

async fn adopt_resolved(
    core: &Core,
    backend: &Arc<dyn SliceBackend>,
    rec: &InstanceRecord,
    container: &str,
) -> Result<(String, instances::Adopted), OpsError> {
    let c = resolve(core, container).await?;
    let b = backend.clone();
    let name = rec.instance.name.clone();
    let adj = rec.instance.limits.effective_oom_score_adj();
    // The driver the instance was created for (its recorded cgroup_parent), so a
    // Conflict names the same --cgroup-parent that CreateInstance returned.
    let driver = [DockerCgroupDriver::Systemd, DockerCgroupDriver::Cgroupfs]
        .into_iter()
        .find(|d| {
            backend.cgroup_parent(&name, *d).ok().as_deref()
                == Some(rec.instance.cgroup_parent.as_str())
        })
        .unwrap_or_else(|| core.instances.default_driver());
    let a =
        blocking(move || Ok(instances::adopt_container(&*b, &name, c.pid, adj, driver)?)).await?;
    Ok((c.id, a))
}

/// Check that `container` (Docker name/id, or `pid:N`) lies inside the instance, give
/// its processes the instance's oom_score_adj and remember it. Returns the container id
/// and what was adjusted. Conflict (naming the `--cgroup-parent` to use) when outside.
pub async fn adopt(
    core: &Arc<Core>,
    name: &str,
    container: &str,
) -> Result<(String, instances::Adopted), OpsError> {
    crate::names::check_instance_name(name)?;
    let backend = core.instances.backend()?;
    let rec = get(core, name).await?;
    let (id, a) = adopt_resolved(core, &backend, &rec, container).await?;
    let mut st = core.state.lock().await;
    let Some(r) = st.instances.iter_mut().find(|i| i.instance.name == name) else {
        return Err(not_found(name)); // destroyed meanwhile
    };
    if !r.containers.contains(&id) {
        r.containers.push(id.clone());
        let c = state::Change::Instance(r.clone());
        core.record(&st, &[c])?;
    }
    Ok((id, a))
}

/// Who owns what is left of an instance without record: `None` = nothing is left;
/// `Some(Some(uid))` = only loop devices tagged with it, all attached by `uid`;
/// `Some(None)` = its slice/cgroup exists on the host, or tagged devices of several uids.
pub async fn leftover_owner(core: &Core, name: &str) -> Option<Option<u32>> {
    let mut owners: Vec<u32> = core
        .state
        .lock()
        .await
        .loops
        .iter()
        .filter(|l| l.instance.as_deref() == Some(name))
        .map(|l| l.owner_uid)
        .collect();
    owners.sort_unstable();
    owners.dedup();
    let slice = match core.instances.backend() {
        Ok(b) => {
            let n = name.to_owned();
            blocking(move || Ok(b.exists(&n)?)).await.unwrap_or(false)
        }
        Err(_) => false,
    };
    match (slice, owners.as_slice()) {
        (false, []) => None,
        (false, [uid]) => Some(Some(*uid)),
        _ => Some(None),
    }
}

/// HOOK(docker events): call on every container `start` event (full Docker id). When an
/// instance adopted that container, its new processes get the instance's oom_score_adj
/// again. Returns the instance's name, `None` when no instance adopted the container.
pub async fn on_container_start(core: &Arc<Core>, id: &str) -> Result<Option<String>, OpsError> {
    let rec = {
        let st = core.state.lock().await;
        st.instances
            .iter()
            .find(|i| i.containers.iter().any(|c| c == id))
            .cloned()
    };
    let Some(rec) = rec else { return Ok(None) };
    let backend = core.instances.backend()?;
    let (_, a) = adopt_resolved(core, &backend, &rec, id).await?;
    tracing::info!(instance = %rec.instance.name, container = id, pids = ?a.pids,
        oom_score_adj = a.oom_score_adj, "container restarted: oom_score_adj re-applied");
    Ok(Some(rec.instance.name))
}

/// Options of DestroyInstance.
#[derive(Debug, Clone, Copy, Default)]
pub struct DestroyOptions {
    /// Delete the images behind the instance's loop devices.
    pub delete_images: bool,
    /// Kill the processes still inside the slice/cgroup.
    pub force: bool,
}

/// Capabilities with managers of their own (outside `Core`) that DestroyInstance also
/// clears (`None` where that capability is not running).
#[derive(Clone, Default)]
pub struct Teardown {
    pub captures: Option<super::capture::Captures>,
}

/// Tear the instance down: stop its captures, unpublish its ports, detach its loop devices,
/// delete their images when asked, remove its slice/cgroup, forget it. Every step runs
/// even when an earlier one failed; the result lists what was done, the error
/// ([`OpsError::Teardown`]) also lists every failure. An instance with no record and
/// nothing left on the host is NotFound (so a second destroy is NotFound).
pub async fn destroy(
    core: &Arc<Core>,
    name: &str,
    opts: DestroyOptions,
    teardown: &Teardown,
) -> Result<Vec<String>, OpsError> {
    crate::names::check_instance_name(name)?;
    let mut done = Vec::new();
    let mut errors: Vec<OpsError> = Vec::new();
    let (rec, loops) = {
        let st = core.state.lock().await;
        let loops: Vec<_> = st
            .loops
            .iter()
            .filter(|l| l.instance.as_deref() == Some(name))
            .cloned()
            .collect();
        (find(&st, name).cloned(), loops)
    };
    if rec.is_none() {
        refuse_foreign(core, name).await?;
    }

    if let Some(c) = &teardown.captures {
        for s in c.stop_instance(name).await {
            done.push(format!("stopped capture {}", s.id));
        }
    }
    match super::ports::unpublish_instance(core, name).await {
        Ok(ids) => done.extend(
            ids.into_iter()
                .map(|id| format!("unpublished port mapping {id}")),
        ),
        Err(e) => errors.push(e),
    }

    for l in loops {
        // Revoke every exposure first; a live container keeping its grant stops the detach
        // (force: detach anyway, said in `done`).
        match super::devices::revoke_device(core, l.number, opts.force).await {
            Ok(notes) => done.extend(notes),
            Err(e) => {
                errors.push(e);
                continue;
            }
        }
        match super::loops::detach(core, l.number).await {
            Ok(r) => {
                done.push(format!("detached {}", r.device()));
                if let (true, Some((uid, img))) = (opts.delete_images, &r.image) {
                    match super::loops::delete_image(core, *uid, img).await {
                        Ok(()) => done.push(format!("deleted image {img} of uid {uid}")),
                        Err(e) => errors.push(e),
                    }
                }
            }
            Err(e) => errors.push(e),
        }
    }

    let mut slice_left = false;
    match core.instances.backend() {
        Ok(backend) => {
            let (b, n, force) = (backend.clone(), name.to_owned(), opts.force);
            // destroy checks existence itself (absent = Unchanged).
            match blocking(move || Ok(b.destroy(&n, force)?)).await {
                Ok(Change::Done) => done.push(match backend.kind() {
                    BackendKind::Systemd => {
                        format!("stopped slice {}", instances::slice_unit(name))
                    }
                    _ => format!("removed cgroup {}", backend.cgroup_path(name)),
                }),
                Ok(Change::Unchanged) => {}
                Err(e) => {
                    slice_left = true;
                    errors.push(e)
                }
            }
        }
        Err(e) if rec.is_some() => {
            slice_left = true;
            errors.push(e)
        }
        Err(_) => {}
    }

    if rec.is_some() && errors.is_empty() && !slice_left {
        let mut st = core.state.lock().await;
        // Taken out by position and put back there on failure (no copy of every record).
        let at = st.instances.iter().position(|i| i.instance.name == name);
        let removed = at.map(|at| (at, st.instances.remove(at)));
        let gone = state::Change::InstanceGone {
            name: name.to_owned(),
        };
        match core.record(&st, &[gone]) {
            Ok(()) => done.push(format!("forgot instance {name}")),
            Err(e) => {
                if let Some((at, r)) = removed {
                    st.instances.insert(at, r);
                }
                errors.push(e);
            }
        }
    }
    if !errors.is_empty() {
        return Err(OpsError::Teardown { done, errors });
    }
    if rec.is_none() && done.is_empty() {
        return Err(not_found(name));
    }
    Ok(done)
}

/// DestroyInstance of a name without record: a cgroup/slice tagged with ANOTHER state id
/// belongs to another daemon (another state dir on the same host) and is never touched,
/// whoever asks (`-others` covers other uids of this daemon, not other daemons): Conflict
/// before any step runs. Untagged leftovers (a daemon from before tags, a create killed
/// between mkdir and tag) stay removable by a caller allowed `-others`, as before; a tag
/// that cannot be read fails closed.
async fn refuse_foreign(core: &Arc<Core>, name: &str) -> Result<(), OpsError> {
    let Ok(backend) = core.instances.backend() else {
        return Ok(());
    };
    let (b, n) = (backend.clone(), name.to_owned());
    match blocking(move || Ok(b.owner(&n)?)).await? {
        Some(instances::tag::Owner::Tagged(t)) if Some(t.as_str()) != backend.owner_tag() => {
            tracing::warn!(instance = name, owner = %t,
                "DestroyInstance: no record, cgroup tagged by another state dir: refused");
            Err(instances::InstanceError::Foreign {
                name: name.to_owned(),
                what: backend.cgroup_path(name),
                owner: t,
            }
            .into())
        }
        _ => Ok(()),
    }
}

/// One decision of the start-up reconcile of instances, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The slice/cgroup was there; its limits were applied again.
    Kept(String),
    /// It was gone (transient slice after a reboot, cgroupfs dir after a reboot or
    /// by hand): made again from the recorded limits.
    Recreated(String),
    /// It could not be made; the record stays (the next start tries again).
    Failed(String),
    /// A cgroup/slice of ours (tagged with our state id, or untagged with a pending
    /// intent) that no record claims: a create killed before its record was saved.
    /// Nobody was answered, so it is undone.
    Removed(String),
    /// An intent whose operation had finished (record saved) or never reached the host.
    IntentCleared(String),
    /// Someone else's cgroup/slice under the dind root: left alone.
    NotOurs(String),
}

/// Start-up reconcile of instances: make every recorded instance exist with its recorded
/// limits, then remove our own unrecorded leftovers ([`reconcile_leftovers`]).
pub async fn reconcile(core: &Arc<Core>) -> Result<Vec<Decision>, OpsError> {
    let mut out = reconcile_recorded(core).await?;
    out.extend(reconcile_leftovers(core).await);
    Ok(out)
}

/// Undo interrupted creates: every cgroup/slice under the dind root that no record claims
/// and that is ours — tagged with this state dir's id, or untagged while an intent for its
/// name is pending — is removed (never killing: a busy one stays, logged). Another
/// daemon's (other tag) or another tool's (untagged, no intent) is left alone. Pending
/// intents are cleared afterwards.
pub async fn reconcile_leftovers(core: &Arc<Core>) -> Vec<Decision> {
    let mut out = Vec::new();
    let dir = core.store.dir().to_owned();
    let intents = super::intent::pending(&dir, INTENT);
    let recorded: Vec<String> = {
        let st = core.state.lock().await;
        st.instances
            .iter()
            .map(|i| i.instance.name.clone())
            .collect()
    };
    let backend = match core.instances.backend() {
        Ok(b) => b,
        Err(e) => {
            // Keep the intents: a later start with a backend decides.
            if !intents.is_empty() {
                out.push(Decision::Failed(format!(
                    "intents {intents:?} kept: no slice backend ({e})"
                )));
            }
            return out;
        }
    };
    let b = backend.clone();
    let present = match blocking(move || Ok(b.present()?)).await {
        Ok(p) => p,
        Err(e) => {
            out.push(Decision::Failed(format!(
                "cannot list instance cgroups/slices ({e}); intents kept"
            )));
            return out;
        }
    };
    let me = backend.owner_tag().map(str::to_owned);
    for p in present {
        if recorded.contains(&p.name) {
            continue;
        }
        let has_intent = intents.contains(&p.name);
        let why = match &p.owner {
            instances::tag::Owner::Tagged(t) if Some(t) == me.as_ref() => {
                "tagged with our state id"
            }
            instances::tag::Owner::Untagged if has_intent => {
                "untagged, with our pending create intent (killed between mkdir and tag)"
            }
            other => {
                out.push(Decision::NotOurs(format!(
                    "{}: no record here, owner {other:?}: left alone",
                    backend.cgroup_path(&p.name)
                )));
                continue;
            }
        };
        let (b, n) = (backend.clone(), p.name.clone());
        match blocking(move || Ok(b.remove_leftover(&n, has_intent)?)).await {
            Ok(_) => out.push(Decision::Removed(format!(
                "instance {}: {} {why} but no record (create interrupted before its \
                 record was saved): removed",
                p.name,
                backend.cgroup_path(&p.name)
            ))),
            Err(e) => out.push(Decision::Failed(format!(
                "instance {}: unrecorded leftover of ours, cannot remove ({e}); \
                 DestroyInstance removes it",
                p.name
            ))),
        }
    }
    for name in intents {
        let state = if recorded.contains(&name) {
            "create had finished (record saved)"
        } else {
            "create undone or never reached the host"
        };
        out.push(Decision::IntentCleared(format!("instance {name}: {state}")));
        super::intent::clear(&dir, INTENT, &name);
    }
    out
}

/// Make every recorded instance exist with its recorded limits.
async fn reconcile_recorded(core: &Arc<Core>) -> Result<Vec<Decision>, OpsError> {
    let st = core.state.lock().await;
    let mut out = Vec::new();
    if st.instances.is_empty() {
        return Ok(out);
    }
    let backend = match core.instances.backend() {
        Ok(b) => b,
        Err(e) => {
            for i in &st.instances {
                out.push(Decision::Failed(format!(
                    "instance {}: kept in state, cannot recreate: {e}",
                    i.instance.name
                )));
            }
            return Ok(out);
        }
    };
    for i in &st.instances {
        let (b, n, l) = (
            backend.clone(),
            i.instance.name.clone(),
            i.instance.limits.clone(),
        );
        let name = &i.instance.name;
        match blocking(move || Ok(b.create(&n, &l)?)).await {
            Ok(Change::Unchanged) => out.push(Decision::Kept(format!(
                "instance {name}: {} present, limits re-applied",
                backend.cgroup_path(name)
            ))),
            Ok(Change::Done) => out.push(Decision::Recreated(format!(
                "instance {name}: {} was gone, recreated with its limits",
                backend.cgroup_path(name)
            ))),
            Err(e) => out.push(Decision::Failed(format!(
                "instance {name}: cannot recreate ({e}); record kept"
            ))),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_keeps_unnamed_knobs_and_resets_named_ones() {
        let old = Limits {
            cpu_quota_percent: Some(50),
            memory_max: Some(1 << 30),
            tasks_max: Some(100),
            ..Default::default()
        };
        let upd = LimitsUpdate {
            set: Limits {
                memory_max: Some(2 << 30),
                ..Default::default()
            },
            reset: vec!["tasks_max".into()],
        };
        let m = merge_limits(&old, &upd).unwrap();
        assert_eq!(m.cpu_quota_percent, Some(50));
        assert_eq!(m.memory_max, Some(2 << 30));
        assert_eq!(m.tasks_max, None);
        let bad = LimitsUpdate {
            reset: vec!["cpu_qouta".into()],
            ..Default::default()
        };
        assert!(
            matches!(merge_limits(&old, &bad), Err(OpsError::Invalid(s)) if s.contains("cpu_qouta"))
        );
    }

    #[test]
    fn default_driver_follows_config_then_backend() {
        use DockerCgroupDriver::*;
        assert_eq!(default_driver(None, Some(BackendKind::Systemd)), Systemd);
        assert_eq!(
            default_driver(None, Some(BackendKind::CgroupfsV1)),
            Cgroupfs
        );
        assert_eq!(default_driver(None, None), Cgroupfs);
        assert_eq!(
            default_driver(Some(Cgroupfs), Some(BackendKind::Systemd)),
            Cgroupfs
        );
    }

    #[test]
    fn pid_refs() {
        assert_eq!(parse_pid_ref("pid:42").unwrap().unwrap(), 42);
        assert!(parse_pid_ref("pid:1").unwrap().is_err());
        assert!(parse_pid_ref("pid:x").unwrap().is_err());
        assert!(parse_pid_ref("web").is_none());
    }
}

#[cfg(test)]
mod state_tests {
    use crate::state::{InstanceRecord, State};

    #[test]
    fn instance_records_round_trip_and_old_state_loads() {
        let old = r#"{"version":1,"state_id":"x","images":[],"loops":[]}"#;
        let s: State = serde_json::from_str(old).unwrap();
        assert!(s.instances.is_empty());
        let rec: InstanceRecord = serde_json::from_str(
            r#"{"name":"a","limits":{"memory_max":1073741824},"slice_unit":"dind-a.slice",
                "cgroup_parent":"/dind/a","created_at":1,"owner_uid":1000}"#,
        )
        .unwrap();
        assert_eq!(rec.instance.limits.memory_max, Some(1 << 30));
        assert!(rec.containers.is_empty());
        let back: InstanceRecord =
            serde_json::from_str(&serde_json::to_string(&rec).unwrap()).unwrap();
        assert_eq!(back, rec);
    }
}
