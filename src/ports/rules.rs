//! Pure builders of the `iptables-restore --noflush` batches for port mappings, and the
//! parser of `iptables-save` output that finds the rules we tagged.
//!
//! The rules are exactly what dockerd writes for `docker run -p`, plus a comment
//! `dindhelper:<mapping id>` so reconcile can find its own:
//!
//! ```text
//! *nat
//! -A DOCKER [-d HOST_IP/32] ! -i BR -p tcp -m tcp --dport H -m comment --comment dindhelper:ID -j DNAT --to-destination C:P
//! -A POSTROUTING -s C/32 -d C/32 -p tcp -m tcp --dport P -m comment --comment dindhelper:ID -j MASQUERADE
//! COMMIT
//! *filter
//! -I DOCKER 1 -d C/32 ! -i BR -o BR -p tcp -m tcp --dport P -m comment --comment dindhelper:ID -j ACCEPT
//! COMMIT
//! ```
//!
//! Traps:
//! - A batch must NEVER contain a chain declaration such as `:DOCKER - [0:0]`: with
//!   `--noflush` a declared chain that exists is *flushed*, which would wipe every rule
//!   dockerd wrote. The chains are dockerd's; we only add and delete rules in them.
//! - The filter rule is inserted at the top (`-I DOCKER 1`): Docker 28+ ends its filter
//!   DOCKER chain with a DROP; Docker 20.10 has no final rule (appending would also work
//!   there, inserting works for both).
//! - The rule text is written in the canonical order `iptables-save` prints (`-s -d -i -o
//!   -p`, matches, comment, target), so the live rules can be compared token-wise after
//!   dropping the comment.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

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
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub container_ip: Ipv4Addr,
    pub container_port: u16,
    pub bridge: String,
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
    pub table: Table,
    pub chain: String,
    /// Body including `-m comment --comment dindhelper:ID`.
    pub body: String,
    /// Mapping id from the tag.
    pub id: String,
    /// Insert at the top of the chain instead of appending.
    pub insert_top: bool,
}

impl Rule {
    /// The comparison key: table, chain and the body's tokens without the comment.
    pub fn key(&self) -> RuleKey {
        RuleKey {
            table: self.table,
            chain: self.chain.clone(),
            tokens: strip_comment(&tokenize(&self.body)),
        }
    }
}

/// Identity of a rule for comparison with `iptables-save` output.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleKey {
    pub table: Table,
    pub chain: String,
    pub tokens: Vec<String>,
}

fn comment(id: &str) -> String {
    format!("-m comment --comment {TAG_PREFIX}{id}")
}

