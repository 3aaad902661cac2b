//! Capture sessions: resolve a target (container → pid + start time, re-verified), apply the
//! per-uid limits, open the sink (a file under `<state>/captures/<uid>/` or the caller's
//! fd), start a `crate::capture` session and keep a registry of running and finished
//! sessions. No D-Bus here; the bus layer (`bus::capture`) exports the sessions.
//!
//! Sessions live in memory only: a capture dies with the daemon (its file stays, valid up
//! to the last ring block written). Finished sessions stay listed for [`FINISHED_KEEP`] so
//! their final counters and reason can still be read.
//!
//! Limits (config): `max_capture_duration` caps every duration (default 60 s when none is
//! given); `max_captures_per_uid` counts running sessions (files and fds);
//! `max_capture_bytes_per_uid` covers capture files on disk (running ones with their
//! current size): a new file session is refused when nothing is left and its `max_bytes`
//! is cut to what is left, so concurrent sessions can overshoot by at most what each may
//! write (bounded by the session count). uid 0 is exempt from the per-uid limits (not from
//! the duration cap).

use crate::capture::{self, CaptureError, CaptureOptions, Finished, Stats, StatsReader, Stopper};
use crate::error::{Classify, Kind};
use crate::netns::{NetnsError, Target};
use crate::ops::containers::ContainerError;
use crate::ops::Core;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// How long a finished session stays listed (and exported).
pub const FINISHED_KEEP: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum CaptureOpsError {
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error(transparent)]
    Container(#[from] ContainerError),
    #[error(transparent)]
    Target(#[from] NetnsError),
    #[error(transparent)]
    Name(#[from] crate::names::NameError),
    #[error("invalid capture target {target:?}: {why}")]
    BadTarget { target: String, why: &'static str },
    #[error("limit reached: {0}")]
    Limit(String),
    #[error("the fd passed is not open for writing")]
    FdNotWritable,
    #[error("no capture session {id}")]
    NoSession { id: u64 },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("internal task failed: {0}")]
    Task(String),
}

impl Classify for CaptureOpsError {
    fn kind(&self) -> Kind {
        match self {
            CaptureOpsError::Capture(e) => e.kind(),
            CaptureOpsError::Container(e) => e.kind(),
            CaptureOpsError::Target(e) => e.kind(),
            CaptureOpsError::Name(e) => e.kind(),
            CaptureOpsError::BadTarget { .. }
            | CaptureOpsError::Limit(_)
            | CaptureOpsError::FdNotWritable => Kind::InvalidArgs,
            CaptureOpsError::NoSession { .. } => Kind::NotFound,
            CaptureOpsError::Io { .. } | CaptureOpsError::Task(_) => Kind::Failed,
        }
    }
}

/// What to capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetSpec {
    /// A container name or id (resolved through dockerd).
    Container(String),
    /// `pid:N`: any process (admin action).
    Pid(i32),
    /// `host`: the host's network namespace, that of pid 1 (admin action).
    Host,
}

impl TargetSpec {
    pub fn parse(s: &str) -> Result<TargetSpec, CaptureOpsError> {
        let bad = |why| CaptureOpsError::BadTarget {
            target: s.to_owned(),
            why,
        };
        if s == "host" {
            return Ok(TargetSpec::Host);
        }
        if let Some(n) = s.strip_prefix("pid:") {
            let pid: i32 = n.parse().map_err(|_| bad("pid:N needs a decimal pid"))?;
            if pid <= 0 {
                return Err(bad("pid must be positive"));
            }
            return Ok(TargetSpec::Pid(pid));
        }
        if crate::ops::containers::check_ref(s).is_err() {
            return Err(bad(
                "a container name or id ([A-Za-z0-9][A-Za-z0-9_.-]*), pid:N or host",
            ));
        }
        Ok(TargetSpec::Container(s.to_owned()))
    }

    /// Whether the target is not a container (needs the capture-host action).
    pub fn is_admin(&self) -> bool {
        !matches!(self, TargetSpec::Container(_))
    }

    /// A file-name-safe label for default names.
    fn label(&self) -> String {
        match self {
            TargetSpec::Container(n) => n.clone(),
            TargetSpec::Pid(p) => format!("pid{p}"),
            TargetSpec::Host => "host".into(),
        }
    }
}

/// A target resolved to a process, re-verified.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub spec: TargetSpec,
    pub target: Target,
    /// Container id when the target is a container.
    pub container_id: Option<String>,
    /// The target shares the host's network namespace (pid 1's): needs capture-host.
    pub host_netns: bool,
}

