//! Benchmark: how per-call cost grows with the number of existing resources (issue 12,
//! "flat cost to 1000 resources"). On the ops layer (what each D-Bus method calls after
//! polkit, which does not depend on the number of resources), real loop devices and real
//! cgroups, state dir in `/var/tmp` (a disk, so fsync costs what it costs):
//! - CreateImage, AttachImage, Detach with 10 and with N images already there (over 100
//!   owners), every one of them attached (N loop devices): median per-call latency and
//!   growth ratio;
//! - CreateInstance (cgroupfs backend under `dhj-scale-<pid>` in the cgroup tree) with 10
//!   and N instances;
//! - Publish: its state part (a mapping record made durable) with 10 and N mappings; the
//!   rule side is in `benches/ports.rs`;
//! - ListLoops and ListImages at N (goal <= 10 ms), ListLoops also the old way (every
//!   device opened for LOOP_GET_STATUS64) and with a sysfs read per device;
//! - the kernel's LOOP_CTL_GET_FREE alone at 10 and N bound devices (it walks every loop
//!   device: AttachImage's growth that is not the daemon's);
//! - what the old per-change full rewrite of `state.json` (+ fsync) cost at 10 and N.
//!
//! Run (root): `cargo bench --bench scale` (`DHJ_SCALE_N` overrides 1000). Without
//! `--bench` in argv it runs with N=50 as a smoke check. Attaches N+30 loop devices and
//! detaches them all again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dindhelper::config::Config;
use dindhelper::instances::SliceBackend;
use dindhelper::ops::{self, Core};
use dindhelper::state::{Change, State, StateStore};

const CALLS: usize = 30;

