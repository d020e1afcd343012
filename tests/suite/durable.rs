//! Durable turns: a turn outlives its executor's stream for its detach
//! grace, an executor attaches again and gets every event after the `seq` it
//! has, a `Start` with a known key attaches or replays instead of running
//! the agent twice, and a broker restart leaves an answer (`broker_restart`).

use super::harness::*;
use crate::both_modes;
use nix::sys::signal::Signal;
use tokio_stream::StreamExt;
use turnstile_broker::config::Mode;
use turnstile_proto::v1 as pb;

both_modes!(
    an_executor_killed_three_times_mid_turn_loses_no_line_and_sees_one_exited,
    a_start_with_a_known_key_attaches_or_replays_and_never_runs_the_agent_twice,
    an_executor_that_does_not_come_back_within_the_grace_gets_the_turn_cancelled,
    with_the_journal_full_and_no_executor_the_agent_waits_and_nothing_is_lost,
    a_turn_running_when_the_broker_was_killed_answers_broker_restart,
    bad_attaches_get_precise_statuses_and_change_nothing,
    an_llm_response_cut_by_a_vanished_executor_is_a_clean_error_and_the_retry_succeeds,
    the_client_resumes_a_broken_stream_by_itself,
    turnstile_attach_replays_a_turn_from_the_terminal,
);

/// A `Start` with a key and a detach grace of a minute.
fn durable(session: &str, key: &str, script: &str) -> pb::Start {
    pb::Start {
        turn_key: key.to_string(),
        detach_grace_ms: Some(60_000),
        ..start(session, script)
    }
}

fn attach(session: &str, key: &str, after_seq: u64) -> pb::Attach {
    pb::Attach {
        session_id: session.to_string(),
        turn_key: key.to_string(),
        after_seq,
        ..Default::default()
    }
}

/// The expected output of `seq 1 n`.
fn numbered(n: u32) -> String {
    (1..=n).map(|i| format!("{i}\n")).collect()
}

async fn an_executor_killed_three_times_mid_turn_loses_no_line_and_sees_one_exited(mode: Mode) {
    let h = Harness::start(mode).await;
    // Five chunks of 10,000 numbered lines; after each, a note on stderr,
    // and the agent waits for a line on stdin from whichever executor is
    // attached by then.
    let script = "for c in 1 2 3 4 5; do seq $((c*10000-9999)) $((c*10000)); \
                  echo chunk $c >&2; read x || exit 9; done";
    let mut seen = Outcome::default();
    let mut t = h
        .turn(durable("kill3", "kill3-key", script))
        .await
        .expect("turn");
    for c in 1..=5 {
        t.wait_stderr(&format!("chunk {c}"), &mut seen).await;
        if c <= 3 {
            // The executor dies mid-turn (its stream and connection go),
            // and a new one attaches with the last seq it has.
            drop(t);
            let after = *seen.seqs.last().expect("events seen");
            t = Turn::attach(h.client().await, attach("kill3", "kill3-key", after))
                .await
                .expect("reattach");
        }
        t.stdin(b"go\n").await;
    }
    t.collect_into(&mut seen).await;
    seen.assert_exited_ok();
    assert_eq!(seen.stdout(), numbered(50_000), "each line once, in order");
    assert_eq!(
        seen.stderr(),
        "chunk 1\nchunk 2\nchunk 3\nchunk 4\nchunk 5\n"
    );
    let expected: Vec<u64> = (1..=seen.seqs.len() as u64).collect();
    assert_eq!(
        seen.seqs, expected,
        "seqs are 1, 2, 3 … with no gap or repeat"
    );
    assert_eq!(seen.order.iter().filter(|k| **k == "started").count(), 1);
    h.stop().await;
}

