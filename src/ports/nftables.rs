//! The nftables backend ([`Firewall`]) for Docker 29's `--firewall-backend=nftables`
//! (Docker's rules in tables `ip docker-bridges` and, with IPv6, `ip6 docker-bridges`).
//!
//! Our own tables per daemon, `ip dindhelper-<state id>` and (IPv6) `ip6 dindhelper-<state
//! id>`: two daemons with different state ids never touch each other's tables, and Docker
//! never touches them (it only manages `docker-bridges`). The IPv4 table:
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
//! The IPv6 table is the same with `ip6`, `ipv6_addr`, maps `dnat6`/`dnat6ip`, set
//! `hairpin6`, output skipping `ip6 daddr != ::1`, and the DNAT rules starting with `ip6
//! saddr != fe80::/10` (as Docker's own IPv6 DNAT: a link-local source cannot be forwarded
//! to another link). A mapping with a container IPv6 address (family auto/both, Docker's
//! ip6 table present) is one element in each table; an IPv4-only mapping never creates the
//! ip6 table.
//!
//! One Publish is one map element per family (`add element … dnat4 { tcp . 9090 comment
//! "<mapping id>" : 192.0.2.2 . 90 }`) plus its hairpin element; the chains never change
//! after a table is made. The element comment carries the mapping id; the owner is in the
//! table name. Both families go into one transaction.
//!
//! IPv6 layout (decision): Docker 29 with IPv6 (`ip6tables`, on by default) keeps
//! `ip6 docker-bridges` beside `ip docker-bridges`, with the same chains
//! (moby `daemon/libnetwork/drivers/bridge/internal/nftabler`: `nftabler.go` makes both
//! tables, `network.go` gives a bridge chains in a family only when the network has a
//! prefix in it, the ALLOW FW MARK rule included; `port.go` writes the IPv6 DNAT with `ip6
//! saddr != fe80::/10`; TestNftabler's `__ip6.golden` files). We mirror it with an `ip6`
//! table of our own rather than one `inet` table for both families: measured on this
//! machine (libnftables in process, 1000 one-mapping transactions each, in a scratch
//! netns): IPv4 only 125–138 µs, ip + ip6 tables in one transaction 146–148 µs, one inet
//! table with both maps 145–155 µs, so the cost is the same; separate tables keep the IPv4
//! table of earlier versions unchanged (no migration of a live table on upgrade), leave
//! `nft list ruleset` without any ip6 table of ours on hosts without IPv6 mappings, and
//! follow Docker's per-family split (its mark rule and drops live per family too).
//! [`Firewall::ipv6`] is true while Docker's `ip6 docker-bridges` exists (checked at
//! detection and again at every repair).
//!
//! Traps:
//! - Docker's `filter-forward-in__<bridge>` chain ends in `counter drop comment "UNPUBLISHED
//!   PORT DROP"`. An accept in another table does not help: every base chain on the
//!   forward hook must accept, and a drop anywhere is final. The only way through is the
//!   rule Docker adds itself when dockerd runs with `--bridge-accept-fwmark=MARK[/MASK]`
//!   (daemon.json `"bridge-accept-fwmark"`): `meta mark & MASK == MARK counter accept
//!   comment "ALLOW FW MARK"`, placed before the ICC rule (so noicc networks pass too), in
//!   the ip and the ip6 table. We set that mark on exactly the packets we DNAT (the same
//!   rule as the DNAT: the map lookup comes first, so other packets are never marked).
//! - How we learn the mark: from Docker's live ruleset (the "ALLOW FW MARK" rule in any
//!   `filter-forward-in__*` chain, read with `nft -j`), not from a config key of ours. It
//!   is visible there, it is what Docker actually enforces, and a config key could drift
//!   from dockerd's option. When no such rule exists in the ip table, detection answers
//!   NotSupported naming the option and the daemon.json key. The ip6 table's mark is read
//!   the same way from `ip6 docker-bridges`; while that has no bridge chain yet (no IPv6
//!   network) the IPv4 mark is used (one dockerd option sets both). Every repair reads
//!   them again (a dockerd restarted with another mark).
//! - Only the first packet of a connection passes the nat hooks, so only it carries the
//!   mark; Docker's chain accepts the rest as `ct state established,related`.
//! - The nat chains use numeric priorities (-100, 100): nft 1.0.6 (Debian 12) refuses the
//!   name `dstnat` on the output hook.
//! - A table is deleted when its last element goes, so unpublishing everything leaves
//!   `nft list ruleset` exactly as Docker wrote it; the next publish creates it again in
//!   the same transaction as the element.
//! - A repair replaces a whole table in one transaction (`add table; delete table;
//!   table {…}`): also after `nft flush ruleset` (nftables.service restart) removed it.
//! - IPv4 never depends on IPv6: while Docker has no ip6 table, a failing read of our ip6
//!   table (a kernel without nftables IPv6) counts as no table. [`Firewall::ipv6`]
//!   follows Docker's ip6 table at each repair; the detection reason keeps what detection
//!   saw.
//! - A mapping whose IPv6 address goes away (container restarted without one, family
//!   changed) must lose its ip6 element: an add replaces the mapping's elements in both
//!   tables, never only in the families it has now.
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
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::Value;

use super::firewall::{Change, Detected, Firewall, Fut, Repaired, Tagged};
use super::iptables::{run_prog, sbin, NetnsContext};
use super::libnft::LibNft;
use super::rules::{IpFamily, Protocol, RuleSpec};
use super::types::PortsError;

