//! The LLM relay at the frame level: the agent's connections to its bridge
//! URL arrive as `LlmFrame`s on the turn stream, both directions, with
//! half-close, resets, caps and notices.

use super::harness::*;
use crate::both_modes;
use tokio_stream::StreamExt;
use turnstile_broker::config::Mode;
use turnstile_proto::v1 as pb;

both_modes!(
    an_agent_connection_is_relayed_both_ways_with_half_close,
    frames_for_unknown_connections_get_a_notice_and_the_turn_goes_on,
    connections_over_the_cap_are_refused,
    data_beyond_the_window_resets_only_that_connection,
    an_agent_at_its_process_limit_still_gets_its_connections_relayed,
);

/// The agent: opens `n` connections to its bridge URL, sends "ping-<i>" on
/// each, half-closes, prints what came back ("<closed>" for nothing: a
/// refused connection ends in EOF or a reset, depending on whether the
/// bridge's write of "ping-<i>" raced the broker's close).
fn agent(n: usize) -> String {
    format!(
        "python3 -c '\nimport os, socket, urllib.parse\nu = urllib.parse.urlparse(os.environ[\"ANTHROPIC_BASE_URL\"])\nsocks = []\nfor i in range({n}):\n    s = socket.create_connection((u.hostname, u.port))\n    s.sendall(b\"ping-%d\" % i)\n    s.shutdown(socket.SHUT_WR)\n    socks.append(s)\nfor s in socks:\n    got = b\"\"\n    while True:\n        try:\n            b = s.recv(65536)\n        except ConnectionResetError:\n            break\n        if not b: break\n        got += b\n    print(got.decode() or \"<closed>\", flush=True)\n'"
    )
}

fn llm(conn: u64, kind: pb::llm_frame::Kind) -> pb::turn_request::Kind {
    pb::turn_request::Kind::Llm(pb::LlmFrame {
        conn,
        kind: Some(kind),
    })
}

/// Serves the agent's connections: answers "pong:<what it sent>" on each
/// after the agent's eof, until `count` connections were served.
async fn serve(t: &mut Turn, seen: &mut Outcome, count: usize) {
    let mut got: std::collections::HashMap<u64, Vec<u8>> = Default::default();
    let mut done = 0;
    while done < count {
        let ev = t.events.next().await.expect("event").expect("ok");
        match ev.kind {
            Some(pb::turn_event::Kind::Llm(f)) => match f.kind {
                Some(pb::llm_frame::Kind::Open(_)) => {
                    got.insert(f.conn, Vec::new());
                }
                Some(pb::llm_frame::Kind::Data(b)) => {
                    got.entry(f.conn).or_default().extend_from_slice(&b)
                }
                Some(pb::llm_frame::Kind::Eof(_)) => {
                    let mut reply = b"pong:".to_vec();
                    reply.extend_from_slice(&got[&f.conn]);
                    t.send(llm(f.conn, pb::llm_frame::Kind::Data(reply.into())))
                        .await;
                    t.send(llm(f.conn, pb::llm_frame::Kind::Eof(pb::LlmEof {})))
                        .await;
                    done += 1;
                }
                // The broker grants its window back as the agent reads.
                Some(pb::llm_frame::Kind::Window(_)) => {}
                other => panic!("unexpected frame {other:?}"),
            },
            Some(pb::turn_event::Kind::Started(s)) => seen.started = Some(s),
            Some(pb::turn_event::Kind::Stderr(b)) => seen.stderr.extend_from_slice(&b),
            // The agent prints each answer as it reads it, which may be
            // before the later connections were served.
            Some(pb::turn_event::Kind::Stdout(b)) => seen.stdout.extend_from_slice(&b),
            other => panic!(
                "unexpected event before the relay finished: {other:?}; stderr {}",
                seen.stderr()
            ),
        }
    }
}

async fn an_agent_connection_is_relayed_both_ways_with_half_close(mode: Mode) {
    let h = Harness::start(mode).await;
    let mut t = h.turn(start("llm", &agent(3))).await.expect("turn");
    t.close_stdin().await;
    let mut seen = Outcome::default();
    serve(&mut t, &mut seen, 3).await;
    t.collect_into(&mut seen).await;
    seen.assert_exited_ok();
    assert_eq!(seen.stdout(), "pong:ping-0\npong:ping-1\npong:ping-2\n");
    h.stop().await;
}

