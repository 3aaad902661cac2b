//! `org.dindhelper1.Devices` at `/org/dindhelper1`: ExposeToContainer,
//! RevokeFromContainer, ListExposures. Authorize (devices, plus devices-others for another
//! uid's loop device), call `ops::devices`, update the Loop object's Exposures property,
//! map the error.

use super::auth::{Action, Authorizer, Caller};
use super::error::BusError;
use super::objects::{
    exposure_tuple, loop_path, partition_tuple, ExposureTuple, LoopObject, PartitionTuple,
};
use super::options::{interactive, Options, Opts};
use crate::ops::{self, Core};
use crate::state::LoopRecord;
use std::sync::Arc;
use zbus::interface;
use zbus::message::Header;
use zbus::object_server::{ObjectServer, SignalEmitter};
use zbus::zvariant::OwnedObjectPath;

pub struct Devices {
    pub core: Arc<Core>,
    pub auth: Arc<Authorizer>,
    pub gate: Arc<tokio::sync::RwLock<()>>,
    /// Partition following (option `follow`); None when inotify is unavailable.
    pub follow: Option<Arc<ops::devices::Follow>>,
}

/// Start following partition tables; each applied change updates the Loop object and
/// emits `PartitionsChanged` on /org/dindhelper1.
pub fn start_follow(conn: &zbus::Connection, core: Arc<Core>) -> Option<Arc<ops::devices::Follow>> {
    let c = conn.clone();
    let on_change: Arc<ops::devices::OnPartitions> = Arc::new(move |n, parts, rec| {
        let conn = c.clone();
        tokio::spawn(async move {
            let path = loop_path(n);
            if let Ok(iref) = conn.object_server().interface::<_, LoopObject>(&path).await {
                iref.get_mut().await.rec = rec;
                let obj = iref.get().await;
                let _ = obj.partitions_changed(iref.signal_emitter()).await;
                let _ = obj.exposures_changed(iref.signal_emitter()).await;
            }
            let tuples: Vec<PartitionTuple> = parts.iter().map(partition_tuple).collect();
            match SignalEmitter::new(&conn, super::MANAGER_PATH) {
                Ok(em) => {
                    if let Err(e) = Devices::partitions_changed(&em, path, tuples).await {
                        tracing::debug!(error = %e, "cannot emit PartitionsChanged");
                    }
                }
                Err(e) => tracing::debug!(error = %e, "cannot emit PartitionsChanged"),
            }
        });
    });
    match ops::devices::start_follow(core, on_change) {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!(error = %e, "inotify unavailable: option follow is not supported");
            None
        }
    }
}

/// One row of ListExposures: loop object, device, container id, container name, cgroup
/// grant, nodes (names inside the container), rules granted.
pub type ExposureRow = (
    OwnedObjectPath,
    String,
    String,
    String,
    String,
    Vec<String>,
    Vec<String>,
);

impl Devices {
    /// The device's number after authorizing the caller for it (base action, then the
    /// `-others` twin for another uid's device).
    async fn authorize_device(
        &self,
        hdr: &Header<'_>,
        caller: &Caller,
        device: &str,
        inter: bool,
    ) -> Result<u32, BusError> {
        let rec = super::authorize_loop(
            &self.auth,
            &self.core,
            hdr,
            caller,
            Action::Devices,
            device,
            inter,
        )
        .await?;
        Ok(rec.number)
    }

    /// Update the Loop object's record in place and signal the Exposures change.
    async fn loop_changed(&self, server: &ObjectServer, rec: LoopRecord) {
        if let Ok(iref) = server
            .interface::<_, LoopObject>(&loop_path(rec.number))
            .await
        {
            iref.get_mut().await.rec = rec;
            let obj = iref.get().await;
            if let Err(e) = obj.exposures_changed(iref.signal_emitter()).await {
                tracing::debug!(error = %e, "cannot signal a loop's Exposures change");
            }
        }
    }
}

