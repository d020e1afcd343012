//! The shim's own syscalls, as PID 1 of a jail: its signals, its inherited
//! descriptors, the self-check, the bridge's poll, reaping and killing what
//! is left, the launcher's request socket. The agent's spawn and what the
//! launcher shares with it (descriptor placement, signal reset, exec) live
//! in `turnstile-sys`, with the rest of the project's `unsafe`.
//!
//! Each helper's doc says whether it may run in a child between its clone
//! and `execve` ("child-safe") or only in the shim itself ("shim only").
//! `unsafe` is allowed in this module alone of the shim; every block says
//! why it is sound.
#![allow(unsafe_code)]

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::{self, Pid};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use turnstile_shim::{AgentStatus, CONTROL_FD, INIT_FD, Usage};

/// The signals the shim takes synchronously in its wait loop.
const HANDLED: [Signal; 5] = [
    Signal::SIGCHLD,
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
];

/// Upper bound on kill-and-reap rounds at the end of a turn, so that a fork
/// bomb cannot keep the shim alive forever.
const MAX_CLEANUP_ROUNDS: usize = 4096;

// ---------------------------------------------------------------- signals --

/// Shim only. Blocks [`HANDLED`] for this thread (and threads it starts
/// later) and returns the set for [`wait_signal`]; also ignores SIGPIPE and
/// gives SIGCHLD its default action, whatever the broker left us.
pub fn take_signals() -> nix::Result<SigSet> {
    let mut set = SigSet::empty();
    for sig in HANDLED {
        set.add(sig);
    }
    signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
    // A dead control socket must give EPIPE, not kill the shim.
    set_disposition(Signal::SIGPIPE, SigHandler::SigIgn)?;
    // An inherited SIG_IGN on SIGCHLD would make the kernel auto-reap the
    // agent and we would lose its exit status.
    set_disposition(Signal::SIGCHLD, SigHandler::SigDfl)?;
    Ok(set)
}

fn set_disposition(sig: Signal, handler: SigHandler) -> nix::Result<()> {
    let action = SigAction::new(handler, SaFlags::empty(), SigSet::empty());
    // SAFETY: only SIG_IGN or SIG_DFL are installed, never a handler
    // function, so no code of ours can run in signal context.
    unsafe { signal::sigaction(sig, &action) }.map(drop)
}

/// Shim only. Waits for one of the blocked signals in `set`.
pub fn wait_signal(set: &SigSet) -> nix::Result<Signal> {
    set.wait()
}

/// Shim only. Sends `sig` to one process; a process already gone is fine.
pub fn send_signal(pid: i32, sig: Signal) {
    let _ = signal::kill(Pid::from_raw(pid), sig);
}

// ------------------------------------------------------- process control --

/// Shim only. Makes the shim a child subreaper, so that orphans of the agent
/// are re-parented to it (a no-op in effect when the shim is PID 1).
pub fn set_child_subreaper() -> nix::Result<()> {
    nix::sys::prctl::set_child_subreaper(true)
}

/// Shim only. Makes the shim non-dumpable. The agent runs as the same uid,
/// and the kernel's ptrace access checks would otherwise let it open
/// `/proc/1/fd/*` (the control socket, the payload), read `/proc/1/mem`, or
/// copy a descriptor with `pidfd_getfd`. The agent's own exec makes it
/// dumpable again for itself.
pub fn make_undumpable() -> nix::Result<()> {
    nix::sys::prctl::set_dumpable(false)
}

// ------------------------------------------------------------ descriptors --

static INIT_TAKEN: AtomicBool = AtomicBool::new(false);
static CONTROL_TAKEN: AtomicBool = AtomicBool::new(false);

/// Child-safe. Whether `fd` is an open descriptor (`fcntl(F_GETFD)`).
pub fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the descriptor flags; any integer is a valid
    // argument and an unopened one gives EBADF.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

