//! Session operations: cancel, interrupt, get, list, delete.

use super::harness::*;
use crate::both_modes;
use tonic::Code;
use turnstile_broker::config::Mode;
use turnstile_proto::v1 as pb;

both_modes!(
    cancel_and_interrupt_reach_the_running_turn,
    sessions_are_listed_and_deleted
);

fn sref(id: &str) -> pb::SessionRef {
    pb::SessionRef {
        session_id: id.into(),
    }
}

async fn cancel_and_interrupt_reach_the_running_turn(mode: Mode) {
    let h = Harness::start(mode).await;
    let mut client = h.client().await;
    let err = client
        .cancel_turn(sref("idle"))
        .await
        .expect_err("nothing runs");
    assert_eq!(err.code(), Code::NotFound);
    // Short sleeps: the shell runs its trap when the foreground child ends.
    let script = "trap 'echo got-int' INT; echo ready; while :; do sleep 0.05; done";
    let mut t = h.turn(start("ctl", script)).await.expect("turn");
    let mut seen = Outcome::default();
    t.wait_stdout("ready", &mut seen).await;
    let turn_id = seen.started.as_ref().expect("started").turn_id.clone();
    // Interrupt: SIGINT to the agent only; it survives and goes on.
    let r = client
        .interrupt_turn(sref("ctl"))
        .await
        .expect("interrupt")
        .into_inner();
    assert_eq!(r.turn_id, turn_id);
    t.wait_stdout("got-int", &mut seen).await;
    let info = client
        .get_session(sref("ctl"))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(info.running_turn_id, turn_id);
    // Cancel: the turn ends as cancelled, nothing survives.
    client.cancel_turn(sref("ctl")).await.expect("cancel");
    t.collect_into(&mut seen).await;
    assert_eq!(seen.reason(), Reason::Cancelled, "{:?}", seen.exited);
    assert!(entries(&h.state().join("turns")).is_empty());
    let info = client
        .get_session(sref("ctl"))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(info.running_turn_id, "");
    assert_eq!(info.last_exit_reason, "cancelled");
    h.stop().await;
}

async fn sessions_are_listed_and_deleted(mode: Mode) {
    let h = Harness::start(mode).await;
    let mut client = h.client().await;
    h.run(start("s-a", "head -c 4096 /dev/zero > blob"))
        .await
        .assert_exited_ok();
    h.run(start("s-b", "true")).await.assert_exited_ok();
    h.run(start("s-b", "exit 3")).await;
    let list = client
        .list_sessions(pb::ListSessionsRequest {})
        .await
        .expect("list")
        .into_inner()
        .sessions;
    let ids: Vec<&str> = list.iter().map(|s| s.session_id.as_str()).collect();
    assert_eq!(ids, ["s-a", "s-b"]);
    assert!(list[0].disk_usage_bytes >= 4096);
    assert_eq!(list[1].turn_count, 2);
    assert_eq!(list[1].last_exit_reason, "exited");
    assert!(
        list[1].created_unix_ms > 0
            && list[1].last_turn_end_unix_ms >= list[1].last_turn_start_unix_ms
    );

    // Delete is refused while a turn runs.
    let mut t = h.turn(start("s-a", "echo ready; cat")).await.expect("turn");
    let mut seen = Outcome::default();
    t.wait_stdout("ready", &mut seen).await;
    let err = client.delete_session(sref("s-a")).await.expect_err("busy");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("session s-a is busy"),
        "{}",
        err.message()
    );
    t.close_stdin().await;
    t.collect_into(&mut seen).await;
    client.delete_session(sref("s-a")).await.expect("deleted");
    assert!(!h.state().join("sessions/s-a").exists());
    let err = client.get_session(sref("s-a")).await.expect_err("gone");
    assert_eq!(err.code(), Code::NotFound);
    let err = client.delete_session(sref("s-a")).await.expect_err("gone");
    assert_eq!(err.code(), Code::NotFound);
    let err = client.get_session(sref("../x")).await.expect_err("invalid");
    assert_eq!(err.code(), Code::InvalidArgument);
    h.stop().await;
}
