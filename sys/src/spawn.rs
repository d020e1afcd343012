//! One vfork-style spawn, for the broker (nsjail, the shim, launchers) and
//! the shim (the agent).
//!
//! `fork()` copies the caller's page tables, and the broker may be large:
//! measured here, `fork` and `exec` cost 0.3 ms from a fresh process and
//! 9 ms at 200 MiB, on every turn start. [`spawn`] does what `posix_spawn`
//! does instead: a `clone(CLONE_VM | CLONE_VFORK)` child that shares the
//! caller's memory, runs a few async-signal-safe steps on its own
//! guard-paged stack and calls `execve`, while the calling thread waits.
//! Its cost does not grow with the caller's size. `posix_spawn` itself
//! cannot be used: it cannot join cgroups, set the parent-death signal or
//! limits, and std's `Command` falls back to `fork` as soon as a `pre_exec`
//! hook is set.
//!
//! What the child does is a [`ChildPlan`], borrowed from the caller; the
//! child reads it and never allocates (another thread of the caller may
//! hold the allocator's lock at the moment of the clone). A step that fails
//! is recorded, with its errno, in memory the parent reads once the child
//! has exited, and comes back as [`SpawnError::Child`]; that child has been
//! reaped by then.
#![allow(unsafe_code)]

use crate::{fd, signals, stack::ChildStack, wait};
use nix::errno::Errno;
use nix::sys::resource::Resource;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use std::ffi::{CStr, CString, c_char};
use std::os::fd::{BorrowedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

/// A resource limit the child sets on itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    pub resource: Resource,
    pub soft: u64,
    pub hard: u64,
}

/// What the child does between its clone and `execve`, in this order (each
/// step says why it stands where it does in [`child_steps`]):
/// default signal dispositions; the parent-death signal and a re-check of
/// the parent; the cgroups; its own process group; the descriptors; the
/// limits; the working directory; an empty signal mask; `execve`.
#[derive(Debug, Clone, Copy)]
pub struct ChildPlan<'a> {
    /// Paths tried with `execve` in order, as `execvpe` tries PATH: on to
    /// the next on "not here" errors, EACCES remembered. One for a fixed
    /// program.
    pub programs: &'a [CString],
    pub argv: &'a [CString],
    /// `KEY=VALUE` entries; empty for an empty environment.
    pub envp: &'a [CString],
    /// SIGKILL when the thread that spawned exits, then a check that the
    /// parent is still there (it may be gone before the prctl took effect).
    pub parent_death_signal: bool,
    /// Open `cgroup.procs` files; the child writes "0" to each to join.
    pub cgroup_procs: &'a [BorrowedFd<'a>],
    /// A process group of its own (its pid becomes the group id).
    pub process_group: bool,
    /// Descriptors to put at fixed numbers (source, target), at most
    /// [`fd::MAX_FDS`]; every other descriptor of the parent must be
    /// close-on-exec.
    pub fds: &'a [(BorrowedFd<'a>, RawFd)],
    pub rlimits: &'a [Rlimit],
    pub cwd: &'a CStr,
}

/// The step of the child's setup that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildStep {
    Signals,
    ParentDeathSignal,
    /// The parent was gone by the time the parent-death signal was set.
    ParentGone,
    Cgroup,
    ProcessGroup,
    Descriptors,
    /// Index into the plan's limits.
    Rlimit(usize),
    Chdir,
    Exec,
}

impl ChildStep {
    /// What failed, as the start of an error message.
    pub fn describe(self) -> &'static str {
        match self {
            ChildStep::Signals => "cannot reset signal handling",
            ChildStep::ParentDeathSignal => "cannot set the parent-death signal",
            ChildStep::ParentGone => "the parent exited during the spawn",
            ChildStep::Cgroup => "cannot join the cgroup",
            ChildStep::ProcessGroup => "cannot start a process group",
            ChildStep::Descriptors => "cannot place inherited descriptors",
            ChildStep::Rlimit(_) => "cannot set a resource limit",
            ChildStep::Chdir => "cannot change directory",
            ChildStep::Exec => "cannot execute",
        }
    }

    /// (code, detail) for the report; code 0 is "no failure".
    fn encode(self) -> (i32, i32) {
        match self {
            ChildStep::Signals => (1, 0),
            ChildStep::ParentDeathSignal => (2, 0),
            ChildStep::ParentGone => (3, 0),
            ChildStep::Cgroup => (4, 0),
            ChildStep::ProcessGroup => (5, 0),
            ChildStep::Descriptors => (6, 0),
            ChildStep::Rlimit(i) => (7, i32::try_from(i).unwrap_or(i32::MAX)),
            ChildStep::Chdir => (8, 0),
            ChildStep::Exec => (9, 0),
        }
    }

    fn decode(code: i32, detail: i32) -> Option<ChildStep> {
        Some(match code {
            1 => ChildStep::Signals,
            2 => ChildStep::ParentDeathSignal,
            3 => ChildStep::ParentGone,
            4 => ChildStep::Cgroup,
            5 => ChildStep::ProcessGroup,
            6 => ChildStep::Descriptors,
            7 => ChildStep::Rlimit(usize::try_from(detail).ok()?),
            8 => ChildStep::Chdir,
            9 => ChildStep::Exec,
            _ => return None,
        })
    }
}

