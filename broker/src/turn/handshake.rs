//! The handshake with the shim on the control socket: its self-check
//! (`Hello`), checked against the mode and the broker's own rules, then
//! `GO`, then `AgentStarted`; then the `Started` event and the session's
//! start record. A turn whose agent does not start ends through
//! [`Jail::abort`].

use super::spawn::Jail;
use super::supervise::StopWhen;
use super::{Prepared, Turn};
use crate::config::Mode;
use crate::error::BrokerError;
use crate::process::ProcessControl;
use crate::session::now_unix_ms;
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tracing::info;
use turnstile_proto::v1 as pb;
use turnstile_shim::{SelfCheck, ShimMsg};

/// Reads one frame of the control socket; `Ok(None)` at its end.
pub(super) async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<ShimMsg>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > turnstile_shim::MAX_CONTROL_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "control frame over cap",
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    turnstile_shim::decode_frame(&body).map(Some)
}

/// The isolation the broker requires of the shim's self-check: the mode's
/// rules, and in nsjail mode the agent's uid mapped to the jail's host uid.
pub(super) struct Expected {
    pub mode: turnstile_shim::Mode,
    pub outside_uid: u32,
}

impl Expected {
    /// What is wrong with `hello`; empty when nothing is.
    fn problems(&self, hello: &SelfCheck) -> Vec<String> {
        let mut problems = hello.verify(self.mode);
        if self.mode == turnstile_shim::Mode::Nsjail {
            let want = self.outside_uid;
            match turnstile_shim::map_outside(&hello.uid_map, hello.uid) {
                Some(uid) if uid == want => {}
                other => problems.push(format!("jail uid maps to host uid {other:?}, want {want}")),
            }
        }
        problems
    }
}

impl<P: ProcessControl> Jail<P> {
    /// `Hello`, then `GO` (or `X` to a self-check that fails), then
    /// `AgentStarted`. `None` when the agent did not start (why is in the
    /// outcome): the caller then aborts.
    pub async fn handshake(&mut self, stop: &StopWhen, expected: &Expected) -> Option<SelfCheck> {
        let hello = self.hello(stop).await?;
        let problems = expected.problems(&hello);
        if !problems.is_empty() {
            self.outcome.isolation = Some(problems.join("; "));
            let _ = self.ctl.write_all(b"X").await;
            return None;
        }
        if self.ctl.write_all(&[turnstile_shim::GO]).await.is_err() {
            return None;
        }
        self.agent_started(stop).await.then_some(hello)
    }

    async fn hello(&mut self, stop: &StopWhen) -> Option<SelfCheck> {
        match self.frame_or_stop(stop).await? {
            Ok(Some(ShimMsg::Hello(check))) => return Some(check),
            Ok(Some(ShimMsg::Failed { class, message })) => {
                self.outcome.failed = Some((class, message));
            }
            Ok(Some(other)) => self.outcome.control_error = Some(format!("{other:?} before Hello")),
            Ok(None) => {}
            Err(e) => self.outcome.control_error = Some(e.to_string()),
        }
        None
    }

    async fn agent_started(&mut self, stop: &StopWhen) -> bool {
        let Some(frame) = self.frame_or_stop(stop).await else {
            return false;
        };
        match frame {
            Ok(Some(ShimMsg::AgentStarted { .. })) => self.outcome.agent_started = true,
            Ok(Some(ShimMsg::Failed { class, message })) => {
                self.outcome.failed = Some((class, message));
            }
            Ok(Some(other)) => self.outcome.control_error = Some(format!("{other:?} after GO")),
            Ok(None) => {}
            Err(e) => self.outcome.control_error = Some(e.to_string()),
        }
        self.outcome.agent_started
    }

    /// The next frame, unless the turn is stopped first (then `None`, and
    /// the outcome says why).
    async fn frame_or_stop(&mut self, stop: &StopWhen) -> Option<io::Result<Option<ShimMsg>>> {
        tokio::select! {
            frame = read_frame(&mut self.ctl) => Some(frame),
            reason = stop.reason() => {
                self.outcome.stopped = Some(reason);
                None
            }
        }
    }

    /// Reads the shim's last frames until the control socket closes.
    pub async fn collect_rest(&mut self) {
        while let Ok(Some(frame)) = read_frame(&mut self.ctl).await {
            match frame {
                ShimMsg::AgentExited { status, usage } => {
                    self.outcome.agent = Some((status, usage))
                }
                ShimMsg::Failed { class, message } if self.outcome.failed.is_none() => {
                    self.outcome.failed = Some((class, message))
                }
                _ => {}
            }
        }
        self.ctl_open = false;
    }
}

