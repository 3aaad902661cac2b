//! The attacker suite (issue 9): members of the shipped delegation group
//! `dindhelper-tenant` (`dhtest-tenant`, `dhtest-tenant2`, the shipped rules only) and a
//! user granted nothing but the `-others` actions (`dhtest-othersonly`, test rule) try
//! what the security read found. Each refusal is named (the D-Bus error), and what a
//! refused call could have touched is compared before and after.

use crate::bed::{
    gv_str, Bed, Out, BUS_NAME, MANAGER_PATH, MEMBER, OTHERS_ONLY, OWN, TENANT, TENANT2,
};
use crate::Test;
use std::path::PathBuf;

const MIB: u64 = 1 << 20;
const INSTANCES: &str = "org.dindhelper1.Instances";
const PORTS: &str = "org.dindhelper1.Ports";

pub fn tests() -> Vec<Test> {
    let t = |name, run| Test {
        name,
        needs_daemon: true,
        run,
    };
    vec![
        t(
            "attack_negative_oom_score_adj_needs_oom_protect",
            negative_oom_score_adj_needs_oom_protect,
        ),
        t(
            "attack_privileged_host_port_and_huge_publish_many_refused",
            privileged_host_port_and_huge_publish_many_refused,
        ),
        t(
            "attack_others_action_alone_grants_nothing",
            others_action_alone_grants_nothing,
        ),
        t("attack_per_uid_limits", per_uid_limits),
        t(
            "attack_owner_uid_zero_counts_against_uid_zero",
            owner_uid_zero_counts_against_uid_zero,
        ),
        t(
            "attack_concurrent_attach_of_one_image_one_wins",
            concurrent_attach_of_one_image_one_wins,
        ),
        t(
            "attack_tenant_against_another_tenants_resources",
            tenant_against_another_tenants_resources,
        ),
        t(
            "attack_capture_files_are_the_owners_under_umask_077",
            capture_files_are_the_owners_under_umask_077,
        ),
        t(
            "attack_stalled_capture_reader_never_blocks_the_daemon",
            stalled_capture_reader_never_blocks_the_daemon,
        ),
    ]
}

fn name(suffix: &str) -> String {
    format!("dha{}-{suffix}", std::process::id())
}

/// gdbus call of `iface.method` on /org/dindhelper1 as `user`.
fn call(bed: &Bed, user: &str, iface: &str, method: &str, args: &[&str]) -> Out {
    bed.gdbus_raw(
        user,
        &bed.address,
        BUS_NAME,
        MANAGER_PATH,
        &format!("{iface}.{method}"),
        args,
    )
}

#[track_caller]
fn refused(bed: &Bed, user: &str, iface: &str, method: &str, args: &[&str], kind: &str) -> Out {
    let out = call(bed, user, iface, method, args);
    let want = format!("org.dindhelper1.Error.{kind}");
    assert_eq!(
        out.dbus_error().as_deref(),
        Some(want.as_str()),
        "{user}: {method}({}) must be refused with {want}: {out:?}",
        args.join(", ")
    );
    out
}

#[track_caller]
fn ok(bed: &Bed, user: &str, iface: &str, method: &str, args: &[&str]) -> Out {
    let out = call(bed, user, iface, method, args);
    assert!(
        out.ok(),
        "{user}: {method}({}) must succeed: {out:?}",
        args.join(", ")
    );
    out
}

fn instance_names(bed: &Bed) -> String {
    ok(bed, "root", INSTANCES, "ListInstances", &[]).stdout
}

/// Removes an instance as root (force) when the test ends, however it ends.
struct Inst<'b>(&'b Bed, String);

impl Drop for Inst<'_> {
    fn drop(&mut self) {
        call(
            self.0,
            "root",
            INSTANCES,
            "DestroyInstance",
            &[&gv_str(&self.1), "{'force': <true>}"],
        );
    }
}

