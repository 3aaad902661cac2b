//! Instances through the real daemon (`org.dindhelper1.Instances`), on this machine's
//! cgroupfs backend (no systemd as PID 1): the cgroup files hold the limits, SetLimits
//! changes them live, polkit refuses plain users, bad input is a named error that creates
//! nothing, DestroyInstance detaches the instance's loop devices and removes its cgroups,
//! an instance survives a daemon restart (and its cgroup is recreated when it vanished).
//!
//! Instance names carry the helper tag and the pid (`dhj<pid>-…`); every test removes what
//! it made (through the daemon, then `rmdir` as a fallback).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use crate::bed::{gv_str, Bed, Out, BUS_NAME, MANAGER_PATH, MEMBER, OWN, PLAIN};
use crate::Test;

// The dockerd fixture of tests/common (dockerd in its own netns, image bb:latest).
use crate::dockerd;

const IFACE: &str = "org.dindhelper1.Instances";
const MIB: u64 = 1 << 20;

pub fn tests() -> Vec<Test> {
    let t = |name, run| Test {
        name,
        needs_daemon: true,
        run,
    };
    vec![
        t(
            "instance_limits_land_in_cgroup_files_and_set_limits_changes_them_live",
            instance_limits_land_in_cgroup_files_and_set_limits_changes_them_live,
        ),
        t(
            "plain_user_is_refused_every_instance_method",
            plain_user_is_refused_every_instance_method,
        ),
        t(
            "bad_instance_input_is_a_named_error_and_creates_nothing",
            bad_instance_input_is_a_named_error_and_creates_nothing,
        ),
        t(
            "destroy_instance_detaches_its_loops_and_removes_its_cgroups",
            destroy_instance_detaches_its_loops_and_removes_its_cgroups,
        ),
        t(
            "instance_survives_restart_and_vanished_cgroup_is_recreated",
            instance_survives_restart_and_vanished_cgroup_is_recreated,
        ),
        t(
            "adopt_sets_oom_score_adj_and_destroy_refuses_then_forces",
            adopt_sets_oom_score_adj_and_destroy_refuses_then_forces,
        ),
        t(
            "adopt_docker_container_by_name_with_a_real_dockerd",
            adopt_docker_container_by_name_with_a_real_dockerd,
        ),
    ]
}

fn iname(suffix: &str) -> String {
    format!("dhj{}-{suffix}", std::process::id())
}

/// `busctl call … org.dindhelper1.Instances METHOD SIG ARGS…` as `user`.
fn call(bed: &Bed, user: &str, method: &str, sig: &str, args: &[&str]) -> Out {
    bed.call_iface_as(user, "Instances", method, sig, args)
}

fn gdbus(bed: &Bed, user: &str, method: &str, args: &[&str]) -> Out {
    bed.gdbus_raw(
        user,
        &bed.address,
        BUS_NAME,
        MANAGER_PATH,
        &format!("{IFACE}.{method}"),
        args,
    )
}

