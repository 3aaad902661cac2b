//! Real test of the systemd slice backend inside a booted systemd (TESTBED.md: the
//! machine's own OS in systemd-nspawn over an overlay of `/`; never systemd on the root).
//! Needs root, systemd-nspawn (systemd-container) and the example `dind_slice`, which this
//! test builds. Fails loudly when a prerequisite is missing.
//!
//! The example is copied into the container through the overlay's merged dir (changes to
//! the lower dir after mounting are not reliably visible inside) and driven with
//! `nsenter -t <systemd pid> -a`; `systemctl show` inside checks every property.
//!
//! Run: `cargo test --test instances_systemd -- --nocapture`

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[path = "common/nspawn.rs"]
mod nspawn;
use nspawn::Booted;

/// The slice example inside the booted container.
trait SliceCtl {
    fn ctl(&self, args: &[&str]) -> Result<String, String>;
}

impl SliceCtl for Booted {
    /// Run the example inside; Ok(stdout) or Err(stderr).
    fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let mut a = vec!["/usr/local/bin/dhi-dind-slice"];
        a.extend_from_slice(args);
        let o = self.run(&a);
        let out = String::from_utf8_lossy(&o.stdout).trim().to_owned();
        let err = String::from_utf8_lossy(&o.stderr).trim().to_owned();
        println!("dind_slice {args:?} -> {out} {err}");
        if o.status.success() {
            Ok(out)
        } else {
            Err(err)
        }
    }
}

