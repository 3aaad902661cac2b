//! Persistent intent: what should exist, as a JSON snapshot plus an append-only journal.
//!
//! Layout of `<state-dir>`:
//! ```text
//! state.json        snapshot of the durable intent (state id, images, instances, published
//!                   ports), replaced atomically and durably at compaction only:
//!                   temp + fsync + rename + fsync of the directory
//! loops.json        snapshot of the loop device records, replaced atomically (temp +
//!                   rename) WITHOUT fsync, at compaction only
//! state.journal     the changes since the snapshots, one framed line per call
//!                   (`<len> <crc32> <json batch of changes>`, see `state/journal.rs`)
//! state.lock        flock held by the running daemon: one daemon per state dir
//! images/<uid>/     sparse image files, `<name>.img` (see loopdev::images)
//! captures/<uid>/   capture files `<name>.pcap` owned by the caller, 0640 (see capture::file)
//! ```
//! The effective state is the snapshots with the journal replayed over them
//! ([`load_effective`]; `dindhelperd --dump-state` prints it). Read that, never
//! `state.json` alone: it lags the journal by up to one compaction bound.
//!
//! Why a journal (issue 12, flat cost to 1000 resources): rewriting and fsyncing the whole
//! `state.json` on every change cost time linear in the state (measured: CreateImage
//! 1.9 ms at 100 images, 4.1 ms at 1000). Now a call that changes intent appends one
//! record of what it changed, keyed by resource ([`Change`]: insert-or-replace by key, or
//! remove by key), and fdatasyncs it when any change in it is durable — one small write
//! and one flush whatever the size of the state; before the call answers, as before. A
//! batch of changes (PublishMany) is one record, so it is replayed all or nothing.
//!
//! Compaction: when the journal outgrows max(256 KiB, twice the snapshots), the call that
//! crosses it writes both snapshots and empties the journal (ftruncate + fsync). The
//! bound grows with the state, so the rewrite (linear in the state) happens once per
//! O(state) records: amortized constant per call, and the median call never pays it. The
//! daemon also compacts at start (one rewrite, and a torn tail is cut) and at shutdown.
//! A kill between the new snapshot and the emptied journal replays records the snapshot
//! already holds: harmless, because keyed changes replayed in order over a state that
//! already has their net effect leave it unchanged.
//!
//! Torn records: a kill during an append leaves a partial last line; length and checksum
//! catch it and it is ignored (its call was not answered: the append and its fsync come
//! before the answer). Nothing may be appended after garbage, since reading stops at the
//! first bad record: a failed append is cut back to the last good length, and a journal
//! with a bad tail found at load is compacted before the first new record.
//!
//! Why loop records are journaled without fsync: loop devices die with the kernel. A
//! write is safe against a daemon crash without any fsync (the page cache survives the
//! process), and only a power loss or kernel crash can lose or tear them — after which no
//! loop device exists anyway, so an unreadable `loops.json` is treated as empty (with a
//! warning) and the start-up reconcile settles records of vanished devices. An fsync of a
//! later durable record flushes earlier loop records with it (one file), so a durable
//! record never sits behind a torn loop record. Skipping the fsync keeps attach/detach
//! below `losetup`'s cost.
//!
//! Only intent is stored (image ↔ loop, owners, instances, published ports); effects are
//! re-read from the kernel at start and reconciled (see `ops::loops::reconcile`,
//! `ops::ports::start`).

mod journal;

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
    /// Saved in `loops.json`, never in `state.json` (an old `state.json` that has them is
    /// still read).
    #[serde(default, skip_serializing)]
    pub loops: Vec<LoopRecord>,
    /// DinD instances (see `ops::instances`).
    #[serde(default)]
    pub instances: Vec<InstanceRecord>,
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
            instances: Vec::new(),
            mappings: Vec::new(),
        }
    }
}

/// One row of ListImages: an image and the device it is attached to ("" when none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRow<'a> {
    pub image: &'a ImageRecord,
    pub device: String,
}

