//! Daemon configuration: limits that protect the machine. Loaded from a JSON file
//! (`--config FILE`); every field is optional and falls back to the default below.

use serde::{Deserialize, Serialize};
use std::path::Path;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Largest image one CreateImage may make, in bytes.
    pub max_image_size: u64,
    /// How many images one uid may own.
    pub max_images_per_uid: u32,
    /// How many bytes (apparent size) of images one uid may own.
    pub max_image_bytes_per_uid: u64,
    /// How many loop devices one uid may have attached through the daemon.
    pub max_loops_per_uid: usize,
    /// dockerd's cgroup driver (`"cgroupfs"` or `"systemd"`, `docker info -f
    /// {{.CgroupDriver}}`): decides the `--cgroup-parent` value CreateInstance returns.
    /// Unset: `systemd` with the systemd slice backend, `cgroupfs` otherwise. A
    /// CreateInstance option `docker_cgroup_driver` overrides it per instance.
    pub docker_cgroup_driver: Option<crate::instances::DockerCgroupDriver>,
    /// Longest capture in seconds; a StartCapture duration above it is cut to it.
    pub max_capture_duration: u64,
    /// How many captures one uid may run at the same time.
    pub max_captures_per_uid: usize,
    /// How many bytes of capture files one uid may keep under `<state>/captures/<uid>/`
    /// (running captures count with their current size; a new one gets what is left).
    pub max_capture_bytes_per_uid: u64,
    /// Host ports below this need `org.dindhelper1.ports-privileged` besides `ports`
    /// (an sshd restarting must not find its port taken). 0 turns the check off.
    pub privileged_port_floor: u16,
    /// How many port mappings one uid may have.
    pub max_mappings_per_uid: usize,
    /// How many entries one PublishMany may carry.
    pub max_publish_many: usize,
    /// How many instances one uid may own.
    pub max_instances_per_uid: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_image_size: 64 * GIB,
            max_images_per_uid: 32,
            max_image_bytes_per_uid: 256 * GIB,
            max_loops_per_uid: 16,
            docker_cgroup_driver: None,
            max_capture_duration: 3600,
            max_captures_per_uid: 4,
            max_capture_bytes_per_uid: 4 * GIB,
            privileged_port_floor: 1024,
            // Sized for the provisioning account, which makes every student's instances
            // and mappings under its own uid (tests: 200 concurrent publishes; benches:
            // PublishMany of 1000). A per-uid override for tenants is future work.
            max_mappings_per_uid: 4096,
            max_publish_many: 1024,
            max_instances_per_uid: 256,
        }
    }
}

/// Per-uid limits apply to every uid except 0, and uid 0 is exempt only when the *caller*
/// is root: a `-others` holder creating resources for `owner_uid` 0 is counted against
/// uid 0's quota like anyone else's. Returns whether `owner`'s usage is unlimited.
pub fn quota_exempt(caller_uid: u32, owner_uid: u32) -> bool {
    caller_uid == 0 && owner_uid == 0
}

/// Smallest image size accepted by CreateImage.
pub const MIN_IMAGE_SIZE: u64 = MIB;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error("config file {path}: {why}")]
    Invalid { path: String, why: String },
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: p.clone(),
            source,
        })?;
        let cfg: Config = serde_json::from_str(&text).map_err(|source| ConfigError::Parse {
            path: p.clone(),
            source,
        })?;
        cfg.validate()
            .map_err(|why| ConfigError::Invalid { path: p, why })?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.max_image_size < MIN_IMAGE_SIZE {
            return Err(format!(
                "max_image_size must be at least {MIN_IMAGE_SIZE} bytes"
            ));
        }
        if self.max_image_bytes_per_uid < self.max_image_size {
            return Err("max_image_bytes_per_uid must be at least max_image_size".into());
        }
        if self.max_capture_duration == 0 {
            return Err("max_capture_duration must be at least 1 (seconds)".into());
        }
        if self.max_capture_bytes_per_uid < MIB {
            return Err(format!(
                "max_capture_bytes_per_uid must be at least {MIB} bytes"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_config_keeps_defaults() {
        let c: Config = serde_json::from_str(r#"{"max_image_size": 1073741824}"#).unwrap();
        assert_eq!(c.max_image_size, GIB);
        assert_eq!(c.max_images_per_uid, Config::default().max_images_per_uid);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn unknown_fields_and_bad_values_are_rejected() {
        assert!(serde_json::from_str::<Config>(r#"{"max_image_sise": 1}"#).is_err());
        let c = Config {
            max_image_size: 1000,
            ..Config::default()
        };
        assert!(c.validate().is_err());
    }

    #[test]
    fn capture_limits_have_defaults_and_are_validated() {
        let c: Config = serde_json::from_str(r#"{"max_captures_per_uid": 2}"#).unwrap();
        assert_eq!(c.max_captures_per_uid, 2);
        assert_eq!(c.max_capture_duration, 3600);
        assert_eq!(c.max_capture_bytes_per_uid, 4 * GIB);
        assert!(c.validate().is_ok());
        let d = Config::default();
        assert_eq!(
            (
                d.privileged_port_floor,
                d.max_mappings_per_uid,
                d.max_publish_many,
                d.max_instances_per_uid
            ),
            (1024, 4096, 1024, 256)
        );
        assert!(quota_exempt(0, 0));
        assert!(
            !quota_exempt(1000, 0),
            "uid 0's exemption is for root callers only"
        );
        assert!(!quota_exempt(0, 1000));
        for bad in [
            Config {
                max_capture_duration: 0,
                ..Config::default()
            },
            Config {
                max_capture_bytes_per_uid: 1000,
                ..Config::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
