//! The test bed: real components, set up once per run of the integration binary.
//!
//! - a private dbus-daemon (`<type>system</type>`, allow-all policy) listening on
//!   `/run/dht-<pid>/bus`, started with `--nofork --print-pid` and stopped by pid;
//! - the real polkitd on that bus (`DBUS_SYSTEM_BUS_ADDRESS`), stopped by pid;
//! - the project's `polkit/org.dindhelper1.policy` and `polkit/50-dindhelper.rules`,
//!   plus a test-only rule for user `dhtest-own`, installed where polkitd reads them;
//! - group `dindhelper`, users `dhtest-member` (in the group), `dhtest-plain` (no
//!   rights) and `dhtest-own` (the base actions, none of the `-others` actions);
//! - a state dir `/var/lib/dht-<pid>` and the daemon binary of this build.
//!
//! Machine-wide things (policy files, users, group) are shared by every bed running at
//! the same time: `/run/dht-shared/` holds one marker per live bed and a record of what
//! a bed created; the last bed to leave undoes the record (also what a crashed run left).
//! Teardown never stops at the first failure: it collects them all.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const MEMBER: &str = "dhtest-member";
pub const PLAIN: &str = "dhtest-plain";
/// Granted every `org.dindhelper1.*` action except the `-others` ones (test-only rule).
pub const OWN: &str = "dhtest-own";
pub const GROUP: &str = "dindhelper";
/// The shipped delegation group: base actions on the member's own resources only.
pub const TENANT_GROUP: &str = "dindhelper-tenant";
/// Members of `dindhelper-tenant` (the shipped rules, no test rule).
pub const TENANT: &str = "dhtest-tenant";
pub const TENANT2: &str = "dhtest-tenant2";
/// Granted only the `-others` actions (test-only rule): proves the base action is
/// checked too.
pub const OTHERS_ONLY: &str = "dhtest-othersonly";
pub const BUS_NAME: &str = "org.dindhelper1";
pub const MANAGER_PATH: &str = "/org/dindhelper1";
pub const MANAGER_IFACE: &str = "org.dindhelper1.Manager";
pub const POLKITD: &str = "/usr/lib/polkit-1/polkitd";

pub const ACTIONS: &[&str] = &[
    "org.dindhelper1.loop",
    "org.dindhelper1.loop-others",
    "org.dindhelper1.partitions",
    "org.dindhelper1.partitions-others",
    "org.dindhelper1.ports",
    "org.dindhelper1.ports-others",
    "org.dindhelper1.capture",
    "org.dindhelper1.capture-others",
    "org.dindhelper1.devices",
    "org.dindhelper1.devices-others",
    "org.dindhelper1.instances",
    "org.dindhelper1.instances-others",
    "org.dindhelper1.capture-host",
    "org.dindhelper1.instances-oom-protect",
    "org.dindhelper1.ports-privileged",
];

const SHARED_DIR: &str = "/run/dht-shared";
const TEST_RULES: &str = "/etc/polkit-1/rules.d/49-dhtest-own.rules";
const TEST_RULES_TEXT: &str = r#"// Installed by dindhelper's integration tests only (tests/integration/bed.rs).
polkit.addRule(function(action, subject) {
    if (subject.user == "dhtest-own" &&
        action.id.indexOf("org.dindhelper1.") == 0 &&
        !/-others$/.test(action.id)) {
        return polkit.Result.YES;
    }
    if (subject.user == "dhtest-othersonly" && /-others$/.test(action.id)) {
        return polkit.Result.YES;
    }
});
"#;

/// The outcome of one command.
#[derive(Debug, Clone)]
pub struct Out {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn ok(&self) -> bool {
        self.status == 0
    }

    /// Panics (with everything the command said) unless it succeeded.
    #[track_caller]
    pub fn expect_ok(self, what: &str) -> Out {
        assert!(
            self.ok(),
            "{what}: exit {}\nstdout: {}\nstderr: {}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }

    /// stdout of `busctl --json=short` parsed; `data` of a call reply.
    #[track_caller]
    pub fn json_data(&self) -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.stdout));
        v.get("data").cloned().unwrap_or(v)
    }

    /// The D-Bus error name gdbus reports (`GDBus.Error:<name>: message`), if any.
    pub fn dbus_error(&self) -> Option<String> {
        let i = self.stderr.find("GDBus.Error:")? + "GDBus.Error:".len();
        let rest = &self.stderr[i..];
        let end = rest.find(':').unwrap_or(rest.len());
        Some(rest[..end].trim().to_owned())
    }
}

/// Run a command to completion; never panics on a non-zero exit.
pub fn run(prog: &str, args: &[&str]) -> Out {
    run_cmd(Command::new(prog).args(args))
}

