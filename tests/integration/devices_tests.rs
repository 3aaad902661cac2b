//! Devices a tenant can be given and lose (`org.dindhelper1.Devices`), against the run's
//! real dockerd (the fixture of `capture_tests`: one dockerd per run, cgroup v1 on this
//! host) and the real daemon.
//!
//! The security property: a container must never keep access to a loop number after the
//! daemon freed it. Every test that frees a number checks, inside the container, that the
//! node is gone and that a node re-made there with `mknod` (Docker grants CAP_MKNOD and
//! `b *:* m`) cannot be opened (EPERM from the device cgroup), while the number now backs
//! another image with a secret in it.

use crate::bed::{gv_str, Bed, Out, BUS_NAME, MANAGER_PATH, MEMBER, OWN};
use crate::docker::{in_container, shared, start_container};
use crate::dockerd::Dockerd;
use crate::Test;
use std::time::Instant;

const DEVICES: &str = "org.dindhelper1.Devices";

pub fn tests() -> Vec<Test> {
    vec![
        Test {
            name: "devices_detach_revokes_before_the_number_is_reused",
            needs_daemon: true,
            run: devices_detach_revokes_before_the_number_is_reused,
        },
        Test {
            name: "devices_loop_clr_fd_in_the_container_is_caught_before_reuse",
            needs_daemon: true,
            run: devices_loop_clr_fd_in_the_container_is_caught_before_reuse,
        },
        Test {
            name: "devices_exposures_are_listed_survive_a_restart_and_revoke",
            needs_daemon: true,
            run: devices_exposures_are_listed_survive_a_restart_and_revoke,
        },
        Test {
            name: "devices_destroy_instance_and_delete_image_revoke",
            needs_daemon: true,
            run: devices_destroy_instance_and_delete_image_revoke,
        },
        Test {
            name: "devices_same_name_in_every_container_and_privileged_needs_no_grant",
            needs_daemon: true,
            run: devices_same_name_in_every_container_and_privileged_needs_no_grant,
        },
        Test {
            name: "devices_partitions_follow_a_table_written_inside_the_container",
            needs_daemon: true,
            run: devices_partitions_follow_a_table_written_inside_the_container,
        },
        Test {
            name: "devices_a_grant_that_cannot_be_withdrawn_is_busy_unless_forced",
            needs_daemon: true,
            run: devices_a_grant_that_cannot_be_withdrawn_is_busy_unless_forced,
        },
        Test {
            name: "devices_refusals_change_nothing",
            needs_daemon: true,
            run: devices_refusals_change_nothing,
        },
    ]
}

// ---- helpers -----------------------------------------------------------------------

fn devices_call(bed: &Bed, user: &str, method: &str, sig: &str, args: &[&str]) -> Out {
    bed.call_iface_as(user, "Devices", method, sig, args)
}

fn gdbus_devices(bed: &Bed, user: &str, method: &str, args: &[&str]) -> Out {
    bed.gdbus_raw(
        user,
        &bed.address,
        BUS_NAME,
        MANAGER_PATH,
        &format!("{DEVICES}.{method}"),
        args,
    )
}

#[track_caller]
fn expect_dbus_error(out: &Out, kind: &str, what: &str) {
    let want = format!("org.dindhelper1.Error.{kind}");
    assert_eq!(
        out.dbus_error().as_deref(),
        Some(want.as_str()),
        "{what} should fail with {want}: exit {}, stdout {:?}, stderr {:?}",
        out.status,
        out.stdout,
        out.stderr
    );
}

