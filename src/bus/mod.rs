//! The D-Bus layer: interfaces, options, polkit, error mapping. Thin by design: each
//! method authorizes, converts, calls one `ops` function and maps the result.

pub mod auth;
pub mod error;
pub mod manager;
pub mod objects;
pub mod options;
pub mod ports;

pub const BUS_NAME: &str = "org.dindhelper1";
pub const MANAGER_PATH: &str = "/org/dindhelper1";