#[track_caller]
fn expect_error(bed: &Bed, user: &str, method: &str, args: &[&str], kind: &str) -> Out {
    let out = gdbus(bed, user, method, args);
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

/// CreateInstance with busctl a{sv} triples; returns (object, slice unit, cgroup parent).
#[track_caller]
fn create(bed: &Bed, user: &str, name: &str, limits: &[&str]) -> (String, String, String) {
    let n = (limits.len() / 3).to_string();
    let mut args = vec![name, n.as_str()];
    args.extend_from_slice(limits);
    let d = call(bed, user, "CreateInstance", "sa{sv}", &args)
        .expect_ok(&format!("{user}: CreateInstance {name}"))
        .json_data();
    (
        d[0].as_str().unwrap().to_owned(),
        d[1].as_str().unwrap().to_owned(),
        d[2].as_str().unwrap().to_owned(),
    )
}

#[track_caller]
fn set_limits(bed: &Bed, user: &str, name: &str, limits: &[&str]) {
    let n = (limits.len() / 3).to_string();
    let mut args = vec![name, n.as_str()];
    args.extend_from_slice(limits);
    call(bed, user, "SetLimits", "sa{sv}", &args).expect_ok(&format!("{user}: SetLimits {name}"));
}

/// DestroyInstance; returns what it did.
#[track_caller]
fn destroy(bed: &Bed, user: &str, name: &str, opts: &[&str]) -> Vec<String> {
    let n = (opts.len() / 3).to_string();
    let mut args = vec![name, n.as_str()];
    args.extend_from_slice(opts);
    let d = call(bed, user, "DestroyInstance", "sa{sv}", &args)
        .expect_ok(&format!("{user}: DestroyInstance {name}"))
        .json_data();
    d[0].as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

fn list_names(bed: &Bed) -> Vec<String> {
    let d = call(bed, "root", "ListInstances", "", &[])
        .expect_ok("ListInstances")
        .json_data();
    d[0].as_array()
        .unwrap()
        .iter()
        .map(|r| r[1].as_str().unwrap().to_owned())
        .collect()
}

// ---- cgroup files ------------------------------------------------------------------

const CG: &str = "/sys/fs/cgroup";

fn v1() -> bool {
    Path::new(CG).join("memory/memory.limit_in_bytes").exists()
        || Path::new(CG).join("pids").is_dir()
}

/// Every directory an instance may have (v1: each hierarchy; v2: the unified one).
fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(CG)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path().join("dind").join(name))
                .collect()
        })
        .unwrap_or_default();
    v.push(Path::new(CG).join("dind").join(name));
    v.into_iter().filter(|p| p.is_dir()).collect()
}

fn file(name: &str, controller: &str, f: &str) -> PathBuf {
    if v1() {
        Path::new(CG)
            .join(controller)
            .join("dind")
            .join(name)
            .join(f)
    } else {
        Path::new(CG).join("dind").join(name).join(f)
    }
}

fn read(p: &Path) -> String {
    fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
        .trim()
        .to_owned()
}

/// (cpu quota µs per 100 ms or "max"/"-1", memory max bytes, pids max) as the kernel has them.
fn kernel_limits(name: &str) -> (String, String, String) {
    if v1() {
        (
            read(&file(name, "cpu", "cpu.cfs_quota_us")),
            read(&file(name, "memory", "memory.limit_in_bytes")),
            read(&file(name, "pids", "pids.max")),
        )
    } else {
        let cpu = read(&file(name, "", "cpu.max"));
        (
            cpu.split_whitespace().next().unwrap_or("").to_owned(),
            read(&file(name, "", "memory.max")),
            read(&file(name, "", "pids.max")),
        )
    }
}

/// Removes the instance through the daemon (root, force) and any directory left.
struct InstGuard<'b> {
    bed: &'b Bed,
    name: String,
}

impl Drop for InstGuard<'_> {
    fn drop(&mut self) {
        let _ = self.bed.destroy_instance_forced(&self.name);
        for d in cgroup_dirs(&self.name) {
            if let Err(e) = fs::remove_dir(&d) {
                eprintln!("InstGuard: rmdir {}: {e}", d.display());
            }
        }
    }
}

fn guard<'b>(bed: &'b Bed, name: &str) -> InstGuard<'b> {
    InstGuard {
        bed,
        name: name.to_owned(),
    }
}

// ---- tests ---------------------------------------------------------------------------

