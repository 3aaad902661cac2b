//! Attach+detach round trips through dindhelperd over D-Bus (a root caller: the daemon
//! does not ask polkitd, which answers "yes" for uid 0 before reading any rule — see
//! `src/bus/auth.rs`; a provisioning account adds one CheckAuthorization per action and
//! second, ~0.9 ms) against `losetup -f --show FILE` + `losetup -d DEV`, measured in
//! the same run on the same kind of file. Prints both and the ratio (goal ≤ 1.0).
//!
//! `cargo bench --bench loop_roundtrip` (as root). Under `cargo test --all-targets` (no
//! `--bench` argument) it runs a 3-round smoke test so the suite stays fast.
//! `DH_BENCH_ROUNDS=N` overrides the round count.

#[allow(dead_code)]
#[path = "../tests/integration/bed.rs"]
mod bed;

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};
use zbus::zvariant::{OwnedObjectPath, Value};

#[zbus::proxy(
    interface = "org.dindhelper1.Manager",
    default_service = "org.dindhelper1",
    default_path = "/org/dindhelper1"
)]
trait Manager {
    fn create_image(
        &self,
        name: &str,
        size: u64,
        options: HashMap<&str, Value<'_>>,
    ) -> zbus::Result<OwnedObjectPath>;
    fn delete_image(&self, name: &str, options: HashMap<&str, Value<'_>>) -> zbus::Result<()>;
    fn attach_image(
        &self,
        name: &str,
        options: HashMap<&str, Value<'_>>,
    ) -> zbus::Result<(OwnedObjectPath, String)>;
    fn detach(&self, device: &str, options: HashMap<&str, Value<'_>>) -> zbus::Result<()>;
    #[allow(clippy::type_complexity)]
    fn list_loops(
        &self,
    ) -> zbus::Result<Vec<(OwnedObjectPath, String, String, u64, bool, u32, String)>>;
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn losetup_round(file: &str) -> Duration {
    let t = Instant::now();
    let out = Command::new("losetup")
        .args(["-f", "--show", file])
        .output()
        .expect("losetup runs");
    assert!(out.status.success(), "losetup -f: {out:?}");
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let st = Command::new("losetup")
        .args(["-d", &dev])
        .status()
        .expect("losetup -d runs");
    assert!(st.success(), "losetup -d {dev}");
    t.elapsed()
}

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let rounds: usize = std::env::var("DH_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if bench_mode { 200 } else { 3 });
    // The bed's daemon logs at debug; a benchmark measures the production level.
    std::env::set_var("RUST_LOG", "info");
    let bed = bed::Bed::setup(true).unwrap_or_else(|e| panic!("test bed: {e}"));
    bed.start_daemon()
        .unwrap_or_else(|e| panic!("daemon: {e}\n{}", bed.daemon_log()));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (ours, theirs) = rt.block_on(async {
        let conn = zbus::connection::Builder::address(bed.address.as_str())
            .unwrap()
            .build()
            .await
            .expect("connect to the bed's bus");
        let m = ManagerProxy::new(&conn).await.unwrap();
        m.create_image("bench.img", 16 << 20, HashMap::new())
            .await
            .expect("CreateImage");
        // Warm-up: first calls pay for the proxies' set-up.
        for _ in 0..3 {
            let (_, dev) = m.attach_image("bench.img", HashMap::new()).await.unwrap();
            m.detach(&dev, HashMap::new()).await.unwrap();
        }
        let other = bed.run_dir.join("losetup-bench.img");
        std::fs::File::create(&other)
            .and_then(|f| f.set_len(16 << 20))
            .unwrap();
        let other = other.display().to_string();
        losetup_round(&other);

        // Interleave so that load on the machine hits both sides alike.
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        let (mut att, mut det, mut list) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let t = Instant::now();
            let (_, dev) = m.attach_image("bench.img", HashMap::new()).await.unwrap();
            let t1 = Instant::now();
            m.detach(&dev, HashMap::new()).await.unwrap();
            ours.push(t.elapsed());
            att.push(t1 - t);
            det.push(t1.elapsed());
            theirs.push(losetup_round(&other));
            let t = Instant::now();
            m.list_loops().await.unwrap();
            list.push(t.elapsed());
        }
        println!(
            "  phases (median): AttachImage {:.3} ms, Detach {:.3} ms, ListLoops (read only) {:.3} ms",
            median(att).as_secs_f64() * 1e3,
            median(det).as_secs_f64() * 1e3,
            median(list).as_secs_f64() * 1e3
        );
        m.delete_image("bench.img", HashMap::new()).await.unwrap();
        (ours, theirs)
    });

    let (o, t) = (median(ours.clone()), median(theirs.clone()));
    let total_o: Duration = ours.iter().sum();
    let total_t: Duration = theirs.iter().sum();
    println!("loop attach+detach round trips: {rounds} rounds each (median, total)");
    println!(
        "  dindhelperd over D-Bus (root): {:>8.3} ms  {:>9.1} ms",
        o.as_secs_f64() * 1e3,
        total_o.as_secs_f64() * 1e3
    );
    println!(
        "  losetup -f --show + losetup -d:  {:>8.3} ms  {:>9.1} ms",
        t.as_secs_f64() * 1e3,
        total_t.as_secs_f64() * 1e3
    );
    println!(
        "  ratio (dindhelperd / losetup):   {:>8.2}  (goal <= 1.0)",
        o.as_secs_f64() / t.as_secs_f64()
    );
    for e in bed.teardown() {
        eprintln!("teardown: {e}");
    }
}