async fn a_start_with_a_known_key_attaches_or_replays_and_never_runs_the_agent_twice(mode: Mode) {
    let h = Harness::start(mode).await;
    let tok = token();
    let script = format!("echo pid $$; read x; echo bye {tok}");
    let mut first = h.turn(durable("twice", "k1", &script)).await.expect("turn");
    let mut a = Outcome::default();
    first.wait_stdout("pid ", &mut a).await;
    // The same key again while it runs: the same turn, not a second agent.
    let mut second = h
        .turn(durable("twice", "k1", &script))
        .await
        .expect("attach by key");
    let mut b = Outcome::default();
    second.wait_stdout("pid ", &mut b).await;
    assert_eq!(a.stdout(), b.stdout(), "the same agent (same pid line)");
    assert_eq!(
        a.started.as_ref().map(|s| &s.turn_id),
        b.started.as_ref().map(|s| &s.turn_id)
    );
    assert_eq!(
        pids_with(&format!("bye {tok}")).len(),
        1,
        "one agent process"
    );
    // The first stream was taken over.
    match first.events.next().await {
        Some(Err(s)) => assert_eq!(s.code(), tonic::Code::Aborted, "{s:?}"),
        other => panic!("the first stream must end ABORTED, got {other:?}"),
    }
    second.stdin(b"\n").await;
    second.collect_into(&mut b).await;
    b.assert_exited_ok();
    // Once it ended: the same key replays the same events.
    let replay = h
        .turn(durable("twice", "k1", &script))
        .await
        .expect("replay");
    let c = replay.collect().await;
    assert_eq!(c.stdout(), b.stdout());
    assert_eq!(c.seqs, b.seqs);
    assert_eq!(c.exited, b.exited);
    // The same key with another command is refused, naming the key.
    let other = durable("twice", "k1", "echo something else");
    let Err(err) = h.turn(other).await else {
        panic!("a start with the key and another command must be refused")
    };
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");
    assert!(err.message().contains("turn key k1"), "{err:?}");
    // Nothing ran for the refused start: the session's last turn is still
    // the first one.
    let info = h
        .client()
        .await
        .get_session(pb::SessionRef {
            session_id: "twice".into(),
        })
        .await
        .expect("session")
        .into_inner();
    assert_eq!(info.turn_count, 1);
    h.stop().await;
}

async fn an_executor_that_does_not_come_back_within_the_grace_gets_the_turn_cancelled(mode: Mode) {
    let h = Harness::start(mode).await;
    let tok = token();
    let first = pb::Start {
        detach_grace_ms: Some(300),
        ..durable("grace", "g1", &format!("echo ready; sleep {tok}"))
    };
    let mut t = h.turn(first).await.expect("turn");
    let mut seen = Outcome::default();
    t.wait_stdout("ready", &mut seen).await;
    drop(t);
    // The next turn of the session waits for the lease: it runs once the
    // first ended, which only the grace can end.
    let next = pb::Start {
        lease: Some(pb::Lease {
            policy: pb::lease::Policy::Wait as i32,
            wait_ms: 60_000,
        }),
        ..start("grace", "echo next")
    };
    let next = h.turn(next).await.expect("next turn admitted");
    assert_eq!(pids_with(&format!("sleep {tok}")), Vec::<i32>::new());
    next.close_stdin().await;
    next.collect().await.assert_exited_ok();
    let o = Turn::attach(h.client().await, attach("grace", "g1", 0))
        .await
        .expect("attach to the ended turn")
        .collect()
        .await;
    assert_eq!(o.reason(), Reason::Cancelled, "{:?}", o.exited);
    assert_eq!(
        o.exited().message,
        "executor did not reattach within 300 ms"
    );
    assert_eq!(o.stdout(), "ready\n");
    h.stop().await;
}

