//! Published ports on running containers: DNAT rules in Docker's chains that stay true
//! across container and dockerd restarts.
//!
//! The steps, one file each:
//! - [`types`]: errors, [`Mapping`] (the persisted intent), requests, decisions.
//! - [`validate`]: the caller's arguments, the container's network as Docker reports it,
//!   names that go into rule text, host ports that are taken.
//! - [`commit`]: group commit of publish/unpublish jobs under one write lock.
//! - [`reconcile`]: repair against Docker (start, reconnection, events) and [`watch`].
//! - [`facts`]: container inspects and Docker's published ports kept between calls while
//!   the event stream says they are still true.
//!
//! The firewall behind one trait ([`firewall::Firewall`], chosen by [`firewall::detect`]):
//! - [`iptables`]: iptables-nft / iptables-legacy (save/restore); [`rules`] builds its
//!   batches and parses `iptables-save`.
//! - [`nftables`]: Docker 29's nftables backend (our own table, map elements, the mark
//!   Docker's `--bridge-accept-fwmark` rule accepts); it writes through [`libnft`]
//!   (libnftables in process) or the `nft` program.
//! - [`sockets`]: sockets bound in the daemon's network namespace (port conflicts), read
//!   through sock_diag netlink ([`diag`]) or procfs.
//!
//! Namespace: the manager acts in the network namespace given by its [`NetnsContext`]
//! (`NetnsContext::current()` in the daemon, which runs inside dockerd's netns; a
//! `/run/netns/NAME` file in tests). iptables children `setns()` between fork and exec;
//! `/proc/thread-self/net/*` is read on a short-lived thread that entered the namespace.
//!
//! Ownership: rule tags carry the daemon's state id ([`PortsManager::set_owner`]), so two
//! daemons with different state dirs in one namespace never touch each other's rules.
//!
//! State: [`Mapping`] is serde-serializable; the bus layer persists [`PortsManager::mappings`]
//! after each change (see [`PortsManager::subscribe`]) and calls [`PortsManager::load`]
//! then [`PortsManager::reconcile`] at start.

pub mod commit;
pub mod diag;
pub mod facts;
pub mod firewall;
pub mod hairpin;
pub mod iptables;
pub mod libnft;
pub mod nftables;
pub mod reconcile;
pub mod resolver;
pub mod rules;
pub mod sockets;
pub mod types;
pub mod validate;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, OnceCell};

use crate::docker::{ContainerInfo, Docker, DockerError};

pub use firewall::{Change, Detected, Firewall, Tagged};
pub use iptables::{Flavor, Iptables, NetnsContext};
pub use nftables::{FwMark, Nftables};
pub use reconcile::watch;
pub use resolver::Resolver;
pub use rules::{Batch, IpFamily, Protocol, Rule, RuleKey, RuleSpec};
pub use types::{
    Action, Decision, Family, Mapping, MappingChange, MappingState, PortsError, PublishRequest,
};

use commit::JobKind;
use validate::{pick_ip6, resolve_network, validate};

/// The ports domain: mappings in memory, the firewall through one lock.
pub struct PortsManager {
    /// Container facts (dockerd, or a table in layout tests).
    resolver: Arc<dyn Resolver>,
    /// The dockerd whose events [`watch`] follows (None: no events to follow).
    docker: Option<Docker>,
    netns: NetnsContext,
    /// State id written into every rule tag.
    owner: std::sync::OnceLock<String>,
    backend: OnceCell<Box<dyn Firewall>>,
    /// Why the last detection failed (for the bus property).
    detect_error: Mutex<Option<String>>,
    mappings: Mutex<BTreeMap<String, Mapping>>,
    write_lock: tokio::sync::Mutex<()>,
    pending: Mutex<Vec<commit::Job>>,
    changes: broadcast::Sender<MappingChange>,
    /// Sequence number of lifecycle events seen, and the last one per container id: a
    /// publish whose container had an event after it was inspected is re-resolved.
    event_seq: AtomicU64,
    last_event: Mutex<HashMap<String, u64>>,
    /// (container id, pid) whose bridge port has hairpin mode (see [`hairpin`]).
    hairpin_done: Mutex<std::collections::HashSet<(String, u32)>>,
    /// Docker answers kept while the event stream is followed (see [`facts`]).
    facts: facts::Facts,
    /// Ids changed since the last [`PortsManager::take_changed`] (marked in `emit`, under
    /// the table lock), so persisting costs the change, not the table.
    changed: Mutex<std::collections::HashSet<String>>,
}

