//! `org.dindhelper1.Ports` at `/org/dindhelper1` (next to the Manager interface) and one
//! object per mapping, `/org/dindhelper1/port/<id>` with interface `org.dindhelper1.Port`.
//!
//! Methods authorize with polkit action `org.dindhelper1.ports`; acting on a mapping that
//! belongs to another uid also needs `org.dindhelper1.ports-others`. The owner of a
//! mapping is the uid that published it.
//!
//! Ports are `q` (uint16): the type already rules out values above 65535; 0 is refused
//! with InvalidArgs. (D-Bus signatures are fixed per method, so accepting `u` as well
//! would need a variant; busctl writes `q` as easily as `u`.)
//!
//! Objects and signals follow [`crate::ports::PortsManager::subscribe`]: a mapping added,
//! changed (container restarted with a new IP, stopped → waiting, …) or removed (Unpublish,
//! `docker rm`) updates its object (PropertiesChanged) and emits `MappingChanged(o, s)` or
//! `MappingRemoved(o)` on this interface.

use super::auth::{Action, Authorizer, Caller};
use super::error::BusError;
use super::options::{describe, interactive, Options, Opts};
use crate::ops::{self, Core};
use crate::ports::{Mapping, MappingChange, MappingState, PublishRequest};
use std::collections::HashSet;
use std::sync::Arc;
use tokio::sync::broadcast::error::RecvError;
use zbus::interface;
use zbus::message::Header;
use zbus::object_server::{ObjectServer, SignalEmitter};
use zbus::zvariant::OwnedObjectPath;

pub struct Ports {
    pub core: Arc<Core>,
    pub auth: Arc<Authorizer>,
    /// Shared with the Manager: shutdown takes it exclusively.
    pub gate: Arc<tokio::sync::RwLock<()>>,
}

pub const PORT_PREFIX: &str = "/org/dindhelper1/port/";

pub fn port_path(id: &str) -> OwnedObjectPath {
    OwnedObjectPath::try_from(format!("{PORT_PREFIX}{}", super::objects::escape_label(id)))
        .expect("valid path")
}

/// `/org/dindhelper1/port/<id>` or a bare id → the id.
pub fn mapping_id(arg: &str) -> Result<String, BusError> {
    let id = arg.strip_prefix(PORT_PREFIX).unwrap_or(arg);
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(BusError::InvalidArgs(format!(
            "{arg:?} is neither a mapping object path ({PORT_PREFIX}<id>) nor a mapping id"
        )));
    }
    Ok(id.to_owned())
}

/// `active`, `waiting`, `disconnected` or `error`.
pub fn state_name(s: &MappingState) -> &'static str {
    match s {
        MappingState::Active { .. } => "active",
        MappingState::Waiting => "waiting",
        MappingState::Disconnected => "disconnected",
        MappingState::Error(_) => "error",
    }
}

/// One row of ListMappings: object, id, container name, container id, protocol, host ip
/// ("" = every address), host port, container port, container ip ("" unless active),
/// network, owner uid, instance, state.
pub type MappingTuple = (
    OwnedObjectPath,
    String,
    String,
    String,
    String,
    String,
    u16,
    u16,
    String,
    String,
    u32,
    String,
    String,
);

/// Host address text ("" = every address).
fn host_ip_text(m: &Mapping) -> String {
    m.host_ip.map(|i| i.to_string()).unwrap_or_default()
}

/// The container's IPv4 address the rules point at ("" unless active with IPv4 rules).
fn container_ip_text(m: &Mapping) -> String {
    m.container_ip4().map(|i| i.to_string()).unwrap_or_default()
}

pub fn mapping_tuple(m: &Mapping) -> MappingTuple {
    (
        port_path(&m.id),
        m.id.clone(),
        m.container_name.clone(),
        m.container_id.clone(),
        m.protocol.to_string(),
        host_ip_text(m),
        m.host_port,
        m.container_port,
        container_ip_text(m),
        m.network.clone(),
        m.owner_uid,
        m.instance.clone().unwrap_or_default(),
        state_name(&m.state).to_owned(),
    )
}

/// Options of Publish / PublishMany: host_ip s, network s, instance s, family s.
struct PublishOpts {
    host_ip: Option<String>,
    network: Option<String>,
    instance: Option<String>,
    family: Option<String>,
}