/// A negative oom_score_adj needs `instances-oom-protect`: a tenant (base `instances`
/// only) is refused on CreateInstance and SetLimits; a positive value is fine; the
/// provisioning group may. Before the fix any `instances` holder made itself OOM-immune.
fn negative_oom_score_adj_needs_oom_protect(bed: &Bed) {
    let n = name("oom");
    let _g = Inst(bed, n.clone());
    let before = instance_names(bed);
    let out = refused(
        bed,
        TENANT,
        INSTANCES,
        "CreateInstance",
        &[&gv_str(&n), "{'oom_score_adj': <int32 -1000>}"],
        "NotAuthorized",
    );
    assert!(out.stderr.contains("instances-oom-protect"), "{out:?}");
    assert_eq!(
        before,
        instance_names(bed),
        "a refused create left an instance"
    );
    ok(
        bed,
        TENANT,
        INSTANCES,
        "CreateInstance",
        &[&gv_str(&n), "{'oom_score_adj': <int32 100>}"],
    );
    refused(
        bed,
        TENANT,
        INSTANCES,
        "SetLimits",
        &[&gv_str(&n), "{'oom_score_adj': <int32 -1>}"],
        "NotAuthorized",
    );
    ok(
        bed,
        TENANT,
        INSTANCES,
        "SetLimits",
        &[&gv_str(&n), "{'oom_score_adj': <int32 0>}"],
    );
    ok(
        bed,
        MEMBER,
        INSTANCES,
        "SetLimits",
        &[&gv_str(&n), "{'oom_score_adj': <int32 -500>}"],
    );
}

/// Host ports below `privileged_port_floor` (default 1024) need `ports-privileged`; a
/// PublishMany above `max_publish_many` (default 1024) is InvalidArgs. Both are decided
/// before the container is looked up (this bed's daemon has no dockerd: an allowed call
/// fails later with another error).
fn privileged_host_port_and_huge_publish_many_refused(bed: &Bed) {
    for port in ["22", "80", "1023"] {
        let out = refused(
            bed,
            TENANT,
            PORTS,
            "Publish",
            &[
                "'web'",
                "'tcp'",
                &format!("uint16 {port}"),
                "uint16 80",
                "@a{sv} {}",
            ],
            "NotAuthorized",
        );
        assert!(out.stderr.contains("ports-privileged"), "{out:?}");
    }
    let out = call(
        bed,
        TENANT,
        PORTS,
        "Publish",
        &["'web'", "'tcp'", "uint16 1024", "uint16 80", "@a{sv} {}"],
    );
    // Above the floor: whatever comes next (no dockerd here, or ports-others for a
    // container of no instance when a dockerd runs), not ports-privileged.
    assert!(
        !out.stderr.contains("ports-privileged"),
        "port 1024 is above the floor: {out:?}"
    );
    let many: Vec<String> = (0..1100)
        .map(|i| format!("('web', 'tcp', uint16 {}, uint16 80)", 20000 + i))
        .collect();
    let arg = format!("[{}]", many.join(", "));
    let out = refused(
        bed,
        TENANT,
        PORTS,
        "PublishMany",
        &[&arg, "@a{sv} {}"],
        "InvalidArgs",
    );
    assert!(out.stderr.contains("max_publish_many"), "{out:?}");
}

/// A user granted only `loop-others` (no `loop`) cannot create an image for another uid:
/// the base action is checked too. Before the fix the `-others` twin alone was asked.
fn others_action_alone_grants_nothing(bed: &Bed) {
    let target = bed.uid(TENANT);
    let img = name("oo");
    let before = bed.image_files();
    refused(
        bed,
        OTHERS_ONLY,
        "org.dindhelper1.Manager",
        "CreateImage",
        &[
            &gv_str(&img),
            &format!("uint64 {}", 4 * MIB),
            &format!("{{'owner_uid': <uint32 {target}>}}"),
        ],
        "NotAuthorized",
    );
    let leaked = bed.image_files() != before;
    if leaked {
        call(
            bed,
            "root",
            "org.dindhelper1.Manager",
            "DeleteImage",
            &[
                &gv_str(&img),
                &format!("{{'owner_uid': <uint32 {target}>}}"),
            ],
        );
    }
    assert!(!leaked, "a refused CreateImage left a file");
}

