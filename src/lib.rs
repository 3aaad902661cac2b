//! dindhelper: host work for Docker-in-Docker lab instances, done by a root daemon
//! (`dindhelperd`) on the system bus and authorized by polkit.
//!
//! Layering (see README.md, "Architecture"):
//! - `bus/`: the D-Bus interfaces; thin: authorize, convert, call one domain function,
//!   persist, map the error.
//! - domain modules (`loopdev`, `partitions`, `ports`, `capture`, `instances`): no zbus;
//!   privileged syscalls live in small files with a `//!` header naming the kernel interface.
//! - `state`: versioned JSON of what should exist, written atomically under a lock.

pub mod config;
pub mod daemon;
pub mod docker;
pub mod error;
pub mod names;
pub mod netns;
pub mod pidfd;
pub mod random;
pub mod state;

pub mod capture;
pub mod expose;
pub mod instances;
pub mod loopdev;
pub mod partitions;
pub mod ports;

pub mod bus;
pub mod ops;
