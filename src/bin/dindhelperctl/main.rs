//! `dindhelperctl`: the operator's client for dindhelperd, one subcommand per D-Bus method
//! (images, loops, rescan, ports, instances, exposures, captures) plus `monitor`, human
//! tables or `--json`, exit codes per error class (`exit.rs`), and the completions and man
//! page generated from the same clap definition (`cli.rs`).
//!
//! Unlike busctl it can pass file descriptors (`loop attach --file PATH` opens the file as
//! the invoking user and hands the fd over, so the daemon never resolves a path the caller
//! wrote; `capture TARGET` hands over its stdout).
//!
//! Calls are made on the message level (`Client::call`) with typed bodies rather than
//! generated proxies: one place that names the service, and methods other helpers add to
//! the daemon (RevokeFromContainer, ListExposures, DeleteCapture) can be called before
//! their Rust types exist here; an older daemon answers UnknownMethod (exit 11).

mod cli;
mod exit;
mod output;

use anyhow::{bail, Context};
use clap::{CommandFactory, Parser};
use cli::*;
use output::{result, to_json, Table};
use serde_json::{json, Value as Json};
use std::collections::HashMap;
use std::path::PathBuf;
use zbus::zvariant::{DynamicDeserialize, DynamicType, OwnedObjectPath, Value};

const SERVICE: &str = "org.dindhelper1";
const ROOT: &str = "/org/dindhelper1";
const MANAGER: &str = "org.dindhelper1.Manager";
const PORTS: &str = "org.dindhelper1.Ports";
const INSTANCES: &str = "org.dindhelper1.Instances";
const CAPTURES: &str = "org.dindhelper1.Captures";
const CAPTURE: &str = "org.dindhelper1.Capture";
const DEVICES: &str = "org.dindhelper1.Devices";

type Opts = HashMap<String, Value<'static>>;
type LoopRow = (OwnedObjectPath, String, String, u64, bool, u32, String);
type ImageRow = (OwnedObjectPath, String, u64, u32, String);
// The rows the bus layer answers with, by the types it exports (one definition).
use dindhelper::bus::capture::CaptureRow;
use dindhelper::bus::devices::ExposureRow;
use dindhelper::bus::instances::InstanceRow;
use dindhelper::bus::objects::PartitionTuple as PartTuple;
use dindhelper::bus::ports::MappingTuple as MappingRow;

struct Client {
    conn: zbus::Connection,
    json: bool,
    interactive: bool,
}

impl Client {
    async fn call<B, R>(&self, path: &str, iface: &str, method: &str, body: &B) -> anyhow::Result<R>
    where
        B: serde::Serialize + DynamicType,
        R: for<'d> DynamicDeserialize<'d>,
    {
        let reply = self
            .conn
            .call_method(Some(SERVICE), path, Some(iface), method, body)
            .await
            .map_err(anyhow::Error::from)
            .with_context(|| format!("{iface}.{method}"))?;
        let r = reply
            .body()
            .deserialize::<R>()
            .with_context(|| format!("{iface}.{method}: unexpected reply"))?;
        Ok(r)
    }

    /// The common options (`interactive`).
    fn opts(&self) -> Opts {
        let mut o = Opts::new();
        if self.interactive {
            o.insert("interactive".into(), Value::Bool(true));
        }
        o
    }
}

pub fn parse_size(s: &str) -> anyhow::Result<u64> {
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
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dindhelperctl: {e:#}");
            exit::code(&e)
        }
    }
}

