//! `turnstile run`, the minimal client: a terminal attached to one turn.

use super::harness::*;
use std::io::Write;
use std::process::{Command, Stdio};
use turnstile_broker::config::Mode;

fn run_cli(socket: &std::path::Path, args: &[&str], stdin: &[u8]) -> (i32, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_turnstile"));
    c.arg("run").arg("--socket").arg(socket).args(args);
    output(c, stdin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_attaches_stdio_and_exits_with_the_agents_code() {
    let dir = tempdir();
    let mut d = Daemon::spawn(Mode::Nsjail, dir.path(), &[]);
    let _ = d.ready().await;
    let socket = d.socket.clone();
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        run_cli(
            &socket,
            &[
                "--session",
                "cli",
                "--quiet",
                "--env",
                "WHO=you",
                "--",
                "/bin/sh",
                "-c",
                "read l; echo \"$WHO got $l\"; echo oops >&2; exit 4",
            ],
            b"hello\n",
        )
    })
    .await
    .expect("join");
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (4, "you got hello\n", "oops\n")
    );

    let socket = d.socket.clone();
    let (code, _, err) = tokio::task::spawn_blocking(move || {
        run_cli(
            &socket,
            &["--session", "cli", "--", "/bin/sh", "-c", "kill -TERM $$"],
            b"",
        )
    })
    .await
    .expect("join");
    assert_eq!(code, 128 + 15, "{err}");

    let socket = d.socket.clone();
    let (code, _, err) = tokio::task::spawn_blocking(move || {
        run_cli(&socket, &["--session", "../bad", "--", "/bin/true"], b"")
    })
    .await
    .expect("join");
    assert_eq!(code, 125);
    assert!(err.contains("turn refused: invalid session id"), "{err}");

    let socket = d.socket.clone();
    let (code, _, err) = tokio::task::spawn_blocking(move || {
        run_cli(&socket, &["--session", "cli", "--", "/no/such/agent"], b"")
    })
    .await
    .expect("join");
    assert_eq!(code, 126);
    assert!(
        err.contains("spawn_failed") && err.contains("/no/such/agent"),
        "{err}"
    );

    let socket = d.socket.clone();
    let (code, _, err) = tokio::task::spawn_blocking(move || {
        run_cli(
            &socket,
            &[
                "--session",
                "cli",
                "--timeout",
                "1",
                "--",
                "/bin/sh",
                "-c",
                "sleep 100",
            ],
            b"",
        )
    })
    .await
    .expect("join");
    assert!(err.contains("timed_out"), "{err}");
    assert_ne!(code, 0);

    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(d.wait().await.success());
    let missing = dir.path().join("nobody.sock");
    let (code, _, err) = run_cli(&missing, &["--session", "cli", "--", "/bin/true"], b"");
    assert_eq!(code, 127);
    assert!(err.contains("cannot reach the broker"), "{err}");
}

