//! The real [`ProcessControl`]: a spawned [`Child`] (waited for and
//! signalled through its pidfd), the shim held by a pidfd, and the turn's
//! cgroup or, without one, its process tree.

use super::tree::{self, Pinned};
use super::{ProcessControl, children_of, kill_group, own};
use crate::jail::cgroup::TurnCgroup;
use crate::jail::spawn::Child;
use nix::sys::signal::Signal;
use std::io;
use std::os::fd::AsFd;
use std::process::ExitStatus;
use tracing::warn;

/// A turn's processes on the host: its first process, the shim once found,
/// and its cgroup.
#[derive(Debug)]
pub struct TurnProcesses<'a> {
    child: Child,
    cgroup: Option<&'a TurnCgroup>,
    shim: Shim,
}

/// Where the shim's signals go.
#[derive(Debug)]
enum Shim {
    /// Not found (yet).
    Unknown,
    /// The first process is the shim (direct mode).
    First,
    /// The jail's init, nsjail's child.
    Pinned(Pinned),
}

impl<'a> TurnProcesses<'a> {
    pub fn new(child: Child, cgroup: Option<&'a TurnCgroup>) -> Self {
        TurnProcesses {
            child,
            cgroup,
            shim: Shim::Unknown,
        }
    }
}

impl ProcessControl for TurnProcesses<'_> {
    fn pid(&self) -> i32 {
        self.child.id()
    }

    async fn wait(&mut self) -> io::Result<ExitStatus> {
        self.child.wait().await
    }

    fn pin_shim(&mut self, under_nsjail: bool) -> i32 {
        if !under_nsjail {
            self.shim = Shim::First;
            return self.child.id();
        }
        // nsjail's children are only its own while it is unreaped.
        if self.child.pidfd().is_none() {
            return 0;
        }
        let nsjail = self.child.id();
        for pid in children_of(nsjail) {
            if let Some(p) = tree::pin_child(pid, nsjail, nsjail) {
                self.shim = Shim::Pinned(p);
                return pid;
            }
        }
        0
    }

    fn signal_shim(&self, sig: Signal) {
        match &self.shim {
            Shim::First => self.child.signal(sig),
            Shim::Pinned(p) => p.signal(sig),
            Shim::Unknown => {}
        }
    }

    async fn kill_all(&self) {
        if let Some(cg) = self.cgroup {
            cg.kill_all();
            self.kill_first();
            return;
        }
        self.kill_tree().await;
        self.kill_first();
        // What a turn whose shim was killed under it left: orphans the
        // broker adopted (only a daemon that adopts them).
        if own::adopting() {
            match tokio::task::spawn_blocking(own::sweep).await {
                Ok(0) => {}
                Ok(n) => warn!(left = n, "adopted orphans were left after SIGKILL"),
                Err(e) => warn!(error = %e, "the sweep of adopted orphans failed"),
            }
        }
    }

    fn launch_failure(&self) -> Option<io::Error> {
        self.child.launch_failure()
    }
}

impl TurnProcesses<'_> {
    /// Without a cgroup, the tree below the first process is the turn:
    /// killed before the shim, which as a subreaper holds every orphan of
    /// the agent in it while it lives.
    async fn kill_tree(&self) {
        // Reaped: its pid may be another process's, and what it left is no
        // longer below it (the shim kills what it adopted before it exits).
        let Some(fd) = self.child.pidfd() else {
            return;
        };
        let root = self.child.id();
        match fd.try_clone_to_owned() {
            Ok(fd) => {
                let walk = move || tree::kill_descendants(root, fd.as_fd());
                match tokio::task::spawn_blocking(walk).await {
                    Ok(true) => {}
                    Ok(false) => warn!("processes of the turn were left after SIGKILL"),
                    Err(e) => warn!(error = %e, "the process tree walk failed"),
                }
            }
            Err(e) => warn!(error = %e, "cannot walk the turn's process tree"),
        }
    }

    /// The first process and its group, while it is unreaped (its pid,
    /// which is its group id, is then still its own).
    fn kill_first(&self) {
        if self.child.pidfd().is_some() {
            kill_group(self.child.id(), Signal::SIGKILL);
            self.child.signal(Signal::SIGKILL);
        }
    }
}