async fn connect(addr: &Option<String>) -> anyhow::Result<zbus::Connection> {
    let c = match addr {
        Some(a) => {
            zbus::connection::Builder::address(a.as_str())?
                .build()
                .await
        }
        None => zbus::Connection::system().await,
    };
    c.map_err(anyhow::Error::from).context(exit::Unreachable)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // Commands that need no bus.
    match &cli.cmd {
        Cmd::Completions { shell } => {
            let mut cmd = Cli::command();
            let sh = match shell {
                Shell::Bash => clap_complete::Shell::Bash,
                Shell::Zsh => clap_complete::Shell::Zsh,
                Shell::Fish => clap_complete::Shell::Fish,
            };
            clap_complete::generate(sh, &mut cmd, "dindhelperctl", &mut std::io::stdout());
            return Ok(());
        }
        Cmd::Man { dir: None } => {
            clap_mangen::Man::new(Cli::command())
                .render(&mut std::io::stdout())
                .context("writing the man page")?;
            return Ok(());
        }
        Cmd::Man { dir: Some(dir) } => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(Cli::command(), dir)
                .with_context(|| format!("writing the man pages into {}", dir.display()))?;
            return Ok(());
        }
        _ => {}
    }
    let c = Client {
        conn: connect(&cli.bus_address).await?,
        json: cli.json,
        interactive: cli.interactive,
    };
    match cli.cmd {
        Cmd::Completions { .. } | Cmd::Man { .. } => unreachable!("handled above"),
        Cmd::List => {
            if c.json {
                let images = images_table(&c).await?.json();
                let loops = loops_table(&c).await?.json();
                println!("{}", json!({"images": images, "loops": loops}));
            } else {
                println!("IMAGES");
                images_table(&c).await?.print(false);
                println!();
                println!("LOOP DEVICES");
                loops_table(&c).await?.print(false);
            }
        }
        Cmd::Image(cmd) => image(&c, cmd).await?,
        Cmd::Loop(cmd) => loop_cmd(&c, cmd).await?,
        Cmd::Rescan { device } => {
            let parts: Vec<PartTuple> = c
                .call(ROOT, MANAGER, "Rescan", &(device.as_str(), c.opts()))
                .await?;
            let mut t = Table::new(&[
                "node", "number", "start", "size", "type", "name", "uuid", "dev",
            ]);
            for (n, start, size, ty, name, uuid, node, maj, min) in parts {
                t.row(vec![
                    node.into(),
                    n.into(),
                    start.into(),
                    size.into(),
                    ty.into(),
                    name.into(),
                    uuid.into(),
                    format!("{maj}:{min}").into(),
                ]);
            }
            t.print(c.json);
        }
        Cmd::Port(cmd) => port(&c, cmd).await?,
        Cmd::Instance(cmd) => instance(&c, cmd).await?,
        Cmd::Expose {
            device,
            container,
            as_name,
        } => {
            let mut o = c.opts();
            if let Some(a) = as_name {
                o.insert("as".into(), Value::from(a));
            }
            let (created, removed): (Vec<String>, Vec<String>) = c
                .call(
                    ROOT,
                    DEVICES,
                    "ExposeToContainer",
                    &(device.as_str(), container.as_str(), o),
                )
                .await?;
            result(
                c.json,
                &[("created", json!(created)), ("removed", json!(removed))],
            );
        }
        Cmd::Revoke {
            device,
            container,
            force,
        } => {
            let mut o = c.opts();
            if force {
                o.insert("force".into(), Value::Bool(true));
            }
            let done: Vec<String> = c
                .call(
                    ROOT,
                    DEVICES,
                    "RevokeFromContainer",
                    &(device.as_str(), container.as_str(), o),
                )
                .await?;
            result(c.json, &[("done", json!(done))]);
        }
        Cmd::Exposures => {
            let rows: Vec<ExposureRow> = c.call(ROOT, DEVICES, "ListExposures", &()).await?;
            let mut t = Table::new(&[
                "device",
                "container name",
                "container id",
                "grant",
                "nodes",
                "rules",
            ]);
            for (_, dev, cid, name, grant, nodes, rules) in rows {
                t.row(vec![
                    dev.into(),
                    name.into(),
                    cid.into(),
                    grant.into(),
                    json!(nodes),
                    json!(rules),
                ]);
            }
            t.print(c.json);
        }
        Cmd::Capture(args) => capture_cmd(&c, args).await?,
        Cmd::Monitor => monitor(&c).await?,
    }
    Ok(())
}

// ---- images and loops ---------------------------------------------------------------

async fn images_table(c: &Client) -> anyhow::Result<Table> {
    let rows: Vec<ImageRow> = c.call(ROOT, MANAGER, "ListImages", &()).await?;
    let mut t = Table::new(&["name", "size", "owner uid", "device", "object"]);
    for (o, name, size, uid, dev) in rows {
        t.row(vec![
            name.into(),
            size.into(),
            uid.into(),
            dev.into(),
            o.as_str().into(),
        ]);
    }
    Ok(t)
}

async fn loops_table(c: &Client) -> anyhow::Result<Table> {
    let rows: Vec<LoopRow> = c.call(ROOT, MANAGER, "ListLoops", &()).await?;
    let mut t = Table::new(&[
        "device",
        "size",
        "read only",
        "owner uid",
        "instance",
        "backing file",
    ]);
    for (_, dev, file, size, ro, uid, inst) in rows {
        t.row(vec![
            dev.into(),
            size.into(),
            ro.into(),
            uid.into(),
            inst.into(),
            file.into(),
        ]);
    }
    Ok(t)
}

