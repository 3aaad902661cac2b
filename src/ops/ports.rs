//! Published ports: the bookkeeping around [`crate::ports::PortsManager`].
//!
//! The manager holds the mappings in memory and writes iptables; this module makes that
//! intent durable (`State::mappings`; one journal record per change, see `state`) through
//! the same `StateStore` and state lock as every other write, so writes stay atomic and
//! serialized:
//! - a call that changes mappings (publish / unpublish) persists before it answers: a
//!   caller that was told "published" finds the mapping again after `kill -9`;
//! - changes the daemon makes on its own (Docker events, reconcile after a dockerd restart)
//!   are persisted by a task that follows [`PortsManager::subscribe`];
//! - each write stores the mappings changed since the last one, with their values read
//!   under the state lock, so the last write always holds the newest value (two writers
//!   can never reorder).
//!
//! At start ([`start`]): bind the manager to the state id (its rule tags carry it), load
//! the persisted mappings, reconcile them against the live
//! chains and Docker (each decision logged), then follow Docker events
//! ([`crate::ports::watch`], reconnecting with backoff). None of this needs dockerd to be
//! up: without it the daemon still starts, the ports calls answer NotSupported (no Docker
//! chain) or Failed (dockerd not reachable) with the reason, and the watch task retries.

use super::{Core, OpsError};
use crate::ports::{Mapping, PortsManager, PublishRequest};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;

/// How long the start-up reconcile may take before the daemon goes on without it (the
/// watch task reconciles again as soon as dockerd answers).
const START_RECONCILE_LIMIT: Duration = Duration::from_secs(15);

/// Background tasks of the ports domain (aborted on drop of the daemon's runtime).
pub struct PortsTasks {
    pub watch: tokio::task::JoinHandle<()>,
    pub persist: tokio::task::JoinHandle<()>,
}

/// Load → reconcile (logged) → follow Docker events and persist every change.
/// `forward` receives every Docker container event the watch sees.
pub async fn start(
    core: &Arc<Core>,
    forward: Option<tokio::sync::mpsc::UnboundedSender<crate::docker::ContainerEvent>>,
) -> PortsTasks {
    let rx = core.ports.subscribe();
    let (persisted, state_id) = {
        let st = core.state.lock().await;
        (st.mappings.clone(), st.state_id.clone())
    };
    // rule tags carry the state id: another daemon's rules in this netns are never ours
    core.ports.set_owner(&state_id);
    let n = persisted.len();
    core.ports.load(persisted).await;
    match tokio::time::timeout(START_RECONCILE_LIMIT, core.ports.reconcile()).await {
        Ok(Ok(ds)) => {
            for d in &ds {
                tracing::info!(mapping = %d.mapping_id, action = ?d.action, "ports reconcile");
            }
            tracing::info!(mappings = n, decisions = ds.len(), "ports reconcile done");
        }
        Ok(Err(e)) => tracing::warn!(error = %e, mappings = n,
            "ports reconcile at start failed; mappings kept, retried when dockerd answers"),
        Err(_) => tracing::warn!(
            mappings = n,
            "ports reconcile at start took longer than {START_RECONCILE_LIMIT:?}; \
             going on, retried by the event watch"
        ),
    }
    if let Err(e) = persist(core).await {
        tracing::error!(error = %e, "cannot persist mappings after the start-up reconcile");
    }
    let persist_task = tokio::spawn(follow_changes(core.clone(), rx));
    let watch = tokio::spawn(crate::ports::watch(core.ports.clone(), forward));
    PortsTasks {
        watch,
        persist: persist_task,
    }
}

