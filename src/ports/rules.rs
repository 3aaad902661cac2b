//! Pure builders of the `iptables-restore --noflush` batches for port mappings, the parser
//! of `iptables-save` output that finds the rules we tagged, and the repair diff.
//!
//! The rules are what dockerd writes for `docker run -p` with `--userland-proxy=false`
//! (there is no proxy behind our ports), plus a comment `dindhelper:<state id>:<mapping id>`
//! so reconcile finds its own and two daemons with different state dirs in one netns never
//! touch each other's rules:
//!
//! ```text
//! *nat
//! -I DOCKER 1 [-d HOST_IP/32] -p tcp -m tcp --dport H -m comment --comment dindhelper:S:ID -j DNAT --to-destination C:P
//! -A POSTROUTING -s C/32 -d C/32 -p tcp -m tcp --dport P -m comment --comment dindhelper:S:ID -j MASQUERADE
//! COMMIT
//! *filter
//! -I DOCKER 1 -d C/32 -o BR -p tcp -m tcp --dport P -m conntrack --ctstate DNAT -m comment --comment dindhelper:S:ID -j ACCEPT
//! COMMIT
//! ```
//!
//! IPv6 (a mapping whose container has an IPv6 address and where Docker publishes IPv6,
//! i.e. ip6tables has Docker's nat DOCKER chain): the same three rules in `ip6tables-restore`
//! text, with `/128` and `--to-destination [C6]:P`, as `ip6tables-save` prints them:
//!
//! ```text
//! *nat
//! -I DOCKER 1 -p tcp -m tcp --dport H -m comment --comment dindhelper:S:ID -j DNAT --to-destination [fd00::2]:P
//! -A POSTROUTING -s fd00::2/128 -d fd00::2/128 -p tcp -m tcp --dport P -m comment --comment dindhelper:S:ID -j MASQUERADE
//! COMMIT
//! *filter
//! -I DOCKER 1 -d fd00::2/128 -o BR -p tcp -m tcp --dport P -m conntrack --ctstate DNAT -m comment --comment dindhelper:S:ID -j ACCEPT
//! COMMIT
//! ```
//!
//! Traps:
//! - IPv6 addresses are written the way `ip6tables-save` prints them (RFC 5952, what
//!   `Ipv6Addr`'s Display gives): the repair compares tokens, so `fd00:0::2` would be a
//!   stale rule forever.
//! - A mapping restricted to a host IPv4 address (`host_ip`) gets no IPv6 rules: the v6 DNAT
//!   would match every host address. The other way round, a host IPv6 address (family
//!   `ipv6`; `::` when it has none, as Docker's `-p [::]:H:C`) gets IPv6 rules only, its
//!   DNAT with `-d H6/128`.
//! - A batch must NEVER contain a chain declaration such as `:DOCKER - [0:0]`: with
//!   `--noflush` a declared chain that exists is *flushed*, which would wipe every rule
//!   dockerd wrote. The chains are dockerd's; we only add and delete rules in them.
//! - The filter rule is inserted at the top (`-I DOCKER 1`): Docker 28+ ends its filter
//!   DOCKER chain with `! -i BR -o BR -j DROP` (Docker 20.10 has no final rule).
//! - The DNAT rule is inserted at the top of nat DOCKER too and has no `! -i BR`: Docker
//!   (userland proxy on, the default) starts that chain with `-i BR -j RETURN` and leaves
//!   hairpin traffic (a container to its own published port) to docker-proxy. We have no
//!   proxy, so the DNAT must see packets from the bridge, and the MASQUERADE rule makes the
//!   reply of such a hairpin come back through the host.
//! - The filter rule accepts what was DNATed to C:P (`--ctstate DNAT`) on its way out to
//!   the bridge, from outside *and* from the bridge (hairpin): Docker's noicc layout drops
//!   `-i BR -o BR` after the DOCKER chain, so `! -i BR` would cut the hairpin. Direct access
//!   to C:P without a DNAT stays dropped (Docker 28's trailing DROP, raw PREROUTING drops:
//!   those see the host address before our DNAT, so they never hit published traffic).
//! - The rule text is written in the canonical order `iptables-save` prints (`-s -d -i -o
//!   -p`, matches, comment, target), so the live rules can be compared token-wise after
//!   dropping the comment.
//! - Every name in the text is checked first ([`Rule`]s are only built from a [`RuleSpec`]
//!   that passes [`RuleSpec::check`]): a bridge name with a space or newline would add
//!   options or whole lines to the batch.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::types::PortsError;

/// The comment prefix that marks our rules.
pub const TAG_PREFIX: &str = "dindhelper:";

