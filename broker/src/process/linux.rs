//! The real [`ProcessControl`]: a spawned [`Child`] (waited for through its
//! pidfd) and the turn's cgroup.

use super::{ProcessControl, kill_group, kill_pid};
use crate::jail::cgroup::TurnCgroup;
use crate::jail::spawn::Child;
use nix::sys::signal::Signal;
use std::io;
use std::process::ExitStatus;

/// A turn's processes on the host: its first process and its cgroup.
#[derive(Debug)]
pub struct TurnProcesses<'a> {
    child: Child,
    cgroup: Option<&'a TurnCgroup>,
}

impl<'a> TurnProcesses<'a> {
    pub fn new(child: Child, cgroup: Option<&'a TurnCgroup>) -> Self {
        TurnProcesses { child, cgroup }
    }
}

impl ProcessControl for TurnProcesses<'_> {
    fn pid(&self) -> i32 {
        self.child.id()
    }

    async fn wait(&mut self) -> io::Result<ExitStatus> {
        self.child.wait().await
    }

    fn signal(&self, pid: i32, sig: Signal) {
        kill_pid(pid, sig);
    }

    fn kill_all(&self) {
        kill_group(self.child.id(), Signal::SIGKILL);
        if let Some(cg) = self.cgroup {
            cg.kill_all();
        }
    }

    fn launch_failure(&self) -> Option<io::Error> {
        self.child.launch_failure()
    }
}
