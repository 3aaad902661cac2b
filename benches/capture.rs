//! Capture under load: a UDP flood over a veth pair at rising rates, captured in the same
//! run by dindhelperd THROUGH THE DAEMON over D-Bus (StartCapture on target `pid:N` of a
//! process in the receiving namespace, as root: polkitd is not asked for uid 0; counters from the session's
//! Packets/Dropped properties after Stop) and by `nsenter --net=… tcpdump -i any -B 4096 -w`.
//! Prints packets sent, then captured and dropped by the kernel for each. Goal: at every
//! rate no more drops than tcpdump.
//!
//! `cargo bench --bench capture` (as root). Under `cargo test --all-targets` (no `--bench`
//! argument) it runs one short low rate as a smoke test. Environment: `DH_BENCH_RATES`
//! ("20000 50000 100000 200000 0"; 0 = as fast as the senders go), `DH_BENCH_SECS` (3),
//! `DH_BENCH_FLOODERS` (senders in parallel, 1), `DH_BENCH_SIZE` (UDP payload, 64).
//!
//! Namespaces `dhd-fa-<pid>` (receiver, capture target) and `dhd-fb-<pid>` (senders),
//! 10.97.200.1/24 <-> .2, removed at the end (also on panic).

#[allow(dead_code)]
#[path = "../tests/integration/bed.rs"]
mod bed;

use dindhelper::netns::{self, Ns, Target};
use std::net::UdpSocket;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CAPTURE: &str = "org.dindhelper1.Capture";

struct Net {
    a: String,
    b: String,
    sleepers: Vec<Child>,
}

fn sh(cmd: &str) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Net {
    fn new() -> Net {
        let pid = std::process::id();
        let (a, b) = (format!("dhd-fa-{pid}"), format!("dhd-fb-{pid}"));
        let net = Net {
            a: a.clone(),
            b: b.clone(),
            sleepers: Vec::new(),
        };
        sh(&format!(
            "ip netns add {a} && ip netns add {b} && ip -n {a} link set lo up && ip -n {b} link set lo up && \
             ip link add dhdfa netns {a} type veth peer name dhdfb netns {b} && \
             ip -n {a} addr add 10.97.200.1/24 dev dhdfa && ip -n {b} addr add 10.97.200.2/24 dev dhdfb && \
             ip -n {a} link set dhdfa up && ip -n {b} link set dhdfb up"
        ));
        net
    }

    /// A sleeping process in namespace `ns` (a capture target / setns anchor).
    fn sleeper(&mut self, ns: &str) -> Target {
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .args(["sleep", "3600"])
            .spawn()
            .expect("nsenter sleep");
        let pid = child.id() as i32;
        self.sleepers.push(child);
        let want = std::fs::metadata(format!("/run/netns/{ns}")).unwrap().ino();
        for _ in 0..200 {
            let ino = std::fs::metadata(format!("/proc/{pid}/ns/net")).map(|m| m.ino());
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if ino.ok() == Some(want) && comm.trim() == "sleep" {
                return Target::of_pid(pid).unwrap();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("sleeper in {ns} did not start");
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for c in &mut self.sleepers {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.a]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.b]).status();
    }
}

