//! A turn's processes found through the process tree, for what cgroups do
//! not cover: the jail's init under nsjail, and without cgroups every
//! descendant of the turn's first process.
//!
//! Every signal goes through a pidfd opened on a process found as a child
//! of a process the broker holds (and checked to still be that child once
//! opened), never to a bare pid that may have been reaped and reused.
//!
//! Why the tree is enough: the shim is a child subreaper, so while it lives
//! every process the agent started, a daemon that `setsid()`s and
//! double-forks included, stays below it: an orphan is re-parented to the
//! shim, not to the host's init. [`kill_descendants`] therefore kills the
//! tree below a live root round after round, each round waiting for the
//! killed to be gone (their children re-parented up the tree first), until
//! nothing below the root is alive; only then may the root die.

use rustix::process::{Pid, PidfdFlags, Signal as RSignal, pidfd_open, pidfd_send_signal};
use std::collections::HashSet;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

/// How long [`kill_descendants`] keeps killing before it gives up (a
/// process stuck in the kernel, e.g. on a dead network filesystem, cannot
/// die of SIGKILL until it leaves it).
const KILL_WAIT: Duration = Duration::from_secs(5);
/// First pause between kill rounds (it doubles, up to [`MAX_PAUSE`]).
const FIRST_PAUSE: Duration = Duration::from_micros(200);
const MAX_PAUSE: Duration = Duration::from_millis(20);

/// A process held by its pidfd: its pid can be reused once it is reaped,
/// its pidfd never.
#[derive(Debug)]
pub struct Pinned {
    pub pid: i32,
    fd: OwnedFd,
}

impl Pinned {
    /// Opens a pidfd on `pid` (no check of who it is: the caller's job).
    pub(super) fn open(pid: i32) -> Option<Pinned> {
        let fd = pidfd_open(Pid::from_raw(pid)?, PidfdFlags::empty()).ok()?;
        Some(Pinned { pid, fd })
    }

    /// Sends `sig`; a process already gone is not an error.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        signal_pidfd(self.fd.as_fd(), sig);
    }
}

/// `pidfd_send_signal`: `sig` to the process of `pidfd`; a process already
/// gone (or a signal rustix cannot name) is not an error.
pub fn signal_pidfd(pidfd: BorrowedFd<'_>, sig: nix::sys::signal::Signal) {
    if let Some(sig) = RSignal::from_named_raw(sig as i32) {
        let _ = pidfd_send_signal(pidfd, sig);
    }
}

/// Whether the process of `pidfd` is still running (not yet exited): a
/// pidfd turns readable when its process exits.
pub fn running(pidfd: BorrowedFd<'_>) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(pidfd, PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(0))
}

/// Pins `pid`, found as a child of `parent` (which the caller holds), if it
/// is still that child, or an orphan the subreaper `root` adopted, and is
/// alive (not a zombie) once its pidfd is open. Checked after the open, so
/// a pid reaped and reused between the listing and the open is refused.
pub fn pin_child(pid: i32, parent: i32, root: i32) -> Option<Pinned> {
    let pinned = Pinned::open(pid)?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (state, ppid) = parse_stat(&stat)?;
    // Still running after the read: the stat was this process's.
    let ok = (ppid == parent || ppid == root)
        && !matches!(state, 'Z' | 'X' | 'x')
        && running(pinned.fd.as_fd());
    ok.then_some(pinned)
}

