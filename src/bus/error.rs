//! The D-Bus errors the daemon returns: stable names under `org.dindhelper1.Error.*`.

use crate::error::{Classify, Kind};

#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.dindhelper1.Error")]
pub enum BusError {
    #[zbus(error)]
    ZBus(zbus::Error),
    /// polkit (or the ownership rule) refused the caller.
    NotAuthorized(String),
    /// The arguments or options are wrong; nothing changed.
    InvalidArgs(String),
    /// The named resource does not exist or is not managed by dindhelper.
    NotFound(String),
    /// The resource is in use.
    Busy(String),
    /// The request collides with an existing resource.
    Conflict(String),
    /// The host cannot do this.
    NotSupported(String),
    /// An operation failed on the host; the message says which and why.
    Failed(String),
}

impl BusError {
    pub fn from_kind(kind: Kind, msg: String) -> BusError {
        match kind {
            Kind::InvalidArgs => BusError::InvalidArgs(msg),
            Kind::NotFound => BusError::NotFound(msg),
            Kind::Busy => BusError::Busy(msg),
            Kind::Conflict => BusError::Conflict(msg),
            Kind::NotSupported => BusError::NotSupported(msg),
            Kind::NotAuthorized => BusError::NotAuthorized(msg),
            Kind::Failed => BusError::Failed(msg),
        }
    }

    /// Map any classified domain error, keeping its full message (with its sources).
    pub fn map<E: Classify>(e: E) -> BusError {
        let mut msg = e.to_string();
        let mut src = e.source();
        while let Some(s) = src {
            let t = s.to_string();
            if !msg.contains(&t) {
                msg.push_str(": ");
                msg.push_str(&t);
            }
            src = s.source();
        }
        BusError::from_kind(e.kind(), msg)
    }

    pub fn kind_name(&self) -> &'static str {
        match self {
            BusError::ZBus(_) => "ZBus",
            BusError::NotAuthorized(_) => "NotAuthorized",
            BusError::InvalidArgs(_) => "InvalidArgs",
            BusError::NotFound(_) => "NotFound",
            BusError::Busy(_) => "Busy",
            BusError::Conflict(_) => "Conflict",
            BusError::NotSupported(_) => "NotSupported",
            BusError::Failed(_) => "Failed",
        }
    }
}
