//! Spawning nsjail or the shim without `fork()`.
//!
//! `fork()` copies the broker's page tables, and the broker may be large (its
//! relay buffers, its runtime, many turns at once): measured here, `fork`
//! and `exec` cost 0.3 ms from a fresh process and 2.3 ms once it holds
//! 50 MiB, 9 ms at 200 MiB, on every turn start. This module does what
//! `posix_spawn` does instead: a `clone(CLONE_VM | CLONE_VFORK)` child that
//! shares the broker's memory, runs a few async-signal-safe steps on its own
//! stack and calls `execve`, while the calling thread waits. Its cost does not
//! grow with the broker's size. `posix_spawn` itself cannot be used: it cannot
//! join cgroups or set the parent-death signal, and std's `Command` falls
//! back to `fork` as soon as a `pre_exec` hook is set.
//!
//! The child is owned by a [`Child`]: waited for through a pidfd (so its pid
//! can never be reused while the broker still refers to it), with its stdio
//! pipes as tokio pipes, SIGKILLed and reaped if dropped unreaped.

use nix::errno::Errno;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
use nix::unistd::Pid;
use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::raw::c_char;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicI32, Ordering};
use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;

/// Most descriptors a child may be given at fixed numbers (stdio included).
const MAX_FDS: usize = 8;
/// The child's stack: it runs a handful of syscall wrappers, no more.
const CHILD_STACK: usize = 256 * 1024;

/// What a spawned child needs set up between clone and exec.
#[derive(Debug, Default)]
pub struct ChildSetup {
    /// Descriptors to place at fixed numbers in the child (source, target),
    /// besides stdio.
    pub fds: Vec<(OwnedFd, RawFd)>,
    /// Open `cgroup.procs` files; the child writes "0" to each to join.
    pub cgroup_procs: Vec<OwnedFd>,
}

/// Where the child's stdin, stdout and stderr go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stdio {
    /// Three pipes, the broker's ends in [`Child`].
    Piped,
    /// `/dev/null` for all three.
    Null,
}

/// The step of the child's setup that failed (reported with its errno).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
enum Step {
    None = 0,
    Signals = 1,
    Cgroup = 2,
    ParentDeathSignal = 3,
    ParentGone = 4,
    ProcessGroup = 5,
    Descriptors = 6,
    Chdir = 7,
    Exec = 8,
}

impl Step {
    fn from_raw(raw: i32) -> Step {
        match raw {
            1 => Step::Signals,
            2 => Step::Cgroup,
            3 => Step::ParentDeathSignal,
            4 => Step::ParentGone,
            5 => Step::ProcessGroup,
            6 => Step::Descriptors,
            7 => Step::Chdir,
            8 => Step::Exec,
            _ => Step::None,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Step::None => "unknown step",
            Step::Signals => "cannot reset signal handling",
            Step::Cgroup => "cannot join the turn's cgroup",
            Step::ParentDeathSignal => "cannot set the parent-death signal",
            Step::ParentGone => "the broker exited during the spawn",
            Step::ProcessGroup => "cannot start a process group",
            Step::Descriptors => "cannot place inherited descriptors",
            Step::Chdir => "cannot change to /",
            Step::Exec => "cannot execute",
        }
    }
}

/// Everything the child reads, prepared (allocated) by the parent: the child
/// shares the parent's memory and must never allocate, since another thread
/// of the broker may hold the allocator's lock at the moment of the clone.
struct Plan<'a> {
    program: CString,
    argv: Vec<*const c_char>,
    envp: [*const c_char; 1],
    /// (source, target) pairs, stdio first (at most [`MAX_FDS`]).
    fds: &'a [(RawFd, RawFd)],
    procs: Vec<RawFd>,
    parent: Pid,
    sigrtmax: i32,
    /// Written by the child if a step fails: (step, errno).
    failed_step: AtomicI32,
    failed_errno: AtomicI32,
}

