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