/// Restores the bed's daemon (its previous arguments) when a test that restarted it with
/// a config ends.
struct ConfigGuard<'b>(&'b Bed, PathBuf, Vec<String>);

impl<'b> ConfigGuard<'b> {
    fn start(bed: &'b Bed, json: &str) -> Self {
        let p = bed.scratch("attack-config.json");
        std::fs::write(&p, json).expect("write config");
        let prev = bed.daemon_args();
        let mut args = prev.clone();
        args.extend(["--config".to_owned(), p.display().to_string()]);
        bed.set_daemon_args(&args);
        bed.restart_daemon();
        ConfigGuard(bed, p, prev)
    }
}

impl Drop for ConfigGuard<'_> {
    fn drop(&mut self) {
        self.0.set_daemon_args(&self.2);
        self.0.restart_daemon();
        std::fs::remove_file(&self.1).ok();
    }
}

/// Per-uid limits: `max_instances_per_uid` and `max_mappings_per_uid` (0 here: refused
/// before any container lookup).
fn per_uid_limits(bed: &Bed) {
    let _c = ConfigGuard::start(
        bed,
        r#"{"max_instances_per_uid": 1, "max_mappings_per_uid": 0}"#,
    );
    let (a, b) = (name("qa"), name("qb"));
    let _ga = Inst(bed, a.clone());
    let _gb = Inst(bed, b.clone());
    ok(
        bed,
        TENANT,
        INSTANCES,
        "CreateInstance",
        &[&gv_str(&a), "@a{sv} {}"],
    );
    let out = refused(
        bed,
        TENANT,
        INSTANCES,
        "CreateInstance",
        &[&gv_str(&b), "@a{sv} {}"],
        "InvalidArgs",
    );
    assert!(out.stderr.contains("max_instances_per_uid"), "{out:?}");

    let out = refused(
        bed,
        TENANT,
        PORTS,
        "Publish",
        &["'web'", "'tcp'", "uint16 8080", "uint16 80", "@a{sv} {}"],
        "InvalidArgs",
    );
    assert!(out.stderr.contains("max_mappings_per_uid"), "{out:?}");
}

