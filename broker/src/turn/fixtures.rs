//! What the turn's unit tests share: a jail of fake processes with the
//! shim's end of its control socket, stop triggers, frames from the shim.

use super::handshake::Expected;
use super::spawn::Jail;
use super::stdio::Stdio;
use super::supervise::StopWhen;
use crate::ActiveTurn;
use crate::process::test::FakeProcesses;
use nix::sys::signal::Signal;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use turnstile_shim::{SelfCheck, ShimMsg};

/// The pid of the fake jail.
pub const JAIL: i32 = 100;

/// A jail of fake processes (pid [`JAIL`]) that die only when killed, a
/// handle on them, and the shim's end of its control socket.
pub fn fake_jail() -> (Jail<FakeProcesses>, FakeProcesses, UnixStream) {
    fake_jail_dying_of(&[])
}

/// The same, with processes that also die of `sigs`.
pub fn fake_jail_dying_of(sigs: &[Signal]) -> (Jail<FakeProcesses>, FakeProcesses, UnixStream) {
    let fake = FakeProcesses::new(JAIL, sigs);
    let (ctl, shim) = UnixStream::pair().expect("socketpair");
    let jail = Jail::new(fake.clone(), ctl, None, Stdio::default(), "shim");
    (jail, fake, shim)
}

/// Stop triggers with `deadline` (and no detach grace), and the stream of
/// the executor attached (dropping it is the executor going away).
pub fn stop_when(deadline: Option<Instant>) -> (StopWhen, super::link::EventStream) {
    let link = super::link::Link::new(None, 0, mpsc::channel(1).0);
    let rx = link.attach(0).expect("attach").stream;
    let turn = ActiveTurn {
        session_id: "s".into(),
        token: CancellationToken::new(),
        reason: Arc::default(),
        signals: mpsc::channel(1).0,
    };
    let stop = StopWhen {
        deadline,
        turn,
        link,
        detach_grace: std::time::Duration::ZERO,
    };
    (stop, rx)
}

/// What a direct-mode broker requires of the self-check.
pub fn direct() -> Expected {
    Expected {
        mode: turnstile_shim::Mode::Direct,
        outside_uid: 1000,
    }
}

/// A self-check that passes in direct mode.
pub fn hello() -> SelfCheck {
    SelfCheck {
        pid: 7,
        uid: 1000,
        gid: 1000,
        uid_map: String::new(),
        gid_map: String::new(),
        net_interfaces: vec!["lo".into()],
        no_new_privs: false,
        env_keys: vec![],
        root_read_only: false,
        hostname: "h".into(),
    }
}

/// Writes `frames` on the shim's end of the control socket.
pub async fn send(shim: &mut UnixStream, frames: &[ShimMsg]) {
    let mut bytes = Vec::new();
    for f in frames {
        turnstile_shim::write_frame(&mut bytes, f).expect("encode");
    }
    shim.write_all(&bytes).await.expect("send");
}
