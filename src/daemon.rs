//! The daemon's life: lock and load state → reconcile with the kernel → export objects and
//! own `org.dindhelper1` → serve → on SIGTERM/SIGINT release the name, let calls in flight
//! finish, save state, exit 0.

use crate::bus::capture::CaptureManager;
use crate::bus::devices::Devices;
use crate::bus::manager::Manager;
use crate::bus::{auth::Authorizer, BUS_NAME, MANAGER_PATH};
use crate::config::Config;
use crate::loopdev::images::{ImageStore, Limits};
use crate::ops::{self, Core};
use crate::state::StateStore;
use std::path::PathBuf;
use std::sync::Arc;
use zbus::fdo::{RequestNameFlags, RequestNameReply};

#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// `None`: the system bus.
    pub bus_address: Option<String>,
    pub state_dir: PathBuf,
    pub config: Config,
    /// dockerd's socket (`--docker-host`, parsed by
    /// [`crate::docker::parse_docker_host`]): the one Docker client for ports, captures,
    /// ExposeToContainer and AdoptContainer.
    pub docker_socket: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error("cannot open the image store: {0}")]
    Images(crate::loopdev::LoopError),
    #[error("start-up reconcile failed: {0}")]
    Reconcile(ops::OpsError),
    #[error("cannot connect to the {bus}: {source}")]
    Connect { bus: String, source: zbus::Error },
    #[error("cannot export objects: {0}")]
    Export(zbus::Error),
    #[error("the name {BUS_NAME} is already owned on this bus (by {owner}): is another dindhelperd running?")]
    NameTaken { owner: String },
    #[error("cannot request the name {BUS_NAME}: {0}")]
    RequestName(zbus::Error),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