#[interface(name = "org.dindhelper1.Devices")]
impl Devices {
    /// Make a managed loop device (`/dev/loopN` or `loopN`) and its partitions (as the
    /// kernel has them now) appear in `container`'s /dev (mode 0660), remove partition
    /// nodes that no longer exist, and grant exactly those devices in its cgroup (v1
    /// devices.allow; v2 a replaced device program). Option `as s`: the node's name inside.
    /// Returns the nodes created (or replaced) and removed, as names under /dev.
    #[zbus(out_args("created", "removed"))]
    async fn expose_to_container(
        &self,
        device: String,
        container: String,
        options: Options,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<(Vec<String>, Vec<String>), BusError> {
        let args = format!("{device} {container}");
        let hdr = &hdr;
        super::audited(
            &self.auth,
            &self.gate,
            hdr,
            "ExposeToContainer",
            &args,
            |caller| async move {
                let inter = interactive(&options)?;
                let mut o = Opts::new(&options);
                let alias = o.string("as")?;
                let follow = o.bool("follow")?.unwrap_or(true) && self.follow.is_some();
                o.finish()?;
                if let Some(a) = &alias {
                    crate::expose::check_alias(a).map_err(BusError::map)?;
                }
                let number = self.authorize_device(hdr, &caller, &device, inter).await?;
                // Owned targets: the container must belong to one of the caller's instances,
                // else devices-others. The resolved id is what is acted on.
                let id = super::authorize_container(
                    &self.auth,
                    &self.core,
                    hdr,
                    &caller,
                    Action::Devices,
                    &container,
                    inter,
                    vec![("device", format!("/dev/loop{number}"))],
                )
                .await?;
                let (rep, rec) = ops::devices::expose_to_container(
                    &self.core,
                    number,
                    &id,
                    ops::devices::ExposeOptions { alias, follow },
                )
                .await
                .map_err(BusError::map)?;
                if let Some(f) = &self.follow {
                    for e in rec.exposures.iter().filter(|x| x.follow) {
                        f.watch(number, e);
                    }
                }
                self.loop_changed(server, rec).await;
                let mut created = rep.created;
                created.extend(rep.replaced);
                Ok((created, rep.removed))
            },
        )
        .await
    }

    /// Take a device away from a container: its nodes are unlinked in the container's
    /// /dev and the grant is withdrawn. Option `force b`: forget the exposure even when
    /// the grant cannot be withdrawn (said in the reply). Returns what was done.
    async fn revoke_from_container(
        &self,
        device: String,
        container: String,
        options: Options,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<Vec<String>, BusError> {
        let args = format!("{device} {container}");
        let hdr = &hdr;
        super::audited(
            &self.auth,
            &self.gate,
            hdr,
            "RevokeFromContainer",
            &args,
            |caller| async move {
                let inter = interactive(&options)?;
                let mut o = Opts::new(&options);
                let force = o.bool("force")?.unwrap_or(false);
                o.finish()?;
                let number = self.authorize_device(hdr, &caller, &device, inter).await?;
                let (notes, rec) =
                    ops::devices::revoke_from_container(&self.core, number, &container, force)
                        .await
                        .map_err(BusError::map)?;
                self.loop_changed(server, rec).await;
                Ok(notes)
            },
        )
        .await
    }

    /// A followed device's partition table changed and was applied (new nodes and exact
    /// grants in every container it is exposed in with follow, removed ones revoked).
    #[zbus(signal)]
    async fn partitions_changed(
        emitter: &SignalEmitter<'_>,
        object: OwnedObjectPath,
        partitions: Vec<PartitionTuple>,
    ) -> zbus::Result<()>;

    /// Every exposure: loop object, device, container id, container name, cgroup grant,
    /// nodes inside the container, rules granted.
    /// Callers outside the provisioning group get the exposures of their own loops only.
    async fn list_exposures(
        &self,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<Vec<ExposureRow>, BusError> {
        let who = self.auth.viewer(&hdr).await?;
        Ok(ops::devices::list(&self.core)
            .await
            .into_iter()
            .filter(|(_, owner, _)| who.sees(*owner))
            .map(|(n, _, e)| {
                let (id, name, grant, nodes, rules): ExposureTuple = exposure_tuple(&e);
                (
                    loop_path(n),
                    format!("/dev/loop{n}"),
                    id,
                    name,
                    grant,
                    nodes,
                    rules,
                )
            })
            .collect())
    }
}
