//! Benchmark: create and destroy 100 instances with limits through dindhelperd over D-Bus
//! (systemd slice backend, installed as a real service in a booted nspawn systemd; see
//! tests/common/nspawn.rs) against the same slices made with `systemctl set-property
//! --runtime` + `systemctl start` / `systemctl stop`, in the same run and the same
//! container. Prints both times, the ratio (daemon / systemctl; goal <= 1.0) and the
//! daemon's RSS with 100 instances.
//!
//! Both sides run as one shell loop inside the container (one `nsenter` each), one client
//! process per operation: `busctl call` for the daemon, `systemctl` for the baseline.
//!
//! Run (root): `cargo bench --bench instances` (N=100; `DHJ_BENCH_N` overrides).
//! Without `--bench` in argv (`cargo test --all-targets`) it only does a smoke check and
//! exits: booting systemd does not belong in every test run.

#[path = "../tests/common/nspawn.rs"]
mod nspawn;

use std::time::Instant;

/// Client mode, run inside the booted container: one D-Bus connection (as a provisioning
/// service holds it), N CreateInstance then N DestroyInstance; prints the two times in ms.
fn client(n: usize) {
    use std::collections::HashMap;
    use zbus::zvariant::Value;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let conn = zbus::Connection::system().await.expect("system bus");
        let p = zbus::Proxy::new(
            &conn,
            "org.dindhelper1",
            "/org/dindhelper1",
            "org.dindhelper1.Instances",
        )
        .await
        .unwrap();
        let mut limits: HashMap<&str, Value<'_>> = HashMap::new();
        limits.insert("cpu_quota_percent", Value::U32(50));
        limits.insert("memory_max", Value::U64(268435456));
        limits.insert("tasks_max", Value::U64(100));
        let none: HashMap<&str, Value<'_>> = HashMap::new();
        let t = Instant::now();
        for i in 1..=n {
            let _: zbus::Message = p
                .call_method("CreateInstance", &(format!("c{i}"), &limits))
                .await
                .expect("CreateInstance");
        }
        let c = t.elapsed();
        let t = Instant::now();
        for i in 1..=n {
            let _: zbus::Message = p
                .call_method("DestroyInstance", &(format!("c{i}"), &none))
                .await
                .expect("DestroyInstance");
        }
        let d = t.elapsed();
        println!("{:.3} {:.3}", c.as_secs_f64() * 1e3, d.as_secs_f64() * 1e3);
    });
}

