//! Finishing a turn: its outcome classified into the one `Exited` (the
//! reason that explains the end, the agent's status and usage, the limits
//! hit), then the cleanup (the cgroup, the turn dir) and the session's end
//! record.

use super::{Counters, Outcome, Prepared, Turn, TurnSpec, disk_limit};
use crate::StopReason;
use crate::disk::Exceeded;
use crate::jail::cgroup::{CgroupStats, TurnCgroup};
use nix::sys::signal::Signal;
use std::time::Instant;
use tracing::warn;
use turnstile_proto::v1 as pb;
use turnstile_proto::v1::exited::Reason;
use turnstile_shim::{AgentStatus, FailureClass};

impl Turn {
    /// Turns the outcome into the `Exited` event and undoes the turn's setup.
    pub(super) async fn finish(
        &self,
        prepared: Prepared,
        outcome: Outcome,
        counters: Counters,
    ) -> pb::Exited {
        let Prepared {
            mut meta, cgroup, ..
        } = prepared;
        // A turn that failed before `Started` still took a spare.
        if let Some(w) = &self.broker.warm {
            w.refill();
        }
        let stats = self.clean_up(cgroup).await;
        let exited = exited(&outcome, stats, counters, &self.spec, self.received);
        let reason = Reason::try_from(exited.reason).unwrap_or(Reason::Unspecified);
        meta.last_turn_end_unix_ms = Some(crate::session::now_unix_ms());
        meta.last_exit_reason = Some(reason.as_str_name().to_ascii_lowercase());
        if let Err(e) = self.broker.sessions.write_meta(&self.paths.session, &meta) {
            warn!(error = %e, "cannot update session metadata");
        }
        exited
    }

    /// Removes the cgroup (after reading what it counted) and the turn dir.
    async fn clean_up(&self, cgroup: Option<TurnCgroup>) -> CgroupStats {
        let stats = cgroup.as_ref().map(|c| c.stats()).unwrap_or_default();
        if let Some(cg) = cgroup
            && let Err(e) = cg.remove().await
        {
            warn!(error = %e, "cannot remove the turn's cgroup");
        }
        let dir = &self.paths.turn_dir;
        if let Err(e) = std::fs::remove_dir_all(dir) {
            warn!(error = %e, path = %dir.display(), "cannot remove the turn dir");
        }
        stats
    }
}

/// What an `Exited` says when the drain cut the output.
const OUTPUT_CUT: &str = "output was cut: a process that outlived the turn still held its stdout \
                          or stderr open; what it wrote after the drain ended was not relayed";

/// The `Exited` of an outcome.
fn exited(
    outcome: &Outcome,
    stats: CgroupStats,
    counters: Counters,
    spec: &TurnSpec,
    received: Instant,
) -> pb::Exited {
    let (oom, fork_failed) = (stats.oom_kills > 0, stats.fork_failures > 0);
    let (reason, mut message) = classify(outcome, oom, fork_failed, spec);
    if counters.output_cut {
        if !message.is_empty() {
            message.push_str("; ");
        }
        message.push_str(OUTPUT_CUT);
    }
    let mut limits_hit = Vec::new();
    if oom {
        limits_hit.push("memory".to_string());
    }
    if fork_failed {
        limits_hit.push("processes".to_string());
    }
    if outcome.disk_exceeded.is_some() || disk_file_cap_hit(outcome, spec) {
        limits_hit.push("disk".to_string());
    }
    let (status, usage) = agent_status(outcome);
    pb::Exited {
        reason: reason as i32,
        message,
        wall_time_us: received.elapsed().as_micros() as u64,
        stdout_bytes: counters.stdout,
        stderr_bytes: counters.stderr,
        stdin_bytes: counters.stdin,
        limits_hit,
        status,
        usage,
    }
}

/// The agent's status and usage as the shim reported them.
fn agent_status(outcome: &Outcome) -> (Option<pb::exited::Status>, Option<pb::Usage>) {
    match outcome.agent {
        Some((status, usage)) => {
            let status = match status {
                AgentStatus::Code(c) => pb::exited::Status::ExitCode(c),
                AgentStatus::Signal(s) => pb::exited::Status::Signal(s),
            };
            let usage = pb::Usage {
                user_cpu_us: usage.user_cpu_us,
                system_cpu_us: usage.system_cpu_us,
                max_rss_kib: usage.max_rss_kib,
            };
            (Some(status), Some(usage))
        }
        // The shim died before it could report (SIGKILL, OOM): the agent
        // went with it.
        None if outcome.agent_started => (
            Some(pb::exited::Status::Signal(Signal::SIGKILL as i32)),
            None,
        ),
        None => (None, None),
    }
}

