//! Broker-side forwarding end to end: the `Start` names the upstream and
//! its credential (`Start.llm_upstream`), and `turnstile serve` serves the
//! agent's LLM connections itself; the executor gets no LLM frames, only an
//! `LlmRequest` summary per request. The same cases as the executor-side
//! relay (`llm_http`), plus: the credential is nowhere but the upstream's
//! requests: not in the broker's log (captured at debug level), not in any
//! file of its state dir (journals included), not in the jail (environment,
//! `/proc`, files).

use super::harness::*;
use super::upstream::Upstream;
use crate::both_modes;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use turnstile_broker::config::Mode;
use turnstile_client::broker_side::BrokerUpstreams;
use turnstile_client::{TlsRoots, Turn, pb};

both_modes!(
    broker_side_forwarding_serves_the_agent_and_keeps_the_key,
    broker_side_connections_over_the_cap_are_refused,
);

const AGENT: &str = include_str!("../agents/llm_agent.py");
const KEY: &str = "sk-broker-side-0c4e8a1f7d2b6395";
/// The request body cap these turns ask for (the default is 32 MiB).
const CAP: u64 = 8 << 20;
/// A safety net against a hung relay, not a synchronisation.
const SAFETY: Duration = Duration::from_secs(180);

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Nsjail => "nsjail",
        Mode::Direct => "direct",
    }
}

fn upstream(url: &str) -> pb::LlmUpstream {
    pb::LlmUpstream {
        base_url: url.into(),
        credential: KEY.into(),
        credential_header: pb::CredentialHeader::Unspecified as i32,
        max_request_bytes: CAP,
    }
}

fn python(session: &str, script: &str, args: &[String], url: &str) -> pb::Start {
    let mut argv = vec!["python3".into(), "-c".into(), script.into()];
    argv.extend(args.iter().cloned());
    pb::Start {
        session_id: session.into(),
        argv,
        llm_upstream: Some(upstream(url)),
        ..Default::default()
    }
}

/// What a turn sent, with its request summaries.
#[derive(Debug, Default)]
struct Seen {
    o: Outcome,
    requests: Vec<pb::LlmRequest>,
}

/// Runs `start` (no executor-side forwarder), calling `on_stdout` with all
/// stdout so far after each chunk.
async fn run(
    client: &mut pb::broker_client::BrokerClient<tonic::transport::Channel>,
    start: pb::Start,
    mut on_stdout: impl FnMut(&str),
) -> Seen {
    let mut turn = Turn::start(client, start, None).await.expect("turn");
    turn.input().close_stdin().await.expect("stdin eof");
    let mut s = Seen::default();
    let drive = async {
        while let Some(ev) = turn.next().await {
            match ev.expect("event").kind {
                Some(pb::turn_event::Kind::Started(st)) => s.o.started = Some(st),
                Some(pb::turn_event::Kind::Stdout(b)) => {
                    s.o.stdout.extend_from_slice(&b);
                    on_stdout(&s.o.stdout());
                }
                Some(pb::turn_event::Kind::Stderr(b)) => s.o.stderr.extend_from_slice(&b),
                Some(pb::turn_event::Kind::Exited(e)) => s.o.exited = Some(e),
                Some(pb::turn_event::Kind::Notice(n)) => s.o.notices.push(n.message),
                Some(pb::turn_event::Kind::LlmRequest(r)) => s.requests.push(r),
                other => panic!("unexpected event {other:?}"),
            }
        }
    };
    tokio::time::timeout(SAFETY, drive)
        .await
        .unwrap_or_else(|_| panic!("turn hung; so far {s:?}"));
    assert!(s.o.notices.is_empty(), "notices: {:?}", s.o.notices);
    assert_eq!(
        turn.llm_connections(),
        0,
        "no LLM frame reached the executor"
    );
    s
}

/// The line of `out` starting with `tag `, without the tag.
fn line<'a>(out: &'a str, tag: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(tag).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {tag:?} line in:\n{out}"))
}

