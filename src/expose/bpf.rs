//! bpf(2) for cgroup device programs: load, query, attach, detach.
//!
//! Kernel interface: `bpf(BPF_PROG_LOAD)` with `BPF_PROG_TYPE_CGROUP_DEVICE` (15),
//! `BPF_PROG_QUERY`, `BPF_PROG_GET_FD_BY_ID`, `BPF_PROG_ATTACH`/`BPF_PROG_DETACH` with
//! `BPF_CGROUP_DEVICE` (6) on an `O_DIRECTORY` fd of a cgroup v2 directory.
//!
//! Why raw bpf(2) through `libc::syscall` and not libbpf-sys: five commands with
//! fixed-layout attribute structs are all that is needed (runc does the same in Go, youki
//! uses libbpf-sys only for the same five calls); libbpf-sys would build libbpf and link
//! libelf and zlib into a root daemon for no gain. The structs below are prefixes of
//! `union bpf_attr`; the kernel accepts a shorter attr (`bpf_check_uarg_tail_zero`).
//!
//! Traps:
//! - Programs attached to one cgroup with `BPF_F_ALLOW_MULTI` are ANDed: a second program
//!   can only take access away. A grant therefore *replaces* the runtime's program: attach
//!   the new one (runtime rules + ours), then detach the ones that were there before — in
//!   that order, so there is no moment without a program (which would allow everything).
//! - A cgroup whose program was attached without `BPF_F_ALLOW_MULTI` refuses a second
//!   attach with EPERM (runc ≥ 1.0 and systemd attach with ALLOW_MULTI).
//! - Detaching needs an fd of the *program*: ids from BPF_PROG_QUERY are turned into fds
//!   with BPF_PROG_GET_FD_BY_ID (CAP_SYS_ADMIN).
//! - A program loaded here lives as long as it is attached (or an fd is open).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::errno::Errno;

use super::program::Insn;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
pub const BPF_F_ALLOW_MULTI: u32 = 2;

#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct Attach {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

#[repr(C)]
#[derive(Default)]
struct Query {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct GetFd {
    prog_id: u32,
    next_id: u32,
    open_flags: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> Result<libc::c_long, Errno> {
    // SAFETY: attr is a live, correctly laid out prefix of union bpf_attr; size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(r)
    }
}

/// Load a device program; on a verifier refusal the verifier's log is in the error.
pub fn load(prog: &[Insn]) -> Result<OwnedFd, (Errno, String)> {
    let license = CString::new("Apache").expect("no NUL");
    let mut log = vec![0u8; 64 * 1024];
    let mut name = [0u8; 16];
    name[..10].copy_from_slice(b"dindhelper");
    let mut attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: prog.len() as u32,
        insns: prog.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        prog_name: name,
        ..Default::default()
    };
    match bpf(BPF_PROG_LOAD, &mut attr) {
        // SAFETY: the kernel returned a new fd we own.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) }),
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            Err((e, String::from_utf8_lossy(&log[..end]).into_owned()))
        }
    }
}

/// Ids of the device programs attached to the cgroup (directory fd).
pub fn query(cgroup: &impl AsRawFd) -> Result<Vec<u32>, Errno> {
    let mut ids = vec![0u32; 64];
    let mut attr = Query {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..Default::default()
    };
    bpf(BPF_PROG_QUERY, &mut attr)?;
    ids.truncate(attr.prog_cnt as usize);
    Ok(ids)
}

/// An fd for an attached program.
pub fn prog_fd_by_id(id: u32) -> Result<OwnedFd, Errno> {
    let mut attr = GetFd {
        prog_id: id,
        ..Default::default()
    };
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)?;
    // SAFETY: new fd from the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

pub fn attach(cgroup: &impl AsRawFd, prog: &impl AsRawFd, flags: u32) -> Result<(), Errno> {
    let mut attr = Attach {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: flags,
        ..Default::default()
    };
    bpf(BPF_PROG_ATTACH, &mut attr).map(|_| ())
}

pub fn detach(cgroup: &impl AsRawFd, prog: &impl AsRawFd) -> Result<(), Errno> {
    let mut attr = Attach {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        ..Default::default()
    };
    bpf(BPF_PROG_DETACH, &mut attr).map(|_| ())
}