/// Send UDP to 10.97.200.1:9999 from `sender`'s namespace at `pps` (0: flat out) for
/// `secs`; returns the number of datagrams the kernel accepted.
fn flood(sender: Target, pps: u64, secs: f64, size: usize) -> u64 {
    netns::run_in(sender, &[Ns::Net], move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect("10.97.200.1:9999").unwrap();
        let buf = vec![0x5au8; size];
        let t0 = Instant::now();
        let end = Duration::from_secs_f64(secs);
        let (mut tried, mut sent) = (0u64, 0u64);
        while t0.elapsed() < end {
            let due = if pps == 0 {
                tried + 64
            } else {
                (t0.elapsed().as_secs_f64() * pps as f64) as u64
            };
            while tried < due {
                if s.send(&buf).is_ok() {
                    sent += 1;
                }
                tried += 1;
            }
            if pps != 0 {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        sent
    })
    .expect("flood thread")
}

/// tcpdump's "N packets captured" and "N packets dropped by kernel".
fn tcpdump_counts(stderr: &str) -> (u64, u64) {
    let grab = |what: &str| {
        stderr
            .lines()
            .find(|l| l.contains(what))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(u64::MAX)
    };
    (grab("packets captured"), grab("dropped by kernel"))
}

fn prop_u64(bed: &bed::Bed, obj: &str, name: &str) -> u64 {
    bed.busctl(&["get-property", bed::BUS_NAME, obj, CAPTURE, name])
        .expect_ok(name)
        .json_data()
        .as_u64()
        .expect("t")
}

struct Row {
    rate: u64,
    sent: u64,
    ours: (u64, u64),
    theirs: (u64, u64),
}

/// What stays the same across rates.
struct Setup {
    target: Target,
    sender: Target,
    ns: String,
    dir: PathBuf,
    secs: f64,
    flooders: usize,
    size: usize,
}

fn one_rate(bed: &bed::Bed, s: &Setup, rate: u64) -> Row {
    let Setup {
        target,
        sender,
        ref ns,
        ref dir,
        secs,
        flooders,
        size,
    } = *s;
    let tfile: PathBuf = dir.join(format!("tcpdump-{rate}.pcap"));
    let mut td = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .args(["tcpdump", "-Z", "root", "-B", "4096", "-i", "any", "-w"])
        .arg(&tfile)
        .args(["udp", "port", "9999"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpdump");
    // tcpdump says "listening on" once its socket is up; collect its stderr meanwhile.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let mut err = td.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut all = String::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 {
                break;
            }
            all.push_str(&String::from_utf8_lossy(&buf[..n]));
            let _ = tx.send(all.clone());
        }
        all
    });
    let t0 = Instant::now();
    loop {
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(s) if s.contains("listening on") => break,
            Ok(_) => {}
            Err(e) => panic!("tcpdump did not start listening: {e}"),
        }
        assert!(t0.elapsed() < Duration::from_secs(10));
    }
    let duration = (secs + 30.0).ceil() as u64;
    let out = bed
        .busctl(&[
            "call",
            bed::BUS_NAME,
            bed::MANAGER_PATH,
            "org.dindhelper1.Captures",
            "StartCapture",
            "sa{sv}",
            &format!("pid:{}", target.pid),
            "3",
            "filter",
            "s",
            "udp port 9999",
            "duration",
            "u",
            &duration.to_string(),
            "name",
            "s",
            &format!("bench-{rate}-{}", std::process::id()),
        ])
        .expect_ok("StartCapture");
    let d = out.json_data();
    let obj = d[0].as_str().unwrap().to_owned();
    let path = d[1].as_str().unwrap().to_owned();
    // StartCapture returns once the socket is bound: both listen before the first packet.
    let senders: Vec<_> = (0..flooders)
        .map(|_| std::thread::spawn(move || flood(sender, rate, secs, size)))
        .collect();
    let sent: u64 = senders.into_iter().map(|h| h.join().unwrap()).sum();
    std::thread::sleep(Duration::from_millis(300));
    bed.busctl(&["call", bed::BUS_NAME, &obj, CAPTURE, "Stop", "a{sv}", "0"])
        .expect_ok("Stop");
    let ours = (
        prop_u64(bed, &obj, "Packets"),
        prop_u64(bed, &obj, "Dropped"),
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(td.id() as i32, libc::SIGINT) };
    td.wait().expect("tcpdump exit");
    let theirs = tcpdump_counts(&reader.join().unwrap());
    let _ = std::fs::remove_file(&tfile);
    let _ = std::fs::remove_file(&path);
    Row {
        rate,
        sent,
        ours,
        theirs,
    }
}

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let env = |k: &str| std::env::var(k).ok();
    let rates: Vec<u64> = env("DH_BENCH_RATES")
        .unwrap_or_else(|| {
            if bench_mode {
                "20000 50000 100000 200000 0".into()
            } else {
                "2000".into()
            }
        })
        .split_whitespace()
        .map(|s| s.parse().expect("rate"))
        .collect();
    let secs: f64 = env("DH_BENCH_SECS")
        .and_then(|s| s.parse().ok())
        .unwrap_or(if bench_mode { 3.0 } else { 0.5 });
    let flooders: usize = env("DH_BENCH_FLOODERS")
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let size: usize = env("DH_BENCH_SIZE")
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    for tool in ["tcpdump", "nsenter", "ip"] {
        assert!(
            Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {tool} >/dev/null"))
                .status()
                .unwrap()
                .success(),
            "{tool} is required (apt-get install tcpdump iproute2 util-linux)"
        );
    }
    // The bed's daemon logs at debug; a benchmark measures the production level.
    std::env::set_var("RUST_LOG", "info");
    let bed = bed::Bed::setup(true).unwrap_or_else(|e| panic!("test bed: {e}"));
    bed.start_daemon()
        .unwrap_or_else(|e| panic!("daemon: {e}\n{}", bed.daemon_log()));
    let mut net = Net::new();
    let target = net.sleeper(&net.a.clone());
    let sender = net.sleeper(&net.b.clone());
    let dir = bed.scratch("capture-bench");
    std::fs::create_dir_all(&dir).unwrap();

    let setup = Setup {
        target,
        sender,
        ns: net.a.clone(),
        dir,
        secs,
        flooders,
        size,
    };
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        println!(
            "capture under a UDP flood ({size}-byte payload, {flooders} sender(s), {secs} s per rate; \
             dindhelperd via D-Bus StartCapture vs tcpdump -i any -B 4096, same traffic)"
        );
        println!(
            "{:>8} {:>9} | {:>22} | {:>22} | goal",
            "rate", "sent", "dindhelperd cap/drop", "tcpdump cap/drop"
        );
        let mut ok = true;
        for &rate in &rates {
            let row = one_rate(&bed, &setup, rate);
            let met = row.ours.1 <= row.theirs.1;
            ok &= met;
            println!(
                "{:>8} {:>9} | {:>11} / {:>8} | {:>11} / {:>8} | {}",
                if row.rate == 0 {
                    "max".to_owned()
                } else {
                    row.rate.to_string()
                },
                row.sent,
                row.ours.0,
                row.ours.1,
                row.theirs.0,
                row.theirs.1,
                if met { "ok" } else { "MORE DROPS" }
            );
        }
        println!(
            "goal (no more kernel drops than tcpdump at every rate): {}",
            if ok { "met" } else { "NOT met" }
        );
    }));
    drop(net);
    for e in bed.teardown() {
        eprintln!("teardown: {e}");
    }
    if let Err(e) = r {
        std::panic::resume_unwind(e);
    }
}