async fn image(c: &Client, cmd: ImageCmd) -> anyhow::Result<()> {
    match cmd {
        ImageCmd::Create {
            name,
            size,
            owner_uid,
        } => {
            let mut o = c.opts();
            if let Some(u) = owner_uid {
                o.insert("owner_uid".into(), Value::U32(u));
            }
            let path: OwnedObjectPath = c
                .call(
                    ROOT,
                    MANAGER,
                    "CreateImage",
                    &(name.as_str(), parse_size(&size)?, o),
                )
                .await?;
            result(c.json, &[("image", path.as_str().into())]);
        }
        ImageCmd::Delete { name, owner_uid } => {
            let mut o = c.opts();
            if let Some(u) = owner_uid {
                o.insert("owner_uid".into(), Value::U32(u));
            }
            let () = c
                .call(ROOT, MANAGER, "DeleteImage", &(name.as_str(), o))
                .await?;
        }
        ImageCmd::List => images_table(c).await?.print(c.json),
    }
    Ok(())
}

async fn loop_cmd(c: &Client, cmd: LoopCmd) -> anyhow::Result<()> {
    match cmd {
        LoopCmd::Attach { name, file, flags } => {
            let mut o = c.opts();
            if flags.read_only {
                o.insert("read_only".into(), Value::Bool(true));
            }
            if flags.no_partscan {
                o.insert("partscan".into(), Value::Bool(false));
            }
            if let Some(v) = flags.offset {
                o.insert("offset".into(), Value::U64(v));
            }
            if let Some(v) = flags.size {
                o.insert("size".into(), Value::U64(v));
            }
            if let Some(i) = flags.instance {
                o.insert("instance".into(), Value::from(i));
            }
            let (obj, dev): (OwnedObjectPath, String) = match (name, file) {
                (Some(n), None) => {
                    c.call(ROOT, MANAGER, "AttachImage", &(n.as_str(), o))
                        .await?
                }
                (None, Some(p)) => {
                    let f = open_for_attach(&p, flags.read_only)?;
                    use std::os::fd::AsFd;
                    let fd = zbus::zvariant::Fd::from(f.as_fd());
                    c.call(ROOT, MANAGER, "AttachFd", &(fd, o)).await?
                }
                _ => bail!("give an image NAME or --file PATH"),
            };
            if c.json {
                result(
                    true,
                    &[("device", dev.into()), ("loop", obj.as_str().into())],
                );
            } else {
                println!("{dev}");
            }
        }
        LoopCmd::Detach { device } => {
            let () = c
                .call(ROOT, MANAGER, "Detach", &(device.as_str(), c.opts()))
                .await?;
        }
        LoopCmd::List => loops_table(c).await?.print(c.json),
    }
    Ok(())
}

/// Opened with the caller's own rights; read-write unless --read-only (falls back to
/// read-only when the caller may only read it).
fn open_for_attach(p: &PathBuf, read_only: bool) -> anyhow::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(p)
        .or_else(|e| {
            if read_only {
                Err(e)
            } else {
                std::fs::File::open(p)
            }
        })
        .with_context(|| format!("opening {}", p.display()))
}

// ---- ports --------------------------------------------------------------------------

fn port_opts(c: &Client, f: PortFlags) -> Opts {
    let mut o = c.opts();
    if let Some(v) = f.host_ip {
        o.insert("host_ip".into(), Value::from(v));
    }
    if let Some(v) = f.network {
        o.insert("network".into(), Value::from(v));
    }
    if let Some(v) = f.family {
        o.insert("family".into(), Value::from(v));
    }
    if let Some(v) = f.instance {
        o.insert("instance".into(), Value::from(v));
    }
    o
}

/// CONTAINER:PROTO:HOST_PORT:CONTAINER_PORT (the container name cannot hold a colon).
fn parse_port_spec(s: &str) -> anyhow::Result<(String, String, u16, u16)> {
    let parts: Vec<&str> = s.split(':').collect();
    let [container, proto, h, p] = parts[..] else {
        bail!("bad port spec {s:?}: want CONTAINER:PROTO:HOST_PORT:CONTAINER_PORT");
    };
    let h: u16 = h
        .parse()
        .with_context(|| format!("bad host port in {s:?}"))?;
    let p: u16 = p
        .parse()
        .with_context(|| format!("bad container port in {s:?}"))?;
    Ok((container.to_owned(), proto.to_owned(), h, p))
}