/// Transport protocol of a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    /// Parses `tcp` / `udp` (exactly, lower case, as the D-Bus API documents).
    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything a set of rules depends on: a resolved mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSpec {
    pub id: String,
    pub protocol: Protocol,
    /// The host address the DNAT is restricted to, and with it the families the spec
    /// holds: None = every address, IPv4 rules plus IPv6 rules when `container_ip6` is
    /// set; an IPv4 address = IPv4 rules for it only; `::` = IPv6 rules only, every
    /// address (Docker's `-p [::]:H:C`); another IPv6 address = IPv6 rules for it only.
    pub host_ip: Option<IpAddr>,
    pub host_port: u16,
    pub container_ip: Ipv4Addr,
    /// The container's IPv6 address on the network when the mapping holds IPv6 too
    /// (None: IPv4 only). Backends without IPv6 refuse a spec that has one.
    pub container_ip6: Option<Ipv6Addr>,
    pub container_port: u16,
    pub bridge: String,
}

impl RuleSpec {
    /// The IPv4 DNAT destination: None = no IPv4 rules, Some(None) = every host address,
    /// Some(Some(a)) = host address `a` only.
    pub fn dst4(&self) -> Option<Option<Ipv4Addr>> {
        match self.host_ip {
            None => Some(None),
            Some(IpAddr::V4(a)) if a.is_unspecified() => Some(None),
            Some(IpAddr::V4(a)) => Some(Some(a)),
            Some(IpAddr::V6(_)) => None,
        }
    }

    /// The IPv6 rules: None = none (no container IPv6 address, or an IPv4 host address),
    /// Some((container address, None)) = every host address, Some((c6, Some(h6))) = host
    /// address `h6` only.
    pub fn dst6(&self) -> Option<(Ipv6Addr, Option<Ipv6Addr>)> {
        let c6 = self.container_ip6?;
        match self.host_ip {
            None => Some((c6, None)),
            Some(IpAddr::V6(a)) if a.is_unspecified() => Some((c6, None)),
            Some(IpAddr::V6(a)) => Some((c6, Some(a))),
            Some(IpAddr::V4(_)) => None,
        }
    }

    /// Refuses a spec whose text fields could change the meaning of a rule: the bridge
    /// must be a safe interface name, the mapping id plain alphanumerics.
    pub fn check(&self) -> Result<(), PortsError> {
        super::validate::check_ifname(&self.bridge)?;
        check_tag_part("mapping id", &self.id)
    }
}

/// A tag part (state id, mapping id): 1..=64 ASCII letters or digits.
pub fn check_tag_part(what: &'static str, s: &str) -> Result<(), PortsError> {
    if s.is_empty() || s.len() > 64 || !s.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(PortsError::UnsafeName {
            what,
            name: s.to_owned(),
            reason: "only 1 to 64 ASCII letters and digits go into a rule tag",
        });
    }
    Ok(())
}

/// The address family of a rule: which program (`iptables-*` / `ip6tables-*`) holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    /// The program prefix: `iptables` / `ip6tables`.
    pub fn program(self) -> &'static str {
        match self {
            IpFamily::V4 => "iptables",
            IpFamily::V6 => "ip6tables",
        }
    }
}

/// The tables we touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Nat,
    Filter,
}

impl Table {
    pub fn as_str(self) -> &'static str {
        match self {
            Table::Nat => "nat",
            Table::Filter => "filter",
        }
    }
}

/// One rule: the table, the chain and the rule body (everything after `-A CHAIN`),
/// including the tag comment.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    pub family: IpFamily,
    pub table: Table,
    pub chain: String,
    /// Body including `-m comment --comment dindhelper:ID`.
    pub body: String,
    /// Mapping id from the tag.
    pub id: String,
    /// State id from the tag (the daemon that wrote it); None for the tag of versions
    /// before state ids (`dindhelper:<mapping id>`).
    pub owner: Option<String>,
    /// Insert at the top of the chain instead of appending.
    pub insert_top: bool,
}

impl Rule {
    /// The comparison key: table, chain and the body's tokens without the comment.
    pub fn key(&self) -> RuleKey {
        RuleKey {
            family: self.family,
            table: self.table,
            chain: self.chain.clone(),
            tokens: strip_comment(&tokenize(&self.body)),
        }
    }
}

/// Identity of a rule for comparison with `iptables-save` output.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleKey {
    pub family: IpFamily,
    pub table: Table,
    pub chain: String,
    pub tokens: Vec<String>,
}

fn comment(owner: &str, id: &str) -> String {
    format!("-m comment --comment {TAG_PREFIX}{owner}:{id}")
}

