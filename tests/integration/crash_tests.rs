//! Crash consistency: a `kill -9` campaign against the real daemon.
//!
//! Several callers (root, `dhtest-member`, `dhtest-own`, each on its own objects) run random
//! operations at the same time — create + attach an image (optionally into an instance),
//! detach (also of an exposed device), delete an image, create / destroy an instance, start
//! a capture, and (root and the member) expose / revoke a device in a running container and
//! publish / unpublish a port of it — while the daemon is SIGKILLed at a random moment. The
//! daemon runs in the netns of a dockerd of its own ([`DaemonInDockerd`], container `kweb`).
//! After each kill the daemon is started again and the invariants are checked:
//! - every loop device backed by a file of this state dir is listed (ListLoops), and every
//!   listed one is bound in the kernel;
//! - every `dind` cgroup of this run's names (any hierarchy) has an instance, and every
//!   instance has its cgroup;
//! - every image file under `images/` is listed, owned by its uid, with its full size; no
//!   temp file or intent stays behind after the start-up reconcile;
//! - no capture session claims a file that does not exist;
//! - every loop/partition node in the container's /dev and every exact loop grant in its v1
//!   devices cgroup (`devices.list`) belongs to an exposure, and every exposure's nodes and
//!   grants exist; no exposure intent (`pending`) survives the start;
//! - every rule tagged with this state id in dockerd's netns (iptables-save, both
//!   backends) has a mapping, and every active mapping has its rules;
//! - `state.json` and `loops.json` parse;
//! - no answered call is lost: what an answered create made exists, what an answered
//!   delete/destroy/detach removed stays gone;
//! - objects of others (a cgroup tagged by another state dir, an untagged one, a loop
//!   device attached by losetup) are never touched.
//!
//! Seeded: the seed is printed (`DHT_SEED=<n>` replays a run); `DHT_KILLS` sets the number
//! of kills (default 200, the CI run; use `DHT_KILLS=2000` for a release check). The run
//! prints kills, calls interrupted per kind and distinct leaks (goal: 0). It fails on any
//! leak.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::bed::{loops_backed_under, run, Bed, LoopGuard, Out, MEMBER, OWN};
use crate::docker::DaemonInDockerd;
use crate::Test;

pub fn tests() -> Vec<Test> {
    vec![
        Test {
            name: "crash_kill9_campaign_leaves_nothing_behind",
            needs_daemon: true,
            run: kill9_campaign,
        },
        Test {
            name: "crash_reconcile_removes_only_our_unrecorded_cgroups",
            needs_daemon: true,
            run: reconcile_removes_only_our_unrecorded_cgroups,
        },
        Test {
            name: "crash_destroy_unrecorded_never_removes_another_state_dirs_cgroup",
            needs_daemon: true,
            run: destroy_unrecorded_never_removes_another_state_dirs_cgroup,
        },
        Test {
            name: "crash_kill_inside_expose_and_revoke_leaves_no_orphan",
            needs_daemon: true,
            run: kill_inside_expose_and_revoke_leaves_no_orphan,
        },
        Test {
            name: "crash_reconcile_removes_half_made_image_files",
            needs_daemon: true,
            run: reconcile_removes_half_made_image_files,
        },
        Test {
            name: "crash_polkitd_killed_mid_call_fails_closed",
            needs_daemon: true,
            run: polkitd_killed_mid_call_fails_closed,
        },
        Test {
            name: "crash_sigterm_campaign_answers_calls_in_flight",
            needs_daemon: true,
            run: sigterm_campaign,
        },
    ]
}

/// How the daemon is stopped in each round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Kill9,
    /// SIGTERM: it must exit 0, and every call it received must be answered.
    Term,
}

fn kill9_campaign(bed: &Bed) {
    campaign(bed, Stop::Kill9, env_u64("DHT_KILLS").unwrap_or(200));
}

fn sigterm_campaign(bed: &Bed) {
    campaign(bed, Stop::Term, env_u64("DHT_TERMS").unwrap_or(40));
}

const CG: &str = "/sys/fs/cgroup";
const MIB: u64 = 1 << 20;
const INSTANCES: &str = "org.dindhelper1.Instances";
const CAPTURES: &str = "org.dindhelper1.Captures";
const DEVICES: &str = "org.dindhelper1.Devices";
const PORTS: &str = "org.dindhelper1.Ports";
const XATTR: &str = "trusted.dindhelper";

/// splitmix64: small, seedable, good enough to pick operations and delays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn pick<'a, T>(&mut self, v: &'a [T]) -> Option<&'a T> {
        if v.is_empty() {
            None
        } else {
            Some(&v[self.below(v.len() as u64) as usize])
        }
    }
}

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The daemon answered with success.
    Ok,
    /// The daemon answered with an error (nothing may have changed).
    Refused,
    /// Sent, but the daemon died before answering.
    Interrupted,
    /// Never reached a daemon (the name had no owner).
    NotDelivered,
}

fn outcome(o: &Out) -> Outcome {
    if o.ok() {
        return Outcome::Ok;
    }
    let e = o.stderr.to_lowercase();
    if e.contains("without replying")
        || e.contains("disconnected")
        || e.contains("noreply")
        || e.contains("connection timed out")
        || e.contains("timed out")
    {
        Outcome::Interrupted
    } else if e.contains("not provided by any")
        || e.contains("not activatable")
        || e.contains("serviceunknown")
        || e.contains("unknown name")
    {
        Outcome::NotDelivered
    } else {
        Outcome::Refused
    }
}

/// One caller's view of its objects (resynced from the daemon after every restart).
#[derive(Debug, Default, Clone)]
struct Model {
    /// image name → attached device ("" when not attached)
    images: BTreeMap<String, String>,
    instances: BTreeSet<String>,
    /// devices of this caller exposed in the campaign's container
    exposed: BTreeSet<String>,
    /// this caller's port mappings: id → host port
    mappings: BTreeMap<String, u16>,
}

/// What a round expects to find after the restart.
#[derive(Debug)]
enum Expect {
    ImageExists(u32, String),
    ImageGone(u32, String),
    /// (uid, image, device)
    Attached(u32, String, String),
    /// image path no longer backing that device
    NotAttached(u32, String, String),
    InstanceExists(String),
    InstanceGone(String),
    /// device exposed in the container
    Exposed(String),
    NotExposed(String),
    /// host port mapped
    Mapped(u16),
    Unmapped(u16),
}

struct Caller {
    user: &'static str,
    uid: u32,
    /// prefix of this caller's instance names
    iprefix: String,
    /// may expose devices in / publish ports of the campaign's container (root and
    /// the member: both hold `-others`; the container belongs to no instance)
    containers: bool,
}

/// The campaign's container (a busybox httpd on dockerd's bridge, the daemon in dockerd's
/// netns): target of ExposeToContainer / RevokeFromContainer / Publish / Unpublish.
struct Ctr<'a> {
    d: &'a crate::dockerd::Dockerd,
    name: &'static str,
    id: String,
    pid: u32,
}

