//! cgroup v1 devices controller: exact grants and their withdrawal.
//!
//! Kernel interface: `/sys/fs/cgroup/devices/<path>/devices.{allow,deny,list}`
//! (`security/device_cgroup.c`), the container's path from `/proc/<pid>/cgroup`.
//!
//! Traps:
//! - One rule per write(2): the kernel parses exactly one rule per write.
//! - A container's cgroup is deny-by-default with exceptions (Docker's list, then ours);
//!   `devices.deny` of the exact rule removes our exception again. A *privileged*
//!   container's cgroup is allow-by-default (`a *:* rwm` in devices.list): there a deny
//!   would add a new restriction the runtime never asked for, and an allow is redundant,
//!   so neither is written (the container reaches every device anyway).
//! - Partitions of a loop device use major 259 with globally allocated minors: only exact
//!   `b 259:M rwm` rules, never `259:*` (that would open every NVMe partition of the host to
//!   a container holding CAP_MKNOD, which Docker grants by default).
//! - A removed cgroup (container stopped) answers ENOENT/ENODEV: nothing left to withdraw.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::ExposeError;

/// Mount point of the v1 devices hierarchy.
pub const ROOT: &str = "/sys/fs/cgroup/devices";

/// The container's devices cgroup directory, from its `/proc/<pid>/cgroup` line.
pub fn dir_of(rel: &str) -> PathBuf {
    Path::new(ROOT).join(rel.trim_start_matches('/'))
}

/// Does `devices.list` say "everything allowed" (privileged container)?
pub fn allows_all(dir: &Path) -> Result<bool, ExposeError> {
    let p = dir.join("devices.list");
    let s =
        std::fs::read_to_string(&p).map_err(|source| ExposeError::Cgroup { path: p, source })?;
    Ok(s.lines().any(|l| l.trim() == "a *:* rwm"))
}

/// Write each rule with its own write(2) to `devices.allow` or `devices.deny`.
pub fn write_rules(dir: &Path, allow: bool, rules: &[String]) -> Result<(), ExposeError> {
    if rules.is_empty() {
        return Ok(());
    }
    let path = dir.join(if allow {
        "devices.allow"
    } else {
        "devices.deny"
    });
    let err = |source| ExposeError::Cgroup {
        path: path.clone(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(err)?;
    for r in rules {
        f.write_all(r.as_bytes()).map_err(err)?;
    }
    Ok(())
}

/// Withdraw exact rules and check `devices.list` no longer holds any of them (a write
/// that "succeeded" without effect is an error too); a cgroup that no longer exists has
/// nothing to withdraw (Ok(false)).
pub fn deny(dir: &Path, rules: &[String]) -> Result<bool, ExposeError> {
    let gone = |e: &ExposeError| {
        matches!(e, ExposeError::Cgroup { source, .. }
            if matches!(source.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENODEV)))
    };
    match write_rules(dir, false, rules) {
        Ok(()) => {}
        Err(e) if gone(&e) => return Ok(false),
        Err(e) => return Err(e),
    }
    let p = dir.join("devices.list");
    let list = match std::fs::read_to_string(&p) {
        Ok(s) => s,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENODEV)) => {
            return Ok(false)
        }
        Err(source) => return Err(ExposeError::Cgroup { path: p, source }),
    };
    if let Some(r) = rules
        .iter()
        .find(|r| list.lines().any(|l| l.trim() == r.as_str()))
    {
        return Err(ExposeError::Cgroup {
            path: p,
            source: std::io::Error::other(format!("{r} is still granted after devices.deny")),
        });
    }
    Ok(true)
}