/// The reason that explains the end, and its message: a stop by the broker
/// first, then a refused self-check, a failure the shim reported, a failed
/// spawn, and last how the agent ended.
fn classify(outcome: &Outcome, oom: bool, fork_failed: bool, spec: &TurnSpec) -> (Reason, String) {
    if let Some(stop) = outcome.stopped {
        return stopped(stop, outcome, spec);
    }
    if let Some(problems) = &outcome.isolation {
        return (
            Reason::IsolationCheckFailed,
            format!("isolation check failed: {problems}"),
        );
    }
    if let Some((class, message)) = &outcome.failed {
        let reason = match class {
            FailureClass::Payload => Reason::PayloadRejected,
            FailureClass::SelfCheck => Reason::IsolationCheckFailed,
            FailureClass::Exec | FailureClass::Setup | FailureClass::Aborted => Reason::SpawnFailed,
        };
        return (reason, message.clone());
    }
    if let Some(err) = &outcome.spawn_error {
        return (Reason::SpawnFailed, err.clone());
    }
    match outcome.agent.map(|(s, _)| s) {
        Some(AgentStatus::Signal(s)) => killed(s, outcome, oom, spec),
        Some(AgentStatus::Code(c)) if c != 0 && fork_failed => (
            Reason::ProcessLimit,
            format!(
                "process limit of {} reached (a fork failed); agent exited {c}",
                spec.limits.max_processes.unwrap_or(0)
            ),
        ),
        Some(AgentStatus::Code(_)) => (Reason::Exited, String::new()),
        None if oom => memory_limit(spec),
        None if outcome.agent_started => (Reason::Killed, "the jail died before reporting".into()),
        None => never_started(outcome),
    }
}

/// A turn the broker stopped.
fn stopped(stop: StopReason, outcome: &Outcome, spec: &TurnSpec) -> (Reason, String) {
    match stop {
        StopReason::TimedOut => (
            Reason::TimedOut,
            format!(
                "wall-time limit of {} ms reached",
                spec.limits.wall_time_ms.unwrap_or(0)
            ),
        ),
        StopReason::Cancelled => (Reason::Cancelled, "turn cancelled".to_string()),
        StopReason::BrokerShutdown => (Reason::BrokerShutdown, "broker shutting down".to_string()),
        StopReason::ExecutorGone => (Reason::Cancelled, "executor disconnected".to_string()),
        StopReason::NotReattached(ms) => (
            Reason::Cancelled,
            format!("executor did not reattach within {ms} ms"),
        ),
        StopReason::DiskLimit => (Reason::DiskLimit, disk_message(outcome.disk_exceeded, spec)),
        // The cause is the fleet's; the turn adds it (see `turn::fleet`).
        StopReason::LeaseLost => (Reason::LeaseLost, "fleet lease lost".to_string()),
    }
}

/// An agent killed by signal `s`: by a limit, or by something else.
fn killed(s: i32, outcome: &Outcome, oom: bool, spec: &TurnSpec) -> (Reason, String) {
    // The kernel sends SIGXCPU at the soft CPU limit and SIGKILL at the hard
    // one; a SIGKILL after the agent used its whole CPU budget is the limit.
    let cpu_spent = match (outcome.agent, spec.limits.cpu_time_ms) {
        (Some((_, u)), Some(ms)) => {
            (u.user_cpu_us + u.system_cpu_us) / 1000 >= ms.saturating_sub(ms / 20)
        }
        _ => false,
    };
    if s == Signal::SIGXCPU as i32 || (s == Signal::SIGKILL as i32 && cpu_spent) {
        return (Reason::CpuLimit, "CPU-time limit reached".into());
    }
    if disk_file_cap_hit(outcome, spec) {
        let message = format!(
            "disk limit reached: a file hit the {} bytes left of the session's {} (SIGXFSZ)",
            spec.disk_file_cap.unwrap_or(0),
            disk_limit(&spec.limits).describe()
        );
        return (Reason::DiskLimit, message);
    }
    if s == Signal::SIGXFSZ as i32 {
        return (
            Reason::FileSizeLimit,
            "file-size limit reached (SIGXFSZ)".into(),
        );
    }
    if oom {
        return memory_limit(spec);
    }
    (Reason::Killed, format!("agent killed by signal {s}"))
}