/// ExposeToContainer as `user`; returns the created nodes.
#[track_caller]
fn expose(bed: &Bed, user: &str, device: &str, container: &str) -> Vec<String> {
    let out = devices_call(
        bed,
        user,
        "ExposeToContainer",
        "ssa{sv}",
        &[device, container, "0"],
    )
    .expect_ok(&format!("{user}: ExposeToContainer {device} {container}"));
    out.json_data()[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

/// Write `secret` at offset 0 of a loop device from the host.
fn write_secret(dev: &str, secret: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).open(dev).unwrap();
    let mut block = secret.as_bytes().to_vec();
    block.resize(4096, 0);
    f.write_all(&block).unwrap();
    f.sync_all().unwrap();
}

/// The container can no longer reach loop number `name` (`loopN`): its node is gone from
/// the container's /dev, and a node made again with mknod cannot be opened (EPERM),
/// so `secret` (now on the device) cannot be read.
#[track_caller]
fn assert_no_access(
    d: &Dockerd,
    container: &str,
    name: &str,
    major: u32,
    minor: u32,
    secret: &str,
) {
    let (ok, out) = in_container(d, container, &format!("/bin/busybox ls -l /dev/{name}"));
    assert!(!ok, "/dev/{name} is still inside {container}: {out}");
    let (ok, out) = in_container(
        d,
        container,
        &format!(
            "/bin/busybox rm -f /dev/dhx; /bin/busybox mknod /dev/dhx b {major} {minor} && \
             /bin/busybox dd if=/dev/dhx bs=4096 count=1 2>&1"
        ),
    );
    assert!(
        !ok && !out.contains(secret),
        "{container} reads {major}:{minor} through a re-made node: {out}"
    );
    assert!(
        out.contains("Operation not permitted"),
        "open of the re-made node should be EPERM: {out}"
    );
    let _ = in_container(d, container, "/bin/busybox rm -f /dev/dhx");
}

fn major_minor(dev: &str) -> (u32, u32) {
    crate::bed::sysfs_dev(dev.trim_start_matches("/dev/")).expect("sysfs dev")
}

fn list_exposures(bed: &Bed) -> Vec<serde_json::Value> {
    devices_call(bed, "root", "ListExposures", "", &[])
        .expect_ok("ListExposures")
        .json_data()[0]
        .as_array()
        .expect("a(...)")
        .clone()
}

// ---- tests -------------------------------------------------------------------------

fn devices_detach_revokes_before_the_number_is_reused(bed: &Bed) {
    shared(bed, |d| {
        start_container(d, "dhv-a", &[]);
        bed.create_image(MEMBER, "dhv-a1", 16 << 20);
        bed.create_image(OWN, "dhv-b1", 16 << 20);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let (_, dev) = bed.attach_image(MEMBER, "dhv-a1", &[]);
            let name = dev.trim_start_matches("/dev/").to_owned();
            let (major, minor) = major_minor(&dev);
            let t = Instant::now();
            let created = expose(bed, MEMBER, &dev, "dhv-a");
            println!("(expose {:?}) ", t.elapsed());
            assert!(created.contains(&name), "{created:?}");
            let (ok, out) = in_container(
                d,
                "dhv-a",
                &format!("/bin/busybox dd if=/dev/{name} bs=4096 count=1 of=/dev/null 2>&1"),
            );
            assert!(ok, "the exposed device is readable inside: {out}");

            let t = Instant::now();
            bed.detach(MEMBER, &dev);
            println!("(detach with revoke {:?}) ", t.elapsed());
            // Another owner's image gets the same number.
            let (_, dev2) = bed.attach_image(OWN, "dhv-b1", &[]);
            let secret = format!("dhv-secret-{}", std::process::id());
            let r2 = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                assert_eq!(dev2, dev, "the kernel handed out another number");
                write_secret(&dev2, &secret);
                assert_no_access(d, "dhv-a", &name, major, minor, &secret);
            }));
            bed.detach(OWN, &dev2);
            if let Err(e) = r2 {
                std::panic::resume_unwind(e);
            }
        }));
        let _ = d.docker(&["rm", "-f", "dhv-a"]);
        bed.delete_image(MEMBER, "dhv-a1");
        bed.delete_image(OWN, "dhv-b1");
        if let Err(e) = r {
            std::panic::resume_unwind(e);
        }
    })
}

