//! AF_PACKET capture socket with a TPACKET_V3 receive ring.
//!
//! Kernel interfaces: `socket(AF_PACKET, SOCK_RAW|SOCK_DGRAM, 0)`, `SO_ATTACH_FILTER`,
//! `PACKET_VERSION`, `PACKET_RX_RING` (`tpacket_req3`), `mmap`, `poll`, `bind(sockaddr_ll)`,
//! `PACKET_STATISTICS` (`tpacket_stats_v3`), `SIOCGIFHWADDR`. See packet(7) and
//! Documentation/networking/packet_mmap.rst.
//!
//! Traps:
//! - The socket belongs to the network namespace of the thread that *creates* it. Call
//!   [`open`] on a thread that has entered the target netns (`crate::netns::run_in`); the fd and
//!   the mapping can then be used from any thread. Interface names and indexes are per netns
//!   too: look them up on that thread.
//! - Filter race: a socket created with protocol ETH_P_ALL starts queueing every packet before
//!   the filter is attached (libpcap drains it with a reject-all filter). We create it with
//!   protocol 0 — no packet hook is registered — attach the filter, set up the ring and only
//!   then `bind` with ETH_P_ALL, so no unfiltered packet can ever be queued.
//! - `PACKET_VERSION` must be set before `PACKET_RX_RING`; the ring cannot be resized later.
//!   Block size: a multiple of the page size; frame size: a multiple of 16 dividing the block
//!   size (V3 packs variable-sized packets into blocks; `tp_frame_nr` must still be
//!   `block_size * block_nr / frame_size`).
//! - A V3 block is handed to userspace only when it is full or the retire timeout
//!   (`tp_retire_blk_tov`, ms) expires, so low-rate traffic shows up with up to that delay,
//!   and a stop has to wait one timeout to see the last packets.
//! - Ownership of a block is its `block_status` word: read it with acquire ordering, give the
//!   block back by storing `TP_STATUS_KERNEL` with release ordering. A block userspace keeps
//!   freezes the queue (`tp_freeze_q_cnt`) and the kernel drops.
//! - `PACKET_STATISTICS` *resets* the counters on every read: accumulate. With V3 the
//!   `tp_packets` value already includes `tp_drops`.
//! - `SOCK_DGRAM` (used for "any" interface) strips the link header: a LINUX_SLL header is
//!   synthesized from the `sockaddr_ll` that follows each `tpacket3_hdr`, and the BPF program
//!   is rewritten (see `bpf.rs`). `SOCK_RAW` frames may come with the VLAN tag stripped
//!   (`TP_STATUS_VLAN_VALID`); it is re-inserted when writing.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::errno::Errno;

use super::bpf::{self, BpfError};
use super::pcap::{LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL};

const ETH_P_ALL: u16 = 0x0003;
const TPACKET_V3: libc::c_int = 2;
const TP_STATUS_USER: u32 = 1;
const TP_STATUS_KERNEL: u32 = 0;
const TP_STATUS_VLAN_VALID: u32 = 1 << 4;
const TP_STATUS_VLAN_TPID_VALID: u32 = 1 << 6;
const ARPHRD_ETHER: u16 = 1;
const ARPHRD_LOOPBACK: u16 = 772;

/// Ring geometry. Defaults: 16 blocks of 256 KiB = 4 MiB (tcpdump's default buffer is 2 MiB),
/// blocks retired after 50 ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingConfig {
    pub block_size: u32,
    pub block_nr: u32,
    pub retire_ms: u32,
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig {
            block_size: 256 << 10,
            block_nr: 16,
            retire_ms: 50,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("no interface {name:?} in the target network namespace")]
    NoInterface { name: String },
    #[error(transparent)]
    Filter(#[from] BpfError),
    #[error("{op} failed: {source}")]
    Sys { op: &'static str, source: Errno },
}

fn sys(op: &'static str) -> impl FnOnce(Errno) -> SocketError {
    move |source| SocketError::Sys { op, source }
}

/// An open capture socket with its mapped ring.
pub struct RingSocket {
    fd: OwnedFd,
    map: *mut u8,
    cfg: RingConfig,
    next: u32,
    /// SOCK_DGRAM: packets lack a link header, write LINUX_SLL.
    pub cooked: bool,
    pub linktype: u32,
    pub ifindex: i32,
}

// SAFETY: the mapping is owned by this value and only accessed through &mut self.
unsafe impl Send for RingSocket {}

impl Drop for RingSocket {
    fn drop(&mut self) {
        // SAFETY: map/len come from a successful mmap in `open`.
        unsafe {
            libc::munmap(self.map.cast(), self.map_len());
        }
    }
}

fn setsockopt<T>(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    val: &T,
) -> Result<(), Errno> {
    // SAFETY: `val` points to a live T of the given size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (val as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    Errno::result(rc).map(drop)
}

/// ARPHRD type of an interface (current netns).
fn hw_type(fd: &OwnedFd, name: &str) -> Result<u16, SocketError> {
    // SAFETY: ifreq is plain data; the name is copied with a terminating NUL.
    unsafe {
        let mut req: libc::ifreq = std::mem::zeroed();
        for (d, s) in req
            .ifr_name
            .iter_mut()
            .zip(name.bytes().take(libc::IFNAMSIZ - 1))
        {
            *d = s as libc::c_char;
        }
        let rc = libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFHWADDR as _, &mut req);
        Errno::result(rc).map_err(sys("SIOCGIFHWADDR"))?;
        Ok(req.ifr_ifru.ifru_hwaddr.sa_family)
    }
}