/// One operation as a list of calls (run in order until one fails).
#[derive(Debug, Clone)]
struct Call {
    kind: &'static str,
    iface: &'static str,
    method: &'static str,
    sig: &'static str,
    args: Vec<String>,
}

fn mcall(kind: &'static str, method: &'static str, sig: &'static str, args: &[&str]) -> Call {
    Call {
        kind,
        iface: "org.dindhelper1.Manager",
        method,
        sig,
        args: args.iter().map(|s| s.to_string()).collect(),
    }
}

fn icall(kind: &'static str, method: &'static str, sig: &'static str, args: &[&str]) -> Call {
    Call {
        iface: INSTANCES,
        ..mcall(kind, method, sig, args)
    }
}

fn dcall(kind: &'static str, method: &'static str, sig: &'static str, args: &[&str]) -> Call {
    Call {
        iface: DEVICES,
        ..mcall(kind, method, sig, args)
    }
}

fn pcall(kind: &'static str, method: &'static str, sig: &'static str, args: &[&str]) -> Call {
    Call {
        iface: PORTS,
        ..mcall(kind, method, sig, args)
    }
}

/// busctl as `user` on `address` (runs on a caller thread: no `Bed` there, it is not Sync).
fn do_call(address: &str, user: &str, c: &Call) -> Out {
    let mut cmd = if user == "root" {
        Command::new("busctl")
    } else {
        let mut c = Command::new("runuser");
        c.args(["-u", user, "--", "busctl"]);
        c
    };
    cmd.arg(format!("--address={address}"))
        .args(["--json=short", "--timeout=30", "call"])
        .args([crate::bed::BUS_NAME, crate::bed::MANAGER_PATH])
        .args([c.iface, c.method, c.sig])
        .args(&c.args);
    crate::bed::run_cmd(&mut cmd)
}

#[derive(Default)]
struct Stats {
    kills: u64,
    calls: BTreeMap<&'static str, [u64; 4]>,
    leaks: BTreeMap<String, Vec<String>>,
}

impl Stats {
    fn count(&mut self, kind: &'static str, o: Outcome) {
        let e = self.calls.entry(kind).or_default();
        e[o as usize] += 1;
    }

    fn leak(&mut self, class: &str, detail: String) {
        self.leaks.entry(class.to_owned()).or_default().push(detail);
    }
}