impl State {
    /// Every image with its attached device, in O(images + loops): one map from
    /// (uid, name) to device first. (Searching the loop records for every image cost
    /// O(images × loops) with a String clone per comparison: ~30 ms at 1000 × 1000.)
    pub fn image_rows(&self) -> Vec<ImageRow<'_>> {
        let attached: std::collections::HashMap<(u32, &str), u32> = self
            .loops
            .iter()
            .filter_map(|l| l.image.as_ref().map(|(u, n)| ((*u, n.as_str()), l.number)))
            .collect();
        self.images
            .iter()
            .map(|i| ImageRow {
                image: i,
                device: attached
                    .get(&(i.owner_uid, i.name.as_str()))
                    .map(|n| format!("/dev/loop{n}"))
                    .unwrap_or_default(),
            })
            .collect()
    }
}

/// One change of the intent, keyed by resource: what a journal record holds (a record is
/// a batch of them, applied all or nothing). `…Gone` removes by key; the others insert or
/// replace the record with that key in place.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    StateId(String),
    Image(ImageRecord),
    ImageGone {
        owner_uid: u32,
        name: String,
    },
    Instance(InstanceRecord),
    InstanceGone {
        name: String,
    },
    Mapping(crate::ports::Mapping),
    MappingGone {
        id: String,
    },
    /// Loop records are journaled without fsync (see the module docs).
    Loop(LoopRecord),
    LoopGone {
        number: u32,
    },
}

impl Change {
    /// Whether the change must be on disk before the call that made it answers.
    pub fn durable(&self) -> bool {
        !matches!(self, Change::Loop(_) | Change::LoopGone { .. })
    }
}

/// Replace the element with `key` in place, or push it.
fn put<T>(v: &mut Vec<T>, rec: T, same: impl Fn(&T, &T) -> bool) {
    match v.iter_mut().find(|x| same(x, &rec)) {
        Some(x) => *x = rec,
        None => v.push(rec),
    }
}

impl State {
    /// Apply one change (replay; the ops layer changes its `State` directly and records
    /// the same change).
    pub fn apply(&mut self, c: Change) {
        match c {
            Change::StateId(id) => self.state_id = id,
            Change::Image(r) => put(&mut self.images, r, |a, b| {
                a.owner_uid == b.owner_uid && a.name == b.name
            }),
            Change::ImageGone { owner_uid, name } => self
                .images
                .retain(|i| !(i.owner_uid == owner_uid && i.name == name)),
            Change::Instance(r) => put(&mut self.instances, r, |a, b| {
                a.instance.name == b.instance.name
            }),
            Change::InstanceGone { name } => self.instances.retain(|i| i.instance.name != name),
            Change::Mapping(m) => put(&mut self.mappings, m, |a, b| a.id == b.id),
            Change::MappingGone { id } => self.mappings.retain(|m| m.id != id),
            Change::Loop(l) => put(&mut self.loops, l, |a, b| a.number == b.number),
            Change::LoopGone { number } => self.loops.retain(|l| l.number != number),
        }
    }

    /// The changes that turn the mappings `old` into `new` (by id; order within `new` is
    /// kept on replay for new ids, which are appended).
    pub fn mapping_changes(
        old: &[crate::ports::Mapping],
        new: &[crate::ports::Mapping],
    ) -> Vec<Change> {
        let old_by_id: std::collections::HashMap<&str, &crate::ports::Mapping> =
            old.iter().map(|m| (m.id.as_str(), m)).collect();
        let new_ids: std::collections::HashSet<&str> = new.iter().map(|m| m.id.as_str()).collect();
        let mut out: Vec<Change> = old
            .iter()
            .filter(|m| !new_ids.contains(m.id.as_str()))
            .map(|m| Change::MappingGone { id: m.id.clone() })
            .collect();
        out.extend(
            new.iter()
                .filter(|m| old_by_id.get(m.id.as_str()) != Some(m))
                .map(|m| Change::Mapping(m.clone())),
        );
        out
    }
}

/// An instance: the domain's [`crate::instances::Instance`] (flattened into the same JSON
/// object) plus who made it and which containers were adopted into it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstanceRecord {
    #[serde(flatten)]
    pub instance: crate::instances::Instance,
    /// uid of the caller of CreateInstance; other uids need the `-others` action.
    pub owner_uid: u32,
    /// Containers adopted with AdoptContainer (Docker ids, or `pid:N`), for the re-apply
    /// of oom_score_adj when a container restarts.
    #[serde(default)]
    pub containers: Vec<String>,
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
    /// Where this device is exposed (ExposeToContainer), one per container. Revoked
    /// before the number can be handed out again (see `ops::devices`). Kept with the loop
    /// record in `loops.json`: an exposure dies with its device and its container, and
    /// neither survives the power loss that could tear that file.
    #[serde(default)]
    pub exposures: Vec<crate::expose::Exposure>,
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
    #[error(
        "{path}: record {record} is whole (checksum holds) but not a batch of changes: {source}"
    )]
    Journal {
        path: PathBuf,
        record: usize,
        source: serde_json::Error,
    },
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
    journal: std::sync::Mutex<Journal>,
}

