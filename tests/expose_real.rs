//! Real ExposeToContainer domain test: its own dockerd in netns `dhc-dkt` (TESTBED.md recipe,
//! busybox-static image), a partitioned loop device, nodes made inside the container.
//! Needs root, docker.io, busybox-static, sfdisk, partx, losetup. Fails when one is missing.

use std::process::Command;
use std::time::Duration;

use dindhelper::error::{Classify, Kind};
use dindhelper::expose::{self, Container, ExposeRequest, Grant, Revoked};
use dindhelper::netns::Target;

const NS: &str = "dhc-dkt";
const DIR: &str = "/run/dhc-dkt";
const DATA: &str = "/var/tmp/dhc-dkt-data";
const IMG: &str = "/var/tmp/dhc-dkt.img";

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    assert!(
        out.status.success(),
        "{cmd}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn docker(args: &str) -> String {
    sh(&format!("docker -H unix://{DIR}/docker.sock {args}"))
}

struct Fixture {
    dockerd: Option<std::process::Child>,
    loopdev: Option<String>,
}

impl Fixture {
    fn new() -> Fixture {
        assert!(nix::unistd::geteuid().is_root(), "expose_real needs root");
        for tool in [
            "dockerd", "docker", "busybox", "sfdisk", "partx", "losetup", "nsenter",
        ] {
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
        let _ = Command::new("ip").args(["netns", "del", NS]).status();
        sh(&format!(
            "rm -rf {DIR} && mkdir -p {DIR}/r/bin {DIR}/r/dev && cp $(command -v busybox) {DIR}/r/bin/ && \
             mkdir -p {DIR}/r/www && echo hello > {DIR}/r/www/index.html && \
             for a in sh sleep dd cat ls httpd; do ln -sf busybox {DIR}/r/bin/$a; done && \
             ip netns add {NS} && ip -n {NS} link set lo up"
        ));
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{NS}"))
            .args(["dockerd", "--data-root", DATA, "--exec-root"])
            .arg(format!("{DIR}/x"))
            .arg("--pidfile")
            .arg(format!("{DIR}/pid"))
            .arg("-H")
            .arg(format!("unix://{DIR}/docker.sock"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(format!("{DIR}/log")).unwrap())
            .spawn()
            .unwrap();
        let mut f = Fixture {
            dockerd: Some(child),
            loopdev: None,
        };
        for i in 0..100 {
            let ok = Command::new("docker")
                .args(["-H", &format!("unix://{DIR}/docker.sock"), "info"])
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                break;
            }
            assert!(
                i < 99,
                "dockerd did not come up: {}",
                std::fs::read_to_string(format!("{DIR}/log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        sh(&format!(
            "tar -C {DIR}/r -c . | docker -H unix://{DIR}/docker.sock import - dhcbb:latest"
        ));
        f.loopdev = None;
        f
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "docker -H unix://{DIR}/docker.sock rm -f dhc-exp >/dev/null 2>&1"
            ))
            .status();
        if let Some(mut child) = self.dockerd.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::SIGTERM);
            let _ = child.wait();
        }
        if let Some(l) = self.loopdev.take() {
            let _ = Command::new("partx").args(["-d", &l]).status();
            let _ = Command::new("losetup").args(["-d", &l]).status();
        }
        let _ = Command::new("ip").args(["netns", "del", NS]).status();
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "umount {DIR}/x/netns/* 2>/dev/null; rm -rf {DIR} {DATA} {IMG}"
            ))
            .status();
    }
}

static DOCKER: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn capture_in_a_container_survives_its_death() {
    let _g = DOCKER.lock().unwrap_or_else(|e| e.into_inner());
    let _fx = Fixture::new();
    docker("run -d --name dhc-exp dhcbb:latest /bin/httpd -f -p 80 -h /www");
    let pid: i32 = docker("inspect -f '{{.State.Pid}}' dhc-exp")
        .parse()
        .unwrap();
    let ip = docker("inspect -f '{{.NetworkSettings.IPAddress}}' dhc-exp");
    let file = format!("{DIR}/c.pcap");
    let h = dindhelper::capture::start(
        Target::of_pid(pid).unwrap(),
        dindhelper::capture::CaptureOptions {
            filter: Some("tcp port 80".into()),
            ..Default::default()
        },
        std::fs::File::create(&file).unwrap(),
    )
    .unwrap();
    for _ in 0..5 {
        sh(&format!(
            "nsenter --net=/run/netns/{NS} curl -sf -m 3 http://{ip}/ >/dev/null"
        ));
    }
    std::thread::sleep(Duration::from_millis(200));
    docker("kill dhc-exp");
    let fin = h.wait();
    assert_eq!(fin.reason, dindhelper::capture::Reason::TargetExited);
    let out = sh(&format!("tcpdump -nn -r {file} 2>/dev/null"));
    assert_eq!(out.matches("HTTP: GET / HTTP/1.1").count(), 5, "{out}");
    assert_eq!(out.lines().count() as u64, fin.stats.packets);
}

