//! Intent records: "this daemon is about to make object X", written before an effect that
//! is not atomic with its tag, removed once the object's record is saved.
//!
//! Layout: `<state-dir>/intents/<kind>-<key>` (empty files, 0600). Who uses them:
//! - `instance-<name>`: CreateInstance, before the first `mkdir` of the cgroupfs backend
//!   (each directory is tagged right after its `mkdir`; a kill between the two leaves an
//!   untagged directory, which the intent claims) and before `StartTransientUnit`.
//!
//! Not fsynced, on purpose: what they cover (cgroups, slices) dies with the kernel, and a
//! killed process leaves its writes in the page cache, so only a power loss can lose an
//! intent, and then the object is gone too. Cost: one create + one unlink in a directory
//! the daemon owns (measured with the instances benchmark; see the report in
//! `ops::instances`).
//!
//! The start-up reconcile reads every intent ([`pending`]), finishes or undoes the
//! operation, logs the decision and removes the intent ([`clear`]).

use super::OpsError;
use std::fs;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("intents")
}

fn path(state_dir: &Path, kind: &str, key: &str) -> PathBuf {
    dir(state_dir).join(format!("{kind}-{key}"))
}

fn err(p: &Path, source: io::Error) -> OpsError {
    OpsError::State(crate::state::StateError::Write {
        path: p.to_owned(),
        source,
    })
}

/// An intent on disk; [`Intent::done`] removes it. Dropped without `done` it stays (a
/// failed rollback leaves it for the next start to finish).
#[must_use]
pub struct Intent {
    path: PathBuf,
}

/// Record the intent to make `kind` `key` (a checked name: no `/`).
pub fn begin(state_dir: &Path, kind: &str, key: &str) -> Result<Intent, OpsError> {
    let p = path(state_dir, kind, key);
    let open = || {
        fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&p)
    };
    match open() {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let d = dir(state_dir);
            fs::create_dir_all(&d).map_err(|e| err(&d, e))?;
            open().map_err(|e| err(&p, e))?;
        }
        Err(e) => return Err(err(&p, e)),
    }
    Ok(Intent { path: p })
}

impl Intent {
    /// The operation is recorded (or fully rolled back): forget the intent.
    pub fn done(self) {
        if let Err(e) = fs::remove_file(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), error = %e,
                    "cannot remove an intent record; the next start clears it");
            }
        }
    }
}

/// Keys of every pending intent of `kind`.
pub fn pending(state_dir: &Path, kind: &str) -> Vec<String> {
    let prefix = format!("{kind}-");
    let mut v: Vec<String> = fs::read_dir(dir(state_dir))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    e.file_name()
                        .to_str()
                        .and_then(|n| n.strip_prefix(&prefix))
                        .map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Remove one intent (after the reconcile decided).
pub fn clear(state_dir: &Path, kind: &str, key: &str) {
    let p = path(state_dir, kind, key);
    if let Err(e) = fs::remove_file(&p) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(path = %p.display(), error = %e, "cannot remove an intent record");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn begin_done_pending_clear() {
        let d = tempfile::tempdir().unwrap();
        assert!(pending(d.path(), "instance").is_empty());
        let a = begin(d.path(), "instance", "a").unwrap();
        let b = begin(d.path(), "instance", "b-1").unwrap();
        assert_eq!(pending(d.path(), "instance"), vec!["a", "b-1"]);
        assert!(pending(d.path(), "other").is_empty());
        a.done();
        assert_eq!(pending(d.path(), "instance"), vec!["b-1"]);
        drop(b); // stays
        assert_eq!(pending(d.path(), "instance"), vec!["b-1"]);
        clear(d.path(), "instance", "b-1");
        assert!(pending(d.path(), "instance").is_empty());
    }

    /// The cost of recording intent first: one create + one unlink (printed with
    /// `--nocapture`; the bound only catches an accidental fsync).
    #[test]
    fn intent_costs_a_create_and_an_unlink() {
        let d = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
        begin(d.path(), "instance", "warm").unwrap().done();
        let n = 500;
        let t = std::time::Instant::now();
        for i in 0..n {
            begin(d.path(), "instance", &format!("i{i}"))
                .unwrap()
                .done();
        }
        let per = t.elapsed() / n;
        println!("intent begin+done: {per:?} per operation");
        assert!(per < std::time::Duration::from_millis(5), "{per:?}");
    }
}