/// The open journal and what compaction needs to know.
#[derive(Debug, Default)]
struct Journal {
    /// Opened (append) at the first record after a compaction.
    file: Option<File>,
    /// Bytes of good records in the file: a failed append is cut back to this.
    len: u64,
    /// Size of the last snapshot (`state.json` + `loops.json`), for the compaction bound.
    snapshot_bytes: u64,
    /// The file may hold bytes after `len` that could not be cut (a failed write whose
    /// truncate failed too): the next record compacts instead of appending.
    dirty: bool,
}

/// Compact when the journal is larger than this and larger than twice the snapshot: the
/// rewrite (linear in the state) then happens once per O(state size) records, so its
/// amortized cost per call is constant.
const COMPACT_MIN_BYTES: u64 = 256 << 10;

impl StateStore {
    /// Create (mode 0711) and lock the state directory. 0711: nobody may list it, but a
    /// caller can reach its own capture files by path (`captures/<uid>/x.pcap`, 0640);
    /// everything else below is 0600/0700 root. Fails with `Locked` when another
    /// daemon holds it.
    pub fn open(dir: &Path) -> Result<StateStore, StateError> {
        std::fs::create_dir_all(dir).map_err(|source| StateError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711));
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
                // `dirty` until a load established the journal's good length: the first
                // record then compacts instead of appending after bytes never checked.
                journal: std::sync::Mutex::new(Journal {
                    dirty: true,
                    ..Journal::default()
                }),
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

    fn loops_path(&self) -> PathBuf {
        self.dir.join("loops.json")
    }

    fn journal_path(&self) -> PathBuf {
        self.dir.join("state.journal")
    }

    /// Load the effective state (snapshot + journal); a missing file is an empty state.
    pub fn load(&self) -> Result<State, StateError> {
        let (st, info) = read_effective(&self.dir)?;
        let mut j = self.journal.lock().unwrap();
        j.file = None;
        j.len = info.journal_valid;
        j.snapshot_bytes = info.snapshot_bytes;
        // A torn tail must be gone before anything is appended after it.
        j.dirty = info.journal_valid != info.journal_bytes;
        Ok(st)
    }

    /// Load, give the state an id when it has none yet (first start), and compact when
    /// the journal holds anything (start-up: one rewrite, and a torn tail is cut).
    pub fn load_or_init(&self) -> Result<State, StateError> {
        let mut st = self.load()?;
        let journal_bytes = std::fs::metadata(self.journal_path()).map_or(0, |m| m.len());
        if st.state_id.is_empty() {
            st.state_id = new_state_id().map_err(|source| StateError::Read {
                path: "getrandom(2)".into(),
                source,
            })?;
            self.save_all(&st)?;
        } else if journal_bytes > 0 || !self.path().exists() {
            self.save_all(&st)?;
        }
        Ok(st)
    }

