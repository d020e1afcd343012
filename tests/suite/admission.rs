//! Admission: the first message, validation, the payload cap and the
//! session lease. Every refusal has a precise status and changes nothing on
//! disk.

use super::harness::*;
use crate::both_modes;
use tonic::Code;
use turnstile_broker::config::Mode;
use turnstile_proto::v1 as pb;

both_modes!(
    second_start_for_a_busy_session_is_refused,
    different_sessions_run_concurrently,
    invalid_input_is_refused_before_disk,
    oversized_payload_is_refused_before_anything_spawns,
    first_message_must_be_start,
    waiting_lease_runs_after_the_busy_turn,
    a_waiting_lease_gives_up_at_its_deadline,
    a_running_turn_id_cannot_be_reused_in_another_session,
    limits_past_what_the_kernel_holds_are_refused,
);

async fn limits_past_what_the_kernel_holds_are_refused(mode: Mode) {
    // The broker's caps lifted: only the kernel's range is left.
    let h = Harness::start_with(mode, |c| {
        c.max_limits = turnstile_broker::config::Limits::unlimited();
    })
    .await;
    for (name, limits) in [
        (
            "wall_time_ms",
            pb::Limits {
                wall_time_ms: u64::MAX,
                ..Default::default()
            },
        ),
        (
            "max_processes",
            pb::Limits {
                max_processes: u64::MAX,
                ..Default::default()
            },
        ),
    ] {
        let s = pb::Start {
            limits: Some(limits),
            ..start("huge", "true")
        };
        let err = h.turn(s).await.expect_err(name);
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(
            err.message().contains(name) && err.message().contains("out of range"),
            "{}",
            err.message()
        );
    }
    assert!(!h.state().join("sessions/huge").exists(), "nothing on disk");
    // The broker goes on.
    h.run(start("huge", "true")).await.assert_exited_ok();
    h.stop().await;
}

async fn a_running_turn_id_cannot_be_reused_in_another_session(mode: Mode) {
    let h = Harness::start(mode).await;
    let mut c = h.client().await;
    let with_id = |session: &str| pb::Start {
        turn_id: "shared-id".into(),
        ..start(session, "echo ready; cat")
    };
    let mut first = h.turn(with_id("owner")).await.expect("first turn");
    let mut seen = Outcome::default();
    first.wait_stdout("ready", &mut seen).await;
    let err = h.turn(with_id("intruder")).await.expect_err("same turn id");
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(
        err.message().contains("shared-id") && err.message().contains("owner"),
        "{}",
        err.message()
    );
    assert!(
        !h.state().join("sessions/intruder").exists(),
        "nothing on disk"
    );
    // The first turn is still registered: listed as running, and cancellable.
    let info = c
        .get_session(pb::SessionRef {
            session_id: "owner".into(),
        })
        .await
        .expect("show")
        .into_inner();
    assert_eq!(info.running_turn_id, "shared-id");
    c.cancel_turn(pb::SessionRef {
        session_id: "owner".into(),
    })
    .await
    .expect("cancel");
    first.collect_into(&mut seen).await;
    assert_eq!(seen.reason(), pb::exited::Reason::Cancelled);
    h.stop().await;
}

async fn second_start_for_a_busy_session_is_refused(mode: Mode) {
    let h = Harness::start(mode).await;
    // Two Starts race for one session: exactly one runs.
    let script = "echo ready; read line; echo got-$line";
    let (a, b) = tokio::join!(h.turn(start("s1", script)), h.turn(start("s1", script)));
    let (mut running, refused) = match (a, b) {
        (Ok(t), Err(e)) | (Err(e), Ok(t)) => (t, e),
        (Ok(_), Ok(_)) => panic!("both turns of one session were admitted"),
        (Err(a), Err(b)) => panic!("both refused: {a:?} {b:?}"),
    };
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("session s1 is busy"),
        "{}",
        refused.message()
    );
    let mut seen = Outcome::default();
    running.wait_stdout("ready", &mut seen).await;
    // Still busy while it runs.
    let again = h.turn(start("s1", "true")).await.expect_err("busy");
    assert_eq!(again.code(), Code::FailedPrecondition);
    running.stdin(b"x\n").await;
    running.close_stdin().await;
    running.collect_into(&mut seen).await;
    seen.assert_exited_ok();
    assert!(seen.stdout().contains("got-x"));
    // Released: the next turn runs.
    h.run(start("s1", "true")).await.assert_exited_ok();
    h.stop().await;
}

