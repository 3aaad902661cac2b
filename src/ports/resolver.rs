//! Where the ports domain learns about containers: [`Resolver`] (inspect a container, list
//! what Docker publishes itself). [`Docker`] is the real one; tests of firewall layouts use
//! a table instead of a dockerd (`tests/docker_layouts.rs`), so Docker's exact rules from
//! any version can be loaded into a namespace without that version's daemon.

use std::future::Future;
use std::pin::Pin;

use crate::docker::{ContainerInfo, Docker, DockerError, PublishedPort};

/// A boxed future of a Docker answer.
pub type DockerFut<'a, T> = Pin<Box<dyn Future<Output = Result<T, DockerError>> + Send + 'a>>;

/// Container facts the ports domain needs.
pub trait Resolver: Send + Sync {
    /// The container by name, id or id prefix (`DockerError::NotFound` when there is none).
    fn inspect<'a>(&'a self, container: &'a str) -> DockerFut<'a, ContainerInfo>;
    /// Every port Docker itself publishes (`-p`), for conflict checks.
    fn published_ports(&self) -> DockerFut<'_, Vec<PublishedPort>>;
}

impl Resolver for Docker {
    fn inspect<'a>(&'a self, container: &'a str) -> DockerFut<'a, ContainerInfo> {
        Box::pin(Docker::inspect(self, container))
    }

    fn published_ports(&self) -> DockerFut<'_, Vec<PublishedPort>> {
        Box::pin(Docker::published_ports(self))
    }
}
