//! Supervision of a started turn: waiting for the jail while forwarding
//! the executor's signals and reading the shim's report, and the stop
//! sequence when the broker ends the turn (SIGTERM to the shim, SIGKILL to
//! every process of the turn after the grace; at once for the disk limit).

use super::handshake::read_frame;
use super::link::Link;
use super::spawn::Jail;
use super::{Turn, disk_limit};
use crate::config::Mode;
use crate::process::ProcessControl;
use crate::{ActiveTurn, StopReason};
use nix::sys::signal::Signal;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::info;
use turnstile_shim::ShimMsg;

/// What can end a running turn from outside it.
pub(super) struct StopWhen {
    /// The end of the wall-time limit.
    pub deadline: Option<Instant>,
    /// The broker's handle on the turn: cancel, shutdown, disk limit.
    pub turn: ActiveTurn,
    /// The turn's executor streams: the turn ends once none has been
    /// attached for `detach_grace`.
    pub link: Arc<Link>,
    pub detach_grace: Duration,
}

impl StopWhen {
    /// Resolves with the reason the broker must end the turn for.
    pub async fn reason(&self) -> StopReason {
        let timed_out = async {
            match self.deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = timed_out => StopReason::TimedOut,
            _ = self.turn.token.cancelled() => self.turn.reason.get().copied().unwrap_or(StopReason::Cancelled),
            r = self.link.abandoned(self.detach_grace) => r,
        }
    }
}

/// Sleeps until `at`, or forever.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

impl<P: ProcessControl> Jail<P> {
    /// Follows the started agent to its end: the executor's signals go to
    /// the shim, the shim's report is read, and a stop starts the stop
    /// sequence. Returns once the jail has exited, every process of the
    /// turn is killed and the control socket is read to its end.
    pub async fn supervise(
        &mut self,
        stop: &StopWhen,
        grace: Duration,
        signals: &mut mpsc::Receiver<Signal>,
    ) {
        let mut kill_at: Option<Instant> = None;
        let status = loop {
            tokio::select! {
                status = self.procs.wait() => break status.ok(),
                reason = stop.reason(), if self.outcome.stopped.is_none() => {
                    info!(?reason, "ending the turn");
                    self.outcome.stopped = Some(reason);
                    kill_at = self.begin_stop(reason, grace).await;
                }
                _ = sleep_until(kill_at) => {
                    self.procs.kill_all().await;
                    kill_at = None;
                }
                Some(sig) = signals.recv() => self.procs.signal_shim(sig),
                frame = read_frame(&mut self.ctl), if self.ctl_open => self.take_report(frame),
            }
        };
        self.outcome.child_status = status;
        // The jail's init is gone (and with it the pid namespace); in direct
        // mode the shim killed what it had adopted. Kill anything left in
        // the cgroup, so the output pipes reach EOF (without one, the drain's
        // deadline ends a pipe that an escaped process keeps busy).
        self.procs.kill_all().await;
        if self.ctl_open {
            self.collect_rest().await;
        }
    }

    /// The first move of the stop sequence; when to kill everything, if not
    /// now.
    async fn begin_stop(&self, reason: StopReason, grace: Duration) -> Option<Instant> {
        if matches!(reason, StopReason::DiskLimit | StopReason::LeaseLost) {
            // A grace would be time to write more; and once the fleet lease
            // is lost another worker may run the session before the grace
            // would end: nothing of this turn may still run then.
            self.procs.kill_all().await;
            return None;
        }
        // SIGTERM first: the shim forwards it, and the agent may save its
        // state; everything is SIGKILLed after the grace.
        self.procs.signal_shim(Signal::SIGTERM);
        Some(Instant::now() + grace)
    }