fn summaries<'a>(s: &'a Seen, path: &str) -> Vec<&'a pb::LlmRequest> {
    s.requests.iter().filter(|r| r.path == path).collect()
}

/// Every file below `dir` (state dir, journals, session trees and their
/// images) that holds `needle`, by `grep -r`.
fn files_holding(dir: &Path, needle: &str) -> Vec<String> {
    let out = std::process::Command::new("grep")
        .args(["-r", "-l", "-a", "-F", "--", needle])
        .arg(dir)
        .output()
        .expect("run grep");
    // 0: found, 1: not found; 2 is an error (unreadable files are fine:
    // sockets and the like).
    assert!(out.status.code().is_some_and(|c| c <= 2), "grep: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Prints what an agent can see of its jail: the environment and command
/// line of every process it can see in `/proc`, and every file below its
/// home, its work dir and its temp dir (the test checks the key is in none).
const SCAN: &str = r#"
import http.client, os, sys, urllib.parse
seen = 0
for pid in os.listdir("/proc"):
    if not pid.isdigit():
        continue
    for what in ("environ", "cmdline"):
        try:
            print("proc", pid, what, open(f"/proc/{pid}/{what}", "rb").read().replace(b"\0", b" ").decode(errors="replace"))
            seen += 1
        except OSError:
            pass
for root in (os.environ["HOME"], os.getcwd(), os.environ.get("TMPDIR", "/tmp")):
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            try:
                print("file", p, open(p, "rb").read(1 << 20).decode(errors="replace"))
            except OSError:
                pass
u = urllib.parse.urlparse(os.environ["ANTHROPIC_BASE_URL"])
c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
c.request("GET", "/v1/models?key=not-logged")
r = c.getresponse()
print("models", r.status, r.read().decode())
print("procs", seen)
"#;

/// One request to the bridge, its status, content type and body.
const ONE: &str = r#"
import http.client, os, urllib.parse
u = urllib.parse.urlparse(os.environ["ANTHROPIC_BASE_URL"])
c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
c.request("POST", "/v1/messages", body=b"{}")
r = c.getresponse()
print(r.status, r.getheader("content-type"), r.read().decode())
"#;

async fn broker_side_forwarding_serves_the_agent_and_keeps_the_key(mode: Mode) {
    let dir = tempdir();
    let up = Upstream::start().await;
    let mut daemon = Daemon::spawn(mode, dir.path(), &[("TURNSTILE_LOG", "debug")]);
    let mut client = daemon.ready().await;

    // 1. The relay's cases, served by the broker.
    let args = [
        mode_name(mode).to_string(),
        up.port.to_string(),
        CAP.to_string(),
    ];
    let mut released = false;
    let s = run(&mut client, python("fwd", AGENT, &args, &up.url()), |out| {
        if !released && out.contains("sse-first") {
            released = true;
            up.release();
        }
    })
    .await;
    s.o.assert_exited_ok();
    assert_eq!(
        s.o.started.as_ref().map(|st| st.llm_upstream.as_str()),
        Some(up.url().as_str())
    );
    let out = s.o.stdout();
    assert!(out.ends_with("done\n"), "{out}");
    let echo: Vec<&str> = line(&out, "echo").splitn(2, ' ').collect();
    assert_eq!(echo[0], "200", "{out}");
    let (json, sent) = echo[1].rsplit_once("} ").expect("echo line");
    let v: serde_json::Value = serde_json::from_str(&format!("{json}}}")).expect("json");
    let sent: Vec<u64> = sent
        .split(' ')
        .map(|n| n.parse().expect("number"))
        .collect();
    assert_eq!(
        (v["len"].as_u64(), v["sum"].as_u64()),
        (Some(sent[0]), Some(sent[1]))
    );
    assert_eq!(sent[0], 5 << 20);
    // The first event reached the agent before the upstream sent the second.
    assert_eq!(line(&out, "sse-first"), "0");
    assert_eq!(
        line(&out, "sse-all"),
        "200 text/event-stream [0, 1, 2, 3, 4]"
    );
    assert_eq!(
        *up.sse_log.lock().expect("log"),
        ["sent 0", "released", "sent 1", "sent 2", "sent 3", "sent 4"]
    );
    assert_eq!(line(&out, "concurrent"), format!("{:?}", [200; 16]));
    assert_eq!(line(&out, "keepalive"), "200 1");
    let rl = line(&out, "ratelimited");
    assert!(rl.starts_with("429 7 "), "{rl}");
    assert!(rl.contains("rate_limit_error"), "{rl}");
    assert_eq!(line(&out, "toolarge"), "413 request_too_large");
    assert_eq!(line(&out, "after-toolarge"), "200 ok");
    assert_eq!(line(&out, "hol"), "200 200 {\"len\": 3, \"sum\": 323}");
    // The agent got the placeholder, never the key.
    assert!(
        out.contains("\"ANTHROPIC_API_KEY\": \"turnstile-relay\""),
        "{out}"
    );
    assert!(!out.contains(KEY), "the key reached the agent:\n{out}");
    assert!(!s.o.stderr().contains(KEY));
    // The upstream saw the key, once per request, never the agent's.
    let seen = up.seen();
    assert!(!seen.is_empty());
    for r in &seen {
        let keys: Vec<_> = r.headers.get_all("x-api-key").iter().collect();
        assert_eq!(keys.len(), 1, "{r:?}");
        assert_eq!(keys[0].as_bytes(), KEY.as_bytes(), "{r:?}");
        assert!(r.headers.get("authorization").is_none(), "{r:?}");
    }
    // A summary per request: method, path, status, bytes.
    let echoes = summaries(&s, "/v1/echo");
    let big = echoes
        .iter()
        .find(|r| r.request_bytes == 5 << 20)
        .unwrap_or_else(|| panic!("{echoes:?}"));
    assert_eq!((big.method.as_str(), big.status), ("POST", 200));
    assert!(big.response_bytes > 0 && big.error.is_empty(), "{big:?}");
    let over = echoes
        .iter()
        .find(|r| r.status == 413)
        .unwrap_or_else(|| panic!("{echoes:?}"));
    assert!(over.response_bytes > 0, "{over:?}");
    let sse = summaries(&s, "/v1/sse");
    assert_eq!(sse.len(), 1);
    assert!(
        sse[0].duration_us > 0 && sse[0].response_bytes > 0,
        "{sse:?}"
    );
    assert_eq!(summaries(&s, "/v1/concurrent").len(), 16);
    assert_eq!(summaries(&s, "/v1/keepalive").len(), 3);
    let limited = summaries(&s, "/v1/ratelimited");
    assert_eq!(limited.iter().map(|r| r.status).collect::<Vec<_>>(), [429]);
    assert_eq!(summaries(&s, "/v1/whoami").len(), 1);

    // 2. An upstream that cannot be reached: 502, and its summary.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let s = run(
        &mut client,
        python("fwd-502", ONE, &[], &format!("http://127.0.0.1:{closed}")),
        |_| {},
    )
    .await;
    s.o.assert_exited_ok();
    let out = s.o.stdout();
    let (head, json) = out
        .trim()
        .split_once(" application/json ")
        .expect("502 line");
    assert_eq!(head, "502", "{out}");
    let v: serde_json::Value = serde_json::from_str(json).expect("json error");
    assert_eq!(v["error"]["type"], "upstream_unreachable", "{out}");
    assert_eq!(s.requests.len(), 1);
    assert_eq!(
        (s.requests[0].status, s.requests[0].path.as_str()),
        (502, "/v1/messages")
    );

    // 3. Two turns on a fresh upstream: the second reuses the first's
    // upstream connection (turns share the broker's pool). The first also
    // looks everywhere in its jail for the key.
    let pooled = Upstream::start().await;
    let s = run(
        &mut client,
        python("fwd-scan", SCAN, &[], &pooled.url()),
        |_| {},
    )
    .await;
    s.o.assert_exited_ok();
    let out = s.o.stdout();
    assert!(!out.contains(KEY), "the key is visible in the jail:\n{out}");
    assert!(
        line(&out, "procs").parse::<u32>().expect("count") >= 2,
        "{out}"
    );
    assert_eq!(line(&out, "models"), "200 ok");
    assert_eq!(s.requests.len(), 1);
    assert_eq!(s.requests[0].path, "/v1/models", "no query in the summary");
    let s = run(
        &mut client,
        python("fwd-pool", ONE, &[], &pooled.url()),
        |_| {},
    )
    .await;
    s.o.assert_exited_ok();
    assert_eq!(s.o.stdout(), "200 None ok\n");
    assert_eq!(pooled.seen().len(), 2);
    assert_eq!(pooled.accepted(), 1, "upstream connections for 2 turns");

    // The summaries are journaled like any event: an attach replays them.
    let mut again = Turn::attach(
        &mut client,
        pb::Attach {
            session_id: "fwd-pool".into(),
            ..Default::default()
        },
        None,
    )
    .await
    .expect("attach");
    let mut replayed = 0;
    while let Some(ev) = again.next().await {
        if let Some(pb::turn_event::Kind::LlmRequest(r)) = ev.expect("event").kind {
            assert_eq!(r.status, 200);
            replayed += 1;
        }
    }
    assert_eq!(replayed, 1);

    // Nothing on disk and nothing in the log holds the key.
    let log = daemon.stop_and_log().await;
    assert!(
        log.iter().any(|l| l.contains("forwarded by the broker")),
        "debug logging was on: {log:#?}"
    );
    let leaked: Vec<_> = log.iter().filter(|l| l.contains(KEY)).collect();
    assert!(
        leaked.is_empty(),
        "the key is in the broker's log: {leaked:#?}"
    );
    assert!(
        !log.iter().any(|l| l.contains("not-logged")),
        "a query was logged"
    );
    let files = files_holding(dir.path(), KEY);
    assert!(files.is_empty(), "the key is on disk: {files:?}");
    // The scan does find what is there: the journals hold the turns' stdout.
    assert!(!files_holding(dir.path(), "sse-first").is_empty());
}

/// Each bad upstream is refused before anything runs, with what is wrong,
/// and never with the credential in the message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_upstreams_are_refused_as_invalid_argument() {
    let h = Harness::start(Mode::Direct).await;
    // A broker with no forwarder installed refuses broker-side forwarding.
    let mut client = h.client().await;
    let refused = Turn::start(
        &mut client,
        python("bad-none", ONE, &[], "http://127.0.0.1:9"),
        None,
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused
            .message()
            .contains("cannot forward LLM requests itself"),
        "{}",
        refused.message()
    );
    h.broker.set_llm_upstreams(Arc::new(
        BrokerUpstreams::new(TlsRoots::Bundled).expect("upstreams"),
    ));
    let long_key = "k".repeat(8193);
    let cases: Vec<(pb::LlmUpstream, &str)> = vec![
        (
            upstream("ftp://127.0.0.1:9"),
            "the scheme must be http or https",
        ),
        (upstream("127.0.0.1:9"), "the scheme must be http or https"),
        (upstream("not a url"), "the scheme must be http or https"),
        (upstream("http://"), "no host"),
        (upstream("http://127.0.0.1:9/?a=b"), "query"),
        (
            upstream("http://user:pw@127.0.0.1:9"),
            "user info is not allowed",
        ),
        (
            upstream("http://127.0.0.1:99999"),
            "the port must be a number",
        ),
        (
            pb::LlmUpstream {
                credential: long_key.clone(),
                ..upstream("http://127.0.0.1:9")
            },
            "1 to 8192 bytes",
        ),
        (
            pb::LlmUpstream {
                credential: format!("{KEY}\n"),
                ..upstream("http://127.0.0.1:9")
            },
            "invalid llm_upstream.credential",
        ),
        (
            pb::LlmUpstream {
                credential: String::new(),
                ..upstream("http://127.0.0.1:9")
            },
            "invalid llm_upstream.credential",
        ),
        (
            pb::LlmUpstream {
                max_request_bytes: (1 << 30) + 1,
                ..upstream("http://127.0.0.1:9")
            },
            "max_request_bytes",
        ),
        (
            pb::LlmUpstream {
                credential_header: 7,
                ..upstream("http://127.0.0.1:9")
            },
            "credential_header = 7",
        ),
    ];
    for (i, (up, want)) in cases.into_iter().enumerate() {
        let url = up.base_url.clone();
        let mut start = python(&format!("bad-{i}"), ONE, &[], "");
        start.llm_upstream = Some(up);
        let status = Turn::start(&mut client, start, None)
            .await
            .err()
            .unwrap_or_else(|| panic!("{url}: admitted"));
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{url}: {status:?}"
        );
        assert!(
            status.message().contains(want),
            "{url}: {}",
            status.message()
        );
        assert!(!status.message().contains(KEY), "{}", status.message());
        assert!(!status.message().contains("pw@"), "{}", status.message());
    }
    // Nothing ran: no session was made.
    let sessions = client
        .list_sessions(pb::ListSessionsRequest {})
        .await
        .expect("list")
        .into_inner()
        .sessions;
    assert!(sessions.is_empty(), "{sessions:?}");
    h.stop().await;
}

