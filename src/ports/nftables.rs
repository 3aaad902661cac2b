//! The nftables backend ([`Firewall`]) for Docker 29's `--firewall-backend=nftables`
//! (Docker's rules in table `ip docker-bridges`).
//!
//! Our own table per daemon, `ip dindhelper-<state id>`: two daemons with different state
//! ids never touch each other's table, and Docker never touches it (it only manages
//! `docker-bridges`). Its layout:
//!
//! ```text
//! table ip dindhelper-S {
//!   map dnat4    { type inet_proto . inet_service : ipv4_addr . inet_service }              # any host address
//!   map dnat4ip  { type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service }  # one host address
//!   set hairpin4 { type ipv4_addr . ipv4_addr . inet_proto . inet_service }                 # C . C . proto . P
//!   chain prerouting  { type nat hook prerouting priority -100; fib daddr type local jump ports }
//!   chain output      { type nat hook output priority -100; ip daddr != 127.0.0.0/8 fib daddr type local jump ports }
//!   chain ports {
//!     ip daddr . meta l4proto . th dport @dnat4ip meta mark set <Docker's accept mark> dnat ip to ip daddr . meta l4proto . th dport map @dnat4ip
//!     meta l4proto . th dport @dnat4 meta mark set <Docker's accept mark> dnat ip to meta l4proto . th dport map @dnat4
//!   }
//!   chain postrouting { type nat hook postrouting priority 100; ct status dnat ip saddr . ip daddr . meta l4proto . th dport @hairpin4 masquerade }
//! }
//! ```
//!
//! One Publish is one map element (`add element … dnat4 { tcp . 9090 comment "<mapping id>"
//! : 192.0.2.2 . 90 }`) plus its hairpin element; the chains never change after the table
//! is made. The element comment carries the mapping id; the owner is in the table name.
//!
//! Traps:
//! - Docker's `filter-forward-in__<bridge>` chain ends in `counter drop comment "UNPUBLISHED
//!   PORT DROP"`. An accept in another table does not help: every base chain on the
//!   forward hook must accept, and a drop anywhere is final. The only way through is the
//!   rule Docker adds itself when dockerd runs with `--bridge-accept-fwmark=MARK[/MASK]`
//!   (daemon.json `"bridge-accept-fwmark"`): `meta mark & MASK == MARK counter accept
//!   comment "ALLOW FW MARK"`, placed before the ICC rule (so noicc networks pass too).
//!   We set that mark on exactly the packets we DNAT (the same rule as the DNAT: the map
//!   lookup comes first, so other packets are never marked).
//! - How we learn the mark: from Docker's live ruleset (the "ALLOW FW MARK" rule in any
//!   `filter-forward-in__*` chain, read with `nft -j`), not from a config key of ours. It
//!   is visible there, it is what Docker actually enforces, and a config key could drift
//!   from dockerd's option. When no such rule exists, detection answers NotSupported
//!   naming the option and the daemon.json key. Every repair reads it again (a dockerd
//!   restarted with another mark).
//! - Only the first packet of a connection passes the nat hooks, so only it carries the
//!   mark; Docker's chain accepts the rest as `ct state established,related`.
//! - The nat chains use numeric priorities (-100, 100): nft 1.0.6 (Debian 12) refuses the
//!   name `dstnat` on the output hook.
//! - The table is deleted when its last element goes, so unpublishing everything leaves
//!   `nft list ruleset` exactly as Docker wrote it; the next publish creates it again in
//!   the same transaction as the element.
//! - A repair replaces the whole table in one transaction (`add table; delete table;
//!   table {…}`): also after `nft flush ruleset` (nftables.service restart) removed it.
//!
//! Library (decision): writes go through libnftables in process ([`super::libnft`]:
//! `dlopen("libnftables.so.1")`, the library inside the `nft` program, same text as
//! `nft -f -`), one transaction per write round (the commit step batches concurrent calls
//! into one round); reads (detection, repair, list) use the `nft -j` program and
//! serde_json. Measured (one element per transaction, this 2-core machine under load ~3):
//! an `nft -f -` process costs ~6 ms, which alone puts 1000 Publish calls from 10 callers
//! (~100 rounds) near a second; in process the transaction is the netlink round trip
//! (README, ports bench). The `nftables` crate (netavark's choice) is JSON through the same
//! program (the same process cost, a dependency more); raw netlink (libnftnl's batch
//! format written by hand) would save little over libnftables and is ours to maintain.
//! When the library cannot be loaded the backend writes through the `nft` program
//! (`DINDHELPER_NFT_PROGRAM=1` forces that, for the benchmark's comparison).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use serde_json::Value;