/// Why [`spawn`] returned no child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpawnError {
    /// The parent could not prepare or clone the child (nothing ran, or
    /// what did was killed and reaped).
    Clone(Errno),
    /// The child failed at `step` with `errno`, and was reaped.
    Child { step: ChildStep, errno: Errno },
}

impl SpawnError {
    pub fn errno(self) -> Errno {
        match self {
            SpawnError::Clone(e) | SpawnError::Child { errno: e, .. } => e,
        }
    }
}

impl std::fmt::Display for SpawnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpawnError::Clone(e) => write!(f, "cannot clone: {}", e.desc()),
            SpawnError::Child { step, errno } => write!(f, "{}: {}", step.describe(), errno.desc()),
        }
    }
}

impl std::error::Error for SpawnError {}

/// The failure report: written by the child (which shares the parent's
/// memory) before it exits, read by the parent once it has.
#[derive(Debug, Default)]
struct Report {
    code: AtomicI32,
    detail: AtomicI32,
    errno: AtomicI32,
}

impl Report {
    /// Child-safe.
    fn record(&self, step: ChildStep, errno: Errno) {
        let (code, detail) = step.encode();
        self.detail.store(detail, Ordering::Relaxed);
        self.errno.store(errno as i32, Ordering::Relaxed);
        self.code.store(code, Ordering::Release);
    }

    fn failure(&self) -> Option<(ChildStep, Errno)> {
        let code = self.code.load(Ordering::Acquire);
        if code == 0 {
            return None;
        }
        let step =
            ChildStep::decode(code, self.detail.load(Ordering::Relaxed)).unwrap_or(ChildStep::Exec);
        Some((step, Errno::from_raw(self.errno.load(Ordering::Relaxed))))
    }
}

/// Everything the child reads: the plan and the pointer arrays `execve`
/// takes, built by the parent.
struct Prepared<'a> {
    plan: &'a ChildPlan<'a>,
    argv: Vec<*const c_char>,
    envp: Vec<*const c_char>,
    parent: Pid,
    report: Report,
}

/// Spawns the child `plan` describes and returns its pid once it has
/// exec'd. The child is the caller's own (SIGCHLD on exit); the caller
/// reaps it. Call it from a thread that outlives the child when the plan
/// sets the parent-death signal: it fires when this *thread* exits.
pub fn spawn(plan: &ChildPlan<'_>) -> Result<i32, SpawnError> {
    if plan.fds.len() > fd::MAX_FDS || plan.programs.is_empty() || plan.argv.is_empty() {
        return Err(SpawnError::Clone(Errno::EINVAL));
    }
    let prepared = Prepared {
        plan,
        argv: nul_terminated(plan.argv),
        envp: nul_terminated(plan.envp),
        parent: nix::unistd::getpid(),
        report: Report::default(),
    };
    let mut stack = ChildStack::new().map_err(SpawnError::Clone)?;
    let blocked = signals::block_all().map_err(SpawnError::Clone)?;
    let child = Box::new(|| child_main(&prepared));
    // SAFETY: CLONE_VM | CLONE_VFORK is the posix_spawn pattern. The child
    // runs on `stack` (its own, above a guard page), only reads `prepared`
    // (built above, alive until this function returns) and writes its
    // report's atomics; it makes async-signal-safe syscalls only, never
    // allocates, takes no lock and never returns into the parent's frames:
    // it ends in execve or exits (the return of the callback). The calling
    // thread is suspended until then, so everything the child uses outlives
    // its use. Every signal is blocked, so no handler of the parent runs in
    // the child before it resets them. SIGCHLD as the exit signal makes it
    // an ordinary child for waitpid.
    let cloned = unsafe {
        nix::sched::clone(
            child,
            stack.as_mut_slice(),
            nix::sched::CloneFlags::CLONE_VM | nix::sched::CloneFlags::CLONE_VFORK,
            Some(libc::SIGCHLD),
        )
    };
    let restored = blocked.restore();
    let pid = cloned.map_err(SpawnError::Clone)?.as_raw();
    if let Err(e) = restored {
        // Cannot happen with a valid mask; never leave a child unowned.
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        let _ = wait::reap(pid, true);
        return Err(SpawnError::Clone(e));
    }
    if let Some((step, errno)) = prepared.report.failure() {
        // The child exited right after recording its failure.
        let _ = wait::reap(pid, true);
        return Err(SpawnError::Child { step, errno });
    }
    Ok(pid)
}