fn new_id() -> String {
    // getrandom(2); never the zeros the old /dev/urandom fallback produced.
    crate::random::hex_or_panic(8)
}

impl PortsManager {
    /// A manager acting in `netns` against dockerd at `docker`.
    /// The daemon sets the owner (its state id) with [`PortsManager::set_owner`] before the
    /// first firewall use; [`PortsManager::with_owner`] does both.
    pub fn new(docker: Docker, netns: NetnsContext) -> Arc<PortsManager> {
        Self::build(Arc::new(docker.clone()), Some(docker), netns)
    }

    /// A manager that learns about containers from `resolver` and follows no events.
    pub fn with_resolver(
        resolver: Arc<dyn Resolver>,
        netns: NetnsContext,
        owner: &str,
    ) -> Arc<PortsManager> {
        let m = Self::build(resolver, None, netns);
        m.set_owner(owner);
        m
    }

    fn build(
        resolver: Arc<dyn Resolver>,
        docker: Option<Docker>,
        netns: NetnsContext,
    ) -> Arc<PortsManager> {
        Arc::new(PortsManager {
            resolver,
            docker,
            netns,
            owner: std::sync::OnceLock::new(),
            backend: OnceCell::new(),
            detect_error: Mutex::new(None),
            mappings: Mutex::new(BTreeMap::new()),
            write_lock: tokio::sync::Mutex::new(()),
            pending: Mutex::new(Vec::new()),
            changes: broadcast::channel(4096).0,
            event_seq: AtomicU64::new(0),
            last_event: Mutex::new(HashMap::new()),
            hairpin_done: Mutex::new(std::collections::HashSet::new()),
            facts: facts::Facts::default(),
            changed: Mutex::new(std::collections::HashSet::new()),
        })
    }

    /// A manager whose rules carry `owner` (the state id) in their tags.
    pub fn with_owner(docker: Docker, netns: NetnsContext, owner: &str) -> Arc<PortsManager> {
        let m = PortsManager::new(docker, netns);
        m.set_owner(owner);
        m
    }

    /// Bind the manager to the daemon's state id (first call wins; later calls with another
    /// id are logged and ignored: rules already written carry the first).
    pub fn set_owner(&self, owner: &str) {
        if let Err(other) = self.owner.set(owner.to_owned()) {
            if self.owner.get().map(String::as_str) != Some(other.as_str()) {
                tracing::error!(kept = ?self.owner.get(), ignored = %other, "ports owner set twice");
            }
        }
    }

    /// The dockerd this manager follows (None for a resolver-only manager).
    pub fn docker(&self) -> Option<&Docker> {
        self.docker.as_ref()
    }

    /// The detected firewall (detected once, on first use; retried while detection
    /// fails). The choice and its reason are logged once.
    pub async fn backend(&self) -> Result<&dyn Firewall, PortsError> {
        let b = self
            .backend
            .get_or_try_init(|| async {
                let owner = self.owner.get().ok_or_else(|| {
                    PortsError::Internal("the ports manager has no state id (owner)".into())
                })?;
                let b = match firewall::detect(&self.netns, owner).await {
                    Ok(b) => b,
                    Err(e) => {
                        *self.detect_error.lock().unwrap() = Some(e.to_string());
                        return Err(e);
                    }
                };
                *self.detect_error.lock().unwrap() = None;
                let d = b.detected();
                tracing::info!(backend = d.name, reason = %d.reason, "ports firewall backend");
                Ok::<_, PortsError>(b)
            })
            .await?;
        Ok(b.as_ref())
    }

    /// The backend chosen so far (None: not detected yet), without detecting.
    pub fn detected_now(&self) -> Option<Detected> {
        self.backend.get().map(|b| b.detected())
    }

    /// Why the last detection failed (None: it did not, or none ran).
    pub fn detection_error(&self) -> Option<String> {
        self.detect_error.lock().unwrap().clone()
    }

    /// Whether the detected backend publishes IPv6 too (None: not detected yet).
    pub fn ipv6_now(&self) -> Option<bool> {
        self.backend.get().map(|b| b.ipv6())
    }

    /// The firewall backend chosen and why, detecting it when that has not happened yet.
    pub async fn firewall(&self) -> Result<Detected, PortsError> {
        Ok(self.backend().await?.detected())
    }

