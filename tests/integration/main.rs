//! Integration tests against real components: a private dbus-daemon, the real polkitd
//! with the project's own policy, real users, real loop devices and the real daemon.
//!
//! Run (as root): `cargo test --test integration [-- [--no-daemon] [SUBSTRING…]]`
//! - every prerequisite is checked first; a missing one FAILS the run (exit 1);
//! - `--no-daemon` (or `DHT_NO_DAEMON=1`) brings up bus + polkitd only and runs just the
//!   tests that need no daemon; the others are listed as not run;
//! - `--list` prints the test names, `--skip S` leaves out names containing S, other
//!   libtest flags (`--test-threads=1`, …) are accepted and ignored;
//! - `DHT_KEEP=1` keeps the run and state dirs (daemon.log, polkitd.log);
//! - the last line is always `N passed, N failed` (CI reads it); exit 1 on any failure.

mod api_doc_tests;
mod attack_tests;
mod auth_tests;
mod bed;
mod capture_tests;
mod crash_tests;
mod ctl_tests;
mod devices_tests;
mod docker;
// The dockerd fixture of tests/common (dockerd in its own netns, image bb:latest), shared
// by the modules that need Docker.
#[path = "../common/dockerd.rs"]
mod dockerd;
mod instance_tests;
mod loop_tests;
mod partition_tests;
mod ports_tests;
mod provision_tests;
mod visibility_tests;

use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use bed::Bed;

/// One integration test.
pub struct Test {
    pub name: &'static str,
    /// false: runs with bus + polkitd only (also in `--no-daemon` mode).
    pub needs_daemon: bool,
    pub run: fn(&Bed),
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn all_tests() -> Vec<Test> {
    let mut v = Vec::new();
    v.extend(auth_tests::tests());
    v.extend(api_doc_tests::tests());
    v.extend(loop_tests::tests());
    v.extend(partition_tests::tests());
    v.extend(instance_tests::tests());
    v.extend(capture_tests::tests());
    v.extend(ports_tests::tests());
    v.extend(provision_tests::tests());
    v.extend(crash_tests::tests());
    v.extend(devices_tests::tests());
    v.extend(attack_tests::tests());
    v.extend(ctl_tests::tests());
    v.extend(visibility_tests::tests());
    v
}

/// Everything the bed and the tests run. Missing pieces fail the run, never skip it.
fn missing_prerequisites() -> Vec<String> {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (the tests create users, loop devices and mounts)".to_owned());
    }
    let tools = [
        "dbus-daemon",
        "pkcheck",
        "busctl",
        "gdbus",
        "dbus-monitor",
        "stdbuf",
        "losetup",
        "sfdisk",
        "mkfs.ext4",
        "mount",
        "umount",
        "dd",
        "runuser",
        "useradd",
        "usermod",
        "userdel",
        "groupadd",
        "groupdel",
        "getent",
        // ports tests: dockerd in a netns, a client netns, iptables in it
        "dockerd",
        "docker",
        "nsenter",
        "ip",
        "curl",
        "iptables-nft-save",
        "iptables-nft",
    ];
    let path = std::env::var("PATH").unwrap_or_default();
    let dirs: Vec<&str> = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .collect();
    for t in tools {
        if !dirs.iter().any(|d| Path::new(d).join(t).is_file()) {
            missing.push(format!("{t} (not in PATH)"));
        }
    }
    if !Path::new(bed::POLKITD).is_file() {
        missing.push(format!("{} (package polkitd)", bed::POLKITD));
    }
    if !Path::new("/dev/loop-control").exists() {
        missing.push("/dev/loop-control (loop driver)".to_owned());
    }
    missing
}

fn main() {
    let mut no_daemon = std::env::var("DHT_NO_DAEMON").is_ok_and(|v| v == "1");
    let mut list = false;
    let mut filters = Vec::new();
    let mut skips = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--no-daemon" => no_daemon = true,
            "--list" => list = true,
            "--skip" => skips.extend(args.next()),
            // libtest options with a separate value (`--test-threads 1`): drop the value.
            "--test-threads" | "--format" | "--color" | "--logfile" | "-Z" => {
                args.next();
            }
            // Other libtest flags cargo or a user may pass; meaningless here.
            s if s.starts_with('-') => {}
            s => filters.push(s.to_owned()),
        }
    }
    let selected: Vec<Test> = all_tests()
        .into_iter()
        .filter(|t| filters.is_empty() || filters.iter().any(|f| t.name.contains(f.as_str())))
        .filter(|t| !skips.iter().any(|s| t.name.contains(s.as_str())))
        .collect();
    if list {
        for t in &selected {
            println!("{}: test", t.name);
        }
        return;
    }
    if selected.is_empty() {
        println!("no integration test matches {filters:?}");
        println!("0 passed, 0 failed");
        return;
    }

    let missing = missing_prerequisites();
    if !missing.is_empty() {
        eprintln!("integration tests cannot run; missing prerequisites:");
        for m in &missing {
            eprintln!("  - {m}");
        }
        eprintln!("(.ci/run installs the packages; run as root)");
        println!("0 passed, {} failed", selected.len());
        std::process::exit(1);
    }

    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }

    println!(
        "running {} integration tests{}",
        selected.len(),
        if no_daemon { " (--no-daemon)" } else { "" }
    );
    let bed = match Bed::setup(!no_daemon) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("test bed setup FAILED: {e}");
            println!("0 passed, {} failed", selected.len());
            std::process::exit(1);
        }
    };
    println!("bed: bus {} state {}", bed.address, bed.state_dir.display());
    let daemon_error = if no_daemon {
        None
    } else {
        bed.start_daemon().err()
    };
    if let Some(e) = &daemon_error {
        println!("dindhelperd did not come up; every test that needs it fails:\n{e}");
    }

    let (mut passed, mut failed, mut not_run) = (0usize, 0usize, Vec::new());
    for t in &selected {
        if INTERRUPTED.load(Ordering::SeqCst) {
            println!("interrupted: not running {}", t.name);
            failed += 1;
            continue;
        }
        if t.needs_daemon && no_daemon {
            not_run.push(t.name);
            continue;
        }
        if t.needs_daemon && daemon_error.is_some() {
            println!("test {} ... FAILED (dindhelperd did not start)", t.name);
            failed += 1;
            continue;
        }
        print!("test {} ... ", t.name);
        std::io::stdout().flush().ok();
        let r = catch_unwind(AssertUnwindSafe(|| (t.run)(&bed)));
        match r {
            Ok(()) => {
                println!("ok");
                passed += 1;
            }
            Err(_) => {
                println!("FAILED");
                failed += 1;
                if t.needs_daemon {
                    println!(
                        "---- daemon log (last 30 lines) ----\n{}\n----",
                        bed.daemon_log_tail(30)
                    );
                }
            }
        }
    }

    let errs = bed.teardown();
    drop(bed);
    if !errs.is_empty() {
        println!("test bed_teardown ... FAILED");
        for e in &errs {
            println!("  {e}");
        }
        failed += 1;
    }
    if !not_run.is_empty() {
        println!(
            "{} not run (--no-daemon; they need the daemon): {}",
            not_run.len(),
            not_run.join(", ")
        );
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 || INTERRUPTED.load(Ordering::SeqCst) {
        std::process::exit(1);
    }
}