impl Turn {
    /// What this broker requires of the shim's self-check.
    pub(super) fn expected_isolation(&self) -> Expected {
        Expected {
            mode: match self.broker.mode() {
                Mode::Nsjail => turnstile_shim::Mode::Nsjail,
                Mode::Direct => turnstile_shim::Mode::Direct,
            },
            outside_uid: self.broker.outside_ids.0,
        }
    }

    /// Finds the shim and holds it for the executor's signals (see
    /// [`ProcessControl::pin_shim`]): its pid as the broker sees it, 0 if it
    /// cannot be found.
    pub(super) fn pin_shim<P: ProcessControl>(&self, jail: &mut Jail<P>) -> i32 {
        jail.procs.pin_shim(self.broker.mode() == Mode::Nsjail)
    }

    /// Sends `Started`: the mode, the agent's paths, the isolation the shim
    /// reported and the time the start took.
    pub(super) async fn send_started(&self, hello: &SelfCheck, shim_pid: i32) {
        let spawn_us = self.received.elapsed().as_micros() as u64;
        let (hydrate_us, generation) = self
            .fleet
            .as_ref()
            .map(|f| f.started_info())
            .unwrap_or_default();
        let mode = match self.broker.mode() {
            Mode::Nsjail => pb::Mode::Nsjail,
            Mode::Direct => pb::Mode::Direct,
        };
        let started = pb::Started {
            turn_id: self.spec.turn_id.clone(),
            session_id: self.spec.session_id.clone(),
            mode: mode as i32,
            home: self.paths.home.clone(),
            work_dir: self.paths.work.clone(),
            cwd: self.paths.cwd.clone(),
            spawn_us,
            isolation: Some(pb::Isolation {
                pid: hello.pid,
                uid: hello.uid,
                gid: hello.gid,
                uid_map: hello.uid_map.clone(),
                gid_map: hello.gid_map.clone(),
                net_interfaces: hello.net_interfaces.clone(),
                no_new_privs: hello.no_new_privs,
                root_read_only: hello.root_read_only,
                hostname: hello.hostname.clone(),
            }),
            started_at_unix_ms: now_unix_ms(),
            llm_profile: Some(self.spec.profile.started_info()),
            hydrate_us,
            generation,
            llm_upstream: self
                .spec
                .llm_upstream
                .as_ref()
                .map(|u| u.base_url.clone())
                .unwrap_or_default(),
        };
        info!(spawn_us, shim.pid = shim_pid, "agent started");
        self.link.send(pb::turn_event::Kind::Started(started));
    }

