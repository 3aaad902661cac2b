//! The daemon's life, one named step each ([`run`] reads as the list):
//! 1. [`lock_and_load`]: lock the state dir, load state, open the image store, pick the
//!    slice backend, build the one Docker client → [`Core`];
//! 2. [`connect`]: the bus; refuse early when another daemon owns `org.dindhelper1`;
//! 3. [`reconcile`]: loops, instances (kernel, cgroups), then ports (chains, dockerd) and
//!    the event tasks that keep them true;
//! 4. [`export`]: every interface and object;
//! 5. [`own_name`]: request `org.dindhelper1` (only now: calls arrive after everything is
//!    in place);
//! 6. [`serve`]: until SIGTERM/SIGINT;
//! 7. [`shut_down`]: release the name, let calls in flight finish, stop tasks and
//!    captures, save state, exit 0.
//!
//! Each step is a small function so new start-up work (another reconcile) goes into the
//! step it belongs to.

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
    let core = lock_and_load(&opts).await?;
    let bus = opts
        .bus_address
        .clone()
        .unwrap_or_else(|| "system bus".into());
    let conn = connect(opts.bus_address.as_deref(), &bus).await?;
    let tasks = reconcile(&core).await?;
    let served = export(&conn, &core).await?;
    // Signal handlers before the name: a SIGTERM right after `ready` is not lost.
    let signals = Signals::install().map_err(DaemonError::Signals)?;
    own_name(&conn).await?;
    served.named.send_replace(true);
    tracing::info!(bus = %bus, state_dir = %opts.state_dir.display(), "dindhelperd ready as {BUS_NAME}");
    let which = serve(signals).await;
    tracing::info!("{which}: releasing {BUS_NAME}, finishing calls in flight");
    shut_down(&conn, &core, served, tasks).await
}

/// Lock the state dir and load state, open the image store, pick the slice backend, make
/// the one Docker client (ports manager and container resolver share it).
async fn lock_and_load(opts: &DaemonOptions) -> Result<Arc<Core>, DaemonError> {
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
    let instances = ops::instances::InstanceCtx::new(
        slice_backend(&state.state_id).await,
        opts.config.docker_cgroup_driver,
    );
    let docker = crate::docker::Docker::new(&opts.docker_socket);
    Ok(Arc::new(Core {
        cfg: opts.config.clone(),
        store,
        state: tokio::sync::Mutex::new(state),
        images,
        instances,
        ports: ops::ports::manager_for(docker.clone()),
        containers: ops::containers::Containers::new(docker),
    }))
}

/// The slice backend for instances; without one the daemon still serves the rest.
async fn slice_backend(state_id: &str) -> Result<Arc<dyn crate::instances::SliceBackend>, String> {
    match crate::instances::pick_backend_async(tokio::runtime::Handle::current(), state_id).await {
        Ok(b) => {
            tracing::info!("instance slice backend: {:?}", b.kind());
            Ok(Arc::from(b))
        }
        Err(e) => {
            tracing::warn!(error = %e, "no slice backend: instance methods answer NotSupported");
            Err(e.to_string())
        }
    }
}

/// Connect to the bus (`address`, else the system bus; `bus` names it in errors) and
/// refuse early, before touching the kernel, when another daemon serves the name.
async fn connect(address: Option<&str>, bus: &str) -> Result<zbus::Connection, DaemonError> {
    let builder = match address {
        Some(a) => zbus::connection::Builder::address(a),
        None => zbus::connection::Builder::system(),
    };
    let conn = async { builder?.build().await }
        .await
        .map_err(|source| DaemonError::Connect {
            bus: bus.to_owned(),
            source,
        })?;
    if let Ok(dbus) = zbus::fdo::DBusProxy::new(&conn).await {
        let name = BUS_NAME.try_into().expect("valid name");
        if dbus.name_has_owner(name).await.unwrap_or(false) {
            return Err(DaemonError::NameTaken {
                owner: name_owner(&conn).await,
            });
        }
    }
    Ok(conn)
}

async fn name_owner(conn: &zbus::Connection) -> String {
    match zbus::fdo::DBusProxy::new(conn).await {
        Ok(p) => p
            .get_name_owner(BUS_NAME.try_into().expect("valid name"))
            .await
            .map(|o| o.to_string())
            .unwrap_or_else(|_| "unknown".into()),
        Err(_) => "unknown".into(),
    }
}

/// Background tasks started by the reconcile step (aborted at shutdown).
struct Tasks {
    ports: ops::ports::PortsTasks,
    instance_events: tokio::task::JoinHandle<()>,
}

/// Make the kernel, cgroups and Docker's chains match the recorded intent (each decision
/// logged), then start the tasks that keep them matching.
async fn reconcile(core: &Arc<Core>) -> Result<Tasks, DaemonError> {
    reconcile_loops(core).await?;
    reconcile_instances(core).await?;
    Ok(follow_docker(core).await)
}

async fn reconcile_loops(core: &Arc<Core>) -> Result<(), DaemonError> {
    for d in ops::loops::reconcile(core)
        .await
        .map_err(DaemonError::Reconcile)?
    {
        tracing::info!(decision = ?d, "reconcile");
    }
    Ok(())
}

async fn reconcile_instances(core: &Arc<Core>) -> Result<(), DaemonError> {
    for d in ops::instances::reconcile(core)
        .await
        .map_err(DaemonError::Reconcile)?
    {
        // In the message itself: journald keeps structured fields out of `journalctl`'s view.
        tracing::info!("reconcile: {d:?}");
    }
    Ok(())
}