/// Where the pcap goes.
pub enum Sink {
    /// `<state>/captures/<uid>/<name>.pcap`, owned by the caller, 0640.
    File { name: Option<String> },
    /// The caller's fd (a pipe, usually).
    Fd(File),
}

/// A StartCapture request after option parsing.
pub struct StartRequest {
    pub uid: u32,
    pub options: CaptureOptions,
    /// None: 60 s. Cut to `max_capture_duration`.
    pub duration: Option<Duration>,
    pub instance: Option<String>,
}

/// One capture session (running or finished).
pub struct Session {
    pub id: u64,
    pub owner_uid: u32,
    /// The target as given (`web`, `pid:42`, `host`).
    pub target: String,
    pub container_id: Option<String>,
    /// The file, or None for an fd session.
    pub path: Option<PathBuf>,
    pub instance: Option<String>,
    pub started: SystemTime,
    stats: StatsReader,
    stopper: Stopper,
    end: tokio::sync::watch::Sender<Option<Finished>>,
}

impl Session {
    pub fn is_running(&self) -> bool {
        self.end.borrow().is_none()
    }

    /// "running" or "finished".
    pub fn state(&self) -> &'static str {
        if self.is_running() {
            "running"
        } else {
            "finished"
        }
    }

    /// Live counters while running, the final ones afterwards.
    pub fn stats(&self) -> Stats {
        match &*self.end.borrow() {
            Some(f) => f.stats,
            None => self.stats.stats(),
        }
    }

    /// "" while running; then stopped, duration, max-packets, max-bytes, target-exited or
    /// `error: <message>`.
    pub fn reason(&self) -> String {
        match &*self.end.borrow() {
            None => String::new(),
            Some(f) => reason_text(&f.reason),
        }
    }

    pub fn finished(&self) -> Option<Finished> {
        self.end.borrow().clone()
    }

    /// Ask the session to end (idempotent); see [`Session::wait`].
    pub fn stop(&self) {
        self.stopper.stop();
    }

    /// Wait until the session has ended.
    pub async fn wait(&self) -> Finished {
        let mut rx = self.end.subscribe();
        loop {
            if let Some(f) = rx.borrow_and_update().clone() {
                return f;
            }
            if rx.changed().await.is_err() {
                // Sender gone: cannot happen while self exists; report what we know.
                return Finished {
                    stats: self.stats.stats(),
                    reason: capture::Reason::Error("session lost".into()),
                };
            }
        }
    }
}

pub fn reason_text(r: &capture::Reason) -> String {
    match r {
        capture::Reason::Error(m) => format!("error: {m}"),
        other => other.as_str().to_owned(),
    }
}

struct Inner {
    core: Arc<Core>,
    next_id: AtomicU64,
    sessions: Mutex<BTreeMap<u64, Arc<Session>>>,
    /// Serializes the limit checks with the session insertion.
    start_lock: tokio::sync::Mutex<()>,
}

/// The capture registry. Cheap to clone; the bus layer and DestroyInstance share one.
#[derive(Clone)]
pub struct Captures {
    inner: Arc<Inner>,
}

impl Captures {
    pub fn new(core: Arc<Core>) -> Captures {
        Captures {
            inner: Arc::new(Inner {
                core,
                next_id: AtomicU64::new(1),
                sessions: Mutex::new(BTreeMap::new()),
                start_lock: tokio::sync::Mutex::new(()),
            }),
        }
    }

    pub fn get(&self, id: u64) -> Result<Arc<Session>, CaptureOpsError> {
        self.inner
            .sessions
            .lock()
            .expect("sessions")
            .get(&id)
            .cloned()
            .ok_or(CaptureOpsError::NoSession { id })
    }

    pub fn list(&self) -> Vec<Arc<Session>> {
        self.inner
            .sessions
            .lock()
            .expect("sessions")
            .values()
            .cloned()
            .collect()
    }

    /// Forget a finished session (the bus layer calls this [`FINISHED_KEEP`] after the end).
    pub fn forget(&self, id: u64) {
        let mut m = self.inner.sessions.lock().expect("sessions");
        if m.get(&id).is_some_and(|s| !s.is_running()) {
            m.remove(&id);
        }
    }

    /// Resolve a target to a process. A container goes through the one resolver
    /// (`ops::containers`: looked up, its init pid pinned by start time, looked up again).
    pub async fn resolve(&self, spec: &TargetSpec) -> Result<Resolved, CaptureOpsError> {
        let (target, container_id) = match spec {
            TargetSpec::Host => (Target::of_pid(1)?, None),
            TargetSpec::Pid(p) => (Target::of_pid(*p)?, None),
            TargetSpec::Container(name) => {
                let c = self.inner.core.containers.resolve(name).await?;
                (c.target, Some(c.id))
            }
        };
        let host_netns = same_netns(target.pid, 1);
        target.verify()?;
        Ok(Resolved {
            spec: spec.clone(),
            target,
            container_id,
            host_netns,
        })
    }

