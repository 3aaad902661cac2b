//! `dindhelperctl` (the real binary of this build) against the real daemon over the bed's
//! bus with the real polkitd: every subcommand family, `--json` on listings, exit codes per
//! error class, `monitor`; and the class example `examples/partition-exercise/` (busctl
//! and dindhelperctl variants, N = 3) against a real dockerd in its own network namespace
//! (fixture `tests/common/dockerd.rs`, helper tag `dho`), checked to leave nothing behind.
//!
//! The Docker tests move the bed's daemon into dockerd's netns (`nsenter --net`, with
//! `--docker-host`) as the ports tests do, and put it back on drop.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::bed::{run, run_cmd, Bed, Out, BUS_NAME, MANAGER_PATH, MEMBER, PLAIN};
use crate::docker::DaemonInDockerd;
use crate::Test;

pub fn tests() -> Vec<Test> {
    let t = |name, run| Test {
        name,
        needs_daemon: true,
        run,
    };
    vec![
        t(
            "ctl_images_and_loops_json_and_exit_codes_per_error_class",
            images_and_loops_json_and_exit_codes,
        ),
        t(
            "ctl_completions_and_man_page_are_generated",
            completions_and_man_page,
        ),
        t(
            "ctl_monitor_prints_signals_as_lines",
            monitor_prints_signals,
        ),
        t(
            "ctl_instances_ports_exposures_captures_against_dockerd",
            instances_ports_exposures_captures,
        ),
        t(
            "ctl_partition_exercise_busctl_and_ctl_variants_leave_nothing",
            partition_exercise_leaves_nothing,
        ),
    ]
}

// ---- helpers -----------------------------------------------------------------------

#[track_caller]
fn json_of(out: &Out) -> serde_json::Value {
    serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out:?}"))
}

#[track_caller]
fn expect_exit(out: &Out, code: i32, what: &str) {
    assert_eq!(out.status, code, "{what}: want exit {code}: {out:?}");
}

/// Whether the live daemon has `method` on `iface` (methods other branches add).
fn daemon_has(bed: &Bed, iface: &str, method: &str) -> bool {
    bed.busctl(&["introspect", BUS_NAME, MANAGER_PATH, iface])
        .stdout
        .contains(method)
}

fn ctl(bed: &Bed, args: &[&str]) -> Out {
    bed.ctl_as("root", args)
}

// ---- without Docker ----------------------------------------------------------------