#[test]
fn expose_creates_partition_nodes_usable_inside_and_removes_stale_ones() {
    let _g = DOCKER.lock().unwrap_or_else(|e| e.into_inner());
    let mut fx = Fixture::new();
    docker("run -d --name dhc-exp dhcbb:latest /bin/sleep 100000");
    let pid: i32 = docker("inspect -f '{{.State.Pid}}' dhc-exp")
        .parse()
        .unwrap();
    let target = Target::of_pid(pid).unwrap();

    sh(&format!(
        "rm -f {IMG} && truncate -s 48M {IMG} && printf 'label: dos\\n,8M\\n,8M\\n' | sfdisk -q {IMG}"
    ));
    let l = sh(&format!("losetup -f --show {IMG}"));
    fx.loopdev = Some(l.clone());
    sh(&format!("partx -a {l}"));
    let disk = l.trim_start_matches("/dev/").to_owned();

    let (d, parts) = expose::host_nodes(&disk).unwrap();
    assert_eq!(parts.len(), 2, "{parts:?}");
    assert_eq!(d.major, 7);
    let id = docker("inspect -f '{{.Id}}' dhc-exp");
    let req =
        |d: &expose::DeviceNode, parts: &[expose::DeviceNode], prev: Option<expose::Exposure>| {
            ExposeRequest {
                container: Container {
                    target,
                    id: id.clone(),
                    name: "dhc-exp".into(),
                },
                disk: d.clone(),
                partitions: parts.to_vec(),
                alias: None,
                previous: prev,
                other_grants: vec![],
                v2_fallback: None,
                backing_dev: 0,
                backing_inode: 0,
            }
        };
    let (exp, rep) = expose::expose(req(&d, &parts, None)).unwrap();
    eprintln!("{rep:?}");
    assert_eq!(rep.created.len(), 3);
    match &exp.grant {
        Grant::V1 { .. } => assert!(exp.rules.contains(&format!("b 7:{} rwm", d.minor))),
        other => panic!("this machine runs containers on cgroup v1: {other:?}"),
    }
    // inside: the node exists with 0660 and the container can write a marker to p2
    let ls = docker(&format!("exec dhc-exp ls -l /dev/{disk}p2"));
    assert!(ls.starts_with("brw-rw----"), "{ls}");
    docker(&format!(
        "exec dhc-exp sh -c 'echo DHC-MARKER-42 | dd of=/dev/{disk}p2 bs=512 count=1 conv=sync 2>/dev/null'"
    ));
    let back = sh(&format!(
        "dd if={l}p2 bs=512 count=1 2>/dev/null | tr -d '\\0'"
    ));
    assert!(back.contains("DHC-MARKER-42"), "{back:?}");

    // again: idempotent
    let (exp, rep) = expose::expose(req(&d, &parts, Some(exp))).unwrap();
    assert_eq!(rep.unchanged.len(), 3, "{rep:?}");

    // delete partition 2 on the host, expose again -> the node is gone inside and denied
    sh(&format!("partx -d --nr 2 {l}"));
    let (d, parts) = expose::host_nodes(&disk).unwrap();
    assert_eq!(parts.len(), 1);
    let (exp, rep) = expose::expose(req(&d, &parts, Some(exp))).unwrap();
    assert_eq!(rep.removed, vec![format!("{disk}p2")]);
    assert_eq!(rep.denied.len(), 1, "{rep:?}");
    let out = Command::new("docker")
        .args([
            "-H",
            &format!("unix://{DIR}/docker.sock"),
            "exec",
            "dhc-exp",
            "ls",
            &format!("/dev/{disk}p2"),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "node still there");

    // revoke: nodes gone, rules denied
    match expose::revoke(&exp, &[]).unwrap() {
        Revoked::Withdrawn { nodes, rules, .. } => {
            assert_eq!(nodes.len(), 2, "{nodes:?}");
            assert_eq!(rules.len(), 2, "{rules:?}");
        }
        other => panic!("{other:?}"),
    }
    let out = Command::new("docker")
        .args([
            "-H",
            &format!("unix://{DIR}/docker.sock"),
            "exec",
            "dhc-exp",
            "ls",
            &format!("/dev/{disk}"),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "node still there after revoke");

    // a container that exited: NotFound; revoking it is a no-op
    docker("rm -f dhc-exp");
    let e = expose::expose(req(&d, &parts, None)).unwrap_err();
    assert_eq!(e.kind(), Kind::NotFound, "{e}");
    assert_eq!(expose::revoke(&exp, &[]).unwrap(), Revoked::ContainerGone);
}

/// cgroup v2 on this host: its unified hierarchy enforces device programs. A process in a
/// test cgroup whose program is runc-like (Docker's and runc's default rules, deny by
/// default) cannot open a loop device; after the grant it opens exactly the granted minor
/// and not its neighbour; after the revoke it cannot open either. Each change replaces
/// the program (one attached at a time).
#[test]
fn v2_device_program_grants_exactly_and_revokes() {
    use dindhelper::expose::{bpf, cgroup_v2, program};
    assert!(nix::unistd::geteuid().is_root(), "needs root");
    let root = cgroup_v2::unified_root().expect("a cgroup2 mount (/sys/fs/cgroup/unified here)");
    let cg = root.join(format!("dh-v2-test-{}", std::process::id()));
    let files = [
        format!("/var/tmp/dh-v2-a-{}.img", std::process::id()),
        format!("/var/tmp/dh-v2-b-{}.img", std::process::id()),
    ];
    let mut loops = Vec::new();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for f in &files {
            sh(&format!("truncate -s 1M {f}"));
            loops.push(sh(&format!("losetup -f --show {f}")));
        }
        let mm = |l: &str| {
            let s = std::fs::read_to_string(format!(
                "/sys/class/block/{}/dev",
                l.trim_start_matches("/dev/")
            ))
            .unwrap();
            let (a, b) = s.trim().split_once(':').unwrap();
            (a.parse::<u32>().unwrap(), b.parse::<u32>().unwrap())
        };
        let (a, b) = (mm(&loops[0]), mm(&loops[1]));
        std::fs::create_dir(&cg).unwrap();
        // Opening `dev` from a shell moved into the cgroup: true when it worked.
        let can_open = |dev: &str| -> (bool, String) {
            let out = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "echo $$ > {}/cgroup.procs && exec dd if={dev} of=/dev/null bs=512 count=1 2>&1",
                    cg.display()
                ))
                .output()
                .unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
            )
        };
        let attached = || {
            let d = std::fs::File::open(&cg).unwrap();
            bpf::query(&d).unwrap().len()
        };
        let mut base = program::docker_defaults();
        base.extend(program::runc_defaults());
        // The "runtime's" program.
        assert_eq!(cgroup_v2::apply(&cg, &base, &[]).unwrap(), Some(0));
        let (ok, out) = can_open(&loops[0]);
        assert!(!ok && out.contains("Operation not permitted"), "{out}");
        assert!(
            can_open("/dev/null").0,
            "the runtime's defaults allow /dev/null"
        );

        let t = std::time::Instant::now();
        let grant = [program::DevRule::block(a.0, a.1)];
        assert_eq!(cgroup_v2::apply(&cg, &base, &grant).unwrap(), Some(1));
        eprintln!("v2 grant (load + attach + detach): {:?}", t.elapsed());
        assert_eq!(attached(), 1, "the old program was detached");
        let (ok, out) = can_open(&loops[0]);
        assert!(ok, "granted minor {a:?}: {out}");
        let (ok, out) = can_open(&loops[1]);
        assert!(
            !ok && out.contains("Operation not permitted"),
            "neighbour {b:?}: {out}"
        );

        let t = std::time::Instant::now();
        assert_eq!(cgroup_v2::apply(&cg, &base, &[]).unwrap(), Some(1));
        eprintln!("v2 revoke: {:?}", t.elapsed());
        assert_eq!(attached(), 1);
        let (ok, out) = can_open(&loops[0]);
        assert!(
            !ok && out.contains("Operation not permitted"),
            "after revoke: {out}"
        );
        assert!(can_open("/dev/null").0);
    }));
    let _ = std::fs::remove_dir(&cg);
    for l in &loops {
        let _ = Command::new("losetup").args(["-d", l]).status();
    }
    for f in &files {
        let _ = std::fs::remove_file(f);
    }
    if let Err(e) = r {
        std::panic::resume_unwind(e);
    }
}
