//! Reaping children ([`reap`]: status and resource usage, as the shim
//! reports them and the broker waits for them) and pidfds ([`pidfd_open`],
//! and with the `tokio` feature [`watch_pidfd`]), through which the broker
//! waits for a child whose pid can never be reused under it.
#![allow(unsafe_code)]

use nix::errno::Errno;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// A reaped child.
#[derive(Debug, Clone, Copy)]
pub struct Reaped {
    pub pid: i32,
    /// The raw wait status (`WIFEXITED` and friends; `ExitStatus::from_raw`).
    pub status: i32,
    pub usage: libc::rusage,
}

impl Reaped {
    /// Its exit code, or `None` if a signal ended it.
    pub fn code(&self) -> Option<i32> {
        libc::WIFEXITED(self.status).then(|| libc::WEXITSTATUS(self.status))
    }

    /// The signal that ended it, if one did.
    pub fn signal(&self) -> Option<i32> {
        libc::WIFSIGNALED(self.status).then(|| libc::WTERMSIG(self.status))
    }
}

/// Reaps `pid` (any child if -1, clone children included: `__WALL`) with
/// `wait4`, retrying on EINTR: `Ok(None)` when `block` is false and nothing
/// has exited yet. Errors include ECHILD (no such child).
pub fn reap(pid: i32, block: bool) -> Result<Option<Reaped>, Errno> {
    let flags = libc::__WALL | if block { 0 } else { libc::WNOHANG };
    loop {
        let mut status = 0;
        // SAFETY: rusage is a plain C struct for which all-zero is valid.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers are to live locals of the right types.
        let got = unsafe { libc::wait4(pid, &mut status, flags, &mut usage) };
        match got {
            -1 if Errno::last() == Errno::EINTR => {}
            -1 => return Err(Errno::last()),
            0 => return Ok(None),
            pid => return Ok(Some(Reaped { pid, status, usage })),
        }
    }
}

/// A pidfd for `pid` (Linux 5.3 or later), close-on-exec.
pub fn pidfd_open(pid: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new
    // descriptor or -1; nothing is borrowed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(Errno::last());
    }
    let fd = RawFd::try_from(fd).map_err(|_| Errno::EBADF)?;
    // SAFETY: `fd` was just returned by the kernel and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Registers a pidfd with the tokio reactor: readable once the process has
/// exited. Must be called within a tokio runtime.
#[cfg(feature = "tokio")]
pub fn watch_pidfd(pidfd: OwnedFd) -> std::io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    use tokio::io::{Interest, unix::AsyncFd};
    // SAFETY: an OwnedFd is a valid open descriptor that stays the same for
    // as long as it is owned, here by the AsyncFd.
    let fd = unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) };
    Ok(fd?)
}