/// SIGKILLs every process below `root` (held by `root_fd`, alive), round
/// after round, until none is left alive or [`KILL_WAIT`] has passed:
/// whether none is left. Zombies are left to their parents to reap. Blocks
/// (it waits for the killed to be gone): run it off the async runtime.
pub fn kill_descendants(root: i32, root_fd: BorrowedFd<'_>) -> bool {
    let began = Instant::now();
    let mut pause = FIRST_PAUSE;
    loop {
        if !running(root_fd) {
            // Its orphans went up past it: nothing below it to walk.
            return false;
        }
        let killed = kill_round(root);
        if killed == 0 {
            return true;
        }
        if began.elapsed() >= KILL_WAIT {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// One walk of the tree below `root`, breadth first, SIGKILLing each live
/// process found: how many.
fn kill_round(root: i32) -> usize {
    let mut killed = 0;
    let mut seen = HashSet::from([root]);
    let mut level = vec![root];
    while !level.is_empty() {
        let mut next = Vec::new();
        for parent in level {
            for child in super::children_of(parent) {
                if !seen.insert(child) {
                    continue;
                }
                let Some(p) = pin_child(child, parent, root) else {
                    continue;
                };
                p.signal(nix::sys::signal::Signal::SIGKILL);
                killed += 1;
                next.push(child);
            }
        }
        level = next;
    }
    killed
}

/// The state letter and parent pid of a `/proc/<pid>/stat` line; the
/// command name may hold spaces and parentheses, so fields are counted
/// after its last `)`.
pub fn parse_stat(stat: &str) -> Option<(char, i32)> {
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jail::spawn::{ChildSetup, Stdio, spawn};
    use std::ffi::OsStr;
    use std::path::Path;

    #[test]
    fn stat_lines_parse() {
        assert_eq!(parse_stat("77 (a) b (c)) S 42 77 77 0 -1"), Some(('S', 42)));
        assert_eq!(parse_stat("77 (sleep) Z 1 2 3"), Some(('Z', 1)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x)"), None);
    }

    /// Pids of live processes whose command line holds `token`.
    fn alive_with(token: &str) -> Vec<i32> {
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = parse_stat(&stat).is_some_and(|(s, _)| s == 'Z');
            if !zombie
                && String::from_utf8_lossy(&cmd)
                    .replace('\0', " ")
                    .contains(token)
            {
                out.push(pid);
            }
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_descendant_dies_a_detached_one_too_and_the_root_lives() {
        let token = format!("9{}7", std::process::id());
        let needle = format!("sleep {token}");
        // The root: a subreaper (as the shim is) with a child and a
        // grandchild, and a daemon that setsid()s and double-forks; it says
        // "ready" once each has said it runs. The command lines are built
        // at run time, so only those processes hold the needle.
        let script = "import ctypes, subprocess, sys, time\n\
             ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)\n\
             s = 'sle' + 'ep ' + sys.argv[1]\n\
             a = subprocess.Popen(['sh', '-c', s + ' & echo up; ' + s], stdout=subprocess.PIPE)\n\
             b = subprocess.Popen(['sh', '-c', '(setsid sh -c \"echo up; exec ' + s + '\" &)'], \
                 stdout=subprocess.PIPE)\n\
             a.stdout.readline(); b.stdout.readline()\n\
             print('ready', flush=True)\n\
             time.sleep(1000)\n";
        let mut root = spawn(
            Path::new("/usr/bin/python3"),
            &[OsStr::new("-c"), OsStr::new(script), OsStr::new(&token)],
            Stdio::Piped,
            ChildSetup::default(),
        )
        .expect("python3");
        let mut out = root.stdout.take().expect("stdout");
        let mut line = [0u8; 6];
        tokio::io::AsyncReadExt::read_exact(&mut out, &mut line)
            .await
            .expect("ready");
        // The child shell and its sleep, the detached daemon.
        assert!(alive_with(&needle).len() >= 3, "{:?}", alive_with(&needle));
        let fd = root
            .pidfd()
            .expect("unreaped")
            .try_clone_to_owned()
            .expect("dup");
        let pid = root.id();
        let clean = tokio::task::spawn_blocking(move || kill_descendants(pid, fd.as_fd()))
            .await
            .expect("join");
        assert!(clean);
        assert_eq!(alive_with(&needle), Vec::<i32>::new());
        // The root itself is left for the caller.
        assert!(running(root.pidfd().expect("unreaped")));
        root.signal(nix::sys::signal::Signal::SIGKILL);
        let status = root.wait().await.expect("wait");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
        // A reaped child has no pidfd: nothing can be signalled through a
        // pid that may be reused.
        assert!(root.pidfd().is_none());
        root.signal(nix::sys::signal::Signal::SIGKILL);
    }
}
