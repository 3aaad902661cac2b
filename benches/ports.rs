//! Benchmark: publishing N = 10, 100, 1000 ports through the daemon over D-Bus, beside the
//! docker-style way (one `iptables` process per rule), measured in the same run on the
//! same chains.
//!
//! Run (root): `cargo bench --bench ports` (add `-- 10 100` for other N;
//! `DHR_BENCH_ONLY=nftables` for the nftables tables alone). Without
//! `--bench` in argv (`cargo test --all-targets`) it only does a quick smoke check of the
//! batch builder and exits.
//!
//! Set-up: a real dockerd in its own netns (`tests/common/dockerd.rs`, helper tag `dhr`)
//! with one busybox httpd container, a private dbus-daemon (no polkitd: the caller is
//! root, whom the daemon allows when polkit cannot be asked — the polkit round trip is
//! therefore not in these numbers), and `dindhelperd` started inside dockerd's netns with
//! `--docker-host`. Every way writes the same 3 rules per port (nat DOCKER DNAT, filter
//! DOCKER ACCEPT, nat POSTROUTING MASQUERADE) into iptables-nft in that netns:
//! - `PublishMany`: one D-Bus call carrying N ports → one `iptables-restore` batch;
//! - `N×Publish`: N Publish calls on one connection, 50 outstanding at a time (a bus caps
//!   the replies one connection may wait for: `max_replies_per_connection`, 128 on the
//!   system bus); the daemon coalesces the calls that wait into shared batches (group
//!   commit);
//! - docker-style: 3N `iptables -w -t … -A/-I …` processes, one after the other.
//!
//! Between measurements every rule is removed again (not timed), so each starts from
//! the same chains.

#[path = "../tests/common/dockerd.rs"]
mod dockerd;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dindhelper::ports::{rules, NetnsContext, Protocol, RuleSpec};
use zbus::zvariant::{OwnedObjectPath, Value};

const BUS_NAME: &str = "org.dindhelper1";
const PATH: &str = "/org/dindhelper1";
const IFACE: &str = "org.dindhelper1.Ports";
const BASE_PORT: u16 = 20000;
/// Publish calls outstanding at once in the N×Publish way.
const IN_FLIGHT: usize = 50;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        smoke();
        return;
    }
    let ns: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let ns = if ns.is_empty() {
        vec![10, 100, 1000]
    } else {
        ns
    };
    assert!(
        nix::unistd::geteuid().is_root(),
        "the ports benchmark needs root (dockerd, netns, iptables)"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio");
    rt.block_on(bench(&ns));
}

/// `cargo test --all-targets`: check the batch for 10 ports renders 30 rule lines and no
/// chain declaration, in well under a second, without root.
fn smoke() {
    let specs: Vec<RuleSpec> = (0..10)
        .map(|i| RuleSpec {
            id: format!("{i:016x}"),
            protocol: Protocol::Tcp,
            host_ip: None,
            host_port: BASE_PORT + i,
            container_ip: "172.17.0.2".parse().unwrap(),
            container_ip6: None,
            container_port: 80,
            bridge: "docker0".into(),
        })
        .collect();
    let text = rules::add_batch(&specs, "0bench0").render();
    let adds = text
        .lines()
        .filter(|l| l.starts_with("-A") || l.starts_with("-I"))
        .count();
    assert_eq!(adds, 30, "{text}");
    assert!(!text.lines().any(|l| l.starts_with(':')));
    println!("ports bench smoke: ok (run `cargo bench --bench ports` as root to measure)");
}

struct Bus {
    child: Child,
    dir: PathBuf,
    address: String,
}