fn publish_opts(options: &Options) -> Result<PublishOpts, BusError> {
    let mut o = Opts::new(options);
    let host_ip = o.string("host_ip")?;
    let network = o.string("network")?;
    let family = o.string("family")?;
    let instance = o.string("instance")?.filter(|i| !i.is_empty());
    if let Some(i) = &instance {
        crate::names::check_instance_name(i).map_err(BusError::map)?;
    }
    o.finish()?;
    Ok(PublishOpts {
        host_ip,
        network,
        instance,
        family,
    })
}

fn request(
    o: &PublishOpts,
    uid: u32,
    container: String,
    protocol: String,
    host_port: u16,
    container_port: u16,
) -> PublishRequest {
    PublishRequest {
        container,
        protocol,
        host_port: host_port.into(),
        container_port: container_port.into(),
        host_ip: o.host_ip.clone(),
        network: o.network.clone(),
        owner_uid: uid,
        instance: o.instance.clone(),
        family: o.family.clone(),
    }
}

/// Export (or refresh) the object of `m`.
async fn export(server: &ObjectServer, auth: &Arc<Authorizer>, m: &Mapping) {
    let path = port_path(&m.id);
    if let Ok(iface) = server.interface::<_, PortObject>(&path).await {
        update(&iface, m).await;
        return;
    }
    if let Err(e) = server
        .at(
            &path,
            PortObject {
                m: m.clone(),
                auth: auth.clone(),
            },
        )
        .await
    {
        tracing::error!(error = %e, %path, "cannot export port object");
    }
}

/// Replace an object's snapshot and emit PropertiesChanged for what changed.
async fn update(iface: &zbus::object_server::InterfaceRef<PortObject>, m: &Mapping) {
    let mut g = iface.get_mut().await;
    if g.m == *m {
        return;
    }
    let old = std::mem::replace(&mut g.m, m.clone());
    let em = iface.signal_emitter();
    let r = async {
        if old.state != m.state {
            g.state_changed(em).await?;
            g.error_changed(em).await?;
            g.container_ip_changed(em).await?;
            g.container_ip6_changed(em).await?;
            g.families_changed(em).await?;
            g.bridge_changed(em).await?;
        }
        if old.container_name != m.container_name {
            g.container_changed(em).await?;
        }
        zbus::Result::Ok(())
    }
    .await;
    if let Err(e) = r {
        tracing::warn!(error = %e, mapping = %m.id, "cannot emit PropertiesChanged");
    }
}

/// Export every mapping (at start).
pub async fn publish_all(server: &ObjectServer, core: &Core, auth: &Arc<Authorizer>) {
    for m in ops::ports::list(core) {
        export(server, auth, &m).await;
    }
}

/// Follow the manager's changes: objects, PropertiesChanged, MappingChanged/Removed.
/// After a lag (more than the channel holds), resynchronise from the table.
pub async fn follow(
    conn: zbus::Connection,
    core: Arc<Core>,
    auth: Arc<Authorizer>,
    mut rx: tokio::sync::broadcast::Receiver<MappingChange>,
) {
    let server = conn.object_server();
    let emitter = match SignalEmitter::new(&conn, super::MANAGER_PATH) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the Ports signal emitter");
            return;
        }
    };
    let mut known: HashSet<String> = ops::ports::list(&core).into_iter().map(|m| m.id).collect();
    loop {
        let change = match rx.recv().await {
            Ok(c) => c,
            Err(RecvError::Closed) => return,
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(
                    missed = n,
                    "port change signals lagged; resynchronising objects"
                );
                let now = ops::ports::list(&core);
                let ids: HashSet<String> = now.iter().map(|m| m.id.clone()).collect();
                for gone in known.difference(&ids) {
                    let path = port_path(gone);
                    let _ = server.remove::<PortObject, _>(&path).await;
                    let _ = Ports::mapping_removed(&emitter, path).await;
                }
                for m in &now {
                    export(server, &auth, m).await;
                    let _ =
                        Ports::mapping_changed(&emitter, port_path(&m.id), state_name(&m.state))
                            .await;
                }
                known = ids;
                continue;
            }
        };
        let r = match change {
            MappingChange::Added(m) | MappingChange::Updated(m) => {
                known.insert(m.id.clone());
                export(server, &auth, &m).await;
                Ports::mapping_changed(&emitter, port_path(&m.id), state_name(&m.state)).await
            }
            MappingChange::Removed(m) => {
                known.remove(&m.id);
                let path = port_path(&m.id);
                let _ = server.remove::<PortObject, _>(&path).await;
                Ports::mapping_removed(&emitter, path).await
            }
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "cannot emit a Ports signal");
        }
    }
}