fn memory_limit(spec: &TurnSpec) -> (Reason, String) {
    (
        Reason::MemoryLimit,
        format!(
            "memory limit of {} bytes reached (OOM kill)",
            spec.limits.memory_bytes.unwrap_or(0)
        ),
    )
}

/// A jail or shim that ended before the agent started, and said nothing on
/// the control socket: its exit code, the protocol error, nsjail's log and
/// its stderr tell why.
fn never_started(outcome: &Outcome) -> (Reason, String) {
    let code = outcome
        .child_status
        .and_then(|s| s.code())
        .and_then(FailureClass::from_exit_code);
    let mut msg = match code {
        Some(class) => format!("shim failed ({class:?})"),
        None => format!(
            "the {} exited before the agent started ({})",
            if outcome.nsjail_log.is_empty() {
                "shim"
            } else {
                "jail"
            },
            outcome
                .child_status
                .map(|s| s.to_string())
                .unwrap_or_else(|| "no status".into())
        ),
    };
    if let Some(e) = &outcome.control_error {
        msg = format!("the shim's control socket broke the protocol ({e}); {msg}");
    }
    if !outcome.nsjail_log.is_empty() {
        msg.push_str(": nsjail: ");
        msg.push_str(&outcome.nsjail_log);
    }
    if !outcome.early_stderr.is_empty() {
        msg.push_str(": stderr: ");
        msg.push_str(&outcome.early_stderr);
    }
    let reason = if code == Some(FailureClass::Payload) {
        Reason::PayloadRejected
    } else {
        Reason::SpawnFailed
    };
    (reason, msg)
}

/// Whether the agent died of SIGXFSZ at a file-size limit that came from
/// the session's disk limit (what was left of it) rather than from
/// `max_file_size_bytes`.
fn disk_file_cap_hit(outcome: &Outcome, spec: &TurnSpec) -> bool {
    let xfsz =
        matches!(outcome.agent, Some((AgentStatus::Signal(s), _)) if s == Signal::SIGXFSZ as i32);
    match spec.disk_file_cap {
        Some(cap) => xfsz && spec.limits.max_file_size_bytes.is_none_or(|m| cap < m),
        None => false,
    }
}

