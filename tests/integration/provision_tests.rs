//! `examples/provision.py` (a provisioning service's whole flow for one student, in Python
//! dbus-fast) against the real daemon: instance with limits, a container started with its
//! cgroup parent and adopted, an image attached with the instance tag, a published port
//! reached from a client netns, a capture of that traffic, then the teardown — and nothing
//! of it is left afterwards.
//!
//! The bed's daemon runs inside a fresh dockerd's netns for the test (the ports need
//! Docker's chains there, as in `ports_tests`); the script runs in the client netns
//! (10.99.0.2 → 10.99.0.1). Undone on drop: daemon back in place, dockerd and namespaces
//! removed.

use crate::bed::{run, Bed, BUS_NAME, MANAGER_PATH};
use crate::docker::DaemonInDockerd;
use crate::Test;

pub fn tests() -> Vec<Test> {
    vec![Test {
        name: "provision_example_runs_a_students_whole_flow_and_leaves_nothing",
        needs_daemon: true,
        run: provision_example_runs_a_students_whole_flow_and_leaves_nothing,
    }]
}

fn names(bed: &Bed, iface: &str, method: &str, col: usize) -> Vec<String> {
    let d = bed
        .busctl(&["call", BUS_NAME, MANAGER_PATH, iface, method])
        .expect_ok(method)
        .json_data();
    d[0].as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r[col].as_str().map(str::to_owned))
        .collect()
}

fn provision_example_runs_a_students_whole_flow_and_leaves_nothing(bed: &Bed) {
    let env = DaemonInDockerd::new(bed, "dhv");
    let d = env.d();
    let docker_host = format!("unix://{}", d.socket.display());

    let student = format!("dhv{}", std::process::id());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/provision.py");
    let client_ns = format!("--net=/run/netns/{}", d.client_ns);
    let t0 = std::time::Instant::now();
    let out = run(
        "nsenter",
        &[
            &client_ns,
            "/usr/bin/python3",
            script,
            "--bus-address",
            &bed.address,
            "--docker-host",
            &docker_host,
            "--student",
            &student,
            "--image",
            "bb:latest",
            "--cmd",
            "/bin/busybox httpd -f -p 80 -h /www",
            "--host-port",
            "8181",
            "--probe-url",
            "http://10.99.0.1:8181/",
            "--memory-max-mib",
            "256",
            "--tasks-max",
            "128",
        ],
    );
    println!(
        "(provision.py: {:.1} s)\n{}",
        t0.elapsed().as_secs_f64(),
        out.stdout
    );
    assert!(
        out.ok(),
        "provision.py failed: {}\n{}\ndaemon log:\n{}",
        out.stdout,
        out.stderr,
        bed.daemon_log_tail(40)
    );
    let summary: serde_json::Value =
        serde_json::from_str(out.stdout.lines().last().unwrap_or("")).expect("JSON summary");
    assert_eq!(summary["ok"], true, "{summary}");
    assert_eq!(summary["probe"], "hello", "{summary}");
    assert!(summary["packets"].as_u64().unwrap_or(0) >= 3, "{summary}");
    assert_eq!(summary["oom_score_adj"], 500, "{summary}");
    let destroyed: Vec<&str> = summary["destroyed"]
        .as_array()
        .expect("destroyed")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    for want in ["detached", "deleted image", "forgot instance"] {
        assert!(
            destroyed.iter().any(|s| s.contains(want)),
            "teardown did not report {want:?}: {destroyed:?}"
        );
    }
    // The capture file stays (the student's record), complete.
    let pcap = summary["capture"].as_str().expect("capture path");
    let len = std::fs::metadata(pcap).map(|m| m.len()).unwrap_or(0);
    assert!(len > 24, "{pcap}: {len} bytes");
    let _ = std::fs::remove_file(pcap);

    // Nothing of the student is left.
    assert!(
        !names(bed, "org.dindhelper1.Instances", "ListInstances", 1).contains(&student),
        "instance left"
    );
    assert!(
        !names(bed, "org.dindhelper1.Manager", "ListImages", 1)
            .contains(&format!("{student}-disk")),
        "image left"
    );
    assert!(
        names(bed, "org.dindhelper1.Ports", "ListMappings", 1).is_empty(),
        "mapping left"
    );
    assert!(
        d.curl(8181).is_none(),
        "port 8181 still answers after the teardown"
    );
    assert!(d
        .docker_ok(&["ps", "-aq", "--filter", &format!("name={student}-dind")])
        .is_empty());
    drop(env);
}
