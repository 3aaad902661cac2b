//! `dindhelperctl`: a small client for dindhelperd. Unlike busctl it can pass file
//! descriptors (`loop attach --file PATH` opens the file as the invoking user and hands
//! the fd over, so the daemon never resolves a path the caller wrote).

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use std::collections::HashMap;
use std::path::PathBuf;
use zbus::zvariant::{OwnedObjectPath, Value};

type PartTuple = (u32, u64, u64, String, String, String, String, u32, u32);

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
    fn list_images(&self) -> zbus::Result<Vec<(OwnedObjectPath, String, u64, u32, String)>>;
    fn attach_image(
        &self,
        name: &str,
        options: HashMap<&str, Value<'_>>,
    ) -> zbus::Result<(OwnedObjectPath, String)>;
    fn attach_fd(
        &self,
        fd: zbus::zvariant::Fd<'_>,
        options: HashMap<&str, Value<'_>>,
    ) -> zbus::Result<(OwnedObjectPath, String)>;
    fn detach(&self, device: &str, options: HashMap<&str, Value<'_>>) -> zbus::Result<()>;
    #[allow(clippy::type_complexity)]
    fn list_loops(
        &self,
    ) -> zbus::Result<Vec<(OwnedObjectPath, String, String, u64, bool, u32, String)>>;
    fn rescan(
        &self,
        device: &str,
        options: HashMap<&str, Value<'_>>,
    ) -> zbus::Result<Vec<PartTuple>>;
}

#[zbus::proxy(
    interface = "org.dindhelper1.Captures",
    default_service = "org.dindhelper1",
    default_path = "/org/dindhelper1"
)]
trait Captures {
    fn start_capture_fd(
        &self,
        target: &str,
        fd: zbus::zvariant::Fd<'_>,
        options: HashMap<&str, Value<'_>>,
    ) -> zbus::Result<OwnedObjectPath>;
    #[zbus(signal)]
    fn finished(
        &self,
        session: OwnedObjectPath,
        packets: u64,
        bytes: u64,
        dropped: u64,
        reason: String,
    ) -> zbus::Result<()>;
}

