//! Test fixture: a real dockerd isolated in its own network namespace, plus a client
//! namespace joined to it by a veth pair (TESTBED.md recipe).
//!
//! Names (helper tag `dhp`, or another via [`Dockerd::start_tagged`]): netns `dhp-<pid>-<n>-d` (dockerd) and `dhp-<pid>-<n>-c`
//! (client), data under `/var/tmp/dhp-<pid>-<n>`, exec root `/run/dhp-<pid>-<n>` (short:
//! containerd socket paths must fit in sun_path). Client 10.99.0.2/24 <-> dockerd netns
//! 10.99.0.1/24.
//!
//! dockerd is started with `nsenter --net=` (NOT `ip netns exec`, which remounts /sys and
//! loses the cgroup mounts). Image `bb:latest` is imported from busybox-static (no
//! registry): `/www/index.html` = "hello", `/www2/index.html` = "other".
//!
//! Teardown (Drop): SIGTERM dockerd by pid (which stops its containers and its managed
//! containerd), SIGKILL after 20 s, unmount leftovers under the data/exec roots, delete
//! both namespaces and both directories. Missing prerequisites panic: never skip.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub struct Dockerd {
    pub ns: String,
    pub client_ns: String,
    pub dir: PathBuf,
    pub exec_root: PathBuf,
    pub socket: PathBuf,
    /// dockerd finds `iptables` as iptables-legacy (a PATH dir of links) instead of nft.
    pub legacy: bool,
    /// Extra dockerd arguments (e.g. IPv6: [`Dockerd::IPV6_ARGS`]).
    pub extra_args: Vec<String>,
    child: Option<Child>,
}

fn run(cmd: &mut Command) -> Output {
    let desc = format!("{cmd:?}");
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {desc}: {e}"))
}

fn must(cmd: &mut Command) -> String {
    let desc = format!("{cmd:?}");
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{desc} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn require_root_and_tools() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need root (real dockerd, network namespaces, iptables)"
    );
    for tool in [
        "/usr/sbin/dockerd",
        "/usr/bin/docker",
        "/usr/bin/nsenter",
        "/usr/bin/curl",
        "/bin/busybox",
        "/usr/sbin/iptables-nft-save",
        "/usr/sbin/iptables-legacy-save",
    ] {
        let alt = tool
            .replace("/usr/sbin/", "/sbin/")
            .replace("/usr/bin/", "/bin/");
        assert!(
            Path::new(tool).exists() || Path::new(&alt).exists(),
            "missing prerequisite {tool}: apt-get install -y docker.io iptables busybox-static curl util-linux"
        );
    }
}

impl Dockerd {
    /// Start a dockerd in a fresh namespace, wait until it answers, import bb:latest.
    pub fn start() -> Dockerd {
        Dockerd::start_with(false)
    }

    /// The same with dockerd using iptables-legacy (`legacy = true`) or the system's
    /// `iptables` (iptables-nft on Debian 12).
    pub fn start_with(legacy: bool) -> Dockerd {
        Dockerd::start_tagged("dhp", legacy)
    }

