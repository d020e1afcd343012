//! Signal handling around a spawn: every signal blocked across the clone
//! ([`block_all`]), and the one routine that gives a new program clean
//! signal handling ([`default_dispositions`] then [`unblock_all`]), used by
//! the spawned child and by the shim's launcher before it execs in place.
#![allow(unsafe_code)]

use nix::errno::Errno;
use nix::sys::signal::{SigSet, SigmaskHow, pthread_sigmask};

/// The calling thread's signal mask from before [`block_all`].
#[derive(Debug)]
#[must_use = "the mask stays full until restored"]
pub struct Blocked {
    old: SigSet,
}

impl Blocked {
    /// Puts the old mask back.
    pub fn restore(self) -> Result<(), Errno> {
        pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&self.old), None)
    }
}

/// Blocks every signal in the calling thread. Around a vfork-style clone: a
/// handler of the parent must never run in the child, which shares the
/// parent's memory, before the child has reset the dispositions.
pub fn block_all() -> Result<Blocked, Errno> {
    let mut old = SigSet::empty();
    pthread_sigmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut old),
    )?;
    Ok(Blocked { old })
}

/// Child-safe. The default action for every signal a program may change
/// (SIGPIPE included, which Rust programs ignore and exec would keep
/// ignored). Signals 32 up to SIGRTMIN belong to the C library, which
/// refuses to change them; SIGKILL and SIGSTOP cannot be changed. The mask
/// is left as it is.
pub fn default_dispositions() -> Result<(), Errno> {
    let (rtmin, rtmax) = (libc::SIGRTMIN(), libc::SIGRTMAX());
    for sig in 1..=rtmax {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP || (32..rtmin).contains(&sig) {
            continue;
        }
        // SAFETY: a zeroed sigaction with SIG_DFL (0) is a valid argument;
        // sigaction is async-signal-safe, and a vfork-style child has its
        // own handler table (no CLONE_SIGHAND).
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(sig, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(Errno::last());
        }
    }
    Ok(())
}

/// Child-safe. An empty signal mask, the last step before `execve` (exec
/// keeps the mask).
pub fn unblock_all() -> Result<(), Errno> {
    pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
}

/// Both steps, for a process about to exec in place.
pub fn reset_for_exec() -> Result<(), Errno> {
    default_dispositions()?;
    unblock_all()
}
