//! Visibility (issue 9, item 5): a uid outside the provisioning group sees only its own
//! resources. Tenants `dhtest-tenant` (A) and `dhtest-tenant2` (B), members of the
//! shipped group `dindhelper-tenant`, each make an image, a loop device and an instance;
//! then A reads everything it can and must find nothing of B's (object paths, image
//! names, backing files, instance names, B's uid), while `dhtest-member` (group
//! `dindhelper`) and root still see both.
//!
//! - `visibility_daemon_filters_per_caller` runs on the bed's bus (allow-all policy), so
//!   what it proves is the daemon's own filtering: GetManagedObjects, Get/GetAll, the
//!   List methods;
//! - `visibility_shipped_bus_policy` runs a second dbus-daemon with the SHIPPED
//!   dbus/org.dindhelper1.conf (on a system-like default-deny bus), a second polkitd and
//!   a second daemon on it: a user in no group reads nothing, tenants cannot introspect
//!   below /org/dindhelper1, receive no signal from the daemon (dbus-monitor as A while B
//!   creates; the member's monitor sees B's InterfacesAdded), and cannot `busctl monitor`.

use crate::bed::{gv_str, Bed, Out, BUS_NAME, MANAGER_PATH, MEMBER, PLAIN, TENANT, TENANT2};
use crate::Test;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const DENIED: &str = "org.freedesktop.DBus.Error.AccessDenied";

pub fn tests() -> Vec<Test> {
    vec![
        Test {
            name: "visibility_daemon_filters_per_caller",
            needs_daemon: true,
            run: daemon_filters_per_caller,
        },
        Test {
            name: "visibility_shipped_bus_policy",
            needs_daemon: true,
            run: shipped_bus_policy,
        },
    ]
}

fn name(suffix: &str) -> String {
    format!("dhv{}-{suffix}", std::process::id())
}

/// `busctl --address=ADDR --json=short ARGS` as `user`.
fn manager(bed: &Bed, addr: &str, user: &str, iface: &str, method: &str, args: &[&str]) -> Out {
    bed.gdbus_raw(
        user,
        addr,
        BUS_NAME,
        MANAGER_PATH,
        &format!("org.dindhelper1.{iface}.{method}"),
        args,
    )
}

#[track_caller]
fn ok(out: Out, what: &str) -> Out {
    assert!(out.ok(), "{what} must succeed: {out:?}");
    out
}

/// One tenant's resources on the bus at `addr` (removed as root on drop).
struct Owned<'b> {
    bed: &'b Bed,
    addr: String,
    user: &'static str,
    image: String,
    image_obj: String,
    loop_obj: String,
    device: String,
    backing: String,
    instance: String,
    instance_obj: String,
}

impl<'b> Owned<'b> {
    fn make(bed: &'b Bed, addr: &str, user: &'static str, tag: &str) -> Owned<'b> {
        let image = name(&format!("{tag}img"));
        let instance = name(&format!("{tag}inst"));
        let m = |iface: &str, method: &str, args: &[&str]| {
            ok(
                manager(bed, addr, user, iface, method, args),
                &format!("{user}: {method}"),
            )
        };
        let first = |o: Out| -> String {
            // gdbus: (objectpath '/org/…', …)
            let s = o.stdout;
            let start = s.find('\'').expect("a quoted path") + 1;
            let end = start + s[start..].find('\'').expect("closing quote");
            s[start..end].to_owned()
        };
        let instance_obj = first(m(
            "Instances",
            "CreateInstance",
            &[&gv_str(&instance), "@a{sv} {}"],
        ));
        let image_obj = first(m(
            "Manager",
            "CreateImage",
            &[&gv_str(&image), &format!("uint64 {}", 4 * MIB), "@a{sv} {}"],
        ));
        let out = m(
            "Manager",
            "AttachImage",
            &[
                &gv_str(&image),
                &format!("{{'instance': <{}>}}", gv_str(&instance)),
            ],
        );
        let loop_obj = first(out.clone());
        let device = out
            .stdout
            .split('\'')
            .find(|s| s.starts_with("/dev/loop"))
            .expect("device")
            .to_owned();
        let backing = ok(
            bed.busctl_at(
                addr,
                "root",
                &[
                    "get-property",
                    BUS_NAME,
                    &loop_obj,
                    "org.dindhelper1.Loop",
                    "BackingFile",
                ],
            ),
            "root reads BackingFile",
        )
        .json_data()
        .as_str()
        .expect("s")
        .to_owned();
        Owned {
            bed,
            addr: addr.to_owned(),
            user,
            image,
            image_obj,
            loop_obj,
            device,
            backing,
            instance,
            instance_obj,
        }
    }

    /// Strings that must never reach another tenant.
    fn secrets(&self) -> Vec<String> {
        vec![
            self.image.clone(),
            self.image_obj.clone(),
            self.loop_obj.clone(),
            self.backing.clone(),
            self.instance.clone(),
            self.instance_obj.clone(),
            format!("/u{}", self.bed.uid(self.user)),
            // The forms introspection XML would use: node names.
            format!("\"u{}\"", self.bed.uid(self.user)),
            last(&self.image_obj),
            last(&self.instance_obj),
        ]
    }
}

