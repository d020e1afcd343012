//! Lifecycle: nothing a turn started survives it, whatever way it ends.

use super::harness::*;
use crate::both_modes;
use nix::sys::signal::Signal;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use tokio_stream::StreamExt;
use turnstile_broker::config::{CgroupPolicy, Mode};
use turnstile_broker::{Broker, StartupError};
use turnstile_proto::v1 as pb;

both_modes!(
    background_processes_do_not_survive_the_turn,
    executor_disconnect_kills_the_agent_and_frees_the_session,
    broker_sigterm_ends_turns_as_broker_shutdown,
    broker_sigkill_takes_its_jails_and_restart_cleans_up,
    without_cgroups_a_detached_writer_dies_with_its_turn,
);

async fn background_processes_do_not_survive_the_turn(mode: Mode) {
    let h = Harness::start(mode).await;
    let tok = token();
    // One child in the background, one double-forked and detached.
    let script = format!("sleep {tok} & (setsid sleep {tok} &) ; echo started");
    let o = h.run(start("orphans", &script)).await;
    o.assert_exited_ok();
    assert_eq!(o.stdout(), "started\n");
    assert_eq!(pids_with(&format!("sleep {tok}")), Vec::<i32>::new());
    assert!(entries(&h.state().join("turns")).is_empty());
    h.stop().await;
}

async fn executor_disconnect_kills_the_agent_and_frees_the_session(mode: Mode) {
    let h = Harness::start(mode).await;
    let tok = token();
    let mut t = h
        .turn(start("gone", &format!("echo ready; sleep {tok}")))
        .await
        .expect("turn");
    let mut seen = Outcome::default();
    t.wait_stdout("ready", &mut seen).await;
    assert!(!pids_with(&format!("sleep {tok}")).is_empty());
    let first_turn = seen.started.as_ref().expect("started").turn_id.clone();
    // The executor vanishes: its stream and connection are dropped.
    drop(t);
    // The next turn of the session waits for the lease, then runs: by then
    // the first turn has been torn down.
    let next = pb::Start {
        lease: Some(pb::Lease {
            policy: pb::lease::Policy::Wait as i32,
            wait_ms: 60_000,
        }),
        ..start("gone", "echo next")
    };
    let t = h.turn(next).await.expect("next turn admitted");
    assert_eq!(pids_with(&format!("sleep {tok}")), Vec::<i32>::new());
    let turns = entries(&h.state().join("turns"));
    assert!(
        !turns.iter().any(|t| t == &first_turn),
        "first turn's dir removed: {turns:?}"
    );
    t.close_stdin().await;
    let o = t.collect().await;
    o.assert_exited_ok();
    assert!(entries(&h.state().join("turns")).is_empty());
    h.stop().await;
}

async fn broker_sigterm_ends_turns_as_broker_shutdown(mode: Mode) {
    let dir = tempdir();
    let mut d = Daemon::spawn(mode, dir.path(), &[]);
    let client = d.ready().await;
    let tok = token();
    let mut t = Turn::start(client, start("shut", &format!("echo ready; sleep {tok}")))
        .await
        .expect("turn");
    let mut seen = Outcome::default();
    t.wait_stdout("ready", &mut seen).await;
    d.signal(Signal::SIGTERM);
    t.collect_into(&mut seen).await;
    assert_eq!(seen.reason(), Reason::BrokerShutdown, "{:?}", seen.exited);
    let socket = d.socket.clone();
    let state = d.state.clone();
    let status = d.wait().await;
    assert!(status.success(), "broker exit: {status}");
    assert_eq!(pids_with(&format!("sleep {tok}")), Vec::<i32>::new());
    assert!(entries(&state.join("turns")).is_empty());
    assert!(!socket.exists(), "socket removed on shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_removes_the_brokers_cgroups() {
    let dir = tempdir();
    let mut d = Daemon::spawn(Mode::Direct, dir.path(), &[]);
    let client = d.ready().await;
    // Direct mode shows the turn its host cgroup: <mount>/<broker's parent>/<turn>.
    let t = Turn::start(client, start("cg", "cat /proc/self/cgroup"))
        .await
        .expect("turn");
    t.close_stdin().await;
    let out = t.collect().await;
    out.assert_exited_ok();
    let stdout = out.stdout();
    let (mount, path) = if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        let p = stdout
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("a v2 cgroup line");
        ("/sys/fs/cgroup".to_string(), p.to_string())
    } else {
        let p = stdout
            .lines()
            .find(|l| {
                l.split(':')
                    .nth(1)
                    .is_some_and(|c| c.split(',').any(|x| x == "pids"))
            })
            .and_then(|l| l.splitn(3, ':').nth(2))
            .expect("a v1 pids line");
        ("/sys/fs/cgroup/pids".to_string(), p.to_string())
    };
    let parent = std::path::Path::new(&mount).join(
        std::path::Path::new(path.trim_start_matches('/'))
            .parent()
            .expect("the broker's parent cgroup"),
    );
    assert!(
        parent
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("turnstile-")),
        "{}",
        parent.display()
    );
    assert!(
        parent.is_dir(),
        "{} exists while the broker runs",
        parent.display()
    );
    d.signal(Signal::SIGTERM);
    assert!(d.wait().await.success());
    assert!(
        !parent.exists(),
        "{} left after a clean stop",
        parent.display()
    );
}

