//! `org.dindhelper1.Devices` at `/org/dindhelper1`: ExposeToContainer. Authorize (devices,
//! plus devices-others for another uid's loop device), call `ops::devices`, map the error.

use super::audit;
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
        let _g = self.gate.read().await;
        let caller = self.auth.caller(&hdr).await?;
        let r = async {
            let inter = interactive(&options)?;
            Opts::new(&options).finish()?;
            self.auth
                .check_caller(&hdr, &caller, Action::Devices, false, inter)
                .await?;
            let number = crate::loopdev::parse_device(&device).map_err(BusError::map)?;
            let rec = ops::loops::managed(&self.core, number)
                .await
                .map_err(BusError::map)?;
            if rec.owner_uid != caller.uid {
                self.auth
                    .check_caller(&hdr, &caller, Action::Devices, true, inter)
                    .await?;
            }
            let rep = ops::devices::expose_to_container(&self.core, number, &container)
                .await
                .map_err(BusError::map)?;
            let mut created = rep.created;
            created.extend(rep.replaced);
            Ok((created, rep.removed))
        }
        .await;
        audit(
            &caller,
            "ExposeToContainer",
            &format!("{device} {container}"),
            &r,
        );
        r
    }
}
