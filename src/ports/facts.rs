//! Docker facts kept between ports calls: container inspects and the list of ports Docker
//! publishes itself. Without them every Publish costs dockerd an inspect and every write
//! round a `GET /containers/json` (measured: dockerd 0.4 ms of CPU per Publish, the
//! largest single cost of a call).
//!
//! A fact is used only while it cannot be stale in a way the event stream would not tell:
//! - it was read while the event stream was followed, on the same connection as now
//!   ([`Facts::connected`] / [`Facts::disconnected`] start a new epoch; facts of an older
//!   epoch are never used: events may have been missed in between);
//! - no Docker event arrived between sending the request and storing its answer (else
//!   the answer may predate the event and is not stored: the fill race);
//! - no event for the container arrived since ([`Facts::forget`], called for every event
//!   the watch receives, lifecycle or not: `rename`, `update`, network connect…; the list
//!   of published ports is dropped on any event);
//! - for a container: its init process has not exited (a pidfd opened when the answer was
//!   stored, polled at each use: a reused pid cannot pass for it), so a stop, restart or
//!   removal is seen at once, before its event arrives. Only running containers are kept.
//!   Measured: the `/proc/<pid>/stat` start-time read this replaced was 5% of the
//!   daemon's CPU in the ports bench; the poll is one syscall.
//!
//! Traps:
//! - An event is seen some time after dockerd emits it. In that window a cached answer
//!   can be one event behind — `docker rename web old && docker run --name web …`
//!   followed at once by `Publish web` may find the renamed container. A fresh inspect
//!   is no better ordered against a concurrent `docker` command, and the write round
//!   re-inspects a container that had a lifecycle event after the fact was read
//!   (`commit::refresh_if_changed`, via [`Fact::seq`]).
//! - Docker's published ports are a conflict check, not a lock: Docker can start a
//!   container with `-p` right after any check. Caching widens that window by the
//!   event latency only.
//! - Only names and full ids are keys (`ContainerInfo::name`, `ContainerInfo::id`): an id
//!   prefix can become ambiguous when a container is created, which is not an event
//!   about the container the prefix named.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use crate::docker::{ContainerInfo, PublishedPort};

/// Most keys kept (two per container: name and id); past this the map is cleared. Each
/// kept container holds one pidfd, so this also bounds the fds the cache holds (256,
/// well inside the 1024 of a default `RLIMIT_NOFILE`).
const MAX: usize = 512;

/// A container as last inspected.
#[derive(Debug, Clone)]
pub struct Fact {
    pub info: ContainerInfo,
    /// The manager's lifecycle event sequence number read before the inspect was sent.
    pub seq: u64,
}

#[derive(Debug, Clone)]
struct Entry {
    fact: Fact,
    epoch: u64,
    /// `info.pid`, opened right after the inspect that named it.
    pidfd: Arc<OwnedFd>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Bumped on every connection and disconnection of the event stream.
    epoch: u64,
    /// The event stream is followed now.
    live: bool,
    /// Events received so far (any kind): the fill-race guard.
    events: u64,
    containers: HashMap<String, Entry>,
    published: Option<(Vec<PublishedPort>, u64)>,
}

/// A ticket taken before a request to dockerd; the answer is stored only if nothing
/// happened in between.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    epoch: u64,
    events: u64,
    live: bool,
}

/// The cache (see the module header). Pure bookkeeping plus one `/proc` read; unit-tested.
#[derive(Debug, Default)]
pub struct Facts {
    inner: Mutex<Inner>,
}

impl Facts {
    /// The event stream is connected (facts read from now on can be kept).
    pub fn connected(&self) {
        let mut g = self.inner.lock().unwrap();
        g.epoch += 1;
        g.live = true;
        g.containers.clear();
        g.published = None;
    }

    /// The event stream broke: nothing is kept until it is back.
    pub fn disconnected(&self) {
        let mut g = self.inner.lock().unwrap();
        g.epoch += 1;
        g.live = false;
        g.containers.clear();
        g.published = None;
    }

    /// An event about `container_id` ("" when it names none): its facts and the list of
    /// published ports go.
    pub fn forget(&self, container_id: &str) {
        let mut g = self.inner.lock().unwrap();
        g.events += 1;
        g.published = None;
        if !container_id.is_empty() {
            g.containers.retain(|_, e| e.fact.info.id != container_id);
        }
    }

    /// Take before asking dockerd.
    pub fn ticket(&self) -> Ticket {
        let g = self.inner.lock().unwrap();
        Ticket {
            epoch: g.epoch,
            events: g.events,
            live: g.live,
        }
    }

    fn fresh(g: &Inner, t: &Ticket) -> bool {
        t.live && g.live && t.epoch == g.epoch && t.events == g.events
    }

    /// The container named `key` (a name or a full id), if known and still true.
    pub fn container(&self, key: &str) -> Option<Fact> {
        let e = {
            let g = self.inner.lock().unwrap();
            if !g.live {
                return None;
            }
            let e = g.containers.get(key)?;
            if e.epoch != g.epoch {
                return None;
            }
            e.clone()
        };
        if crate::pidfd::exited(&e.pidfd) {
            let mut g = self.inner.lock().unwrap();
            let id = e.fact.info.id.clone();
            g.containers.retain(|_, x| x.fact.info.id != id);
            return None;
        }
        Some(e.fact)
    }

