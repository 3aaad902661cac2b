//! `org.dindhelper1.Manager` at `/org/dindhelper1`. Each method: authorize, convert the
//! arguments, call one `ops` function, publish the objects, map the error, audit-log.

use super::auth::{Action, Authorizer, Caller};
use super::error::BusError;
use super::objects::{
    image_path, loop_path, partition_tuple, ImageObject, LoopObject, PartitionTuple,
};
use super::options::{describe, interactive, Options, Opts};
use crate::ops::{self, loops::AttachRequest, Core};
use crate::state::LoopRecord;
use std::fs::File;
use std::sync::Arc;
use zbus::interface;
use zbus::message::Header;
use zbus::object_server::ObjectServer;
use zbus::zvariant::{OwnedFd, OwnedObjectPath};

pub struct Manager {
    pub core: Arc<Core>,
    pub auth: Arc<Authorizer>,
    /// Held shared by every mutating call; shutdown takes it exclusively to let calls in
    /// flight finish.
    pub gate: Arc<tokio::sync::RwLock<()>>,
}

fn attach_request(o: &mut Opts<'_>) -> Result<AttachRequest, BusError> {
    let instance = o.string("instance")?;
    if let Some(i) = &instance {
        crate::names::check_instance_name(i).map_err(BusError::map)?;
    }
    Ok(AttachRequest {
        read_only: o.bool("read_only")?.unwrap_or(false),
        partscan: o.bool("partscan")?.unwrap_or(true),
        offset: o.u64("offset")?.unwrap_or(0),
        size_limit: o.u64("size")?.unwrap_or(0),
        instance,
        quota_exempt: false,
    })
}

/// `owner_uid` option: act on another uid's images (needs the `-others` action).
fn owner_option(o: &mut Opts<'_>, caller: &Caller) -> Result<u32, BusError> {
    match o.u64("owner_uid")? {
        None => Ok(caller.uid),
        Some(u) => u32::try_from(u)
            .map_err(|_| BusError::InvalidArgs(format!("owner_uid {u} is out of range"))),
    }
}

impl Manager {
    async fn publish_loop(&self, server: &ObjectServer, rec: &LoopRecord) {
        let size = crate::loopdev::info(rec.number)
            .ok()
            .flatten()
            .map(|i| i.size)
            .unwrap_or(0);
        let path = loop_path(rec.number);
        let _ = server.remove::<LoopObject, _>(&path).await;
        if let Err(e) = server
            .at(
                &path,
                LoopObject {
                    rec: rec.clone(),
                    size,
                    auth: self.auth.clone(),
                },
            )
            .await
        {
            tracing::error!(error = %e, %path, "cannot export loop object");
        }
    }

    /// (Re)export the image object with its current attachment.
    async fn publish_image(&self, server: &ObjectServer, uid: u32, name: &str) {
        let st = self.core.state.lock().await;
        let rec = st
            .images
            .iter()
            .find(|i| i.owner_uid == uid && i.name == name)
            .cloned();
        let device = st
            .loops
            .iter()
            .find(|l| l.image.as_ref() == Some(&(uid, name.to_owned())))
            .map(|l| l.device())
            .unwrap_or_default();
        drop(st);
        let path = image_path(uid, name);
        let _ = server.remove::<ImageObject, _>(&path).await;
        if let Some(rec) = rec {
            let file = self.core.images.path_of(uid, name).display().to_string();
            if let Err(e) = server
                .at(
                    &path,
                    ImageObject {
                        rec,
                        path: file,
                        device,
                        auth: self.auth.clone(),
                    },
                )
                .await
            {
                tracing::error!(error = %e, %path, "cannot export image object");
            }
        }
    }

    /// Export every resource in state (at start).
    pub async fn publish_all(&self, server: &ObjectServer) {
        let (images, loops) = {
            let st = self.core.state.lock().await;
            (st.images.clone(), st.loops.clone())
        };
        for l in &loops {
            self.publish_loop(server, l).await;
        }
        for i in &images {
            self.publish_image(server, i.owner_uid, &i.name).await;
        }
    }

    async fn attach_done(
        &self,
        server: &ObjectServer,
        rec: &LoopRecord,
    ) -> (OwnedObjectPath, String) {
        self.publish_loop(server, rec).await;
        if let Some((uid, name)) = &rec.image {
            self.set_image_device(server, *uid, name, rec.device())
                .await;
        }
        (loop_path(rec.number), rec.device())
    }

