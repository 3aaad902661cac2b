//! Published ports on running containers: DNAT rules in Docker's chains that stay true
//! across container and dockerd restarts.
//!
//! - [`rules`]: pure builders of the `iptables-restore` batches (what dockerd writes for
//!   `-p`, tagged `dindhelper:<id>`) and the parser of `iptables-save` output.
//! - [`backend`]: which iptables (nft/legacy) holds Docker's chains; save/restore.
//! - [`sockets`]: sockets bound in the daemon's network namespace (port conflicts), read
//!   through sock_diag netlink ([`diag`]) or procfs.
//! - [`PortsManager`]: publish / unpublish / reconcile / on_event, and [`watch`], the task
//!   that follows Docker events and re-applies everything after a dockerd restart.
//!
//! Namespace: the manager acts in the network namespace given by its [`NetnsContext`]
//! (`NetnsContext::current()` in the daemon, which runs inside dockerd's netns; a
//! `/run/netns/NAME` file in tests). iptables children `setns()` between fork and exec;
//! `/proc/thread-self/net/*` is read on a short-lived thread that entered the namespace.
//!
//! Serialization: every iptables write goes through one async lock (`write_lock`).
//! Mappings enter or leave the in-memory table only while that lock is held, so a
//! reconcile can never see a mapping whose rules are still being written (no duplicates).
//! Concurrent publishes coalesce: each queues a job and spawns a round; the round that
//! holds the lock next runs every queued job as ONE `iptables-restore` (group commit); if
//! that combined batch fails, the jobs are retried one by one so each caller gets its own
//! answer.
//!
//! State: [`Mapping`] is serde-serializable; the bus layer persists [`PortsManager::mappings`]
//! after each change (see [`PortsManager::subscribe`]) and calls [`PortsManager::load`]
//! then [`PortsManager::reconcile`] at start.

pub mod backend;
pub mod diag;
pub mod rules;
pub mod sockets;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, oneshot, OnceCell};

use crate::docker::{ContainerEvent, ContainerInfo, Docker, DockerError, PublishedPort};
use crate::error::{Classify, Kind};

pub use backend::{Flavor, Iptables, NetnsContext};
pub use rules::{Batch, Protocol, Rule, RuleKey, RuleSpec};

/// Errors of the ports module.
#[derive(Debug, thiserror::Error)]
pub enum PortsError {
    #[error("invalid arguments: {reason}")]
    InvalidArgs { reason: String },
    #[error("no such container: {container}")]
    ContainerNotFound { container: String },
    #[error("no such mapping: {id}")]
    MappingNotFound { id: String },
    #[error("container {container} is not running; start it before publishing a port")]
    NotRunning { container: String },
    #[error("{reason}")]
    Conflict { reason: String },
    #[error("not supported: {reason}")]
    NotSupported { reason: String },
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error("{command} failed (exit {status}): {stderr}")]
    Iptables {
        command: String,
        status: i32,
        stderr: String,
    },
    #[error("cannot run {command}: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

impl Classify for PortsError {
    fn kind(&self) -> Kind {
        match self {
            PortsError::InvalidArgs { .. } => Kind::InvalidArgs,
            PortsError::ContainerNotFound { .. } | PortsError::MappingNotFound { .. } => {
                Kind::NotFound
            }
            PortsError::NotRunning { .. } | PortsError::Conflict { .. } => Kind::Conflict,
            PortsError::NotSupported { .. } => Kind::NotSupported,
            PortsError::Docker(e) => e.kind(),
            PortsError::Spawn { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                Kind::NotSupported
            }
            _ => Kind::Failed,
        }
    }
}

/// Where a mapping stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MappingState {
    /// Rules are written for this container address behind this bridge.
    Active { ip: Ipv4Addr, bridge: String },
    /// The container is stopped; no rules; they come back when it starts.
    Waiting,
    /// The container runs but the mapping cannot be applied (network gone, …).
    Error(String),
}

/// A published port (the intent, plus its current state).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    pub id: String,
    pub container_id: String,
    pub container_name: String,
    pub protocol: Protocol,
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub container_port: u16,
    /// Docker network name the DNAT points into.
    pub network: String,
    pub owner_uid: u32,
    pub instance: Option<String>,
    pub state: MappingState,
}

impl Mapping {
    /// The rule parameters when active.
    pub fn spec(&self) -> Option<RuleSpec> {
        match &self.state {
            MappingState::Active { ip, bridge } => Some(RuleSpec {
                id: self.id.clone(),
                protocol: self.protocol,
                host_ip: self.host_ip,
                host_port: self.host_port,
                container_ip: *ip,
                container_port: self.container_port,
                bridge: bridge.clone(),
            }),
            _ => None,
        }
    }

