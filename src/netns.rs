//! Run a closure inside another process's namespaces, on a dedicated short-lived OS thread.
//!
//! Kernel interfaces: `/proc/<pid>/ns/{net,mnt}` + `setns(2)`, `unshare(2)`, `/proc/<pid>/stat`.
//!
//! Traps:
//! - Namespaces are per *thread*. Never `setns` on a tokio worker (kata-containers#5728): the
//!   worker would keep the foreign namespace and later tasks would run in it. Here every call
//!   gets a fresh `std::thread` that dies afterwards, so nothing has to be restored.
//! - PID reuse: a pid is only a name. We read the process start time (field 22 of
//!   `/proc/<pid>/stat`) before and after opening the namespace fds and compare both with the
//!   start time the caller recorded; the fds then pin the namespaces whatever the pid does.
//! - `setns(CLONE_NEWNS)` fails with `EINVAL` for a thread that shares its fs struct
//!   (root, cwd, umask) with other threads, i.e. every thread of a normal process. The thread
//!   must `unshare(CLONE_FS)` first. After entering a mount namespace the thread's root and
//!   cwd are the namespace's root.
//! - A socket opened inside a network namespace stays in that namespace (and keeps it alive)
//!   when it is used from another thread: open sockets on the namespace thread, then hand the fd
//!   back.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::PathBuf;

use nix::errno::Errno;
use nix::sched::CloneFlags;

use crate::error::{Classify, Kind};

/// A process identified by pid plus start time (defeats pid reuse).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub pid: i32,
    /// Start time in clock ticks after boot (field 22 of `/proc/<pid>/stat`).
    pub start_time: u64,
}

impl Target {
    /// Identify a running process now (reads its start time).
    pub fn of_pid(pid: i32) -> Result<Target, NetnsError> {
        Ok(Target {
            pid,
            start_time: process_start_time(pid)?,
        })
    }

    /// Fail with [`NetnsError::Gone`] / [`NetnsError::Reused`] unless the pid still names
    /// the same process.
    pub fn verify(&self) -> Result<(), NetnsError> {
        let now = process_start_time(self.pid)?;
        if now != self.start_time {
            return Err(NetnsError::Reused {
                pid: self.pid,
                expected: self.start_time,
                found: now,
            });
        }
        Ok(())
    }
}

/// Which namespaces to enter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ns {
    Net,
    Mnt,
}

impl Ns {
    fn proc_name(self) -> &'static str {
        match self {
            Ns::Net => "net",
            Ns::Mnt => "mnt",
        }
    }
    fn flag(self) -> CloneFlags {
        match self {
            Ns::Net => CloneFlags::CLONE_NEWNET,
            Ns::Mnt => CloneFlags::CLONE_NEWNS,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("process {pid} does not exist")]
    Gone { pid: i32 },
    #[error("pid {pid} was reused: start time {found}, expected {expected}")]
    Reused { pid: i32, expected: u64, found: u64 },
    #[error("cannot read {path}: {source}")]
    Proc {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot parse {path}")]
    ProcParse { path: PathBuf },
    #[error("cannot open namespace {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("unshare(CLONE_FS) failed: {0}")]
    Unshare(Errno),
    #[error("setns into the {ns} namespace of pid {pid} failed: {source}")]
    Setns {
        pid: i32,
        ns: &'static str,
        source: Errno,
    },
    #[error("cannot start the namespace thread: {0}")]
    Spawn(std::io::Error),
    #[error("the namespace thread panicked")]
    Panicked,
}

impl Classify for NetnsError {
    fn kind(&self) -> Kind {
        match self {
            NetnsError::Gone { .. } | NetnsError::Reused { .. } => Kind::NotFound,
            NetnsError::Open { source, .. } | NetnsError::Proc { source, .. }
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Kind::NotFound
            }
            NetnsError::Setns { source, .. } if *source == Errno::ENOSYS => Kind::NotSupported,
            _ => Kind::Failed,
        }
    }
}

/// Parse the start time (field 22) out of a `/proc/<pid>/stat` line. The comm field (2) may
/// contain spaces and parentheses, so split after the *last* `)`.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // rest starts at field 3 (state); start time is field 22 -> index 19 here.
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// Start time of a process in clock ticks since boot.
pub fn process_start_time(pid: i32) -> Result<u64, NetnsError> {
    if pid <= 0 {
        return Err(NetnsError::Gone { pid });
    }
    let path = PathBuf::from(format!("/proc/{pid}/stat"));
    let stat = match std::fs::read_to_string(&path) {
        Ok(s) => s,
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                || e.raw_os_error() == Some(libc::ESRCH) =>
        {
            return Err(NetnsError::Gone { pid })
        }
        Err(source) => return Err(NetnsError::Proc { path, source }),
    };
    parse_start_time(&stat).ok_or(NetnsError::ProcParse { path })
}

/// Open the namespace fds of `target` and check it is still the same process afterwards.
pub fn open_namespaces(target: Target, kinds: &[Ns]) -> Result<Vec<(Ns, File)>, NetnsError> {
    target.verify()?;
    let mut fds = Vec::with_capacity(kinds.len());
    for &ns in kinds {
        let path = PathBuf::from(format!("/proc/{}/ns/{}", target.pid, ns.proc_name()));
        match File::open(&path) {
            Ok(f) => fds.push((ns, f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(NetnsError::Gone { pid: target.pid })
            }
            Err(source) => return Err(NetnsError::Open { path, source }),
        }
    }
    // The fds now pin the namespaces; make sure they belong to the process we meant.
    target.verify()?;
    Ok(fds)
}

/// Enter the namespaces on the *current* thread. Only for threads made for this purpose
/// (see [`run_in`]); the caller must let the thread die afterwards.
fn enter_current_thread(target: Target, fds: &[(Ns, File)]) -> Result<(), NetnsError> {
    if fds.iter().any(|(ns, _)| *ns == Ns::Mnt) {
        nix::sched::unshare(CloneFlags::CLONE_FS).map_err(NetnsError::Unshare)?;
    }
    for (ns, f) in fds {
        nix::sched::setns(f.as_fd(), ns.flag()).map_err(|source| NetnsError::Setns {
            pid: target.pid,
            ns: ns.proc_name(),
            source,
        })?;
    }
    Ok(())
}

/// Run `f` inside the given namespaces of `target` on a new OS thread, wait for it and return
/// its result. The thread exits afterwards, so the caller's threads never change namespace.
pub fn run_in<T, F>(target: Target, kinds: &[Ns], f: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let fds = open_namespaces(target, kinds)?;
    let handle = std::thread::Builder::new()
        .name(format!("ns-{}", target.pid))
        .spawn(move || -> Result<T, NetnsError> {
            enter_current_thread(target, &fds)?;
            drop(fds);
            Ok(f())
        })
        .map_err(NetnsError::Spawn)?;
    handle.join().map_err(|_| NetnsError::Panicked)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_parses_comm_with_spaces_and_parens() {
        let line = "1234 (we ird) (x) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10 18446744073709551615";
        assert_eq!(parse_start_time(line), Some(98765));
    }

    #[test]
    fn start_time_of_truncated_line_is_none() {
        assert_eq!(parse_start_time("1 (init) S 0 1"), None);
        assert_eq!(parse_start_time("garbage"), None);
    }

    #[test]
    fn own_process_identity_verifies() {
        let me = Target::of_pid(std::process::id() as i32).unwrap();
        me.verify().unwrap();
        let wrong = Target {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(matches!(wrong.verify(), Err(NetnsError::Reused { .. })));
        assert_eq!(wrong.verify().unwrap_err().kind(), Kind::NotFound);
    }
}