fn instance_limits_land_in_cgroup_files_and_set_limits_changes_them_live(bed: &Bed) {
    let name = iname("lim");
    let _g = guard(bed, &name);
    let mem = (256 * MIB).to_string();
    let (obj, slice, parent) = create(
        bed,
        MEMBER,
        &name,
        &[
            "cpu_quota_percent",
            "u",
            "50",
            "memory_max",
            "t",
            &mem,
            "tasks_max",
            "i",
            "100",
        ],
    );
    assert_eq!(
        obj,
        format!("/org/dindhelper1/instance/dhj{}_2dlim", std::process::id())
    );
    assert_eq!(
        slice,
        format!("dind-dhj{}\\x2dlim.slice", std::process::id())
    );
    assert_eq!(parent, format!("/dind/{name}"));
    assert!(!cgroup_dirs(&name).is_empty(), "no cgroup directory made");
    assert_eq!(
        kernel_limits(&name),
        ("50000".into(), mem.clone(), "100".into())
    );

    // Properties of the object.
    let owner = bed
        .busctl(&[
            "get-property",
            BUS_NAME,
            &obj,
            "org.dindhelper1.Instance",
            "OwnerUid",
        ])
        .expect_ok("OwnerUid")
        .json_data();
    assert_eq!(owner.as_u64(), Some(u64::from(bed.uid(MEMBER))));
    let limits = bed
        .busctl(&[
            "get-property",
            BUS_NAME,
            &obj,
            "org.dindhelper1.Instance",
            "Limits",
        ])
        .expect_ok("Limits")
        .stdout;
    assert!(
        limits.contains("memory_max") && limits.contains("268435456"),
        "{limits}"
    );

    // SetLimits merges: the CPU quota changes, memory stays, tasks_max goes back to max.
    set_limits(
        bed,
        MEMBER,
        &name,
        &["cpu_quota_percent", "u", "150", "tasks_max", "s", "default"],
    );
    assert_eq!(
        kernel_limits(&name),
        ("150000".into(), mem.clone(), "max".into())
    );
    let rows = call(bed, "root", "ListInstances", "", &[])
        .expect_ok("ListInstances")
        .json_data();
    let row = rows[0]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r[1] == name.as_str())
        .expect("listed")
        .clone();
    assert_eq!(row[4].as_u64(), Some(u64::from(bed.uid(MEMBER))));
    assert!(row[5].to_string().contains("150"), "{row}");

    let done = destroy(bed, MEMBER, &name, &[]);
    assert!(
        done.iter().any(|d| d.starts_with("removed cgroup")),
        "{done:?}"
    );
    assert!(cgroup_dirs(&name).is_empty(), "{:?}", cgroup_dirs(&name));
    assert!(!list_names(bed).contains(&name));
    expect_error(
        bed,
        MEMBER,
        "DestroyInstance",
        &[&gv_str(&name), "@a{sv} {}"],
        "NotFound",
    );
}

fn plain_user_is_refused_every_instance_method(bed: &Bed) {
    let name = iname("auth");
    let _g = guard(bed, &name);
    let n = gv_str(&name);
    expect_error(
        bed,
        PLAIN,
        "CreateInstance",
        &[&n, "{'tasks_max': <uint64 10>}"],
        "NotAuthorized",
    );
    assert!(cgroup_dirs(&name).is_empty());
    create(bed, MEMBER, &name, &["tasks_max", "t", "50"]);
    for (m, args) in [
        (
            "SetLimits",
            vec![n.clone(), "{'tasks_max': <uint64 10>}".into()],
        ),
        (
            "AdoptContainer",
            vec![n.clone(), "'pid:2'".into(), "@a{sv} {}".into()],
        ),
        ("DestroyInstance", vec![n.clone(), "@a{sv} {}".into()]),
    ] {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        expect_error(bed, PLAIN, m, &a, "NotAuthorized");
        // dhtest-own has the base action but not -others: the member's instance is not its.
        expect_error(bed, OWN, m, &a, "NotAuthorized");
    }
    assert_eq!(read(&file(&name, "pids", "pids.max")), "50");
    // Reading is open to everyone.
    call(bed, PLAIN, "ListInstances", "", &[]).expect_ok("ListInstances as plain");
    // dhtest-own may make and remove its own.
    let own = iname("own");
    let _g2 = guard(bed, &own);
    create(bed, OWN, &own, &[]);
    destroy(bed, OWN, &own, &[]);
    destroy(bed, MEMBER, &name, &[]);
}

