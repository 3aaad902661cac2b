//! Packet captures inside another process's network namespace.
//!
//! [`start`] opens an AF_PACKET socket *inside* the target's netns (on a short-lived namespace
//! thread, see `crate::netns`), then runs the session on its own OS thread in the host: it
//! reads the TPACKET_V3 ring, writes classic pcap to the sink (a file or a caller's pipe,
//! flushed after every ring block) and ends on `stop()`, the duration, a packet/byte limit,
//! the target process exiting (pidfd) or a write error. The file is valid pcap at every block
//! boundary, so a reader of a pipe (`tcpdump -r -`) sees packets as they arrive.
//!
//! Link types: one interface of Ethernet framing (veth, lo, bridge) -> SOCK_RAW,
//! LINKTYPE_ETHERNET; all interfaces (default, like `tcpdump -i any`) or a non-Ethernet
//! interface -> SOCK_DGRAM with a synthesized LINKTYPE_LINUX_SLL header (as libpcap does for
//! "any"; SLL2 would add the ifindex but older readers lack it).

pub mod bpf;
pub mod file;
pub mod pcap;
pub mod sink;
pub mod socket;

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;

use crate::error::{Classify, Kind};
use crate::netns::{self, NetnsError, Ns, Target};

pub use file::create_capture_file;
pub use socket::RingConfig;

