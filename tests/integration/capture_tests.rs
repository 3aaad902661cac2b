//! Captures (`org.dindhelper1.Captures` / `.Capture`) and ExposeToContainer
//! (`org.dindhelper1.Devices`) through the bus, against a real dockerd.
//!
//! Fixture: the run's shared dockerd ([`crate::docker::shared`]: helper tag `dhd`,
//! container `web` = busybox httpd published on 8080, the bed's daemon pointed at it with
//! `--docker-host`).
//!
//! Signals are observed with `gdbus monitor` (line-buffered through `stdbuf -oL`).

use crate::bed::{
    gv_str, run, sfdisk, Bed, Out, BUS_NAME, MANAGER_PATH, MEMBER, OWN, PLAIN, TENANT,
};
use crate::docker::shared;
use crate::dockerd::Dockerd;
use crate::Test;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CAPTURES: &str = "org.dindhelper1.Captures";
const CAPTURE: &str = "org.dindhelper1.Capture";
const DEVICES: &str = "org.dindhelper1.Devices";

pub fn tests() -> Vec<Test> {
    vec![
        Test {
            name: "capture_filter_tcp80_finds_the_gets_and_nothing_else",
            needs_daemon: true,
            run: capture_filter_tcp80_finds_the_gets_and_nothing_else,
        },
        Test {
            name: "capture_duration_and_max_packets_end_the_session",
            needs_daemon: true,
            run: capture_duration_and_max_packets_end_the_session,
        },
        Test {
            name: "capture_fd_stream_is_readable_by_tcpdump",
            needs_daemon: true,
            run: capture_fd_stream_is_readable_by_tcpdump,
        },
        Test {
            name: "capture_killed_container_leaves_a_valid_file",
            needs_daemon: true,
            run: capture_killed_container_leaves_a_valid_file,
        },
        Test {
            name: "capture_bad_filter_and_plain_user_are_refused",
            needs_daemon: true,
            run: capture_bad_filter_and_plain_user_are_refused,
        },
        Test {
            name: "capture_tenant_without_capture_host_captures_a_bridge_container",
            needs_daemon: true,
            run: capture_tenant_without_capture_host_captures_a_bridge_container,
        },
        Test {
            name: "expose_partition_nodes_follow_rescan_inside_the_container",
            needs_daemon: true,
            run: expose_partition_nodes_follow_rescan_inside_the_container,
        },
    ]
}

// ---- helpers -----------------------------------------------------------------------

/// busctl call on the Captures interface as `user`.
fn captures_call(bed: &Bed, user: &str, method: &str, sig: &str, args: &[&str]) -> Out {
    bed.call_iface_as(user, "Captures", method, sig, args)
}

/// StartCapture as `user`; `opts` are busctl name/type/value triples. Returns (object, path).
#[track_caller]
fn start_capture(bed: &Bed, user: &str, target: &str, opts: &[&str]) -> (String, String) {
    assert!(opts.len() % 3 == 0);
    let n = (opts.len() / 3).to_string();
    let mut args = vec![target, n.as_str()];
    args.extend_from_slice(opts);
    let out = captures_call(bed, user, "StartCapture", "sa{sv}", &args)
        .expect_ok(&format!("{user}: StartCapture {target} {opts:?}"));
    let d = out.json_data();
    (
        d[0].as_str().expect("o").to_owned(),
        d[1].as_str().expect("s").to_owned(),
    )
}

fn prop(bed: &Bed, obj: &str, name: &str) -> serde_json::Value {
    bed.busctl(&["get-property", BUS_NAME, obj, CAPTURE, name])
        .expect_ok(&format!("get {name} of {obj}"))
        .json_data()
}

fn prop_u64(bed: &Bed, obj: &str, name: &str) -> u64 {
    prop(bed, obj, name).as_u64().expect("t")
}

fn prop_str(bed: &Bed, obj: &str, name: &str) -> String {
    prop(bed, obj, name).as_str().expect("s").to_owned()
}

fn stop_as(bed: &Bed, user: &str, obj: &str) -> Out {
    bed.busctl_as(
        user,
        &["call", BUS_NAME, obj, CAPTURE, "Stop", "a{sv}", "0"],
    )
}

