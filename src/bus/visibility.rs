//! Who sees what (issue 9, item 5). Resources have owners; so do the reads:
//! - uid 0 and members of group `dindhelper` ([`super::auth::PROVISIONING_GROUP`]) see
//!   every object of every uid;
//! - every other caller sees only objects it owns: GetManagedObjects ([`ObjectManager`],
//!   our own implementation of `org.freedesktop.DBus.ObjectManager`, because zbus's reads
//!   the properties without the caller) lists only those, every `List*` method filters its
//!   rows, and every property getter of an owned object checks the caller ([`owner_only`]):
//!   `Get` on another uid's object answers `org.freedesktop.DBus.Error.UnknownObject` (the
//!   same answer as for a path that does not exist, so a guessed path confirms nothing),
//!   `GetAll` an empty dictionary (zbus leaves failing getters out of GetAll).
//!
//! What the daemon cannot filter per caller is left to the bus policy
//! (dbus/org.dindhelper1.conf):
//! - signals are broadcasts: PropertiesChanged and InterfacesAdded carry the properties
//!   of everyone's objects, MappingChanged/PartitionsChanged/Finished their paths. The
//!   policy lets only root and the provisioning group receive signals from the daemon;
//!   tenants poll (GetManagedObjects, `Get`, the `List*` methods);
//! - zbus answers `Introspect` with the whole subtree below the path (measured: on `/` or
//!   `/org/dindhelper1` it lists every object path, and image and instance paths carry
//!   uids and names; zbus's Introspectable cannot be replaced per caller): tenants may not
//!   introspect at all and use the documented interface (dbus/org.dindhelper1.xml);
//! - users in neither group get no properties, objects or introspection at all (only
//!   `org.freedesktop.DBus.Peer`).
//!
//! Signals sent before the daemon owns `org.dindhelper1` match no sender rule: the start-up
//! InterfacesAdded go out from `/org/dindhelper1` (denied by path too), and the port signal
//! task waits for the name (daemon.rs, `Served::named`). Left: a partition-table write in a
//! followed exposure during the milliseconds between export and RequestName would send
//! one Loop PropertiesChanged (Partitions) that a tenant's match rule could catch.
//!
//! A getter called without a message header is zbus itself building PropertiesChanged or
//! InterfacesAdded (no caller to filter for; delivery is restricted by the policy): it
//! answers.

use super::auth::{Authorizer, Viewer};
use super::capture::{capture_path, CaptureObject};
use super::instances::{instance_path, InstanceObject};
use super::objects::{image_path, loop_path, ImageObject, LoopObject};
use super::ports::{port_path, PortObject};
use std::sync::Arc;
use zbus::fdo::ManagedObjects;
use zbus::message::Header;
use zbus::object_server::{Interface, ObjectServer, SignalEmitter};
use zbus::zvariant::OwnedObjectPath;
use zbus::{interface, Connection};

/// The guard at the top of every property getter of an object owned by `owner`.
pub async fn owner_only(
    auth: &Authorizer,
    hdr: Option<&Header<'_>>,
    owner: u32,
) -> zbus::fdo::Result<()> {
    let Some(hdr) = hdr else {
        return Ok(());
    };
    if viewer(auth, hdr).await?.sees(owner) {
        return Ok(());
    }
    Err(unknown(hdr))
}

async fn viewer(auth: &Authorizer, hdr: &Header<'_>) -> zbus::fdo::Result<Viewer> {
    auth.viewer(hdr)
        .await
        .map_err(|e| zbus::fdo::Error::AccessDenied(e.to_string()))
}

fn unknown(hdr: &Header<'_>) -> zbus::fdo::Error {
    let path = hdr.path().map(|p| p.to_string()).unwrap_or_default();
    zbus::fdo::Error::UnknownObject(format!("Unknown object '{path}'"))
}

/// `org.freedesktop.DBus.ObjectManager` at `/org/dindhelper1`, answering per caller.
/// zbus still emits InterfacesAdded/InterfacesRemoved for it (it recognises the interface
/// by name).
pub struct ObjectManager {
    pub core: Arc<crate::ops::Core>,
    pub auth: Arc<Authorizer>,
    pub captures: crate::ops::capture::Captures,
}

impl ObjectManager {
    /// Every resource object's path, interface kind and owner, from the records the
    /// objects are exported from.
    async fn owned_paths(&self) -> Vec<(OwnedObjectPath, Kind, u32)> {
        let mut v = Vec::new();
        {
            let st = self.core.state.lock().await;
            for l in &st.loops {
                v.push((loop_path(l.number), Kind::Loop, l.owner_uid));
            }
            for i in &st.images {
                v.push((image_path(i.owner_uid, &i.name), Kind::Image, i.owner_uid));
            }
            for i in &st.instances {
                v.push((instance_path(&i.instance.name), Kind::Instance, i.owner_uid));
            }
        }
        for m in self.core.ports.mappings() {
            v.push((port_path(&m.id), Kind::Port, m.owner_uid));
        }
        for s in self.captures.list() {
            v.push((capture_path(s.id), Kind::Capture, s.owner_uid));
        }
        v
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Loop,
    Image,
    Instance,
    Port,
    Capture,
}

/// Add the properties of interface `I` at `path` (if exported) as the caller sees them.
async fn add<I: Interface>(
    server: &ObjectServer,
    conn: &Connection,
    hdr: &Header<'_>,
    path: OwnedObjectPath,
    out: &mut ManagedObjects,
) -> zbus::fdo::Result<()> {
    let Ok(iref) = server.interface::<_, I>(&path).await else {
        return Ok(()); // not (or no longer) exported
    };
    let emitter = SignalEmitter::new(conn, path.clone())?;
    let props = iref
        .get()
        .await
        .get_all(server, conn, Some(hdr), &emitter)
        .await?;
    out.entry(path).or_default().insert(I::name().into(), props);
    Ok(())
}

#[interface(
    name = "org.freedesktop.DBus.ObjectManager",
    introspection_docs = false
)]
impl ObjectManager {
    async fn get_managed_objects(
        &self,
        #[zbus(object_server)] server: &ObjectServer,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
    ) -> zbus::fdo::Result<ManagedObjects> {
        let who = viewer(&self.auth, &hdr).await?;
        let mut out = ManagedObjects::new();
        for (path, kind, owner) in self.owned_paths().await {
            if !who.sees(owner) {
                continue;
            }
            match kind {
                Kind::Loop => add::<LoopObject>(server, conn, &hdr, path, &mut out).await?,
                Kind::Image => add::<ImageObject>(server, conn, &hdr, path, &mut out).await?,
                Kind::Instance => add::<InstanceObject>(server, conn, &hdr, path, &mut out).await?,
                Kind::Port => add::<PortObject>(server, conn, &hdr, path, &mut out).await?,
                Kind::Capture => add::<CaptureObject>(server, conn, &hdr, path, &mut out).await?,
            }
        }
        Ok(out)
    }

    #[zbus(signal)]
    async fn interfaces_added(
        emitter: &SignalEmitter<'_>,
        object_path: zbus::zvariant::ObjectPath<'_>,
        interfaces_and_properties: std::collections::HashMap<
            zbus::names::InterfaceName<'_>,
            std::collections::HashMap<&str, zbus::zvariant::Value<'_>>,
        >,
    ) -> zbus::Result<()>;

    #[zbus(signal)]
    async fn interfaces_removed(
        emitter: &SignalEmitter<'_>,
        object_path: zbus::zvariant::ObjectPath<'_>,
        interfaces: std::borrow::Cow<'_, [zbus::names::InterfaceName<'_>]>,
    ) -> zbus::Result<()>;
}