use super::firewall::{Change, Detected, Firewall, Fut, Repaired, Tagged};
use super::iptables::{run_prog, sbin, NetnsContext};
use super::libnft::LibNft;
use super::rules::{Protocol, RuleSpec};
use super::types::PortsError;

/// Docker's nftables table (IPv4).
pub const DOCKER_TABLE: &str = "docker-bridges";
/// The comment of the rule Docker adds for `--bridge-accept-fwmark`.
pub const FWMARK_COMMENT: &str = "ALLOW FW MARK";

/// The mark Docker accepts: `meta mark & mask == value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FwMark {
    pub value: u32,
    pub mask: u32,
}

impl FwMark {
    /// The statement that sets it, keeping the other bits of the packet's mark.
    fn set_stmt(self) -> String {
        if self.mask == u32::MAX {
            format!("meta mark set {:#x}", self.value)
        } else {
            format!(
                "meta mark set meta mark & {:#x} | {:#x}",
                !self.mask,
                self.value & self.mask
            )
        }
    }
}

impl std::fmt::Display for FwMark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x}/{:#x}", self.value, self.mask)
    }
}

/// One mapping as our table holds it: a map element (and its hairpin element).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Elem {
    pub id: String,
    pub protocol: Protocol,
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub container_ip: Ipv4Addr,
    pub container_port: u16,
}

impl Elem {
    fn of(s: &RuleSpec) -> Result<Elem, PortsError> {
        s.check()?;
        Ok(Elem {
            id: s.id.clone(),
            protocol: s.protocol,
            host_ip: s.host_ip,
            host_port: s.host_port,
            container_ip: s.container_ip,
            container_port: s.container_port,
        })
    }

    fn map(&self) -> &'static str {
        if self.host_ip.is_some() {
            "dnat4ip"
        } else {
            "dnat4"
        }
    }

    fn key(&self) -> String {
        match self.host_ip {
            Some(ip) => format!("{ip} . {} . {}", self.protocol, self.host_port),
            None => format!("{} . {}", self.protocol, self.host_port),
        }
    }

    /// `KEY comment "ID" : C . P` (the id is checked: ASCII alphanumerics only).
    fn element(&self) -> String {
        format!(
            "{} comment \"{}\" : {} . {}",
            self.key(),
            self.id,
            self.container_ip,
            self.container_port
        )
    }

    fn hairpin(&self) -> (Ipv4Addr, &'static str, u16) {
        (
            self.container_ip,
            self.protocol.as_str(),
            self.container_port,
        )
    }

    fn text(&self) -> String {
        format!(
            "{} {{ {} : {} . {} }}",
            self.map(),
            self.key(),
            self.container_ip,
            self.container_port
        )
    }
}