impl Drop for Owned<'_> {
    fn drop(&mut self) {
        let (bed, addr) = (self.bed, self.addr.as_str());
        manager(
            bed,
            addr,
            "root",
            "Manager",
            "Detach",
            &[&gv_str(&self.device), "@a{sv} {}"],
        );
        let owner = format!("{{'owner_uid': <uint32 {}>}}", bed.uid(self.user));
        manager(
            bed,
            addr,
            "root",
            "Manager",
            "DeleteImage",
            &[&gv_str(&self.image), &owner],
        );
        manager(
            bed,
            addr,
            "root",
            "Instances",
            "DestroyInstance",
            &[&gv_str(&self.instance), "{'force': <true>}"],
        );
    }
}

fn last(path: &str) -> String {
    path.rsplit('/').next().unwrap_or_default().to_owned()
}

#[track_caller]
fn assert_hidden(text: &str, from: &Owned<'_>, what: &str) {
    for s in from.secrets() {
        assert!(
            !text.contains(&s),
            "{what} shows {s:?} of {}:\n{text}",
            from.user
        );
    }
}

#[track_caller]
fn assert_shown(text: &str, of: &Owned<'_>, what: &str) {
    for s in [&of.image_obj, &of.loop_obj, &of.instance_obj] {
        assert!(text.contains(s.as_str()), "{what} lacks {s} of {}", of.user);
    }
}

/// Everything `user` can read through the daemon's answers: GetManagedObjects, Get and
/// GetAll on `other`'s objects, every List method. Returns the texts, named.
fn reads(bed: &Bed, addr: &str, user: &str, other: &Owned<'_>) -> Vec<(String, Out)> {
    let mut v = vec![(
        "GetManagedObjects".to_owned(),
        bed.managed_objects_at(addr, user),
    )];
    for (obj, iface, prop) in [
        (&other.loop_obj, "org.dindhelper1.Loop", "BackingFile"),
        (&other.loop_obj, "org.dindhelper1.Loop", "OwnerUid"),
        (&other.image_obj, "org.dindhelper1.Image", "Path"),
        (&other.instance_obj, "org.dindhelper1.Instance", "Name"),
    ] {
        v.push((
            format!("Get {obj} {prop}"),
            bed.gdbus_raw(
                user,
                addr,
                BUS_NAME,
                obj,
                "org.freedesktop.DBus.Properties.Get",
                &[&gv_str(iface), &gv_str(prop)],
            ),
        ));
        v.push((
            format!("GetAll {obj} {iface}"),
            bed.gdbus_raw(
                user,
                addr,
                BUS_NAME,
                obj,
                "org.freedesktop.DBus.Properties.GetAll",
                &[&gv_str(iface)],
            ),
        ));
    }
    for (iface, method) in [
        ("Manager", "ListImages"),
        ("Manager", "ListLoops"),
        ("Instances", "ListInstances"),
        ("Devices", "ListExposures"),
        ("Ports", "ListMappings"),
        ("Captures", "ListCaptures"),
    ] {
        v.push((
            method.to_owned(),
            manager(bed, addr, user, iface, method, &[]),
        ));
    }
    v
}