/// Takes ownership of an inherited descriptor, once.
fn adopt(fd: RawFd, taken: &AtomicBool) -> io::Result<OwnedFd> {
    if !fd_is_open(fd) {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    if taken.swap(true, Ordering::SeqCst) {
        return Err(io::Error::other("descriptor already taken"));
    }
    // SAFETY: the descriptor is open (checked above), the broker hands it to
    // the shim for the shim alone, and the flag guarantees it is wrapped only
    // once, so this `OwnedFd` is its sole owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Shim only. The init payload on [`INIT_FD`]; dropping the file closes it.
pub fn take_init_fd() -> io::Result<File> {
    adopt(INIT_FD, &INIT_TAKEN).map(File::from)
}

/// Shim only. The control socket on [`CONTROL_FD`], marked close-on-exec at
/// once so that it can never reach the agent.
pub fn take_control_fd() -> io::Result<UnixStream> {
    let fd = adopt(CONTROL_FD, &CONTROL_TAKEN)?;
    fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    Ok(UnixStream::from(fd))
}

/// Shim only. Best effort: marks every descriptor from 3 up close-on-exec,
/// so nothing the broker (or nsjail) leaked to the shim reaches the agent.
/// Kernels before 5.11 lack the flag; the control fd is covered either way.
pub fn cloexec_inherited_fds() {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets a flag on
    // descriptors; it closes nothing and touches no memory.
    let _ = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
}

// -------------------------------------------------------------- self-check --

/// Shim only. The shim's pid as it sees it.
pub fn pid() -> i32 {
    unistd::getpid().as_raw()
}

/// Shim only. Real uid and gid.
pub fn uid_gid() -> (u32, u32) {
    (unistd::getuid().as_raw(), unistd::getgid().as_raw())
}

/// Shim only. `prctl(PR_GET_NO_NEW_PRIVS)`; an error reads as "not set".
pub fn no_new_privs() -> bool {
    nix::sys::prctl::get_no_new_privs().unwrap_or(false)
}

/// Shim only. Whether `/` is mounted read-only; an error reads as writable.
pub fn root_read_only() -> bool {
    nix::sys::statvfs::statvfs("/")
        .map(|s| s.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY))
        .unwrap_or(false)
}

/// Shim only. The uts node name (empty on error).
pub fn hostname() -> String {
    unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default()
}

// ----------------------------------------------------------------- bridge --

/// Shim only (the LLM bridge's thread). `poll(2)` on `fds` for at most
/// `timeout_ms` (-1: no timeout), retrying on EINTR; returns how many
/// entries have events.
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    let n = libc::nfds_t::try_from(fds.len()).map_err(io::Error::other)?;
    loop {
        // SAFETY: `fds` is a live, exclusively borrowed slice of `n` pollfd
        // structs, which the kernel only reads and writes within bounds.
        let got = unsafe { libc::poll(fds.as_mut_ptr(), n, timeout_ms) };
        if got >= 0 {
            return Ok(got as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

// ------------------------------------------------------------ reaping --

/// Shim only. The pid of one exited child, without reaping it (`waitid` with
/// WNOWAIT), so that its pid cannot be reused while we act on it.
pub fn exited_child() -> Option<i32> {
    // __WALL: also children that announce their exit with another signal
    // than SIGCHLD (clone), which would otherwise stay zombies.
    let flags =
        WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT | WaitPidFlag::__WALL;
    match waitid(Id::All, flags) {
        Ok(status) => status.pid().map(Pid::as_raw),
        Err(_) => None,
    }
}

/// Shim only. Reaps `pid` (any child if -1, clone children included) with
/// its status and resource usage: `Ok(None)` when `block` is false and
/// nothing has exited yet. Errors include ECHILD.
pub fn reap(pid: i32, block: bool) -> Result<Option<(i32, AgentStatus, Usage)>, Errno> {
    let Some(reaped) = turnstile_sys::wait::reap(pid, block)? else {
        return Ok(None);
    };
    let status = match reaped.signal() {
        Some(sig) => AgentStatus::Signal(sig),
        None => AgentStatus::Code(libc::WEXITSTATUS(reaped.status)),
    };
    let micros = |t: libc::timeval| {
        u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000 + u64::try_from(t.tv_usec).unwrap_or(0)
    };
    let usage = Usage {
        user_cpu_us: micros(reaped.usage.ru_utime),
        system_cpu_us: micros(reaped.usage.ru_stime),
        max_rss_kib: u64::try_from(reaped.usage.ru_maxrss).unwrap_or(0),
    };
    Ok(Some((reaped.pid, status, usage)))
}

// ---------------------------------------------------------------- cleanup --

/// Shim only, and only as PID 1 of a pid namespace (outside one, kill(-1)
/// would hit every process of the user on the host: the caller checks).
/// SIGKILLs everything else in the namespace and reaps until no child is
/// left. Returns false if it gave up; the kernel still kills the namespace
/// when PID 1 exits.
pub fn kill_namespace() -> bool {
    for _ in 0..MAX_CLEANUP_ROUNDS {
        let _ = signal::kill(Pid::from_raw(-1), Signal::SIGKILL);
        if reap(-1, true) == Err(Errno::ECHILD) {
            return true;
        }
    }
    false
}

/// Shim only. SIGKILLs the agent's process group (call it while the agent is
/// still an unreaped zombie, so that its pid, which is the group id, cannot
/// have been reused).
pub fn kill_group(pgid: i32) {
    let _ = signal::killpg(Pid::from_raw(pgid), Signal::SIGKILL);
}

/// Shim only. As a child subreaper, SIGKILLs its children round after round
/// (each round's deaths re-parent grandchildren to the shim) and reaps them,
/// until it has none. Returns false if it gave up after the round limit.
pub fn kill_children() -> bool {
    for _ in 0..MAX_CLEANUP_ROUNDS {
        let children = children();
        for &child in &children {
            send_signal(child, Signal::SIGKILL);
        }
        // With live children just killed, block until one dies; with none
        // listed, only collect zombies (a child forked after the listing is
        // caught next round).
        match reap(-1, !children.is_empty()) {
            Err(Errno::ECHILD) => return true,
            Ok(Some(_)) => while let Ok(Some(_)) = reap(-1, false) {},
            _ => {}
        }
    }
    false
}

/// Shim only. The shim's children, from `/proc/self/task/*/children`; when
/// the kernel lacks that file, by scanning `/proc/*/stat` for our pid.
fn children() -> Vec<i32> {
    let mut found = false;
    let mut kids = Vec::new();
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
                found = true;
                kids.extend(parse_children(&text));
            }
        }
    }
    if found {
        return kids;
    }
    let me = pid();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return kids;
    };
    for entry in procs.flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        if parse_stat_ppid(&stat) == Some(me) {
            kids.push(child);
        }
    }
    kids
}