    /// Update the Device property of an exported image in place (PropertiesChanged),
    /// cheaper than re-exporting the object; re-export when it is not there.
    async fn set_image_device(&self, server: &ObjectServer, uid: u32, name: &str, device: String) {
        match server
            .interface::<_, ImageObject>(&image_path(uid, name))
            .await
        {
            Ok(iref) => {
                iref.get_mut().await.device = device;
                let obj = iref.get().await;
                if let Err(e) = obj.device_changed(iref.signal_emitter()).await {
                    tracing::debug!(error = %e, "cannot signal an image's Device change");
                }
            }
            Err(_) => self.publish_image(server, uid, name).await,
        }
    }

    /// After the method's own options are read from `o`: refuse unknown ones, then ask
    /// polkit for the loop action (its `-others` twin when `owner` is another uid), with
    /// details `image` (the name) and `owner` (uid) — for the caller's own images too.
    async fn authorize_for_owner(
        &self,
        hdr: &Header<'_>,
        caller: &Caller,
        owner: u32,
        image: &str,
        o: Opts<'_>,
    ) -> Result<(), BusError> {
        let inter = o.interactive()?;
        o.finish()?;
        let details: super::auth::Details =
            vec![("image", image.to_owned()), ("owner", owner.to_string())];
        self.auth
            .check_with(
                hdr,
                caller,
                Action::Loop,
                owner != caller.uid,
                inter,
                &details,
            )
            .await
    }

    /// Authorize an action on a managed loop device ([`super::authorize_loop`]: details
    /// on the caller's own devices too, the `-others` twin for another uid's).
    async fn authorize_device(
        &self,
        hdr: &Header<'_>,
        action: Action,
        device: &str,
        options: &Options,
    ) -> Result<(Caller, LoopRecord), BusError> {
        let inter = interactive(options)?;
        let caller = self.auth.caller(hdr).await?;
        let rec =
            super::authorize_loop(&self.auth, &self.core, hdr, &caller, action, device, inter)
                .await?;
        Ok((caller, rec))
    }
}