fn devices_loop_clr_fd_in_the_container_is_caught_before_reuse(bed: &Bed) {
    shared(bed, |d| {
        start_container(d, "dhv-c", &[]);
        bed.create_image(MEMBER, "dhv-c1", 16 << 20);
        bed.create_image(OWN, "dhv-c2", 16 << 20);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let (_, dev) = bed.attach_image(MEMBER, "dhv-c1", &[]);
            let name = dev.trim_start_matches("/dev/").to_owned();
            let (major, minor) = major_minor(&dev);
            expose(bed, MEMBER, &dev, "dhv-c");
            // The tenant unbinds the device itself: LOOP_CLR_FD needs no capability.
            let (ok, out) =
                in_container(d, "dhv-c", &format!("/bin/busybox losetup -d /dev/{name}"));
            assert!(ok, "losetup -d inside the container: {out}");
            // The daemon hands the number out again: it must revoke first.
            let (_, dev2) = bed.attach_image(OWN, "dhv-c2", &[]);
            let secret = format!("dhv-clr-{}", std::process::id());
            let r2 = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                assert_eq!(dev2, dev, "the kernel handed out another number");
                let n = bed
                    .list_loops()
                    .iter()
                    .filter(|l| l[1].as_str() == Some(dev.as_str()))
                    .count();
                assert_eq!(n, 1, "two records for {dev}: {:?}", bed.list_loops());
                write_secret(&dev2, &secret);
                assert_no_access(d, "dhv-c", &name, major, minor, &secret);
                assert!(
                    !list_exposures(bed)
                        .iter()
                        .any(|e| e[1].as_str() == Some(dev.as_str())),
                    "the stale exposure is still listed"
                );
            }));
            bed.detach(OWN, &dev2);
            if let Err(e) = r2 {
                std::panic::resume_unwind(e);
            }
        }));
        let _ = d.docker(&["rm", "-f", "dhv-c"]);
        bed.delete_image(MEMBER, "dhv-c1");
        bed.delete_image(OWN, "dhv-c2");
        if let Err(e) = r {
            std::panic::resume_unwind(e);
        }
    })
}

fn devices_exposures_are_listed_survive_a_restart_and_revoke(bed: &Bed) {
    shared(bed, |d| {
        start_container(d, "dhv-l", &[]);
        bed.create_image(MEMBER, "dhv-l1", 16 << 20);
        let lp = crate::bed::DaemonLoop::attach(bed, MEMBER, "dhv-l1", &[]);
        let dev = lp.device.clone();
        let name = dev.trim_start_matches("/dev/").to_owned();
        let (major, minor) = major_minor(&dev);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            crate::bed::sfdisk(&dev, &[], &[], "label: gpt\nsize=4MiB\nsize=4MiB\n")
                .expect_ok("sfdisk");
            bed.rescan(MEMBER, &dev);
            let created = expose(bed, MEMBER, &dev, "dhv-l");
            assert_eq!(created.len(), 3, "{created:?}");
            let check_listed = |what: &str| {
                let l = list_exposures(bed);
                let e = l
                    .iter()
                    .find(|e| e[1].as_str() == Some(dev.as_str()))
                    .unwrap_or_else(|| panic!("{what}: no exposure of {dev} in {l:?}"));
                assert_eq!(e[3].as_str(), Some("dhv-l"), "{e:?}");
                let rules: Vec<&str> = e[6]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r.as_str().unwrap())
                    .collect();
                assert!(
                    rules.contains(&format!("b {major}:{minor} rwm").as_str()),
                    "{rules:?}"
                );
                assert_eq!(rules.len(), 3, "exact rules only: {rules:?}");
                assert!(rules.iter().all(|r| !r.contains('*')), "{rules:?}");
            };
            check_listed("after expose");
            // The Loop object shows it too.
            let p = bed
                .busctl(&[
                    "get-property",
                    BUS_NAME,
                    &lp.object,
                    "org.dindhelper1.Loop",
                    "Exposures",
                ])
                .expect_ok("Loop.Exposures");
            assert!(p.stdout.contains("dhv-l"), "{}", p.stdout);

            bed.restart_daemon();
            check_listed("after a daemon restart");

            // Another uid may not revoke member's exposure.
            let out = gdbus_devices(
                bed,
                OWN,
                "RevokeFromContainer",
                &[&gv_str(&dev), &gv_str("dhv-l"), "@a{sv} {}"],
            );
            expect_dbus_error(
                &out,
                "NotAuthorized",
                "dhtest-own: revoke member's exposure",
            );

            let t = Instant::now();
            devices_call(
                bed,
                MEMBER,
                "RevokeFromContainer",
                "ssa{sv}",
                &[&dev, "dhv-l", "0"],
            )
            .expect_ok("RevokeFromContainer");
            println!("(revoke {:?}) ", t.elapsed());
            assert!(list_exposures(bed).is_empty(), "{:?}", list_exposures(bed));
            // The device is still ours on the host, but not the container's.
            assert_no_access(d, "dhv-l", &name, major, minor, "\u{1}never");
            let (ok, _) = in_container(d, "dhv-l", &format!("/bin/busybox ls /dev/{name}p1"));
            assert!(!ok, "partition node left behind");
            // Revoking again: NotFound.
            let out = gdbus_devices(
                bed,
                MEMBER,
                "RevokeFromContainer",
                &[&gv_str(&dev), &gv_str("dhv-l"), "@a{sv} {}"],
            );
            expect_dbus_error(&out, "NotFound", "second revoke");
        }));
        drop(lp);
        let _ = d.docker(&["rm", "-f", "dhv-l"]);
        bed.delete_image(MEMBER, "dhv-l1");
        if let Err(e) = r {
            std::panic::resume_unwind(e);
        }
    })
}

