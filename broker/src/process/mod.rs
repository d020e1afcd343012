//! Process control of the broker: the calls a turn's supervision makes on
//! the processes it spawned (wait, signal, kill every one of them), behind
//! [`ProcessControl`] so the turn's state machine is tested without root,
//! and the small process helpers around them (socketpairs, group kills, the
//! children of a process, pipe sizes). Spawning lives in [`crate::jail::spawn`].
//!
//! The shape is a syscall seam: the trait here, the real implementation in
//! [`linux`], a test double in `test` (unit tests only).

pub mod linux;
#[cfg(test)]
pub mod test;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::io;
use std::os::fd::OwnedFd;
use std::process::ExitStatus;

/// The process-control calls of a running turn: wait for its first process
/// (nsjail, or the shim in direct mode), signal the shim, kill every process
/// of the turn. [`linux::TurnProcesses`] makes them; unit tests use
/// `test::FakeProcesses`.
pub trait ProcessControl: Send {
    /// The first process's pid, which is also its process group id.
    fn pid(&self) -> i32;

    /// Waits until the first process has exited and reaps it. Cancel-safe;
    /// gives the same status again once reaped.
    fn wait(&mut self) -> impl Future<Output = io::Result<ExitStatus>> + Send;

    /// `kill(2)`: `sig` to one process of the turn (the shim, which forwards
    /// it to the agent); a pid of 0 or below, or a process already gone, is
    /// not an error.
    fn signal(&self, pid: i32, sig: Signal);

    /// SIGKILLs every process of the turn: the first process's group and,
    /// with cgroups, everything in the turn's cgroup.
    fn kill_all(&self);

    /// Why a process started by a ready launcher never became its program,
    /// once it has exited; `None` if it did, or if it was spawned directly.
    fn launch_failure(&self) -> Option<io::Error>;
}

/// A connected `SOCK_STREAM` unix socketpair, close-on-exec on both ends.
pub fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

/// Sends `sig` to a whole process group; a group already gone is not an error.
pub fn kill_group(pgid: i32, sig: Signal) {
    if pgid > 0 {
        let _ = killpg(Pid::from_raw(pgid), sig);
    }
}

/// Sends `sig` to one process; a process already gone is not an error.
pub fn kill_pid(pid: i32, sig: Signal) {
    if pid > 0 {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), sig);
    }
}

/// The children of `pid` (from `/proc/<pid>/task/*/children`).
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
    }
    out
}

/// Whether this process may set up namespaces and cgroups for others.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Grows a pipe's kernel buffer (best effort: capped by
/// `/proc/sys/fs/pipe-max-size`), so a fast writer does fewer round trips
/// through the relay.
pub fn grow_pipe(fd: std::os::fd::BorrowedFd<'_>, bytes: i32) {
    let _ = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETPIPE_SZ(bytes));
}