/// The pids of a `/proc/<pid>/task/<tid>/children` file.
pub fn parse_children(text: &str) -> Vec<i32> {
    text.split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The parent pid in a `/proc/<pid>/stat` line; the command name may contain
/// spaces and parentheses, so fields are counted after its last ')'.
pub fn parse_stat_ppid(stat: &str) -> Option<i32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

// --------------------------------------------------------------- launcher --

static LAUNCH_TAKEN: AtomicBool = AtomicBool::new(false);

/// Launcher only. The request socket on [`turnstile_shim::LAUNCH_FD`], moved
/// to a high close-on-exec descriptor so that the request's own descriptors
/// may take its number.
pub fn take_launch_fd() -> io::Result<OwnedFd> {
    let fd = adopt(turnstile_shim::LAUNCH_FD, &LAUNCH_TAKEN)?;
    Ok(turnstile_sys::fd::copy_high(fd.as_fd())?)
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_and_stat_parse() {
        assert_eq!(parse_children("12 345 6\n"), [12, 345, 6]);
        assert_eq!(parse_children(""), Vec::<i32>::new());
        assert_eq!(parse_stat_ppid("77 (a) b (c)) S 42 77 77 0 -1"), Some(42));
        assert_eq!(parse_stat_ppid("77 (sleep) S 1 2 3"), Some(1));
        assert_eq!(parse_stat_ppid("garbage"), None);
    }
}
