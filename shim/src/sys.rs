//! The shim's syscalls as PID 1 of a jail: its signals, its inherited
//! descriptors, the self-check, reaping and killing what is left, the
//! launcher's request socket; and the agent's [`ExecPlan`], which
//! [`spawn`] hands to the one vfork-style spawn of `turnstile-sys` (where
//! the clone, the child's steps and descriptor placement live).
//!
//! Each helper's doc says whether it may run in a child between its clone
//! and `execve` ("child-safe") or only in the shim itself ("shim only").
//! `unsafe` is allowed in this module alone of the shim; every block says
//! why it is sound.
#![allow(unsafe_code)]

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::resource::Resource;
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::{self, Pid};
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use turnstile_shim::{AgentStatus, CONTROL_FD, INIT_FD, InitPayload, Usage};
use turnstile_sys::{ChildPlan, Rlimit, SpawnError};

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
    rlimits: Vec<Rlimit>,
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
        .filter_map(|(resource, v)| v.map(|v| rlimit(resource, v)))
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
        match self.rlimits.get(i).map(|limit| limit.resource) {
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

/// A limit for the agent. CPU: the kernel sends SIGXCPU at the soft limit
/// and SIGKILL at the hard one; with both equal SIGKILL wins and the cause
/// is lost. One second of headroom lets SIGXCPU arrive first (and an agent
/// that traps it a moment to save its state).
fn rlimit(resource: Resource, value: u64) -> Rlimit {
    let hard = if resource == Resource::RLIMIT_CPU {
        value.saturating_add(1)
    } else {
        value
    };
    Rlimit {
        resource,
        soft: value,
        hard,
    }
}

/// Shim only, and from the main thread: the agent's parent-death signal
/// (direct mode) fires when the thread that cloned it exits. Starts the
/// agent with the shim's own stdio and returns its pid once it has
/// executed; a child that failed has been reaped. The steps and their
/// order are [`turnstile_sys::spawn`]'s: signals reset; in direct mode the
/// parent-death signal, then a check that the shim is still there, and a
/// process group of its own, so that one `killpg` reaches every descendant
/// that does not leave it; the limits, after everything they could
/// disturb; the working directory; `execve` over the PATH candidates.
pub fn spawn(plan: &ExecPlan) -> Result<i32, SpawnError> {
    turnstile_sys::spawn(&ChildPlan {
        programs: &plan.candidates,
        argv: &plan.argv,
        envp: &plan.envp,
        parent_death_signal: plan.direct,
        cgroup_procs: &[],
        process_group: plan.direct,
        fds: &[],
        rlimits: &plan.rlimits,
        cwd: &plan.cwd,
    })
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