fn main() {
    if let Some(n) = std::env::var("DHJ_BENCH_CLIENT")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return client(n);
    }
    let bench = std::env::args().any(|a| a == "--bench");
    let bin = env!("CARGO_BIN_EXE_dindhelperd");
    if !bench {
        assert!(std::path::Path::new(bin).exists(), "{bin} missing");
        assert_eq!(
            nspawn::parse_vmrss_kb("Name:\tx\nVmRSS:\t  12345 kB\n"),
            Some(12345)
        );
        println!("instances bench: smoke check ok (run `cargo bench --bench instances` as root)");
        return;
    }
    let n: usize = std::env::var("DHJ_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let b = nspawn::Booted::boot("bench");
    b.install_daemon(std::path::Path::new(bin));

    if std::env::var_os("DHJ_BENCH_TMPFS").is_some() {
        // Diagnostic: state on tmpfs (fsync of state.json costs nothing there).
        b.ok(&[
            "sh",
            "-c",
            "mkdir -p /var/lib/dindhelper && mount -t tmpfs -o mode=0700 tmpfs /var/lib/dindhelper",
        ]);
    }
    let call = "busctl call org.dindhelper1 /org/dindhelper1 org.dindhelper1.Instances";
    // Warm-up: D-Bus activation of the daemon and polkitd, first slice under dind.slice.
    b.ok(&[
        "sh",
        "-c",
        &format!("{call} CreateInstance sa{{sv}} warm 0 >/dev/null && {call} DestroyInstance sa{{sv}} warm 0 >/dev/null && systemctl set-property --runtime dind-warm2.slice TasksMax=100 && systemctl start dind-warm2.slice && systemctl stop dind-warm2.slice"),
    ]);

    let limits = "3 cpu_quota_percent u 50 memory_max t 268435456 tasks_max t 100";
    let t = Instant::now();
    b.ok(&[
        "sh",
        "-c",
        &format!("for i in $(seq 1 {n}); do {call} CreateInstance sa{{sv}} d$i {limits} >/dev/null || exit 1; done"),
    ]);
    let d_create = t.elapsed();
    let rss = b.daemon_rss_kb();
    let listed = b.ok(&["sh", "-c", &format!("{call} ListInstances | wc -c")]);
    let active = b.ok(&[
        "sh",
        "-c",
        "systemctl list-units --type=slice --state=active --no-legend 'dind-d*' | wc -l",
    ]);
    let t = Instant::now();
    b.ok(&[
        "sh",
        "-c",
        &format!("for i in $(seq 1 {n}); do {call} DestroyInstance sa{{sv}} d$i 0 >/dev/null || exit 1; done"),
    ]);
    let d_destroy = t.elapsed();

    let t = Instant::now();
    b.ok(&[
        "sh",
        "-c",
        &format!("for i in $(seq 1 {n}); do systemctl set-property --runtime dind-s$i.slice CPUQuota=50% MemoryMax=268435456 TasksMax=100 && systemctl start dind-s$i.slice || exit 1; done"),
    ]);
    let s_create = t.elapsed();
    let t = Instant::now();
    b.ok(&[
        "sh",
        "-c",
        &format!("for i in $(seq 1 {n}); do systemctl stop dind-s$i.slice || exit 1; done"),
    ]);
    let s_destroy = t.elapsed();

    // Client + bus floor: the same number of busctl round trips to a read-only method.
    let t = Instant::now();
    b.ok(&[
        "sh",
        "-c",
        &format!(
            "for i in $(seq 1 {}); do {call} ListInstances >/dev/null || exit 1; done",
            2 * n
        ),
    ]);
    let floor = t.elapsed();

    // authorized floor: a call that is authorized (root: polkitd answers yes for uid 0
    // and is not asked, see src/bus/auth.rs) and then fails NotFound.
    let t = Instant::now();
    b.ok(&[
        "sh",
        "-c",
        &format!(
            "for i in $(seq 1 {}); do {call} SetLimits sa{{sv}} nosuch 0 2>/dev/null; done; true",
            2 * n
        ),
    ]);
    let pk_floor = t.elapsed();

    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    // The provisioning service's path: one persistent connection, no process per call.
    // This bench binary, copied into the container, is the client.
    let me = std::env::current_exe().unwrap();
    let inside = b
        .scratch
        .join("merged/usr/local/bin/dh-instances-bench-client");
    std::fs::copy(&me, &inside).expect("copy the bench client into the container");
    let out = b.ok(&[
        "env",
        &format!("DHJ_BENCH_CLIENT={n}"),
        "/usr/local/bin/dh-instances-bench-client",
    ]);
    let mut f = out.split_whitespace().map(|x| x.parse::<f64>().unwrap());
    let (c_create, c_destroy) = (f.next().unwrap(), f.next().unwrap());

    let dt = ms(d_create) + ms(d_destroy);
    let st = ms(s_create) + ms(s_destroy);
    let ct = c_create + c_destroy;
    println!("instances bench: {n} instances with limits (cpu 50%, 256 MiB, 100 tasks), systemd backend in nspawn");
    println!(
        "  dindhelperd over D-Bus (busctl):  create {:8.1} ms  destroy {:8.1} ms  total {:8.1} ms  ({:.2} ms/instance)",
        ms(d_create),
        ms(d_destroy),
        dt,
        dt / n as f64
    );
    println!(
        "  systemctl set-property + start/stop: create {:8.1} ms  destroy {:8.1} ms  total {:8.1} ms  ({:.2} ms/instance)",
        ms(s_create),
        ms(s_destroy),
        st,
        st / n as f64
    );
    println!(
        "  floor: {} busctl ListInstances round trips (read only, no systemd): {:8.1} ms",
        2 * n,
        ms(floor)
    );
    println!(
        "  floor: {} busctl SetLimits of an unknown instance (authorized, no systemd): {:8.1} ms",
        2 * n,
        ms(pk_floor)
    );
    println!(
        "  dindhelperd over one D-Bus connection (zbus client): create {:8.1} ms  destroy {:8.1} ms  total {:8.1} ms  ({:.2} ms/instance)",
        c_create,
        c_destroy,
        ct,
        ct / n as f64
    );
    println!(
        "  ratio daemon/systemctl: {:.2} with one busctl process per call, {:.2} over one connection (goal <= 1.0)",
        dt / st,
        ct / st
    );
    println!(
        "  daemon RSS with {n} instances: {rss} kB ({active} active dind-d* slices, ListInstances reply {listed} bytes)"
    );
}