pub fn run_cmd(cmd: &mut Command) -> Out {
    let o = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    Out {
        status: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// Quote a string as GVariant text for gdbus (`'a/b'`).
pub fn gv_str(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: plain kill(2) on a pid we started.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit status.
fn stop_child(child: &mut Child, grace: Duration) -> std::io::Result<ExitStatus> {
    if let Some(st) = child.try_wait()? {
        return Ok(st);
    }
    signal(child.id(), libc::SIGTERM);
    let t = Instant::now();
    while t.elapsed() < grace {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(child.id(), libc::SIGKILL);
    child.wait()
}

/// Start dbus-daemon with `conf` in the foreground; returns once it listens.
/// The "dbus-daemon[...]: Failed to set fd limit" warning on stderr is harmless.
fn spawn_bus(conf: &Path) -> Result<Child, String> {
    let mut child = Command::new("dbus-daemon")
        .arg(format!("--config-file={}", conf.display()))
        .args(["--nofork", "--print-pid", "--nopidfile"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("start dbus-daemon: {e}"))?;
    // --print-pid writes once the bus is listening.
    let stdout = child.stdout.take().expect("piped");
    let mut line = String::new();
    let read = BufReader::new(stdout).read_line(&mut line);
    if read.is_err() || line.trim().is_empty() {
        stop_child(&mut child, Duration::from_secs(2)).ok();
        return Err(format!("dbus-daemon ({}) did not start", conf.display()));
    }
    Ok(child)
}

/// An extra bus for one test; stopped (by pid) on drop.
pub struct BusGuard {
    child: Child,
    pub address: String,
}

impl Drop for BusGuard {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(5)).ok();
    }
}

pub struct Bed {
    pub run_dir: PathBuf,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    /// `unix:path=/run/dht-<pid>/bus`
    pub address: String,
    pub with_daemon: bool,
    uids: HashMap<&'static str, u32>,
    bus: RefCell<Option<Child>>,
    polkitd: RefCell<Option<Child>>,
    daemon: RefCell<Option<Child>>,
    /// Where start_daemon runs the daemon: None = this process's network namespace;
    /// Some = inside that netns file, with that `--docker-host` (ports tests).
    daemon_place: RefCell<Option<(PathBuf, String)>>,
    /// Extra daemon arguments (e.g. `--docker-host`), used by every (re)start.
    daemon_args: RefCell<Vec<String>>,
    shared: RefCell<Option<Shared>>,
    torn_down: RefCell<bool>,
}

impl Bed {
    /// Bring every component up. On error, whatever was set up is torn down again.
    pub fn setup(with_daemon: bool) -> Result<Bed, String> {
        let pid = std::process::id();
        let run_dir = PathBuf::from(format!("/run/dht-{pid}"));
        let state_dir = PathBuf::from(format!("/var/lib/dht-{pid}"));
        let socket = run_dir.join("bus");
        let bed = Bed {
            address: format!("unix:path={}", socket.display()),
            run_dir,
            state_dir,
            socket,
            with_daemon,
            uids: HashMap::new(),
            bus: RefCell::new(None),
            polkitd: RefCell::new(None),
            daemon: RefCell::new(None),
            daemon_place: RefCell::new(None),
            daemon_args: RefCell::new(Vec::new()),
            shared: RefCell::new(None),
            torn_down: RefCell::new(false),
        };
        // From here on, Drop tears down whatever exists.
        let mut bed = bed;
        bed.setup_inner()?;
        Ok(bed)
    }

    fn setup_inner(&mut self) -> Result<(), String> {
        let e = |what: &str, err: std::io::Error| format!("{what}: {err}");
        fs::create_dir_all(&self.run_dir).map_err(|err| e("create run dir", err))?;
        // polkitd (user polkitd) and the test users must reach the socket.
        fs::set_permissions(&self.run_dir, fs::Permissions::from_mode(0o755))
            .map_err(|err| e("chmod run dir", err))?;
        fs::create_dir_all(&self.state_dir).map_err(|err| e("create state dir", err))?;

        *self.shared.borrow_mut() = Some(Shared::enter()?);
        for u in [MEMBER, PLAIN, OWN, TENANT, TENANT2, OTHERS_ONLY] {
            let out = run("id", &["-u", u]);
            let uid = out
                .stdout
                .trim()
                .parse()
                .map_err(|_| format!("uid of {u}: {out:?}"))?;
            self.uids.insert(u, uid);
        }

        self.start_bus()?;
        self.start_polkitd()?;
        // The daemon is started by the runner (Bed::start_daemon), so a daemon that
        // does not come up fails its tests but not the ones that need bus + polkit only.
        Ok(())
    }

    fn start_bus(&self) -> Result<(), String> {
        let conf = self.run_dir.join("bus.conf");
        let text = format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"#,
            self.socket.display()
        );
        fs::write(&conf, text).map_err(|e| format!("write {}: {e}", conf.display()))?;
        *self.bus.borrow_mut() = Some(spawn_bus(&conf)?);
        Ok(())
    }

    /// A second, system-like bus (default deny, like /usr/share/dbus-1/system.conf)
    /// with `extra` (e.g. an `<include>` of the project's policy) added; stopped on drop.
    pub fn start_strict_bus(&self, name: &str, extra: &str) -> BusGuard {
        let socket = self.run_dir.join(name);
        let conf = self.run_dir.join(format!("{name}.conf"));
        let text = format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
  {extra}
</busconfig>
"#,
            socket.display()
        );
        fs::write(&conf, text).expect("write strict bus config");
        let child = spawn_bus(&conf).unwrap_or_else(|e| panic!("strict bus: {e}"));
        BusGuard {
            child,
            address: format!("unix:path={}", socket.display()),
        }
    }

    fn start_polkitd(&self) -> Result<(), String> {
        let log = self.log_file("polkitd.log")?;
        let child = Command::new(POLKITD)
            .arg("--no-debug")
            .env("DBUS_SYSTEM_BUS_ADDRESS", &self.address)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("start {POLKITD}: {e}"))?;
        *self.polkitd.borrow_mut() = Some(child);
        self.wait_for_name(
            "org.freedesktop.PolicyKit1",
            Duration::from_secs(15),
            || {
                let mut p = self.polkitd.borrow_mut();
                match p.as_mut().map(|c| c.try_wait()) {
                    Some(Ok(Some(st))) => Some(format!(
                        "polkitd exited ({st}):\n{}",
                        fs::read_to_string(self.run_dir.join("polkitd.log")).unwrap_or_default()
                    )),
                    _ => None,
                }
            },
        )
    }

    /// SIGKILL polkitd (a crash in the middle of calls) and reap it.
    pub fn kill9_polkitd(&self) {
        if let Some(mut child) = self.polkitd.borrow_mut().take() {
            signal(child.id(), libc::SIGKILL);
            child.wait().ok();
        }
    }

    /// Freeze polkitd (SIGSTOP): calls that reach it from now on wait for an answer
    /// that only comes after [`Bed::kill9_polkitd`] (as an error) — a kill window
    /// that does not depend on how fast the machine is.
    pub fn stop_polkitd(&self) {
        if let Some(child) = self.polkitd.borrow().as_ref() {
            signal(child.id(), libc::SIGSTOP);
        }
    }

    /// Start polkitd again after [`Bed::kill9_polkitd`]; returns once it owns its name.
    pub fn restart_polkitd(&self) -> Result<(), String> {
        self.kill9_polkitd();
        self.start_polkitd()
    }

    fn log_file(&self, name: &str) -> Result<fs::File, String> {
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.run_dir.join(name))
            .map_err(|e| format!("open log {name}: {e}"))
    }

    /// Wait until `name` has an owner on the bus; `dead` says whether the process that
    /// should take it has died (then fail at once with its message).
    fn wait_for_name(
        &self,
        name: &str,
        limit: Duration,
        dead: impl Fn() -> Option<String>,
    ) -> Result<(), String> {
        let t = Instant::now();
        loop {
            if self.name_has_owner(name) {
                return Ok(());
            }
            if let Some(msg) = dead() {
                return Err(msg);
            }
            if t.elapsed() > limit {
                return Err(format!("{name} not owned on the bus after {limit:?}"));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn name_has_owner(&self, name: &str) -> bool {
        self.name_has_owner_at(&self.address, name)
    }

    /// Whether `name` has an owner on the bus at `addr`.
    pub fn name_has_owner_at(&self, addr: &str, name: &str) -> bool {
        let out = self.busctl_at(
            addr,
            "root",
            &[
                "call",
                "org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus",
                "NameHasOwner",
                "s",
                name,
            ],
        );
        out.ok() && out.json_data() == serde_json::json!([true])
    }

    /// GetManagedObjects of the daemon as `user` on the bus at `addr`.
    pub fn managed_objects_at(&self, addr: &str, user: &str) -> Out {
        self.busctl_at(
            addr,
            user,
            &[
                "call",
                BUS_NAME,
                MANAGER_PATH,
                "org.freedesktop.DBus.ObjectManager",
                "GetManagedObjects",
            ],
        )
    }

    // ---- the daemon --------------------------------------------------------

    pub fn daemon_bin() -> &'static str {
        env!("CARGO_BIN_EXE_dindhelperd")
    }

    pub fn ctl_bin() -> &'static str {
        env!("CARGO_BIN_EXE_dindhelperctl")
    }

    pub fn start_daemon(&self) -> Result<(), String> {
        let log = self.log_file("daemon.log")?;
        writeln!(&log, "==== dindhelperd starting (bed) ====").ok();
        // In another netns: `nsenter --net=NS dindhelperd …` (nsenter execs, so the child
        // pid is the daemon's and kill9_daemon/stop_daemon work unchanged).
        let place = self.daemon_place.borrow().clone();
        let mut cmd = match &place {
            None => Command::new(Self::daemon_bin()),
            Some((netns, docker_host)) => {
                writeln!(
                    &log,
                    "(in {}; --docker-host {docker_host})",
                    netns.display()
                )
                .ok();
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", netns.display()))
                    .arg(Self::daemon_bin())
                    .args(["--docker-host", docker_host]);
                c
            }
        };
        let child = cmd
            .arg("--bus-address")
            .arg(&self.address)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(["--log-level", "debug"])
            .args(self.daemon_args.borrow().iter())
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("start {}: {e}", Self::daemon_bin()))?;
        *self.daemon.borrow_mut() = Some(child);
        self.wait_for_name(BUS_NAME, Duration::from_secs(20), || {
            let mut d = self.daemon.borrow_mut();
            match d.as_mut().map(|c| c.try_wait()) {
                Some(Ok(Some(st))) => Some(format!(
                    "dindhelperd exited ({st}) before it owned {BUS_NAME}; its log:\n{}",
                    self.daemon_log()
                )),
                _ => None,
            }
        })
        .map_err(|e| format!("{e}\ndaemon log:\n{}", self.daemon_log()))
    }

    /// Where the next start_daemon runs the daemon: `Some((netns file, docker host))` runs
    /// it inside that network namespace (dockerd's, for the ports tests); None = here.
    pub fn set_daemon_place(&self, place: Option<(PathBuf, String)>) {
        *self.daemon_place.borrow_mut() = place;
    }

    /// The extra arguments set by [`Bed::set_daemon_args`].
    pub fn daemon_args(&self) -> Vec<String> {
        self.daemon_args.borrow().clone()
    }

    /// Extra arguments for every later (re)start of the daemon; takes effect at the next
    /// [`Bed::restart_daemon`].
    pub fn set_daemon_args(&self, args: &[String]) {
        *self.daemon_args.borrow_mut() = args.to_vec();
    }

    /// SIGTERM the daemon and wait (10 s, then SIGKILL). Returns its exit status.
    pub fn stop_daemon(&self) -> Option<ExitStatus> {
        let mut d = self.daemon.borrow_mut();
        let mut child = d.take()?;
        Some(stop_child(&mut child, Duration::from_secs(10)).expect("wait for dindhelperd"))
    }

    /// Stop (SIGTERM; it must exit 0) and start the daemon again.
    #[track_caller]
    pub fn restart_daemon(&self) {
        if let Some(st) = self.stop_daemon() {
            assert!(
                st.success(),
                "dindhelperd did not exit 0 on SIGTERM: {st}\n{}",
                self.daemon_log()
            );
        }
        self.start_daemon()
            .unwrap_or_else(|e| panic!("restart: {e}"));
    }

    /// SIGKILL the daemon (no chance to clean up) and reap it.
    pub fn kill9_daemon(&self) {
        if let Some(mut child) = self.daemon.borrow_mut().take() {
            signal(child.id(), libc::SIGKILL);
            child.wait().ok();
        }
    }

    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.borrow().as_ref().map(|c| c.id())
    }

    pub fn daemon_log(&self) -> String {
        fs::read_to_string(self.run_dir.join("daemon.log")).unwrap_or_default()
    }

    /// The last `n` lines of the daemon's log (for failure reports).
    pub fn daemon_log_tail(&self, n: usize) -> String {
        let log = self.daemon_log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    // ---- callers -------------------------------------------------------------

    pub fn uid(&self, user: &str) -> u32 {
        if user == "root" {
            return 0;
        }
        self.uids[user]
    }

    /// `busctl --address=… --json=short <args>` as root.
    pub fn busctl(&self, args: &[&str]) -> Out {
        self.busctl_as("root", args)
    }

    /// `busctl` as `user` (via `runuser -u`), or as root for "root".
    pub fn busctl_as(&self, user: &str, args: &[&str]) -> Out {
        self.busctl_at(&self.address, user, args)
    }

    /// `busctl` as `user` on the bus at `addr` (another bus than the bed's).
    pub fn busctl_at(&self, addr: &str, user: &str, args: &[&str]) -> Out {
        let mut cmd = self.as_user(user, "busctl");
        cmd.arg(format!("--address={addr}"))
            .args(["--json=short", "--timeout=30"])
            .args(args);
        run_cmd(&mut cmd)
    }

    /// `busctl call org.dindhelper1 /org/dindhelper1 org.dindhelper1.Manager METHOD SIG ARGS…`
    pub fn call_as(&self, user: &str, method: &str, sig: &str, args: &[&str]) -> Out {
        self.call_iface_as(user, "Manager", method, sig, args)
    }

    /// `busctl call … org.dindhelper1.<iface> METHOD SIG ARGS…` as `user` on the manager
    /// object (`iface` without the `org.dindhelper1.` prefix, e.g. "Instances").
    pub fn call_iface_as(
        &self,
        user: &str,
        iface: &str,
        method: &str,
        sig: &str,
        args: &[&str],
    ) -> Out {
        let iface = format!("org.dindhelper1.{iface}");
        let mut v = vec!["call", BUS_NAME, MANAGER_PATH, &iface, method];
        if !sig.is_empty() {
            v.push(sig);
        }
        v.extend_from_slice(args);
        self.busctl_as(user, &v)
    }

    /// DestroyInstance as root with force and delete_images (clean-up of tests).
    pub fn destroy_instance_forced(&self, name: &str) -> Out {
        self.call_iface_as(
            "root",
            "Instances",
            "DestroyInstance",
            "sa{sv}",
            &[
                name,
                "2",
                "force",
                "b",
                "true",
                "delete_images",
                "b",
                "true",
            ],
        )
    }

    /// gdbus call (it reports the D-Bus error *name*, busctl only the message).
    /// `args` are GVariant text; use [`gv_str`] for strings and `@a{sv} {}` for options.
    pub fn gdbus_as(&self, user: &str, method: &str, args: &[&str]) -> Out {
        let m = format!("{MANAGER_IFACE}.{method}");
        self.gdbus_raw(user, &self.address, BUS_NAME, MANAGER_PATH, &m, args)
    }

    /// gdbus call on any bus/name/object; `method` is `interface.Member`.
    pub fn gdbus_raw(
        &self,
        user: &str,
        address: &str,
        dest: &str,
        path: &str,
        method: &str,
        args: &[&str],
    ) -> Out {
        let mut cmd = self.as_user(user, "gdbus");
        cmd.args(["call", "--address", address, "--dest", dest])
            .args(["--object-path", path, "--timeout", "30"])
            .args(["--method", method, "--"])
            .args(args);
        run_cmd(&mut cmd)
    }

    /// Call `method` as `user` and require the D-Bus error `org.dindhelper1.Error.<kind>`.
    #[track_caller]
    pub fn expect_error(&self, user: &str, method: &str, args: &[&str], kind: &str) -> Out {
        let out = self.gdbus_as(user, method, args);
        let want = format!("org.dindhelper1.Error.{kind}");
        assert_eq!(
            out.dbus_error().as_deref(),
            Some(want.as_str()),
            "{user}: {method}({}) should fail with {want}; exit {}, stdout {:?}, stderr {:?}",
            args.join(", "),
            out.status,
            out.stdout,
            out.stderr
        );
        out
    }

    /// `dindhelperctl --bus-address … <args>` as `user`.
    pub fn ctl_as(&self, user: &str, args: &[&str]) -> Out {
        let mut cmd = self.as_user(user, Self::ctl_bin());
        cmd.arg("--bus-address").arg(&self.address).args(args);
        run_cmd(&mut cmd)
    }

    /// Any program as `user` (runuser), e.g. to prove what a user can read.
    pub fn ctl_like(&self, user: &str, prog: &str, args: &[&str]) -> Out {
        let mut cmd = self.as_user(user, prog);
        cmd.args(args);
        run_cmd(&mut cmd)
    }

    /// `pkcheck --action-id ACTION --process <pid of pkcheck's shell>` as `user`.
    pub fn pkcheck_as(&self, user: &str, action: &str) -> Out {
        let mut cmd = self.as_user(user, "sh");
        cmd.env("DBUS_SYSTEM_BUS_ADDRESS", &self.address).args([
            "-c",
            "exec pkcheck --action-id \"$0\" --process $$",
            action,
        ]);
        run_cmd(&mut cmd)
    }

    fn as_user(&self, user: &str, prog: &str) -> Command {
        if user == "root" {
            Command::new(prog)
        } else {
            let mut c = Command::new("runuser");
            // runuser resets nothing we rely on; pass the bus explicitly anyway.
            c.args(["-u", user, "--", prog]);
            c
        }
    }

    // ---- typed helpers for the loop API ---------------------------------------

    /// CreateImage as `user`; returns the image object path.
    #[track_caller]
    pub fn create_image(&self, user: &str, name: &str, size: u64) -> String {
        let out = self
            .call_as(
                user,
                "CreateImage",
                "sta{sv}",
                &[name, &size.to_string(), "0"],
            )
            .expect_ok(&format!("{user}: CreateImage {name} {size}"));
        out.json_data()[0].as_str().expect("o").to_owned()
    }

    /// AttachImage as `user` with `opts` given as busctl a{sv} words (count first is
    /// added here), e.g. `&["partscan", "b", "true"]`. Returns (object, device).
    #[track_caller]
    pub fn attach_image(&self, user: &str, name: &str, opts: &[&str]) -> (String, String) {
        assert!(
            opts.len() % 3 == 0,
            "options come in name/type/value triples"
        );
        let n = (opts.len() / 3).to_string();
        let mut args = vec![name, n.as_str()];
        args.extend_from_slice(opts);
        let out = self
            .call_as(user, "AttachImage", "sa{sv}", &args)
            .expect_ok(&format!("{user}: AttachImage {name}"));
        let d = out.json_data();
        (
            d[0].as_str().expect("o").to_owned(),
            d[1].as_str().expect("s").to_owned(),
        )
    }

    #[track_caller]
    pub fn detach(&self, user: &str, device: &str) {
        self.call_as(user, "Detach", "sa{sv}", &[device, "0"])
            .expect_ok(&format!("{user}: Detach {device}"));
    }

    #[track_caller]
    pub fn delete_image(&self, user: &str, name: &str) {
        self.call_as(user, "DeleteImage", "sa{sv}", &[name, "0"])
            .expect_ok(&format!("{user}: DeleteImage {name}"));
    }

    /// Rescan as `user`; returns the partitions (number, start, size, type, name, uuid,
    /// node, major, minor) as JSON arrays.
    #[track_caller]
    pub fn rescan(&self, user: &str, device: &str) -> Vec<serde_json::Value> {
        let out = self
            .call_as(user, "Rescan", "sa{sv}", &[device, "0"])
            .expect_ok(&format!("{user}: Rescan {device}"));
        out.json_data()[0].as_array().expect("a(...)").clone()
    }

    /// ListLoops as root: (object, device, backing, size, ro, uid, instance) rows.
    #[track_caller]
    pub fn list_loops(&self) -> Vec<serde_json::Value> {
        let out = self
            .call_as("root", "ListLoops", "", &[])
            .expect_ok("ListLoops");
        out.json_data()[0].as_array().expect("a(...)").clone()
    }

    /// ListImages as root: (object, name, size, uid, device) rows.
    #[track_caller]
    pub fn list_images(&self) -> Vec<serde_json::Value> {
        let out = self
            .call_as("root", "ListImages", "", &[])
            .expect_ok("ListImages");
        out.json_data()[0].as_array().expect("a(...)").clone()
    }

    /// Where the daemon keeps `user`'s image `name`.
    pub fn image_path(&self, user: &str, name: &str) -> PathBuf {
        self.state_dir
            .join("images")
            .join(self.uid(user).to_string())
            .join(format!("{name}.img"))
    }

    /// Every file below the state dir's `images/` (to prove bad input changed nothing).
    pub fn image_files(&self) -> Vec<PathBuf> {
        fn walk(p: &Path, out: &mut Vec<PathBuf>) {
            if let Ok(rd) = fs::read_dir(p) {
                for e in rd.flatten() {
                    let p = e.path();
                    if p.is_dir() {
                        walk(&p, out);
                    }
                    out.push(p);
                }
            }
        }
        let mut v = Vec::new();
        walk(&self.state_dir.join("images"), &mut v);
        v.sort();
        v
    }

    /// Loop devices (`loopN`) whose backing file lies in this bed's state dir, from sysfs.
    pub fn kernel_loops_in_state(&self) -> Vec<String> {
        loops_backed_under(&self.state_dir)
    }

    /// A scratch path under the run dir (unique per call site name).
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.run_dir.join(name)
    }

    // ---- teardown ----------------------------------------------------------------

    /// Tear everything down; returns every failure (never stops at the first).
    pub fn teardown(&self) -> Vec<String> {
        if self.torn_down.replace(true) {
            return Vec::new();
        }
        let mut errs = Vec::new();
        if let Some(st) = self.stop_daemon() {
            if !st.success() {
                errs.push(format!("dindhelperd exited with {st} on SIGTERM"));
            }
        }
        // Unmount whatever a test left mounted below the run dir.
        for m in mounts_under(&self.run_dir) {
            let out = run("umount", &["-l", &m]);
            if !out.ok() {
                errs.push(format!("umount {m}: {}", out.stderr.trim()));
            }
        }
        // Loop devices backed by our images: only this bed's daemon made them.
        for dev in self.kernel_loops_in_state() {
            let out = run("losetup", &["-d", &format!("/dev/{dev}")]);
            if !out.ok() {
                errs.push(format!("losetup -d /dev/{dev}: {}", out.stderr.trim()));
            }
        }
        for (name, slot) in [("polkitd", &self.polkitd), ("dbus-daemon", &self.bus)] {
            if let Some(mut c) = slot.borrow_mut().take() {
                if let Err(e) = stop_child(&mut c, Duration::from_secs(5)) {
                    errs.push(format!("stop {name}: {e}"));
                }
            }
        }
        if let Some(shared) = self.shared.borrow_mut().take() {
            errs.extend(shared.leave());
        }
        if std::env::var_os("DHT_KEEP").is_none() {
            for d in [&self.state_dir, &self.run_dir] {
                if d.exists() {
                    if let Err(e) = fs::remove_dir_all(d) {
                        errs.push(format!("remove {}: {e}", d.display()));
                    }
                }
            }
        }
        errs
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        for e in self.teardown() {
            eprintln!("bed teardown: {e}");
        }
    }
}