    /// dockerd 20.10 arguments that make it publish IPv6: ip6tables rules (experimental
    /// in 20.10) and an IPv6 subnet on the default bridge. With `--ipv6` among the extra
    /// arguments the fixture also gives the veth pair fd99::1/64 (dockerd side) and
    /// fd99::2/64 (client).
    pub const IPV6_ARGS: &'static [&'static str] = &[
        "--experimental",
        "--ip6tables",
        "--ipv6",
        "--fixed-cidr-v6",
        "fd00:d0c::/64",
    ];

    /// The same with another helper tag in every name (`<tag>-<pid>-<n>-d`, …).
    pub fn start_tagged(tag: &str, legacy: bool) -> Dockerd {
        Dockerd::start_args(tag, legacy, &[])
    }

    /// The same with extra dockerd arguments (kept for restarts of this dockerd).
    pub fn start_args(tag: &str, legacy: bool, extra: &[&str]) -> Dockerd {
        require_root_and_tools();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let base = format!("{tag}-{pid}-{n}");
        let d = Dockerd {
            ns: format!("{base}-d"),
            client_ns: format!("{base}-c"),
            dir: PathBuf::from(format!("/var/tmp/{base}")),
            exec_root: PathBuf::from(format!("/run/{base}")),
            socket: PathBuf::from(format!("/var/tmp/{base}/docker.sock")),
            legacy,
            extra_args: extra.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        std::fs::create_dir_all(d.dir.join("data")).unwrap();
        std::fs::create_dir_all(&d.exec_root).unwrap();
        // namespaces + veth (created directly inside the namespaces: no name in the host)
        must(Command::new("ip").args(["netns", "add", &d.ns]));
        must(Command::new("ip").args(["netns", "add", &d.client_ns]));
        must(Command::new("ip").args(["-n", &d.ns, "link", "set", "lo", "up"]));
        must(Command::new("ip").args(["-n", &d.client_ns, "link", "set", "lo", "up"]));
        must(Command::new("ip").args([
            "-n",
            &d.ns,
            "link",
            "add",
            "vdh",
            "type",
            "veth",
            "peer",
            "name",
            "vcl",
            "netns",
            &d.client_ns,
        ]));
        must(Command::new("ip").args(["-n", &d.ns, "addr", "add", "10.99.0.1/24", "dev", "vdh"]));
        must(Command::new("ip").args([
            "-n",
            &d.client_ns,
            "addr",
            "add",
            "10.99.0.2/24",
            "dev",
            "vcl",
        ]));
        must(Command::new("ip").args(["-n", &d.ns, "link", "set", "vdh", "up"]));
        must(Command::new("ip").args(["-n", &d.client_ns, "link", "set", "vcl", "up"]));
        // IPv6 on the pair too (nodad: usable at once), only for an IPv6 dockerd
        if extra.contains(&"--ipv6") {
            for (ns, addr, dev) in [
                (&d.ns, "fd99::1/64", "vdh"),
                (&d.client_ns, "fd99::2/64", "vcl"),
            ] {
                must(
                    Command::new("ip")
                        .args(["-n", ns, "-6", "addr", "add", addr, "dev", dev, "nodad"]),
                );
            }
        }
        let mut d = d;
        d.start_daemon();
        d.import_image();
        d
    }

    pub fn ns_path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.ns))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Start dockerd (again) on the same data root; waits until `/_ping` answers.
    pub fn start_daemon(&mut self) {
        assert!(self.child.is_none(), "dockerd already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("dockerd.log"))
            .unwrap();
        let mut cmd = Command::new("nsenter");
        if self.legacy {
            let bin = self.dir.join("legacy-bin");
            std::fs::create_dir_all(&bin).unwrap();
            for (name, target) in [
                ("iptables", "iptables-legacy"),
                ("iptables-save", "iptables-legacy-save"),
                ("iptables-restore", "iptables-legacy-restore"),
                ("ip6tables", "ip6tables-legacy"),
                ("ip6tables-save", "ip6tables-legacy-save"),
                ("ip6tables-restore", "ip6tables-legacy-restore"),
            ] {
                let link = bin.join(name);
                if !link.exists() {
                    std::os::unix::fs::symlink(format!("/usr/sbin/{target}"), link).unwrap();
                }
            }
            let path = std::env::var("PATH").unwrap_or_default();
            cmd.env("PATH", format!("{}:{path}", bin.display()));
        }
        let child = cmd
            .arg(format!("--net={}", self.ns_path().display()))
            .arg("dockerd")
            .arg("--data-root")
            .arg(self.dir.join("data"))
            .arg("--exec-root")
            .arg(&self.exec_root)
            .arg("--pidfile")
            .arg(self.dir.join("docker.pid"))
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot start dockerd");
        // nsenter execs dockerd: the child pid is dockerd's pid
        self.child = Some(child);
        let t0 = Instant::now();
        loop {
            let out = run(Command::new("docker")
                .arg("-H")
                .arg(format!("unix://{}", self.socket.display()))
                .arg("version")
                .stdout(Stdio::null()));
            if out.status.success() {
                break;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("dockerd exited ({st}); log: {}", self.log_tail());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "dockerd did not answer in 60 s; log: {}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM dockerd and wait for it (containers are stopped by dockerd).
    pub fn stop_daemon(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let t0 = Instant::now();
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if t0.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn import_image(&self) {
        let root = self.dir.join("image-root");
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::create_dir_all(root.join("www")).unwrap();
        std::fs::create_dir_all(root.join("www2")).unwrap();
        std::fs::create_dir_all(root.join("tmp")).unwrap();
        std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
        std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
        std::fs::write(root.join("www/index.html"), "hello\n").unwrap();
        std::fs::write(root.join("www2/index.html"), "other\n").unwrap();
        let mut tar = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .args(["-c", "."])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = run(Command::new("docker")
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(["import", "-", "bb:latest"])
            .stdin(tar.stdout.take().unwrap()));
        assert!(
            tar.wait().unwrap().success(),
            "tar of the image root failed"
        );
        assert!(out.status.success(), "docker import: {out:?}");
    }

    /// Run the docker CLI against this daemon.
    pub fn docker(&self, args: &[&str]) -> Output {
        run(Command::new("docker")
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args))
    }

    /// Run the docker CLI; panic on failure; trimmed stdout.
    pub fn docker_ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "docker {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// `docker run -d --name NAME EXTRA.. bb:latest httpd -f -p 80 -h WWW`.
    pub fn run_web(&self, name: &str, www: &str, extra: &[&str]) -> String {
        let mut args = vec!["run", "-d", "--name", name];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[
            "bb:latest",
            "/bin/busybox",
            "httpd",
            "-f",
            "-p",
            "80",
            "-h",
            www,
        ]);
        self.docker_ok(&args)
    }

    /// The container's IP on the default bridge.
    pub fn ip_of(&self, name: &str) -> String {
        self.docker_ok(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            name,
        ])
    }

    /// A command run in the dockerd namespace.
    pub fn in_ns(&self, args: &[&str]) -> Output {
        run(Command::new("nsenter")
            .arg(format!("--net={}", self.ns_path().display()))
            .args(args))
    }

    /// A command run in the client namespace.
    pub fn in_client(&self, args: &[&str]) -> Output {
        run(Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.client_ns))
            .args(args))
    }

    /// `curl` from the client namespace to 10.99.0.1:PORT; None when it fails.
    pub fn curl(&self, port: u16) -> Option<String> {
        let url = format!("http://10.99.0.1:{port}/");
        let out = self.in_client(&["curl", "-s", "--max-time", "2", &url]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// `curl` from the client namespace to [fd99::1]:PORT (IPv6); None when it fails.
    pub fn curl6(&self, port: u16) -> Option<String> {
        let url = format!("http://[fd99::1]:{port}/");
        let out = self.in_client(&["curl", "-g", "-s", "--max-time", "2", &url]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Poll `curl` until it answers `want` or `timeout` passes; returns the elapsed time.
    pub fn wait_curl(&self, port: u16, want: &str, timeout: Duration) -> Option<Duration> {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if self.curl(port).as_deref() == Some(want) {
                return Some(t0.elapsed());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        self.stop_daemon();
        // unmount anything left under our roots (deepest first)
        if let Ok(m) = std::fs::read_to_string("/proc/self/mountinfo") {
            let mut points: Vec<String> = m
                .lines()
                .filter_map(|l| l.split_whitespace().nth(4).map(str::to_owned))
                .filter(|p| {
                    p.starts_with(self.dir.to_str().unwrap())
                        || p.starts_with(self.exec_root.to_str().unwrap())
                })
                .collect();
            points.sort_by_key(|p| std::cmp::Reverse(p.len()));
            for p in points {
                let _ = Command::new("umount").args(["-l", &p]).status();
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.client_ns])
            .status();
        let _ = std::fs::remove_dir_all(&self.exec_root);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