#[zbus::proxy(
    interface = "org.dindhelper1.Capture",
    default_service = "org.dindhelper1"
)]
trait Capture {
    fn stop(&self, options: HashMap<&str, Value<'_>>) -> zbus::Result<()>;
}

#[derive(Parser)]
#[command(
    name = "dindhelperctl",
    version,
    about = "Client for dindhelperd (org.dindhelper1)"
)]
struct Cli {
    /// D-Bus address instead of the system bus.
    #[arg(long, global = true, value_name = "ADDR")]
    bus_address: Option<String>,
    /// Let polkit ask for a password.
    #[arg(long, global = true)]
    interactive: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
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
    /// Capture packets in a container's network namespace and write pcap to stdout:
    /// `dindhelperctl capture web --filter 'tcp port 80' | tcpdump -r -`.
    /// Ctrl-C stops the session; the summary goes to stderr.
    Capture {
        /// Container name or id (`pid:N` and `host` need the capture-host action).
        target: String,
        /// tcpdump filter expression.
        #[arg(long)]
        filter: Option<String>,
        /// Interface inside the target (default: all, like `tcpdump -i any`).
        #[arg(long)]
        interface: Option<String>,
        /// Seconds (default 60, capped by the daemon's max_capture_duration).
        #[arg(long)]
        duration: Option<u64>,
        /// Stop after N packets.
        #[arg(long)]
        count: Option<u64>,
        #[arg(long)]
        snaplen: Option<u32>,
        #[arg(long)]
        instance: Option<String>,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Create NAME of SIZE (bytes, or with K/M/G/T suffix: 512M, 2G).
    Create {
        name: String,
        size: String,
    },
    Delete {
        name: String,
    },
}

#[derive(clap::Args)]
struct AttachFlags {
    #[arg(long)]
    read_only: bool,
    /// Attach without partition scanning (Rescan then answers NotSupported).
    #[arg(long)]
    no_partscan: bool,
    #[arg(long)]
    offset: Option<u64>,
    #[arg(long)]
    size: Option<u64>,
    #[arg(long)]
    instance: Option<String>,
}

#[derive(Subcommand)]
enum LoopCmd {
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
}

fn parse_size(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some(c @ ('K' | 'k' | 'M' | 'm' | 'G' | 'g' | 'T' | 't')) => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                _ => 40,
            };
            (&s[..s.len() - 1], 1u64 << shift)
        }
        _ => (s, 1),
    };
    let n: u64 = num.parse().with_context(|| format!("bad size {s:?}"))?;
    n.checked_mul(mult)
        .with_context(|| format!("size {s:?} is too large"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dindhelperctl: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let conn = match &cli.bus_address {
        Some(a) => {
            zbus::connection::Builder::address(a.as_str())?
                .build()
                .await
        }
        None => zbus::Connection::system().await,
    }
    .context("connecting to the bus")?;
    let m = ManagerProxy::new(&conn).await?;
    let mut opts: HashMap<&str, Value<'_>> = HashMap::new();
    if cli.interactive {
        opts.insert("interactive", Value::Bool(true));
    }
    match cli.cmd {
        Cmd::List => {
            println!("IMAGES");
            for (_, name, size, uid, dev) in m.list_images().await? {
                println!("  {name:<24} {size:>14} uid={uid:<6} {dev}");
            }
            println!("LOOP DEVICES");
            for (_, dev, file, size, ro, uid, inst) in m.list_loops().await? {
                let ro = if ro { "ro" } else { "rw" };
                println!("  {dev:<12} {size:>14} {ro} uid={uid:<6} {inst:<12} {file}");
            }
        }
        Cmd::Image(ImageCmd::Create { name, size }) => {
            let path = m.create_image(&name, parse_size(&size)?, opts).await?;
            println!("{path}");
        }
        Cmd::Image(ImageCmd::Delete { name }) => m.delete_image(&name, opts).await?,
        Cmd::Loop(LoopCmd::Attach { name, file, flags }) => {
            if flags.read_only {
                opts.insert("read_only", Value::Bool(true));
            }
            if flags.no_partscan {
                opts.insert("partscan", Value::Bool(false));
            }
            if let Some(o) = flags.offset {
                opts.insert("offset", Value::U64(o));
            }
            if let Some(s) = flags.size {
                opts.insert("size", Value::U64(s));
            }
            if let Some(i) = flags.instance {
                opts.insert("instance", Value::from(i));
            }
            let (_, dev) = match (name, file) {
                (Some(n), None) => m.attach_image(&n, opts).await?,
                (None, Some(p)) => {
                    // Opened with the caller's own rights; read-write unless --read-only.
                    let f = std::fs::OpenOptions::new()
                        .read(true)
                        .write(!flags.read_only)
                        .open(&p)
                        .or_else(|e| {
                            if flags.read_only {
                                Err(e)
                            } else {
                                std::fs::File::open(&p)
                            }
                        })
                        .with_context(|| format!("opening {}", p.display()))?;
                    use std::os::fd::AsFd;
                    m.attach_fd(f.as_fd().into(), opts).await?
                }
                _ => bail!("give an image NAME or --file PATH"),
            };
            println!("{dev}");
        }
        Cmd::Loop(LoopCmd::Detach { device }) => m.detach(&device, opts).await?,
        Cmd::Capture {
            target,
            filter,
            interface,
            duration,
            count,
            snaplen,
            instance,
        } => {
            if let Some(f) = filter {
                opts.insert("filter", Value::from(f));
            }
            if let Some(i) = interface {
                opts.insert("interface", Value::from(i));
            }
            if let Some(d) = duration {
                opts.insert("duration", Value::U64(d));
            }
            if let Some(c) = count {
                opts.insert("max_packets", Value::U64(c));
            }
            if let Some(s) = snaplen {
                opts.insert("snaplen", Value::U32(s));
            }
            if let Some(i) = instance {
                opts.insert("instance", Value::from(i));
            }
            capture(&conn, &target, opts).await?;
        }
        Cmd::Rescan { device } => {
            for (n, start, size, ty, name, uuid, node, maj, min) in m.rescan(&device, opts).await? {
                println!("{node} {n} start={start} size={size} type={ty} name={name:?} uuid={uuid} dev={maj}:{min}");
            }
        }
    }
    Ok(())
}

/// StartCaptureFd with our stdout; wait for the session's Finished signal (Ctrl-C: Stop).
async fn capture(
    conn: &zbus::Connection,
    target: &str,
    opts: HashMap<&str, Value<'_>>,
) -> anyhow::Result<()> {
    use futures_util::StreamExt;
    use std::io::IsTerminal;
    use std::os::fd::AsFd;
    let stdout = std::io::stdout();
    if stdout.is_terminal() {
        bail!("stdout is a terminal: pipe the pcap into a reader (| tcpdump -r -) or a file");
    }
    let caps = CapturesProxy::new(conn).await?;
    // Subscribe before starting, so a short session's signal is not missed.
    let mut finished = caps.receive_finished().await?;
    let session = caps
        .start_capture_fd(target, stdout.as_fd().into(), opts)
        .await?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut stopping = false;
    loop {
        let interrupted = tokio::select! {
            sig = finished.next() => {
                let Some(sig) = sig else { bail!("the bus connection closed") };
                let a = sig.args()?;
                if a.session != session {
                    continue;
                }
                eprintln!(
                    "dindhelperctl: {} packets, {} bytes, {} dropped by the kernel; ended: {}",
                    a.packets, a.bytes, a.dropped, a.reason
                );
                // A reader that went away (tcpdump -c N) is a normal end for a pipe.
                if a.reason.starts_with("error") && !a.reason.contains("Broken pipe") {
                    bail!("capture failed: {}", a.reason);
                }
                return Ok(());
            }
            _ = sigint.recv(), if !stopping => true,
            _ = sigterm.recv(), if !stopping => true,
        };
        if interrupted {
            stopping = true;
            let c = CaptureProxy::builder(conn)
                .path(session.clone())?
                .build()
                .await?;
            c.stop(HashMap::new()).await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
