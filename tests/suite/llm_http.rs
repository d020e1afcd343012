//! The LLM relay end to end at the HTTP level: an agent in the turn talks
//! HTTP to its bridge URL; the executor side (`turnstile_client`) forwards
//! each request to a stand-in upstream with the key added.

use super::harness::*;
use super::upstream::Upstream;
use crate::both_modes;
use std::time::Duration;
use turnstile_broker::config::Mode;
use turnstile_client::{CredentialHeader, ForwarderConfig, LlmForwarder, Turn, pb};

both_modes!(
    an_agent_talks_http_through_the_relay,
    an_unreachable_upstream_gives_502,
    without_a_forwarder_llm_connections_are_reset,
    upstream_connections_are_pooled_across_turns,
);

const AGENT: &str = include_str!("../agents/llm_agent.py");
const KEY: &str = "sk-test-7f3a9c1e5b2d4086";
/// The forwarder's body cap in these tests (the default is 32 MiB).
const CAP: u64 = 8 << 20;
/// A safety net against a hung relay, not a synchronisation.
const SAFETY: Duration = Duration::from_secs(180);

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Nsjail => "nsjail",
        Mode::Direct => "direct",
    }
}

fn forwarder(url: &str, header: CredentialHeader) -> LlmForwarder {
    let mut cfg = ForwarderConfig::new(url, KEY, header);
    cfg.max_request_body = CAP;
    LlmForwarder::new(cfg).expect("forwarder")
}

/// Runs `start` with `fwd`, calling `on_stdout` with all stdout so far after
/// each chunk; returns the outcome.
async fn run_turn(
    h: &Harness,
    start: pb::Start,
    fwd: Option<LlmForwarder>,
    mut on_stdout: impl FnMut(&str),
) -> (Outcome, u64) {
    let mut client = h.client().await;
    let mut turn = Turn::start(&mut client, start, fwd).await.expect("turn");
    turn.input().close_stdin().await.expect("stdin eof");
    let mut o = Outcome::default();
    let drive = async {
        while let Some(ev) = turn.next().await {
            match ev.expect("event").kind {
                Some(pb::turn_event::Kind::Started(s)) => o.started = Some(s),
                Some(pb::turn_event::Kind::Stdout(b)) => {
                    o.stdout.extend_from_slice(&b);
                    on_stdout(&o.stdout());
                }
                Some(pb::turn_event::Kind::Stderr(b)) => o.stderr.extend_from_slice(&b),
                Some(pb::turn_event::Kind::Exited(e)) => o.exited = Some(e),
                Some(pb::turn_event::Kind::Notice(n)) => o.notices.push(n.message),
                other => panic!("unexpected event {other:?}"),
            }
        }
    };
    tokio::time::timeout(SAFETY, drive)
        .await
        .unwrap_or_else(|_| panic!("turn hung; so far {o:?}"));
    assert!(o.notices.is_empty(), "notices: {:?}", o.notices);
    let opened = turn.llm_connections();
    (o, opened)
}

/// The line of `out` starting with `tag `, without the tag.
fn line<'a>(out: &'a str, tag: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(tag).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {tag:?} line in:\n{out}"))
}

async fn an_agent_talks_http_through_the_relay(mode: Mode) {
    let h = Harness::start(mode).await;
    let up = Upstream::start().await;
    let mut s = start("llm-http", "");
    s.argv = vec![
        "python3".into(),
        "-c".into(),
        AGENT.into(),
        mode_name(mode).into(),
        up.port.to_string(),
        CAP.to_string(),
    ];
    let mut released = false;
    let (o, opened) = run_turn(
        &h,
        s,
        Some(forwarder(&up.url(), CredentialHeader::XApiKey)),
        |out| {
            if !released && out.contains("sse-first") {
                released = true;
                up.release();
            }
        },
    )
    .await;
    o.assert_exited_ok();
    let out = o.stdout();
    assert!(out.ends_with("done\n"), "{out}");

    // 5 MiB up, checked by length and sum on both sides.
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

    // The first event reached the agent before the upstream sent the second
    // (which it only did once the test saw "sse-first").
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
    // Three requests, one socket on the agent's side.
    assert_eq!(line(&out, "keepalive"), "200 1");
    let rl = line(&out, "ratelimited");
    assert!(rl.starts_with("429 7 "), "{rl}");
    assert!(rl.contains("rate_limit_error"), "{rl}");
    assert_eq!(line(&out, "toolarge"), "413 request_too_large");
    assert_eq!(line(&out, "after-toolarge"), "200 ok");
    assert_eq!(line(&out, "hol"), "200 200 {\"len\": 3, \"sum\": 323}");

    // The upstream saw the executor's key, never the agent's; the agent
    // never saw the key anywhere (environment, files, responses).
    let seen = up.seen();
    assert!(!seen.is_empty());
    for s in &seen {
        assert_eq!(
            s.headers.get("x-api-key").map(|v| v.as_bytes()),
            Some(KEY.as_bytes()),
            "{s:?}"
        );
        assert!(s.headers.get("authorization").is_none(), "{s:?}");
    }
    let whoami = seen
        .iter()
        .find(|s| s.path == "/v1/whoami")
        .expect("whoami");
    assert_eq!(whoami.headers.get_all("x-api-key").iter().count(), 1);
    assert!(
        !seen
            .iter()
            .any(|s| s.path == "/v1/echo" && s.body_len > CAP as usize)
    );
    assert!(!out.contains(KEY), "the key reached the agent:\n{out}");
    assert!(!o.stderr().contains(KEY));
    // 1 echo + 1 sse + 16 + 1 keep-alive + 1 + 1 + 1 (413, then reused)
    // + 2 (an unread response and one beside it).
    assert_eq!(opened, 24, "connections the agent opened");

    if mode == Mode::Nsjail {
        for l in out.lines().filter(|l| l.starts_with("reach ")) {
            assert!(l.contains(" refused "), "reachable from the jail: {l}");
        }
        assert_eq!(out.lines().filter(|l| l.starts_with("reach ")).count(), 3);
        // Proven by interfaces and routes, never by trying outside addresses.
        assert!(out.lines().any(|l| l == "ifaces lo"), "{out}");
        assert!(
            out.lines().any(|l| l == "routes none"
                || l.split_once(' ')
                    .is_some_and(|(k, v)| k == "routes" && v.split(',').all(|i| i == "lo"))),
            "{out}"
        );
    }
    h.stop().await;
}