    fn collides(&self, protocol: Protocol, host_ip: Option<Ipv4Addr>, host_port: u16) -> bool {
        self.protocol == protocol
            && self.host_port == host_port
            && (self.host_ip.is_none() || host_ip.is_none() || self.host_ip == host_ip)
    }
}

/// A publish call's arguments, unvalidated (as they come from the bus).
#[derive(Debug, Clone, Default)]
pub struct PublishRequest {
    /// Container name or id.
    pub container: String,
    /// "tcp" or "udp".
    pub protocol: String,
    pub host_port: u32,
    pub container_port: u32,
    /// Host IPv4 address to restrict the DNAT to ("" / None / "0.0.0.0": every address).
    pub host_ip: Option<String>,
    /// Docker network when the container has several.
    pub network: Option<String>,
    pub owner_uid: u32,
    pub instance: Option<String>,
}

/// A change the bus layer turns into signals / property updates and persists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MappingChange {
    Added(Mapping),
    Updated(Mapping),
    Removed(Mapping),
}

/// What reconcile did for one mapping id (for logging).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub mapping_id: String,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Rules were already right.
    Unchanged,
    /// Rules added / removed to match (missing rules, new container IP, duplicates).
    Repaired { added: usize, removed: usize },
    /// Container stopped: rules removed, mapping waits.
    Waiting { removed: usize },
    /// Container destroyed: mapping dropped, rules removed.
    Dropped { removed: usize },
    /// Tagged rules of an id state does not know: removed.
    OrphanRemoved { removed: usize },
    /// Mapping cannot be applied (state Error).
    Error(String),
    /// Docker could not be asked; rules left as they are.
    Skipped(String),
}

enum JobKind {
    /// New mappings, and the event sequence number read before their containers were
    /// inspected.
    Add(Vec<Mapping>, u64),
    Remove(Vec<String>),
}

struct Job {
    kind: JobKind,
    tx: oneshot::Sender<Result<Vec<Mapping>, PortsError>>,
}

/// The ports domain: mappings in memory, iptables through one lock.
pub struct PortsManager {
    docker: Docker,
    netns: NetnsContext,
    backend: OnceCell<Iptables>,
    mappings: Mutex<BTreeMap<String, Mapping>>,
    write_lock: tokio::sync::Mutex<()>,
    pending: Mutex<Vec<Job>>,
    changes: broadcast::Sender<MappingChange>,
    /// Sequence number of lifecycle events seen, and the last one per container id: a
    /// publish whose container had an event after it was inspected is re-resolved.
    event_seq: AtomicU64,
    last_event: Mutex<HashMap<String, u64>>,
}

fn new_id() -> String {
    // getrandom(2); never the zeros the old /dev/urandom fallback produced.
    crate::random::hex_or_panic(8)
}

fn invalid(reason: impl Into<String>) -> PortsError {
    PortsError::InvalidArgs {
        reason: reason.into(),
    }
}

struct Validated {
    container: String,
    protocol: Protocol,
    host_port: u16,
    container_port: u16,
    host_ip: Option<Ipv4Addr>,
    network: Option<String>,
    owner_uid: u32,
    instance: Option<String>,
}

fn validate(r: &PublishRequest) -> Result<Validated, PortsError> {
    let protocol = Protocol::parse(&r.protocol).ok_or_else(|| {
        invalid(format!(
            "protocol must be \"tcp\" or \"udp\", not {:?}",
            r.protocol
        ))
    })?;
    let port = |what: &str, p: u32| -> Result<u16, PortsError> {
        match u16::try_from(p) {
            Ok(v) if v != 0 => Ok(v),
            _ => Err(invalid(format!("{what} must be 1..65535, not {p}"))),
        }
    };
    let host_port = port("host port", r.host_port)?;
    let container_port = port("container port", r.container_port)?;
    let host_ip = match r.host_ip.as_deref() {
        None | Some("") => None,
        Some(s) => {
            let ip: Ipv4Addr = s
                .parse()
                .map_err(|_| invalid(format!("host_ip {s:?} is not an IPv4 address")))?;
            (!ip.is_unspecified()).then_some(ip)
        }
    };
    if r.container.is_empty() {
        return Err(invalid("container must not be empty"));
    }
    Ok(Validated {
        container: r.container.clone(),
        protocol,
        host_port,
        container_port,
        host_ip,
        network: r.network.clone().filter(|n| !n.is_empty()),
        owner_uid: r.owner_uid,
        instance: r.instance.clone().filter(|n| !n.is_empty()),
    })
}