fn images_and_loops_json_and_exit_codes(bed: &Bed) {
    let c = |u: &str, a: &[&str]| bed.ctl_as(u, a);
    // Usage error: clap's 2.
    expect_exit(&c(MEMBER, &["image", "create"]), 2, "missing arguments");
    // Not reachable: 10.
    let out = run(
        Bed::ctl_bin(),
        &["--bus-address", "unix:path=/nonexistent/bus", "list"],
    );
    expect_exit(&out, 10, "no bus");

    c(MEMBER, &["image", "create", "ctl-a", "4M"]).expect_ok("create ctl-a");
    let out = c(MEMBER, &["--json", "image", "list"]).expect_ok("image list");
    let rows = json_of(&out);
    let uid = bed.uid(MEMBER);
    let row = rows
        .as_array()
        .expect("array")
        .iter()
        .find(|r| r["name"] == "ctl-a" && r["owner_uid"] == uid)
        .unwrap_or_else(|| panic!("ctl-a not in {rows}"));
    assert_eq!(row["size"], 4 << 20, "{row}");
    assert_eq!(row["device"], "", "{row}");
    // Human table: a header line, then the row.
    let out = c(MEMBER, &["image", "list"]).expect_ok("image list (table)");
    assert!(out.stdout.starts_with("NAME"), "{out:?}");
    assert!(
        out.stdout.lines().any(|l| l.starts_with("ctl-a ")),
        "{out:?}"
    );

    // One code per error class.
    expect_exit(
        &c(PLAIN, &["image", "create", "ctl-p", "4M"]),
        3,
        "NotAuthorized",
    );
    expect_exit(
        &c(MEMBER, &["image", "create", "bad/name", "4M"]),
        4,
        "InvalidArgs",
    );
    expect_exit(&c(MEMBER, &["image", "delete", "ctl-none"]), 5, "NotFound");
    expect_exit(
        &c(MEMBER, &["image", "create", "ctl-a", "4M"]),
        7,
        "Conflict",
    );
    let out = c(MEMBER, &["--json", "loop", "attach", "ctl-a"]).expect_ok("attach");
    let dev = json_of(&out)["device"].as_str().expect("device").to_owned();
    expect_exit(&c(MEMBER, &["image", "delete", "ctl-a"]), 6, "Busy");
    let out = c(MEMBER, &["--json", "list"]).expect_ok("list --json");
    let v = json_of(&out);
    assert!(
        v["loops"]
            .as_array()
            .expect("loops")
            .iter()
            .any(|l| l["device"] == dev.as_str() && l["owner_uid"] == uid),
        "{v}"
    );
    assert!(v["images"].is_array(), "{v}");
    let out = c(MEMBER, &["--json", "loop", "list"]).expect_ok("loop list");
    assert!(!json_of(&out).as_array().expect("array").is_empty());
    c(MEMBER, &["loop", "detach", &dev]).expect_ok("detach");
    c(MEMBER, &["image", "delete", "ctl-a"]).expect_ok("delete");
    let out = c(MEMBER, &["--json", "image", "list"]).expect_ok("image list");
    assert!(
        !json_of(&out)
            .as_array()
            .expect("array")
            .iter()
            .any(|r| r["name"] == "ctl-a"),
        "{out:?}"
    );
}