/// Persist after every change the manager reports (coalescing bursts into one write).
async fn follow_changes(
    core: Arc<Core>,
    mut rx: tokio::sync::broadcast::Receiver<crate::ports::MappingChange>,
) {
    loop {
        match rx.recv().await {
            Ok(_) | Err(RecvError::Lagged(_)) => {
                while !matches!(
                    rx.try_recv(),
                    Err(tokio::sync::broadcast::error::TryRecvError::Empty
                        | tokio::sync::broadcast::error::TryRecvError::Closed)
                ) {}
                if let Err(e) = persist(&core).await {
                    tracing::error!(error = %e, "cannot persist port mappings");
                }
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// Store the mappings changed since the last store (one journal record; nothing when
/// none changed). The changed ids and their values are taken under the state lock, so
/// the last write always holds the newest value of each mapping (two writers can never
/// reorder). Costs the change, not the table: at 1000 mappings, diffing the whole table
/// per call was a millisecond of a Publish.
pub async fn persist(core: &Core) -> Result<(), OpsError> {
    let mut st = core.state.lock().await;
    let changed = core.ports.take_changed();
    if changed.is_empty() {
        return Ok(());
    }
    let mut changes = Vec::new();
    let mut undo = Vec::new();
    for (id, now) in changed {
        let before = st.mappings.iter().find(|m| m.id == id).cloned();
        let change = match now {
            Some(m) if before.as_ref() != Some(&m) => crate::state::Change::Mapping(m),
            None if before.is_some() => crate::state::Change::MappingGone { id: id.clone() },
            _ => continue,
        };
        undo.push((id, before));
        st.apply(change.clone());
        changes.push(change);
    }
    if changes.is_empty() {
        return Ok(());
    }
    if let Err(e) = core.record(&st, &changes) {
        let ids: Vec<String> = undo.iter().map(|(id, _)| id.clone()).collect();
        for (id, before) in undo {
            st.apply(match before {
                Some(m) => crate::state::Change::Mapping(m),
                None => crate::state::Change::MappingGone { id },
            });
        }
        core.ports.mark_changed(ids);
        return Err(e);
    }
    Ok(())
}

/// Mappings being published right now, per owner uid: counted with the existing ones so
/// concurrent publishes (which the manager coalesces, so they are not serialized here)
/// cannot overshoot `max_mappings_per_uid` together.
static IN_FLIGHT: std::sync::Mutex<BTreeMap<u32, usize>> = std::sync::Mutex::new(BTreeMap::new());

/// A slot in [`IN_FLIGHT`], released on drop (success or failure: a published mapping is
/// in the manager's table by then).
struct Reservation {
    per_uid: Vec<(u32, usize)>,
}

impl Reservation {
    /// Check `max_mappings_per_uid` for every owner in `reqs` and reserve the new entries.
    /// uid 0 is exempt (its mappings are only ever made by root callers: Publish has no
    /// owner option).
    fn take(core: &Core, reqs: &[PublishRequest]) -> Result<Reservation, OpsError> {
        let mut want: BTreeMap<u32, usize> = BTreeMap::new();
        for r in reqs {
            *want.entry(r.owner_uid).or_default() += 1;
        }
        let mut g = IN_FLIGHT.lock().expect("in-flight publishes");
        for (&uid, &n) in &want {
            if crate::config::quota_exempt(uid, uid) {
                continue;
            }
            let have = core.ports.count_owned(uid) + g.get(&uid).copied().unwrap_or(0);
            let max = core.cfg.max_mappings_per_uid;
            if have + n > max {
                return Err(OpsError::Limit(format!(
                    "uid {uid} has {have} port mappings; {n} more would exceed \
                     max_mappings_per_uid = {max}"
                )));
            }
        }
        for (&uid, &n) in &want {
            *g.entry(uid).or_default() += n;
        }
        Ok(Reservation {
            per_uid: want.into_iter().collect(),
        })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut g = IN_FLIGHT.lock().expect("in-flight publishes");
        for (uid, n) in &self.per_uid {
            if let Some(v) = g.get_mut(uid) {
                *v = v.saturating_sub(*n);
                if *v == 0 {
                    g.remove(uid);
                }
            }
        }
    }
}

/// Would `n` more mappings of `uid` exceed `max_mappings_per_uid`? A fast refusal before
/// any container lookup; [`publish_many`] checks again exactly (with reservations).
pub fn check_mapping_quota(core: &Core, uid: u32, n: usize) -> Result<(), OpsError> {
    if crate::config::quota_exempt(uid, uid) {
        return Ok(());
    }
    let have = core.ports.count_owned(uid);
    let max = core.cfg.max_mappings_per_uid;
    if have + n > max {
        return Err(OpsError::Limit(format!(
            "uid {uid} has {have} port mappings; {n} more would exceed max_mappings_per_uid = {max}"
        )));
    }
    Ok(())
}

/// The full Docker id of the container a Publish names (name or id), for the bus layer's
/// owner check: the requests then name the container by this id, so the container
/// authorized is the container published to. Answered from the ports manager's kept
/// Docker facts when they are still true (no inspect per call; see `ports::facts`).
pub async fn resolve_container(core: &Core, container: &str) -> Result<String, OpsError> {
    if super::containers::check_ref(container).is_err() {
        return Err(OpsError::Invalid(format!(
            "container {container:?}: expected a Docker name or id ([A-Za-z0-9][A-Za-z0-9_.-]*, \
             at most 128)"
        )));
    }
    Ok(core.ports.resolve(container).await?.info.id)
}

/// Publish one port (see [`publish_many`]).
pub async fn publish(core: &Arc<Core>, req: PublishRequest) -> Result<Mapping, OpsError> {
    let mut v = publish_many(core, vec![req]).await?;
    v.pop()
        .ok_or_else(|| OpsError::Task("publish returned nothing".into()))
}

/// Publish several ports: all or nothing, one iptables batch (concurrent calls are
/// coalesced into one batch too), then persisted. If the state cannot be written, the
/// rules are removed again and the write error is returned.
pub async fn publish_many(
    core: &Arc<Core>,
    reqs: Vec<PublishRequest>,
) -> Result<Vec<Mapping>, OpsError> {
    let _reserved = Reservation::take(core, &reqs)?;
    let added = core.ports.publish_many(reqs).await?;
    if let Err(e) = persist(core).await {
        let ids = added.iter().map(|m| m.id.clone()).collect();
        if let Err(e2) = core.ports.unpublish_many(ids).await {
            tracing::error!(error = %e2, "rollback of a publish whose state write failed");
        }
        return Err(e);
    }
    Ok(added)
}

/// The mapping with this id.
pub fn get(core: &Core, id: &str) -> Result<Mapping, OpsError> {
    core.ports.get(id).ok_or_else(|| OpsError::NotFound {
        what: "port mapping",
        name: id.to_owned(),
    })
}

/// Every mapping.
pub fn list(core: &Core) -> Vec<Mapping> {
    core.ports.mappings()
}

/// The mappings of a container (name, id or id prefix).
pub async fn of_container(core: &Core, container: &str) -> Vec<Mapping> {
    core.ports.mappings_of_container(container).await
}

/// Remove mappings by id (one batch), then persist.
pub async fn unpublish_ids(core: &Arc<Core>, ids: Vec<String>) -> Result<Vec<Mapping>, OpsError> {
    let removed = core.ports.unpublish_many(ids).await?;
    persist(core).await?;
    Ok(removed)
}

/// Remove one mapping, then persist.
pub async fn unpublish(core: &Arc<Core>, id: &str) -> Result<Mapping, OpsError> {
    let mut v = unpublish_ids(core, vec![id.to_owned()]).await?;
    v.pop()
        .ok_or_else(|| OpsError::Task("unpublish returned nothing".into()))
}

/// Remove every mapping of an instance (for DestroyInstance). Returns the ids removed
/// (empty when the instance had none).
///
/// A mapping can vanish between the listing and the (all-or-nothing) unpublish: its
/// container was removed and the event watch dropped it (a provisioning service's
/// `docker rm -f` right before DestroyInstance). Then the list is taken again (3 tries),
/// instead of failing the teardown and keeping the instance's record.
pub async fn unpublish_instance(core: &Arc<Core>, instance: &str) -> Result<Vec<String>, OpsError> {
    let mut last = None;
    for _ in 0..3 {
        let ids: Vec<String> = core
            .ports
            .mappings()
            .into_iter()
            .filter(|m| m.instance.as_deref() == Some(instance))
            .map(|m| m.id)
            .collect();
        if ids.is_empty() {
            return Ok(vec![]);
        }
        match unpublish_ids(core, ids).await {
            Ok(v) => return Ok(v.into_iter().map(|m| m.id).collect()),
            Err(e) if crate::error::Classify::kind(&e) == crate::error::Kind::NotFound => {
                last = Some(e)
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.expect("three NotFound tries"))
}

/// The daemon's ports manager on the daemon's one Docker client (`--docker-host`, parsed
/// by [`crate::docker::parse_docker_host`]), acting in the daemon's own network namespace.
pub fn manager_for(docker: crate::docker::Docker) -> Arc<PortsManager> {
    PortsManager::new(docker, crate::ports::NetnsContext::current())
}