/// The rules for this mapping, tagged with `owner` (the state id): three IPv4 rules, and
/// the same three in IPv6 when the spec has a container IPv6 address (only the families
/// its host address allows, see [`RuleSpec::host_ip`]). The caller has checked `spec`
/// ([`RuleSpec::check`]) and `owner` ([`check_tag_part`]).
pub fn rules_for(spec: &RuleSpec, owner: &str) -> Vec<Rule> {
    let mut out = Vec::with_capacity(6);
    if let Some(h) = spec.dst4() {
        let dst = h.map(|ip| format!("-d {ip}/32 ")).unwrap_or_default();
        let c = spec.container_ip;
        out.extend(three(
            spec,
            owner,
            IpFamily::V4,
            &dst,
            &format!("{c}/32"),
            &format!("{c}"),
        ));
    }
    if let Some((c6, h6)) = spec.dst6() {
        let dst = h6.map(|ip| format!("-d {ip}/128 ")).unwrap_or_default();
        out.extend(three(
            spec,
            owner,
            IpFamily::V6,
            &dst,
            &format!("{c6}/128"),
            &format!("[{c6}]"),
        ));
    }
    out
}

/// DNAT, hairpin MASQUERADE and ACCEPT of one family. `cnet`: the container address as a
/// match (`C/32`, `C6/128`); `cdst`: as a DNAT destination host (`C`, `[C6]`).
fn three(
    spec: &RuleSpec,
    owner: &str,
    family: IpFamily,
    dst: &str,
    cnet: &str,
    cdst: &str,
) -> Vec<Rule> {
    let p = spec.protocol.as_str();
    let br = &spec.bridge;
    let cp = spec.container_port;
    let hp = spec.host_port;
    let tag = comment(owner, &spec.id);
    let own = Some(owner.to_owned());
    let rule = |table, chain: &str, body: String, insert_top| Rule {
        family,
        table,
        chain: chain.into(),
        body,
        id: spec.id.clone(),
        owner: own.clone(),
        insert_top,
    };
    vec![
        rule(
            Table::Nat,
            "DOCKER",
            format!("{dst}-p {p} -m {p} --dport {hp} {tag} -j DNAT --to-destination {cdst}:{cp}"),
            true,
        ),
        rule(
            Table::Nat,
            "POSTROUTING",
            format!("-s {cnet} -d {cnet} -p {p} -m {p} --dport {cp} {tag} -j MASQUERADE"),
            false,
        ),
        rule(
            Table::Filter,
            "DOCKER",
            format!(
                "-d {cnet} -o {br} -p {p} -m {p} --dport {cp} -m conntrack --ctstate DNAT {tag} -j ACCEPT"
            ),
            true,
        ),
    ]
}

/// A batch: rules to delete (exact `-D` of the spec) and rules to add. Deletions come
/// first in each table so a repair (old IP out, new IP in) is one atomic step.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Batch {
    pub delete: Vec<Rule>,
    pub add: Vec<Rule>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.delete.is_empty() && self.add.is_empty()
    }

    pub fn extend(&mut self, other: Batch) {
        self.delete.extend(other.delete);
        self.add.extend(other.add);
    }

    /// Number of rule lines.
    pub fn len(&self) -> usize {
        self.delete.len() + self.add.len()
    }

    /// The `iptables-restore --noflush` text of the IPv4 rules. Never declares a chain.
    pub fn render(&self) -> String {
        self.render_family(IpFamily::V4)
    }

    /// True when the batch has a rule of `family`.
    pub fn has(&self, family: IpFamily) -> bool {
        self.delete
            .iter()
            .chain(self.add.iter())
            .any(|r| r.family == family)
    }

    /// The `iptables-restore` / `ip6tables-restore --noflush` text of the rules of `family`.
    pub fn render_family(&self, family: IpFamily) -> String {
        let mut out = String::new();
        for table in [Table::Nat, Table::Filter] {
            let of = |r: &&Rule| r.table == table && r.family == family;
            let dels: Vec<&Rule> = self.delete.iter().filter(of).collect();
            let adds: Vec<&Rule> = self.add.iter().filter(of).collect();
            if dels.is_empty() && adds.is_empty() {
                continue;
            }
            let _ = writeln!(out, "*{}", table.as_str());
            for r in dels {
                let _ = writeln!(out, "-D {} {}", r.chain, r.body);
            }
            for r in adds {
                if r.insert_top {
                    let _ = writeln!(out, "-I {} 1 {}", r.chain, r.body);
                } else {
                    let _ = writeln!(out, "-A {} {}", r.chain, r.body);
                }
            }
            out.push_str("COMMIT\n");
        }
        out
    }
}