/// Ports reconcile, then one Docker event stream: the ports watch follows it and forwards
/// every event here, where a container start re-applies its instance's oom_score_adj.
async fn follow_docker(core: &Arc<Core>) -> Tasks {
    let (events_tx, mut events_rx) = tokio::sync::mpsc::unbounded_channel();
    let ports = ops::ports::start(core, Some(events_tx)).await;
    let core = core.clone();
    let instance_events = tokio::spawn(async move {
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
    });
    Tasks {
        ports,
        instance_events,
    }
}

/// What the export step leaves for the shutdown.
struct Served {
    /// Write-locked at shutdown: waits for the calls in flight, admits no new one.
    gate: Arc<tokio::sync::RwLock<()>>,
    captures: ops::capture::Captures,
    port_signals: tokio::task::JoinHandle<()>,
    /// Set once the name is owned. The port signal task waits for it: the bus policy
    /// keeps the daemon's signals from tenants by sender name (and by the path
    /// /org/dindhelper1), and a PropertiesChanged sent from an object path before the name
    /// is owned would match neither (bus::visibility).
    named: tokio::sync::watch::Sender<bool>,
}

/// Export every interface on `/org/dindhelper1` and every object.
async fn export(conn: &zbus::Connection, core: &Arc<Core>) -> Result<Served, DaemonError> {
    let gate = Arc::new(tokio::sync::RwLock::new(()));
    let auth = Arc::new(Authorizer::new(conn.clone()));
    let captures = ops::capture::Captures::new(core.clone());
    let server = conn.object_server();
    let at = DaemonError::Export;

    // Our own ObjectManager: GetManagedObjects answers per caller (bus::visibility).
    server
        .at(
            MANAGER_PATH,
            crate::bus::visibility::ObjectManager {
                core: core.clone(),
                auth: auth.clone(),
                captures: captures.clone(),
            },
        )
        .await
        .map_err(at)?;
    let manager = Manager {
        core: core.clone(),
        auth: auth.clone(),
        gate: gate.clone(),
    };
    manager.publish_all(server).await;
    server.at(MANAGER_PATH, manager).await.map_err(at)?;

    let instances = crate::bus::instances::Instances {
        core: core.clone(),
        auth: auth.clone(),
        gate: gate.clone(),
        teardown: ops::instances::Teardown {
            captures: Some(captures.clone()),
        },
    };
    instances.publish_all(server).await;
    server.at(MANAGER_PATH, instances).await.map_err(at)?;

    let capture_iface = CaptureManager {
        core: core.clone(),
        captures: captures.clone(),
        auth: auth.clone(),
        gate: gate.clone(),
    };
    server.at(MANAGER_PATH, capture_iface).await.map_err(at)?;

    let devices_iface = Devices {
        core: core.clone(),
        auth: auth.clone(),
        gate: gate.clone(),
        follow: crate::bus::devices::start_follow(conn, core.clone()),
    };
    server.at(MANAGER_PATH, devices_iface).await.map_err(at)?;

    let port_changes = core.ports.subscribe();
    crate::bus::ports::publish_all(server, core, &auth).await;
    let ports_iface = crate::bus::ports::Ports {
        core: core.clone(),
        auth: auth.clone(),
        gate: gate.clone(),
    };
    server.at(MANAGER_PATH, ports_iface).await.map_err(at)?;
    let (named, mut named_rx) = tokio::sync::watch::channel(false);
    let follow = crate::bus::ports::follow(conn.clone(), core.clone(), auth.clone(), port_changes);
    let port_signals = tokio::spawn(async move {
        if named_rx.wait_for(|owned| *owned).await.is_ok() {
            follow.await;
        }
    });
    Ok(Served {
        gate,
        captures,
        port_signals,
        named,
    })
}

/// Request `org.dindhelper1` (DoNotQueue): NameTaken, naming the owner, when another
/// daemon won the race since [`connect`] checked.
async fn own_name(conn: &zbus::Connection) -> Result<(), DaemonError> {
    match conn
        .request_name_with_flags(BUS_NAME, RequestNameFlags::DoNotQueue.into())
        .await
    {
        Ok(RequestNameReply::PrimaryOwner) | Ok(RequestNameReply::AlreadyOwner) => Ok(()),
        Ok(_) | Err(zbus::Error::NameTaken) => Err(DaemonError::NameTaken {
            owner: name_owner(conn).await,
        }),
        Err(e) => Err(DaemonError::RequestName(e)),
    }
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }
}

/// Serve (the object server runs on the connection) until SIGTERM or SIGINT; returns
/// which one.
async fn serve(mut signals: Signals) -> &'static str {
    tokio::select! {
        _ = signals.term.recv() => "SIGTERM",
        _ = signals.int.recv() => "SIGINT",
    }
}

/// Release the name, wait for the calls in flight (and admit no new one), stop the
/// background tasks and the running captures (their files complete), save state.
async fn shut_down(
    conn: &zbus::Connection,
    core: &Arc<Core>,
    served: Served,
    tasks: Tasks,
) -> Result<(), DaemonError> {
    if let Err(e) = conn.release_name(BUS_NAME).await {
        tracing::warn!(error = %e, "cannot release the bus name");
    }
    let _all = served.gate.write().await;
    tasks.ports.watch.abort();
    tasks.ports.persist.abort();
    tasks.instance_events.abort();
    served.port_signals.abort();
    let ended = served.captures.stop_all().await;
    if ended > 0 {
        tracing::info!("stopped {ended} running captures (their files are complete)");
    }
    let mut st = core.state.lock().await;
    st.mappings = core.ports.mappings();
    core.store.save_all(&st)?;
    tracing::info!("state saved; exiting");
    Ok(())
}
