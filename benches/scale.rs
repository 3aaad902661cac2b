//! Benchmark: how per-call cost grows with the number of existing resources (issue 12,
//! "flat cost to 1000 resources"). Without D-Bus, on the ops layer and the state store,
//! in a temp state dir on the same disk as `/var/tmp`:
//! - CreateImage (`ops::loops::create_image`: sparse file + durable state save) with 10
//!   and with 1000 images already there: median per-call latency, growth ratio;
//! - the durable state save alone (`StateStore::save`, what every CreateImage, Publish,
//!   CreateInstance, SetLimits, … pays) with 10 and 1000 records;
//! - the ListImages join (image → attached device) with 1000 images and 1000 loop records.
//!
//! Run (root, for chown of image files): `cargo bench --bench scale`
//! (`DHJ_SCALE_N` overrides 1000). Without `--bench` in argv it runs with N=50 as a smoke
//! check.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dindhelper::config::Config;
use dindhelper::ops::{self, Core};
use dindhelper::state::{ImageRecord, LoopRecord, StateStore};

fn core_in(dir: &std::path::Path) -> Arc<Core> {
    let store = StateStore::open(dir).unwrap();
    let state = store.load_or_init().unwrap();
    let cfg = Config {
        max_images_per_uid: 100_000,
        max_image_bytes_per_uid: u64::MAX / 4,
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
        instances: ops::instances::InstanceCtx::new(Err("bench".into()), None),
        ports: ops::ports::manager_for(docker.clone()),
        containers: ops::containers::Containers::new(docker),
    })
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Median latency of `calls` CreateImage with `existing` images already there.
async fn create_image_at(existing: usize, calls: usize) -> Duration {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let core = core_in(dir.path());
    for i in 0..existing {
        ops::loops::create_image(&core, 0, &format!("pre{i}.img"), 1 << 20)
            .await
            .unwrap();
    }
    let mut t = Vec::new();
    for i in 0..calls {
        let t0 = Instant::now();
        ops::loops::create_image(&core, 0, &format!("new{i}.img"), 1 << 20)
            .await
            .unwrap();
        t.push(t0.elapsed());
    }
    median(t)
}

fn image(i: usize) -> ImageRecord {
    ImageRecord {
        name: format!("student-{i:04}.img"),
        owner_uid: 1000 + (i % 40) as u32,
        size: 8 << 30,
    }
}

fn loop_rec(i: usize) -> LoopRecord {
    let im = image(i);
    LoopRecord {
        number: i as u32,
        image: Some((im.owner_uid, im.name.clone())),
        backing_file: format!("/var/lib/dindhelper/images/{}/{}", im.owner_uid, im.name).into(),
        backing_dev: 2049,
        backing_inode: i as u64,
        owner_uid: im.owner_uid,
        instance: Some(format!("lab-{i}")),
        read_only: false,
        partscan: true,
        offset: 0,
        size_limit: 0,
        partitions: Vec::new(),
        exposures: Vec::new(),
    }
}

/// Median of 30 durable saves with `n` image records.
fn save_at(n: usize) -> Duration {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let store = StateStore::open(dir.path()).unwrap();
    let mut st = store.load_or_init().unwrap();
    st.images = (0..n).map(image).collect();
    let mut t = Vec::new();
    for i in 0..30 {
        st.images[i % n].size += 1;
        let t0 = Instant::now();
        store.save(&st).unwrap();
        t.push(t0.elapsed());
    }
    median(t)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n: usize = std::env::var("DHJ_SCALE_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 1000 } else { 50 });
    assert!(
        nix::unistd::geteuid().is_root(),
        "run as root (image files are chowned)"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let calls = 30;
    let small = rt.block_on(create_image_at(10, calls));
    let large = rt.block_on(create_image_at(n, calls));
    println!(
        "CreateImage (ops, median of {calls}): {:.2} ms at 10 images, {:.2} ms at {n}: growth {:.2}x (goal <= 1.3)",
        small.as_secs_f64() * 1e3,
        large.as_secs_f64() * 1e3,
        large.as_secs_f64() / small.as_secs_f64()
    );
    let s10 = save_at(10);
    let sn = save_at(n);
    println!(
        "durable state save (median of 30): {:.2} ms with 10 records, {:.2} ms with {n}: growth {:.2}x",
        s10.as_secs_f64() * 1e3,
        sn.as_secs_f64() * 1e3,
        sn.as_secs_f64() / s10.as_secs_f64()
    );
    let st = dindhelper::state::State {
        images: (0..n).map(image).collect(),
        loops: (0..n).map(loop_rec).collect(),
        ..Default::default()
    };
    let t0 = Instant::now();
    let rows = st.image_rows();
    let join = t0.elapsed();
    assert_eq!(rows.len(), n);
    assert!(rows.iter().all(|r| !r.device.is_empty()));
    // The join as ListImages did it before (a search of the loop records per image, with
    // a String clone per comparison), for comparison.
    let t0 = Instant::now();
    let old: Vec<String> = st
        .images
        .iter()
        .map(|i| {
            st.loops
                .iter()
                .find(|l| l.image.as_ref() == Some(&(i.owner_uid, i.name.clone())))
                .map(|l| l.device())
                .unwrap_or_default()
        })
        .collect();
    let old_join = t0.elapsed();
    assert_eq!(old.len(), n);
    println!(
        "ListImages join, {n} images x {n} loop records: {:.2} ms (goal <= 10 ms; the old per-image search: {:.2} ms)",
        join.as_secs_f64() * 1e3,
        old_join.as_secs_f64() * 1e3
    );
}