/// `max_loops_per_uid`, which a `-others` holder must not escape by making uid 0 the
/// owner: uid 0 is exempt only when the caller is root.
fn owner_uid_zero_counts_against_uid_zero(bed: &Bed) {
    let _c = ConfigGuard::start(bed, r#"{"max_loops_per_uid": 1}"#);
    // Two images of uid 0, made and attached by the provisioning group's member.
    let root_opts = "{'owner_uid': <uint32 0>}";
    let imgs = [name("z1"), name("z2")];
    for i in &imgs {
        ok(
            bed,
            MEMBER,
            "org.dindhelper1.Manager",
            "CreateImage",
            &[&gv_str(i), &format!("uint64 {}", 4 * MIB), root_opts],
        );
    }
    let first = call(
        bed,
        MEMBER,
        "org.dindhelper1.Manager",
        "AttachImage",
        &[&gv_str(&imgs[0]), root_opts],
    );
    let second = call(
        bed,
        MEMBER,
        "org.dindhelper1.Manager",
        "AttachImage",
        &[&gv_str(&imgs[1]), root_opts],
    );
    // Root itself stays exempt: it may attach the second one.
    let by_root = call(
        bed,
        "root",
        "org.dindhelper1.Manager",
        "AttachImage",
        &[&gv_str(&imgs[1]), "@a{sv} {}"],
    );
    for l in bed.list_loops() {
        if l[2]
            .as_str()
            .is_some_and(|f| imgs.iter().any(|i| f.ends_with(&format!("/{i}.img"))))
        {
            bed.detach("root", l[1].as_str().unwrap());
        }
    }
    for i in &imgs {
        bed.delete_image("root", i);
    }
    assert!(first.ok(), "first attach for uid 0: {first:?}");
    assert_eq!(
        second.dbus_error().as_deref(),
        Some("org.dindhelper1.Error.InvalidArgs"),
        "a second loop for uid 0 by a non-root caller must hit max_loops_per_uid: {second:?}"
    );
    assert!(second.stderr.contains("max_loops_per_uid"), "{second:?}");
    assert!(by_root.ok(), "root is exempt: {by_root:?}");
}

/// Two AttachImage calls of one image at the same time (sent back to back on one
/// connection, so the daemon handles them concurrently): exactly one attaches, the other
/// is Busy. Before the fix both could pass the "not attached" check (it ran before the
/// open, without the lock) and the image got two writable loop devices.
fn concurrent_attach_of_one_image_one_wins(bed: &Bed) {
    let img = name("race");
    bed.create_image("root", &img, 4 * MIB);
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let (doubles, errors) = rt.block_on(async {
        let conn = zbus::connection::Builder::address(bed.address.as_str())
            .expect("address")
            .build()
            .await
            .expect("connect");
        let attach = || {
            let conn = conn.clone();
            let img = img.clone();
            async move {
                let opts: std::collections::HashMap<String, zbus::zvariant::Value<'_>> =
                    std::collections::HashMap::new();
                conn.call_method(
                    Some(BUS_NAME),
                    MANAGER_PATH,
                    Some("org.dindhelper1.Manager"),
                    "AttachImage",
                    &(img.as_str(), opts),
                )
                .await
                .and_then(|m| {
                    m.body()
                        .deserialize::<(zbus::zvariant::OwnedObjectPath, String)>()
                        .map(|(_, d)| d)
                })
            }
        };
        let (mut doubles, mut errors) = (0, Vec::new());
        for _ in 0..20 {
            let (a, b) = tokio::join!(attach(), attach());
            let mut wins = Vec::new();
            for r in [a, b] {
                match r {
                    Ok(d) => wins.push(d),
                    Err(zbus::Error::MethodError(name, msg, _))
                        if name.as_str() == "org.dindhelper1.Error.Busy" =>
                    {
                        let _ = msg;
                    }
                    Err(e) => errors.push(e.to_string()),
                }
            }
            if wins.len() > 1 {
                doubles += 1;
            }
            for d in &wins {
                bed.detach("root", d);
            }
        }
        (doubles, errors)
    });
    bed.delete_image("root", &img);
    assert_eq!(doubles, 0, "an image was attached twice at once");
    assert!(errors.is_empty(), "the loser must be Busy: {errors:?}");
}

/// A network namespace with `lo` up (target: a `sleep` in it) and a thread flooding UDP on
/// its loopback until dropped.
struct Flood {
    target: std::process::Child,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flood {
    fn start() -> Flood {
        let mut target = std::process::Command::new("unshare")
            .args(["-n", "sh", "-c", "ip link set lo up && exec sleep 120"])
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("unshare -n");
        let pid = target.id();
        // Wait until lo is up in the new namespace (the sleep has replaced sh).
        let t = std::time::Instant::now();
        loop {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "sleep" {
                break;
            }
            assert!(
                t.elapsed() < std::time::Duration::from_secs(5),
                "netns target"
            );
            if let Ok(Some(st)) = target.try_wait() {
                panic!("unshare -n exited: {st}");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).expect("ns");
            // SAFETY: setns on this (dedicated, short-lived) thread only.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns");
            let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
            let buf = [0x5au8; 1400];
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = sock.send_to(&buf, "127.0.0.1:9");
            }
        });
        Flood {
            target,
            stop,
            thread: Some(thread),
        }
    }

    fn pid(&self) -> u32 {
        self.target.id()
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = self.target.kill();
        let _ = self.target.wait();
    }
}

