//! A small Docker Engine API client over a unix socket (HTTP/1.1, one connection per
//! request, `Connection: close`).
//!
//! The socket path is always given explicitly (the daemon's `--docker-host`); DOCKER_HOST
//! is never read. Paths are unversioned: dockerd then answers with its own API version,
//! which covers 20.10 (API 1.41) to 28.x for the few fields used here.
//!
//! Endpoints: `GET /_ping`, `GET /containers/{id}/json`, `GET /containers/json`,
//! `GET /networks/{id}`, `GET /events` (streamed, chunked; one JSON object per line).
//!
//! Limits (dockerd runs as root but is a separate program, reachable by everyone in the
//! `docker` group, and `--docker-host` may name a proxy): a response head is at most
//! [`MAX_HEAD_BYTES`], a body at most [`MAX_BODY_BYTES`], every chunk size is checked
//! against what is left of that before anything is allocated, a chunk must end in CRLF,
//! and one event line of the endless `/events` stream is at most [`MAX_BODY_BYTES`] too.
//! Without them a misbehaving peer made the root daemon allocate without bound (and a
//! chunk size near `usize::MAX` overflowed `size + 2`).
//!
//! `--docker-host` is parsed once, by [`parse_docker_host`]: `unix:///path` or `/path`;
//! anything else is a start-up error naming the flag.
//!
//! Why not bollard: it adds the hyper/http stack (~50 s of a clean debug build on this
//! 2-core machine, measured) for five GET requests; this file is the whole client.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::error::{Classify, Kind};

/// Errors of the Docker client.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("cannot reach dockerd at {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("dockerd at {path}: I/O error on {request}: {source}")]
    Io {
        path: PathBuf,
        request: String,
        source: std::io::Error,
    },
    #[error("dockerd did not answer {request} within {timeout:?}")]
    Timeout { request: String, timeout: Duration },
    #[error("no such {what}: {name}")]
    NotFound { what: &'static str, name: String },
    #[error("dockerd answered {request} with HTTP {status}: {message}")]
    Http {
        request: String,
        status: u16,
        message: String,
    },
    #[error("cannot parse dockerd's answer to {request}: {reason}")]
    Parse { request: String, reason: String },
    #[error("dockerd's answer to {request}: {what} larger than {limit} bytes; refused")]
    TooLarge {
        request: String,
        what: &'static str,
        limit: usize,
    },
}

/// Largest response head (status line + headers) accepted from dockerd.
pub const MAX_HEAD_BYTES: usize = 64 << 10;
/// Largest response body (and largest single event line) accepted from dockerd.
pub const MAX_BODY_BYTES: usize = 16 << 20;
/// Largest chunk-size line (hex size plus extensions).
const MAX_CHUNK_LINE: usize = 1024;

/// `--docker-host` that is neither `unix:///path` nor `/path`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("--docker-host {given:?}: expected unix:///path/to/docker.sock or /path/to/docker.sock (only a unix socket is supported)")]
pub struct DockerHostError {
    pub given: String,
}

/// The one parser of `--docker-host`: `unix:///path` or `/path` → the socket path.
pub fn parse_docker_host(s: &str) -> Result<PathBuf, DockerHostError> {
    let path = s.strip_prefix("unix://").unwrap_or(s);
    let ok = path.starts_with('/')
        && path.len() > 1
        && !path.ends_with('/')
        && !path.bytes().any(|b| b == 0 || b.is_ascii_control());
    if ok {
        Ok(PathBuf::from(path))
    } else {
        Err(DockerHostError {
            given: s.to_owned(),
        })
    }
}

impl Classify for DockerError {
    fn kind(&self) -> Kind {
        match self {
            DockerError::NotFound { .. } => Kind::NotFound,
            _ => Kind::Failed,
        }
    }
}

impl DockerError {
    /// True when dockerd could not be reached (or went away): the caller should retry later.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            DockerError::Connect { .. } | DockerError::Io { .. } | DockerError::Timeout { .. }
        )
    }
}

/// One network a container is attached to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkAttachment {
    pub network_name: String,
    pub network_id: String,
    /// None when the container is not running (no address assigned).
    pub ip: Option<Ipv4Addr>,
    /// `GlobalIPv6Address`: Some only on a network with IPv6 enabled (`--ipv6`).
    pub ip6: Option<std::net::Ipv6Addr>,
    /// Linux bridge of a `bridge`-driver network (`docker0` for the default network);
    /// None for other drivers.
    pub bridge_interface: Option<String>,
}

