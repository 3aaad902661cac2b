//! Reading and writing the cgroup filesystems: `/proc/self/mountinfo` (where each
//! hierarchy is mounted), `/proc/<pid>/cgroup` (where a process sits), `cgroup.procs`
//! (who is in a cgroup), the limit files, mkdir/rmdir of cgroup directories and
//! `/proc/<pid>/oom_score_adj`.
//!
//! Traps:
//! - `/proc/<pid>/cgroup` paths are relative to the *reader's* cgroup namespace and to the
//!   hierarchy's root; a mount whose root (mountinfo field 4) is not `/` shows only a
//!   subtree. We refuse such mounts (NotSupported) instead of guessing.
//! - cgroup v1 hierarchies may be co-mounted (`cpu,cpuacct`): deduplicate by mount point.
//! - `rmdir` of a cgroup fails with EBUSY while it (or a child) has tasks; child cgroups
//!   must be removed first (depth first).
//! - Writes are single `write(2)` calls of the whole value; the kernel parses the buffer
//!   and returns EINVAL for a bad value (e.g. memory.limit_in_bytes above memsw.limit).
//! - cgroup.procs lists the thread-group ids of the cgroup itself only, not of children.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::InstanceError;

/// Where the cgroup hierarchies are mounted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupMounts {
    /// cgroup v1 controller (or `name=systemd`) -> mount point.
    pub v1: BTreeMap<String, PathBuf>,
    /// The cgroup2 mount, if any.
    pub unified: Option<PathBuf>,
}

impl CgroupMounts {
    /// Read `/proc/self/mountinfo`.
    pub fn detect() -> Result<Self, InstanceError> {
        let path = Path::new("/proc/self/mountinfo");
        let text = fs::read_to_string(path).map_err(|e| InstanceError::io("read", path, e))?;
        Self::parse(&text)
    }

    /// Parse mountinfo text (pure).
    pub fn parse(mountinfo: &str) -> Result<Self, InstanceError> {
        let mut out = CgroupMounts::default();
        for line in mountinfo.lines() {
            // id parent maj:min root mountpoint opts [optional...] - fstype source superopts
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            if l.len() < 5 || r.len() < 3 {
                continue;
            }
            let (root, mnt, fstype) = (l[3], unescape(l[4]), r[0]);
            if fstype != "cgroup" && fstype != "cgroup2" {
                continue;
            }
            if root != "/" {
                return Err(InstanceError::NotSupported {
                    what: "cgroup layout".into(),
                    why: format!(
                        "{mnt} mounts the subtree {root} of its hierarchy (nested cgroup namespace?)"
                    ),
                });
            }
            if fstype == "cgroup2" {
                out.unified.get_or_insert_with(|| PathBuf::from(&mnt));
                continue;
            }
            for opt in r[2].split(',') {
                let is_ctrl = matches!(
                    opt,
                    "cpu"
                        | "cpuacct"
                        | "cpuset"
                        | "memory"
                        | "devices"
                        | "freezer"
                        | "blkio"
                        | "pids"
                        | "hugetlb"
                        | "net_cls"
                        | "net_prio"
                        | "perf_event"
                        | "rdma"
                        | "misc"
                ) || opt.starts_with("name=");
                if is_ctrl {
                    out.v1
                        .entry(opt.to_owned())
                        .or_insert_with(|| PathBuf::from(&mnt));
                }
            }
        }
        Ok(out)
    }

    /// Are the resource controllers on cgroup v1 (legacy or hybrid layout)?
    pub fn is_v1(&self) -> bool {
        self.v1.contains_key("memory") || self.v1.contains_key("cpu")
    }

