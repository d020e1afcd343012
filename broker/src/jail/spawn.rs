//! Spawning nsjail or the shim, and owning what was spawned.
//!
//! The spawn itself is `turnstile-sys`'s vfork-style clone (no `fork`: its
//! cost would grow with the broker's size); this module says what the
//! broker's children get: an empty environment, cwd `/`, their own process
//! group, the parent-death signal SIGKILL (re-checked against the broker),
//! the turn's cgroups, stdio and descriptors at fixed numbers. A ready
//! [`Launcher`] (warm spares) runs a program with the same contract in a
//! process made ahead of the turn.
//!
//! The child is owned by a [`Child`]: waited for through a pidfd (so its pid
//! can never be reused while the broker still refers to it), with its stdio
//! pipes as tokio pipes, SIGKILLed and reaped if dropped unreaped. Nothing
//! here is `unsafe`.

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;
use turnstile_sys::{ChildPlan, ChildStep, SpawnError};

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
    let mut argv = vec![program_c.clone()];
    for a in args {
        argv.push(cstring(a)?);
    }
    let fds = Descriptors::new(stdio, setup.fds.len())?;
    let procs: Vec<BorrowedFd<'_>> = setup.cgroup_procs.iter().map(|f| f.as_fd()).collect();
    let plan = ChildPlan {
        programs: std::slice::from_ref(&program_c),
        argv: &argv,
        envp: &[],
        parent_death_signal: true,
        cgroup_procs: &procs,
        process_group: true,
        fds: &fds.pairs(&setup.fds),
        rlimits: &[],
        cwd: c"/",
    };
    let spawned = crate::process::own::spawned(|| turnstile_sys::spawn(&plan), |pid| *pid);
    drop(procs);
    // The child has exec'd or exited by now, so the broker's copies of its
    // ends (in `fds` and `setup`) can go.
    let (stdin, stdout, stderr) = fds.hand_over();
    drop(setup);
    let pid = spawned.map_err(|e| match e {
        SpawnError::Child {
            step: ChildStep::Exec,
            errno,
        } => exec_error(program, errno),
        SpawnError::Child { step, errno } => errno_error(step.describe(), errno),
        SpawnError::Clone(errno) => errno_error("cannot clone", errno),
    })?;

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
    let pidfd = turnstile_sys::wait::pidfd_open(pid)
        .map_err(|e| errno_error("pidfd_open (Linux 5.3 or later)", e))?;
    child.pidfd = Some(turnstile_sys::wait::watch_pidfd(pidfd)?);
    child.attach(stdin, stdout, stderr)?;
    Ok(child)
}

/// The descriptors a child gets besides those of its [`ChildSetup`]: the
/// child's stdio ends, which the broker holds until the exec, and the
/// broker's own ends.
struct Descriptors {
    /// The child's ends with their targets (one `/dev/null` for all three).
    held: Vec<(OwnedFd, Vec<RawFd>)>,
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
}