    /// Record `changes` (one batch, all or nothing) in the journal: one append, fsynced
    /// (fdatasync) when any change is durable. `state` is the state with the changes
    /// applied: written as the new snapshot when the journal has grown past its bound
    /// (see [`COMPACT_MIN_BYTES`]) or could not be appended to. Call with the state
    /// lock held (records are ordered by it).
    pub fn record(&self, state: &State, changes: &[Change]) -> Result<(), StateError> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut j = self.journal.lock().unwrap();
        if j.dirty || j.len > COMPACT_MIN_BYTES.max(2 * j.snapshot_bytes) {
            return self.compact_locked(&mut j, state);
        }
        let path = self.journal_path();
        let werr = |source| StateError::Write {
            path: path.clone(),
            source,
        };
        if j.file.is_none() {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC)
                .open(&path)
                .map_err(werr)?;
            let len = f.metadata().map_err(werr)?.len();
            if len != j.len {
                // Not the file we know the length of (removed or changed behind us).
                return self.compact_locked(&mut j, state);
            }
            if len == 0 {
                // A new (or emptied) file: its directory entry must be durable too
                // before a durable record in it counts.
                sync_dir(&self.dir).map_err(werr)?;
            }
            j.file = Some(f);
        }
        let payload = serde_json::to_vec(changes).expect("changes serialize");
        let rec = journal::frame(&payload);
        let durable = changes.iter().any(Change::durable);
        let f = j.file.as_mut().expect("opened above");
        let res = f
            .write_all(&rec)
            .and_then(|()| if durable { f.sync_data() } else { Ok(()) });
        match res {
            Ok(()) => {
                j.len += rec.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Cut back to the last good record: nothing may follow a torn one.
                let len = j.len;
                let cut = j.file.as_ref().expect("open").set_len(len);
                if cut.is_err() {
                    j.dirty = true;
                    j.file = None;
                }
                Err(werr(e))
            }
        }
    }

    /// Write the whole state as the new snapshot and empty the journal.
    pub fn save_all(&self, state: &State) -> Result<(), StateError> {
        let mut j = self.journal.lock().unwrap();
        self.compact_locked(&mut j, state)
    }

    /// `loops.json` (atomic, no fsync), `state.json` (atomic, durable), then the journal
    /// emptied and fsynced. A crash in between leaves records in the journal that the
    /// snapshot already holds: replaying them again gives the same state (each change is
    /// keyed and the journal's net effect is already in the snapshot).
    fn compact_locked(&self, j: &mut Journal, state: &State) -> Result<(), StateError> {
        let loops = self.save_loops(state)?;
        let durable = self.save(state)?;
        let path = self.journal_path();
        let werr = |source| StateError::Write {
            path: path.clone(),
            source,
        };
        j.file = None;
        match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(f) => {
                f.set_len(0).map_err(werr)?;
                f.sync_all().map_err(werr)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(werr(e)),
        }
        j.len = 0;
        j.dirty = false;
        j.snapshot_bytes = loops + durable;
        Ok(())
    }

    /// Replace `state.json` atomically and durably: write a temp file, fsync it, rename
    /// it over the old one, fsync the directory. A crash leaves the old or the new file.
    /// Loop records are not part of it. Only compaction calls it: alone it would leave
    /// journal records older than it to be replayed over it.
    fn save(&self, state: &State) -> Result<u64, StateError> {
        let mut body = serde_json::to_vec_pretty(state).expect("state serializes");
        body.push(b'\n');
        self.replace(&self.path(), &body, true)?;
        Ok(body.len() as u64)
    }

    /// Replace `loops.json` atomically, without fsync (see the module docs).
    fn save_loops(&self, state: &State) -> Result<u64, StateError> {
        #[derive(Serialize)]
        struct Loops<'a> {
            version: u32,
            loops: &'a [LoopRecord],
        }
        let mut body = serde_json::to_vec_pretty(&Loops {
            version: STATE_VERSION,
            loops: &state.loops,
        })
        .expect("loops serialize");
        body.push(b'\n');
        self.replace(&self.loops_path(), &body, false)?;
        Ok(body.len() as u64)
    }

    fn replace(&self, path: &Path, body: &[u8], durable: bool) -> Result<(), StateError> {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("state");
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let werr = |source| StateError::Write {
            path: path.to_owned(),
            source,
        };
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(werr)?;
        f.write_all(body).map_err(werr)?;
        if durable {
            f.sync_all().map_err(werr)?;
        }
        drop(f);
        std::fs::rename(&tmp, path).map_err(werr)?;
        if durable {
            sync_dir(&self.dir).map_err(werr)?;
        }
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all())
}

/// What reading a state directory found besides the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ReadInfo {
    snapshot_bytes: u64,
    journal_bytes: u64,
    /// Length of the journal's good prefix (`< journal_bytes`: a torn tail was ignored).
    journal_valid: u64,
}

/// The effective state of a state directory: `state.json` and `loops.json` with
/// `state.journal` replayed over them. Reads only (no lock: usable while a daemon runs,
/// which is what tests and `dindhelperd --dump-state` do); a record the daemon is
/// appending right now may or may not be in it.
pub fn load_effective(dir: &Path) -> Result<State, StateError> {
    read_effective(dir).map(|(st, _)| st)
}

/// [`load_effective`] as JSON: the `state.json` layout with the loop records added under
/// `loops` (what `dindhelperd --dump-state` prints).
pub fn effective_json(dir: &Path) -> Result<serde_json::Value, StateError> {
    let st = load_effective(dir)?;
    let mut v = serde_json::to_value(&st).expect("state serializes");
    v["loops"] = serde_json::to_value(&st.loops).expect("loops serialize");
    Ok(v)
}