/// `loopN` devices whose sysfs backing_file starts with `dir`.
pub fn loops_backed_under(dir: &Path) -> Vec<String> {
    let prefix = dir.to_string_lossy().into_owned() + "/";
    let mut v = Vec::new();
    if let Ok(rd) = fs::read_dir("/sys/block") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with("loop") {
                continue;
            }
            if let Ok(b) = fs::read_to_string(e.path().join("loop/backing_file")) {
                if b.trim().starts_with(&prefix) {
                    v.push(name);
                }
            }
        }
    }
    v.sort();
    v
}

/// The kernel's partitions of `/dev/loopN`: (number, start sector, size in sectors).
pub fn kernel_partitions(device: &str) -> Vec<(u32, u64, u64)> {
    let dev = device.trim_start_matches("/dev/");
    let mut v = Vec::new();
    if let Ok(rd) = fs::read_dir(format!("/sys/block/{dev}")) {
        for e in rd.flatten() {
            let p = e.path();
            let rd = |f: &str| -> Option<u64> {
                fs::read_to_string(p.join(f)).ok()?.trim().parse().ok()
            };
            if let (Some(n), Some(s), Some(z)) = (rd("partition"), rd("start"), rd("size")) {
                v.push((n as u32, s, z));
            }
        }
    }
    v.sort();
    v
}