/// The three rules dockerd would write for this mapping, tagged.
pub fn rules_for(spec: &RuleSpec) -> Vec<Rule> {
    let p = spec.protocol.as_str();
    let br = &spec.bridge;
    let c = spec.container_ip;
    let cp = spec.container_port;
    let hp = spec.host_port;
    let tag = comment(&spec.id);
    let dst = spec
        .host_ip
        .map(|ip| format!("-d {ip}/32 "))
        .unwrap_or_default();
    vec![
        Rule {
            table: Table::Nat,
            chain: "DOCKER".into(),
            body: format!(
                "{dst}! -i {br} -p {p} -m {p} --dport {hp} {tag} -j DNAT --to-destination {c}:{cp}"
            ),
            id: spec.id.clone(),
            insert_top: false,
        },
        Rule {
            table: Table::Nat,
            chain: "POSTROUTING".into(),
            body: format!("-s {c}/32 -d {c}/32 -p {p} -m {p} --dport {cp} {tag} -j MASQUERADE"),
            id: spec.id.clone(),
            insert_top: false,
        },
        Rule {
            table: Table::Filter,
            chain: "DOCKER".into(),
            body: format!("-d {c}/32 ! -i {br} -o {br} -p {p} -m {p} --dport {cp} {tag} -j ACCEPT"),
            id: spec.id.clone(),
            insert_top: true,
        },
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

    /// The `iptables-restore --noflush` text. Never declares a chain.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for table in [Table::Nat, Table::Filter] {
            let dels: Vec<&Rule> = self.delete.iter().filter(|r| r.table == table).collect();
            let adds: Vec<&Rule> = self.add.iter().filter(|r| r.table == table).collect();
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
pub fn add_batch<'a>(specs: impl IntoIterator<Item = &'a RuleSpec>) -> Batch {
    Batch {
        delete: vec![],
        add: specs.into_iter().flat_map(rules_for).collect(),
    }
}

/// Batch that deletes the rules of every given mapping (identical specs, `-D`).
pub fn delete_batch<'a>(specs: impl IntoIterator<Item = &'a RuleSpec>) -> Batch {
    Batch {
        delete: specs.into_iter().flat_map(rules_for).collect(),
        add: vec![],
    }
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
        let Some(id) = c.strip_prefix(TAG_PREFIX) else {
            continue;
        };
        out.push(Rule {
            table,
            chain: chain.to_owned(),
            body: body.to_owned(),
            id: id.to_owned(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str, host_ip: Option<Ipv4Addr>, proto: Protocol) -> RuleSpec {
        RuleSpec {
            id: id.into(),
            protocol: proto,
            host_ip,
            host_port: 8080,
            container_ip: Ipv4Addr::new(172, 17, 0, 2),
            container_port: 80,
            bridge: "docker0".into(),
        }
    }

    #[test]
    fn add_batch_is_what_dockerd_writes_plus_tag() {
        let text = add_batch([&spec("m1", None, Protocol::Tcp)]).render();
        assert_eq!(
            text,
            "*nat\n\
             -A DOCKER ! -i docker0 -p tcp -m tcp --dport 8080 -m comment --comment dindhelper:m1 -j DNAT --to-destination 172.17.0.2:80\n\
             -A POSTROUTING -s 172.17.0.2/32 -d 172.17.0.2/32 -p tcp -m tcp --dport 80 -m comment --comment dindhelper:m1 -j MASQUERADE\n\
             COMMIT\n\
             *filter\n\
             -I DOCKER 1 -d 172.17.0.2/32 ! -i docker0 -o docker0 -p tcp -m tcp --dport 80 -m comment --comment dindhelper:m1 -j ACCEPT\n\
             COMMIT\n"
        );
    }

    #[test]
    fn host_ip_and_udp() {
        let text = add_batch([&spec(
            "m2",
            Some(Ipv4Addr::new(10, 99, 0, 1)),
            Protocol::Udp,
        )])
        .render();
        assert!(text.contains(
            "-A DOCKER -d 10.99.0.1/32 ! -i docker0 -p udp -m udp --dport 8080 -m comment --comment dindhelper:m2 -j DNAT --to-destination 172.17.0.2:80\n"
        ));
        assert!(text.contains("-p udp -m udp --dport 80"));
    }

    #[test]
    fn delete_batch_uses_identical_specs() {
        let s = spec("m1", None, Protocol::Tcp);
        let add = add_batch([&s]).render();
        let del = delete_batch([&s]).render();
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
        let mut b = add_batch(&specs);
        b.extend(delete_batch(&specs));
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
        // iptables-nft-save quotes nothing for simple comments; legacy quotes. Both appear.
        let save = "# Generated by iptables-nft-save v1.8.9\n\
*nat\n\
:PREROUTING ACCEPT [0:0]\n\
:DOCKER - [0:0]\n\
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER\n\
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE\n\
-A POSTROUTING -s 172.17.0.2/32 -d 172.17.0.2/32 -p tcp -m tcp --dport 80 -m comment --comment \"dindhelper:m1\" -j MASQUERADE\n\
-A DOCKER -i docker0 -j RETURN\n\
-A DOCKER ! -i docker0 -p tcp -m tcp --dport 8080 -m comment --comment dindhelper:m1 -j DNAT --to-destination 172.17.0.2:80\n\
-A DOCKER ! -i docker0 -p tcp -m tcp --dport 9 -m comment --comment other -j DNAT --to-destination 172.17.0.2:9\n\
COMMIT\n\
*filter\n\
:DOCKER - [0:0]\n\
-A DOCKER -d 172.17.0.2/32 ! -i docker0 -o docker0 -p tcp -m tcp --dport 80 -m comment --comment \"dindhelper:m1\" -j ACCEPT\n\
COMMIT\n";
        let tagged = parse_tagged(save);
        assert_eq!(tagged.len(), 3);
        assert!(tagged.iter().all(|r| r.id == "m1"));
        assert!(has_docker_chain(save));
        assert!(!has_docker_chain(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:DOCKER-USER - [0:0]\n"
        ));

        // keys of the live rules equal the keys of what we would write
        let mut want: Vec<RuleKey> = rules_for(&spec("m1", None, Protocol::Tcp))
            .iter()
            .map(Rule::key)
            .collect();
        let mut got: Vec<RuleKey> = tagged.iter().map(Rule::key).collect();
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
}