/// The network of `info` a mapping uses: (name, ip, bridge).
fn resolve_network(
    info: &ContainerInfo,
    wanted: Option<&str>,
) -> Result<(String, Ipv4Addr, String), PortsError> {
    if info.network_mode == "host" {
        return Err(invalid(format!(
            "container {} uses the host network: its ports are the host's already; nothing to publish",
            info.name
        )));
    }
    let att = match wanted {
        Some(n) => info
            .networks
            .iter()
            .find(|a| a.network_name == n)
            .ok_or_else(|| {
                invalid(format!(
                    "container {} is not attached to network {n:?} (attached: {})",
                    info.name,
                    names(info)
                ))
            })?,
        None => match info.networks.as_slice() {
            [one] => one,
            [] => return Err(invalid(format!("container {} has no network", info.name))),
            _ => {
                return Err(invalid(format!(
                    "container {} is attached to several networks ({}): pass option \"network\"",
                    info.name,
                    names(info)
                )))
            }
        },
    };
    let bridge = att
        .bridge_interface
        .clone()
        .ok_or_else(|| PortsError::NotSupported {
            reason: format!(
                "network {} of container {} is not a bridge network",
                att.network_name, info.name
            ),
        })?;
    let ip = att.ip.ok_or_else(|| {
        invalid(format!(
            "container {} has no IPv4 address on network {}",
            info.name, att.network_name
        ))
    })?;
    Ok((att.network_name.clone(), ip, bridge))
}