/// Docker's nftables tables (`ip` and, with IPv6, `ip6`).
pub const DOCKER_TABLE: &str = "docker-bridges";
/// The comment of the rule Docker adds for `--bridge-accept-fwmark`.
pub const FWMARK_COMMENT: &str = "ALLOW FW MARK";

const FAMILIES: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

/// The nft words of one address family.
trait NftFamily {
    /// Table family: `ip` / `ip6` (also the payload protocol of address matches).
    fn nft(self) -> &'static str;
    /// The address type: `ipv4_addr` / `ipv6_addr`.
    fn addr_type(self) -> &'static str;
    /// Map of mappings on every host address: `dnat4` / `dnat6`.
    fn dnat_map(self) -> &'static str;
    /// Map of mappings on one host address: `dnat4ip` / `dnat6ip`.
    fn dnat_ip_map(self) -> &'static str;
    /// Hairpin set: `hairpin4` / `hairpin6`.
    fn hairpin_set(self) -> &'static str;
    /// Loopback destinations the output hook leaves alone.
    fn loopback(self) -> &'static str;
    /// Sources the DNAT leaves alone (IPv6 link-local, as Docker does).
    fn src_skip(self) -> &'static str;
}

impl NftFamily for IpFamily {
    fn nft(self) -> &'static str {
        match self {
            IpFamily::V4 => "ip",
            IpFamily::V6 => "ip6",
        }
    }
    fn addr_type(self) -> &'static str {
        match self {
            IpFamily::V4 => "ipv4_addr",
            IpFamily::V6 => "ipv6_addr",
        }
    }
    fn dnat_map(self) -> &'static str {
        match self {
            IpFamily::V4 => "dnat4",
            IpFamily::V6 => "dnat6",
        }
    }
    fn dnat_ip_map(self) -> &'static str {
        match self {
            IpFamily::V4 => "dnat4ip",
            IpFamily::V6 => "dnat6ip",
        }
    }
    fn hairpin_set(self) -> &'static str {
        match self {
            IpFamily::V4 => "hairpin4",
            IpFamily::V6 => "hairpin6",
        }
    }
    fn loopback(self) -> &'static str {
        match self {
            IpFamily::V4 => "127.0.0.0/8",
            IpFamily::V6 => "::1",
        }
    }
    fn src_skip(self) -> &'static str {
        match self {
            IpFamily::V4 => "",
            IpFamily::V6 => "ip6 saddr != fe80::/10 ",
        }
    }
}

fn family_of(ip: IpAddr) -> IpFamily {
    match ip {
        IpAddr::V4(_) => IpFamily::V4,
        IpAddr::V6(_) => IpFamily::V6,
    }
}

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

/// One mapping in one family as our table holds it: a map element (and its hairpin
/// element). The family is the container address's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Elem {
    pub id: String,
    pub protocol: Protocol,
    pub host_ip: Option<IpAddr>,
    pub host_port: u16,
    pub container_ip: IpAddr,
    pub container_port: u16,
}

impl Elem {
    /// The elements of a spec, one per family its host address allows
    /// ([`RuleSpec::dst4`], [`RuleSpec::dst6`]): an IPv4 host address keeps it IPv4 only
    /// (an IPv6 DNAT would match every host address), an IPv6 one (or `::`) IPv6 only.
    fn of(s: &RuleSpec) -> Result<Vec<Elem>, PortsError> {
        s.check()?;
        let one = |host_ip: Option<IpAddr>, container_ip: IpAddr| Elem {
            id: s.id.clone(),
            protocol: s.protocol,
            host_ip,
            host_port: s.host_port,
            container_ip,
            container_port: s.container_port,
        };
        let mut out = Vec::with_capacity(2);
        if let Some(h4) = s.dst4() {
            out.push(one(h4.map(IpAddr::V4), IpAddr::V4(s.container_ip)));
        }
        if let Some((c6, h6)) = s.dst6() {
            out.push(one(h6.map(IpAddr::V6), IpAddr::V6(c6)));
        }
        Ok(out)
    }

    fn family(&self) -> IpFamily {
        family_of(self.container_ip)
    }

