//! `turnstile run`, the minimal client: a terminal attached to one turn.

use super::harness::*;
use std::io::Write;
use std::process::{Command, Stdio};
use turnstile_broker::config::Mode;

fn run_cli(socket: &std::path::Path, args: &[&str], stdin: &[u8]) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_turnstile"))
        .arg("run")
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn turnstile run");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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