fn devices_destroy_instance_and_delete_image_revoke(bed: &Bed) {
    shared(bed, |d| {
        start_container(d, "dhv-i", &[]);
        bed.create_image(MEMBER, "dhv-i1", 16 << 20);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            bed.busctl_as(
                MEMBER,
                &[
                    "call",
                    BUS_NAME,
                    MANAGER_PATH,
                    "org.dindhelper1.Instances",
                    "CreateInstance",
                    "sa{sv}",
                    "dhv-lab",
                    "0",
                ],
            )
            .expect_ok("CreateInstance dhv-lab");
            let (_, dev) = bed.attach_image(MEMBER, "dhv-i1", &["instance", "s", "dhv-lab"]);
            let name = dev.trim_start_matches("/dev/").to_owned();
            let (major, minor) = major_minor(&dev);
            expose(bed, MEMBER, &dev, "dhv-i");
            let out = bed
                .busctl_as(
                    MEMBER,
                    &[
                        "call",
                        BUS_NAME,
                        MANAGER_PATH,
                        "org.dindhelper1.Instances",
                        "DestroyInstance",
                        "sa{sv}",
                        "dhv-lab",
                        "1",
                        "delete_images",
                        "b",
                        "true",
                    ],
                )
                .expect_ok("DestroyInstance dhv-lab");
            assert!(out.stdout.contains("revoked"), "{}", out.stdout);
            assert!(list_exposures(bed).is_empty());
            assert_no_access(d, "dhv-i", &name, major, minor, "\u{1}never");
        }));
        let _ = d.docker(&["rm", "-f", "dhv-i"]);
        let _ = bed.call_as(MEMBER, "DeleteImage", "sa{sv}", &["dhv-i1", "0"]);
        if let Err(e) = r {
            std::panic::resume_unwind(e);
        }
    })
}

