//! A booted systemd (the machine's own OS in systemd-nspawn over an overlay of `/`, see
//! TESTBED.md; never systemd on the root) with dindhelperd installed as a real system
//! service: binary, unit, D-Bus policy + activation file, polkit action + rules, group
//! `dindhelper` with a member user and a plain user made inside. Shared by
//! tests/instances_systemd_daemon.rs, tests/instances_systemd.rs and benches/instances.rs
//! (`#[path]` include).
//!
//! Files are written through the overlay's merged dir (what the container sees as `/`);
//! the group exists before the D-Bus policy lands, then the bus reloads its config.

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const MEMBER: &str = "dhjmember";
pub const PLAIN: &str = "dhjplain";

pub struct Booted {
    pub scratch: PathBuf,
    nspawn: Child,
    pub systemd_pid: u32,
}

fn sh(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

impl Booted {
    /// Boot systemd in nspawn (cgroup layout of the host) under `/var/tmp/dhj-<tag>-<pid>`.
    pub fn boot(tag: &str) -> Self {
        Self::boot_with(tag, false)
    }

    /// `docker_v2`: boot with a unified cgroup hierarchy (docker 20.10 then uses its systemd
    /// cgroup driver) and allow what runc needs inside nspawn: keyctl (session keyring)
    /// and bpf (device cgroup programs), with all capabilities.
    pub fn boot_with(tag: &str, docker_v2: bool) -> Self {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "needs root (overlay mount, systemd-nspawn)"
        );
        assert!(
            Path::new("/usr/bin/systemd-nspawn").exists(),
            "systemd-nspawn missing: apt-get install systemd-container"
        );
        let scratch = PathBuf::from(format!("/var/tmp/dhj-{tag}-{}", std::process::id()));
        for d in ["upper", "work", "merged"] {
            fs::create_dir_all(scratch.join(d)).unwrap();
        }
        let opts = format!(
            "lowerdir=/,upperdir={0}/upper,workdir={0}/work",
            scratch.display()
        );
        let o = sh(Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &opts])
            .arg(scratch.join("merged")));
        assert!(o.status.success(), "mount overlay: {o:?}");
        let extra = if docker_v2 {
            " --capability=all '--system-call-filter=@keyring bpf'"
        } else {
            ""
        };
        let script = format!(
            "mkdir -p /run/systemd/nspawn && mount -t tmpfs tmpfs /run/systemd/nspawn && \
             exec systemd-nspawn -D {}/merged --register=no --keep-unit --boot \
             --machine=dhj-{tag}{} --private-network{extra}",
            scratch.display(),
            std::process::id(),
        );
        let mut cmd = Command::new("unshare");
        if docker_v2 {
            cmd.env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1");
        }
        let nspawn = cmd
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(scratch.join("nspawn.log")).unwrap())
            .spawn()
            .expect("unshare");
        let mut b = Booted {
            scratch,
            nspawn,
            systemd_pid: 0,
        };
        let t = Instant::now();
        while b.systemd_pid == 0 {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "no systemd in nspawn"
            );
            std::thread::sleep(Duration::from_millis(200));
            let kids = fs::read_to_string(format!("/proc/{0}/task/{0}/children", b.nspawn.id()))
                .unwrap_or_default();
            b.systemd_pid = kids
                .split_whitespace()
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
        }
        loop {
            let o = b.run(&["systemctl", "is-system-running"]);
            let s = String::from_utf8_lossy(&o.stdout).trim().to_owned();
            if s == "running" || s == "degraded" {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(90),
                "systemd in the container did not come up: {s}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        b
    }

    /// Install dindhelperd (`bin`) and the project's system files, make the group and
    /// the users, reload the bus. The daemon starts by D-Bus activation on first call.
    pub fn install_daemon(&self, bin: &Path) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let m = self.scratch.join("merged");
        self.ok(&["groupadd", "-f", "dindhelper"]);
        self.ok(&["useradd", "-M", "-G", "dindhelper", MEMBER]);
        self.ok(&["useradd", "-M", PLAIN]);
        for (src, dst, mode) in [
            (bin.to_owned(), "usr/local/bin/dindhelperd", 0o755),
            (
                root.join("systemd/dindhelperd.service"),
                "etc/systemd/system/dindhelperd.service",
                0o644,
            ),
            (
                root.join("dbus/org.dindhelper1.service"),
                "usr/share/dbus-1/system-services/org.dindhelper1.service",
                0o644,
            ),
            (
                root.join("dbus/org.dindhelper1.conf"),
                "usr/share/dbus-1/system.d/org.dindhelper1.conf",
                0o644,
            ),
            (
                root.join("polkit/org.dindhelper1.policy"),
                "usr/share/polkit-1/actions/org.dindhelper1.policy",
                0o644,
            ),
            (
                root.join("polkit/50-dindhelper.rules"),
                "etc/polkit-1/rules.d/50-dindhelper.rules",
                0o644,
            ),
        ] {
            let to = m.join(dst);
            fs::create_dir_all(to.parent().unwrap()).unwrap();
            fs::copy(&src, &to).unwrap_or_else(|e| panic!("copy {}: {e}", src.display()));
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&to, fs::Permissions::from_mode(mode)).unwrap();
        }
        self.ok(&["systemctl", "daemon-reload"]);
        self.ok(&[
            "busctl",
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "ReloadConfig",
        ]);
        // polkitd may have started before the files landed: restart picks them up.
        let _ = self.run(&["systemctl", "try-restart", "polkit.service"]);
    }

    pub fn run(&self, args: &[&str]) -> Output {
        sh(Command::new("nsenter")
            .args(["-t", &self.systemd_pid.to_string(), "-a"])
            .args(args))
    }

    /// Run inside as `user` (root: directly).
    pub fn run_as(&self, user: &str, args: &[&str]) -> Output {
        if user == "root" {
            return self.run(args);
        }
        let mut a = vec!["runuser", "-u", user, "--"];
        a.extend_from_slice(args);
        self.run(&a)
    }

    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    }

    /// `busctl --json=short call org.dindhelper1 /org/dindhelper1 <iface> <method> …` as
    /// `user`.
    pub fn call(&self, user: &str, method: &str, sig: &str, args: &[&str]) -> Output {
        let mut a = vec![
            "busctl",
            "--json=short",
            "--timeout=60",
            "call",
            "org.dindhelper1",
            "/org/dindhelper1",
            "org.dindhelper1.Instances",
            method,
        ];
        if !sig.is_empty() {
            a.push(sig);
        }
        a.extend_from_slice(args);
        self.run_as(user, &a)
    }

    pub fn prop(&self, unit: &str, p: &str) -> String {
        let o = self.run(&["systemctl", "show", unit, "-p", p, "--value"]);
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    }

    pub fn journal(&self, unit: &str) -> String {
        let o = self.run(&["journalctl", "--no-pager", "-u", unit, "-n", "60"]);
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// VmRSS (kB) of the daemon's main process.
    pub fn daemon_rss_kb(&self) -> u64 {
        let pid = self.prop("dindhelperd.service", "MainPID");
        let st = self.ok(&["cat", &format!("/proc/{pid}/status")]);
        parse_vmrss_kb(&st).unwrap_or(0)
    }
}

pub fn parse_vmrss_kb(status: &str) -> Option<u64> {
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

impl Drop for Booted {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.nspawn.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let t = Instant::now();
        while self.nspawn.try_wait().ok().flatten().is_none()
            && t.elapsed() < Duration::from_secs(30)
        {
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
        let _ = Command::new("umount")
            .arg(self.scratch.join("merged"))
            .status();
        if std::env::var_os("DHJ_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.scratch);
        }
    }
}