fn read_effective(dir: &Path) -> Result<(State, ReadInfo), StateError> {
    let path = dir.join("state.json");
    let (mut st, durable_bytes) = match std::fs::read_to_string(&path) {
        Ok(text) => {
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
            let st: State = serde_json::from_str(&text).map_err(|source| StateError::Parse {
                path: path.clone(),
                source,
            })?;
            (st, text.len() as u64)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (State::default(), 0),
        Err(source) => return Err(StateError::Read { path, source }),
    };
    let mut loops_bytes = 0;
    if let Some((loops, n)) = load_loops(dir)? {
        st.loops = loops;
        loops_bytes = n;
    }
    let jpath = dir.join("state.journal");
    let bytes = match std::fs::read(&jpath) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(source) => {
            return Err(StateError::Read {
                path: jpath,
                source,
            })
        }
    };
    let read = journal::read(&bytes);
    for (i, rec) in read.records.iter().enumerate() {
        let changes: Vec<Change> =
            serde_json::from_slice(rec).map_err(|source| StateError::Journal {
                path: jpath.clone(),
                record: i,
                source,
            })?;
        for c in changes {
            st.apply(c);
        }
    }
    if read.valid != bytes.len() {
        tracing::warn!(path = %jpath.display(), records = read.records.len(),
            ignored_bytes = bytes.len() - read.valid,
            "journal ends in a torn record (crash during an append): ignored; that call was not answered");
    }
    Ok((
        st,
        ReadInfo {
            snapshot_bytes: durable_bytes + loops_bytes,
            journal_bytes: bytes.len() as u64,
            journal_valid: read.valid as u64,
        },
    ))
}

/// `None` when `loops.json` does not exist; an unreadable file is empty (see the
/// module docs: only a power loss can tear it, and then no loop device survived).
fn load_loops(dir: &Path) -> Result<Option<(Vec<LoopRecord>, u64)>, StateError> {
    let path = dir.join("loops.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StateError::Read { path, source }),
    };
    #[derive(Deserialize)]
    struct Loops {
        version: u32,
        loops: Vec<LoopRecord>,
    }
    match serde_json::from_str::<Loops>(&text) {
        Ok(l) if l.version <= STATE_VERSION => Ok(Some((l.loops, text.len() as u64))),
        Ok(l) => Err(StateError::Version {
            path,
            found: l.version,
        }),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e,
                "loop records unreadable (power loss?): starting with none; reconcile detaches our unrecorded devices");
            Ok(Some((Vec::new(), 0)))
        }
    }
}