fn read_xattr(path: &Path) -> Option<String> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    let name = std::ffi::CString::new(XATTR).unwrap();
    let mut buf = [0u8; 256];
    // SAFETY: getxattr into a buffer we own, with its length.
    let n = unsafe {
        libc::getxattr(
            c.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    (n >= 0).then(|| String::from_utf8_lossy(&buf[..n as usize]).into_owned())
}

fn set_xattr(path: &Path, value: &str) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let name = std::ffi::CString::new(XATTR).unwrap();
    // SAFETY: setxattr with buffers we own.
    let r = unsafe {
        libc::setxattr(
            c.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "setxattr {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// Every cgroup hierarchy's mount point (v1 controllers, name=systemd, cgroup2).
fn hierarchies() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && (f[2] == "cgroup" || f[2] == "cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

/// `<hierarchy>/dind/<name>` directories whose name starts with `prefix`: name → dirs.
fn dind_cgroups(prefix: &str) -> BTreeMap<String, Vec<PathBuf>> {
    let mut out: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for h in hierarchies() {
        let Ok(rd) = fs::read_dir(h.join("dind")) else {
            continue;
        };
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(prefix) && e.path().is_dir() {
                out.entry(n).or_default().push(e.path());
            }
        }
    }
    out
}

/// Objects of others that the daemon must never touch.
struct Foreign {
    cgroups: Vec<PathBuf>,
    _loop: LoopGuard,
    loop_file: PathBuf,
}

impl Foreign {
    fn make(bed: &Bed, prefix: &str) -> Foreign {
        let mut cgroups = Vec::new();
        for (suffix, tag) in [
            ("othertagged", Some("0123456789abcdef")),
            ("untagged", None),
        ] {
            for h in ["memory", "pids", "unified"] {
                let d = Path::new(CG)
                    .join(h)
                    .join("dind")
                    .join(format!("{prefix}{suffix}"));
                if !d.parent().unwrap().exists() && fs::create_dir_all(d.parent().unwrap()).is_err()
                {
                    continue;
                }
                fs::create_dir(&d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
                if let Some(t) = tag {
                    set_xattr(&d, t);
                }
                cgroups.push(d);
            }
        }
        let loop_file = bed.run_dir.join("crash-foreign.img");
        fs::write(&loop_file, vec![0u8; MIB as usize]).unwrap();
        let lg = LoopGuard::attach(&loop_file);
        Foreign {
            cgroups,
            _loop: lg,
            loop_file,
        }
    }

    fn is_foreign(&self, name: &str) -> bool {
        self.cgroups.iter().any(|d| d.ends_with(name))
    }

    fn check(&self, stats: &mut Stats) {
        for d in &self.cgroups {
            if !d.is_dir() {
                stats.leak("foreign cgroup removed", d.display().to_string());
            }
        }
        let dev = &self._loop.device;
        let bf = fs::read_to_string(format!(
            "/sys/block/{}/loop/backing_file",
            dev.trim_start_matches("/dev/")
        ))
        .unwrap_or_default();
        if bf.trim() != self.loop_file.to_string_lossy() {
            stats.leak("foreign loop detached", dev.clone());
        }
    }
}

impl Drop for Foreign {
    fn drop(&mut self) {
        for d in self.cgroups.iter().rev() {
            fs::remove_dir(d).ok();
        }
    }
}

/// A process in a network namespace of its own: a capture target (`pid:N`).
struct NetnsProc(Child);

impl NetnsProc {
    fn start() -> NetnsProc {
        let c = Command::new("unshare")
            .args(["--net", "--", "sleep", "100000"])
            .stdin(Stdio::null())
            .spawn()
            .expect("unshare --net sleep");
        // Wait until it is inside its netns (exec done).
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            let me = fs::read_link("/proc/self/ns/net").ok();
            let it = fs::read_link(format!("/proc/{}/ns/net", c.id())).ok();
            let comm = fs::read_to_string(format!("/proc/{}/comm", c.id())).unwrap_or_default();
            if it.is_some() && it != me && comm.trim() == "sleep" {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        NetnsProc(c)
    }
}

impl Drop for NetnsProc {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

/// Removes by hand what a failed campaign leaves (cgroups of its names, loop devices of
/// the state dir), so a panic never leaks onto the shared machine.
struct Sweep<'a> {
    prefix: String,
    state_dir: &'a Path,
}

impl Drop for Sweep<'_> {
    fn drop(&mut self) {
        for dirs in dind_cgroups(&self.prefix).into_values() {
            for d in dirs {
                fs::remove_dir(&d).ok();
            }
        }
        for dev in loops_backed_under(self.state_dir) {
            run("losetup", &["-d", &format!("/dev/{dev}")]);
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// Pick one operation for `c` from its model.
fn pick_op(
    rng: &mut Rng,
    c: &Caller,
    m: &Model,
    round: u64,
    slot: usize,
    target: u32,
    ctr: Option<&str>,
) -> Vec<Call> {
    let free: Vec<&String> = m
        .images
        .iter()
        .filter(|(_, d)| d.is_empty())
        .map(|(n, _)| n)
        .collect();
    let attached: Vec<&String> = m.images.values().filter(|d| !d.is_empty()).collect();
    let insts: Vec<&String> = m.instances.iter().collect();
    let ctr = ctr.filter(|_| c.containers);
    let unexposed: Vec<&String> = attached
        .iter()
        .copied()
        .filter(|d| !m.exposed.contains(*d))
        .collect();
    let exposed: Vec<&String> = m.exposed.iter().collect();
    let mapped: Vec<&String> = m.mappings.keys().collect();
    loop {
        match rng.below(14) {
            0 | 1 if m.images.len() < 4 => {
                let name = format!("k{round}x{slot}");
                let mut v = vec![mcall(
                    "create image",
                    "CreateImage",
                    "sta{sv}",
                    &[&name, &(2 * MIB).to_string(), "0"],
                )];
                if attached.len() < 3 {
                    let mut a = vec![name.clone()];
                    match rng.pick(&insts) {
                        Some(i) if rng.below(2) == 0 => {
                            a.extend(["1".into(), "instance".into(), "s".into(), (*i).clone()])
                        }
                        _ => a.push("0".into()),
                    }
                    let a: Vec<&str> = a.iter().map(String::as_str).collect();
                    v.push(mcall("attach", "AttachImage", "sa{sv}", &a));
                }
                return v;
            }
            2 if !free.is_empty() && attached.len() < 3 => {
                let n = rng.pick(&free).unwrap();
                return vec![mcall("attach", "AttachImage", "sa{sv}", &[n, "0"])];
            }
            3 if !attached.is_empty() => {
                let d = rng.pick(&attached).unwrap();
                return vec![mcall("detach", "Detach", "sa{sv}", &[d, "0"])];
            }
            4 if !free.is_empty() => {
                let n = rng.pick(&free).unwrap();
                return vec![mcall("delete image", "DeleteImage", "sa{sv}", &[n, "0"])];
            }
            5 if m.instances.len() < 3 => {
                let name = format!("{}{round}x{slot}", c.iprefix);
                return vec![icall(
                    "create instance",
                    "CreateInstance",
                    "sa{sv}",
                    &[
                        &name,
                        "2",
                        "memory_max",
                        "t",
                        "268435456",
                        "tasks_max",
                        "t",
                        "64",
                    ],
                )];
            }
            6 if !insts.is_empty() => {
                let n = rng.pick(&insts).unwrap();
                let del = if rng.below(2) == 0 { "true" } else { "false" };
                return vec![icall(
                    "destroy instance",
                    "DestroyInstance",
                    "sa{sv}",
                    &[n, "2", "force", "b", "true", "delete_images", "b", del],
                )];
            }
            7 if c.uid == 0 => {
                return vec![Call {
                    kind: "capture",
                    iface: CAPTURES,
                    method: "StartCapture",
                    sig: "sa{sv}",
                    args: vec![
                        format!("pid:{target}"),
                        "1".into(),
                        "duration".into(),
                        "u".into(),
                        "1".into(),
                    ],
                }];
            }
            8 | 12 if ctr.is_some() && !unexposed.is_empty() => {
                let d = rng.pick(&unexposed).unwrap();
                return vec![dcall(
                    "expose",
                    "ExposeToContainer",
                    "ssa{sv}",
                    &[d, ctr.unwrap(), "0"],
                )];
            }
            9 | 13 if ctr.is_some() && !exposed.is_empty() => {
                let d = rng.pick(&exposed).unwrap();
                return vec![dcall(
                    "revoke",
                    "RevokeFromContainer",
                    "ssa{sv}",
                    &[d, ctr.unwrap(), "0"],
                )];
            }
            10 if ctr.is_some() && m.mappings.len() < 3 => {
                // A host port of this caller's own range, new each round.
                let port = 20000 + 2000 * slot as u64 + round % 2000;
                return vec![pcall(
                    "publish",
                    "Publish",
                    "ssqqa{sv}",
                    &[ctr.unwrap(), "tcp", &port.to_string(), "80", "0"],
                )];
            }
            11 if !mapped.is_empty() => {
                let id = rng.pick(&mapped).unwrap();
                return vec![pcall("unpublish", "Unpublish", "sa{sv}", &[id, "0"])];
            }
            _ => {}
        }
    }
}

/// What the answered calls of one op promise.
fn expectations(c: &Caller, calls: &[Call], outs: &[Out], m: &Model) -> Vec<Expect> {
    let mut v = Vec::new();
    for (call, out) in calls.iter().zip(outs) {
        if outcome(out) != Outcome::Ok {
            continue;
        }
        let a0 = call.args[0].clone();
        match call.method {
            "CreateImage" => v.push(Expect::ImageExists(c.uid, a0)),
            "AttachImage" => {
                let dev = out.json_data()[1].as_str().unwrap_or_default().to_owned();
                v.push(Expect::Attached(c.uid, a0, dev));
            }
            "Detach" => {
                if let Some((img, _)) = m.images.iter().find(|(_, d)| **d == a0) {
                    v.push(Expect::NotAttached(c.uid, img.clone(), a0.clone()));
                }
                if m.exposed.contains(&a0) {
                    v.push(Expect::NotExposed(a0));
                }
            }
            "ExposeToContainer" => v.push(Expect::Exposed(a0)),
            "RevokeFromContainer" => v.push(Expect::NotExposed(a0)),
            "Publish" => v.push(Expect::Mapped(call.args[2].parse().unwrap())),
            "Unpublish" => {
                if let Some(p) = m.mappings.get(&a0) {
                    v.push(Expect::Unmapped(*p));
                }
            }
            "DeleteImage" => v.push(Expect::ImageGone(c.uid, a0)),
            "CreateInstance" => v.push(Expect::InstanceExists(a0)),
            "DestroyInstance" => v.push(Expect::InstanceGone(a0)),
            _ => {}
        }
    }
    v
}

/// The daemon's view, as lists.
struct Listed {
    /// (uid, image name) → device or ""
    images: BTreeMap<(u32, String), String>,
    /// device → (backing file, uid)
    loops: BTreeMap<String, (String, u32)>,
    /// instance name → owner uid
    instances: BTreeMap<String, u32>,
    /// capture files of sessions still running
    capture_files: Vec<String>,
    /// exposures: (device, container id, nodes, rules)
    exposures: Vec<(String, String, Vec<String>, Vec<String>)>,
    /// mappings: id → (host port, owner uid, state)
    mappings: BTreeMap<String, (u16, u32, String)>,
}

fn list(bed: &Bed) -> Listed {
    let images = bed
        .list_images()
        .iter()
        .map(|r| {
            (
                (
                    r[3].as_u64().unwrap() as u32,
                    r[1].as_str().unwrap().to_owned(),
                ),
                r[4].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let loops = bed
        .list_loops()
        .iter()
        .map(|r| {
            (
                r[1].as_str().unwrap().to_owned(),
                (
                    r[2].as_str().unwrap().to_owned(),
                    r[5].as_u64().unwrap() as u32,
                ),
            )
        })
        .collect();
    let instances = rows(bed, INSTANCES, "ListInstances")
        .iter()
        .map(|r| {
            (
                r[1].as_str().unwrap().to_owned(),
                r[4].as_u64().unwrap() as u32,
            )
        })
        .collect();
    let mut capture_files = Vec::new();
    for r in rows(bed, CAPTURES, "ListCaptures") {
        // Rows carry the file path and the state; take every absolute path in a running row.
        let row = r.as_array().cloned().unwrap_or_default();
        let running = row
            .iter()
            .any(|x| x.as_str().is_some_and(|s| s == "running"));
        if running {
            for x in &row {
                if let Some(s) = x.as_str().filter(|s| s.starts_with('/')) {
                    capture_files.push(s.to_owned());
                }
            }
        }
    }
    let strs = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let exposures = rows(bed, DEVICES, "ListExposures")
        .iter()
        .map(|r| {
            (
                r[1].as_str().unwrap_or_default().to_owned(),
                r[2].as_str().unwrap_or_default().to_owned(),
                strs(&r[5]),
                strs(&r[6]),
            )
        })
        .collect();
    let mappings = rows(bed, PORTS, "ListMappings")
        .iter()
        .map(|r| {
            (
                r[1].as_str().unwrap_or_default().to_owned(),
                (
                    r[6].as_u64().unwrap_or_default() as u16,
                    r[10].as_u64().unwrap_or_default() as u32,
                    r[12].as_str().unwrap_or_default().to_owned(),
                ),
            )
        })
        .collect();
    Listed {
        images,
        loops,
        instances,
        capture_files,
        exposures,
        mappings,
    }
}

/// The rows of a list method without arguments (none when the interface does not answer).
fn rows(bed: &Bed, iface: &str, method: &str) -> Vec<serde_json::Value> {
    let out = bed.busctl(&[
        "call",
        crate::bed::BUS_NAME,
        crate::bed::MANAGER_PATH,
        iface,
        method,
    ]);
    if !out.ok() {
        return Vec::new();
    }
    out.json_data()[0].as_array().cloned().unwrap_or_default()
}

/// An Instances call as root.
fn instances(bed: &Bed, method: &str, args: &[&str]) -> Out {
    bed.call_iface_as("root", "Instances", method, "sa{sv}", args)
}

/// `<hierarchy>/dind/<name>` made by hand in the cpu, memory and pids hierarchies, tagged
/// with `tag` when given (what a daemon killed inside CreateInstance, or another daemon,
/// leaves).
fn dind_dirs(name: &str, tag: Option<&str>) -> Vec<PathBuf> {
    ["cpu", "memory", "pids"]
        .iter()
        .map(|h| {
            let d = Path::new(CG).join(h).join("dind").join(name);
            fs::create_dir_all(&d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
            if let Some(t) = tag {
                set_xattr(&d, t);
            }
            d
        })
        .collect()
}

/// Block nodes of loop devices (major 7) and their partitions (259) in the container's
/// /dev: name → "b MAJ:MIN rwm".
fn loop_nodes_in(pid: u32) -> BTreeMap<String, String> {
    use std::os::unix::fs::FileTypeExt;
    let mut out = BTreeMap::new();
    let Ok(rd) = fs::read_dir(format!("/proc/{pid}/root/dev")) else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(md) = e.metadata() else { continue };
        if !md.file_type().is_block_device() {
            continue;
        }
        let (ma, mi) = (libc::major(md.rdev()), libc::minor(md.rdev()));
        if ma == 7 || ma == 259 {
            out.insert(
                e.file_name().to_string_lossy().into_owned(),
                format!("b {ma}:{mi} rwm"),
            );
        }
    }
    out
}

/// Exact grants of loop devices and partitions in the container's v1 devices cgroup
/// (`devices.list`; wildcard lines such as Docker's `b *:* m` are not grants of ours).
fn loop_grants_in(pid: u32) -> Option<BTreeSet<String>> {
    let list = fs::read_to_string(devices_dir(pid)?.join("devices.list")).ok()?;
    Some(
        list.lines()
            .filter(|l| (l.starts_with("b 7:") || l.starts_with("b 259:")) && !l.contains('*'))
            .map(str::to_owned)
            .collect(),
    )
}

/// The v1 devices cgroup directory of process `pid`.
fn devices_dir(pid: u32) -> Option<PathBuf> {
    let cg = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let rel = cg.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctrl, path) = (f.next()?, f.next()?, f.next()?);
        ctrl.split(',')
            .any(|c| c == "devices")
            .then(|| path.to_owned())
    })?;
    Some(
        Path::new(CG)
            .join("devices")
            .join(rel.trim_start_matches('/')),
    )
}

/// Mapping ids of the rules tagged with this state dir's id in dockerd's netns (both
/// iptables backends): id → number of rules.
fn tagged_rules(d: &crate::dockerd::Dockerd, state_id: &str) -> BTreeMap<String, usize> {
    let tag = format!("dindhelper:{state_id}:");
    let mut out = BTreeMap::new();
    for save in ["iptables-nft-save", "iptables-legacy-save"] {
        let o = d.in_ns(&[save]);
        for l in String::from_utf8_lossy(&o.stdout).lines() {
            if let Some(i) = l.find(&tag) {
                let id: String = l[i + tag.len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                    .collect();
                *out.entry(id).or_default() += 1;
            }
        }
    }
    out
}

fn check_invariants(
    bed: &Bed,
    prefix: &str,
    callers: &[Caller],
    expects: &[Expect],
    foreign: &Foreign,
    ctr: Option<&Ctr>,
    stats: &mut Stats,
) -> Listed {
    let l = list(bed);
    if let Some(c) = ctr {
        check_container(bed, c, &l, stats);
    }
    // Loops of this state dir: listed, and listed ones bound.
    for dev in loops_backed_under(&bed.state_dir) {
        let d = format!("/dev/{dev}");
        if !l.loops.contains_key(&d) {
            stats.leak("loop of this state dir not listed", d);
        }
    }
    for (d, (backing, _)) in &l.loops {
        let bf = fs::read_to_string(format!(
            "/sys/block/{}/loop/backing_file",
            d.trim_start_matches("/dev/")
        ))
        .unwrap_or_default();
        if bf.trim() != backing.as_str() {
            stats.leak("listed loop not bound", format!("{d} {backing}"));
        }
    }
    // Cgroups of this run's instance names ↔ instances.
    let cgs = dind_cgroups(prefix);
    for (name, dirs) in &cgs {
        if !l.instances.contains_key(name) && !foreign.is_foreign(name) {
            stats.leak(
                "dind cgroup without instance",
                format!(
                    "{name}: {} (tag {:?})",
                    dirs[0].display(),
                    read_xattr(&dirs[0])
                ),
            );
        }
    }
    for name in l.instances.keys().filter(|n| n.starts_with(prefix)) {
        if !cgs.contains_key(name) {
            stats.leak("instance without cgroup", name.clone());
        }
    }
    // Image files ↔ image records; no half-made image.
    let images = bed.state_dir.join("images");
    for c in callers {
        let dir = images.join(c.uid.to_string());
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let f = e.file_name().to_string_lossy().into_owned();
            let Some(name) = f.strip_suffix(".img") else {
                stats.leak("stray file in image dir", e.path().display().to_string());
                continue;
            };
            if !l.images.contains_key(&(c.uid, name.to_owned())) {
                stats.leak("image file without record", e.path().display().to_string());
                continue;
            }
            let md = e.metadata().unwrap();
            if md.uid() != c.uid || md.len() != 2 * MIB {
                stats.leak(
                    "half-made image listed",
                    format!("{} uid {} size {}", e.path().display(), md.uid(), md.len()),
                );
            }
        }
    }
    let intents = bed.state_dir.join("intents");
    if let Ok(rd) = fs::read_dir(&intents) {
        for e in rd.flatten() {
            stats.leak(
                "intent left after reconcile",
                e.path().display().to_string(),
            );
        }
    }
    for f in &l.capture_files {
        if !Path::new(f).exists() {
            stats.leak("capture session claims a dead file", f.clone());
        }
    }
    for f in ["state.json", "loops.json"] {
        let p = bed.state_dir.join(f);
        if let Ok(t) = fs::read_to_string(&p) {
            if serde_json::from_str::<serde_json::Value>(&t).is_err() {
                stats.leak("state file does not parse", p.display().to_string());
            }
        }
    }
    // Snapshot + journal (a torn last journal record is ignored, anything else fails).
    if let Err(e) = dindhelper::state::load_effective(&bed.state_dir) {
        stats.leak("effective state does not load", e.to_string());
    }
    // Answered calls.
    for e in expects {
        let lost = match e {
            Expect::ImageExists(u, n) => !l.images.contains_key(&(*u, n.clone())),
            Expect::ImageGone(u, n) => l.images.contains_key(&(*u, n.clone())),
            Expect::Attached(u, n, d) => {
                let p = images.join(u.to_string()).join(format!("{n}.img"));
                l.loops.get(d).map(|(b, _)| b.as_str()) != Some(&*p.to_string_lossy())
            }
            Expect::NotAttached(u, n, d) => {
                let p = images.join(u.to_string()).join(format!("{n}.img"));
                l.loops.get(d).map(|(b, _)| b.as_str()) == Some(&*p.to_string_lossy())
            }
            Expect::InstanceExists(n) => !l.instances.contains_key(n),
            Expect::InstanceGone(n) => l.instances.contains_key(n),
            Expect::Exposed(d) => !l.exposures.iter().any(|e| &e.0 == d),
            Expect::NotExposed(d) => l.exposures.iter().any(|e| &e.0 == d),
            Expect::Mapped(p) => !l.mappings.values().any(|m| m.0 == *p),
            Expect::Unmapped(p) => l.mappings.values().any(|m| m.0 == *p),
        };
        if lost {
            stats.leak("answered call lost", format!("{e:?}"));
        }
    }
    foreign.check(stats);
    l
}

/// The container's side after a restart: every loop node in its /dev and every exact
/// loop grant in its devices cgroup has an exposure; every exposure's nodes and grants
/// exist; no exposure intent survived the reconcile; every rule tagged with this state
/// id has a mapping and every active mapping has its rules.
fn check_container(bed: &Bed, c: &Ctr, l: &Listed, stats: &mut Stats) {
    let mine: Vec<&(String, String, Vec<String>, Vec<String>)> =
        l.exposures.iter().filter(|e| e.1 == c.id).collect();
    let nodes = loop_nodes_in(c.pid);
    for (name, rule) in &nodes {
        if !mine.iter().any(|e| e.2.contains(name)) {
            stats.leak(
                "node in container without exposure",
                format!("{name} ({rule})"),
            );
        }
    }
    for e in &mine {
        for n in &e.2 {
            if !nodes.contains_key(n) {
                stats.leak("exposure's node missing", format!("{} {n}", e.0));
            }
        }
    }
    match loop_grants_in(c.pid) {
        Some(grants) => {
            for g in &grants {
                if !mine.iter().any(|e| e.3.contains(g)) {
                    stats.leak("grant in container without exposure", g.clone());
                }
            }
            for e in &mine {
                for r in &e.3 {
                    if !grants.contains(r) {
                        stats.leak("exposure's grant missing", format!("{} {r}", e.0));
                    }
                }
            }
        }
        None => stats.leak(
            "container's devices cgroup unreadable",
            format!("pid {}", c.pid),
        ),
    }
    let loops = fs::read_to_string(bed.state_dir.join("loops.json")).unwrap_or_default();
    if loops.contains("\"pending\"") {
        stats.leak(
            "exposure intent left after reconcile",
            "loops.json".to_owned(),
        );
    }
    let tagged = tagged_rules(c.d, &state_id(bed));
    for id in tagged.keys() {
        if !l.mappings.contains_key(id) {
            stats.leak("tagged rule without mapping", id.clone());
        }
    }
    for (id, m) in &l.mappings {
        if m.2 == "active" && !tagged.contains_key(id) {
            stats.leak("active mapping without rules", format!("{id} port {}", m.0));
        }
    }
}

fn resync(callers: &[Caller], l: &Listed) -> Vec<Model> {
    callers
        .iter()
        .map(|c| Model {
            exposed: l
                .exposures
                .iter()
                .filter(|e| l.images.iter().any(|((u, _), d)| *u == c.uid && *d == e.0))
                .map(|e| e.0.clone())
                .collect(),
            mappings: l
                .mappings
                .iter()
                .filter(|(_, m)| m.1 == c.uid)
                .map(|(id, m)| (id.clone(), m.0))
                .collect(),
            images: l
                .images
                .iter()
                .filter(|((u, _), _)| *u == c.uid)
                .map(|((_, n), d)| (n.clone(), d.clone()))
                .collect(),
            instances: l
                .instances
                .keys()
                .filter(|n| n.starts_with(&c.iprefix))
                .cloned()
                .collect(),
        })
        .collect()
}

fn campaign(bed: &Bed, stop: Stop, kills: u64) {
    let seed = env_u64("DHT_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    println!("\ncrash campaign ({stop:?}): DHT_SEED={seed}, {kills} stops");
    let mut rng = Rng(seed);
    let prefix = format!("kc{}-", std::process::id());
    let callers: Vec<Caller> = [("root", 'r'), (MEMBER, 'm'), (OWN, 'o')]
        .into_iter()
        .map(|(u, t)| Caller {
            user: u,
            uid: bed.uid(u),
            iprefix: format!("{prefix}{t}"),
            containers: u != OWN,
        })
        .collect();
    // dockerd with the daemon in its netns (the ports need Docker's chains there), and a
    // running container for exposures and mappings. Before the sweep: dropped after it.
    let env = DaemonInDockerd::new(bed, "dhk");
    env.d().run_web("kweb", "/www", &[]);
    let ctr = {
        let d = env.d();
        let id = d.docker_ok(&["inspect", "-f", "{{.Id}}", "kweb"]);
        let pid = d.docker_ok(&["inspect", "-f", "{{.State.Pid}}", "kweb"]);
        Ctr {
            d,
            name: "kweb",
            id: id.trim().to_owned(),
            pid: pid.trim().parse().expect("container pid"),
        }
    };
    let _sweep = Sweep {
        prefix: prefix.clone(),
        state_dir: &bed.state_dir,
    };
    let foreign = Foreign::make(bed, &prefix);
    let target = NetnsProc::start();
    let tpid = target.0.id();
    let mut stats = Stats::default();
    let started = Instant::now();

    let l = list(bed);
    let mut models = resync(&callers, &l);
    for round in 0..kills {
        let ops: Vec<Vec<Call>> = callers
            .iter()
            .enumerate()
            .map(|(i, c)| pick_op(&mut rng, c, &models[i], round, i, tpid, Some(ctr.name)))
            .collect();
        let delay = Duration::from_micros(rng.below(250_000));
        let address = bed.address.as_str();
        let results: Vec<Vec<Out>> = std::thread::scope(|s| {
            let hs: Vec<_> = callers
                .iter()
                .zip(&ops)
                .map(|(c, calls)| {
                    s.spawn(move || {
                        let mut outs = Vec::new();
                        for call in calls {
                            let o = do_call(address, c.user, call);
                            let ok = o.ok();
                            outs.push(o);
                            if !ok {
                                break;
                            }
                        }
                        outs
                    })
                })
                .collect();
            std::thread::sleep(delay);
            match stop {
                Stop::Kill9 => bed.kill9_daemon(),
                Stop::Term => {
                    if let Some(st) = bed.stop_daemon() {
                        if !st.success() {
                            stats.leak("SIGTERM: exit not 0", format!("round {round}: {st}"));
                        }
                    }
                }
            }
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        stats.kills += 1;
        let mut expects = Vec::new();
        for ((c, calls), outs) in callers.iter().zip(&ops).zip(&results) {
            for (call, o) in calls.iter().zip(outs) {
                stats.count(call.kind, outcome(o));
                if stop == Stop::Term && outcome(o) == Outcome::Interrupted {
                    stats.leak(
                        "SIGTERM: call received but not answered",
                        format!("{} {}: {}", call.method, call.args[0], o.stderr.trim()),
                    );
                }
            }
            let m = &models[callers.iter().position(|x| x.user == c.user).unwrap()];
            expects.extend(expectations(c, calls, outs, m));
        }
        bed.start_daemon()
            .unwrap_or_else(|e| panic!("restart after kill {} (seed {seed}): {e}", round + 1));
        let before = stats.leaks.values().map(Vec::len).sum::<usize>();
        let l = check_invariants(
            bed,
            &prefix,
            &callers,
            &expects,
            &foreign,
            Some(&ctr),
            &mut stats,
        );
        let after = stats.leaks.values().map(Vec::len).sum::<usize>();
        if after > before {
            println!(
                "round {round}: new leaks after ops {:?}",
                ops.iter()
                    .map(|o| o.iter().map(|c| c.method).collect::<Vec<_>>())
                    .collect::<Vec<_>>()
            );
        }
        models = resync(&callers, &l);
    }
    let elapsed = started.elapsed();

    // Report.
    println!(
        "crash campaign ({stop:?}): {} stops in {:.1} s (seed {seed})",
        stats.kills,
        elapsed.as_secs_f64()
    );
    println!("  calls per kind: answered ok / answered error / interrupted / not delivered");
    for (k, c) in &stats.calls {
        println!(
            "    {k:<17} {:>5} {:>5} {:>5} {:>5}",
            c[0], c[1], c[2], c[3]
        );
    }
    let distinct: usize = stats
        .leaks
        .values()
        .map(|v| v.iter().collect::<BTreeSet<_>>().len())
        .sum();
    println!("  distinct leaks: {distinct}");
    for (class, v) in &stats.leaks {
        let d: BTreeSet<&String> = v.iter().collect();
        println!("    {class}: {} ({} sightings)", d.len(), v.len());
        for x in d.iter().take(5) {
            println!("      {x}");
        }
    }

    // Clean up through the API, then by hand what the API could not remove.
    let l = list(bed);
    for name in l.instances.keys().filter(|n| n.starts_with(&prefix)) {
        bed.destroy_instance_forced(name);
    }
    let l = list(bed);
    for d in l.loops.keys() {
        bed.call_as("root", "Detach", "sa{sv}", &[d, "0"]);
    }
    for c in &callers {
        for (u, n) in l.images.keys() {
            if *u == c.uid {
                bed.call_as(c.user, "DeleteImage", "sa{sv}", &[n, "0"]);
            }
        }
    }
    let mut left = Vec::new();
    for (name, dirs) in dind_cgroups(&prefix) {
        if foreign.is_foreign(&name) {
            continue;
        }
        for d in dirs {
            left.push(d.display().to_string());
            fs::remove_dir(&d).ok();
        }
    }
    for dev in loops_backed_under(&bed.state_dir) {
        left.push(dev.clone());
        run("losetup", &["-d", &format!("/dev/{dev}")]);
    }
    foreign.check(&mut stats);
    drop(target);
    assert!(
        left.is_empty(),
        "after the campaign's clean-up through the API, left behind: {left:?}"
    );
    assert!(
        stats.leaks.is_empty(),
        "crash campaign ({stop:?}, DHT_SEED={seed}, {kills} stops) found {distinct} distinct leaks: {:#?}",
        stats.leaks
    );
}

/// This state dir's id (what the daemon tags its objects with).
fn state_id(bed: &Bed) -> String {
    dindhelper::state::load_effective(&bed.state_dir)
        .expect("effective state")
        .state_id
}

/// The states a daemon killed inside CreateInstance leaves, made by hand (the campaign
/// hits them only by chance): after a restart, the reconcile removes the cgroups that are
/// ours and unrecorded — tagged with our state id (killed between the tag and the record
/// save), or untagged with our pending intent (killed between mkdir and tag) — and keeps
/// another daemon's (other tag), another tool's (untagged, no intent) and recorded ones.
fn reconcile_removes_only_our_unrecorded_cgroups(bed: &Bed) {
    let id = state_id(bed);
    let p = format!("kr{}-", std::process::id());
    let ours_tagged = format!("{p}ours");
    let ours_intent = format!("{p}intent");
    let other = format!("{p}other");
    let plain = format!("{p}plain");
    let kept = format!("{p}kept");
    // A recorded instance: made through the API.
    instances(bed, "CreateInstance", &[&kept, "0"]).expect_ok("CreateInstance");
    let kept_dir = Path::new(CG).join("memory/dind").join(&kept);
    let tag_of_kept = read_xattr(&kept_dir);
    bed.kill9_daemon();
    let d_ours = dind_dirs(&ours_tagged, Some(&id));
    // Killed between mkdir and tag: the first directory tagged, the next ones untagged.
    let d_intent = dind_dirs(&ours_intent, None);
    fs::create_dir_all(bed.state_dir.join("intents")).unwrap();
    fs::write(
        bed.state_dir
            .join("intents")
            .join(format!("instance-{ours_intent}")),
        b"",
    )
    .unwrap();
    let d_other = dind_dirs(&other, Some("ffffffffffffffff"));
    let d_plain = dind_dirs(&plain, None);
    bed.start_daemon().expect("restart");

    let gone = |ds: &[PathBuf]| ds.iter().all(|d| !d.exists());
    let there = |ds: &[PathBuf]| ds.iter().all(|d| d.is_dir());
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert_eq!(
            tag_of_kept.as_deref(),
            Some(id.as_str()),
            "CreateInstance tags its cgroup with the state id"
        );
        assert!(gone(&d_ours), "our tagged unrecorded cgroup is removed");
        assert!(
            gone(&d_intent),
            "our untagged cgroup with an intent is removed"
        );
        assert!(there(&d_other), "another daemon's cgroup stays");
        assert!(there(&d_plain), "an untagged cgroup without intent stays");
        assert!(kept_dir.is_dir(), "the recorded instance stays");
        assert!(
            !bed.state_dir
                .join("intents")
                .join(format!("instance-{ours_intent}"))
                .exists(),
            "the intent is cleared"
        );
        let log = bed.daemon_log();
        assert!(
            log.contains(&format!(
                "instance {ours_tagged}: /dind/{ours_tagged} tagged with our state id"
            )),
            "the decision is logged"
        );
    }));
    for ds in [&d_ours, &d_intent, &d_other, &d_plain] {
        for d in ds.iter() {
            fs::remove_dir(d).ok();
        }
    }
    instances(bed, "DestroyInstance", &[&kept, "0"]).expect_ok("DestroyInstance");
    if let Err(e) = res {
        std::panic::resume_unwind(e);
    }
}

/// DestroyInstance of a name this daemon has no record of, by root (who holds every
/// action, `-others` included), even forced: a cgroup tagged with ANOTHER state dir's id
/// is another daemon's and stays, answered Conflict; an untagged leftover of the same
/// kind is still removed (the clean-up path for cgroups from before tags).
fn destroy_unrecorded_never_removes_another_state_dirs_cgroup(bed: &Bed) {
    let p = format!("kd{}-", std::process::id());
    let other = format!("{p}other");
    let plain = format!("{p}plain");
    let d_other = dind_dirs(&other, Some("fedcba9876543210"));
    let d_plain = dind_dirs(&plain, None);
    let destroy = |name: &str| {
        bed.gdbus_raw(
            "root",
            &bed.address,
            crate::bed::BUS_NAME,
            crate::bed::MANAGER_PATH,
            &format!("{INSTANCES}.DestroyInstance"),
            &[
                &crate::bed::gv_str(name),
                "{'force': <true>, 'delete_images': <true>}",
            ],
        )
    };
    let o_other = destroy(&other);
    let o_plain = destroy(&plain);
    let other_left = d_other.iter().all(|d| d.is_dir());
    let plain_gone = d_plain.iter().all(|d| !d.exists());
    for d in d_other.iter().chain(&d_plain) {
        fs::remove_dir(d).ok();
    }
    assert!(
        other_left,
        "DestroyInstance removed a cgroup tagged by another state dir: {o_other:?}"
    );
    assert_eq!(
        o_other.dbus_error().as_deref(),
        Some("org.dindhelper1.Error.Conflict"),
        "another state dir's cgroup: Conflict: {o_other:?}"
    );
    assert!(
        o_other.stderr.contains("fedcba9876543210"),
        "the error names the owner tag: {o_other:?}"
    );
    o_plain.expect_ok("DestroyInstance of an untagged unrecorded leftover");
    assert!(plain_gone, "an untagged unrecorded leftover is removed");
}

/// strace attached to the daemon (every thread) that SIGKILLs it when it opens `path`:
/// a kill at an exact point of an operation, which random kills hit only by chance.
fn kill_when_opening(pid: u32, path: &Path) -> Child {
    let c = Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "-p", &pid.to_string(), "-P"])
        .arg(path)
        .args(["-e", "trace=openat", "-e", "inject=openat:signal=SIGKILL"])
        .stdin(Stdio::null())
        .spawn()
        .expect("strace (package strace)");
    // Attached once the daemon's threads show a tracer.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        let st = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        if st
            .lines()
            .any(|l| l.starts_with("TracerPid:") && l.trim() != "TracerPid:\t0")
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    c
}

/// The two windows of an exposure change, hit exactly (strace kills the daemon when it
/// opens the container's `devices.allow` — nodes made, grant not yet — and, in a revoke,
/// `devices.list` — grant withdrawn, nodes not yet removed): after each restart no node
/// or grant in the container lacks an exposure and every exposure's nodes and grants
/// exist (the reconcile finishes the interrupted expose and the interrupted revoke). On
/// the code before (record saved after the effect) the first kill left `/dev/loopN` in
/// the container with no exposure.
fn kill_inside_expose_and_revoke_leaves_no_orphan(bed: &Bed) {
    crate::docker::shared(bed, |d| {
        let name = "dhk-x";
        crate::docker::start_container(d, name, &[]);
        let ctr = Ctr {
            d,
            name,
            id: d
                .docker_ok(&["inspect", "-f", "{{.Id}}", name])
                .trim()
                .to_owned(),
            pid: d
                .docker_ok(&["inspect", "-f", "{{.State.Pid}}", name])
                .trim()
                .parse()
                .expect("pid"),
        };
        let devdir = devices_dir(ctr.pid).expect("container's devices cgroup (v1)");
        bed.create_image("root", "kxe", 2 * MIB);
        let (_, dev) = bed.attach_image("root", "kxe", &[]);
        let devices = |method: &str| {
            bed.busctl(&[
                "call",
                crate::bed::BUS_NAME,
                crate::bed::MANAGER_PATH,
                DEVICES,
                method,
                "ssa{sv}",
                &dev,
                name,
                "0",
            ])
        };
        let mut stats = Stats::default();
        let mut notes = Vec::new();
        for (phase, file, method) in [
            ("expose", "devices.allow", "ExposeToContainer"),
            ("revoke", "devices.list", "RevokeFromContainer"),
        ] {
            if phase == "revoke" && !list(bed).exposures.iter().any(|e| e.0 == dev) {
                devices("ExposeToContainer").expect_ok("ExposeToContainer");
            }
            let mut tracer =
                kill_when_opening(bed.daemon_pid().expect("daemon"), &devdir.join(file));
            let o = devices(method);
            // The kill ends strace; a call that never opened the file (refused) must not
            // leave it attached.
            let t = Instant::now();
            while tracer.try_wait().ok().flatten().is_none() {
                if t.elapsed() > Duration::from_secs(5) {
                    tracer.kill().ok();
                    tracer.wait().ok();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            bed.kill9_daemon();
            let nodes = loop_nodes_in(ctr.pid);
            notes.push(format!(
                "{phase}: call {:?}, nodes in the container at the kill {nodes:?}",
                outcome(&o)
            ));
            bed.start_daemon().expect("restart");
            let l = list(bed);
            check_container(bed, &ctr, &l, &mut stats);
            if outcome(&o) != Outcome::Interrupted {
                stats.leak("the kill missed the window", format!("{phase}: {o:?}"));
            }
        }
        let log = bed.daemon_log();
        bed.detach("root", &dev);
        bed.delete_image("root", "kxe");
        d.docker(&["rm", "-f", name]);
        println!("{notes:#?}");
        assert!(
            stats.leaks.is_empty(),
            "{notes:#?}\n{:#?}\nreconcile said: {:?}",
            stats.leaks,
            log.lines()
                .filter(|l| l.contains("interrupted"))
                .collect::<Vec<_>>()
        );
    })
}

/// A daemon killed inside CreateImage leaves at most a temp file (`.<name>.img.part`,
/// size 0, root-owned), never a half-made `<name>.img` that the reconcile would adopt as
/// an image; the temp file is removed at the next start.
fn reconcile_removes_half_made_image_files(bed: &Bed) {
    let uid = bed.uid(MEMBER);
    let dir = bed.state_dir.join("images").join(uid.to_string());
    bed.create_image(MEMBER, "crashseed", 2 * MIB);
    bed.kill9_daemon();
    let part = dir.join(".crashhalf.img.part");
    fs::write(&part, b"").unwrap();
    bed.start_daemon().expect("restart");
    let names: Vec<String> = bed
        .list_images()
        .iter()
        .map(|r| r[1].as_str().unwrap().to_owned())
        .collect();
    let part_left = part.exists();
    bed.delete_image(MEMBER, "crashseed");
    assert!(
        !part_left,
        "the temp file of a killed create is removed at start"
    );
    assert!(
        !names.iter().any(|n| n.contains("crashhalf")),
        "a temp file is never listed as an image: {names:?}"
    );
}

/// polkitd SIGKILLed while calls wait for its answer: every call of a non-root caller
/// either succeeded before (and its object exists) or is refused with NotAuthorized and
/// left nothing behind (fail closed); after polkitd is back, calls are authorized again.
fn polkitd_killed_mid_call_fails_closed(bed: &Bed) {
    let seed = env_u64("DHT_SEED").unwrap_or(1);
    let mut rng = Rng(seed ^ 0x706f6c6b);
    let prefix = format!("kp{}-", std::process::id());
    let _sweep = Sweep {
        prefix: prefix.clone(),
        state_dir: &bed.state_dir,
    };
    let address = bed.address.clone();
    let (mut ok, mut refused) = (0, 0);
    let mut problems = Vec::new();
    let mut samples = Vec::new();
    for round in 0..12u64 {
        let calls: Vec<(&str, Call)> = (0..4)
            .map(|i| {
                let user = if i % 2 == 0 { MEMBER } else { OWN };
                let c = if i < 2 {
                    mcall(
                        "create image",
                        "CreateImage",
                        "sta{sv}",
                        &[&format!("p{round}x{i}"), &(2 * MIB).to_string(), "0"],
                    )
                } else {
                    icall(
                        "create instance",
                        "CreateInstance",
                        "sa{sv}",
                        &[&format!("{prefix}{round}x{i}"), "0"],
                    )
                };
                (user, c)
            })
            .collect();
        let delay = Duration::from_micros(20_000 + rng.below(380_000));
        // Even rounds freeze polkitd before the calls go out, so every call is in
        // flight when it dies (on a fast machine a pure delay can miss them all: CI
        // once answered 48 of 48 before the kill); odd rounds kill at a random moment.
        let frozen = round % 2 == 0;
        if frozen {
            bed.stop_polkitd();
        }
        let outs: Vec<Out> = std::thread::scope(|s| {
            let hs: Vec<_> = calls
                .iter()
                .map(|(u, c)| {
                    let a = address.as_str();
                    s.spawn(move || do_call(a, u, c))
                })
                .collect();
            std::thread::sleep(delay);
            bed.kill9_polkitd();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let l = list(bed);
        for ((u, c), o) in calls.iter().zip(&outs) {
            let name = c.args[0].clone();
            let exists = match c.method {
                "CreateImage" => l.images.contains_key(&(bed.uid(u), name.clone())),
                _ => l.instances.contains_key(&name) || !dind_cgroups(&name).is_empty(),
            };
            if o.ok() {
                ok += 1;
                if !exists {
                    problems.push(format!("{u} {} {name}: answered ok, missing", c.method));
                }
            } else {
                refused += 1;
                if samples.len() < 3 {
                    samples.push(o.stderr.trim().to_owned());
                }
                let e = o.stderr.to_lowercase();
                if !(e.contains("not authorized")
                    || e.contains("notauthorized")
                    || e.contains("polkit"))
                {
                    problems.push(format!(
                        "{u} {} {name}: not a refusal: {}",
                        c.method,
                        o.stderr.trim()
                    ));
                }
                if exists {
                    problems.push(format!("{u} {} {name}: refused but left behind", c.method));
                }
            }
        }
        bed.restart_polkitd().expect("polkitd restart");
    }
    // Authorized again once polkitd is back.
    let back = do_call(
        &address,
        MEMBER,
        &mcall(
            "create image",
            "CreateImage",
            "sta{sv}",
            &["pback", &(2 * MIB).to_string(), "0"],
        ),
    );
    println!("\npolkitd kills: 12, calls answered ok {ok}, refused {refused}");
    // Clean up through the API (as root).
    let l = list(bed);
    for name in l.instances.keys().filter(|n| n.starts_with(&prefix)) {
        instances(bed, "DestroyInstance", &[name, "0"]);
    }
    for (u, n) in l.images.keys() {
        if n.starts_with('p') && (*u == bed.uid(MEMBER) || *u == bed.uid(OWN)) {
            let user = if *u == bed.uid(MEMBER) { MEMBER } else { OWN };
            bed.call_as(user, "DeleteImage", "sa{sv}", &[n, "0"]);
        }
    }
    back.expect_ok("CreateImage after polkitd came back");
    // Calls sent to a frozen polkitd can only be refused; calls answered before a
    // random kill are counted (under heavy load every call may still be waiting).
    assert!(
        refused >= 24,
        "every call sent to a frozen polkitd is refused (ok {ok}, refused {refused}): {samples:?}"
    );
    assert!(problems.is_empty(), "{problems:#?}");
}