/// A spawned process: its pid (reserved until it is reaped) and the broker's
/// ends of its stdio pipes.
#[derive(Debug)]
pub struct Child {
    pid: i32,
    pidfd: Option<AsyncFd<OwnedFd>>,
    status: Option<ExitStatus>,
    /// The launcher's socket and the program it was asked to run, for a
    /// child started by a [`Launcher`].
    launch_report: Option<(OwnedFd, std::path::PathBuf)>,
    pub stdin: Option<pipe::Sender>,
    pub stdout: Option<pipe::Receiver>,
    pub stderr: Option<pipe::Receiver>,
}

/// Spawns `program` with `args`, an empty environment, cwd `/`, its own
/// process group, the parent-death signal SIGKILL, the cgroups and
/// descriptors of `setup`, and the stdio of `stdio`. Must be called within a
/// tokio runtime (the child is waited for through the reactor).
pub fn spawn(
    program: &Path,
    args: &[&OsStr],
    stdio: Stdio,
    setup: ChildSetup,
) -> io::Result<Child> {
    let cstring = |s: &OsStr| {
        CString::new(s.as_bytes()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("NUL byte in argument {:?}", s),
            )
        })
    };
    let program_c = cstring(program.as_os_str())?;
    let mut strings = vec![program_c.clone()];
    for a in args {
        strings.push(cstring(a)?);
    }

    let fds = Descriptors::new(stdio, &setup.fds)?;
    let mut argv: Vec<*const c_char> = strings.iter().map(|s| s.as_ptr()).collect();
    argv.push(std::ptr::null());
    let plan = Plan {
        program: program_c,
        argv,
        envp: [std::ptr::null()],
        fds: &fds.pairs,
        procs: setup.cgroup_procs.iter().map(|f| f.as_raw_fd()).collect(),
        parent: nix::unistd::getpid(),
        sigrtmax: libc::SIGRTMAX(),
        failed_step: AtomicI32::new(Step::None as i32),
        failed_errno: AtomicI32::new(0),
    };
    let pid = clone_and_exec(&plan)?;
    let step = Step::from_raw(plan.failed_step.load(Ordering::Acquire));
    let errno = Errno::from_raw(plan.failed_errno.load(Ordering::Acquire));
    drop(plan);
    // `strings` and the child's ends (in `fds` and `setup`) stay alive up to
    // here: the child has exec'd or exited by now, so the broker's copies
    // can go.
    let (stdin, stdout, stderr) = fds.hand_over();
    drop((strings, setup));

    if step != Step::None {
        // The child exited right after recording the failure: reap it now.
        reap_blocking(pid);
        let what = match step {
            Step::Exec => format!("{} {}", step.describe(), program.display()),
            _ => step.describe().to_string(),
        };
        return Err(errno_error(&what, errno));
    }

    let mut child = Child {
        pid,
        pidfd: None,
        status: None,
        launch_report: None,
        stdin: None,
        stdout: None,
        stderr: None,
    };
    // From here on, dropping `child` kills and reaps the process.
    child.pidfd = Some(watch(pidfd_open(pid)?)?);
    child.attach(stdin, stdout, stderr)?;
    Ok(child)
}

/// The descriptors a child gets: (source, target) pairs, stdio first; the
/// child's ends the broker holds until the exec; the broker's stdio ends.
struct Descriptors {
    pairs: Vec<(RawFd, RawFd)>,
    held: Vec<OwnedFd>,
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
}

impl Descriptors {
    /// Closes the broker's copies of the child's ends (once the child has
    /// its own) and returns the broker's stdio ends.
    fn hand_over(self) -> (Option<OwnedFd>, Option<OwnedFd>, Option<OwnedFd>) {
        drop(self.held);
        (self.stdin, self.stdout, self.stderr)
    }

