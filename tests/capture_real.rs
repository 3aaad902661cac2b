//! Real captures in network namespaces (needs root, iproute2, busybox, curl, tcpdump).
//! Each test makes its own namespace pair `dhc-aN`/`dhc-bN` joined by a veth, 10.98.N.0/24,
//! and removes it afterwards. A missing prerequisite fails the test.

use std::fs::File;
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dindhelper::capture::{self, CaptureOptions, Reason};
use dindhelper::error::{Classify, Kind};
use dindhelper::netns::Target;

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    assert!(
        out.status.success(),
        "{cmd}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Pair {
    n: u32,
    a: String,
    b: String,
    children: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Pair {
    fn new(n: u32) -> Pair {
        assert!(
            nix::unistd::geteuid().is_root(),
            "capture_real tests need root"
        );
        for tool in ["ip", "busybox", "curl", "tcpdump"] {
            assert!(
                Command::new("sh")
                    .arg("-c")
                    .arg(format!("command -v {tool}"))
                    .status()
                    .unwrap()
                    .success(),
                "{tool} is required"
            );
        }
        let (a, b) = (format!("dhc-a{n}"), format!("dhc-b{n}"));
        let _ = Command::new("ip").args(["netns", "del", &a]).status();
        let _ = Command::new("ip").args(["netns", "del", &b]).status();
        sh(&format!(
            "ip netns add {a} && ip netns add {b} && ip -n {a} link set lo up && ip -n {b} link set lo up && \
             ip link add dhcva{n} netns {a} type veth peer name dhcvb{n} netns {b} && \
             ip -n {a} addr add 10.98.{n}.1/24 dev dhcva{n} && ip -n {b} addr add 10.98.{n}.2/24 dev dhcvb{n} && \
             ip -n {a} link set dhcva{n} up && ip -n {b} link set dhcvb{n} up"
        ));
        let dir = tempfile::Builder::new()
            .prefix("dhc-cap")
            .tempdir()
            .unwrap();
        std::fs::create_dir(dir.path().join("www")).unwrap();
        std::fs::write(dir.path().join("www/index.html"), "hello\n").unwrap();
        Pair {
            n,
            a,
            b,
            children: vec![],
            dir,
        }
    }

    /// busybox httpd in namespace a; returns its pid as the capture target.
    fn httpd(&mut self) -> Target {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.a, "busybox", "httpd", "-f", "-p"])
            .arg(format!("10.98.{}.1:80", self.n))
            .arg("-h")
            .arg(self.dir.path().join("www"))
            .spawn()
            .unwrap();
        let t = self.wait_target(child.id() as i32);
        self.children.push(child);
        // wait until it answers
        for _ in 0..50 {
            if self.get_quiet() {
                return t;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("httpd in {} does not answer", self.a);
    }

    fn sleeper(&mut self) -> (Target, usize) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.a, "sleep", "1000"])
            .spawn()
            .unwrap();
        let t = self.wait_target(child.id() as i32);
        self.children.push(child);
        (t, self.children.len() - 1)
    }

    /// Wait until `ip netns exec` has exec'ed (the pid is in the namespace).
    fn wait_target(&self, pid: i32) -> Target {
        let want_ino = std::fs::metadata(format!("/run/netns/{}", self.a)).unwrap();
        use std::os::unix::fs::MetadataExt;
        for _ in 0..100 {
            if let Ok(m) = std::fs::metadata(format!("/proc/{pid}/ns/net")) {
                if m.ino() == want_ino.ino() {
                    // exec done as well? comm is no longer "ip"
                    let comm =
                        std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                    if comm.trim() != "ip" {
                        return Target::of_pid(pid).unwrap();
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("pid {pid} never entered {}", self.a);
    }

    fn get_quiet(&self) -> bool {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.b,
                "curl",
                "-sf",
                "-m",
                "2",
                "-o",
                "/dev/null",
            ])
            .arg(format!("http://10.98.{}.1/", self.n))
            .status()
            .unwrap()
            .success()
    }

    fn gets(&self, count: usize) {
        for _ in 0..count {
            assert!(self.get_quiet(), "curl failed");
        }
    }

    fn ping(&self, count: u32) {
        sh(&format!(
            "ip netns exec {} busybox ping -c {count} -i 0.2 -W 1 10.98.{}.1 >/dev/null",
            self.b, self.n
        ));
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.a]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.b]).status();
    }
}

