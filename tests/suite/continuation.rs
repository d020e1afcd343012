//! Sessions across turns and brokers: the durable approval continuation,
//! fork, export/import (including hostile archives) and garbage collection.

use super::harness::*;
use crate::both_modes;
use nix::sys::signal::Signal;
use tokio_stream::StreamExt;
use tonic::Code;
use turnstile_broker::config::Mode;
use turnstile_proto::v1 as pb;
use turnstile_proto::v1::broker_client::BrokerClient;

both_modes!(
    approval_continuation_resumes_on_another_broker,
    fork_copies_and_then_diverges
);

/// A stand-in agent that keeps its conversation the way Claude Code does:
/// under $HOME, keyed by its cwd.
const AGENT: &str = r#"key=$(pwd | tr / -); mkdir -p "$HOME/.claude/projects/$key"; h="$HOME/.claude/projects/$key/history.jsonl"
if [ "$1" = resume ]; then cat "$h"; echo '{"role":"assistant","text":"deploying"}' >> "$h"; echo resumed-ok
else echo '{"role":"user","text":"deploy to prod"}' >> "$h"; echo '{"role":"assistant","text":"need approval"}' >> "$h"; echo APPROVAL_REQUIRED; cat >/dev/null; fi"#;

fn agent_start(session: &str, mode: &str) -> pb::Start {
    pb::Start {
        session_id: session.into(),
        argv: vec![
            "/bin/sh".into(),
            "-c".into(),
            AGENT.into(),
            "agent".into(),
            mode.into(),
        ],
        ..Default::default()
    }
}

pub(super) async fn export(
    client: &mut BrokerClient<tonic::transport::Channel>,
    id: &str,
) -> Vec<u8> {
    let mut s = client
        .export_session(pb::SessionRef {
            session_id: id.into(),
        })
        .await
        .expect("export")
        .into_inner();
    let mut out = Vec::new();
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c.expect("chunk").data);
    }
    out
}

pub(super) async fn import(
    client: &mut BrokerClient<tonic::transport::Channel>,
    id: &str,
    archive: Vec<u8>,
) -> Result<pb::SessionInfo, tonic::Status> {
    let mut msgs = vec![pb::ImportSessionRequest {
        session_id: id.into(),
        data: bytes::Bytes::new(),
    }];
    for chunk in archive.chunks(100_000) {
        msgs.push(pb::ImportSessionRequest {
            session_id: String::new(),
            data: bytes::Bytes::copy_from_slice(chunk),
        });
    }
    client
        .import_session(tokio_stream::iter(msgs))
        .await
        .map(|r| r.into_inner())
}

async fn approval_continuation_resumes_on_another_broker(mode: Mode) {
    let dir = tempdir();
    let mut d1 = Daemon::spawn_at(
        mode,
        &dir.path().join("state1"),
        &dir.path().join("b1.sock"),
        &[],
    );
    let mut c1 = d1.ready().await;
    // Turn 1 asks for approval and waits; the executor ends the turn.
    let mut t = Turn::start(c1.clone(), agent_start("wf-42", "first"))
        .await
        .expect("turn 1");
    let mut seen = Outcome::default();
    t.wait_stdout("APPROVAL_REQUIRED", &mut seen).await;
    t.close_stdin().await;
    t.collect_into(&mut seen).await;
    seen.assert_exited_ok();
    // The workflow keeps the session durably, and broker 1 goes away.
    let archive = export(&mut c1, "wf-42").await;
    assert!(!archive.is_empty());
    d1.signal(Signal::SIGTERM);
    assert!(d1.wait().await.success());
    // Hours later, another broker with a new, empty state dir resumes it.
    // In nsjail mode the agent's paths (/home/agent, /work) do not depend
    // on the state dir at all. Direct mode uses host paths, so there the new
    // broker's state dir sits at the same path (as /var/lib/turnstile does on
    // every worker) — the old one is gone entirely first.
    let state2 = match mode {
        Mode::Nsjail => dir.path().join("state2"),
        Mode::Direct => {
            std::fs::remove_dir_all(dir.path().join("state1")).expect("old worker gone");
            dir.path().join("state1")
        }
    };
    let mut d2 = Daemon::spawn_at(mode, &state2, &dir.path().join("b2.sock"), &[]);
    let mut c2 = d2.ready().await;
    let info = import(&mut c2, "wf-42", archive).await.expect("import");
    assert_eq!(info.turn_count, 1, "history of the session travels with it");
    let t = Turn::start(c2.clone(), agent_start("wf-42", "resume"))
        .await
        .expect("turn 2");
    t.close_stdin().await;
    let o = t.collect().await;
    o.assert_exited_ok();
    assert_eq!(
        o.stdout(),
        "{\"role\":\"user\",\"text\":\"deploy to prod\"}\n{\"role\":\"assistant\",\"text\":\"need approval\"}\nresumed-ok\n"
    );
    d2.signal(Signal::SIGTERM);
    assert!(d2.wait().await.success());
}

