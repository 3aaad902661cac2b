//! Ports against a real dockerd (root). Each test starts its own dockerd in a netns
//! `dhp-<pid>-<n>-d`; the tests run one at a time (global lock) to spare the 2 cores.
//!
//! The domain API is called from the host process with a `NetnsContext` naming dockerd's
//! namespace: iptables children `setns()` into it before exec, /proc/net is read on a
//! thread that entered it. (The daemon itself runs inside that namespace and uses
//! `NetnsContext::current()`.) Nothing touches the host namespace's firewall.
//!
//! Run: `cargo test --test ports_real -- --nocapture` (prints the benchmark).

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::dockerd::Dockerd;
use dindhelper::docker::Docker;
use dindhelper::error::{Classify, Kind};
use dindhelper::ports::{self, MappingState, NetnsContext, PortsManager, PublishRequest};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The state id the test managers tag their rules with.
const OWNER: &str = "5eed0001";

fn manager(d: &Dockerd) -> Arc<PortsManager> {
    manager_owned(d, OWNER)
}

fn manager_owned(d: &Dockerd, owner: &str) -> Arc<PortsManager> {
    PortsManager::with_owner(
        Docker::new(&d.socket),
        NetnsContext::open(&d.ns_path()).expect("open dockerd netns"),
        owner,
    )
}

fn req(container: &str, host_port: u32, container_port: u32) -> PublishRequest {
    PublishRequest {
        container: container.into(),
        protocol: "tcp".into(),
        host_port,
        container_port,
        owner_uid: 1000,
        ..Default::default()
    }
}

async fn tagged(m: &PortsManager) -> Vec<ports::Tagged> {
    m.backend().await.unwrap().list_tagged().await.unwrap()
}