/// Open the socket in the *current thread's* network namespace, attach the filter, map the
/// ring and bind. `interface` None = all interfaces (cooked, LINKTYPE_LINUX_SLL).
pub fn open(
    interface: Option<&str>,
    filter: Option<&str>,
    snaplen: u32,
    cfg: RingConfig,
) -> Result<RingSocket, SocketError> {
    // Which interface and which framing?
    let (ifindex, cooked) = match interface {
        None => (0, true),
        Some(name) => {
            let idx =
                nix::net::if_::if_nametoindex(name).map_err(|_| SocketError::NoInterface {
                    name: name.to_owned(),
                })?;
            // SAFETY: plain socket creation.
            let probe =
                unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
            let probe = Errno::result(probe).map_err(sys("socket(AF_INET)"))?;
            // SAFETY: fresh fd from socket().
            let probe = unsafe { OwnedFd::from_raw_fd(probe) };
            let t = hw_type(&probe, name)?;
            (idx as i32, !(t == ARPHRD_ETHER || t == ARPHRD_LOOPBACK))
        }
    };
    let linktype = if cooked {
        LINKTYPE_LINUX_SLL
    } else {
        LINKTYPE_ETHERNET
    };
    let filter_text = filter.unwrap_or("");
    let mut prog = bpf::compile(filter_text, linktype, snaplen)?;
    if cooked {
        bpf::fix_for_cooked(&mut prog, filter_text)?;
    }

    let ty = if cooked {
        libc::SOCK_DGRAM
    } else {
        libc::SOCK_RAW
    };
    // Protocol 0: nothing is queued until bind() (see the filter race above).
    // SAFETY: plain socket creation.
    let fd = unsafe { libc::socket(libc::AF_PACKET, ty | libc::SOCK_CLOEXEC, 0) };
    let fd = Errno::result(fd).map_err(sys("socket(AF_PACKET)"))?;
    // SAFETY: fresh fd from socket().
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };

    let fprog = libc::sock_fprog {
        len: prog.0.len() as u16,
        filter: prog.0.as_mut_ptr(),
    };
    setsockopt(&fd, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &fprog)
        .map_err(sys("SO_ATTACH_FILTER"))?;
    setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_VERSION, &TPACKET_V3)
        .map_err(sys("PACKET_VERSION"))?;
    let frame_size: u32 = 2048;
    let req = libc::tpacket_req3 {
        tp_block_size: cfg.block_size,
        tp_block_nr: cfg.block_nr,
        tp_frame_size: frame_size,
        tp_frame_nr: cfg.block_size / frame_size * cfg.block_nr,
        tp_retire_blk_tov: cfg.retire_ms,
        tp_sizeof_priv: 0,
        tp_feature_req_word: 0,
    };
    setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_RX_RING, &req).map_err(sys("PACKET_RX_RING"))?;
    let len = cfg.block_size as usize * cfg.block_nr as usize;
    // SAFETY: mapping the ring the kernel just allocated for this fd.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if map == libc::MAP_FAILED {
        return Err(SocketError::Sys {
            op: "mmap(rx ring)",
            source: Errno::last(),
        });
    }
    let sock = RingSocket {
        fd,
        map: map.cast(),
        cfg,
        next: 0,
        cooked,
        linktype,
        ifindex,
    };
    // SAFETY: sockaddr_ll is plain data.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETH_P_ALL.to_be();
    sll.sll_ifindex = ifindex;
    // SAFETY: sll is a valid sockaddr_ll.
    let rc = unsafe {
        libc::bind(
            sock.fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    Errno::result(rc).map_err(sys("bind(AF_PACKET)"))?;
    Ok(sock)
}

/// One captured packet, borrowed from the ring.
pub struct Packet<'a> {
    pub sec: u32,
    pub nsec: u32,
    /// Length on the wire (without a synthesized SLL header).
    pub len: u32,
    /// Captured bytes: from the link header (raw) or the network header (cooked).
    pub data: &'a [u8],
    pub pkttype: u8,
    pub hatype: u16,
    pub halen: u8,
    pub addr: [u8; 8],
    /// Network-order protocol from sockaddr_ll.
    pub protocol_be: u16,
    /// VLAN tag stripped by the kernel: (tpid, tci).
    pub vlan: Option<(u16, u16)>,
}

