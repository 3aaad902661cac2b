//! The iptables backend ([`Firewall`]) that holds Docker's chains: iptables-nft or
//! iptables-legacy; the network-namespace context its programs run in.
//!
//! Interface: the `iptables-{nft,legacy}-save` / `-restore` programs, run by absolute path
//! (never `$PATH`, never the `iptables` alternatives link, which may point at the other
//! backend than the one dockerd used).
//!
//! Traps:
//! - The two backends are separate rule sets in the kernel. Rules written with the wrong
//!   one are live but never seen by Docker's chains (and `iptables-nft` warns about legacy
//!   tables only on stderr). Detect by looking for `:DOCKER` in each `-save -t nat`.
//! - `iptables-restore --noflush`: a chain declaration line flushes that chain; the
//!   batches built by `rules.rs` never contain one. A failing line cancels the whole
//!   batch (the commit is atomic per restore run for nft; legacy commits per table).
//! - `-w` waits for the xtables lock (legacy) instead of failing when dockerd holds it.
//! - Docker 29+ may run its nftables firewall backend (`table ip docker-bridges`): there
//!   is no DOCKER iptables chain to write to (that is [`super::nftables`]).
//! - Known rules: after a successful restore the backend knows exactly which tagged rules
//!   it has (it wrote them), so removing a mapping needs no `-save` of the whole, growing
//!   table. What it knows can be stale (dockerd restarted and flushed its chains, an admin
//!   deleted a rule): then the `-D` fails, the batch is cancelled as a whole, and the
//!   backend re-reads once and retries. Every repair and list re-reads.
//! - IPv6: `ip6tables-{nft,legacy}-save` / `-restore` of the same flavour. Docker writes
//!   ip6tables rules only with `ip6tables` on (20.10: `--experimental --ip6tables`; default
//!   from 27) and IPv6 on a network; the backend writes IPv6 rules only when ip6tables' nat
//!   table has Docker's DOCKER chain at detection ([`Firewall::ipv6`]); otherwise it stays
//!   IPv4-only and says why in its reason. The two families are two restore runs: the IPv6
//!   batch first, then IPv4; when IPv4 fails the IPv6 part is undone, so a change stays all
//!   or nothing as far as the programs allow.
//! - Network namespace: the programs act on the netns they run in. With a `netns`
//!   context, each child `setns()`es into it between fork and exec (`pre_exec`), so the
//!   calling threads never change namespace. Without one, they act where the daemon runs
//!   (the daemon runs in dockerd's netns).

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;

use super::firewall::{Change, Detected, Firewall, Fut, Repaired, Tagged};
use super::rules::{self, Batch, IpFamily, Rule, RuleSpec};
use super::types::PortsError;

/// Which iptables flavour holds Docker's chains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Nft,
    Legacy,
}

impl Flavor {
    fn name(self) -> &'static str {
        match self {
            Flavor::Nft => "nft",
            Flavor::Legacy => "legacy",
        }
    }
}

/// A network namespace to run the programs in (None: where this process is).
#[derive(Debug, Clone, Default)]
pub struct NetnsContext {
    fd: Option<Arc<OwnedFd>>,
    path: Option<PathBuf>,
}

impl NetnsContext {
    /// The current namespace.
    pub fn current() -> NetnsContext {
        NetnsContext::default()
    }

    /// A namespace file such as `/run/netns/NAME` or `/proc/PID/ns/net`.
    pub fn open(path: &Path) -> Result<NetnsContext, PortsError> {
        let f = std::fs::File::open(path).map_err(|source| PortsError::Netns {
            path: path.to_owned(),
            source,
        })?;
        Ok(NetnsContext {
            fd: Some(Arc::new(OwnedFd::from(f))),
            path: Some(path.to_owned()),
        })
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// A command that runs in this namespace.
    pub fn command(&self, program: &Path) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(program);
        if let Some(fd) = &self.fd {
            // The closure owns a clone of the Arc: the fd lives as long as the command,
            // whatever happens to `self` (a raw fd captured alone could be closed, and its
            // number reused, before the spawn).
            let fd = fd.clone();
            // SAFETY: only setns(2) (async-signal-safe) runs between fork and exec, on an
            // fd the closure keeps open.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd
    }

    /// Move the calling OS thread into this namespace, by the fd opened with the context
    /// (never by its path again: the path could name another namespace by now). Only for
    /// threads of their own, never a tokio worker.
    pub fn enter(&self) -> Result<(), PortsError> {
        if let Some(fd) = &self.fd {
            nix::sched::setns(&**fd, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                PortsError::Netns {
                    path: self.path.clone().unwrap_or_default(),
                    source: e.into(),
                }
            })?;
        }
        Ok(())
    }

