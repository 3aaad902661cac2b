//! Compile tcpdump filter expressions to classic BPF with libpcap (`pcap_open_dead` +
//! `pcap_compile`), and adapt them to what the kernel socket filter sees.
//!
//! Linked directly against libpcap (needs `libpcap-dev` at build time, `libpcap0.8` at run
//! time); five functions do not justify the `pcap` crate.
//!
//! Traps:
//! - Compile for the link type that is actually written: offsets in the program are relative
//!   to that link-layer header.
//! - A `SOCK_DGRAM` (cooked) packet socket hands the filter the packet *without* a link-layer
//!   header, while libpcap compiled for LINKTYPE_LINUX_SLL (16-byte header). As libpcap's
//!   `fix_program` does, subtract 16 from every packet load; loads of the SLL packet-type
//!   (offset 0) and protocol (offset 14) fields become the kernel's ancillary loads
//!   `SKF_AD_PKTTYPE` / `SKF_AD_PROTOCOL`; other header fields cannot be filtered in the
//!   kernel (such filters are refused).
//! - `pcap_compile` is thread-safe since libpcap 1.8 (Debian 12 ships 1.10).
//! - The program's `ret #k` is the snap length: the kernel truncates to it.

use std::ffi::{c_char, c_int, c_uint, CStr, CString};

#[repr(C)]
struct PcapT {
    _private: [u8; 0],
}

#[repr(C)]
struct BpfProgramRaw {
    bf_len: c_uint,
    bf_insns: *mut libc::sock_filter,
}

#[link(name = "pcap")]
extern "C" {
    fn pcap_open_dead(linktype: c_int, snaplen: c_int) -> *mut PcapT;
    fn pcap_compile(
        p: *mut PcapT,
        fp: *mut BpfProgramRaw,
        s: *const c_char,
        optimize: c_int,
        netmask: u32,
    ) -> c_int;
    fn pcap_geterr(p: *mut PcapT) -> *mut c_char;
    fn pcap_freecode(fp: *mut BpfProgramRaw);
    fn pcap_close(p: *mut PcapT);
}

const PCAP_NETMASK_UNKNOWN: u32 = 0xffff_ffff;
const SLL_HDR_LEN: u32 = 16;
// linux/filter.h
const SKF_AD_OFF: i32 = -0x1000;
const SKF_AD_PROTOCOL: i32 = 0;
const SKF_AD_PKTTYPE: i32 = 4;

/// A compiled classic BPF program (kernel `sock_filter` layout == libpcap `bpf_insn`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Program(pub Vec<libc::sock_filter>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BpfError {
    /// libpcap's own message, e.g. "syntax error".
    #[error("invalid filter {filter:?}: {message}")]
    Syntax { filter: String, message: String },
    #[error("filter {filter:?} inspects link-layer header fields that a cooked (any-interface) socket cannot filter in the kernel; pick an interface")]
    CookedHeader { filter: String },
    #[error("filter contains a NUL byte")]
    Nul,
    #[error("pcap_open_dead failed")]
    OpenDead,
}

/// Compile `filter` for `linktype` with libpcap. `snaplen` becomes the accept value.
pub fn compile(filter: &str, linktype: u32, snaplen: u32) -> Result<Program, BpfError> {
    let c = CString::new(filter).map_err(|_| BpfError::Nul)?;
    // SAFETY: plain libpcap calls; every pointer is checked and freed on every path.
    unsafe {
        let p = pcap_open_dead(linktype as c_int, snaplen.min(i32::MAX as u32) as c_int);
        if p.is_null() {
            return Err(BpfError::OpenDead);
        }
        let mut prog = BpfProgramRaw {
            bf_len: 0,
            bf_insns: std::ptr::null_mut(),
        };
        let rc = pcap_compile(p, &mut prog, c.as_ptr(), 1, PCAP_NETMASK_UNKNOWN);
        if rc != 0 {
            let message = CStr::from_ptr(pcap_geterr(p))
                .to_string_lossy()
                .into_owned();
            pcap_close(p);
            return Err(BpfError::Syntax {
                filter: filter.to_owned(),
                message,
            });
        }
        let insns = std::slice::from_raw_parts(prog.bf_insns, prog.bf_len as usize).to_vec();
        pcap_freecode(&mut prog);
        pcap_close(p);
        Ok(Program(insns))
    }
}

