//! Images and loop devices: create/delete images, attach/detach with crash-safe intent
//! records, partition re-reads, and the start-up reconcile against the kernel.

use super::{blocking, Core, OpsError};
use crate::loopdev::{self, AttachOptions, LoopInfo};
use crate::names::check_file_name;
use crate::partitions::{self, Partition};
use crate::state::{Change, ImageRecord, LoopRecord};
use std::collections::HashMap;
use std::fs::File;
use std::sync::Arc;

/// What the caller asked for when attaching.
#[derive(Debug, Clone, Default)]
pub struct AttachRequest {
    pub read_only: bool,
    pub partscan: bool,
    pub offset: u64,
    pub size_limit: u64,
    pub instance: Option<String>,
    /// The caller is root acting for uid 0: no per-uid limit (see `config::quota_exempt`).
    pub quota_exempt: bool,
}

pub async fn create_image(
    core: &Arc<Core>,
    uid: u32,
    name: &str,
    size: u64,
) -> Result<ImageRecord, OpsError> {
    check_file_name("image name", name)?;
    let mut st = core.state.lock().await;
    let c = core.clone();
    let n = name.to_owned();
    let info = blocking(move || Ok(c.images.create(uid, &n, size)?)).await?;
    let rec = ImageRecord {
        name: info.name.clone(),
        owner_uid: uid,
        size: info.size,
    };
    st.images
        .retain(|i| !(i.owner_uid == uid && i.name == rec.name));
    st.images.push(rec.clone());
    if let Err(e) = core.record(&st, &[Change::Image(rec.clone())]) {
        st.images
            .retain(|i| !(i.owner_uid == uid && i.name == rec.name));
        if let Err(e2) = core.images.delete(uid, name) {
            tracing::error!(error = %e2, image = name, "rollback of image creation failed");
        }
        return Err(e);
    }
    Ok(rec)
}

/// The image exists and no loop device is attached to it.
fn check_image_unattached(st: &crate::state::State, uid: u32, name: &str) -> Result<(), OpsError> {
    if !st
        .images
        .iter()
        .any(|i| i.owner_uid == uid && i.name == name)
    {
        return Err(OpsError::NotFound {
            what: "image",
            name: format!("{name} (uid {uid})"),
        });
    }
    match st
        .loops
        .iter()
        .find(|l| l.image.as_ref() == Some(&(uid, name.to_owned())))
    {
        Some(l) => Err(OpsError::Busy {
            what: format!("image {name:?}"),
            why: format!("attached to {}; detach it first", l.device()),
        }),
        None => Ok(()),
    }
}

pub async fn delete_image(core: &Arc<Core>, uid: u32, name: &str) -> Result<(), OpsError> {
    check_file_name("image name", name)?;
    let mut st = core.state.lock().await;
    check_image_unattached(&st, uid, name)?;
    let c = core.clone();
    let n = name.to_owned();
    blocking(move || Ok(c.images.delete(uid, &n)?)).await?;
    st.images
        .retain(|i| !(i.owner_uid == uid && i.name == name));
    core.record(
        &st,
        &[Change::ImageGone {
            owner_uid: uid,
            name: name.to_owned(),
        }],
    )
}

fn check_loop_quota(
    core: &Core,
    loops: &[LoopRecord],
    uid: u32,
    exempt: bool,
) -> Result<(), OpsError> {
    let n = loops.iter().filter(|l| l.owner_uid == uid).count();
    if !exempt && n >= core.cfg.max_loops_per_uid {
        return Err(OpsError::Limit(format!(
            "uid {uid} already has {n} loop devices attached (max_loops_per_uid = {})",
            core.cfg.max_loops_per_uid
        )));
    }
    Ok(())
}

pub async fn attach_image(
    core: &Arc<Core>,
    uid: u32,
    name: &str,
    req: AttachRequest,
) -> Result<LoopRecord, OpsError> {
    check_file_name("image name", name)?;
    let st = core.state.lock().await;
    check_image_unattached(&st, uid, name)?;
    drop(st);
    let c = core.clone();
    let n = name.to_owned();
    let ro = req.read_only;
    let file = blocking(move || Ok(c.images.open(uid, &n, ro)?)).await?;
    attach(core, uid, file, Some((uid, name.to_owned())), req).await
}