fn nul_terminated(strings: &[CString]) -> Vec<*const c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// The child, between clone and exec: a failure is recorded and ends it.
fn child_main(p: &Prepared<'_>) -> isize {
    let Err((step, errno)) = child_steps(p);
    p.report.record(step, errno);
    127
}

/// Child-safe. The steps of [`ChildPlan`]; returns only on failure.
fn child_steps(p: &Prepared<'_>) -> Result<std::convert::Infallible, (ChildStep, Errno)> {
    let plan = p.plan;
    let at = |step: ChildStep| move |e: Errno| (step, e);
    // 1. Default dispositions first: the child inherited the parent's
    //    handlers, which must never run here; the mask stays full (as the
    //    parent set it for the clone) until the exec.
    signals::default_dispositions().map_err(at(ChildStep::Signals))?;
    // 2. The parent-death signal, then a re-check of the parent: the signal
    //    fires when the *thread* that cloned exits, and the parent may be
    //    gone before the prctl took effect, in which case it never comes.
    //    Early, so that a parent killed now takes this child with it (the
    //    child holds copies of the parent's descriptors, the broker's state
    //    dir lock among them, until its exec).
    if plan.parent_death_signal {
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
            .map_err(at(ChildStep::ParentDeathSignal))?;
        if nix::unistd::getppid() != p.parent {
            return Err((ChildStep::ParentGone, Errno::ESRCH));
        }
    }
    // 3. The cgroups, before anything the child forks later, so that all of
    //    it is counted and killable as one. The join may wait for the kernel
    //    (an RCU grace period).
    for &procs in plan.cgroup_procs {
        write_all(procs, b"0").map_err(at(ChildStep::Cgroup))?;
    }
    // 4. Its own process group before anything can fork, so that one
    //    `killpg` reaches every descendant that does not leave it.
    if plan.process_group {
        nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0))
            .map_err(at(ChildStep::ProcessGroup))?;
    }
    // 5. Descriptors before the limits: a low open-files limit would refuse
    //    the high copies that placing them takes.
    fd::place(plan.fds).map_err(at(ChildStep::Descriptors))?;
    // 6. Limits last of what the kernel checks against them, so that none
    //    of the steps above is refused by the program's own limits.
    for (i, limit) in plan.rlimits.iter().enumerate() {
        nix::sys::resource::setrlimit(limit.resource, limit.soft, limit.hard)
            .map_err(at(ChildStep::Rlimit(i)))?;
    }
    nix::unistd::chdir(plan.cwd).map_err(at(ChildStep::Chdir))?;
    // 7. An empty mask for the new program, then exec.
    signals::unblock_all().map_err(at(ChildStep::Signals))?;
    Err((ChildStep::Exec, exec_first(plan.programs, &p.argv, &p.envp)))
}