    /// Writes the session's start record, off the start path and off the
    /// runtime's threads: a write and a rename cost 0.2-0.5 ms, and running
    /// them here would hold back the `Started` just queued (tokio runs the
    /// task it woke only when this one yields). Awaited before the turn
    /// finishes, so the end record always comes last. A turn that never
    /// starts is recorded by `finish` alone.
    pub(super) fn record_start(&self, prepared: &Prepared) -> JoinHandle<Result<(), BrokerError>> {
        let broker = self.broker.clone();
        let (session, meta) = (self.paths.session.clone(), prepared.meta.clone());
        tokio::task::spawn_blocking(move || broker.sessions.write_meta(&session, &meta))
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{direct, fake_jail, hello, send, stop_when};
    use super::super::stdio::Stdio;
    use super::*;
    use crate::process::test::{Call, FakeProcesses};
    use turnstile_shim::{AgentStatus, FailureClass, Usage};

    async fn read_byte(shim: &mut tokio::net::UnixStream) -> u8 {
        let mut b = [0u8; 1];
        shim.read_exact(&mut b).await.expect("read");
        b[0]
    }

    #[tokio::test]
    async fn go_follows_a_good_hello_and_the_agent_starts() {
        let (mut jail, fake, mut shim) = fake_jail();
        let (stop, _events) = stop_when(None);
        let peer = async {
            send(&mut shim, &[ShimMsg::Hello(hello())]).await;
            assert_eq!(read_byte(&mut shim).await, turnstile_shim::GO);
            send(&mut shim, &[ShimMsg::AgentStarted { pid: 8 }]).await;
        };
        let expected = direct();
        let (got, ()) = tokio::join!(jail.handshake(&stop, &expected), peer);
        assert_eq!(got, Some(hello()));
        assert!(jail.outcome.agent_started);
        assert!(fake.calls().is_empty(), "{:?}", fake.calls());
    }

    #[tokio::test]
    async fn a_failed_self_check_is_refused_and_the_jail_killed() {
        let (mut jail, fake, mut shim) = fake_jail();
        let (stop, _events) = stop_when(None);
        let leaky = SelfCheck {
            env_keys: vec!["SECRET".into()],
            ..hello()
        };
        send(&mut shim, &[ShimMsg::Hello(leaky)]).await;
        assert_eq!(jail.handshake(&stop, &direct()).await, None);
        assert_eq!(read_byte(&mut shim).await, b'X', "the shim is told no");
        drop(shim);
        let outcome = jail.abort().await;
        let isolation = outcome.isolation.expect("isolation problem");
        assert!(isolation.contains("SECRET"), "{isolation}");
        assert!(!outcome.agent_started);
        assert_eq!(fake.calls(), [Call::KillAll]);
        assert!(outcome.child_status.is_some(), "the jail is reaped");
    }

    #[tokio::test]
    async fn an_nsjail_hello_must_map_the_agent_to_the_jail_uid() {
        let expected = Expected {
            mode: turnstile_shim::Mode::Nsjail,
            outside_uid: 100000,
        };
        let jailed = SelfCheck {
            pid: 1,
            uid_map: "1000 100000 1".into(),
            gid_map: "1000 100000 1".into(),
            no_new_privs: true,
            root_read_only: true,
            ..hello()
        };
        assert_eq!(expected.problems(&jailed), Vec::<String>::new());
        let elsewhere = SelfCheck {
            uid_map: "1000 200000 1".into(),
            ..jailed
        };
        let problems = expected.problems(&elsewhere);
        assert_eq!(
            problems,
            ["jail uid maps to host uid Some(200000), want 100000"]
        );
    }

    #[tokio::test]
    async fn what_the_shim_says_before_the_agent_runs_is_kept() {
        let failed = ShimMsg::Failed {
            class: FailureClass::Payload,
            message: "bad payload".into(),
        };
        type Check = fn(&super::super::Outcome) -> bool;
        let cases: [(&[ShimMsg], Check); 4] = [
            (&[failed], |o| {
                o.failed == Some((FailureClass::Payload, "bad payload".into()))
            }),
            (&[ShimMsg::AgentStarted { pid: 3 }], |o| {
                o.control_error.as_deref() == Some("AgentStarted { pid: 3 } before Hello")
            }),
            (&[ShimMsg::Hello(hello()), ShimMsg::Hello(hello())], |o| {
                o.control_error
                    .as_deref()
                    .is_some_and(|e| e.ends_with("after GO"))
            }),
            // The socket closes before any frame.
            (&[], |o| {
                o.failed.is_none() && o.control_error.is_none() && o.stopped.is_none()
            }),
        ];
        for (i, (frames, check)) in cases.into_iter().enumerate() {
            let (mut jail, fake, mut shim) = fake_jail();
            let (stop, _events) = stop_when(None);
            send(&mut shim, frames).await;
            let mut shim = Some(shim);
            if frames.is_empty() {
                shim = None;
            }
            assert_eq!(jail.handshake(&stop, &direct()).await, None, "case {i}");
            drop(shim);
            let outcome = jail.abort().await;
            assert!(check(&outcome), "case {i}: {outcome:?}");
            assert_eq!(fake.calls(), [Call::KillAll], "case {i}");
        }
    }

    #[tokio::test]
    async fn a_stop_during_the_handshake_ends_the_turn() {
        let (mut jail, fake, shim) = fake_jail();
        let (stop, _events) = stop_when(None);
        stop.turn.stop(crate::StopReason::BrokerShutdown);
        assert_eq!(jail.handshake(&stop, &direct()).await, None);
        assert_eq!(
            jail.outcome.stopped,
            Some(crate::StopReason::BrokerShutdown)
        );
        drop(shim);
        let outcome = jail.abort().await;
        assert_eq!(fake.calls(), [Call::KillAll]);
        assert_eq!(outcome.stopped, Some(crate::StopReason::BrokerShutdown));
    }

    #[tokio::test]
    async fn an_abort_keeps_the_jails_stderr_and_the_shims_last_frames() {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        nix::unistd::write(&w, b"  nsjail: bad config\n").expect("write");
        drop(w);
        let stderr = tokio::net::unix::pipe::Receiver::from_owned_fd(r).expect("pipe");
        let (ctl, mut shim) = tokio::net::UnixStream::pair().expect("socketpair");
        let stdio = Stdio {
            stderr: Some(stderr),
            ..Stdio::default()
        };
        let fake = FakeProcesses::new(10, &[]);
        let jail = Jail::new(fake.clone(), ctl, None, stdio, "shim");
        let exited = ShimMsg::AgentExited {
            status: AgentStatus::Code(0),
            usage: Usage::default(),
        };
        send(&mut shim, &[exited]).await;
        drop(shim);
        let outcome = jail.abort().await;
        assert_eq!(outcome.early_stderr, "nsjail: bad config");
        assert_eq!(outcome.agent.map(|a| a.0), Some(AgentStatus::Code(0)));
    }
}