async fn an_unreachable_upstream_gives_502(mode: Mode) {
    let h = Harness::start(mode).await;
    // A port nothing listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let script = "import http.client, os, urllib.parse\n\
u = urllib.parse.urlparse(os.environ['OPENAI_BASE_URL'])\n\
c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)\n\
c.request('POST', '/v1/chat/completions', body=b'{}')\n\
r = c.getresponse()\n\
print(r.status, r.getheader('content-type'), r.read().decode())\n";
    let mut s = start("llm-502", "");
    s.argv = vec!["python3".into(), "-c".into(), script.into()];
    s.llm_env_vars = vec!["OPENAI_BASE_URL".into()];
    let fwd = forwarder(
        &format!("http://127.0.0.1:{port}"),
        CredentialHeader::AuthorizationBearer,
    );
    let (o, _) = run_turn(&h, s, Some(fwd), |_| {}).await;
    o.assert_exited_ok();
    let out = o.stdout();
    let (head, json) = out
        .trim()
        .split_once(" application/json ")
        .expect("502 line");
    assert_eq!(head, "502", "{out}");
    let v: serde_json::Value = serde_json::from_str(json).expect("json error");
    assert_eq!(v["error"]["type"], "upstream_unreachable", "{out}");
    assert!(!out.contains(KEY));
    h.stop().await;
}

async fn without_a_forwarder_llm_connections_are_reset(mode: Mode) {
    let h = Harness::start(mode).await;
    let script = r#"
import http.client, os, urllib.parse
u = urllib.parse.urlparse(os.environ['ANTHROPIC_BASE_URL'])
c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
try:
    c.request('GET', '/v1/models')
    c.getresponse()
    print('answered')
except (ConnectionError, http.client.HTTPException) as e:
    print('failed', type(e).__name__)
"#;
    let mut s = start("llm-none", "");
    s.argv = vec!["python3".into(), "-c".into(), script.into()];
    let (o, opened) = run_turn(&h, s, None, |_| {}).await;
    o.assert_exited_ok();
    assert!(o.stdout().starts_with("failed "), "{}", o.stdout());
    assert_eq!(opened, 1);
    h.stop().await;
}

async fn upstream_connections_are_pooled_across_turns(mode: Mode) {
    let h = Harness::start(mode).await;
    let up = Upstream::start().await;
    let fwd = forwarder(&up.url(), CredentialHeader::XApiKey);
    // One request per turn, each on the agent's own connection; the second
    // turn's request goes out on the upstream connection of the first (the
    // forwarder's pool outlives turns).
    let script = r#"
import http.client, os, urllib.parse
u = urllib.parse.urlparse(os.environ['ANTHROPIC_BASE_URL'])
c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
c.request('GET', '/v1/models')
r = c.getresponse()
print(r.status, r.read().decode())
"#;
    for turn in 0..2 {
        let mut s = start("llm-pool", "");
        s.argv = vec!["python3".into(), "-c".into(), script.into()];
        let (o, opened) = run_turn(&h, s, Some(fwd.clone()), |_| {}).await;
        o.assert_exited_ok();
        assert_eq!(o.stdout(), "200 ok\n", "turn {turn}");
        assert_eq!(opened, 1);
    }
    assert_eq!(up.seen().len(), 2);
    assert_eq!(up.accepted(), 1, "upstream connections for 2 turns");
    h.stop().await;
}