fn names(info: &ContainerInfo) -> String {
    info.networks
        .iter()
        .map(|a| a.network_name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Pure diff: the batch that turns `live` (tagged rules found) into `desired`, touching only
/// live rules whose id passes `in_scope`. Keeps the first copy of each wanted rule, deletes
/// duplicates, stale rules (e.g. old container IP) and orphans, adds what is missing.
pub fn plan_repair(desired: &[Rule], live: &[Rule], in_scope: impl Fn(&str) -> bool) -> Batch {
    let want: HashSet<(String, RuleKey)> =
        desired.iter().map(|r| (r.id.clone(), r.key())).collect();
    let mut seen: HashSet<(String, RuleKey)> = HashSet::new();
    let mut batch = Batch::default();
    for r in live.iter().filter(|r| in_scope(&r.id)) {
        let k = (r.id.clone(), r.key());
        if want.contains(&k) && seen.insert(k) {
            continue;
        }
        batch.delete.push(r.clone());
    }
    for r in desired {
        if seen.insert((r.id.clone(), r.key())) {
            batch.add.push(r.clone());
        }
    }
    batch
}

/// A mapping's host port taken by Docker (`-p`) or by a bound socket in the namespace.
fn external_conflict(
    m: &Mapping,
    docker_ports: &[PublishedPort],
    bound: &[sockets::Bound],
) -> Option<PortsError> {
    if let Some(p) = docker_ports.iter().find(|p| {
        p.protocol == m.protocol.as_str()
            && p.public_port == m.host_port
            && match (m.host_ip, p.ip.parse::<std::net::IpAddr>()) {
                (Some(want), Ok(ip)) => ip.is_unspecified() || ip == want,
                _ => true,
            }
    }) {
        return Some(PortsError::Conflict {
            reason: format!(
                "host port {}/{} is already published by Docker (container {})",
                m.host_port,
                m.protocol,
                &p.container_id[..p.container_id.len().min(12)]
            ),
        });
    }
    bound
        .iter()
        .find(|b| b.collides(m.protocol, m.host_ip, m.host_port))
        .map(|b| PortsError::Conflict {
            reason: format!(
                "host port {}/{} is in use by a socket bound to {}",
                m.host_port, m.protocol, b.addr
            ),
        })
}

impl PortsManager {
    /// A manager acting in `netns` against dockerd at `docker`.
    pub fn new(docker: Docker, netns: NetnsContext) -> Arc<PortsManager> {
        Arc::new(PortsManager {
            docker,
            netns,
            backend: OnceCell::new(),
            mappings: Mutex::new(BTreeMap::new()),
            write_lock: tokio::sync::Mutex::new(()),
            pending: Mutex::new(Vec::new()),
            changes: broadcast::channel(4096).0,
            event_seq: AtomicU64::new(0),
            last_event: Mutex::new(HashMap::new()),
        })
    }

    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    /// The detected backend (detected once, on first use; retried while detection fails).
    pub async fn backend(&self) -> Result<&Iptables, PortsError> {
        self.backend
            .get_or_try_init(|| Iptables::detect(&self.netns))
            .await
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

    fn emit(&self, c: MappingChange) {
        let _ = self.changes.send(c);
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
        self.backend().await?;

        let seen = self.event_seq.load(Ordering::SeqCst);
        let mut infos: HashMap<String, ContainerInfo> = HashMap::new();
        for v in &vals {
            if !infos.contains_key(&v.container) {
                let info = match self.docker.inspect(&v.container).await {
                    Ok(i) => i,
                    Err(DockerError::NotFound { .. }) => {
                        return Err(PortsError::ContainerNotFound {
                            container: v.container.clone(),
                        })
                    }
                    Err(e) => return Err(e.into()),
                };
                infos.insert(v.container.clone(), info);
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
                state: MappingState::Active { ip, bridge },
            });
        }
        // within the request
        for (i, a) in mappings.iter().enumerate() {
            if mappings[..i]
                .iter()
                .any(|b| b.collides(a.protocol, a.host_ip, a.host_port))
            {
                return Err(PortsError::Conflict {
                    reason: format!(
                        "host port {}/{} appears twice in the request",
                        a.host_port, a.protocol
                    ),
                });
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
            if let Ok(info) = self.docker.inspect(container).await {
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

    /// A container restarted (new IP) or stopped between its inspect and the write: look
    /// again. Caller holds `write_lock`.
    async fn refresh_if_changed(&self, ms: &mut [Mapping], seen: u64) -> Result<(), PortsError> {
        let stale: HashSet<String> = {
            let le = self.last_event.lock().unwrap();
            ms.iter()
                .filter(|m| le.get(&m.container_id).is_some_and(|s| *s > seen))
                .map(|m| m.container_id.clone())
                .collect()
        };
        for cid in stale {
            let info = match self.docker.inspect(&cid).await {
                Ok(i) => i,
                Err(DockerError::NotFound { .. }) => {
                    return Err(PortsError::ContainerNotFound { container: cid })
                }
                Err(e) => return Err(e.into()),
            };
            if !info.running {
                return Err(PortsError::NotRunning {
                    container: info.name,
                });
            }
            for m in ms.iter_mut().filter(|m| m.container_id == cid) {
                let (_, ip, bridge) = resolve_network(&info, Some(&m.network))?;
                m.state = MappingState::Active { ip, bridge };
            }
        }
        Ok(())
    }

    /// Ports Docker publishes and sockets bound in the namespace (conflict sources).
    async fn external_state(
        &self,
    ) -> Result<(Vec<PublishedPort>, Vec<sockets::Bound>), PortsError> {
        let dp = self.docker.published_ports().await?;
        let bound = self
            .netns
            .run(sockets::read_bound)?
            .map_err(|source| PortsError::Spawn {
                command: "read /proc/thread-self/net".into(),
                source,
            })?;
        Ok((dp, bound))
    }

    /// Queue a job and make sure it runs (group commit).
    /// The round runs in its own task: a caller that goes away (cancelled bus call) cannot
    /// stop a restore half-way or leave the table out of step with the rules.
    async fn submit(self: &Arc<Self>, kind: JobKind) -> Result<Vec<Mapping>, PortsError> {
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().push(Job { kind, tx });
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let _g = me.write_lock.lock().await;
            let jobs = std::mem::take(&mut *me.pending.lock().unwrap());
            if !jobs.is_empty() {
                let t = std::time::Instant::now();
                let n = jobs.len();
                me.run_jobs(jobs).await;
                tracing::debug!(
                    jobs = n,
                    ms = t.elapsed().as_millis() as u64,
                    "ports write round"
                );
            }
        });
        rx.await
            .unwrap_or_else(|_| Err(PortsError::Internal("job was cancelled".into())))
    }

    /// Runs queued jobs as one batch. Caller holds `write_lock`.
    async fn run_jobs(&self, jobs: Vec<Job>) {
        let backend = match self.backend().await {
            Ok(b) => b.clone(),
            Err(_) => {
                for j in jobs {
                    let e = self.backend().await.err().unwrap_or_else(|| {
                        PortsError::Internal("backend detection flapped".into())
                    });
                    let _ = j.tx.send(Err(e));
                }
                return;
            }
        };
        // 0. re-resolve new mappings whose container had an event since it was inspected
        let mut fresh = Vec::with_capacity(jobs.len());
        for mut job in jobs {
            if let JobKind::Add(ms, seen) = &mut job.kind {
                if let Err(e) = self.refresh_if_changed(ms, *seen).await {
                    let _ = job.tx.send(Err(e));
                    continue;
                }
            }
            fresh.push(job);
        }
        let jobs = fresh;
        // 0. what Docker publishes and what is bound, read once per round (under the lock)
        let any_add = jobs.iter().any(|j| matches!(j.kind, JobKind::Add(..)));
        let external = if any_add {
            self.external_state().await.map_err(|e| e.to_string())
        } else {
            Ok((vec![], vec![]))
        };
        // 1. validate against the table (and earlier jobs of this round)
        let mut accepted: Vec<(Job, Batch)> = Vec::new();
        let mut claimed: Vec<Mapping> = Vec::new();
        let mut removing: HashSet<String> = HashSet::new();
        let mut live: Option<Vec<Rule>> = None;
        for job in jobs {
            let check = {
                let table = self.mappings.lock().unwrap();
                match &job.kind {
                    JobKind::Add(..) if external.is_err() => Err(PortsError::Internal(format!(
                        "cannot check for port conflicts: {}",
                        external.as_ref().err().unwrap()
                    ))),
                    JobKind::Add(ms, _) => ms
                        .iter()
                        .find_map(|m| {
                            let (dp, bound) = external.as_ref().unwrap();
                            if let Some(e) = external_conflict(m, dp, bound) {
                                return Some(e);
                            }
                            table
                                .values()
                                .chain(claimed.iter())
                                .find(|o| o.collides(m.protocol, m.host_ip, m.host_port))
                                .map(|o| PortsError::Conflict {
                                    reason: format!(
                                        "host port {}/{} is already published by dindhelper (mapping {} on container {})",
                                        m.host_port, m.protocol, o.id, o.container_name
                                    ),
                                })
                        })
                        .map_or(Ok(()), Err),
                    JobKind::Remove(ids) => ids
                        .iter()
                        .find(|id| !table.contains_key(*id) || removing.contains(*id))
                        .map_or(Ok(()), |id| {
                            Err(PortsError::MappingNotFound { id: id.clone() })
                        }),
                }
            };
            if let Err(e) = check {
                let _ = job.tx.send(Err(e));
                continue;
            }
            let batch = match &job.kind {
                JobKind::Add(ms, _) => {
                    claimed.extend(ms.iter().cloned());
                    let specs: Vec<RuleSpec> = ms.iter().filter_map(Mapping::spec).collect();
                    rules::add_batch(&specs)
                }
                JobKind::Remove(ids) => {
                    if live.is_none() {
                        match backend.list_tagged().await {
                            Ok(l) => live = Some(l),
                            Err(e) => {
                                let _ = job.tx.send(Err(e));
                                continue;
                            }
                        }
                    }
                    removing.extend(ids.iter().cloned());
                    let set: HashSet<&String> = ids.iter().collect();
                    Batch {
                        delete: live
                            .as_ref()
                            .unwrap()
                            .iter()
                            .filter(|r| set.contains(&r.id))
                            .cloned()
                            .collect(),
                        add: vec![],
                    }
                }
            };
            accepted.push((job, batch));
        }
        if accepted.is_empty() {
            return;
        }
        // 2. one restore for everything
        let mut all = Batch::default();
        for (_, b) in &accepted {
            all.extend(b.clone());
        }
        let combined = backend.restore(&all.render()).await;
        if combined.is_ok() || accepted.len() == 1 {
            let mut res = Some(combined);
            for (job, _) in accepted {
                let r = match res.take() {
                    Some(Err(e)) => Err(e),
                    _ => Ok(()),
                };
                self.finish(job, r);
            }
            return;
        }
        // 3. the combined batch failed (nothing was applied): one by one
        for (job, b) in accepted {
            let r = backend.restore(&b.render()).await;
            self.finish(job, r);
        }
    }

    fn finish(&self, job: Job, r: Result<(), PortsError>) {
        let out = r.map(|()| {
            let mut table = self.mappings.lock().unwrap();
            match job.kind {
                JobKind::Add(ms, _) => {
                    for m in &ms {
                        table.insert(m.id.clone(), m.clone());
                        self.emit(MappingChange::Added(m.clone()));
                    }
                    ms
                }
                JobKind::Remove(ids) => ids
                    .iter()
                    .filter_map(|id| table.remove(id))
                    .inspect(|m| self.emit(MappingChange::Removed(m.clone())))
                    .collect(),
            }
        });
        let _ = job.tx.send(out);
    }

    /// Bring every mapping and every tagged rule in line with Docker: repair missing rules
    /// (with the container's current IP), remove rules of stopped containers (mapping
    /// waits), drop mappings of destroyed containers, delete tagged orphans.
    pub async fn reconcile(&self) -> Result<Vec<Decision>, PortsError> {
        let _g = self.write_lock.lock().await;
        self.reconcile_locked(None).await
    }

    /// The same for one container, after a Docker event.
    pub async fn on_event(&self, ev: &ContainerEvent) -> Result<Vec<Decision>, PortsError> {
        if !ev.is_lifecycle() {
            return Ok(vec![]);
        }
        let seq = self.event_seq.fetch_add(1, Ordering::SeqCst) + 1;
        self.last_event
            .lock()
            .unwrap()
            .insert(ev.container_id.clone(), seq);
        let _g = self.write_lock.lock().await;
        let has = self
            .mappings
            .lock()
            .unwrap()
            .values()
            .any(|m| m.container_id == ev.container_id);
        if !has {
            return Ok(vec![]);
        }
        self.reconcile_locked(Some(&ev.container_id)).await
    }

    async fn reconcile_locked(&self, scope: Option<&str>) -> Result<Vec<Decision>, PortsError> {
        let backend = self.backend().await?.clone();
        let snapshot: Vec<Mapping> = self
            .mappings
            .lock()
            .unwrap()
            .values()
            .filter(|m| scope.is_none_or(|c| m.container_id == c))
            .cloned()
            .collect();
        let mut by_container: BTreeMap<&str, Vec<&Mapping>> = BTreeMap::new();
        for m in &snapshot {
            by_container.entry(&m.container_id).or_default().push(m);
        }
        // new state per mapping id; None = drop
        let mut new_state: BTreeMap<String, Option<MappingState>> = BTreeMap::new();
        let mut untouched: HashMap<String, String> = HashMap::new();
        let mut desired: Vec<Rule> = Vec::new();
        for (cid, ms) in by_container {
            match self.docker.inspect(cid).await {
                Ok(info) if info.running => {
                    for m in ms {
                        match resolve_network(&info, Some(&m.network)) {
                            Ok((_, ip, bridge)) => {
                                let mut m2 = m.clone();
                                m2.state = MappingState::Active { ip, bridge };
                                desired.extend(rules::rules_for(&m2.spec().unwrap()));
                                new_state.insert(m.id.clone(), Some(m2.state));
                            }
                            Err(e) => {
                                new_state
                                    .insert(m.id.clone(), Some(MappingState::Error(e.to_string())));
                            }
                        }
                    }
                }
                Ok(_) => {
                    for m in ms {
                        new_state.insert(m.id.clone(), Some(MappingState::Waiting));
                    }
                }
                Err(DockerError::NotFound { .. }) => {
                    for m in ms {
                        new_state.insert(m.id.clone(), None);
                    }
                }
                Err(e) => {
                    for m in ms {
                        untouched.insert(m.id.clone(), e.to_string());
                    }
                }
            }
        }
        let live = backend.list_tagged().await?;
        let known: HashSet<&str> = snapshot.iter().map(|m| m.id.as_str()).collect();
        let in_scope =
            |id: &str| !untouched.contains_key(id) && (scope.is_none() || known.contains(id));
        let batch = plan_repair(&desired, &live, in_scope);
        backend.restore(&batch.render()).await?;

        // decisions + table update
        let mut added: HashMap<&str, usize> = HashMap::new();
        let mut removed: HashMap<&str, usize> = HashMap::new();
        for r in &batch.add {
            *added.entry(&r.id).or_default() += 1;
        }
        for r in &batch.delete {
            *removed.entry(&r.id).or_default() += 1;
        }
        let mut decisions = Vec::new();
        let mut table = self.mappings.lock().unwrap();
        for m in &snapshot {
            let a = added.get(m.id.as_str()).copied().unwrap_or(0);
            let d = removed.get(m.id.as_str()).copied().unwrap_or(0);
            let action = if let Some(reason) = untouched.get(&m.id) {
                Action::Skipped(reason.clone())
            } else {
                match new_state.get(&m.id) {
                    Some(None) => {
                        if let Some(old) = table.remove(&m.id) {
                            self.emit(MappingChange::Removed(old));
                        }
                        Action::Dropped { removed: d }
                    }
                    Some(Some(st)) => {
                        if let Some(cur) = table.get_mut(&m.id) {
                            if cur.state != *st {
                                cur.state = st.clone();
                                self.emit(MappingChange::Updated(cur.clone()));
                            }
                        }
                        match st {
                            MappingState::Waiting => Action::Waiting { removed: d },
                            MappingState::Error(e) => Action::Error(e.clone()),
                            MappingState::Active { .. } if a == 0 && d == 0 => Action::Unchanged,
                            MappingState::Active { .. } => Action::Repaired {
                                added: a,
                                removed: d,
                            },
                        }
                    }
                    None => Action::Unchanged,
                }
            };
            decisions.push(Decision {
                mapping_id: m.id.clone(),
                action,
            });
        }
        for (id, n) in &removed {
            if !known.contains(id) {
                decisions.push(Decision {
                    mapping_id: (*id).to_owned(),
                    action: Action::OrphanRemoved { removed: *n },
                });
            }
        }
        Ok(decisions)
    }
}

/// Follow Docker events forever: on every (re)connection run a full reconcile (this is
/// what re-applies the rules after dockerd restarted and flushed its chains), then
/// reconcile each container that has a lifecycle event. Reconnects with a short backoff
/// (50 ms doubling to 500 ms) so a restarted dockerd is caught within about a second.
/// Runs until the task is aborted. Every event is also sent to `forward` (when given),
/// so other capabilities (instances re-applying oom_score_adj) share this one stream.
pub async fn watch(
    manager: Arc<PortsManager>,
    forward: Option<tokio::sync::mpsc::UnboundedSender<crate::docker::ContainerEvent>>,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let mut stream = match manager.docker.events().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "docker events: not reachable, retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        let mut retry: Option<tokio::task::JoinHandle<()>> = None;
        match manager.reconcile().await {
            Ok(d) => log_decisions("reconcile after (re)connecting to dockerd", &d),
            Err(e) => {
                // e.g. dockerd answers but has not written its chains yet (or the daemon
                // runs where Docker has no chains): retry beside the event loop, so the
                // events are still followed and forwarded meanwhile.
                tracing::warn!(error = %e, "ports reconcile failed; retrying every 1 s");
                let m = manager.clone();
                retry = Some(tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        match m.reconcile().await {
                            Ok(d) => {
                                log_decisions("reconcile after (re)connecting to dockerd", &d);
                                break;
                            }
                            Err(e) => tracing::debug!(error = %e, "ports reconcile still failing"),
                        }
                    }
                }));
            }
        }
        loop {
            match stream.next().await {
                Ok(Some(ev)) => {
                    match manager.on_event(&ev).await {
                        Ok(d) => log_decisions(&format!("docker event {}", ev.action), &d),
                        Err(e) => {
                            tracing::warn!(error = %e, container = %ev.container_id, "ports: event handling failed")
                        }
                    }
                    if let Some(f) = &forward {
                        let _ = f.send(ev);
                    }
                }
                Ok(None) => {
                    tracing::info!("docker event stream ended; reconnecting");
                    break;
                }
                Err(e) => {
                    tracing::info!(error = %e, "docker event stream broke; reconnecting");
                    break;
                }
            }
        }
        if let Some(r) = retry {
            r.abort();
        }
    }
}