fn bad_instance_input_is_a_named_error_and_creates_nothing(bed: &Bed) {
    let before = list_names(bed);
    let long = "a".repeat(49);
    for bad in [
        "",
        "Upper",
        "a_b",
        "a.b",
        "../x",
        "a/b",
        long.as_str(),
        "dhj x",
    ] {
        expect_error(
            bed,
            MEMBER,
            "CreateInstance",
            &[&gv_str(bad), "@a{sv} {}"],
            "InvalidArgs",
        );
    }
    let name = iname("bad");
    let _g = guard(bed, &name);
    let n = gv_str(&name);
    for (limits, must_name) in [
        ("{'cpu_quota_percent': <uint32 0>}", "cpu_quota_percent"),
        ("{'cpu_quota_percent': <int32 -5>}", "cpu_quota_percent"),
        ("{'memory_max': <int64 -1>}", "memory_max"),
        ("{'memory_max': <uint64 1000>}", "memory_max"),
        ("{'tasks_max': <uint64 0>}", "tasks_max"),
        ("{'cpu_weight': <uint64 0>}", "cpu_weight"),
        ("{'io_weight': <uint64 20000>}", "io_weight"),
        ("{'oom_score_adj': <int32 5000>}", "oom_score_adj"),
        ("{'memory_max': <'lots'>}", "memory_max"),
        ("{'memroy_max': <uint64 1073741824>}", "memroy_max"),
        ("{'docker_cgroup_driver': <'lxc'>}", "docker_cgroup_driver"),
    ] {
        let out = expect_error(bed, MEMBER, "CreateInstance", &[&n, limits], "InvalidArgs");
        assert!(
            out.stderr.contains(must_name),
            "{limits}: message should name {must_name}: {}",
            out.stderr
        );
    }
    // dockerd's systemd driver cannot use a cgroupfs instance: NotSupported, nothing made.
    if !Path::new("/run/systemd/system").exists() {
        expect_error(
            bed,
            MEMBER,
            "CreateInstance",
            &[&n, "{'docker_cgroup_driver': <'systemd'>}"],
            "NotSupported",
        );
    }
    assert!(
        cgroup_dirs(&name).is_empty(),
        "bad input made {:?}",
        cgroup_dirs(&name)
    );
    assert_eq!(list_names(bed), before);

    // Unknown instance: NotFound everywhere.
    let ghost = gv_str(&iname("ghost"));
    expect_error(
        bed,
        MEMBER,
        "SetLimits",
        &[&ghost, "{'tasks_max': <uint64 10>}"],
        "NotFound",
    );
    expect_error(
        bed,
        MEMBER,
        "AdoptContainer",
        &[&ghost, "'pid:2'", "@a{sv} {}"],
        "NotFound",
    );
    expect_error(
        bed,
        MEMBER,
        "DestroyInstance",
        &[&ghost, "@a{sv} {}"],
        "NotFound",
    );

    // Twice the same name: Conflict; a bad SetLimits changes nothing.
    create(bed, MEMBER, &name, &["tasks_max", "t", "64"]);
    expect_error(
        bed,
        MEMBER,
        "CreateInstance",
        &[&n, "@a{sv} {}"],
        "Conflict",
    );
    expect_error(
        bed,
        MEMBER,
        "SetLimits",
        &[&n, "{'memory_max': <uint64 4096>}"],
        "InvalidArgs",
    );
    expect_error(
        bed,
        MEMBER,
        "SetLimits",
        &[
            &n,
            "{'memory_max': <uint64 1073741824>, 'memory_high': <uint64 2147483648>}",
        ],
        "InvalidArgs",
    );
    assert_eq!(read(&file(&name, "pids", "pids.max")), "64");
    expect_error(
        bed,
        MEMBER,
        "AdoptContainer",
        &[&n, "'../../etc'", "@a{sv} {}"],
        "InvalidArgs",
    );
    destroy(bed, MEMBER, &name, &[]);
}

fn loop_attached(device: &str) -> bool {
    let base = device.trim_start_matches("/dev/");
    Path::new("/sys/block")
        .join(base)
        .join("loop/backing_file")
        .exists()
}