pub async fn attach_fd(
    core: &Arc<Core>,
    uid: u32,
    file: File,
    req: AttachRequest,
) -> Result<LoopRecord, OpsError> {
    attach(core, uid, file, None, req).await
}

/// Attach and record. Every device the daemon attaches carries the label
/// `dindhelper:<state id>:uid=<uid>` in `lo_file_name`, so a daemon killed between the attach and the
/// state save leaves a device that the next start recognises as ours without a record,
/// and detaches (see [`reconcile`]). No intent record has to be written before the
/// attach, which keeps one state write per call.
async fn attach(
    core: &Arc<Core>,
    uid: u32,
    file: File,
    image: Option<(u32, String)>,
    req: AttachRequest,
) -> Result<LoopRecord, OpsError> {
    let mut st = core.state.lock().await;
    check_loop_quota(core, &st.loops, uid, req.quota_exempt)?;
    // Checked again under the lock that the attach holds to the end: two concurrent
    // AttachImage calls of one image both passed the first check (the open runs without
    // the lock); only one may attach, the other is Busy (two writable loops on one file
    // corrupt it).
    if let Some((owner, name)) = &image {
        check_image_unattached(&st, *owner, name)?;
    }
    let opts = AttachOptions {
        read_only: req.read_only,
        partscan: req.partscan,
        offset: req.offset,
        size_limit: req.size_limit,
        label: label(&st.state_id, uid),
    };
    let file = Arc::new(file);
    let mut t0;
    let mut settled = 0;
    let info = loop {
        // Numbers we hold records for: when the kernel hands one of them out as free, its
        // device was unbound behind our back (a container can LOOP_CLR_FD the node it was
        // given). Its exposures are revoked and the record dropped before anything is
        // bound to the number; never two records for one number.
        let recorded: Vec<u32> = st.loops.iter().map(|l| l.number).collect();
        let (f, o) = (file.clone(), opts.clone());
        t0 = std::time::Instant::now();
        match blocking(move || {
            Ok(loopdev::attach_file_avoiding(&f, &o, &|n| {
                recorded.contains(&n)
            })?)
        })
        .await
        {
            Err(OpsError::Loop(loopdev::LoopError::Recorded { number })) if settled < 8 => {
                settled += 1;
                let notes =
                    super::devices::revoke_locked(core, &mut st, number, None, false).await?;
                st.loops.retain(|l| l.number != number);
                core.record(&st, &[Change::LoopGone { number }])?;
                tracing::warn!(device = number, ?notes,
                    "the kernel handed out a recorded device as free (unbound behind our back): exposures revoked, record dropped");
            }
            other => break other?,
        }
    };
    let t1 = std::time::Instant::now();
    let rec = record_from(&info, image, uid, req.instance);
    remember_size(
        rec.number,
        size_key(
            rec.backing_dev,
            rec.backing_inode,
            rec.offset,
            rec.size_limit,
        ),
        info.size,
    );
    st.loops.push(rec.clone());
    let saved = core.record(&st, &[Change::Loop(rec.clone())]);
    tracing::debug!(
        kernel_us = (t1 - t0).as_micros() as u64,
        persist_us = t1.elapsed().as_micros() as u64,
        device = %rec.device(),
        "attach timings"
    );
    if let Err(e) = saved {
        st.loops.retain(|l| l.number != rec.number);
        if let Err(e2) = loopdev::detach(rec.number) {
            tracing::error!(error = %e2, device = %rec.device(), "rollback detach failed");
        }
        return Err(e);
    }
    Ok(rec)
}

/// The loop label (after `dindhelper:`) of devices this state directory's daemon attaches.
fn label(state_id: &str, uid: u32) -> String {
    format!("{state_id}:uid={uid}")
}