fn hairpin_elem(h: &(Ipv4Addr, &'static str, u16)) -> String {
    format!("{} . {} . {} . {}", h.0, h.0, h.1, h.2)
}

/// Our table as last read or written.
#[derive(Debug, Clone, Default)]
struct Known {
    exists: bool,
    elems: BTreeMap<String, Elem>,
}

impl Known {
    fn hairpins(&self) -> BTreeSet<(Ipv4Addr, &'static str, u16)> {
        self.elems.values().map(Elem::hairpin).collect()
    }
}

/// The nftables backend, bound to a namespace and an owner (state id).
#[derive(Debug)]
pub struct Nftables {
    netns: NetnsContext,
    table: String,
    mark: std::sync::Mutex<FwMark>,
    detected: Detected,
    known: tokio::sync::Mutex<Option<Known>>,
    /// libnftables in process (None: the `nft` program; see [`super::libnft`]).
    lib: Option<LibNft>,
}

/// True when Docker's nftables table exists in `netns`.
pub async fn docker_table_present(netns: &NetnsContext) -> bool {
    match run_prog(netns, &sbin("nft"), &["list", "tables"], None).await {
        Ok(out) => out
            .lines()
            .any(|l| l.trim() == format!("table ip {DOCKER_TABLE}")),
        Err(_) => false,
    }
}

/// The NotSupported answer when dockerd's nftables rules carry no accept mark.
pub fn no_fwmark_error() -> PortsError {
    PortsError::NotSupported {
        reason: format!(
            "dockerd runs its nftables firewall backend (table ip {DOCKER_TABLE}) without \
             --bridge-accept-fwmark: its filter-forward-in__<bridge> chains end in \
             \"UNPUBLISHED PORT DROP\", which no rule in another table can override. \
             Start dockerd with --bridge-accept-fwmark=MARK[/MASK] (daemon.json: \
             \"bridge-accept-fwmark\": \"0x10000/0x10000\") and restart it; dindhelper \
             reads the mark from Docker's \"{FWMARK_COMMENT}\" rule and sets it on the \
             packets it forwards"
        ),
    }
}

fn num(v: &Value) -> Option<u32> {
    match v {
        Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        Value::String(s) => {
            let s = s.trim();
            match s.strip_prefix("0x") {
                Some(h) => u32::from_str_radix(h, 16).ok(),
                None => s.parse().ok(),
            }
        }
        _ => None,
    }
}

fn is_meta_mark(v: &Value) -> bool {
    v.pointer("/meta/key").and_then(Value::as_str) == Some("mark")
}

/// The mark of Docker's "ALLOW FW MARK" rules in `nft -j list table ip docker-bridges`
/// output: `meta mark & MASK == MARK` or `meta mark MARK`. None when no
/// `filter-forward-in__*` chain has one.
pub fn parse_fwmark(json: &str) -> Option<FwMark> {
    let v: Value = serde_json::from_str(json).ok()?;
    for item in v.get("nftables")?.as_array()? {
        let Some(rule) = item.get("rule") else {
            continue;
        };
        let chain = rule.get("chain").and_then(Value::as_str).unwrap_or("");
        if !chain.starts_with("filter-forward-in__")
            || rule.get("comment").and_then(Value::as_str) != Some(FWMARK_COMMENT)
        {
            continue;
        }
        for e in rule.get("expr")?.as_array()? {
            let Some(m) = e.get("match") else { continue };
            let (Some(left), Some(right)) = (m.get("left"), m.get("right")) else {
                continue;
            };
            if is_meta_mark(left) {
                if let Some(value) = num(right) {
                    return Some(FwMark {
                        value,
                        mask: u32::MAX,
                    });
                }
            }
            if let Some([l, mask]) = left.get("&").and_then(Value::as_array).map(Vec::as_slice) {
                if is_meta_mark(l) {
                    if let (Some(mask), Some(value)) = (num(mask), num(right)) {
                        return Some(FwMark { value, mask });
                    }
                }
            }
        }
    }
    None
}

/// The elements of our table in `nft -j list table` output (None: no such table).
fn parse_elems(json: &str) -> Result<BTreeMap<String, Elem>, String> {
    let v: Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    let items = v
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or("no nftables array")?;
    for item in items {
        let Some(map) = item.get("map") else { continue };
        let name = map.get("name").and_then(Value::as_str).unwrap_or("");
        let with_ip = match name {
            "dnat4" => false,
            "dnat4ip" => true,
            _ => continue,
        };
        for pair in map
            .get("elem")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let bad = || format!("unexpected element in map {name}: {pair}");
            let [k, val] = pair.as_array().map(Vec::as_slice).ok_or_else(bad)? else {
                return Err(bad());
            };
            let id = k
                .pointer("/elem/comment")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            let key = k
                .pointer("/elem/val/concat")
                .or_else(|| k.get("concat"))
                .and_then(Value::as_array)
                .ok_or_else(bad)?;
            let key: Vec<&Value> = key.iter().collect();
            let (host_ip, proto, port) = match (with_ip, key.as_slice()) {
                (true, [ip, p, port]) => (
                    Some(ip.as_str().and_then(|s| s.parse().ok()).ok_or_else(bad)?),
                    *p,
                    *port,
                ),
                (false, [p, port]) => (None, *p, *port),
                _ => return Err(bad()),
            };
            let protocol = proto.as_str().and_then(Protocol::parse).ok_or_else(bad)?;
            let host_port = num(port)
                .and_then(|p| u16::try_from(p).ok())
                .ok_or_else(bad)?;
            let dst = val
                .get("concat")
                .and_then(Value::as_array)
                .ok_or_else(bad)?;
            let [cip, cport] = dst.as_slice() else {
                return Err(bad());
            };
            let container_ip = cip.as_str().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
            let container_port = num(cport)
                .and_then(|p| u16::try_from(p).ok())
                .ok_or_else(bad)?;
            out.insert(
                id.clone(),
                Elem {
                    id,
                    protocol,
                    host_ip,
                    host_port,
                    container_ip,
                    container_port,
                },
            );
        }
    }
    Ok(out)
}