/// What the ports and capture modules need to know about a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    /// Without the leading `/`.
    pub name: String,
    pub running: bool,
    /// Init pid in the host pid namespace (0 when not running).
    pub pid: u32,
    /// HostConfig.NetworkMode: `default`, `bridge`, `host`, `none`, `container:<id>`, or a
    /// network name.
    pub network_mode: String,
    pub networks: Vec<NetworkAttachment>,
}

/// [`ContainerInfo`] plus the fields only the container resolver needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerDetails {
    pub info: ContainerInfo,
    /// State.Status: created, running, paused, restarting, removing, exited, dead.
    pub status: String,
    /// HostConfig.CgroupParent, "" when unset.
    pub cgroup_parent: String,
    /// HostConfig.DeviceCgroupRules (`--device-cgroup-rule`).
    pub device_cgroup_rules: Vec<String>,
}

/// A port published by Docker itself (`docker run -p`), from `GET /containers/json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedPort {
    pub container_id: String,
    /// Host address ("" or "0.0.0.0" or "::" for all).
    pub ip: String,
    pub public_port: u16,
    pub private_port: u16,
    /// "tcp" / "udp" / "sctp".
    pub protocol: String,
}

/// A container event, or a network event about one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerEvent {
    /// start, die, stop, destroy, restart, …; `network-connect` / `network-disconnect` for
    /// Docker's network events (type `network`, action `connect` / `disconnect`).
    pub action: String,
    pub container_id: String,
    /// Container name (container events only: a network event's `name` is the network's).
    pub container_name: Option<String>,
    /// The network of a `network-connect` / `network-disconnect` event.
    pub network: Option<String>,
}

impl ContainerEvent {
    /// Whether the event can change where a container's traffic must go.
    pub fn is_lifecycle(&self) -> bool {
        matches!(
            self.action.as_str(),
            "start" | "die" | "stop" | "destroy" | "restart" | "kill" | "pause" | "unpause"
        ) || self.action.starts_with("network")
    }
}

/// The client. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Docker {
    socket: PathBuf,
    timeout: Duration,
    /// network id -> bridge interface. A network id is never reused and its bridge name
    /// option cannot change, so this cache is always true.
    bridges: Arc<Mutex<HashMap<String, Option<String>>>>,
}