fn mapping_id(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

async fn port(c: &Client, cmd: PortCmd) -> anyhow::Result<()> {
    match cmd {
        PortCmd::Publish {
            container,
            proto,
            host_port,
            container_port,
            flags,
        } => {
            let o = port_opts(c, flags);
            let path: OwnedObjectPath = c
                .call(
                    ROOT,
                    PORTS,
                    "Publish",
                    &(
                        container.as_str(),
                        proto.as_str(),
                        host_port,
                        container_port,
                        o,
                    ),
                )
                .await?;
            result(
                c.json,
                &[
                    ("id", mapping_id(path.as_str()).into()),
                    ("mapping", path.as_str().into()),
                ],
            );
        }
        PortCmd::PublishMany { specs, flags } => {
            let entries = specs
                .iter()
                .map(|s| parse_port_spec(s))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let o = port_opts(c, flags);
            let paths: Vec<OwnedObjectPath> =
                c.call(ROOT, PORTS, "PublishMany", &(entries, o)).await?;
            let mut t = Table::new(&["id", "mapping"]);
            for p in paths {
                t.row(vec![mapping_id(p.as_str()).into(), p.as_str().into()]);
            }
            t.print(c.json);
        }
        PortCmd::Unpublish { id } => {
            let () = c
                .call(ROOT, PORTS, "Unpublish", &(id.as_str(), c.opts()))
                .await?;
        }
        PortCmd::UnpublishContainer { container } => {
            let n: u32 = c
                .call(
                    ROOT,
                    PORTS,
                    "UnpublishContainer",
                    &(container.as_str(), c.opts()),
                )
                .await?;
            result(c.json, &[("removed", n.into())]);
        }
        PortCmd::List => {
            let rows: Vec<MappingRow> = c.call(ROOT, PORTS, "ListMappings", &()).await?;
            let mut t = Table::new(&[
                "id",
                "container",
                "proto",
                "host ip",
                "host port",
                "container port",
                "container ip",
                "state",
                "owner uid",
                "instance",
                "network",
                "container id",
            ]);
            for (_, id, cont, cid, proto, hip, hp, cp, cip, net, uid, inst, state) in rows {
                t.row(vec![
                    id.into(),
                    cont.into(),
                    proto.into(),
                    hip.into(),
                    hp.into(),
                    cp.into(),
                    cip.into(),
                    state.into(),
                    uid.into(),
                    inst.into(),
                    net.into(),
                    cid.into(),
                ]);
            }
            t.print(c.json);
        }
    }
    Ok(())
}

// ---- instances ----------------------------------------------------------------------

fn limit_opts(o: &mut Opts, l: LimitFlags) -> anyhow::Result<()> {
    if let Some(v) = l.cpu_quota_percent {
        o.insert("cpu_quota_percent".into(), Value::U32(v));
    }
    if let Some(v) = l.cpu_weight {
        o.insert("cpu_weight".into(), Value::U64(v));
    }
    for (k, v) in [
        ("memory_max", l.memory_max),
        ("memory_high", l.memory_high),
        ("memory_swap_max", l.memory_swap_max),
    ] {
        if let Some(v) = v {
            o.insert(k.into(), Value::U64(parse_size(&v)?));
        }
    }
    if let Some(v) = l.tasks_max {
        o.insert("tasks_max".into(), Value::U64(v));
    }
    if let Some(v) = l.io_weight {
        o.insert("io_weight".into(), Value::U64(v));
    }
    if let Some(v) = l.oom_score_adj {
        o.insert("oom_score_adj".into(), Value::I32(v));
    }
    Ok(())
}

async fn instance(c: &Client, cmd: InstanceCmd) -> anyhow::Result<()> {
    match cmd {
        InstanceCmd::Create {
            name,
            limits,
            docker_cgroup_driver,
        } => {
            let mut o = c.opts();
            limit_opts(&mut o, limits)?;
            if let Some(d) = docker_cgroup_driver {
                o.insert("docker_cgroup_driver".into(), Value::from(d));
            }
            let (obj, slice, parent): (OwnedObjectPath, String, String) = c
                .call(ROOT, INSTANCES, "CreateInstance", &(name.as_str(), o))
                .await?;
            if c.json {
                result(
                    true,
                    &[
                        ("instance", obj.as_str().into()),
                        ("slice_unit", slice.into()),
                        ("cgroup_parent", parent.into()),
                    ],
                );
            } else {
                println!("{parent}");
            }
        }
        InstanceCmd::SetLimits {
            name,
            limits,
            reset,
        } => {
            let mut o = c.opts();
            limit_opts(&mut o, limits)?;
            for k in reset {
                o.insert(k, Value::from("default"));
            }
            let () = c
                .call(ROOT, INSTANCES, "SetLimits", &(name.as_str(), o))
                .await?;
        }
        InstanceCmd::List => {
            let rows: Vec<InstanceRow> = c.call(ROOT, INSTANCES, "ListInstances", &()).await?;
            let mut t = Table::new(&["name", "owner uid", "cgroup parent", "slice unit", "limits"]);
            for (_, name, slice, parent, uid, limits) in rows {
                let mut m = serde_json::Map::new();
                let mut keys: Vec<_> = limits.keys().cloned().collect();
                keys.sort();
                for k in keys {
                    m.insert(k.clone(), to_json(&limits[&k]));
                }
                t.row(vec![
                    name.into(),
                    uid.into(),
                    parent.into(),
                    slice.into(),
                    Json::Object(m),
                ]);
            }
            t.print(c.json);
        }
        InstanceCmd::Adopt { name, container } => {
            let (id, cgroup, pids, adj): (String, String, Vec<u32>, i32) = c
                .call(
                    ROOT,
                    INSTANCES,
                    "AdoptContainer",
                    &(name.as_str(), container.as_str(), c.opts()),
                )
                .await?;
            result(
                c.json,
                &[
                    ("container_id", id.into()),
                    ("cgroup", cgroup.into()),
                    ("pids", json!(pids)),
                    ("oom_score_adj", adj.into()),
                ],
            );
        }
        InstanceCmd::Destroy {
            name,
            force,
            delete_images,
        } => {
            let mut o = c.opts();
            if force {
                o.insert("force".into(), Value::Bool(true));
            }
            if delete_images {
                o.insert("delete_images".into(), Value::Bool(true));
            }
            let done: Vec<String> = c
                .call(ROOT, INSTANCES, "DestroyInstance", &(name.as_str(), o))
                .await?;
            result(c.json, &[("done", json!(done))]);
        }
    }
    Ok(())
}

// ---- signal bodies of any shape ------------------------------------------------------

fn body_json(reply: &zbus::Message) -> anyhow::Result<Vec<Json>> {
    let body = reply.body();
    if body.signature().to_string().is_empty() {
        return Ok(Vec::new());
    }
    let s: zbus::zvariant::Structure<'_> = body.deserialize().context("reply body")?;
    Ok(s.fields().iter().map(to_json).collect())
}

// ---- captures -----------------------------------------------------------------------

fn capture_opts(c: &Client, f: CaptureFlags) -> Opts {
    let mut o = c.opts();
    if let Some(v) = f.filter {
        o.insert("filter".into(), Value::from(v));
    }
    if let Some(v) = f.interface {
        o.insert("interface".into(), Value::from(v));
    }
    if let Some(v) = f.duration {
        // The daemon reads any unsigned integer type.
        o.insert("duration".into(), Value::U64(v));
    }
    if let Some(v) = f.count {
        o.insert("max_packets".into(), Value::U64(v));
    }
    if let Some(v) = f.snaplen {
        o.insert("snaplen".into(), Value::U32(v));
    }
    if let Some(v) = f.instance {
        o.insert("instance".into(), Value::from(v));
    }
    o
}

/// DeleteCapture takes the file's name without `.pcap`; a path (as `capture start` and
/// `capture list` print it) is reduced to that.
fn capture_name(file: &str) -> &str {
    let base = file.rsplit('/').next().unwrap_or(file);
    base.strip_suffix(".pcap").unwrap_or(base)
}

fn session_path(s: &str) -> String {
    if s.starts_with('/') {
        s.to_owned()
    } else {
        format!("{ROOT}/capture/{s}")
    }
}

async fn capture_cmd(c: &Client, args: CaptureArgs) -> anyhow::Result<()> {
    let cmd = match args.cmd {
        Some(cmd) => cmd,
        None => CaptureCmd::Follow {
            target: args.follow.target.context("give a TARGET")?,
            flags: args.follow.flags,
        },
    };
    match cmd {
        CaptureCmd::Follow { target, flags } => {
            let o = capture_opts(c, flags);
            follow(c, &target, o).await?;
        }
        CaptureCmd::Start {
            target,
            flags,
            name,
            max_bytes,
        } => {
            let mut o = capture_opts(c, flags);
            if let Some(n) = name {
                o.insert("name".into(), Value::from(n));
            }
            if let Some(b) = max_bytes {
                o.insert("max_bytes".into(), Value::U64(parse_size(&b)?));
            }
            let (session, path): (OwnedObjectPath, String) = c
                .call(ROOT, CAPTURES, "StartCapture", &(target.as_str(), o))
                .await?;
            result(
                c.json,
                &[("session", session.as_str().into()), ("file", path.into())],
            );
        }
        CaptureCmd::Stop { session } => {
            let () = c
                .call(&session_path(&session), CAPTURE, "Stop", &(c.opts(),))
                .await?;
        }
        CaptureCmd::Delete { file, owner_uid } => {
            let mut o = c.opts();
            if let Some(u) = owner_uid {
                o.insert("owner_uid".into(), Value::U32(u));
            }
            let () = c
                .call(ROOT, CAPTURES, "DeleteCapture", &(capture_name(&file), o))
                .await?;
        }
        CaptureCmd::List => {
            let rows: Vec<CaptureRow> = c.call(ROOT, CAPTURES, "ListCaptures", &()).await?;
            let mut t = Table::new(&[
                "session",
                "target",
                "owner uid",
                "state",
                "instance",
                "file",
            ]);
            for (o, target, uid, state, path, inst) in rows {
                t.row(vec![
                    mapping_id(o.as_str()).into(),
                    target.into(),
                    uid.into(),
                    state.into(),
                    inst.into(),
                    path.into(),
                ]);
            }
            t.print(c.json);
        }
    }
    Ok(())
}

/// StartCaptureFd with our stdout; wait for the session's Finished signal (Ctrl-C: Stop).
/// The bus delivers the daemon's signals to root and group `dindhelper` only (tenants
/// poll, see the README's "What each group sees"), so the session's State is also read
/// once a second: "finished", or the object gone, ends the wait too.
async fn follow(c: &Client, target: &str, opts: Opts) -> anyhow::Result<()> {
    use futures_util::StreamExt;
    use std::io::IsTerminal;
    use std::os::fd::AsFd;
    let stdout = std::io::stdout();
    if stdout.is_terminal() {
        bail!("stdout is a terminal: pipe the pcap into a reader (| tcpdump -r -) or a file");
    }
    // Subscribe before starting, so a short session's signal is not missed.
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender(SERVICE)?
        .interface(CAPTURES)?
        .member("Finished")?
        .build();
    let mut finished = zbus::MessageStream::for_match_rule(rule, &c.conn, None).await?;
    let fd = zbus::zvariant::Fd::from(stdout.as_fd());
    let session: OwnedObjectPath = c
        .call(ROOT, CAPTURES, "StartCaptureFd", &(target, fd, opts))
        .await?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut stopping = false;
    let mut poll = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        let interrupted = tokio::select! {
            _ = poll.tick() => {
                if let Some((packets, bytes, dropped, reason)) = finished_by_poll(c, &session).await {
                    eprintln!(
                        "dindhelperctl: {packets} packets, {bytes} bytes, {dropped} dropped by the kernel; ended: {reason}"
                    );
                    if reason.starts_with("error") && !reason.contains("Broken pipe") {
                        bail!("capture failed: {reason}");
                    }
                    return Ok(());
                }
                continue;
            }
            m = finished.next() => {
                let Some(m) = m else { bail!("the bus connection closed") };
                let m = m?;
                let (s, packets, bytes, dropped, reason): (OwnedObjectPath, u64, u64, u64, String) =
                    m.body().deserialize()?;
                if s != session {
                    continue;
                }
                eprintln!(
                    "dindhelperctl: {packets} packets, {bytes} bytes, {dropped} dropped by the kernel; ended: {reason}"
                );
                // A reader that went away (tcpdump -c N) is a normal end for a pipe.
                if reason.starts_with("error") && !reason.contains("Broken pipe") {
                    bail!("capture failed: {reason}");
                }
                return Ok(());
            }
            _ = sigint.recv(), if !stopping => true,
            _ = sigterm.recv(), if !stopping => true,
        };
        if interrupted {
            stopping = true;
            let () = c
                .call(session.as_str(), CAPTURE, "Stop", &(Opts::new(),))
                .await?;
        }
    }
}

