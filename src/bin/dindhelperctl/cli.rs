//! The command line (clap derive). The completions and the man page are generated from
//! this same definition (`dindhelperctl completions SHELL`, `dindhelperctl man`), so they
//! cannot drift from what the binary accepts.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

pub const AFTER_HELP: &str = "\
Exit status:
  0   success
  1   a local error (a file could not be opened, bad output, ...)
  2   usage error (bad arguments)
  3   org.dindhelper1.Error.NotAuthorized (polkit said no)
  4   org.dindhelper1.Error.InvalidArgs
  5   org.dindhelper1.Error.NotFound
  6   org.dindhelper1.Error.Busy
  7   org.dindhelper1.Error.Conflict
  8   org.dindhelper1.Error.NotSupported
  9   org.dindhelper1.Error.Failed (or another error of the daemon)
  10  the daemon cannot be reached (no bus, org.dindhelper1 not running)
  11  the daemon does not know the method (older daemon)";

#[derive(Parser)]
#[command(
    name = "dindhelperctl",
    version,
    about = "Client for dindhelperd (org.dindhelper1): images, loop devices, partitions, \
             ports, captures, instances and device exposures",
    after_help = AFTER_HELP
)]
pub struct Cli {
    /// D-Bus address instead of the system bus (unix:path=/run/.../socket).
    #[arg(long, global = true, value_name = "ADDR")]
    pub bus_address: Option<String>,
    /// Machine-readable output: JSON on stdout for every listing and result.
    #[arg(long, global = true)]
    pub json: bool,
    /// Let polkit ask for a password.
    #[arg(long, global = true)]
    pub interactive: bool,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Images and loop devices the daemon manages.
    List,
    /// Sparse image files.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Loop devices.
    #[command(subcommand)]
    Loop(LoopCmd),
    /// Re-read the partition table of a managed loop device.
    Rescan { device: String },
    /// Ports published on running containers (DNAT in Docker's chain).
    #[command(subcommand)]
    Port(PortCmd),
    /// DinD instances: slices with limits, adopted containers.
    #[command(subcommand)]
    Instance(InstanceCmd),
    /// Make a managed loop device and its partitions appear in a container's /dev.
    Expose {
        /// /dev/loopN or loopN.
        device: String,
        /// Container name or id.
        container: String,
        /// Name of the node inside the container (`disk` -> /dev/disk, /dev/disk1...).
        #[arg(long = "as", value_name = "NAME")]
        as_name: Option<String>,
    },
    /// Take an exposed device away from a container again (RevokeFromContainer).
    Revoke {
        device: String,
        container: String,
        /// Forget the exposure even when the grant cannot be withdrawn.
        #[arg(long)]
        force: bool,
    },
    /// Devices exposed to containers (ListExposures).
    Exposures,
    /// Packet captures. `capture TARGET ...` streams pcap to stdout (short for
    /// `capture follow TARGET ...`): `dindhelperctl capture web --filter 'tcp port 80' |
    /// tcpdump -r -`.
    Capture(CaptureArgs),
    /// Print the daemon's signals, one line each (Ctrl-C ends).
    Monitor,
    /// Shell completion script on stdout.
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },
    /// The man page (roff) on stdout (`dindhelperctl man | man -l -`), or with DIR every
    /// page (dindhelperctl.1 and one per subcommand, dindhelperctl-port-publish.1, ...)
    /// written into DIR.
    Man { dir: Option<std::path::PathBuf> },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Subcommand)]
pub enum ImageCmd {
    /// Create NAME of SIZE (bytes, or with K/M/G/T suffix: 512M, 2G).
    Create {
        name: String,
        size: String,
        /// Create it for another uid (needs the loop-others action).
        #[arg(long)]
        owner_uid: Option<u32>,
    },
    Delete {
        name: String,
        #[arg(long)]
        owner_uid: Option<u32>,
    },
    List,
}

#[derive(Args)]
pub struct AttachFlags {
    #[arg(long)]
    pub read_only: bool,
    /// Attach without partition scanning (Rescan then answers NotSupported).
    #[arg(long)]
    pub no_partscan: bool,
    #[arg(long)]
    pub offset: Option<u64>,
    #[arg(long)]
    pub size: Option<u64>,
    #[arg(long)]
    pub instance: Option<String>,
}

#[derive(Subcommand)]
pub enum LoopCmd {
    /// Attach an image by NAME, or any regular file you can open with --file PATH.
    Attach {
        name: Option<String>,
        #[arg(long, conflicts_with = "name")]
        file: Option<PathBuf>,
        #[command(flatten)]
        flags: AttachFlags,
    },
    Detach {
        device: String,
    },
    List,
}

#[derive(Args, Clone, Default)]
pub struct PortFlags {
    /// Restrict the DNAT to this host address (an IPv6 one makes the mapping IPv6 only).
    #[arg(long)]
    pub host_ip: Option<String>,
    /// Docker network to point into (when the container has several).
    #[arg(long)]
    pub network: Option<String>,
    /// auto (default), ipv4, both or ipv6.
    #[arg(long)]
    pub family: Option<String>,
    /// DinD instance the mapping belongs to.
    #[arg(long)]
    pub instance: Option<String>,
}