    /// Run `f` on a short-lived OS thread inside this namespace (never on a tokio worker).
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, PortsError> {
        let ctx = self.clone();
        std::thread::spawn(move || {
            ctx.enter()?;
            Ok(f())
        })
        .join()
        .map_err(|_| PortsError::Internal("namespace thread panicked".into()))?
    }
}

pub(crate) fn sbin(name: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/sbin", "/usr/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("/usr/sbin").join(name)
}

/// The chosen backend, bound to a namespace and an owner (state id).
#[derive(Debug)]
pub struct Iptables {
    pub flavor: Flavor,
    netns: NetnsContext,
    owner: String,
    detected: Detected,
    /// ip6tables of this flavour has Docker's nat DOCKER chain: IPv6 rules are written too.
    ipv6: bool,
    /// Our tagged rules as last read or written (None: unknown, read on demand).
    known: tokio::sync::Mutex<Option<Vec<Rule>>>,
}

pub(crate) async fn run_prog(
    netns: &NetnsContext,
    prog: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, PortsError> {
    let command = format!("{} {}", prog.display(), args.join(" "));
    let mut cmd = netns.command(prog);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| PortsError::Spawn {
        command: command.clone(),
        source,
    })?;
    if let Some(text) = stdin {
        let mut si = child.stdin.take().expect("piped stdin");
        si.write_all(text.as_bytes())
            .await
            .map_err(|source| PortsError::Spawn {
                command: command.clone(),
                source,
            })?;
        drop(si);
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|source| PortsError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(PortsError::Iptables {
            command,
            status: out.status.code().unwrap_or(-1),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Iptables {
    /// The backend whose nat table has Docker's `DOCKER` chain: iptables-nft first (what
    /// Docker 20.10+ uses on a current distribution), then iptables-legacy. What each
    /// flavour showed goes to `notes`.
    pub async fn detect(
        netns: &NetnsContext,
        owner: &str,
        notes: &mut Vec<String>,
    ) -> Result<Iptables, PortsError> {
        for flavor in [Flavor::Nft, Flavor::Legacy] {
            let prog = sbin(&format!("iptables-{}-save", flavor.name()));
            match run_prog(netns, &prog, &["-t", "nat"], None).await {
                Ok(out) if rules::has_docker_chain(&out) => {
                    let filter = run_prog(netns, &prog, &["-t", "filter"], None)
                        .await
                        .unwrap_or_default();
                    let name = match flavor {
                        Flavor::Nft => "iptables-nft",
                        Flavor::Legacy => "iptables-legacy",
                    };
                    let mut reason = format!(
                        "Docker's DOCKER chain is in {name}'s nat table ({})",
                        rules::docker_layout(&filter)
                    );
                    let prog6 = sbin(&format!("ip6tables-{}-save", flavor.name()));
                    let ipv6 = match run_prog(netns, &prog6, &["-t", "nat"], None).await {
                        Ok(out) if rules::has_docker_chain(&out) => {
                            reason.push_str(
                                "; IPv6 too: ip6tables' nat table has Docker's DOCKER chain",
                            );
                            true
                        }
                        Ok(_) => {
                            reason.push_str(
                                "; IPv4 only: ip6tables' nat table has no DOCKER chain (dockerd \
                                 runs without ip6tables, or the host has no IPv6)",
                            );
                            false
                        }
                        Err(e) => {
                            reason.push_str(&format!("; IPv4 only: {e}"));
                            false
                        }
                    };
                    if !notes.is_empty() {
                        reason.push_str(&format!("; {}", notes.join("; ")));
                    }
                    return Ok(Iptables {
                        flavor,
                        netns: netns.clone(),
                        owner: owner.to_owned(),
                        detected: Detected { name, reason },
                        ipv6,
                        known: tokio::sync::Mutex::new(None),
                    });
                }
                Ok(_) => notes.push(format!("iptables-{}: no DOCKER chain", flavor.name())),
                Err(e) => notes.push(e.to_string()),
            }
        }
        Err(PortsError::NotSupported {
            reason: "no iptables backend has Docker's DOCKER chain".into(),
        })
    }

    fn prog_of(&self, family: IpFamily, what: &str) -> PathBuf {
        sbin(&format!(
            "{}-{}-{what}",
            family.program(),
            self.flavor.name()
        ))
    }

    /// The families this backend writes.
    fn families(&self) -> &'static [IpFamily] {
        if self.ipv6 {
            &[IpFamily::V4, IpFamily::V6]
        } else {
            &[IpFamily::V4]
        }
    }

    /// `-save` of the nat and filter tables.
    pub async fn save(&self) -> Result<String, PortsError> {
        self.save_family(IpFamily::V4).await
    }

    /// `iptables-save` / `ip6tables-save` of the nat and filter tables.
    pub async fn save_family(&self, family: IpFamily) -> Result<String, PortsError> {
        let p = self.prog_of(family, "save");
        let mut out = run_prog(&self.netns, &p, &["-t", "nat"], None).await?;
        out.push_str(&run_prog(&self.netns, &p, &["-t", "filter"], None).await?);
        Ok(out)
    }

    /// True for a rule this backend may delete on its own: its owner's, or a legacy tag.
    fn mine(&self, r: &Rule) -> bool {
        r.owner.as_deref().is_none_or(|o| o == self.owner)
    }

    /// Every tagged rule of this owner (and legacy tags), read fresh.
    async fn read_mine(&self) -> Result<Vec<Rule>, PortsError> {
        let mut out = Vec::new();
        for &f in self.families() {
            out.extend(
                rules::parse_tagged_family(&self.save_family(f).await?, f)
                    .into_iter()
                    .filter(|r| self.mine(r)),
            );
        }
        Ok(out)
    }

    /// `iptables-restore -w --noflush` with the batch on stdin.
    pub async fn restore(&self, text: &str) -> Result<(), PortsError> {
        self.restore_family(IpFamily::V4, text).await
    }

    /// `iptables-restore` / `ip6tables-restore -w --noflush` with the batch on stdin.
    async fn restore_family(&self, family: IpFamily, text: &str) -> Result<(), PortsError> {
        if text.is_empty() {
            return Ok(());
        }
        debug_assert!(!text.lines().any(|l| l.starts_with(':')));
        let p = self.prog_of(family, "restore");
        run_prog(&self.netns, &p, &["-w", "--noflush"], Some(text))
            .await
            .map(|_| ())
    }

    /// Write a batch of both families: IPv6 first, then IPv4; when IPv4 fails, the IPv6
    /// part is undone (best effort, logged) and the IPv4 error returned.
    async fn write(&self, b: &Batch) -> Result<(), PortsError> {
        let v6 = b.has(IpFamily::V6);
        if v6 {
            self.restore_family(IpFamily::V6, &b.render_family(IpFamily::V6))
                .await?;
        }
        let r = self.restore_family(IpFamily::V4, &b.render()).await;
        if let (Err(e), true) = (&r, v6) {
            let is6 = |r: &&Rule| r.family == IpFamily::V6;
            let undo = Batch {
                delete: b.add.iter().filter(is6).cloned().collect(),
                add: b
                    .delete
                    .iter()
                    .filter(is6)
                    .map(|r| Rule {
                        insert_top: r.chain == "DOCKER",
                        ..r.clone()
                    })
                    .collect(),
            };
            if let Err(u) = self
                .restore_family(IpFamily::V6, &undo.render_family(IpFamily::V6))
                .await
            {
                tracing::error!(error = %u, ipv4_error = %e,
                    "cannot undo the IPv6 half of a failed batch; the next reconcile repairs it");
            }
        }
        r
    }

    /// The `iptables` program of this flavour (for the benchmark's docker-style way).
    pub fn iptables_program(&self) -> PathBuf {
        sbin(&format!("iptables-{}", self.flavor.name()))
    }

    pub fn netns(&self) -> &NetnsContext {
        &self.netns
    }

    fn rules_of(&self, specs: &[RuleSpec]) -> Result<Vec<Rule>, PortsError> {
        let mut out = Vec::with_capacity(specs.len() * 3);
        for s in specs {
            s.check()?;
            if s.container_ip6.is_some() && !self.ipv6 {
                return Err(PortsError::NotSupported {
                    reason: "Docker does not publish IPv6 here (no DOCKER chain in ip6tables' \
                             nat table)"
                        .into(),
                });
            }
            out.extend(rules::rules_for(s, &self.owner));
        }
        Ok(out)
    }

    async fn apply_change(&self, change: &Change) -> Result<(), PortsError> {
        let adds = self.rules_of(&change.add)?;
        let mut known = self.known.lock().await;
        let ids: std::collections::HashSet<&str> =
            change.remove.iter().map(String::as_str).collect();
        let build = |live: &[Rule]| Batch {
            delete: live
                .iter()
                .filter(|r| ids.contains(r.id.as_str()))
                .cloned()
                .collect(),
            add: adds.clone(),
        };
        if !ids.is_empty() && known.is_none() {
            *known = Some(self.read_mine().await?);
        }
        let mut batch = build(known.as_deref().unwrap_or(&[]));
        if let Err(e) = self.write(&batch).await {
            if batch.delete.is_empty() {
                return Err(e);
            }
            // what we knew may be stale: read once and try again
            tracing::debug!(error = %e, "iptables batch failed; re-reading the tagged rules");
            let live = match self.read_mine().await {
                Ok(l) => l,
                Err(_) => {
                    *known = None;
                    return Err(e);
                }
            };
            batch = build(&live);
            *known = Some(live);
            self.write(&batch).await?;
        }
        if let Some(k) = known.as_mut() {
            k.retain(|r| !ids.contains(r.id.as_str()));
            k.extend(batch.add);
        }
        Ok(())
    }

    async fn repair_to(
        &self,
        desired: &[RuleSpec],
        legacy_ids: &[String],
        scope: &(dyn Fn(&str) -> bool + Send + Sync),
    ) -> Result<Repaired, PortsError> {
        let want = self.rules_of(desired)?;
        let mut known = self.known.lock().await;
        *known = None;
        let live = self.read_mine().await?;
        let legacy: std::collections::HashSet<&str> =
            legacy_ids.iter().map(String::as_str).collect();
        let batch = rules::plan_repair(&want, &live, |r| {
            (r.owner.is_some() || legacy.contains(r.id.as_str())) && scope(&r.id)
        });
        self.write(&batch).await?;
        let mut out = Repaired::default();
        for r in &batch.add {
            *out.added.entry(r.id.clone()).or_default() += 1;
        }
        for r in &batch.delete {
            *out.removed.entry(r.id.clone()).or_default() += 1;
        }
        let mut now: Vec<Rule> = live
            .into_iter()
            .filter(|r| !batch.delete.contains(r))
            .collect();
        now.extend(batch.add);
        *known = Some(now);
        Ok(out)
    }
}

impl Firewall for Iptables {
    fn detected(&self) -> Detected {
        self.detected.clone()
    }

    fn ipv6(&self) -> bool {
        self.ipv6
    }

    fn apply<'a>(&'a self, change: &'a Change) -> Fut<'a, ()> {
        Box::pin(self.apply_change(change))
    }

    fn list_tagged(&self) -> Fut<'_, Vec<Tagged>> {
        Box::pin(async move {
            let live = self.read_mine().await?;
            let out = live
                .iter()
                .map(|r| Tagged {
                    mapping_id: r.id.clone(),
                    owner: r.owner.clone(),
                    // IPv4 as `-t T -A C BODY`, IPv6 with `ip6tables ` in front
                    text: format!(
                        "{}-t {} -A {} {}",
                        if r.family == IpFamily::V6 {
                            "ip6tables "
                        } else {
                            ""
                        },
                        r.table.as_str(),
                        r.chain,
                        r.body
                    ),
                })
                .collect();
            *self.known.lock().await = Some(live);
            Ok(out)
        })
    }

    fn repair<'a>(
        &'a self,
        desired: &'a [RuleSpec],
        legacy_ids: &'a [String],
        scope: &'a (dyn Fn(&str) -> bool + Send + Sync),
    ) -> Fut<'a, Repaired> {
        Box::pin(self.repair_to(desired, legacy_ids, scope))
    }
}

#[cfg(test)]
mod pre_exec_tests {
    use super::*;

    /// The namespace fd is owned by the command: dropping the context before the spawn
    /// must not leave `setns` a closed (or reused) fd number. Needs root (setns).
    #[test]
    fn command_keeps_the_namespace_fd_alive() {
        let ctx = NetnsContext::open(Path::new("/proc/self/ns/net")).expect("own netns");
        let mut cmd = ctx.command(Path::new("/bin/true"));
        drop(ctx);
        // Reuse the freed fd number for something that is not a namespace.
        let _other = std::fs::File::open("/dev/null").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let st = rt
            .block_on(async { cmd.status().await })
            .expect("spawn in the namespace");
        assert!(st.success());
    }
}