fn destroy_instance_detaches_its_loops_and_removes_its_cgroups(bed: &Bed) {
    let name = iname("dl");
    let _g = guard(bed, &name);
    create(
        bed,
        MEMBER,
        &name,
        &["memory_max", "t", &(512 * MIB).to_string()],
    );
    let img_keep = format!("{name}-keep");
    let img_del = format!("{name}-del");
    bed.create_image(MEMBER, &img_keep, 4 * MIB);
    bed.create_image(MEMBER, &img_del, 4 * MIB);
    let (_, dev1) = bed.attach_image(MEMBER, &img_keep, &["instance", "s", &name]);
    let (_, dev3) = bed.attach_image(MEMBER, &img_del, &["instance", "s", &name]);
    assert!(loop_attached(&dev1) && loop_attached(&dev3));

    // Without delete_images: devices go, images stay.
    let done = destroy(bed, MEMBER, &name, &[]);
    assert!(done.contains(&format!("detached {dev1}")), "{done:?}");
    assert!(done.contains(&format!("detached {dev3}")), "{done:?}");
    assert!(
        done.iter().any(|d| d.starts_with("removed cgroup")),
        "{done:?}"
    );
    assert!(
        done.contains(&format!("forgot instance {name}")),
        "{done:?}"
    );
    assert!(!loop_attached(&dev1) && !loop_attached(&dev3));
    assert!(cgroup_dirs(&name).is_empty());
    assert!(bed.image_path(MEMBER, &img_keep).exists());
    let loops = bed.list_loops();
    assert!(
        !loops.iter().any(|l| l[6] == name.as_str()),
        "loops of the instance still listed: {loops:?}"
    );
    expect_error(
        bed,
        MEMBER,
        "DestroyInstance",
        &[&gv_str(&name), "@a{sv} {}"],
        "NotFound",
    );

    // With delete_images: the image behind the device goes too.
    create(bed, MEMBER, &name, &[]);
    let (_, dev) = bed.attach_image(MEMBER, &img_del, &["instance", "s", &name]);
    let done = destroy(bed, MEMBER, &name, &["delete_images", "b", "true"]);
    assert!(done.contains(&format!("detached {dev}")), "{done:?}");
    assert!(
        done.iter()
            .any(|d| d.starts_with(&format!("deleted image {img_del}"))),
        "{done:?}"
    );
    assert!(!bed.image_path(MEMBER, &img_del).exists());
    assert!(bed.image_path(MEMBER, &img_keep).exists());
    bed.delete_image(MEMBER, &img_keep);

    // Tagging a device with an instance that does not exist is refused (NotFound) and
    // attaches nothing: a device can only join an instance that its teardown will see.
    let orphan = iname("orphan");
    bed.create_image(MEMBER, &orphan, 4 * MIB);
    let before = bed.list_loops().len();
    let out = bed.gdbus_as(
        MEMBER,
        "AttachImage",
        &[
            &gv_str(&orphan),
            &format!("{{'instance': <{}>}}", gv_str(&orphan)),
        ],
    );
    assert_eq!(
        out.dbus_error().as_deref(),
        Some("org.dindhelper1.Error.NotFound"),
        "{out:?}"
    );
    assert_eq!(bed.list_loops().len(), before);
    bed.delete_image(MEMBER, &orphan);
    // A cgroup without record (made by hand here) belongs to nobody: -others needed.
    let pids_root = Path::new(CG).join("pids/dind");
    if pids_root.is_dir() {
        fs::create_dir(pids_root.join(&orphan)).unwrap();
        let _g = guard(bed, &orphan);
        expect_error(
            bed,
            OWN,
            "DestroyInstance",
            &[&gv_str(&orphan), "@a{sv} {}"],
            "NotAuthorized",
        );
        expect_error(
            bed,
            MEMBER,
            "CreateInstance",
            &[&gv_str(&orphan), "@a{sv} {}"],
            "Conflict",
        );
        let done = destroy(bed, MEMBER, &orphan, &[]);
        assert!(
            done.iter().any(|d| d.starts_with("removed cgroup")),
            "{done:?}"
        );
    }
}