/// (major, minor) of a block device from sysfs (`loop3`, `/dev/loop3p1`).
pub fn sysfs_dev(name: &str) -> Option<(u32, u32)> {
    let base = name.trim_start_matches("/dev/");
    let path = match base.strip_prefix("loop").and_then(|r| r.split_once('p')) {
        Some((n, _)) => format!("/sys/block/loop{n}/{base}/dev"),
        None => format!("/sys/block/{base}/dev"),
    };
    let s = fs::read_to_string(path).ok()?;
    let (a, b) = s.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.to_string_lossy().into_owned() + "/";
    let mut v: Vec<String> = fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
        .filter(|m| m.starts_with(&prefix))
        .collect();
    v.reverse(); // innermost first
    v
}

// ---- guards ----------------------------------------------------------------------

/// A loop device the *test* attached with losetup (not the daemon); detached on drop.
pub struct LoopGuard {
    pub device: String,
}

impl LoopGuard {
    #[track_caller]
    pub fn attach(file: &Path) -> LoopGuard {
        let out =
            run("losetup", &["-f", "--show", &file.to_string_lossy()]).expect_ok("losetup -f");
        LoopGuard {
            device: out.stdout.trim().to_owned(),
        }
    }
}

impl Drop for LoopGuard {
    fn drop(&mut self) {
        let out = run("losetup", &["-d", &self.device]);
        if !out.ok() {
            eprintln!(
                "LoopGuard: losetup -d {}: {}",
                self.device,
                out.stderr.trim()
            );
        }
    }
}