fn tcpdump(file: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new("tcpdump")
        .arg("-nn")
        .arg("-r")
        .arg(file)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tcpdump -r {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn check_five_gets(pair: &mut Pair, interface: Option<String>, name: &str) {
    let target = pair.httpd();
    let path = pair.path(name);
    let sink = File::create(&path).unwrap();
    let h = capture::start(
        target,
        CaptureOptions {
            interface,
            filter: Some("tcp port 80".into()),
            ..Default::default()
        },
        sink,
    )
    .unwrap();
    pair.ping(3); // traffic the filter must drop
    pair.gets(5);
    pair.ping(2);
    h.stop();
    let fin = h.wait();
    assert_eq!(fin.reason, Reason::Stopped);
    let all = tcpdump(&path, &[]);
    assert_eq!(all.matches("HTTP: GET / HTTP/1.1").count(), 5, "{all}");
    assert_eq!(tcpdump(&path, &["not (tcp port 80)"]), "");
    let lines = tcpdump(&path, &[]).lines().count() as u64;
    assert_eq!(fin.stats.packets, lines);
    assert_eq!(fin.stats.bytes, std::fs::metadata(&path).unwrap().len());
    assert_eq!(fin.stats.dropped, 0);
    // 5 TCP connections: at least SYN, SYN-ACK, ACK, GET, response, FINs
    assert!(lines >= 5 * 8, "only {lines} packets");
    eprintln!("{name}: {fin:?}");
}

#[test]
fn any_interface_filter_tcp_port_80_sees_five_gets_and_nothing_else() {
    let mut pair = Pair::new(1);
    check_five_gets(&mut pair, None, "any.pcap");
    // cooked capture: link type LINUX_SLL
    let head = std::fs::read(pair.path("any.pcap")).unwrap();
    assert_eq!(u32::from_ne_bytes(head[20..24].try_into().unwrap()), 113);
}

#[test]
fn one_interface_capture_is_ethernet_and_filtered() {
    let mut pair = Pair::new(2);
    check_five_gets(&mut pair, Some("dhcva2".into()), "eth.pcap");
    let head = std::fs::read(pair.path("eth.pcap")).unwrap();
    assert_eq!(u32::from_ne_bytes(head[20..24].try_into().unwrap()), 1);
}

#[test]
fn max_packets_ends_the_session() {
    let mut pair = Pair::new(3);
    let (t, _) = pair.sleeper();
    let path = pair.path("max.pcap");
    let h = capture::start(
        t,
        CaptureOptions {
            filter: Some("icmp".into()),
            max_packets: Some(3),
            ..Default::default()
        },
        File::create(&path).unwrap(),
    )
    .unwrap();
    pair.ping(4); // 8 icmp packets
    let start = Instant::now();
    while !h.is_finished() && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let fin = h.wait();
    assert_eq!(fin.reason, Reason::MaxPackets);
    assert_eq!(fin.stats.packets, 3);
    assert_eq!(tcpdump(&path, &[]).lines().count(), 3);
}

#[test]
fn max_bytes_ends_the_session_below_the_limit() {
    let mut pair = Pair::new(9);
    let (t, _) = pair.sleeper();
    let path = pair.path("maxb.pcap");
    let h = capture::start(
        t,
        CaptureOptions {
            filter: Some("icmp".into()),
            max_bytes: Some(400),
            ..Default::default()
        },
        File::create(&path).unwrap(),
    )
    .unwrap();
    pair.ping(4); // 8 packets of 16+98 bytes: the 4th would pass 400
    let fin = h.wait();
    assert_eq!(fin.reason, Reason::MaxBytes);
    let size = std::fs::metadata(&path).unwrap().len();
    assert_eq!(fin.stats.bytes, size);
    assert!(size <= 400 && fin.stats.packets == 3, "{fin:?} {size}");
    assert_eq!(tcpdump(&path, &[]).lines().count(), 3);
}

#[test]
fn duration_ends_the_session() {
    let mut pair = Pair::new(4);
    let (t, _) = pair.sleeper();
    let path = pair.path("dur.pcap");
    let t0 = Instant::now();
    let h = capture::start(
        t,
        CaptureOptions {
            duration: Some(Duration::from_millis(1200)),
            ..Default::default()
        },
        File::create(&path).unwrap(),
    )
    .unwrap();
    pair.ping(2);
    let fin = h.wait();
    let took = t0.elapsed();
    assert_eq!(fin.reason, Reason::Duration);
    assert!(
        took >= Duration::from_millis(1200) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    assert_eq!(tcpdump(&path, &["icmp"]).lines().count(), 4);
}

#[test]
fn target_exit_ends_the_session_with_a_valid_file() {
    let mut pair = Pair::new(5);
    let (t, idx) = pair.sleeper();
    let path = pair.path("exit.pcap");
    let h = capture::start(t, CaptureOptions::default(), File::create(&path).unwrap()).unwrap();
    pair.ping(2);
    pair.children[idx].kill().unwrap();
    pair.children[idx].wait().unwrap();
    let t0 = Instant::now();
    let fin = h.wait();
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert_eq!(fin.reason, Reason::TargetExited);
    assert_eq!(tcpdump(&path, &["icmp"]).lines().count(), 4);
    assert_eq!(fin.stats.bytes, std::fs::metadata(&path).unwrap().len());
}

#[test]
fn pipe_sink_streams_to_tcpdump_while_capturing() {
    let mut pair = Pair::new(6);
    let target = pair.httpd();
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let out_path = pair.path("tcpdump.out");
    let mut reader = Command::new("tcpdump")
        .args(["-nn", "-l", "-r", "-"])
        .stdin(Stdio::from(r))
        .stdout(File::create(&out_path).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let sink = File::from(w);
    let h = capture::start(
        target,
        CaptureOptions {
            filter: Some("tcp port 80".into()),
            ..Default::default()
        },
        sink,
    )
    .unwrap();
    pair.gets(5);
    // streamed before stop: within a few retire timeouts tcpdump has printed the requests
    let t0 = Instant::now();
    loop {
        let s = std::fs::read_to_string(&out_path).unwrap();
        if s.matches("HTTP: GET / HTTP/1.1").count() == 5 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(3), "not streamed: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
    h.stop();
    let fin = h.wait(); // drops the write end: tcpdump sees EOF
    assert_eq!(fin.reason, Reason::Stopped);
    let status = reader.wait().unwrap();
    assert!(status.success());
    let mut s = String::new();
    File::open(&out_path)
        .unwrap()
        .read_to_string(&mut s)
        .unwrap();
    assert_eq!(s.matches("HTTP: GET / HTTP/1.1").count(), 5);
}

#[test]
fn bad_filter_is_invalid_args_with_libpcap_message() {
    let mut pair = Pair::new(7);
    let (t, _) = pair.sleeper();
    let e = capture::start(
        t,
        CaptureOptions {
            filter: Some("tcp port 80 and".into()),
            ..Default::default()
        },
        File::create(pair.path("bad.pcap")).unwrap(),
    )
    .err()
    .unwrap();
    assert_eq!(e.kind(), Kind::InvalidArgs);
    assert!(e.to_string().contains("syntax error"), "{e}");
    // a filter on link-layer fields cannot run on a cooked socket
    let e = capture::start(
        t,
        CaptureOptions {
            filter: Some("ether src 02:00:00:00:00:01".into()),
            ..Default::default()
        },
        File::create(pair.path("bad2.pcap")).unwrap(),
    )
    .err()
    .unwrap();
    assert_eq!(e.kind(), Kind::InvalidArgs, "{e}");
}

#[test]
fn reused_pid_and_missing_interface_are_not_found() {
    let mut pair = Pair::new(8);
    let (t, _) = pair.sleeper();
    let stale = Target {
        start_time: t.start_time - 1,
        ..t
    };
    let e = capture::start(
        stale,
        CaptureOptions::default(),
        File::create(pair.path("x")).unwrap(),
    )
    .err()
    .unwrap();
    assert_eq!(e.kind(), Kind::NotFound, "{e}");
    let e = capture::start(
        t,
        CaptureOptions {
            interface: Some("eth9".into()),
            ..Default::default()
        },
        File::create(pair.path("y")).unwrap(),
    )
    .err()
    .unwrap();
    assert_eq!(e.kind(), Kind::NotFound, "{e}");
}

#[test]
fn capture_file_is_created_beneath_state_with_owner_and_mode() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::Builder::new()
        .prefix("dhc-state")
        .tempdir()
        .unwrap();
    let (f, path) = capture::create_capture_file(dir.path(), 1234, 1234, "web-1").unwrap();
    drop(f);
    assert_eq!(path, dir.path().join("captures/1234/web-1.pcap"));
    let m = std::fs::metadata(&path).unwrap();
    assert_eq!(
        (m.uid(), m.gid(), m.permissions().mode() & 0o777),
        (1234, 1234, 0o600)
    );
    // exists -> Conflict, never truncated
    let e = capture::create_capture_file(dir.path(), 1234, 1234, "web-1")
        .err()
        .unwrap();
    assert_eq!(e.kind(), Kind::Conflict);
    // a symlink planted as the uid directory is refused
    std::os::unix::fs::symlink("/etc", dir.path().join("captures/99")).unwrap();
    let e = capture::create_capture_file(dir.path(), 99, 99, "x")
        .err()
        .unwrap();
    assert_ne!(e.kind(), Kind::Conflict);
    assert!(!std::path::Path::new("/etc/x.pcap").exists());
    let e = capture::create_capture_file(dir.path(), 1, 1, "../x")
        .err()
        .unwrap();
    assert_eq!(e.kind(), Kind::InvalidArgs);
}

#[test]
fn reader_closing_the_pipe_ends_the_session_with_an_error() {
    let mut pair = Pair::new(10);
    let (t, _) = pair.sleeper();
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    // reads the 24-byte header and a bit more, then exits
    let mut head = Command::new("head")
        .args(["-c", "200"])
        .stdin(Stdio::from(r))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let h = capture::start(t, CaptureOptions::default(), File::from(w)).unwrap();
    pair.ping(3);
    head.wait().unwrap();
    pair.ping(2);
    let fin = h.wait();
    match &fin.reason {
        Reason::Error(m) => assert!(m.contains("Broken pipe"), "{m}"),
        other => panic!("{other:?}"),
    }
}
