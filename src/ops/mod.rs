//! Operations: one domain call plus the intent bookkeeping around it (state records,
//! ownership, per-uid limits). No D-Bus here; the bus layer authorizes and converts, then
//! calls one function of this module.

pub mod capture;
pub mod containers;
pub mod devices;
pub mod instances;
pub mod intent;
pub mod loops;
pub mod ports;

use crate::config::Config;
use crate::error::{Classify, Kind};
use crate::state::{Change, State, StateStore};

/// The daemon's shared core: configuration, state and the domain stores.
pub struct Core {
    pub cfg: Config,
    pub store: StateStore,
    pub state: tokio::sync::Mutex<State>,
    pub images: crate::loopdev::images::ImageStore,
    /// Slice backend, dockerd's cgroup driver and the container resolver.
    pub instances: instances::InstanceCtx,
    /// Published ports (Docker client + iptables); see `ops::ports`.
    pub ports: std::sync::Arc<crate::ports::PortsManager>,
    /// The one container resolver (captures, ExposeToContainer, AdoptContainer); its
    /// Docker client is the one the ports manager holds.
    pub containers: containers::Containers,
}

impl Core {
    /// Record changes of the intent (call with the state lock held, after changing
    /// `state` the same way): one journal append, fsynced when a change is durable (every
    /// kind but loop records). See `state`.
    pub fn record(&self, state: &State, changes: &[Change]) -> Result<(), OpsError> {
        self.store.record(state, changes).map_err(OpsError::State)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Loop(#[from] crate::loopdev::LoopError),
    #[error(transparent)]
    Partitions(#[from] crate::partitions::PartError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Ports(#[from] crate::ports::PortsError),
    #[error(transparent)]
    Name(#[from] crate::names::NameError),
    #[error("{what} {name:?} does not exist")]
    NotFound { what: &'static str, name: String },
    #[error("{device} is not managed by dindhelper (attach it through the daemon first)")]
    Unmanaged { device: String },
    #[error("{what} is in use: {why}")]
    Busy { what: String, why: String },
    #[error("limit reached: {0}")]
    Limit(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("internal task failed: {0}")]
    Task(String),
    #[error(transparent)]
    Instance(#[from] crate::instances::InstanceError),
    /// A teardown that did part of its work: what was done and every failure.
    #[error("{} failure(s): {}; done: [{}]", .errors.len(), .errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "), .done.join(", "))]
    Teardown {
        done: Vec<String>,
        errors: Vec<OpsError>,
    },
    #[error("{what}: {why}")]
    Conflict { what: String, why: String },
    #[error("{what} is not available on this host: {why}")]
    NotSupported { what: String, why: String },
    #[error("container {container:?}: {why}")]
    Container {
        container: String,
        why: String,
        kind: Kind,
    },
}

impl Classify for OpsError {
    fn kind(&self) -> Kind {
        match self {
            OpsError::Loop(e) => e.kind(),
            OpsError::Partitions(e) => e.kind(),
            OpsError::State(e) => e.kind(),
            OpsError::Ports(e) => e.kind(),
            OpsError::Name(e) => e.kind(),
            OpsError::NotFound { .. } | OpsError::Unmanaged { .. } => Kind::NotFound,
            OpsError::Busy { .. } => Kind::Busy,
            // Same class as the image store's per-uid limits.
            OpsError::Limit(_) | OpsError::Invalid(_) => Kind::InvalidArgs,
            OpsError::Task(_) => Kind::Failed,
            OpsError::Instance(e) => e.kind(),
            OpsError::Teardown { errors, .. } => errors.first().map_or(Kind::Failed, |e| e.kind()),
            OpsError::Conflict { .. } => Kind::Conflict,
            OpsError::NotSupported { .. } => Kind::NotSupported,
            OpsError::Container { kind, .. } => *kind,
        }
    }
}

/// Run blocking kernel work off the async workers.
pub async fn blocking<T, F>(f: F) -> Result<T, OpsError>
where
    F: FnOnce() -> Result<T, OpsError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| OpsError::Task(e.to_string()))?
}
