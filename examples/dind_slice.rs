//! Drive the instance backend picked for this host (systemd or cgroupfs) by hand, e.g.
//! inside a booted systemd container (tests/instances_systemd.rs):
//!
//!     dind_slice backend
//!     dind_slice create NAME [knob=value ...]     (knobs as in Limits::set)
//!     dind_slice set NAME [knob=value ...]
//!     dind_slice exists NAME
//!     dind_slice destroy NAME [--force]
//!     dind_slice parent NAME cgroupfs|systemd
//!     dind_slice adopt NAME PID
//!     dind_slice bench N      create N instances with limits, then destroy them (timed)
//!
//! Prints one line with the result; exit status 1 and the error (with its Kind) on failure.

use dindhelper::error::Classify;
use dindhelper::instances::{
    adopt_container, pick_backend, DockerCgroupDriver, InstanceError, Limits,
};

fn limits(args: &[String]) -> Result<Limits, InstanceError> {
    let mut l = Limits::default();
    for a in args {
        let (k, v) = a.split_once('=').unwrap_or((a, ""));
        let v: i128 = v.parse().map_err(|_| {
            InstanceError::Limit(dindhelper::instances::LimitError {
                knob: k.to_owned(),
                value: v.to_owned(),
                why: "not an integer".into(),
            })
        })?;
        l.set(k, v)?;
    }
    Ok(l)
}

fn run(args: &[String]) -> Result<String, InstanceError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let b = pick_backend(rt.handle())?;
    let name = args.get(1).map(String::as_str).unwrap_or("");
    let out = match args.first().map(String::as_str) {
        Some("backend") => format!("{:?}", b.kind()),
        Some("create") => format!("{:?} {:?}", b.kind(), b.create(name, &limits(&args[2..])?)?),
        Some("set") => format!("{:?}", b.set_limits(name, &limits(&args[2..])?)?),
        Some("exists") => format!("{}", b.exists(name)?),
        Some("destroy") => format!(
            "{:?}",
            b.destroy(name, args.get(2).map(String::as_str) == Some("--force"))?
        ),
        Some("parent") => {
            let d = match args.get(2).map(String::as_str) {
                Some("systemd") => DockerCgroupDriver::Systemd,
                _ => DockerCgroupDriver::Cgroupfs,
            };
            b.cgroup_parent(name, d)?
        }
        Some("adopt") => {
            let pid: u32 = args.get(2).and_then(|p| p.parse().ok()).unwrap_or(0);
            format!(
                "{:?}",
                adopt_container(&*b, name, pid, 500, DockerCgroupDriver::Cgroupfs)?
            )
        }
        Some("bench") => {
            let n: usize = name.parse().unwrap_or(100);
            let l = Limits {
                cpu_quota_percent: Some(50),
                memory_max: Some(512 << 20),
                tasks_max: Some(512),
                ..Default::default()
            };
            let t = std::time::Instant::now();
            for i in 0..n {
                b.create(&format!("bench-{i}"), &l)?;
            }
            let created = t.elapsed();
            let rss = std::fs::read_to_string("/proc/self/status")
                .unwrap_or_default()
                .lines()
                .find(|l| l.starts_with("VmRSS"))
                .unwrap_or("")
                .to_owned();
            let t = std::time::Instant::now();
            for i in 0..n {
                b.destroy(&format!("bench-{i}"), false)?;
            }
            format!(
                "{:?}: {n} creates {:?}, {n} destroys {:?}, {rss} with {n} instances",
                b.kind(),
                created,
                t.elapsed()
            )
        }
        _ => "usage: dind_slice backend|create|set|exists|destroy|parent|adopt NAME ...".into(),
    };
    drop(b);
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(out)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(s) => println!("{s}"),
        Err(e) => {
            eprintln!("{}: {e}", e.kind());
            std::process::exit(1);
        }
    }
}