async fn with_the_journal_full_and_no_executor_the_agent_waits_and_nothing_is_lost(mode: Mode) {
    let cap = 1u64 << 20;
    let h = Harness::start_with(mode, |c| c.journal_max_bytes = cap).await;
    let total = 40u64 << 20;
    let script = format!("head -c {total} /dev/zero | tr '\\0' x; echo written >&2");
    let mut t = h.turn(durable("full", "f1", &script)).await.expect("turn");
    let mut seen = Outcome::default();
    while seen.started.is_none() {
        let ev = t.events.next().await.expect("event").expect("event");
        record(&mut seen, ev);
    }
    let turn_id = seen.started.as_ref().expect("started").turn_id.clone();
    drop(t);
    // Detached: the agent writes until the journal holds its cap of events
    // no executor has taken, then blocks on its pipe.
    let journal = h
        .state()
        .join("journals/full")
        .join(format!("{turn_id}.journal"));
    let mut changed = journal_grows(&journal, cap).await;
    assert!(changed >= cap, "the journal filled: {changed}");
    let running = h.broker.active_turn_of("full");
    assert!(running.is_some(), "the agent waits; it is not killed");
    // An executor attaches and drains it: every byte, then the end.
    let o = Turn::attach(h.client().await, attach("full", "f1", 1))
        .await
        .expect("attach")
        .collect()
        .await;
    o.assert_exited_ok();
    assert_eq!(o.stdout.len() as u64, total);
    assert!(o.stdout.iter().all(|b| *b == b'x'));
    assert_eq!(o.stderr(), "written\n");
    assert_eq!(o.exited().stdout_bytes, total);
    changed = std::fs::metadata(&journal)
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.blocks() * 512
        })
        .expect("journal");
    // It keeps its cap, or what an executor may not have received of what
    // its stream took (16 MiB), with a MiB of granularity: not the output.
    let bound = cap.max(16 << 20) + (2 << 20);
    assert!(
        changed <= bound,
        "the journal keeps about its window on disk: {changed}"
    );
    h.stop().await;
}

