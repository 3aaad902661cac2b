//! The iptables backend that holds Docker's chains: iptables-nft or iptables-legacy.
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
//!   is no DOCKER iptables chain to write to, so the answer is NotSupported.
//! - Network namespace: the programs act on the netns they run in. With a `netns`
//!   context, each child `setns()`es into it between fork and exec (`pre_exec`), so the
//!   calling threads never change namespace. Without one, they act where the daemon runs
//!   (the daemon runs in dockerd's netns).

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;

use super::rules::{self, Rule};
use super::PortsError;

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

    /// Run `f` on a short-lived OS thread inside this namespace (never on a tokio worker).
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, PortsError> {
        let fd = self.fd.clone();
        let path = self.path.clone().unwrap_or_default();
        std::thread::spawn(move || {
            if let Some(fd) = fd {
                nix::sched::setns(&*fd, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                    PortsError::Netns {
                        path,
                        source: e.into(),
                    }
                })?;
            }
            Ok(f())
        })
        .join()
        .map_err(|_| PortsError::Internal("namespace thread panicked".into()))?
    }
}

fn sbin(name: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/sbin", "/usr/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("/usr/sbin").join(name)
}

/// The chosen backend, bound to a namespace.
#[derive(Debug, Clone)]
pub struct Iptables {
    pub flavor: Flavor,
    netns: NetnsContext,
}

async fn run_prog(
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
    /// Find the backend whose nat table has Docker's `DOCKER` chain.
    pub async fn detect(netns: &NetnsContext) -> Result<Iptables, PortsError> {
        let mut notes = Vec::new();
        for flavor in [Flavor::Nft, Flavor::Legacy] {
            let prog = sbin(&format!("iptables-{}-save", flavor.name()));
            match run_prog(netns, &prog, &["-t", "nat"], None).await {
                Ok(out) if rules::has_docker_chain(&out) => {
                    return Ok(Iptables {
                        flavor,
                        netns: netns.clone(),
                    })
                }
                Ok(_) => notes.push(format!("iptables-{}: no DOCKER chain", flavor.name())),
                Err(e) => notes.push(e.to_string()),
            }
        }
        let nft = sbin("nft");
        if let Ok(out) = run_prog(netns, &nft, &["list", "tables"], None).await {
            if out.contains("docker-bridges") {
                return Err(PortsError::NotSupported {
                    reason: "dockerd uses its nftables firewall backend (table docker-bridges); \
                             only the iptables backends are supported"
                        .into(),
                });
            }
        }
        Err(PortsError::NotSupported {
            reason: format!(
                "Docker's DOCKER chain was found in no iptables backend (is dockerd running \
                 with --iptables=false?): {}",
                notes.join("; ")
            ),
        })
    }

    fn prog(&self, what: &str) -> PathBuf {
        sbin(&format!("iptables-{}-{what}", self.flavor.name()))
    }

    /// `-save` of the nat and filter tables.
    pub async fn save(&self) -> Result<String, PortsError> {
        let p = self.prog("save");
        let mut out = run_prog(&self.netns, &p, &["-t", "nat"], None).await?;
        out.push_str(&run_prog(&self.netns, &p, &["-t", "filter"], None).await?);
        Ok(out)
    }

    /// Every rule tagged `dindhelper:`.
    pub async fn list_tagged(&self) -> Result<Vec<Rule>, PortsError> {
        Ok(rules::parse_tagged(&self.save().await?))
    }

    /// `iptables-restore -w --noflush` with the batch on stdin.
    pub async fn restore(&self, text: &str) -> Result<(), PortsError> {
        if text.is_empty() {
            return Ok(());
        }
        debug_assert!(!text.lines().any(|l| l.starts_with(':')));
        let p = self.prog("restore");
        run_prog(&self.netns, &p, &["-w", "--noflush"], Some(text))
            .await
            .map(|_| ())
    }

    /// The `iptables` program of this flavour (for the benchmark's docker-style way).
    pub fn iptables_program(&self) -> PathBuf {
        sbin(&format!("iptables-{}", self.flavor.name()))
    }

    pub fn netns(&self) -> &NetnsContext {
        &self.netns
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
