//! `org.dindhelper1.Devices` at `/org/dindhelper1`: ExposeToContainer. Authorize (devices,
//! plus devices-others for another uid's loop device), call `ops::devices`, map the error.

use super::auth::{Action, Authorizer};
use super::error::BusError;
use super::options::{interactive, Options, Opts};
use crate::ops::{self, Core};
use std::sync::Arc;
use zbus::interface;
use zbus::message::Header;

pub struct Devices {
    pub core: Arc<Core>,
    pub auth: Arc<Authorizer>,
    pub gate: Arc<tokio::sync::RwLock<()>>,
}

#[interface(name = "org.dindhelper1.Devices")]
impl Devices {
    /// Make a managed loop device (`/dev/loopN` or `loopN`) and the partitions of its last
    /// Rescan appear in `container`'s /dev (mode 0660), remove partition nodes that no
    /// longer exist, and allow them in its devices cgroup (v1). On cgroup v2 the container
    /// must have been started with `--device-cgroup-rule 'b 7:* rmw'` and
    /// `'b 259:* rmw'`, else NotSupported. Returns the nodes created (or replaced) and
    /// removed, as names under /dev.
    #[zbus(out_args("created", "removed"))]
    async fn expose_to_container(
        &self,
        device: String,
        container: String,
        options: Options,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<(Vec<String>, Vec<String>), BusError> {
        let args = format!("{device} {container}").to_string();
        let hdr = &hdr;
        super::audited(
            &self.auth,
            &self.gate,
            hdr,
            "ExposeToContainer",
            &args,
            |caller| async move {
                let inter = interactive(&options)?;
                Opts::new(&options).finish()?;
                self.auth
                    .check_caller(hdr, &caller, Action::Devices, false, inter)
                    .await?;
                let number = crate::loopdev::parse_device(&device).map_err(BusError::map)?;
                let rec = ops::loops::managed(&self.core, number)
                    .await
                    .map_err(BusError::map)?;
                if rec.owner_uid != caller.uid {
                    self.auth
                        .check_caller(hdr, &caller, Action::Devices, true, inter)
                        .await?;
                }
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
                    vec![("device", rec.device())],
                )
                .await?;
                let rep = ops::devices::expose_to_container(&self.core, number, &id)
                    .await
                    .map_err(BusError::map)?;
                let mut created = rep.created;
                created.extend(rep.replaced);
                Ok((created, rep.removed))
            },
        )
        .await
    }
}