/// A mount made by a test; unmounted (lazily if busy) on drop, mount point removed.
pub struct MountGuard {
    pub target: PathBuf,
}

impl MountGuard {
    #[track_caller]
    pub fn mount(source: &str, target: &Path) -> MountGuard {
        fs::create_dir_all(target).expect("mkdir mount point");
        run("mount", &[source, &target.to_string_lossy()]).expect_ok("mount");
        MountGuard {
            target: target.to_owned(),
        }
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        let t = self.target.to_string_lossy().into_owned();
        if !run("umount", &[&t]).ok() {
            let out = run("umount", &["-l", &t]);
            if !out.ok() {
                eprintln!("MountGuard: umount {t}: {}", out.stderr.trim());
            }
        }
        fs::remove_dir(&self.target).ok();
    }
}

/// A loop device the *daemon* attached for a test; detached through the API on drop
/// (falls back to `losetup -d` so a failing test never leaks it).
pub struct DaemonLoop<'b> {
    pub bed: &'b Bed,
    pub user: &'static str,
    pub device: String,
    pub object: String,
}

impl<'b> DaemonLoop<'b> {
    #[track_caller]
    pub fn attach(bed: &'b Bed, user: &'static str, image: &str, opts: &[&str]) -> Self {
        let (object, device) = bed.attach_image(user, image, opts);
        DaemonLoop {
            bed,
            user,
            device,
            object,
        }
    }