    /// Start a session on a resolved target.
    pub async fn start(
        &self,
        resolved: Resolved,
        target_text: &str,
        mut req: StartRequest,
        sink: Sink,
    ) -> Result<Arc<Session>, CaptureOpsError> {
        let cfg = &self.inner.core.cfg;
        let max = Duration::from_secs(cfg.max_capture_duration);
        req.options.duration = Some(req.duration.unwrap_or(capture::DEFAULT_DURATION).min(max));
        if let Some(i) = &req.instance {
            crate::names::check_instance_name(i)?;
        }
        if let Sink::File { name: Some(n) } = &sink {
            crate::names::check_file_name("capture name", n)?;
        }
        if let Sink::Fd(f) = &sink {
            check_writable(f)?;
        }
        // Options are checked (filter compiled) before any limit or file is touched.
        req.options.validate()?;

        let _g = self.inner.start_lock.lock().await;
        let uid = req.uid;
        let running: Vec<Arc<Session>> = self
            .list()
            .into_iter()
            .filter(|s| s.owner_uid == uid && s.is_running())
            .collect();
        if uid != 0 && running.len() >= cfg.max_captures_per_uid {
            return Err(CaptureOpsError::Limit(format!(
                "uid {uid} already runs {} captures (max_captures_per_uid = {})",
                running.len(),
                cfg.max_captures_per_uid
            )));
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (file, path) = match sink {
            Sink::Fd(f) => (f, None),
            Sink::File { name } => {
                let name = name.unwrap_or_else(|| default_name(&resolved.spec, id));
                let dir = self.inner.core.store.dir().join("captures");
                let on_disk = {
                    let d = dir.join(uid.to_string());
                    crate::ops::blocking(move || Ok(dir_bytes(&d)))
                        .await
                        .map_err(|e| CaptureOpsError::Task(e.to_string()))?
                };
                // Running sessions' files are on disk and counted by their current size.
                let used = on_disk;
                let cap = if uid == 0 {
                    req.options.max_bytes
                } else {
                    let left = cfg.max_capture_bytes_per_uid.saturating_sub(used);
                    if left < capture::pcap::GLOBAL_HEADER_LEN + 64 {
                        return Err(CaptureOpsError::Limit(format!(
                            "uid {uid} has {used} bytes of captures on disk \
                             (max_capture_bytes_per_uid = {}); delete old captures",
                            cfg.max_capture_bytes_per_uid
                        )));
                    }
                    Some(req.options.max_bytes.map_or(left, |m| m.min(left)))
                };
                req.options.max_bytes = cap;
                let gid = primary_gid(uid);
                let state_dir = self.inner.core.store.dir().to_owned();
                let n = name.clone();
                let (f, p) = tokio::task::spawn_blocking(move || {
                    capture::create_capture_file(&state_dir, uid, gid, &n)
                })
                .await
                .map_err(|e| CaptureOpsError::Task(e.to_string()))??;
                (f, Some(p))
            }
        };

        let target = resolved.target;
        let options = req.options.clone();
        let started = tokio::task::spawn_blocking(move || capture::start(target, options, file))
            .await
            .map_err(|e| CaptureOpsError::Task(e.to_string()))?;
        let handle = match started {
            Ok(h) => h,
            Err(e) => {
                if let Some(p) = &path {
                    let _ = std::fs::remove_file(p);
                }
                return Err(e.into());
            }
        };
        let (tx, _) = tokio::sync::watch::channel(None);
        let session = Arc::new(Session {
            id,
            owner_uid: uid,
            target: target_text.to_owned(),
            container_id: resolved.container_id,
            path,
            instance: req.instance,
            started: SystemTime::now(),
            stats: handle.stats_reader(),
            stopper: handle.stopper(),
            end: tx,
        });
        self.inner
            .sessions
            .lock()
            .expect("sessions")
            .insert(id, session.clone());
        let s = session.clone();
        tokio::spawn(async move {
            // The handle's wait blocks on a thread join: never on a tokio worker.
            let f = match tokio::task::spawn_blocking(move || handle.wait()).await {
                Ok(f) => f,
                Err(e) => Finished {
                    stats: s.stats.stats(),
                    reason: capture::Reason::Error(format!("capture task: {e}")),
                },
            };
            tracing::info!(session = s.id, uid = s.owner_uid, target = %s.target,
                packets = f.stats.packets, bytes = f.stats.bytes, dropped = f.stats.dropped,
                reason = %reason_text(&f.reason), "capture finished");
            s.end.send_replace(Some(f));
        });
        Ok(session)
    }

    /// Stop every running capture (daemon shutdown) and wait for them; returns how many.
    pub async fn stop_all(&self) -> usize {
        let hit: Vec<Arc<Session>> = self.list().into_iter().filter(|s| s.is_running()).collect();
        for s in &hit {
            s.stop();
        }
        for s in &hit {
            let _ = tokio::time::timeout(Duration::from_secs(5), s.wait()).await;
        }
        hit.len()
    }

    /// Stop every running capture of `instance` and wait (up to 5 s each) until they have
    /// written their last block. Returns the sessions it stopped (for DestroyInstance).
    pub async fn stop_instance(&self, instance: &str) -> Vec<Arc<Session>> {
        let hit: Vec<Arc<Session>> = self
            .list()
            .into_iter()
            .filter(|s| s.is_running() && s.instance.as_deref() == Some(instance))
            .collect();
        for s in &hit {
            s.stop();
        }
        for s in &hit {
            if tokio::time::timeout(Duration::from_secs(5), s.wait())
                .await
                .is_err()
            {
                tracing::warn!(session = s.id, "capture did not end within 5 s of Stop");
            }
        }
        hit
    }
}

fn check_writable(f: &File) -> Result<(), CaptureOpsError> {
    use std::os::fd::AsRawFd;
    // SAFETY: F_GETFL on a valid fd.
    let fl = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
    if fl < 0 {
        return Err(CaptureOpsError::Io {
            what: "fcntl(F_GETFL) on the passed fd".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    match fl & libc::O_ACCMODE {
        libc::O_WRONLY | libc::O_RDWR => Ok(()),
        _ => Err(CaptureOpsError::FdNotWritable),
    }
}

/// Do two processes share a network namespace?
fn same_netns(a: i32, b: i32) -> bool {
    use std::os::unix::fs::MetadataExt;
    let ino = |p: i32| std::fs::metadata(format!("/proc/{p}/ns/net")).map(|m| (m.dev(), m.ino()));
    match (ino(a), ino(b)) {
        (Ok(x), Ok(y)) => x == y,
        // Unknown: treat as the host (the stricter action).
        _ => true,
    }
}

/// Bytes of the regular files directly in `dir` (0 when it does not exist).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

fn primary_gid(uid: u32) -> u32 {
    match nix::unistd::User::from_uid(uid.into()) {
        Ok(Some(u)) => u.gid.as_raw(),
        // No passwd entry: a group nobody else is in is unknowable; use the root group.
        _ => 0,
    }
}

/// `20261123T192500Z-web-7`, cut to the 64 characters a capture name may have.
pub fn default_name(spec: &TargetSpec, id: u64) -> String {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let suffix = format!("-{id}");
    let mut s = format!("{}-{}", utc_stamp(now), spec.label());
    s.truncate(64 - suffix.len());
    s + &suffix
}

/// `YYYYmmddTHHMMSSZ` for seconds since the epoch (UTC; civil-from-days).
pub fn utc_stamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(TargetSpec::parse("host").unwrap(), TargetSpec::Host);
        assert_eq!(TargetSpec::parse("pid:42").unwrap(), TargetSpec::Pid(42));
        assert_eq!(
            TargetSpec::parse("web-1").unwrap(),
            TargetSpec::Container("web-1".into())
        );
        for bad in ["", "pid:", "pid:-1", "pid:x", "-web", "a/b", "web 1", "x?y"] {
            let e = TargetSpec::parse(bad).unwrap_err();
            assert_eq!(e.kind(), Kind::InvalidArgs, "{bad}");
        }
        assert!(TargetSpec::Host.is_admin());
        assert!(TargetSpec::Pid(1).is_admin());
        assert!(!TargetSpec::Container("w".into()).is_admin());
    }

    #[test]
    fn stamps_are_utc_calendar_dates() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        assert_eq!(utc_stamp(951_782_400), "20000229T000000Z");
        assert_eq!(utc_stamp(1_795_462_245), "20261123T193045Z");
    }

    #[test]
    fn default_names_are_valid_capture_names() {
        let long = "c".repeat(120);
        for spec in [
            TargetSpec::Host,
            TargetSpec::Pid(7),
            TargetSpec::Container(long),
        ] {
            let n = default_name(&spec, 123);
            crate::names::check_file_name("capture name", &n).unwrap();
            assert!(n.ends_with("-123"), "{n}");
        }
    }
}
