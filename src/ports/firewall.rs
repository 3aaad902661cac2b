//! The firewall behind published ports: one trait, one file per backend, and
//! [`detect`], which picks the backend dockerd uses (netavark's `src/firewall/mod.rs`
//! shape). The trait speaks in mappings ([`RuleSpec`], mapping ids) only: no iptables
//! table/chain or nftables handle appears in its signatures, so the commit and reconcile
//! steps are the same code for every backend.
//!
//! Backends:
//! - [`super::iptables::Iptables`]: `iptables-nft` or `iptables-legacy`, whichever holds
//!   Docker's `DOCKER` chain (Docker 20.10 … 28, and 29 with its default iptables backend).
//! - [`super::nftables::Nftables`]: Docker 29's `--firewall-backend=nftables` (table
//!   `ip docker-bridges`, and `ip6 docker-bridges` with IPv6); our own tables, marked
//!   packets Docker's `--bridge-accept-fwmark` rule accepts. Without that option:
//!   NotSupported naming it (see [`detect`]).
//!
//! Ownership: every backend is bound to an *owner*, the daemon's state id. It writes its
//! tags with it and its `repair` and `apply` only ever delete what carries it (or the tag
//! of versions before state ids, `dindhelper:<mapping id>`, for mapping ids it is told are
//! its own). Two daemons with different state dirs in one netns never touch each other.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use super::iptables::{Iptables, NetnsContext};
use super::nftables::{self, Nftables};
use super::rules::RuleSpec;
use super::types::PortsError;

/// A boxed future (the trait is used as `dyn Firewall`).
pub type Fut<'a, T> = Pin<Box<dyn Future<Output = Result<T, PortsError>> + Send + 'a>>;

/// One step of changes: every rule of the mappings `remove` out, the rules of `add` in,
/// atomically (all or nothing).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Change {
    pub remove: Vec<String>,
    pub add: Vec<RuleSpec>,
}

impl Change {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.add.is_empty()
    }
}

/// A rule (or element) carrying a dindhelper tag, as found in the firewall.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tagged {
    pub mapping_id: String,
    /// State id in the tag; None for the tag of versions before state ids.
    pub owner: Option<String>,
    /// The rule as the firewall prints it (for logs and tests).
    pub text: String,
}

/// What a repair did, per mapping id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Repaired {
    pub added: BTreeMap<String, usize>,
    pub removed: BTreeMap<String, usize>,
}

/// Which backend was chosen and why (logged once, exposed as a D-Bus property).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detected {
    /// `iptables-nft`, `iptables-legacy` or `nftables`.
    pub name: &'static str,
    /// One sentence: what was found that decided it.
    pub reason: String,
}

/// A firewall that holds published ports.
pub trait Firewall: Send + Sync + std::fmt::Debug {
    /// The choice and its reason.
    fn detected(&self) -> Detected;

    /// True when the backend writes IPv6 rules too (Docker publishes IPv6 where it acts):
    /// specs with a `container_ip6` are accepted. Default: IPv4 only.
    fn ipv6(&self) -> bool {
        false
    }

    /// Apply one change atomically. Removing reads the live rules only when what the
    /// backend knows turns out to be stale (the write failed): a round never re-reads what
    /// it wrote itself.
    fn apply<'a>(&'a self, change: &'a Change) -> Fut<'a, ()>;

    /// Every rule of this owner (and legacy-tagged rules), read fresh from the kernel.
    fn list_tagged(&self) -> Fut<'_, Vec<Tagged>>;

    /// Make the firewall hold exactly `desired` for the mapping ids `scope` accepts: add
    /// what is missing, delete duplicates, stale rules and this owner's orphans.
    /// `legacy_ids`: mapping ids whose legacy-tagged rules are this daemon's (they are
    /// replaced by rules with the owner's tag); other legacy rules are left alone.
    fn repair<'a>(
        &'a self,
        desired: &'a [RuleSpec],
        legacy_ids: &'a [String],
        scope: &'a (dyn Fn(&str) -> bool + Send + Sync),
    ) -> Fut<'a, Repaired>;
}

/// Pick the firewall Docker uses in `netns`, bound to `owner` (the state id). The choice
/// and the reason are in [`Firewall::detected`].
///
/// Order, as Docker decides: Docker's nftables table `ip docker-bridges` present → the
/// nftables backend (dockerd 29 `--firewall-backend=nftables`; dockerd removes the other
/// backend's rules when it starts, so a DOCKER iptables chain beside it is a leftover and
/// is named in the reason); else the iptables flavour whose nat table has the DOCKER chain.
pub async fn detect(netns: &NetnsContext, owner: &str) -> Result<Box<dyn Firewall>, PortsError> {
    super::rules::check_tag_part("state id", owner)?;
    let mut notes = Vec::new();
    if nftables::docker_table_present(netns).await {
        let mut b = Nftables::detect(netns, owner).await?;
        if let Ok(ipt) = Iptables::detect(netns, owner, &mut notes).await {
            b.note(&format!(
                "a DOCKER chain in {} is ignored (dockerd uses nftables)",
                ipt.detected().name
            ));
        }
        return Ok(Box::new(b));
    }
    match Iptables::detect(netns, owner, &mut notes).await {
        Ok(b) => return Ok(Box::new(b)),
        Err(e) => notes.push(e.to_string()),
    }
    Err(PortsError::NotSupported {
        reason: format!(
            "Docker's DOCKER chain was found in no iptables backend and no nftables table \
             docker-bridges exists (is dockerd running with --iptables=false?): {}",
            notes.join("; ")
        ),
    })
}