/// Whether a device carries this daemon's label (any uid).
fn is_mine(info: &LoopInfo, state_id: &str) -> bool {
    info.is_ours() && info.label[loopdev::LABEL_PREFIX.len()..].starts_with(&format!("{state_id}:"))
}

fn record_from(
    info: &LoopInfo,
    image: Option<(u32, String)>,
    owner_uid: u32,
    instance: Option<String>,
) -> LoopRecord {
    LoopRecord {
        number: info.number,
        image,
        backing_file: info.backing_file.clone(),
        backing_dev: info.backing_dev,
        backing_inode: info.backing_inode,
        owner_uid,
        instance,
        read_only: info.read_only,
        partscan: info.partscan,
        offset: info.offset,
        size_limit: info.size_limit,
        partitions: Vec::new(),
        exposures: Vec::new(),
    }
}

/// The record of a managed loop device, or `Unmanaged`.
pub async fn managed(core: &Core, number: u32) -> Result<LoopRecord, OpsError> {
    let st = core.state.lock().await;
    st.loops
        .iter()
        .find(|l| l.number == number)
        .cloned()
        .ok_or(OpsError::Unmanaged {
            device: format!("/dev/loop{number}"),
        })
}

pub async fn detach(core: &Arc<Core>, number: u32) -> Result<LoopRecord, OpsError> {
    detach_with(core, number, false).await.map(|(r, _)| r)
}

/// Detach: revoke every exposure of the device first (see `ops::devices`; Busy naming
/// the container when a grant cannot be withdrawn, unless `force`), then unbind it if it
/// is still bound to the recorded file, then drop the record. A device unbound behind our
/// back (LOOP_CLR_FD by a container) is settled the same way. Returns the record and
/// what the revocation did.
pub async fn detach_with(
    core: &Arc<Core>,
    number: u32,
    force: bool,
) -> Result<(LoopRecord, Vec<String>), OpsError> {
    let mut st = core.state.lock().await;
    let rec = st
        .loops
        .iter()
        .find(|l| l.number == number)
        .cloned()
        .ok_or(OpsError::Unmanaged {
            device: format!("/dev/loop{number}"),
        })?;
    let notes = super::devices::revoke_locked(core, &mut st, number, None, force).await?;
    let (dev, ino) = (rec.backing_dev, rec.backing_inode);
    let t0 = std::time::Instant::now();
    match blocking(move || Ok(loopdev::detach_checked(number, dev, ino)?)).await {
        Ok(how) => {
            tracing::debug!(kernel_us = t0.elapsed().as_micros() as u64, device = %rec.device(), "detach timings");
            if how == loopdev::Detached::Deferred {
                tracing::info!(device = %rec.device(), "device is still open (mounted?): the kernel detaches it at the last close");
            }
        }
        Err(OpsError::Loop(loopdev::LoopError::NotFound { what })) => {
            // No longer bound to our file: nothing to unbind, the record goes.
            tracing::warn!(device = %rec.device(), %what, "device was unbound behind our back; record dropped");
        }
        Err(e) => return Err(e),
    }
    st.loops.retain(|l| l.number != number);
    forget_size(number);
    core.record(&st, &[Change::LoopGone { number }])?;
    Ok((rec, notes))
}

pub async fn rescan(core: &Arc<Core>, number: u32) -> Result<Vec<Partition>, OpsError> {
    let rec = managed(core, number).await?;
    let dev = std::path::PathBuf::from(rec.device());
    let parts = blocking(move || Ok(partitions::rescan(&dev)?)).await?;
    // Read the size again at the next listing.
    forget_size(number);
    let mut st = core.state.lock().await;
    if let Some(l) = st.loops.iter_mut().find(|l| l.number == number) {
        l.partitions = parts.clone();
        let c = Change::Loop(l.clone());
        core.record(&st, &[c])?;
    }
    Ok(parts)
}

/// One row of ListLoops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopRow {
    pub number: u32,
    pub backing_file: String,
    /// Bytes, from sysfs (0 when the device went away).
    pub size: u64,
    pub read_only: bool,
    pub owner_uid: u32,
    pub instance: String,
}