    fn new(stdio: Stdio, extra: &[(OwnedFd, RawFd)]) -> io::Result<Descriptors> {
        let mut d = Descriptors {
            pairs: Vec::new(),
            held: Vec::new(),
            stdin: None,
            stdout: None,
            stderr: None,
        };
        match stdio {
            Stdio::Piped => {
                let cloexec = nix::fcntl::OFlag::O_CLOEXEC;
                let (r, w) = nix::unistd::pipe2(cloexec)?;
                d.pairs.push((r.as_raw_fd(), 0));
                d.held.push(r);
                d.stdin = Some(w);
                let (r, w) = nix::unistd::pipe2(cloexec)?;
                d.pairs.push((w.as_raw_fd(), 1));
                d.held.push(w);
                d.stdout = Some(r);
                let (r, w) = nix::unistd::pipe2(cloexec)?;
                d.pairs.push((w.as_raw_fd(), 2));
                d.held.push(w);
                d.stderr = Some(r);
            }
            Stdio::Null => {
                let null: OwnedFd = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/null")?
                    .into();
                for target in 0..3 {
                    d.pairs.push((null.as_raw_fd(), target));
                }
                d.held.push(null);
            }
        }
        d.pairs
            .extend(extra.iter().map(|(f, t)| (f.as_raw_fd(), *t)));
        if d.pairs.len() > MAX_FDS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("at most {MAX_FDS} inherited descriptors"),
            ));
        }
        Ok(d)
    }
}

/// Why a [`Launcher`] did not run the program.
#[derive(Debug)]
pub enum LaunchError {
    /// The launcher could not take the request (it is gone): nothing ran,
    /// and the caller may [`spawn`] the program instead.
    Unusable(io::Error),
    /// The launcher took the request and failed (e.g. exec failed), as a
    /// spawn would have.
    Failed(io::Error),
}

/// A `turnstile-shim --launcher` process made ahead of a turn (see
/// `turnstile_shim::launch`): already in its cgroup, waiting for one
/// request, which it execs in place. The launcher's pid becomes the
/// program's, with everything [`spawn`] sets up.
#[derive(Debug)]
pub struct Launcher {
    child: Child,
    sock: OwnedFd,
}

impl Launcher {
    /// Starts `shim --launcher` in the cgroups of `cgroup_procs` (the join,
    /// and its possible wait for the kernel, happen now).
    pub fn start(shim: &Path, cgroup_procs: Vec<OwnedFd>) -> io::Result<Launcher> {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        let child = spawn(
            shim,
            &[OsStr::new("--launcher")],
            Stdio::Null,
            ChildSetup {
                fds: vec![(theirs, turnstile_shim::LAUNCH_FD)],
                cgroup_procs,
            },
        )?;
        Ok(Launcher { child, sock: ours })
    }

    /// The launcher's pid.
    pub fn id(&self) -> i32 {
        self.child.id()
    }

    /// Runs `program` in the launcher: the same contract as [`spawn`],
    /// except that `setup.cgroup_procs` is not used (the launcher is in its
    /// cgroups already), the descriptors of `setup` are copied, not taken,
    /// and an exec failure is not returned here (the launcher reports it
    /// and exits; see [`Child::launch_failure`]).
    pub fn launch(
        mut self,
        program: &Path,
        args: &[&OsStr],
        stdio: Stdio,
        setup: &ChildSetup,
    ) -> Result<Child, LaunchError> {
        use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
        match self.child.try_wait() {
            Ok(None) => {}
            Ok(Some(status)) => {
                return Err(LaunchError::Unusable(io::Error::other(format!(
                    "launcher exited ({status})"
                ))));
            }
            Err(e) => return Err(LaunchError::Unusable(e)),
        }
        let fds = Descriptors::new(stdio, &setup.fds).map_err(LaunchError::Unusable)?;
        let mut argv: Vec<&[u8]> = vec![program.as_os_str().as_bytes()];
        argv.extend(args.iter().map(|a| a.as_bytes()));
        let targets: Vec<RawFd> = fds.pairs.iter().map(|p| p.1).collect();
        let sources: Vec<RawFd> = fds.pairs.iter().map(|p| p.0).collect();
        let request = turnstile_shim::launch::encode(&targets, &argv).ok_or_else(|| {
            LaunchError::Unusable(io::Error::new(
                io::ErrorKind::InvalidInput,
                "launch request over its caps or with a NUL byte",
            ))
        })?;
        let sent = sendmsg::<()>(
            self.sock.as_raw_fd(),
            &[io::IoSlice::new(&request)],
            &[ControlMessage::ScmRights(&sources)],
            MsgFlags::MSG_NOSIGNAL,
            None,
        );
        if let Err(e) = sent {
            return Err(LaunchError::Unusable(e.into()));
        }
        // The launcher has its copies; the broker's copies of the child's
        // ends go now, so that EOF on them means the child's side is gone.
        let (stdin, stdout, stderr) = fds.hand_over();
        // Not waited for: the exec goes on while the broker does its own
        // work, and a failed one shows as the child exiting before its
        // handshake, when the caller asks `launch_failure` why.
        self.child.launch_report = Some((self.sock, program.to_path_buf()));
        self.child
            .attach(stdin, stdout, stderr)
            .map_err(LaunchError::Failed)?;
        Ok(self.child)
    }
}

