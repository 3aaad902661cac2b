//! The Docker fixtures of the integration bed, in one place (they used to be copied per
//! module): both start dockerd with `tests/common/dockerd.rs` (its own netns `<tag>-…-d`,
//! a client netns on a veth, image `bb:latest` from busybox-static).
//!
//! - [`shared`]: one dockerd for the whole run (tag `dhd`, container `web` published on
//!   8080 by Docker), the bed's daemon restarted with `--docker-host` pointing at it (the
//!   daemon stays in the host's netns). Captures and devices use it. Stopped by an
//!   `atexit` handler after the runner tore the bed down (the runner has no per-module
//!   teardown; the handler also runs when the run fails).
//! - [`DaemonInDockerd`]: a fresh dockerd for one test, with the bed's daemon moved into
//!   its netns ([`Bed::set_daemon_place`]): the ports need Docker's chains there; devices,
//!   instances and captures work there too. Undone on drop.
//!
//! Plus the container helpers the modules share ([`start_container`], [`in_container`]).

use crate::bed::Bed;
use crate::dockerd::Dockerd;
use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

static DOCKERD: Mutex<Option<Dockerd>> = Mutex::new(None);

extern "C" fn stop_dockerd() {
    let d = DOCKERD.lock().unwrap_or_else(|e| e.into_inner()).take();
    drop(d);
}

/// The run's dockerd (started on first use, with the daemon restarted to use it).
pub(crate) fn shared<R>(bed: &Bed, f: impl FnOnce(&Dockerd) -> R) -> R {
    let mut g = DOCKERD.lock().unwrap_or_else(|e| e.into_inner());
    if g.is_none() {
        // Registered before the start, so a half-started fixture is cleaned too.
        // SAFETY: registering a plain extern "C" fn.
        unsafe { libc::atexit(stop_dockerd) };
        let d = Dockerd::start_tagged("dhd", false);
        d.run_web("web", "/www", &["-p", "8080:80"]);
        assert!(
            d.wait_curl(8080, "hello", Duration::from_secs(20))
                .is_some(),
            "web does not answer on 10.99.0.1:8080 from the client netns; dockerd log:\n{}",
            d.log_tail()
        );
        *g = Some(d);
    }
    let d = g.as_ref().expect("dockerd");
    // Other modules (ports, provision, ctl, crash) start the daemon with arguments or a
    // place of their own and clear them afterwards: point it at this dockerd again
    // whenever it is not. The plain-path form (documented as valid): it used to leave
    // captures and ExposeToContainer without a Docker client (issue 12); unix:// is used
    // elsewhere.
    let want = vec!["--docker-host".to_owned(), d.socket.display().to_string()];
    if bed.daemon_args() != want {
        bed.set_daemon_args(&want);
        bed.restart_daemon();
    }
    f(d)
}

/// A fresh dockerd + the bed's daemon moved into its netns; undone on drop.
pub struct DaemonInDockerd<'b> {
    bed: &'b Bed,
    d: Option<Dockerd>,
}

impl<'b> DaemonInDockerd<'b> {
    /// `tag`: the helper tag of dockerd's namespaces and dirs (one per module).
    #[track_caller]
    pub fn new(bed: &'b Bed, tag: &str) -> DaemonInDockerd<'b> {
        DaemonInDockerd::with_args(bed, tag, &[])
    }

    /// The same with extra dockerd arguments (e.g. [`crate::dockerd::IPV6_ARGS`]).
    #[track_caller]
    pub fn with_args(bed: &'b Bed, tag: &str, extra: &[&str]) -> DaemonInDockerd<'b> {
        let d = Dockerd::start_args(tag, false, extra);
        let env = DaemonInDockerd { bed, d: Some(d) };
        bed.stop_daemon();
        // The place gives --docker-host (the shared fixture may have set it as an
        // argument; two would be a usage error). Not restored: `shared` sets it again.
        bed.set_daemon_args(&[]);
        bed.set_daemon_place(Some((
            env.d().ns_path(),
            format!("unix://{}", env.d().socket.display()),
        )));
        bed.start_daemon()
            .unwrap_or_else(|e| panic!("daemon in dockerd's netns: {e}"));
        env
    }

    pub fn d(&self) -> &Dockerd {
        self.d.as_ref().expect("dockerd")
    }

    /// For stopping / starting dockerd itself.
    pub fn d_mut(&mut self) -> &mut Dockerd {
        self.d.as_mut().expect("dockerd")
    }
}

impl Drop for DaemonInDockerd<'_> {
    fn drop(&mut self) {
        // Whatever a failed test left through the API: mappings (per container, so the
        // state holds nothing of this dockerd), then instances (with their loops, images).
        let list = |iface: &str, method: &str, col: usize| -> BTreeSet<String> {
            let out = self.bed.call_iface_as("root", iface, method, "", &[]);
            if !out.ok() {
                return BTreeSet::new();
            }
            let rows = out.json_data()[0].as_array().cloned().unwrap_or_default();
            rows.iter()
                .filter_map(|r| r[col].as_str().map(str::to_owned))
                .collect()
        };
        for cid in list("Ports", "ListMappings", 3) {
            self.bed.call_iface_as(
                "root",
                "Ports",
                "UnpublishContainer",
                "sa{sv}",
                &[&cid, "0"],
            );
        }
        for name in list("Instances", "ListInstances", 1) {
            self.bed.destroy_instance_forced(&name);
        }
        self.bed.stop_daemon();
        self.bed.set_daemon_place(None);
        drop(self.d.take());
        if let Err(e) = self.bed.start_daemon() {
            eprintln!("DaemonInDockerd: the bed's daemon did not come back: {e}");
        }
    }
}

/// `docker run -d --name NAME [extra] bb:latest busybox sleep` (an earlier one removed).
pub fn start_container(d: &Dockerd, name: &str, extra: &[&str]) {
    let _ = d.docker(&["rm", "-f", name]);
    let mut args = vec!["run", "-d", "--name", name];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["bb:latest", "/bin/busybox", "sleep", "100000"]);
    d.docker_ok(&args);
}

/// `docker exec NAME busybox sh -c SCRIPT`: (success, stdout+stderr).
pub fn in_container(d: &Dockerd, name: &str, script: &str) -> (bool, String) {
    let o = d.docker(&["exec", name, "/bin/busybox", "sh", "-c", script]);
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}