/// Sizes of the daemon's loop devices, by number, with the binding they were read for
/// (backing device, inode, offset, size limit). A loop device's size is fixed when it is
/// bound, so ListLoops reads it once instead of once per call: reading sysfs for every
/// device cost 15 ms for 1000 devices, opening each for LOOP_GET_STATUS64 (before) 40 ms.
/// Trap: LOOP_SET_CAPACITY by whoever holds the node (a container it is exposed to)
/// changes the size behind our back; the listing shows the size at attach (or at the last
/// Rescan) until then. The key includes the binding, so a number re-bound to another file
/// is never answered from a stale entry. Process-wide: keys of two daemons in one process
/// (tests) cannot collide, their bindings differ.
static SIZES: std::sync::Mutex<Option<HashMap<u32, (SizeKey, u64)>>> = std::sync::Mutex::new(None);

type SizeKey = (u64, u64, u64, u64);

fn size_key(backing_dev: u64, backing_inode: u64, offset: u64, size_limit: u64) -> SizeKey {
    (backing_dev, backing_inode, offset, size_limit)
}

fn remember_size(number: u32, key: SizeKey, size: u64) {
    let mut g = SIZES.lock().unwrap_or_else(|p| p.into_inner());
    g.get_or_insert_with(HashMap::new)
        .insert(number, (key, size));
}

fn forget_size(number: u32) {
    let mut g = SIZES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(m) = g.as_mut() {
        m.remove(&number);
    }
}

/// Every managed loop device. The rows are built under the state lock (no clone of the
/// records with their partitions and exposures); sizes come from [`SIZES`], a miss (first
/// listing after a start) reads sysfs once.
pub async fn list_loops(core: &Core) -> Vec<LoopRow> {
    let rows: Vec<(LoopRow, SizeKey)> = {
        let st = core.state.lock().await;
        st.loops
            .iter()
            .map(|l| {
                (
                    LoopRow {
                        number: l.number,
                        backing_file: l.backing_file.display().to_string(),
                        size: 0,
                        read_only: l.read_only,
                        owner_uid: l.owner_uid,
                        instance: l.instance.clone().unwrap_or_default(),
                    },
                    size_key(l.backing_dev, l.backing_inode, l.offset, l.size_limit),
                )
            })
            .collect()
    };
    let mut g = SIZES.lock().unwrap_or_else(|p| p.into_inner());
    let sizes = g.get_or_insert_with(HashMap::new);
    if sizes.len() > rows.len() {
        let live: std::collections::HashSet<u32> = rows.iter().map(|(r, _)| r.number).collect();
        sizes.retain(|n, _| live.contains(n));
    }
    rows.into_iter()
        .map(|(mut r, key)| {
            r.size = match sizes.get(&r.number) {
                Some((k, size)) if *k == key => *size,
                _ => {
                    let size = loopdev::size(r.number);
                    if size > 0 {
                        sizes.insert(r.number, (key, size));
                    }
                    size
                }
            };
            r
        })
        .collect()
}

/// One decision of the start-up reconcile, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Kept(String),
    Forgot(String),
    Detached(String),
    Adopted(String),
    /// An exposure of a vanished device was revoked.
    Revoked(String),
}