fn build_example() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .args(["build", "--example", "dind_slice"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo build --example dind_slice");
    assert!(st.success());
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let p = target.join("debug/examples/dind_slice");
    assert!(p.exists(), "{} missing", p.display());
    p
}

#[test]
fn systemd_slices_create_set_adopt_destroy() {
    let bin = build_example();
    let b = Booted::boot_with("sdt0", false);
    fs::copy(&bin, b.scratch.join("merged/usr/local/bin/dhi-dind-slice")).unwrap();
    assert_eq!(b.ctl(&["backend"]).unwrap(), "Systemd");

    // A name with a dash: escaped, so the slice sits directly in dind.slice.
    let unit = r"dind-lab\x2d1.slice";
    let r = b.ctl(&[
        "create",
        "lab-1",
        "cpu_quota_percent=50",
        "cpu_weight=200",
        "memory_max=536870912",
        "memory_high=268435456",
        "memory_swap_max=0",
        "tasks_max=512",
        "io_weight=300",
    ]);
    assert_eq!(r.unwrap(), "Systemd Done");
    let want = [
        ("ActiveState", "active"),
        ("Slice", "dind.slice"),
        ("ControlGroup", r"/dind.slice/dind-lab\x2d1.slice"),
        ("CPUQuotaPerSecUSec", "500ms"),
        ("CPUWeight", "200"),
        ("MemoryMax", "536870912"),
        ("MemoryHigh", "268435456"),
        ("MemorySwapMax", "0"),
        ("TasksMax", "512"),
        ("IOWeight", "300"),
    ];
    for (k, v) in want {
        assert_eq!(b.prop(unit, k), v, "{k}");
    }
    assert_eq!(b.ctl(&["exists", "lab-1"]).unwrap(), "true");
    assert_eq!(b.ctl(&["parent", "lab-1", "systemd"]).unwrap(), unit);
    assert_eq!(
        b.ctl(&["parent", "lab-1", "cgroupfs"]).unwrap(),
        r"/dind.slice/dind-lab\x2d1.slice"
    );

    // Live change; unset knobs go back to infinity / unset.
    b.ctl(&[
        "set",
        "lab-1",
        "cpu_quota_percent=150",
        "memory_max=1073741824",
    ])
    .unwrap();
    assert_eq!(b.prop(unit, "CPUQuotaPerSecUSec"), "1.500000s");
    assert_eq!(b.prop(unit, "MemoryMax"), "1073741824");
    assert_eq!(b.prop(unit, "TasksMax"), "infinity");
    assert_eq!(b.prop(unit, "CPUWeight"), "[not set]");

    // Idempotent create (e.g. recreating from state) re-applies.
    assert_eq!(
        b.ctl(&["create", "lab-1", "tasks_max=99"]).unwrap(),
        "Systemd Unchanged"
    );
    assert_eq!(b.prop(unit, "TasksMax"), "99");

    // "lab" is another instance, not the parent of "lab-1".
    b.ctl(&["create", "lab", "tasks_max=50"]).unwrap();
    assert_eq!(b.prop("dind-lab.slice", "Slice"), "dind.slice");

    // A process in the slice: destroy refuses, adopt gives it oom_score_adj 500.
    let o = b.run(&[
        "systemd-run",
        "--slice",
        unit,
        "--unit",
        "dhi-probe",
        "sleep",
        "300",
    ]);
    assert!(o.status.success(), "{o:?}");
    std::thread::sleep(Duration::from_millis(300));
    let pid = b.prop("dhi-probe.service", "MainPID");
    let e = b.ctl(&["destroy", "lab-1"]).unwrap_err();
    assert!(e.starts_with("Busy:") && e.contains(&pid), "{e}");
    let a = b.ctl(&["adopt", "lab-1", &pid]).unwrap();
    assert!(a.contains("oom_score_adj: 500"), "{a}");
    let adj = b.run(&["cat", &format!("/proc/{pid}/oom_score_adj")]);
    assert_eq!(String::from_utf8_lossy(&adj.stdout).trim(), "500");
    // A process outside: Conflict naming the parent.
    let e = b.ctl(&["adopt", "lab-1", "1"]).unwrap_err();
    assert!(
        e.starts_with("Conflict:") && e.contains("--cgroup-parent="),
        "{e}"
    );

    // Force: SIGKILL what runs in the slice (the service ends "failed"), then StopUnit.
    assert_eq!(b.ctl(&["destroy", "lab-1", "--force"]).unwrap(), "Done");
    assert_eq!(b.ctl(&["exists", "lab-1"]).unwrap(), "false");
    assert_eq!(b.prop(unit, "ActiveState"), "inactive");
    let svc = b.prop("dhi-probe.service", "ActiveState");
    assert!(svc == "failed" || svc == "inactive", "{svc}");
    assert_eq!(b.ctl(&["destroy", "lab-1"]).unwrap(), "Unchanged");
    let e = b.ctl(&["set", "lab-1", "tasks_max=5"]).unwrap_err();
    assert!(e.starts_with("NotFound:"), "{e}");
    // "lab" survived the destruction of "lab-1".
    assert_eq!(b.prop("dind-lab.slice", "ActiveState"), "active");
    assert_eq!(b.ctl(&["destroy", "lab"]).unwrap(), "Done");

    // Bad input: named errors, nothing created.
    assert!(b
        .ctl(&["create", "Bad", "tasks_max=5"])
        .unwrap_err()
        .starts_with("InvalidArgs:"));
    let e = b.ctl(&["create", "x", "memory_max=5"]).unwrap_err();
    assert!(
        e.starts_with("InvalidArgs:") && e.contains("memory_max"),
        "{e}"
    );
    let e = b.ctl(&["create", "x", "cpu_weight=-1"]).unwrap_err();
    assert!(e.contains("negative"), "{e}");
    assert_eq!(b.ctl(&["exists", "x"]).unwrap(), "false");
}

#[test]
fn systemd_slice_holds_docker_containers_with_the_systemd_driver() {
    let bin = build_example();
    let b = Booted::boot_with("sdt1", true);
    fs::copy(&bin, b.scratch.join("merged/usr/local/bin/dhi-dind-slice")).unwrap();
    let t = Instant::now();
    let driver = loop {
        let o = b.run(&[
            "docker",
            "info",
            "-f",
            "{{.CgroupDriver}} {{.CgroupVersion}}",
        ]);
        if o.status.success() {
            break String::from_utf8_lossy(&o.stdout).trim().to_owned();
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "docker.service inside: {o:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(driver, "systemd 2");
    let o = b.run(&[
        "sh",
        "-c",
        "mkdir -p /tmp/dhir/bin && cp /bin/busybox /tmp/dhir/bin/ && \
         ln -sf busybox /tmp/dhir/bin/sh && tar -C /tmp/dhir -c . | docker import - dhibb",
    ]);
    assert!(o.status.success(), "import: {o:?}");

    b.ctl(&["create", "lab-1", "tasks_max=64"]).unwrap();
    let parent = b.ctl(&["parent", "lab-1", "systemd"]).unwrap();
    assert_eq!(parent, r"dind-lab\x2d1.slice");
    let run = |name: &str| {
        let o = b.run(&[
            "docker",
            "run",
            "-d",
            "--name",
            name,
            "--cgroup-parent",
            &parent,
            "dhibb",
            "/bin/sh",
            "-c",
            "sleep 1000",
        ]);
        assert!(o.status.success(), "docker run: {o:?}");
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    };
    let id = run("dhi-c1");
    let pid_of = |name: &str| {
        let o = b.run(&["docker", "inspect", "-f", "{{.State.Pid}}", name]);
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    };
    let pid = pid_of("dhi-c1");
    let cg = b.run(&["cat", &format!("/proc/{pid}/cgroup")]);
    let cg = String::from_utf8_lossy(&cg.stdout).to_string();
    println!("{cg}");
    assert!(
        cg.contains(&format!("0::/dind.slice/{parent}/docker-{id}.scope")),
        "systemd driver: docker-<id>.scope in the slice: {cg}"
    );
    let a = b.ctl(&["adopt", "lab-1", &pid]).unwrap();
    assert!(a.contains("oom_score_adj: 500"), "{a}");
    // After docker restart the new process gets it again from a new adopt.
    let o = b.run(&["docker", "restart", "-t", "0", "dhi-c1"]);
    assert!(o.status.success());
    let pid2 = pid_of("dhi-c1");
    assert_ne!(pid, pid2);
    b.ctl(&["adopt", "lab-1", &pid2]).unwrap();
    let adj = b.run(&["cat", &format!("/proc/{pid2}/oom_score_adj")]);
    assert_eq!(String::from_utf8_lossy(&adj.stdout).trim(), "500");

    // Busy with a container inside; force kills it at once (StopUnit alone would wait
    // for the scope's 90 s stop timeout: sleep as PID 1 ignores SIGTERM).
    assert!(b
        .ctl(&["destroy", "lab-1"])
        .unwrap_err()
        .starts_with("Busy:"));
    let t = Instant::now();
    assert_eq!(b.ctl(&["destroy", "lab-1", "--force"]).unwrap(), "Done");
    println!("forced destroy with a container: {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(b.ctl(&["exists", "lab-1"]).unwrap(), "false");
    std::thread::sleep(Duration::from_millis(500));
    let st = b.run(&[
        "docker",
        "inspect",
        "-f",
        "{{.State.Status}} {{.State.ExitCode}}",
        "dhi-c1",
    ]);
    assert_eq!(String::from_utf8_lossy(&st.stdout).trim(), "exited 137");
    let _ = b.run(&["docker", "rm", "-f", "dhi-c1"]);
}