fn core_in(dir: &std::path::Path, backend: Option<Arc<dyn SliceBackend>>) -> Arc<Core> {
    let store = StateStore::open(dir).unwrap();
    let state = store.load_or_init().unwrap();
    let cfg = Config {
        max_images_per_uid: 100_000,
        max_image_bytes_per_uid: u64::MAX / 4,
        max_loops_per_uid: 100_000,
        ..Config::default()
    };
    let docker = dindhelper::docker::Docker::new("/nonexistent/docker.sock");
    Arc::new(Core {
        images: dindhelper::loopdev::images::ImageStore::new(
            dir.join("images"),
            dindhelper::loopdev::images::Limits {
                max_size: cfg.max_image_size,
                max_count: cfg.max_images_per_uid,
                max_total_bytes: cfg.max_image_bytes_per_uid,
            },
        )
        .unwrap(),
        cfg,
        store,
        state: tokio::sync::Mutex::new(state),
        instances: ops::instances::InstanceCtx::new(backend.ok_or_else(|| "bench".into()), None),
        ports: ops::ports::manager_for(docker.clone()),
        containers: ops::containers::Containers::new(docker),
    })
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Per-call medians with `n` images, all attached.
struct Images {
    create: Duration,
    attach: Duration,
    detach: Duration,
    list_loops: Duration,
    list_loops_old: Duration,
    list_loops_sysfs: Duration,
    list_images: Duration,
    /// The kernel's LOOP_CTL_GET_FREE alone (what every attach asks first).
    get_free: Duration,
}

/// Median of 30 LOOP_CTL_GET_FREE ioctls (after one that may create the free device).
fn get_free() -> Duration {
    use std::os::fd::AsRawFd;
    const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
    let ctl = std::fs::File::open("/dev/loop-control").unwrap();
    let call = || {
        let r = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
        assert!(
            r >= 0,
            "LOOP_CTL_GET_FREE: {}",
            std::io::Error::last_os_error()
        );
    };
    call();
    median(
        (0..CALLS)
            .map(|_| {
                let t0 = Instant::now();
                call();
                t0.elapsed()
            })
            .collect(),
    )
}

async fn images_at(n: usize) -> Images {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let core = core_in(dir.path(), None);
    let req = ops::loops::AttachRequest::default;
    let mut numbers = Vec::new();
    for i in 0..n {
        // Spread over 100 owners, as a class is: the image store's per-uid checks list
        // the caller's own directory (bounded by max_images_per_uid), the measured calls
        // are uid 0's in both runs.
        let (uid, name) = (1000 + (i % 100) as u32, format!("pre{i}.img"));
        ops::loops::create_image(&core, uid, &name, 1 << 20)
            .await
            .unwrap();
        let l = ops::loops::attach_image(&core, uid, &name, req())
            .await
            .unwrap();
        numbers.push(l.number);
    }
    let get_free = get_free();
    let (mut create, mut attach, mut detach) = (Vec::new(), Vec::new(), Vec::new());
    let mut fresh = Vec::new();
    for i in 0..CALLS {
        let name = format!("new{i}.img");
        let t0 = Instant::now();
        ops::loops::create_image(&core, 0, &name, 1 << 20)
            .await
            .unwrap();
        create.push(t0.elapsed());
        let t0 = Instant::now();
        let l = ops::loops::attach_image(&core, 0, &name, req())
            .await
            .unwrap();
        attach.push(t0.elapsed());
        fresh.push(l.number);
    }
    let mut lists = Vec::new();
    let mut lists_old = Vec::new();
    let mut lists_sysfs = Vec::new();
    let mut images = Vec::new();
    for _ in 0..5 {
        let t0 = Instant::now();
        let rows = ops::loops::list_loops(&core).await;
        lists.push(t0.elapsed());
        assert_eq!(rows.len(), n + CALLS);
        assert!(rows.iter().all(|r| r.size == 1 << 20));
        // The old way: the records cloned, every device opened for its status.
        let t0 = Instant::now();
        let loops = core.state.lock().await.loops.clone();
        let sizes: Vec<u64> = loops
            .iter()
            .map(|l| {
                dindhelper::loopdev::info(l.number)
                    .ok()
                    .flatten()
                    .map_or(0, |i| i.size)
            })
            .collect();
        lists_old.push(t0.elapsed());
        assert_eq!(sizes.len(), n + CALLS);
        let t0 = Instant::now();
        let numbers: Vec<u32> = core
            .state
            .lock()
            .await
            .loops
            .iter()
            .map(|l| l.number)
            .collect();
        let sizes: Vec<u64> = numbers
            .iter()
            .map(|n| dindhelper::loopdev::size(*n))
            .collect();
        lists_sysfs.push(t0.elapsed());
        assert!(sizes.iter().all(|s| *s == 1 << 20));
        // ListImages: the join and the rows the bus sends.
        let t0 = Instant::now();
        let st = core.state.lock().await;
        let rows: Vec<(String, String, u64, u32, String)> = st
            .image_rows()
            .into_iter()
            .map(|r| {
                (
                    format!("/org/dindhelper1/image/{}", r.image.name),
                    r.image.name.clone(),
                    r.image.size,
                    r.image.owner_uid,
                    r.device,
                )
            })
            .collect();
        drop(st);
        images.push(t0.elapsed());
        assert_eq!(rows.len(), n + CALLS);
    }
    for number in fresh {
        let t0 = Instant::now();
        ops::loops::detach(&core, number).await.unwrap();
        detach.push(t0.elapsed());
    }
    for number in numbers {
        ops::loops::detach(&core, number).await.unwrap();
    }
    Images {
        create: median(create),
        attach: median(attach),
        detach: median(detach),
        list_loops: median(lists),
        list_loops_old: median(lists_old),
        list_loops_sysfs: median(lists_sysfs),
        list_images: median(images),
        get_free,
    }
}

/// Median CreateInstance with `n` instances there (cgroupfs backend, own cgroup root).
async fn instances_at(n: usize) -> Duration {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let root = format!("dhj-scale-{}", std::process::id());
    let backend: Arc<dyn SliceBackend> =
        Arc::new(dindhelper::instances::cgroupfs::CgroupfsBackend::detect(&root).unwrap());
    let core = core_in(dir.path(), Some(backend.clone()));
    let limits = || dindhelper::instances::Limits {
        memory_max: Some(256 << 20),
        tasks_max: Some(100),
        ..Default::default()
    };
    let mut names = Vec::new();
    for i in 0..n {
        let name = format!("pre{i}");
        ops::instances::create(&core, 0, &name, limits(), None)
            .await
            .unwrap();
        names.push(name);
    }
    let mut t = Vec::new();
    for i in 0..CALLS {
        let name = format!("new{i}");
        let t0 = Instant::now();
        ops::instances::create(&core, 0, &name, limits(), None)
            .await
            .unwrap();
        t.push(t0.elapsed());
        names.push(name);
    }
    for name in names {
        backend.destroy(&name, true).unwrap();
    }
    for d in cgroup_roots(&root) {
        let _ = std::fs::remove_dir(d);
    }
    median(t)
}

fn cgroup_roots(root: &str) -> Vec<std::path::PathBuf> {
    let mut v = vec![std::path::Path::new("/sys/fs/cgroup").join(root)];
    if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
        v.extend(rd.flatten().map(|e| e.path().join(root)));
    }
    v
}