    /// Mapping changes (added, state changed, removed).
    pub fn subscribe(&self) -> broadcast::Receiver<MappingChange> {
        self.changes.subscribe()
    }

    /// Snapshot of every mapping (to persist).
    pub fn mappings(&self) -> Vec<Mapping> {
        self.mappings.lock().unwrap().values().cloned().collect()
    }

    pub fn get(&self, id: &str) -> Option<Mapping> {
        self.mappings.lock().unwrap().get(id).cloned()
    }

    /// Replace the in-memory mappings with the persisted ones (at start, before reconcile).
    pub async fn load(&self, mappings: Vec<Mapping>) {
        let _g = self.write_lock.lock().await;
        *self.mappings.lock().unwrap() = mappings.into_iter().map(|m| (m.id.clone(), m)).collect();
    }

    /// Let the container reach its own published ports (once per container start; best
    /// effort, see [`hairpin`]).
    pub(crate) async fn ensure_hairpin(
        &self,
        info: &ContainerInfo,
        ip: std::net::Ipv4Addr,
        bridge: &str,
    ) {
        let key = (info.id.clone(), info.pid);
        if self.hairpin_done.lock().unwrap().contains(&key) {
            return;
        }
        match hairpin::ensure(&self.netns, info.pid, ip, bridge).await {
            Ok(port) => {
                tracing::debug!(container = %info.name, port = %port, "hairpin mode on");
                self.hairpin_done.lock().unwrap().insert(key);
            }
            Err(e) => tracing::warn!(container = %info.name, error = %e,
                "cannot set hairpin mode: the container will not reach its own published ports"),
        }
    }

    /// Report a change of the table (call with the table lock held, after the change).
    fn emit(&self, c: MappingChange) {
        let id = match &c {
            MappingChange::Added(m) | MappingChange::Updated(m) | MappingChange::Removed(m) => {
                m.id.clone()
            }
        };
        self.changed.lock().unwrap().insert(id);
        let _ = self.changes.send(c);
    }

    /// The ids changed since the last call, each with its mapping now (None: removed),
    /// read under the table lock. A caller that cannot store them gives them back with
    /// [`PortsManager::mark_changed`].
    pub fn take_changed(&self) -> Vec<(String, Option<Mapping>)> {
        let table = self.mappings.lock().unwrap();
        let ids = std::mem::take(&mut *self.changed.lock().unwrap());
        ids.into_iter()
            .map(|id| {
                let m = table.get(&id).cloned();
                (id, m)
            })
            .collect()
    }

    /// Mark ids changed again (their store failed).
    pub fn mark_changed(&self, ids: impl IntoIterator<Item = String>) {
        self.changed.lock().unwrap().extend(ids);
    }

    /// How many mappings `uid` owns (without copying the table).
    pub fn count_owned(&self, uid: u32) -> usize {
        self.mappings
            .lock()
            .unwrap()
            .values()
            .filter(|m| m.owner_uid == uid)
            .count()
    }

    /// The container by name or id, from [`facts`] when it is known and still true, else
    /// inspected (and kept). The bus layer resolves through this before authorizing, then
    /// names the container by the id it got, so the container checked is the one acted on.
    pub async fn resolve(&self, container: &str) -> Result<facts::Fact, PortsError> {
        if let Some(f) = self.facts.container(container) {
            return Ok(f);
        }
        let ticket = self.facts.ticket();
        let seq = self.event_seq.load(Ordering::SeqCst);
        let info = match self.resolver.inspect(container).await {
            Ok(i) => i,
            Err(DockerError::NotFound { .. }) => {
                return Err(PortsError::ContainerNotFound {
                    container: container.to_owned(),
                })
            }
            Err(e) => return Err(e.into()),
        };
        let fact = facts::Fact { info, seq };
        self.facts.store_container(ticket, &fact);
        Ok(fact)
    }

    /// Publish one port.
    pub async fn publish(self: &Arc<Self>, req: PublishRequest) -> Result<Mapping, PortsError> {
        let mut v = self.publish_many(vec![req]).await?;
        v.pop()
            .ok_or_else(|| PortsError::Internal("publish returned nothing".into()))
    }