impl Nftables {
    /// The backend for a namespace where Docker's `ip docker-bridges` table exists; reads
    /// the mark Docker accepts (NotSupported naming `--bridge-accept-fwmark` when there is
    /// none).
    pub async fn detect(netns: &NetnsContext, owner: &str) -> Result<Nftables, PortsError> {
        super::rules::check_tag_part("state id", owner)?;
        let mark = read_docker_mark(netns).await?;
        let table = format!("dindhelper-{owner}");
        let lib = if std::env::var_os("DINDHELPER_NFT_PROGRAM").is_some() {
            None
        } else {
            match LibNft::open(netns) {
                Ok(l) => Some(l),
                Err(e) => {
                    tracing::info!(error = %e, "libnftables not usable; writing through the nft program");
                    None
                }
            }
        };
        let via = if lib.is_some() {
            "libnftables"
        } else {
            "the nft program"
        };
        Ok(Nftables {
            netns: netns.clone(),
            detected: Detected {
                name: "nftables",
                reason: format!(
                    "Docker's nftables table ip {DOCKER_TABLE} exists (dockerd \
                     --firewall-backend=nftables); its \"{FWMARK_COMMENT}\" rule accepts \
                     mark {mark} (--bridge-accept-fwmark); ports go into table ip {table} \
                     (written through {via})"
                ),
            },
            table,
            mark: std::sync::Mutex::new(mark),
            known: tokio::sync::Mutex::new(None),
            lib,
        })
    }

    /// Add a sentence to the detection reason.
    pub fn note(&mut self, what: &str) {
        self.detected.reason.push_str("; ");
        self.detected.reason.push_str(what);
    }

    /// Our table's name (`dindhelper-<state id>`).
    pub fn table(&self) -> &str {
        &self.table
    }

    pub fn mark(&self) -> FwMark {
        *self.mark.lock().unwrap()
    }

    async fn nft(&self, args: &[&str], stdin: Option<&str>) -> Result<String, PortsError> {
        run_prog(&self.netns, &sbin("nft"), args, stdin).await
    }