/// gdbus call of `iface.method` on `path` as `user` (reports D-Bus error names).
fn gdbus(bed: &Bed, user: &str, path: &str, method: &str, args: &[&str]) -> Out {
    bed.gdbus_raw(user, &bed.address, BUS_NAME, path, method, args)
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

/// `tcpdump -r FILE -nn [-A] [FILTER]` as root: (exit status, stdout lines, stderr).
fn tcpdump_read(file: &str, ascii: bool, filter: Option<&str>) -> (i32, Vec<String>, String) {
    let mut args = vec!["-r", file, "-nn"];
    if ascii {
        args.push("-A");
    }
    if let Some(f) = filter {
        args.push(f);
    }
    let out = run("tcpdump", &args);
    (
        out.status,
        out.stdout.lines().map(str::to_owned).collect(),
        out.stderr,
    )
}

/// Packet lines of tcpdump's plain output (one per packet; they start with a timestamp).
fn packet_lines(lines: &[String]) -> usize {
    lines
        .iter()
        .filter(|l| l.len() > 2 && l.as_bytes()[0].is_ascii_digit() && l.as_bytes()[2] == b':')
        .count()
}

#[track_caller]
fn curl_n(d: &Dockerd, n: usize) {
    for i in 0..n {
        assert_eq!(
            d.curl(8080).as_deref(),
            Some("hello"),
            "curl {i} from the client netns"
        );
    }
}

/// `gdbus monitor` on the daemon's name, output in a file.
struct Monitor {
    child: Child,
    file: PathBuf,
}

impl Monitor {
    #[track_caller]
    fn start(bed: &Bed, tag: &str) -> Monitor {
        let file = bed.scratch(&format!("monitor-{tag}.txt"));
        let out = fs::File::create(&file).expect("monitor file");
        let child = Command::new("stdbuf")
            .args(["-oL", "gdbus", "monitor", "--address", &bed.address])
            .args(["--dest", BUS_NAME])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .expect("gdbus monitor");
        let m = Monitor { child, file };
        let t0 = Instant::now();
        while !m.text().contains("is owned by") {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "gdbus monitor did not start: {:?}",
                m.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        m
    }

    fn text(&self) -> String {
        fs::read_to_string(&self.file).unwrap_or_default()
    }

    /// Wait for the Finished signal of `obj`; returns (packets, bytes, dropped, reason).
    #[track_caller]
    fn finished(&self, obj: &str, timeout: Duration) -> (u64, u64, u64, String) {
        let needle = format!("{CAPTURES}.Finished (objectpath '{obj}', ");
        let t0 = Instant::now();
        loop {
            let text = self.text();
            if let Some(line) = text.lines().find(|l| l.contains(&needle)) {
                let rest = &line[line.find(&needle).unwrap() + needle.len()..];
                // uint64 P, uint64 B, uint64 D, 'reason')
                let nums: Vec<u64> = rest
                    .split(',')
                    .take(3)
                    .map(|s| {
                        s.trim()
                            .trim_start_matches("uint64 ")
                            .parse()
                            .unwrap_or_else(|_| panic!("cannot parse {line:?}"))
                    })
                    .collect();
                let reason = rest
                    .rsplit_once(", '")
                    .map(|(_, r)| r.trim_end_matches(')').trim_end_matches('\'').to_owned())
                    .unwrap_or_default();
                return (nums[0], nums[1], nums[2], reason);
            }
            assert!(
                t0.elapsed() < timeout,
                "no Finished signal for {obj} within {timeout:?}; monitor saw:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.file);
    }
}

// ---- tests ---------------------------------------------------------------------------

fn capture_filter_tcp80_finds_the_gets_and_nothing_else(bed: &Bed) {
    shared(bed, |d| {
        let (obj, path) = start_capture(
            bed,
            MEMBER,
            "web",
            &["filter", "s", "tcp port 80", "duration", "u", "60"],
        );
        assert!(obj.starts_with("/org/dindhelper1/capture/"), "{obj}");
        let uid = bed.uid(MEMBER);
        let want_dir = bed.state_dir.join("captures").join(uid.to_string());
        assert_eq!(
            Path::new(&path).parent(),
            Some(want_dir.as_path()),
            "{path}"
        );
        assert_eq!(prop_str(bed, &obj, "State"), "running");
        assert_eq!(prop_str(bed, &obj, "Target"), "web");
        assert_eq!(prop(bed, &obj, "OwnerUid").as_u64(), Some(uid as u64));

        // Traffic: 5 GETs through the published port, plus pings the filter must drop.
        curl_n(d, 5);
        let ip = d.ip_of("web");
        let ping = d.in_ns(&["busybox", "ping", "-c", "3", "-W", "1", &ip]);
        assert!(ping.status.success(), "ping {ip}: {ping:?}");

        // Another uid can neither stop nor read it.
        let out = gdbus(bed, OWN, &obj, &format!("{CAPTURE}.Stop"), &["@a{sv} {}"]);
        expect_dbus_error(
            &out,
            "NotAuthorized",
            "dhtest-own: Stop of member's capture",
        );
        let cat = run("runuser", &["-u", OWN, "--", "cat", &path]);
        assert!(
            !cat.ok() && cat.stderr.contains("Permission denied"),
            "dhtest-own must not read {path}: {cat:?}"
        );
        let cat = run("runuser", &["-u", MEMBER, "--", "cat", &path]);
        assert!(cat.ok(), "the owner reads its capture: {cat:?}");

        stop_as(bed, MEMBER, &obj).expect_ok("member: Stop");
        assert_eq!(prop_str(bed, &obj, "State"), "finished");
        assert_eq!(prop_str(bed, &obj, "Reason"), "stopped");

        let meta = fs::metadata(&path).expect("capture file");
        assert_eq!(meta.uid(), uid, "owned by the caller");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);

        let (st, plain, err) = tcpdump_read(&path, false, None);
        assert_eq!(st, 0, "tcpdump -r {path}: {err}");
        // tcpdump's summary line of a request packet ends with "HTTP: GET / HTTP/1.1".
        let gets = plain
            .iter()
            .filter(|l| l.ends_with("HTTP: GET / HTTP/1.1"))
            .count();
        assert_eq!(
            gets,
            5,
            "GET requests in the capture:\n{}",
            plain.join("\n")
        );
        let packets = packet_lines(&plain);
        let (st, other, err) = tcpdump_read(&path, false, Some("not (tcp port 80)"));
        assert_eq!(st, 0, "{err}");
        assert_eq!(
            packet_lines(&other),
            0,
            "packets that fail the filter:\n{}",
            other.join("\n")
        );
        assert_eq!(
            prop_u64(bed, &obj, "Packets"),
            packets as u64,
            "Packets vs file"
        );
        assert_eq!(
            prop_u64(bed, &obj, "Bytes"),
            meta.len(),
            "Bytes vs file size"
        );
        assert!(
            packets >= 5 * 6,
            "5 HTTP exchanges are at least 30 packets: {packets}"
        );

        // ListCaptures shows it.
        let out = captures_call(bed, MEMBER, "ListCaptures", "", &[]).expect_ok("ListCaptures");
        let rows = out.json_data()[0].as_array().cloned().unwrap_or_default();
        assert!(
            rows.iter().any(|r| r[0] == obj.as_str()
                && r[1] == "web"
                && r[3] == "finished"
                && r[4] == path.as_str()),
            "{rows:?}"
        );
    })
}

fn capture_duration_and_max_packets_end_the_session(bed: &Bed) {
    shared(bed, |d| {
        let mon = Monitor::start(bed, "limits");
        // duration
        let t0 = Instant::now();
        let (obj, path) = start_capture(bed, MEMBER, "web", &["duration", "u", "2"]);
        let (p, b, _, reason) = mon.finished(&obj, Duration::from_secs(15));
        let took = t0.elapsed();
        assert_eq!(reason, "duration");
        assert!(
            took >= Duration::from_secs(2) && took < Duration::from_secs(8),
            "a 2 s capture took {took:?}"
        );
        assert_eq!(prop_str(bed, &obj, "State"), "finished");
        assert_eq!(prop_str(bed, &obj, "Reason"), "duration");
        assert_eq!(fs::metadata(&path).unwrap().len(), b);
        assert_eq!(prop_u64(bed, &obj, "Packets"), p);

        // max_packets
        let (obj, path) = start_capture(
            bed,
            MEMBER,
            "web",
            &[
                "filter",
                "s",
                "tcp port 80",
                "max_packets",
                "t",
                "3",
                "duration",
                "u",
                "30",
            ],
        );
        curl_n(d, 2);
        let (p, b, _, reason) = mon.finished(&obj, Duration::from_secs(15));
        assert_eq!(reason, "max-packets");
        assert_eq!(p, 3);
        assert_eq!(prop_u64(bed, &obj, "Packets"), 3);
        let (st, lines, err) = tcpdump_read(&path, false, None);
        assert_eq!(st, 0, "{err}");
        assert_eq!(packet_lines(&lines), 3, "{lines:?}");
        assert_eq!(fs::metadata(&path).unwrap().len(), b);
    })
}

fn capture_fd_stream_is_readable_by_tcpdump(bed: &Bed) {
    shared(bed, |d| {
        let script = format!(
            "'{}' --bus-address '{}' capture web --filter 'tcp port 80' --count 6 --duration 30 \
             | tcpdump -nn -r - 2>/dev/null",
            Bed::ctl_bin(),
            bed.address,
        );
        let child = Command::new("runuser")
            .args(["-u", MEMBER, "--", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("pipeline");
        // Let the session start, then make traffic until the pipeline ends.
        let t0 = Instant::now();
        let mut child = child;
        std::thread::sleep(Duration::from_millis(1500));
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "dindhelperctl capture | tcpdump did not end"
            );
            let _ = d.curl(8080);
            std::thread::sleep(Duration::from_millis(200));
        };
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(status.success(), "pipeline: {status}; {stdout}\n{stderr}");
        let lines: Vec<String> = stdout.lines().map(str::to_owned).collect();
        assert_eq!(packet_lines(&lines), 6, "stdout {stdout}\nstderr {stderr}");
        assert!(
            lines
                .iter()
                .all(|l| l.contains(".80:") || l.contains(".80 >")),
            "every packet is tcp port 80: {stdout}"
        );
        assert!(stderr.contains("max-packets"), "{stderr}");
    })
}

fn capture_killed_container_leaves_a_valid_file(bed: &Bed) {
    shared(bed, |d| {
        let _ = d.docker(&["rm", "-f", "dhd-victim"]);
        d.docker_ok(&[
            "run",
            "-d",
            "--name",
            "dhd-victim",
            "bb:latest",
            "/bin/busybox",
            "sleep",
            "1000",
        ]);
        let ip = d.ip_of("dhd-victim");
        let mon = Monitor::start(bed, "victim");
        let (obj, path) = start_capture(bed, MEMBER, "dhd-victim", &["duration", "u", "60"]);
        let ping = d.in_ns(&["busybox", "ping", "-c", "3", "-W", "1", &ip]);
        assert!(ping.status.success(), "{ping:?}");
        std::thread::sleep(Duration::from_millis(300));
        d.docker_ok(&["kill", "dhd-victim"]);
        let (p, b, _, reason) = mon.finished(&obj, Duration::from_secs(15));
        d.docker_ok(&["rm", "-f", "dhd-victim"]);
        assert_eq!(reason, "target-exited");
        let (st, lines, err) = tcpdump_read(&path, false, None);
        assert_eq!(st, 0, "tcpdump -r of the file of a killed container: {err}");
        assert_eq!(packet_lines(&lines) as u64, p);
        assert!(p >= 6, "3 pings and 3 replies at least: {p}\n{lines:?}");
        assert_eq!(fs::metadata(&path).unwrap().len(), b);
    })
}

/// Owned targets and the host-network check, for a tenant (shipped group: `capture`, no
/// `capture-host`, no `-others`): it captures in a bridge container its own instance
/// adopted, and is refused (capture-others) on a container of no instance. Before the fix
/// "is it on the host network" compared with /proc/1/ns/net, which root cannot stat on
/// this machine (EACCES): every container counted as the host and the tenant was refused
/// capture-host; and any container could be captured by any `capture` holder.
fn capture_tenant_without_capture_host_captures_a_bridge_container(bed: &Bed) {
    shared(bed, |d| {
        let tag = std::process::id();
        let inst = format!("dhc{tag}-t");
        let ctr = format!("dhd-tenant-{tag}");
        let name = format!("tenant-{tag}");
        let instances = "org.dindhelper1.Instances";
        let out = gdbus(
            bed,
            TENANT,
            MANAGER_PATH,
            &format!("{instances}.CreateInstance"),
            &[&gv_str(&inst), "@a{sv} {}"],
        );
        assert!(out.ok(), "tenant CreateInstance: {out:?}");
        let cleanup = |d: &Dockerd| {
            d.docker(&["rm", "-f", &ctr]);
            gdbus(
                bed,
                "root",
                MANAGER_PATH,
                &format!("{instances}.DestroyInstance"),
                &[&gv_str(&inst), "{'force': <true>}"],
            );
        };
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            d.run_web(&ctr, "/www", &["--cgroup-parent", &format!("/dind/{inst}")]);
            // The tenant may not adopt a container of no instance; the provisioning
            // group adopts it into the tenant's instance.
            let out = gdbus(
                bed,
                TENANT,
                MANAGER_PATH,
                &format!("{instances}.AdoptContainer"),
                &[&gv_str(&inst), &gv_str(&ctr), "@a{sv} {}"],
            );
            expect_dbus_error(
                &out,
                "NotAuthorized",
                "tenant adopts a container of no instance",
            );
            let out = gdbus(
                bed,
                MEMBER,
                MANAGER_PATH,
                &format!("{instances}.AdoptContainer"),
                &[&gv_str(&inst), &gv_str(&ctr), "@a{sv} {}"],
            );
            assert!(
                out.ok(),
                "member adopts into the tenant's instance: {out:?}"
            );
            let out = gdbus(
                bed,
                TENANT,
                MANAGER_PATH,
                &format!("{CAPTURES}.StartCapture"),
                &[
                    &gv_str(&ctr),
                    &format!("{{'name': <{}>, 'duration': <uint32 1>}}", gv_str(&name)),
                ],
            );
            assert!(
                out.ok(),
                "tenant StartCapture of its own container: {out:?}"
            );
            let obj = out.stdout.split('\'').nth(1).expect("object").to_owned();
            let t = Instant::now();
            while prop_str(bed, &obj, "Reason").is_empty() {
                assert!(t.elapsed() < Duration::from_secs(10), "did not end");
                std::thread::sleep(Duration::from_millis(100));
            }
            let out = gdbus(
                bed,
                TENANT,
                MANAGER_PATH,
                &format!("{CAPTURES}.DeleteCapture"),
                &[&gv_str(&name), "@a{sv} {}"],
            );
            assert!(out.ok(), "DeleteCapture: {out:?}");
            let out = gdbus(
                bed,
                TENANT,
                MANAGER_PATH,
                &format!("{CAPTURES}.StartCapture"),
                &[&gv_str("web"), "@a{sv} {}"],
            );
            expect_dbus_error(
                &out,
                "NotAuthorized",
                "tenant captures a container of no instance",
            );
            assert!(out.stderr.contains("capture-others"), "{out:?}");
        }));
        cleanup(d);
        if let Err(e) = r {
            std::panic::resume_unwind(e);
        }
    })
}