/// Child-safe. Writes all of `buf`, retrying on EINTR.
fn write_all(fd: BorrowedFd<'_>, mut buf: &[u8]) -> Result<(), Errno> {
    while !buf.is_empty() {
        match nix::unistd::write(fd, buf) {
            Ok(n) => buf = &buf[n..],
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Child-safe. `execve` each of `programs` like glibc's `execvpe`: keep
/// going on "not here" errors, remember EACCES, stop on anything else.
/// Returns only on failure, with the error to report.
fn exec_first(programs: &[CString], argv: &[*const c_char], envp: &[*const c_char]) -> Errno {
    let mut last = Errno::ENOENT;
    let mut saw_eacces = false;
    for path in programs {
        // SAFETY: `path` is a C string, `argv` and `envp` are NULL-terminated
        // arrays of pointers to C strings, all alive across the call.
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

/// Not child-safe (allocates). Execs `argv` (`argv[0]` the program) in
/// this very process with an empty environment, after the caller has reset
/// its signal handling ([`signals::reset_for_exec`]). Returns only on
/// failure.
pub fn exec_in_place(argv: &[CString]) -> Errno {
    let Some(program) = argv.first() else {
        return Errno::EINVAL;
    };
    exec_first(
        std::slice::from_ref(program),
        &nul_terminated(argv),
        &[std::ptr::null()],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::{AsFd, OwnedFd};

    fn c(s: &str) -> CString {
        CString::new(s).expect("no NUL")
    }

    fn plan<'a>(programs: &'a [CString], argv: &'a [CString]) -> ChildPlan<'a> {
        ChildPlan {
            programs,
            argv,
            envp: &[],
            parent_death_signal: false,
            cgroup_procs: &[],
            process_group: false,
            fds: &[],
            rlimits: &[],
            cwd: c"/",
        }
    }

    fn exit_code(pid: i32) -> Option<i32> {
        wait::reap(pid, true).expect("reap").expect("exited").code()
    }

    /// Runs `sh -c script` with its stdout on a pipe (plus `plan`'s other
    /// settings) and returns (exit code, output).
    fn sh(script: &str, tweak: impl FnOnce(&mut ChildPlan<'_>)) -> (Option<i32>, String) {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        let programs = [c("/bin/sh")];
        let argv = [c("sh"), c("-c"), c(script)];
        let fds = [(w.as_fd(), 1)];
        let mut p = plan(&programs, &argv);
        p.fds = &fds;
        tweak(&mut p);
        let pid = spawn(&p).expect("spawn");
        drop(w);
        let mut out = String::new();
        std::fs::File::from(r)
            .read_to_string(&mut out)
            .expect("read");
        (exit_code(pid), out)
    }

    #[test]
    fn steps_round_trip_through_the_report() {
        for step in [
            ChildStep::Signals,
            ChildStep::ParentDeathSignal,
            ChildStep::ParentGone,
            ChildStep::Cgroup,
            ChildStep::ProcessGroup,
            ChildStep::Descriptors,
            ChildStep::Rlimit(3),
            ChildStep::Chdir,
            ChildStep::Exec,
        ] {
            let report = Report::default();
            assert_eq!(report.failure(), None);
            report.record(step, Errno::EPERM);
            assert_eq!(report.failure(), Some((step, Errno::EPERM)));
        }
        assert_eq!(ChildStep::decode(99, 0), None);
    }

    #[test]
    fn runs_a_program() {
        let programs = [c("/bin/true")];
        let argv = [c("true")];
        let pid = spawn(&plan(&programs, &argv)).expect("spawn");
        assert_eq!(exit_code(pid), Some(0));
    }

    #[test]
    fn an_exec_failure_is_reported_with_its_step_and_errno() {
        let programs = [c("/nonexistent/turnstile-test")];
        let argv = [c("x")];
        let err = spawn(&plan(&programs, &argv)).expect_err("ran a missing program");
        assert_eq!(
            err,
            SpawnError::Child {
                step: ChildStep::Exec,
                errno: Errno::ENOENT
            }
        );
        // A directory is there but not executable: EACCES wins over the
        // ENOENT of the next candidate, as with execvpe.
        let programs = [c("/"), c("/nonexistent/x")];
        let err = spawn(&plan(&programs, &argv)).expect_err("ran a directory");
        assert_eq!(err.errno(), Errno::EACCES);
        // ... and a later candidate that exists runs.
        let programs = [c("/nonexistent/true"), c("/bin/true")];
        let pid = spawn(&plan(&programs, &argv)).expect("spawn");
        assert_eq!(exit_code(pid), Some(0));
    }

    #[test]
    fn a_failed_step_is_reported_and_nothing_later_runs() {
        let programs = [c("/bin/true")];
        let argv = [c("true")];
        let mut p = plan(&programs, &argv);
        p.cwd = c"/nonexistent/turnstile-test";
        assert_eq!(
            spawn(&p),
            Err(SpawnError::Child {
                step: ChildStep::Chdir,
                errno: Errno::ENOENT
            })
        );
        // A soft limit over the hard one is refused, by index.
        let limits = [
            Rlimit {
                resource: Resource::RLIMIT_CORE,
                soft: 0,
                hard: 0,
            },
            Rlimit {
                resource: Resource::RLIMIT_FSIZE,
                soft: 2,
                hard: 1,
            },
        ];
        let mut p = plan(&programs, &argv);
        p.rlimits = &limits;
        assert_eq!(
            spawn(&p),
            Err(SpawnError::Child {
                step: ChildStep::Rlimit(1),
                errno: Errno::EINVAL
            })
        );
    }

    #[test]
    fn signal_handling_starts_clean() {
        // SIGPIPE is ignored by Rust programs; the child must see it default,
        // and nothing blocked although every signal was blocked for the
        // clone. Signals 32 and 33 belong to the C library, which refuses to
        // change them (an ignored one stays ignored across exec).
        let (code, out) = sh("grep -E '^Sig(Ign|Blk)' /proc/self/status", |_| {});
        assert_eq!(code, Some(0));
        const LIBC_INTERNAL: u64 = 0b11 << 31;
        for line in out.lines() {
            let hex = line.split_whitespace().nth(1).expect("mask");
            let mask = u64::from_str_radix(hex, 16).expect("hex");
            assert_eq!(mask & !LIBC_INTERNAL, 0, "child starts with {line}");
        }
        assert_eq!(out.lines().count(), 2, "{out}");
    }

    #[test]
    fn descriptors_environment_group_limits_and_cwd() {
        // Two pipes whose write ends are swapped into 5 and 6 from numbers
        // that may be the other's target: each must land where it is asked.
        let (r5, w5) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        let (r6, w6) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        let fds_extra: [(BorrowedFd<'_>, RawFd); 2] = [(w5.as_fd(), 5), (w6.as_fd(), 6)];
        let env = [c("A=1"), c("PATH=/bin")];
        let limits = [Rlimit {
            resource: Resource::RLIMIT_NOFILE,
            soft: 50,
            hard: 60,
        }];
        let script = "echo five >&5; echo six >&6; \
                      read -r _ _ _ _ pgrp _ < /proc/$$/stat; \
                      echo \"pgid:$pgrp pid:$$ cwd:$(pwd) env:$(env | sort | tr '\\n' ,) \
                      nofile:$(ulimit -n)/$(ulimit -Hn)\"";
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        let programs = [c("/bin/sh")];
        let argv = [c("sh"), c("-c"), c(script)];
        let fds = [(w.as_fd(), 1), fds_extra[0], fds_extra[1]];
        let mut p = plan(&programs, &argv);
        p.fds = &fds;
        p.envp = &env;
        p.rlimits = &limits;
        p.process_group = true;
        p.parent_death_signal = true;
        p.cwd = c"/tmp";
        let pid = spawn(&p).expect("spawn");
        drop((w, w5, w6));
        let read = |r: OwnedFd| {
            let mut s = String::new();
            std::fs::File::from(r).read_to_string(&mut s).expect("read");
            s
        };
        let out = read(r);
        assert_eq!(exit_code(pid), Some(0));
        assert_eq!(read(r5), "five\n");
        assert_eq!(read(r6), "six\n");
        // sh adds PWD (and may add SHLVL, _); nothing of ours but A and PATH.
        let line = out.trim_end();
        assert!(
            line.starts_with(&format!("pgid:{pid} pid:{pid} cwd:/tmp env:A=1,")),
            "{line}"
        );
        assert!(line.contains("PATH=/bin,"), "{line}");
        assert!(!line.contains("HOME="), "{line}");
        assert!(line.ends_with("nofile:50/60"), "{line}");
    }

    #[test]
    fn the_child_joins_by_writing_0_to_each_procs_file() {
        // Stand-ins for `cgroup.procs`: what the child writes is what the
        // kernel would read; a descriptor that refuses writes fails the step.
        let dir = std::env::temp_dir().join(format!("turnstile-sys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("procs");
        let procs = std::fs::File::create(&path).expect("create");
        let programs = [c("/bin/true")];
        let argv = [c("true")];
        let joined = [procs.as_fd()];
        let mut p = plan(&programs, &argv);
        p.cgroup_procs = &joined;
        let pid = spawn(&p).expect("spawn");
        assert_eq!(exit_code(pid), Some(0));
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "0");
        let read_only = std::fs::File::open(&path).expect("open");
        let refused = [read_only.as_fd()];
        p.cgroup_procs = &refused;
        assert_eq!(
            spawn(&p),
            Err(SpawnError::Child {
                step: ChildStep::Cgroup,
                errno: Errno::EBADF
            })
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_exit_code_of_the_program_is_its_own() {
        let (code, out) = sh("echo hi; exit 3", |_| {});
        assert_eq!((code, out.as_str()), (Some(3), "hi\n"));
    }

    #[test]
    fn too_many_descriptors_are_refused_before_the_clone() {
        let (_r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        let fds: Vec<(BorrowedFd<'_>, RawFd)> = (0..=fd::MAX_FDS as RawFd)
            .map(|t| (w.as_fd(), t + 10))
            .collect();
        let programs = [c("/bin/true")];
        let argv = [c("true")];
        let mut p = plan(&programs, &argv);
        p.fds = &fds;
        assert_eq!(spawn(&p), Err(SpawnError::Clone(Errno::EINVAL)));
    }
}