    /// Our table's elements, read fresh (exists = false: no table).
    async fn read(&self) -> Result<Known, PortsError> {
        let out = match self
            .nft(&["-j", "list", "table", "ip", &self.table], None)
            .await
        {
            Ok(o) => o,
            Err(PortsError::Iptables { stderr, .. })
                if stderr.contains("No such file or directory") =>
            {
                return Ok(Known::default());
            }
            Err(e) => return Err(e),
        };
        let elems = parse_elems(&out).map_err(|e| {
            PortsError::Internal(format!(
                "cannot parse nft -j list table {}: {e}",
                self.table
            ))
        })?;
        Ok(Known {
            exists: true,
            elems,
        })
    }

    /// The whole table with `elems` (after `add table; delete table`: replaces it).
    fn render_table(&self, elems: &BTreeMap<String, Elem>) -> String {
        let t = &self.table;
        let mark = self.mark().set_stmt();
        let mut s = String::new();
        let _ = writeln!(s, "add table ip {t}\ndelete table ip {t}");
        let _ = writeln!(s, "table ip {t} {{");
        let _ = writeln!(
            s,
            "  map dnat4 {{ type inet_proto . inet_service : ipv4_addr . inet_service; }}"
        );
        let _ = writeln!(
            s,
            "  map dnat4ip {{ type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service; }}"
        );
        let _ = writeln!(
            s,
            "  set hairpin4 {{ type ipv4_addr . ipv4_addr . inet_proto . inet_service; }}"
        );
        let _ = writeln!(
            s,
            "  chain prerouting {{ type nat hook prerouting priority -100; policy accept; fib daddr type local jump ports; }}"
        );
        let _ = writeln!(
            s,
            "  chain output {{ type nat hook output priority -100; policy accept; ip daddr != 127.0.0.0/8 fib daddr type local jump ports; }}"
        );
        let _ = writeln!(s, "  chain ports {{");
        let _ = writeln!(
            s,
            "    ip daddr . meta l4proto . th dport @dnat4ip {mark} dnat ip to ip daddr . meta l4proto . th dport map @dnat4ip"
        );
        let _ = writeln!(
            s,
            "    meta l4proto . th dport @dnat4 {mark} dnat ip to meta l4proto . th dport map @dnat4"
        );
        let _ = writeln!(s, "  }}");
        let _ = writeln!(
            s,
            "  chain postrouting {{ type nat hook postrouting priority 100; policy accept; ct status dnat ip saddr . ip daddr . meta l4proto . th dport @hairpin4 masquerade; }}"
        );
        let _ = writeln!(s, "}}");
        let k = Known {
            exists: true,
            elems: elems.clone(),
        };
        s.push_str(&self.render_elems(&Known::default(), &k));
        s
    }

    /// The element commands that turn `from` into `to` (both tables exist).
    fn render_elems(&self, from: &Known, to: &Known) -> String {
        let t = &self.table;
        let mut s = String::new();
        for (id, e) in &from.elems {
            if to.elems.get(id) != Some(e) {
                let _ = writeln!(s, "delete element ip {t} {} {{ {} }}", e.map(), e.key());
            }
        }
        let (hf, ht) = (from.hairpins(), to.hairpins());
        for h in hf.difference(&ht) {
            let _ = writeln!(
                s,
                "delete element ip {t} hairpin4 {{ {} }}",
                hairpin_elem(h)
            );
        }
        for (id, e) in &to.elems {
            if from.elems.get(id) != Some(e) {
                let _ = writeln!(s, "add element ip {t} {} {{ {} }}", e.map(), e.element());
            }
        }
        for h in ht.difference(&hf) {
            let _ = writeln!(s, "add element ip {t} hairpin4 {{ {} }}", hairpin_elem(h));
        }
        s
    }

    /// The script that turns `from` into `to`.
    fn script(&self, from: &Known, to: &Known) -> String {
        if to.elems.is_empty() {
            return if from.exists {
                format!("delete table ip {}\n", self.table)
            } else {
                String::new()
            };
        }
        if !from.exists {
            return self.render_table(&to.elems);
        }
        self.render_elems(from, to)
    }