// ---- raw JSON shapes (only the fields used) ----

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawContainer {
    id: String,
    name: String,
    state: RawState,
    host_config: Option<RawHostConfig>,
    network_settings: Option<RawNetworkSettings>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawState {
    running: bool,
    #[serde(default)]
    pid: i64,
    #[serde(default)]
    status: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawHostConfig {
    #[serde(default)]
    network_mode: String,
    #[serde(default)]
    cgroup_parent: String,
    #[serde(default)]
    device_cgroup_rules: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawNetworkSettings {
    #[serde(default)]
    networks: Option<BTreeMap<String, RawEndpoint>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawEndpoint {
    #[serde(rename = "NetworkID", default)]
    network_id: String,
    #[serde(rename = "IPAddress", default)]
    ip_address: String,
    #[serde(rename = "GlobalIPv6Address", default)]
    global_ipv6_address: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawNetwork {
    #[serde(default)]
    name: String,
    #[serde(rename = "Id", default)]
    id: String,
    #[serde(default)]
    driver: String,
    #[serde(default)]
    options: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawListed {
    id: String,
    #[serde(default)]
    ports: Vec<RawPort>,
}

#[derive(Deserialize)]
struct RawPort {
    #[serde(rename = "IP", default)]
    ip: String,
    #[serde(rename = "PrivatePort", default)]
    private_port: u16,
    #[serde(rename = "PublicPort", default)]
    public_port: u16,
    #[serde(rename = "Type", default)]
    typ: String,
}

#[derive(Deserialize)]
struct RawEvent {
    #[serde(rename = "Type", default)]
    typ: String,
    #[serde(rename = "Action", default)]
    action: String,
    #[serde(rename = "Actor", default)]
    actor: Option<RawActor>,
    #[serde(default)]
    id: Option<String>,
}

#[derive(Deserialize)]
struct RawActor {
    #[serde(rename = "ID", default)]
    id: String,
    #[serde(rename = "Attributes", default)]
    attributes: BTreeMap<String, String>,
}

/// Parsed response head.
struct Head {
    status: u16,
    chunked: bool,
    content_length: Option<usize>,
}

impl Docker {
    /// A client for the socket at `path` (e.g. `/var/run/docker.sock`). Does not connect.
    pub fn new(path: impl Into<PathBuf>) -> Docker {
        Docker {
            socket: path.into(),
            timeout: Duration::from_secs(10),
            bridges: Arc::default(),
        }
    }

    /// From the daemon's `--docker-host` (see [`parse_docker_host`]).
    pub fn from_host(docker_host: &str) -> Result<Docker, DockerHostError> {
        parse_docker_host(docker_host).map(Docker::new)
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Docker {
        self.timeout = timeout;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn open(&self, request: &str) -> Result<BufReader<UnixStream>, DockerError> {
        let mut s =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| DockerError::Connect {
                    path: self.socket.clone(),
                    source,
                })?;
        let req = format!("GET {request} HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| self.io(request, e))?;
        Ok(BufReader::new(s))
    }

    fn io(&self, request: &str, source: std::io::Error) -> DockerError {
        DockerError::Io {
            path: self.socket.clone(),
            request: request.to_owned(),
            source,
        }
    }

    fn too_large(&self, request: &str, what: &'static str, limit: usize) -> DockerError {
        DockerError::TooLarge {
            request: request.to_owned(),
            what,
            limit,
        }
    }

    /// One line (with its `\n`) of at most `*budget` bytes, which it uses up; empty at EOF.
    async fn read_line_within(
        &self,
        r: &mut BufReader<UnixStream>,
        request: &str,
        budget: &mut usize,
        what: &'static str,
        limit: usize,
    ) -> Result<String, DockerError> {
        let mut line = Vec::new();
        loop {
            let buf = r.fill_buf().await.map_err(|e| self.io(request, e))?;
            if buf.is_empty() {
                break;
            }
            let (take, done) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            if take > *budget {
                return Err(self.too_large(request, what, limit));
            }
            *budget -= take;
            line.extend_from_slice(&buf[..take]);
            r.consume(take);
            if done {
                break;
            }
        }
        Ok(String::from_utf8_lossy(&line).into_owned())
    }

    async fn read_head(
        &self,
        r: &mut BufReader<UnixStream>,
        request: &str,
    ) -> Result<Head, DockerError> {
        let mut budget = MAX_HEAD_BYTES;
        let mut line = self
            .read_line_within(r, request, &mut budget, "response head", MAX_HEAD_BYTES)
            .await?;
        let status = parse_status_line(&line).ok_or_else(|| DockerError::Parse {
            request: request.to_owned(),
            reason: format!("bad status line {line:?}"),
        })?;
        let mut head = Head {
            status,
            chunked: false,
            content_length: None,
        };
        loop {
            line = self
                .read_line_within(r, request, &mut budget, "response head", MAX_HEAD_BYTES)
                .await?;
            if line.is_empty() || line == "\r\n" || line == "\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                let v = v.trim();
                if k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
                {
                    head.chunked = true;
                } else if k.eq_ignore_ascii_case("content-length") {
                    head.content_length = v.parse().ok();
                }
            }
        }
        Ok(head)
    }

    /// Reads one chunk of a chunked body and appends it to `out`; false at the last chunk
    /// or EOF. `room`: how many more bytes `out` may take (checked before allocating).
    async fn read_chunk(
        &self,
        r: &mut BufReader<UnixStream>,
        request: &str,
        out: &mut Vec<u8>,
        room: usize,
    ) -> Result<bool, DockerError> {
        let mut budget = MAX_CHUNK_LINE;
        let line = self
            .read_line_within(r, request, &mut budget, "chunk-size line", MAX_CHUNK_LINE)
            .await?;
        if line.is_empty() {
            return Ok(false);
        }
        let size_str = line.trim().split(';').next().unwrap_or("").trim();
        let bad = |reason: String| DockerError::Parse {
            request: request.to_owned(),
            reason,
        };
        if size_str.is_empty() || size_str.len() > 16 {
            return Err(bad(format!("bad chunk size {line:?}")));
        }
        let size = u64::from_str_radix(size_str, 16)
            .map_err(|_| bad(format!("bad chunk size {line:?}")))?;
        if size == 0 {
            return Ok(false);
        }
        if size > room as u64 {
            return Err(self.too_large(request, "body", MAX_BODY_BYTES));
        }
        let size = size as usize;
        let start = out.len();
        out.resize(start + size, 0);
        r.read_exact(&mut out[start..])
            .await
            .map_err(|e| self.io(request, e))?;
        let mut crlf = [0u8; 2];
        r.read_exact(&mut crlf)
            .await
            .map_err(|e| self.io(request, e))?;
        if &crlf != b"\r\n" {
            return Err(bad("chunk data not followed by CRLF".into()));
        }
        Ok(true)
    }

    async fn get_inner(&self, request: &str) -> Result<(u16, Vec<u8>), DockerError> {
        let mut r = self.open(request).await?;
        let head = self.read_head(&mut r, request).await?;
        let mut body = Vec::new();
        if head.chunked {
            loop {
                let room = MAX_BODY_BYTES - body.len();
                if !self.read_chunk(&mut r, request, &mut body, room).await? {
                    break;
                }
            }
        } else if let Some(len) = head.content_length {
            if len > MAX_BODY_BYTES {
                return Err(self.too_large(request, "body", MAX_BODY_BYTES));
            }
            body.resize(len, 0);
            r.read_exact(&mut body)
                .await
                .map_err(|e| self.io(request, e))?;
        } else {
            (&mut r)
                .take(MAX_BODY_BYTES as u64 + 1)
                .read_to_end(&mut body)
                .await
                .map_err(|e| self.io(request, e))?;
            if body.len() > MAX_BODY_BYTES {
                return Err(self.too_large(request, "body", MAX_BODY_BYTES));
            }
        }
        Ok((head.status, body))
    }

    /// GET with the client timeout; returns the status and body.
    async fn get(&self, request: &str) -> Result<(u16, Vec<u8>), DockerError> {
        tokio::time::timeout(self.timeout, self.get_inner(request))
            .await
            .map_err(|_| DockerError::Timeout {
                request: request.to_owned(),
                timeout: self.timeout,
            })?
    }

    async fn get_json<T: for<'de> Deserialize<'de>>(
        &self,
        request: &str,
        what: &'static str,
        name: &str,
    ) -> Result<T, DockerError> {
        let (status, body) = self.get(request).await?;
        match status {
            200 => serde_json::from_slice(&body).map_err(|e| DockerError::Parse {
                request: request.to_owned(),
                reason: e.to_string(),
            }),
            404 => Err(DockerError::NotFound {
                what,
                name: name.to_owned(),
            }),
            _ => Err(DockerError::Http {
                request: request.to_owned(),
                status,
                message: error_message(&body),
            }),
        }
    }

    /// `GET /_ping`: Ok when dockerd answers.
    pub async fn ping(&self) -> Result<(), DockerError> {
        let (status, body) = self.get("/_ping").await?;
        if status == 200 {
            Ok(())
        } else {
            Err(DockerError::Http {
                request: "/_ping".into(),
                status,
                message: String::from_utf8_lossy(&body).into_owned(),
            })
        }
    }

    /// Resolve a container by name or id (any unique id prefix).
    pub async fn inspect(&self, name_or_id: &str) -> Result<ContainerInfo, DockerError> {
        Ok(self.inspect_details(name_or_id).await?.info)
    }

    /// [`Docker::inspect`] with the state, cgroup parent and device cgroup rules.
    pub async fn inspect_details(&self, name_or_id: &str) -> Result<ContainerDetails, DockerError> {
        if name_or_id.is_empty()
            || !name_or_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        {
            // Docker names are [a-zA-Z0-9][a-zA-Z0-9_.-]*; anything else cannot exist and
            // must not reach the request line.
            return Err(DockerError::NotFound {
                what: "container",
                name: name_or_id.to_owned(),
            });
        }
        let raw: RawContainer = self
            .get_json(
                &format!("/containers/{name_or_id}/json"),
                "container",
                name_or_id,
            )
            .await?;
        let mut networks = Vec::new();
        if let Some(nets) = raw.network_settings.and_then(|n| n.networks) {
            for (name, ep) in nets {
                let bridge = self.bridge_of(&name, &ep.network_id).await?;
                networks.push(NetworkAttachment {
                    ip: ep.ip_address.parse().ok(),
                    ip6: ep.global_ipv6_address.parse().ok(),
                    network_name: name,
                    network_id: ep.network_id,
                    bridge_interface: bridge,
                });
            }
        }
        let host = raw.host_config.unwrap_or(RawHostConfig {
            network_mode: String::new(),
            cgroup_parent: String::new(),
            device_cgroup_rules: None,
        });
        Ok(ContainerDetails {
            info: ContainerInfo {
                id: raw.id,
                name: raw.name.trim_start_matches('/').to_owned(),
                running: raw.state.running,
                pid: u32::try_from(raw.state.pid).unwrap_or(0),
                network_mode: host.network_mode,
                networks,
            },
            status: raw.state.status,
            cgroup_parent: host.cgroup_parent,
            device_cgroup_rules: host.device_cgroup_rules.unwrap_or_default(),
        })
    }

    /// Linux bridge interface of a network: the `com.docker.network.bridge.name` option,
    /// `docker0` for the default `bridge` network, `br-<id[..12]>` for other bridge
    /// networks (dockerd's naming), None for non-bridge drivers.
    async fn bridge_of(&self, name: &str, id: &str) -> Result<Option<String>, DockerError> {
        if name == "host" || name == "none" {
            return Ok(None);
        }
        if let Some(b) = self.bridges.lock().unwrap().get(id) {
            return Ok(b.clone());
        }
        let key = if id.is_empty() { name } else { id };
        let raw: RawNetwork = match self
            .get_json(&format!("/networks/{key}"), "network", key)
            .await
        {
            Ok(r) => r,
            Err(DockerError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let b = bridge_name(&raw);
        if !id.is_empty() && raw.id == id {
            self.bridges
                .lock()
                .unwrap()
                .insert(id.to_owned(), b.clone());
        }
        Ok(b)
    }

    /// Ports Docker itself publishes, over all running containers.
    pub async fn published_ports(&self) -> Result<Vec<PublishedPort>, DockerError> {
        let list: Vec<RawListed> = self.get_json("/containers/json", "containers", "").await?;
        Ok(list
            .into_iter()
            .flat_map(|c| {
                let id = c.id;
                c.ports
                    .into_iter()
                    .filter(|p| p.public_port != 0)
                    .map(move |p| PublishedPort {
                        container_id: id.clone(),
                        ip: p.ip,
                        public_port: p.public_port,
                        private_port: p.private_port,
                        protocol: p.typ,
                    })
            })
            .collect())
    }

    /// Subscribe to container events. The stream ends (None / error) when dockerd goes away.
    pub async fn events(&self) -> Result<EventStream, DockerError> {
        // filters={"type":["container","network"]}, URL-encoded: network connect and
        // disconnect change where a container's published ports must point.
        let request = "/events?filters=%7B%22type%22%3A%5B%22container%22%2C%22network%22%5D%7D";
        let mut r = tokio::time::timeout(self.timeout, self.open(request))
            .await
            .map_err(|_| DockerError::Timeout {
                request: request.into(),
                timeout: self.timeout,
            })??;
        let head = tokio::time::timeout(self.timeout, self.read_head(&mut r, request))
            .await
            .map_err(|_| DockerError::Timeout {
                request: request.into(),
                timeout: self.timeout,
            })??;
        if head.status != 200 {
            return Err(DockerError::Http {
                request: request.into(),
                status: head.status,
                message: String::new(),
            });
        }
        Ok(EventStream {
            docker: self.clone(),
            reader: r,
            chunked: head.chunked,
            buf: Vec::new(),
            done: false,
        })
    }
}

/// A live `GET /events` stream.
pub struct EventStream {
    docker: Docker,
    reader: BufReader<UnixStream>,
    chunked: bool,
    buf: Vec<u8>,
    done: bool,
}

impl EventStream {
    /// Next container event; Ok(None) when dockerd closed the stream.
    pub async fn next(&mut self) -> Result<Option<ContainerEvent>, DockerError> {
        const REQ: &str = "/events";
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                if let Some(ev) = parse_event(&line) {
                    return Ok(Some(ev));
                }
                continue;
            }
            if self.done {
                return Ok(None);
            }
            // Every complete line was taken above: what is buffered is one unfinished line.
            let room = MAX_BODY_BYTES.saturating_sub(self.buf.len());
            if room == 0 {
                return Err(self.docker.too_large(REQ, "event line", MAX_BODY_BYTES));
            }
            if self.chunked {
                if !self
                    .docker
                    .read_chunk(&mut self.reader, REQ, &mut self.buf, room)
                    .await
                    .map_err(|e| match e {
                        DockerError::TooLarge { .. } => {
                            self.docker.too_large(REQ, "event line", MAX_BODY_BYTES)
                        }
                        e => e,
                    })?
                {
                    self.done = true;
                }
            } else {
                let mut tmp = [0u8; 4096];
                let n = self
                    .reader
                    .read(&mut tmp)
                    .await
                    .map_err(|e| self.docker.io(REQ, e))?;
                if n == 0 {
                    self.done = true;
                } else {
                    self.buf.extend_from_slice(&tmp[..n]);
                }
            }
            if self.done && !self.buf.is_empty() {
                self.buf.push(b'\n');
            }
        }
    }
}

fn parse_status_line(line: &str) -> Option<u16> {
    let mut it = line.split_whitespace();
    let proto = it.next()?;
    if !proto.starts_with("HTTP/1.") {
        return None;
    }
    it.next()?.parse().ok()
}

fn error_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct M {
        message: String,
    }
    serde_json::from_slice::<M>(body)
        .map(|m| m.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).trim().to_owned())
}

fn bridge_name(raw: &RawNetwork) -> Option<String> {
    if raw.driver != "bridge" {
        return None;
    }
    if let Some(n) = raw
        .options
        .as_ref()
        .and_then(|o| o.get("com.docker.network.bridge.name"))
    {
        return Some(n.clone());
    }
    if raw.name == "bridge" {
        return Some("docker0".into());
    }
    raw.id.get(..12).map(|s| format!("br-{s}"))
}

fn parse_event(line: &[u8]) -> Option<ContainerEvent> {
    let raw: RawEvent = serde_json::from_slice(line).ok()?;
    if raw.typ == "network" {
        // {"Type":"network","Action":"connect","Actor":{"ID":<network id>,
        //  "Attributes":{"container":<container id>,"name":<network name>,"type":"bridge"}}}
        let action = match raw.action.as_str() {
            "connect" => "network-connect",
            "disconnect" => "network-disconnect",
            _ => return None,
        };
        let mut attrs = raw.actor?.attributes;
        let container_id = attrs.remove("container").filter(|c| !c.is_empty())?;
        return Some(ContainerEvent {
            action: action.into(),
            container_id,
            container_name: None,
            network: attrs.remove("name"),
        });
    }
    if raw.typ != "container" && !raw.typ.is_empty() {
        return None;
    }
    let (id, attrs) = match raw.actor {
        Some(a) if !a.id.is_empty() => (a.id, a.attributes),
        _ => (raw.id?, BTreeMap::new()),
    };
    // "exec_start: sh" style actions keep only the verb.
    let action = raw.action.split(':').next().unwrap_or_default().to_owned();
    Some(ContainerEvent {
        action,
        container_id: id,
        container_name: attrs.get("name").cloned(),
        network: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_host_has_one_parser() {
        for (given, path) in [
            ("unix:///var/run/docker.sock", "/var/run/docker.sock"),
            ("/var/run/docker.sock", "/var/run/docker.sock"),
            ("unix:///run/dh x/d.sock", "/run/dh x/d.sock"),
            ("/d", "/d"),
        ] {
            assert_eq!(
                parse_docker_host(given).unwrap(),
                PathBuf::from(path),
                "{given}"
            );
            assert_eq!(Docker::from_host(given).unwrap().socket(), Path::new(path));
        }
        for bad in [
            "",
            "/",
            "unix://",
            "unix:///",
            "unix://var/run/docker.sock",
            "var/run/docker.sock",
            "tcp://127.0.0.1:2375",
            "ssh://user@host",
            "npipe:////./pipe/docker_engine",
            "fd://",
            "/run/docker.sock/",
            "/run/doc\nker.sock",
        ] {
            let e = parse_docker_host(bad).unwrap_err();
            assert!(e.to_string().starts_with("--docker-host "), "{e}");
            assert!(e.to_string().contains("unix://"), "{e}");
        }
    }

    #[test]
    fn status_line() {
        assert_eq!(parse_status_line("HTTP/1.1 404 Not Found\r\n"), Some(404));
        assert_eq!(parse_status_line("garbage"), None);
    }

    #[test]
    fn event_parsing() {
        let l = br#"{"status":"start","id":"abc","from":"bb:latest","Type":"container","Action":"start","Actor":{"ID":"abc","Attributes":{"image":"bb:latest","name":"web"}},"scope":"local","time":1,"timeNano":1}"#;
        let e = parse_event(l).unwrap();
        assert_eq!(e.action, "start");
        assert_eq!(e.container_id, "abc");
        assert_eq!(e.container_name.as_deref(), Some("web"));
        assert!(e.is_lifecycle());
        let x = br#"{"Type":"container","Action":"exec_start: sh -c x","Actor":{"ID":"abc","Attributes":{}}}"#;
        let e = parse_event(x).unwrap();
        assert_eq!(e.action, "exec_start");
        assert!(!e.is_lifecycle());
        // a network event without a container attribute (e.g. `docker network create`)
        assert!(
            parse_event(br#"{"Type":"network","Action":"connect","Actor":{"ID":"n"}}"#).is_none()
        );
        assert!(parse_event(
            br#"{"Type":"network","Action":"create","Actor":{"ID":"n","Attributes":{"name":"net2","type":"bridge"}}}"#
        )
        .is_none());
        // what dockerd 20.10 sends for `docker network connect net2 web`
        let c = br#"{"Type":"network","Action":"connect","Actor":{"ID":"9f0e","Attributes":{"container":"abc123","name":"net2","type":"bridge"}},"scope":"local","time":1,"timeNano":1}"#;
        let e = parse_event(c).unwrap();
        assert_eq!(e.action, "network-connect");
        assert_eq!(e.container_id, "abc123");
        assert_eq!(e.container_name, None, "the event's name is the network's");
        assert_eq!(e.network.as_deref(), Some("net2"));
        assert!(e.is_lifecycle());
        let d = br#"{"Type":"network","Action":"disconnect","Actor":{"ID":"9f0e","Attributes":{"container":"abc123","name":"net2","type":"bridge"}}}"#;
        let e = parse_event(d).unwrap();
        assert_eq!(e.action, "network-disconnect");
        assert!(e.is_lifecycle());
    }

    #[test]
    fn bridge_names() {
        let mk = |name: &str, driver: &str, opt: Option<&str>| RawNetwork {
            name: name.into(),
            id: "0123456789abcdef".into(),
            driver: driver.into(),
            options: opt.map(|o| {
                [("com.docker.network.bridge.name".to_string(), o.to_string())]
                    .into_iter()
                    .collect()
            }),
        };
        assert_eq!(
            bridge_name(&mk("bridge", "bridge", Some("docker0"))).as_deref(),
            Some("docker0")
        );
        assert_eq!(
            bridge_name(&mk("bridge", "bridge", None)).as_deref(),
            Some("docker0")
        );
        assert_eq!(
            bridge_name(&mk("lab", "bridge", None)).as_deref(),
            Some("br-0123456789ab")
        );
        assert_eq!(bridge_name(&mk("ov", "overlay", None)), None);
    }

    #[test]
    fn container_json() {
        let j = br#"{"Id":"abc","Name":"/web","State":{"Running":true,"Pid":42,"Status":"running"},"HostConfig":{"NetworkMode":"default","CgroupParent":"/dind/a","DeviceCgroupRules":["b 7:* rmw"]},"NetworkSettings":{"Networks":{"bridge":{"NetworkID":"n1","IPAddress":"172.17.0.2"}}}}"#;
        let r: RawContainer = serde_json::from_slice(j).unwrap();
        assert_eq!(r.state.pid, 42);
        assert_eq!(r.state.status, "running");
        let h = r.host_config.as_ref().unwrap();
        assert_eq!(h.cgroup_parent, "/dind/a");
        assert_eq!(
            h.device_cgroup_rules.as_deref(),
            Some(&["b 7:* rmw".to_owned()][..])
        );
        let n: RawContainer = serde_json::from_slice(
            br#"{"Id":"x","Name":"/n","State":{"Running":false},"HostConfig":{"DeviceCgroupRules":null}}"#,
        )
        .unwrap();
        assert!(n.host_config.unwrap().device_cgroup_rules.is_none());
        let nets = r.network_settings.unwrap().networks.unwrap();
        assert_eq!(nets["bridge"].ip_address, "172.17.0.2");
    }

    #[test]
    fn bad_names_never_reach_the_request() {
        let d = Docker::new("/nonexistent/sock");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let e = rt.block_on(d.inspect("../x")).unwrap_err();
        assert!(matches!(e, DockerError::NotFound { .. }));
        let e = rt.block_on(d.inspect("web")).unwrap_err();
        assert!(e.is_unreachable());
    }
    /// A fake dockerd: answers every connection (after reading the request head) with
    /// `resp`, then closes. Write errors are ignored (the client may hang up early).
    async fn fake_dockerd(resp: Vec<u8>) -> (tempfile::TempDir, Docker) {
        use tokio::io::AsyncWriteExt;
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("docker.sock");
        let l = tokio::net::UnixListener::bind(&sock).unwrap();
        let resp = Arc::new(resp);
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let resp = resp.clone();
                tokio::spawn(async move {
                    let mut s = BufReader::new(s);
                    let mut line = String::new();
                    while s.read_line(&mut line).await.unwrap_or(0) > 0 {
                        if line == "\r\n" {
                            break;
                        }
                        line.clear();
                    }
                    let _ = s.get_mut().write_all(&resp).await;
                    let _ = s.get_mut().shutdown().await;
                });
            }
        });
        (d, Docker::new(sock).with_timeout(Duration::from_secs(20)))
    }

    fn too_large(r: Result<(u16, Vec<u8>), DockerError>) -> String {
        match r {
            Ok((status, body)) => panic!(
                "accepted an oversized answer: HTTP {status}, {} body bytes",
                body.len()
            ),
            Err(e) => {
                let m = e.to_string();
                assert!(m.contains("larger than"), "wrong error: {m}");
                m
            }
        }
    }

    #[tokio::test]
    async fn an_answer_within_the_limits_is_read() {
        let mut r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..3 {
            r.extend_from_slice(b"100000\r\n");
            r.extend(std::iter::repeat_n(b'x', 1 << 20));
            r.extend_from_slice(b"\r\n");
        }
        r.extend_from_slice(b"0\r\n\r\n");
        let (_d, docker) = fake_dockerd(r).await;
        let (status, body) = docker.get("/x").await.unwrap();
        assert_eq!((status, body.len()), (200, 3 << 20));
        let mut r = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n", 1 << 20).into_bytes();
        r.extend_from_slice(format!("X-Big: {}\r\n\r\n", "h".repeat(60_000)).as_bytes());
        r.extend(std::iter::repeat_n(b'y', 1 << 20));
        let (_d, docker) = fake_dockerd(r).await;
        assert_eq!(docker.get("/x").await.unwrap().1.len(), 1 << 20);
    }

    #[tokio::test]
    async fn oversized_headers_are_refused() {
        // One endless header line, and many short ones: both over 64 KiB.
        let mut one = b"HTTP/1.1 200 OK\r\nX-A: ".to_vec();
        one.extend(std::iter::repeat_n(b'a', 200 << 10));
        one.extend_from_slice(b"\r\nContent-Length: 2\r\n\r\n{}");
        let (_d, docker) = fake_dockerd(one).await;
        too_large(docker.get("/x").await);
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..10_000 {
            many.extend_from_slice(format!("X-{i}: 0123456789\r\n").as_bytes());
        }
        many.extend_from_slice(b"Content-Length: 2\r\n\r\n{}");
        let (_d, docker) = fake_dockerd(many).await;
        too_large(docker.get("/x").await);
    }

    #[tokio::test]
    async fn oversized_bodies_are_refused() {
        let big = (16 << 20) + 1;
        // Announced by Content-Length (refused before reading it).
        let mut r = format!("HTTP/1.1 200 OK\r\nContent-Length: {big}\r\n\r\n").into_bytes();
        r.extend(std::iter::repeat_n(b'b', big));
        let (_d, docker) = fake_dockerd(r).await;
        too_large(docker.get("/x").await);
        // Without a length: read until EOF.
        let mut r = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        r.extend(std::iter::repeat_n(b'c', big));
        let (_d, docker) = fake_dockerd(r).await;
        too_large(docker.get("/x").await);
        // Chunked: 17 chunks of 1 MiB.
        let mut r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..17 {
            r.extend_from_slice(b"100000\r\n");
            r.extend(std::iter::repeat_n(b'd', 1 << 20));
            r.extend_from_slice(b"\r\n");
        }
        r.extend_from_slice(b"0\r\n\r\n");
        let (_d, docker) = fake_dockerd(r).await;
        too_large(docker.get("/x").await);
    }

    #[tokio::test]
    async fn bad_chunk_sizes_are_refused() {
        let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        // The largest usize: `size + 2` overflowed, or a 16 EiB buffer was asked for.
        let mut r = head.clone();
        r.extend_from_slice(b"ffffffffffffffff\r\nxx\r\n0\r\n\r\n");
        let (_d, docker) = fake_dockerd(r).await;
        too_large(docker.get("/x").await);
        // One chunk just over the body limit.
        let mut r = head.clone();
        r.extend_from_slice(b"1000001\r\nxx\r\n0\r\n\r\n");
        let (_d, docker) = fake_dockerd(r).await;
        too_large(docker.get("/x").await);
        // An endless chunk-size line.
        let mut r = head.clone();
        r.extend(std::iter::repeat_n(b'0', 1 << 20));
        let (_d, docker) = fake_dockerd(r).await;
        too_large(docker.get("/x").await);
        // Chunk data not followed by CRLF.
        let mut r = head;
        r.extend_from_slice(b"2\r\nxxyy0\r\n\r\n");
        let (_d, docker) = fake_dockerd(r).await;
        assert!(docker.get("/x").await.is_err());
    }

    #[tokio::test]
    async fn an_endless_event_line_is_refused() {
        let mut r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..20 {
            r.extend_from_slice(b"100000\r\n");
            r.extend(std::iter::repeat_n(b'e', 1 << 20));
            r.extend_from_slice(b"\r\n");
        }
        let (_d, docker) = fake_dockerd(r).await;
        let mut ev = docker.events().await.unwrap();
        let e = ev.next().await.unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
    }
}