/// StartCaptureFd into a pipe nobody reads (as root: target `pid:N` needs capture-host).
/// Returns the session object; the read end stays open in `keep`.
fn start_unread_capture(
    rt: &tokio::runtime::Runtime,
    conn: &zbus::Connection,
    pid: u32,
    keep: &mut Vec<std::fs::File>,
) -> String {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh fds we own.
    let (r, w) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    keep.push(r);
    rt.block_on(async {
        let opts: std::collections::HashMap<String, zbus::zvariant::Value<'_>> =
            [("duration".to_owned(), zbus::zvariant::Value::U64(60))]
                .into_iter()
                .collect();
        let target = format!("pid:{pid}");
        let m = conn
            .call_method(
                Some(BUS_NAME),
                MANAGER_PATH,
                Some("org.dindhelper1.Captures"),
                "StartCaptureFd",
                &(target.as_str(), zbus::zvariant::Fd::from(&w), opts),
            )
            .await
            .expect("StartCaptureFd");
        let p: zbus::zvariant::OwnedObjectPath = m.body().deserialize().expect("o");
        p.to_string()
    })
}

fn capture_reason(bed: &Bed, obj: &str) -> String {
    let out = bed
        .busctl(&[
            "get-property",
            BUS_NAME,
            obj,
            "org.dindhelper1.Capture",
            "Reason",
        ])
        .expect_ok("Reason");
    out.json_data().as_str().unwrap_or_default().to_owned()
}

/// A StartCaptureFd pipe nobody reads, with traffic: the session ends by itself with
/// reason `sink-stalled`; Stop of another such session answers within 1 s; daemon
/// shutdown with one still running takes less than 2 s. Before the fix the session
/// thread blocked in write(2): Stop ran into its 10 s timeout, shutdown waited 5 s per
/// session, and the stalled session counted against the limit for good.
fn stalled_capture_reader_never_blocks_the_daemon(bed: &Bed) {
    let flood = Flood::start();
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let conn = rt
        .block_on(
            zbus::connection::Builder::address(bed.address.as_str())
                .expect("a")
                .build(),
        )
        .expect("connect");
    let mut keep = Vec::new();
    let s1 = start_unread_capture(&rt, &conn, flood.pid(), &mut keep);
    let s2 = start_unread_capture(&rt, &conn, flood.pid(), &mut keep);
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let t = std::time::Instant::now();
    let out = bed.busctl(&[
        "call",
        BUS_NAME,
        &s2,
        "org.dindhelper1.Capture",
        "Stop",
        "a{sv}",
        "0",
    ]);
    let stop_took = t.elapsed();
    assert!(out.ok(), "Stop: {out:?}");
    assert!(
        stop_took < std::time::Duration::from_secs(1),
        "Stop of a session with a stalled reader took {stop_took:?}"
    );
    // The other one ends by itself (STALL = 2 s without progress once the queue is full).
    let t = std::time::Instant::now();
    let reason = loop {
        let r = capture_reason(bed, &s1);
        if !r.is_empty() || t.elapsed() > std::time::Duration::from_secs(8) {
            break r;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(reason, "sink-stalled", "session {s1} with nobody reading");
    let s3 = start_unread_capture(&rt, &conn, flood.pid(), &mut keep);
    std::thread::sleep(std::time::Duration::from_millis(800));
    drop(conn);
    let t = std::time::Instant::now();
    let st = bed.stop_daemon();
    let down = t.elapsed();
    bed.start_daemon().expect("start again");
    assert!(st.is_some_and(|s| s.success()), "exit status {st:?}");
    assert!(
        down < std::time::Duration::from_secs(2),
        "shutdown with a stalled capture ({s3}) took {down:?}"
    );
    drop(keep);
    drop(flood);
}

/// Restarts the daemon with umask 077 (the shipped unit's `UMask=0077`) and back.
struct UmaskGuard<'b>(&'b Bed);

impl<'b> UmaskGuard<'b> {
    fn start(bed: &'b Bed) -> Self {
        // SAFETY: umask(2) only swaps the mask; the daemon inherits it at spawn.
        let old = unsafe { libc::umask(0o077) };
        bed.restart_daemon();
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        UmaskGuard(bed)
    }
}

impl Drop for UmaskGuard<'_> {
    fn drop(&mut self) {
        self.0.restart_daemon();
    }
}