    async fn run_script(&self, text: &str) -> Result<(), PortsError> {
        if text.is_empty() {
            return Ok(());
        }
        match &self.lib {
            Some(lib) => lib
                .run(text)
                .await
                .map(|_| ())
                .map_err(|stderr| PortsError::Iptables {
                    command: "libnftables nft_run_cmd_from_buffer".into(),
                    status: 1,
                    stderr,
                }),
            None => self.nft(&["-f", "-"], Some(text)).await.map(|_| ()),
        }
    }

    async fn apply_change(&self, change: &Change) -> Result<(), PortsError> {
        let adds = change
            .add
            .iter()
            .map(Elem::of)
            .collect::<Result<Vec<_>, _>>()?;
        let mut known = self.known.lock().await;
        if known.is_none() {
            *known = Some(self.read().await?);
        }
        let target = |from: &Known| {
            let mut to = from.clone();
            for id in &change.remove {
                to.elems.remove(id);
            }
            for e in &adds {
                to.elems.insert(e.id.clone(), e.clone());
            }
            to.exists = !to.elems.is_empty();
            to
        };
        let from = known.clone().unwrap_or_default();
        let mut to = target(&from);
        if let Err(e) = self.run_script(&self.script(&from, &to)).await {
            // what we knew may be stale (table flushed, elements deleted): read once, retry
            tracing::debug!(error = %e, "nft batch failed; re-reading our table");
            let live = match self.read().await {
                Ok(l) => l,
                Err(_) => {
                    *known = None;
                    return Err(e);
                }
            };
            to = target(&live);
            let script = self.script(&live, &to);
            *known = Some(live);
            self.run_script(&script).await?;
        }
        *known = Some(to);
        Ok(())
    }

    async fn repair_to(
        &self,
        desired: &[RuleSpec],
        scope: &(dyn Fn(&str) -> bool + Send + Sync),
    ) -> Result<Repaired, PortsError> {
        let want = desired
            .iter()
            .map(Elem::of)
            .collect::<Result<Vec<_>, _>>()?;
        let mut known = self.known.lock().await;
        *known = None;
        // Docker may have been restarted with another mark (or none)
        let mark_changed = if docker_table_present(&self.netns).await {
            let m = read_docker_mark(&self.netns).await?;
            let mut cur = self.mark.lock().unwrap();
            let changed = *cur != m;
            if changed {
                tracing::warn!(old = %*cur, new = %m, "Docker's accept mark changed");
            }
            *cur = m;
            changed
        } else {
            false
        };
        let live = self.read().await?;
        let mut out = Repaired::default();
        let mut to = Known {
            exists: false,
            elems: live
                .elems
                .iter()
                .filter(|(id, _)| !scope(id))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        for e in &want {
            to.elems.insert(e.id.clone(), e.clone());
        }
        for (id, e) in &live.elems {
            if scope(id) && to.elems.get(id) != Some(e) {
                *out.removed.entry(id.clone()).or_default() += 1;
            }
        }
        for (id, e) in &to.elems {
            if live.elems.get(id) != Some(e) {
                *out.added.entry(id.clone()).or_default() += 1;
            }
        }
        to.exists = !to.elems.is_empty();
        let script = if to.exists && (mark_changed || !live.exists || self.chains_missing().await) {
            self.render_table(&to.elems)
        } else {
            self.script(&live, &to)
        };
        self.run_script(&script).await?;
        *known = Some(to);
        Ok(out)
    }

    /// True when our table exists but a chain of it is gone (an admin deleted it).
    async fn chains_missing(&self) -> bool {
        match self.nft(&["list", "table", "ip", &self.table], None).await {
            Ok(out) => ["prerouting", "output", "ports", "postrouting"]
                .iter()
                .any(|c| !out.contains(&format!("chain {c} {{"))),
            Err(_) => false,
        }
    }
}

/// The mark of Docker's "ALLOW FW MARK" rule (NotSupported when there is none).
pub async fn read_docker_mark(netns: &NetnsContext) -> Result<FwMark, PortsError> {
    let out = run_prog(
        netns,
        &sbin("nft"),
        &["-j", "list", "table", "ip", DOCKER_TABLE],
        None,
    )
    .await?;
    parse_fwmark(&out).ok_or_else(no_fwmark_error)
}

impl Firewall for Nftables {
    fn detected(&self) -> &Detected {
        &self.detected
    }