    /// Publish several ports in one call: all or nothing, one iptables-restore.
    pub async fn publish_many(
        self: &Arc<Self>,
        reqs: Vec<PublishRequest>,
    ) -> Result<Vec<Mapping>, PortsError> {
        if reqs.is_empty() {
            return Ok(vec![]);
        }
        let vals = reqs.iter().map(validate).collect::<Result<Vec<_>, _>>()?;
        // fail early (NotSupported) before asking Docker anything
        let docker_v6 = self.backend().await?.ipv6();

        // the oldest fact used: the write round re-resolves a container with a lifecycle
        // event after it
        let mut seen = u64::MAX;
        let mut infos: HashMap<String, ContainerInfo> = HashMap::new();
        for v in &vals {
            if !infos.contains_key(&v.container) {
                let f = self.resolve(&v.container).await?;
                seen = seen.min(f.seq);
                infos.insert(v.container.clone(), f.info);
            }
        }
        let mut mappings = Vec::with_capacity(vals.len());
        for v in &vals {
            let info = &infos[&v.container];
            if info.network_mode == "host" {
                resolve_network(info, None)?; // the host-network error
            }
            if !info.running {
                return Err(PortsError::NotRunning {
                    container: info.name.clone(),
                });
            }
            let (network, ip, bridge) = resolve_network(info, v.network.as_deref())?;
            let ip6 = pick_ip6(info, &network, v.family, v.host_ip, docker_v6)?;
            mappings.push(Mapping {
                id: new_id(),
                container_id: info.id.clone(),
                container_name: info.name.clone(),
                protocol: v.protocol,
                host_ip: v.host_ip,
                host_port: v.host_port,
                container_port: v.container_port,
                network,
                owner_uid: v.owner_uid,
                instance: v.instance.clone(),
                family: v.family,
                state: MappingState::Active { ip, bridge, ip6 },
            });
        }
        // within the request
        for (i, a) in mappings.iter().enumerate() {
            if mappings[..i].iter().any(|b| b.collides_with(a)) {
                return Err(PortsError::Conflict {
                    reason: format!(
                        "host port {}/{} appears twice in the request",
                        a.host_port, a.protocol
                    ),
                });
            }
        }
        for info in infos.values() {
            if let Some(MappingState::Active { ip, bridge, .. }) = mappings
                .iter()
                .find(|m| m.container_id == info.id)
                .map(|m| &m.state)
            {
                self.ensure_hairpin(info, *ip, bridge).await;
            }
        }
        self.submit(JobKind::Add(mappings, seen)).await
    }

    /// Remove one mapping and its rules.
    pub async fn unpublish(self: &Arc<Self>, id: &str) -> Result<Mapping, PortsError> {
        let mut v = self.submit(JobKind::Remove(vec![id.to_owned()])).await?;
        v.pop()
            .ok_or_else(|| PortsError::Internal("unpublish returned nothing".into()))
    }

    /// Remove several mappings and their rules in one batch (all or nothing).
    pub async fn unpublish_many(
        self: &Arc<Self>,
        ids: Vec<String>,
    ) -> Result<Vec<Mapping>, PortsError> {
        if ids.is_empty() {
            return Ok(vec![]);
        }
        self.submit(JobKind::Remove(ids)).await
    }

    /// The mappings of a container, by name, id or id prefix (≥ 12 characters); when none
    /// matches, Docker is asked for the container's id (a renamed container).
    pub async fn mappings_of_container(&self, container: &str) -> Vec<Mapping> {
        let find = |c: &str| -> Vec<Mapping> {
            self.mappings
                .lock()
                .unwrap()
                .values()
                .filter(|m| {
                    m.container_name == c
                        || m.container_id == c
                        || (c.len() >= 12 && m.container_id.starts_with(c))
                })
                .cloned()
                .collect()
        };
        let mut found = find(container);
        if found.is_empty() {
            if let Ok(info) = self.resolver.inspect(container).await {
                found = find(&info.id);
            }
        }
        found
    }

    /// Remove every mapping of a container (by name, id or id prefix; the container may be
    /// gone already).
    pub async fn unpublish_container(
        self: &Arc<Self>,
        container: &str,
    ) -> Result<Vec<Mapping>, PortsError> {
        let ids: Vec<String> = self
            .mappings_of_container(container)
            .await
            .into_iter()
            .map(|m| m.id)
            .collect();
        if ids.is_empty() {
            return Err(PortsError::MappingNotFound {
                id: format!("(any mapping of container {container})"),
            });
        }
        self.submit(JobKind::Remove(ids)).await
    }
}
