//! Every syscall the shim makes, in one place.
//!
//! Each helper's doc says whether it may run in the agent's child between
//! its clone and `execve` ("child-safe": async-signal-safe, no allocation, no
//! panic) or only in the shim itself ("shim only"). `unsafe` is allowed in
//! this module alone; every block says why it is sound.
#![allow(unsafe_code)]

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::{self, Pid};
use std::ffi::{CString, c_char};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use turnstile_shim::{AgentStatus, CONTROL_FD, INIT_FD, InitPayload, Usage};

/// The signals the shim takes synchronously in its wait loop.
const HANDLED: [Signal; 5] = [
    Signal::SIGCHLD,
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
];

/// Stack of the agent's child between clone and exec (a few frames of
/// syscall wrappers).
const CHILD_STACK: usize = 64 * 1024;

/// The child's stack: fresh anonymous pages (only the few the child touches
/// count towards the shim's memory) above a guard page, so that an overflow
/// faults instead of writing over the shim's heap.
struct ChildStack {
    base: std::ptr::NonNull<libc::c_void>,
    len: usize,
}

impl ChildStack {
    const GUARD: usize = 4096;

    fn new() -> Result<ChildStack, Errno> {
        use nix::sys::mman::{MapFlags, ProtFlags, mmap_anonymous, mprotect};
        let len = CHILD_STACK + Self::GUARD;
        let size = std::num::NonZeroUsize::new(len).ok_or(Errno::EINVAL)?;
        // SAFETY: a new private anonymous mapping; nothing else refers to it.
        let base = unsafe {
            mmap_anonymous(
                None,
                size,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE | MapFlags::MAP_STACK,
            )?
        };
        let stack = ChildStack { base, len };
        // SAFETY: the first page of the mapping made above, which no slice
        // handed out ever covers.
        unsafe { mprotect(base, Self::GUARD, ProtFlags::PROT_NONE)? };
        Ok(stack)
    }