impl Child {
    fn attach(
        &mut self,
        stdin: Option<OwnedFd>,
        stdout: Option<OwnedFd>,
        stderr: Option<OwnedFd>,
    ) -> io::Result<()> {
        self.stdin = stdin.map(pipe::Sender::from_owned_fd).transpose()?;
        self.stdout = stdout.map(pipe::Receiver::from_owned_fd).transpose()?;
        self.stderr = stderr.map(pipe::Receiver::from_owned_fd).transpose()?;
        Ok(())
    }

    /// The child's pid, which is also its process group id.
    pub fn id(&self) -> i32 {
        self.pid
    }

    /// Why a child started by a [`Launcher`] never became its program (the
    /// launcher's report), once it has exited; `None` if it did, or if the
    /// child was spawned directly (a failed [`spawn`] returns its error).
    pub fn launch_failure(&self) -> Option<io::Error> {
        use nix::sys::socket::MsgFlags;
        let (sock, program) = self.launch_report.as_ref()?;
        let mut report = [0u8; 8];
        let n = nix::sys::socket::recv(sock.as_raw_fd(), &mut report, MsgFlags::MSG_DONTWAIT)
            .ok()
            .filter(|n| *n > 0)?;
        let Some(f) = turnstile_shim::launch::Failure::decode(&report[..n]) else {
            return Some(io::Error::other("garbled launcher report"));
        };
        let what = match f.step {
            turnstile_shim::launch::Step::Exec => {
                format!("{} {}", Step::Exec.describe(), program.display())
            }
            step => format!("launcher failed at {step:?}"),
        };
        Some(errno_error(&what, Errno::from_raw(f.errno)))
    }

    /// Reaps the child if it has exited; `None` while it runs.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = try_reap(self.pid)?;
            if self.status.is_some() {
                self.pidfd = None;
            }
        }
        Ok(self.status)
    }

    /// Waits for the child to exit and reaps it. Cancel-safe; returns the
    /// same status again once reaped.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(status) = self.status {
                return Ok(status);
            }
            let Some(pidfd) = &self.pidfd else {
                return Err(io::Error::other("child has no pidfd"));
            };
            let mut ready = pidfd.readable().await?;
            match try_reap(self.pid)? {
                Some(status) => {
                    self.status = Some(status);
                    drop(ready);
                    self.pidfd = None;
                }
                None => ready.clear_ready(),
            }
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        // Not reaped, so the pid is still this child's.
        let _ = nix::sys::signal::kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        if let Ok(Some(_)) = try_reap(self.pid) {
            return;
        }
        // Dying, not yet a zombie: reap it off the caller's thread (rare:
        // only a turn abandoned before its child was waited for).
        let pid = self.pid;
        let pidfd = self.pidfd.take();
        let _ = std::thread::Builder::new()
            .name("turnstile-reap".into())
            .spawn(move || {
                reap_blocking(pid);
                drop(pidfd);
            });
    }
}

