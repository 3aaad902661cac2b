//! Persistent intent: what should exist, as versioned JSON.
//!
//! Layout of `<state-dir>`:
//! ```text
//! state.json        this file's `State`, replaced atomically (temp + fsync + rename + fsync dir)
//! state.lock        flock held by the running daemon: one daemon per state dir
//! images/<uid>/     sparse image files, `<name>.img` (see loopdev::images)
//! ```
//! Only intent is stored (image ↔ loop, owners, instances, published ports); effects are
//! re-read from the kernel at start and reconciled (see `ops::loops::reconcile`,
//! `ops::ports::start`).

use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Version of the JSON layout. Bump when a field changes meaning; add `#[serde(default)]`
/// fields without a bump.
pub const STATE_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct State {
    pub version: u32,
    /// Random id of this state directory. Devices the daemon attaches carry it in their
    /// loop label, so a daemon only ever treats its own devices as orphans (two daemons
    /// with different state dirs, as in tests, never touch each other's devices).
    #[serde(default)]
    pub state_id: String,
    #[serde(default)]
    pub images: Vec<ImageRecord>,
    #[serde(default)]
    pub loops: Vec<LoopRecord>,
    /// Published ports (intent + last known state), see `ops::ports`.
    #[serde(default)]
    pub mappings: Vec<crate::ports::Mapping>,
}

impl Default for State {
    fn default() -> Self {
        State {
            version: STATE_VERSION,
            state_id: String::new(),
            images: Vec::new(),
            loops: Vec::new(),
            mappings: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageRecord {
    pub name: String,
    pub owner_uid: u32,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LoopRecord {
    pub number: u32,
    /// `(owner uid, name)` of the image behind it, when attached by name.
    pub image: Option<(u32, String)>,
    pub backing_file: PathBuf,
    pub backing_dev: u64,
    pub backing_inode: u64,
    pub owner_uid: u32,
    #[serde(default)]
    pub instance: Option<String>,
    pub read_only: bool,
    pub partscan: bool,
    pub offset: u64,
    pub size_limit: u64,
    /// The partitions the last Rescan told the kernel about.
    #[serde(default)]
    pub partitions: Vec<crate::partitions::Partition>,
}

impl LoopRecord {
    pub fn device(&self) -> String {
        format!("/dev/loop{}", self.number)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create state directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state directory {path} is in use by another dindhelperd (lock held)")]
    Locked { path: PathBuf },
    #[error("cannot lock {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid state: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "{path} has state version {found}, this dindhelperd understands up to {STATE_VERSION}"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl crate::error::Classify for StateError {
    fn kind(&self) -> crate::error::Kind {
        crate::error::Kind::Failed
    }
}

/// The state directory, locked for this process's lifetime.
#[derive(Debug)]
pub struct StateStore {
    dir: PathBuf,
    _lock: nix::fcntl::Flock<File>,
}

impl StateStore {
    /// Create (mode 0700) and lock the state directory. Fails with `Locked` when another
    /// daemon holds it.
    pub fn open(dir: &Path) -> Result<StateStore, StateError> {
        std::fs::create_dir_all(dir).map_err(|source| StateError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        let lock_path = dir.join("state.lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&lock_path)
            .map_err(|source| StateError::Lock {
                path: lock_path.clone(),
                source,
            })?;
        match nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => Ok(StateStore {
                dir: dir.to_owned(),
                _lock: l,
            }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(StateError::Locked {
                path: dir.to_owned(),
            }),
            Err((_, e)) => Err(StateError::Lock {
                path: lock_path,
                source: e.into(),
            }),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// Load the state; a missing file is an empty state.
    pub fn load(&self) -> Result<State, StateError> {
        let path = self.path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
            Err(source) => return Err(StateError::Read { path, source }),
        };
        // Read the version first so a newer layout is refused with a clear message.
        #[derive(Deserialize)]
        struct V {
            version: u32,
        }
        let v: V = serde_json::from_str(&text).map_err(|source| StateError::Parse {
            path: path.clone(),
            source,
        })?;
        if v.version > STATE_VERSION {
            return Err(StateError::Version {
                path,
                found: v.version,
            });
        }
        serde_json::from_str(&text).map_err(|source| StateError::Parse { path, source })
    }

    /// Load, and give the state an id when it has none yet (first start).
    pub fn load_or_init(&self) -> Result<State, StateError> {
        let mut st = self.load()?;
        if st.state_id.is_empty() {
            st.state_id = new_state_id().map_err(|source| StateError::Read {
                path: "/dev/urandom".into(),
                source,
            })?;
            self.save(&st)?;
        }
        Ok(st)
    }

    /// Replace the state file atomically: write a temp file, fsync it, rename it over the
    /// old one, fsync the directory. A crash leaves either the old or the new file.
    pub fn save(&self, state: &State) -> Result<(), StateError> {
        let path = self.path();
        let tmp = self.dir.join(".state.json.tmp");
        let werr = |source| StateError::Write {
            path: path.clone(),
            source,
        };
        let mut body = serde_json::to_vec_pretty(state).expect("state serializes");
        body.push(b'\n');
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(werr)?;
        f.write_all(&body).map_err(werr)?;
        f.sync_all().map_err(werr)?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(werr)?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(werr)?;
        Ok(())
    }
}

fn new_state_id() -> std::io::Result<String> {
    use std::io::Read;
    let mut b = [0u8; 6];
    File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_roundtrip_and_lock() {
        let d = tempfile::tempdir().unwrap();
        let store = StateStore::open(d.path()).unwrap();
        assert_eq!(store.load().unwrap(), State::default());
        let id = store.load_or_init().unwrap().state_id;
        assert_eq!(id.len(), 12);
        assert_eq!(store.load_or_init().unwrap().state_id, id);
        let mut s = State {
            state_id: id,
            ..State::default()
        };
        s.images.push(ImageRecord {
            name: "a.img".into(),
            owner_uid: 1000,
            size: 1 << 20,
        });
        store.save(&s).unwrap();
        assert_eq!(store.load().unwrap(), s);
        assert!(!d.path().join(".state.json.tmp").exists());
        // A second daemon on the same dir is refused.
        assert!(matches!(
            StateStore::open(d.path()),
            Err(StateError::Locked { .. })
        ));
        drop(store);
        assert!(StateStore::open(d.path()).is_ok());
    }

    #[test]
    fn newer_version_is_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("state.json"), r#"{"version": 99}"#).unwrap();
        let store = StateStore::open(d.path()).unwrap();
        assert!(matches!(
            store.load(),
            Err(StateError::Version { found: 99, .. })
        ));
    }
}