impl Ports {
    /// Before anything is resolved: the `ports` action and the `instance` tag, PublishMany's
    /// size (`max_publish_many`), then `ports-privileged` for every host port below
    /// `privileged_port_floor` (each with its details, so a rule may allow 80 and 443
    /// only). Publish and PublishMany both start here. Returns `ports` with each container
    /// replaced by the full id its owner check was made for: the requests name that id.
    async fn authorize_ports(
        &self,
        hdr: &Header<'_>,
        caller: &Caller,
        ports: &[(String, String, u16, u16)],
        instance: Option<&str>,
        inter: bool,
    ) -> Result<Vec<(String, String, u16, u16)>, BusError> {
        super::authorize_into_instance(
            &self.auth,
            &self.core,
            hdr,
            caller,
            Action::Ports,
            instance,
            inter,
        )
        .await?;
        let max = self.core.cfg.max_publish_many;
        if ports.len() > max {
            return Err(BusError::InvalidArgs(format!(
                "{} ports in one call; max_publish_many is {max}",
                ports.len()
            )));
        }
        ops::ports::check_mapping_quota(&self.core, caller.uid, ports.len())
            .map_err(BusError::map)?;
        let floor = self.core.cfg.privileged_port_floor;
        for (container, protocol, host_port, _) in ports {
            if *host_port < floor {
                let mut details: super::auth::Details = vec![
                    ("container", container.clone()),
                    ("host_port", host_port.to_string()),
                    ("protocol", protocol.clone()),
                ];
                if let Some(i) = instance {
                    details.push(("instance", i.to_owned()));
                }
                self.auth
                    .check_with(hdr, caller, Action::PortsPrivileged, false, inter, &details)
                    .await?;
            }
        }
        // Owned targets: every container must belong to one of the caller's instances,
        // else ports-others.
        let mut ids: std::collections::HashMap<&str, String> = std::collections::HashMap::new();
        for (container, protocol, host_port, _) in ports {
            if ids.contains_key(container.as_str()) {
                continue;
            }
            let id = ops::ports::resolve_container(&self.core, container)
                .await
                .map_err(BusError::map)?;
            super::authorize_container_id(
                &self.auth,
                &self.core,
                hdr,
                caller,
                Action::Ports,
                container,
                &id,
                inter,
                vec![
                    ("host_port", host_port.to_string()),
                    ("protocol", protocol.clone()),
                ],
            )
            .await?;
            ids.insert(container, id);
        }
        Ok(ports
            .iter()
            .map(|(c, p, h, cp)| (ids[c.as_str()].clone(), p.clone(), *h, *cp))
            .collect())
    }

    /// Authorize acting on mappings: the base action, plus `-others` when any of them
    /// belongs to another uid.
    async fn authorize_mappings(
        &self,
        hdr: &Header<'_>,
        caller: &Caller,
        ms: &[Mapping],
        inter: bool,
    ) -> Result<(), BusError> {
        self.auth
            .check_caller(hdr, caller, Action::Ports, false, inter)
            .await?;
        if ms.iter().any(|m| m.owner_uid != caller.uid) {
            self.auth
                .check_caller(hdr, caller, Action::Ports, true, inter)
                .await?;
        }
        Ok(())
    }

    /// Export the new objects before answering (so the caller can read them at once),
    /// unless they were removed meanwhile.
    async fn export_new(&self, server: &ObjectServer, ms: &[Mapping]) {
        for m in ms {
            if let Some(cur) = self.core.ports.get(&m.id) {
                export(server, &self.auth, &cur).await;
                if self.core.ports.get(&m.id).is_none() {
                    let _ = server.remove::<PortObject, _>(&port_path(&m.id)).await;
                }
            }
        }
    }
}