/// Clones the child and waits (as vfork does) until it has exec'd or exited.
fn clone_and_exec(plan: &Plan) -> io::Result<i32> {
    let mut stack = vec![0u8; CHILD_STACK];
    // Every signal blocked across the clone: a handler of the broker must
    // never run in the child, which shares the broker's memory. The child
    // resets all handlers, then unblocks.
    let mut old = SigSet::empty();
    pthread_sigmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut old),
    )?;
    let cb = Box::new(|| child_main(plan));
    // SAFETY: CLONE_VM | CLONE_VFORK is the posix_spawn pattern. The child
    // runs on `stack` (its own), only reads `plan` (prepared above, alive
    // until this function returns) and writes its two atomics; it makes
    // async-signal-safe syscalls only, never allocates, takes no lock and
    // never returns into the parent's frames: it ends in execve or _exit
    // (the return of the callback). The calling thread is suspended until
    // then, so `plan` and `stack` outlive the child's use of them. SIGCHLD
    // as the exit signal makes it an ordinary child for waitpid.
    #[allow(unsafe_code)]
    let pid = unsafe {
        nix::sched::clone(
            cb,
            &mut stack,
            nix::sched::CloneFlags::CLONE_VM | nix::sched::CloneFlags::CLONE_VFORK,
            Some(libc::SIGCHLD),
        )
    };
    let restored = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    let pid = pid?;
    if let Err(e) = restored {
        // Cannot happen with a valid mask; never leave a child unowned.
        let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
        reap_blocking(pid.as_raw());
        return Err(e.into());
    }
    Ok(pid.as_raw())
}

/// The child, between clone and exec. Async-signal-safe calls only, no
/// allocation; a failure is recorded in `plan` and ends the child.
fn child_main(plan: &Plan) -> isize {
    let (step, errno) = match child_steps(plan) {
        Ok(never) => match never {},
        Err(failure) => failure,
    };
    plan.failed_errno.store(errno as i32, Ordering::Release);
    plan.failed_step.store(step as i32, Ordering::Release);
    127
}

fn child_steps(plan: &Plan) -> Result<std::convert::Infallible, (Step, Errno)> {
    use nix::fcntl::{FcntlArg, fcntl};
    // 1. Default dispositions (SIGPIPE included, which the broker ignores);
    //    the mask stays full until the exec.
    for sig in 1..=plan.sigrtmax {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP || (32..=33).contains(&sig) {
            continue; // 32 and 33 belong to the C library
        }
        // SAFETY: a zeroed sigaction with SIG_DFL (0) is a valid argument;
        // sigaction is async-signal-safe and the child has its own handler
        // table (no CLONE_SIGHAND).
        #[allow(unsafe_code)]
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(sig, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err((Step::Signals, Errno::last()));
        }
    }
    // 2. The parent-death signal, then a re-check of the parent: the signal
    //    fires when the *thread* that cloned exits, and the parent may already
    //    be gone before the prctl took effect. First, so that a broker killed
    //    now takes this child with it as soon as possible (it holds copies of
    //    the broker's descriptors, the state dir's lock among them, until its
    //    exec).
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(|e| (Step::ParentDeathSignal, e))?;
    if nix::unistd::getppid() != plan.parent {
        return Err((Step::ParentGone, Errno::ESRCH));
    }
    // 3. The turn's cgroups, before anything the child forks later (nsjail,
    //    the shim, the agent), so that all of it is counted and killable as
    //    one. The join may wait for the kernel (an RCU grace period).
    for &fd in &plan.procs {
        write_all_raw(fd, b"0").map_err(|e| (Step::Cgroup, e))?;
    }
    // 4. Own process group, so a group kill reaches every process that did
    //    not leave it.
    nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0))
        .map_err(|e| (Step::ProcessGroup, e))?;
    // 5. Descriptors into place, via high numbers first so that one target
    //    never overwrites a later source; dup2 clears FD_CLOEXEC on exactly
    //    the targets.
    let fds = plan.fds;
    let mut high = [0 as RawFd; MAX_FDS];
    for (i, &(src, _)) in fds.iter().enumerate() {
        high[i] = fcntl(borrow(src), FcntlArg::F_DUPFD_CLOEXEC(64))
            .map_err(|e| (Step::Descriptors, e))?;
    }
    for (i, &(_, target)) in fds.iter().enumerate() {
        // SAFETY: dup2 on descriptors open in this process.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::dup2(high[i], target) };
        if rc < 0 {
            return Err((Step::Descriptors, Errno::last()));
        }
    }
    // SAFETY: chdir with a NUL-terminated literal.
    #[allow(unsafe_code)]
    if unsafe { libc::chdir(c"/".as_ptr()) } != 0 {
        return Err((Step::Chdir, Errno::last()));
    }
    // 6. An empty mask for the new program, then exec.
    let empty = SigSet::empty();
    pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&empty), None).map_err(|e| (Step::Signals, e))?;
    // SAFETY: `program`, `argv` and `envp` are NUL-terminated C strings and
    // NULL-terminated pointer arrays, prepared by the parent and alive until
    // the parent resumes (after this exec).
    #[allow(unsafe_code)]
    unsafe {
        libc::execve(
            plan.program.as_ptr(),
            plan.argv.as_ptr(),
            plan.envp.as_ptr(),
        );
    }
    Err((Step::Exec, Errno::last()))
}

