//! The stdio relay and how a turn reports its end.

use super::harness::*;
use crate::both_modes;
use turnstile_broker::config::Mode;
use turnstile_proto::v1 as pb;

both_modes!(
    ten_mib_of_output_arrives_whole_before_exited,
    stdin_stdout_and_stderr_are_relayed,
    exit_code_and_signal_are_reported,
    interrupt_and_terminate_reach_the_agent,
    exec_failure_is_spawn_failed,
    started_reports_paths_and_isolation,
);

async fn ten_mib_of_output_arrives_whole_before_exited(mode: Mode) {
    let h = Harness::start(mode).await;
    // seq 1..1_300_000 is 9.3 MB of distinct lines: order and loss show.
    let o = h
        .run(start(
            "big",
            "seq 1 1300000; head -c 10485760 /dev/zero | tr '\\0' z >&2",
        ))
        .await;
    o.assert_exited_ok();
    let expected: String = (1..=1_300_000).map(|i| format!("{i}\n")).collect();
    assert_eq!(o.stdout.len(), expected.len());
    assert!(o.stdout == expected.as_bytes(), "stdout differs from seq");
    assert_eq!(o.stderr.len(), 10 * 1024 * 1024);
    assert!(o.stderr.iter().all(|b| *b == b'z'));
    assert_eq!(o.exited().stdout_bytes, expected.len() as u64);
    assert_eq!(o.exited().stderr_bytes, 10 * 1024 * 1024);
    assert_eq!(o.order.first(), Some(&"started"));
    h.stop().await;
}

async fn stdin_stdout_and_stderr_are_relayed(mode: Mode) {
    let h = Harness::start(mode).await;
    let t = h
        .turn(start("io", "cat; echo to-err > /dev/stderr; exit 0"))
        .await
        .expect("turn");
    let payload: Vec<u8> = (0..300_000u32).flat_map(|i| i.to_le_bytes()).collect();
    for chunk in payload.chunks(50_000) {
        t.stdin(chunk).await;
    }
    t.close_stdin().await;
    let o = t.collect().await;
    o.assert_exited_ok();
    assert!(o.stdout == payload, "stdin bytes came back changed");
    assert_eq!(o.stderr(), "to-err\n");
    assert_eq!(o.exited().stdin_bytes, payload.len() as u64);
    h.stop().await;
}

async fn exit_code_and_signal_are_reported(mode: Mode) {
    let h = Harness::start(mode).await;
    let o = h.run(start("codes", "exit 7")).await;
    assert_eq!((o.reason(), o.code()), (Reason::Exited, Some(7)));
    let o = h.run(start("codes", "kill -KILL $$")).await;
    assert_eq!((o.reason(), o.signal()), (Reason::Killed, Some(9)));
    let o = h.run(start("codes", "kill -SEGV $$")).await;
    assert_eq!((o.reason(), o.signal()), (Reason::Killed, Some(11)));
    h.stop().await;
}

async fn interrupt_and_terminate_reach_the_agent(mode: Mode) {
    let h = Harness::start(mode).await;
    let script = "trap 'echo got-int' INT; trap 'echo got-term; exit 9' TERM; \
                  echo ready; while :; do sleep 0.05; done";
    let mut t = h.turn(start("sig", script)).await.expect("turn");
    let mut seen = Outcome::default();
    t.wait_stdout("ready", &mut seen).await;
    t.signal(pb::signal_request::Signal::Interrupt).await;
    t.wait_stdout("got-int", &mut seen).await;
    t.signal(pb::signal_request::Signal::Terminate).await;
    t.collect_into(&mut seen).await;
    assert!(seen.stdout().contains("got-term"), "{}", seen.stdout());
    assert_eq!((seen.reason(), seen.code()), (Reason::Exited, Some(9)));
    h.stop().await;
}

async fn exec_failure_is_spawn_failed(mode: Mode) {
    let h = Harness::start(mode).await;
    let o = h
        .run(pb::Start {
            session_id: "nope".into(),
            argv: vec!["/no/such/agent".into()],
            ..Default::default()
        })
        .await;
    assert_eq!(o.reason(), Reason::SpawnFailed);
    assert!(
        o.started.is_none(),
        "no started for an agent that never ran"
    );
    assert!(
        o.exited().message.contains("/no/such/agent"),
        "{}",
        o.exited().message
    );
    assert!(entries(&h.state().join("turns")).is_empty());
    // A missing cwd is refused by the shim, inside the session.
    let o = h
        .run(pb::Start {
            cwd: "missing/dir".into(),
            ..start("nope", "true")
        })
        .await;
    assert_eq!(o.reason(), Reason::SpawnFailed);
    assert!(
        o.exited().message.contains("missing/dir"),
        "{}",
        o.exited().message
    );
    h.stop().await;
}

async fn started_reports_paths_and_isolation(mode: Mode) {
    let h = Harness::start(mode).await;
    let o = h
        .run(pb::Start {
            cwd: "sub".into(),
            ..start("paths", "true")
        })
        .await;
    // cwd "sub" does not exist yet: create it, then run there.
    assert_eq!(o.reason(), Reason::SpawnFailed);
    h.run(start("paths", "mkdir -p sub"))
        .await
        .assert_exited_ok();
    let o = h
        .run(pb::Start {
            cwd: "sub".into(),
            ..start("paths", "echo $HOME; pwd")
        })
        .await;
    o.assert_exited_ok();
    let s = o.started.as_ref().expect("started");
    let iso = s.isolation.as_ref().expect("isolation");
    match mode {
        Mode::Nsjail => {
            assert_eq!(s.mode, pb::Mode::Nsjail as i32);
            assert_eq!(
                (s.home.as_str(), s.work_dir.as_str()),
                ("/home/agent", "/work")
            );
            assert_eq!(s.cwd, "/work/sub");
            assert_eq!(o.stdout(), "/home/agent\n/work/sub\n");
            assert_eq!(iso.pid, 1);
            assert_eq!(iso.uid, 1000);
            assert_eq!(
                iso.uid_map.split_whitespace().collect::<Vec<_>>(),
                ["1000", "100000", "1"]
            );
            assert_eq!(iso.net_interfaces, ["lo"]);
            assert!(iso.no_new_privs && iso.root_read_only);
        }
        Mode::Direct => {
            assert_eq!(s.mode, pb::Mode::Direct as i32);
            let home = h.state().join("sessions/paths/home");
            assert_eq!(s.home, home.to_string_lossy());
            assert_eq!(
                o.stdout(),
                format!(
                    "{}\n{}\n",
                    home.display(),
                    h.state().join("sessions/paths/work/sub").display()
                )
            );
        }
    }
    h.stop().await;
}