async fn wait_for<F: Fn() -> bool>(what: &str, timeout: Duration, f: F) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_reaches_container_and_unpublish_cuts_it() {
    let _s = SERIAL.lock().await;
    let d = Dockerd::start();
    d.run_web("web", "/www", &[]);
    let m = manager(&d);
    assert_eq!(d.curl(8080), None, "nothing published yet");

    let map = m.publish(req("web", 8080, 80)).await.expect("publish");
    assert_eq!(map.container_name, "web");
    assert!(matches!(map.state, MappingState::Active { ref bridge, .. } if bridge == "docker0"));
    assert_eq!(d.curl(8080).as_deref(), Some("hello"));
    assert_eq!(tagged(&m).await.len(), 3, "DNAT + MASQUERADE + ACCEPT");

    m.unpublish(&map.id).await.expect("unpublish");
    assert_eq!(d.curl(8080), None, "unpublished port still answers");
    assert_eq!(tagged(&m).await.len(), 0);
    assert!(m.mappings().is_empty());
    assert_eq!(
        m.unpublish(&map.id).await.unwrap_err().kind(),
        Kind::NotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_backend_and_host_ip() {
    let _s = SERIAL.lock().await;
    let d = Dockerd::start_with(true);
    d.run_web("web", "/www", &[]);
    let m = manager(&d);
    let fw = m.firewall().await.unwrap();
    println!("backend {}: {}", fw.name, fw.reason);
    assert_eq!(fw.name, "iptables-legacy");
    let map = m
        .publish(PublishRequest {
            host_ip: Some("10.99.0.1".into()),
            ..req("web", 8080, 80)
        })
        .await
        .unwrap();
    assert_eq!(d.curl(8080).as_deref(), Some("hello"));
    let t = tagged(&m).await;
    assert_eq!(t.len(), 3);
    assert!(t.iter().any(|r| r.text.contains("-d 10.99.0.1/32")));
    // legacy-save output round-trips: a second manager's reconcile sees them as right
    let m2 = manager(&d);
    m2.load(m.mappings()).await;
    let ds = m2.reconcile().await.unwrap();
    assert!(
        ds.iter().all(|x| x.action == ports::Action::Unchanged),
        "{ds:?}"
    );
    m2.unpublish(&map.id).await.unwrap();
    assert_eq!(tagged(&m).await.len(), 0);
    assert_eq!(d.curl(8080), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_named_and_write_nothing() {
    let _s = SERIAL.lock().await;
    let d = Dockerd::start();
    d.run_web("web", "/www", &[]);
    d.run_web("pub", "/www", &["-p", "9090:80"]);
    d.run_web("hostnet", "/www", &["--network", "host"]);
    d.run_web("stopped", "/www", &[]);
    d.docker_ok(&["stop", "-t", "1", "stopped"]);
    let m = manager(&d);
    let first = m.publish(req("web", 8080, 80)).await.unwrap();
    let before = tagged(&m).await.len();

    let cases: Vec<(&str, PublishRequest, Kind)> = vec![
        ("same host port", req("web", 8080, 81), Kind::Conflict),
        (
            "port published by docker -p",
            req("web", 9090, 80),
            Kind::Conflict,
        ),
        ("unknown container", req("nosuch", 8081, 80), Kind::NotFound),
        (
            "stopped container",
            req("stopped", 8082, 80),
            Kind::Conflict,
        ),
        (
            "host-network container",
            req("hostnet", 8083, 80),
            Kind::InvalidArgs,
        ),
        (
            "protocol sctp",
            PublishRequest {
                protocol: "sctp".into(),
                ..req("web", 8084, 80)
            },
            Kind::InvalidArgs,
        ),
        ("host port 0", req("web", 0, 80), Kind::InvalidArgs),
        (
            "container port 70000",
            req("web", 8085, 70000),
            Kind::InvalidArgs,
        ),
        // hostnet's httpd listens on :80 in dockerd's namespace
        (
            "port bound by a listening socket",
            req("web", 80, 80),
            Kind::Conflict,
        ),
    ];
    for (what, r, kind) in cases {
        let e = m.publish(r).await.expect_err(what);
        println!("{what}: {} ({})", e, e.kind());
        assert_eq!(e.kind(), kind, "{what}: {e}");
        assert_eq!(tagged(&m).await.len(), before, "{what} wrote rules");
    }
    assert_eq!(m.mappings(), vec![first]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_survives_dockerd_restart() {
    let _s = SERIAL.lock().await;
    let mut d = Dockerd::start();
    d.run_web("web", "/www", &["--restart", "always"]);
    let m = manager(&d);
    m.publish(req("web", 8080, 80)).await.unwrap();
    assert_eq!(d.curl(8080).as_deref(), Some("hello"));
    let w = tokio::spawn(ports::watch(m.clone(), None));

    d.stop_daemon();
    let t0 = Instant::now();
    d.start_daemon();
    let up = t0.elapsed();
    let back = tokio::task::block_in_place(|| d.wait_curl(8080, "hello", Duration::from_secs(15)))
        .expect("port did not come back after dockerd restart");
    println!(
        "dockerd restart: API answered after {:?}, port works again {:?} later",
        up, back
    );
    assert!(back < Duration::from_secs(3), "took {back:?}");
    let t = tagged(&m).await;
    assert_eq!(t.len(), 3, "duplicates or missing rules: {t:#?}");
    w.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_follows_new_ip_after_container_restart() {
    let _s = SERIAL.lock().await;
    let d = Dockerd::start();
    d.run_web("web", "/www", &[]);
    let old_ip = d.ip_of("web");
    let m = manager(&d);
    let map = m.publish(req("web", 8080, 80)).await.unwrap();
    let w = tokio::spawn(ports::watch(m.clone(), None));
    tokio::time::sleep(Duration::from_millis(300)).await;

    d.docker_ok(&["stop", "-t", "1", "web"]);
    {
        let m = m.clone();
        let id = map.id.clone();
        wait_for("mapping waits", Duration::from_secs(5), move || {
            m.get(&id).map(|x| x.state) == Some(MappingState::Waiting)
        })
        .await;
    }
    assert_eq!(tagged(&m).await.len(), 0, "stopped container keeps rules");
    // another container takes the old IP
    d.run_web("intruder", "/www2", &[]);
    assert_eq!(d.ip_of("intruder"), old_ip);
    assert_eq!(d.curl(8080), None);
    d.docker_ok(&["start", "web"]);
    let new_ip = d.ip_of("web");
    assert_ne!(new_ip, old_ip);
    let took = tokio::task::block_in_place(|| d.wait_curl(8080, "hello", Duration::from_secs(5)))
        .expect("rule did not follow the new IP");
    println!("container restart: {old_ip} -> {new_ip}, port follows after {took:?}");
    // the old IP gets nothing from us
    let t = tagged(&m).await;
    assert_eq!(t.len(), 3);
    assert!(t.iter().all(
        |r| !r.text.contains(&format!("{old_ip}:")) && !r.text.contains(&format!("{old_ip}/"))
    ));
    for _ in 0..5 {
        assert_eq!(d.curl(8080).as_deref(), Some("hello"));
    }
    w.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rm_f_leaves_no_tagged_rule() {
    let _s = SERIAL.lock().await;
    let d = Dockerd::start();
    d.run_web("web", "/www", &[]);
    let m = manager(&d);
    m.publish(req("web", 8080, 80)).await.unwrap();
    m.publish(PublishRequest {
        protocol: "udp".into(),
        ..req("web", 5353, 53)
    })
    .await
    .unwrap();
    assert_eq!(tagged(&m).await.len(), 6);
    let w = tokio::spawn(ports::watch(m.clone(), None));
    tokio::time::sleep(Duration::from_millis(300)).await;
    d.docker_ok(&["rm", "-f", "web"]);
    {
        let m2 = m.clone();
        wait_for("mappings dropped", Duration::from_secs(5), move || {
            m2.mappings().is_empty()
        })
        .await;
    }
    assert_eq!(tagged(&m).await.len(), 0);
    w.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_at_start_keeps_rules_and_removes_orphans() {
    let _s = SERIAL.lock().await;
    let d = Dockerd::start();
    d.run_web("web", "/www", &[]);
    let m = manager(&d);
    m.publish(req("web", 8080, 80)).await.unwrap();
    let saved = serde_json::to_string(&m.mappings()).unwrap();
    // an orphan: tagged with this state's id and a mapping id the state does not know;
    // another state's rule and a legacy-tagged rule of an unknown id stay untouched
    let ctx = NetnsContext::open(&d.ns_path()).unwrap();
    let raw = ports::Iptables::detect(&ctx, OWNER, &mut vec![])
        .await
        .unwrap();
    raw.restore(&format!("*nat\n-A DOCKER ! -i docker0 -p tcp -m tcp --dport 7777 -m comment --comment dindhelper:{OWNER}:deadbeef -j DNAT --to-destination 172.17.0.9:80\n-A DOCKER -p tcp -m tcp --dport 7778 -m comment --comment dindhelper:0other0:cafe -j DNAT --to-destination 172.17.0.9:80\n-A DOCKER -p tcp -m tcp --dport 7779 -m comment --comment dindhelper:beefbeef -j DNAT --to-destination 172.17.0.9:80\nCOMMIT\n"))
        .await
        .unwrap();
    drop(m); // "kill -9": nothing cleaned up

    let m2 = manager(&d);
    m2.load(serde_json::from_str(&saved).unwrap()).await;
    let ds = m2.reconcile().await.unwrap();
    println!("{ds:#?}");
    assert!(ds
        .iter()
        .any(|x| x.mapping_id == "deadbeef"
            && x.action == ports::Action::OrphanRemoved { removed: 1 }));
    assert!(ds.iter().any(|x| x.action == ports::Action::Unchanged));
    // ours (3) + the legacy-tagged rule of an unknown id (listed, never deleted)
    let t = tagged(&m2).await;
    assert_eq!(t.len(), 4, "no duplicates, orphan gone: {t:#?}");
    assert!(t
        .iter()
        .any(|r| r.mapping_id == "beefbeef" && r.owner.is_none()));
    let save =
        String::from_utf8_lossy(&d.in_ns(&["iptables-nft-save", "-t", "nat"]).stdout).into_owned();
    assert!(
        save.contains("dindhelper:0other0:cafe"),
        "another state's rule was touched"
    );
    assert_eq!(d.curl(8080).as_deref(), Some("hello"));
    // a second reconcile changes nothing
    let ds = m2.reconcile().await.unwrap();
    assert!(
        ds.iter().all(|x| x.action == ports::Action::Unchanged),
        "{ds:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_write_each_rule_once() {
    let _s = SERIAL.lock().await;
    let d = Dockerd::start();
    d.run_web("web", "/www", &[]);
    let m = manager(&d);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for caller in 0..10u32 {
        let m = m.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..20u32 {
                out.push(m.publish(req("web", 10000 + caller * 20 + i, 80)).await);
            }
            out
        }));
    }
    let mut ok = 0;
    for t in tasks {
        for r in t.await.unwrap() {
            r.expect("concurrent publish");
            ok += 1;
        }
    }
    println!(
        "200 publishes from 10 concurrent callers: {:?}",
        t0.elapsed()
    );
    assert_eq!(ok, 200);
    let t = tagged(&m).await;
    assert_eq!(t.len(), 600);
    let keys: HashSet<_> = t.iter().map(|r| r.text.clone()).collect();
    assert_eq!(keys.len(), 600, "duplicate rules");
    let ids: HashSet<_> = t.iter().map(|r| r.mapping_id.clone()).collect();
    assert_eq!(ids.len(), 200);
    tokio::task::block_in_place(|| {
        for p in 10000..10200u16 {
            assert_eq!(d.curl(p).as_deref(), Some("hello"), "port {p}");
        }
    });
}

// The publish benchmark (batched vs one iptables per rule, N = 10/100/1000) lives in
// benches/ports.rs: performance targets belong in benchmarks, not in timed tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_docker_chain_is_not_supported() {
    // a namespace without dockerd: neither backend has a DOCKER chain
    let ns = format!("dhp-{}-e", std::process::id());
    let st = std::process::Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .expect("ip netns add");
    assert!(st.success(), "ip netns add {ns}");
    let ctx = NetnsContext::open(std::path::Path::new(&format!("/run/netns/{ns}"))).unwrap();
    let r = ports::firewall::detect(&ctx, OWNER).await;
    let _ = std::process::Command::new("ip")
        .args(["netns", "del", &ns])
        .status();
    let e = r.expect_err("detected a backend without dockerd");
    println!("{e}");
    assert_eq!(e.kind(), Kind::NotSupported);
}

/// Two daemons (different state dirs, so different state ids) publish in one netns: each
/// one's reconcile, unpublish and orphan removal leaves the other's rules alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_states_in_one_netns_never_touch_each_others_rules() {
    let _s = SERIAL.lock().await;
    let d = Dockerd::start();
    d.run_web("web", "/www", &[]);
    let a = manager_owned(&d, "aaaa0001");
    let b = manager_owned(&d, "bbbb0002");
    let ma = a.publish(req("web", 8080, 80)).await.unwrap();
    let mb = b.publish(req("web", 8081, 80)).await.unwrap();
    assert_eq!(tagged(&a).await.len(), 3);
    assert_eq!(tagged(&b).await.len(), 3);
    // A's full reconcile: B's rules are not orphans of A
    let ds = a.reconcile().await.unwrap();
    assert!(
        ds.iter().all(|x| x.action == ports::Action::Unchanged),
        "{ds:?}"
    );
    assert_eq!(tagged(&b).await.len(), 3, "A's reconcile touched B's rules");
    // a state that lost its mappings (empty table) removes only its own orphans
    let a2 = manager_owned(&d, "aaaa0001");
    let ds = a2.reconcile().await.unwrap();
    assert!(ds
        .iter()
        .any(|x| x.mapping_id == ma.id && x.action == ports::Action::OrphanRemoved { removed: 3 }));
    assert_eq!(tagged(&a).await.len(), 0);
    assert_eq!(tagged(&b).await.len(), 3);
    assert_eq!(d.curl(8081).as_deref(), Some("hello"));
    assert_eq!(d.curl(8080), None);
    b.unpublish(&mb.id).await.unwrap();
    assert_eq!(tagged(&b).await.len(), 0);
}
