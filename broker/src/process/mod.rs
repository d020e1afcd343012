//! Process control of the broker: the calls a turn's supervision makes on
//! the processes it spawned (wait, signal, kill every one of them), behind
//! [`ProcessControl`] so the turn's state machine is tested without root,
//! and the small process helpers around them (socketpairs, group kills, the
//! children of a process, pipe sizes). Spawning lives in [`crate::jail::spawn`].
//!
//! The shape is a syscall seam: the trait here, the real implementation in
//! [`linux`], a test double in `test` (unit tests only); [`tree`] finds and
//! kills processes through the process tree, by pidfd.

pub mod linux;
pub mod own;
#[cfg(test)]
pub mod test;
pub mod tree;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::io;
use std::os::fd::OwnedFd;
use std::process::ExitStatus;

/// The process-control calls of a running turn: wait for its first process
/// (nsjail, or the shim in direct mode), signal the shim, kill every process
/// of the turn. [`linux::TurnProcesses`] makes them; unit tests use
/// `test::FakeProcesses`. No signal goes to a bare pid that may have been
/// reaped: the first process is signalled while unreaped, the shim through
/// a pidfd.
pub trait ProcessControl: Send {
    /// The first process's pid, which is also its process group id.
    fn pid(&self) -> i32;

    /// Waits until the first process has exited and reaps it. Cancel-safe;
    /// gives the same status again once reaped.
    fn wait(&mut self) -> impl Future<Output = io::Result<ExitStatus>> + Send;

    /// Finds the shim and holds it by a pidfd for [`Self::signal_shim`]: the
    /// first process itself, or under nsjail the jail's init (nsjail's
    /// child). Its host pid, or 0 if it cannot be found (then no signal
    /// reaches the agent before the stop sequence's SIGKILL).
    fn pin_shim(&mut self, under_nsjail: bool) -> i32;

    /// `sig` to the shim, which forwards it to the agent; nothing if the
    /// shim was not found or is gone.
    fn signal_shim(&self, sig: Signal);

    /// SIGKILLs every process of the turn: with cgroups everything in the
    /// turn's cgroup; without, every descendant of the first process (it
    /// waits until they are gone), then the first process and its group.
    fn kill_all(&self) -> impl Future<Output = ()> + Send;

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

/// The children of `pid`: from `/proc/<pid>/task/*/children`, or where the
/// kernel has no such file (`CONFIG_PROC_CHILDREN` off), from a scan of
/// every `/proc/<pid>/stat`.
pub fn children_of(pid: i32) -> Vec<i32> {
    children_from_tasks(pid).unwrap_or_else(|| children_by_scan(pid))
}

/// `/proc/<pid>/task/*/children`; `None` if no such file can be read.
fn children_from_tasks(pid: i32) -> Option<Vec<i32>> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut found = None;
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            found.get_or_insert_with(Vec::new).extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
    }
    found
}

/// The processes whose parent is `pid`, from every `/proc/<pid>/stat`.
pub fn children_by_scan(pid: i32) -> Vec<i32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| tree::parse_stat(&stat))
                .is_some_and(|(_, ppid)| ppid == pid)
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scan_finds_the_children_the_task_files_list() {
        let mut kids: Vec<std::process::Child> = (0..2)
            .map(|_| {
                std::process::Command::new("/bin/sleep")
                    .arg("1000")
                    .spawn()
                    .expect("sleep")
            })
            .collect();
        let me = std::process::id() as i32;
        let mut want: Vec<i32> = kids.iter().map(|k| k.id() as i32).collect();
        want.sort_unstable();
        let mut by_tasks = children_from_tasks(me).expect("task children files");
        let mut by_scan = children_by_scan(me);
        for k in &mut kids {
            let _ = k.kill();
            let _ = k.wait();
        }
        // Other tests of this process may have children of their own.
        by_tasks.retain(|p| want.contains(p));
        by_scan.retain(|p| want.contains(p));
        by_tasks.sort_unstable();
        by_scan.sort_unstable();
        assert_eq!((by_tasks, by_scan), (want.clone(), want));
    }
}