/// Batch that adds the rules of every given mapping.
pub fn add_batch<'a>(specs: impl IntoIterator<Item = &'a RuleSpec>, owner: &str) -> Batch {
    Batch {
        delete: vec![],
        add: specs
            .into_iter()
            .flat_map(|s| rules_for(s, owner))
            .collect(),
    }
}

/// Batch that deletes the rules of every given mapping (identical specs, `-D`).
pub fn delete_batch<'a>(specs: impl IntoIterator<Item = &'a RuleSpec>, owner: &str) -> Batch {
    Batch {
        delete: specs
            .into_iter()
            .flat_map(|s| rules_for(s, owner))
            .collect(),
        add: vec![],
    }
}

/// Identity of a rule in a repair: who wrote it, for which mapping, and what it does.
type Ident = (Option<String>, String, RuleKey);

fn ident(r: &Rule) -> Ident {
    (r.owner.clone(), r.id.clone(), r.key())
}

/// Pure diff: the batch that turns `live` (tagged rules found) into `desired`, touching only
/// live rules that pass `in_scope` (the caller decides ownership: never another state's
/// rules). Keeps the first copy of each wanted rule, deletes duplicates, stale rules (e.g.
/// old container IP, a tag without state id), orphans, and adds what is missing.
pub fn plan_repair(desired: &[Rule], live: &[Rule], in_scope: impl Fn(&Rule) -> bool) -> Batch {
    let want: HashSet<Ident> = desired.iter().map(ident).collect();
    let mut seen: HashSet<Ident> = HashSet::new();
    let mut batch = Batch::default();
    for r in live.iter().filter(|r| in_scope(r)) {
        let k = ident(r);
        if want.contains(&k) && seen.insert(k) {
            continue;
        }
        batch.delete.push(r.clone());
    }
    for r in desired {
        if seen.insert(ident(r)) {
            batch.add.push(r.clone());
        }
    }
    batch
}

/// Splits a rule line into tokens the way iptables-restore does: whitespace separated,
/// double quotes group (and are removed).
pub fn tokenize(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_quotes = false;
    let mut have = false;
    let mut chars = line.chars().peekable();
    while let Some(ch) = chars.next() {
        match ch {
            '\\' if in_quotes => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            '"' => {
                in_quotes = !in_quotes;
                have = true;
            }
            c if c.is_whitespace() && !in_quotes => {
                if have {
                    out.push(std::mem::take(&mut cur));
                    have = false;
                }
            }
            c => {
                cur.push(c);
                have = true;
            }
        }
    }
    if have {
        out.push(cur);
    }
    out
}

/// Removes `-m comment --comment X` from a token list.
fn strip_comment(tokens: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(tokens.len());
    let mut i = 0;
    while i < tokens.len() {
        if tokens[i] == "-m" && tokens.get(i + 1).map(String::as_str) == Some("comment") {
            i += 2;
            continue;
        }
        if tokens[i] == "--comment" {
            i += 2;
            continue;
        }
        out.push(tokens[i].clone());
        i += 1;
    }
    out
}

fn comment_of(tokens: &[String]) -> Option<&str> {
    tokens
        .iter()
        .position(|t| t == "--comment")
        .and_then(|i| tokens.get(i + 1))
        .map(String::as_str)
}

/// Parses `iptables-save` output (one or more tables) and returns every rule whose
/// comment starts with `dindhelper:`. The body keeps the saved text (usable with `-D`).
pub fn parse_tagged(save_output: &str) -> Vec<Rule> {
    parse_tagged_family(save_output, IpFamily::V4)
}

/// [`parse_tagged`] of the output of `iptables-save` (V4) or `ip6tables-save` (V6).
pub fn parse_tagged_family(save_output: &str, family: IpFamily) -> Vec<Rule> {
    let mut table = None;
    let mut out = Vec::new();
    for line in save_output.lines() {
        let line = line.trim();
        if let Some(t) = line.strip_prefix('*') {
            table = match t {
                "nat" => Some(Table::Nat),
                "filter" => Some(Table::Filter),
                _ => None,
            };
            continue;
        }
        let Some(table) = table else { continue };
        let Some(rest) = line.strip_prefix("-A ") else {
            continue;
        };
        let Some((chain, body)) = rest.split_once(' ') else {
            continue;
        };
        let tokens = tokenize(body);
        let Some(c) = comment_of(&tokens) else {
            continue;
        };
        let Some(tag) = c.strip_prefix(TAG_PREFIX) else {
            continue;
        };
        let (owner, id) = match tag.split_once(':') {
            Some((o, i)) => (Some(o.to_owned()), i.to_owned()),
            None => (None, tag.to_owned()),
        };
        out.push(Rule {
            family,
            table,
            chain: chain.to_owned(),
            body: body.to_owned(),
            id,
            owner,
            insert_top: false,
        });
    }
    out
}

