//! Exposures: ExposeToContainer, RevokeFromContainer, ListExposures, and the revocation
//! every path that frees a loop number runs first (Detach, DestroyInstance, the stale
//! record LOOP_CTL_GET_FREE reveals, the start-up reconcile). See `crate::expose`.
//!
//! Rules kept here:
//! - Exposures live in their loop record (`LoopRecord::exposures`, one per container) and
//!   are changed only with the state lock held, so an expose can never race the revoke of
//!   a detach.
//! - Before acting on a record its live binding is compared with the record
//!   (LOOP_GET_STATUS64: backing st_dev/st_ino); a record whose device was unbound behind
//!   the daemon's back is settled (revoked, dropped), never trusted.
//! - A grant that cannot be withdrawn from a live container stops the caller (Busy naming
//!   the container) unless `force`: then the log and the reply say so.

use crate::docker::{Docker, DockerError};
use crate::error::{Classify, Kind};
use crate::expose::{self, program, Container, ExposeError, ExposeReport, ExposeRequest, Revoked};
use crate::netns::{NetnsError, Target};
use crate::ops::{blocking, Core, OpsError};
use crate::state::State;

#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    #[error(transparent)]
    Ops(#[from] OpsError),
    #[error(transparent)]
    Expose(#[from] ExposeError),
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error(transparent)]
    Target(#[from] NetnsError),
    #[error("no Docker client configured (start dindhelperd with --docker-host)")]
    NoDocker,
    #[error("container {name} is not running")]
    NotRunning { name: String },
    #[error("container {name} changed while it was resolved (restarted?); try again")]
    Changed { name: String },
    #[error("/dev/loop{number} is not exposed in container {container:?}")]
    NotExposed { number: u32, container: String },
    #[error("internal task failed: {0}")]
    Task(String),
}

impl Classify for DevicesError {
    fn kind(&self) -> Kind {
        match self {
            DevicesError::Ops(e) => e.kind(),
            DevicesError::Expose(e) => e.kind(),
            DevicesError::Docker(e) => e.kind(),
            DevicesError::Target(e) => e.kind(),
            DevicesError::NoDocker => Kind::NotSupported,
            DevicesError::NotRunning { .. } => Kind::Conflict,
            DevicesError::Changed { .. } => Kind::Busy,
            DevicesError::NotExposed { .. } => Kind::NotFound,
            DevicesError::Task(_) => Kind::Failed,
        }
    }
}

/// Options of ExposeToContainer.
#[derive(Debug, Clone, Default)]
pub struct ExposeOptions {
    /// `as`: the node's name inside the container.
    pub alias: Option<String>,
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// The runtime's device rules rebuilt from Docker's view, for cgroup v2 containers whose
/// OCI bundle cannot be found: Docker's default list, then the container's
/// `--device-cgroup-rule`s (HostConfig.DeviceCgroupRules), then runc's own defaults —
/// the order runc builds its program in. NOT reconstructed: `--device` mappings
/// (HostConfig.Devices) and `--privileged`; such a container loses those devices on the
/// first grant, which is why the bundle is always tried first.
fn reconstructed_rules(cgroup_rules: &[String]) -> (Vec<program::DevRule>, String) {
    let mut v = program::docker_defaults();
    v.extend(
        cgroup_rules
            .iter()
            .filter_map(|r| program::DevRule::parse(r, true)),
    );
    v.extend(program::runc_defaults());
    (
        v,
        "reconstructed: Docker defaults + DeviceCgroupRules + runc defaults (bundle not found)"
            .into(),
    )
}

/// Is the managed device `number` still bound to the file its record names?
async fn still_bound(rec: &crate::state::LoopRecord) -> Result<bool, OpsError> {
    let n = rec.number;
    let live = blocking(move || Ok(crate::loopdev::bound_identity(n)?)).await?;
    Ok(live == Some((rec.backing_dev, rec.backing_inode)))
}

/// Expose managed loop device `number` in `container`. The caller has authorized the
/// device (owner or `-others`). Returns what was done and the record as it is now.
pub async fn expose_to_container(
    core: &Core,
    docker: Option<&Docker>,
    number: u32,
    container: &str,
    opts: ExposeOptions,
) -> Result<(ExposeReport, crate::state::LoopRecord), DevicesError> {
    let docker = docker.ok_or(DevicesError::NoDocker)?;
    let info = docker.inspect(container).await?;
    if !info.running || info.pid == 0 {
        return Err(DevicesError::NotRunning {
            name: container.to_owned(),
        });
    }
    let target = Target::of_pid(info.pid as i32)?;
    let cgroup_rules = docker.device_cgroup_rules(&info.id).await?;
    let again = docker.inspect(&info.id).await?;
    if again.id != info.id || !again.running || again.pid != info.pid {
        return Err(DevicesError::Changed {
            name: container.to_owned(),
        });
    }
    target.verify()?;

    let mut st = core.state.lock().await;
    let rec = st
        .loops
        .iter()
        .find(|l| l.number == number)
        .cloned()
        .ok_or(OpsError::Unmanaged {
            device: format!("/dev/loop{number}"),
        })?;
    if !still_bound(&rec).await? {
        // Unbound (or rebound) behind the daemon's back: settle the record, never expose
        // whatever the number holds now.
        let notes = revoke_locked(core, &mut st, number, None, false).await?;
        st.loops.retain(|l| l.number != number);
        core.persist_loops(&st)?;
        tracing::warn!(device = %rec.device(), ?notes, "device no longer bound to its recorded file: record dropped");
        return Err(OpsError::Unmanaged {
            device: rec.device(),
        }
        .into());
    }
    // An earlier exposure in the same container (same init process) is updated in place;
    // one of an earlier incarnation of the container is void (its /dev and cgroup died).
    let previous = rec
        .exposures
        .iter()
        .find(|e| e.container_id == info.id && e.target() == target)
        .cloned();
    let other_grants: Vec<program::DevRule> = st
        .loops
        .iter()
        .filter(|l| l.number != number)
        .flat_map(|l| l.exposures.iter())
        .filter(|e| e.container_id == info.id && e.target() == target)
        .flat_map(|e| e.dev_rules())
        .collect();
    let disk_name = format!("loop{number}");
    let req_base = (
        Container {
            target,
            id: info.id.clone(),
            name: info.name.clone(),
        },
        opts.alias.clone(),
        previous,
        other_grants,
        reconstructed_rules(&cgroup_rules),
        (rec.backing_dev, rec.backing_inode),
    );
    let (exposure, report) = blocking(move || {
        let (container, alias, previous, other_grants, fallback, (bdev, bino)) = req_base;
        // Partition minors from sysfs now, never from an older record (blkext minors are
        // global and reused).
        let (disk, partitions) = expose::host_nodes(&disk_name).map_err(wrap(&container.name))?;
        expose::expose(ExposeRequest {
            container: container.clone(),
            disk,
            partitions,
            alias,
            previous,
            other_grants,
            v2_fallback: Some(fallback),
            backing_dev: bdev,
            backing_inode: bino,
        })
        .map_err(wrap(&container.name))
    })
    .await?;
    let l = st
        .loops
        .iter_mut()
        .find(|l| l.number == number)
        .expect("record held under the lock");
    l.exposures
        .retain(|e| e.container_id != exposure.container_id);
    l.exposures.push(exposure);
    let rec = l.clone();
    core.persist_loops(&st)?;
    Ok((report, rec))
}

fn wrap(container: &str) -> impl FnOnce(ExposeError) -> OpsError {
    let container = container.to_owned();
    move |e| OpsError::Container {
        container,
        kind: e.kind(),
        why: e.to_string(),
    }
}

/// Revoke the exposures of loop `number` (all, or those of one container) with the state
/// lock held; persists the loop records. Each withdrawn (or void) exposure is removed from
/// the record as it goes. A grant that cannot be withdrawn from a live container: Busy
/// naming it, unless `force` (then removed from the record anyway, logged, and said in
/// the returned notes).
pub async fn revoke_locked(
    core: &Core,
    st: &mut State,
    number: u32,
    container: Option<&str>,
    force: bool,
) -> Result<Vec<String>, OpsError> {
    let device = format!("/dev/loop{number}");
    let Some(rec) = st.loops.iter().find(|l| l.number == number) else {
        return Ok(Vec::new());
    };
    let todo: Vec<_> = rec
        .exposures
        .iter()
        .filter(|e| container.is_none_or(|c| e.is_container(c)))
        .cloned()
        .collect();
    let mut notes = Vec::new();
    let mut failure = None;
    for exp in todo {
        // v2: the container's other exposures stay in the rebuilt program.
        let keep: Vec<program::DevRule> = st
            .loops
            .iter()
            .flat_map(|l| l.exposures.iter().map(move |e| (l.number, e)))
            .filter(|(n, e)| {
                *n != number && e.container_id == exp.container_id && e.target() == exp.target()
            })
            .flat_map(|(_, e)| e.dev_rules())
            .collect();
        let e2 = exp.clone();
        let t0 = std::time::Instant::now();
        let r = blocking(move || Ok(expose::revoke(&e2, &keep))).await?;
        let who = format!("{} ({})", exp.container_name, short(&exp.container_id));
        let note = match r {
            Ok(Revoked::Withdrawn { nodes, rules }) => {
                let n = format!(
                    "revoked {device} from container {who}: nodes [{}] removed, rules [{}] withdrawn",
                    nodes.join(", "),
                    rules.join(", ")
                );
                tracing::info!(elapsed_us = t0.elapsed().as_micros() as u64, "{n}");
                n
            }
            Ok(Revoked::ContainerGone) => {
                let n = format!("revoked {device} from container {who}: the container is gone");
                tracing::info!("{n}");
                n
            }
            Err(e) if force => {
                let n =
                    format!("FORCED: {device} freed although container {who} may keep access: {e}");
                tracing::warn!("{n}");
                n
            }
            Err(e) => {
                tracing::error!(%device, container = %who, error = %e, "revocation failed");
                failure = Some(OpsError::Busy {
                    what: device.clone(),
                    why: format!(
                        "container {who} keeps its grant: {e}; the device stays attached (option force frees it anyway)"
                    ),
                });
                break;
            }
        };
        notes.push(note);
        if let Some(l) = st.loops.iter_mut().find(|l| l.number == number) {
            l.exposures
                .retain(|e| !(e.container_id == exp.container_id && e.pid == exp.pid));
        }
    }
    core.persist_loops(st)?;
    match failure {
        Some(e) => Err(e),
        None => Ok(notes),
    }
}

/// RevokeFromContainer: withdraw one container's exposure of loop `number`.
pub async fn revoke_from_container(
    core: &Core,
    number: u32,
    container: &str,
    force: bool,
) -> Result<(Vec<String>, crate::state::LoopRecord), DevicesError> {
    let mut st = core.state.lock().await;
    let rec = st
        .loops
        .iter()
        .find(|l| l.number == number)
        .ok_or(OpsError::Unmanaged {
            device: format!("/dev/loop{number}"),
        })?;
    if !rec.exposures.iter().any(|e| e.is_container(container)) {
        return Err(DevicesError::NotExposed {
            number,
            container: container.to_owned(),
        });
    }
    let notes = revoke_locked(core, &mut st, number, Some(container), force).await?;
    let rec = st
        .loops
        .iter()
        .find(|l| l.number == number)
        .cloned()
        .expect("held under the lock");
    Ok((notes, rec))
}

/// Revoke every exposure of loop `number` (DestroyInstance calls this before detaching).
pub async fn revoke_device(core: &Core, number: u32, force: bool) -> Result<Vec<String>, OpsError> {
    let mut st = core.state.lock().await;
    revoke_locked(core, &mut st, number, None, force).await
}

/// Every exposure: (loop number, owner uid, exposure).
pub async fn list(core: &Core) -> Vec<(u32, u32, expose::Exposure)> {
    let st = core.state.lock().await;
    st.loops
        .iter()
        .flat_map(|l| {
            l.exposures
                .iter()
                .map(move |e| (l.number, l.owner_uid, e.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconstruction_keeps_docker_order_and_exact_rules() {
        let (r, why) = reconstructed_rules(&["c 42:* rmw".into(), "bogus".into()]);
        assert!(why.starts_with("reconstructed"));
        let e = program::effective(&r);
        assert!(!e.default_allow);
        let rw = program::ACC_READ | program::ACC_WRITE;
        assert!(program::allows(&e, program::DevType::Char, 42, 1, rw));
        assert!(program::allows(&e, program::DevType::Char, 1, 3, rw));
        assert!(!program::allows(&e, program::DevType::Block, 7, 0, rw));
        assert!(program::allows(
            &e,
            program::DevType::Block,
            7,
            0,
            program::ACC_MKNOD
        ));
    }
}