    fn map(&self) -> &'static str {
        if self.host_ip.is_some() {
            self.family().dnat_ip_map()
        } else {
            self.family().dnat_map()
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

    fn hairpin(&self) -> Hairpin {
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

/// A hairpin element: container address, protocol, container port.
type Hairpin = (IpAddr, &'static str, u16);

fn hairpin_elem(h: &Hairpin) -> String {
    format!("{} . {} . {} . {}", h.0, h.0, h.1, h.2)
}

/// One of our tables as last read or written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Tbl {
    exists: bool,
    elems: BTreeMap<String, Elem>,
}

impl Tbl {
    fn hairpins(&self) -> BTreeSet<Hairpin> {
        self.elems.values().map(Elem::hairpin).collect()
    }
}

/// Our tables (ip, ip6) as last read or written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Known {
    v4: Tbl,
    v6: Tbl,
}

impl Known {
    fn get(&self, f: IpFamily) -> &Tbl {
        match f {
            IpFamily::V4 => &self.v4,
            IpFamily::V6 => &self.v6,
        }
    }
    fn get_mut(&mut self, f: IpFamily) -> &mut Tbl {
        match f {
            IpFamily::V4 => &mut self.v4,
            IpFamily::V6 => &mut self.v6,
        }
    }
}

/// The marks Docker accepts, per family (the same option sets both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Marks {
    v4: FwMark,
    v6: FwMark,
}

impl Marks {
    fn get(&self, f: IpFamily) -> FwMark {
        match f {
            IpFamily::V4 => self.v4,
            IpFamily::V6 => self.v6,
        }
    }
}

/// The nftables backend, bound to a namespace and an owner (state id).
#[derive(Debug)]
pub struct Nftables {
    netns: NetnsContext,
    table: String,
    marks: std::sync::Mutex<Marks>,
    /// Docker's `ip6 docker-bridges` exists (at detection, then at each repair).
    ipv6: AtomicBool,
    /// How elements are written ("libnftables" or "the nft program"), for the reason.
    via: &'static str,
    /// Sentences detection added to the reason ([`Nftables::note`]).
    notes: Vec<String>,
    known: tokio::sync::Mutex<Option<Known>>,
    /// libnftables in process (None: the `nft` program; see [`super::libnft`]).
    lib: Option<LibNft>,
}

/// Which of Docker's tables exist in `netns`: (`ip docker-bridges`, `ip6 docker-bridges`).
pub async fn docker_tables(netns: &NetnsContext) -> (bool, bool) {
    match run_prog(netns, &sbin("nft"), &["list", "tables"], None).await {
        Ok(out) => {
            let has = |fam: &str| {
                out.lines()
                    .any(|l| l.trim() == format!("table {fam} {DOCKER_TABLE}"))
            };
            (has("ip"), has("ip6"))
        }
        Err(_) => (false, false),
    }
}

/// True when Docker's (IPv4) nftables table exists in `netns`.
pub async fn docker_table_present(netns: &NetnsContext) -> bool {
    docker_tables(netns).await.0
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
/// (or `ip6`) output: `meta mark & MASK == MARK` or `meta mark MARK`. None when no
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

/// The elements of one of our tables in `nft -j list table` output, of the maps of
/// `family` (`dnat4`/`dnat4ip` or `dnat6`/`dnat6ip`).
fn parse_elems(json: &str, family: IpFamily) -> Result<BTreeMap<String, Elem>, String> {
    let v: Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    let items = v
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or("no nftables array")?;
    let addr = |v: &Value| -> Option<IpAddr> {
        let ip: IpAddr = v.as_str()?.parse().ok()?;
        (family_of(ip) == family).then_some(ip)
    };
    for item in items {
        let Some(map) = item.get("map") else { continue };
        let name = map.get("name").and_then(Value::as_str).unwrap_or("");
        let with_ip = if name == family.dnat_map() {
            false
        } else if name == family.dnat_ip_map() {
            true
        } else {
            continue;
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
                (true, [ip, p, port]) => (Some(addr(ip).ok_or_else(bad)?), *p, *port),
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
            let container_ip = addr(cip).ok_or_else(bad)?;
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

/// What our tables hold after `change` (whose elements are `adds`) on `from`. An added
/// mapping replaces its elements in both families (a mapping that lost its IPv6 address
/// loses its ip6 element).
fn after(from: &Known, change: &Change, adds: &[Elem]) -> Known {
    let mut to = from.clone();
    apply_to(&mut to, change, adds);
    to
}

/// [`after`] in place.
fn apply_to(to: &mut Known, change: &Change, adds: &[Elem]) {
    let gone = change.remove.iter().chain(change.add.iter().map(|s| &s.id));
    for id in gone {
        for f in FAMILIES {
            to.get_mut(f).elems.remove(id);
        }
    }
    for e in adds {
        to.get_mut(e.family()).elems.insert(e.id.clone(), e.clone());
    }
    for f in FAMILIES {
        let t = to.get_mut(f);
        t.exists = !t.elems.is_empty();
    }
}

/// The commands of `render_elems(f, from, after(from, change, adds))` for every family,
/// computed from the ids the change touches only: O(change) instead of cloning and
/// comparing the whole table each write round (measured at 1000 elements: the clones
/// and the full comparison were most of a round's own CPU). None when a table of ours
/// must be created or deleted (then the whole script).
fn delta_script(table: &str, from: &Known, change: &Change, adds: &[Elem]) -> Option<String> {
    let gone: BTreeSet<&str> = change
        .remove
        .iter()
        .map(String::as_str)
        .chain(change.add.iter().map(|s| s.id.as_str()))
        .collect();
    let mut s = String::new();
    for f in FAMILIES {
        let tf = from.get(f);
        let added: Vec<&Elem> = adds.iter().filter(|e| e.family() == f).collect();
        let removed: Vec<&Elem> = gone.iter().filter_map(|id| tf.elems.get(*id)).collect();
        if added.is_empty() && removed.is_empty() {
            continue;
        }
        if !tf.exists || tf.elems.len() - removed.len() + added.len() == 0 {
            return None;
        }
        let (fam, hp) = (f.nft(), f.hairpin_set());
        for e in removed.iter().filter(|e| !added.contains(e)) {
            let _ = writeln!(
                s,
                "delete element {fam} {table} {} {{ {} }}",
                e.map(),
                e.key()
            );
        }
        // a hairpin element is shared by every mapping to the same container port: it goes
        // with the last one and comes with the first
        let kept_by_others = |h: &Hairpin| {
            tf.elems
                .iter()
                .any(|(id, e)| e.hairpin() == *h && !gone.contains(id.as_str()))
        };
        let touched: BTreeSet<Hairpin> = removed
            .iter()
            .chain(added.iter())
            .map(|e| e.hairpin())
            .collect();
        let (mut del, mut add) = (Vec::new(), Vec::new());
        for h in &touched {
            let others = kept_by_others(h);
            let before = others || removed.iter().any(|e| e.hairpin() == *h);
            let now = others || added.iter().any(|e| e.hairpin() == *h);
            if before && !now {
                del.push(h);
            } else if now && !before {
                add.push(h);
            }
        }
        for h in del {
            let _ = writeln!(
                s,
                "delete element {fam} {table} {hp} {{ {} }}",
                hairpin_elem(h)
            );
        }
        for e in added.iter().filter(|e| !removed.contains(e)) {
            let _ = writeln!(
                s,
                "add element {fam} {table} {} {{ {} }}",
                e.map(),
                e.element()
            );
        }
        for h in add {
            let _ = writeln!(
                s,
                "add element {fam} {table} {hp} {{ {} }}",
                hairpin_elem(h)
            );
        }
    }
    Some(s)
}

/// `stderr` of `nft list table` for a table that does not exist.
fn no_such_table(e: &PortsError) -> bool {
    matches!(e, PortsError::Iptables { stderr, .. } if stderr.contains("No such file or directory"))
}

impl Nftables {
    /// The backend for a namespace where Docker's `ip docker-bridges` table exists; reads
    /// the mark Docker accepts (NotSupported naming `--bridge-accept-fwmark` when there is
    /// none), and IPv6 too when Docker's `ip6 docker-bridges` exists.
    pub async fn detect(netns: &NetnsContext, owner: &str) -> Result<Nftables, PortsError> {
        super::rules::check_tag_part("state id", owner)?;
        let mark = read_docker_mark(netns).await?;
        let (_, has6) = docker_tables(netns).await;
        let mark6 = if has6 {
            read_docker_mark6(netns).await.unwrap_or(mark)
        } else {
            mark
        };
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
            via,
            notes: Vec::new(),
            table,
            marks: std::sync::Mutex::new(Marks {
                v4: mark,
                v6: mark6,
            }),
            ipv6: AtomicBool::new(has6),
            known: tokio::sync::Mutex::new(None),
            lib,
        })
    }

    /// Add a sentence to the detection reason.
    pub fn note(&mut self, what: &str) {
        self.notes.push(what.to_owned());
    }

    /// Our tables' name (`dindhelper-<state id>`, in family ip and ip6).
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The mark set on IPv4 packets.
    pub fn mark(&self) -> FwMark {
        self.marks.lock().unwrap().v4
    }

    /// The mark set on IPv6 packets.
    pub fn mark6(&self) -> FwMark {
        self.marks.lock().unwrap().v6
    }

    async fn nft(&self, args: &[&str], stdin: Option<&str>) -> Result<String, PortsError> {
        run_prog(&self.netns, &sbin("nft"), args, stdin).await
    }

    /// One of our tables, read fresh (exists = false: no table).
    async fn read_family(&self, f: IpFamily) -> Result<Tbl, PortsError> {
        let out = match self
            .nft(&["-j", "list", "table", f.nft(), &self.table], None)
            .await
        {
            Ok(o) => o,
            Err(e) if no_such_table(&e) => return Ok(Tbl::default()),
            Err(e) => return Err(e),
        };
        let elems = parse_elems(&out, f).map_err(|e| {
            PortsError::Internal(format!(
                "cannot parse nft -j list table {} {}: {e}",
                f.nft(),
                self.table
            ))
        })?;
        Ok(Tbl {
            exists: true,
            elems,
        })
    }

    /// Both our tables, read fresh. Without Docker's ip6 table a failing read of ours
    /// (a kernel without nftables IPv6) counts as no table: IPv4 must not depend on it.
    async fn read(&self) -> Result<Known, PortsError> {
        let v4 = self.read_family(IpFamily::V4).await?;
        let v6 = match self.read_family(IpFamily::V6).await {
            Ok(t) => t,
            Err(e) if !self.ipv6() => {
                tracing::debug!(error = %e, "cannot read table ip6 {}; IPv4 only", self.table);
                Tbl::default()
            }
            Err(e) => return Err(e),
        };
        Ok(Known { v4, v6 })
    }

    /// The whole table of family `f` with `elems` (after `add table; delete table`:
    /// replaces it).
    fn render_table(&self, f: IpFamily, elems: &BTreeMap<String, Elem>) -> String {
        let t = &self.table;
        let (fam, addr) = (f.nft(), f.addr_type());
        let (dnat, dnat_ip, hp) = (f.dnat_map(), f.dnat_ip_map(), f.hairpin_set());
        let (lo, skip) = (f.loopback(), f.src_skip());
        let mark = self.marks.lock().unwrap().get(f).set_stmt();
        let mut s = String::new();
        let _ = writeln!(s, "add table {fam} {t}\ndelete table {fam} {t}");
        let _ = writeln!(s, "table {fam} {t} {{");
        let _ = writeln!(
            s,
            "  map {dnat} {{ type inet_proto . inet_service : {addr} . inet_service; }}"
        );
        let _ = writeln!(
            s,
            "  map {dnat_ip} {{ type {addr} . inet_proto . inet_service : {addr} . inet_service; }}"
        );
        let _ = writeln!(
            s,
            "  set {hp} {{ type {addr} . {addr} . inet_proto . inet_service; }}"
        );
        let _ = writeln!(
            s,
            "  chain prerouting {{ type nat hook prerouting priority -100; policy accept; fib daddr type local jump ports; }}"
        );
        let _ = writeln!(
            s,
            "  chain output {{ type nat hook output priority -100; policy accept; {fam} daddr != {lo} fib daddr type local jump ports; }}"
        );
        let _ = writeln!(s, "  chain ports {{");
        let _ = writeln!(
            s,
            "    {skip}{fam} daddr . meta l4proto . th dport @{dnat_ip} {mark} dnat {fam} to {fam} daddr . meta l4proto . th dport map @{dnat_ip}"
        );
        let _ = writeln!(
            s,
            "    {skip}meta l4proto . th dport @{dnat} {mark} dnat {fam} to meta l4proto . th dport map @{dnat}"
        );
        let _ = writeln!(s, "  }}");
        let _ = writeln!(
            s,
            "  chain postrouting {{ type nat hook postrouting priority 100; policy accept; ct status dnat {fam} saddr . {fam} daddr . meta l4proto . th dport @{hp} masquerade; }}"
        );
        let _ = writeln!(s, "}}");
        let to = Tbl {
            exists: true,
            elems: elems.clone(),
        };
        s.push_str(&self.render_elems(f, &Tbl::default(), &to));
        s
    }

    /// The element commands that turn `from` into `to` in the table of family `f` (both
    /// exist).
    fn render_elems(&self, f: IpFamily, from: &Tbl, to: &Tbl) -> String {
        let (fam, t, hp) = (f.nft(), &self.table, f.hairpin_set());
        let mut s = String::new();
        for (id, e) in &from.elems {
            if to.elems.get(id) != Some(e) {
                let _ = writeln!(s, "delete element {fam} {t} {} {{ {} }}", e.map(), e.key());
            }
        }
        let (hf, ht) = (from.hairpins(), to.hairpins());
        for h in hf.difference(&ht) {
            let _ = writeln!(s, "delete element {fam} {t} {hp} {{ {} }}", hairpin_elem(h));
        }
        for (id, e) in &to.elems {
            if from.elems.get(id) != Some(e) {
                let _ = writeln!(s, "add element {fam} {t} {} {{ {} }}", e.map(), e.element());
            }
        }
        for h in ht.difference(&hf) {
            let _ = writeln!(s, "add element {fam} {t} {hp} {{ {} }}", hairpin_elem(h));
        }
        s
    }

    /// The commands that turn our table of family `f` from `from` into `to`.
    fn script_family(&self, f: IpFamily, from: &Tbl, to: &Tbl) -> String {
        if to.elems.is_empty() {
            return if from.exists {
                format!("delete table {} {}\n", f.nft(), self.table)
            } else {
                String::new()
            };
        }
        if !from.exists {
            return self.render_table(f, &to.elems);
        }
        self.render_elems(f, from, to)
    }

    /// The script (one transaction) that turns `from` into `to`, both families.
    fn script(&self, from: &Known, to: &Known) -> String {
        FAMILIES
            .iter()
            .map(|&f| self.script_family(f, from.get(f), to.get(f)))
            .collect()
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

    /// The elements of `specs`; NotSupported for an IPv6 one while Docker has no ip6 table.
    fn elems_of(&self, specs: &[RuleSpec]) -> Result<Vec<Elem>, PortsError> {
        let mut out = Vec::with_capacity(specs.len());
        for s in specs {
            let es = Elem::of(s)?;
            if es.iter().any(|e| e.family() == IpFamily::V6) && !self.ipv6() {
                return Err(PortsError::NotSupported {
                    reason: format!(
                        "Docker does not publish IPv6 here (no table ip6 {DOCKER_TABLE})"
                    ),
                });
            }
            out.extend(es);
        }
        Ok(out)
    }

    async fn apply_change(&self, change: &Change) -> Result<(), PortsError> {
        let adds = self.elems_of(&change.add)?;
        let mut known = self.known.lock().await;
        if known.is_none() {
            *known = Some(self.read().await?);
        }
        let cur = known.as_mut().expect("read above");
        // what changes only, or the whole script when a table of ours comes or goes
        let script = match delta_script(&self.table, cur, change, &adds) {
            Some(s) => s,
            None => self.script(cur, &after(cur, change, &adds)),
        };
        let Err(e) = self.run_script(&script).await else {
            apply_to(cur, change, &adds);
            return Ok(());
        };
        // what we knew may be stale (table flushed, elements deleted): read once, retry
        tracing::debug!(error = %e, "nft batch failed; re-reading our tables");
        let live = match self.read().await {
            Ok(l) => l,
            Err(_) => {
                *known = None;
                return Err(e);
            }
        };
        let to = after(&live, change, &adds);
        let script = self.script(&live, &to);
        *known = Some(live);
        self.run_script(&script).await?;
        *known = Some(to);
        Ok(())
    }

    /// Docker's tables and marks again (a dockerd restarted with another mark, with or
    /// without IPv6): which families' marks changed.
    async fn refresh_docker(&self) -> Result<[bool; 2], PortsError> {
        let (has4, has6) = docker_tables(&self.netns).await;
        if self.ipv6.swap(has6, Ordering::SeqCst) != has6 {
            tracing::warn!(
                ipv6 = has6,
                "Docker's table ip6 {DOCKER_TABLE} {}",
                if has6 { "appeared" } else { "is gone" }
            );
        }
        if !has4 {
            return Ok([false, false]);
        }
        let m4 = read_docker_mark(&self.netns).await?;
        let m6 = if has6 {
            read_docker_mark6(&self.netns).await.unwrap_or(m4)
        } else {
            m4
        };
        let new = Marks { v4: m4, v6: m6 };
        let mut cur = self.marks.lock().unwrap();
        let changed = [cur.v4 != new.v4, cur.v6 != new.v6];
        if *cur != new {
            tracing::warn!(old = ?*cur, new = ?new, "Docker's accept mark changed");
        }
        *cur = new;
        Ok(changed)
    }

    async fn repair_to(
        &self,
        desired: &[RuleSpec],
        scope: &(dyn Fn(&str) -> bool + Send + Sync),
    ) -> Result<Repaired, PortsError> {
        let mut known = self.known.lock().await;
        *known = None;
        let mark_changed = self.refresh_docker().await?;
        // what reconcile decided (IPv6 from the flag it read before this repair)
        let mut want = Vec::new();
        for s in desired {
            want.extend(Elem::of(s)?);
        }
        let live = self.read().await?;
        let mut out = Repaired::default();
        let mut to = Known::default();
        let mut script = String::new();
        for (i, f) in FAMILIES.into_iter().enumerate() {
            let (l, t) = (live.get(f), to.get_mut(f));
            t.elems = l
                .elems
                .iter()
                .filter(|(id, _)| !scope(id))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            for e in want.iter().filter(|e| e.family() == f) {
                t.elems.insert(e.id.clone(), e.clone());
            }
            for (id, e) in &l.elems {
                if scope(id) && t.elems.get(id) != Some(e) {
                    *out.removed.entry(id.clone()).or_default() += 1;
                }
            }
            for (id, e) in &t.elems {
                if l.elems.get(id) != Some(e) {
                    *out.added.entry(id.clone()).or_default() += 1;
                }
            }
            t.exists = !t.elems.is_empty();
            let whole = t.exists && (mark_changed[i] || !l.exists || self.chains_missing(f).await);
            if whole {
                script.push_str(&self.render_table(f, &t.elems));
            } else {
                script.push_str(&self.script_family(f, l, t));
            }
        }
        self.run_script(&script).await?;
        *known = Some(to);
        Ok(out)
    }

    /// True when our table of family `f` exists but a chain of it is gone (an admin
    /// deleted it).
    async fn chains_missing(&self, f: IpFamily) -> bool {
        match self
            .nft(&["list", "table", f.nft(), &self.table], None)
            .await
        {
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

/// The mark of the "ALLOW FW MARK" rule in Docker's ip6 table (None: no table, or no
/// bridge chain with one yet).
pub async fn read_docker_mark6(netns: &NetnsContext) -> Option<FwMark> {
    let out = run_prog(
        netns,
        &sbin("nft"),
        &["-j", "list", "table", "ip6", DOCKER_TABLE],
        None,
    )
    .await
    .ok()?;
    parse_fwmark(&out)
}

impl Firewall for Nftables {
    /// Built at each read from what the last repair saw: the marks and whether Docker's
    /// ip6 table exists can change with a dockerd restart.
    fn detected(&self) -> Detected {
        let marks = *self.marks.lock().unwrap();
        let table = &self.table;
        let v6 = if self.ipv6() {
            format!(
                "; IPv6 too: Docker's table ip6 {DOCKER_TABLE} exists (accept mark {}); \
                 IPv6 ports go into table ip6 {table}",
                marks.v6
            )
        } else {
            format!(
                "; IPv4 only: no table ip6 {DOCKER_TABLE} (dockerd runs without ip6tables, \
                 or the host has no IPv6)"
            )
        };
        let notes: String = self.notes.iter().map(|n| format!("; {n}")).collect();
        Detected {
            name: "nftables",
            reason: format!(
                "Docker's nftables table ip {DOCKER_TABLE} exists (dockerd \
                 --firewall-backend=nftables); its \"{FWMARK_COMMENT}\" rule accepts mark {} \
                 (--bridge-accept-fwmark); ports go into table ip {table} (written through \
                 {}){v6}{notes}",
                marks.v4, self.via
            ),
        }
    }

    fn ipv6(&self) -> bool {
        self.ipv6.load(Ordering::SeqCst)
    }

    fn apply<'a>(&'a self, change: &'a Change) -> Fut<'a, ()> {
        Box::pin(self.apply_change(change))
    }

    fn list_tagged(&self) -> Fut<'_, Vec<Tagged>> {
        Box::pin(async move {
            let live = self.read().await?;
            let owner = self.table.trim_start_matches("dindhelper-").to_owned();
            let out = FAMILIES
                .iter()
                .flat_map(|&f| live.get(f).elems.values())
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
        let e = parse_elems(j, IpFamily::V4).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e["abc"].host_port, 9090);
        assert_eq!(e["abc"].protocol, Protocol::Tcp);
        assert_eq!(e["def"].host_ip, Some("10.0.0.1".parse().unwrap()));
        assert_eq!(
            e["def"].container_ip,
            "192.0.2.3".parse::<IpAddr>().unwrap()
        );
        // the IPv6 maps are another family's: not read as IPv4
        assert!(parse_elems(j, IpFamily::V6).unwrap().is_empty());
    }

    /// What `nft -j list table ip6 dindhelper-x` prints (nft 1.0.6) for one mapping.
    #[test]
    fn ipv6_elements_from_json() {
        let j = r#"{"nftables":[{"metainfo":{"version":"1.0.6"}},{"table":{"family":"ip6","name":"dindhelper-x","handle":2}},{"map":{"family":"ip6","name":"dnat6","table":"dindhelper-x","type":["inet_proto","inet_service"],"handle":5,"map":"ipv6_addr . inet_service","elem":[[{"elem":{"val":{"concat":["tcp",9090]},"comment":"abc"}},{"concat":["2001:db8::2",90]}]]}},{"set":{"family":"ip6","name":"hairpin6","table":"dindhelper-x","elem":[{"concat":["2001:db8::2","2001:db8::2","tcp",90]}]}}]}"#;
        let e = parse_elems(j, IpFamily::V6).unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(
            e["abc"].container_ip,
            "2001:db8::2".parse::<IpAddr>().unwrap()
        );
        assert_eq!(e["abc"].family(), IpFamily::V6);
        assert_eq!(e["abc"].text(), "dnat6 { tcp . 9090 : 2001:db8::2 . 90 }");
        // an IPv4 address in an IPv6 map is not ours
        let bad = j.replace("\"2001:db8::2\",90", "\"192.0.2.2\",90");
        assert!(parse_elems(&bad, IpFamily::V6).is_err());
    }

    fn backend() -> Nftables {
        let m = FwMark { value: 2, mask: 3 };
        Nftables {
            netns: NetnsContext::current(),
            table: "dindhelper-x".into(),
            marks: std::sync::Mutex::new(Marks { v4: m, v6: m }),
            ipv6: AtomicBool::new(true),
            via: "libnftables",
            notes: Vec::new(),
            known: tokio::sync::Mutex::new(None),
            lib: None,
        }
    }

    fn spec(ip6: Option<&str>, host_ip: Option<&str>) -> RuleSpec {
        RuleSpec {
            id: "abc".into(),
            protocol: Protocol::Tcp,
            host_ip: host_ip.map(|h| h.parse().unwrap()),
            host_port: 9090,
            container_ip: "192.0.2.2".parse().unwrap(),
            container_ip6: ip6.map(|a| a.parse().unwrap()),
            container_port: 90,
            bridge: "bridge1".into(),
        }
    }

    fn known(specs: &[RuleSpec]) -> Known {
        let mut k = Known::default();
        for s in specs {
            for e in Elem::of(s).unwrap() {
                k.get_mut(e.family()).elems.insert(e.id.clone(), e);
            }
        }
        k.v4.exists = !k.v4.elems.is_empty();
        k.v6.exists = !k.v6.elems.is_empty();
        k
    }

    /// The write round's delta gives the commands of the whole-table comparison, for
    /// every kind of change (hairpins shared, going with the last mapping, a new address).
    #[test]
    fn delta_script_equals_the_whole_table_script() {
        let b = backend();
        let at = |id: &str, port: u16, ip: &str, cport: u16, ip6: Option<&str>| RuleSpec {
            id: id.into(),
            host_port: port,
            container_ip: ip.parse().unwrap(),
            container_port: cport,
            ..spec(ip6, None)
        };
        let sorted = |t: &str| {
            let mut v: Vec<&str> = t.lines().collect();
            v.sort();
            v.join("\n")
        };
        let base = vec![
            at("a", 8080, "192.0.2.2", 80, Some("2001:db8::2")),
            at("b", 8081, "192.0.2.2", 80, Some("2001:db8::2")),
            at("c", 8082, "192.0.2.3", 80, None),
            at("d", 8083, "192.0.2.3", 81, None),
            at("g", 8090, "192.0.2.4", 80, Some("2001:db8::4")),
        ];
        let from = known(&base);
        let cases: Vec<(&str, Change)> = vec![
            (
                "add, hairpin shared",
                Change {
                    remove: vec![],
                    add: vec![at("e", 8084, "192.0.2.2", 80, None)],
                },
            ),
            (
                "add, new hairpin",
                Change {
                    remove: vec![],
                    add: vec![at("e", 8084, "192.0.2.9", 80, None)],
                },
            ),
            (
                "remove one of two sharing a hairpin",
                Change {
                    remove: vec!["a".into()],
                    add: vec![],
                },
            ),
            (
                "remove the last of a hairpin",
                Change {
                    remove: vec!["d".into()],
                    add: vec![],
                },
            ),
            (
                "remove both sharing",
                Change {
                    remove: vec!["a".into(), "b".into()],
                    add: vec![],
                },
            ),
            (
                "new address (re-add)",
                Change {
                    remove: vec![],
                    add: vec![at("c", 8082, "192.0.2.7", 80, None)],
                },
            ),
            (
                "unchanged re-add",
                Change {
                    remove: vec![],
                    add: vec![at("c", 8082, "192.0.2.3", 80, None)],
                },
            ),
            (
                "loses IPv6",
                Change {
                    remove: vec![],
                    add: vec![at("a", 8080, "192.0.2.2", 80, None)],
                },
            ),
            (
                "mixed",
                Change {
                    remove: vec!["c".into(), "nosuch".into()],
                    add: vec![at("f", 9000, "192.0.2.3", 81, Some("2001:db8::3"))],
                },
            ),
        ];
        for (what, change) in cases {
            let adds = b.elems_of(&change.add).unwrap();
            let to = after(&from, &change, &adds);
            let whole = b.script(&from, &to);
            let delta = delta_script(&b.table, &from, &change, &adds)
                .unwrap_or_else(|| panic!("{what}: no delta"));
            assert_eq!(sorted(&delta), sorted(&whole), "{what}");
            let mut k = from.clone();
            apply_to(&mut k, &change, &adds);
            assert_eq!(k, to, "{what}");
        }
        // a table of ours comes or goes: the whole script
        let empty = Known::default();
        let add = Change {
            remove: vec![],
            add: vec![at("a", 1, "192.0.2.2", 80, None)],
        };
        assert!(delta_script(&b.table, &empty, &add, &b.elems_of(&add.add).unwrap()).is_none());
        let one = known(&[at("a", 1, "192.0.2.2", 80, None)]);
        let rm = Change {
            remove: vec!["a".into()],
            add: vec![],
        };
        assert!(delta_script(&b.table, &one, &rm, &[]).is_none());
        // an IPv6 element first: the ip6 table comes
        let v6 = Change {
            remove: vec![],
            add: vec![at("e", 1, "192.0.2.2", 80, Some("2001:db8::9"))],
        };
        let c = known(&[at("c", 8082, "192.0.2.3", 80, None)]);
        assert!(delta_script(&b.table, &c, &v6, &b.elems_of(&v6.add).unwrap()).is_none());
    }

    #[test]
    fn a_mapping_with_ipv6_is_one_element_in_each_table_in_one_transaction() {
        let b = backend();
        let both = known(&[spec(Some("2001:db8::2"), None)]);
        let s = b.script(&Known::default(), &both);
        for want in [
            "table ip dindhelper-x {",
            "table ip6 dindhelper-x {",
            "map dnat6 { type inet_proto . inet_service : ipv6_addr . inet_service; }",
            "set hairpin6 { type ipv6_addr . ipv6_addr . inet_proto . inet_service; }",
            "ip6 daddr != ::1 fib daddr type local jump ports;",
            "    ip6 saddr != fe80::/10 meta l4proto . th dport @dnat6 meta mark set meta mark & 0xfffffffc | 0x2 dnat ip6 to meta l4proto . th dport map @dnat6\n",
            "ct status dnat ip6 saddr . ip6 daddr . meta l4proto . th dport @hairpin6 masquerade;",
            "add element ip6 dindhelper-x dnat6 { tcp . 9090 comment \"abc\" : 2001:db8::2 . 90 }\n",
            "add element ip6 dindhelper-x hairpin6 { 2001:db8::2 . 2001:db8::2 . tcp . 90 }\n",
            "add element ip dindhelper-x dnat4 { tcp . 9090 comment \"abc\" : 192.0.2.2 . 90 }\n",
        ] {
            assert!(s.contains(want), "{want:?} missing in\n{s}");
        }
        // the IPv4 table is the one of earlier versions: no IPv6 word in it
        let v4 = b.script(&Known::default(), &known(&[spec(None, None)]));
        assert!(!v4.contains("ip6"), "{v4}");
        // IPv4-only again: the ip6 table goes with its last element, IPv4 stays as it is
        let s = b.script(&both, &known(&[spec(None, None)]));
        assert_eq!(s, "delete table ip6 dindhelper-x\n");
        // a host IPv4 address keeps the mapping IPv4-only
        let k = known(&[spec(Some("2001:db8::2"), Some("10.0.0.1"))]);
        assert!(k.v6.elems.is_empty() && k.v4.elems["abc"].map() == "dnat4ip");
    }

    #[test]
    fn an_ipv6_host_address_is_an_ipv6_element_only() {
        let b = backend();
        // family ipv6 on every address (host `::`): dnat6 only, no IPv4 table
        let any6 = known(&[spec(Some("2001:db8::2"), Some("::"))]);
        assert!(any6.v4.elems.is_empty());
        assert_eq!(any6.v6.elems["abc"].map(), "dnat6");
        let s = b.script(&Known::default(), &any6);
        assert!(!s.contains("table ip dindhelper-x"), "{s}");
        // one host IPv6 address: a dnat6ip element keyed by it
        let one = known(&[spec(Some("2001:db8::2"), Some("2001:db8:99::1"))]);
        assert!(one.v4.elems.is_empty());
        let s = b.script(&Known::default(), &one);
        assert!(
            s.contains("add element ip6 dindhelper-x dnat6ip { 2001:db8:99::1 . tcp . 9090 comment \"abc\" : 2001:db8::2 . 90 }\n"),
            "{s}"
        );
        assert!(s.contains("ip6 saddr != fe80::/10 ip6 daddr . meta l4proto . th dport @dnat6ip"));
    }

    #[test]
    fn an_added_mapping_replaces_its_elements_in_both_families() {
        let b = backend();
        let from = known(&[spec(Some("2001:db8::2"), None)]);
        let change = Change {
            remove: vec![],
            add: vec![spec(None, None)],
        };
        let adds = b.elems_of(&change.add).unwrap();
        let to = after(&from, &change, &adds);
        assert_eq!(to, known(&[spec(None, None)]));
        assert_eq!(b.script(&from, &to), "delete table ip6 dindhelper-x\n");
        // an IPv6 mapping while Docker has no ip6 table: NotSupported, nothing written
        b.ipv6.store(false, Ordering::SeqCst);
        let e = b.elems_of(&[spec(Some("2001:db8::2"), None)]).unwrap_err();
        assert!(e.to_string().contains("ip6 docker-bridges"), "{e}");
    }
}
