//! Images and loop devices through the real daemon: data path, persistence across
//! restarts and crashes, and bad input (which must change nothing).

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::bed::{
    gv_str, run, Bed, DaemonLoop, LoopGuard, BUS_NAME, MANAGER_IFACE, MANAGER_PATH, MEMBER, OWN,
    PLAIN,
};
use crate::Test;

const MIB: u64 = 1 << 20;

pub fn tests() -> Vec<Test> {
    let t = |name, run| Test {
        name,
        needs_daemon: true,
        run,
    };
    vec![
        t(
            "image_attach_write_read_same_bytes",
            image_attach_write_read_same_bytes,
        ),
        t(
            "restart_keeps_images_and_loops",
            restart_keeps_images_and_loops,
        ),
        t(
            "kill9_during_attach_leaks_no_loop_device",
            kill9_during_attach_leaks_no_loop_device,
        ),
        t(
            "bad_image_names_are_invalid_args_and_change_nothing",
            bad_image_names_are_invalid_args_and_change_nothing,
        ),
        t(
            "bad_image_sizes_are_invalid_args_and_change_nothing",
            bad_image_sizes_are_invalid_args_and_change_nothing,
        ),
        t(
            "duplicate_and_missing_images_are_named_errors",
            duplicate_and_missing_images_are_named_errors,
        ),
        t(
            "attach_fd_of_non_regular_files_is_invalid_args",
            attach_fd_of_non_regular_files_is_invalid_args,
        ),
        t(
            "ctl_attach_of_dev_null_and_directory_fails",
            ctl_attach_of_dev_null_and_directory_fails,
        ),
        t(
            "detach_and_rescan_of_unmanaged_devices_are_refused",
            detach_and_rescan_of_unmanaged_devices_are_refused,
        ),
        t(
            "others_action_guards_other_uids_devices",
            others_action_guards_other_uids_devices,
        ),
    ]
}

/// Everything the daemon exposes about images and loops, for before/after comparisons.
fn snapshot(
    bed: &Bed,
) -> (
    Vec<serde_json::Value>,
    Vec<serde_json::Value>,
    Vec<std::path::PathBuf>,
) {
    (bed.list_images(), bed.list_loops(), bed.image_files())
}

fn read_at(path: &std::path::Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.seek(SeekFrom::Start(offset)).expect("seek");
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).expect("read");
    buf
}