fn devices_refusals_change_nothing(bed: &Bed) {
    shared(bed, |d| {
        start_container(d, "dhv-r", &[]);
        start_container(d, "dhv-hostdev", &["-v", "/dev:/dev"]);
        let _ = d.docker(&["rm", "-f", "dhv-stopped"]);
        d.docker_ok(&[
            "create",
            "--name",
            "dhv-stopped",
            "bb:latest",
            "/bin/busybox",
            "true",
        ]);
        bed.create_image(MEMBER, "dhv-r1", 16 << 20);
        let lp = crate::bed::DaemonLoop::attach(bed, MEMBER, "dhv-r1", &[]);
        let dev = lp.device.clone();
        let name = dev.trim_start_matches("/dev/").to_owned();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let call = |user: &str, dev: &str, c: &str| {
                gdbus_devices(
                    bed,
                    user,
                    "ExposeToContainer",
                    &[&gv_str(dev), &gv_str(c), "@a{sv} {}"],
                )
            };
            expect_dbus_error(&call(MEMBER, &dev, "dhv-hostdev"), "Conflict", "host /dev");
            expect_dbus_error(&call(MEMBER, &dev, "dhv-stopped"), "Conflict", "stopped");
            expect_dbus_error(&call(OWN, &dev, "dhv-r"), "NotAuthorized", "another uid's");
            expect_dbus_error(
                &call(MEMBER, "/dev/loop999", "dhv-r"),
                "NotFound",
                "unmanaged",
            );
            expect_dbus_error(
                &call(MEMBER, &dev, "dhv-nosuch"),
                "NotFound",
                "no container",
            );
            assert!(list_exposures(bed).is_empty(), "{:?}", list_exposures(bed));
            let (ok, _) = in_container(d, "dhv-r", &format!("/bin/busybox ls /dev/{name}"));
            assert!(!ok, "a refused call made a node");
        }));
        drop(lp);
        for c in ["dhv-r", "dhv-hostdev", "dhv-stopped"] {
            let _ = d.docker(&["rm", "-f", c]);
        }
        bed.delete_image(MEMBER, "dhv-r1");
        if let Err(e) = r {
            std::panic::resume_unwind(e);
        }
    })
}

fn devices_same_name_in_every_container_and_privileged_needs_no_grant(bed: &Bed) {
    shared(bed, |d| {
        start_container(d, "dhv-s1", &[]);
        start_container(d, "dhv-s2", &[]);
        // `--privileged` cannot start here (runc: "unable to apply caps" in this VM); a
        // container whose device cgroup allows everything takes the same path.
        start_container(d, "dhv-priv", &["--device-cgroup-rule", "a *:* rwm"]);
        bed.create_image(MEMBER, "dhv-s1", 16 << 20);
        bed.create_image(MEMBER, "dhv-s2", 16 << 20);
        let l1 = crate::bed::DaemonLoop::attach(bed, MEMBER, "dhv-s1", &[]);
        let l2 = crate::bed::DaemonLoop::attach(bed, MEMBER, "dhv-s2", &[]);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            crate::bed::sfdisk(&l1.device, &[], &[], "label: gpt\nsize=4MiB\n").expect_ok("sfdisk");
            crate::bed::sfdisk(&l2.device, &[], &[], "label: gpt\nsize=4MiB\n").expect_ok("sfdisk");
            bed.rescan(MEMBER, &l1.device);
            bed.rescan(MEMBER, &l2.device);
            let as_disk = |dev: &str, c: &str| {
                devices_call(
                    bed,
                    MEMBER,
                    "ExposeToContainer",
                    "ssa{sv}",
                    &[dev, c, "1", "as", "s", "disk"],
                )
            };
            // Two students, two loop numbers, one name.
            as_disk(&l1.device, "dhv-s1").expect_ok("expose as disk in s1");
            as_disk(&l2.device, "dhv-s2").expect_ok("expose as disk in s2");
            for (c, dev) in [("dhv-s1", &l1.device), ("dhv-s2", &l2.device)] {
                let (maj, min) = major_minor(dev);
                let (ok, out) = in_container(d, c, "/bin/busybox ls -l /dev/disk /dev/disk1");
                assert!(ok, "{c}: {out}");
                assert!(
                    out.contains(&format!("{maj}, {min:>3}")) || out.contains(&format!("{maj},")),
                    "{c}: {out}"
                );
                let (ok, out) = in_container(
                    d,
                    c,
                    "/bin/busybox dd if=/dev/disk1 of=/dev/null bs=4096 count=1 2>&1",
                );
                assert!(ok, "{c} opens /dev/disk1: {out}");
            }
            // The name is taken in s1 by the other device: Conflict, nothing changed.
            let out = gdbus_devices(
                bed,
                MEMBER,
                "ExposeToContainer",
                &[&gv_str(&l2.device), &gv_str("dhv-s1"), "{'as': <'disk'>}"],
            );
            expect_dbus_error(&out, "Conflict", "as disk taken in s1");
            assert_eq!(
                list_exposures(bed)
                    .iter()
                    .filter(|e| e[3].as_str() == Some("dhv-s1"))
                    .count(),
                1
            );
            // Revoke and Detach use the name given.
            bed.detach(MEMBER, &l1.device);
            std::mem::forget(l1);
            let (ok, _) = in_container(d, "dhv-s1", "/bin/busybox ls /dev/disk /dev/disk1");
            assert!(!ok, "/dev/disk left in dhv-s1 after Detach");

            // Allow-all (as privileged): the container reaches every device anyway; no rule
            // is written.
            expose(bed, MEMBER, &l2.device, "dhv-priv");
            let l = list_exposures(bed);
            let e = l
                .iter()
                .find(|e| e[3].as_str() == Some("dhv-priv"))
                .expect("listed");
            assert!(e[4].as_str().unwrap().starts_with("none"), "{e:?}");
        }));
        drop(l2);
        for c in ["dhv-s1", "dhv-s2", "dhv-priv"] {
            let _ = d.docker(&["rm", "-f", c]);
        }
        bed.delete_image(MEMBER, "dhv-s1");
        bed.delete_image(MEMBER, "dhv-s2");
        if let Err(e) = r {
            std::panic::resume_unwind(e);
        }
    })
}