    /// Detach now through the API (the test wants to see it succeed).
    #[track_caller]
    pub fn detach(self) {
        self.bed.detach(self.user, &self.device);
        std::mem::forget(self);
    }
}

impl Drop for DaemonLoop<'_> {
    fn drop(&mut self) {
        let out = self
            .bed
            .call_as("root", "Detach", "sa{sv}", &[&self.device, "0"]);
        let name = self.device.trim_start_matches("/dev/");
        if !out.ok()
            && loops_backed_under(&self.bed.state_dir)
                .iter()
                .any(|d| d == name)
        {
            run("losetup", &["-d", &self.device]);
        }
    }
}

// ---- machine-wide shared resources ------------------------------------------------

/// Policy files, users and group, shared by every bed alive at the same time.
struct Shared {
    lock: fs::File,
}

fn flock(f: &fs::File, op: libc::c_int) {
    // SAFETY: flock(2) on an fd we own.
    unsafe {
        libc::flock(f.as_raw_fd(), op);
    }
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

impl Shared {
    fn open_locked() -> Result<fs::File, String> {
        fs::create_dir_all(format!("{SHARED_DIR}/backup"))
            .map_err(|e| format!("{SHARED_DIR}: {e}"))?;
        let f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(format!("{SHARED_DIR}/lock"))
            .map_err(|e| format!("{SHARED_DIR}/lock: {e}"))?;
        flock(&f, libc::LOCK_EX);
        Ok(f)
    }

    fn record(line: &str) {
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(format!("{SHARED_DIR}/created"))
            .expect("record");
        writeln!(f, "{line}").expect("record");
    }

    fn records() -> Vec<String> {
        fs::read_to_string(format!("{SHARED_DIR}/created"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Register this bed, then install files, users and group (what is missing).
    fn enter() -> Result<Shared, String> {
        let lock = Self::open_locked()?;
        fs::write(format!("{SHARED_DIR}/bed.{}", std::process::id()), b"")
            .map_err(|e| format!("register bed: {e}"))?;
        let shared = Shared { lock };
        match Self::install() {
            Ok(()) => {
                flock(&shared.lock, libc::LOCK_UN);
                Ok(shared)
            }
            Err(e) => {
                let errs = shared.leave();
                Err(if errs.is_empty() {
                    e
                } else {
                    format!("{e}; cleaning up: {}", errs.join("; "))
                })
            }
        }
    }

    fn install() -> Result<(), String> {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let files: [(PathBuf, &str); 3] = [
            (
                repo.join("polkit/org.dindhelper1.policy"),
                "/usr/share/polkit-1/actions/org.dindhelper1.policy",
            ),
            (
                repo.join("polkit/50-dindhelper.rules"),
                "/etc/polkit-1/rules.d/50-dindhelper.rules",
            ),
            (PathBuf::new(), TEST_RULES),
        ];
        let records = Self::records();
        for (src, dest) in files {
            let want = if src.as_os_str().is_empty() {
                TEST_RULES_TEXT.as_bytes().to_vec()
            } else {
                fs::read(&src).map_err(|e| format!("{}: {e}", src.display()))?
            };
            let mine = records.iter().any(|r| r == &format!("file {dest}"))
                || records
                    .iter()
                    .any(|r| r.starts_with(&format!("restore {dest} ")));
            match fs::read(dest) {
                Ok(have) if have == want => {}
                Ok(_) if mine => {}
                Ok(_) => {
                    let backup = format!(
                        "{SHARED_DIR}/backup/{}",
                        Path::new(dest).file_name().unwrap().to_string_lossy()
                    );
                    fs::copy(dest, &backup).map_err(|e| format!("back up {dest}: {e}"))?;
                    Self::record(&format!("restore {dest} {backup}"));
                }
                Err(_) => Self::record(&format!("file {dest}")),
            }
            if let Some(parent) = Path::new(dest).parent() {
                if !parent.exists() {
                    return Err(format!(
                        "{} is missing: is polkitd installed?",
                        parent.display()
                    ));
                }
            }
            fs::write(dest, &want).map_err(|e| format!("install {dest}: {e}"))?;
            fs::set_permissions(dest, fs::Permissions::from_mode(0o644))
                .map_err(|e| format!("chmod {dest}: {e}"))?;
        }

        for g in [GROUP, TENANT_GROUP] {
            if !run("getent", &["group", g]).ok() {
                run("groupadd", &["--system", g]).expect_ok_or(format!("groupadd {g}"))?;
                Self::record(&format!("group {g}"));
            }
        }
        for (user, group) in [
            (MEMBER, Some(GROUP)),
            (PLAIN, None),
            (OWN, None),
            (TENANT, Some(TENANT_GROUP)),
            (TENANT2, Some(TENANT_GROUP)),
            (OTHERS_ONLY, None),
        ] {
            if !run("id", &["-u", user]).ok() {
                let mut args = vec![
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                ];
                if let Some(g) = group {
                    args.extend(["-G", g]);
                }
                args.push(user);
                run("useradd", &args).expect_ok_or(format!("useradd {user}"))?;
                Self::record(&format!("user {user}"));
            }
            let groups = run("id", &["-nG", user]).stdout;
            for g in [GROUP, TENANT_GROUP] {
                let is_in = groups.split_whitespace().any(|x| x == g);
                if group == Some(g) && !is_in {
                    run("usermod", &["-aG", g, user]).expect_ok_or(format!("usermod {user}"))?;
                }
                if group != Some(g) && is_in {
                    return Err(format!(
                        "user {user} exists and is in group {g}: the tests need it outside"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Unregister; the last live bed undoes every record. Returns failures.
    fn leave(self) -> Vec<String> {
        let mut errs = Vec::new();
        flock(&self.lock, libc::LOCK_EX);
        let me = std::process::id();
        fs::remove_file(format!("{SHARED_DIR}/bed.{me}")).ok();
        let others = fs::read_dir(SHARED_DIR)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        let pid: u32 = n.strip_prefix("bed.")?.parse().ok()?;
                        if pid_alive(pid) {
                            Some(pid)
                        } else {
                            fs::remove_file(e.path()).ok();
                            None
                        }
                    })
                    .count()
            })
            .unwrap_or(0);
        if others == 0 {
            for r in Self::records().iter().rev() {
                let words: Vec<&str> = r.split(' ').collect();
                let res = match words.as_slice() {
                    ["file", dest] => {
                        fs::remove_file(dest).map_err(|e| format!("remove {dest}: {e}"))
                    }
                    ["restore", dest, backup] => fs::copy(backup, dest)
                        .map(|_| ())
                        .map_err(|e| format!("restore {dest}: {e}")),
                    ["user", u] => run("userdel", &[u])
                        .expect_ok_or(format!("userdel {u}"))
                        .map(|_| ()),
                    ["group", g] => run("groupdel", &[g])
                        .expect_ok_or(format!("groupdel {g}"))
                        .map(|_| ()),
                    _ => Err(format!("unknown record {r:?}")),
                };
                if let Err(e) = res {
                    errs.push(e);
                }
            }
            fs::remove_file(format!("{SHARED_DIR}/created")).ok();
            fs::remove_dir_all(format!("{SHARED_DIR}/backup")).ok();
        }
        flock(&self.lock, libc::LOCK_UN);
        errs
    }
}

trait ExpectOkOr {
    fn expect_ok_or(self, what: String) -> Result<Out, String>;
}

impl ExpectOkOr for Out {
    fn expect_ok_or(self, what: String) -> Result<Out, String> {
        if self.ok() {
            Ok(self)
        } else {
            Err(format!(
                "{what}: exit {}: {}",
                self.status,
                self.stderr.trim()
            ))
        }
    }
}

/// sfdisk that writes the table only (this kernel cannot parse tables; Rescan syncs it):
/// `extra` before the device, `tail` after it (e.g. `--delete` … `2`), `script` on stdin.
pub fn sfdisk(dev: &str, extra: &[&str], tail: &[&str], script: &str) -> Out {
    let mut child = Command::new("sfdisk")
        .args([
            "--no-reread",
            "--no-tell-kernel",
            "--force",
            "--quiet",
            "--lock=no",
        ])
        .args(extra)
        .arg(dev)
        .args(tail)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sfdisk");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("script");
    let o = child.wait_with_output().expect("sfdisk");
    Out {
        status: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}