/// CreateImage → AttachImage → write a pattern through /dev/loopN → the same bytes are
/// in `<state>/images/<uid>/<name>.img` at the same offset; Detach; DeleteImage.
fn image_attach_write_read_same_bytes(bed: &Bed) {
    let obj = bed.create_image(MEMBER, "roundtrip", 16 * MIB);
    let img = bed.image_path(MEMBER, "roundtrip");
    let meta = fs::metadata(&img).unwrap_or_else(|e| panic!("{}: {e}", img.display()));
    assert_eq!(meta.len(), 16 * MIB, "image size");
    {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            meta.uid(),
            bed.uid(MEMBER),
            "image file owned by its owner uid"
        );
        assert!(
            meta.blocks() * 512 < MIB,
            "image must be sparse, has {} blocks",
            meta.blocks()
        );
    }
    let images = bed.list_images();
    let row = images
        .iter()
        .find(|r| r[1] == "roundtrip")
        .unwrap_or_else(|| panic!("ListImages lacks roundtrip: {images:?}"));
    assert_eq!(row[0], obj.as_str());
    assert_eq!(row[2], 16 * MIB);
    assert_eq!(row[3], bed.uid(MEMBER));
    assert_eq!(row[4], "");

    let lp = DaemonLoop::attach(bed, MEMBER, "roundtrip", &[]);
    assert!(lp.device.starts_with("/dev/loop"), "device {:?}", lp.device);
    let name = lp.device.trim_start_matches("/dev/");
    assert_eq!(lp.object, format!("/org/dindhelper1/loop/{name}"));
    let backing =
        fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).expect("sysfs");
    assert_eq!(backing.trim(), img.to_string_lossy());

    // 1 MiB of random bytes at offset 3 MiB, written through the block device.
    let pattern = bed.scratch("pattern");
    run(
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={}", pattern.display()),
            "bs=1M",
            "count=1",
            "status=none",
        ],
    )
    .expect_ok("make pattern");
    run(
        "dd",
        &[
            &format!("if={}", pattern.display()),
            &format!("of={}", lp.device),
            "bs=1M",
            "seek=3",
            "conv=fsync",
            "oflag=direct",
            "status=none",
        ],
    )
    .expect_ok("dd to the loop device");
    let want = fs::read(&pattern).expect("pattern");
    assert_eq!(
        read_at(&img, 3 * MIB, MIB as usize),
        want,
        "bytes in the image file"
    );

    // Object properties tell the same story.
    let out = bed
        .busctl(&[
            "get-property",
            BUS_NAME,
            &lp.object,
            "org.dindhelper1.Loop",
            "Device",
            "BackingFile",
            "OwnerUid",
            "Size",
        ])
        .expect_ok("get-property");
    for (want, line) in [
        (format!("\"{}\"", lp.device), 0),
        (format!("\"{}\"", img.display()), 1),
        (bed.uid(MEMBER).to_string(), 2),
        ((16 * MIB).to_string(), 3),
    ] {
        let got: serde_json::Value =
            serde_json::from_str(out.stdout.lines().nth(line).unwrap_or("null")).expect("json");
        assert_eq!(
            got["data"].to_string(),
            want,
            "property line {line}: {}",
            out.stdout
        );
    }
    let images = bed.list_images();
    let row = images.iter().find(|r| r[1] == "roundtrip").expect("listed");
    assert_eq!(
        row[4],
        lp.device.as_str(),
        "ListImages shows the attached device"
    );

    let dev = lp.device.clone();
    lp.detach();
    assert!(!bed
        .kernel_loops_in_state()
        .contains(&dev.trim_start_matches("/dev/").to_owned()));
    bed.delete_image(MEMBER, "roundtrip");
    assert!(!img.exists(), "DeleteImage removes the file");
}

/// SIGTERM + start again: ListImages and ListLoops are unchanged, the loop objects are
/// on the bus again, the kernel still has the devices.
fn restart_keeps_images_and_loops(bed: &Bed) {
    bed.create_image(MEMBER, "keep-a", 8 * MIB);
    bed.create_image(MEMBER, "keep-b", 8 * MIB);
    bed.create_image("root", "keep-c", 8 * MIB);
    let a = DaemonLoop::attach(bed, MEMBER, "keep-a", &["partscan", "b", "true"]);
    let c = DaemonLoop::attach(bed, "root", "keep-c", &["read_only", "b", "true"]);
    let before = (bed.list_images(), bed.list_loops());
    let kernel_before = bed.kernel_loops_in_state();

    bed.restart_daemon();

    let after = (bed.list_images(), bed.list_loops());
    let sorted = |v: &Vec<serde_json::Value>| {
        let mut s: Vec<String> = v.iter().map(|x| x.to_string()).collect();
        s.sort();
        s
    };
    assert_eq!(
        sorted(&before.0),
        sorted(&after.0),
        "ListImages across restart"
    );
    assert_eq!(
        sorted(&before.1),
        sorted(&after.1),
        "ListLoops across restart"
    );
    assert_eq!(
        kernel_before,
        bed.kernel_loops_in_state(),
        "kernel loop devices"
    );
    let tree = bed
        .busctl(&["tree", "--list", BUS_NAME])
        .expect_ok("busctl tree");
    for lp in [&a, &c] {
        assert!(
            tree.stdout.contains(&lp.object),
            "{} missing in tree:\n{}",
            lp.object,
            tree.stdout
        );
    }
    let ro = bed
        .busctl(&[
            "get-property",
            BUS_NAME,
            &c.object,
            "org.dindhelper1.Loop",
            "ReadOnly",
        ])
        .expect_ok("ReadOnly");
    assert!(
        ro.stdout.contains("true"),
        "read_only survives restart: {}",
        ro.stdout
    );

    a.detach();
    c.detach();
    for (u, n) in [(MEMBER, "keep-a"), (MEMBER, "keep-b"), ("root", "keep-c")] {
        bed.delete_image(u, n);
    }
}

