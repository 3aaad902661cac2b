//! Exposures: ExposeToContainer, RevokeFromContainer, ListExposures, and the revocation
//! every path that frees a loop number runs first (Detach, DestroyInstance, the stale
//! record LOOP_CTL_GET_FREE reveals, the start-up reconcile). See `crate::expose`.
//!
//! Rules kept here:
//! - Exposures live in their loop record (`LoopRecord::exposures`, one per container) and
//!   are changed only with the state lock held, so an expose can never race the revoke of
//!   a detach.
//! - Before acting on a record its live binding is compared with the record
//!   (LOOP_GET_STATUS64: backing st_dev/st_ino); a record whose device was unbound behind
//!   the daemon's back is settled (revoked, dropped), never trusted.
//! - A grant that cannot be withdrawn from a live container stops the caller (Busy naming
//!   the container) unless `force`: then the log and the reply say so.

use crate::error::{Classify, Kind};
use crate::expose::{
    self, program, Container, ExposeError, ExposeReport, ExposeRequest, Exposure, Pending, Revoked,
};
use crate::netns::NetnsError;
use crate::ops::containers::ContainerError;
use crate::ops::{blocking, Core, OpsError};
use crate::state::{Change, State};

#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    #[error(transparent)]
    Ops(#[from] OpsError),
    #[error(transparent)]
    Expose(#[from] ExposeError),
    #[error(transparent)]
    Container(ContainerError),
    #[error(transparent)]
    Target(#[from] NetnsError),
    /// A stopped container has no /dev and no cgroup to give a device to.
    #[error("container {name} is not running")]
    NotRunning { name: String },
    #[error("/dev/loop{number} is not exposed in container {container:?}")]
    NotExposed { number: u32, container: String },
    #[error("internal task failed: {0}")]
    Task(String),
}

impl From<ContainerError> for DevicesError {
    fn from(e: ContainerError) -> DevicesError {
        match e {
            ContainerError::NotRunning { name } => DevicesError::NotRunning { name },
            e => DevicesError::Container(e),
        }
    }
}

impl Classify for DevicesError {
    fn kind(&self) -> Kind {
        match self {
            DevicesError::Ops(e) => e.kind(),
            DevicesError::Expose(e) => e.kind(),
            DevicesError::Container(e) => e.kind(),
            DevicesError::Target(e) => e.kind(),
            DevicesError::NotRunning { .. } => Kind::Conflict,
            DevicesError::NotExposed { .. } => Kind::NotFound,
            DevicesError::Task(_) => Kind::Failed,
        }
    }
}

/// Options of ExposeToContainer.
#[derive(Debug, Clone, Default)]
pub struct ExposeOptions {
    /// `as`: the node's name inside the container.
    pub alias: Option<String>,
    /// `follow`: follow partition-table writes (see [`Follow`]).
    pub follow: bool,
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// The runtime's device rules rebuilt from Docker's view, for cgroup v2 containers whose
/// OCI bundle cannot be found: Docker's default list, then the container's
/// `--device-cgroup-rule`s (HostConfig.DeviceCgroupRules), then runc's own defaults —
/// the order runc builds its program in. NOT reconstructed: `--device` mappings
/// (HostConfig.Devices) and `--privileged`; such a container loses those devices on the
/// first grant, which is why the bundle is always tried first.
fn reconstructed_rules(cgroup_rules: &[String]) -> (Vec<program::DevRule>, String) {
    let mut v = program::docker_defaults();
    v.extend(
        cgroup_rules
            .iter()
            .filter_map(|r| program::DevRule::parse(r, true)),
    );
    v.extend(program::runc_defaults());
    (
        v,
        "reconstructed: Docker defaults + DeviceCgroupRules + runc defaults (bundle not found)"
            .into(),
    )
}

/// Is the managed device `number` still bound to the file its record names?
async fn still_bound(rec: &crate::state::LoopRecord) -> Result<bool, OpsError> {
    let n = rec.number;
    let live = blocking(move || Ok(crate::loopdev::bound_identity(n)?)).await?;
    Ok(live == Some((rec.backing_dev, rec.backing_inode)))
}

/// Expose managed loop device `number` in `container`. The caller has authorized the
/// device (owner or `-others`). Returns what was done and the record as it is now.
pub async fn expose_to_container(
    core: &Core,
    number: u32,
    container: &str,
    opts: ExposeOptions,
) -> Result<(ExposeReport, crate::state::LoopRecord), DevicesError> {
    let info = core.containers.resolve(container).await?;
    let target = info.target;
    let cgroup_rules = info.device_cgroup_rules.clone();

    let mut st = core.state.lock().await;
    let rec = st
        .loops
        .iter()
        .find(|l| l.number == number)
        .cloned()
        .ok_or(OpsError::Unmanaged {
            device: format!("/dev/loop{number}"),
        })?;
    if !still_bound(&rec).await? {
        // Unbound (or rebound) behind the daemon's back: settle the record, never expose
        // whatever the number holds now.
        let notes = revoke_locked(core, &mut st, number, None, false).await?;
        st.loops.retain(|l| l.number != number);
        core.record(&st, &[Change::LoopGone { number }])?;
        tracing::warn!(device = %rec.device(), ?notes, "device no longer bound to its recorded file: record dropped");
        return Err(OpsError::Unmanaged {
            device: rec.device(),
        }
        .into());
    }
    // An earlier exposure in the same container (same init process) is updated in place;
    // one of an earlier incarnation of the container is void (its /dev and cgroup died).
    let previous = rec
        .exposures
        .iter()
        .find(|e| e.container_id == info.id && e.target() == target)
        .cloned();
    let other_grants: Vec<program::DevRule> = st
        .loops
        .iter()
        .filter(|l| l.number != number)
        .flat_map(|l| l.exposures.iter())
        .filter(|e| e.container_id == info.id && e.target() == target)
        .flat_map(|e| e.dev_rules())
        .collect();
    let disk_name = format!("loop{number}");
    let req_base = (
        Container {
            target,
            id: info.id.clone(),
            name: info.name.clone(),
        },
        opts.alias.clone(),
        previous.clone(),
        other_grants,
        reconstructed_rules(&cgroup_rules),
        (rec.backing_dev, rec.backing_inode),
    );
    let (req, planned) = blocking(move || {
        let (container, alias, previous, other_grants, fallback, (bdev, bino)) = req_base;
        // Partition minors from sysfs now, never from an older record (blkext minors are
        // global and reused).
        let (disk, partitions) = expose::host_nodes(&disk_name).map_err(wrap(&container.name))?;
        let req = ExposeRequest {
            container: container.clone(),
            disk,
            partitions,
            alias,
            previous,
            other_grants,
            v2_fallback: Some(fallback),
            backing_dev: bdev,
            backing_inode: bino,
        };
        let planned = expose::plan(&req).map_err(wrap(&container.name))?;
        Ok((req, planned))
    })
    .await?;
    // Intent first: the planned nodes and rules (with the earlier exposure's) are saved
    // before the container is touched, so a daemon killed inside `expose` leaves a record
    // naming everything it may have made (finished at the next start: `settle_pending`).
    let mut intent = union(previous.as_ref(), planned);
    intent.follow = opts.follow;
    intent.pending = Some(Pending::Expose);
    set_exposure(core, &mut st, number, intent)?;
    let name = info.name.clone();
    match blocking(move || expose::expose(req).map_err(wrap(&name))).await {
        Ok((mut exposure, report)) => {
            exposure.follow = opts.follow;
            let rec = set_exposure(core, &mut st, number, exposure)?;
            Ok((report, rec))
        }
        Err(e) => {
            // A refusal changed nothing (or was rolled back by `expose`): the record is
            // what it was.
            let l = loop_mut(&mut st, number);
            l.exposures.retain(|x| x.container_id != info.id);
            l.exposures.extend(previous);
            save_loop(core, &st, number)?;
            Err(e.into())
        }
    }
}

/// Journal loop `number`'s record as it is now (gone when it is no longer recorded).
fn save_loop(core: &Core, st: &State, number: u32) -> Result<(), OpsError> {
    match st.loops.iter().find(|l| l.number == number) {
        Some(l) => core.record(st, &[Change::Loop(l.clone())]),
        None => core.record(st, &[Change::LoopGone { number }]),
    }
}

fn loop_mut(st: &mut State, number: u32) -> &mut crate::state::LoopRecord {
    st.loops
        .iter_mut()
        .find(|l| l.number == number)
        .expect("record held under the lock")
}

/// Put `exp` in loop `number`'s record in place of the container's earlier exposure, and
/// save. Returns the record as it is now.
fn set_exposure(
    core: &Core,
    st: &mut State,
    number: u32,
    exp: Exposure,
) -> Result<crate::state::LoopRecord, OpsError> {
    let l = loop_mut(st, number);
    l.exposures.retain(|e| e.container_id != exp.container_id);
    l.exposures.push(exp);
    let rec = l.clone();
    save_loop(core, st, number)?;
    Ok(rec)
}

/// `planned` with the nodes and rules of `previous` added (what an interrupted re-expose
/// may have left in the container).
fn union(previous: Option<&Exposure>, planned: Exposure) -> Exposure {
    let mut e = planned;
    if let Some(p) = previous {
        for n in &p.nodes {
            if !e.nodes.iter().any(|x| x.name == n.name) {
                e.nodes.push(n.clone());
            }
        }
        for r in &p.rules {
            if !e.rules.contains(r) {
                e.rules.push(r.clone());
            }
        }
    }
    e
}

/// Expose `exp`'s device again in its container from the host's view now, with `exp` as
/// the earlier exposure (a followed table changed; an interrupted expose is finished at
/// start).
async fn reexpose(
    st: &State,
    number: u32,
    exp: &Exposure,
) -> Result<(Exposure, ExposeReport), OpsError> {
    let other_grants: Vec<program::DevRule> = st
        .loops
        .iter()
        .filter(|l| l.number != number)
        .flat_map(|l| l.exposures.iter())
        .filter(|e| e.container_id == exp.container_id && e.target() == exp.target())
        .flat_map(|e| e.dev_rules())
        .collect();
    let fallback = match &exp.grant {
        expose::Grant::V2 {
            base, base_source, ..
        } => Some((base.clone(), base_source.clone())),
        _ => None,
    };
    let (e2, dn) = (exp.clone(), format!("loop{number}"));
    blocking(move || {
        let (disk, partitions) = expose::host_nodes(&dn).map_err(wrap(&e2.container_name))?;
        expose::expose(ExposeRequest {
            container: Container {
                target: e2.target(),
                id: e2.container_id.clone(),
                name: e2.container_name.clone(),
            },
            disk,
            partitions,
            alias: e2.alias.clone(),
            previous: Some(e2.clone()),
            other_grants,
            v2_fallback: fallback,
            backing_dev: e2.backing_dev,
            backing_inode: e2.backing_inode,
        })
        .map_err(wrap(&e2.container_name))
    })
    .await
}

/// Start-up reconcile of exposures whose change a killed daemon left half-done
/// ([`Exposure::pending`]), for loops still recorded (after `ops::loops::reconcile`
/// settled the vanished ones and dropped those of dead containers):
/// - an interrupted expose is finished (exposed again from the host's view now, the
///   recorded union as the earlier exposure, so every node it may have made is either
///   wanted or removed); when that fails it is revoked and dropped;
/// - an interrupted revoke is done again (idempotent) and the exposure dropped.
///
/// Nobody was answered, so either outcome is allowed; every decision is returned for the
/// log. A revoke that fails keeps the record (a live container keeping its grant, as
/// for Detach: Busy is logged; DestroyInstance/Detach with force settles it).
pub async fn settle_pending(core: &Core, st: &mut State) -> Vec<String> {
    let mut out = Vec::new();
    let todo: Vec<(u32, Exposure)> = st
        .loops
        .iter()
        .flat_map(|l| l.exposures.iter().map(move |e| (l.number, e.clone())))
        .filter(|(_, e)| e.pending.is_some())
        .collect();
    for (number, exp) in todo {
        let who = format!("{} ({})", exp.container_name, short(&exp.container_id));
        let device = format!("/dev/loop{number}");
        if exp.pending == Some(Pending::Expose) {
            match reexpose(st, number, &exp).await {
                Ok((mut new, rep)) => {
                    new.follow = exp.follow;
                    match set_exposure(core, st, number, new) {
                        Ok(_) => {
                            out.push(format!(
                                "{device} in container {who}: interrupted expose finished \
                                 (nodes created {:?}, removed {:?})",
                                rep.created, rep.removed
                            ));
                            continue;
                        }
                        Err(e) => out.push(format!(
                            "{device} in container {who}: finished expose not saved ({e}); revoking"
                        )),
                    }
                }
                Err(e) => out.push(format!(
                    "{device} in container {who}: interrupted expose cannot be finished ({e}); revoking"
                )),
            }
        }
        match revoke_locked(core, st, number, Some(&exp.container_id), false).await {
            Ok(notes) => out.push(format!(
                "{device} in container {who}: interrupted {:?} undone: {}",
                exp.pending.unwrap_or(Pending::Revoke),
                notes.join("; ")
            )),
            Err(e) => out.push(format!(
                "{device} in container {who}: interrupted change not settled, record kept: {e}"
            )),
        }
    }
    out
}

fn wrap(container: &str) -> impl FnOnce(ExposeError) -> OpsError {
    let container = container.to_owned();
    move |e| OpsError::Container {
        container,
        kind: e.kind(),
        why: e.to_string(),
    }
}

/// Revoke the exposures of loop `number` (all, or those of one container) with the state
/// lock held; persists the loop records. Each withdrawn (or void) exposure is removed from
/// the record as it goes. A grant that cannot be withdrawn from a live container: Busy
/// naming it, unless `force` (then removed from the record anyway, logged, and said in
/// the returned notes).
pub async fn revoke_locked(
    core: &Core,
    st: &mut State,
    number: u32,
    container: Option<&str>,
    force: bool,
) -> Result<Vec<String>, OpsError> {
    let device = format!("/dev/loop{number}");
    let Some(rec) = st.loops.iter().find(|l| l.number == number) else {
        return Ok(Vec::new());
    };
    let todo: Vec<_> = rec
        .exposures
        .iter()
        .filter(|e| container.is_none_or(|c| e.is_container(c)))
        .cloned()
        .collect();
    let mut notes = Vec::new();
    let mut failure = None;
    if todo.is_empty() {
        return Ok(notes);
    }
    // Intent first: a daemon killed while withdrawing leaves the exposures marked, and the
    // next start revokes them again ([`settle_pending`]) instead of trusting nodes and
    // grants that may be gone.
    for e in loop_mut(st, number)
        .exposures
        .iter_mut()
        .filter(|e| container.is_none_or(|c| e.is_container(c)))
    {
        e.pending = Some(Pending::Revoke);
    }
    save_loop(core, st, number)?;
    for exp in todo {
        // v2: the container's other exposures stay in the rebuilt program.
        let keep: Vec<program::DevRule> = st
            .loops
            .iter()
            .flat_map(|l| l.exposures.iter().map(move |e| (l.number, e)))
            .filter(|(n, e)| {
                *n != number && e.container_id == exp.container_id && e.target() == exp.target()
            })
            .flat_map(|(_, e)| e.dev_rules())
            .collect();
        let e2 = exp.clone();
        let t0 = std::time::Instant::now();
        let r = blocking(move || Ok(expose::revoke(&e2, &keep))).await?;
        let who = format!("{} ({})", exp.container_name, short(&exp.container_id));
        let note = match r {
            Ok(Revoked::Withdrawn {
                nodes,
                rules,
                nodes_left,
            }) => {
                let mut n = format!(
                    "revoked {device} from container {who}: nodes [{}] removed, rules [{}] withdrawn",
                    nodes.join(", "),
                    rules.join(", ")
                );
                if let Some(why) = nodes_left {
                    n.push_str(&format!(
                        " (nodes left in its /dev, they open nothing: {why})"
                    ));
                }
                tracing::info!(elapsed_us = t0.elapsed().as_micros() as u64, "{n}");
                n
            }
            Ok(Revoked::ContainerGone) => {
                let n = format!("revoked {device} from container {who}: the container is gone");
                tracing::info!("{n}");
                n
            }
            Err(e) if force => {
                let n =
                    format!("FORCED: {device} freed although container {who} may keep access: {e}");
                tracing::warn!("{n}");
                n
            }
            Err(e) => {
                tracing::error!(%device, container = %who, error = %e, "revocation failed");
                failure = Some(OpsError::Busy {
                    what: device.clone(),
                    why: format!(
                        "container {who} keeps its grant: {e}; the device stays attached (option force frees it anyway)"
                    ),
                });
                break;
            }
        };
        notes.push(note);
        if let Some(l) = st.loops.iter_mut().find(|l| l.number == number) {
            l.exposures
                .retain(|e| !(e.container_id == exp.container_id && e.pid == exp.pid));
        }
    }
    if failure.is_some() {
        // What was not withdrawn stays granted: no longer marked.
        for e in loop_mut(st, number).exposures.iter_mut() {
            if e.pending == Some(Pending::Revoke) {
                e.pending = None;
            }
        }
    }
    save_loop(core, st, number)?;
    match failure {
        Some(e) => Err(e),
        None => Ok(notes),
    }
}

/// RevokeFromContainer: withdraw one container's exposure of loop `number`.
pub async fn revoke_from_container(
    core: &Core,
    number: u32,
    container: &str,
    force: bool,
) -> Result<(Vec<String>, crate::state::LoopRecord), DevicesError> {
    let mut st = core.state.lock().await;
    let rec = st
        .loops
        .iter()
        .find(|l| l.number == number)
        .ok_or(OpsError::Unmanaged {
            device: format!("/dev/loop{number}"),
        })?;
    if !rec.exposures.iter().any(|e| e.is_container(container)) {
        return Err(DevicesError::NotExposed {
            number,
            container: container.to_owned(),
        });
    }
    let notes = revoke_locked(core, &mut st, number, Some(container), force).await?;
    let rec = st
        .loops
        .iter()
        .find(|l| l.number == number)
        .cloned()
        .expect("held under the lock");
    Ok((notes, rec))
}

/// Revoke every exposure of loop `number` (DestroyInstance calls this before detaching).
pub async fn revoke_device(core: &Core, number: u32, force: bool) -> Result<Vec<String>, OpsError> {
    let mut st = core.state.lock().await;
    revoke_locked(core, &mut st, number, None, force).await
}

/// Every exposure: (loop number, owner uid, exposure).
pub async fn list(core: &Core) -> Vec<(u32, u32, expose::Exposure)> {
    let st = core.state.lock().await;
    st.loops
        .iter()
        .flat_map(|l| {
            l.exposures
                .iter()
                .map(move |e| (l.number, l.owner_uid, e.clone()))
        })
        .collect()
}

// ---- follow: partitions that follow the table -----------------------------------------

/// How long events of one device are collected before the table is read again (a
/// partitioning tool may close and reopen the device several times while it works).
const DEBOUNCE: std::time::Duration = std::time::Duration::from_millis(15);

/// Called after a followed device's table was applied: (loop number, partitions, the
/// record as it is now).
pub type OnPartitions =
    dyn Fn(u32, Vec<crate::partitions::Partition>, crate::state::LoopRecord) + Send + Sync;

/// Follows the partition tables of exposed devices (option `follow`): a writer closing
/// the host node or a node made in a container (inotify IN_CLOSE_WRITE, see
/// `expose::follow`) makes the daemon re-read the table (debounced), sync the kernel with
/// BLKPG (as Rescan; a change to a mounted partition is refused and logged, nothing
/// applied) and update every followed exposure of the device: new partition nodes and
/// exact grants, removed ones revoked.
pub struct Follow {
    watcher: std::sync::Arc<expose::follow::Watcher>,
}

impl Follow {
    /// Watch the host node and the exposure's disk node inside its container.
    pub fn watch(&self, number: u32, exp: &expose::Exposure) {
        if !exp.follow {
            return;
        }
        let host = crate::loopdev::device_path(number);
        let inner = std::path::PathBuf::from(format!(
            "/proc/{}/root/dev/{}",
            exp.pid,
            exp.nodes.first().map(|n| n.name.as_str()).unwrap_or("")
        ));
        for p in [host, inner] {
            match self.watcher.watch(number, &p) {
                Ok(()) => tracing::debug!(path = %p.display(), "watching for table writes"),
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "cannot watch a device node")
                }
            }
        }
    }
}

/// Start following: an OS thread blocks in inotify, a task debounces and applies. Watches
/// for the exposures already recorded (a daemon restart) are added at once.
pub fn start_follow(
    core: std::sync::Arc<Core>,
    on_change: std::sync::Arc<OnPartitions>,
) -> std::io::Result<std::sync::Arc<Follow>> {
    let watcher = std::sync::Arc::new(expose::follow::Watcher::new()?);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u32, std::time::Instant)>();
    let w = watcher.clone();
    std::thread::Builder::new()
        .name("follow".into())
        .spawn(move || loop {
            match w.wait() {
                Ok(ns) => {
                    tracing::debug!(devices = ?ns, "device nodes closed after writing");
                    let now = std::time::Instant::now();
                    for n in ns {
                        if tx.send((n, now)).is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "inotify read failed: partition following stops");
                    return;
                }
            }
        })?;
    let follow = std::sync::Arc::new(Follow { watcher });
    let f = follow.clone();
    tokio::spawn(async move {
        {
            let st = core.state.lock().await;
            for l in &st.loops {
                for e in &l.exposures {
                    if e.target().verify().is_ok() {
                        f.watch(l.number, e);
                    }
                }
            }
        }
        while let Some((n, first)) = rx.recv().await {
            tokio::time::sleep(DEBOUNCE).await;
            let mut todo = vec![(n, first)];
            while let Ok((m, t)) = rx.try_recv() {
                if !todo.iter().any(|(x, _)| *x == m) {
                    todo.push((m, t));
                }
            }
            for (n, first) in todo {
                match table_written(&core, &f, n).await {
                    Ok(Some((parts, rec))) => {
                        tracing::info!(
                            device = n,
                            partitions = parts.len(),
                            since_close_us = first.elapsed().as_micros() as u64,
                            "partition table followed"
                        );
                        on_change(n, parts, rec);
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(device = n, error = %e,
                        "partition table change not applied"),
                }
            }
        }
    });
    Ok(follow)
}

/// A followed device's table was written: re-read it, sync the kernel, update every
/// followed exposure. None when the device has no followed exposure.
async fn table_written(
    core: &Core,
    follow: &Follow,
    number: u32,
) -> Result<Option<(Vec<crate::partitions::Partition>, crate::state::LoopRecord)>, OpsError> {
    let mut st = core.state.lock().await;
    let Some(rec) = st.loops.iter().find(|l| l.number == number).cloned() else {
        return Ok(None);
    };
    if !rec.exposures.iter().any(|e| e.follow) || !still_bound(&rec).await? {
        return Ok(None);
    }
    let dev = std::path::PathBuf::from(rec.device());
    let parts = blocking(move || Ok(crate::partitions::rescan(&dev)?)).await?;
    // Intent first: the followed exposures are marked before new partition nodes and
    // grants are made; a daemon killed in between has them finished at the next start
    // (`settle_pending`: partition nodes of the disk that are not wanted are removed).
    for e in loop_mut(&mut st, number).exposures.iter_mut() {
        if e.follow {
            e.pending = Some(Pending::Expose);
        }
    }
    save_loop(core, &st, number)?;
    let mut updated = Vec::new();
    for exp in rec.exposures.iter().filter(|e| e.follow) {
        if exp.target().verify().is_err() {
            continue;
        }
        let r = reexpose(&st, number, exp).await;
        match r {
            Ok((mut new, rep)) => {
                new.follow = true;
                tracing::info!(device = number, container = %new.container_name,
                    created = ?rep.created, removed = ?rep.removed, denied = ?rep.denied,
                    "followed exposure updated");
                follow.watch(number, &new);
                updated.push(new);
            }
            Err(e) => {
                tracing::warn!(device = number, container = %exp.container_name, error = %e,
                    "followed exposure not updated")
            }
        }
    }
    let l = st
        .loops
        .iter_mut()
        .find(|l| l.number == number)
        .expect("held under the lock");
    l.partitions = parts.clone();
    for e in l.exposures.iter_mut() {
        if e.pending == Some(Pending::Expose) {
            e.pending = None;
        }
    }
    for new in updated {
        if let Some(e) = l
            .exposures
            .iter_mut()
            .find(|e| e.container_id == new.container_id && e.pid == new.pid)
        {
            *e = new;
        }
    }
    let rec = l.clone();
    save_loop(core, &st, number)?;
    Ok(Some((parts, rec)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconstruction_keeps_docker_order_and_exact_rules() {
        let (r, why) = reconstructed_rules(&["c 42:* rmw".into(), "bogus".into()]);
        assert!(why.starts_with("reconstructed"));
        let e = program::effective(&r);
        assert!(!e.default_allow);
        let rw = program::ACC_READ | program::ACC_WRITE;
        assert!(program::allows(&e, program::DevType::Char, 42, 1, rw));
        assert!(program::allows(&e, program::DevType::Char, 1, 3, rw));
        assert!(!program::allows(&e, program::DevType::Block, 7, 0, rw));
        assert!(program::allows(
            &e,
            program::DevType::Block,
            7,
            0,
            program::ACC_MKNOD
        ));
    }
}