    fn apply<'a>(&'a self, change: &'a Change) -> Fut<'a, ()> {
        Box::pin(self.apply_change(change))
    }

    fn list_tagged(&self) -> Fut<'_, Vec<Tagged>> {
        Box::pin(async move {
            let live = self.read().await?;
            let owner = self.table.trim_start_matches("dindhelper-").to_owned();
            let out = live
                .elems
                .values()
                .map(|e| Tagged {
                    mapping_id: e.id.clone(),
                    owner: Some(owner.clone()),
                    text: e.text(),
                })
                .collect();
            *self.known.lock().await = Some(live);
            Ok(out)
        })
    }

    fn repair<'a>(
        &'a self,
        desired: &'a [RuleSpec],
        _legacy_ids: &'a [String],
        scope: &'a (dyn Fn(&str) -> bool + Send + Sync),
    ) -> Fut<'a, Repaired> {
        // no tags from before state ids exist in nftables: the table name is the owner
        Box::pin(self.repair_to(desired, scope))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fwmark_from_dockers_rule() {
        let masked = r#"{"nftables":[{"metainfo":{}},{"rule":{"family":"ip","table":"docker-bridges","chain":"filter-forward-in__docker0","handle":40,"comment":"ALLOW FW MARK","expr":[{"match":{"op":"==","left":{"&":[{"meta":{"key":"mark"}},3]},"right":2}},{"counter":{"packets":0,"bytes":0}},{"accept":null}]}}]}"#;
        assert_eq!(parse_fwmark(masked), Some(FwMark { value: 2, mask: 3 }));
        let plain = masked.replace(
            r#"{"&":[{"meta":{"key":"mark"}},3]}"#,
            r#"{"meta":{"key":"mark"}}"#,
        );
        assert_eq!(
            parse_fwmark(&plain),
            Some(FwMark {
                value: 2,
                mask: u32::MAX
            })
        );
        // the same rule elsewhere, or another comment, is not Docker's accept rule
        assert_eq!(
            parse_fwmark(&masked.replace("filter-forward-in__", "x")),
            None
        );
        assert_eq!(parse_fwmark(&masked.replace("ALLOW FW MARK", "ICC")), None);
    }

    #[test]
    fn mark_statement_keeps_other_bits() {
        let m = FwMark {
            value: 0x10000,
            mask: 0x10000,
        };
        assert_eq!(
            m.set_stmt(),
            "meta mark set meta mark & 0xfffeffff | 0x10000"
        );
        let m = FwMark {
            value: 5,
            mask: u32::MAX,
        };
        assert_eq!(m.set_stmt(), "meta mark set 0x5");
    }

    #[test]
    fn elements_from_json() {
        let j = r#"{"nftables":[{"map":{"family":"ip","name":"dnat4","table":"dindhelper-x","type":["inet_proto","inet_service"],"handle":5,"map":"ipv4_addr . inet_service","elem":[[{"elem":{"val":{"concat":["tcp",9090]},"comment":"abc"}},{"concat":["192.0.2.2",90]}]]}},{"map":{"family":"ip","name":"dnat4ip","table":"dindhelper-x","elem":[[{"elem":{"val":{"concat":["10.0.0.1","udp",53]},"comment":"def"}},{"concat":["192.0.2.3",53]}]]}}]}"#;
        let e = parse_elems(j).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e["abc"].host_port, 9090);
        assert_eq!(e["abc"].protocol, Protocol::Tcp);
        assert_eq!(e["def"].host_ip, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(e["def"].container_ip, Ipv4Addr::new(192, 0, 2, 3));
    }
}