pub const DEFAULT_SNAPLEN: u32 = 262_144;
pub const DEFAULT_DURATION: Duration = Duration::from_secs(60);
const MAX_FILTER_LEN: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("invalid capture option {option}: {why}")]
    InvalidOption { option: &'static str, why: String },
    /// Carries libpcap's message.
    #[error(transparent)]
    Filter(#[from] bpf::BpfError),
    #[error("no interface {name:?} in the target's network namespace")]
    NoInterface { name: String },
    #[error(transparent)]
    Target(#[from] NetnsError),
    #[error("{op} failed: {source}")]
    Sys { op: &'static str, source: Errno },
    #[error("capture file {path}: {source}")]
    File {
        path: std::path::PathBuf,
        source: Errno,
    },
    #[error("capture sink: {0}")]
    Sink(std::io::Error),
    #[error(transparent)]
    Name(#[from] crate::names::NameError),
}

impl Classify for CaptureError {
    fn kind(&self) -> Kind {
        match self {
            CaptureError::InvalidOption { .. }
            | CaptureError::Filter(_)
            | CaptureError::Name(_) => Kind::InvalidArgs,
            CaptureError::NoInterface { .. } => Kind::NotFound,
            CaptureError::Target(e) => e.kind(),
            CaptureError::File { source, .. } => crate::error::kind_of_errno(*source),
            CaptureError::Sys { source, .. } if *source == Errno::EPERM => Kind::NotAuthorized,
            _ => Kind::Failed,
        }
    }
}

impl From<socket::SocketError> for CaptureError {
    fn from(e: socket::SocketError) -> Self {
        match e {
            socket::SocketError::NoInterface { name } => CaptureError::NoInterface { name },
            socket::SocketError::Filter(f) => CaptureError::Filter(f),
            socket::SocketError::Sys { op, source } => CaptureError::Sys { op, source },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureOptions {
    /// None = all interfaces (cooked, LINUX_SLL).
    pub interface: Option<String>,
    /// tcpdump expression; None or "" = everything.
    pub filter: Option<String>,
    pub snaplen: u32,
    /// None = until stopped (the bus layer applies the default and the configured cap).
    pub duration: Option<Duration>,
    /// Limit on the file size in bytes (pcap headers included).
    pub max_bytes: Option<u64>,
    pub max_packets: Option<u64>,
    pub nanosecond_timestamps: bool,
    pub ring: RingConfig,
}

impl Default for CaptureOptions {
    fn default() -> Self {
        CaptureOptions {
            interface: None,
            filter: None,
            snaplen: DEFAULT_SNAPLEN,
            duration: Some(DEFAULT_DURATION),
            max_bytes: None,
            max_packets: None,
            nanosecond_timestamps: false,
            ring: RingConfig::default(),
        }
    }
}

impl CaptureOptions {
    /// Check the options without touching the system; also compiles the filter (for
    /// Ethernet) so a syntax error is reported with libpcap's message.
    pub fn validate(&self) -> Result<(), CaptureError> {
        let bad = |option, why: &str| {
            Err(CaptureError::InvalidOption {
                option,
                why: why.to_owned(),
            })
        };
        if let Some(i) = &self.interface {
            if i.is_empty() || i.len() >= libc::IFNAMSIZ || i == "." || i == ".." {
                return bad("interface", "must be 1-15 bytes");
            }
            if i.bytes()
                .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
            {
                return bad("interface", "must not contain '/', ':', NUL or white space");
            }
        }
        if !(64..=DEFAULT_SNAPLEN).contains(&self.snaplen) {
            return bad("snaplen", "must be between 64 and 262144");
        }
        if self.duration == Some(Duration::ZERO) {
            return bad("duration", "must be positive");
        }
        if self.max_bytes == Some(0) || self.max_packets == Some(0) {
            return bad("max_bytes/max_packets", "must be positive");
        }
        if self
            .max_bytes
            .is_some_and(|b| b < pcap::GLOBAL_HEADER_LEN + 64)
        {
            return bad("max_bytes", "must be at least 88");
        }
        let r = &self.ring;
        if r.block_size < 4096
            || !r.block_size.is_power_of_two()
            || r.block_size > 16 << 20
            || r.block_nr == 0
            || r.block_nr > 1024
            || r.retire_ms == 0
        {
            return bad(
                "ring",
                "block size a power of two in 4 KiB..16 MiB, 1..1024 blocks",
            );
        }
        if let Some(f) = &self.filter {
            if f.len() > MAX_FILTER_LEN {
                return bad("filter", "longer than 4096 bytes");
            }
            bpf::compile(f, pcap::LINKTYPE_ETHERNET, self.snaplen)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub packets: u64,
    /// Bytes written to the sink, pcap headers included (= the file size).
    pub bytes: u64,
    /// Packets the kernel dropped because the ring was full.
    pub dropped: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    Stopped,
    Duration,
    MaxPackets,
    MaxBytes,
    TargetExited,
    /// The sink took no data for `sink::STALL` (a pipe nobody reads) or could not take
    /// the last data at the end: the session ended so it never blocks the daemon.
    SinkStalled,
    Error(String),
}

impl Reason {
    /// Stable lower-case name for the bus.
    pub fn as_str(&self) -> &str {
        match self {
            Reason::Stopped => "stopped",
            Reason::Duration => "duration",
            Reason::MaxPackets => "max-packets",
            Reason::MaxBytes => "max-bytes",
            Reason::TargetExited => "target-exited",
            Reason::SinkStalled => "sink-stalled",
            Reason::Error(_) => "error",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub stats: Stats,
    pub reason: Reason,
}

#[derive(Default)]
struct Shared {
    packets: AtomicU64,
    bytes: AtomicU64,
    dropped: AtomicU64,
}

/// A running capture. Dropping the handle stops the session (keep it, or a [`Stopper`]).
pub struct Handle {
    shared: Arc<Shared>,
    stop: Arc<OwnedFd>,
    thread: Option<JoinHandle<Finished>>,
    pub linktype: u32,
}

impl Handle {
    pub fn stats(&self) -> Stats {
        Stats {
            packets: self.shared.packets.load(Ordering::Relaxed),
            bytes: self.shared.bytes.load(Ordering::Relaxed),
            dropped: self.shared.dropped.load(Ordering::Relaxed),
        }
    }

    /// Ask the session to end (idempotent). The last ring block is still written.
    pub fn stop(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes to an eventfd.
        unsafe {
            libc::write(self.stop.as_raw_fd(), (&one as *const u64).cast(), 8);
        }
    }

    /// A clonable stopper for another thread (the bus layer).
    pub fn stopper(&self) -> Stopper {
        Stopper(self.stop.clone())
    }

    /// A clonable reader of the live counters, for whoever does not hold the handle (the
    /// thread blocked in [`Handle::wait`] owns it).
    pub fn stats_reader(&self) -> StatsReader {
        StatsReader(self.shared.clone())
    }

    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Block until the session ends.
    pub fn wait(mut self) -> Finished {
        let joined = self.thread.take().map(|t| t.join());
        match joined {
            Some(Ok(f)) => f,
            _ => Finished {
                stats: self.stats(),
                reason: Reason::Error("capture thread panicked".into()),
            },
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop();
        }
    }
}

#[derive(Clone)]
pub struct Stopper(Arc<OwnedFd>);

/// Live counters of a session (updated after every ring block).
#[derive(Clone)]
pub struct StatsReader(Arc<Shared>);

impl StatsReader {
    pub fn stats(&self) -> Stats {
        Stats {
            packets: self.0.packets.load(Ordering::Relaxed),
            bytes: self.0.bytes.load(Ordering::Relaxed),
            dropped: self.0.dropped.load(Ordering::Relaxed),
        }
    }
}

impl Stopper {
    pub fn stop(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes to an eventfd.
        unsafe {
            libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8);
        }
    }
}

/// Start capturing in the network namespace of `target`, writing pcap to `sink`.
/// Returns once the socket is set up (filter, interface and target errors come back here).
pub fn start(target: Target, options: CaptureOptions, sink: File) -> Result<Handle, CaptureError> {
    options.validate()?;
    // The pidfd pins the process identity for the exit watch; verify after opening it.
    let pidfd = crate::pidfd::open(target.pid as u32).map_err(|e| {
        match Errno::from_raw(e.raw_os_error().unwrap_or(0)) {
            Errno::ESRCH => CaptureError::Target(NetnsError::Gone { pid: target.pid }),
            source => CaptureError::Sys {
                op: "pidfd_open",
                source,
            },
        }
    })?;
    target.verify()?;
    let (iface, filter, snaplen, ring) = (
        options.interface.clone(),
        options.filter.clone(),
        options.snaplen,
        options.ring,
    );
    let sock = netns::run_in(target, &[Ns::Net], move || {
        socket::open(iface.as_deref(), filter.as_deref(), snaplen, ring)
    })??;
    // SAFETY: plain eventfd creation.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    let efd = Errno::result(efd).map_err(|source| CaptureError::Sys {
        op: "eventfd",
        source,
    })?;
    // SAFETY: fresh fd.
    let stop = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
    let res = if options.nanosecond_timestamps {
        pcap::TsResolution::Nanos
    } else {
        pcap::TsResolution::Micros
    };
    let linktype = sock.linktype;
    let writer = pcap::PcapWriter::new(
        sink::QueueSink::new(sink, Some(stop.clone())).map_err(CaptureError::Sink)?,
        linktype,
        snaplen,
        res,
    )
    .map_err(CaptureError::Sink)?;
    let shared = Arc::new(Shared::default());
    shared.bytes.store(writer.bytes, Ordering::Relaxed);
    let session = Session {
        sock,
        writer,
        pidfd,
        stop: stop.clone(),
        shared: shared.clone(),
        options,
        dropped: 0,
    };
    let thread = std::thread::Builder::new()
        .name(format!("capture-{}", target.pid))
        .spawn(move || session.run())
        .map_err(|e| CaptureError::Sink(std::io::Error::other(format!("cannot spawn: {e}"))))?;
    Ok(Handle {
        shared,
        stop,
        thread: Some(thread),
        linktype,
    })
}

/// A sink error as the session's end reason.
fn sink_reason(e: std::io::Error) -> Reason {
    if sink::is_stall(&e) {
        Reason::SinkStalled
    } else {
        Reason::Error(format!("sink: {e}"))
    }
}

struct Session {
    sock: socket::RingSocket,
    writer: pcap::PcapWriter<sink::QueueSink>,
    pidfd: OwnedFd,
    stop: Arc<OwnedFd>,
    shared: Arc<Shared>,
    options: CaptureOptions,
    dropped: u64,
}

impl Session {
    fn run(mut self) -> Finished {
        let deadline = self.options.duration.map(|d| Instant::now() + d);
        let reason = loop {
            if let Some(r) = self.drain() {
                break r;
            }
            let timeout = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break self.final_drain(Reason::Duration);
                    }
                    left.min(Duration::from_millis(500))
                }
                None => Duration::from_millis(500),
            };
            let mut fds = [
                libc::pollfd {
                    fd: self.sock.fd().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.pidfd.as_fd().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: fds is a valid array of 3 pollfds.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 3, timeout.as_millis() as i32 + 1) };
            if n < 0 {
                let e = Errno::last();
                if e == Errno::EINTR {
                    continue;
                }
                break Reason::Error(format!("poll: {e}"));
            }
            if fds[0].revents & libc::POLLERR != 0 {
                // ENETDOWN when the interface goes down/away; the pidfd tells about the target.
                let _ = self.sock.take_error();
            }
            if fds[2].revents & libc::POLLIN != 0 {
                break self.final_drain(Reason::Stopped);
            }
            if fds[1].revents & libc::POLLIN != 0 {
                break self.final_drain(Reason::TargetExited);
            }
        };
        self.update_drops();
        if let Err(e) = self.writer.get_mut().finish() {
            if !matches!(reason, Reason::Error(_) | Reason::SinkStalled) {
                return self.finish(sink_reason(e));
            }
        }
        self.finish(reason)
    }

    fn finish(&self, reason: Reason) -> Finished {
        self.publish();
        Finished {
            stats: Stats {
                packets: self.writer.packets,
                bytes: self.writer.bytes,
                dropped: self.dropped,
            },
            reason,
        }
    }

    fn publish(&self) {
        self.shared
            .packets
            .store(self.writer.packets, Ordering::Relaxed);
        self.shared
            .bytes
            .store(self.writer.bytes, Ordering::Relaxed);
        self.shared.dropped.store(self.dropped, Ordering::Relaxed);
    }

    fn update_drops(&mut self) {
        if let Ok((_, drops, _)) = self.sock.take_stats() {
            self.dropped += drops as u64;
        }
    }

    /// Wait one retire timeout for the partly filled block, then write what is ready.
    fn final_drain(&mut self, reason: Reason) -> Reason {
        let mut fd = libc::pollfd {
            fd: self.sock.fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let wait = self.sock.retire_ms() as i32 * 2 + 10;
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut fd, 1, wait) };
        self.drain().unwrap_or(reason)
    }

    /// Write every ready block; Some(reason) when a limit or an error ends the session.
    fn drain(&mut self) -> Option<Reason> {
        let mut end: Option<Reason> = None;
        loop {
            let cooked = self.sock.cooked;
            let max_packets = self.options.max_packets;
            let max_bytes = self.options.max_bytes;
            let writer = &mut self.writer;
            let got = self.sock.for_each_in_block(|p| {
                if max_packets.is_some_and(|m| writer.packets >= m) {
                    end = Some(Reason::MaxPackets);
                    return false;
                }
                let sll;
                let vlan;
                let parts: [&[u8]; 3] = if cooked {
                    sll = p.sll_header();
                    [&sll, p.data, &[]]
                } else if let (Some((tpid, tci)), true) = (p.vlan, p.data.len() >= 12) {
                    let mut v = [0u8; 4];
                    v[..2].copy_from_slice(&tpid.to_be_bytes());
                    v[2..].copy_from_slice(&tci.to_be_bytes());
                    vlan = v;
                    [&p.data[..12], &vlan, &p.data[12..]]
                } else {
                    [p.data, &[], &[]]
                };
                let data_len: usize = parts.iter().map(|x| x.len()).sum();
                let extra = data_len as u32 - p.data.len() as u32;
                if max_bytes.is_some_and(|m| writer.bytes + writer.record_size(data_len) > m) {
                    end = Some(Reason::MaxBytes);
                    return false;
                }
                if let Err(e) = writer.write_packet(p.sec, p.nsec, p.len + extra, &parts) {
                    end = Some(sink_reason(e));
                    return false;
                }
                if max_packets.is_some_and(|m| writer.packets >= m) {
                    end = Some(Reason::MaxPackets);
                    return false;
                }
                true
            });
            if !got {
                break;
            }
            if end.is_none() {
                if let Err(e) = self.writer.flush() {
                    end = Some(sink_reason(e));
                }
            }
            self.update_drops();
            self.publish();
            if end.is_some() {
                break;
            }
        }
        end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_options_are_valid() {
        CaptureOptions::default().validate().unwrap();
    }

    #[test]
    fn bad_options_are_invalid_args() {
        let cases = [
            CaptureOptions {
                interface: Some("../eth0".into()),
                ..Default::default()
            },
            CaptureOptions {
                interface: Some("a-very-long-interface-name".into()),
                ..Default::default()
            },
            CaptureOptions {
                snaplen: 10,
                ..Default::default()
            },
            CaptureOptions {
                duration: Some(Duration::ZERO),
                ..Default::default()
            },
            CaptureOptions {
                max_packets: Some(0),
                ..Default::default()
            },
            CaptureOptions {
                max_bytes: Some(30),
                ..Default::default()
            },
            CaptureOptions {
                ring: RingConfig {
                    block_size: 5000,
                    ..Default::default()
                },
                ..Default::default()
            },
        ];
        for c in cases {
            let e = c.validate().unwrap_err();
            assert_eq!(e.kind(), Kind::InvalidArgs, "{c:?}: {e}");
        }
    }

    #[test]
    fn bad_filter_is_invalid_args_with_libpcap_text() {
        let e = CaptureOptions {
            filter: Some("tcp port eighty".into()),
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.kind(), Kind::InvalidArgs);
        assert!(e.to_string().contains("eighty"), "{e}");
    }

    #[test]
    fn reasons_have_stable_names() {
        assert_eq!(Reason::TargetExited.as_str(), "target-exited");
        assert_eq!(Reason::Error("x".into()).as_str(), "error");
    }
}
