//! One turn, from an admitted `Start` to its single `Exited`: a [`Turn`]
//! whose methods are its steps, one file each.
//!
//! | step | file | what |
//! | --- | --- | --- |
//! | spec | `spec.rs` | the `Start` validated, the effective limits |
//! | prepare | `prepare.rs` | paths, environment, payload, turn dir, a spare's take-over |
//! | spawn | `spawn.rs` | nsjail (or the shim) with the payload and control socket |
//! | handshake | `handshake.rs` | Hello, GO, AgentStarted, then `Started`; the one abort path |
//! | stdio | `stdio.rs` | the agent's stdin, stdout, stderr and its LLM relay |
//! | supervise | `supervise.rs` | waiting for the jail, and the stop sequence |
//! | finish | `finish.rs` | the outcome classified into `Exited`, cleanup |
//!
//! Every event goes to the executor through the turn's [`link::Link`]
//! (numbered, journaled, replayed to a stream that reattaches), and every
//! request of the executor's streams comes in through it.
//!
//! Once spawned, the jail is a `spawn::Jail` that touches processes only
//! through [`crate::process::ProcessControl`], so the handshake, the stop
//! sequence, the drain and the classification are unit-tested without root.

mod finish;
#[cfg(test)]
mod fixtures;
pub mod fleet;
mod handshake;
pub mod link;
mod prepare;
pub mod registry;
mod spawn;
mod spec;
mod stdio;
mod supervise;

pub(crate) use prepare::cgroup_limits;
pub use prepare::{TurnPaths, agent_env, build_payload};
pub use spec::{DEFAULT_LLM_ENV, TurnSpec, disk_limit, effective_limits, new_turn_id};

use crate::session::Lease;
use crate::{Admitted, Broker, StopReason};
use prepare::Prepared;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use tracing::{Instrument, info, warn};
use turnstile_proto::v1 as pb;
use turnstile_proto::v1::exited::Reason;
use turnstile_shim::{AgentStatus, FailureClass, Usage};

/// Read size of the stdout/stderr relay; also the largest chunk per event.
pub const RELAY_CHUNK: usize = 256 * 1024;
/// Tasks of a turn that are not the agent's and that run as the agent's
/// uid (in its user namespace, under nsjail), so that they count against
/// its `RLIMIT_NPROC`: the shim and its LLM bridge's one thread.
pub(crate) const SHIM_TASKS: u64 = 2;

/// Tasks in a turn's pids cgroup that are not the agent's: the shim and its
/// bridge's thread ([`SHIM_TASKS`], fixed for the whole turn: the bridge
/// serves every connection from that one thread), and under nsjail nsjail
/// itself. The cgroup's limit is the agent's `max_processes` plus these, so
/// the agent gets exactly its limit, cannot starve the bridge, and is never
/// pushed over by it.
pub(crate) fn supervisors(mode: crate::config::Mode) -> u64 {
    match mode {
        crate::config::Mode::Nsjail => SHIM_TASKS + 1,
        crate::config::Mode::Direct => SHIM_TASKS,
    }
}

/// An admitted turn: what the service hands over, and what every step of
/// the turn reads.
#[derive(Debug)]
pub struct Turn {
    pub(crate) broker: Arc<Broker>,
    pub(crate) spec: TurnSpec,
    pub(crate) paths: TurnPaths,
    /// The encoded init payload (checked against its cap at admission).
    pub(crate) payload: Vec<u8>,
    pub(crate) lease: Lease,
    /// Fleet mode: the session's fleet lease, kept alive while the turn runs.
    pub(crate) fleet: Option<fleet::FleetTurn>,
    pub(crate) admitted: Admitted,
    /// Where its events go, and its executors' input comes from.
    pub(crate) link: Arc<link::Link>,
    /// When the `Start` arrived: the wall-time limit counts from here.
    pub(crate) received: Instant,
}

/// How the turn ended, before it becomes an `Exited`.
#[derive(Debug, Default)]
struct Outcome {
    stopped: Option<StopReason>,
    failed: Option<(FailureClass, String)>,
    isolation: Option<String>,
    agent: Option<(AgentStatus, Usage)>,
    agent_started: bool,
    child_status: Option<ExitStatus>,
    spawn_error: Option<String>,
    nsjail_log: String,
    /// stderr of the jail or shim when no agent ever ran.
    early_stderr: String,
    /// The session's disk use that was over its limit.
    disk_exceeded: Option<crate::disk::Exceeded>,
    /// What was wrong with the shim's control socket before the agent
    /// started (an undecodable or out-of-order frame, a read error).
    control_error: Option<String>,
}