fn borrow(fd: RawFd) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: only used in the child on descriptors the parent holds open
    // (and keeps open) until the child has exec'd or exited.
    #[allow(unsafe_code)]
    unsafe {
        std::os::fd::BorrowedFd::borrow_raw(fd)
    }
}

fn write_all_raw(fd: RawFd, mut buf: &[u8]) -> Result<(), Errno> {
    while !buf.is_empty() {
        match nix::unistd::write(borrow(fd), buf) {
            Ok(n) => buf = &buf[n..],
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new
    // descriptor or -1; nothing is borrowed.
    #[allow(unsafe_code)]
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("pidfd_open (Linux 5.3 or later): {e}"),
        ));
    }
    // SAFETY: `fd` was just returned by the kernel and is owned by no one else.
    #[allow(unsafe_code)]
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// "`what`: `strerror(errno)`", of the errno's kind.
fn errno_error(what: &str, errno: Errno) -> io::Error {
    io::Error::new(
        io::Error::from(errno).kind(),
        format!("{what}: {}", errno.desc()),
    )
}

/// Registers a pidfd with the reactor: readable once the process exits.
fn watch(pidfd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is a valid open descriptor that stays the same for
    // as long as it is owned, here by the AsyncFd.
    #[allow(unsafe_code)]
    let fd = unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) };
    Ok(fd?)
}

/// Reaps `pid` if it has exited; `None` if it is still running.
fn try_reap(pid: i32) -> io::Result<Option<ExitStatus>> {
    wait_raw(pid, libc::WNOHANG)
}

fn reap_blocking(pid: i32) {
    let _ = wait_raw(pid, 0);
}

