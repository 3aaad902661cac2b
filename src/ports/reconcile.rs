//! The reconcile step: bring every mapping and every tagged rule in line with Docker
//! (at start, after each (re)connection to dockerd, per container after a lifecycle
//! event), and [`watch`], the task that follows Docker events.
//!
//! Decisions per mapping: rules right (Unchanged), repaired (missing rules, new container
//! IP, duplicates, a tag from before state ids), Waiting (container stopped, or state
//! Disconnected: the container left the mapping's network; rules out),
//! Dropped (container destroyed), Error (cannot be applied), Skipped (Docker could not be
//! asked: its rules are left as they are), and OrphanRemoved for this state's tagged rules
//! of ids the state does not know. Rules of another state id are never touched.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::rules::RuleSpec;
use super::types::{Action, Decision, Mapping, MappingChange, MappingState, PortsError};
use super::validate::{pick_ip6, resolve_network};
use super::PortsManager;
use crate::docker::{ContainerEvent, DockerError};

impl PortsManager {
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
        if ev.action.starts_with("network-") {
            // a re-connected container has a new veth (same pid): set hairpin mode again
            self.hairpin_done
                .lock()
                .unwrap()
                .retain(|(id, _)| *id != ev.container_id);
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
        let backend = self.backend().await?;
        let docker_v6 = backend.ipv6();
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
        let mut desired: Vec<RuleSpec> = Vec::new();
        for (cid, ms) in by_container {
            match self.resolver.inspect(cid).await {
                Ok(info) if info.running => {
                    for m in ms {
                        if !info.networks.iter().any(|a| a.network_name == m.network) {
                            // `docker network disconnect`: rules out until it is back
                            new_state.insert(m.id.clone(), Some(MappingState::Disconnected));
                            continue;
                        }
                        let resolved =
                            resolve_network(&info, Some(&m.network)).and_then(|(_, ip, bridge)| {
                                pick_ip6(&info, &m.network, m.family, m.host_ip, docker_v6)
                                    .map(|ip6| (ip, bridge, ip6))
                            });
                        match resolved {
                            Ok((ip, bridge, ip6)) => {
                                self.ensure_hairpin(&info, ip, &bridge).await;
                                let mut m2 = m.clone();
                                m2.state = MappingState::Active { ip, bridge, ip6 };
                                desired.extend(m2.spec());
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
        let known: HashSet<&str> = snapshot.iter().map(|m| m.id.as_str()).collect();
        let table_ids: Vec<String> = self.mappings.lock().unwrap().keys().cloned().collect();
        let in_scope =
            |id: &str| !untouched.contains_key(id) && (scope.is_none() || known.contains(id));
        let done = backend.repair(&desired, &table_ids, &in_scope).await?;

        // decisions + table update
        let (added, removed) = (&done.added, &done.removed);
        let mut decisions = Vec::new();
        let mut table = self.mappings.lock().unwrap();
        for m in &snapshot {
            let a = added.get(&m.id).copied().unwrap_or(0);
            let d = removed.get(&m.id).copied().unwrap_or(0);
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
                            MappingState::Waiting | MappingState::Disconnected => {
                                Action::Waiting { removed: d }
                            }
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
        for (id, n) in removed {
            if !known.contains(id.as_str()) {
                decisions.push(Decision {
                    mapping_id: id.clone(),
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
    let Some(docker) = manager.docker.clone() else {
        tracing::warn!("ports watch: this manager has no dockerd to follow");
        return;
    };
    let mut backoff = Duration::from_millis(50);
    loop {
        let mut stream = match docker.events().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "docker events: not reachable, retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        // from here on every event reaches `facts` (answers read from now on can be kept)
        manager.facts.connected();
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
                    // first: no answer read before this event is used after it
                    manager.facts.forget(&ev.container_id);
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
        manager.facts.disconnected();
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