async fn different_sessions_run_concurrently(mode: Mode) {
    let h = Harness::start(mode).await;
    let mut a = h.turn(start("a", "echo ready; cat")).await.expect("a");
    let mut b = h.turn(start("b", "echo ready; cat")).await.expect("b");
    let (mut sa, mut sb) = (Outcome::default(), Outcome::default());
    // Both are running at once: each answers while the other is still alive.
    a.wait_stdout("ready", &mut sa).await;
    b.wait_stdout("ready", &mut sb).await;
    a.stdin(b"from-a").await;
    b.stdin(b"from-b").await;
    a.close_stdin().await;
    b.close_stdin().await;
    a.collect_into(&mut sa).await;
    b.collect_into(&mut sb).await;
    sa.assert_exited_ok();
    sb.assert_exited_ok();
    assert_eq!(sa.stdout(), "ready\nfrom-a");
    assert_eq!(sb.stdout(), "ready\nfrom-b");
    h.stop().await;
}

async fn invalid_input_is_refused_before_disk(mode: Mode) {
    let h = Harness::start(mode).await;
    let with_env = |k: &str, v: &str| {
        let mut s = start("ok", "true");
        s.env.insert(k.into(), v.into());
        s
    };
    let cases: Vec<(pb::Start, &str)> = vec![
        (start("../x", "true"), "invalid session id \"../x\""),
        (start("a/b", "true"), "invalid session id"),
        (start("", "true"), "invalid session id"),
        (start(&"x".repeat(129), "true"), "invalid session id"),
        (with_env("BAD-KEY", "v"), "invalid env key \"BAD-KEY\""),
        (with_env("K", "a\0b"), "env value of K holds a NUL"),
        (
            with_env("K", "a\nb"),
            "env value of K holds a NUL or control",
        ),
        (with_env("HOME", "/root"), "env key HOME is protected"),
        (
            with_env("ANTHROPIC_BASE_URL", "http://x"),
            "env key ANTHROPIC_BASE_URL is protected",
        ),
        (
            pb::Start {
                session_id: "ok".into(),
                ..Default::default()
            },
            "argv is empty",
        ),
        (
            pb::Start {
                cwd: "../..".into(),
                ..start("ok", "true")
            },
            "invalid cwd",
        ),
        (
            pb::Start {
                turn_id: "../t".into(),
                ..start("ok", "true")
            },
            "invalid turn id",
        ),
        (
            pb::Start {
                limits: Some(pb::Limits {
                    wall_time_ms: u64::MAX,
                    ..Default::default()
                }),
                ..start("ok", "true")
            },
            "limit wall_time_ms",
        ),
    ];
    for (s, want) in cases {
        let err = h.turn(s).await.expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{want}: {err:?}");
        assert!(
            err.message().contains(want),
            "want {want:?}, got {:?}",
            err.message()
        );
    }
    assert!(entries(&h.state().join("sessions")).is_empty());
    assert!(entries(&h.state().join("turns")).is_empty());
    h.stop().await;
}