fn mapping(i: usize) -> dindhelper::ports::types::Mapping {
    serde_json::from_value(serde_json::json!({
        "id": format!("m{i:05}"),
        "container_id": format!("{i:064x}"),
        "container_name": format!("student-{i}"),
        "protocol": "tcp",
        "host_ip": null,
        "host_port": 20000 + i,
        "container_port": 80,
        "network": "bridge",
        "owner_uid": 1000 + i % 40,
        "instance": format!("lab-{i}"),
        "state": {"active": {"ip": "172.17.0.2", "bridge": "docker0"}},
    }))
    .unwrap()
}

/// Median time to make one new mapping durable with `n` mappings there (Publish's state
/// part), and the old full rewrite of the state (what every durable change cost before).
fn mappings_at(n: usize) -> (Duration, Duration) {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let store = StateStore::open(dir.path()).unwrap();
    let mut st: State = store.load_or_init().unwrap();
    st.mappings = (0..n).map(mapping).collect();
    store.save_all(&st).unwrap();
    let (mut rec, mut full) = (Vec::new(), Vec::new());
    for i in 0..CALLS {
        let m = mapping(n + i);
        st.mappings.push(m.clone());
        let t0 = Instant::now();
        store.record(&st, &[Change::Mapping(m)]).unwrap();
        rec.push(t0.elapsed());
    }
    for _ in 0..CALLS {
        let t0 = Instant::now();
        store.save_all(&st).unwrap();
        full.push(t0.elapsed());
    }
    (median(rec), median(full))
}

fn line(what: &str, a: Duration, b: Duration, n: usize) {
    println!(
        "{what:<15} {:>7.3} ms at 10, {:>7.3} ms at {n}: growth {:.2}x (goal <= 1.3)",
        ms(a),
        ms(b),
        b.as_secs_f64() / a.as_secs_f64()
    );
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n: usize = std::env::var("DHJ_SCALE_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 1000 } else { 50 });
    assert!(
        nix::unistd::geteuid().is_root(),
        "run as root (loop devices, cgroups, image files are chowned)"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let small = rt.block_on(images_at(10));
    let large = rt.block_on(images_at(n));
    let i10 = rt.block_on(instances_at(10));
    let i_n = rt.block_on(instances_at(n));
    let (m10, f10) = mappings_at(10);
    let (m_n, f_n) = mappings_at(n);
    println!("median of {CALLS} calls each, N = {n} existing resources of the kind (images all attached):");
    line("CreateImage", small.create, large.create, n);
    line("AttachImage", small.attach, large.attach, n);
    line("Detach", small.detach, large.detach, n);
    line("  kernel GET_FREE", small.get_free, large.get_free, n);
    line("CreateInstance", i10, i_n, n);
    line("Publish (state)", m10, m_n, n);
    println!(
        "ListLoops at {}: {:.2} ms (goal <= 10; the old way, every device opened: {:.2} ms; sizes from sysfs, no cache: {:.2} ms)",
        n + CALLS,
        ms(large.list_loops),
        ms(large.list_loops_old),
        ms(large.list_loops_sysfs)
    );
    println!(
        "ListImages at {}: {:.2} ms (goal <= 10)",
        n + CALLS,
        ms(large.list_images)
    );
    println!(
        "full durable rewrite of the state (the old cost of every durable change; now only compaction): {:.2} ms at 10 mappings, {:.2} ms at {n}",
        ms(f10),
        ms(f_n)
    );
}