/// The first sector of a 16 MiB disk with this sfdisk script (an MBR: the whole table).
fn mbr_sector(script: &str) -> Vec<u8> {
    let f = format!("/var/tmp/dhv-mbr-{}.img", std::process::id());
    let _ = std::fs::remove_file(&f);
    std::fs::File::create(&f)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    crate::bed::sfdisk(&f, &[], &[], script).expect_ok("sfdisk on a scratch file");
    let b = std::fs::read(&f).unwrap()[..512].to_vec();
    std::fs::remove_file(&f).unwrap();
    b
}

/// Wait until `f` is true (polled every 2 ms); the time it took.
#[track_caller]
fn wait_for(what: &str, f: impl Fn() -> bool) -> std::time::Duration {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "{what} did not happen within 10 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    t.elapsed()
}

fn devices_partitions_follow_a_table_written_inside_the_container(bed: &Bed) {
    use std::os::unix::fs::FileTypeExt;
    shared(bed, |d| {
        start_container(d, "dhv-f", &[]);
        bed.create_image(MEMBER, "dhv-f1", 16 << 20);
        let lp = crate::bed::DaemonLoop::attach(bed, MEMBER, "dhv-f1", &[]);
        let dev = lp.device.clone();
        let name = dev.trim_start_matches("/dev/").to_owned();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let created = expose(bed, MEMBER, &dev, "dhv-f");
            assert_eq!(created, vec![name.clone()], "no partitions yet");
            let pid: u32 = d
                .docker_ok(&["inspect", "-f", "{{.State.Pid}}", "dhv-f"])
                .parse()
                .unwrap();
            let inside = |node: &str| format!("/proc/{pid}/root/dev/{node}");
            let is_blk = |node: &str| {
                std::fs::symlink_metadata(inside(node))
                    .is_ok_and(|m| m.file_type().is_block_device())
            };
            std::fs::write(
                format!("/proc/{pid}/root/tmp/two.mbr"),
                mbr_sector("label: dos\nstart=2048,size=4096\nstart=8192,size=4096\n"),
            )
            .unwrap();
            std::fs::write(
                format!("/proc/{pid}/root/tmp/one.mbr"),
                mbr_sector("label: dos\nstart=2048,size=4096\n"),
            )
            .unwrap();

            // A table with two partitions written through the node inside the container
            // (opened from here through /proc/<pid>/root, so the moment of the close is
            // known): the bench of "writer's close to node inside".
            let two = std::fs::read(format!("/proc/{pid}/root/tmp/two.mbr")).unwrap();
            {
                use std::io::Write;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(inside(&name))
                    .unwrap();
                f.write_all(&two).unwrap();
                f.sync_all().unwrap();
            }
            let took = wait_for("partition nodes inside the container", || {
                is_blk(&format!("{name}p1")) && is_blk(&format!("{name}p2"))
            });
            println!("(follow: writer's close to both nodes inside {took:?}; goal 100 ms) ");
            assert!(
                took < std::time::Duration::from_millis(1000),
                "follow took {took:?}"
            );
            let (ok, out) = in_container(
                d,
                "dhv-f",
                &format!("/bin/busybox dd if=/dev/{name}p2 of=/dev/null bs=512 count=1 2>&1"),
            );
            assert!(ok, "p2 usable inside: {out}");
            let (maj, min) = major_minor(&format!("/dev/{name}p2"));
            let rules: Vec<String> = list_exposures(bed)
                .iter()
                .find(|e| e[1].as_str() == Some(dev.as_str()))
                .expect("listed")[6]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_str().unwrap().to_owned())
                .collect();
            assert_eq!(rules.len(), 3, "{rules:?}");
            assert!(rules.contains(&format!("b {maj}:{min} rwm")), "{rules:?}");

            // The student deletes partition 2 from inside: its node and its grant go.
            let (ok, out) = in_container(
                d,
                "dhv-f",
                &format!("/bin/busybox dd if=/tmp/one.mbr of=/dev/{name} bs=512 count=1 conv=notrunc,fsync 2>&1"),
            );
            assert!(ok, "dd inside: {out}");
            wait_for("p2 gone inside the container", || {
                !is_blk(&format!("{name}p2"))
            });
            assert!(is_blk(&format!("{name}p1")));
            assert_no_access(d, "dhv-f", &format!("{name}p2"), maj, min, "\u{1}never");
        }));
        drop(lp);
        let _ = d.docker(&["rm", "-f", "dhv-f"]);
        bed.delete_image(MEMBER, "dhv-f1");
        if let Err(e) = r {
            std::panic::resume_unwind(e);
        }
    })
}

