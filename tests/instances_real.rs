//! Real tests of the cgroupfs instance backend on this machine (root, cgroup v1 hybrid).
//! Every prerequisite missing = a loud failure, never a skip.
//!
//! Each test uses its own root directory `dhi-test-<pid>-<n>` under every hierarchy and
//! removes it at the end (also on panic, via a guard).
//!
//! Run: `cargo test --test instances_real -- --test-threads=1 --nocapture`
//! (the CPU measurement needs the 2 cores of the machine to itself as far as possible).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use dindhelper::error::{Classify, Kind};
use dindhelper::instances::cgroup::CgroupMounts;
use dindhelper::instances::cgroupfs::CgroupfsBackend;
use dindhelper::instances::{
    adopt_container, BackendKind, Change, DockerCgroupDriver, InstanceError, Limits, SliceBackend,
};

static SEQ: AtomicU32 = AtomicU32::new(0);

fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "instances_real needs root (cgroup mkdir, limits, oom_score_adj); run with sudo"
    );
}

/// Removes the test root `<mount>/<root>` from every hierarchy on drop.
struct Root {
    name: String,
    mounts: CgroupMounts,
}

impl Root {
    fn new() -> Self {
        require_root();
        let mounts = CgroupMounts::detect().unwrap();
        assert!(
            mounts.is_v1(),
            "these tests are for the cgroup v1 hybrid layout of this machine; found {mounts:?}"
        );
        let name = format!(
            "dhi-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        Root { name, mounts }
    }
    fn backend(&self) -> CgroupfsBackend {
        let b = CgroupfsBackend::detect(&self.name).unwrap();
        assert_eq!(b.kind(), BackendKind::CgroupfsV1);
        b
    }
    fn dirs(&self) -> Vec<PathBuf> {
        let mut m = self.mounts.v1_mount_points();
        m.extend(self.mounts.unified.clone());
        m.into_iter().map(|m| m.join(&self.name)).collect()
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        for d in self.dirs() {
            if d.exists() {
                // Children first (instances a failed test left behind).
                if let Ok(rd) = fs::read_dir(&d) {
                    for e in rd.flatten() {
                        if e.path().is_dir() {
                            let _ = fs::remove_dir(e.path());
                        }
                    }
                }
                if let Err(e) = fs::remove_dir(&d) {
                    eprintln!("cleanup: rmdir {}: {e}", d.display());
                }
            }
        }
    }
}

fn read(p: &Path) -> String {
    fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
        .trim()
        .to_owned()
}

/// Move `pid` into the instance directory of every hierarchy it was created in.
fn enter(b: &CgroupfsBackend, name: &str, pid: u32) {
    for d in b.instance_dirs(name) {
        fs::write(d.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("move {pid} into {}: {e}", d.display()));
    }
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn hog() -> Kill {
    Kill(
        Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .expect("spawn sh"),
    )
}

/// CPU time (ns) the cgroup used over `secs` seconds of wall time, as a fraction of one CPU.
fn cpu_share(usage_file: &Path, secs: f64) -> f64 {
    let a = read(usage_file).parse::<u64>().unwrap();
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let b = read(usage_file).parse::<u64>().unwrap();
    (b - a) as f64 / 1e9 / t.elapsed().as_secs_f64()
}

#[test]
fn create_writes_limits_and_destroy_removes_every_dir() {
    let root = Root::new();
    let b = root.backend();
    let l = Limits {
        cpu_quota_percent: Some(50),
        cpu_weight: Some(200),
        memory_max: Some(64 << 20),
        memory_high: Some(48 << 20),
        memory_swap_max: Some(16 << 20),
        tasks_max: Some(100),
        io_weight: Some(300),
        oom_score_adj: None,
    };
    assert_eq!(b.create("a", &l).unwrap(), Change::Done);
    assert!(b.exists("a").unwrap());
    let d = |c| b.controller_dir(c, "a").unwrap();
    assert_eq!(read(&d("cpu").join("cpu.cfs_period_us")), "100000");
    assert_eq!(read(&d("cpu").join("cpu.cfs_quota_us")), "50000");
    assert_eq!(read(&d("cpu").join("cpu.shares")), "2048");
    assert_eq!(
        read(&d("memory").join("memory.limit_in_bytes")),
        (64u64 << 20).to_string()
    );
    assert_eq!(
        read(&d("memory").join("memory.soft_limit_in_bytes")),
        (48u64 << 20).to_string()
    );
    assert_eq!(read(&d("pids").join("pids.max")), "100");
    let memsw = d("memory").join("memory.memsw.limit_in_bytes");
    assert!(
        memsw.exists(),
        "this machine has swap accounting (memsw files)"
    );
    assert_eq!(read(&memsw), (80u64 << 20).to_string());
    assert!(d("cpuacct").join("cpuacct.usage").exists());
    // This kernel has no CFQ: the weight goes to blkio.bfq.weight (systemd's BFQ scale).
    assert!(!d("blkio").join("blkio.weight").exists());
    assert_eq!(read(&d("blkio").join("blkio.bfq.weight")), "118");

    // Idempotent create re-applies; set_limits replaces (None = reset), also raising
    // memory above the old memsw limit (the write order keeps memsw >= limit).
    assert_eq!(b.create("a", &l).unwrap(), Change::Unchanged);
    let l2 = Limits {
        memory_max: Some(256 << 20),
        memory_swap_max: Some(0),
        ..Default::default()
    };
    b.set_limits("a", &l2).unwrap();
    assert_eq!(read(&d("cpu").join("cpu.cfs_quota_us")), "-1");
    assert_eq!(read(&d("cpu").join("cpu.shares")), "1024");
    assert_eq!(
        read(&d("memory").join("memory.limit_in_bytes")),
        (256u64 << 20).to_string()
    );
    assert_eq!(read(&memsw), (256u64 << 20).to_string());
    assert_eq!(read(&d("pids").join("pids.max")), "max");
    // And lowering again.
    b.set_limits("a", &l).unwrap();
    assert_eq!(read(&memsw), (80u64 << 20).to_string());

    let dirs = b.instance_dirs("a");
    assert_eq!(b.destroy("a", false).unwrap(), Change::Done);
    for d in dirs {
        assert!(!d.exists(), "{} left behind", d.display());
    }
    assert!(!b.exists("a").unwrap());
    assert_eq!(b.destroy("a", false).unwrap(), Change::Unchanged);
    let e = b.set_limits("a", &l).unwrap_err();
    assert_eq!(e.kind(), Kind::NotFound, "{e}");
}

#[test]
fn bad_input_creates_nothing() {
    let root = Root::new();
    let b = root.backend();
    for (name, l, kind) in [
        ("Bad_Name", Limits::default(), Kind::InvalidArgs),
        (
            "a",
            Limits {
                cpu_quota_percent: Some(0),
                ..Default::default()
            },
            Kind::InvalidArgs,
        ),
        (
            "a",
            Limits {
                memory_max: Some(1 << 20),
                ..Default::default()
            },
            Kind::InvalidArgs,
        ),
        (
            "a",
            Limits {
                memory_swap_max: Some(0),
                ..Default::default()
            },
            Kind::InvalidArgs,
        ),
        (
            "a",
            Limits {
                io_weight: Some(0),
                ..Default::default()
            },
            Kind::InvalidArgs,
        ),
    ] {
        let e = b.create(name, &l).unwrap_err();
        println!("{name} {l:?} -> {} {e}", e.kind());
        assert_eq!(e.kind(), kind, "{e}");
        assert!(!b.exists("a").unwrap());
    }
    for d in root.dirs() {
        let n = fs::read_dir(&d).map(|r| r.count()).unwrap_or(0);
        // The root itself may exist (create_dir_all of the parent), but holds no instance.
        assert!(!d.join("a").exists(), "{} has leftovers ({n})", d.display());
    }
}

#[test]
fn cpu_hog_stays_within_quota() {
    let root = Root::new();
    let b = root.backend();
    let l = Limits {
        cpu_quota_percent: Some(30),
        ..Default::default()
    };
    b.create("cpu", &l).unwrap();
    let h = hog();
    enter(&b, "cpu", h.0.id());
    let usage = b
        .controller_dir("cpuacct", "cpu")
        .unwrap()
        .join("cpuacct.usage");
    std::thread::sleep(Duration::from_millis(300));
    let share = cpu_share(&usage, 3.0);
    println!("quota 30 %: measured {:.1} % of one CPU", share * 100.0);
    // Upper bound: the quota (+3 % for accounting jitter). Lower bound only proves the hog
    // ran: other work on the machine's 2 cores may keep it below its quota.
    assert!((0.15..=0.33).contains(&share), "measured {share}");

    // Live change to 70 %.
    b.set_limits(
        "cpu",
        &Limits {
            cpu_quota_percent: Some(70),
            ..Default::default()
        },
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let share = cpu_share(&usage, 3.0);
    println!("quota 70 %: measured {:.1} % of one CPU", share * 100.0);
    assert!((0.35..=0.73).contains(&share), "measured {share}");

    // Busy while the hog runs; force kills it.
    let e = b.destroy("cpu", false).unwrap_err();
    assert_eq!(e.kind(), Kind::Busy);
    assert!(e.to_string().contains(&h.0.id().to_string()), "{e}");
    assert!(b.exists("cpu").unwrap());
    assert_eq!(b.destroy("cpu", true).unwrap(), Change::Done);
    assert!(!b.exists("cpu").unwrap());
    let mut h = h;
    let st = h.0.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&st),
        Some(9),
        "force destroy SIGKILLs"
    );
}

#[test]
fn memory_hog_is_oom_killed_inside_the_instance() {
    let root = Root::new();
    let b = root.backend();
    let l = Limits {
        memory_max: Some(64 << 20),
        memory_swap_max: Some(0),
        ..Default::default()
    };
    b.create("mem", &l).unwrap();
    // The hog waits for a line on stdin, so it is inside the cgroup before it allocates.
    let mut c = Command::new("sh")
        .args([
            "-c",
            "read x; exec dd if=/dev/zero of=/dev/null bs=400M count=1",
        ])
        .stdin(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    enter(&b, "mem", c.id());
    writeln!(c.stdin.take().unwrap(), "go").unwrap();
    let st = c.wait().unwrap();
    let mem = b.controller_dir("memory", "mem").unwrap();
    // memory.failcnt stays 0 on this kernel even when the limit triggers the OOM killer;
    // the oom_kill counter and the peak usage are what show it.
    let failcnt = read(&mem.join("memory.failcnt"));
    let peak = read(&mem.join("memory.max_usage_in_bytes"))
        .parse::<u64>()
        .unwrap();
    let oom = read(&mem.join("memory.oom_control"));
    println!("hog exit {st:?}; memory.failcnt {failcnt}; peak {peak}; oom_control {oom:?}");
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(9));
    assert!(peak <= 64 << 20 && peak > 32 << 20, "peak usage {peak}");
    assert!(
        oom.lines()
            .any(|l| l.starts_with("oom_kill ") && l != "oom_kill 0"),
        "{oom}"
    );
    // We (outside) are alive, obviously; the instance is empty again and removable.
    assert_eq!(b.destroy("mem", false).unwrap(), Change::Done);
}

#[test]
fn adopt_sets_oom_score_adj_on_every_process_and_rejects_outsiders() {
    let root = Root::new();
    let b = root.backend();
    b.create("oom", &Limits::default()).unwrap();
    // Main process in the instance, a second one in a child cgroup below it (as runc does).
    let main = Kill(Command::new("sleep").arg("100").spawn().unwrap());
    let other = Kill(Command::new("sleep").arg("100").spawn().unwrap());
    enter(&b, "oom", main.0.id());
    for d in b.instance_dirs("oom") {
        let c = d.join("ctr");
        fs::create_dir(&c).unwrap();
        fs::write(c.join("cgroup.procs"), other.0.id().to_string()).unwrap();
    }
    let a = adopt_container(&b, "oom", main.0.id(), 500, DockerCgroupDriver::Cgroupfs).unwrap();
    println!("{a:?}");
    for p in [main.0.id(), other.0.id()] {
        assert_eq!(read(Path::new(&format!("/proc/{p}/oom_score_adj"))), "500");
        assert!(a.pids.contains(&p));
    }
    // A process outside the instance: Conflict naming the --cgroup-parent.
    let outsider = Kill(Command::new("sleep").arg("100").spawn().unwrap());
    let e = adopt_container(
        &b,
        "oom",
        outsider.0.id(),
        500,
        DockerCgroupDriver::Cgroupfs,
    )
    .unwrap_err();
    println!("{e}");
    assert_eq!(e.kind(), Kind::Conflict);
    assert!(e
        .to_string()
        .contains(&format!("--cgroup-parent=/{}/oom", root.name)));
    assert_ne!(
        read(Path::new(&format!(
            "/proc/{}/oom_score_adj",
            outsider.0.id()
        ))),
        "500"
    );
    drop(main);
    drop(other);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(b.destroy("oom", false).unwrap(), Change::Done);
    let e = adopt_container(&b, "oom", 999_999_999, 500, DockerCgroupDriver::Cgroupfs).unwrap_err();
    assert!(matches!(e, InstanceError::NoProcess { .. }), "{e}");
}

// ---------------------------------------------------------------------------------------
// dockerd with the cgroupfs driver and --cgroup-parent (TESTBED.md recipe).

struct Dockerd {
    dir: PathBuf,
    pid: u32,
    netns: String,
}

impl Dockerd {
    fn start() -> Self {
        require_root();
        let netns = format!("dhi-docker-{}", std::process::id());
        let dir = PathBuf::from(format!("/run/dhi-d{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let ok = Command::new("ip")
            .args(["netns", "add", &netns])
            .status()
            .unwrap();
        assert!(ok.success(), "ip netns add {netns}");
        Command::new("ip")
            .args(["-n", &netns, "link", "set", "lo", "up"])
            .status()
            .unwrap();
        let log = fs::File::create(dir.join("log")).unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .arg("dockerd")
            .arg("--data-root")
            .arg(format!("/var/tmp/dhi-docker-{}", std::process::id()))
            .arg("--exec-root")
            .arg(dir.join("x"))
            .arg("--pidfile")
            .arg(dir.join("pid"))
            .arg("-H")
            .arg(format!("unix://{}", dir.join("sock").display()))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("dockerd (apt-get install docker.io)");
        let d = Dockerd {
            dir,
            pid: child.id(),
            netns,
        };
        std::mem::forget(child);
        let t = Instant::now();
        while !d.docker(&["version"]).status.success() {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "dockerd did not answer: {}",
                fs::read_to_string(d.dir.join("log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        d
    }

    fn docker(&self, args: &[&str]) -> std::process::Output {
        Command::new("docker")
            .env(
                "DOCKER_HOST",
                format!("unix://{}", self.dir.join("sock").display()),
            )
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.docker(args);
        assert!(
            o.status.success(),
            "docker {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    }

    fn import_busybox(&self) {
        let r = self.dir.join("img");
        fs::create_dir_all(r.join("bin")).unwrap();
        fs::copy("/bin/busybox", r.join("bin/busybox")).expect("busybox-static");
        let _ = std::os::unix::fs::symlink("busybox", r.join("bin/sh"));
        let mut tar = Command::new("tar")
            .arg("-C")
            .arg(&r)
            .args(["-c", "."])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let st = Command::new("docker")
            .env(
                "DOCKER_HOST",
                format!("unix://{}", self.dir.join("sock").display()),
            )
            .args(["import", "-", "dhibb:latest"])
            .stdin(tar.stdout.take().unwrap())
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "docker import");
        assert!(tar.wait().unwrap().success(), "tar");
    }

    fn pid_of(&self, ctr: &str) -> u32 {
        self.ok(&["inspect", "-f", "{{.State.Pid}}", ctr])
            .parse()
            .unwrap()
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let _ = self.docker(&["rm", "-f", "dhi-c1", "dhi-c2", "dhi-c3"]);
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let t = Instant::now();
        while Path::new(&format!("/proc/{}", self.pid)).exists()
            && t.elapsed() < Duration::from_secs(20)
        {
            // Reap our child (it was forgotten as a Child).
            let _ = nix::sys::wait::waitpid(
                nix::unistd::Pid::from_raw(self.pid as i32),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        let _ = Command::new("umount")
            .arg(format!(
                "/var/tmp/dhi-docker-{}/overlay2",
                std::process::id()
            ))
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_dir_all(format!("/var/tmp/dhi-docker-{}", std::process::id()));
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn docker_cgroup_parent_puts_containers_inside_the_instance() {
    let root = Root::new();
    let b = root.backend();
    let d = Dockerd::start();
    let driver = d.ok(&["info", "-f", "{{.CgroupDriver}}"]);
    println!("dockerd cgroup driver: {driver}");
    assert_eq!(driver, "cgroupfs");
    d.import_busybox();
    let l = Limits {
        cpu_quota_percent: Some(40),
        memory_max: Some(128 << 20),
        tasks_max: Some(64),
        oom_score_adj: Some(700),
        ..Default::default()
    };
    b.create("dk", &l).unwrap();
    let parent = b.cgroup_parent("dk", DockerCgroupDriver::Cgroupfs).unwrap();
    assert_eq!(parent, format!("/{}/dk", root.name));
    let id = d.ok(&[
        "run",
        "-d",
        "--name",
        "dhi-c1",
        "--cgroup-parent",
        &parent,
        "dhibb",
        "/bin/sh",
        "-c",
        "sleep 1000 & while :; do :; done",
    ]);
    let pid = d.pid_of("dhi-c1");
    let cg = read(Path::new(&format!("/proc/{pid}/cgroup")));
    println!("container {id:.12} pid {pid}:\n{cg}");
    for line in cg.lines().filter(|l| !l.starts_with("0::")) {
        assert!(
            line.ends_with(&format!("{parent}/{id}")),
            "cgroupfs driver: <parent>/<id> in every v1 hierarchy; got {line}"
        );
    }
    let a = adopt_container(
        &b,
        "dk",
        pid,
        l.effective_oom_score_adj(),
        DockerCgroupDriver::Cgroupfs,
    )
    .unwrap();
    println!("adopted: {a:?}");
    assert!(a.pids.len() >= 2, "sh and sleep: {a:?}");
    for p in &a.pids {
        assert_eq!(read(Path::new(&format!("/proc/{p}/oom_score_adj"))), "700");
    }
    // The instance quota holds for the container below it.
    let usage = b
        .controller_dir("cpuacct", "dk")
        .unwrap()
        .join("cpuacct.usage");
    let share = cpu_share(&usage, 3.0);
    println!(
        "container under quota 40 %: measured {:.1} % of one CPU",
        share * 100.0
    );
    assert!((0.20..=0.43).contains(&share), "measured {share}");

    // docker restart: new processes; adopt again re-applies.
    d.ok(&["restart", "-t", "0", "dhi-c1"]);
    let pid2 = d.pid_of("dhi-c1");
    assert_ne!(pid, pid2);
    let a = adopt_container(&b, "dk", pid2, 700, DockerCgroupDriver::Cgroupfs).unwrap();
    for p in &a.pids {
        assert_eq!(read(Path::new(&format!("/proc/{p}/oom_score_adj"))), "700");
    }

    // A container without --cgroup-parent (docker's default /docker/<id>): Conflict.
    d.ok(&[
        "run",
        "-d",
        "--name",
        "dhi-c2",
        "dhibb",
        "/bin/sh",
        "-c",
        "sleep 1000",
    ]);
    let e = adopt_container(
        &b,
        "dk",
        d.pid_of("dhi-c2"),
        700,
        DockerCgroupDriver::Cgroupfs,
    )
    .unwrap_err();
    println!("{e}");
    assert_eq!(e.kind(), Kind::Conflict);

    // A relative --cgroup-parent lands below runc's own cgroup (shown for the record).
    d.ok(&[
        "run",
        "-d",
        "--name",
        "dhi-c3",
        "--cgroup-parent",
        &format!("{}-rel", root.name),
        "dhibb",
        "/bin/sh",
        "-c",
        "sleep 1000",
    ]);
    let rel = read(Path::new(&format!("/proc/{}/cgroup", d.pid_of("dhi-c3"))));
    println!("relative --cgroup-parent:\n{rel}");

    // Busy while the container runs; after docker rm, destroy removes everything
    // (also the dirs runc made in cpuset, devices, freezer, name=systemd, …).
    let e = b.destroy("dk", false).unwrap_err();
    assert_eq!(e.kind(), Kind::Busy, "{e}");
    d.ok(&["rm", "-f", "dhi-c1", "dhi-c2", "dhi-c3"]);
    assert_eq!(b.destroy("dk", false).unwrap(), Change::Done);
    for dir in root.dirs() {
        assert!(!dir.join("dk").exists(), "{} left behind", dir.display());
    }
    // Clean the relative parent runc created under its own cgroup.
    for line in rel.lines() {
        let mut it = line.splitn(3, ':');
        let (_, ctrl, path) = (it.next(), it.next().unwrap(), it.next().unwrap());
        let Some(parent_path) = Path::new(path).parent() else {
            continue;
        };
        let mount = if ctrl.is_empty() {
            root.mounts.unified.clone()
        } else {
            root.mounts.v1.get(ctrl.split(',').next().unwrap()).cloned()
        };
        if let Some(m) = mount {
            let p = m.join(parent_path.strip_prefix("/").unwrap());
            if p.ends_with(format!("{}-rel", root.name)) {
                let _ = fs::remove_dir(&p);
            }
        }
    }
}

#[test]
fn cgroup_v2_code_path_on_the_unified_mount() {
    // This machine's cgroup2 (hybrid: /sys/fs/cgroup/unified) has no cpu/memory/pids
    // controller, so only the structure can be proven here: mkdir, subtree_control,
    // process placement, adopt on the `0::` line, busy/force destroy, and a clear
    // NotSupported for a limit whose controller is missing.
    let root = Root::new();
    let unified = root.mounts.unified.clone().expect("cgroup2 mounted");
    let mounts = CgroupMounts {
        v1: Default::default(),
        unified: Some(unified.clone()),
    };
    let b = CgroupfsBackend::with_mounts(mounts, &root.name).unwrap();
    assert_eq!(b.kind(), BackendKind::CgroupfsV2);
    let avail = read(&unified.join("cgroup.controllers"));
    println!("cgroup2 controllers here: {avail:?}");

    if !avail.split_whitespace().any(|c| c == "cpu") {
        let e = b
            .create(
                "v2q",
                &Limits {
                    cpu_quota_percent: Some(50),
                    ..Default::default()
                },
            )
            .unwrap_err();
        println!("{e}");
        assert_eq!(e.kind(), Kind::NotSupported);
        assert!(e.to_string().contains("cpu.max"), "{e}");
        assert!(
            !unified.join(&root.name).join("v2q").exists(),
            "rolled back"
        );
    }

    assert_eq!(b.create("v2", &Limits::default()).unwrap(), Change::Done);
    let dir = unified.join(&root.name).join("v2");
    assert!(dir.is_dir());
    let s = Kill(Command::new("sleep").arg("100").spawn().unwrap());
    fs::write(dir.join("cgroup.procs"), s.0.id().to_string()).unwrap();
    let a = adopt_container(&b, "v2", s.0.id(), 300, DockerCgroupDriver::Cgroupfs).unwrap();
    assert_eq!(a.pids, vec![s.0.id()]);
    assert_eq!(
        read(Path::new(&format!("/proc/{}/oom_score_adj", s.0.id()))),
        "300"
    );
    assert_eq!(b.destroy("v2", false).unwrap_err().kind(), Kind::Busy);
    assert_eq!(b.destroy("v2", true).unwrap(), Change::Done);
    assert!(!dir.exists());
}
