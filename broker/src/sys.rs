//! Process-control syscalls of the broker: the pre-exec setup of a jail or
//! shim child (parent-death signal, process group, inherited descriptors,
//! cgroup membership), socketpairs, and group kills. Every function meant for
//! the forked child says so; those use only async-signal-safe calls.

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// What a spawned child needs set up between fork and exec.
#[derive(Debug, Default)]
pub struct ChildSetup {
    /// Descriptors to place at fixed numbers in the child (source, target).
    pub fds: Vec<(OwnedFd, RawFd)>,
    /// Open `cgroup.procs` files; the child writes "0" to each to join.
    pub cgroup_procs: Vec<OwnedFd>,
}

impl ChildSetup {
    /// Installs the setup on `cmd`. The child:
    /// 1. joins the turn's cgroups first, so that everything it later forks
    ///    (nsjail, the shim, the agent) is counted and killable as one;
    /// 2. sets `PR_SET_PDEATHSIG(SIGKILL)` and then re-checks its parent: the
    ///    signal fires when the *thread* that forked exits, and the parent may
    ///    already be gone before the prctl took effect;
    /// 3. starts its own process group, so a group kill reaches every process
    ///    that did not leave it;
    /// 4. moves the inherited descriptors into place, via high numbers first
    ///    so that one target never overwrites a later source.
    pub fn install(self, cmd: &mut tokio::process::Command) {
        let parent = nix::unistd::getpid();
        let ChildSetup { fds, cgroup_procs } = self;
        let pairs: Vec<(RawFd, RawFd)> = fds.iter().map(|(f, t)| (f.as_raw_fd(), *t)).collect();
        let procs: Vec<RawFd> = cgroup_procs.iter().map(|f| f.as_raw_fd()).collect();
        // The OwnedFds must outlive the fork; the Command keeps the closure
        // (and so these) alive until it is dropped, after spawn.
        let keep = (fds, cgroup_procs);
        let setup = move || {
            let _ = &keep;
            child_setup(parent, &pairs, &procs)
        };
        // SAFETY: `child_setup` runs between fork and exec and only makes
        // async-signal-safe calls (write, prctl, getppid, setpgid, fcntl,
        // dup2); it allocates nothing and takes no locks.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(setup);
        }
    }
}

/// Runs in the forked child before exec. Async-signal-safe only.
fn child_setup(parent: Pid, fds: &[(RawFd, RawFd)], procs: &[RawFd]) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, fcntl};
    for &fd in procs {
        write_all_raw(fd, b"0")?;
    }
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
    if nix::unistd::getppid() != parent {
        return Err(io::Error::other("parent exited before exec"));
    }
    nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0))?;
    let mut high = [0 as RawFd; 8];
    if fds.len() > high.len() {
        return Err(io::Error::other("too many inherited descriptors"));
    }
    for (i, &(src, _)) in fds.iter().enumerate() {
        // SAFETY-free: F_DUPFD_CLOEXEC on a descriptor the parent keeps open.
        high[i] = fcntl(borrow(src), FcntlArg::F_DUPFD_CLOEXEC(64))?;
    }
    for (i, &(_, target)) in fds.iter().enumerate() {
        // dup2 clears FD_CLOEXEC on the target: exactly the inherited ones.
        // SAFETY: dup2 on descriptors owned by this (forked) process.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::dup2(high[i], target) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn borrow(fd: RawFd) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: only used in the forked child on descriptors the parent holds
    // open (and keeps open) for the duration of the fork/exec.
    #[allow(unsafe_code)]
    unsafe {
        std::os::fd::BorrowedFd::borrow_raw(fd)
    }
}

fn write_all_raw(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match nix::unistd::write(borrow(fd), buf) {
            Ok(n) => buf = &buf[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
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