    /// Every distinct v1 mount point (co-mounted controllers once).
    pub fn v1_mount_points(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self.v1.values().cloned().collect();
        v.sort();
        v.dedup();
        v
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One line of `/proc/<pid>/cgroup`: `hierarchy-id:controllers:path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcCgroup {
    pub id: u32,
    /// Controllers of a v1 hierarchy (`["cpu","cpuacct"]`, `["name=systemd"]`); empty for v2.
    pub controllers: Vec<String>,
    pub path: String,
}

/// Parse `/proc/<pid>/cgroup` text (pure).
pub fn parse_proc_cgroup(text: &str) -> Vec<ProcCgroup> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let id = it.next()?.parse().ok()?;
            let ctrl = it.next()?;
            let path = it.next()?.to_owned();
            let controllers = if ctrl.is_empty() {
                Vec::new()
            } else {
                ctrl.split(',').map(str::to_owned).collect()
            };
            Some(ProcCgroup {
                id,
                controllers,
                path,
            })
        })
        .collect()
}

/// Read and parse `/proc/<pid>/cgroup`.
pub fn read_proc_cgroup(pid: u32) -> Result<Vec<ProcCgroup>, InstanceError> {
    let path = PathBuf::from(format!("/proc/{pid}/cgroup"));
    match fs::read_to_string(&path) {
        Ok(t) => Ok(parse_proc_cgroup(&t)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(InstanceError::NoProcess { pid }),
        Err(e) => Err(InstanceError::io("read", &path, e)),
    }
}

/// Is `path` the cgroup `parent` or below it (component-wise)?
pub fn path_is_inside(path: &str, parent: &str) -> bool {
    let parent = parent.trim_end_matches('/');
    path == parent
        || path
            .strip_prefix(parent)
            .is_some_and(|r| r.starts_with('/'))
}

/// Of the process's cgroup lines, those that decide whether it is inside an instance:
/// on a v1 layout the hierarchies carrying cpu, memory or pids; on v2 the `0::` line.
/// Returns the lines that are *not* inside `instance_path` (empty = inside), or an error
/// text when no relevant line exists.
pub fn lines_outside<'a>(
    lines: &'a [ProcCgroup],
    v1: bool,
    instance_path: &str,
) -> Result<Vec<&'a ProcCgroup>, String> {
    let relevant: Vec<&ProcCgroup> = lines
        .iter()
        .filter(|l| {
            if v1 {
                l.controllers
                    .iter()
                    .any(|c| matches!(c.as_str(), "cpu" | "memory" | "pids"))
            } else {
                l.id == 0 && l.controllers.is_empty()
            }
        })
        .collect();
    if relevant.is_empty() {
        return Err("no cpu/memory/pids cgroup line in /proc/<pid>/cgroup".into());
    }
    Ok(relevant
        .into_iter()
        .filter(|l| !path_is_inside(&l.path, instance_path))
        .collect())
}

/// Pids in `dir` and every cgroup below it.
pub fn procs_in_tree(dir: &Path) -> Result<Vec<u32>, InstanceError> {
    let mut out = Vec::new();
    let procs = dir.join("cgroup.procs");
    match fs::read_to_string(&procs) {
        Ok(t) => out.extend(t.lines().filter_map(|l| l.trim().parse::<u32>().ok())),
        // A cgroup being removed (a container's scope while Docker stops it) answers
        // ENODEV, not ENOENT: it is gone just the same (seen on a Debian 13 guest).
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENODEV) => {
            return Ok(out)
        }
        Err(e) => return Err(InstanceError::io("read", &procs, e)),
    }
    for child in child_dirs(dir)? {
        out.extend(procs_in_tree(&child)?);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn child_dirs(dir: &Path) -> Result<Vec<PathBuf>, InstanceError> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(InstanceError::io("list", dir, e)),
    };
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| InstanceError::io("list", dir, e))?;
        if ent.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            out.push(ent.path());
        }
    }
    Ok(out)
}

/// Remove a cgroup directory and every cgroup below it (depth first). Absent = Ok(false).
pub fn rmdir_tree(dir: &Path) -> Result<bool, InstanceError> {
    if !dir.exists() {
        return Ok(false);
    }
    for child in child_dirs(dir)? {
        rmdir_tree(&child)?;
    }
    match fs::remove_dir(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(InstanceError::io("rmdir", dir, e)),
    }
}

/// mkdir one cgroup (parents too). Returns whether the leaf was created.
pub fn mkdir_cgroup(dir: &Path) -> Result<bool, InstanceError> {
    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent).map_err(|e| InstanceError::io("mkdir", parent, e))?;
    }
    match fs::create_dir(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(InstanceError::io("mkdir", dir, e)),
    }
}

/// Write a value to a cgroup (or proc) file with one write(2).
pub fn write_file(path: &Path, value: &str) -> Result<(), InstanceError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| InstanceError::io("open", path, e))?;
    f.write_all(value.as_bytes())
        .map_err(|e| InstanceError::io(&format!("write {value:?} to"), path, e))
}

/// Read a small file, trimmed.
pub fn read_file(path: &Path) -> Result<String, InstanceError> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|e| InstanceError::io("read", path, e))
}

/// Write `/proc/<pid>/oom_score_adj`. A vanished process is `NoProcess`.
pub fn set_oom_score_adj(pid: u32, value: i32) -> Result<(), InstanceError> {
    let path = PathBuf::from(format!("/proc/{pid}/oom_score_adj"));
    match write_file(&path, &value.to_string()) {
        Err(InstanceError::Io { source, .. })
            if source.kind() == io::ErrorKind::NotFound
                || source.raw_os_error() == Some(libc::ESRCH) =>
        {
            Err(InstanceError::NoProcess { pid })
        }
        r => r,
    }
}

/// SIGKILL every process of the cgroup `dir` and below, never a pid that was reused by
/// a process elsewhere:
/// - cgroup v2 with `cgroup.kill` (Linux 5.14): one write, the kernel kills the subtree;
/// - otherwise each pid is pinned with `pidfd_open`, then looked up in the tree's
///   `cgroup.procs` again, and signalled through the pidfd (`pidfd_send_signal`). Once the
///   pidfd exists it names one process; if that process is still listed it is in the
///   cgroup, and if its pid was reused meanwhile the pidfd names the dead one (ESRCH).
///   (This closes the race the freezer would; a v1 freezer is not always mounted.)
fn kill_tree(dir: &Path, pids: &[u32]) {
    let kill = dir.join("cgroup.kill");
    if kill.exists() && fs::write(&kill, b"1").is_ok() {
        return;
    }
    let pinned: Vec<(u32, std::os::fd::OwnedFd)> = pids
        .iter()
        .filter_map(|&p| crate::pidfd::open(p).ok().map(|fd| (p, fd)))
        .collect();
    let Ok(now) = procs_in_tree(dir) else { return };
    for (pid, fd) in pinned {
        if now.binary_search(&pid).is_ok() {
            use std::os::fd::AsRawFd;
            // SAFETY: pidfd_send_signal on a pidfd we own, no siginfo.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                );
            }
        }
    }
}

/// How long [`ensure_empty`] waits for killed processes to leave.
pub const KILL_WAIT: Duration = Duration::from_secs(10);

/// Make sure no process is in any of `dirs` (or below). Without `force`: `Busy` naming the
/// first non-empty cgroup and its pids. With `force`: kill the trees (repeatedly: a process
/// may fork meanwhile; see `kill_tree`, never a bare kill(pid) of a pid read earlier)
/// until every cgroup is empty, at most [`KILL_WAIT`].
pub fn ensure_empty(name: &str, dirs: &[PathBuf], force: bool) -> Result<(), InstanceError> {
    let dirs: Vec<&PathBuf> = dirs.iter().filter(|d| d.exists()).collect();
    let busy = || -> Result<Option<(PathBuf, Vec<u32>)>, InstanceError> {
        for d in &dirs {
            let pids = procs_in_tree(d)?;
            if !pids.is_empty() {
                return Ok(Some(((*d).clone(), pids)));
            }
        }
        Ok(None)
    };
    let Some((dir, pids)) = busy()? else {
        return Ok(());
    };
    if !force {
        return Err(InstanceError::Busy {
            name: name.to_owned(),
            cgroup: dir.display().to_string(),
            pids,
        });
    }
    let deadline = Instant::now() + KILL_WAIT;
    let mut last = pids;
    loop {
        for d in &dirs {
            kill_tree(d, &last);
        }
        std::thread::sleep(Duration::from_millis(50));
        match busy()? {
            None => return Ok(()),
            Some((_, pids)) if Instant::now() < deadline => last = pids,
            Some(_) => {
                return Err(InstanceError::Timeout {
                    what: format!("the processes of instance {name:?} to exit after SIGKILL"),
                    secs: KILL_WAIT.as_secs(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn parses_hybrid_mountinfo() {
        let m = CgroupMounts::parse(HYBRID).unwrap();
        assert!(m.is_v1());
        assert_eq!(m.v1["cpu"], PathBuf::from("/sys/fs/cgroup/cpu"));
        assert_eq!(
            m.v1["name=systemd"],
            PathBuf::from("/sys/fs/cgroup/systemd")
        );
        assert_eq!(m.unified, Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(m.v1_mount_points().len(), 6);
    }

    #[test]
    fn parses_comounted_and_unified_layouts() {
        let m = CgroupMounts::parse(
            "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw shared:9 - cgroup cgroup rw,cpu,cpuacct\n",
        )
        .unwrap();
        assert_eq!(m.v1["cpu"], m.v1["cpuacct"]);
        assert_eq!(m.v1_mount_points().len(), 1);
        let m = CgroupMounts::parse(
            "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n",
        )
        .unwrap();
        assert!(!m.is_v1());
        assert_eq!(m.unified, Some(PathBuf::from("/sys/fs/cgroup")));
    }

    #[test]
    fn refuses_subtree_mounts() {
        let e = CgroupMounts::parse("1 2 0:1 /foo /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")
            .unwrap_err();
        assert_eq!(
            crate::error::Classify::kind(&e),
            crate::error::Kind::NotSupported
        );
    }

    #[test]
    fn unescapes_mount_points() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/a\\"), r"/a\\");
    }

    const PROC: &str = "\
9:name=systemd:/dind/a/abc
8:pids:/dind/a/abc
4:memory:/dind/a/abc
2:cpuacct:/dind/a/abc
1:cpu,cpuacct:/dind/a/abc
0::/
";

    #[test]
    fn proc_cgroup_inside_and_outside() {
        let lines = parse_proc_cgroup(PROC);
        assert_eq!(lines.len(), 6);
        assert_eq!(lines[4].controllers, vec!["cpu", "cpuacct"]);
        assert!(lines_outside(&lines, true, "/dind/a").unwrap().is_empty());
        assert_eq!(lines_outside(&lines, true, "/dind/ab").unwrap().len(), 3);
        assert_eq!(lines_outside(&lines, true, "/dind/b").unwrap().len(), 3);
        // On v2 only the 0:: line counts.
        assert_eq!(lines_outside(&lines, false, "/dind/a").unwrap().len(), 1);
        let v2 = parse_proc_cgroup("0::/dind.slice/dind-a.slice/docker-1.scope\n");
        assert!(lines_outside(&v2, false, "/dind.slice/dind-a.slice")
            .unwrap()
            .is_empty());
        assert!(lines_outside(&v2, true, "/x").is_err());
    }

    #[test]
    fn path_inside_is_component_wise() {
        assert!(path_is_inside("/dind/a", "/dind/a"));
        assert!(path_is_inside("/dind/a/x", "/dind/a/"));
        assert!(!path_is_inside("/dind/ab", "/dind/a"));
        assert!(!path_is_inside("/", "/dind/a"));
    }
}