async fn fork_copies_and_then_diverges(mode: Mode) {
    let h = Harness::start(mode).await;
    let mut c = h.client().await;
    h.run(start("parent", "echo base > $HOME/f; echo w > w.txt"))
        .await
        .assert_exited_ok();
    let info = c
        .fork_session(pb::ForkSessionRequest {
            source_session_id: "parent".into(),
            new_session_id: "child".into(),
        })
        .await
        .expect("fork")
        .into_inner();
    assert_eq!(info.session_id, "child");
    let o = h
        .run(start("child", "cat $HOME/f w.txt; echo child > $HOME/f"))
        .await;
    o.assert_exited_ok();
    assert_eq!(o.stdout(), "base\nw\n");
    h.run(start("parent", "echo parent >> $HOME/f"))
        .await
        .assert_exited_ok();
    assert_eq!(
        h.run(start("parent", "cat $HOME/f")).await.stdout(),
        "base\nparent\n"
    );
    assert_eq!(
        h.run(start("child", "cat $HOME/f")).await.stdout(),
        "child\n"
    );
    // The new id must be free; the source must exist and be idle.
    let err = c
        .fork_session(pb::ForkSessionRequest {
            source_session_id: "parent".into(),
            new_session_id: "child".into(),
        })
        .await
        .expect_err("exists");
    assert_eq!(err.code(), Code::AlreadyExists);
    let mut t = h
        .turn(start("parent", "echo ready; cat"))
        .await
        .expect("turn");
    let mut seen = Outcome::default();
    t.wait_stdout("ready", &mut seen).await;
    let err = c
        .fork_session(pb::ForkSessionRequest {
            source_session_id: "parent".into(),
            new_session_id: "other".into(),
        })
        .await
        .expect_err("busy");
    assert_eq!(err.code(), Code::FailedPrecondition);
    t.close_stdin().await;
    t.collect_into(&mut seen).await;
    assert!(!h.state().join("sessions/other").exists());
    let hidden: Vec<String> = entries(&h.state().join("sessions"))
        .into_iter()
        .filter(|e| e.starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "no staging left: {hidden:?}");
    h.stop().await;
}

/// A tar entry with a raw name and link target (tar's builder refuses
/// hostile names and normalises link targets).
pub(super) fn raw_entry(
    b: &mut tar::Builder<Vec<u8>>,
    path: &str,
    kind: tar::EntryType,
    link: Option<&str>,
    data: &[u8],
) {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(if kind == tar::EntryType::Directory {
        0o755
    } else {
        0o644
    });
    h.set_entry_type(kind);
    h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
    if let Some(l) = link {
        h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
    }
    h.set_cksum();
    b.append(&h, data).expect("append");
}

pub(super) fn archive(f: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    f(&mut b);
    b.into_inner().expect("tar")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_imports_are_refused_and_leave_nothing() {
    let h = Harness::start_with(Mode::Direct, |c| c.import_max_bytes = 1 << 20).await;
    let mut c = h.client().await;
    let good = archive(|b| raw_entry(b, "home/ok", tar::EntryType::Regular, None, &[1u8; 10_000]));
    let cases: Vec<(Vec<u8>, Code, &str)> = vec![
        (
            archive(|b| raw_entry(b, "home/../../x", tar::EntryType::Regular, None, b"x")),
            Code::InvalidArgument,
            "'..'",
        ),
        (
            archive(|b| raw_entry(b, "/etc/x", tar::EntryType::Regular, None, b"x")),
            Code::InvalidArgument,
            "absolute",
        ),
        (
            archive(|b| {
                raw_entry(b, "home/etc", tar::EntryType::Symlink, Some("/etc"), b"");
                raw_entry(b, "home/etc/passwd", tar::EntryType::Regular, None, b"x");
            }),
            Code::InvalidArgument,
            "a parent is a link",
        ),
        (
            archive(|b| {
                raw_entry(
                    b,
                    "home/big",
                    tar::EntryType::Regular,
                    None,
                    // Real data: all-zero blocks would be holes, free.
                    &vec![1u8; 2 << 20],
                )
            }),
            Code::ResourceExhausted,
            "cap",
        ),
        (good[..1024].to_vec(), Code::InvalidArgument, "corrupt"),
    ];
    for (bytes, code, want) in cases {
        let err = import(&mut c, "hostile", bytes).await.expect_err(want);
        assert_eq!(err.code(), code, "{want}: {err:?}");
        assert!(err.message().contains(want), "{want}: {}", err.message());
        assert!(!h.state().join("sessions/hostile").exists());
        assert_eq!(
            entries(&h.state().join("sessions")),
            Vec::<String>::new(),
            "nothing left"
        );
        assert!(!std::path::Path::new("/etc/x").exists());
    }
    // A good one imports; importing over it is refused.
    import(&mut c, "hostile", good.clone())
        .await
        .expect("good archive");
    let err = import(&mut c, "hostile", good).await.expect_err("exists");
    assert_eq!(err.code(), Code::AlreadyExists);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_removes_idle_sessions_but_never_a_running_one() {
    let h = Harness::start_with(Mode::Direct, |c| {
        c.session_ttl_ms = Some(1);
        c.gc_interval_ms = 3_600_000;
    })
    .await;
    let mut c = h.client().await;
    h.run(start("idle-1", "true")).await.assert_exited_ok();
    h.run(start("idle-2", "true")).await.assert_exited_ok();
    let mut t = h
        .turn(start("busy", "echo ready; cat"))
        .await
        .expect("turn");
    let mut seen = Outcome::default();
    t.wait_stdout("ready", &mut seen).await;
    let dry = c
        .gc_sessions(pb::GcRequest { dry_run: true })
        .await
        .expect("dry")
        .into_inner();
    assert_eq!(dry.sessions, ["idle-1", "idle-2"]);
    assert!(
        h.state().join("sessions/idle-1").exists(),
        "dry run deletes nothing"
    );
    let done = c
        .gc_sessions(pb::GcRequest { dry_run: false })
        .await
        .expect("gc")
        .into_inner();
    assert_eq!(done.sessions, ["idle-1", "idle-2"]);
    assert_eq!(entries(&h.state().join("sessions")), ["busy"]);
    t.close_stdin().await;
    t.collect_into(&mut seen).await;
    seen.assert_exited_ok();
    h.stop().await;
}