    /// One frame of the shim's report while the agent runs.
    fn take_report(&mut self, frame: io::Result<Option<ShimMsg>>) {
        match frame {
            Ok(Some(ShimMsg::AgentExited { status, usage })) => {
                self.outcome.agent = Some((status, usage));
            }
            Ok(Some(ShimMsg::Failed { class, message })) => {
                self.outcome.failed = Some((class, message));
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => self.ctl_open = false,
        }
    }
}

impl Turn {
    /// What can end this turn: its wall-time limit (from the `Start`'s
    /// arrival), the broker, the executor.
    pub(super) fn stop_when(&self) -> StopWhen {
        let wall = self.spec.limits.wall_time_ms.map(Duration::from_millis);
        StopWhen {
            deadline: wall.map(|w| Instant::from_std(self.received) + w),
            turn: self.admitted.turn.clone(),
            link: self.link.clone(),
            detach_grace: Duration::from_millis(self.spec.detach_grace_ms),
        }
    }

    /// How long the agent has between SIGTERM and SIGKILL.
    pub(super) fn kill_grace(&self) -> Duration {
        Duration::from_millis(self.broker.config.kill_grace_ms)
    }

    /// Watches the session's disk use and the state dir's free space from
    /// now on (never on the start path: the first walk of a big tree takes
    /// a while); going over stops the turn with `DiskLimit`.
    pub(super) fn watch_disk(&self) -> Option<crate::disk::Watch> {
        let broker = &self.broker;
        let limit = disk_limit(&self.spec.limits);
        if limit.is_unlimited() && broker.disk.reserve() == 0 {
            return None;
        }
        let session = &self.paths.session;
        let mut roots = vec![session.home.clone(), session.work.clone()];
        if broker.mode() == Mode::Direct {
            // The agent's TMPDIR is on the state dir too (in nsjail mode
            // /tmp is the jail's own tmpfs).
            roots.push(PathBuf::from(&self.paths.tmp));
        }
        let turn = self.admitted.turn.clone();
        let on_exceeded = move || turn.stop(StopReason::DiskLimit);
        Some(
            broker
                .disk
                .watch(&self.spec.session_id, roots, limit, on_exceeded),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{fake_jail, fake_jail_dying_of, send, stop_when};
    use super::*;
    use crate::process::test::{Call, FakeProcesses};
    use std::os::unix::process::ExitStatusExt;
    use turnstile_shim::{AgentStatus, Usage};

    const GRACE: Duration = Duration::from_secs(5);

    fn no_signals() -> mpsc::Receiver<Signal> {
        mpsc::channel(1).1
    }

    /// Supervises fake processes (that also die of `dies_of`) of a turn
    /// stopped for `reason`.
    async fn stopped_for(
        reason: StopReason,
        dies_of: &[Signal],
    ) -> (Jail<FakeProcesses>, FakeProcesses) {
        let (mut jail, fake, _) = fake_jail_dying_of(dies_of);
        let (stop, _events) = stop_when(None);
        stop.turn.stop(reason);
        jail.supervise(&stop, GRACE, &mut no_signals()).await;
        (jail, fake)
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_is_sigterm_to_the_shim_then_sigkill_to_all_after_the_grace() {
        let (jail, fake) = stopped_for(StopReason::Cancelled, &[]).await;
        let calls = fake.timed_calls();
        let kinds: Vec<Call> = calls.iter().map(|c| c.0).collect();
        assert_eq!(
            kinds,
            [Call::Signal(Signal::SIGTERM), Call::KillAll, Call::KillAll]
        );
        assert!(calls[1].1 - calls[0].1 >= GRACE, "SIGKILL before the grace");
        assert_eq!(jail.outcome.stopped, Some(StopReason::Cancelled));
        let status = jail.outcome.child_status.expect("reaped");
        assert_eq!(status.signal(), Some(Signal::SIGKILL as i32));
    }

    #[tokio::test(start_paused = true)]
    async fn an_agent_that_ends_on_sigterm_is_not_killed_before_the_grace() {
        let began = Instant::now();
        let (jail, fake) = stopped_for(StopReason::BrokerShutdown, &[Signal::SIGTERM]).await;
        assert!(began.elapsed() < GRACE, "waited for the grace");
        // The one SIGKILL is the sweep after the jail exited.
        assert_eq!(fake.calls(), [Call::Signal(Signal::SIGTERM), Call::KillAll]);
        let status = jail.outcome.child_status.expect("reaped");
        assert_eq!(status.code(), Some(128 + Signal::SIGTERM as i32));
    }

    #[tokio::test(start_paused = true)]
    async fn the_disk_limit_kills_at_once() {
        let (jail, fake) = stopped_for(StopReason::DiskLimit, &[]).await;
        assert_eq!(fake.calls(), [Call::KillAll, Call::KillAll]);
        assert_eq!(jail.outcome.stopped, Some(StopReason::DiskLimit));
        // So does a lost fleet lease: another worker may soon run the session.
        let (jail, fake) = stopped_for(StopReason::LeaseLost, &[]).await;
        assert_eq!(fake.calls(), [Call::KillAll, Call::KillAll]);
        assert_eq!(jail.outcome.stopped, Some(StopReason::LeaseLost));
    }

    #[tokio::test(start_paused = true)]
    async fn the_wall_time_limit_and_a_gone_executor_stop_the_turn() {
        let (mut jail, fake, _) = fake_jail();
        let deadline = Instant::now() + Duration::from_secs(60);
        let (stop, _events) = stop_when(Some(deadline));
        jail.supervise(&stop, GRACE, &mut no_signals()).await;
        assert_eq!(jail.outcome.stopped, Some(StopReason::TimedOut));
        assert!(fake.timed_calls()[0].1 >= deadline, "stopped early");

        let (mut jail, fake, _) = fake_jail();
        let (stop, events) = stop_when(None);
        drop(events);
        jail.supervise(&stop, GRACE, &mut no_signals()).await;
        assert_eq!(jail.outcome.stopped, Some(StopReason::ExecutorGone));
        assert_eq!(fake.calls()[0], Call::Signal(Signal::SIGTERM));

        // With a grace, a stream that went is waited for, then given up.
        let (mut jail, _fake, _) = fake_jail();
        let (mut stop, events) = stop_when(None);
        stop.detach_grace = Duration::from_secs(60);
        drop(events);
        let began = Instant::now();
        jail.supervise(&stop, GRACE, &mut no_signals()).await;
        assert_eq!(
            jail.outcome.stopped,
            Some(StopReason::NotReattached(60_000))
        );
        assert!(began.elapsed() >= Duration::from_secs(60), "ended early");
    }

    #[tokio::test(start_paused = true)]
    async fn the_executors_signals_go_to_the_shim() {
        let (mut jail, fake, _) = fake_jail_dying_of(&[Signal::SIGINT]);
        let (stop, _events) = stop_when(None);
        let (tx, mut signals) = mpsc::channel(1);
        tx.send(Signal::SIGINT).await.expect("send");
        jail.supervise(&stop, GRACE, &mut signals).await;
        assert_eq!(fake.calls(), [Call::Signal(Signal::SIGINT), Call::KillAll]);
        assert_eq!(jail.outcome.stopped, None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_shims_report_is_read_to_the_end() {
        let (mut jail, fake, mut shim) = fake_jail();
        let (stop, _events) = stop_when(None);
        let usage = Usage {
            user_cpu_us: 5,
            ..Usage::default()
        };
        let exited = ShimMsg::AgentExited {
            status: AgentStatus::Code(3),
            usage,
        };
        send(&mut shim, &[exited]).await;
        drop(shim);
        // The shim reported and exited (code 3) before the broker looked.
        fake.exit(3 << 8);
        jail.supervise(&stop, GRACE, &mut no_signals()).await;
        assert_eq!(jail.outcome.agent, Some((AgentStatus::Code(3), usage)));
        assert!(!jail.ctl_open);
        assert_eq!(fake.calls(), [Call::KillAll]);
        assert_eq!(jail.outcome.stopped, None);
    }
}