/// The daemon's filtering on the bed's bus (its policy lets everyone through).
fn daemon_filters_per_caller(bed: &Bed) {
    let addr = bed.address.clone();
    let a = Owned::make(bed, &addr, TENANT, "a");
    let b = Owned::make(bed, &addr, TENANT2, "b");
    let uid_a = bed.uid(TENANT);

    // A: its own objects, nothing of B's, whatever it asks.
    let gmo = ok(
        bed.managed_objects_at(&addr, TENANT),
        "A: GetManagedObjects",
    );
    assert_shown(&gmo.stdout, &a, "A's GetManagedObjects");
    // Every OwnerUid A is shown is A's.
    let data = gmo.json_data();
    let objects = data[0].as_object().expect("a{oa{sa{sv}}}");
    for (path, ifaces) in objects {
        for (iface, props) in ifaces.as_object().expect("a{sa{sv}}") {
            if let Some(u) = props.get("OwnerUid") {
                assert_eq!(
                    u["data"].as_u64(),
                    Some(uid_a.into()),
                    "A is shown {path} {iface} of another uid"
                );
            }
        }
    }
    for (what, out) in reads(bed, &addr, TENANT, &b) {
        assert_hidden(&out.stdout, &b, &format!("A: {what}"));
        if what.starts_with("Get ") {
            assert_eq!(
                out.dbus_error().as_deref(),
                Some("org.freedesktop.DBus.Error.UnknownObject"),
                "A: {what} must answer as for a missing object: {out:?}"
            );
        } else {
            assert!(out.ok(), "A: {what}: {out:?}");
        }
    }
    // A's own reads work.
    let own = bed.gdbus_raw(
        TENANT,
        &addr,
        BUS_NAME,
        &a.loop_obj,
        "org.freedesktop.DBus.Properties.Get",
        &[&gv_str("org.dindhelper1.Loop"), &gv_str("BackingFile")],
    );
    assert!(
        own.ok() && own.stdout.contains(&a.backing),
        "A reads its own loop: {own:?}"
    );
    let lists = manager(bed, &addr, TENANT, "Manager", "ListLoops", &[]);
    assert!(
        lists.stdout.contains(&a.loop_obj),
        "A's ListLoops: {lists:?}"
    );

    // A user in no group owns nothing here and so is shown nothing.
    for (what, out) in reads(bed, &addr, PLAIN, &b) {
        assert_hidden(&out.stdout, &b, &format!("plain: {what}"));
        assert_hidden(&out.stdout, &a, &format!("plain: {what}"));
    }

    // The provisioning group and root see both tenants.
    for user in [MEMBER, "root"] {
        let gmo = ok(bed.managed_objects_at(&addr, user), "GetManagedObjects");
        assert_shown(&gmo.stdout, &a, user);
        assert_shown(&gmo.stdout, &b, user);
        let get = bed.gdbus_raw(
            user,
            &addr,
            BUS_NAME,
            &b.loop_obj,
            "org.freedesktop.DBus.Properties.Get",
            &[&gv_str("org.dindhelper1.Loop"), &gv_str("BackingFile")],
        );
        assert!(get.stdout.contains(&b.backing), "{user} reads B's: {get:?}");
        let lists = manager(bed, &addr, user, "Manager", "ListImages", &[]);
        assert!(
            lists.stdout.contains(&a.image_obj) && lists.stdout.contains(&b.image_obj),
            "{user}: ListImages {lists:?}"
        );
    }
}

// ---- the shipped policy, end to end ------------------------------------------------