#[interface(name = "org.dindhelper1.Manager")]
impl Manager {
    /// Create a sparse image file `<state>/images/<uid>/<name>.img` of `size` bytes.
    async fn create_image(
        &self,
        name: String,
        size: u64,
        options: Options,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<OwnedObjectPath, BusError> {
        let args = format!("{name} {size}").to_string();
        let hdr = &hdr;
        super::audited(
            &self.auth,
            &self.gate,
            hdr,
            "CreateImage",
            &args,
            |caller| async move {
                let mut o = Opts::new(&options);
                let owner = owner_option(&mut o, &caller)?;
                self.authorize_for_owner(hdr, &caller, owner, &name, o)
                    .await?;
                let rec = ops::loops::create_image(&self.core, owner, &name, size)
                    .await
                    .map_err(BusError::map)?;
                self.publish_image(server, owner, &rec.name).await;
                Ok(image_path(owner, &rec.name))
            },
        )
        .await
    }

    /// Delete an image that is not attached.
    async fn delete_image(
        &self,
        name: String,
        options: Options,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<(), BusError> {
        let args = name.to_string();
        let hdr = &hdr;
        super::audited(
            &self.auth,
            &self.gate,
            hdr,
            "DeleteImage",
            &args,
            |caller| async move {
                let mut o = Opts::new(&options);
                let owner = owner_option(&mut o, &caller)?;
                self.authorize_for_owner(hdr, &caller, owner, &name, o)
                    .await?;
                ops::loops::delete_image(&self.core, owner, &name)
                    .await
                    .map_err(BusError::map)?;
                let _ = server
                    .remove::<ImageObject, _>(&image_path(owner, &name))
                    .await;
                Ok(())
            },
        )
        .await
    }

    /// Images: object, name, size, owner uid, attached device ("" if none).
    /// Callers outside the provisioning group get their own rows only (bus::visibility).
    async fn list_images(
        &self,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<Vec<(OwnedObjectPath, String, u64, u32, String)>, BusError> {
        let who = self.auth.viewer(&hdr).await?;
        let st = self.core.state.lock().await;
        Ok(st
            .image_rows()
            .into_iter()
            .filter(|r| who.sees(r.image.owner_uid))
            .map(|r| {
                let i = r.image;
                (
                    image_path(i.owner_uid, &i.name),
                    i.name.clone(),
                    i.size,
                    i.owner_uid,
                    r.device,
                )
            })
            .collect())
    }

    /// Attach an image by name to a free loop device.
    #[zbus(out_args("loop", "device"))]
    async fn attach_image(
        &self,
        name: String,
        options: Options,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<(OwnedObjectPath, String), BusError> {
        let args = format!("{name} {}", describe(&options)).to_string();
        let hdr = &hdr;
        super::audited(
            &self.auth,
            &self.gate,
            hdr,
            "AttachImage",
            &args,
            |caller| async move {
                let mut o = Opts::new(&options);
                let owner = owner_option(&mut o, &caller)?;
                let mut req = attach_request(&mut o)?;
                req.quota_exempt = crate::config::quota_exempt(caller.uid, owner);
                let inter = o.interactive()?;
                self.authorize_for_owner(hdr, &caller, owner, &name, o)
                    .await?;
                super::authorize_instance_tag(
                    &self.auth,
                    &self.core,
                    hdr,
                    &caller,
                    req.instance.as_deref(),
                    inter,
                )
                .await?;
                let rec = ops::loops::attach_image(&self.core, owner, &name, req)
                    .await
                    .map_err(BusError::map)?;
                Ok(self.attach_done(server, &rec).await)
            },
        )
        .await
    }

    /// Attach the regular file behind `fd` (opened by the caller, which proves access).
    /// A read-only fd gives a read-only device.
    #[zbus(out_args("loop", "device"))]
    async fn attach_fd(
        &self,
        fd: OwnedFd,
        options: Options,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<(OwnedObjectPath, String), BusError> {
        let args = describe(&options).to_string();
        let hdr = &hdr;
        super::audited(
            &self.auth,
            &self.gate,
            hdr,
            "AttachFd",
            &args,
            |caller| async move {
                let mut o = Opts::new(&options);
                let mut req = attach_request(&mut o)?;
                req.quota_exempt = crate::config::quota_exempt(caller.uid, caller.uid);
                let inter = interactive(&options)?;
                o.finish()?;
                super::authorize_into_instance(
                    &self.auth,
                    &self.core,
                    hdr,
                    &caller,
                    Action::Loop,
                    req.instance.as_deref(),
                    inter,
                )
                .await?;
                let file = File::from(std::os::fd::OwnedFd::from(fd));
                let rec = ops::loops::attach_fd(&self.core, caller.uid, file, req)
                    .await
                    .map_err(BusError::map)?;
                Ok(self.attach_done(server, &rec).await)
            },
        )
        .await
    }

    /// Detach a loop device the daemon manages (`/dev/loopN` or `loopN`).
    async fn detach(
        &self,
        device: String,
        options: Options,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<(), BusError> {
        let args = device.to_string();
        let hdr = &hdr;
        super::audited(
            &self.auth,
            &self.gate,
            hdr,
            "Detach",
            &args,
            |_caller| async move {
                let mut o = Opts::new(&options);
                // force: free the device even when a container's grant cannot be withdrawn.
                let force = o.bool("force")?.unwrap_or(false);
                o.finish()?;
                let (_, rec) = self
                    .authorize_device(hdr, Action::Loop, &device, &options)
                    .await?;
                let (rec, notes) = ops::loops::detach_with(&self.core, rec.number, force)
                    .await
                    .map_err(BusError::map)?;
                for n in notes {
                    tracing::info!(device = %rec.device(), "Detach: {n}");
                }
                let _ = server.remove::<LoopObject, _>(&loop_path(rec.number)).await;
                if let Some((uid, name)) = &rec.image {
                    self.set_image_device(server, *uid, name, String::new())
                        .await;
                }
                Ok(())
            },
        )
        .await
    }

    /// Loop devices: object, device, backing file, size, read-only, owner uid, instance.
    /// Callers outside the provisioning group get their own rows only (bus::visibility).
    async fn list_loops(
        &self,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<Vec<(OwnedObjectPath, String, String, u64, bool, u32, String)>, BusError> {
        let who = self.auth.viewer(&hdr).await?;
        Ok(crate::ops::loops::list_loops(&self.core)
            .await
            .into_iter()
            .filter(|r| who.sees(r.owner_uid))
            .map(|r| {
                (
                    loop_path(r.number),
                    format!("/dev/loop{}", r.number),
                    r.backing_file,
                    r.size,
                    r.read_only,
                    r.owner_uid,
                    r.instance,
                )
            })
            .collect())
    }

    /// Re-read the partition table of a managed loop device in userspace and sync the
    /// kernel with BLKPG. Returns every partition.
    async fn rescan(
        &self,
        device: String,
        options: Options,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<Vec<PartitionTuple>, BusError> {
        let args = device.to_string();
        let hdr = &hdr;
        super::audited(
            &self.auth,
            &self.gate,
            hdr,
            "Rescan",
            &args,
            |_caller| async move {
                Opts::new(&options).finish()?;
                let (_, rec) = self
                    .authorize_device(hdr, Action::Partitions, &device, &options)
                    .await?;
                let parts = ops::loops::rescan(&self.core, rec.number)
                    .await
                    .map_err(BusError::map)?;
                if let Ok(rec) = ops::loops::managed(&self.core, rec.number).await {
                    self.publish_loop(server, &rec).await;
                }
                Ok(parts.iter().map(partition_tuple).collect::<Vec<_>>())
            },
        )
        .await
    }
}