/// Bytes relayed, for the `Exited`.
#[derive(Debug, Default)]
struct Counters {
    stdout: u64,
    stderr: u64,
    stdin: u64,
    /// The drain cut a pipe that a process outside the turn kept busy.
    output_cut: bool,
}

impl Turn {
    /// Runs the turn to its end and sends its `Exited` (after every output
    /// byte, after cleanup and after the lease is released).
    pub async fn run_to_exit(self) {
        let span = tracing::info_span!("turn", session.id = %self.spec.session_id, turn.id = %self.spec.turn_id, jail.pid = tracing::field::Empty);
        async move {
            let exited = self.execute().await;
            info!(
                reason = ?Reason::try_from(exited.reason).unwrap_or(Reason::Unspecified),
                status = ?exited.status,
                stdout = exited.stdout_bytes,
                "turn ended"
            );
            let Turn {
                lease,
                fleet,
                admitted,
                link,
                broker,
                spec,
                ..
            } = self;
            // Released before the `Exited` goes out: an executor that
            // reads it may start the next turn on any worker at once.
            if let Some(f) = fleet {
                f.release().await;
            }
            drop(lease);
            drop(admitted);
            link.finish(exited);
            broker.turns.ended(&spec.session_id, &spec.turn_id);
        }
        .instrument(span)
        .await
    }

    /// Hydrates (fleet mode), prepares, runs, finishes and commits (fleet
    /// mode) the turn: its `Exited`.
    async fn execute(&self) -> pb::Exited {
        if let Err(exited) = self.hydrate().await {
            return exited;
        }
        let exited = self.run().await;
        self.commit(exited).await
    }

    /// Prepares, runs and finishes the turn.
    async fn run(&self) -> pb::Exited {
        let disk = self
            .broker
            .prepare_session_disk(&self.spec.session_id, disk_limit(&self.spec.limits));
        let mut prepared = match disk.await.and_then(|()| self.prepare()) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "cannot prepare the turn");
                return pb::Exited {
                    reason: Reason::SpawnFailed as i32,
                    message: e.to_string(),
                    ..Default::default()
                };
            }
        };
        let launcher = prepared.launcher.take();
        let (outcome, counters) = self.run_jail(&prepared, launcher).await;
        self.finish(prepared, outcome, counters).await
    }

    /// Spawns the jail and follows it to its end: handshake, `Started`,
    /// relay, supervision, drain.
    async fn run_jail(
        &self,
        prepared: &Prepared,
        launcher: Option<crate::jail::spawn::Launcher>,
    ) -> (Outcome, Counters) {
        let mut jail = match self.spawn(prepared, launcher) {
            Ok(jail) => jail,
            Err(e) => {
                let outcome = Outcome {
                    spawn_error: Some(e.to_string()),
                    ..Outcome::default()
                };
                return (outcome, Counters::default());
            }
        };
        let stop = self.stop_when();
        let Some(hello) = jail.handshake(&stop, &self.expected_isolation()).await else {
            return (jail.abort().await, Counters::default());
        };
        let shim_pid = self.pin_shim(&mut jail);
        self.send_started(&hello, shim_pid).await;
        let start_record = self.record_start(prepared);
        // Let the task that sends `Started` out run before the relay is set up.
        tokio::task::yield_now().await;
        // The next spare is made now, not while this turn was starting.
        if let Some(w) = &self.broker.warm {
            w.refill();
        }
        let disk_watch = self.watch_disk();
        let relay = self.relay(jail.take_stdio(), prepared).await;
        let mut signals = self
            .admitted
            .take_signals()
            .unwrap_or_else(|| mpsc::channel(1).1);
        jail.supervise(&stop, self.kill_grace(), &mut signals).await;
        let counters = relay.drain().await;
        let mut outcome = jail.into_outcome().await;
        outcome.disk_exceeded = disk_watch.and_then(|w| w.exceeded());
        match start_record.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(error = %e, "cannot record the turn's start in the session metadata")
            }
            Err(e) => warn!(error = %e, "the turn's start record did not finish"),
        }
        (outcome, counters)
    }
}