#[interface(name = "org.dindhelper1.Ports")]
impl Ports {
    /// Publish `host_port` of the daemon's network namespace to `container_port` of a
    /// running container (DNAT in Docker's chains). Options: host_ip s, network s,
    /// instance s, interactive b.
    #[allow(clippy::too_many_arguments)] // the D-Bus signature plus header and server
    async fn publish(
        &self,
        container: String,
        protocol: String,
        host_port: u16,
        container_port: u16,
        options: Options,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<OwnedObjectPath, BusError> {
        let args = format!(
            "{container} {protocol} {host_port}:{container_port} {}",
            describe(&options)
        );
        let hdr = &hdr;
        super::audited(
            &self.auth,
            &self.gate,
            hdr,
            "Publish",
            &args,
            |caller| async move {
                let o = publish_opts(&options)?;
                let inter = interactive(&options)?;
                let one = [(container, protocol, host_port, container_port)];
                let [(id, protocol, host_port, container_port)]: [_; 1] = self
                    .authorize_ports(hdr, &caller, &one, o.instance.as_deref(), inter)
                    .await?
                    .try_into()
                    .map_err(|_| BusError::Failed("one port in, one out".into()))?;
                let req = request(&o, caller.uid, id, protocol, host_port, container_port);
                let m = ops::ports::publish(&self.core, req)
                    .await
                    .map_err(BusError::map)?;
                self.export_new(server, std::slice::from_ref(&m)).await;
                Ok(port_path(&m.id))
            },
        )
        .await
    }

    /// Publish many ports at once, all or nothing, as one iptables batch: entries are
    /// (container, protocol, host port, container port); the options apply to every
    /// entry. Returns the mapping objects in the order of the entries.
    async fn publish_many(
        &self,
        ports: Vec<(String, String, u16, u16)>,
        options: Options,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<Vec<OwnedObjectPath>, BusError> {
        let args = format!("{} ports {}", ports.len(), describe(&options));
        let hdr = &hdr;
        super::audited(
            &self.auth,
            &self.gate,
            hdr,
            "PublishMany",
            &args,
            |caller| async move {
                let o = publish_opts(&options)?;
                let inter = interactive(&options)?;
                let reqs = self
                    .authorize_ports(hdr, &caller, &ports, o.instance.as_deref(), inter)
                    .await?
                    .into_iter()
                    .map(|(c, p, h, cp)| request(&o, caller.uid, c, p, h, cp))
                    .collect();
                let ms = ops::ports::publish_many(&self.core, reqs)
                    .await
                    .map_err(BusError::map)?;
                self.export_new(server, &ms).await;
                Ok(ms.iter().map(|m| port_path(&m.id)).collect())
            },
        )
        .await
    }

    /// Remove a mapping and its rules: `mapping` is its object path or its id.
    async fn unpublish(
        &self,
        mapping: String,
        options: Options,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<(), BusError> {
        let args = mapping.to_string();
        let hdr = &hdr;
        super::audited(
            &self.auth,
            &self.gate,
            hdr,
            "Unpublish",
            &args,
            |caller| async move {
                Opts::new(&options).finish()?;
                let inter = interactive(&options)?;
                let id = mapping_id(&mapping)?;
                // The base action first: a caller without it learns nothing about mappings.
                self.auth
                    .check_caller(hdr, &caller, Action::Ports, false, inter)
                    .await?;
                let m = ops::ports::get(&self.core, &id).map_err(BusError::map)?;
                self.authorize_mappings(hdr, &caller, std::slice::from_ref(&m), inter)
                    .await?;
                ops::ports::unpublish(&self.core, &id)
                    .await
                    .map_err(BusError::map)?;
                let _ = server.remove::<PortObject, _>(&port_path(&id)).await;
                Ok(())
            },
        )
        .await
    }

    /// Remove every mapping of a container (name, id or id prefix; the container may be
    /// gone). Returns how many were removed. Mappings of other uids need `-others`.
    async fn unpublish_container(
        &self,
        container: String,
        options: Options,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<u32, BusError> {
        let args = container.to_string();
        let hdr = &hdr;
        super::audited(
            &self.auth,
            &self.gate,
            hdr,
            "UnpublishContainer",
            &args,
            |caller| async move {
                Opts::new(&options).finish()?;
                let inter = interactive(&options)?;
                self.auth
                    .check_caller(hdr, &caller, Action::Ports, false, inter)
                    .await?;
                let ms = ops::ports::of_container(&self.core, &container).await;
                if ms.is_empty() {
                    return Err(BusError::NotFound(format!(
                        "container {container:?} has no published port"
                    )));
                }
                self.authorize_mappings(hdr, &caller, &ms, inter).await?;
                let removed = ops::ports::unpublish_ids(
                    &self.core,
                    ms.iter().map(|m| m.id.clone()).collect(),
                )
                .await
                .map_err(BusError::map)?;
                for m in &removed {
                    let _ = server.remove::<PortObject, _>(&port_path(&m.id)).await;
                }
                Ok(removed.len() as u32)
            },
        )
        .await
    }

    /// The firewall backend ports go to (`iptables-nft`, `iptables-legacy`); "" while none
    /// is detected. Reading it never starts a detection (the first Publish or reconcile
    /// does).
    #[zbus(property)]
    async fn firewall_backend(&self) -> String {
        self.core
            .ports
            .detected_now()
            .map(|d| d.name.to_owned())
            .unwrap_or_default()
    }

    /// True when the backend publishes IPv6 too (ip6tables has Docker's DOCKER chain):
    /// mappings of family `auto` then hold IPv6 where the container has an IPv6 address.
    /// False while none is detected or Docker publishes IPv4 only (the reason says which).
    #[zbus(property)]
    async fn firewall_ipv6(&self) -> bool {
        self.core.ports.ipv6_now().unwrap_or(false)
    }

    /// Why that backend was chosen, or why none could be (the last detection error).
    #[zbus(property)]
    async fn firewall_backend_reason(&self) -> String {
        match self.core.ports.detected_now() {
            Some(d) => d.reason,
            None => self.core.ports.detection_error().unwrap_or_default(),
        }
    }

    /// Every mapping: object, id, container, container id, protocol, host ip, host port,
    /// container port, container ip, network, owner uid, instance, state.
    /// Callers outside the provisioning group get their own mappings only.
    async fn list_mappings(
        &self,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<Vec<MappingTuple>, BusError> {
        let who = self.auth.viewer(&hdr).await?;
        Ok(ops::ports::list(&self.core)
            .iter()
            .filter(|m| who.sees(m.owner_uid))
            .map(mapping_tuple)
            .collect())
    }

    /// A mapping was added or its state changed (`active`, `waiting`, `error`).
    #[zbus(signal)]
    async fn mapping_changed(
        emitter: &SignalEmitter<'_>,
        mapping: OwnedObjectPath,
        state: &str,
    ) -> zbus::Result<()>;

    /// A mapping is gone (Unpublish, UnpublishContainer, container destroyed).
    #[zbus(signal)]
    async fn mapping_removed(
        emitter: &SignalEmitter<'_>,
        mapping: OwnedObjectPath,
    ) -> zbus::Result<()>;
}

/// A mapping object (snapshot; replaced on change).
pub struct PortObject {
    pub m: Mapping,
    /// Every getter is owner-only (see [`super::visibility`]).
    pub auth: Arc<Authorizer>,
}

impl PortObject {
    async fn shown(&self, hdr: Option<&Header<'_>>) -> zbus::fdo::Result<()> {
        super::visibility::owner_only(&self.auth, hdr, self.m.owner_uid).await
    }
}

#[interface(name = "org.dindhelper1.Port")]
impl PortObject {
    #[zbus(property)]
    async fn id(&self, #[zbus(header)] hdr: Option<Header<'_>>) -> zbus::fdo::Result<String> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.m.id.clone())
    }
    /// Container name (without the leading /).
    #[zbus(property)]
    async fn container(
        &self,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<String> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.m.container_name.clone())
    }
    #[zbus(property)]
    async fn container_id(
        &self,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<String> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.m.container_id.clone())
    }
    /// "tcp" or "udp".
    #[zbus(property)]
    async fn protocol(&self, #[zbus(header)] hdr: Option<Header<'_>>) -> zbus::fdo::Result<String> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.m.protocol.to_string())
    }
    /// Host address the DNAT is restricted to ("" = every address).
    #[zbus(property)]
    async fn host_ip(&self, #[zbus(header)] hdr: Option<Header<'_>>) -> zbus::fdo::Result<String> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.m.host_ip.map(|i| i.to_string()).unwrap_or_default())
    }
    #[zbus(property)]
    async fn host_port(&self, #[zbus(header)] hdr: Option<Header<'_>>) -> zbus::fdo::Result<u16> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.m.host_port)
    }
    #[zbus(property)]
    async fn container_port(
        &self,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<u16> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.m.container_port)
    }
    /// The container's IPv4 address the rules point at ("" unless active with IPv4 rules).
    #[zbus(property)]
    async fn container_ip(
        &self,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<String> {
        self.shown(hdr.as_ref()).await?;
        Ok(container_ip_text(&self.m))
    }
    /// The container's IPv6 address the rules also point at ("" unless active with IPv6).
    #[zbus(property)]
    async fn container_ip6(
        &self,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<String> {
        self.shown(hdr.as_ref()).await?;
        Ok(match &self.m.state {
            MappingState::Active { ip6: Some(a), .. } => a.to_string(),
            _ => String::new(),
        })
    }
    /// The families asked for: "auto" (IPv4, plus IPv6 where available), "ipv4", "both",
    /// "ipv6".
    #[zbus(property)]
    async fn family(&self, #[zbus(header)] hdr: Option<Header<'_>>) -> zbus::fdo::Result<String> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.m.family.as_str().to_owned())
    }
    /// The families that have rules now: ["ipv4"], ["ipv4", "ipv6"] or ["ipv6"]; []
    /// unless active.
    #[zbus(property)]
    async fn families(
        &self,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<Vec<String>> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.m.families().into_iter().map(str::to_owned).collect())
    }
    /// The Linux bridge of the network ("" unless active).
    #[zbus(property)]
    async fn bridge(&self, #[zbus(header)] hdr: Option<Header<'_>>) -> zbus::fdo::Result<String> {
        self.shown(hdr.as_ref()).await?;
        Ok({
            match &self.m.state {
                MappingState::Active { bridge, .. } => bridge.clone(),
                _ => String::new(),
            }
        })
    }
    /// Docker network name.
    #[zbus(property)]
    async fn network(&self, #[zbus(header)] hdr: Option<Header<'_>>) -> zbus::fdo::Result<String> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.m.network.clone())
    }
    #[zbus(property)]
    async fn owner_uid(&self, #[zbus(header)] hdr: Option<Header<'_>>) -> zbus::fdo::Result<u32> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.m.owner_uid)
    }
    /// DinD instance this mapping belongs to ("" for none).
    #[zbus(property)]
    async fn instance(&self, #[zbus(header)] hdr: Option<Header<'_>>) -> zbus::fdo::Result<String> {
        self.shown(hdr.as_ref()).await?;
        Ok(self.m.instance.clone().unwrap_or_default())
    }
    /// "active" (rules written), "waiting" (container stopped), "disconnected" (container
    /// runs but left the mapping's network; rules back when it is connected again) or
    /// "error" (see Error).
    #[zbus(property)]
    async fn state(&self, #[zbus(header)] hdr: Option<Header<'_>>) -> zbus::fdo::Result<String> {
        self.shown(hdr.as_ref()).await?;
        Ok(state_name(&self.m.state).to_owned())
    }
    /// Why the mapping is in state "error" ("" otherwise).
    #[zbus(property)]
    async fn error(&self, #[zbus(header)] hdr: Option<Header<'_>>) -> zbus::fdo::Result<String> {
        self.shown(hdr.as_ref()).await?;
        Ok({
            match &self.m.state {
                MappingState::Error(e) => e.clone(),
                _ => String::new(),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_ids_from_paths_or_ids() {
        assert_eq!(mapping_id("0011aabb").unwrap(), "0011aabb");
        assert_eq!(
            mapping_id("/org/dindhelper1/port/0011aabb").unwrap(),
            "0011aabb"
        );
        for bad in [
            "",
            "/org/dindhelper1/port/",
            "../x",
            "/org/dindhelper1/loop/loop0",
        ] {
            assert!(mapping_id(bad).is_err(), "{bad:?}");
        }
        assert_eq!(port_path("ab12").as_str(), "/org/dindhelper1/port/ab12");
    }

    #[test]
    fn tuple_and_state_names() {
        let m = Mapping {
            id: "ab".into(),
            container_id: "c1".into(),
            container_name: "web".into(),
            protocol: crate::ports::Protocol::Tcp,
            host_ip: None,
            host_port: 8080,
            container_port: 80,
            network: "bridge".into(),
            owner_uid: 1000,
            instance: None,
            family: crate::ports::Family::Auto,
            state: MappingState::Active {
                ip: "172.17.0.2".parse().unwrap(),
                bridge: "docker0".into(),
                ip6: None,
            },
        };
        let t = mapping_tuple(&m);
        assert_eq!(t.0.as_str(), "/org/dindhelper1/port/ab");
        assert_eq!(
            (t.4.as_str(), t.5.as_str(), t.6, t.7),
            ("tcp", "", 8080, 80)
        );
        assert_eq!((t.8.as_str(), t.12.as_str()), ("172.17.0.2", "active"));
        assert_eq!(state_name(&MappingState::Waiting), "waiting");
        assert_eq!(state_name(&MappingState::Disconnected), "disconnected");
        assert_eq!(state_name(&MappingState::Error("x".into())), "error");
    }
}