fn disk_message(exceeded: Option<Exceeded>, spec: &TurnSpec) -> String {
    let limit = disk_limit(&spec.limits).describe();
    match exceeded {
        Some(Exceeded {
            usage: u,
            free_below_floor: Some(free),
        }) => format!(
            "the state dir is nearly full ({free} bytes free, below half the disk reserve) \
             and this session grew during the turn, to {} bytes / {} inodes",
            u.bytes, u.inodes
        ),
        Some(Exceeded { usage: u, .. }) => format!(
            "disk limit of {limit} reached: the session's home and work use at least {} bytes / {} inodes",
            u.bytes, u.inodes
        ),
        None => format!("disk limit of {limit} reached"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Limits;
    use crate::session::LeasePolicy;
    use std::os::unix::process::ExitStatusExt;
    use turnstile_shim::Usage;

    fn spec() -> TurnSpec {
        TurnSpec {
            session_id: "s".into(),
            turn_id: "t".into(),
            argv: vec!["x".into()],
            env: vec![],
            cwd: String::new(),
            limits: Limits::unlimited(),
            lease: LeasePolicy::Reject,
            llm_env_vars: vec![],
            llm_credential_env_vars: vec![],
            profile: Default::default(),
            disk_file_cap: None,
            turn_key: String::new(),
            detach_grace_ms: 0,
            llm_upstream: None,
        }
    }

    #[test]
    fn a_broken_control_socket_is_named_not_hidden() {
        let outcome = Outcome {
            control_error: Some("control frame over cap".into()),
            ..Default::default()
        };
        let (reason, msg) = classify(&outcome, false, false, &spec());
        assert_eq!(reason, Reason::SpawnFailed);
        assert!(
            msg.contains("the shim's control socket broke the protocol (control frame over cap)"),
            "{msg}"
        );
    }

    #[test]
    fn classify_picks_the_reason_that_explains_the_end() {
        let s = spec();
        let with_agent = |st| Outcome {
            agent: Some((st, Usage::default())),
            agent_started: true,
            ..Default::default()
        };
        let cases = [
            (
                with_agent(AgentStatus::Code(0)),
                false,
                false,
                Reason::Exited,
            ),
            (
                with_agent(AgentStatus::Code(3)),
                false,
                false,
                Reason::Exited,
            ),
            (
                with_agent(AgentStatus::Code(1)),
                false,
                true,
                Reason::ProcessLimit,
            ),
            (
                with_agent(AgentStatus::Signal(24)),
                false,
                false,
                Reason::CpuLimit,
            ),
            (
                with_agent(AgentStatus::Signal(25)),
                false,
                false,
                Reason::FileSizeLimit,
            ),
            (
                with_agent(AgentStatus::Signal(9)),
                true,
                false,
                Reason::MemoryLimit,
            ),
            (
                with_agent(AgentStatus::Signal(9)),
                false,
                false,
                Reason::Killed,
            ),
            (
                Outcome {
                    agent_started: true,
                    ..Default::default()
                },
                true,
                false,
                Reason::MemoryLimit,
            ),
            (
                Outcome {
                    stopped: Some(StopReason::TimedOut),
                    ..with_agent(AgentStatus::Signal(15))
                },
                false,
                false,
                Reason::TimedOut,
            ),
            (
                Outcome {
                    failed: Some((FailureClass::Payload, "x".into())),
                    ..Default::default()
                },
                false,
                false,
                Reason::PayloadRejected,
            ),
            (
                Outcome {
                    failed: Some((FailureClass::Exec, "x".into())),
                    ..Default::default()
                },
                false,
                false,
                Reason::SpawnFailed,
            ),
            (
                Outcome {
                    isolation: Some("x".into()),
                    ..Default::default()
                },
                false,
                false,
                Reason::IsolationCheckFailed,
            ),
        ];
        for (i, (outcome, oom, fork, want)) in cases.into_iter().enumerate() {
            assert_eq!(classify(&outcome, oom, fork, &s).0, want, "case {i}");
        }
    }

    #[test]
    fn disk_stops_and_disk_file_caps_read_disk_limit() {
        let mut s = spec();
        s.limits.disk_bytes = Some(1000);
        s.limits.max_file_size_bytes = Some(5000);
        s.disk_file_cap = Some(400);
        let xfsz = Outcome {
            agent: Some((AgentStatus::Signal(25), Usage::default())),
            agent_started: true,
            ..Default::default()
        };
        let (reason, msg) = classify(&xfsz, false, false, &s);
        assert_eq!(reason, Reason::DiskLimit);
        assert!(msg.contains("400 bytes left"), "{msg}");
        // A file-size limit below what is left of the disk limit is its own.
        s.limits.max_file_size_bytes = Some(100);
        assert_eq!(classify(&xfsz, false, false, &s).0, Reason::FileSizeLimit);
        let stopped = Outcome {
            stopped: Some(StopReason::DiskLimit),
            disk_exceeded: Some(Exceeded {
                usage: crate::disk::Usage {
                    bytes: 2000,
                    inodes: 3,
                },
                free_below_floor: None,
            }),
            ..xfsz
        };
        let (reason, msg) = classify(&stopped, false, false, &s);
        assert_eq!(reason, Reason::DiskLimit);
        assert!(msg.contains("at least 2000 bytes"), "{msg}");
    }

    #[test]
    fn a_stop_by_the_broker_explains_the_end_whatever_the_agent_did() {
        let mut s = spec();
        s.limits.wall_time_ms = Some(1500);
        let cases = [
            (
                StopReason::TimedOut,
                Reason::TimedOut,
                "wall-time limit of 1500 ms reached",
            ),
            (StopReason::Cancelled, Reason::Cancelled, "turn cancelled"),
            (
                StopReason::ExecutorGone,
                Reason::Cancelled,
                "executor disconnected",
            ),
            (
                StopReason::BrokerShutdown,
                Reason::BrokerShutdown,
                "broker shutting down",
            ),
            (StopReason::DiskLimit, Reason::DiskLimit, "disk limit of "),
            (StopReason::LeaseLost, Reason::LeaseLost, "fleet lease lost"),
        ];
        for (stop, want, text) in cases {
            let outcome = Outcome {
                stopped: Some(stop),
                agent: Some((AgentStatus::Signal(9), Usage::default())),
                agent_started: true,
                ..Default::default()
            };
            let (reason, msg) = classify(&outcome, true, true, &s);
            assert_eq!(reason, want, "{stop:?}");
            assert!(msg.starts_with(text), "{stop:?}: {msg}");
        }
    }

    #[test]
    fn a_sigkill_after_the_whole_cpu_budget_is_the_cpu_limit() {
        let mut s = spec();
        s.limits.cpu_time_ms = Some(1000);
        let killed_after = |cpu_ms: u64| Outcome {
            agent: Some((
                AgentStatus::Signal(9),
                Usage {
                    user_cpu_us: cpu_ms * 1000,
                    ..Usage::default()
                },
            )),
            agent_started: true,
            ..Default::default()
        };
        assert_eq!(
            classify(&killed_after(990), false, false, &s).0,
            Reason::CpuLimit
        );
        assert_eq!(
            classify(&killed_after(100), false, false, &s).0,
            Reason::Killed
        );
    }

    #[test]
    fn a_jail_that_ends_before_the_agent_says_what_it_can() {
        let spawn_error = Outcome {
            spawn_error: Some("cannot spawn shim: x".into()),
            ..Default::default()
        };
        assert_eq!(
            classify(&spawn_error, false, false, &spec()),
            (Reason::SpawnFailed, "cannot spawn shim: x".into())
        );
        let payload_exit = Outcome {
            child_status: Some(std::process::ExitStatus::from_raw(
                turnstile_shim::exit_code::PAYLOAD << 8,
            )),
            ..Default::default()
        };
        assert_eq!(
            classify(&payload_exit, false, false, &spec()),
            (Reason::PayloadRejected, "shim failed (Payload)".into())
        );
        let jail_log = Outcome {
            child_status: Some(std::process::ExitStatus::from_raw(255 << 8)),
            nsjail_log: "bad mount".into(),
            early_stderr: "oops".into(),
            ..Default::default()
        };
        let (reason, msg) = classify(&jail_log, false, false, &spec());
        assert_eq!(reason, Reason::SpawnFailed);
        assert_eq!(
            msg,
            "the jail exited before the agent started (exit status: 255): nsjail: bad mount: stderr: oops"
        );
        // An OOM kill explains a jail that never reported.
        assert_eq!(
            classify(&Outcome::default(), true, false, &spec()).0,
            Reason::MemoryLimit
        );
    }

    #[test]
    fn the_exited_carries_status_usage_counters_and_limits_hit() {
        let usage = Usage {
            user_cpu_us: 1,
            system_cpu_us: 2,
            max_rss_kib: 3,
        };
        let outcome = Outcome {
            agent: Some((AgentStatus::Code(1), usage)),
            agent_started: true,
            ..Default::default()
        };
        let stats = CgroupStats {
            oom_kills: 0,
            fork_failures: 2,
        };
        let counters = Counters {
            stdout: 10,
            stderr: 20,
            stdin: 30,
            output_cut: false,
        };
        let e = exited(&outcome, stats, counters, &spec(), Instant::now());
        assert_eq!(e.reason, Reason::ProcessLimit as i32);
        assert_eq!(e.status, Some(pb::exited::Status::ExitCode(1)));
        assert_eq!(
            e.usage,
            Some(pb::Usage {
                user_cpu_us: 1,
                system_cpu_us: 2,
                max_rss_kib: 3
            })
        );
        assert_eq!(
            (e.stdout_bytes, e.stderr_bytes, e.stdin_bytes),
            (10, 20, 30)
        );
        assert_eq!(e.limits_hit, ["processes"]);
        // A started agent whose shim never reported went with it: SIGKILL.
        let silent = Outcome {
            agent_started: true,
            ..Default::default()
        };
        let stats = CgroupStats {
            oom_kills: 1,
            fork_failures: 0,
        };
        let e = exited(&silent, stats, Counters::default(), &spec(), Instant::now());
        assert_eq!(e.reason, Reason::MemoryLimit as i32);
        assert_eq!(e.status, Some(pb::exited::Status::Signal(9)));
        assert_eq!(e.usage, None);
        assert_eq!(e.limits_hit, ["memory"]);
    }

    #[test]
    fn a_cut_output_is_said_in_the_message() {
        let outcome = Outcome {
            agent: Some((AgentStatus::Code(0), Usage::default())),
            agent_started: true,
            ..Default::default()
        };
        let cut = Counters {
            output_cut: true,
            ..Counters::default()
        };
        let e = exited(
            &outcome,
            CgroupStats::default(),
            cut,
            &spec(),
            Instant::now(),
        );
        assert_eq!(e.reason, Reason::Exited as i32);
        assert_eq!(e.message, OUTPUT_CUT);
        let silent = Outcome {
            agent_started: true,
            ..Default::default()
        };
        let cut = Counters {
            output_cut: true,
            ..Counters::default()
        };
        let e = exited(
            &silent,
            CgroupStats::default(),
            cut,
            &spec(),
            Instant::now(),
        );
        assert_eq!(e.reason, Reason::Killed as i32);
        assert_eq!(
            e.message,
            format!("the jail died before reporting; {OUTPUT_CUT}")
        );
    }
}
