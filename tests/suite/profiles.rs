//! Agent profiles end to end: stand-ins that start like the real CLIs
//! (Claude Code refuses without a credential variable; Codex reads its
//! provider from `~/.codex/config.toml`, needs `/v1`, tries a WebSocket
//! first) run with nothing but `Start.profile`, through the relay to a
//! loopback upstream; the upstream sees only the executor's key, sent the
//! way the profile says, and the agent only the placeholder.

use super::harness::*;
use super::upstream::Upstream;
use crate::both_modes;
use std::time::Duration;
use turnstile_broker::config::Mode;
use turnstile_client::{ForwarderConfig, LlmForwarder, Turn, pb};

both_modes!(
    claude_code_profile_alone_starts_a_cli_that_wants_a_key,
    codex_profile_serves_its_config_v1_and_websocket,
    a_user_profile_mounts_its_bundle_and_sets_its_path,
);

const CLAUDE: &str = include_str!("../agents/claude_standin.py");
const CODEX: &str = include_str!("../agents/codex_standin.py");
const KEY: &str = "sk-real-5e1d7c0a9b3f4862";
/// A safety net against a hung relay, not a synchronisation.
const SAFETY: Duration = Duration::from_secs(180);

fn python(session: &str, script: &str) -> pb::Start {
    let mut s = start(session, "");
    s.argv = vec!["python3".into(), "-c".into(), script.into()];
    s
}