async fn oversized_payload_is_refused_before_anything_spawns(mode: Mode) {
    let h = Harness::start_with(mode, |c| c.max_payload_bytes = 64 * 1024).await;
    let mut s = start("big", "true");
    s.env.insert("BLOB".into(), "x".repeat(64 * 1024));
    let err = h.turn(s).await.expect_err("refused");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().contains("over the 65536-byte cap"),
        "{}",
        err.message()
    );
    assert!(entries(&h.state().join("sessions")).is_empty());
    assert!(entries(&h.state().join("turns")).is_empty());
    // Just under the cap runs.
    let mut s = start("big", "echo ${#BLOB}");
    s.env.insert("BLOB".into(), "x".repeat(60 * 1024));
    let o = h.run(s).await;
    o.assert_exited_ok();
    assert_eq!(o.stdout(), format!("{}\n", 60 * 1024));
    h.stop().await;
}

async fn first_message_must_be_start(mode: Mode) {
    let h = Harness::start(mode).await;
    let mut client = h.client().await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::TurnRequest {
        kind: Some(pb::turn_request::Kind::Stdin(bytes::Bytes::from_static(
            b"hi",
        ))),
    })
    .await
    .expect("send");
    let err = client
        .turn(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "first message must be start or attach, got stdin"
    );
    // A stream that ends before any message.
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::TurnRequest>(1);
    drop(tx);
    let err = client
        .turn(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "stream ended before start");
    h.stop().await;
}

/// A `Start` that waits up to `wait_ms` for a busy session.
fn waiting_start(session: &str, script: &str, wait_ms: u64) -> pb::Start {
    pb::Start {
        lease: Some(pb::Lease {
            policy: pb::lease::Policy::Wait as i32,
            wait_ms,
        }),
        ..start(session, script)
    }
}

async fn waiting_lease_runs_after_the_busy_turn(mode: Mode) {
    let h = Harness::start(mode).await;
    let mut first = h
        .turn(start("w", "echo ready; cat >/dev/null"))
        .await
        .expect("first");
    let mut seen = Outcome::default();
    first.wait_stdout("ready", &mut seen).await;
    let waiting = waiting_start("w", "echo second", 60_000);
    let client = h.client().await;
    let second = tokio::spawn(async move { Turn::start(client, waiting).await });
    first.close_stdin().await;
    first.collect_into(&mut seen).await;
    seen.assert_exited_ok();
    let second = second.await.expect("join").expect("admitted after wait");
    second.close_stdin().await;
    let o = second.collect().await;
    o.assert_exited_ok();
    assert_eq!(o.stdout(), "second\n");
    h.stop().await;
}

async fn a_waiting_lease_gives_up_at_its_deadline(mode: Mode) {
    let h = Harness::start(mode).await;
    let mut first = h
        .turn(start("w2", "echo ready; cat >/dev/null; echo first-done"))
        .await
        .expect("first");
    let mut seen = Outcome::default();
    first.wait_stdout("ready", &mut seen).await;
    let waiting = waiting_start("w2", "echo never", 200);
    let err = h.turn(waiting).await.expect_err("gave up");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("w2"), "{}", err.message());
    // The running turn is untouched, and the session is free after it.
    first.close_stdin().await;
    first.collect_into(&mut seen).await;
    seen.assert_exited_ok();
    assert_eq!(seen.stdout(), "ready\nfirst-done\n");
    let o = h.run(start("w2", "echo third")).await;
    o.assert_exited_ok();
    h.stop().await;
}

/// A turn admitted just before a shutdown closes admission (its task not
/// yet spawned) is counted in what the shutdown waits for, so no jail can
/// start after the broker has stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_waits_for_a_turn_admitted_before_it() {
    let h = Harness::start(Mode::Direct).await;
    assert_eq!(h.broker.tracker.len(), 0);
    let admitted = h
        .broker
        .admit("t-race", "s-race", turnstile_broker::signals())
        .expect("admitted");
    assert_eq!(
        h.broker.tracker.len(),
        1,
        "an admitted turn counts for the shutdown's wait"
    );
    drop(admitted);
    assert_eq!(h.broker.tracker.len(), 0);
    assert_eq!(
        h.broker.active_count(),
        0,
        "dropping it unregisters the turn"
    );
    h.stop().await;
}