fn devices_a_grant_that_cannot_be_withdrawn_is_busy_unless_forced(bed: &Bed) {
    shared(bed, |d| {
        start_container(d, "dhv-b", &[]);
        bed.create_image(MEMBER, "dhv-b1", 16 << 20);
        let lp = crate::bed::DaemonLoop::attach(bed, MEMBER, "dhv-b1", &[]);
        let dev = lp.device.clone();
        let pid = d.docker_ok(&["inspect", "-f", "{{.State.Pid}}", "dhv-b"]);
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .unwrap()
            .lines()
            .find_map(|l| {
                let mut it = l.splitn(3, ':');
                let (_, c, p) = (it.next()?, it.next()?, it.next()?);
                c.split(',').any(|x| x == "devices").then(|| p.to_owned())
            })
            .expect("a v1 devices cgroup");
        let deny = format!("/sys/fs/cgroup/devices{cg}/devices.deny");
        let mut mounted = false;
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            expose(bed, MEMBER, &dev, "dhv-b");
            // Writes to devices.deny now go nowhere: the grant cannot be withdrawn.
            crate::bed::run("mount", &["--bind", "/dev/null", &deny]).expect_ok("bind /dev/null");
            mounted = true;
            let out = bed.gdbus_as(MEMBER, "Detach", &[&gv_str(&dev), "@a{sv} {}"]);
            expect_dbus_error(&out, "Busy", "Detach while the grant stays");
            assert!(
                out.stderr.contains("dhv-b"),
                "Busy names the container: {}",
                out.stderr
            );
            assert!(
                bed.list_loops()
                    .iter()
                    .any(|l| l[1].as_str() == Some(dev.as_str())),
                "the device was freed"
            );
            assert_eq!(list_exposures(bed).len(), 1);
            let out = devices_call(
                bed,
                MEMBER,
                "RevokeFromContainer",
                "ssa{sv}",
                &[&dev, "dhv-b", "1", "force", "b", "true"],
            )
            .expect_ok("forced revoke");
            assert!(
                out.stdout.contains("FORCED"),
                "the reply says so: {}",
                out.stdout
            );
            assert!(list_exposures(bed).is_empty());
        }));
        if mounted {
            crate::bed::run("umount", &[&deny]);
        }
        drop(lp);
        let _ = d.docker(&["rm", "-f", "dhv-b"]);
        bed.delete_image(MEMBER, "dhv-b1");
        if let Err(e) = r {
            std::panic::resume_unwind(e);
        }
    })
}
