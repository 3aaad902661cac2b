//! `dindhelperd`: the root daemon. Parses arguments, sets up logging, drops every
//! capability it does not need (before any thread exists: capability sets are per
//! thread), then runs the daemon on a tokio runtime.

use anyhow::Context;
use clap::Parser;
use dindhelper::config::Config;
use dindhelper::daemon::{self, DaemonOptions};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "dindhelperd",
    version,
    about = "Host helper daemon for Docker-in-Docker lab instances (D-Bus: org.dindhelper1)"
)]
struct Args {
    /// D-Bus address to serve on instead of the system bus (e.g. unix:path=/run/x/socket).
    #[arg(long, value_name = "ADDR")]
    bus_address: Option<String>,
    /// Where intent state and images live.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/dindhelper")]
    state_dir: PathBuf,
    /// JSON file with limits (see README, "Configuration").
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Docker Engine API socket: unix:///path or /path (nothing else; checked at start).
    #[arg(
        long,
        value_name = "URL",
        default_value = "unix:///var/run/docker.sock",
        value_parser = dindhelper::docker::parse_docker_host
    )]
    docker_host: PathBuf,
    /// Print the effective state of --state-dir (snapshot with the journal replayed, loop
    /// records included) as JSON and exit; works while a daemon runs on it.
    #[arg(long)]
    dump_state: bool,
    /// Log filter (tracing env-filter syntax); RUST_LOG overrides it.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    log_level: String,
}

/// Capabilities the daemon keeps; everything else leaves the bounding set too, so helper
/// processes (iptables-restore) cannot regain it.
const KEEP: &[caps::Capability] = &[
    caps::Capability::CAP_SYS_ADMIN, // loop ioctls, BLKPG, setns, mount ns
    caps::Capability::CAP_NET_ADMIN, // iptables, netns
    caps::Capability::CAP_NET_RAW,   // AF_PACKET captures
    caps::Capability::CAP_CHOWN,     // images and captures owned by the caller
    caps::Capability::CAP_FOWNER,    // chmod of files owned by callers
    caps::Capability::CAP_DAC_OVERRIDE, // state dir, /dev nodes, cgroup files
    caps::Capability::CAP_DAC_READ_SEARCH, // /proc/<pid> of other users
    caps::Capability::CAP_MKNOD,     // partition nodes inside containers
    caps::Capability::CAP_SYS_PTRACE, // /proc/<pid>/ns of other users' processes
    caps::Capability::CAP_SYS_CHROOT, // setns into a mount namespace
    caps::Capability::CAP_SYS_RESOURCE, // lowering oom_score_adj
    caps::Capability::CAP_KILL,      // signalling processes of instances
];
// Not CAP_SETPCAP: it is only needed for the bounding-set drop at start (below) and
// nothing later; keeping it would let the process raise inheritable caps of children.

fn drop_capabilities() -> anyhow::Result<()> {
    use caps::{CapSet, CapsHashSet};
    let keep: CapsHashSet = KEEP.iter().copied().collect();
    let permitted = caps::read(None, CapSet::Permitted).context("reading capabilities")?;
    if permitted.contains(&caps::Capability::CAP_SETPCAP) {
        // Dropping from the bounding set needs CAP_SETPCAP (still effective here, even
        // after its own bounding bit is gone); it leaves the permitted set below.
        for c in caps::all() {
            if !keep.contains(&c) {
                caps::drop(None, CapSet::Bounding, c)
                    .with_context(|| format!("dropping {c} from the bounding set"))?;
            }
        }
    } else {
        // Under the shipped unit the service manager has set the bounding set already
        // (CapabilityBoundingSet= equals KEEP, tested below); lowering the other sets needs
        // no capability.
        tracing::debug!("no CAP_SETPCAP: bounding set left to the service manager");
    }
    let mine: CapsHashSet = permitted.intersection(&keep).copied().collect();
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new()).context("clearing inheritable")?;
    caps::set(None, CapSet::Effective, &mine).context("setting effective")?;
    caps::set(None, CapSet::Permitted, &mine).context("setting permitted")?;
    let _ = caps::clear(None, CapSet::Ambient);
    Ok(())
}

fn init_logging(level: &str) {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let registry = tracing_subscriber::registry().with(filter);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(j) = tracing_journald::layer() {
            registry.with(j).init();
            return;
        }
    }
    registry
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    init_logging(&args.log_level);
    match real_main(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("dindhelperd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main(args: Args) -> anyhow::Result<()> {
    if args.dump_state {
        let v = dindhelper::state::effective_json(&args.state_dir)?;
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let config = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    drop_capabilities()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(daemon::run(DaemonOptions {
        bus_address: args.bus_address,
        state_dir: args.state_dir,
        config,
        docker_socket: args.docker_host,
    }))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::KEEP;

    /// The unit's CapabilityBoundingSet is exactly what the daemon keeps (no more: the
    /// daemon drops the rest anyway; no less: the daemon would miss a capability under the
    /// unit only), and CAP_SETPCAP is in neither.
    #[test]
    fn unit_bounding_set_equals_keep_without_setpcap() {
        let unit = include_str!("../systemd/dindhelperd.service");
        let line = unit
            .lines()
            .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
            .expect("CapabilityBoundingSet= in the unit");
        let mut in_unit: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        let mut kept: Vec<String> = KEEP.iter().map(|c| c.to_string()).collect();
        in_unit.sort();
        kept.sort();
        assert_eq!(in_unit, kept);
        assert!(
            !kept.iter().any(|c| c == "CAP_SETPCAP"),
            "CAP_SETPCAP is unused"
        );
    }
}