fn capture_bad_filter_and_plain_user_are_refused(bed: &Bed) {
    shared(bed, |_| {
        let start = format!("{CAPTURES}.StartCapture");
        let out = gdbus(
            bed,
            MEMBER,
            MANAGER_PATH,
            &start,
            &[&gv_str("web"), "{'filter': <'tcp port eighty'>}"],
        );
        expect_dbus_error(&out, "InvalidArgs", "bad filter");
        assert!(
            out.stderr.contains("eighty"),
            "libpcap's message names the bad word: {}",
            out.stderr
        );
        let out = gdbus(
            bed,
            PLAIN,
            MANAGER_PATH,
            &start,
            &[&gv_str("web"), "@a{sv} {}"],
        );
        expect_dbus_error(&out, "NotAuthorized", "plain user StartCapture");
        let out = gdbus(
            bed,
            MEMBER,
            MANAGER_PATH,
            &start,
            &[&gv_str("no-such"), "@a{sv} {}"],
        );
        expect_dbus_error(&out, "NotFound", "unknown container");
        let out = gdbus(
            bed,
            MEMBER,
            MANAGER_PATH,
            &start,
            &[&gv_str("web"), "{'colour': <'red'>}"],
        );
        expect_dbus_error(&out, "InvalidArgs", "unknown option");
        let out = gdbus(
            bed,
            MEMBER,
            MANAGER_PATH,
            &start,
            &[&gv_str("web"), "{'name': <'../x'>}"],
        );
        expect_dbus_error(&out, "InvalidArgs", "bad name");
        // Nothing was left behind by the refused calls.
        let dir = bed
            .state_dir
            .join("captures")
            .join(bed.uid(PLAIN).to_string());
        assert!(!dir.exists(), "{} exists", dir.display());
    })
}

