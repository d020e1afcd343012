//! Putting descriptors at the fixed numbers a program expects (its stdio,
//! the shim's payload and control socket, nsjail's log): in a spawned child
//! ([`place`]) and in the shim's launcher, which execs in place
//! ([`place_owned`]).
#![allow(unsafe_code)]

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, fcntl};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Most descriptors a program may be given at fixed numbers (stdio
/// included).
pub const MAX_FDS: usize = 8;
/// Copies are made at this number or above, clear of every target.
const HIGH: RawFd = 64;

/// Child-safe. A close-on-exec copy of `fd` at [`HIGH`] or above.
fn copy_high(fd: BorrowedFd<'_>) -> Result<RawFd, Errno> {
    fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(HIGH))
}

/// Child-safe. `dup2(from, target)`: `target` refers to `from`'s file, with
/// close-on-exec cleared (whatever was at `target` is closed).
fn put(from: RawFd, target: RawFd) -> Result<(), Errno> {
    // SAFETY: dup2 reads no memory; on a descriptor this process holds open
    // it replaces `target`, which the caller means to replace.
    if unsafe { libc::dup2(from, target) } < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// Child-safe. Puts each source at its target, through copies at high
/// numbers first so that one target never overwrites a later source; the
/// targets come out without close-on-exec, the copies with it (they go at
/// the exec). At most [`MAX_FDS`] pairs (EINVAL otherwise).
pub fn place(pairs: &[(BorrowedFd<'_>, RawFd)]) -> Result<(), Errno> {
    if pairs.len() > MAX_FDS {
        return Err(Errno::EINVAL);
    }
    let mut high = [0 as RawFd; MAX_FDS];
    for (slot, (src, _)) in high.iter_mut().zip(pairs) {
        *slot = copy_high(*src)?;
    }
    for (&from, &(_, target)) in high.iter().zip(pairs) {
        put(from, target)?;
    }
    Ok(())
}

/// Not child-safe (allocates). Puts `fds[i]` at `targets[i]` like
/// [`place`], for a process that may go on without an exec: the sources
/// and the copies are closed, so only the targets stay open.
pub fn place_owned(fds: Vec<OwnedFd>, targets: &[RawFd]) -> Result<(), Errno> {
    let mut high = Vec::with_capacity(fds.len());
    for fd in &fds {
        let copy = copy_high(fd.as_fd())?;
        // SAFETY: F_DUPFD_CLOEXEC just returned this new descriptor; it is
        // owned here alone (and closed when `high` goes).
        high.push(unsafe { OwnedFd::from_raw_fd(copy) });
    }
    // A source may sit at a target's number: it goes before that number is
    // taken, not after (which would close the target).
    drop(fds);
    for (copy, &target) in high.iter().zip(targets) {
        put(copy.as_raw_fd(), target)?;
    }
    Ok(())
}