/// Under umask 077 (and with capture directories an older daemon left 0700, as the
/// shipped unit made them) the owner reads its capture file, which is 0600 and its own;
/// another tenant cannot read or delete it; DeleteCapture by the owner removes it (the
/// quota is freed). Before the fix the directories stayed 0700 and owners got EACCES,
/// files were 0640 with the owner's group, and nobody could delete a capture.
fn capture_files_are_the_owners_under_umask_077(bed: &Bed) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let caps = bed.state_dir.join("captures");
    let own_dir = caps.join(bed.uid(OWN).to_string());
    for d in [&caps, &own_dir] {
        if d.exists() {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();
        }
    }
    let _u = UmaskGuard::start(bed);
    let flood = Flood::start();
    let cap = name("um");
    let out = ok(
        bed,
        OWN,
        "org.dindhelper1.Captures",
        "StartCapture",
        &[
            &gv_str(&format!("pid:{}", flood.pid())),
            &format!("{{'name': <{}>, 'max_packets': <uint64 5>}}", gv_str(&cap)),
        ],
    );
    let obj = out
        .stdout
        .split('\'')
        .nth(1)
        .expect("session object")
        .to_owned();
    let t = std::time::Instant::now();
    while capture_reason(bed, &obj).is_empty() {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "capture did not end"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    drop(flood);
    let file = own_dir.join(format!("{cap}.pcap"));
    let m = std::fs::metadata(&file).expect("capture file");
    let modes: Vec<u32> = [&caps, &own_dir]
        .iter()
        .map(|d| std::fs::metadata(d).unwrap().permissions().mode() & 0o7777)
        .collect();
    let read_own = bed.ctl_like(OWN, "head", &["-c", "24", &file.display().to_string()]);
    let read_other = bed.ctl_like(TENANT2, "head", &["-c", "24", &file.display().to_string()]);
    let del_other = call(
        bed,
        TENANT,
        "org.dindhelper1.Captures",
        "DeleteCapture",
        &[
            &gv_str(&cap),
            &format!("{{'owner_uid': <uint32 {}>}}", bed.uid(OWN)),
        ],
    );
    let del_own = call(
        bed,
        OWN,
        "org.dindhelper1.Captures",
        "DeleteCapture",
        &[&gv_str(&cap), "@a{sv} {}"],
    );
    let gone = !file.exists();
    let again = call(
        bed,
        OWN,
        "org.dindhelper1.Captures",
        "DeleteCapture",
        &[&gv_str(&cap), "@a{sv} {}"],
    );
    if !gone {
        std::fs::remove_file(&file).ok();
    }
    assert_eq!(modes, vec![0o711, 0o711], "captures/ and captures/<uid>/");
    assert_eq!(
        (m.uid(), m.permissions().mode() & 0o777),
        (bed.uid(OWN), 0o600),
        "capture file owner and mode"
    );
    assert!(read_own.ok(), "the owner reads its capture: {read_own:?}");
    assert!(!read_other.ok(), "another tenant must not read it");
    assert_eq!(
        del_other.dbus_error().as_deref(),
        Some("org.dindhelper1.Error.NotAuthorized"),
        "{del_other:?}"
    );
    assert!(del_own.ok() && gone, "owner's DeleteCapture: {del_own:?}");
    assert_eq!(
        again.dbus_error().as_deref(),
        Some("org.dindhelper1.Error.NotFound"),
        "{again:?}"
    );
}

/// Everything of `dir` (recursively): path, mode, size and content of regular files —
/// to prove refused calls changed nothing.
fn snapshot(dir: &std::path::Path) -> Vec<(String, u32, Vec<u8>)> {
    use std::os::unix::fs::PermissionsExt;
    let mut v = Vec::new();
    fn walk(p: &std::path::Path, v: &mut Vec<(String, u32, Vec<u8>)>) {
        let Ok(rd) = std::fs::read_dir(p) else { return };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            let body = if m.is_file() && !p.ends_with("state.lock") {
                std::fs::read(&p).unwrap_or_default()
            } else {
                Vec::new()
            };
            v.push((p.display().to_string(), m.permissions().mode(), body));
            if m.is_dir() {
                walk(&p, v);
            }
        }
    }
    walk(dir, &mut v);
    v.sort();
    v
}