fn log_decisions(context: &str, ds: &[Decision]) {
    for d in ds {
        if d.action != Action::Unchanged {
            tracing::info!(mapping = %d.mapping_id, action = ?d.action, "{context}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docker::NetworkAttachment;

    fn spec(id: &str, ip: [u8; 4]) -> RuleSpec {
        RuleSpec {
            id: id.into(),
            protocol: Protocol::Tcp,
            host_ip: None,
            host_port: 8080,
            container_ip: Ipv4Addr::from(ip),
            container_port: 80,
            bridge: "docker0".into(),
        }
    }

    #[test]
    fn validation() {
        let ok = PublishRequest {
            container: "web".into(),
            protocol: "tcp".into(),
            host_port: 8080,
            container_port: 80,
            ..Default::default()
        };
        assert!(validate(&ok).is_ok());
        for bad in [
            PublishRequest {
                protocol: "sctp".into(),
                ..ok.clone()
            },
            PublishRequest {
                host_port: 0,
                ..ok.clone()
            },
            PublishRequest {
                container_port: 70000,
                ..ok.clone()
            },
            PublishRequest {
                host_ip: Some("::1".into()),
                ..ok.clone()
            },
            PublishRequest {
                container: "".into(),
                ..ok.clone()
            },
        ] {
            assert_eq!(validate(&bad).err().unwrap().kind(), Kind::InvalidArgs);
        }
        let v = validate(&PublishRequest {
            host_ip: Some("0.0.0.0".into()),
            ..ok
        })
        .unwrap();
        assert_eq!(v.host_ip, None);
    }

    #[test]
    fn plan_adds_missing_and_keeps_present() {
        let want = rules::rules_for(&spec("a", [172, 17, 0, 2]));
        let live = rules::parse_tagged(
            "*nat\n-A DOCKER ! -i docker0 -p tcp -m tcp --dport 8080 -m comment --comment \"dindhelper:a\" -j DNAT --to-destination 172.17.0.2:80\nCOMMIT\n",
        );
        let b = plan_repair(&want, &live, |_| true);
        assert_eq!(b.delete.len(), 0);
        assert_eq!(b.add.len(), 2);
        assert!(b
            .add
            .iter()
            .all(|r| r.chain != "DOCKER" || r.table == Table::Filter));
    }

    #[test]
    fn plan_follows_new_ip_and_removes_orphans_and_duplicates() {
        let old = rules::rules_for(&spec("a", [172, 17, 0, 2]));
        let new = rules::rules_for(&spec("a", [172, 17, 0, 3]));
        let orphan = rules::rules_for(&spec("zz", [172, 17, 0, 9]));
        let dup = new[0].clone();
        let mut live: Vec<Rule> = old.clone();
        live.extend(orphan.clone());
        live.push(new[0].clone());
        live.push(dup);
        let b = plan_repair(&new, &live, |_| true);
        // old 3 + orphan 3 + one duplicate
        assert_eq!(b.delete.len(), 7);
        assert_eq!(b.add.len(), 2);
        // scoped: orphans of other ids are left alone
        let b = plan_repair(&new, &live, |id| id == "a");
        assert_eq!(b.delete.len(), 4);
        // the batch deletes before it adds, never declares a chain
        let text = b.render();
        assert!(!text.lines().any(|l| l.starts_with(':')));
        let first_add = text.find("-A ").unwrap();
        let last_del = text.rfind("-D DOCKER").unwrap();
        assert!(last_del < first_add || text[..first_add].contains("-D"));
    }

    use rules::Table;

    fn info(mode: &str, nets: Vec<NetworkAttachment>) -> ContainerInfo {
        ContainerInfo {
            id: "c1".into(),
            name: "web".into(),
            running: true,
            pid: 1,
            network_mode: mode.into(),
            networks: nets,
        }
    }

    fn att(name: &str, ip: Option<[u8; 4]>, br: Option<&str>) -> NetworkAttachment {
        NetworkAttachment {
            network_name: name.into(),
            network_id: format!("id-{name}"),
            ip: ip.map(Ipv4Addr::from),
            bridge_interface: br.map(Into::into),
        }
    }

    #[test]
    fn network_resolution() {
        let i = info(
            "default",
            vec![att("bridge", Some([172, 17, 0, 2]), Some("docker0"))],
        );
        assert_eq!(
            resolve_network(&i, None).unwrap(),
            (
                "bridge".into(),
                Ipv4Addr::new(172, 17, 0, 2),
                "docker0".into()
            )
        );
        let host = info("host", vec![att("host", None, None)]);
        let e = resolve_network(&host, None).unwrap_err();
        assert_eq!(e.kind(), Kind::InvalidArgs);
        assert!(e.to_string().contains("host network"));
        let two = info(
            "default",
            vec![
                att("a", Some([10, 1, 0, 2]), Some("br-a")),
                att("b", Some([10, 2, 0, 2]), Some("br-b")),
            ],
        );
        assert!(resolve_network(&two, None)
            .unwrap_err()
            .to_string()
            .contains("several"));
        assert_eq!(resolve_network(&two, Some("b")).unwrap().2, "br-b");
        assert_eq!(
            resolve_network(&two, Some("c")).unwrap_err().kind(),
            Kind::InvalidArgs
        );
        let ov = info("default", vec![att("ov", Some([10, 3, 0, 2]), None)]);
        assert_eq!(
            resolve_network(&ov, None).unwrap_err().kind(),
            Kind::NotSupported
        );
    }

    #[test]
    fn mapping_serde_roundtrip() {
        let m = Mapping {
            id: "0011223344556677".into(),
            container_id: "c1".into(),
            container_name: "web".into(),
            protocol: Protocol::Udp,
            host_ip: Some(Ipv4Addr::new(10, 99, 0, 1)),
            host_port: 53,
            container_port: 53,
            network: "bridge".into(),
            owner_uid: 1000,
            instance: Some("lab1".into()),
            state: MappingState::Active {
                ip: Ipv4Addr::new(172, 17, 0, 2),
                bridge: "docker0".into(),
            },
        };
        let j = serde_json::to_string(&m).unwrap();
        assert!(j.contains("\"udp\""));
        let back: Mapping = serde_json::from_str(&j).unwrap();
        assert_eq!(back, m);
        let w = Mapping {
            state: MappingState::Waiting,
            ..m
        };
        let back: Mapping = serde_json::from_str(&serde_json::to_string(&w).unwrap()).unwrap();
        assert_eq!(back.state, MappingState::Waiting);
    }

    #[test]
    fn collisions() {
        let m = Mapping {
            id: "x".into(),
            container_id: "c".into(),
            container_name: "w".into(),
            protocol: Protocol::Tcp,
            host_ip: Some(Ipv4Addr::new(10, 0, 0, 1)),
            host_port: 80,
            container_port: 80,
            network: "bridge".into(),
            owner_uid: 0,
            instance: None,
            state: MappingState::Waiting,
        };
        assert!(m.collides(Protocol::Tcp, None, 80));
        assert!(m.collides(Protocol::Tcp, Some(Ipv4Addr::new(10, 0, 0, 1)), 80));
        assert!(!m.collides(Protocol::Tcp, Some(Ipv4Addr::new(10, 0, 0, 2)), 80));
        assert!(!m.collides(Protocol::Udp, None, 80));
        assert!(!m.collides(Protocol::Tcp, None, 81));
    }
}