fn new_state_id() -> std::io::Result<String> {
    crate::random::hex(6)
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
        s.loops.push(LoopRecord {
            number: 7,
            image: Some((1000, "a.img".into())),
            backing_file: "/x/a.img.img".into(),
            backing_dev: 1,
            backing_inode: 2,
            owner_uid: 1000,
            instance: None,
            read_only: false,
            partscan: true,
            offset: 0,
            size_limit: 0,
            partitions: Vec::new(),
            exposures: Vec::new(),
        });
        store.save_all(&s).unwrap();
        assert_eq!(store.load().unwrap(), s);
        assert!(!d.path().join(".state.json.tmp").exists());
        // Loop records live in loops.json only.
        let durable = std::fs::read_to_string(d.path().join("state.json")).unwrap();
        assert!(!durable.contains("a.img.img"), "{durable}");
        // A torn loops.json (power loss) reads as no loops; state.json is unaffected.
        std::fs::write(d.path().join("loops.json"), "{\"version\": 1, \"loo").unwrap();
        let back = store.load().unwrap();
        assert!(back.loops.is_empty());
        assert_eq!(back.images, s.images);
        // A second daemon on the same dir is refused.
        assert!(matches!(
            StateStore::open(d.path()),
            Err(StateError::Locked { .. })
        ));
        drop(store);
        assert!(StateStore::open(d.path()).is_ok());
    }

    #[test]
    fn image_rows_join_images_and_loops() {
        let img = |uid, name: &str| ImageRecord {
            name: name.into(),
            owner_uid: uid,
            size: 1,
        };
        let lp = |n, uid, name: &str| LoopRecord {
            number: n,
            image: Some((uid, name.into())),
            backing_file: "/x".into(),
            backing_dev: 0,
            backing_inode: 0,
            owner_uid: uid,
            instance: None,
            read_only: false,
            partscan: true,
            offset: 0,
            size_limit: 0,
            partitions: Vec::new(),
            exposures: Vec::new(),
        };
        let st = State {
            images: vec![img(1, "a"), img(2, "a"), img(1, "b")],
            loops: vec![lp(5, 2, "a"), lp(6, 1, "b")],
            ..State::default()
        };
        let rows: Vec<String> = st
            .image_rows()
            .iter()
            .map(|r| format!("{} {} {}", r.image.owner_uid, r.image.name, r.device))
            .collect();
        assert_eq!(rows, ["1 a ", "2 a /dev/loop5", "1 b /dev/loop6"]);
    }

    fn img(uid: u32, name: &str, size: u64) -> ImageRecord {
        ImageRecord {
            name: name.into(),
            owner_uid: uid,
            size,
        }
    }

    fn lp(number: u32) -> LoopRecord {
        LoopRecord {
            number,
            image: None,
            backing_file: "/x".into(),
            backing_dev: 0,
            backing_inode: 0,
            owner_uid: 0,
            instance: None,
            read_only: false,
            partscan: true,
            offset: 0,
            size_limit: 0,
            partitions: Vec::new(),
            exposures: Vec::new(),
        }
    }

    /// Apply and record, as the ops layer does.
    fn change(store: &StateStore, st: &mut State, changes: Vec<Change>) {
        for c in &changes {
            st.apply(c.clone());
        }
        store.record(st, &changes).unwrap();
    }

    #[test]
    fn journal_replays_over_the_snapshot_in_order() {
        let d = tempfile::tempdir().unwrap();
        let store = StateStore::open(d.path()).unwrap();
        let mut st = store.load_or_init().unwrap();
        let snap = std::fs::read_to_string(d.path().join("state.json")).unwrap();
        change(&store, &mut st, vec![Change::Image(img(1, "a", 1))]);
        change(&store, &mut st, vec![Change::Image(img(2, "b", 2))]);
        // Replaced in place, not appended again.
        change(&store, &mut st, vec![Change::Image(img(1, "a", 10))]);
        change(
            &store,
            &mut st,
            vec![Change::Loop(lp(3)), Change::Loop(lp(4))],
        );
        change(&store, &mut st, vec![Change::LoopGone { number: 3 }]);
        change(
            &store,
            &mut st,
            vec![Change::ImageGone {
                owner_uid: 2,
                name: "b".into(),
            }],
        );
        // One append per call; the snapshot was not rewritten.
        assert_eq!(
            std::fs::read_to_string(d.path().join("state.json")).unwrap(),
            snap
        );
        let lines = std::fs::read_to_string(d.path().join("state.journal")).unwrap();
        assert_eq!(lines.lines().count(), 6, "{lines}");
        let back = load_effective(d.path()).unwrap();
        assert_eq!(back, st);
        assert_eq!(back.images, [img(1, "a", 10)]);
        assert_eq!(back.loops, [lp(4)]);
        // What `--dump-state` prints: the loop records included.
        let v = effective_json(d.path()).unwrap();
        assert_eq!(v["loops"][0]["number"], 4);
        assert_eq!(v["images"][0]["size"], 10);
        // A restart compacts: the journal is empty, the snapshot holds everything.
        drop(store);
        let store = StateStore::open(d.path()).unwrap();
        assert_eq!(store.load_or_init().unwrap(), st);
        assert_eq!(
            std::fs::metadata(d.path().join("state.journal"))
                .unwrap()
                .len(),
            0
        );
        let snap: State =
            serde_json::from_str(&std::fs::read_to_string(d.path().join("state.json")).unwrap())
                .unwrap();
        assert_eq!(snap.images, st.images);
        // …and appends again after it.
        change(&store, &mut st, vec![Change::Image(img(5, "e", 5))]);
        assert_eq!(load_effective(d.path()).unwrap(), st);
    }

    #[test]
    fn torn_last_record_is_ignored_and_cut_before_the_next_append() {
        let d = tempfile::tempdir().unwrap();
        let store = StateStore::open(d.path()).unwrap();
        let mut st = store.load_or_init().unwrap();
        change(&store, &mut st, vec![Change::Image(img(1, "a", 1))]);
        change(&store, &mut st, vec![Change::Image(img(1, "b", 1))]);
        let answered = st.clone();
        let jpath = d.path().join("state.journal");
        let good = std::fs::read(&jpath).unwrap();
        // A crash in the middle of the third append: every cut of it is ignored.
        let third = journal::frame(&serde_json::to_vec(&[Change::Image(img(1, "c", 1))]).unwrap());
        drop(store);
        for cut in [1, 10, 18, 19, third.len() / 2, third.len() - 1] {
            let mut t = good.clone();
            t.extend(&third[..cut]);
            std::fs::write(&jpath, &t).unwrap();
            assert_eq!(load_effective(d.path()).unwrap(), answered, "cut {cut}");
        }
        // The daemon restarts on the torn journal: the tail is gone before new records,
        // so a record after it is not lost behind the garbage.
        let store = StateStore::open(d.path()).unwrap();
        let mut st = store.load_or_init().unwrap();
        assert_eq!(st, answered);
        change(&store, &mut st, vec![Change::Image(img(1, "d", 1))]);
        drop(store);
        assert_eq!(load_effective(d.path()).unwrap(), st);
        // Even with `load` alone (no compaction at start), the first record compacts
        // instead of appending after a torn tail.
        let mut t = std::fs::read(&jpath).unwrap();
        t.extend(&third[..7]);
        std::fs::write(&jpath, &t).unwrap();
        let store = StateStore::open(d.path()).unwrap();
        let mut st = store.load().unwrap();
        change(&store, &mut st, vec![Change::Image(img(1, "e", 1))]);
        assert_eq!(load_effective(d.path()).unwrap(), st);
        assert_eq!(std::fs::metadata(&jpath).unwrap().len(), 0);
    }

    #[test]
    fn journal_is_compacted_past_its_bound_and_a_replay_after_compaction_is_harmless() {
        let d = tempfile::tempdir().unwrap();
        let store = StateStore::open(d.path()).unwrap();
        let mut st = store.load_or_init().unwrap();
        let jpath = d.path().join("state.journal");
        let (mut max, mut prev, mut compactions) = (0, 0, 0);
        // ~100 bytes a record: past the 256 KiB bound once or twice.
        for i in 0..4000u32 {
            let k = i % 100;
            let name = format!("an-image-with-a-long-name-{k}");
            change(
                &store,
                &mut st,
                vec![Change::Image(img(k % 7, &name, u64::from(i)))],
            );
            let len = std::fs::metadata(&jpath).unwrap().len();
            if len < prev {
                compactions += 1;
            }
            (max, prev) = (max.max(len), len);
        }
        assert!(compactions >= 1, "never compacted (max {max})");
        // Bounded: compacted at the bound (plus one record) instead of growing.
        assert!(max <= COMPACT_MIN_BYTES + 200, "journal grew to {max}");
        assert_eq!(st.images.len(), 100);
        assert_eq!(load_effective(d.path()).unwrap(), st);
        // A kill between the new snapshot and the emptied journal: the journal's records
        // replayed over the snapshot that already holds them give the same state.
        let journal_before = std::fs::read(&jpath).unwrap();
        store.save_all(&st).unwrap();
        std::fs::write(&jpath, &journal_before).unwrap();
        assert_eq!(load_effective(d.path()).unwrap(), st);
    }

    #[test]
    fn mapping_changes_are_by_id() {
        let m = |id: &str, port: u16| -> crate::ports::Mapping {
            serde_json::from_value(serde_json::json!({
                "id": id, "container_id": "c", "container_name": "n", "protocol": "tcp",
                "host_ip": null, "host_port": port, "container_port": 80, "network": "b",
                "owner_uid": 1, "instance": null, "state": "waiting",
            }))
            .unwrap()
        };
        let old = [m("a", 1), m("b", 2), m("c", 3)];
        let new = [m("a", 1), m("c", 4), m("d", 5)];
        let ch = State::mapping_changes(&old, &new);
        assert_eq!(
            ch,
            [
                Change::MappingGone { id: "b".into() },
                Change::Mapping(m("c", 4)),
                Change::Mapping(m("d", 5)),
            ]
        );
        let mut st = State {
            mappings: old.to_vec(),
            ..State::default()
        };
        for c in ch {
            st.apply(c);
        }
        assert_eq!(st.mappings, new);
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