    /// Keep an inspect's answer under its name and its full id (running containers only;
    /// nothing is kept when an event arrived since `t` was taken).
    pub fn store_container(&self, t: Ticket, fact: &Fact) {
        if !fact.info.running || fact.info.pid == 0 {
            return;
        }
        // Opened after the inspect: if the pid was reused in between, the inspect's answer
        // was about a process that is gone; the event of its exit keeps it out (the
        // ticket), and a stop without an event yet would still be a race of the same
        // width as the event's.
        let Ok(pidfd) = crate::pidfd::open(fact.info.pid) else {
            return;
        };
        let mut g = self.inner.lock().unwrap();
        if !Self::fresh(&g, &t) {
            return;
        }
        if g.containers.len() >= MAX {
            g.containers.clear();
        }
        let e = Entry {
            fact: fact.clone(),
            epoch: g.epoch,
            pidfd: Arc::new(pidfd),
        };
        g.containers.insert(fact.info.name.clone(), e.clone());
        g.containers.insert(fact.info.id.clone(), e);
    }

    /// The ports Docker publishes, if known and still true.
    pub fn published(&self) -> Option<Vec<PublishedPort>> {
        let g = self.inner.lock().unwrap();
        match &g.published {
            Some((v, epoch)) if g.live && *epoch == g.epoch => Some(v.clone()),
            _ => None,
        }
    }

    /// Keep the list (nothing is kept when an event arrived since `t` was taken).
    pub fn store_published(&self, t: Ticket, v: &[PublishedPort]) {
        let mut g = self.inner.lock().unwrap();
        if Self::fresh(&g, &t) {
            let epoch = g.epoch;
            g.published = Some((v.to_vec(), epoch));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me(name: &str) -> Fact {
        Fact {
            info: ContainerInfo {
                id: format!("{name}-id"),
                name: name.into(),
                running: true,
                // a process that exists for the whole test: this one
                pid: std::process::id(),
                network_mode: "default".into(),
                networks: vec![],
            },
            seq: 7,
        }
    }

    fn port(p: u16) -> PublishedPort {
        PublishedPort {
            container_id: "x".into(),
            ip: String::new(),
            public_port: p,
            private_port: 80,
            protocol: "tcp".into(),
        }
    }

    #[test]
    fn nothing_is_kept_without_the_event_stream() {
        let f = Facts::default();
        let t = f.ticket();
        f.store_container(t, &me("web"));
        f.store_published(t, &[port(1)]);
        assert!(f.container("web").is_none());
        assert!(f.published().is_none());
    }

    #[test]
    fn kept_under_name_and_id_until_an_event_about_it() {
        let f = Facts::default();
        f.connected();
        f.store_container(f.ticket(), &me("web"));
        f.store_container(f.ticket(), &me("db"));
        assert_eq!(f.container("web").unwrap().seq, 7);
        assert!(f.container("web-id").is_some());
        assert!(f.container("we").is_none(), "no prefixes");
        f.forget("web-id");
        assert!(f.container("web").is_none());
        assert!(f.container("web-id").is_none());
        assert!(
            f.container("db").is_some(),
            "another container's event keeps db"
        );
    }

    #[test]
    fn an_event_during_the_request_keeps_the_answer_out() {
        let f = Facts::default();
        f.connected();
        let t = f.ticket();
        f.forget("other-id"); // any event, even about another container
        f.store_container(t, &me("web"));
        f.store_published(t, &[port(1)]);
        assert!(f.container("web").is_none());
        assert!(f.published().is_none());
        let t = f.ticket();
        f.store_published(t, &[port(2)]);
        assert_eq!(f.published().unwrap()[0].public_port, 2);
        f.forget("");
        assert!(
            f.published().is_none(),
            "any event drops Docker's published ports"
        );
    }

    #[test]
    fn a_reconnection_starts_over() {
        let f = Facts::default();
        f.connected();
        let t = f.ticket();
        f.disconnected();
        f.connected();
        f.store_container(t, &me("web"));
        assert!(f.container("web").is_none(), "ticket of the old connection");
        f.store_container(f.ticket(), &me("web"));
        f.disconnected();
        assert!(f.container("web").is_none());
        f.connected();
        assert!(f.container("web").is_none(), "facts of the old connection");
    }

    #[test]
    fn a_gone_process_is_not_the_container() {
        let f = Facts::default();
        f.connected();
        let mut gone = me("web");
        // a child that has exited and been reaped: its pid names no process (or another)
        let mut c = std::process::Command::new("true").spawn().unwrap();
        gone.info.pid = c.id();
        c.wait().unwrap();
        f.store_container(f.ticket(), &gone);
        assert!(f.container("web").is_none());
        let mut stopped = me("db");
        stopped.info.running = false;
        f.store_container(f.ticket(), &stopped);
        assert!(
            f.container("db").is_none(),
            "only running containers are kept"
        );
    }
}