/// A child stopped (SIGTERM, then SIGKILL) and reaped on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_owned(bed: &Bed, addr: &str, name: &str, child: &mut Child, log: &std::path::Path) {
    let t = Instant::now();
    loop {
        if bed.name_has_owner_at(addr, name) {
            return;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "{name}: its process exited ({st}):\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{name} not owned after 20 s:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// `dbus-monitor` as `user` on `addr` (a non-root user falls back to match rules, so it
/// prints exactly the signals the bus delivers to that user), output in a file.
fn monitor(bed: &Bed, addr: &str, user: &str, tag: &str) -> (Proc, PathBuf) {
    let file = bed.scratch(&format!("vis-monitor-{tag}.txt"));
    let out = std::fs::File::create(&file).expect("monitor file");
    let child = Command::new("runuser")
        .args([
            "-u",
            user,
            "--",
            "stdbuf",
            "-oL",
            "dbus-monitor",
            "--address",
            addr,
        ])
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup"))
        .stderr(out)
        .spawn()
        .expect("dbus-monitor");
    // Wait until it is subscribed (it prints its own NameAcquired / match lines).
    let t = Instant::now();
    while std::fs::read_to_string(&file)
        .unwrap_or_default()
        .is_empty()
    {
        assert!(t.elapsed() < Duration::from_secs(10), "dbus-monitor silent");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    (Proc(child), file)
}

fn shipped_bus_policy(bed: &Bed) {
    let conf = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("dbus/org.dindhelper1.conf");
    // System-like bus + polkitd's name + the shipped policy, as a host would have it.
    let bus = bed.start_strict_bus(
        "visbus",
        &format!(
            r#"<policy context="default">
    <allow own="org.freedesktop.PolicyKit1"/>
    <allow send_destination="org.freedesktop.PolicyKit1"/>
  </policy>
  <include>{}</include>"#,
            conf.display()
        ),
    );
    let addr = bus.address.clone();
    let run = bed.run_dir.join("vis");
    let state = PathBuf::from(format!("/var/lib/dht-{}-vis", std::process::id()));
    std::fs::create_dir_all(&run).expect("run dir");
    std::fs::create_dir_all(&state).expect("state dir");
    // Removed however the test ends (declared first: dropped after the daemon stopped).
    let _state = RemoveDir(state.clone());
    let plog = run.join("polkitd.log");
    let mut polkitd = Command::new(crate::bed::POLKITD)
        .arg("--no-debug")
        .env("DBUS_SYSTEM_BUS_ADDRESS", &addr)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&plog).expect("log"))
        .stderr(
            std::fs::File::options()
                .append(true)
                .open(&plog)
                .expect("log"),
        )
        .spawn()
        .expect("polkitd");
    wait_owned(
        bed,
        &addr,
        "org.freedesktop.PolicyKit1",
        &mut polkitd,
        &plog,
    );
    let _polkitd = Proc(polkitd);
    let dlog = run.join("daemon.log");
    let mut daemon = Command::new(Bed::daemon_bin())
        .args([
            "--bus-address",
            &addr,
            "--log-level",
            "debug",
            "--state-dir",
        ])
        .arg(&state)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&dlog).expect("log"))
        .stderr(
            std::fs::File::options()
                .append(true)
                .open(&dlog)
                .expect("log"),
        )
        .spawn()
        .expect("dindhelperd");
    wait_owned(bed, &addr, BUS_NAME, &mut daemon, &dlog);
    let daemon = Proc(daemon);

    let (mon_a, file_a) = monitor(bed, &addr, TENANT, "a");
    let (mon_m, file_m) = monitor(bed, &addr, MEMBER, "m");
    let a = Owned::make(bed, &addr, TENANT, "pa");
    let b = Owned::make(bed, &addr, TENANT2, "pb");
    // A busctl monitor as A: refused by the bus (BecomeMonitor is root's).
    let bm = bed.busctl_at(&addr, TENANT, &["monitor", "--timeout=1"]);
    std::thread::sleep(Duration::from_millis(500));
    drop(mon_a);
    drop(mon_m);
    let seen_a = std::fs::read_to_string(&file_a).unwrap_or_default();
    let seen_m = std::fs::read_to_string(&file_m).unwrap_or_default();
    assert!(
        seen_m.contains("InterfacesAdded") && seen_m.contains(&b.loop_obj),
        "the member's monitor must see B's signals (else A seeing none proves nothing):\n{seen_m}"
    );
    assert_hidden(&seen_a, &b, "A's dbus-monitor");
    assert!(
        !seen_a.contains("InterfacesAdded") && !seen_a.contains("PropertiesChanged"),
        "A received the daemon's signals:\n{seen_a}"
    );
    assert!(!bm.ok(), "A's busctl monitor must be refused: {bm:?}");
    assert_hidden(&bm.stdout, &b, "A's busctl monitor");

    // A's reads through the shipped policy: own objects yes, B's nothing.
    for (what, out) in reads(bed, &addr, TENANT, &b) {
        assert_hidden(&out.stdout, &b, &format!("A (shipped policy): {what}"));
        // (stderr: an error names the path A itself asked for, nothing more.)
    }
    // No introspection at all: zbus answers it with the whole subtree below the path
    // (nested <node name="u992">… under /org/dindhelper1, found by `busctl tree`).
    for path in [
        "/",
        MANAGER_PATH,
        "/org/dindhelper1/image",
        "/org/dindhelper1/instance",
        &b.loop_obj,
    ] {
        let out = bed.gdbus_raw(
            TENANT,
            &addr,
            BUS_NAME,
            path,
            "org.freedesktop.DBus.Introspectable.Introspect",
            &[],
        );
        assert_eq!(
            out.dbus_error().as_deref(),
            Some(DENIED),
            "A introspects {path}: {out:?}"
        );
    }
    let tree = bed.busctl_at(&addr, TENANT, &["tree", BUS_NAME]);
    assert_hidden(&tree.stdout, &b, "A's busctl tree");

    // A user in no group: Peer only.
    for (path, method, args) in [
        (
            MANAGER_PATH,
            "org.freedesktop.DBus.ObjectManager.GetManagedObjects",
            vec![],
        ),
        (
            MANAGER_PATH,
            "org.freedesktop.DBus.Introspectable.Introspect",
            vec![],
        ),
        (
            b.loop_obj.as_str(),
            "org.freedesktop.DBus.Properties.GetAll",
            vec![gv_str("org.dindhelper1.Loop")],
        ),
        (
            b.loop_obj.as_str(),
            "org.freedesktop.DBus.Properties.Get",
            vec![gv_str("org.dindhelper1.Loop"), gv_str("BackingFile")],
        ),
        (MANAGER_PATH, "org.dindhelper1.Manager.ListLoops", vec![]),
    ] {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = bed.gdbus_raw(PLAIN, &addr, BUS_NAME, path, method, &a);
        assert_eq!(
            out.dbus_error().as_deref(),
            Some(DENIED),
            "plain: {method}: {out:?}"
        );
    }
    ok(
        bed.gdbus_raw(
            PLAIN,
            &addr,
            BUS_NAME,
            MANAGER_PATH,
            "org.freedesktop.DBus.Peer.Ping",
            &[],
        ),
        "plain: Peer.Ping",
    );

    // The provisioning group reads everything, introspection included.
    let sub = ok(
        bed.busctl_at(
            &addr,
            MEMBER,
            &[
                "introspect",
                "--xml-interface",
                BUS_NAME,
                "/org/dindhelper1/image",
            ],
        ),
        "member introspects /org/dindhelper1/image",
    );
    assert!(
        sub.stdout.contains(&format!("u{}", bed.uid(TENANT2))),
        "member's introspection lists B's node: {sub:?}"
    );
    let get = bed.gdbus_raw(
        MEMBER,
        &addr,
        BUS_NAME,
        &b.loop_obj,
        "org.freedesktop.DBus.Properties.Get",
        &[&gv_str("org.dindhelper1.Loop"), &gv_str("BackingFile")],
    );
    assert!(get.stdout.contains(&b.backing), "member reads B's: {get:?}");
    assert_shown(
        &ok(
            bed.managed_objects_at(&addr, TENANT),
            "A: GetManagedObjects",
        )
        .stdout,
        &a,
        "A's GetManagedObjects (shipped policy)",
    );

    drop(a);
    drop(b);
    drop(daemon);
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