/// The agent for the cap test (`llm_max_connections = 2`): two streams held
/// open by the upstream (each has read its first event), then a third
/// connection, which must end with no answer at all.
const CAP_AGENT: &str = r#"
import http.client, os, socket, urllib.parse
u = urllib.parse.urlparse(os.environ["ANTHROPIC_BASE_URL"])
held = []
for i in range(2):
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    c.request("POST", "/v1/sse", body=b"{}")
    r = c.getresponse()
    assert r.status == 200, r.status
    assert r.readline().startswith(b"event: tick"), i
    held.append(r)
s = socket.create_connection((u.hostname, u.port), timeout=60)
s.sendall(b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
try:
    got = s.recv(65536)
except ConnectionResetError:
    got = b""
print("third", "refused" if got == b"" else got.decode(errors="replace"), flush=True)
for i, r in enumerate(held):
    print("stream", i, r.read().count(b"event: tick") + 1, flush=True)
"#;

async fn broker_side_connections_over_the_cap_are_refused(mode: Mode) {
    let h = Harness::start_with(mode, |c| c.llm_max_connections = 2).await;
    h.broker.set_llm_upstreams(Arc::new(
        BrokerUpstreams::new(TlsRoots::Bundled).expect("upstreams"),
    ));
    let up = Upstream::start().await;
    let mut client = h.client().await;
    let mut released = false;
    let s = run(
        &mut client,
        python("cap", CAP_AGENT, &[], &up.url()),
        |out| {
            if !released && out.contains("third ") {
                released = true;
                // One release per held stream.
                up.release();
                up.release();
            }
        },
    )
    .await;
    s.o.assert_exited_ok();
    assert_eq!(s.o.stdout(), "third refused\nstream 0 5\nstream 1 5\n");
    // The refused connection never reached the upstream, nor a summary.
    let paths: Vec<&str> = s.requests.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(paths, ["/v1/sse", "/v1/sse"], "{:?}", s.requests);
    assert!(
        s.requests.iter().all(|r| r.status == 200),
        "{:?}",
        s.requests
    );
    assert_eq!(up.seen().len(), 2);
    h.stop().await;
}