impl Descriptors {
    /// Makes the stdio of `stdio`; refuses more than the child may get in
    /// all, with `extra` descriptors of its setup.
    fn new(stdio: Stdio, extra: usize) -> io::Result<Descriptors> {
        let max = turnstile_sys::fd::MAX_FDS;
        if 3 + extra > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("at most {max} inherited descriptors"),
            ));
        }
        let mut d = Descriptors {
            held: Vec::new(),
            stdin: None,
            stdout: None,
            stderr: None,
        };
        match stdio {
            Stdio::Piped => {
                let cloexec = nix::fcntl::OFlag::O_CLOEXEC;
                let (r, w) = nix::unistd::pipe2(cloexec)?;
                d.held.push((r, vec![0]));
                d.stdin = Some(w);
                let (r, w) = nix::unistd::pipe2(cloexec)?;
                d.held.push((w, vec![1]));
                d.stdout = Some(r);
                let (r, w) = nix::unistd::pipe2(cloexec)?;
                d.held.push((w, vec![2]));
                d.stderr = Some(r);
            }
            Stdio::Null => {
                let null: OwnedFd = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/null")?
                    .into();
                d.held.push((null, vec![0, 1, 2]));
            }
        }
        Ok(d)
    }

    /// (source, target) pairs, stdio first, then `extra`.
    fn pairs<'a>(&'a self, extra: &'a [(OwnedFd, RawFd)]) -> Vec<(BorrowedFd<'a>, RawFd)> {
        let stdio = self
            .held
            .iter()
            .flat_map(|(fd, targets)| targets.iter().map(move |&t| (fd.as_fd(), t)));
        stdio
            .chain(extra.iter().map(|(fd, t)| (fd.as_fd(), *t)))
            .collect()
    }

    /// Closes the broker's copies of the child's ends (once the child has
    /// its own) and returns the broker's stdio ends.
    fn hand_over(self) -> (Option<OwnedFd>, Option<OwnedFd>, Option<OwnedFd>) {
        drop(self.held);
        (self.stdin, self.stdout, self.stderr)
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
        let fds = Descriptors::new(stdio, setup.fds.len()).map_err(LaunchError::Unusable)?;
        let mut argv: Vec<&[u8]> = vec![program.as_os_str().as_bytes()];
        argv.extend(args.iter().map(|a| a.as_bytes()));
        let pairs = fds.pairs(&setup.fds);
        let targets: Vec<RawFd> = pairs.iter().map(|p| p.1).collect();
        let sources: Vec<RawFd> = pairs.iter().map(|p| p.0.as_raw_fd()).collect();
        drop(pairs);
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

    /// The child's pidfd while it is unreaped; `None` once reaped (its pid
    /// may then be another process's).
    pub fn pidfd(&self) -> Option<BorrowedFd<'_>> {
        self.pidfd.as_ref().map(|fd| fd.get_ref().as_fd())
    }

    /// Sends `sig` through the child's pidfd; nothing once it is reaped.
    pub fn signal(&self, sig: Signal) {
        if let Some(fd) = self.pidfd() {
            crate::process::tree::signal_pidfd(fd, sig);
        }
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
        let errno = Errno::from_raw(f.errno);
        Some(match f.step {
            turnstile_shim::launch::LaunchStep::Exec => exec_error(program, errno),
            step => errno_error(&format!("launcher failed at {step:?}"), errno),
        })
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

/// "`what`: `strerror(errno)`", of the errno's kind.
fn errno_error(what: &str, errno: Errno) -> io::Error {
    io::Error::new(
        io::Error::from(errno).kind(),
        format!("{what}: {}", errno.desc()),
    )
}

/// "cannot execute `program`: `strerror(errno)`", whether the spawn or a
/// launcher tried.
fn exec_error(program: &Path, errno: Errno) -> io::Error {
    let what = format!("{} {}", ChildStep::Exec.describe(), program.display());
    errno_error(&what, errno)
}

/// Reaps `pid` if it has exited; `None` if it is still running.
fn try_reap(pid: i32) -> io::Result<Option<ExitStatus>> {
    let reaped = turnstile_sys::wait::reap(pid, false)?;
    if reaped.is_some() {
        crate::process::own::reaped(pid);
    }
    Ok(reaped.map(|r| ExitStatus::from_raw(r.status)))
}

fn reap_blocking(pid: i32) {
    let _ = turnstile_sys::wait::reap(pid, true);
    crate::process::own::reaped(pid);
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
        let pidfd = turnstile_sys::wait::pidfd_open(child.id()).expect("pidfd");
        drop(child);
        // The pidfd turns readable once the process has exited (a sleep of
        // 1000 s would not have by itself).
        let fd = turnstile_sys::wait::watch_pidfd(pidfd).expect("asyncfd");
        let _ = fd.readable().await.expect("readable");
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            state.is_empty() || state.contains(") Z "),
            "still alive: {state}"
        );
    }
}