fn wait_raw(pid: i32, flags: i32) -> io::Result<Option<ExitStatus>> {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into a local int.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::waitpid(pid, &mut status, flags) };
        match rc {
            0 => return Ok(None),
            r if r == pid => return Ok(Some(ExitStatus::from_raw(status))),
            _ => {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINTR) {
                    return Err(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn read_all(r: Option<pipe::Receiver>) -> String {
        let mut out = String::new();
        r.expect("pipe")
            .read_to_string(&mut out)
            .await
            .expect("read");
        out
    }

    #[tokio::test]
    async fn pipes_descriptors_and_status() {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        let setup = ChildSetup {
            fds: vec![(w, 5)],
            cgroup_procs: vec![],
        };
        let script = "read line; echo \"out:$line\"; echo err >&2; echo five >&5; \
                      read -r _ _ _ _ pgrp _ < /proc/$$/stat; \
                      echo \"pgid:$pgrp pid:$$ cwd:$(pwd) home:${HOME:-none}\"; exit 3";
        let mut child = spawn(
            Path::new("/bin/sh"),
            &[OsStr::new("-c"), OsStr::new(script)],
            Stdio::Piped,
            setup,
        )
        .expect("spawn");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"hello\n").await.expect("write");
        drop(stdin);
        let out = read_all(child.stdout.take()).await;
        let err = read_all(child.stderr.take()).await;
        let status = child.wait().await.expect("wait");
        assert_eq!(status.code(), Some(3));
        assert_eq!(child.wait().await.expect("again").code(), Some(3));
        let pid = child.id();
        let mut lines = out.lines();
        assert_eq!(lines.next(), Some("out:hello"));
        // Own process group, cwd /, nothing of the broker's environment.
        assert_eq!(
            lines.next(),
            Some(format!("pgid:{pid} pid:{pid} cwd:/ home:none").as_str())
        );
        assert_eq!(err, "err\n");
        let five = read_all(Some(pipe::Receiver::from_owned_fd(r).expect("pipe"))).await;
        assert_eq!(five, "five\n");
    }

    #[tokio::test]
    async fn a_missing_program_is_an_error_and_no_child_is_left() {
        let err = spawn(
            Path::new("/nonexistent/turnstile-test"),
            &[],
            Stdio::Null,
            ChildSetup::default(),
        )
        .expect_err("spawned a missing program");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(
            err.to_string()
                .contains("cannot execute /nonexistent/turnstile-test"),
            "{err}"
        );
        // The failed child was reaped: this thread (which cloned it; the
        // test runtime is single-threaded) has no child left, not even a
        // zombie.
        let children = std::fs::read_to_string(format!(
            "/proc/self/task/{}/children",
            nix::unistd::gettid()
        ))
        .expect("children");
        assert_eq!(children.trim(), "");
    }

    #[tokio::test]
    async fn a_dropped_child_is_killed() {
        let child = spawn(
            Path::new("/bin/sleep"),
            &[OsStr::new("1000")],
            Stdio::Null,
            ChildSetup::default(),
        )
        .expect("spawn");
        let pid = Pid::from_raw(child.id());
        let pidfd = pidfd_open(child.id()).expect("pidfd");
        drop(child);
        // The pidfd turns readable once the process has exited (a sleep of
        // 1000 s would not have by itself).
        let fd = watch(pidfd).expect("asyncfd");
        let _ = fd.readable().await.expect("readable");
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            state.is_empty() || state.contains(") Z "),
            "still alive: {state}"
        );
    }

    #[tokio::test]
    async fn signal_handling_starts_clean() {
        // SIGPIPE is ignored by Rust programs; the child must see it default.
        let mut child = spawn(
            Path::new("/bin/sh"),
            &[
                OsStr::new("-c"),
                OsStr::new("grep -E '^Sig(Ign|Blk)' /proc/self/status"),
            ],
            Stdio::Piped,
            ChildSetup::default(),
        )
        .expect("spawn");
        let out = read_all(child.stdout.take()).await;
        child.wait().await.expect("wait");
        // Signals 32 and 33 belong to the C library, which refuses to change
        // them; an ignored one stays ignored across exec (as with std).
        const LIBC_INTERNAL: u64 = 0b11 << 31;
        for line in out.lines() {
            let hex = line.split_whitespace().nth(1).expect("mask");
            let mask = u64::from_str_radix(hex, 16).expect("hex");
            assert_eq!(mask & !LIBC_INTERNAL, 0, "child starts with {line}");
        }
        assert_eq!(out.lines().count(), 2, "{out}");
    }
}
