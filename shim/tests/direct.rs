//! Runs the built shim in direct mode the way the broker does: the payload
//! file on fd 3, one end of a socketpair on fd 4, an empty environment.
#![allow(unsafe_code)]

mod common;

use common::{SHIM, Shim, TempDir, payload};
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use turnstile_shim::{AgentStatus, FailureClass, Mode, ShimMsg};

/// Whether `pid` is a live (not zombie) `sleep`.
fn sleep_alive(pid: i32) -> bool {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.contains("(sleep)") && !stat.contains(") Z ")
}

#[test]
fn runs_the_agent_and_kills_what_it_leaves() {
    let dir = TempDir::new();
    // One orphan in the agent's process group, and one in a session of its
    // own, which only the subreaper loop can find. The command substitution
    // returns once that one has called setsid and exec'd sleep (its stdout
    // is then closed), so the agent cannot exit before it escaped.
    let script = "echo hi; \
                  sleep 1000 </dev/null >/dev/null 2>&1 & echo $! >&2; \
                  echo $(setsid -f sh -c 'echo $$; exec sleep 1000 </dev/null >/dev/null 2>&1') >&2; \
                  exit 3";
    let p = payload(&dir.0, &["/bin/sh", "-c", script]);
    let mut shim = Shim::start(dir, &p);
    assert!(shim.go() > 0);
    assert_eq!(shim.exited(), AgentStatus::Code(3));
    let (code, stdout, stderr) = shim.finish();
    assert_eq!(code, 3);
    assert_eq!(stdout, "hi\n");
    let pids: Vec<i32> = stderr
        .lines()
        .map(|l| l.trim().parse().expect("pid on stderr"))
        .collect();
    assert_eq!(pids.len(), 2, "{stderr}");
    for pid in pids {
        assert!(!sleep_alive(pid), "sleep {pid} survived the turn");
    }
}

#[test]
fn agent_gets_exactly_the_payload_env_and_no_extra_fds() {
    let dir = TempDir::new();
    let mut p = payload(&dir.0, &["env"]);
    p.env.push(("FOO".into(), "bar baz".into()));
    let mut shim = Shim::start(dir, &p);
    shim.go();
    assert_eq!(shim.exited(), AgentStatus::Code(0));
    let (code, stdout, _) = shim.finish();
    assert_eq!(code, 0);
    assert_eq!(stdout, "PATH=/usr/bin:/bin\nFOO=bar baz\n");

    let dir = TempDir::new();
    let script = "for fd in 3 4 5; do [ -e /proc/$$/fd/$fd ] && echo leaked $fd; done; pwd";
    let p = payload(&dir.0, &["sh", "-c", script]);
    let cwd = p.cwd.clone();
    let mut shim = Shim::start(dir, &p);
    shim.go();
    assert_eq!(shim.exited(), AgentStatus::Code(0));
    let (_, stdout, _) = shim.finish();
    assert_eq!(stdout, format!("{cwd}\n"));
}

#[test]
fn anything_but_go_aborts_before_the_agent_runs() {
    for answer in [Some(b'N'), None] {
        let dir = TempDir::new();
        let marker = dir.0.join("marker");
        let p = payload(&dir.0, &["/bin/sh", "-c", "touch marker"]);
        let shim = Shim::start(dir, &p);
        assert!(matches!(shim.frame(), ShimMsg::Hello(_)));
        match answer {
            Some(byte) => (&shim.ctl).write_all(&[byte]).expect("answer"),
            None => shim.ctl.shutdown(std::net::Shutdown::Write).expect("eof"),
        }
        assert_eq!(shim.failed().0, FailureClass::Aborted);
        // The turn's directory is kept until the check, or it would be vacuous.
        let ((code, _, stderr), _dir) = shim.finish_keeping_dir();
        assert_eq!(code, 125);
        assert!(stderr.starts_with("turnstile-shim: "), "{stderr}");
        assert!(!marker.exists(), "the agent ran");
    }
}

