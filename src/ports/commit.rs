//! The commit step: every firewall write goes through one async lock (`write_lock`).
//! Mappings enter or leave the in-memory table only while that lock is held, so a
//! reconcile can never see a mapping whose rules are still being written (no duplicates).
//! Concurrent publishes coalesce: each queues a job and spawns a round; the round that
//! holds the lock next runs every queued job as ONE [`Change`] (one `iptables-restore`:
//! group commit); if that combined change fails, the jobs are retried one by one so each
//! caller gets its own answer.
//!
//! Per round: one conflict check against what Docker publishes (kept between rounds while
//! no event changes it, see [`super::facts`]) and what is bound in the namespace (read
//! every round: no event tells when a socket is bound), then one write. Nothing is read back from the firewall: the backend knows
//! what it wrote (see [`super::iptables`], "Known rules").

use std::collections::HashSet;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::firewall::Change;
use super::sockets;
use super::types::{Mapping, MappingChange, MappingState, PortsError};
use super::validate::{external_conflict, pick_ip6, resolve_network};
use super::PortsManager;
use crate::docker::{DockerError, PublishedPort};

pub(crate) enum JobKind {
    /// New mappings, and the event sequence number read before their containers were
    /// inspected.
    Add(Vec<Mapping>, u64),
    Remove(Vec<String>),
}

pub(crate) struct Job {
    kind: JobKind,
    tx: oneshot::Sender<Result<Vec<Mapping>, PortsError>>,
}

impl PortsManager {
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
            let info = match self.resolver.inspect(&cid).await {
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
            let docker_v6 = self.backend().await?.ipv6();
            for m in ms.iter_mut().filter(|m| m.container_id == cid) {
                let (_, ip, bridge) = resolve_network(&info, Some(&m.network))?;
                let ip6 = pick_ip6(&info, &m.network, m.family, m.host_ip, docker_v6)?;
                m.state = MappingState::Active { ip, bridge, ip6 };
            }
        }
        Ok(())
    }

    /// Ports Docker publishes and sockets bound in the namespace (conflict sources).
    async fn external_state(
        &self,
    ) -> Result<(Vec<PublishedPort>, Vec<sockets::Bound>), PortsError> {
        // both at once: the socket read runs on its own thread (it enters the namespace)
        // while dockerd answers
        let netns = self.netns.clone();
        let bound = tokio::task::spawn_blocking(move || netns.run(sockets::read_bound));
        let dp = match self.facts.published() {
            Some(v) => Ok(v),
            None => {
                let ticket = self.facts.ticket();
                let r = self.resolver.published_ports().await;
                if let Ok(v) = &r {
                    self.facts.store_published(ticket, v);
                }
                r
            }
        };
        let bound = bound
            .await
            .map_err(|e| PortsError::Internal(format!("socket reader: {e}")))??
            .map_err(|source| PortsError::Spawn {
                command: "read /proc/thread-self/net".into(),
                source,
            })?;
        Ok((dp?, bound))
    }

    /// Queue a job and make sure it runs (group commit).
    /// The round runs in its own task: a caller that goes away (cancelled bus call) cannot
    /// stop a restore half-way or leave the table out of step with the rules.
    pub(crate) async fn submit(
        self: &Arc<Self>,
        kind: JobKind,
    ) -> Result<Vec<Mapping>, PortsError> {
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
                    us = t.elapsed().as_micros() as u64,
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
            Ok(b) => b,
            Err(first) => {
                // PortsError is not Clone: each caller gets the detection's own answer
                let mut first = Some(first);
                for j in jobs {
                    let e = match first.take() {
                        Some(e) => e,
                        None => self.backend().await.err().unwrap_or_else(|| {
                            PortsError::Internal("backend detection flapped".into())
                        }),
                    };
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
        let mut accepted: Vec<(Job, Change)> = Vec::new();
        let mut claimed: Vec<Mapping> = Vec::new();
        let mut removing: HashSet<String> = HashSet::new();
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
                                .find(|o| o.collides_with(m))
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
            let change = match &job.kind {
                JobKind::Add(ms, _) => {
                    claimed.extend(ms.iter().cloned());
                    Change {
                        remove: vec![],
                        add: ms.iter().filter_map(Mapping::spec).collect(),
                    }
                }
                JobKind::Remove(ids) => {
                    removing.extend(ids.iter().cloned());
                    Change {
                        remove: ids.clone(),
                        add: vec![],
                    }
                }
            };
            accepted.push((job, change));
        }
        if accepted.is_empty() {
            return;
        }
        // 2. one write for everything
        let mut all = Change::default();
        for (_, c) in &accepted {
            all.remove.extend(c.remove.iter().cloned());
            all.add.extend(c.add.iter().cloned());
        }
        let combined = backend.apply(&all).await;
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
        // 3. the combined write failed (nothing was applied): one by one
        for (job, c) in accepted {
            let r = backend.apply(&c).await;
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
}