pub async fn run(opts: DaemonOptions) -> Result<(), DaemonError> {
    let store = StateStore::open(&opts.state_dir)?;
    let state = store.load_or_init()?;
    let images = ImageStore::new(
        opts.state_dir.join("images"),
        Limits {
            max_size: opts.config.max_image_size,
            max_count: opts.config.max_images_per_uid,
            max_total_bytes: opts.config.max_image_bytes_per_uid,
        },
    )
    .map_err(DaemonError::Images)?;
    // The slice backend for instances; without one the daemon still serves the rest.
    let backend = match crate::instances::pick_backend_async(tokio::runtime::Handle::current())
        .await
    {
        Ok(b) => {
            tracing::info!("instance slice backend: {:?}", b.kind());
            Ok(Arc::from(b))
        }
        Err(e) => {
            tracing::warn!(error = %e, "no slice backend: instance methods answer NotSupported");
            Err(e.to_string())
        }
    };
    let instances = ops::instances::InstanceCtx::new(backend, opts.config.docker_cgroup_driver);
    let docker = crate::docker::Docker::new(&opts.docker_socket);
    let core = Arc::new(Core {
        cfg: opts.config.clone(),
        store,
        state: tokio::sync::Mutex::new(state),
        images,
        instances,
        ports: ops::ports::manager_for(docker.clone()),
        containers: ops::containers::Containers::new(docker),
    });

    let bus = opts
        .bus_address
        .clone()
        .unwrap_or_else(|| "system bus".into());
    let builder = match &opts.bus_address {
        Some(a) => zbus::connection::Builder::address(a.as_str()),
        None => zbus::connection::Builder::system(),
    };
    let conn = async { builder?.build().await }
        .await
        .map_err(|source| DaemonError::Connect {
            bus: bus.clone(),
            source,
        })?;

    // Refuse early, before touching the kernel, when another daemon serves the name.
    if let Ok(dbus) = zbus::fdo::DBusProxy::new(&conn).await {
        let name = BUS_NAME.try_into().expect("valid name");
        if dbus.name_has_owner(name).await.unwrap_or(false) {
            let owner = dbus
                .get_name_owner(BUS_NAME.try_into().expect("valid name"))
                .await
                .map(|o| o.to_string())
                .unwrap_or_else(|_| "unknown".into());
            return Err(DaemonError::NameTaken { owner });
        }
    }

    for d in ops::loops::reconcile(&core)
        .await
        .map_err(DaemonError::Reconcile)?
    {
        tracing::info!(decision = ?d, "reconcile");
    }
    for d in ops::instances::reconcile(&core)
        .await
        .map_err(DaemonError::Reconcile)?
    {
        // In the message itself: journald keeps structured fields out of `journalctl`'s view.
        tracing::info!("reconcile: {d:?}");
    }

    // One Docker event stream: the ports watch follows it and forwards every event here,
    // where a container start re-applies its instance's oom_score_adj.
    let (events_tx, mut events_rx) = tokio::sync::mpsc::unbounded_channel();
    let ports_tasks = ops::ports::start(&core, Some(events_tx)).await;
    let instance_events = {
        let core = core.clone();
        tokio::spawn(async move {
            while let Some(ev) = events_rx.recv().await {
                if ev.action != "start" {
                    continue;
                }
                match ops::instances::on_container_start(&core, &ev.container_id).await {
                    Ok(Some(inst)) => {
                        tracing::info!(container = %ev.container_id, instance = %inst,
                        "container restarted: oom_score_adj re-applied")
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(container = %ev.container_id, error = %e,
                        "cannot re-apply oom_score_adj after a container start"),
                }
            }
        })
    };

    let gate = Arc::new(tokio::sync::RwLock::new(()));
    let auth = Arc::new(Authorizer::new(conn.clone()));
    let ports_iface = crate::bus::ports::Ports {
        core: core.clone(),
        auth: auth.clone(),
        gate: gate.clone(),
    };
    let manager = Manager {
        core: core.clone(),
        auth: auth.clone(),
        gate: gate.clone(),
    };
    let captures = ops::capture::Captures::new(core.clone());
    let capture_iface = CaptureManager {
        core: core.clone(),
        captures: captures.clone(),
        auth: auth.clone(),
        gate: gate.clone(),
    };
    let devices_iface = Devices {
        core: core.clone(),
        auth: auth.clone(),
        gate: gate.clone(),
    };
    let server = conn.object_server();
    server
        .at(MANAGER_PATH, zbus::fdo::ObjectManager)
        .await
        .map_err(DaemonError::Export)?;
    manager.publish_all(server).await;
    server
        .at(MANAGER_PATH, manager)
        .await
        .map_err(DaemonError::Export)?;
    let instances = crate::bus::instances::Instances {
        core: core.clone(),
        auth: auth.clone(),
        gate: gate.clone(),
        teardown: ops::instances::Teardown {
            captures: Some(captures.clone()),
        },
    };
    instances.publish_all(server).await;
    server
        .at(MANAGER_PATH, instances)
        .await
        .map_err(DaemonError::Export)?;
    server
        .at(MANAGER_PATH, capture_iface)
        .await
        .map_err(DaemonError::Export)?;
    server
        .at(MANAGER_PATH, devices_iface)
        .await
        .map_err(DaemonError::Export)?;
    let port_changes = core.ports.subscribe();
    crate::bus::ports::publish_all(server, &core).await;
    server
        .at(MANAGER_PATH, ports_iface)
        .await
        .map_err(DaemonError::Export)?;
    let port_signals = tokio::spawn(crate::bus::ports::follow(
        conn.clone(),
        core.clone(),
        port_changes,
    ));

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(DaemonError::Signals)?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(DaemonError::Signals)?;

    match conn
        .request_name_with_flags(BUS_NAME, RequestNameFlags::DoNotQueue.into())
        .await
    {
        Ok(RequestNameReply::PrimaryOwner) | Ok(RequestNameReply::AlreadyOwner) => {}
        Ok(_) | Err(zbus::Error::NameTaken) => {
            let owner = match zbus::fdo::DBusProxy::new(&conn).await {
                Ok(p) => p
                    .get_name_owner(BUS_NAME.try_into().expect("valid name"))
                    .await
                    .map(|o| o.to_string())
                    .unwrap_or_else(|_| "unknown".into()),
                Err(_) => "unknown".into(),
            };
            return Err(DaemonError::NameTaken { owner });
        }
        Err(e) => return Err(DaemonError::RequestName(e)),
    }
    tracing::info!(bus = %bus, state_dir = %opts.state_dir.display(), "dindhelperd ready as {BUS_NAME}");

    let which = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    };
    tracing::info!("{which}: releasing {BUS_NAME}, finishing calls in flight");
    if let Err(e) = conn.release_name(BUS_NAME).await {
        tracing::warn!(error = %e, "cannot release the bus name");
    }
    let _all = gate.write().await;
    ports_tasks.watch.abort();
    ports_tasks.persist.abort();
    instance_events.abort();
    port_signals.abort();
    let ended = captures.stop_all().await;
    if ended > 0 {
        tracing::info!("stopped {ended} running captures (their files are complete)");
    }
    let mut st = core.state.lock().await;
    st.mappings = core.ports.mappings();
    core.store.save_all(&st)?;
    tracing::info!("state saved; exiting");
    Ok(())
}