impl Packet<'_> {
    /// The 16-byte LINUX_SLL header for a cooked packet.
    pub fn sll_header(&self) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[0..2].copy_from_slice(&(self.pkttype as u16).to_be_bytes());
        h[2..4].copy_from_slice(&self.hatype.to_be_bytes());
        h[4..6].copy_from_slice(&(self.halen as u16).to_be_bytes());
        h[6..14].copy_from_slice(&self.addr);
        h[14..16].copy_from_slice(&self.protocol_be.to_ne_bytes());
        h
    }
}

fn rd32(p: *const u8, off: usize) -> u32 {
    // SAFETY: callers pass offsets inside the ring mapping.
    unsafe { std::ptr::read_unaligned(p.add(off).cast::<u32>()) }
}
fn rd16(p: *const u8, off: usize) -> u16 {
    // SAFETY: as above.
    unsafe { std::ptr::read_unaligned(p.add(off).cast::<u16>()) }
}

impl RingSocket {
    fn map_len(&self) -> usize {
        self.cfg.block_size as usize * self.cfg.block_nr as usize
    }

    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn retire_ms(&self) -> u32 {
        self.cfg.retire_ms
    }

    fn status_word(&self, block: u32) -> &AtomicU32 {
        // block_status is at offset 8 of tpacket_block_desc (after version, offset_to_priv).
        // SAFETY: inside the mapping, 4-aligned (blocks are page aligned).
        unsafe {
            &*(self
                .map
                .add(block as usize * self.cfg.block_size as usize + 8)
                .cast::<AtomicU32>())
        }
    }

    /// Is the next block ours?
    pub fn block_ready(&self) -> bool {
        self.status_word(self.next).load(Ordering::Acquire) & TP_STATUS_USER != 0
    }

    /// Call `f` for each packet of the next ready block; returns false if no block was ready.
    /// `f` returns false to stop early (the block is given back anyway).
    pub fn for_each_in_block(&mut self, mut f: impl FnMut(&Packet<'_>) -> bool) -> bool {
        if !self.block_ready() {
            return false;
        }
        let base = unsafe {
            self.map
                .add(self.next as usize * self.cfg.block_size as usize)
        };
        let num = rd32(base, 12);
        let mut off = rd32(base, 16) as usize;
        let bs = self.cfg.block_size as usize;
        for _ in 0..num {
            if off + 48 + 20 > bs {
                break;
            }
            // SAFETY: offset checked against the block size above.
            let h = unsafe { base.add(off) };
            let next_off = rd32(h, 0) as usize;
            let status = rd32(h, 20);
            let mac = rd16(h, 24) as usize;
            let net = rd16(h, 26) as usize;
            let snap = rd32(h, 12) as usize;
            let start = if self.cooked { net } else { mac };
            if off + start + snap > bs {
                break;
            }
            // sockaddr_ll follows the header at TPACKET_ALIGN(sizeof(tpacket3_hdr)) = 48.
            let sll = 48;
            let mut addr = [0u8; 8];
            // SAFETY: within the frame header area.
            unsafe { std::ptr::copy_nonoverlapping(h.add(sll + 12), addr.as_mut_ptr(), 8) };
            let vlan = if status & TP_STATUS_VLAN_VALID != 0 {
                let tci = rd32(h, 32) as u16;
                let tpid = if status & TP_STATUS_VLAN_TPID_VALID != 0 {
                    rd16(h, 36)
                } else {
                    0x8100
                };
                Some((tpid, tci))
            } else {
                None
            };
            let pkt = Packet {
                sec: rd32(h, 4),
                nsec: rd32(h, 8),
                len: rd32(h, 16),
                // SAFETY: bounds checked above.
                data: unsafe { std::slice::from_raw_parts(h.add(start), snap) },
                protocol_be: rd16(h, sll + 2),
                hatype: rd16(h, sll + 8),
                // SAFETY: within the header.
                pkttype: unsafe { *h.add(sll + 10) },
                halen: unsafe { *h.add(sll + 11) },
                addr,
                vlan,
            };
            if !f(&pkt) {
                break;
            }
            if next_off == 0 {
                break;
            }
            off += next_off;
        }
        self.status_word(self.next)
            .store(TP_STATUS_KERNEL, Ordering::Release);
        self.next = (self.next + 1) % self.cfg.block_nr;
        true
    }

    /// Kernel counters since the last call: (packets seen incl. drops, drops, queue freezes).
    pub fn take_stats(&self) -> Result<(u32, u32, u32), Errno> {
        let mut st = [0u32; 3];
        let mut len = std::mem::size_of_val(&st) as libc::socklen_t;
        // SAFETY: st is 12 bytes = tpacket_stats_v3.
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                st.as_mut_ptr().cast(),
                &mut len,
            )
        };
        Errno::result(rc)?;
        Ok((st[0], st[1], st[2]))
    }

    /// Read and clear a pending socket error (ENETDOWN when the interface goes away).
    pub fn take_error(&self) -> Option<Errno> {
        let mut e: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: e is an int.
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&mut e as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        (rc == 0 && e != 0).then(|| Errno::from_raw(e))
    }
}