/// Runs `start` with a forwarder that sends the key as the turn's profile
/// says; returns the outcome.
async fn run_with_profile_forwarder(h: &Harness, start: pb::Start, upstream: &str) -> Outcome {
    let fwd = LlmForwarder::new(ForwarderConfig::for_profile(upstream, KEY)).expect("forwarder");
    let mut client = h.client().await;
    let mut turn = Turn::start(&mut client, start, Some(fwd))
        .await
        .expect("turn admitted");
    turn.input().close_stdin().await.expect("stdin eof");
    let mut o = Outcome::default();
    let drive = async {
        while let Some(ev) = turn.next().await {
            match ev.expect("event").kind {
                Some(pb::turn_event::Kind::Started(s)) => o.started = Some(s),
                Some(pb::turn_event::Kind::Stdout(b)) => o.stdout.extend_from_slice(&b),
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
    o
}

/// The value of the line of `out` starting with `tag `.
fn line<'a>(out: &'a str, tag: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(tag).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {tag:?} line in:\n{out}"))
}

fn llm_profile(o: &Outcome) -> pb::LlmProfile {
    let started = o.started.as_ref().expect("started");
    started.llm_profile.clone().expect("llm_profile in Started")
}

async fn claude_code_profile_alone_starts_a_cli_that_wants_a_key(mode: Mode) {
    let h = Harness::start(mode).await;
    let up = Upstream::start().await;

    // Without the credential variable the stand-in refuses, as the real
    // CLI does ("Not logged in").
    let mut s = python("claude-none", CLAUDE);
    s.llm_credential_env_vars = vec!["UNUSED_KEY".into()];
    let o = run_with_profile_forwarder(&h, s, &up.url()).await;
    assert_eq!(o.code(), Some(1), "{}", o.stderr());
    assert!(o.stderr().contains("Not logged in"), "{}", o.stderr());

    // With the profile and nothing else set, it starts and its request
    // reaches the upstream with the real key only.
    let mut s = python("claude", CLAUDE);
    s.profile = "claude-code".into();
    let o = run_with_profile_forwarder(&h, s, &up.url()).await;
    o.assert_exited_ok();
    let out = o.stdout();
    assert_eq!(line(&out, "key"), "turnstile-relay", "{out}");
    assert_eq!(line(&out, "status"), "200 ok", "{out}");
    assert_eq!(line(&out, "traffic"), "1", "offline setting: {out}");
    let p = llm_profile(&o);
    assert_eq!(p.name, "claude-code");
    assert_eq!(
        p.credential_header,
        pb::CredentialHeader::XApiKey as i32,
        "{p:?}"
    );
    assert!(!out.contains(KEY) && !o.stderr().contains(KEY));

    // No profile at all: the Anthropic pair, so Claude Code works too.
    let o = run_with_profile_forwarder(&h, python("claude-default", CLAUDE), &up.url()).await;
    o.assert_exited_ok();
    assert_eq!(line(&o.stdout(), "key"), "turnstile-relay");
    assert_eq!(line(&o.stdout(), "traffic"), "-");
    assert_eq!(llm_profile(&o).name, "");

    // `Start.env` may set the credential variable itself; the upstream
    // still sees only the executor's key.
    let mut s = python("claude-own", CLAUDE);
    s.profile = "claude-code".into();
    s.env
        .insert("ANTHROPIC_API_KEY".into(), "agent-side-value".into());
    let o = run_with_profile_forwarder(&h, s, &up.url()).await;
    o.assert_exited_ok();
    assert_eq!(line(&o.stdout(), "key"), "agent-side-value");

    let seen = up.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    for s in &seen {
        assert_eq!(s.path, "/v1/messages");
        let keys: Vec<_> = s.headers.get_all("x-api-key").iter().collect();
        assert_eq!(keys, [KEY], "{s:?}");
        assert!(s.headers.get("authorization").is_none(), "{s:?}");
    }
    h.stop().await;
}

async fn codex_profile_serves_its_config_v1_and_websocket(mode: Mode) {
    let h = Harness::start(mode).await;
    let up = Upstream::start().await;
    let mut s = python("codex", CODEX);
    s.profile = "codex".into();
    let o = run_with_profile_forwarder(&h, s, &up.url()).await;
    o.assert_exited_ok();
    let out = o.stdout();
    assert_eq!(line(&out, "provider"), "turnstile /v1", "{out}");
    assert_eq!(line(&out, "env-url-matches"), "True", "{out}");
    assert_eq!(line(&out, "key"), "turnstile-relay", "{out}");
    // The upgrade went through, and bytes flowed both ways: the upstream's
    // own greeting, then each message echoed.
    assert_eq!(line(&out, "ws-status"), "101 True", "{out}");
    assert_eq!(line(&out, "ws-greeting"), "hello from upstream", "{out}");
    let echoes: Vec<_> = out.lines().filter(|l| l.starts_with("ws-echo ")).collect();
    assert_eq!(echoes, ["ws-echo echo: ping 1", "ws-echo echo: ping 2"]);
    assert_eq!(line(&out, "http"), "200 ok", "{out}");
    let p = llm_profile(&o);
    assert_eq!(
        (p.name.as_str(), p.base_path.as_str()),
        ("codex", "/v1"),
        "{p:?}"
    );
    assert_eq!(
        p.credential_header,
        pb::CredentialHeader::AuthorizationBearer as i32
    );

    // The WebSocket handshake and the request, both with the real key as a
    // bearer token, nothing else.
    let seen = up.seen();
    let paths: Vec<_> = seen.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(paths, ["/v1/responses", "/v1/responses"]);
    let bearer = format!("Bearer {KEY}");
    for s in &seen {
        let auth: Vec<_> = s.headers.get_all("authorization").iter().collect();
        assert_eq!(auth, [bearer.as_str()], "{s:?}");
        assert!(s.headers.get("x-api-key").is_none(), "{s:?}");
    }
    assert_eq!(
        seen[0].headers.get("upgrade").map(|v| v.as_bytes()),
        Some(&b"websocket"[..])
    );
    assert!(!out.contains(KEY) && !o.stderr().contains(KEY));

    // The config file is the agent's (it may read it), holds no secret,
    // and nothing of the key is anywhere in the session.
    let home = h.broker.sessions.paths("codex").home;
    let cfg = std::fs::read_to_string(home.join(".codex/config.toml")).expect("config");
    assert!(cfg.contains("env_key = \"OPENAI_API_KEY\""), "{cfg}");
    assert!(!cfg.contains(KEY));
    if mode == Mode::Nsjail {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(home.join(".codex/config.toml")).expect("meta");
        assert_eq!((meta.uid(), meta.gid()), h.broker.outside_ids);
        assert_eq!(meta.mode() & 0o777, 0o600);
    }

    // A link the agent put where the config's directory goes ends the
    // next turn before anything runs (naming it, like any damage to the
    // session); nothing is written through it.
    let outside = tempdir();
    std::fs::remove_dir_all(home.join(".codex")).expect("rm");
    std::os::unix::fs::symlink(outside.path(), home.join(".codex")).expect("link");
    let mut s = python("codex", CODEX);
    s.profile = "codex".into();
    let o = h.run(s).await;
    assert_eq!(o.reason(), Reason::SpawnFailed, "{:?}", o.exited);
    let msg = &o.exited().message;
    assert!(
        msg.contains("session codex is damaged: profile codex: cannot write .codex/config.toml")
            && msg.contains(".codex is not a directory"),
        "{msg}"
    );
    assert!(o.stdout.is_empty());
    assert_eq!(std::fs::read_dir(outside.path()).expect("ls").count(), 0);
    h.stop().await;
}

async fn a_user_profile_mounts_its_bundle_and_sets_its_path(mode: Mode) {
    // A CLI "installed" in a directory of its own, mounted read-only by the
    // profile (nsjail mode) and found on the PATH the profile sets.
    let bundle = tempdir();
    let bin = bundle.path().join("bin");
    std::fs::create_dir(&bin).expect("bin");
    let cli = bin.join("claude");
    std::fs::write(&cli, format!("#!/usr/bin/python3\n{CLAUDE}")).expect("cli");
    {
        use std::os::unix::fs::PermissionsExt;
        for p in [bundle.path(), bin.as_path(), cli.as_path()] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
    }
    let dst = match mode {
        Mode::Nsjail => "/opt/claude-bundle".to_string(),
        Mode::Direct => bundle.path().display().to_string(),
    };
    let toml = format!(
        r#"
        [profiles.claude-code]
        bundle_mounts = ["{src}:/opt/claude-bundle"]
        env = {{ PATH = "{dst}/bin:/usr/bin:/bin", CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC = "1" }}
        "#,
        src = bundle.path().display(),
    );
    let path = bundle.path().join("broker.toml");
    std::fs::write(&path, toml).expect("config file");
    let file = turnstile_broker::config::Config::from_toml_file(&path).expect("profile table");
    let h = Harness::start_with(mode, |cfg| cfg.profiles = file.profiles.clone()).await;
    let up = Upstream::start().await;
    let mut s = start("bundle", "");
    s.argv = vec!["claude".into()];
    s.profile = "claude-code".into();
    let o = run_with_profile_forwarder(&h, s, &up.url()).await;
    o.assert_exited_ok();
    assert_eq!(line(&o.stdout(), "key"), "turnstile-relay");
    assert_eq!(line(&o.stdout(), "status"), "200 ok");
    if mode == Mode::Nsjail {
        // Read-only in the jail.
        let mut s = start("bundle", "touch /opt/claude-bundle/x 2>&1; echo $?");
        s.profile = "claude-code".into();
        let o = h.run(s).await;
        assert_ne!(
            o.stdout().trim_end().lines().last(),
            Some("0"),
            "{}",
            o.stdout()
        );
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_profiles_and_clashing_variables_are_refused() {
    let h = Harness::start(Mode::Direct).await;
    let mut s = start("p-bad", "true");
    s.profile = "clade-code".into();
    let err = h.turn(s).await.expect_err("unknown");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("\"clade-code\"") && err.message().contains("claude-code, codex"),
        "{}",
        err.message()
    );
    let mut s = start("p-bad", "true");
    s.llm_credential_env_vars = vec!["ANTHROPIC_BASE_URL".into()];
    let err = h.turn(s).await.expect_err("clash");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("ANTHROPIC_BASE_URL"),
        "{}",
        err.message()
    );
    let mut s = start("p-bad", "true");
    s.llm_credential_env_vars = vec!["TURNSTILE_KEY".into()];
    let err = h.turn(s).await.expect_err("protected");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // Nothing was made on disk for the refused turns.
    assert!(!h.broker.sessions.paths("p-bad").dir.exists());
    h.stop().await;
}