fn expose(bed: &Bed, user: &str, device: &str, container: &str) -> (Vec<String>, Vec<String>) {
    let out = bed
        .busctl_as(
            user,
            &[
                "call",
                BUS_NAME,
                MANAGER_PATH,
                DEVICES,
                "ExposeToContainer",
                "ssa{sv}",
                device,
                container,
                // This test drives the explicit Rescan + expose path; following the
                // table is tested in devices_tests.
                "1",
                "follow",
                "b",
                "false",
            ],
        )
        .expect_ok(&format!("{user}: ExposeToContainer {device} {container}"));
    let d = out.json_data();
    let list = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect()
    };
    (list(&d[0]), list(&d[1]))
}

fn expose_partition_nodes_follow_rescan_inside_the_container(bed: &Bed) {
    shared(bed, |d| {
        let _ = d.docker(&["rm", "-f", "dhd-dev"]);
        d.docker_ok(&[
            "run",
            "-d",
            "--name",
            "dhd-dev",
            "bb:latest",
            "/bin/busybox",
            "sleep",
            "1000",
        ]);
        bed.create_image(MEMBER, "dhd-expose", 64 << 20);
        let lp = crate::bed::DaemonLoop::attach(bed, MEMBER, "dhd-expose", &[]);
        let dev = lp.device.clone();
        let name = dev.trim_start_matches("/dev/").to_owned();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            sfdisk(
                &dev,
                &[],
                &[],
                "label: gpt\nsize=8MiB\nsize=8MiB\nsize=8MiB\n",
            )
            .expect_ok("sfdisk gpt with 3 partitions");
            let parts = bed.rescan(MEMBER, &dev);
            assert_eq!(parts.len(), 3, "{parts:?}");
            let p2_start = parts
                .iter()
                .find(|p| p[0] == 2)
                .and_then(|p| p[1].as_u64())
                .expect("partition 2");

            // Another uid may not expose member's device; a plain user nothing at all.
            let out = gdbus(
                bed,
                OWN,
                MANAGER_PATH,
                &format!("{DEVICES}.ExposeToContainer"),
                &[&gv_str(&dev), &gv_str("dhd-dev"), "@a{sv} {}"],
            );
            expect_dbus_error(&out, "NotAuthorized", "dhtest-own: expose member's loop");

            let (created, removed) = expose(bed, MEMBER, &dev, "dhd-dev");
            for want in [
                name.clone(),
                format!("{name}p1"),
                format!("{name}p2"),
                format!("{name}p3"),
            ] {
                assert!(created.contains(&want), "{want} not in {created:?}");
            }
            assert!(removed.is_empty(), "{removed:?}");

            let marker = format!("dhd-marker-{}", std::process::id());
            let w = d.docker(&[
                "exec",
                "dhd-dev",
                "/bin/busybox",
                "sh",
                "-c",
                &format!(
                    "printf '{marker}' | /bin/busybox dd of=/dev/{name}p2 bs=512 count=1 conv=sync,fsync"
                ),
            ]);
            assert!(
                w.status.success(),
                "dd inside the container: {}",
                String::from_utf8_lossy(&w.stderr)
            );
            let back = run(
                "dd",
                &[
                    &format!("if=/dev/{name}p2"),
                    "bs=512",
                    "count=1",
                    "iflag=direct",
                    "status=none",
                ],
            );
            assert!(
                back.stdout.starts_with(&marker),
                "host read of p2: {:?}",
                back.stdout
            );
            let mut img = vec![0u8; marker.len()];
            {
                use std::io::{Read, Seek, SeekFrom};
                let mut f = fs::File::open(bed.image_path(MEMBER, "dhd-expose")).unwrap();
                f.seek(SeekFrom::Start(p2_start)).unwrap();
                f.read_exact(&mut img).unwrap();
            }
            assert_eq!(
                String::from_utf8_lossy(&img),
                marker,
                "marker in the image file"
            );

            // Delete partition 2 on the host, Rescan, expose again: its node goes away.
            sfdisk(&dev, &["--delete"], &["2"], "").expect_ok("sfdisk --delete 2");
            let parts = bed.rescan(MEMBER, &dev);
            assert_eq!(parts.len(), 2, "{parts:?}");
            let (created, removed) = expose(bed, MEMBER, &dev, "dhd-dev");
            assert_eq!(removed, vec![format!("{name}p2")], "created {created:?}");
            let ls = |node: &str| {
                d.docker(&[
                    "exec",
                    "dhd-dev",
                    "/bin/busybox",
                    "ls",
                    &format!("/dev/{node}"),
                ])
                .status
                .success()
            };
            assert!(
                !ls(&format!("{name}p2")),
                "/dev/{name}p2 is still in the container"
            );
            assert!(ls(&format!("{name}p1")) && ls(&format!("{name}p3")) && ls(&name));
        }));
        drop(lp);
        d.docker_ok(&["rm", "-f", "dhd-dev"]);
        bed.delete_image(MEMBER, "dhd-expose");
        if let Err(e) = r {
            std::panic::resume_unwind(e);
        }
    })
}