/// Rewrite a program compiled for LINKTYPE_LINUX_SLL so it runs on a cooked packet socket.
pub fn fix_for_cooked(prog: &mut Program, filter: &str) -> Result<(), BpfError> {
    for ins in &mut prog.0 {
        let class = ins.code & 0x07;
        let mode = ins.code & 0xe0;
        let is_ld = class == libc::BPF_LD as u16 || class == libc::BPF_LDX as u16;
        let packet_load = mode == libc::BPF_ABS as u16
            || mode == libc::BPF_IND as u16
            || mode == libc::BPF_MSH as u16;
        if !(is_ld && packet_load) {
            continue;
        }
        if ins.k >= SKF_AD_OFF as u32 {
            continue; // already an ancillary load
        }
        if ins.k >= SLL_HDR_LEN {
            ins.k -= SLL_HDR_LEN;
        } else if ins.k == 0 && mode == libc::BPF_ABS as u16 {
            ins.k = (SKF_AD_OFF + SKF_AD_PKTTYPE) as u32;
        } else if ins.k == 14 && mode == libc::BPF_ABS as u16 {
            ins.k = (SKF_AD_OFF + SKF_AD_PROTOCOL) as u32;
        } else {
            return Err(BpfError::CookedHeader {
                filter: filter.to_owned(),
            });
        }
    }
    Ok(())
}

/// Does the program accept `pkt` (a full packet as written to the file, link header first)?
/// A tiny interpreter is not needed: libpcap's `bpf_filter` does it (used by tests only).
#[cfg(test)]
pub fn matches(prog: &Program, pkt: &[u8]) -> bool {
    #[link(name = "pcap")]
    extern "C" {
        fn bpf_filter(
            pc: *const libc::sock_filter,
            p: *const u8,
            wirelen: c_uint,
            buflen: c_uint,
        ) -> c_uint;
    }
    // SAFETY: the program comes from pcap_compile, the buffer is a valid slice.
    unsafe {
        bpf_filter(
            prog.0.as_ptr(),
            pkt.as_ptr(),
            pkt.len() as c_uint,
            pkt.len() as c_uint,
        ) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::super::pcap::{LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL};
    use super::*;

    #[test]
    fn compiles_tcp_port_80_for_ethernet() {
        let p = compile("tcp port 80", LINKTYPE_ETHERNET, 262144).unwrap();
        assert!(p.0.len() > 5);
        // the accept instruction carries the snaplen
        assert!(p
            .0
            .iter()
            .any(|i| i.code == (libc::BPF_RET | libc::BPF_K) as u16 && i.k == 262144));
    }

    #[test]
    fn empty_filter_accepts_everything() {
        let p = compile("", LINKTYPE_ETHERNET, 100).unwrap();
        assert_eq!(p.0.len(), 1);
        assert_eq!(p.0[0].k, 100);
    }

    #[test]
    fn bad_filter_carries_libpcap_message() {
        let e = compile("tcp prot 80", LINKTYPE_ETHERNET, 65535).unwrap_err();
        match e {
            BpfError::Syntax { message, .. } => {
                assert!(message.contains("syntax error"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(compile("a\0b", 1, 1), Err(BpfError::Nul)));
    }

    #[test]
    fn cooked_fix_shifts_payload_loads_and_maps_protocol() {
        let mut p = compile("tcp port 80", LINKTYPE_LINUX_SLL, 65535).unwrap();
        let before = p.clone();
        fix_for_cooked(&mut p, "tcp port 80").unwrap();
        // first instruction loads the SLL protocol field at 14 -> SKF_AD_PROTOCOL
        assert_eq!(before.0[0].k, 14);
        assert_eq!(p.0[0].k, (SKF_AD_OFF + SKF_AD_PROTOCOL) as u32);
        // every other packet load moved down by 16
        for (a, b) in before.0.iter().zip(&p.0).skip(1) {
            if a.code & 0x07 <= 1 && matches!(a.code & 0xe0, 0x20 | 0x40 | 0xa0) {
                assert_eq!(b.k, a.k - 16);
            }
        }
    }

    #[test]
    fn cooked_fix_refuses_link_address_filters() {
        let mut p = compile("ether[6] = 1", LINKTYPE_LINUX_SLL, 65535).unwrap();
        assert!(fix_for_cooked(&mut p, "x").is_err());
    }

    #[test]
    fn compiled_filter_matches_a_real_frame() {
        // Ethernet + IPv4 + TCP SYN to port 80
        let mut f = vec![0u8; 14 + 20 + 20];
        f[12] = 0x08; // ethertype IPv4
        f[14] = 0x45;
        f[14 + 9] = 6; // TCP
        f[14 + 20 + 2] = 0;
        f[14 + 20 + 3] = 80;
        let p = compile("tcp port 80", LINKTYPE_ETHERNET, 65535).unwrap();
        assert!(matches(&p, &f));
        f[14 + 20 + 3] = 81;
        assert!(!matches(&p, &f));
    }
}