/// Bring state and kernel in line at start:
/// - a recorded loop still attached to the same file (device+inode) is kept;
/// - a recorded loop that is gone or now backs another file is forgotten, after its
///   exposures were revoked (kept, with an error logged, when that fails);
/// - a device with our label but no record (interrupted attach) is detached;
/// - image records whose file vanished are dropped, image files without a record adopted.
pub async fn reconcile(core: &Arc<Core>) -> Result<Vec<Decision>, OpsError> {
    let mut st = core.state.lock().await;
    let mut out = Vec::new();
    let c = core.clone();
    let (partial, attached, on_disk) = blocking(move || {
        Ok((
            c.images.remove_partial()?,
            loopdev::list_attached()?,
            c.images.list(None)?,
        ))
    })
    .await?;
    for p in partial {
        out.push(Decision::Forgot(format!(
            "{}: temp file of an image create that was killed half-way: removed",
            p.display()
        )));
    }

    // Images.
    let before = std::mem::take(&mut st.images);
    for img in &on_disk {
        let known = before
            .iter()
            .any(|i| i.owner_uid == img.uid && i.name == img.name);
        if !known {
            out.push(Decision::Adopted(format!(
                "image {} of uid {} (file without record)",
                img.name, img.uid
            )));
        }
        st.images.push(ImageRecord {
            name: img.name.clone(),
            owner_uid: img.uid,
            size: img.size,
        });
    }
    for i in &before {
        if !st
            .images
            .iter()
            .any(|x| x.owner_uid == i.owner_uid && x.name == i.name)
        {
            out.push(Decision::Forgot(format!(
                "image {} of uid {} (file is gone)",
                i.name, i.owner_uid
            )));
        }
    }

    // Recorded loops. A record to forget is settled first: its exposures are revoked
    // (the number is free or holds another file now). If that fails the record stays, so
    // the next attach that is handed the number revokes again before binding.
    let recorded = std::mem::take(&mut st.loops);
    let mut forget = Vec::new();
    for mut rec in recorded {
        // Exposures in containers that are gone are void: their /dev and cgroup died
        // with them (a restarted container gets fresh ones).
        let device = rec.device();
        rec.exposures.retain(|e| {
            let alive = e.target().verify().is_ok();
            if !alive {
                out.push(Decision::Revoked(format!(
                    "{device}: exposure in container {} dropped: the container is gone",
                    e.container_name
                )));
            }
            alive
        });
        let live = attached.iter().find(|a| a.number == rec.number);
        let why = match live {
            Some(a) if a.backing_dev == rec.backing_dev && a.backing_inode == rec.backing_inode => {
                out.push(Decision::Kept(format!(
                    "{} backed by {}",
                    rec.device(),
                    rec.backing_file.display()
                )));
                None
            }
            Some(a) => Some(format!(
                "{} (now backs {}, not {})",
                rec.device(),
                a.backing_file.display(),
                rec.backing_file.display()
            )),
            None => Some(format!("{} (no longer attached)", rec.device())),
        };
        if let Some(why) = why {
            forget.push((rec.number, why));
        }
        st.loops.push(rec);
    }
    for (number, why) in forget {
        match super::devices::revoke_locked(core, &mut st, number, None, false).await {
            Ok(notes) => {
                for n in notes {
                    out.push(Decision::Revoked(n));
                }
                st.loops.retain(|l| l.number != number);
                out.push(Decision::Forgot(why));
            }
            Err(e) => {
                tracing::error!(device = number, error = %e, "cannot revoke the exposures of a vanished device; keeping its record");
                out.push(Decision::Kept(format!(
                    "{why}: exposures not revoked ({e})"
                )));
            }
        }
    }

    // Exposures whose change a killed daemon left half-done: finished or undone.
    for d in super::devices::settle_pending(core, &mut st).await {
        out.push(Decision::Revoked(d));
    }

    // Devices this state dir's daemon attached (by label, which carries the state id)
    // that no record claims: left by an attach whose daemon died before saving. Nobody
    // was told about them, so they are detached rather than adopted. Devices of other
    // daemons (other state dirs) or tools are never touched.
    for a in &attached {
        if !is_mine(a, &st.state_id) || st.loops.iter().any(|l| l.number == a.number) {
            continue;
        }
        let (n, dev, ino) = (a.number, a.backing_dev, a.backing_inode);
        match blocking(move || Ok(loopdev::detach_checked(n, dev, ino)?)).await {
            Ok(_) => out.push(Decision::Detached(format!(
                "/dev/loop{n} ({}) carries our label but no record: interrupted attach",
                a.backing_file.display()
            ))),
            Err(e) => {
                tracing::error!(device = n, error = %e, "cannot detach an unrecorded device of ours")
            }
        }
    }
    core.store.save_all(&st)?;
    Ok(out)
}
