//! Error classification shared by every domain module.
//!
//! Each module has its own `thiserror` enum with context fields; each implements
//! [`Classify`] so the bus layer can map it to a stable D-Bus error name
//! (`org.dindhelper1.Error.<Kind>`) without knowing the module's variants.

use std::fmt;

/// The class of a failure, as the bus reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The caller's arguments are wrong; nothing was changed.
    InvalidArgs,
    /// The named resource does not exist (or is not managed by dindhelper).
    NotFound,
    /// The resource is in use (mounted, opened exclusively, …).
    Busy,
    /// The request collides with something that exists (name, port, …).
    Conflict,
    /// The host cannot do this (kernel, backend or configuration missing).
    NotSupported,
    /// The caller may not do this.
    NotAuthorized,
    /// Anything else: a system call or tool failed unexpectedly.
    Failed,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Kind::InvalidArgs => "InvalidArgs",
            Kind::NotFound => "NotFound",
            Kind::Busy => "Busy",
            Kind::Conflict => "Conflict",
            Kind::NotSupported => "NotSupported",
            Kind::NotAuthorized => "NotAuthorized",
            Kind::Failed => "Failed",
        };
        f.write_str(s)
    }
}

/// Implemented by every domain error enum.
pub trait Classify: std::error::Error {
    fn kind(&self) -> Kind;
}

/// Map an errno from a system call to a [`Kind`] when the call itself does not say more.
pub fn kind_of_errno(e: nix::errno::Errno) -> Kind {
    use nix::errno::Errno;
    match e {
        Errno::EBUSY => Kind::Busy,
        Errno::ENOENT | Errno::ENXIO | Errno::ENODEV => Kind::NotFound,
        Errno::EEXIST => Kind::Conflict,
        Errno::EINVAL | Errno::ENOTBLK | Errno::EISDIR => Kind::InvalidArgs,
        Errno::EPERM | Errno::EACCES => Kind::NotAuthorized,
        Errno::ENOSYS | Errno::EOPNOTSUPP | Errno::ENOTTY => Kind::NotSupported,
        _ => Kind::Failed,
    }
}