    /// The usable part, above the guard page.
    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes, readable and writable past the
        // guard page, owned by `self` and alive as long as the borrow.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.base.as_ptr().cast::<u8>().add(Self::GUARD),
                self.len - Self::GUARD,
            )
        }
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`, no longer used
        // (the child has exec'd or exited before `spawn` returns).
        let _ = unsafe { nix::sys::mman::munmap(self.base, self.len) };
    }
}

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
    // SAFETY: getuid and getgid cannot fail and touch no memory.
    unsafe { (libc::getuid(), libc::getgid()) }
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

// ------------------------------------------------------------------ spawn --

/// Everything the child touches between its clone and `execve`, built
/// before: the child must not allocate (it shares the shim's memory, and
/// another thread may hold the malloc lock), so strings are C strings ready
/// to pass.
#[derive(Debug)]
pub struct ExecPlan {
    argv: Vec<CString>,
    envp: Vec<CString>,
    /// Paths to try with `execve`, in order (`execvpe` over the agent's PATH).
    candidates: Vec<CString>,
    cwd: CString,
    rlimits: Vec<(Resource, u64)>,
    /// Direct mode: own process group, parent-death signal.
    direct: bool,
}

impl ExecPlan {
    /// Checks that every string can become a C string and lays out argv,
    /// the environment (exactly the payload's, in order) and the PATH
    /// candidates for `argv[0]`.
    pub fn new(payload: &InitPayload) -> Result<Self, String> {
        let cstr = |what: &str, s: &str| {
            CString::new(s).map_err(|_| format!("init payload {what} contains a NUL byte"))
        };
        let argv = payload
            .argv
            .iter()
            .map(|a| cstr("argv", a))
            .collect::<Result<Vec<_>, _>>()?;
        let envp = env_entries(&payload.env)?
            .iter()
            .map(|e| cstr("env", e))
            .collect::<Result<Vec<_>, _>>()?;
        // The bridge's variables are set later (`set_env`), once its port is
        // known; their names are checked now, before the self-check.
        if let Some(llm) = &payload.llm {
            for key in &llm.env_vars {
                check_env_key(key)?;
                cstr("llm env var", key)?;
            }
        }
        let argv0 = payload.argv.first().map(String::as_str).unwrap_or_default();
        let path = payload
            .env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.as_str());
        let candidates = exec_candidates(argv0, path)
            .iter()
            .map(|c| cstr("argv[0]", c))
            .collect::<Result<Vec<_>, _>>()?;
        let r = &payload.rlimits;
        let rlimits = [
            (Resource::RLIMIT_CPU, r.cpu_seconds),
            (Resource::RLIMIT_NOFILE, r.open_files),
            (Resource::RLIMIT_FSIZE, r.file_size_bytes),
            (Resource::RLIMIT_AS, r.address_space_bytes),
            (Resource::RLIMIT_NPROC, r.processes),
        ]
        .into_iter()
        .filter_map(|(res, v)| v.map(|v| (res, v)))
        .collect();
        Ok(ExecPlan {
            argv,
            envp,
            candidates,
            cwd: cstr("cwd", &payload.cwd)?,
            rlimits,
            direct: payload.mode == turnstile_shim::Mode::Direct,
        })
    }

    /// Sets `key=value` in the agent's environment: replaces the first entry
    /// with that key in place (dropping any later duplicate), or appends it.
    /// Shim only, before the clone. The PATH candidates for `argv[0]` stay
    /// the ones computed from the payload's PATH.
    pub fn set_env(&mut self, key: &str, value: &str) -> Result<(), String> {
        check_env_key(key)?;
        let entry = CString::new(format!("{key}={value}"))
            .map_err(|_| format!("environment entry {key} contains a NUL byte"))?;
        let mut entry = Some(entry);
        let prefix = format!("{key}=");
        self.envp.retain_mut(|e| {
            if !e.as_bytes().starts_with(prefix.as_bytes()) {
                return true;
            }
            match entry.take() {
                Some(new) => {
                    *e = new;
                    true
                }
                None => false,
            }
        });
        if let Some(new) = entry {
            self.envp.push(new);
        }
        Ok(())
    }

    /// The name of the `i`th limit applied, for error messages.
    pub fn rlimit_name(&self, i: usize) -> &'static str {
        match self.rlimits.get(i).map(|(res, _)| *res) {
            Some(Resource::RLIMIT_CPU) => "cpu",
            Some(Resource::RLIMIT_NOFILE) => "open files",
            Some(Resource::RLIMIT_FSIZE) => "file size",
            Some(Resource::RLIMIT_AS) => "address space",
            Some(Resource::RLIMIT_NPROC) => "processes",
            _ => "resource",
        }
    }
}

/// `KEY=VALUE` strings of the agent's environment; refuses keys that would
/// make the environment ambiguous.
pub fn env_entries(env: &[(String, String)]) -> Result<Vec<String>, String> {
    env.iter()
        .map(|(k, v)| check_env_key(k).map(|()| format!("{k}={v}")))
        .collect()
}

/// An environment key must be non-empty and free of `=`.
fn check_env_key(k: &str) -> Result<(), String> {
    if k.is_empty() || k.contains('=') {
        Err(format!("init payload has an invalid env key {k:?}"))
    } else {
        Ok(())
    }
}

/// The paths `execvpe` would try for `name`: the name itself if it has a
/// slash, else each PATH entry joined with it (glibc's default PATH when the
/// agent has none; an empty entry is the working directory).
pub fn exec_candidates(name: &str, path: Option<&str>) -> Vec<String> {
    if name.contains('/') {
        return vec![name.to_string()];
    }
    path.unwrap_or("/bin:/usr/bin")
        .split(':')
        .map(|dir| {
            if dir.is_empty() {
                name.to_string()
            } else {
                format!("{dir}/{name}")
            }
        })
        .collect()
}

/// The step of the child's preparation that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Signals,
    ProcessGroup,
    ParentDeathSignal,
    /// Index into the plan's limits (see [`ExecPlan::rlimit_name`]).
    Rlimit(usize),
    Chdir,
    Exec,
}

impl Step {
    fn encode(self) -> (i32, i32) {
        match self {
            Step::Signals => (1, 0),
            Step::ProcessGroup => (2, 0),
            Step::ParentDeathSignal => (3, 0),
            Step::Rlimit(i) => (4, i32::try_from(i).unwrap_or(i32::MAX)),
            Step::Chdir => (5, 0),
            Step::Exec => (6, 0),
        }
    }

    fn decode(code: i32, detail: i32) -> Option<Step> {
        Some(match code {
            1 => Step::Signals,
            2 => Step::ProcessGroup,
            3 => Step::ParentDeathSignal,
            4 => Step::Rlimit(usize::try_from(detail).ok()?),
            5 => Step::Chdir,
            6 => Step::Exec,
            _ => return None,
        })
    }
}

#[derive(Debug)]
pub enum SpawnError {
    /// The shim could not create the error pipe or clone.
    Fork(Errno),
    /// The child reported that `step` failed with `errno`.
    Child { step: Step, errno: Errno },
    /// The child wrote something unreadable on the error pipe.
    Garbled,
}

/// Shim only, and from the main thread: the agent's parent-death signal
/// fires when the thread that cloned it exits. Starts the agent and returns
/// its pid once it has executed.
///
/// The child reports a failed step on a close-on-exec pipe as three
/// native-endian i32 (step, detail, errno): EOF without bytes means the
/// `execve` succeeded. A child that failed is reaped here.
pub fn spawn(plan: &ExecPlan) -> Result<i32, SpawnError> {
    let argv = nul_terminated(&plan.argv);
    let envp = nul_terminated(&plan.envp);
    let (report_r, report_w) = unistd::pipe2(OFlag::O_CLOEXEC).map_err(SpawnError::Fork)?;
    let parent = unistd::getpid();
    // Not fork: a vfork-style clone, as posix_spawn does. The child shares
    // the shim's memory, so no page tables are copied, and the shim waits
    // until the child has exec'd or exited, so the report below is already
    // there. Every signal is blocked across the clone so that no handler of
    // the shim's runtime can run in the child before it resets them.
    let mut stack = ChildStack::new().map_err(SpawnError::Fork)?;
    let mut old = SigSet::empty();
    signal::pthread_sigmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut old),
    )
    .map_err(SpawnError::Fork)?;
    let child = Box::new(|| exec_child(plan, &argv, &envp, &report_w, parent));
    // SAFETY: the child runs `exec_child` only, on its own stack, which makes
    // async-signal-safe calls on data prepared above, never allocates and
    // never returns (it ends in execve or _exit), so sharing the memory of a
    // possibly multi-threaded process is sound; this thread is suspended
    // until then, so everything the child reads outlives its use. SIGCHLD as
    // the exit signal makes it an ordinary child for the wait loop.
    let cloned = unsafe {
        nix::sched::clone(
            child,
            stack.as_mut_slice(),
            nix::sched::CloneFlags::CLONE_VM | nix::sched::CloneFlags::CLONE_VFORK,
            Some(libc::SIGCHLD),
        )
    };
    let restored = signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    let pid = cloned.map_err(SpawnError::Fork)?.as_raw();
    if let Err(e) = restored {
        send_signal(pid, Signal::SIGKILL);
        let _ = reap(pid, true);
        return Err(SpawnError::Fork(e));
    }
    // Our copy of the write end must go, or the read below never sees EOF.
    drop(report_w);
    let mut report = Vec::with_capacity(12);
    let read = File::from(report_r).take(12).read_to_end(&mut report);
    if matches!(read, Ok(0)) {
        return Ok(pid);
    }
    // The child failed before or at execve and is exiting (or, if the pipe
    // itself failed, in an unknown state): make sure it dies, and reap it now
    // so that it never shows up in the wait loop.
    send_signal(pid, Signal::SIGKILL);
    let _ = reap(pid, true);
    if let Err(e) = read {
        return Err(SpawnError::Fork(Errno::from_raw(
            e.raw_os_error().unwrap_or(libc::EIO),
        )));
    }
    let word = |i: usize| {
        report
            .get(i * 4..i * 4 + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(i32::from_ne_bytes)
    };
    match (word(0), word(1), word(2)) {
        (Some(code), Some(detail), Some(errno)) => match Step::decode(code, detail) {
            Some(step) => Err(SpawnError::Child {
                step,
                errno: Errno::from_raw(errno),
            }),
            None => Err(SpawnError::Garbled),
        },
        _ => Err(SpawnError::Garbled),
    }
}

fn nul_terminated(strings: &[CString]) -> Vec<*const c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// Child-safe; runs in the cloned child (which shares the shim's memory)
/// and never returns. The order matters:
/// 1. Signals first: the child inherited the shim's blocked mask and SIGPIPE
///    ignore, which the agent must not keep.
/// 2. Direct mode: own process group before anything can fork, so that one
///    `killpg` reaches every descendant that does not leave it; then the
///    parent-death signal, and only then the parent check, because the shim
///    may have died before the prctl, in which case the signal never comes.
/// 3. Limits after the steps above, which they could otherwise disturb.
/// 4. chdir, then exec over the PATH candidates, reporting the last error.
fn exec_child(
    plan: &ExecPlan,
    argv: &[*const c_char],
    envp: &[*const c_char],
    report: &OwnedFd,
    parent: Pid,
) -> ! {
    if let Err(e) = child_reset_signals() {
        child_fail(report, Step::Signals, e);
    }
    if plan.direct {
        if let Err(e) = unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0)) {
            child_fail(report, Step::ProcessGroup, e);
        }
        if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
            child_fail(report, Step::ParentDeathSignal, e);
        }
        if unistd::getppid() != parent {
            // The shim is gone: nobody to report to, nothing to run for.
            child_exit();
        }
    }
    for (i, &(res, value)) in plan.rlimits.iter().enumerate() {
        // CPU: the kernel sends SIGXCPU at the soft limit and SIGKILL at the
        // hard one; with both equal SIGKILL wins and the cause is lost. One
        // second of headroom lets SIGXCPU arrive first (and an agent that
        // traps it a moment to save its state).
        let hard = if res == Resource::RLIMIT_CPU {
            value.saturating_add(1)
        } else {
            value
        };
        if let Err(e) = setrlimit(res, value, hard) {
            child_fail(report, Step::Rlimit(i), e);
        }
    }
    if let Err(e) = unistd::chdir(plan.cwd.as_c_str()) {
        child_fail(report, Step::Chdir, e);
    }
    child_fail(report, Step::Exec, child_exec(plan, argv, envp))
}

/// Child-safe. Empty signal mask, default action for every signal.
fn child_reset_signals() -> Result<(), Errno> {
    for sig in 1..=64 {
        // SAFETY: a zeroed sigaction with sa_sigaction = SIG_DFL is a valid
        // argument; the pointers are to a local; errors (SIGKILL, SIGSTOP,
        // signals the libc reserves) are expected and ignored.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
    signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
}

/// Child-safe. `execve` each candidate like glibc's `execvpe`: keep going
/// on "not here" errors, remember EACCES, stop on anything else. Returns the
/// error to report (it only returns on failure).
fn child_exec(plan: &ExecPlan, argv: &[*const c_char], envp: &[*const c_char]) -> Errno {
    let mut last = Errno::ENOENT;
    let mut saw_eacces = false;
    for path in &plan.candidates {
        // SAFETY: `path` is a C string, `argv` and `envp` are NUL-terminated
        // arrays of pointers to C strings owned by `plan`, all alive here.
        unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        last = Errno::last();
        match last {
            Errno::EACCES => saw_eacces = true,
            Errno::ENOENT
            | Errno::ENOTDIR
            | Errno::ESTALE
            | Errno::ENODEV
            | Errno::ETIMEDOUT
            | Errno::ENAMETOOLONG => {}
            _ => return last,
        }
    }
    if saw_eacces { Errno::EACCES } else { last }
}

/// Child-safe. Reports a failed step to the shim and exits.
fn child_fail(report: &OwnedFd, step: Step, errno: Errno) -> ! {
    let (code, detail) = step.encode();
    let mut buf = [0u8; 12];
    for (chunk, word) in buf.chunks_exact_mut(4).zip([code, detail, errno as i32]) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    // 12 bytes is under PIPE_BUF: one write, all or nothing.
    let _ = unistd::write(report, &buf);
    child_exit()
}

/// Child-safe. `_exit(127)`, skipping atexit handlers and stdio flushing
/// that belong to the shim.
fn child_exit() -> ! {
    // SAFETY: _exit is async-signal-safe and ends the process at once.
    unsafe { libc::_exit(127) }
}

// ----------------------------------------------------------------- bridge --

/// Shim only (LLM bridge threads). `poll(2)` on `fds` with no timeout,
/// retrying on EINTR; returns how many entries have events.
pub fn poll(fds: &mut [libc::pollfd]) -> io::Result<usize> {
    let n = libc::nfds_t::try_from(fds.len()).map_err(io::Error::other)?;
    loop {
        // SAFETY: `fds` is a live, exclusively borrowed slice of `n` pollfd
        // structs, which the kernel only reads and writes within bounds.
        let got = unsafe { libc::poll(fds.as_mut_ptr(), n, -1) };
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

/// Shim only. Reaps `pid` (any child if -1) with `wait4`: `Ok(None)` when
/// `block` is false and nothing has exited yet. Errors include ECHILD.
pub fn reap(pid: i32, block: bool) -> Result<Option<(i32, AgentStatus, Usage)>, Errno> {
    let mut status = 0;
    // SAFETY: rusage is a plain C struct for which all-zero is valid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let flags = libc::__WALL | if block { 0 } else { libc::WNOHANG };
    // SAFETY: both pointers are to live locals of the right types.
    let got = unsafe { libc::wait4(pid, &mut status, flags, &mut usage) };
    match got {
        -1 => Err(Errno::last()),
        0 => Ok(None),
        got => {
            let status = if libc::WIFSIGNALED(status) {
                AgentStatus::Signal(libc::WTERMSIG(status))
            } else {
                AgentStatus::Code(libc::WEXITSTATUS(status))
            };
            let micros = |t: libc::timeval| {
                u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000
                    + u64::try_from(t.tv_usec).unwrap_or(0)
            };
            let usage = Usage {
                user_cpu_us: micros(usage.ru_utime),
                system_cpu_us: micros(usage.ru_stime),
                max_rss_kib: u64::try_from(usage.ru_maxrss).unwrap_or(0),
            };
            Ok(Some((got, status, usage)))
        }
    }
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
    let high = fcntl(&fd, FcntlArg::F_DUPFD_CLOEXEC(100))?;
    drop(fd);
    // SAFETY: F_DUPFD_CLOEXEC just returned this new descriptor; nothing else
    // owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(high) })
}

/// Launcher only. One `SOCK_SEQPACKET` message and its descriptors (received
/// close-on-exec). `Ok(None)` at EOF; an error if the message or its control
/// data was cut short.
pub fn recv_with_fds(
    sock: &OwnedFd,
    buf: &mut [u8],
    max_fds: usize,
) -> io::Result<Option<(usize, Vec<OwnedFd>)>> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::AsRawFd;
    let mut cmsg = nix::cmsg_space!([RawFd; turnstile_shim::launch::MAX_FDS]);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(Errno::EINTR) => continue,
            other => break other?,
        }
    };
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for fd in raw {
                // SAFETY: SCM_RIGHTS installed these descriptors in this
                // process just now; each is wrapped exactly once.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    let cut = msg
        .flags
        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
    let n = msg.bytes;
    if cut || fds.len() > max_fds {
        return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
    }
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    Ok(Some((n, fds)))
}

/// Launcher only. Puts `fds[i]` at `targets[i]` (close-on-exec cleared),
/// via high numbers first so that one target never overwrites a later
/// source.
pub fn place_fds(fds: Vec<OwnedFd>, targets: &[i32]) -> Result<(), Errno> {
    use std::os::fd::AsRawFd;
    let mut high = Vec::with_capacity(fds.len());
    for fd in &fds {
        let h = fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(100))?;
        // SAFETY: F_DUPFD_CLOEXEC just returned this new descriptor; it is
        // owned here alone (and closed when `high` goes).
        high.push(unsafe { OwnedFd::from_raw_fd(h) });
    }
    drop(fds);
    for (h, &target) in high.iter().zip(targets) {
        // SAFETY: dup2 on a descriptor this process owns onto a small number
        // it means to replace; the old target (if any) is closed by dup2.
        if unsafe { libc::dup2(h.as_raw_fd(), target) } < 0 {
            return Err(Errno::last());
        }
    }
    Ok(())
}

/// Launcher only. Default dispositions and an empty mask for the program
/// about to be exec'd (the Rust runtime ignores SIGPIPE, which exec keeps).
pub fn reset_signals_for_exec() -> Result<(), Errno> {
    child_reset_signals()
}

/// Launcher only. `execve` with an empty environment; returns only on error.
pub fn exec(argv: &[CString]) -> Errno {
    let ptrs = nul_terminated(argv);
    let envp = [std::ptr::null::<c_char>()];
    // SAFETY: `ptrs` is a NULL-terminated array of pointers to the C strings
    // of `argv`, alive across the call; `envp` is an empty NULL-terminated
    // array.
    unsafe { libc::execve(argv[0].as_ptr(), ptrs.as_ptr(), envp.as_ptr()) };
    Errno::last()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_follow_execvp() {
        assert_eq!(exec_candidates("/bin/sh", Some("/x")), ["/bin/sh"]);
        assert_eq!(exec_candidates("./a", None), ["./a"]);
        assert_eq!(
            exec_candidates("claude", Some("/opt/bin::/usr/bin")),
            ["/opt/bin/claude", "claude", "/usr/bin/claude"]
        );
        assert_eq!(exec_candidates("sh", None), ["/bin/sh", "/usr/bin/sh"]);
    }

    #[test]
    fn env_entries_keep_order_and_refuse_bad_keys() {
        let env = vec![
            ("PATH".to_string(), "/bin".to_string()),
            ("A".to_string(), "x=y".to_string()),
        ];
        assert_eq!(env_entries(&env).expect("valid"), ["PATH=/bin", "A=x=y"]);
        assert!(env_entries(&[("A=B".into(), "c".into())]).is_err());
        assert!(env_entries(&[(String::new(), "c".into())]).is_err());
    }

    #[test]
    fn children_and_stat_parse() {
        assert_eq!(parse_children("12 345 6\n"), [12, 345, 6]);
        assert_eq!(parse_children(""), Vec::<i32>::new());
        assert_eq!(parse_stat_ppid("77 (a) b (c)) S 42 77 77 0 -1"), Some(42));
        assert_eq!(parse_stat_ppid("77 (sleep) S 1 2 3"), Some(1));
        assert_eq!(parse_stat_ppid("garbage"), None);
    }

    #[test]
    fn steps_round_trip() {
        for step in [
            Step::Signals,
            Step::ProcessGroup,
            Step::ParentDeathSignal,
            Step::Rlimit(3),
            Step::Chdir,
            Step::Exec,
        ] {
            let (code, detail) = step.encode();
            assert_eq!(Step::decode(code, detail), Some(step));
        }
        assert_eq!(Step::decode(99, 0), None);
    }

    /// A direct-mode payload running `sh` in `/` with `env`.
    fn test_payload(env: Vec<(String, String)>) -> InitPayload {
        InitPayload {
            version: turnstile_shim::PROTOCOL_VERSION,
            mode: turnstile_shim::Mode::Direct,
            session_id: "s".into(),
            turn_id: "t".into(),
            argv: vec!["sh".into()],
            env,
            cwd: "/".into(),
            rlimits: turnstile_shim::Rlimits::default(),
            llm: None,
        }
    }

    #[test]
    fn set_env_replaces_in_place_or_appends() {
        let mut payload = test_payload(vec![
            ("A".into(), "1".into()),
            ("URL".into(), "old".into()),
            ("URLX".into(), "keep".into()),
            ("URL".into(), "dup".into()),
        ]);
        payload.llm = Some(turnstile_shim::LlmBridge {
            port: 0,
            socket_path: "/s".into(),
            env_vars: vec!["URL".into(), "NEW".into()],
        });
        let mut plan = ExecPlan::new(&payload).expect("valid plan");
        plan.set_env("URL", "http://127.0.0.1:9").expect("set");
        plan.set_env("NEW", "http://127.0.0.1:9").expect("set");
        let env: Vec<_> = plan
            .envp
            .iter()
            .map(|e| e.to_str().expect("utf-8"))
            .collect();
        assert_eq!(
            env,
            [
                "A=1",
                "URL=http://127.0.0.1:9",
                "URLX=keep",
                "NEW=http://127.0.0.1:9"
            ]
        );
        assert!(plan.set_env("A=B", "x").is_err());
        for bad in ["", "A=B", "A\0B"] {
            if let Some(llm) = payload.llm.as_mut() {
                llm.env_vars = vec![bad.into()];
            }
            assert!(ExecPlan::new(&payload).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn plan_refuses_nul_bytes() {
        let mut payload = test_payload(vec![("PATH".into(), "/usr/bin:/bin".into())]);
        payload.rlimits.file_size_bytes = Some(10);
        let plan = ExecPlan::new(&payload).expect("valid plan");
        assert_eq!(plan.candidates.len(), 2);
        assert_eq!(plan.rlimit_name(0), "file size");
        payload.argv.push("a\0b".into());
        assert!(ExecPlan::new(&payload).is_err());
    }
}