fn completions_and_man_page(_bed: &Bed) {
    for sh in ["bash", "zsh", "fish"] {
        let out = run(Bed::ctl_bin(), &["completions", sh]).expect_ok(sh);
        for word in [
            "publish-many",
            "set-limits",
            "unpublish",
            "monitor",
            "exposures",
        ] {
            assert!(out.stdout.contains(word), "{sh} completion lacks {word}");
        }
    }
    let out = run(Bed::ctl_bin(), &["man"]).expect_ok("man");
    assert!(
        out.stdout.starts_with(".ie") || out.stdout.contains(".TH"),
        "{out:?}"
    );
    assert!(
        out.stdout.contains("NotAuthorized"),
        "exit codes in the man page"
    );
    // `man DIR`: the top page and one per subcommand (what make install installs); each
    // renders without a formatter warning (groff, when present).
    let dir = std::env::temp_dir().join(format!("dindhelperctl-man-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    run(Bed::ctl_bin(), &["man", dir.to_str().unwrap()]).expect_ok("man DIR");
    let pages: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    for want in [
        "dindhelperctl.1",
        "dindhelperctl-port-publish.1",
        "dindhelperctl-instance-create.1",
        "dindhelperctl-capture-follow.1",
    ] {
        assert!(
            pages.iter().any(|p| p.ends_with(want)),
            "{want} not in {pages:?}"
        );
    }
    if Path::new("/usr/bin/groff").exists() {
        for p in &pages {
            let r = run(
                "groff",
                &["-man", "-Tutf8", "-z", "-ww", p.to_str().unwrap()],
            );
            assert!(
                r.ok() && r.stderr.is_empty(),
                "groff {}: {r:?}",
                p.display()
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();

    // `make install` (staged with DESTDIR; this build's binaries, no cargo run) puts the
    // man pages and the three completion files where man and the shells look.
    let stage = std::env::temp_dir().join(format!("dindhelperctl-stage-{}", std::process::id()));
    let bin_dir = Path::new(Bed::ctl_bin()).parent().unwrap();
    let out = run_cmd(
        Command::new("make")
            .arg("-C")
            .arg(env!("CARGO_MANIFEST_DIR"))
            .arg("install")
            .arg(format!("DESTDIR={}", stage.display()))
            .arg(format!("RELEASE={}", bin_dir.display()))
            .arg("CARGO=true"),
    );
    let installed: Vec<&str> = [
        "usr/local/share/man/man1/dindhelperctl.1",
        "usr/local/share/man/man1/dindhelperctl-port-publish.1",
        "usr/local/share/bash-completion/completions/dindhelperctl",
        "usr/local/share/zsh/site-functions/_dindhelperctl",
        "usr/local/share/fish/vendor_completions.d/dindhelperctl.fish",
    ]
    .into_iter()
    .filter(|f| stage.join(f).is_file())
    .collect();
    std::fs::remove_dir_all(&stage).ok();
    out.expect_ok("make install DESTDIR=…");
    assert_eq!(installed.len(), 5, "installed only {installed:?}");
}

fn monitor_prints_signals(bed: &Bed) {
    let mut child = Command::new(Bed::ctl_bin())
        .args(["--bus-address", &bed.address, "--json", "monitor"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ctl monitor");
    // The subscription is in place once it says so on stderr.
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(line.contains("monitoring"), "{line:?}");
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    bed.ctl_as(MEMBER, &["image", "create", "ctl-mon", "4M"])
        .expect_ok("create ctl-mon");
    let t0 = Instant::now();
    let mut seen = Vec::new();
    let found = loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(l) => {
                let v: serde_json::Value =
                    serde_json::from_str(&l).unwrap_or_else(|e| panic!("line not JSON ({e}): {l}"));
                let hit = v["member"] == "InterfacesAdded"
                    && v["args"][0]
                        .as_str()
                        .is_some_and(|p| p.contains("ctl_2dmon"));
                seen.push(l);
                if hit {
                    break true;
                }
            }
            Err(_) if t0.elapsed() > Duration::from_secs(10) => break false,
            Err(_) => {}
        }
    };
    bed.ctl_as(MEMBER, &["image", "delete", "ctl-mon"])
        .expect_ok("delete ctl-mon");
    // SIGTERM ends the monitor with exit 0.
    // SAFETY: kill on the pid of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait().unwrap();
    assert!(found, "no InterfacesAdded line for ctl-mon; saw {seen:?}");
    assert!(st.success(), "monitor exit on SIGTERM: {st}");
}

// ---- with a real dockerd -----------------------------------------------------------

fn instances_ports_exposures_captures(bed: &Bed) {
    let env = DaemonInDockerd::new(bed, "dho");
    let d = env.d();
    let c = |a: &[&str]| bed.ctl_as(MEMBER, a);

    // Instance with limits; the printed value is the cgroup parent for docker run.
    let parent = c(&[
        "instance",
        "create",
        "ctl-lab",
        "--cpu-quota-percent",
        "50",
        "--memory-max",
        "64M",
        "--tasks-max",
        "100",
    ])
    .expect_ok("instance create")
    .stdout
    .trim()
    .to_owned();
    assert!(parent.contains("ctl-lab"), "{parent}");
    expect_exit(
        &c(&["instance", "create", "ctl-lab"]),
        7,
        "second create: Conflict",
    );
    d.run_web("ctl-web", "/www", &["--cgroup-parent", &parent]);
    let out = c(&["--json", "instance", "adopt", "ctl-lab", "ctl-web"]).expect_ok("adopt");
    let v = json_of(&out);
    assert_eq!(v["oom_score_adj"], 500, "{v}");
    assert!(!v["pids"].as_array().expect("pids").is_empty(), "{v}");
    c(&[
        "instance",
        "set-limits",
        "ctl-lab",
        "--tasks-max",
        "200",
        "--reset",
        "memory_max",
    ])
    .expect_ok("set-limits");
    let out = c(&["--json", "instance", "list"]).expect_ok("instance list");
    let rows = json_of(&out);
    let row = rows
        .as_array()
        .expect("array")
        .iter()
        .find(|r| r["name"] == "ctl-lab")
        .unwrap_or_else(|| panic!("{rows}"))
        .clone();
    assert_eq!(row["cgroup_parent"], parent.as_str(), "{row}");
    assert_eq!(row["limits"]["cpu_quota_percent"], 50, "{row}");
    assert_eq!(row["limits"]["tasks_max"], 200, "{row}");
    assert!(row["limits"].get("memory_max").is_none(), "{row}");
    let out = c(&["instance", "list"]).expect_ok("instance list (table)");
    assert!(
        out.stdout.lines().any(|l| l.starts_with("ctl-lab ")
            && l.contains("tasks_max=200")
            && l.contains("cpu_quota_percent=50")),
        "{out:?}"
    );

    // Ports: publish, reach with curl, list, refuse a taken port, publish-many, unpublish.
    let out = c(&[
        "--json",
        "port",
        "publish",
        "ctl-web",
        "tcp",
        "8181",
        "80",
        "--instance",
        "ctl-lab",
        "--family",
        "ipv4",
    ])
    .expect_ok("port publish");
    let id = json_of(&out)["id"].as_str().expect("id").to_owned();
    assert!(
        d.wait_curl(8181, "hello", Duration::from_secs(10))
            .is_some(),
        "8181 does not answer"
    );
    let out = c(&["--json", "port", "list"]).expect_ok("port list");
    let rows = json_of(&out);
    let m = rows
        .as_array()
        .expect("array")
        .iter()
        .find(|r| r["id"] == id.as_str())
        .unwrap_or_else(|| panic!("{rows}"))
        .clone();
    assert_eq!(m["host_port"], 8181, "{m}");
    assert_eq!(m["container_port"], 80, "{m}");
    assert_eq!(m["state"], "active", "{m}");
    assert_eq!(m["instance"], "ctl-lab", "{m}");
    expect_exit(
        &c(&["port", "publish", "ctl-web", "tcp", "8181", "80"]),
        7,
        "taken host port: Conflict",
    );
    expect_exit(
        &c(&["port", "publish", "ctl-none", "tcp", "8189", "80"]),
        5,
        "no such container: NotFound",
    );
    expect_exit(
        &c(&["port", "publish", "ctl-web", "sctp", "8189", "80"]),
        4,
        "protocol: InvalidArgs",
    );
    expect_exit(
        &c(&[
            "port", "publish", "ctl-web", "tcp", "8189", "80", "--family", "ipv5",
        ]),
        4,
        "family: InvalidArgs",
    );
    let out = c(&[
        "--json",
        "port",
        "publish-many",
        "ctl-web:tcp:8182:80",
        "ctl-web:tcp:8183:80",
    ])
    .expect_ok("publish-many");
    let many = json_of(&out);
    assert_eq!(many.as_array().expect("array").len(), 2, "{many}");
    assert!(d
        .wait_curl(8183, "hello", Duration::from_secs(10))
        .is_some());
    c(&["port", "unpublish", &id]).expect_ok("unpublish");
    let t0 = Instant::now();
    while d.curl(8181).is_some() && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(d.curl(8181).is_none(), "8181 still answers after unpublish");
    expect_exit(&c(&["port", "unpublish", &id]), 5, "second unpublish");
    let out = c(&["--json", "port", "unpublish-container", "ctl-web"]).expect_ok("by container");
    assert_eq!(json_of(&out)["removed"], 2, "{out:?}");

    // Exposures: an image attached with the instance tag, exposed in the container.
    c(&["image", "create", "ctl-disk", "8M"]).expect_ok("image create");
    let dev = c(&["loop", "attach", "ctl-disk", "--instance", "ctl-lab"])
        .expect_ok("loop attach")
        .stdout
        .trim()
        .to_owned();
    let out = c(&["--json", "expose", &dev, "ctl-web"]).expect_ok("expose");
    let node = dev.trim_start_matches("/dev/");
    assert!(
        json_of(&out)["created"]
            .as_array()
            .expect("created")
            .iter()
            .any(|n| n == node),
        "{out:?}"
    );
    let ls = d.docker(&["exec", "ctl-web", "/bin/busybox", "ls", &dev]);
    assert!(ls.status.success(), "{dev} not in the container: {ls:?}");
    if daemon_has(bed, "org.dindhelper1.Devices", "ListExposures") {
        let out = c(&["--json", "exposures"]).expect_ok("exposures");
        assert!(out.stdout.contains(node), "{out:?}");
        c(&["revoke", &dev, "ctl-web"]).expect_ok("revoke");
        let ls = d.docker(&["exec", "ctl-web", "/bin/busybox", "ls", &dev]);
        assert!(!ls.status.success(), "{dev} still in the container");
    } else {
        // Not in this daemon yet (the devices work adds them): the class of the answer
        // is "older daemon", not a generic failure.
        expect_exit(
            &c(&["exposures"]),
            11,
            "ListExposures on a daemon without it",
        );
        expect_exit(&c(&["revoke", &dev, "ctl-web"]), 11, "RevokeFromContainer");
    }

    // Captures: a file session, stopped, read with tcpdump; listed; deleted.
    let out = c(&[
        "--json",
        "capture",
        "start",
        "ctl-web",
        "--filter",
        "tcp port 80",
        "--duration",
        "60",
        "--instance",
        "ctl-lab",
    ])
    .expect_ok("capture start");
    let v = json_of(&out);
    let session = v["session"].as_str().expect("session").to_owned();
    let file = v["file"].as_str().expect("file").to_owned();
    // Traffic to the container's port 80 through a fresh mapping.
    c(&[
        "port",
        "publish",
        "ctl-web",
        "tcp",
        "8184",
        "80",
        "--instance",
        "ctl-lab",
    ])
    .expect_ok("publish 8184");
    assert!(d
        .wait_curl(8184, "hello", Duration::from_secs(10))
        .is_some());
    let out = c(&["--json", "capture", "list"]).expect_ok("capture list");
    let rows = json_of(&out);
    let sid = session.rsplit('/').next().unwrap();
    assert!(
        rows.as_array()
            .expect("array")
            .iter()
            .any(|r| r["session"] == sid && r["state"] == "running" && r["instance"] == "ctl-lab"),
        "{rows}"
    );
    c(&["capture", "stop", sid]).expect_ok("capture stop");
    let out = run("tcpdump", &["-nn", "-r", &file]).expect_ok("tcpdump -r");
    assert!(
        out.stdout.contains(".80:") || out.stdout.contains(".80 "),
        "{out:?}"
    );
    if daemon_has(bed, "org.dindhelper1.Captures", "DeleteCapture") {
        c(&["capture", "delete", &file]).expect_ok("capture delete");
        assert!(!Path::new(&file).exists(), "{file} still there");
    } else {
        expect_exit(&c(&["capture", "delete", &file]), 11, "DeleteCapture");
    }

    // One destroy takes the port, the loop device and the image with it.
    let out = c(&[
        "--json",
        "instance",
        "destroy",
        "ctl-lab",
        "--force",
        "--delete-images",
    ])
    .expect_ok("destroy");
    let done = json_of(&out)["done"].clone();
    assert!(done.to_string().contains(&dev), "{done}");
    expect_exit(
        &c(&["instance", "destroy", "ctl-lab"]),
        5,
        "second destroy: NotFound",
    );
    for (what, args) in [
        ("instance", vec!["--json", "instance", "list"]),
        ("port", vec!["--json", "port", "list"]),
        ("loop", vec!["--json", "loop", "list"]),
    ] {
        let out = c(&args).expect_ok(what);
        assert!(
            !out.stdout.contains("ctl-lab") && !out.stdout.contains("ctl-web"),
            "{what} left: {out:?}"
        );
    }
    d.docker(&["rm", "-f", "ctl-web"]);
    drop(env);
}

/// Cgroup directories of instances named `prefix-*` in every hierarchy.
fn instance_cgroups(prefix: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut roots = vec![PathBuf::from("/sys/fs/cgroup/dind")];
    if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
        roots.extend(rd.flatten().map(|e| e.path().join("dind")));
    }
    for r in roots {
        if let Ok(rd) = std::fs::read_dir(&r) {
            for e in rd.flatten() {
                if e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{prefix}-"))
                {
                    found.push(e.path());
                }
            }
        }
    }
    found
}

fn partition_exercise_leaves_nothing(bed: &Bed) {
    let env = DaemonInDockerd::new(bed, "dho");
    let d = env.d();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/partition-exercise");
    let script = |name: &str, args: &[&str], prefix: &str| -> Out {
        run_cmd(
            Command::new("bash")
                .arg(dir.join(name))
                .args(args)
                .env("DH_BUS", &bed.address)
                .env("DH_CTL", Bed::ctl_bin())
                .env("DOCKER_HOST", format!("unix://{}", d.socket.display()))
                .env("IMAGE", "bb:latest")
                .env("PREFIX", prefix)
                .env("PORT_BASE", "8200"),
        )
    };
    for (setup, teardown, prefix) in [
        ("setup.sh", "teardown.sh", "exb"),
        ("setup-ctl.sh", "teardown-ctl.sh", "exc"),
    ] {
        let t0 = Instant::now();
        let out = script(setup, &["3"], prefix).expect_ok(setup);
        let took = t0.elapsed();
        assert_eq!(out.stdout.lines().count(), 3, "{out:?}");
        // Each student: instance with limits, container adopted, disk exposed, port answers.
        let insts = json_of(&ctl(bed, &["--json", "instance", "list"]).expect_ok("list"));
        let loops = json_of(&ctl(bed, &["--json", "loop", "list"]).expect_ok("loops"));
        let ports = json_of(&ctl(bed, &["--json", "port", "list"]).expect_ok("ports"));
        for i in 1..=3 {
            let inst = format!("{prefix}-{i}");
            let row = insts
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["name"] == inst.as_str())
                .unwrap_or_else(|| panic!("{inst} not in {insts}"));
            assert_eq!(row["limits"]["tasks_max"], 256, "{row}");
            let lp = loops
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["instance"] == inst.as_str())
                .unwrap_or_else(|| panic!("no loop of {inst} in {loops}"));
            let dev = lp["device"].as_str().unwrap();
            let cont = format!("{inst}-dind");
            let ls = d.docker(&["exec", &cont, "/bin/busybox", "ls", dev]);
            assert!(ls.status.success(), "{dev} not in {cont}: {ls:?}");
            assert!(
                ports
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["instance"] == inst.as_str()
                        && p["host_port"] == 8200 + i
                        && p["state"] == "active"),
                "no port of {inst}: {ports}"
            );
            let want = format!("student-{i}");
            assert!(
                d.wait_curl(8200 + i as u16, &want, Duration::from_secs(10))
                    .is_some(),
                "port {} does not answer {want}",
                8200 + i
            );
            // Adopted: the instance's oom_score_adj on the container's process.
            let pid = d.docker_ok(&["inspect", "-f", "{{.State.Pid}}", &cont]);
            let adj = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).unwrap();
            assert_eq!(adj.trim(), "500", "{cont}");
        }
        println!("({setup} 3 took {took:?})");
        script(teardown, &[], prefix).expect_ok(teardown);
        // Nothing left: no instance, mapping, loop device, image, container, cgroup.
        for args in [
            vec!["--json", "instance", "list"],
            vec!["--json", "port", "list"],
            vec!["--json", "loop", "list"],
            vec!["--json", "image", "list"],
        ] {
            let out = ctl(bed, &args).expect_ok("list");
            assert!(
                !out.stdout.contains(&format!("{prefix}-")),
                "{args:?} after {teardown}: {out:?}"
            );
        }
        let ps = d.docker_ok(&["ps", "-a", "--format", "{{.Names}}"]);
        assert!(!ps.contains(&format!("{prefix}-")), "containers left: {ps}");
        let cg = instance_cgroups(prefix);
        assert!(cg.is_empty(), "cgroups left: {cg:?}");
        let loops = crate::bed::loops_backed_under(&bed.state_dir);
        assert!(loops.is_empty(), "loop devices left: {loops:?}");
    }
    drop(env);
}