async fn frames_for_unknown_connections_get_a_notice_and_the_turn_goes_on(mode: Mode) {
    let h = Harness::start(mode).await;
    let mut t = h
        .turn(start("llm-bad", &format!("read go; {}", agent(1))))
        .await
        .expect("turn");
    t.send(llm(
        99,
        pb::llm_frame::Kind::Data(bytes::Bytes::from_static(b"stray")),
    ))
    .await;
    t.send(llm(98, pb::llm_frame::Kind::Eof(pb::LlmEof {})))
        .await;
    let mut notices = Vec::new();
    while notices.len() < 2 {
        match t.events.next().await.expect("event").expect("ok").kind {
            Some(pb::turn_event::Kind::Notice(n)) => notices.push(n.message),
            Some(pb::turn_event::Kind::Started(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        notices,
        [
            "llm frame for unknown or closed connection 99",
            "llm frame for unknown or closed connection 98"
        ]
    );
    // The turn goes on: the relay still works.
    t.stdin(b"go\n").await;
    t.close_stdin().await;
    let mut seen = Outcome::default();
    serve(&mut t, &mut seen, 1).await;
    t.collect_into(&mut seen).await;
    seen.assert_exited_ok();
    assert_eq!(seen.stdout(), "pong:ping-0\n");
    h.stop().await;
}

/// The agent for the cap test: opens three connections, sends "ping-<i>" on
/// each and half-closes; the refused one is the first to end (the broker
/// closed it; the other two wait for the executor), so it waits for that,
/// prints "refused", then prints the answers of the other two.
const CAP_AGENT: &str = r#"python3 -c '
import os, select, socket, urllib.parse
u = urllib.parse.urlparse(os.environ["ANTHROPIC_BASE_URL"])
socks = []
for i in range(3):
    s = socket.create_connection((u.hostname, u.port))
    s.sendall(b"ping-%d" % i)
    s.shutdown(socket.SHUT_WR)
    socks.append(s)
def read_all(s):
    got = b""
    while True:
        try:
            b = s.recv(65536)
        except ConnectionResetError:
            return got
        if not b:
            return got
        got += b
ready, _, _ = select.select(socks, [], [], 60)
assert len(ready) == 1, ready
assert read_all(ready[0]) == b""
print("refused", flush=True)
for s in socks:
    if s is not ready[0]:
        print(read_all(s).decode(), flush=True)
'"#;

async fn connections_over_the_cap_are_refused(mode: Mode) {
    let h = Harness::start_with(mode, |c| c.llm_max_connections = 2).await;
    let mut t = h.turn(start("llm-cap", CAP_AGENT)).await.expect("turn");
    t.close_stdin().await;
    // Two connections reach the executor (open, data, eof); it answers
    // them only once the agent saw the third refused, so that both are
    // still open when the third arrives.
    let mut got: std::collections::HashMap<u64, Vec<u8>> = Default::default();
    let mut eofs = Vec::new();
    let mut seen = Outcome::default();
    while eofs.len() < 2 || !seen.stdout().contains("refused") {
        let ev = t.events.next().await.expect("event").expect("ok");
        match ev.kind {
            Some(pb::turn_event::Kind::Llm(f)) => match f.kind {
                Some(pb::llm_frame::Kind::Open(_)) => {
                    assert!(got.insert(f.conn, Vec::new()).is_none())
                }
                Some(pb::llm_frame::Kind::Data(b)) => {
                    got.entry(f.conn).or_default().extend_from_slice(&b)
                }
                Some(pb::llm_frame::Kind::Eof(_)) => eofs.push(f.conn),
                // The broker grants its window back as the agent reads.
                Some(pb::llm_frame::Kind::Window(_)) => {}
                other => panic!("unexpected frame {other:?}"),
            },
            Some(pb::turn_event::Kind::Started(s)) => seen.started = Some(s),
            Some(pb::turn_event::Kind::Stdout(b)) => seen.stdout.extend_from_slice(&b),
            Some(pb::turn_event::Kind::Stderr(b)) => seen.stderr.extend_from_slice(&b),
            other => panic!("unexpected {other:?}; stderr {}", seen.stderr()),
        }
    }
    assert_eq!(got.len(), 2, "connections admitted: {got:?}");
    for conn in eofs {
        let mut reply = b"pong:".to_vec();
        reply.extend_from_slice(&got[&conn]);
        t.send(llm(conn, pb::llm_frame::Kind::Data(reply.into())))
            .await;
        t.send(llm(conn, pb::llm_frame::Kind::Eof(pb::LlmEof {})))
            .await;
    }
    t.collect_into(&mut seen).await;
    seen.assert_exited_ok();
    let out = seen.stdout();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(lines[0], "refused");
    let mut sent: Vec<String> = got
        .values()
        .map(|b| format!("pong:{}", String::from_utf8_lossy(b)))
        .collect();
    sent.sort();
    let mut answered = vec![lines[1].to_string(), lines[2].to_string()];
    answered.sort();
    assert_eq!(answered, sent);
    h.stop().await;
}

/// The agent for the window test: opens a connection, sends "ping", waits
/// for a line on stdin, then reports what it reads from the connection.
const WINDOW_AGENT: &str = r#"python3 -c '
import os, socket, sys, urllib.parse
u = urllib.parse.urlparse(os.environ["ANTHROPIC_BASE_URL"])
s = socket.create_connection((u.hostname, u.port))
s.sendall(b"ping")
print("sent", flush=True)
sys.stdin.readline()
got = 0
try:
    while True:
        b = s.recv(65536)
        if not b:
            break
        got += len(b)
    print("eof", got, flush=True)
except ConnectionResetError:
    print("reset", got, flush=True)
'"#;

async fn data_beyond_the_window_resets_only_that_connection(mode: Mode) {
    let h = Harness::start(mode).await;
    let mut t = h
        .turn(start("llm-window", WINDOW_AGENT))
        .await
        .expect("turn");
    let mut seen = Outcome::default();
    let conn = loop {
        let ev = t.events.next().await.expect("event").expect("ok");
        match ev.kind {
            Some(pb::turn_event::Kind::Llm(f)) => {
                if let Some(pb::llm_frame::Kind::Open(_)) = f.kind {
                    break f.conn;
                }
            }
            Some(pb::turn_event::Kind::Started(s)) => seen.started = Some(s),
            Some(pb::turn_event::Kind::Stdout(b)) => seen.stdout.extend_from_slice(&b),
            other => panic!("unexpected {other:?}"),
        }
    };
    // One byte more than the window, in one frame.
    let too_much = vec![b'x'; turnstile_proto::LLM_INITIAL_WINDOW as usize + 1];
    t.send(llm(conn, pb::llm_frame::Kind::Data(too_much.into())))
        .await;
    let (mut reset, mut notice) = (None, None);
    while reset.is_none() || notice.is_none() {
        let ev = t.events.next().await.expect("event").expect("ok");
        match ev.kind {
            Some(pb::turn_event::Kind::Llm(f)) => match f.kind {
                Some(pb::llm_frame::Kind::Reset(r)) => {
                    assert_eq!(f.conn, conn);
                    reset = Some(r.reason);
                }
                // The agent's "ping" may or may not have been read first;
                // nothing of the connection follows its reset.
                Some(pb::llm_frame::Kind::Data(_)) => {
                    assert!(
                        reset.is_none(),
                        "data for connection {conn} after its reset"
                    )
                }
                other => panic!("unexpected frame {other:?}"),
            },
            Some(pb::turn_event::Kind::Notice(n)) => notice = Some(n.message),
            Some(pb::turn_event::Kind::Stdout(b)) => seen.stdout.extend_from_slice(&b),
            other => panic!("unexpected {other:?}"),
        }
    }
    let notice = notice.unwrap_or_default();
    assert!(
        notice.contains("beyond the connection's window")
            && notice.contains(&format!("connection {conn} reset")),
        "{notice}"
    );
    assert_eq!(reset.as_deref(), Some(notice.as_str()));
    // The turn goes on; the agent finds its connection ended, with none of
    // the refused bytes.
    t.stdin(b"go\n").await;
    t.close_stdin().await;
    t.collect_into(&mut seen).await;
    seen.assert_exited_ok();
    let out = seen.stdout();
    assert!(out == "sent\neof 0\n" || out == "sent\nreset 0\n", "{out}");
    h.stop().await;
}

/// In direct mode the bridge listens on the host's loopback: a process of
/// another uid that connects to it is reset before anything reaches the
/// executor; the agent's own connection is relayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_connection_to_the_direct_mode_bridge_is_refused() {
    let h = Harness::start(Mode::Direct).await;
    let dir = tempdir();
    let talk = "import socket, sys\n\
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])))\n\
        s.sendall(sys.argv[3].encode())\n\
        s.shutdown(socket.SHUT_WR)\n\
        got = b''\n\
        while True:\n\
        \x20   try:\n\
        \x20       b = s.recv(65536)\n\
        \x20   except ConnectionResetError:\n\
        \x20       break\n\
        \x20   if not b: break\n\
        \x20   got += b\n\
        print(got.decode() or '<closed>', flush=True)\n";
    let script = dir.path().join("talk.py");
    std::fs::write(&script, talk).expect("write");
    let agent = format!(
        "hp=${{ANTHROPIC_BASE_URL#http://}}; hp=${{hp%%/*}}; h=${{hp%:*}}; p=${{hp##*:}}; \
         echo intruder: $(setpriv --reuid=65534 --regid=65534 --clear-groups python3 {s} $h $p intruder); \
         echo agent: $(python3 {s} $h $p ping-0)",
        s = script.display()
    );
    let mut t = h.turn(start("bridge-uid", &agent)).await.expect("turn");
    t.close_stdin().await;
    let mut seen = Outcome::default();
    serve(&mut t, &mut seen, 1).await;
    t.collect_into(&mut seen).await;
    seen.assert_exited_ok();
    assert_eq!(
        seen.stdout(),
        "intruder: <closed>\nagent: pong:ping-0\n",
        "stderr: {}",
        seen.stderr()
    );
    h.stop().await;
}

/// The agent of the budget test: forks until it has `n` processes (itself
/// and n - 1 children, each waiting on a pipe), says whether one more fork
/// fails, then opens 3 connections to its bridge at once (as `agent`).
fn at_the_limit(n: usize) -> String {
    format!(
        "import os, socket, urllib.parse
r, w = os.pipe()
kids = []
for i in range({n} - 1):
    pid = os.fork()
    if pid == 0:
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    kids.append(pid)
os.close(r)
print('forked', len(kids) + 1, flush=True)
try:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    print('one more: forked', flush=True)
except OSError:
    print('one more: refused', flush=True)
u = urllib.parse.urlparse(os.environ['ANTHROPIC_BASE_URL'])
socks = []
for i in range(3):
    s = socket.create_connection((u.hostname, u.port))
    s.sendall(b'ping-%d' % i)
    s.shutdown(socket.SHUT_WR)
    socks.append(s)
for s in socks:
    got = b''
    while True:
        try:
            b = s.recv(65536)
        except ConnectionResetError:
            break
        if not b:
            break
        got += b
    print(got.decode() or '<closed>', flush=True)
os.close(w)
for k in kids:
    os.waitpid(k, 0)
"
    )
}

/// The process budget: `max_processes` is the agent's alone. The shim's
/// LLM bridge (one thread, started before the agent) and the jail's
/// supervisors have their own room in the turn's pids cgroup, so an agent
/// at its limit still has its connections relayed, and the bridge never
/// takes a process from the agent: it gets exactly its limit.
async fn an_agent_at_its_process_limit_still_gets_its_connections_relayed(mode: Mode) {
    let h = Harness::start(mode).await;
    let n = 6;
    let start = pb::Start {
        session_id: "budget".into(),
        argv: vec!["python3".into(), "-c".into(), at_the_limit(n)],
        limits: Some(pb::Limits {
            max_processes: n as u64,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut t = h.turn(start).await.expect("turn");
    t.close_stdin().await;
    let mut seen = Outcome::default();
    serve(&mut t, &mut seen, 3).await;
    t.collect_into(&mut seen).await;
    assert_eq!(
        (seen.reason(), seen.code()),
        (Reason::Exited, Some(0)),
        "{:?}\n{}\n{}",
        seen.exited,
        seen.stdout(),
        seen.stderr()
    );
    assert_eq!(
        seen.stdout(),
        format!("forked {n}\none more: refused\npong:ping-0\npong:ping-1\npong:ping-2\n"),
        "{}",
        seen.stderr()
    );
    h.stop().await;
}