/// The session's end as its properties say (None while it runs): packets, bytes,
/// dropped and reason once State is "finished" (the same numbers Finished carries).
async fn finished_by_poll(
    c: &Client,
    session: &OwnedObjectPath,
) -> Option<(u64, u64, u64, String)> {
    const PROPS: &str = "org.freedesktop.DBus.Properties";
    let get = |name: &'static str| async move {
        let v: anyhow::Result<zbus::zvariant::OwnedValue> = c
            .call(session.as_str(), PROPS, "Get", &(CAPTURE, name))
            .await;
        v.ok()
    };
    let state = get("State").await.and_then(|v| String::try_from(v).ok());
    if state.as_deref() != Some("finished") {
        return None;
    }
    let num = |v: Option<zbus::zvariant::OwnedValue>| v.and_then(|v| u64::try_from(v).ok());
    Some((
        num(get("Packets").await).unwrap_or(0),
        num(get("Bytes").await).unwrap_or(0),
        num(get("Dropped").await).unwrap_or(0),
        get("Reason")
            .await
            .and_then(|v| String::try_from(v).ok())
            .unwrap_or_default(),
    ))
}

// ---- monitor ------------------------------------------------------------------------

/// Every signal the daemon sends, one line each:
/// `<unix time> <object> <Interface>.<Member> <args as JSON>`, or with --json one JSON
/// object per line. PropertiesChanged shows as org.freedesktop.DBus.Properties.
async fn monitor(c: &Client) -> anyhow::Result<()> {
    use futures_util::StreamExt;
    use std::io::Write;
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender(SERVICE)?
        .build();
    let mut stream = zbus::MessageStream::for_match_rule(rule, &c.conn, None).await?;
    // Tell a script reading our output that the subscription is in place.
    eprintln!("dindhelperctl: monitoring {SERVICE} (Ctrl-C ends)");
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let m = tokio::select! {
            m = stream.next() => m,
            _ = sigint.recv() => return Ok(()),
            _ = sigterm.recv() => return Ok(()),
        };
        let Some(m) = m else {
            bail!("the bus connection closed")
        };
        let m = m?;
        let h = m.header();
        let path = h.path().map(|p| p.as_str().to_owned()).unwrap_or_default();
        let iface = h
            .interface()
            .map(|i| i.as_str().to_owned())
            .unwrap_or_default();
        let member = h
            .member()
            .map(|i| i.as_str().to_owned())
            .unwrap_or_default();
        let args = body_json(&m).unwrap_or_default();
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let line = if c.json {
            json!({"time": time, "path": path, "interface": iface, "member": member, "args": args})
                .to_string()
        } else {
            format!("{time:.3} {path} {iface}.{member} {}", Json::Array(args))
        };
        let mut out = std::io::stdout().lock();
        // A reader that went away ends the monitor quietly.
        if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn port_specs() {
        assert_eq!(
            parse_port_spec("web:tcp:8080:80").unwrap(),
            ("web".into(), "tcp".into(), 8080, 80)
        );
        assert!(parse_port_spec("web:tcp:8080").is_err());
        assert!(parse_port_spec("web:tcp:x:80").is_err());
        assert!(parse_port_spec("web:tcp:70000:80").is_err());
    }

    #[test]
    fn capture_names_from_paths() {
        assert_eq!(capture_name("/var/lib/x/captures/0/web-1.pcap"), "web-1");
        assert_eq!(capture_name("web-1"), "web-1");
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn capture_target_shorthand_and_subcommands() {
        let c =
            Cli::try_parse_from(["dindhelperctl", "capture", "web", "--filter", "tcp"]).unwrap();
        let Cmd::Capture(a) = c.cmd else { panic!() };
        assert!(a.cmd.is_none());
        assert_eq!(a.follow.target.as_deref(), Some("web"));
        let c = Cli::try_parse_from(["dindhelperctl", "capture", "list"]).unwrap();
        let Cmd::Capture(a) = c.cmd else { panic!() };
        assert!(matches!(a.cmd, Some(CaptureCmd::List)));
        let c = Cli::try_parse_from(["dindhelperctl", "--json", "port", "list"]).unwrap();
        assert!(c.json);
    }
}