impl Bus {
    fn start(dir: &Path) -> Bus {
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("bus");
        let conf = dir.join("bus.conf");
        std::fs::write(
            &conf,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>system</type><listen>unix:path={}</listen><auth>EXTERNAL</auth>
<policy context="default"><allow user="*"/><allow own="*"/>
<allow send_destination="*"/><allow receive_sender="*"/></policy></busconfig>
"#,
                socket.display()
            ),
        )
        .unwrap();
        let mut child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", conf.display()))
            .args(["--nofork", "--print-pid", "--nopidfile"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("dbus-daemon");
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(!line.trim().is_empty(), "dbus-daemon did not start");
        Bus {
            child,
            dir: dir.to_owned(),
            address: format!("unix:path={}", socket.display()),
        }
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        stop(&mut self.child);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn stop(child: &mut Child) {
    // SAFETY: kill(2) on a child we started.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

struct Daemon {
    child: Child,
    state: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        stop(&mut self.child);
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

async fn bench(ns: &[usize]) {
    let pid = std::process::id();
    let d = dockerd::Dockerd::start_tagged("dhr", false);
    d.run_web("web", "/www", &[]);
    let ip = d.ip_of("web");
    let bus = Bus::start(Path::new(&format!("/run/dhr-bench-{pid}")));
    let state = PathBuf::from(format!("/var/tmp/dhr-bench-{pid}-state"));
    // DHR_BENCH_LOG=FILE keeps the daemon's log there (RUST_LOG sets its filter)
    let log_path = std::env::var_os("DHR_BENCH_LOG")
        .map(PathBuf::from)
        .unwrap_or_else(|| bus.dir.join("daemon.log"));
    let _ = std::fs::remove_file(&log_path);
    let daemon = spawn_daemon(&d, &bus, &state, &log_path, false);
    let conn = connect(&bus, &log_path).await;
    let netns = NetnsContext::open(&d.ns_path()).expect("dockerd netns");

    println!("publishing N ports to {ip}:80 (3 rules per port), iptables-nft in dockerd's netns");
    println!(
        "{:>6} | {:>22} | {:>22} | {:>26} | {:>8} {:>8}",
        "N",
        "PublishMany total/port",
        "N×Publish total/port",
        "docker-style total/port",
        "ratio 1",
        "ratio N"
    );
    let mut cpu_single: Vec<(usize, Vec<u64>)> = Vec::new();
    // DHR_BENCH_ONLY=nftables: the nftables tables alone (quicker, for profiling)
    let only_nft = std::env::var("DHR_BENCH_ONLY").is_ok_and(|v| v == "nftables");
    for &n in ns.iter().filter(|_| !only_nft) {
        // docker-style
        assert_eq!(count_rules(&d, "dhr-bench"), 0);
        let t = Instant::now();
        for i in 0..n {
            docker_style(&netns, BASE_PORT + i as u16, &ip).await;
        }
        let docker = t.elapsed();
        assert_eq!(count_rules(&d, "dhr-bench"), 3 * n);
        remove_marked(&netns, &d, "dhr-bench").await;

        // one PublishMany
        let entries: Vec<(String, String, u16, u16)> = (0..n)
            .map(|i| ("web".into(), "tcp".into(), BASE_PORT + i as u16, 80u16))
            .collect();
        let opts: HashMap<&str, Value<'_>> = HashMap::new();
        let t = Instant::now();
        let reply = conn
            .call_method(
                Some(BUS_NAME),
                PATH,
                Some(IFACE),
                "PublishMany",
                &(entries, opts),
            )
            .await
            .expect("PublishMany");
        let many = t.elapsed();
        let paths: Vec<OwnedObjectPath> = reply.body().deserialize().unwrap();
        assert_eq!(paths.len(), n);
        assert_eq!(count_rules(&d, "dindhelper:"), 3 * n);
        unpublish_all(&conn, &d).await;

        // N Publish calls at once on one connection
        let t = Instant::now();
        let cpu0 = cpu_ms(&[daemon.child.id(), bus.child.id(), d.pid().unwrap_or(0)]);
        // at most IN_FLIGHT calls outstanding: a bus caps the replies one connection may
        // wait for (max_replies_per_connection, 128 on the system bus)
        let window = std::sync::Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
        let calls: Vec<_> = (0..n)
            .map(|i| {
                let conn = conn.clone();
                let window = window.clone();
                tokio::spawn(async move {
                    let _slot = window.acquire_owned().await.expect("semaphore");
                    let opts: HashMap<&str, Value<'_>> = HashMap::new();
                    conn.call_method(
                        Some(BUS_NAME),
                        PATH,
                        Some(IFACE),
                        "Publish",
                        &("web", "tcp", BASE_PORT + i as u16, 80u16, opts),
                    )
                    .await
                    .map(|_| ())
                })
            })
            .collect();
        let mut results = Vec::with_capacity(n);
        for c in calls {
            results.push(c.await.expect("task"));
        }
        let single = t.elapsed();
        let cpu1 = cpu_ms(&[daemon.child.id(), bus.child.id(), d.pid().unwrap_or(0)]);
        cpu_single.push((
            n,
            cpu1.iter()
                .zip(&cpu0)
                .map(|(a, b)| a - b)
                .collect::<Vec<_>>(),
        ));
        let errs: Vec<String> = results
            .iter()
            .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
            .collect();
        assert!(
            errs.is_empty(),
            "{} of {n} Publish calls failed, first: {}",
            errs.len(),
            errs[0]
        );
        assert_eq!(count_rules(&d, "dindhelper:"), 3 * n);
        unpublish_all(&conn, &d).await;

        print_row(n, &[many, single], docker);
    }
    println!("ratio 1 = docker-style / PublishMany; ratio N = docker-style / N×Publish");
    for (n, c) in cpu_single {
        println!(
            "CPU during N×Publish, N = {n}: dindhelperd {} ms, dbus-daemon {} ms, dockerd {} ms \
             (children such as iptables-restore not included)",
            c[0], c[1], c[2]
        );
    }
    drop(conn);
    drop(daemon);

    // Docker 29's nftables backend: Docker's table (moby's new-daemon layout with the
    // --bridge-accept-fwmark rule) beside dockerd 20.10's chains, and a fresh daemon,
    // which then detects the nftables backend (the container facts still come from the
    // real dockerd)
    let fixture = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/docker-layouts/nftables-v29/new-daemon.nft"
    ))
    .unwrap()
    .replace("hook output priority dstnat", "hook output priority -100")
    .replace(
        "\t\tiifname \"docker0\" counter accept comment \"ICC\"",
        "\t\tmeta mark & 0x00000003 == 0x00000002 counter accept comment \"ALLOW FW MARK\"\n\t\tiifname \"docker0\" counter accept comment \"ICC\"",
    );
    nft(&netns, &["-f", "-"], Some(&fixture)).await;
    for program in [false, true] {
        let state2 = PathBuf::from(format!("/var/tmp/dhr-bench-{pid}-state-nft{program}"));
        let daemon = spawn_daemon(&d, &bus, &state2, &log_path, program);
        let conn = connect(&bus, &log_path).await;
        nft_table(&conn, &bus.address, &netns, ns, &ip).await;
        drop(conn);
        drop(daemon);
    }
    nft(&netns, &["delete", "table", "ip", "docker-bridges"], None).await;
    drop(bus);
    drop(d);
}

const CALLERS: usize = 10;

/// The nftables rows: PublishMany, N×Publish (one connection, 50 outstanding), N×Publish
/// from 10 callers (10 connections, each its share one call after the other) and
/// docker-style (one `nft -f -` process per port with its DNAT and accept rules, as
/// dockerd applies each port binding).
async fn nft_table(
    conn: &zbus::Connection,
    address: &str,
    netns: &NetnsContext,
    ns: &[usize],
    ip: &str,
) {
    let fw = ports_prop(conn, "FirewallBackend").await;
    println!();
    let reason = ports_prop(conn, "FirewallBackendReason").await;
    let via = if reason.contains("through libnftables") {
        "libnftables in process"
    } else {
        "the nft program"
    };
    println!("nftables backend (Docker 29 table ip docker-bridges with an accept mark; FirewallBackend {fw:?}), written through {via}: one map element per port");
    println!(
        "{:>6} | {:>22} | {:>22} | {:>22} | {:>26} | {:>8} {:>8}",
        "N",
        "PublishMany total/port",
        "N×Publish total/port",
        "10 callers total/port",
        "docker-style total/port",
        "ratio 1",
        "ratio N"
    );
    let mut conns: Vec<zbus::Connection> = Vec::new();
    for _ in 0..CALLERS {
        conns.push(
            zbus::connection::Builder::address(address)
                .unwrap()
                .build()
                .await
                .expect("connect to the private bus"),
        );
    }
    for &n in ns {
        // docker-style
        nft(
            netns,
            &["-f", "-"],
            Some(
                "add table ip dhr-bench\n\
                 add chain ip dhr-bench pre { type nat hook prerouting priority -100; }\n\
                 add chain ip dhr-bench fwdin { type filter hook forward priority 0; }\n",
            ),
        )
        .await;
        let t = Instant::now();
        for i in 0..n {
            let port = BASE_PORT + i as u16;
            let text = format!(
                "add rule ip dhr-bench pre iifname != \"docker0\" tcp dport {port} counter dnat to {ip}:80 comment \"DNAT\"\n\
                 add rule ip dhr-bench fwdin ip daddr {ip} tcp dport 80 counter accept\n"
            );
            nft(netns, &["-f", "-"], Some(&text)).await;
        }
        let docker = t.elapsed();
        nft(netns, &["delete", "table", "ip", "dhr-bench"], None).await;

        // one PublishMany
        let entries: Vec<(String, String, u16, u16)> = (0..n)
            .map(|i| ("web".into(), "tcp".into(), BASE_PORT + i as u16, 80u16))
            .collect();
        let opts: HashMap<&str, Value<'_>> = HashMap::new();
        let t = Instant::now();
        conn.call_method(
            Some(BUS_NAME),
            PATH,
            Some(IFACE),
            "PublishMany",
            &(entries, opts),
        )
        .await
        .expect("PublishMany");
        let many = t.elapsed();
        assert_eq!(count_elems(netns).await, n);
        unpublish_all_nft(conn, netns).await;

        // N Publish calls, 50 outstanding on one connection
        let t = Instant::now();
        let window = std::sync::Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
        let calls: Vec<_> = (0..n)
            .map(|i| {
                let conn = conn.clone();
                let window = window.clone();
                tokio::spawn(async move {
                    let _slot = window.acquire_owned().await.expect("semaphore");
                    publish_one(&conn, BASE_PORT + i as u16).await
                })
            })
            .collect();
        for c in calls {
            c.await.expect("task").expect("Publish");
        }
        let single = t.elapsed();
        assert_eq!(count_elems(netns).await, n);
        unpublish_all_nft(conn, netns).await;

        // 10 callers, each its share one after the other
        let t = Instant::now();
        let callers: Vec<_> = conns
            .iter()
            .enumerate()
            .map(|(c, conn)| {
                let conn = conn.clone();
                tokio::spawn(async move {
                    let mut i = c;
                    while i < n {
                        publish_one(&conn, BASE_PORT + i as u16).await?;
                        i += CALLERS;
                    }
                    Ok::<_, zbus::Error>(())
                })
            })
            .collect();
        for c in callers {
            c.await.expect("task").expect("Publish");
        }
        let ten = t.elapsed();
        assert_eq!(count_elems(netns).await, n);
        unpublish_all_nft(conn, netns).await;

        print_row(n, &[many, single, ten], docker);
    }
    println!("ratio 1 = docker-style / PublishMany; ratio N = docker-style / N×Publish; goal: 1000 calls from 10 callers <= 300 ms");
}

/// One table row: N, then total and per-port time of each way, docker-style, and the
/// ratios docker-style / PublishMany (`ways[0]`) and docker-style / N×Publish (`ways[1]`).
fn print_row(n: usize, ways: &[Duration], docker: Duration) {
    let ms = |x: Duration| x.as_secs_f64() * 1000.0;
    let mut row = format!("{n:>6} |");
    for &w in ways {
        row += &format!(" {:>10.1} ms {:>6.3} ms |", ms(w), ms(w) / n as f64);
    }
    row += &format!(
        " {:>12.1} ms {:>8.3} ms |",
        ms(docker),
        ms(docker) / n as f64
    );
    for &w in &ways[..2] {
        row += &format!(" {:>7.1}×", docker.as_secs_f64() / w.as_secs_f64());
    }
    println!("{row}");
}

/// A string property of the Ports interface ("" when it cannot be read).
async fn ports_prop(conn: &zbus::Connection, name: &str) -> String {
    conn.call_method(
        Some(BUS_NAME),
        PATH,
        Some("org.freedesktop.DBus.Properties"),
        "Get",
        &(IFACE, name),
    )
    .await
    .map(|r| {
        r.body()
            .deserialize::<zbus::zvariant::OwnedValue>()
            .ok()
            .and_then(|v| String::try_from(v).ok())
            .unwrap_or_default()
    })
    .unwrap_or_default()
}

async fn publish_one(conn: &zbus::Connection, port: u16) -> Result<(), zbus::Error> {
    let opts: HashMap<&str, Value<'_>> = HashMap::new();
    conn.call_method(
        Some(BUS_NAME),
        PATH,
        Some(IFACE),
        "Publish",
        &("web", "tcp", port, 80u16, opts),
    )
    .await
    .map(|_| ())
}

/// `nft ARGS` in dockerd's netns (panics on failure).
async fn nft(netns: &NetnsContext, args: &[&str], stdin: Option<&str>) -> String {
    use tokio::io::AsyncWriteExt;
    let mut child = netns
        .command(Path::new("/usr/sbin/nft"))
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .spawn()
        .expect("nft");
    if let Some(text) = stdin {
        let mut si = child.stdin.take().unwrap();
        si.write_all(text.as_bytes()).await.unwrap();
    }
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success(), "nft {args:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Map elements in the daemon's table (0 when it has none).
async fn count_elems(netns: &NetnsContext) -> usize {
    let tables = nft(netns, &["list", "tables"], None).await;
    let Some(t) = tables
        .lines()
        .find_map(|l| l.trim().strip_prefix("table ip dindhelper-"))
    else {
        return 0;
    };
    let out = nft(
        netns,
        &[
            "-j",
            "list",
            "map",
            "ip",
            &format!("dindhelper-{t}"),
            "dnat4",
        ],
        None,
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i.pointer("/map/elem").and_then(|e| e.as_array()))
        .map(Vec::len)
        .sum()
}

async fn unpublish_all_nft(conn: &zbus::Connection, netns: &NetnsContext) {
    let opts: HashMap<&str, Value<'_>> = HashMap::new();
    conn.call_method(
        Some(BUS_NAME),
        PATH,
        Some(IFACE),
        "UnpublishContainer",
        &("web", opts),
    )
    .await
    .expect("UnpublishContainer");
    assert_eq!(count_elems(netns).await, 0);
}

fn spawn_daemon(
    d: &dockerd::Dockerd,
    bus: &Bus,
    state: &Path,
    log_path: &Path,
    nft_program: bool,
) -> Daemon {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .unwrap();
    let mut cmd = Command::new("nsenter");
    if nft_program {
        cmd.env("DINDHELPER_NFT_PROGRAM", "1");
    }
    Daemon {
        child: cmd
            .arg(format!("--net={}", d.ns_path().display()))
            .arg(env!("CARGO_BIN_EXE_dindhelperd"))
            .arg("--bus-address")
            .arg(&bus.address)
            .arg("--state-dir")
            .arg(state)
            .arg("--docker-host")
            .arg(format!("unix://{}", d.socket.display()))
            .args(["--log-level", "warn"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("dindhelperd"),
        state: state.to_owned(),
    }
}

/// A connection to the private bus once dindhelperd owns its name.
async fn connect(bus: &Bus, log_path: &Path) -> zbus::Connection {
    let conn = zbus::connection::Builder::address(bus.address.as_str())
        .unwrap()
        .build()
        .await
        .expect("connect to the private bus");
    let dbus = zbus::fdo::DBusProxy::new(&conn).await.unwrap();
    let t = Instant::now();
    while !dbus
        .name_has_owner(BUS_NAME.try_into().unwrap())
        .await
        .unwrap_or(false)
    {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "dindhelperd did not come up; see {}",
            log_path.display()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    conn
}

/// utime + stime of each pid in ms (0 for a pid that is gone).
fn cpu_ms(pids: &[u32]) -> Vec<u64> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    pids.iter()
        .map(|p| {
            let s = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            let rest = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
            let f: Vec<u64> = rest
                .split_whitespace()
                .map(|x| x.parse().unwrap_or(0))
                .collect();
            // fields after the comm: state is [0], utime [11], stime [12]
            (f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)) * 1000 / hz
        })
        .collect()
}

/// What `docker run -p` writes for one port, one process per rule (tagged so the bench
/// can remove them afterwards; the comment match costs the same in every way).
async fn docker_style(netns: &NetnsContext, port: u16, ip: &str) {
    let p = port.to_string();
    let dest = format!("{ip}:80");
    let ip32 = format!("{ip}/32");
    let rules: [Vec<&str>; 3] = [
        vec![
            "-t",
            "nat",
            "-A",
            "DOCKER",
            "!",
            "-i",
            "docker0",
            "-p",
            "tcp",
            "-m",
            "tcp",
            "--dport",
            &p,
            "-j",
            "DNAT",
            "--to-destination",
            &dest,
        ],
        vec![
            "-t", "filter", "-I", "DOCKER", "-d", &ip32, "!", "-i", "docker0", "-o", "docker0",
            "-p", "tcp", "-m", "tcp", "--dport", "80", "-j", "ACCEPT",
        ],
        vec![
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            &ip32,
            "-d",
            &ip32,
            "-p",
            "tcp",
            "-m",
            "tcp",
            "--dport",
            "80",
            "-j",
            "MASQUERADE",
        ],
    ];
    for r in rules {
        let st = netns
            .command(Path::new("/usr/sbin/iptables-nft"))
            .arg("-w")
            .args(&r)
            .args(["-m", "comment", "--comment", "dhr-bench"])
            .status()
            .await
            .expect("iptables-nft");
        assert!(st.success(), "iptables-nft {r:?}");
    }
}

/// Rules whose line contains `mark` (nat + filter) in dockerd's netns.
fn count_rules(d: &dockerd::Dockerd, mark: &str) -> usize {
    let out = d.in_ns(&["iptables-nft-save"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("-A") && l.contains(mark))
        .count()
}

/// Delete the rules carrying `mark` with one iptables-restore batch (not timed).
async fn remove_marked(netns: &NetnsContext, d: &dockerd::Dockerd, mark: &str) {
    let out = d.in_ns(&["iptables-nft-save"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut batch = String::new();
    let mut table_lines: Vec<String> = Vec::new();
    let mut table = String::new();
    let flush = |table: &str, lines: &mut Vec<String>, batch: &mut String| {
        if !lines.is_empty() {
            batch.push_str(&format!("*{table}\n{}\nCOMMIT\n", lines.join("\n")));
            lines.clear();
        }
    };
    for l in text.lines() {
        if let Some(t) = l.strip_prefix('*') {
            flush(&table, &mut table_lines, &mut batch);
            table = t.to_owned();
        } else if l.starts_with("-A") && l.contains(mark) {
            table_lines.push(l.replacen("-A", "-D", 1));
        }
    }
    flush(&table, &mut table_lines, &mut batch);
    use tokio::io::AsyncWriteExt;
    let mut child = netns
        .command(Path::new("/usr/sbin/iptables-nft-restore"))
        .args(["-w", "--noflush"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("iptables-nft-restore");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(batch.as_bytes()).await.unwrap();
    drop(stdin);
    assert!(child.wait().await.unwrap().success(), "cleanup restore");
    assert_eq!(count_rules(d, mark), 0);
}

async fn unpublish_all(conn: &zbus::Connection, d: &dockerd::Dockerd) {
    let opts: HashMap<&str, Value<'_>> = HashMap::new();
    conn.call_method(
        Some(BUS_NAME),
        PATH,
        Some(IFACE),
        "UnpublishContainer",
        &("web", opts),
    )
    .await
    .expect("UnpublishContainer");
    assert_eq!(count_rules(d, "dindhelper:"), 0);
}
