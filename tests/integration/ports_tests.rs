//! Published ports through the real daemon, over the private bus with polkit, against a
//! real dockerd in its own network namespace (fixture `tests/common/dockerd.rs`, names
//! under helper tag `dhr`).
//!
//! Each test builds a [`PortsEnv`]: a fresh dockerd (netns `dhr-<pid>-<n>-d`) and client
//! netns joined by a veth (client 10.99.0.2 → dockerd netns 10.99.0.1); the bed's daemon is
//! stopped and started again INSIDE dockerd's netns (`nsenter --net=…`) with
//! `--docker-host`, as in production where it runs in the netns that holds Docker's
//! chains. On drop the env unpublishes what is left, stops that daemon, stops dockerd,
//! deletes the namespaces and starts the bed's normal daemon again (the bus name is
//! unique, so two daemons cannot share the bus). Nothing touches the host netns firewall.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::bed::{gv_str, Bed, Out, BUS_NAME, MANAGER_PATH, MEMBER, OWN, PLAIN};
use crate::docker::DaemonInDockerd;
use crate::dockerd::Dockerd;
use crate::Test;

const PORTS_IFACE: &str = "org.dindhelper1.Ports";
const PORT_IFACE: &str = "org.dindhelper1.Port";

pub fn tests() -> Vec<Test> {
    let t = |name, run| Test {
        name,
        needs_daemon: true,
        run,
    };
    vec![
        t(
            "ports_without_dockerd_answer_clearly_and_daemon_serves",
            without_dockerd_answer_clearly_and_daemon_serves,
        ),
        t(
            "ports_publish_as_member_reaches_container_and_unpublish_cuts_it",
            publish_as_member_reaches_container_and_unpublish_cuts_it,
        ),
        t(
            "ports_refusals_are_named_and_write_nothing",
            refusals_are_named_and_write_nothing,
        ),
        t(
            "ports_published_port_survives_dockerd_restart",
            published_port_survives_dockerd_restart,
        ),
        t(
            "ports_daemon_started_while_dockerd_is_down_catches_up",
            daemon_started_while_dockerd_is_down_catches_up,
        ),
        t(
            "ports_rule_follows_container_restart_to_new_ip",
            rule_follows_container_restart_to_new_ip,
        ),
        t(
            "ports_docker_rm_removes_rules_and_mapping_object",
            docker_rm_removes_rules_and_mapping_object,
        ),
        t(
            "ports_kept_docker_facts_follow_replace_rename_restart_stop",
            kept_docker_facts_follow_replace_rename_restart_stop,
        ),
        t(
            "ports_kill9_restart_keeps_rules_without_duplicates",
            kill9_restart_keeps_rules_without_duplicates,
        ),
        t(
            "ports_ten_concurrent_callers_publish_200_ports",
            ten_concurrent_callers_publish_200_ports,
        ),
        t(
            "ports_ipv6_tcp_passes_over_ipv6_and_unpublish_restores_ip6tables",
            ipv6_tcp_passes_over_ipv6_and_unpublish_restores_ip6tables,
        ),
        t(
            "ports_ipv6_only_family_and_ipv6_host_ip_write_ip6tables_only",
            ipv6_only_family_and_ipv6_host_ip_write_ip6tables_only,
        ),
        t(
            "ports_network_connect_disconnect_followed",
            network_connect_disconnect_followed,
        ),
    ]
}

/// dockerd + the bed's daemon moved into dockerd's netns ([`DaemonInDockerd`]); undone on
/// drop (it also unpublishes what a test left).
struct PortsEnv<'b> {
    bed: &'b Bed,
    env: DaemonInDockerd<'b>,
}