/// True if the save output of the nat table declares Docker's `DOCKER` chain.
pub fn has_docker_chain(save_output: &str) -> bool {
    save_output
        .lines()
        .any(|l| l.starts_with(":DOCKER ") || l.trim_end() == ":DOCKER")
}

/// Which of Docker's filter layouts `iptables-save -t filter` shows (for the log line
/// that says why a backend was chosen).
pub fn docker_layout(filter_save: &str) -> &'static str {
    let has = |chain: &str| {
        filter_save
            .lines()
            .any(|l| l.split_whitespace().next() == Some(chain))
    };
    if has(":DOCKER-FORWARD") {
        "Docker 28.0.1+ layout: FORWARD -> DOCKER-FORWARD -> DOCKER-BRIDGE -> DOCKER"
    } else if filter_save.contains("docker-ext-bridges-v4") {
        "Docker 28.0.0 layout: FORWARD -> DOCKER through ipset docker-ext-bridges-v4"
    } else if has(":DOCKER-ISOLATION-STAGE-1") {
        "Docker 27 or older layout: FORWARD -> DOCKER-ISOLATION-STAGE-1, -o BRIDGE -> DOCKER"
    } else {
        "filter layout not recognised"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWNER: &str = "a1b2c3";

    fn spec(id: &str, host_ip: Option<Ipv4Addr>, proto: Protocol) -> RuleSpec {
        RuleSpec {
            id: id.into(),
            protocol: proto,
            host_ip: host_ip.map(IpAddr::V4),
            host_port: 8080,
            container_ip: Ipv4Addr::new(172, 17, 0, 2),
            container_ip6: None,
            container_port: 80,
            bridge: "docker0".into(),
        }
    }

    fn spec_ip(id: &str, ip: [u8; 4]) -> RuleSpec {
        RuleSpec {
            container_ip: Ipv4Addr::from(ip),
            ..spec(id, None, Protocol::Tcp)
        }
    }

    #[test]
    fn add_batch_is_dockers_noproxy_rules_plus_tag() {
        let text = add_batch([&spec("m1", None, Protocol::Tcp)], OWNER).render();
        assert_eq!(
            text,
            "*nat\n\
             -I DOCKER 1 -p tcp -m tcp --dport 8080 -m comment --comment dindhelper:a1b2c3:m1 -j DNAT --to-destination 172.17.0.2:80\n\
             -A POSTROUTING -s 172.17.0.2/32 -d 172.17.0.2/32 -p tcp -m tcp --dport 80 -m comment --comment dindhelper:a1b2c3:m1 -j MASQUERADE\n\
             COMMIT\n\
             *filter\n\
             -I DOCKER 1 -d 172.17.0.2/32 -o docker0 -p tcp -m tcp --dport 80 -m conntrack --ctstate DNAT -m comment --comment dindhelper:a1b2c3:m1 -j ACCEPT\n\
             COMMIT\n"
        );
    }

    #[test]
    fn host_ip_and_udp() {
        let text = add_batch(
            [&spec(
                "m2",
                Some(Ipv4Addr::new(10, 99, 0, 1)),
                Protocol::Udp,
            )],
            OWNER,
        )
        .render();
        assert!(text.contains(
            "-I DOCKER 1 -d 10.99.0.1/32 -p udp -m udp --dport 8080 -m comment --comment dindhelper:a1b2c3:m2 -j DNAT --to-destination 172.17.0.2:80\n"
        ));
        assert!(text.contains("-p udp -m udp --dport 80"));
    }

    #[test]
    fn delete_batch_uses_identical_specs() {
        let s = spec("m1", None, Protocol::Tcp);
        let add = add_batch([&s], OWNER).render();
        let del = delete_batch([&s], OWNER).render();
        let add_bodies: Vec<String> = add
            .lines()
            .filter_map(|l| {
                l.strip_prefix("-A ")
                    .map(|r| r.split_once(' ').unwrap().1.to_string())
                    .or_else(|| l.strip_prefix("-I DOCKER 1 ").map(|r| r.to_string()))
            })
            .collect();
        let del_bodies: Vec<String> = del
            .lines()
            .filter_map(|l| {
                l.strip_prefix("-D ")
                    .map(|r| r.split_once(' ').unwrap().1.to_string())
            })
            .collect();
        assert_eq!(add_bodies.len(), 3);
        assert_eq!(add_bodies, del_bodies);
    }

    #[test]
    fn never_declares_a_chain() {
        let specs: Vec<RuleSpec> = (0..50)
            .map(|i| spec(&format!("m{i}"), None, Protocol::Tcp))
            .collect();
        let mut b = add_batch(&specs, OWNER);
        b.extend(delete_batch(&specs, OWNER));
        let text = b.render();
        for line in text.lines() {
            assert!(!line.starts_with(':'), "chain declaration in batch: {line}");
        }
        // one table header each, many mappings in one batch
        assert_eq!(text.matches("*nat\n").count(), 1);
        assert_eq!(text.matches("*filter\n").count(), 1);
        assert_eq!(text.matches("COMMIT\n").count(), 2);
        assert_eq!(b.len(), 300);
    }

    #[test]
    fn empty_batch_renders_nothing() {
        assert_eq!(Batch::default().render(), "");
    }

    #[test]
    fn parses_tagged_rules_from_save_output_both_styles() {
        // iptables-nft-save quotes the comment; a hand-written rule may not. Both appear,
        // with and without a state id, and another daemon's rule.
        let save = "# Generated by iptables-nft-save v1.8.9\n\
*nat\n\
:PREROUTING ACCEPT [0:0]\n\
:DOCKER - [0:0]\n\
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER\n\
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE\n\
-A POSTROUTING -s 172.17.0.2/32 -d 172.17.0.2/32 -p tcp -m tcp --dport 80 -m comment --comment \"dindhelper:a1b2c3:m1\" -j MASQUERADE\n\
-A DOCKER -p tcp -m tcp --dport 8080 -m comment --comment dindhelper:a1b2c3:m1 -j DNAT --to-destination 172.17.0.2:80\n\
-A DOCKER -i docker0 -j RETURN\n\
-A DOCKER ! -i docker0 -p tcp -m tcp --dport 9 -m comment --comment other -j DNAT --to-destination 172.17.0.2:9\n\
-A DOCKER ! -i docker0 -p tcp -m tcp --dport 7 -m comment --comment dindhelper:old1 -j DNAT --to-destination 172.17.0.2:7\n\
-A DOCKER -p tcp -m tcp --dport 6 -m comment --comment dindhelper:ffff00:m9 -j DNAT --to-destination 172.17.0.2:6\n\
COMMIT\n\
*filter\n\
:DOCKER - [0:0]\n\
-A DOCKER -d 172.17.0.2/32 -o docker0 -p tcp -m tcp --dport 80 -m conntrack --ctstate DNAT -m comment --comment \"dindhelper:a1b2c3:m1\" -j ACCEPT\n\
COMMIT\n";
        let tagged = parse_tagged(save);
        assert_eq!(tagged.len(), 5);
        let mine: Vec<&Rule> = tagged
            .iter()
            .filter(|r| r.owner.as_deref() == Some(OWNER))
            .collect();
        assert_eq!(mine.len(), 3);
        assert!(mine.iter().all(|r| r.id == "m1"));
        assert!(tagged.iter().any(|r| r.owner.is_none() && r.id == "old1"));
        assert!(tagged
            .iter()
            .any(|r| r.owner.as_deref() == Some("ffff00") && r.id == "m9"));
        assert!(has_docker_chain(save));
        assert!(!has_docker_chain(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:DOCKER-USER - [0:0]\n"
        ));

        // keys of the live rules equal the keys of what we would write
        let mut want: Vec<RuleKey> = rules_for(&spec("m1", None, Protocol::Tcp), OWNER)
            .iter()
            .map(Rule::key)
            .collect();
        let mut got: Vec<RuleKey> = mine.iter().map(|r| r.key()).collect();
        want.sort();
        got.sort();
        assert_eq!(want, got);
    }

    #[test]
    fn tokenizer_handles_quotes() {
        assert_eq!(
            tokenize(r#"-m comment --comment "a b" -j X"#),
            vec!["-m", "comment", "--comment", "a b", "-j", "X"]
        );
    }

    #[test]
    fn protocol_parse() {
        assert_eq!(Protocol::parse("tcp"), Some(Protocol::Tcp));
        assert_eq!(Protocol::parse("udp"), Some(Protocol::Udp));
        assert_eq!(Protocol::parse("sctp"), None);
        assert_eq!(Protocol::parse("TCP"), None);
    }

    #[test]
    fn plan_adds_missing_and_keeps_present() {
        let want = rules_for(&spec_ip("a", [172, 17, 0, 2]), OWNER);
        let live = parse_tagged(
            "*nat\n-A DOCKER -p tcp -m tcp --dport 8080 -m comment --comment \"dindhelper:a1b2c3:a\" -j DNAT --to-destination 172.17.0.2:80\nCOMMIT\n",
        );
        let b = plan_repair(&want, &live, |_| true);
        assert_eq!(b.delete.len(), 0);
        assert_eq!(b.add.len(), 2);
        assert!(b
            .add
            .iter()
            .all(|r| r.chain != "DOCKER" || r.table == Table::Filter));
    }

    #[test]
    fn plan_follows_new_ip_and_removes_orphans_and_duplicates() {
        let old = rules_for(&spec_ip("a", [172, 17, 0, 2]), OWNER);
        let new = rules_for(&spec_ip("a", [172, 17, 0, 3]), OWNER);
        let orphan = rules_for(&spec_ip("zz", [172, 17, 0, 9]), OWNER);
        let dup = new[0].clone();
        let mut live: Vec<Rule> = old.clone();
        live.extend(orphan.clone());
        live.push(new[0].clone());
        live.push(dup);
        let b = plan_repair(&new, &live, |_| true);
        // old 3 + orphan 3 + one duplicate
        assert_eq!(b.delete.len(), 7);
        assert_eq!(b.add.len(), 2);
        // scoped: orphans of other ids are left alone
        let b = plan_repair(&new, &live, |r| r.id == "a");
        assert_eq!(b.delete.len(), 4);
        // the batch deletes before it adds, never declares a chain
        let text = b.render();
        assert!(!text.lines().any(|l| l.starts_with(':')));
        let first_add = text.find("-A ").unwrap();
        let last_del = text.rfind("-D DOCKER").unwrap();
        assert!(last_del < first_add || text[..first_add].contains("-D"));
    }

    fn spec6(id: &str) -> RuleSpec {
        RuleSpec {
            container_ip6: Some("fd00:dead:beef::242:ac11:2".parse().unwrap()),
            ..spec(id, None, Protocol::Tcp)
        }
    }

    #[test]
    fn ipv6_rules_are_the_same_three_in_ip6tables_text() {
        let b = add_batch([&spec6("m6")], OWNER);
        assert_eq!(b.len(), 6);
        assert!(b.has(IpFamily::V4) && b.has(IpFamily::V6));
        // the IPv4 text is unchanged by the IPv6 address
        assert_eq!(
            b.render(),
            add_batch([&spec("m6", None, Protocol::Tcp)], OWNER).render()
        );
        assert_eq!(
            b.render_family(IpFamily::V6),
            "*nat\n\
             -I DOCKER 1 -p tcp -m tcp --dport 8080 -m comment --comment dindhelper:a1b2c3:m6 -j DNAT --to-destination [fd00:dead:beef::242:ac11:2]:80\n\
             -A POSTROUTING -s fd00:dead:beef::242:ac11:2/128 -d fd00:dead:beef::242:ac11:2/128 -p tcp -m tcp --dport 80 -m comment --comment dindhelper:a1b2c3:m6 -j MASQUERADE\n\
             COMMIT\n\
             *filter\n\
             -I DOCKER 1 -d fd00:dead:beef::242:ac11:2/128 -o docker0 -p tcp -m tcp --dport 80 -m conntrack --ctstate DNAT -m comment --comment dindhelper:a1b2c3:m6 -j ACCEPT\n\
             COMMIT\n"
        );
        // a v4-only batch renders no v6 text at all
        let v4 = add_batch([&spec("m4", None, Protocol::Udp)], OWNER);
        assert!(!v4.has(IpFamily::V6));
        assert_eq!(v4.render_family(IpFamily::V6), "");
    }

    #[test]
    fn a_host_ip_keeps_a_mapping_ipv4_only() {
        let s = RuleSpec {
            host_ip: Some(IpAddr::V4(Ipv4Addr::new(10, 99, 0, 1))),
            ..spec6("m7")
        };
        let rs = rules_for(&s, OWNER);
        assert_eq!(rs.len(), 3);
        assert!(rs.iter().all(|r| r.family == IpFamily::V4));
    }

    #[test]
    fn an_ipv6_host_address_makes_ipv6_rules_only() {
        // `::`: IPv6 only, every host address (family ipv6)
        let any6 = RuleSpec {
            host_ip: Some(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
            ..spec6("m8")
        };
        let b = add_batch([&any6], OWNER);
        assert!(!b.has(IpFamily::V4) && b.has(IpFamily::V6));
        assert_eq!(
            b.render_family(IpFamily::V6),
            add_batch([&spec6("m8")], OWNER).render_family(IpFamily::V6)
        );
        // one host IPv6 address: `-d H6/128` on the DNAT, the rest as for every address
        let one = RuleSpec {
            host_ip: Some("2001:db8:99::1".parse().unwrap()),
            ..spec6("m9")
        };
        let rs = rules_for(&one, OWNER);
        assert_eq!(rs.len(), 3);
        assert!(rs.iter().all(|r| r.family == IpFamily::V6));
        assert_eq!(
            rs[0].body,
            "-d 2001:db8:99::1/128 -p tcp -m tcp --dport 8080 -m comment --comment dindhelper:a1b2c3:m9 -j DNAT --to-destination [fd00:dead:beef::242:ac11:2]:80"
        );
        // an IPv6 host address without a container IPv6 address: no rules at all
        let none = RuleSpec {
            container_ip6: None,
            ..one
        };
        assert!(rules_for(&none, OWNER).is_empty());
    }

    #[test]
    fn ipv6_save_output_parses_back_to_the_written_rules() {
        // what ip6tables-nft-save prints after the batch above (comment quoted)
        let save = "*nat\n\
            :DOCKER - [0:0]\n\
            -A POSTROUTING -s fd00:dead:beef::242:ac11:2/128 -d fd00:dead:beef::242:ac11:2/128 -p tcp -m tcp --dport 80 -m comment --comment \"dindhelper:a1b2c3:m6\" -j MASQUERADE\n\
            -A DOCKER -p tcp -m tcp --dport 8080 -m comment --comment \"dindhelper:a1b2c3:m6\" -j DNAT --to-destination [fd00:dead:beef::242:ac11:2]:80\n\
            COMMIT\n\
            *filter\n\
            -A DOCKER -d fd00:dead:beef::242:ac11:2/128 -o docker0 -p tcp -m tcp --dport 80 -m conntrack --ctstate DNAT -m comment --comment \"dindhelper:a1b2c3:m6\" -j ACCEPT\n\
            COMMIT\n";
        let live = parse_tagged_family(save, IpFamily::V6);
        assert_eq!(live.len(), 3);
        assert!(live.iter().all(|r| r.family == IpFamily::V6));
        let want = rules_for(&spec6("m6"), OWNER);
        // the v6 rules match, so a repair only adds the missing v4 ones
        let b = plan_repair(&want, &live, |_| true);
        assert!(b.delete.is_empty(), "{:?}", b.delete);
        assert_eq!(b.add.len(), 3);
        assert!(b.add.iter().all(|r| r.family == IpFamily::V4));
        // the same text read as v4 is another family: not the wanted v6 rules
        let as_v4 = parse_tagged(save);
        let b = plan_repair(&want, &as_v4, |_| true);
        assert_eq!(b.delete.len(), 3);
        assert_eq!(b.add.len(), 6);
    }

    #[test]
    fn plan_replaces_a_legacy_tag_and_leaves_other_owners() {
        let want = rules_for(&spec_ip("a", [172, 17, 0, 2]), OWNER);
        // the same rules, written before state ids (no owner in the tag) ...
        let legacy: Vec<Rule> = want
            .iter()
            .map(|r| Rule {
                owner: None,
                body: r.body.replace("dindhelper:a1b2c3:a", "dindhelper:a"),
                ..r.clone()
            })
            .collect();
        // ... and another daemon's identical-looking rules
        let other: Vec<Rule> = rules_for(&spec_ip("a", [172, 17, 0, 2]), "ffff00");
        let mut live = legacy.clone();
        live.extend(other.clone());
        let b = plan_repair(&want, &live, |r| r.owner.as_deref() != Some("ffff00"));
        assert_eq!(b.delete, legacy);
        assert_eq!(b.add, want);
        assert!(b.delete.iter().chain(&b.add).all(|r| !other.contains(r)));
    }

    #[test]
    fn a_spec_with_an_unsafe_bridge_or_id_is_refused() {
        for bad in [
            "docker0 -j ACCEPT",
            "br0\n-A INPUT -j ACCEPT",
            "br\"0",
            "br+",
            "",
            "averyveryverylongname",
        ] {
            let s = RuleSpec {
                bridge: bad.into(),
                ..spec("m1", None, Protocol::Tcp)
            };
            assert!(s.check().is_err(), "{bad:?} accepted");
        }
        let s = RuleSpec {
            id: "m1 -j DROP".into(),
            ..spec("m1", None, Protocol::Tcp)
        };
        assert!(s.check().is_err());
        assert!(spec("m1", None, Protocol::Tcp).check().is_ok());
        assert!(check_tag_part("state id", "a1:b2").is_err());
    }

    #[test]
    fn docker_layouts_are_named() {
        assert!(docker_layout(":DOCKER-FORWARD - [0:0]\n").contains("28.0.1+"));
        assert!(docker_layout(
            "-A FORWARD -m set --match-set docker-ext-bridges-v4 dst -j DOCKER\n"
        )
        .contains("28.0.0"));
        assert!(docker_layout(":DOCKER-ISOLATION-STAGE-1 - [0:0]\n").contains("27 or older"));
    }
}