#[test]
fn payload_over_the_cap_is_refused() {
    let dir = TempDir::new();
    let bytes = payload(&dir.0, &["/bin/true"]).encode().expect("encode");
    let max = bytes.len() - 1;
    let shim = Shim::start_raw(dir, &bytes, max);
    let (class, message) = shim.failed();
    assert_eq!(class, FailureClass::Payload);
    assert!(message.contains("cap"), "{message}");
    let (code, _, stderr) = shim.finish();
    assert_eq!(code, 121);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn garbage_payload_is_refused() {
    let shim = Shim::start_raw(TempDir::new(), b"\xc1 not msgpack", 1024);
    assert_eq!(shim.failed().0, FailureClass::Payload);
    assert_eq!(shim.finish().0, 121);
}

#[test]
fn missing_program_is_an_exec_failure() {
    for argv0 in ["/nonexistent/agent", "no-such-agent-anywhere"] {
        let dir = TempDir::new();
        let p = payload(&dir.0, &[argv0]);
        let mut shim = Shim::start(dir, &p);
        let (class, message) = shim.go_and_fail();
        assert_eq!(class, FailureClass::Exec);
        assert_eq!(
            message,
            format!("cannot execute {argv0}: No such file or directory")
        );
        assert_eq!(shim.finish().0, 123);
    }
}

#[test]
fn missing_working_directory_is_a_setup_failure() {
    let dir = TempDir::new();
    let mut p = payload(&dir.0, &["/bin/true"]);
    p.cwd.push_str("/nope");
    let mut shim = Shim::start(dir, &p);
    let (class, message) = shim.go_and_fail();
    assert_eq!(class, FailureClass::Setup);
    assert!(
        message.starts_with("cannot enter working directory"),
        "{message}"
    );
    assert_eq!(shim.finish().0, 124);
}

#[test]
fn sigterm_is_forwarded_to_the_agent() {
    let dir = TempDir::new();
    let script = "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.05; done";
    let p = payload(&dir.0, &["/bin/sh", "-c", script]);
    let mut shim = Shim::start(dir, &p);
    shim.go();
    let mut stdout = BufReader::new(shim.child.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("read ready");
    assert_eq!(line, "ready\n");
    let pid = i32::try_from(shim.child.id()).expect("pid");
    // SAFETY: kill only sends a signal to our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert_eq!(shim.exited(), AgentStatus::Code(7));
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).expect("read rest");
    assert_eq!(rest, "got-term\n");
    assert_eq!(shim.finish().0, 7);
}

#[test]
fn agent_killed_by_a_signal_gives_128_plus_n() {
    let dir = TempDir::new();
    let p = payload(&dir.0, &["/bin/sh", "-c", "kill -9 $$"]);
    let mut shim = Shim::start(dir, &p);
    shim.go();
    assert_eq!(shim.exited(), AgentStatus::Signal(9));
    assert_eq!(shim.finish().0, 137);
}

#[test]
fn file_size_limit_applies_to_the_agent() {
    let dir = TempDir::new();
    let mut p = payload(
        &dir.0,
        &["/bin/sh", "-c", "exec head -c 5000 /dev/zero > f"],
    );
    p.rlimits.file_size_bytes = Some(1000);
    let mut shim = Shim::start(dir, &p);
    shim.go();
    assert_eq!(shim.exited(), AgentStatus::Signal(libc::SIGXFSZ));
    let size = fs::metadata(shim.dir.0.join("f")).expect("f").len();
    assert_eq!(size, 1000);
    assert_eq!(shim.finish().0, 128 + libc::SIGXFSZ);
}

#[test]
fn wrong_usage_and_missing_descriptors() {
    let out = Command::new(SHIM)
        .env_clear()
        .arg("--bogus")
        .output()
        .expect("run shim");
    assert_eq!(out.status.code(), Some(126));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage:"));

    let mut cmd = Command::new(SHIM);
    cmd.env_clear().stdin(Stdio::null()).stderr(Stdio::piped());
    // SAFETY: close is async-signal-safe; 3 and 4 must not be open here.
    unsafe {
        cmd.pre_exec(|| {
            libc::close(3);
            libc::close(4);
            Ok(())
        });
    }
    let out = cmd.output().expect("run shim");
    assert_eq!(out.status.code(), Some(124));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("turnstile-shim: control socket"));
}

#[test]
fn nsjail_mode_outside_a_jail_fails_closed() {
    let dir = TempDir::new();
    let marker = dir.0.join("marker");
    let mut p = payload(&dir.0, &["/bin/sh", "-c", "touch marker"]);
    p.mode = Mode::Nsjail;
    let shim = Shim::start(dir, &p);
    let (class, message) = shim.failed();
    assert_eq!(class, FailureClass::SelfCheck);
    assert!(message.contains("pid namespace"), "{message}");
    let ((code, _, _), _dir) = shim.finish_keeping_dir();
    assert_eq!(code, 122);
    assert!(!marker.exists(), "the agent ran");
}
