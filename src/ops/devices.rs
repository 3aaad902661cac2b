//! ExposeToContainer: make a managed loop device and its partitions appear in a
//! container's /dev (see `crate::expose`). The partitions are those of the device's last
//! Rescan; without a recorded Rescan, the kernel's view (/sys/class/block).

use crate::error::{Classify, Kind};
use crate::expose::{self, DeviceNode, ExposeError, ExposeReport};
use crate::netns::NetnsError;
use crate::ops::containers::ContainerError;
use crate::ops::{loops, Core, OpsError};

#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    #[error(transparent)]
    Ops(#[from] OpsError),
    #[error(transparent)]
    Expose(#[from] ExposeError),
    #[error(transparent)]
    Container(#[from] ContainerError),
    #[error(transparent)]
    Target(#[from] NetnsError),
    #[error("internal task failed: {0}")]
    Task(String),
}

impl Classify for DevicesError {
    fn kind(&self) -> Kind {
        match self {
            DevicesError::Ops(e) => e.kind(),
            DevicesError::Expose(e) => e.kind(),
            DevicesError::Container(e) => e.kind(),
            DevicesError::Target(e) => e.kind(),
            DevicesError::Task(_) => Kind::Failed,
        }
    }
}

/// The wanted partition nodes: the last Rescan's, else the kernel's.
pub fn wanted_partitions(
    disk: &str,
    rescanned: &[crate::partitions::Partition],
    host: Vec<DeviceNode>,
) -> Vec<DeviceNode> {
    if rescanned.is_empty() {
        return host;
    }
    let mut v: Vec<DeviceNode> = rescanned
        .iter()
        .map(|p| DeviceNode {
            name: p
                .node
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| format!("{disk}p{}", p.number)),
            major: p.major,
            minor: p.minor,
        })
        .collect();
    v.sort();
    v
}

/// Expose managed loop device `number` in `container`. The caller has authorized the
/// device (owner or `-others`).
pub async fn expose_to_container(
    core: &Core,
    number: u32,
    container: &str,
) -> Result<ExposeReport, DevicesError> {
    let rec = loops::managed(core, number).await?;
    let c = core.containers.resolve(container).await?;
    let (target, rules) = (c.target, c.device_cgroup_rules);
    let disk_name = format!("loop{number}");
    let rescanned = rec.partitions.clone();
    tokio::task::spawn_blocking(move || -> Result<ExposeReport, DevicesError> {
        let (disk, host_parts) = expose::host_nodes(&disk_name)?;
        let parts = wanted_partitions(&disk_name, &rescanned, host_parts);
        let mut majors: Vec<u32> = std::iter::once(disk.major)
            .chain(parts.iter().map(|p| p.major))
            .collect();
        majors.sort();
        majors.dedup();
        let v2_ok = expose::docker_rules_allow(&rules, &majors);
        Ok(expose::expose(target, &disk, &parts, v2_ok)?)
    })
    .await
    .map_err(|e| DevicesError::Task(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partitions::Partition;

    #[test]
    fn rescan_wins_over_the_kernel_view() {
        let host = vec![DeviceNode {
            name: "loop3p9".into(),
            major: 259,
            minor: 9,
        }];
        assert_eq!(wanted_partitions("loop3", &[], host.clone()), host);
        let p = Partition {
            number: 2,
            start: 1 << 20,
            size: 1 << 20,
            part_type: String::new(),
            name: String::new(),
            uuid: String::new(),
            node: "/dev/loop3p2".into(),
            major: 259,
            minor: 4,
        };
        let v = wanted_partitions("loop3", &[p], host);
        assert_eq!(
            v,
            vec![DeviceNode {
                name: "loop3p2".into(),
                major: 259,
                minor: 4
            }]
        );
    }
}