fn sessions_cli(socket: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_turnstile"))
        .arg("sessions")
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("turnstile sessions");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_subcommands_manage_sessions() {
    let dir = tempdir();
    let mut d = Daemon::spawn(Mode::Direct, dir.path(), &[]);
    let client = d.ready().await;
    let t = Turn::start(client, start("one", "echo hi > $HOME/note"))
        .await
        .expect("turn");
    t.close_stdin().await;
    t.collect().await.assert_exited_ok();
    let socket = d.socket.clone();
    let archive = dir.path().join("one.tar");
    let archive_arg = archive.to_string_lossy().into_owned();
    let s = socket.clone();
    let results = tokio::task::spawn_blocking(move || {
        vec![
            sessions_cli(&s, &["ls"]),
            sessions_cli(&s, &["show", "one"]),
            sessions_cli(&s, &["fork", "one", "two"]),
            sessions_cli(&s, &["export", "one", &archive_arg]),
            sessions_cli(&s, &["import", "three", &archive_arg]),
            sessions_cli(&s, &["rm", "one"]),
            sessions_cli(&s, &["show", "one"]),
            sessions_cli(&s, &["gc", "--dry-run"]),
            sessions_cli(&s, &["ls"]),
        ]
    })
    .await
    .expect("join");
    let (code, out, _) = &results[0];
    assert_eq!(*code, 0);
    assert!(
        out.lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("one ") && l.contains(" exited ")),
        "{out}"
    );
    let (code, out, _) = &results[1];
    assert_eq!(*code, 0);
    let v: serde_json::Value = serde_json::from_str(out).expect("json");
    assert_eq!(v["turn_count"], 1);
    assert_eq!(results[2].0, 0, "{}", results[2].2);
    assert_eq!(results[3].0, 0, "{}", results[3].2);
    assert!(std::fs::metadata(&archive).expect("archive").len() > 0);
    assert_eq!(results[4].0, 0, "{}", results[4].2);
    assert_eq!(results[5].0, 0, "{}", results[5].2);
    let (code, _, err) = &results[6];
    assert_eq!(*code, 1);
    assert!(err.contains("session one not found"), "{err}");
    let (code, _, err) = &results[7];
    assert_eq!(*code, 1);
    assert!(err.contains("no session_ttl_ms configured"), "{err}");
    let out = &results[8].1;
    let ids: Vec<&str> = out
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(ids, ["three", "two"]);
    assert_eq!(
        std::fs::read_to_string(d.state.join("sessions/three/home/note")).expect("imported"),
        "hi\n"
    );
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(d.wait().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_exports_and_imports_leave_nothing_behind() {
    let dir = tempdir();
    let mut d = Daemon::spawn(Mode::Direct, dir.path(), &[]);
    let _ = d.ready().await;
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).expect("mkdir");
    let missing = out_dir.join("missing.tar");
    let empty = out_dir.join("empty.tar");
    let zeros = out_dir.join("zeros.tar");
    std::fs::write(&empty, b"").expect("write");
    std::fs::write(&zeros, vec![0u8; 10240]).expect("write");
    let s = d.socket.clone();
    let args: Vec<Vec<String>> = vec![
        vec![
            "export".into(),
            "missing".into(),
            missing.display().to_string(),
        ],
        vec![
            "import".into(),
            "from-empty".into(),
            empty.display().to_string(),
        ],
        vec![
            "import".into(),
            "from-zeros".into(),
            zeros.display().to_string(),
        ],
    ];
    let results = tokio::task::spawn_blocking(move || {
        args.iter()
            .map(|a| sessions_cli(&s, &a.iter().map(String::as_str).collect::<Vec<_>>()))
            .collect::<Vec<_>>()
    })
    .await
    .expect("join");
    let (code, _, err) = &results[0];
    assert_eq!(*code, 1);
    assert!(err.contains("session missing not found"), "{err}");
    assert_eq!(
        entries(&out_dir),
        ["empty.tar", "zeros.tar"],
        "no partial export file"
    );
    for (code, _, err) in &results[1..] {
        assert_eq!(*code, 1);
        assert!(err.contains("not a session archive"), "{err}");
    }
    // No session was made (the broker's ready disk images wait there too,
    // under hidden names).
    let sessions: Vec<String> = entries(&d.state.join("sessions"))
        .into_iter()
        .filter(|e| !e.starts_with(turnstile_broker::volume::SPARE_PREFIX))
        .collect();
    assert!(sessions.is_empty(), "{sessions:?}");
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(d.wait().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_ls_into_a_closed_pipe_ends_quietly() {
    let dir = tempdir();
    let mut d = Daemon::spawn(Mode::Direct, dir.path(), &[]);
    let client = d.ready().await;
    let t = Turn::start(client, start("listed", "true"))
        .await
        .expect("turn");
    t.close_stdin().await;
    t.collect().await.assert_exited_ok();
    // stdout is a pipe whose reader is already gone (`| head` that quit):
    // every write fails with EPIPE.
    let (r, w) = nix::unistd::pipe().expect("pipe");
    drop(r);
    let socket = d.socket.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_turnstile"))
            .arg("sessions")
            .arg("--socket")
            .arg(&socket)
            .arg("ls")
            .stdout(Stdio::from(w))
            .stderr(Stdio::piped())
            .output()
            .expect("turnstile sessions ls")
    })
    .await
    .expect("join");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(d.wait().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_says_the_broker_went_away_when_it_dies_mid_turn() {
    use std::io::BufRead;
    let dir = tempdir();
    let mut d = Daemon::spawn(Mode::Direct, dir.path(), &[]);
    let _ = d.ready().await;
    let mut cli = Command::new(env!("CARGO_BIN_EXE_turnstile"))
        .args(["run", "--socket"])
        .arg(&d.socket)
        .args(["--", "/bin/sh", "-c", "echo ready; exec sleep 600"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("turnstile run");
    let stdout = cli.stdout.take().expect("stdout");
    let first = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .map(|_| line)
    })
    .await
    .expect("join")
    .expect("read");
    assert_eq!(first, "ready\n");
    d.signal(nix::sys::signal::Signal::SIGKILL);
    let (state, socket) = (d.state.clone(), d.socket.clone());
    let _ = d.wait().await;
    let out = tokio::task::spawn_blocking(move || cli.wait_with_output())
        .await
        .expect("join")
        .expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(124), "{stderr}");
    assert!(
        stderr.contains("the broker went away during the turn"),
        "{stderr}"
    );
    // A broker on the same state dir cleans what the killed one left
    // (its cgroups), and stops cleanly.
    let mut d2 = Daemon::spawn_at(Mode::Direct, &state, &socket, &[]);
    let _ = d2.ready().await;
    d2.signal(nix::sys::signal::Signal::SIGTERM);
    let status = d2.wait().await;
    assert!(status.success(), "{status:?}");
}

/// `turnstile run` with no daemon: the broker runs in the CLI process.
fn embedded(state: &std::path::Path, mode: Mode, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_turnstile"));
    c.arg("run")
        .arg("--state-dir")
        .arg(state)
        .arg("--shim")
        .arg(shim());
    if mode == Mode::Nsjail {
        c.arg("--jail")
            .arg("--nsjail")
            .arg(nsjail())
            .arg("--jail-config")
            .arg(workspace().join("jail-configs/agent.cfg"));
    }
    c.args(extra);
    c
}

fn output(mut c: Command, stdin: &[u8]) -> (i32, String, String) {
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("stdin");
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

crate::both_modes!(run_without_a_daemon);

async fn run_without_a_daemon(mode: Mode) {
    let dir = tempdir();
    let state = dir.path().join("state");
    // A new session id is made and printed; the summary line follows.
    let (code, out, err) = output(
        embedded(
            &state,
            mode,
            &["--", "/bin/sh", "-c", "cat; echo bye >&2; exit 5"],
        ),
        b"piped",
    );
    assert_eq!((code, out.as_str()), (5, "piped"), "{err}");
    let mut lines = err.lines();
    let first = lines.next().expect("session line");
    let id = first
        .strip_prefix("turnstile: session ")
        .expect("session line");
    assert!(state.join("sessions").join(id).is_dir(), "kept by default");
    assert_eq!(lines.next(), Some("bye"));
    let summary = lines.next().expect("summary");
    assert!(
        summary.starts_with("turnstile: exited (code 5) · spawn ")
            && summary.contains("stdout 5 B · stderr 4 B · stdin 5 B"),
        "{summary}"
    );
    // --session, --rm, --quiet.
    let (code, out, err) = output(
        embedded(
            &state,
            mode,
            &[
                "--session",
                "gone",
                "--rm",
                "--quiet",
                "--",
                "/bin/sh",
                "-c",
                "echo $HOME",
            ],
        ),
        b"",
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(err, "");
    assert!(
        out == "/home/agent\n" || out.ends_with("/sessions/gone/home\n"),
        "{out}"
    );
    assert!(
        !state.join("sessions/gone").exists(),
        "--rm deleted the session"
    );
    // --events jsonl: every event, parsed back.
    let (code, out, _) = output(
        embedded(
            &state,
            mode,
            &[
                "--session",
                "ev",
                "--events",
                "jsonl",
                "--quiet",
                "--",
                "/bin/sh",
                "-c",
                "echo out; echo err >&2; exit 2",
            ],
        ),
        b"",
    );
    assert_eq!(code, 2);
    let events: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().expect("event"))
        .collect();
    assert_eq!(kinds.first(), Some(&"started"));
    assert_eq!(kinds.last(), Some(&"exited"));
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "stdout" && e["data"] == "out\n")
    );
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "stderr" && e["data"] == "err\n")
    );
    let exited = events.last().expect("exited");
    assert_eq!(
        (exited["reason"].as_str(), exited["exit_code"].as_i64()),
        (Some("exited"), Some(2))
    );
    assert_eq!(events[0]["session_id"], "ev");
    // A refusal is one line that says what to do.
    let (code, _, err) = output(
        embedded(&state, mode, &["--session", "../x", "--", "/bin/true"]),
        b"",
    );
    assert_eq!(code, 125);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("invalid session id"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_interrupts_then_cancels() {
    use std::io::BufRead;
    let dir = tempdir();
    let mut c = embedded(
        &dir.path().join("state"),
        Mode::Direct,
        &[
            "--session",
            "cc",
            "--",
            "/bin/sh",
            "-c",
            "trap 'echo got-int' INT; echo ready; while :; do sleep 0.05; done",
        ],
    );
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("ready");
    assert_eq!(line, "ready\n");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("first ctrl-c");
    line.clear();
    out.read_line(&mut line).expect("got-int");
    if line != "got-int\n" {
        let _ = child.kill();
        let _ = child.wait();
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err);
        panic!("the agent did not go on after SIGINT: stdout {line:?}, stderr:\n{err}");
    }
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("second ctrl-c");
    let status = child.wait().expect("wait");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("stderr");
    assert!(err.contains("turn ended: cancelled"), "{err}");
    assert_ne!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_passes_here_and_names_the_remedy_for_each_failure() {
    let dir = tempdir();
    let doctor = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_turnstile"))
            .arg("doctor")
            .args(args)
            .output()
            .expect("doctor");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let nsjail = nsjail().to_string_lossy().into_owned();
    let shim = shim().to_string_lossy().into_owned();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("mkdir");
    let state_arg = state.to_string_lossy().into_owned();
    let (code, out) = doctor(&[
        "--nsjail",
        &nsjail,
        "--shim",
        &shim,
        "--state-dir",
        &state_arg,
    ]);
    assert_eq!(code, 0, "{out}");
    for name in [
        "nsjail",
        "user namespaces",
        "/proc in a new pid namespace",
        "network namespace",
        "cgroups",
        "shim",
        "state dir",
    ] {
        assert!(
            out.lines()
                .any(|l| l.starts_with("PASS") && l.contains(name)),
            "{name}:\n{out}"
        );
    }
    // nsjail pointing nowhere.
    let (code, out) = doctor(&[
        "--nsjail",
        "/no/nsjail",
        "--shim",
        &shim,
        "--state-dir",
        &state_arg,
    ]);
    assert_eq!(code, 1);
    assert!(
        out.contains("FAIL nsjail") && out.contains("remedy: run scripts/setup-nsjail.sh"),
        "{out}"
    );
    // A dynamically linked "shim".
    let (code, out) = doctor(&[
        "--nsjail",
        &nsjail,
        "--shim",
        "/bin/sh",
        "--state-dir",
        &state_arg,
    ]);
    assert_eq!(code, 1);
    assert!(
        out.contains("FAIL shim") && out.contains("build it with scripts/build-shim.sh"),
        "{out}"
    );
    // A state dir others can write.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let (code, out) = doctor(&[
        "--nsjail",
        &nsjail,
        "--shim",
        &shim,
        "--state-dir",
        &state_arg,
        "--json",
    ]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let check = v["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["name"] == "state dir")
        .expect("state dir check");
    assert_eq!(check["ok"], false);
    assert!(
        check["remedy"]
            .as_str()
            .expect("remedy")
            .starts_with("chmod 0711")
    );
    // A socket nobody answers on.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o711)).expect("chmod");
    let missing = dir.path().join("none.sock").to_string_lossy().into_owned();
    let (code, out) = doctor(&[
        "--nsjail",
        &nsjail,
        "--shim",
        &shim,
        "--state-dir",
        &state_arg,
        "--socket",
        &missing,
    ]);
    assert_eq!(code, 1);
    assert!(
        out.contains("FAIL daemon") && out.contains("turnstile serve"),
        "{out}"
    );
}

crate::both_modes!(run_serves_llm_connections_with_the_key_from_the_environment);

/// `turnstile run --llm-upstream URL --llm-key-env VAR`: the agent's request
/// reaches the upstream with the key as `authorization: Bearer`, the agent
/// never sees it; a missing variable or a bad URL is refused before the
/// turn, with a message that says what to do.
async fn run_serves_llm_connections_with_the_key_from_the_environment(mode: Mode) {
    let dir = tempdir();
    let state = dir.path().join("state");
    let up = super::upstream::Upstream::start().await;
    let key = "sk-cli-5d1c0ffee";
    let agent = r#"
import http.client, os, urllib.parse
u = urllib.parse.urlparse(os.environ['OPENAI_BASE_URL'])
c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
c.request('POST', '/v1/echo', body=b'abc', headers={'authorization': 'Bearer mine'})
r = c.getresponse()
print(r.status, r.read().decode(), sorted(k for k in os.environ if 'KEY' in k))
"#;
    let mut c = embedded(
        &state,
        mode,
        &[
            "--quiet",
            "--llm-upstream",
            &up.url(),
            "--llm-key-env",
            "TEST_LLM_KEY",
            "--llm-header",
            "authorization",
            "--llm-env-var",
            "OPENAI_BASE_URL",
            "--",
            "python3",
            "-c",
            agent,
        ],
    );
    c.env("TEST_LLM_KEY", key);
    let (code, out, err) = tokio::task::spawn_blocking(move || output(c, b""))
        .await
        .expect("join");
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(out, "200 {\"len\": 3, \"sum\": 294} []\n", "{err}");
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    let auth = seen[0].headers.get("authorization").expect("key injected");
    assert_eq!(auth.as_bytes(), format!("Bearer {key}").as_bytes());

    // The variable is not set: refused before anything runs.
    let mut c = embedded(
        &state,
        mode,
        &[
            "--llm-upstream",
            &up.url(),
            "--llm-key-env",
            "TEST_LLM_KEY_UNSET",
            "--",
            "/bin/true",
        ],
    );
    c.env_remove("TEST_LLM_KEY_UNSET");
    let (code, _, err) = tokio::task::spawn_blocking(move || output(c, b""))
        .await
        .expect("join");
    assert_eq!(code, 126, "{err}");
    assert!(
        err.contains("TEST_LLM_KEY_UNSET") && err.contains("not set"),
        "{err}"
    );

    // A URL that is not http(s).
    let mut c = embedded(
        &state,
        mode,
        &[
            "--llm-upstream",
            "ftp://127.0.0.1/",
            "--llm-key-env",
            "TEST_LLM_KEY",
            "--",
            "/bin/true",
        ],
    );
    c.env("TEST_LLM_KEY", key);
    let (code, _, err) = tokio::task::spawn_blocking(move || output(c, b""))
        .await
        .expect("join");
    assert_eq!(code, 126, "{err}");
    assert!(err.contains("http or https"), "{err}");

    // --llm-upstream alone is a usage error.
    let c = embedded(
        &state,
        mode,
        &["--llm-upstream", &up.url(), "--", "/bin/true"],
    );
    let (code, _, err) = tokio::task::spawn_blocking(move || output(c, b""))
        .await
        .expect("join");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--llm-key-env"), "{err}");
}

crate::both_modes!(run_llm_forward_broker_sends_the_key_in_start);

/// `turnstile run --llm-forward broker`: the broker (embedded here) serves
/// the agent's connection with the key from this process's environment;
/// `--events jsonl` shows the request's summary; a bad upstream is refused
/// by the broker (exit 125) with the field named.
async fn run_llm_forward_broker_sends_the_key_in_start(mode: Mode) {
    let dir = tempdir();
    let state = dir.path().join("state");
    let up = super::upstream::Upstream::start().await;
    let key = "sk-cli-broker-77ab01";
    let agent = r#"
import http.client, os, urllib.parse
u = urllib.parse.urlparse(os.environ['ANTHROPIC_BASE_URL'])
c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
c.request('POST', '/v1/echo?q=1', body=b'abc')
r = c.getresponse()
print(r.status, r.read().decode())
"#;
    let args = |url: &str| {
        vec![
            "--quiet".to_string(),
            "--events".into(),
            "jsonl".into(),
            "--llm-upstream".into(),
            url.to_string(),
            "--llm-key-env".into(),
            "TEST_LLM_KEY".into(),
            "--llm-forward".into(),
            "broker".into(),
            "--".into(),
            "python3".into(),
            "-c".into(),
            agent.into(),
        ]
    };
    let a = args(&up.url());
    let mut c = embedded(
        &state,
        mode,
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    c.env("TEST_LLM_KEY", key);
    let (code, out, err) = tokio::task::spawn_blocking(move || output(c, b""))
        .await
        .expect("join");
    assert_eq!(code, 0, "{out}\n{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("a json line"))
        .collect();
    let started = &lines[0];
    assert_eq!(started["event"], "started");
    assert_eq!(started["llm_upstream"], up.url());
    let req = lines
        .iter()
        .find(|l| l["event"] == "llm_request")
        .unwrap_or_else(|| panic!("no summary: {out}"));
    assert_eq!(
        (
            &req["method"],
            &req["path"],
            &req["status"],
            &req["request_bytes"]
        ),
        (
            &serde_json::json!("POST"),
            &serde_json::json!("/v1/echo"),
            &serde_json::json!(200),
            &serde_json::json!(3)
        ),
        "{out}"
    );
    assert!(
        out.contains("200 {\\\"len\\\": 3, \\\"sum\\\": 294}"),
        "{out}"
    );
    assert!(!out.contains(key) && !err.contains(key));
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    let sent = seen[0].headers.get("x-api-key").expect("key injected");
    assert_eq!(sent.as_bytes(), key.as_bytes());

    // A bad upstream: refused by the broker, before anything runs.
    let a = args("ftp://127.0.0.1:1");
    let mut c = embedded(
        &state,
        mode,
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    c.env("TEST_LLM_KEY", key);
    let (code, _, err) = tokio::task::spawn_blocking(move || output(c, b""))
        .await
        .expect("join");
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("the scheme must be http or https"), "{err}");
    assert!(!err.contains(key), "{err}");
}
