//! Process file descriptors (`pidfd_open(2)`, Linux ≥ 5.3): a handle on one process that
//! a reused pid can never redirect. Captures watch their target's exit through one,
//! instance teardown signals through them, and the ports facts cache tells a container's
//! init process is still the one inspected.
//!
//! Traps:
//! - A pidfd becomes readable (POLLIN) when the process exits, zombie or not: [`exited`]
//!   is a zero-timeout poll, no `/proc` text to format or parse.
//! - `pidfd_open` of a pid that is gone fails with ESRCH; of a pid that was reused it
//!   opens the new process: open it right after the facts that name the pid, then check
//!   those facts again if they matter (as the callers do).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `pidfd_open(pid, 0)`.
pub fn open(pid: u32) -> std::io::Result<OwnedFd> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: plain syscall; returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Whether the process has exited (an error of poll counts as exited: never trust it).
pub fn exited(fd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_is_seen_exiting() {
        let me = open(std::process::id()).unwrap();
        assert!(!exited(&me));
        let mut c = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let fd = open(c.id()).unwrap();
        assert!(!exited(&fd));
        c.kill().unwrap();
        c.wait().unwrap();
        assert!(exited(&fd), "reaped child");
        assert!(open(u32::MAX).is_err());
    }
}