impl<'b> PortsEnv<'b> {
    #[track_caller]
    fn new(bed: &'b Bed) -> PortsEnv<'b> {
        PortsEnv::with_args(bed, &[])
    }

    /// The same with extra dockerd arguments (a private dockerd, stopped by pid on drop).
    #[track_caller]
    fn with_args(bed: &'b Bed, extra: &[&str]) -> PortsEnv<'b> {
        PortsEnv {
            bed,
            env: DaemonInDockerd::with_args(bed, "dhr", extra),
        }
    }

    fn d(&self) -> &Dockerd {
        self.env.d()
    }

    /// Publish through the bus as `user`; `opts` are busctl a{sv} triples.
    fn publish(
        &self,
        user: &str,
        container: &str,
        proto: &str,
        h: u16,
        c: u16,
        opts: &[&str],
    ) -> Out {
        let n = (opts.len() / 3).to_string();
        let (hs, cs) = (h.to_string(), c.to_string());
        let mut args = vec![
            "call",
            BUS_NAME,
            MANAGER_PATH,
            PORTS_IFACE,
            "Publish",
            "ssqqa{sv}",
            container,
            proto,
            &hs,
            &cs,
            &n,
        ];
        args.extend_from_slice(opts);
        self.bed.busctl_as(user, &args)
    }

    #[track_caller]
    fn publish_ok(&self, user: &str, container: &str, h: u16, c: u16) -> String {
        let out = self
            .publish(user, container, "tcp", h, c, &[])
            .expect_ok(&format!("{user}: Publish {container} {h}:{c}"));
        out.json_data()[0].as_str().expect("o").to_owned()
    }

    fn call(&self, user: &str, method: &str, sig: &str, args: &[&str]) -> Out {
        self.bed.call_iface_as(user, "Ports", method, sig, args)
    }

    /// gdbus call of a Ports method (reports the D-Bus error name).
    #[track_caller]
    fn expect_error(&self, user: &str, method: &str, args: &[&str], kind: &str) {
        let out = self.bed.gdbus_raw(
            user,
            &self.bed.address,
            BUS_NAME,
            MANAGER_PATH,
            &format!("{PORTS_IFACE}.{method}"),
            args,
        );
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
    }

    /// ListMappings rows.
    #[track_caller]
    fn list(&self) -> Vec<serde_json::Value> {
        let out = self
            .call("root", "ListMappings", "", &[])
            .expect_ok("ListMappings");
        out.json_data()[0].as_array().expect("a(...)").clone()
    }

    /// A property of a mapping object; None when the object does not exist.
    fn prop(&self, path: &str, name: &str) -> Option<serde_json::Value> {
        let out = self
            .bed
            .busctl(&["get-property", BUS_NAME, path, PORT_IFACE, name]);
        out.ok().then(|| out.json_data())
    }

    /// Every rule line tagged `dindhelper:` in dockerd's netns (nat + filter).
    fn tagged(&self) -> Vec<String> {
        let out = self.d().in_ns(&["iptables-nft-save"]);
        assert!(out.status.success(), "iptables-nft-save: {out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("dindhelper:"))
            .map(str::to_owned)
            .collect()
    }

    /// The tagged rules, asserting there are `n` and no line twice.
    #[track_caller]
    fn assert_tagged(&self, n: usize) -> Vec<String> {
        let t = self.tagged();
        let uniq: HashSet<&String> = t.iter().collect();
        assert_eq!(
            uniq.len(),
            t.len(),
            "duplicate tagged rules:\n{}",
            t.join("\n")
        );
        assert_eq!(t.len(), n, "tagged rules:\n{}", t.join("\n"));
        t
    }

    /// The daemon's effective state (snapshot + journal), as JSON text.
    fn state_json(&self) -> String {
        dindhelper::state::effective_json(&self.bed.state_dir)
            .map(|v| v.to_string())
            .unwrap_or_default()
    }

    fn persisted_ids(&self) -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(&self.state_json()).expect("state.json");
        v["mappings"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|m| m["id"].as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// `busctl monitor` on the bed's bus (root); `finish` stops it and returns what it saw.
struct Monitor(Option<std::process::Child>);

impl Monitor {
    fn start(bed: &Bed) -> Monitor {
        let child = std::process::Command::new("busctl")
            .arg(format!("--address={}", bed.address))
            .arg("monitor")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("busctl monitor");
        std::thread::sleep(Duration::from_millis(300));
        Monitor(Some(child))
    }

    fn finish(mut self) -> String {
        std::thread::sleep(Duration::from_millis(200));
        let child = self.0.take().unwrap();
        // SAFETY: kill(2) on the busctl we started.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let out = child.wait_with_output().expect("monitor output");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[track_caller]
fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    loop {
        if f() {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn gv_q(n: u16) -> String {
    format!("uint16 {n}")
}

/// The bed's normal daemon runs in this (host) netns with no dockerd: it started, and the
/// ports calls answer with a named error and a reason instead of hanging or crashing.
fn without_dockerd_answer_clearly_and_daemon_serves(bed: &Bed) {
    let out = bed.gdbus_raw(
        MEMBER,
        &bed.address,
        BUS_NAME,
        MANAGER_PATH,
        &format!("{PORTS_IFACE}.Publish"),
        &[
            &gv_str("web"),
            &gv_str("tcp"),
            &gv_q(8080),
            &gv_q(80),
            "@a{sv} {}",
        ],
    );
    let name = out.dbus_error();
    assert!(
        matches!(
            name.as_deref(),
            Some("org.dindhelper1.Error.NotSupported" | "org.dindhelper1.Error.Failed")
        ),
        "Publish without dockerd: {out:?}"
    );
    assert!(
        out.stderr.contains("DOCKER chain") || out.stderr.contains("dockerd"),
        "the message should say why: {}",
        out.stderr
    );
    let out = bed
        .busctl(&["call", BUS_NAME, MANAGER_PATH, PORTS_IFACE, "ListMappings"])
        .expect_ok("ListMappings");
    assert_eq!(out.json_data(), serde_json::json!([[]]));
    // the Manager still serves
    bed.busctl(&[
        "call",
        BUS_NAME,
        MANAGER_PATH,
        "org.dindhelper1.Manager",
        "ListLoops",
    ])
    .expect_ok("ListLoops");
}

fn publish_as_member_reaches_container_and_unpublish_cuts_it(bed: &Bed) {
    let env = PortsEnv::new(bed);
    let d = env.d();
    d.run_web("web", "/www", &[]);
    assert_eq!(d.curl(8080), None, "nothing published yet");

    let path = env.publish_ok(MEMBER, "web", 8080, 80);
    assert!(path.starts_with("/org/dindhelper1/port/"), "{path}");
    assert_eq!(d.curl(8080).as_deref(), Some("hello"), "published port");
    env.assert_tagged(3);
    // which firewall, and why (Debian 12's dockerd 20.10 writes iptables-nft)
    let fw = |name: &str| {
        let out = bed.busctl(&["get-property", BUS_NAME, MANAGER_PATH, PORTS_IFACE, name]);
        out.json_data().as_str().unwrap_or_default().to_owned()
    };
    assert_eq!(fw("FirewallBackend"), "iptables-nft");
    let why = fw("FirewallBackendReason");
    assert!(why.contains("DOCKER chain"), "FirewallBackendReason: {why}");

    // the object and the list tell the same story
    let ip = d.ip_of("web");
    for (p, want) in [
        ("State", serde_json::json!("active")),
        ("Container", serde_json::json!("web")),
        ("Protocol", serde_json::json!("tcp")),
        ("HostPort", serde_json::json!(8080)),
        ("ContainerPort", serde_json::json!(80)),
        ("ContainerIp", serde_json::json!(ip)),
        ("Network", serde_json::json!("bridge")),
        ("OwnerUid", serde_json::json!(bed.uid(MEMBER))),
        ("HostIp", serde_json::json!("")),
    ] {
        assert_eq!(env.prop(&path, p), Some(want), "property {p}");
    }
    let rows = env.list();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0][0], serde_json::json!(path));
    assert_eq!(rows[0][12], serde_json::json!("active"));
    let id = path.rsplit('/').next().unwrap().to_owned();
    assert_eq!(env.persisted_ids(), vec![id.clone()], "mapping persisted");

    // host_ip option, and Unpublish by bare id
    let out = env
        .publish(
            MEMBER,
            "web",
            "tcp",
            8081,
            80,
            &["host_ip", "s", "10.99.0.1"],
        )
        .expect_ok("Publish with host_ip");
    let p2 = out.json_data()[0].as_str().unwrap().to_owned();
    assert_eq!(
        env.prop(&p2, "HostIp"),
        Some(serde_json::json!("10.99.0.1"))
    );
    assert_eq!(d.curl(8081).as_deref(), Some("hello"));
    let id2 = p2.rsplit('/').next().unwrap();
    env.call(MEMBER, "Unpublish", "sa{sv}", &[id2, "0"])
        .expect_ok("Unpublish by id");
    assert_eq!(d.curl(8081), None);

    // instance option: the instance must exist; DestroyInstance unpublishes its ports
    let inst = format!("dhr-{}", std::process::id() % 100000);
    env.expect_error(
        MEMBER,
        "Publish",
        &[
            &gv_str("web"),
            &gv_str("tcp"),
            &gv_q(8082),
            &gv_q(80),
            &format!("{{'instance': <'{inst}'>}}"),
        ],
        "NotFound",
    );
    let instances = |method: &str, args: &[&str]| {
        let mut v = vec![
            "call",
            BUS_NAME,
            MANAGER_PATH,
            "org.dindhelper1.Instances",
            method,
            "sa{sv}",
        ];
        v.extend_from_slice(args);
        bed.busctl_as(MEMBER, &v)
    };
    instances("CreateInstance", &[&inst, "0"]).expect_ok("CreateInstance");
    let out = env
        .publish(MEMBER, "web", "tcp", 8082, 80, &["instance", "s", &inst])
        .expect_ok("Publish into an instance");
    let p3 = out.json_data()[0].as_str().unwrap().to_owned();
    assert_eq!(env.prop(&p3, "Instance"), Some(serde_json::json!(inst)));
    assert_eq!(d.curl(8082).as_deref(), Some("hello"));
    // The same instance also gets a loop device and a running capture: one
    // DestroyInstance must leave nothing (losetup, tagged rules, sessions, cgroups).
    let img = format!("{inst}.img");
    bed.create_image(MEMBER, &img, 4 << 20);
    let (_, dev) = bed.attach_image(MEMBER, &img, &["instance", "s", &inst]);
    let out = bed
        .busctl_as(
            MEMBER,
            &[
                "call",
                BUS_NAME,
                MANAGER_PATH,
                "org.dindhelper1.Captures",
                "StartCapture",
                "sa{sv}",
                "web",
                "2",
                "instance",
                "s",
                &inst,
                "duration",
                "u",
                "600",
            ],
        )
        .expect_ok("StartCapture into the instance");
    let session = out.json_data()[0].as_str().unwrap().to_owned();
    let out = instances(
        "DestroyInstance",
        &[&inst, "1", "delete_images", "b", "true"],
    )
    .expect_ok("DestroyInstance");
    assert!(
        out.stdout.contains("unpublished port mapping"),
        "DestroyInstance did not report the mapping: {}",
        out.stdout
    );
    for what in [
        "stopped capture",
        &format!("detached {dev}"),
        "deleted image",
    ] {
        assert!(
            out.stdout.contains(what),
            "DestroyInstance did not report {what:?}: {}",
            out.stdout
        );
    }
    let short = dev.trim_start_matches("/dev/");
    assert!(
        !std::path::Path::new(&format!("/sys/block/{short}/loop/backing_file")).exists(),
        "{dev} still attached after DestroyInstance"
    );
    let state = bed
        .busctl(&[
            "get-property",
            BUS_NAME,
            &session,
            "org.dindhelper1.Capture",
            "State",
        ])
        .expect_ok("capture State");
    assert!(
        !state.stdout.contains("running"),
        "capture still running: {}",
        state.stdout
    );
    assert!(
        !std::path::Path::new(&format!("/sys/fs/cgroup/pids/dind/{inst}")).exists(),
        "the instance's cgroup is still there"
    );
    assert_eq!(
        d.curl(8082),
        None,
        "port of a destroyed instance still answers"
    );
    assert_eq!(env.prop(&p3, "State"), None);

    env.call(MEMBER, "Unpublish", "sa{sv}", &[&path, "0"])
        .expect_ok("Unpublish by path");
    assert_eq!(d.curl(8080), None, "unpublished port still answers");
    env.assert_tagged(0);
    assert_eq!(
        env.prop(&path, "State"),
        None,
        "mapping object still exported"
    );
    assert!(env.list().is_empty());
    assert!(env.persisted_ids().is_empty());
    env.expect_error(
        MEMBER,
        "Unpublish",
        &[&gv_str(&path), "@a{sv} {}"],
        "NotFound",
    );
}

fn refusals_are_named_and_write_nothing(bed: &Bed) {
    let env = PortsEnv::new(bed);
    let d = env.d();
    d.run_web("web", "/www", &[]);
    d.run_web("pub", "/www", &["-p", "9090:80"]);
    d.run_web("hostnet", "/www", &["--network", "host"]);
    d.run_web("stopped", "/www", &[]);
    d.docker_ok(&["stop", "-t", "1", "stopped"]);
    let first = env.publish_ok(MEMBER, "web", 8080, 80);
    let rules = env.tagged();
    let state = env.state_json();
    let no = "@a{sv} {}";
    let publish = |user: &str, c: &str, proto: &str, h: u16, p: u16, kind: &str| {
        env.expect_error(
            user,
            "Publish",
            &[&gv_str(c), &gv_str(proto), &gv_q(h), &gv_q(p), no],
            kind,
        )
    };
    publish(MEMBER, "nosuch", "tcp", 8090, 80, "NotFound");
    publish(MEMBER, "stopped", "tcp", 8090, 80, "Conflict");
    publish(MEMBER, "hostnet", "tcp", 8090, 80, "InvalidArgs");
    publish(MEMBER, "web", "sctp", 8090, 80, "InvalidArgs");
    publish(MEMBER, "web", "TCP", 8090, 80, "InvalidArgs");
    publish(MEMBER, "web", "tcp", 0, 80, "InvalidArgs");
    publish(MEMBER, "web", "tcp", 8090, 0, "InvalidArgs");
    publish(MEMBER, "web", "tcp", 8080, 80, "Conflict"); // ours already
    publish(MEMBER, "web", "tcp", 9090, 80, "Conflict"); // docker -p
    publish(MEMBER, "web", "tcp", 80, 80, "Conflict"); // bound by hostnet's httpd
    publish(PLAIN, "web", "tcp", 8090, 80, "NotAuthorized");
    env.expect_error(
        MEMBER,
        "Publish",
        &[
            &gv_str("web"),
            &gv_str("tcp"),
            &gv_q(8090),
            &gv_q(80),
            "{'hostip': <'10.99.0.1'>}",
        ],
        "InvalidArgs",
    );
    env.expect_error(
        MEMBER,
        "Publish",
        &[
            &gv_str("web"),
            &gv_str("tcp"),
            &gv_q(8090),
            &gv_q(80),
            "{'instance': <'Bad_Name'>}",
        ],
        "InvalidArgs",
    );
    // someone else's mapping: base action only is not enough; plain users get nothing
    env.expect_error(OWN, "Unpublish", &[&gv_str(&first), no], "NotAuthorized");
    env.expect_error(PLAIN, "Unpublish", &[&gv_str(&first), no], "NotAuthorized");
    env.expect_error(
        OWN,
        "UnpublishContainer",
        &[&gv_str("web"), no],
        "NotAuthorized",
    );
    env.expect_error(MEMBER, "Unpublish", &[&gv_str("nosuchid"), no], "NotFound");
    env.expect_error(MEMBER, "Unpublish", &[&gv_str("../x"), no], "InvalidArgs");
    env.expect_error(
        MEMBER,
        "UnpublishContainer",
        &[&gv_str("pub"), no],
        "NotFound",
    );

    assert_eq!(env.tagged(), rules, "a refused call changed the rules");
    assert_eq!(env.state_json(), state, "a refused call changed the state");
    assert_eq!(env.list().len(), 1);
    assert_eq!(d.curl(8090), None);
    // the owner's peer with -others (member is in the group) may; so may root
    env.call("root", "UnpublishContainer", "sa{sv}", &["web", "0"])
        .expect_ok("root UnpublishContainer");
    env.assert_tagged(0);
}

fn published_port_survives_dockerd_restart(bed: &Bed) {
    let mut env = PortsEnv::new(bed);
    env.d().run_web("web", "/www", &["--restart", "always"]);
    let path = env.publish_ok(MEMBER, "web", 8080, 80);
    assert_eq!(env.d().curl(8080).as_deref(), Some("hello"));
    env.assert_tagged(3);

    let d = env.env.d_mut();
    d.stop_daemon();
    // dockerd down: a Publish says so (Failed, naming dockerd), nothing hangs
    env.expect_error(
        MEMBER,
        "Publish",
        &[
            &gv_str("web"),
            &gv_str("tcp"),
            &gv_q(8081),
            &gv_q(80),
            "@a{sv} {}",
        ],
        "Failed",
    );
    let d = env.env.d_mut();
    d.start_daemon(); // returns once `docker version` answers
    let t0 = Instant::now();
    let d = env.d();
    let took = wait_until(
        "the published port after a dockerd restart",
        Duration::from_secs(15),
        || d.curl(8080).as_deref() == Some("hello"),
    );
    println!(
        "(port answered again {:.0} ms after dockerd answered; {:.0} ms in all) ",
        took.as_secs_f64() * 1000.0,
        t0.elapsed().as_secs_f64() * 1000.0
    );
    assert!(
        took <= Duration::from_secs(2),
        "goal: within 2 s after dockerd answers; took {took:?}"
    );
    env.assert_tagged(3);
    assert_eq!(env.prop(&path, "State"), Some(serde_json::json!("active")));
}

/// The daemon restarts while dockerd is down: it starts anyway (mappings kept), answers
/// Failed meanwhile, and once dockerd is back (and has flushed its chains) the port works
/// again without any call.
fn daemon_started_while_dockerd_is_down_catches_up(bed: &Bed) {
    let mut env = PortsEnv::new(bed);
    env.d().run_web("web", "/www", &["--restart", "always"]);
    let path = env.publish_ok(MEMBER, "web", 8080, 80);
    assert_eq!(env.d().curl(8080).as_deref(), Some("hello"));
    bed.stop_daemon();
    env.env.d_mut().stop_daemon();
    bed.start_daemon()
        .expect("the daemon must start without a reachable dockerd");
    assert_eq!(env.list().len(), 1, "mapping kept while dockerd is away");
    env.expect_error(
        MEMBER,
        "Publish",
        &[
            &gv_str("web"),
            &gv_str("tcp"),
            &gv_q(8081),
            &gv_q(80),
            "@a{sv} {}",
        ],
        "Failed",
    );
    env.env.d_mut().start_daemon();
    let d = env.d();
    let took = wait_until(
        "the port after dockerd came back",
        Duration::from_secs(15),
        || d.curl(8080).as_deref() == Some("hello"),
    );
    println!(
        "({:.0} ms after dockerd answered) ",
        took.as_secs_f64() * 1000.0
    );
    env.assert_tagged(3);
    assert_eq!(env.prop(&path, "State"), Some(serde_json::json!("active")));
}

fn rule_follows_container_restart_to_new_ip(bed: &Bed) {
    let env = PortsEnv::new(bed);
    let d = env.d();
    d.docker_ok(&["network", "create", "--subnet", "10.77.0.0/24", "labnet"]);
    d.run_web("web", "/www", &["--network", "labnet"]);
    let old_ip = d.ip_of("web");
    let path = env.publish_ok(MEMBER, "web", 8080, 80);
    assert_eq!(
        env.prop(&path, "Network"),
        Some(serde_json::json!("labnet"))
    );
    assert!(env
        .prop(&path, "Bridge")
        .and_then(|v| v.as_str().map(str::to_owned))
        .is_some_and(|b| b.starts_with("br-")));
    assert_eq!(d.curl(8080).as_deref(), Some("hello"));

    let monitor = Monitor::start(bed);
    d.docker_ok(&["stop", "-t", "1", "web"]);
    wait_until("mapping waiting", Duration::from_secs(5), || {
        env.prop(&path, "State") == Some(serde_json::json!("waiting"))
    });
    env.assert_tagged(0);
    // another container takes the old address (serving other content)
    d.run_web("thief", "/www2", &["--network", "labnet", "--ip", &old_ip]);
    assert_eq!(d.ip_of("thief"), old_ip);
    assert_eq!(d.curl(8080), None, "a waiting mapping must not forward");
    d.docker_ok(&["start", "web"]);
    let new_ip = d.ip_of("web");
    assert_ne!(new_ip, old_ip);
    wait_until("rule follows the new IP", Duration::from_secs(5), || {
        d.curl(8080).as_deref() == Some("hello")
    });
    let rules = env.assert_tagged(3);
    assert!(
        rules
            .iter()
            .all(|r| !r.contains(&format!("{old_ip}:")) && !r.contains(&format!("{old_ip}/32"))),
        "a rule still names the old IP {old_ip}:\n{}",
        rules.join("\n")
    );
    for _ in 0..5 {
        assert_eq!(
            d.curl(8080).as_deref(),
            Some("hello"),
            "traffic reached the old IP"
        );
    }
    assert_eq!(
        env.prop(&path, "ContainerIp"),
        Some(serde_json::json!(new_ip))
    );
    assert_eq!(env.prop(&path, "State"), Some(serde_json::json!("active")));
    // signals: MappingChanged waiting → active, and PropertiesChanged on the object
    let text = monitor.finish();
    let changed: Vec<&str> = text
        .split("Member=")
        .skip(1)
        .filter(|m| m.starts_with("MappingChanged"))
        .collect();
    assert!(
        changed.iter().any(|m| m.contains("\"waiting\""))
            && changed.iter().any(|m| m.contains("\"active\"")),
        "MappingChanged waiting/active not seen:\n{text}"
    );
    assert!(
        text.split("Type=signal")
            .any(|m| m.contains("PropertiesChanged")
                && m.contains(path.as_str())
                && m.contains(&new_ip)),
        "no PropertiesChanged with the new IP on {path}:\n{text}"
    );
}

/// The daemon keeps Docker's answers between calls (`ports::facts`): each call right
/// after a `docker` command that changes what a name means must still reach the container
/// the name means now — replaced (`rm -f` + `run`), renamed away, restarted (new init
/// process), stopped — and Docker's own `-p` ports stay a conflict.
fn kept_docker_facts_follow_replace_rename_restart_stop(bed: &Bed) {
    let env = PortsEnv::new(bed);
    let d = env.d();
    d.docker_ok(&["network", "create", "--subnet", "10.78.0.0/24", "factnet"]);
    let net = ["--network", "factnet"];
    d.run_web("web", "/www", &[&net[..], &["--ip", "10.78.0.10"]].concat());
    let p1 = env.publish_ok(MEMBER, "web", 8080, 80);
    let p2 = env.publish_ok(MEMBER, "web", 8081, 80); // the kept answer
    assert_eq!(d.curl(8081).as_deref(), Some("hello"));
    let ip = |p: &str| env.prop(p, "ContainerIp");

    // replaced: same name, another container at another address
    d.docker_ok(&["rm", "-f", "web"]);
    d.run_web(
        "web",
        "/www2",
        &[&net[..], &["--ip", "10.78.0.11"]].concat(),
    );
    let p3 = env.publish_ok(MEMBER, "web", 8082, 80);
    assert_eq!(ip(&p3), Some(serde_json::json!("10.78.0.11")));
    assert_eq!(d.curl(8082).as_deref(), Some("other"));
    wait_until(
        "mappings of the removed container gone",
        Duration::from_secs(5),
        || ip(&p1).is_none() && ip(&p2).is_none(),
    );

    // renamed away: the name now means a new container
    d.docker_ok(&["rename", "web", "web-old"]);
    d.run_web("web", "/www", &[&net[..], &["--ip", "10.78.0.12"]].concat());
    let p4 = env.publish_ok(MEMBER, "web", 8083, 80);
    assert_eq!(ip(&p4), Some(serde_json::json!("10.78.0.12")));
    assert_eq!(d.curl(8083).as_deref(), Some("hello"));
    assert_eq!(
        d.curl(8082).as_deref(),
        Some("other"),
        "web-old keeps its port"
    );

    // restarted: a new init process (same address)
    d.docker_ok(&["restart", "-t", "1", "web"]);
    let p5 = env.publish_ok(MEMBER, "web", 8084, 80);
    assert_eq!(ip(&p5), Some(serde_json::json!("10.78.0.12")));
    wait_until("8084 answers", Duration::from_secs(5), || {
        d.curl(8084).as_deref() == Some("hello")
    });

    // Docker's own -p, started right before the call
    d.run_web("pub", "/www", &[&net[..], &["-p", "9191:80"]].concat());
    let no = "@a{sv} {}";
    let publish = |c: &str, h: u16, kind: &str| {
        env.expect_error(
            MEMBER,
            "Publish",
            &[&gv_str(c), &gv_str("tcp"), &gv_q(h), &gv_q(80), no],
            kind,
        )
    };
    publish("web", 9191, "Conflict");

    // stopped: refused at once, nothing written
    d.docker_ok(&["stop", "-t", "1", "web"]);
    publish("web", 8085, "Conflict");
    d.docker_ok(&["rm", "-f", "web-old"]);
    publish("web-old", 8086, "NotFound");
    wait_until(
        "only the stopped web's mappings stay",
        Duration::from_secs(5),
        || env.list().len() == 2,
    );
}

fn docker_rm_removes_rules_and_mapping_object(bed: &Bed) {
    let env = PortsEnv::new(bed);
    let d = env.d();
    d.run_web("web", "/www", &[]);
    d.run_web("keep", "/www2", &[]);
    let p1 = env.publish_ok(MEMBER, "web", 8080, 80);
    let p2 = env.publish_ok(MEMBER, "web", 8081, 80);
    let p3 = env.publish_ok(MEMBER, "keep", 8082, 80);
    env.assert_tagged(9);
    // watch the signals while docker removes the container
    let monitor = Monitor::start(bed);
    d.docker_ok(&["rm", "-f", "web"]);
    wait_until(
        "mappings of the removed container gone",
        Duration::from_secs(5),
        || env.prop(&p1, "State").is_none() && env.prop(&p2, "State").is_none(),
    );
    let rules = env.assert_tagged(3);
    let id3 = p3.rsplit('/').next().unwrap();
    assert!(rules.iter().all(|r| r.contains(id3)), "{rules:?}");
    assert_eq!(d.curl(8080), None);
    assert_eq!(d.curl(8082).as_deref(), Some("other"));
    assert_eq!(env.list().len(), 1);
    wait_until("state persisted", Duration::from_secs(3), || {
        env.persisted_ids() == vec![id3.to_owned()]
    });
    let text = monitor.finish();
    for p in [&p1, &p2] {
        assert!(
            text.contains("MappingRemoved") && text.contains(p.as_str()),
            "no MappingRemoved signal for {p}:\n{text}"
        );
    }
}

fn kill9_restart_keeps_rules_without_duplicates(bed: &Bed) {
    let env = PortsEnv::new(bed);
    let d = env.d();
    d.run_web("web", "/www", &[]);
    let paths: Vec<String> = (0..3)
        .map(|i| env.publish_ok(MEMBER, "web", 8080 + i, 80))
        .collect();
    let before = env.assert_tagged(9);
    bed.kill9_daemon();
    // while it is down: one rule of ours vanishes, an orphan with our tag (our state id)
    // appears
    let state: serde_json::Value = serde_json::from_str(&env.state_json()).expect("state.json");
    let state_id = state["state_id"].as_str().expect("state_id").to_owned();
    assert!(
        before
            .iter()
            .all(|r| r.contains(&format!("dindhelper:{state_id}:"))),
        "rule tags carry the state id: {before:#?}"
    );
    let orphan_tag = format!("dindhelper:{state_id}:deadbeefdeadbeef");
    let dnat = before
        .iter()
        .find(|r| r.contains("--dport 8081") && r.contains("DNAT"))
        .expect("DNAT of 8081")
        .clone();
    let del = dnat.replacen("-A ", "-D ", 1);
    let mut args: Vec<String> = vec!["iptables-nft".into(), "-t".into(), "nat".into()];
    args.extend(shell_words(&del));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = d.in_ns(&a);
    assert!(out.status.success(), "delete one rule: {out:?}");
    let out = d.in_ns(&[
        "iptables-nft",
        "-t",
        "nat",
        "-A",
        "DOCKER",
        "-p",
        "tcp",
        "-m",
        "tcp",
        "--dport",
        "8999",
        "-m",
        "comment",
        "--comment",
        &orphan_tag,
        "-j",
        "DNAT",
        "--to-destination",
        "172.17.0.99:80",
    ]);
    assert!(out.status.success(), "add an orphan: {out:?}");
    assert_eq!(env.tagged().len(), 9);

    bed.start_daemon().expect("restart after kill -9");
    let after = env.assert_tagged(9);
    let (mut b, mut a) = (before.clone(), after.clone());
    b.sort();
    a.sort();
    assert_eq!(a, b, "rules after the restart differ");
    for (i, p) in paths.iter().enumerate() {
        assert_eq!(env.prop(p, "State"), Some(serde_json::json!("active")));
        assert_eq!(d.curl(8080 + i as u16).as_deref(), Some("hello"));
    }
    assert_eq!(env.list().len(), 3);
    // a second restart changes nothing
    bed.kill9_daemon();
    bed.start_daemon().expect("second restart");
    env.assert_tagged(9);
}

/// Split an iptables-save line into words (quotes removed).
fn shell_words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut q = false;
    for c in s.chars() {
        match c {
            '"' => q = !q,
            ' ' if !q => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn ten_concurrent_callers_publish_200_ports(bed: &Bed) {
    let env = PortsEnv::new(bed);
    let d = env.d();
    d.run_web("web", "/www", &[]);
    // 10 caller processes (shells run as the member), each 20 busctl Publish calls in a row
    let t0 = Instant::now();
    let callers: Vec<std::process::Child> = (0..10u16)
        .map(|caller| {
            let ports: Vec<String> = (0..20u16)
                .map(|j| (10000 + caller * 20 + j).to_string())
                .collect();
            let script = format!(
                "for p in {}; do busctl --address='{}' --timeout=60 call {BUS_NAME} {MANAGER_PATH} \
                 {PORTS_IFACE} Publish ssqqa{{sv}} web tcp $p 80 0 >/dev/null 2>/tmp/dhr-err.$$ \
                 || echo \"FAIL $p $(cat /tmp/dhr-err.$$)\"; done; rm -f /tmp/dhr-err.$$",
                ports.join(" "),
                bed.address
            );
            std::process::Command::new("runuser")
                .args(["-u", MEMBER, "--", "sh", "-c", &script])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("spawn caller")
        })
        .collect();
    let failures: Vec<String> = callers
        .into_iter()
        .flat_map(|c| {
            let out = c.wait_with_output().expect("caller");
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    let took = t0.elapsed();
    assert!(failures.is_empty(), "failed publishes: {failures:?}");
    println!(
        "(200 publishes by 10 concurrent busctl callers in {:.2} s) ",
        took.as_secs_f64()
    );
    env.assert_tagged(600);
    assert_eq!(env.list().len(), 200);
    wait_until("200 mappings persisted", Duration::from_secs(3), || {
        env.persisted_ids().len() == 200
    });
    let bad: Vec<u16> = (10000..10200u16)
        .filter(|p| d.curl(*p).as_deref() != Some("hello"))
        .collect();
    assert!(bad.is_empty(), "ports that do not answer: {bad:?}");
    let out = env
        .call(MEMBER, "UnpublishContainer", "sa{sv}", &["web", "0"])
        .expect_ok("UnpublishContainer");
    assert_eq!(out.json_data(), serde_json::json!([200]));
    env.assert_tagged(0);
}

/// A Ports property of the manager object.
fn ports_prop(bed: &Bed, name: &str) -> serde_json::Value {
    bed.busctl(&["get-property", BUS_NAME, MANAGER_PATH, PORTS_IFACE, name])
        .expect_ok(&format!("get-property {name}"))
        .json_data()
}

/// `ip6tables-nft-save` in dockerd's netns, without its `#` lines (they carry a date).
fn ip6_save(d: &Dockerd) -> String {
    let out = d.in_ns(&["ip6tables-nft-save"]);
    assert!(out.status.success(), "ip6tables-nft-save: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Docker 20.10 publishing IPv6 (`--experimental --ip6tables --ipv6 --fixed-cidr-v6`, a
/// private dockerd): a mapping holds both families, real TCP passes over IPv6 from the
/// client netns (and hairpin from the container), and Unpublish leaves ip6tables
/// byte-identical. A mapping of family ipv4 holds no IPv6 rule.
fn ipv6_tcp_passes_over_ipv6_and_unpublish_restores_ip6tables(bed: &Bed) {
    let mut env = PortsEnv::with_args(bed, Dockerd::IPV6_ARGS);
    let d = env.d();
    d.run_web("web6", "/www", &["--restart", "always"]);
    let ip6 = d.docker_ok(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.GlobalIPv6Address}}{{end}}",
        "web6",
    ]);
    assert!(
        ip6.contains(':'),
        "dockerd gave the container no IPv6 address ({ip6:?}); log: {}",
        d.log_tail()
    );
    let before = ip6_save(d);
    assert!(
        before.contains(":DOCKER "),
        "dockerd wrote no ip6tables DOCKER chain:\n{before}"
    );
    assert_eq!(d.curl6(8086), None, "nothing published yet");

    let out = env
        .publish(MEMBER, "web6", "tcp", 8086, 80, &["family", "s", "both"])
        .expect_ok("Publish family both");
    let path = out.json_data()[0].as_str().unwrap().to_owned();
    assert_eq!(ports_prop(bed, "FirewallIpv6"), serde_json::json!(true));
    let why = ports_prop(bed, "FirewallBackendReason");
    assert!(
        why.as_str().unwrap().contains("IPv6 too"),
        "FirewallBackendReason: {why}"
    );
    assert_eq!(
        env.prop(&path, "ContainerIp6"),
        Some(serde_json::json!(ip6))
    );
    assert_eq!(env.prop(&path, "Family"), Some(serde_json::json!("both")));
    assert_eq!(
        env.prop(&path, "Families"),
        Some(serde_json::json!(["ipv4", "ipv6"]))
    );
    // real TCP over IPv6 and IPv4 through the published port
    // (polled: the container's and the bridge's IPv6 addresses pass DAD ~1-2 s after the
    // container started; the first run answered at once, the second did not)
    let took = wait_until("IPv6 published port", Duration::from_secs(10), || {
        d.curl6(8086).as_deref() == Some("hello")
    });
    eprintln!("IPv6 published port answered after {took:?}");
    assert_eq!(
        d.curl(8086).as_deref(),
        Some("hello"),
        "IPv4 published port"
    );
    let mine6: Vec<String> = ip6_save(d)
        .lines()
        .filter(|l| l.contains("dindhelper:"))
        .map(str::to_owned)
        .collect();
    assert_eq!(mine6.len(), 3, "ip6tables rules:\n{}", mine6.join("\n"));
    assert!(
        mine6
            .iter()
            .any(|l| l.contains(&format!("--to-destination [{ip6}]:80"))),
        "{mine6:?}"
    );
    env.assert_tagged(3);
    // hairpin: the container reaches its own published port on the host address, over
    // IPv6 and IPv4 (curl run in the container's netns: busybox-static's wget crashes on
    // an address lookup)
    let pid = d.docker_ok(&["inspect", "-f", "{{.State.Pid}}", "web6"]);
    for url in ["http://[fd99::1]:8086/", "http://10.99.0.1:8086/"] {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net=/proc/{pid}/ns/net"))
            .args(["curl", "-g", "-s", "--max-time", "3", url])
            .output()
            .expect("nsenter curl");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "hello",
            "hairpin {url}: {out:?}"
        );
    }

    // family ipv4: no IPv6 rule, IPv6 clients do not pass
    let out = env
        .publish(MEMBER, "web6", "tcp", 8087, 80, &["family", "s", "ipv4"])
        .expect_ok("Publish family ipv4");
    let p4 = out.json_data()[0].as_str().unwrap().to_owned();
    assert_eq!(env.prop(&p4, "Families"), Some(serde_json::json!(["ipv4"])));
    assert_eq!(env.prop(&p4, "ContainerIp6"), Some(serde_json::json!("")));
    assert_eq!(d.curl(8087).as_deref(), Some("hello"));
    assert_eq!(d.curl6(8087), None, "an ipv4 mapping must not forward IPv6");
    // an unknown family is refused
    let bad = env.publish(MEMBER, "web6", "tcp", 8088, 80, &["family", "s", "ipv5"]);
    assert!(
        !bad.ok() && bad.stderr.contains("family"),
        "family ipv5 accepted: {}",
        bad.stderr
    );

    // Unpublish both: every IPv6 rule gone, ip6tables byte-identical to before
    for p in [&path, &p4] {
        let id = p.rsplit('/').next().unwrap();
        env.call(MEMBER, "Unpublish", "sa{sv}", &[id, "0"])
            .expect_ok("Unpublish");
    }
    assert_eq!(d.curl6(8086), None);
    env.assert_tagged(0);
    let after = ip6_save(d);
    assert_eq!(after, before, "ip6tables changed by publish + unpublish");

    // reconcile covers IPv6: a dockerd restart re-creates Docker's ip6tables chains; the
    // rules of a mapping of family auto (IPv6 here) come back, once
    let out = env
        .publish(MEMBER, "web6", "tcp", 8089, 80, &[])
        .expect_ok("Publish family auto");
    let pa = out.json_data()[0].as_str().unwrap().to_owned();
    assert_eq!(env.prop(&pa, "Family"), Some(serde_json::json!("auto")));
    assert_eq!(
        env.prop(&pa, "Families"),
        Some(serde_json::json!(["ipv4", "ipv6"]))
    );
    wait_until("IPv6 port of family auto", Duration::from_secs(10), || {
        env.d().curl6(8089).as_deref() == Some("hello")
    });
    let dm = env.env.d_mut();
    dm.stop_daemon();
    dm.start_daemon();
    let d = env.d();
    let took = wait_until(
        "the IPv6 port after a dockerd restart",
        Duration::from_secs(20),
        || d.curl6(8089).as_deref() == Some("hello"),
    );
    eprintln!("IPv6 port answered again {took:?} after dockerd answered");
    let mine6 = ip6_save(d)
        .lines()
        .filter(|l| l.contains("dindhelper:"))
        .count();
    assert_eq!(mine6, 3, "IPv6 rules after the restart");
    env.assert_tagged(3);
}

/// Family `ipv6` and an IPv6 `host_ip` on the iptables backend (Docker 20.10 publishing
/// IPv6): three ip6tables rules and no iptables rule per mapping, IPv6 clients pass and
/// IPv4 ones do not, the host address restricts the DNAT (`-d H6/128`), impossible pairs
/// are InvalidArgs, Unpublish leaves ip6tables byte-identical.
fn ipv6_only_family_and_ipv6_host_ip_write_ip6tables_only(bed: &Bed) {
    let env = PortsEnv::with_args(bed, Dockerd::IPV6_ARGS);
    let d = env.d();
    d.run_web("web6", "/www", &["--restart", "always"]);
    let before = ip6_save(d);
    assert!(
        before.contains(":DOCKER "),
        "dockerd wrote no ip6tables DOCKER chain:\n{before}"
    );
    let all6 = env
        .publish(MEMBER, "web6", "tcp", 8090, 80, &["family", "s", "ipv6"])
        .expect_ok("Publish family ipv6")
        .json_data()[0]
        .as_str()
        .unwrap()
        .to_owned();
    let one6 = env
        .publish(
            MEMBER,
            "web6",
            "tcp",
            8091,
            80,
            &["host_ip", "s", "fd99::1"],
        )
        .expect_ok("Publish host_ip fd99::1")
        .json_data()[0]
        .as_str()
        .unwrap()
        .to_owned();
    for (p, host) in [(&all6, ""), (&one6, "fd99::1")] {
        assert_eq!(env.prop(p, "Family"), Some(serde_json::json!("ipv6")));
        assert_eq!(env.prop(p, "Families"), Some(serde_json::json!(["ipv6"])));
        assert_eq!(env.prop(p, "HostIp"), Some(serde_json::json!(host)));
        assert_eq!(env.prop(p, "ContainerIp"), Some(serde_json::json!("")));
    }
    // no IPv4 rule at all; three IPv6 rules each, the second restricted to fd99::1
    env.assert_tagged(0);
    let mine6: Vec<String> = ip6_save(d)
        .lines()
        .filter(|l| l.contains("dindhelper:"))
        .map(str::to_owned)
        .collect();
    assert_eq!(mine6.len(), 6, "ip6tables rules:\n{}", mine6.join("\n"));
    assert!(
        mine6
            .iter()
            .any(|l| l.contains("-d fd99::1/128 -p tcp -m tcp --dport 8091")),
        "{mine6:?}"
    );
    for port in [8090, 8091] {
        wait_until("IPv6-only published port", Duration::from_secs(10), || {
            d.curl6(port).as_deref() == Some("hello")
        });
        assert_eq!(
            d.curl(port),
            None,
            "{port}: an ipv6 mapping must not forward IPv4"
        );
    }
    // the host's other IPv6 address (docker0's, from the container): every address, or
    // not the one given
    let pid = d.docker_ok(&["inspect", "-f", "{{.State.Pid}}", "web6"]);
    let from_ctr = |url: &str| {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net=/proc/{pid}/ns/net"))
            .args(["curl", "-g", "-s", "--max-time", "2", url])
            .output()
            .expect("nsenter curl");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(from_ctr("http://[fd00:d0c::1]:8090/"), "hello");
    assert_eq!(
        from_ctr("http://[fd00:d0c::1]:8091/"),
        "",
        "host_ip fd99::1 must not match the host's other address"
    );
    // pairs no rule set can hold are named, and write nothing
    let opts = |host: &str, family: &str| {
        format!("@a{{sv}} {{'host_ip': <'{host}'>, 'family': <'{family}'>}}")
    };
    for (host, family) in [
        ("10.99.0.1", "ipv6"),
        ("fd99::1", "ipv4"),
        ("fd99::1", "both"),
        ("fe80::1", "auto"),
    ] {
        env.expect_error(
            MEMBER,
            "Publish",
            &[
                &gv_str("web6"),
                &gv_str("tcp"),
                &gv_q(8092),
                &gv_q(80),
                &opts(host, family),
            ],
            "InvalidArgs",
        );
    }
    assert_eq!(
        ip6_save(d)
            .lines()
            .filter(|l| l.contains("dindhelper:"))
            .count(),
        6
    );
    for p in [&all6, &one6] {
        let id = p.rsplit('/').next().unwrap();
        env.call(MEMBER, "Unpublish", "sa{sv}", &[id, "0"])
            .expect_ok("Unpublish");
    }
    assert_eq!(
        ip6_save(d),
        before,
        "ip6tables changed by publish + unpublish"
    );
    env.assert_tagged(0);
}

/// `docker network connect` / `disconnect` are followed: joining a second network keeps
/// the mapping on its own; leaving the mapping's network takes the rules out (state
/// "disconnected"); joining it again (with a new address) brings them back.
fn network_connect_disconnect_followed(bed: &Bed) {
    let env = PortsEnv::new(bed);
    let d = env.d();
    d.docker_ok(&["network", "create", "--subnet", "10.77.0.0/24", "labnet"]);
    d.docker_ok(&["network", "create", "--subnet", "10.78.0.0/24", "sidenet"]);
    d.run_web("web", "/www", &["--network", "labnet"]);
    let ip_on = |net: &str, name: &str| {
        d.docker_ok(&[
            "inspect",
            "-f",
            &format!("{{{{(index .NetworkSettings.Networks \"{net}\").IPAddress}}}}"),
            name,
        ])
    };
    let old_ip = ip_on("labnet", "web");
    let path = env.publish_ok(MEMBER, "web", 8080, 80);
    assert_eq!(d.curl(8080).as_deref(), Some("hello"));
    // this dockerd publishes no IPv6: the mapping says it holds IPv4 only
    assert_eq!(ports_prop(bed, "FirewallIpv6"), serde_json::json!(false));
    let why = ports_prop(bed, "FirewallBackendReason");
    assert!(
        why.as_str().unwrap().contains("IPv4 only"),
        "FirewallBackendReason: {why}"
    );
    assert_eq!(
        env.prop(&path, "Families"),
        Some(serde_json::json!(["ipv4"]))
    );
    let rules = env.assert_tagged(3);

    // a second network: the mapping stays on labnet, traffic still passes
    let monitor = Monitor::start(bed);
    d.docker_ok(&["network", "connect", "sidenet", "web"]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        env.assert_tagged(3),
        rules,
        "rules changed on a second network"
    );
    assert_eq!(d.curl(8080).as_deref(), Some("hello"));
    assert_eq!(env.prop(&path, "State"), Some(serde_json::json!("active")));
    assert_eq!(
        env.prop(&path, "ContainerIp"),
        Some(serde_json::json!(old_ip))
    );

    // leaving the mapping's network: rules out, state disconnected
    d.docker_ok(&["network", "disconnect", "labnet", "web"]);
    let took = wait_until("mapping disconnected", Duration::from_secs(5), || {
        env.prop(&path, "State") == Some(serde_json::json!("disconnected"))
    });
    eprintln!("disconnect followed in {took:?}");
    env.assert_tagged(0);
    assert_eq!(
        d.curl(8080),
        None,
        "a disconnected mapping must not forward"
    );
    assert_eq!(env.prop(&path, "ContainerIp"), Some(serde_json::json!("")));

    // another container takes the old address; web joins again with a new one
    d.run_web("thief", "/www2", &["--network", "labnet", "--ip", &old_ip]);
    d.docker_ok(&["network", "connect", "labnet", "web"]);
    let new_ip = ip_on("labnet", "web");
    assert_ne!(new_ip, old_ip);
    let took = wait_until(
        "rules back with the new address",
        Duration::from_secs(5),
        || d.curl(8080).as_deref() == Some("hello"),
    );
    eprintln!("reconnect followed in {took:?}");
    let rules = env.assert_tagged(3);
    assert!(
        rules
            .iter()
            .all(|r| !r.contains(&format!("{old_ip}:")) && !r.contains(&format!("{old_ip}/32"))),
        "a rule still names the old address {old_ip}:\n{}",
        rules.join("\n")
    );
    assert_eq!(env.prop(&path, "State"), Some(serde_json::json!("active")));
    assert_eq!(
        env.prop(&path, "ContainerIp"),
        Some(serde_json::json!(new_ip))
    );
    let text = monitor.finish();
    assert!(
        text.contains("\"disconnected\""),
        "MappingChanged disconnected not seen:\n{text}"
    );
}
