//! dindhelperd as a real system service inside a booted systemd (nspawn over an overlay,
//! see tests/common/nspawn.rs): D-Bus activation, the project's D-Bus policy and polkit
//! rules, the systemd slice backend. Driven with `busctl` as a member of group
//! `dindhelper` and as a plain user; `systemctl show` checks the slice properties.
//!
//! Run (root): `cargo test --test instances_systemd_daemon -- --nocapture`

#[path = "common/nspawn.rs"]
mod nspawn;

use nspawn::{Booted, MEMBER, PLAIN};
use std::process::Output;

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[track_caller]
fn ok(b: &Booted, o: Output, what: &str) -> serde_json::Value {
    assert!(
        o.status.success(),
        "{what}: {}\njournal:\n{}",
        text(&o),
        b.journal("dindhelperd.service")
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    v.get("data").cloned().unwrap_or(v)
}

#[test]
fn daemon_makes_systemd_slices_for_members_and_refuses_plain_users() {
    let b = Booted::boot("sdd");
    b.install_daemon(std::path::Path::new(env!("CARGO_BIN_EXE_dindhelperd")));
    let unit = r"dind-lab\x2d1.slice";

    // Member: CreateInstance (the first call activates the daemon through D-Bus).
    let d = ok(
        &b,
        b.call(
            MEMBER,
            "CreateInstance",
            "sa{sv}",
            &[
                "lab-1",
                "4",
                "cpu_quota_percent",
                "u",
                "50",
                "memory_max",
                "t",
                "268435456",
                "tasks_max",
                "t",
                "100",
                "io_weight",
                "t",
                "300",
            ],
        ),
        "member CreateInstance",
    );
    assert_eq!(d[1], unit);
    // systemd backend + docker's default driver there (systemd): the slice name.
    assert_eq!(d[2], unit);
    assert_eq!(b.prop("dindhelperd.service", "ActiveState"), "active");
    for (k, v) in [
        ("ActiveState", "active"),
        ("Slice", "dind.slice"),
        ("CPUQuotaPerSecUSec", "500ms"),
        ("MemoryMax", "268435456"),
        ("TasksMax", "100"),
        ("IOWeight", "300"),
    ] {
        assert_eq!(b.prop(unit, k), v, "{k}");
    }

    // SetLimits live: merge (memory kept), reset (tasks_max back to infinity).
    ok(
        &b,
        b.call(
            MEMBER,
            "SetLimits",
            "sa{sv}",
            &[
                "lab-1",
                "2",
                "cpu_quota_percent",
                "u",
                "150",
                "tasks_max",
                "s",
                "default",
            ],
        ),
        "member SetLimits",
    );
    assert_eq!(b.prop(unit, "CPUQuotaPerSecUSec"), "1.500000s");
    assert_eq!(b.prop(unit, "MemoryMax"), "268435456");
    assert_eq!(b.prop(unit, "TasksMax"), "infinity");

    // Plain user: refused on every mutating method (by the bus policy or polkit), nothing
    // changes.
    for (m, sig, args) in [
        ("CreateInstance", "sa{sv}", vec!["plain-x", "0"]),
        (
            "SetLimits",
            "sa{sv}",
            vec!["lab-1", "1", "tasks_max", "t", "5"],
        ),
        ("AdoptContainer", "ssa{sv}", vec!["lab-1", "pid:2", "0"]),
        ("DestroyInstance", "sa{sv}", vec!["lab-1", "0"]),
    ] {
        let o = b.call(PLAIN, m, sig, &args);
        let t = text(&o);
        assert!(!o.status.success(), "plain {m} succeeded: {t}");
        assert!(
            t.contains("ccess denied")
                || t.contains("not authorized")
                || t.contains("AccessDenied"),
            "plain {m}: {t}"
        );
    }
    assert_eq!(b.prop(r"dind-plain\x2dx.slice", "ActiveState"), "inactive");
    assert_eq!(b.prop(unit, "TasksMax"), "infinity");

    // Survives `systemctl restart dindhelperd`.
    b.ok(&["systemctl", "restart", "dindhelperd.service"]);
    let d = ok(
        &b,
        b.call(MEMBER, "ListInstances", "", &[]),
        "ListInstances",
    );
    assert_eq!(d[0][0][1], "lab-1", "{d}");
    assert_eq!(b.prop(unit, "ActiveState"), "active");
    assert_eq!(b.prop(unit, "CPUQuotaPerSecUSec"), "1.500000s");

    // As after a reboot: the transient slice is gone while the daemon is down; the next
    // start recreates it from state with its limits.
    b.ok(&["systemctl", "stop", "dindhelperd.service"]);
    b.ok(&["systemctl", "stop", unit]);
    assert_eq!(b.prop(unit, "ActiveState"), "inactive");
    b.ok(&["systemctl", "start", "dindhelperd.service"]);
    assert_eq!(b.prop(unit, "ActiveState"), "active");
    assert_eq!(b.prop(unit, "CPUQuotaPerSecUSec"), "1.500000s");
    assert_eq!(b.prop(unit, "MemoryMax"), "268435456");
    assert!(
        b.journal("dindhelperd.service")
            .contains("recreated with its limits"),
        "{}",
        b.journal("dindhelperd.service")
    );

    // A process in the slice (as docker's systemd driver would place a container):
    // AdoptContainer pid:N gives it +500; destroy is Busy until forced.
    b.ok(&[
        "systemd-run",
        "--slice",
        unit,
        "--unit",
        "dhj-probe",
        "sleep",
        "300",
    ]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let pid = b.prop("dhj-probe.service", "MainPID");
    let d = ok(
        &b,
        b.call(
            MEMBER,
            "AdoptContainer",
            "ssa{sv}",
            &["lab-1", &format!("pid:{pid}"), "0"],
        ),
        "member AdoptContainer",
    );
    assert_eq!(d[3], 500, "{d}");
    assert_eq!(b.ok(&["cat", &format!("/proc/{pid}/oom_score_adj")]), "500");
    let outside = format!("pid:{}", b.prop("systemd-journald.service", "MainPID"));
    let o = b.call(
        MEMBER,
        "AdoptContainer",
        "ssa{sv}",
        &["lab-1", &outside, "0"],
    );
    assert!(
        !o.status.success() && text(&o).contains("--cgroup-parent="),
        "{}",
        text(&o)
    );
    let o = b.call(MEMBER, "DestroyInstance", "sa{sv}", &["lab-1", "0"]);
    assert!(
        !o.status.success() && text(&o).contains(&pid),
        "{}",
        text(&o)
    );
    assert_eq!(b.prop(unit, "ActiveState"), "active");

    // Destroy (forced): the process is killed, the slice goes; again: NotFound.
    let d = ok(
        &b,
        b.call(
            MEMBER,
            "DestroyInstance",
            "sa{sv}",
            &["lab-1", "1", "force", "b", "true"],
        ),
        "member DestroyInstance",
    );
    let done = d[0].to_string();
    assert!(
        done.contains("stopped slice") && done.contains("forgot instance lab-1"),
        "{done}"
    );
    assert_eq!(b.prop(unit, "ActiveState"), "inactive");
    let o = b.call(MEMBER, "DestroyInstance", "sa{sv}", &["lab-1", "0"]);
    assert!(
        !o.status.success() && text(&o).contains("does not exist"),
        "{}",
        text(&o)
    );
}

/// Crash consistency with the systemd backend: every slice the daemon makes carries its
/// state id in the Description (set by StartTransientUnit itself), and the start-up
/// reconcile stops an unrecorded slice carrying its own id (a create killed before its
/// record was saved) but leaves another daemon's and an untagged one alone.
#[test]
fn daemon_tags_slices_and_stops_only_its_own_unrecorded_ones() {
    let b = Booted::boot("sdc");
    b.install_daemon(std::path::Path::new(env!("CARGO_BIN_EXE_dindhelperd")));
    ok(
        &b,
        b.call(MEMBER, "CreateInstance", "sa{sv}", &["kept", "0"]),
        "member CreateInstance",
    );
    let st: serde_json::Value = serde_json::from_str(&b.ok(&[
        "/usr/local/bin/dindhelperd",
        "--state-dir",
        "/var/lib/dindhelper",
        "--dump-state",
    ]))
    .unwrap();
    let id = st["state_id"].as_str().unwrap().to_owned();
    assert_eq!(
        b.prop("dind-kept.slice", "Description"),
        format!("dindhelper instance kept (state {id})")
    );

    // What a daemon killed inside CreateInstance (slice made, record not saved) leaves,
    // next to another daemon's slice and one made by hand.
    b.ok(&["systemctl", "stop", "dindhelperd.service"]);
    let transient = |unit: &str, desc: Option<&str>| {
        let mut args = vec![
            "busctl",
            "call",
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager",
            "StartTransientUnit",
            "ssa(sv)a(sa(sv))",
            unit,
            "fail",
        ];
        match desc {
            Some(d) => args.extend(["1", "Description", "s", d]),
            None => args.push("0"),
        }
        args.push("0");
        b.ok(&args);
    };
    let orphan_desc = format!("dindhelper instance orphan (state {id})");
    transient("dind-orphan.slice", Some(&orphan_desc));
    transient(
        "dind-other.slice",
        Some("dindhelper instance other (state ffffffffffff)"),
    );
    transient("dind-byhand.slice", None);
    std::thread::sleep(std::time::Duration::from_millis(300));
    for u in ["dind-orphan.slice", "dind-other.slice", "dind-byhand.slice"] {
        assert_eq!(b.prop(u, "ActiveState"), "active", "{u}");
    }

    b.ok(&["systemctl", "start", "dindhelperd.service"]);
    let journal = b.journal("dindhelperd.service");
    assert_eq!(
        b.prop("dind-orphan.slice", "ActiveState"),
        "inactive",
        "our unrecorded slice is stopped\n{journal}"
    );
    assert!(
        journal.contains("instance orphan: /dind.slice/dind-orphan.slice tagged with our state id"),
        "the decision is logged:\n{journal}"
    );
    assert_eq!(b.prop("dind-other.slice", "ActiveState"), "active");
    assert_eq!(b.prop("dind-byhand.slice", "ActiveState"), "active");
    assert_eq!(b.prop("dind-kept.slice", "ActiveState"), "active");
}