fn instance_survives_restart_and_vanished_cgroup_is_recreated(bed: &Bed) {
    let name = iname("rs");
    let _g = guard(bed, &name);
    let mem = (300 * MIB).to_string();
    create(
        bed,
        MEMBER,
        &name,
        &["cpu_quota_percent", "u", "25", "memory_max", "t", &mem],
    );
    bed.restart_daemon();
    assert!(list_names(bed).contains(&name));
    assert_eq!(kernel_limits(&name).0, "25000");
    let obj = format!("/org/dindhelper1/instance/dhj{}_2drs", std::process::id());
    bed.busctl(&[
        "get-property",
        BUS_NAME,
        &obj,
        "org.dindhelper1.Instance",
        "Name",
    ])
    .expect_ok("instance object exported after restart");

    // As after a reboot: the cgroups are gone while the daemon is down.
    let st = bed.stop_daemon().expect("daemon was running");
    assert!(st.success());
    for d in cgroup_dirs(&name) {
        fs::remove_dir(&d).unwrap_or_else(|e| panic!("rmdir {}: {e}", d.display()));
    }
    assert!(cgroup_dirs(&name).is_empty());
    bed.start_daemon().expect("start daemon");
    assert_eq!(
        kernel_limits(&name),
        ("25000".into(), mem.clone(), "max".into())
    );
    // Gone while the daemon runs: SetLimits makes it again (merged limits).
    for d in cgroup_dirs(&name) {
        fs::remove_dir(&d).unwrap_or_else(|e| panic!("rmdir {}: {e}", d.display()));
    }
    set_limits(bed, MEMBER, &name, &["tasks_max", "t", "77"]);
    assert_eq!(kernel_limits(&name), ("25000".into(), mem, "77".into()));
    assert!(
        bed.daemon_log()
            .contains("was gone, recreated with its limits"),
        "reconcile decision not logged"
    );
    destroy(bed, MEMBER, &name, &[]);
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn adopt_sets_oom_score_adj_and_destroy_refuses_then_forces(bed: &Bed) {
    let name = iname("ad");
    let _g = guard(bed, &name);
    create(bed, MEMBER, &name, &["tasks_max", "t", "32"]);
    let n = gv_str(&name);

    // A process outside the instance: Conflict naming the --cgroup-parent.
    let outside = Kill(Command::new("sleep").arg("300").spawn().expect("sleep"));
    let out = expect_error(
        bed,
        MEMBER,
        "AdoptContainer",
        &[&n, &gv_str(&format!("pid:{}", outside.0.id())), "@a{sv} {}"],
        "Conflict",
    );
    assert!(
        out.stderr
            .contains(&format!("--cgroup-parent=/dind/{name}")),
        "{}",
        out.stderr
    );

    // A process inside (moved there like runc would): adopted with the default +500.
    let inside = Kill(Command::new("sleep").arg("300").spawn().expect("sleep"));
    let pid = inside.0.id();
    for d in cgroup_dirs(&name) {
        fs::write(d.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("move {pid} into {}: {e}", d.display()));
    }
    let d = call(
        bed,
        MEMBER,
        "AdoptContainer",
        "ssa{sv}",
        &[&name, &format!("pid:{pid}"), "0"],
    )
    .expect_ok("AdoptContainer")
    .json_data();
    assert_eq!(d[0], format!("pid:{pid}").as_str());
    assert_eq!(d[3].as_i64(), Some(500));
    assert_eq!(
        read(Path::new(&format!("/proc/{pid}/oom_score_adj"))),
        "500"
    );

    // SetLimits of oom_score_adj re-applies it to the adopted process.
    set_limits(bed, MEMBER, &name, &["oom_score_adj", "i", "300"]);
    assert_eq!(
        read(Path::new(&format!("/proc/{pid}/oom_score_adj"))),
        "300"
    );
    let obj = format!("/org/dindhelper1/instance/dhj{}_2dad", std::process::id());
    let c = bed
        .busctl(&[
            "get-property",
            BUS_NAME,
            &obj,
            "org.dindhelper1.Instance",
            "Containers",
        ])
        .expect_ok("Containers")
        .stdout;
    assert!(c.contains(&format!("pid:{pid}")), "{c}");

    // Destroy without force: Busy naming the pid, nothing forgotten.
    let out = expect_error(bed, MEMBER, "DestroyInstance", &[&n, "@a{sv} {}"], "Busy");
    assert!(out.stderr.contains(&pid.to_string()), "{}", out.stderr);
    assert!(list_names(bed).contains(&name));
    // With force: the process is killed, the cgroups go.
    let done = destroy(bed, MEMBER, &name, &["force", "b", "true"]);
    assert!(
        done.iter().any(|d| d.starts_with("removed cgroup")),
        "{done:?}"
    );
    assert!(cgroup_dirs(&name).is_empty());
    let mut inside = inside;
    let st = inside.0.wait().expect("wait sleep");
    assert!(!st.success(), "the process in the instance was killed");
}

/// Every pid in the container's cgroup (pids hierarchy on v1, unified on v2).
fn container_pids(d: &dockerd::Dockerd, ctr: &str) -> Vec<u32> {
    let pid = d.docker_ok(&["inspect", "-f", "{{.State.Pid}}", ctr]);
    let cg = read(Path::new(&format!("/proc/{pid}/cgroup")));
    let (mount, path) = cg
        .lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctrl, path) = (f.next()?, f.next()?, f.next()?);
            if v1() && ctrl.split(',').any(|c| c == "pids") {
                Some((Path::new(CG).join("pids"), path.to_owned()))
            } else if !v1() && ctrl.is_empty() {
                Some((PathBuf::from(CG), path.to_owned()))
            } else {
                None
            }
        })
        .expect("cgroup line");
    read(
        &mount
            .join(path.trim_start_matches('/'))
            .join("cgroup.procs"),
    )
    .lines()
    .map(|p| p.parse().unwrap())
    .collect()
}

