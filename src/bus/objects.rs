//! Resource objects: one D-Bus object per image and loop device, with read-only
//! properties. Each object holds a snapshot of its record; the manager replaces it on
//! change and emits PropertiesChanged, so property reads never wait on the state lock.

use super::auth::Authorizer;
use super::visibility::owner_only;
use crate::partitions::Partition;
use crate::state::{ImageRecord, LoopRecord};
use std::sync::Arc;
use zbus::interface;
use zbus::message::Header;
use zbus::zvariant::OwnedObjectPath;

/// The D-Bus form of a partition: number, start, size (bytes), type, name, uuid, node,
/// major, minor.
pub type PartitionTuple = (u32, u64, u64, String, String, String, String, u32, u32);

pub fn partition_tuple(p: &Partition) -> PartitionTuple {
    (
        p.number,
        p.start,
        p.size,
        p.part_type.clone(),
        p.name.clone(),
        p.uuid.clone(),
        p.node.display().to_string(),
        p.major,
        p.minor,
    )
}

/// Escape a string into one object-path element (systemd's bus_label_escape: every byte
/// outside `[A-Za-z0-9]` becomes `_xx`).
pub fn escape_label(s: &str) -> String {
    if s.is_empty() {
        return "_".into();
    }
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() {
            out.push(b as char);
        } else {
            out.push_str(&format!("_{b:02x}"));
        }
    }
    out
}

/// The D-Bus form of an exposure: container id, container name, cgroup grant, nodes
/// (names inside the container), rules granted.
pub type ExposureTuple = (String, String, String, Vec<String>, Vec<String>);

pub fn exposure_tuple(e: &crate::expose::Exposure) -> ExposureTuple {
    (
        e.container_id.clone(),
        e.container_name.clone(),
        e.grant.describe(),
        e.nodes.iter().map(|n| n.name.clone()).collect(),
        e.rules.clone(),
    )
}

pub fn loop_path(number: u32) -> OwnedObjectPath {
    OwnedObjectPath::try_from(format!("/org/dindhelper1/loop/loop{number}")).expect("valid path")
}

pub fn image_path(uid: u32, name: &str) -> OwnedObjectPath {
    OwnedObjectPath::try_from(format!(
        "/org/dindhelper1/image/u{uid}/{}",
        escape_label(name)
    ))
    .expect("valid path")
}

pub struct LoopObject {
    pub rec: LoopRecord,
    pub size: u64,
    /// Every getter is owner-only (see [`super::visibility`]).
    pub auth: Arc<Authorizer>,
}

impl LoopObject {
    async fn shown(&self, hdr: Option<&Header<'_>>) -> zbus::fdo::Result<()> {
        owner_only(&self.auth, hdr, self.rec.owner_uid).await
    }
}

#[interface(name = "org.dindhelper1.Loop")]
impl LoopObject {
    /// Device node, e.g. /dev/loop3.
    #[zbus(property)]
    async fn device(&self, #[zbus(header)] hdr: Option<Header<'_>>) -> zbus::fdo::Result<String> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.rec.device())
    }
    /// Backing file as the kernel reports it.
    #[zbus(property)]
    async fn backing_file(
        &self,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<String> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.rec.backing_file.display().to_string())
    }
    /// Size in bytes as seen by the kernel when attached.
    #[zbus(property)]
    async fn size(&self, #[zbus(header)] hdr: Option<Header<'_>>) -> zbus::fdo::Result<u64> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.size)
    }
    #[zbus(property)]
    async fn offset(&self, #[zbus(header)] hdr: Option<Header<'_>>) -> zbus::fdo::Result<u64> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.rec.offset)
    }
    #[zbus(property)]
    async fn read_only(&self, #[zbus(header)] hdr: Option<Header<'_>>) -> zbus::fdo::Result<bool> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.rec.read_only)
    }
    #[zbus(property)]
    async fn partscan(&self, #[zbus(header)] hdr: Option<Header<'_>>) -> zbus::fdo::Result<bool> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.rec.partscan)
    }
    #[zbus(property)]
    async fn owner_uid(&self, #[zbus(header)] hdr: Option<Header<'_>>) -> zbus::fdo::Result<u32> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.rec.owner_uid)
    }
    /// DinD instance this device belongs to ("" for none).
    #[zbus(property)]
    async fn instance(&self, #[zbus(header)] hdr: Option<Header<'_>>) -> zbus::fdo::Result<String> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.rec.instance.clone().unwrap_or_default())
    }
    /// Image name when attached by name ("" for AttachFd).
    #[zbus(property)]
    async fn image(&self, #[zbus(header)] hdr: Option<Header<'_>>) -> zbus::fdo::Result<String> {
        self.shown(hdr.as_ref()).await?;
        Ok({
            self.rec
                .image
                .as_ref()
                .map(|(_, n)| n.clone())
                .unwrap_or_default()
        })
    }
    /// Partitions the last Rescan told the kernel about.
    #[zbus(property)]
    async fn partitions(
        &self,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<Vec<PartitionTuple>> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.rec.partitions.iter().map(partition_tuple).collect())
    }
    /// Containers this device is exposed in (see org.dindhelper1.Devices).
    #[zbus(property)]
    async fn exposures(
        &self,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<Vec<ExposureTuple>> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.rec.exposures.iter().map(exposure_tuple).collect())
    }
}

pub struct ImageObject {
    pub rec: ImageRecord,
    pub path: String,
    pub device: String,
    /// Every getter is owner-only (see [`super::visibility`]).
    pub auth: Arc<Authorizer>,
}

impl ImageObject {
    async fn shown(&self, hdr: Option<&Header<'_>>) -> zbus::fdo::Result<()> {
        owner_only(&self.auth, hdr, self.rec.owner_uid).await
    }
}

#[interface(name = "org.dindhelper1.Image")]
impl ImageObject {
    #[zbus(property)]
    async fn name(&self, #[zbus(header)] hdr: Option<Header<'_>>) -> zbus::fdo::Result<String> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.rec.name.clone())
    }
    #[zbus(property)]
    async fn owner_uid(&self, #[zbus(header)] hdr: Option<Header<'_>>) -> zbus::fdo::Result<u32> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.rec.owner_uid)
    }
    /// Apparent size in bytes.
    #[zbus(property)]
    async fn size(&self, #[zbus(header)] hdr: Option<Header<'_>>) -> zbus::fdo::Result<u64> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.rec.size)
    }
    /// File on the host.
    #[zbus(property)]
    async fn path(&self, #[zbus(header)] hdr: Option<Header<'_>>) -> zbus::fdo::Result<String> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.path.clone())
    }
    /// Loop device it is attached to ("" when none).
    #[zbus(property)]
    async fn device(&self, #[zbus(header)] hdr: Option<Header<'_>>) -> zbus::fdo::Result<String> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.device.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_escape_like_systemd() {
        assert_eq!(escape_label("disk1"), "disk1");
        assert_eq!(escape_label("a.img"), "a_2eimg");
        assert_eq!(escape_label("x-y_z"), "x_2dy_5fz");
        assert_eq!(escape_label(""), "_");
        assert_eq!(
            image_path(1000, "lab-1.img").as_str(),
            "/org/dindhelper1/image/u1000/lab_2d1_2eimg"
        );
    }
}