/// A tenant (shipped group) tries every method against another tenant's image, loop
/// device, instance and capture file: each call is refused with NotAuthorized, and the
/// state dir (state.json, loops.json, state.journal, images), the instance's cgroups and
/// the loop's /dev nodes are byte-identical afterwards.
fn tenant_against_another_tenants_resources(bed: &Bed) {
    let (img, inst) = (name("vimg"), name("vinst"));
    let victim_uid = bed.uid(TENANT);
    ok(
        bed,
        TENANT,
        INSTANCES,
        "CreateInstance",
        &[&gv_str(&inst), "@a{sv} {}"],
    );
    let _gi = Inst(bed, inst.clone());
    bed.create_image(TENANT, &img, 4 * MIB);
    let (_, dev) = bed.attach_image(TENANT, &img, &["instance", "s", &inst]);
    let cgroups = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir("/sys/fs/cgroup")
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path().join("dind").join(&inst))
                    .filter(|p| p.is_dir())
                    .flat_map(|p| {
                        std::fs::read_dir(&p)
                            .map(|rd| {
                                rd.flatten()
                                    .map(|e| e.path().display().to_string())
                                    .collect::<Vec<_>>()
                            })
                            .unwrap_or_default()
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let devnodes = || -> Vec<String> {
        let base = dev.trim_start_matches("/dev/");
        let mut v: Vec<String> = std::fs::read_dir("/dev")
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n == base || n.starts_with(&format!("{base}p")))
            .collect();
        v.sort();
        v
    };
    let before = (snapshot(&bed.state_dir), cgroups(), devnodes());
    let owner = format!("{{'owner_uid': <uint32 {victim_uid}>}}");
    let manager = "org.dindhelper1.Manager";
    let calls: Vec<(&str, &str, Vec<String>)> = vec![
        (manager, "DeleteImage", vec![gv_str(&img), owner.clone()]),
        (manager, "AttachImage", vec![gv_str(&img), owner.clone()]),
        (
            manager,
            "CreateImage",
            vec![
                gv_str("planted"),
                format!("uint64 {}", 4 * MIB),
                owner.clone(),
            ],
        ),
        (manager, "Detach", vec![gv_str(&dev), "@a{sv} {}".into()]),
        (manager, "Rescan", vec![gv_str(&dev), "@a{sv} {}".into()]),
        (
            INSTANCES,
            "SetLimits",
            vec![gv_str(&inst), "{'tasks_max': <uint64 1>}".into()],
        ),
        (
            INSTANCES,
            "DestroyInstance",
            vec![gv_str(&inst), "{'force': <true>}".into()],
        ),
        (
            INSTANCES,
            "AdoptContainer",
            vec![
                gv_str(&inst),
                gv_str(&format!("pid:{}", std::process::id())),
                "@a{sv} {}".into(),
            ],
        ),
        (
            "org.dindhelper1.Devices",
            "ExposeToContainer",
            vec![gv_str(&dev), gv_str("web"), "@a{sv} {}".into()],
        ),
        (
            "org.dindhelper1.Captures",
            "DeleteCapture",
            vec![gv_str("anything"), owner.clone()],
        ),
        (
            "org.dindhelper1.Captures",
            "StartCapture",
            vec![
                gv_str("host"),
                format!("{{'instance': <{}>}}", gv_str(&inst)),
            ],
        ),
    ];
    let mut wrong = Vec::new();
    for (iface, method, args) in &calls {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = call(bed, TENANT2, iface, method, &a);
        if out.dbus_error().as_deref() != Some("org.dindhelper1.Error.NotAuthorized") {
            wrong.push(format!("{method}: {out:?}"));
        }
    }
    let after = (snapshot(&bed.state_dir), cgroups(), devnodes());
    bed.detach(TENANT, &dev);
    bed.delete_image(TENANT, &img);
    assert!(wrong.is_empty(), "not refused as NotAuthorized: {wrong:#?}");
    assert!(before.0 == after.0, "the state dir changed");
    assert_eq!(before.1, after.1, "the instance's cgroups changed");
    assert_eq!(before.2, after.2, "/dev nodes changed");
}