#[derive(Subcommand)]
pub enum PortCmd {
    /// Publish HOST_PORT of the host to CONTAINER_PORT of a running container.
    Publish {
        container: String,
        /// tcp or udp.
        proto: String,
        host_port: u16,
        container_port: u16,
        #[command(flatten)]
        flags: PortFlags,
    },
    /// Many ports in one call, all or nothing: SPEC = CONTAINER:PROTO:HOST_PORT:CONTAINER_PORT.
    PublishMany {
        #[arg(required = true, value_name = "SPEC")]
        specs: Vec<String>,
        #[command(flatten)]
        flags: PortFlags,
    },
    /// Remove a mapping (its id or object path).
    Unpublish {
        id: String,
    },
    /// Remove every mapping of a container.
    UnpublishContainer {
        container: String,
    },
    List,
}

/// Limits of an instance; a knob not given is not set.
#[derive(Args, Clone, Default)]
pub struct LimitFlags {
    /// 100 = one CPU.
    #[arg(long, value_name = "N")]
    pub cpu_quota_percent: Option<u32>,
    #[arg(long, value_name = "N")]
    pub cpu_weight: Option<u64>,
    /// Bytes, or with K/M/G/T suffix.
    #[arg(long, value_name = "BYTES")]
    pub memory_max: Option<String>,
    #[arg(long, value_name = "BYTES")]
    pub memory_high: Option<String>,
    #[arg(long, value_name = "BYTES")]
    pub memory_swap_max: Option<String>,
    #[arg(long, value_name = "N")]
    pub tasks_max: Option<u64>,
    #[arg(long, value_name = "N")]
    pub io_weight: Option<u64>,
    /// For every process of adopted containers (-1000..1000, default 500).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub oom_score_adj: Option<i32>,
}

#[derive(Subcommand)]
pub enum InstanceCmd {
    /// Create an instance with limits; prints the value for `docker run --cgroup-parent`.
    Create {
        name: String,
        #[command(flatten)]
        limits: LimitFlags,
        /// Docker's cgroup driver (cgroupfs or systemd), for the cgroup parent.
        #[arg(long)]
        docker_cgroup_driver: Option<String>,
    },
    /// Change limits live; --reset KNOB puts a knob back to its default.
    SetLimits {
        name: String,
        #[command(flatten)]
        limits: LimitFlags,
        /// Knob to reset (cpu_quota_percent, memory_max, tasks_max, ...); repeatable.
        #[arg(long, value_name = "KNOB")]
        reset: Vec<String>,
    },
    List,
    /// Adopt a running container (name, id or pid:N) into the instance.
    Adopt {
        name: String,
        container: String,
    },
    /// Tear the instance down with its loop devices, ports and captures.
    Destroy {
        name: String,
        /// Kill processes still inside.
        #[arg(long)]
        force: bool,
        /// Also delete the images of its loop devices.
        #[arg(long)]
        delete_images: bool,
    },
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct CaptureArgs {
    #[command(subcommand)]
    pub cmd: Option<CaptureCmd>,
    #[command(flatten)]
    pub follow: FollowArgs,
}

#[derive(Args, Clone)]
pub struct CaptureFlags {
    /// tcpdump filter expression.
    #[arg(long)]
    pub filter: Option<String>,
    /// Interface inside the target (default: all, like `tcpdump -i any`).
    #[arg(long)]
    pub interface: Option<String>,
    /// Seconds (default 60, capped by the daemon's max_capture_duration).
    #[arg(long)]
    pub duration: Option<u64>,
    /// Stop after N packets.
    #[arg(long)]
    pub count: Option<u64>,
    #[arg(long)]
    pub snaplen: Option<u32>,
    #[arg(long)]
    pub instance: Option<String>,
}

#[derive(Args, Clone)]
pub struct FollowArgs {
    /// Container name or id (`pid:N` and `host` need the capture-host action).
    #[arg(required = true)]
    pub target: Option<String>,
    #[command(flatten)]
    pub flags: CaptureFlags,
}

#[derive(Subcommand)]
pub enum CaptureCmd {
    /// Stream pcap to stdout until the session ends (Ctrl-C stops it).
    Follow {
        target: String,
        #[command(flatten)]
        flags: CaptureFlags,
    },
    /// Capture into a file under the daemon's state dir; prints the session and the file.
    Start {
        target: String,
        #[command(flatten)]
        flags: CaptureFlags,
        /// File name without .pcap.
        #[arg(long)]
        name: Option<String>,
        /// End when the file would exceed this size (bytes, K/M/G suffix).
        #[arg(long)]
        max_bytes: Option<String>,
    },
    /// Stop a session (its id or object path); the file is complete when this returns.
    Stop {
        session: String,
    },
    /// Delete a capture file (its path, or its name without .pcap; DeleteCapture).
    Delete {
        file: String,
        /// Another uid's file (needs the capture-others action).
        #[arg(long)]
        owner_uid: Option<u32>,
    },
    List,
}