/// kill -9 the daemon in the middle of AttachImage (as the member), ten rounds. Even
/// rounds kill the moment the kernel shows a loop device backed by the image (attached,
/// not yet recorded/replied); odd rounds kill after a delay spread over one calibrated
/// call. After each restart the loop devices backed by our images are exactly the ones
/// the daemon lists (adopted or detached, never orphaned); detaching them leaves none.
fn kill9_during_attach_leaks_no_loop_device(bed: &Bed) {
    bed.create_image(MEMBER, "crash", 8 * MIB);
    let kernel_set = || -> BTreeSet<String> { bed.kernel_loops_in_state().into_iter().collect() };
    let listed_set = || -> BTreeSet<String> {
        bed.list_loops()
            .iter()
            .map(|r| {
                r[1].as_str()
                    .unwrap_or_default()
                    .trim_start_matches("/dev/")
                    .to_owned()
            })
            .collect()
    };
    let attach_call = || {
        Command::new("runuser")
            .args(["-u", MEMBER, "--", "busctl"])
            .arg(format!("--address={}", bed.address))
            .args(["call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE])
            .args(["AttachImage", "sa{sv}", "crash", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("busctl")
    };
    // Calibrate: how long one whole call takes from spawn to exit.
    let t = std::time::Instant::now();
    let st = attach_call().wait().expect("calibration call");
    let whole = t.elapsed();
    assert!(st.success(), "calibration AttachImage failed");
    for dev in listed_set() {
        bed.detach(MEMBER, &dev);
    }
    let mut killed_with_device = 0;
    for i in 0..10u32 {
        let mut call = attach_call();
        if i % 2 == 0 {
            let t = std::time::Instant::now();
            while kernel_set().is_empty() && t.elapsed() < Duration::from_secs(5) {
                std::hint::spin_loop();
            }
        } else {
            std::thread::sleep(whole * i / 10);
        }
        let present = !kernel_set().is_empty();
        bed.kill9_daemon();
        if present {
            killed_with_device += 1;
        }
        call.wait().ok();
        bed.start_daemon()
            .unwrap_or_else(|e| panic!("restart after kill -9 #{i}: {e}"));
        let (k, l) = (kernel_set(), listed_set());
        assert_eq!(
            k, l,
            "round {i}: kernel loops backed by images {k:?} != daemon's ListLoops {l:?}"
        );
        for dev in l {
            bed.detach(MEMBER, &dev);
        }
        assert!(
            kernel_set().is_empty(),
            "round {i}: detach left {:?}",
            kernel_set()
        );
    }
    assert!(
        killed_with_device >= 5,
        "only {killed_with_device} of 10 kills hit an attached device (one call takes {whole:?})"
    );
    bed.delete_image(MEMBER, "crash");
}

const BAD_NAMES: &[&str] = &["a/b", "..", "../x", "", ".hidden", "a b", "x\u{e9}"];

/// Names with `/`, `..`, empty, 65 chars, leading dot, …: InvalidArgs from every method
/// that takes a name, and the state (files, lists) is unchanged.
fn bad_image_names_are_invalid_args_and_change_nothing(bed: &Bed) {
    bed.create_image(MEMBER, "good", 4 * MIB);
    let before = snapshot(bed);
    let long = "x".repeat(65);
    let mut names: Vec<&str> = BAD_NAMES.to_vec();
    names.push(&long);
    for n in names {
        let q = gv_str(n);
        bed.expect_error(
            MEMBER,
            "CreateImage",
            &[&q, &(4 * MIB).to_string(), "@a{sv} {}"],
            "InvalidArgs",
        );
        bed.expect_error(MEMBER, "AttachImage", &[&q, "@a{sv} {}"], "InvalidArgs");
        bed.expect_error(MEMBER, "DeleteImage", &[&q, "@a{sv} {}"], "InvalidArgs");
    }
    // 64 characters is the maximum and fine.
    let max = "y".repeat(64);
    bed.create_image(MEMBER, &max, 4 * MIB);
    bed.delete_image(MEMBER, &max);
    assert_eq!(before, snapshot(bed), "bad names changed the state");
    assert!(!bed.state_dir.join("a").exists() && !bed.state_dir.join("x.img").exists());
    bed.delete_image(MEMBER, "good");
}

/// Size 0, below 1 MiB, and over the configured maximum: InvalidArgs, nothing created.
fn bad_image_sizes_are_invalid_args_and_change_nothing(bed: &Bed) {
    let before = snapshot(bed);
    for size in [0, 1, MIB - 1, 1 << 62, u64::MAX] {
        bed.expect_error(
            MEMBER,
            "CreateImage",
            &[&gv_str("sized"), &format!("uint64 {size}"), "@a{sv} {}"],
            "InvalidArgs",
        );
    }
    assert_eq!(before, snapshot(bed), "bad sizes changed the state");
    // The minimum is allowed.
    bed.create_image(MEMBER, "sized", MIB);
    bed.delete_image(MEMBER, "sized");
}

/// A second CreateImage of the same name is Conflict; DeleteImage/AttachImage of a
/// name that does not exist is NotFound; DeleteImage of an attached image is Busy.
fn duplicate_and_missing_images_are_named_errors(bed: &Bed) {
    bed.create_image(MEMBER, "dup", 4 * MIB);
    let before = snapshot(bed);
    bed.expect_error(
        MEMBER,
        "CreateImage",
        &[&gv_str("dup"), &format!("uint64 {}", 8 * MIB), "@a{sv} {}"],
        "Conflict",
    );
    assert_eq!(before, snapshot(bed));
    assert_eq!(
        fs::metadata(bed.image_path(MEMBER, "dup"))
            .expect("dup")
            .len(),
        4 * MIB,
        "not resized"
    );
    bed.expect_error(
        MEMBER,
        "DeleteImage",
        &[&gv_str("nonesuch"), "@a{sv} {}"],
        "NotFound",
    );
    bed.expect_error(
        MEMBER,
        "AttachImage",
        &[&gv_str("nonesuch"), "@a{sv} {}"],
        "NotFound",
    );
    // Images are per uid: root's "dup" is a different image and does not exist.
    bed.expect_error(
        "root",
        "DeleteImage",
        &[&gv_str("dup"), "@a{sv} {}"],
        "NotFound",
    );
    let lp = DaemonLoop::attach(bed, MEMBER, "dup", &[]);
    bed.expect_error(
        MEMBER,
        "DeleteImage",
        &[&gv_str("dup"), "@a{sv} {}"],
        "Busy",
    );
    assert!(bed.image_path(MEMBER, "dup").exists());
    lp.detach();
    bed.delete_image(MEMBER, "dup");
}

/// AttachFd through a real zbus client (busctl cannot pass fds): a directory, a unix
/// socket and /dev/null are InvalidArgs and attach nothing.
fn attach_fd_of_non_regular_files_is_invalid_args(bed: &Bed) {
    let before = snapshot(bed);
    let kernel_before = bed.kernel_loops_in_state();
    let dir = fs::File::open(&bed.run_dir).expect("dir fd");
    let (sock, _peer) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let null = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .expect("null");
    for (what, fd) in [
        ("directory", dir.as_fd()),
        ("socket", sock.as_fd()),
        ("/dev/null", null.as_fd()),
    ] {
        match attach_fd_root(bed, fd) {
            Ok(r) => panic!("AttachFd of a {what} succeeded: {r:?}"),
            Err(name) => assert_eq!(
                name, "org.dindhelper1.Error.InvalidArgs",
                "AttachFd of a {what}"
            ),
        }
    }
    assert_eq!(before, snapshot(bed));
    assert_eq!(kernel_before, bed.kernel_loops_in_state());
    // A regular file the caller opened works, and the device is read-only when the fd is.
    let file = bed.scratch("fdfile.img");
    fs::write(&file, vec![0u8; 4 * MIB as usize]).expect("fdfile");
    let ro = fs::File::open(&file).expect("ro fd");
    let (obj, dev) = attach_fd_root(bed, ro.as_fd())
        .unwrap_or_else(|e| panic!("AttachFd of a regular file: {e}"));
    let name = dev.trim_start_matches("/dev/");
    let ro_flag = fs::read_to_string(format!("/sys/block/{name}/ro")).unwrap_or_default();
    bed.detach("root", &dev);
    assert_eq!(
        ro_flag.trim(),
        "1",
        "{obj}: a read-only fd must give a read-only device"
    );
}

/// Call AttachFd as root with zbus; Err carries the D-Bus error name.
fn attach_fd_root(bed: &Bed, fd: std::os::fd::BorrowedFd<'_>) -> Result<(String, String), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        let conn = zbus::connection::Builder::address(bed.address.as_str())
            .map_err(|e| e.to_string())?
            .build()
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let opts: HashMap<&str, zbus::zvariant::Value<'_>> = HashMap::new();
        let reply = conn
            .call_method(
                Some(BUS_NAME),
                MANAGER_PATH,
                Some(MANAGER_IFACE),
                "AttachFd",
                &(zbus::zvariant::Fd::from(fd), opts),
            )
            .await;
        match reply {
            Ok(msg) => {
                let (o, d): (zbus::zvariant::OwnedObjectPath, String) = msg
                    .body()
                    .deserialize()
                    .map_err(|e| format!("reply: {e}"))?;
                Ok((o.to_string(), d))
            }
            Err(zbus::Error::MethodError(name, _, _)) => Err(name.to_string()),
            Err(e) => Err(format!("call: {e}")),
        }
    })
}

/// dindhelperctl loop attach --file with /dev/null and a directory: non-zero exit, the
/// error named on stderr, nothing attached.
fn ctl_attach_of_dev_null_and_directory_fails(bed: &Bed) {
    let kernel_before = bed.kernel_loops_in_state();
    let loops_before = bed.list_loops();
    let dir = bed.run_dir.to_string_lossy().into_owned();
    for path in ["/dev/null", dir.as_str()] {
        let out = bed.ctl_as("root", &["loop", "attach", "--file", path]);
        assert_ne!(out.status, 0, "ctl attach {path} succeeded: {out:?}");
        assert!(
            !out.stderr.trim().is_empty(),
            "ctl attach {path}: no message on stderr"
        );
    }
    let out = bed.ctl_as("root", &["loop", "attach", "--file", "/dev/null"]);
    assert!(
        out.stderr.contains("InvalidArgs"),
        "ctl names the D-Bus error: {:?}",
        out.stderr
    );
    assert_eq!(kernel_before, bed.kernel_loops_in_state());
    assert_eq!(loops_before, bed.list_loops());
}

/// Detach and Rescan of things the daemon does not manage: a non-loop path is
/// InvalidArgs; a well-formed loop device the daemon did not attach (here one attached
/// with losetup by the test) is NotFound and stays attached.
fn detach_and_rescan_of_unmanaged_devices_are_refused(bed: &Bed) {
    let file = bed.scratch("unmanaged.img");
    fs::write(&file, vec![0u8; 4 * MIB as usize]).expect("file");
    let foreign = LoopGuard::attach(&file);
    // Some non-loop block device of this machine (the string is what matters).
    let other_block = fs::read_dir("/sys/block")
        .ok()
        .and_then(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .find(|n| !n.starts_with("loop") && !n.starts_with("ram"))
        })
        .map(|n| format!("/dev/{n}"))
        .unwrap_or_else(|| "/dev/sda".to_owned());
    for user in [MEMBER, "root"] {
        for dev in [
            "/dev/null",
            other_block.as_str(),
            "/dev/../dev/loop0",
            "loop",
            "",
            "/dev/loop-control",
        ] {
            bed.expect_error(user, "Rescan", &[&gv_str(dev), "@a{sv} {}"], "InvalidArgs");
            bed.expect_error(user, "Detach", &[&gv_str(dev), "@a{sv} {}"], "InvalidArgs");
        }
        let short = foreign.device.trim_start_matches("/dev/").to_owned();
        for dev in [foreign.device.as_str(), short.as_str(), "/dev/loop4095"] {
            bed.expect_error(user, "Rescan", &[&gv_str(dev), "@a{sv} {}"], "NotFound");
            bed.expect_error(user, "Detach", &[&gv_str(dev), "@a{sv} {}"], "NotFound");
        }
    }
    let backing = fs::read_to_string(format!(
        "/sys/block/{}/loop/backing_file",
        foreign.device.trim_start_matches("/dev/")
    ))
    .unwrap_or_default();
    assert_eq!(
        backing.trim(),
        file.to_string_lossy(),
        "the foreign loop device must stay attached"
    );
}

/// Resources record their owner. Acting on another uid's device needs `<family>-others`:
/// dhtest-own (base actions only) is NotAuthorized on a member's device; dhtest-plain is
/// NotAuthorized on everything; dhtest-member (group: all actions) may detach root's.
fn others_action_guards_other_uids_devices(bed: &Bed) {
    bed.create_image(MEMBER, "owned", 4 * MIB);
    bed.create_image("root", "rootimg", 4 * MIB);
    bed.create_image(OWN, "mine", 4 * MIB);
    let m = DaemonLoop::attach(bed, MEMBER, "owned", &["partscan", "b", "true"]);
    let mine = DaemonLoop::attach(bed, OWN, "mine", &["partscan", "b", "true"]);
    for user in [OWN, PLAIN] {
        bed.expect_error(
            user,
            "Detach",
            &[&gv_str(&m.device), "@a{sv} {}"],
            "NotAuthorized",
        );
        bed.expect_error(
            user,
            "Rescan",
            &[&gv_str(&m.device), "@a{sv} {}"],
            "NotAuthorized",
        );
    }
    assert!(bed
        .kernel_loops_in_state()
        .contains(&m.device.trim_start_matches("/dev/").to_owned()));
    // Images are addressed per caller uid: OWN cannot reach MEMBER's "owned" by name.
    bed.expect_error(
        OWN,
        "DeleteImage",
        &[&gv_str("owned"), "@a{sv} {}"],
        "NotFound",
    );
    assert!(bed.image_path(MEMBER, "owned").exists());
    // Own device: base action suffices.
    assert!(
        bed.rescan(OWN, &mine.device).is_empty(),
        "empty image has no partitions"
    );
    mine.detach();
    // MEMBER holds loop-others through the group rule: may detach root's device.
    let r = DaemonLoop::attach(bed, "root", "rootimg", &[]);
    let rdev = r.device.clone();
    std::mem::forget(r);
    bed.detach(MEMBER, &rdev);
    // Root may act on anyone's device.
    let mdev = m.device.clone();
    std::mem::forget(m);
    bed.detach("root", &mdev);
    bed.delete_image(MEMBER, "owned");
    bed.delete_image("root", "rootimg");
    bed.delete_image(OWN, "mine");
}