/// On the run's shared dockerd (the bed's daemon pointed at it with `--docker-host`).
fn adopt_docker_container_by_name_with_a_real_dockerd(bed: &Bed) {
    crate::docker::shared(bed, |d| adopt_docker_container_by_name(bed, d))
}

fn adopt_docker_container_by_name(bed: &Bed, d: &dockerd::Dockerd) {
    let name = iname("dk");
    let _g = guard(bed, &name);
    let (_, _, parent) = create(
        bed,
        MEMBER,
        &name,
        &["memory_max", "t", &(256 * MIB).to_string()],
    );
    assert_eq!(parent, format!("/dind/{name}"));
    let n = gv_str(&name);

    // A container inside the instance, with a second process.
    let id = d.run_web("dhjc1", "/www", &["--cgroup-parent", &parent]);
    d.docker_ok(&["exec", "-d", "dhjc1", "/bin/busybox", "sleep", "300"]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let r = call(
        bed,
        MEMBER,
        "AdoptContainer",
        "ssa{sv}",
        &[&name, "dhjc1", "0"],
    )
    .expect_ok("AdoptContainer dhjc1")
    .json_data();
    assert_eq!(r[0], id.as_str(), "{r}");
    assert!(
        r[1].as_str()
            .unwrap()
            .starts_with(&format!("/dind/{name}/")),
        "{r}"
    );
    let pids = container_pids(d, "dhjc1");
    assert!(pids.len() >= 2, "{pids:?}");
    for p in &pids {
        assert_eq!(
            read(Path::new(&format!("/proc/{p}/oom_score_adj"))),
            "500",
            "pid {p}"
        );
    }

    // After `docker restart` the new processes get the instance's oom_score_adj again
    // without any call: the daemon follows Docker's events.
    d.docker_ok(&["restart", "-t", "0", "dhjc1"]);
    let t = std::time::Instant::now();
    loop {
        let pids = container_pids(d, "dhjc1");
        let all = !pids.is_empty()
            && pids
                .iter()
                .all(|p| read(Path::new(&format!("/proc/{p}/oom_score_adj"))) == "500");
        if all {
            break;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "oom_score_adj not re-applied after docker restart: {:?}",
            pids.iter()
                .map(|p| (p, read(Path::new(&format!("/proc/{p}/oom_score_adj")))))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = &id;

    // Outside the instance: Conflict naming the --cgroup-parent; stopped: Conflict;
    // unknown: NotFound.
    d.run_web("dhjc2", "/www", &[]);
    let out = expect_error(
        bed,
        MEMBER,
        "AdoptContainer",
        &[&n, "'dhjc2'", "@a{sv} {}"],
        "Conflict",
    );
    assert!(
        out.stderr.contains(&format!("--cgroup-parent={parent}")),
        "{}",
        out.stderr
    );
    d.docker_ok(&["stop", "-t", "0", "dhjc2"]);
    let out = expect_error(
        bed,
        MEMBER,
        "AdoptContainer",
        &[&n, "'dhjc2'", "@a{sv} {}"],
        "Conflict",
    );
    assert!(out.stderr.contains("not running"), "{}", out.stderr);
    expect_error(
        bed,
        MEMBER,
        "AdoptContainer",
        &[&n, "'nosuch'", "@a{sv} {}"],
        "NotFound",
    );

    // Destroy while the container runs: Busy; after `docker rm -f`: gone.
    expect_error(bed, MEMBER, "DestroyInstance", &[&n, "@a{sv} {}"], "Busy");
    d.docker_ok(&["rm", "-f", "dhjc1", "dhjc2"]);
    let done = destroy(bed, MEMBER, &name, &[]);
    assert!(
        done.iter().any(|x| x.starts_with("removed cgroup")),
        "{done:?}"
    );
    assert!(cgroup_dirs(&name).is_empty(), "{:?}", cgroup_dirs(&name));
}