/// Waits until the journal at `path` holds at least `size` bytes of
/// records: its length, polled as the agent writes (the condition is the
/// journal's own; no fixed delay).
async fn journal_grows(path: &std::path::Path, size: u64) -> u64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        if len >= size {
            return len;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "journal {} stayed at {len} bytes",
            path.display()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

async fn a_turn_running_when_the_broker_was_killed_answers_broker_restart(mode: Mode) {
    let dir = tempdir();
    let _mounts = Unmount(dir.path().to_path_buf());
    let mut d = Daemon::spawn(mode, dir.path(), &[]);
    let client = d.ready().await;
    let tok = token();
    let mut t = Turn::start(
        client,
        durable("restart", "r1", &format!("echo ready; sleep {tok}")),
    )
    .await
    .expect("turn");
    let mut seen = Outcome::default();
    t.wait_stdout("ready", &mut seen).await;
    d.signal(Signal::SIGKILL);
    let (state, socket) = (d.state.clone(), d.socket.clone());
    let _ = d.wait().await;
    let mut d2 = Daemon::spawn_at(mode, &state, &socket, &[]);
    let client = d2.ready().await;
    let o = Turn::attach(client.clone(), attach("restart", "r1", 0))
        .await
        .expect("attach after the restart")
        .collect()
        .await;
    assert_eq!(o.reason(), Reason::BrokerRestart, "{:?}", o.exited);
    assert_eq!(o.stdout(), "ready\n", "the events up to the kill are kept");
    assert_eq!(
        o.started.as_ref().map(|s| &s.turn_id),
        seen.started.as_ref().map(|s| &s.turn_id)
    );
    // A `Start` with the key gets the same answer, and runs nothing.
    let again = Turn::start(
        client,
        durable("restart", "r1", &format!("echo ready; sleep {tok}")),
    )
    .await
    .expect("start by key")
    .collect()
    .await;
    assert_eq!(again.reason(), Reason::BrokerRestart);
    assert_eq!(pids_with(&format!("sleep {tok}")), Vec::<i32>::new());
    d2.signal(Signal::SIGTERM);
    assert!(d2.wait().await.success());
}

async fn bad_attaches_get_precise_statuses_and_change_nothing(mode: Mode) {
    let h = Harness::start(mode).await;
    let mut t = h
        .turn(durable("bad", "b1", "echo ready; read x; echo done"))
        .await
        .expect("turn");
    let mut seen = Outcome::default();
    t.wait_stdout("ready", &mut seen).await;
    let last = *seen.seqs.last().expect("seqs");
    let cases = [
        (
            attach("bad", "b1", last + 100),
            tonic::Code::OutOfRange,
            "past the turn's last event",
        ),
        (
            attach("bad", "nope", 0),
            tonic::Code::NotFound,
            "no turn with key nope in session bad",
        ),
        (
            attach("other", "b1", 0),
            tonic::Code::NotFound,
            "in session other",
        ),
        (
            pb::Attach {
                turn_id: "t-unknown".into(),
                ..attach("bad", "", 0)
            },
            tonic::Code::NotFound,
            "no turn t-unknown",
        ),
        (
            attach("../bad", "b1", 0),
            tonic::Code::InvalidArgument,
            "invalid session id",
        ),
        (
            attach("bad", "b 1", 0),
            tonic::Code::InvalidArgument,
            "invalid turn key",
        ),
    ];
    for (a, code, text) in cases {
        let err = Turn::attach(h.client().await, a.clone())
            .await
            .err()
            .unwrap_or_else(|| panic!("{a:?} must be refused"));
        assert_eq!(err.code(), code, "{a:?}: {err:?}");
        assert!(err.message().contains(text), "{a:?}: {err:?}");
    }
    // The turn and its stream went on untouched.
    t.stdin(b"\n").await;
    t.collect_into(&mut seen).await;
    seen.assert_exited_ok();
    assert_eq!(seen.stdout(), "ready\ndone\n");
    h.stop().await;
}

/// The agent: a streamed response it reads to the end, then (whatever
/// happened to it) one more request, whose answer it prints; as real agents
/// do, it retries a request whose connection was reset (one opened just as
/// the executor changes may be).
const LLM_AGENT: &str = concat!(
    "import http.client, os, sys, urllib.parse\n",
    "u = urllib.parse.urlparse(os.environ['ANTHROPIC_BASE_URL'])\n",
    "c = http.client.HTTPConnection(u.hostname, u.port, timeout=120)\n",
    "c.request('GET', '/v1/sse')\n",
    "r = c.getresponse()\n",
    "print('first', r.status, r.fp.readline().decode().strip(), flush=True)\n",
    "try:\n",
    "    rest = r.read()\n",
    "    print('complete', len(rest), flush=True)\n",
    "except Exception as e:\n",
    "    print('broken', type(e).__name__, flush=True)\n",
    "for attempt in range(3):\n",
    "    try:\n",
    "        c = http.client.HTTPConnection(u.hostname, u.port, timeout=120)\n",
    "        c.request('POST', '/v1/echo', body=b'x' * 1000)\n",
    "        r = c.getresponse()\n",
    "        print('retry', r.status, r.read().decode(), flush=True)\n",
    "        break\n",
    "    except (ConnectionError, http.client.HTTPException) as e:\n",
    "        print('reset', type(e).__name__, flush=True)\n",
);

async fn an_llm_response_cut_by_a_vanished_executor_is_a_clean_error_and_the_retry_succeeds(
    mode: Mode,
) {
    use turnstile_client::{CredentialHeader, ForwarderConfig, LlmForwarder};
    let h = Harness::start(mode).await;
    let upstream = super::upstream::Upstream::start().await;
    let forwarder = || {
        LlmForwarder::new(ForwarderConfig::new(
            upstream.url(),
            "sk-test",
            CredentialHeader::XApiKey,
        ))
        .expect("forwarder")
    };
    let mut s = durable("llm-cut", "c1", "");
    s.argv = vec!["python3".into(), "-c".into(), LLM_AGENT.into()];
    let mut client = h.client().await;
    let mut turn = turnstile_client::Turn::start(&mut client, s, Some(forwarder()))
        .await
        .expect("turn");
    turn.set_resume(turnstile_client::Resume::NEVER);
    let mut stdout = String::new();
    while !stdout.contains("first") {
        match turn.next().await.expect("event").expect("event").kind {
            Some(pb::turn_event::Kind::Stdout(b)) => stdout.push_str(&String::from_utf8_lossy(&b)),
            Some(pb::turn_event::Kind::Exited(e)) => panic!("ended early: {e:?} {stdout}"),
            _ => {}
        }
    }
    // The executor vanishes with the response half sent.
    let after = turn.last_seq();
    drop(turn);
    drop(client);
    // Another executor attaches; the agent's retry goes through it.
    let mut client = h.client().await;
    let attach = attach("llm-cut", "c1", after);
    let mut turn = turnstile_client::Turn::attach(&mut client, attach, Some(forwarder()))
        .await
        .expect("attach");
    let (mut exited, mut stderr) = (None, String::new());
    while let Some(ev) = turn.next().await {
        match ev.expect("event").kind {
            Some(pb::turn_event::Kind::Stdout(b)) => stdout.push_str(&String::from_utf8_lossy(&b)),
            Some(pb::turn_event::Kind::Stderr(b)) => stderr.push_str(&String::from_utf8_lossy(&b)),
            Some(pb::turn_event::Kind::Exited(e)) => exited = Some(e),
            _ => {}
        }
    }
    let exited = exited.expect("exited");
    assert_eq!(exited.reason, Reason::Exited as i32, "{exited:?}\n{stdout}");
    assert!(
        stdout.lines().any(|l| l.starts_with("broken ")),
        "the cut response must fail, not pass as complete:\n{stdout}"
    );
    assert!(
        !stdout.lines().any(|l| l.starts_with("complete ")),
        "{stdout}"
    );
    assert!(
        stdout.contains("retry 200 {\"len\": 1000,"),
        "the retry is answered in full:\n{stdout}\n{stderr}"
    );
    h.stop().await;
}

/// A unix-socket proxy in front of the broker whose connections the test
/// can cut (as a network or a restarted sidecar would).
struct Proxy {
    socket: std::path::PathBuf,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    fn start(dir: &std::path::Path, broker: std::path::PathBuf) -> Proxy {
        let socket = dir.join("proxy.sock");
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
        let conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> =
            std::sync::Arc::default();
        let list = conns.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let broker = broker.clone();
                let task = tokio::spawn(async move {
                    let mut upstream = tokio::net::UnixStream::connect(&broker)
                        .await
                        .expect("connect the broker");
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
                list.lock().expect("conns").push(task.abort_handle());
            }
        });
        Proxy {
            socket,
            conns,
            accept,
        }
    }

    /// Drops every connection through the proxy.
    fn cut(&self) {
        for c in self.conns.lock().expect("conns").drain(..) {
            c.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn the_client_resumes_a_broken_stream_by_itself(mode: Mode) {
    let h = Harness::start(mode).await;
    let dir = tempdir();
    let proxy = Proxy::start(dir.path(), h.socket.clone());
    let mut client = client(&proxy.socket).await;
    let start = durable("resume", "", "seq 1 1600000; echo done >&2");
    let mut turn = turnstile_client::Turn::start(&mut client, start, None)
        .await
        .expect("turn");
    let (mut stdout, mut stderr, mut exited) = (Vec::new(), String::new(), None);
    // The connection breaks under the client twice while the output flows
    // (after its first bytes, then past 5 MB; each time more is left than
    // the stream's 4 MiB window holds); it attaches again from the last seq
    // it returned, each time.
    let mut cuts = [1usize, 5_000_000].into_iter().peekable();
    while let Some(ev) = turn.next().await {
        match ev.expect("no error reaches the caller").kind {
            Some(pb::turn_event::Kind::Stdout(b)) => stdout.extend_from_slice(&b),
            Some(pb::turn_event::Kind::Stderr(b)) => stderr.push_str(&String::from_utf8_lossy(&b)),
            Some(pb::turn_event::Kind::Exited(e)) => exited = Some(e),
            _ => {}
        }
        if cuts.next_if(|at| stdout.len() >= *at).is_some() {
            proxy.cut();
        }
    }
    let exited = exited.expect("exited");
    assert_eq!(exited.reason, Reason::Exited as i32, "{exited:?}");
    assert_eq!(exited.status, Some(pb::exited::Status::ExitCode(0)));
    assert!(
        String::from_utf8_lossy(&stdout) == numbered(1_600_000),
        "each line once, in order ({} bytes)",
        stdout.len()
    );
    assert_eq!(stderr, "done\n");
    assert_eq!(turn.resumes(), 2, "one resume per cut");
    h.stop().await;
}

async fn turnstile_attach_replays_a_turn_from_the_terminal(mode: Mode) {
    let h = Harness::start(mode).await;
    let o = h
        .run(durable("cli-attach", "ck", "echo one; echo two; exit 3"))
        .await;
    assert_eq!(o.code(), Some(3));
    let attach = |extra: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_turnstile"));
        cmd.arg("attach")
            .arg("--socket")
            .arg(&h.socket)
            .args(["--session", "cli-attach", "--quiet"])
            .args(extra);
        cmd.output().expect("turnstile attach")
    };
    // The whole turn, by key, with the agent's exit code.
    let all = attach(&["--turn-key", "ck"]);
    assert_eq!(String::from_utf8_lossy(&all.stdout), "one\ntwo\n");
    assert_eq!(all.status.code(), Some(3));
    // After the first event (`Started`, seq 1): all of the agent's output
    // still.
    let after = attach(&["--after", "1"]);
    assert_eq!(String::from_utf8_lossy(&after.stdout), "one\ntwo\n");
    // A bad seq or an unknown key: refused (exit 125) with the reason.
    let past = attach(&["--after", "1000"]);
    assert_eq!(past.status.code(), Some(125));
    assert!(
        String::from_utf8_lossy(&past.stderr).contains("past the turn's last event"),
        "{}",
        String::from_utf8_lossy(&past.stderr)
    );
    let unknown = attach(&["--turn-key", "nope"]);
    assert_eq!(unknown.status.code(), Some(125));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_stdin_message_ends_its_stream_with_the_reason() {
    let h = Harness::start(Mode::Direct).await;
    let mut t = h
        .turn(start("big-stdin", "echo ready; cat >/dev/null"))
        .await
        .expect("turn");
    let mut seen = Outcome::default();
    t.wait_stdout("ready", &mut seen).await;
    // Over the broker's 4 MiB message cap.
    t.stdin(&vec![b'x'; 5 << 20]).await;
    let err = loop {
        match t.events.next().await {
            Some(Ok(ev)) => record(&mut seen, ev),
            Some(Err(s)) => break s,
            None => panic!("the stream ended without saying why: {seen:?}"),
        }
    };
    assert!(
        err.message().contains("the turn's request stream failed")
            && err.message().contains("too large"),
        "{err:?}"
    );
    // With no grace (the harness's), the turn ends with its stream; the
    // next one of the session runs once it has.
    let next = pb::Start {
        lease: Some(pb::Lease {
            policy: pb::lease::Policy::Wait as i32,
            wait_ms: 60_000,
        }),
        ..start("big-stdin", "true")
    };
    h.run(next).await.assert_exited_ok();
    let info = h
        .client()
        .await
        .get_session(pb::SessionRef {
            session_id: "big-stdin".into(),
        })
        .await
        .expect("session")
        .into_inner();
    assert_eq!(info.turn_count, 2);
    h.stop().await;
}
