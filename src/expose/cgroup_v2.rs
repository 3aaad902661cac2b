//! cgroup v2: exact device grants by replacing the container's device program.
//!
//! Kernel interfaces: `/proc/<pid>/cgroup` (`0::/path`), the unified mount
//! (`/sys/fs/cgroup` on a pure v2 host, `/sys/fs/cgroup/unified` on a hybrid one, told apart
//! by statfs magic), `/proc/<pid>/stat` (parent = the runtime shim), `/proc/<shim>/cwd`
//! (the OCI bundle: containerd's shim runs with the bundle as working directory), and
//! bpf(2) (see [`super::bpf`]).
//!
//! The program is rebuilt from the device rules the runtime applied — the bundle's
//! `config.json` `linux.resources.devices`, followed by runc's own defaults, exactly as runc
//! builds it — plus one exact `b MAJ:MIN rwm` allow per exposed node. Where the bundle
//! cannot be found, the caller passes a reconstruction (Docker's default list plus the
//! container's `--device-cgroup-rule`s, see `ops::devices`), and the exposure records
//! that it was reconstructed. The base rules are stored with the exposure, so revocation
//! rebuilds the same program without the grant even when dockerd is not reachable.
//!
//! Traps:
//! - Replace, never add: programs are ANDed (see [`super::bpf`]).
//! - A privileged container's rules allow everything: no program change is needed.
//! - The shim's cwd is read as root through /proc; the file is parsed as JSON only, never
//!   executed or followed further.
//! - On systemd hosts the scope unit may carry its own device policy program
//!   (DevicePolicy=); it is one of the programs detached on replacement, as runc does on
//!   update. Keeping the unit's DeviceAllow= in step is NOT done yet (no systemd here).

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use super::program::{self, DevRule};
use super::{bpf, ExposeError};

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Where the unified hierarchy is mounted.
pub fn unified_root() -> Option<PathBuf> {
    for p in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        if let Ok(s) = nix::sys::statfs::statfs(p) {
            if s.filesystem_type().0 == CGROUP2_SUPER_MAGIC {
                return Some(PathBuf::from(p));
            }
        }
    }
    None
}

/// The v2 path from `/proc/<pid>/cgroup` (`0::/path`).
pub fn parse_unified(proc_cgroup: &str) -> Option<String> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
}

/// The rules the runtime applied, from the OCI bundle of the container whose init is
/// `pid`: the shim (its parent) runs in the bundle directory. None when not found.
pub fn bundle_rules(pid: i32) -> Option<(PathBuf, Vec<DevRule>)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    let ppid: i32 = after.split_whitespace().nth(1)?.parse().ok()?;
    let cwd = std::fs::read_link(format!("/proc/{ppid}/cwd")).ok()?;
    let file = PathBuf::from(format!("/proc/{ppid}/cwd/config.json"));
    let text = std::fs::read_to_string(&file).ok()?;
    let spec: serde_json::Value = serde_json::from_str(&text).ok()?;
    let mut rules = program::from_oci_spec(&spec)?;
    rules.extend(program::runc_defaults());
    Some((cwd.join("config.json"), rules))
}

fn open_dir(path: &Path) -> Result<OwnedFd, ExposeError> {
    let fd = nix::fcntl::open(
        path,
        nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| ExposeError::Cgroup {
        path: path.to_owned(),
        source: e.into(),
    })?;
    Ok(fd)
}

/// Does this rule set already allow read+write of every device in `devs`?
pub fn already_allowed(base: &[DevRule], devs: &[(u32, u32)]) -> bool {
    let e = program::effective(base);
    devs.iter().all(|&(ma, mi)| {
        program::allows(
            &e,
            program::DevType::Block,
            ma,
            mi,
            program::ACC_READ | program::ACC_WRITE | program::ACC_MKNOD,
        )
    })
}

/// Make `base + grants` the only device program on the cgroup `dir`: load, attach with
/// BPF_F_ALLOW_MULTI, then detach every program that was attached before. Returns the
/// number of programs replaced. A cgroup that no longer exists: Ok(None).
pub fn apply(
    dir: &Path,
    base: &[DevRule],
    grants: &[DevRule],
) -> Result<Option<usize>, ExposeError> {
    let cg = match open_dir(dir) {
        Ok(fd) => fd,
        Err(ExposeError::Cgroup { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    let mut rules = base.to_vec();
    rules.extend_from_slice(grants);
    let insns = program::emit(&rules);
    let berr = |op: &'static str| {
        let path = dir.to_owned();
        move |e: nix::errno::Errno| ExposeError::Bpf {
            op,
            path,
            source: e,
        }
    };
    let old = bpf::query(&cg).map_err(berr("BPF_PROG_QUERY"))?;
    let prog = bpf::load(&insns).map_err(|(e, log)| ExposeError::BpfLoad { source: e, log })?;
    bpf::attach(&cg, &prog, bpf::BPF_F_ALLOW_MULTI).map_err(berr("BPF_PROG_ATTACH"))?;
    let mut replaced = 0;
    for id in old {
        let fd = bpf::prog_fd_by_id(id).map_err(berr("BPF_PROG_GET_FD_BY_ID"))?;
        match bpf::detach(&cg, &fd) {
            Ok(()) => replaced += 1,
            Err(nix::errno::Errno::ENOENT) => {} // gone meanwhile
            Err(e) => return Err(berr("BPF_PROG_DETACH")(e)),
        }
    }
    Ok(Some(replaced))
}