async fn broker_sigkill_takes_its_jails_and_restart_cleans_up(mode: Mode) {
    let dir = tempdir();
    let mut d = Daemon::spawn(mode, dir.path(), &[]);
    let client = d.ready().await;
    let tok = token();
    let mut t = Turn::start(
        client,
        start(
            "killed",
            &format!("echo ready; (setsid sleep {tok} &); sleep {tok}"),
        ),
    )
    .await
    .expect("turn");
    let mut seen = Outcome::default();
    t.wait_stdout("ready", &mut seen).await;
    assert!(!entries(&d.state.join("turns")).is_empty());
    d.signal(Signal::SIGKILL);
    let (state, socket) = (d.state.clone(), d.socket.clone());
    let _ = d.wait().await;
    // A new generation on the same state dir cleans what the dead one left.
    let mut d2 = Daemon::spawn_at(mode, &state, &socket, &[]);
    let client = d2.ready().await;
    assert!(
        entries(&state.join("turns")).is_empty(),
        "stale turn dirs removed"
    );
    assert_eq!(
        pids_with(&format!("sleep {tok}")),
        Vec::<i32>::new(),
        "no survivor"
    );
    let t = Turn::start(client, start("killed", "echo again"))
        .await
        .expect("next turn");
    t.close_stdin().await;
    let o = t.collect().await;
    o.assert_exited_ok();
    d2.signal(Signal::SIGTERM);
    assert!(d2.wait().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_broker_on_one_state_dir_refuses_to_start() {
    let h = Harness::start(Mode::Direct).await;
    let cfg = config(Mode::Direct, &h.state());
    let err = Broker::new(cfg).expect_err("refused");
    assert!(matches!(err, StartupError::StateDirLocked(_)), "{err}");
    assert!(
        err.to_string().contains("in use by another broker"),
        "{err}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_is_owner_only_and_serves_health() {
    let h = Harness::start(Mode::Direct).await;
    let meta = std::fs::symlink_metadata(&h.socket).expect("socket");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let channel = turnstile_client::connect_unix(h.socket.clone())
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "turnstile.v1.Broker".into(),
        })
        .await
        .expect("health");
    assert_eq!(
        r.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    // A second broker cannot take over a live socket.
    let err = turnstile_broker::server::bind_unix(&h.socket).expect_err("in use");
    assert!(
        err.to_string().contains("another broker is listening"),
        "{err}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_is_loopback_only_and_needs_the_token() {
    let err = turnstile_broker::server::bind_tcp("0.0.0.0:0".parse().expect("addr"), "t".into())
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("not a loopback address"), "{err}");

    let h = Harness::start(Mode::Direct).await;
    let listener =
        turnstile_broker::server::bind_tcp("127.0.0.1:0".parse().expect("addr"), "sesame".into())
            .await
            .expect("bind");
    let addr = match &listener {
        turnstile_broker::server::Listener::Tcp { listener, .. } => {
            listener.local_addr().expect("addr")
        }
        _ => unreachable!("tcp listener"),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(turnstile_broker::server::serve(
        h.broker.clone(),
        vec![listener],
        async {
            let _ = stopped.await;
        },
    ));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut plain = pb::broker_client::BrokerClient::new(channel.clone());
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(pb::TurnRequest {
        kind: Some(pb::turn_request::Kind::Start(start("tcp", "echo hi"))),
    })
    .await
    .expect("send");
    let err = plain
        .turn(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect_err("no token, no turn");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let mut authed =
        pb::broker_client::BrokerClient::with_interceptor(channel, |mut req: tonic::Request<()>| {
            req.metadata_mut()
                .insert("authorization", "Bearer sesame".parse().expect("header"));
            Ok(req)
        });
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tx.send(pb::TurnRequest {
        kind: Some(pb::turn_request::Kind::Start(start("tcp", "echo hi"))),
    })
    .await
    .expect("send");
    tx.send(pb::TurnRequest {
        kind: Some(pb::turn_request::Kind::StdinEof(pb::StdinEof {})),
    })
    .await
    .expect("send");
    let events = authed
        .turn(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("token accepted")
        .into_inner();
    let o = Turn { tx, events }.collect().await;
    o.assert_exited_ok();
    assert_eq!(o.stdout(), "hi\n");
    let _ = stop.send(());
    server.await.expect("join").expect("server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_racing_shutdown_leave_no_turn_running() {
    let h = Harness::start(Mode::Direct).await;
    let tok = token();
    let mut starts = Vec::new();
    for i in 0..6 {
        let client = h.client().await;
        let s = start(&format!("race{i}"), &format!("sleep {tok}"));
        starts.push(tokio::spawn(async move {
            match Turn::start(client, s).await {
                Ok(t) => Ok(t.collect().await),
                Err(status) => Err(status),
            }
        }));
    }
    let state = h.state();
    // Shut down while the starts are in flight.
    h.stop().await;
    for s in starts {
        match s.await.expect("join") {
            // Admitted before shutdown: ended by it.
            Ok(o) => assert_eq!(o.reason(), Reason::BrokerShutdown, "{:?}", o.exited),
            // Refused, or its connection closed by the stopping server
            // (a GOAWAY racing the request surfaces as an h2 error).
            Err(status) => assert!(
                matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                ) || (status.code() == tonic::Code::Internal
                    && format!("{status:?}").contains("GoAway")),
                "{status:?}"
            ),
        }
    }
    assert_eq!(pids_with(&format!("sleep {tok}")), Vec::<i32>::new());
    assert!(entries(&state.join("turns")).is_empty());
}

/// Kills, when dropped, what a test's agent left running (a test that
/// fails must not leave a writer behind).
struct Survivors(String);

impl Drop for Survivors {
    fn drop(&mut self) {
        for pid in pids_with(&self.0) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// A daemon that ignores SIGTERM and SIGHUP and writes a line to stdout
/// every 50 ms, detached from the agent: `setsid` and a double fork.
fn detached_writer(tok: &str) -> String {
    format!("(setsid sh -c 'trap \"\" TERM HUP; while :; do echo tick {tok}; sleep 0.05; done' &)")
}

/// Longest a turn may take to end once stopped, before the test calls it
/// hung (a bound on a failure, not a timing assertion).
const HUNG: std::time::Duration = std::time::Duration::from_secs(60);

/// Without cgroups only the process tree ties the agent's processes to the
/// turn. An agent that ignores SIGTERM leaves a detached daemon (setsid,
/// double fork, ignoring SIGTERM) writing to stdout; the turn is cancelled:
/// after the grace every process of the tree is killed, the daemon too, so
/// the output reaches EOF and the turn ends.
async fn without_cgroups_a_detached_writer_dies_with_its_turn(mode: Mode) {
    let h = Harness::start_with(mode, |cfg| cfg.cgroups = CgroupPolicy::Off).await;
    let tok = token();
    let _survivors = Survivors(format!("tick {tok}"));
    let script = format!("trap '' TERM; {}; sleep {tok}", detached_writer(&tok));
    let session = format!("tree-{}", mode.as_str());
    let mut t = h.turn(start(&session, &script)).await.expect("turn");
    let mut seen = Outcome::default();
    t.wait_stdout(&format!("tick {tok}"), &mut seen).await;
    let mut client = h.client().await;
    client
        .cancel_turn(pb::SessionRef {
            session_id: session.clone(),
        })
        .await
        .expect("cancel");
    tokio::time::timeout(HUNG, t.collect_into(&mut seen))
        .await
        .expect("the turn never ended: a survivor holds its stdout");
    assert_eq!(seen.reason(), Reason::Cancelled, "{:?}", seen.exited);
    assert_eq!(
        pids_with(&format!("tick {tok}")),
        Vec::<i32>::new(),
        "the detached writer survived the turn"
    );
    assert_eq!(pids_with(&format!("sleep {tok}")), Vec::<i32>::new());
    assert!(
        !seen.exited().message.contains("output was cut"),
        "{:?}",
        seen.exited
    );
    h.stop().await;
}

/// Direct mode without cgroups: an agent that kills its own shim (it runs
/// with the broker's uid there) takes its processes out of the turn's tree,
/// to the host's init. One of them keeps stdout busy (`yes`, faster than
/// this executor reads) and never ends. It cannot hold the turn: once the
/// jail is gone the drain has a hard deadline, then the turn ends with what
/// was read and its `Exited` says the output was cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cgroups_an_escaped_writer_cannot_hold_its_turn_open() {
    let h = Harness::start_with(Mode::Direct, |cfg| cfg.cgroups = CgroupPolicy::Off).await;
    let tok = token();
    let _survivors = Survivors(format!("yes escaped-{tok}"));
    let script = format!("(setsid yes escaped-{tok} &); kill -9 $PPID; sleep {tok}");
    let mut t = h.turn(start("escape", &script)).await.expect("turn");
    t.close_stdin().await;
    let read = async {
        let mut seen = Outcome::default();
        let mut stdout = 0usize;
        while let Some(ev) = t.events.next().await {
            match ev.expect("event").kind {
                // Counted, not kept: the writer never stops.
                Some(pb::turn_event::Kind::Stdout(b)) => stdout += b.len(),
                Some(pb::turn_event::Kind::Exited(e)) => seen.exited = Some(e),
                Some(pb::turn_event::Kind::Started(s)) => seen.started = Some(s),
                _ => {}
            }
            // Pacing, not synchronisation: an executor slower than `yes`.
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        (seen, stdout)
    };
    let (seen, stdout) = tokio::time::timeout(HUNG, read)
        .await
        .expect("the turn never ended: the escaped writer holds its stdout");
    let exited = seen.exited();
    assert!(exited.message.contains("output was cut"), "{exited:?}");
    assert_eq!(exited.stdout_bytes, stdout as u64);
    assert!(stdout > 0);
    assert!(entries(&h.state().join("turns")).is_empty());
    h.stop().await;
}

/// The daemon without cgroups adopts orphans (a child subreaper): an agent
/// that kills its own shim in direct mode cuts its processes loose from
/// the turn's tree, but they come to the broker, not to the host's init,
/// and die with the turn: a detached `yes` writing stdout and the agent's
/// own shell are gone by the time `Exited` arrives, and the turn ends on
/// its own (its output was not cut by the drain's deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cgroups_the_daemon_kills_what_an_agent_cut_loose_from_its_shim() {
    let dir = tempdir();
    let cfg = dir.path().join("broker.toml");
    std::fs::write(&cfg, "cgroups = \"off\"\n").expect("config");
    let mut d = Daemon::spawn_args(
        Mode::Direct,
        &dir.path().join("state"),
        &dir.path().join("daemon.sock"),
        &["--config".as_ref(), cfg.as_os_str()],
        &[],
    );
    let client = d.ready().await;
    let tok = token();
    let _survivors = (
        Survivors(format!("yes loose-{tok}")),
        Survivors(format!("sleep {tok}")),
    );
    let script = format!(
        "(setsid yes loose-{tok} > /dev/null &); (setsid sh -c 'echo loose-{tok}; sleep {tok}' &); kill -9 $PPID; sleep {tok}"
    );
    let t = Turn::start(client, start("loose", &script))
        .await
        .expect("turn");
    t.close_stdin().await;
    let seen = tokio::time::timeout(HUNG, t.collect())
        .await
        .expect("the turn never ended");
    let exited = seen.exited();
    assert!(!exited.message.contains("output was cut"), "{exited:?}");
    assert_eq!(pids_with(&format!("yes loose-{tok}")), Vec::<i32>::new());
    assert_eq!(pids_with(&format!("sleep {tok}")), Vec::<i32>::new());
    // Nothing of the turn is left as a zombie of the daemon either.
    let zombies: Vec<String> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|s| s.contains(&format!(") Z {} ", d.child.id())))
        .collect();
    assert_eq!(zombies, Vec::<String>::new());
    d.signal(Signal::SIGTERM);
    assert!(d.wait().await.success());
}
