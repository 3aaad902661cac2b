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

/// A container event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerEvent {
    /// start, die, stop, destroy, restart, …
    pub action: String,
    pub container_id: String,
    pub container_name: Option<String>,
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
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawHostConfig {
    #[serde(default)]
    network_mode: String,
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

    /// From a `unix:///path` URL (the daemon's `--docker-host`).
    pub fn from_host_url(url: &str) -> Option<Docker> {
        url.strip_prefix("unix://").map(Docker::new)
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

    async fn read_head(
        &self,
        r: &mut BufReader<UnixStream>,
        request: &str,
    ) -> Result<Head, DockerError> {
        let mut line = String::new();
        r.read_line(&mut line)
            .await
            .map_err(|e| self.io(request, e))?;
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
            line.clear();
            let n = r
                .read_line(&mut line)
                .await
                .map_err(|e| self.io(request, e))?;
            if n == 0 || line == "\r\n" || line == "\n" {
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

    /// Reads one chunk of a chunked body; None at the last chunk or EOF.
    async fn read_chunk(
        &self,
        r: &mut BufReader<UnixStream>,
        request: &str,
    ) -> Result<Option<Vec<u8>>, DockerError> {
        let mut line = String::new();
        let n = r
            .read_line(&mut line)
            .await
            .map_err(|e| self.io(request, e))?;
        if n == 0 {
            return Ok(None);
        }
        let size_str = line.trim().split(';').next().unwrap_or("");
        let size = usize::from_str_radix(size_str, 16).map_err(|_| DockerError::Parse {
            request: request.to_owned(),
            reason: format!("bad chunk size {line:?}"),
        })?;
        if size == 0 {
            return Ok(None);
        }
        let mut buf = vec![0u8; size + 2];
        r.read_exact(&mut buf)
            .await
            .map_err(|e| self.io(request, e))?;
        buf.truncate(size);
        Ok(Some(buf))
    }

    async fn get_inner(&self, request: &str) -> Result<(u16, Vec<u8>), DockerError> {
        let mut r = self.open(request).await?;
        let head = self.read_head(&mut r, request).await?;
        let mut body = Vec::new();
        if head.chunked {
            while let Some(c) = self.read_chunk(&mut r, request).await? {
                body.extend_from_slice(&c);
            }
        } else if let Some(len) = head.content_length {
            body.resize(len, 0);
            r.read_exact(&mut body)
                .await
                .map_err(|e| self.io(request, e))?;
        } else {
            r.read_to_end(&mut body)
                .await
                .map_err(|e| self.io(request, e))?;
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
                    network_name: name,
                    network_id: ep.network_id,
                    bridge_interface: bridge,
                });
            }
        }
        Ok(ContainerInfo {
            id: raw.id,
            name: raw.name.trim_start_matches('/').to_owned(),
            running: raw.state.running,
            pid: u32::try_from(raw.state.pid).unwrap_or(0),
            network_mode: raw.host_config.map(|h| h.network_mode).unwrap_or_default(),
            networks,
        })
    }

    /// HostConfig.DeviceCgroupRules of a container (`--device-cgroup-rule`), by exact id
    /// or name. Separate from [`Docker::inspect`] so `ContainerInfo` stays as it is.
    pub async fn device_cgroup_rules(&self, id: &str) -> Result<Vec<String>, DockerError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Raw {
            host_config: Option<RawRules>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct RawRules {
            #[serde(default)]
            device_cgroup_rules: Option<Vec<String>>,
        }
        if id.is_empty()
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        {
            return Err(DockerError::NotFound {
                what: "container",
                name: id.to_owned(),
            });
        }
        let raw: Raw = self
            .get_json(&format!("/containers/{id}/json"), "container", id)
            .await?;
        Ok(raw
            .host_config
            .and_then(|h| h.device_cgroup_rules)
            .unwrap_or_default())
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
        // filters={"type":["container"]}, URL-encoded
        let request = "/events?filters=%7B%22type%22%3A%5B%22container%22%5D%7D";
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
            if self.chunked {
                match self.docker.read_chunk(&mut self.reader, REQ).await? {
                    Some(c) => self.buf.extend_from_slice(&c),
                    None => self.done = true,
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(
            parse_event(br#"{"Type":"network","Action":"connect","Actor":{"ID":"n"}}"#).is_none()
        );
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
        let j = br#"{"Id":"abc","Name":"/web","State":{"Running":true,"Pid":42},"HostConfig":{"NetworkMode":"default"},"NetworkSettings":{"Networks":{"bridge":{"NetworkID":"n1","IPAddress":"172.17.0.2"}}}}"#;
        let r: RawContainer = serde_json::from_slice(j).unwrap();
        assert_eq!(r.state.pid, 42);
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
}
