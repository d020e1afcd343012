//! A stand-in [`ProcessControl`] for unit tests: no process, every call
//! recorded (with the tokio clock's time, so a paused clock shows what came
//! after a grace), and an exit when the test says, when it is killed, or
//! when it is sent a signal it was told to die of.

use super::ProcessControl;
use nix::sys::signal::Signal;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use tokio::time::Instant;

/// A call made on a [`FakeProcesses`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// A signal to the shim.
    Signal(Signal),
    KillAll,
}

#[derive(Debug)]
struct Inner {
    pid: i32,
    calls: Mutex<Vec<(Call, Instant)>>,
    exit: watch::Sender<Option<ExitStatus>>,
    dies_of: Vec<Signal>,
}

/// Cloning it gives another handle on the same fake: the test keeps one and
/// hands the other to the code under test.
#[derive(Debug, Clone)]
pub struct FakeProcesses(Arc<Inner>);

impl FakeProcesses {
    /// A running fake with pid `pid` that exits only when killed, or when
    /// sent one of `dies_of` (with the code a shim would report: 128 + n).
    pub fn new(pid: i32, dies_of: &[Signal]) -> Self {
        FakeProcesses(Arc::new(Inner {
            pid,
            calls: Mutex::default(),
            exit: watch::Sender::new(None),
            dies_of: dies_of.to_vec(),
        }))
    }

    /// Ends the fake with `status` (a raw wait status), unless it has ended.
    pub fn exit(&self, status: i32) {
        self.0.exit.send_if_modified(|s| {
            let first = s.is_none();
            if first {
                *s = Some(ExitStatus::from_raw(status));
            }
            first
        });
    }

    /// The calls made so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.timed_calls().into_iter().map(|(c, _)| c).collect()
    }

    /// The calls made so far with the (tokio) time of each.
    pub fn timed_calls(&self) -> Vec<(Call, Instant)> {
        self.0.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    fn record(&self, call: Call) {
        if let Ok(mut calls) = self.0.calls.lock() {
            calls.push((call, Instant::now()));
        }
    }
}

impl ProcessControl for FakeProcesses {
    fn pid(&self) -> i32 {
        self.0.pid
    }

    async fn wait(&mut self) -> io::Result<ExitStatus> {
        let mut rx = self.0.exit.subscribe();
        let status = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| io::Error::other("fake gone"))?;
        (*status).ok_or_else(|| io::Error::other("no status"))
    }

    fn pin_shim(&mut self, _under_nsjail: bool) -> i32 {
        self.0.pid
    }

    fn signal_shim(&self, sig: Signal) {
        self.record(Call::Signal(sig));
        if self.0.dies_of.contains(&sig) {
            self.exit((128 + sig as i32) << 8);
        }
    }

    async fn kill_all(&self) {
        self.record(Call::KillAll);
        self.exit(Signal::SIGKILL as i32);
    }

    fn launch_failure(&self) -> Option<io::Error> {
        None
    }
}
