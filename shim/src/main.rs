//! `turnstile-shim`: PID 1 of a Turnstile jail, or a plain child of the broker
//! in direct mode.
//!
//! It reads the init payload from fd 3, reports what it sees of its own
//! isolation on the control socket (fd 4), waits for the broker's go, runs
//! the agent, forwards signals to it, reaps every child, kills whatever the
//! agent left behind and reports how the agent ended. Its exit code is the
//! agent's, or one of `exit_code::*` when it failed before the agent ran.
//! The agent's exec plan is [`agent`]; the shim's own syscalls as PID 1
//! live in [`pid1`], the spawn and what a launcher shares with it in
//! `turnstile-sys`.

mod agent;
mod bridge;
mod launch;
mod pid1;

use nix::errno::Errno;
use nix::sys::signal::{SigSet, Signal};
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use turnstile_shim::{
    AgentStatus, DEFAULT_MAX_PAYLOAD, FailureClass, GO, INIT_FD, InitPayload, Mode, SelfCheck,
    ShimMsg, Usage, exit_code, read_capped, write_frame,
};
use turnstile_sys::{ChildStep, SpawnError};

const USAGE: &str = "usage: turnstile-shim --max-payload BYTES";
/// Longest message put in a `Failed` frame (the broker caps frames).
const MAX_MESSAGE: usize = 4096;
/// Cap on what is read of one `/proc` file for the self-check.
const MAX_PROC_FILE: u64 = 64 * 1024;

fn main() {
    let mut args = std::env::args_os().skip(1).peekable();
    let parsed = if args.peek().is_some_and(|a| a == "--launcher") && args.len() == 1 {
        match launch::serve_request() {
            launch::Next::Exit(code) => std::process::exit(code),
            launch::Next::RunShim(max_payload) => Ok(max_payload),
        }
    } else {
        parse_args(args)
    };
    let code = match parsed {
        Ok(max_payload) => {
            let mut control = Control::default();
            match run(max_payload, &mut control) {
                Ok(code) => code,
                Err(e) => {
                    control.fail(&e);
                    e.class().exit_code()
                }
            }
        }
        Err(msg) => {
            let _ = writeln!(io::stderr(), "turnstile-shim: {msg}\n{USAGE}");
            exit_code::USAGE
        }
    };
    std::process::exit(code)
}

/// The ordered start, the wait loop and the end of a turn.
fn run(max_payload: usize, control: &mut Control) -> Result<i32, ShimError> {
    // 1. Signals before anything else. From here on SIGTERM and friends stay
    //    pending until the wait loop takes them, so none is lost between the
    //    spawn and the loop and none kills the shim with its default action;
    //    a SIGCHLD from an agent that exits at once waits for the loop too.
    //    Threads started later (the LLM bridge) inherit the mask, so only the
    //    main thread ever takes these signals.
    let signals = pid1::take_signals().map_err(|e| ShimError::Setup("cannot block signals", e))?;
    // Subreaper before any child exists, so that no orphan of the agent can
    // ever be re-parented past the shim (implicit when the shim is PID 1).
    pid1::set_child_subreaper().map_err(|e| ShimError::Setup("cannot become a subreaper", e))?;
    // Out of the agent's reach before the control socket is even taken:
    // no /proc/1/fd, no /proc/1/mem, no pidfd_getfd for a process of the
    // same uid that is not dumpable.
    pid1::make_undumpable()
        .map_err(|e| ShimError::Setup("cannot make the shim non-dumpable", e))?;

    // 2. The control socket before the payload, so that a bad payload can
    //    still be reported on it. It is made close-on-exec here, long before
    //    the fork, and so is anything else we may have inherited.
    control.0 = Some(pid1::take_control_fd().map_err(ShimError::Control)?);
    pid1::cloexec_inherited_fds();

    // 3. The payload, closed as soon as it is read. The exec plan is built at
    //    once: it is the payload's last validation, and everything the child
    //    needs must be allocated before the fork anyway.
    let payload = read_payload(max_payload)?;
    let mut plan = agent::ExecPlan::new(&payload).map_err(ShimError::Payload)?;

    // 4. Self-check, then the broker's go. The agent never starts before the
    //    broker has seen the isolation from inside and agreed: fail closed.
    let check = self_check();
    let problems = check.verify(payload.mode);
    if !problems.is_empty() {
        return Err(ShimError::SelfCheck(problems));
    }
    control
        .send(&ShimMsg::Hello(check))
        .map_err(ShimError::Control)?;
    control.await_go()?;

    // 5. The LLM bridge, when asked for: listen on 127.0.0.1:<port> and join
    //    each connection to the unix socket at `llm.socket_path` (see
    //    `bridge`). Its threads start after `take_signals`, so they inherit
    //    the blocked mask, and before the spawn, so the agent finds it
    //    listening; the URL with the port actually bound goes into the plan's
    //    environment here, still before the fork (the child allocates
    //    nothing).
    if let Some(llm) = &payload.llm {
        let port = bridge::start(llm).map_err(ShimError::Bridge)?;
        let url = format!("http://127.0.0.1:{port}{}", llm.url_path);
        for key in &llm.env_vars {
            plan.set_env(key, &url).map_err(ShimError::Payload)?;
        }
    }

    // 6. The agent. Limits, process group and parent-death signal are set in
    //    the child (see `agent::spawn`), so the shim itself is never bound by
    //    the agent's limits.
    let agent = agent::spawn(&plan).map_err(|e| spawn_error(e, &plan, &payload))?;
    let _ = control.send(&ShimMsg::AgentStarted { pid: agent });

    // 7. Wait for the agent, reaping everything else on the way.
    //    kill(-1) is only ever used as PID 1 of the namespace nsjail made:
    //    anywhere else it would reach every process of our uid on the host.
    let contained = payload.mode == Mode::Nsjail && pid1::pid() == 1;
    let outcome = supervise(agent, contained, &signals);
    if outcome.is_err() && !contained {
        // The agent was not reaped, so its pid (the group id) is still ours.
        pid1::kill_group(agent);
    }

    // 8. Nothing outlives the agent.
    let clean = if contained {
        pid1::kill_namespace()
    } else {
        pid1::kill_children()
    };
    if !clean {
        let _ = writeln!(
            io::stderr(),
            "turnstile-shim: gave up killing leftover processes"
        );
    }

    // 9. Report; the broker may be gone already, which changes nothing.
    let (status, usage) = outcome?;
    let _ = control.send(&ShimMsg::AgentExited { status, usage });
    Ok(status.as_exit_code())
}

/// The classic init loop: forward termination signals to the agent, reap
/// every child on SIGCHLD, return when the agent itself is reaped.
fn supervise(
    agent: i32,
    contained: bool,
    signals: &SigSet,
) -> Result<(AgentStatus, Usage), ShimError> {
    loop {
        let sig = pid1::wait_signal(signals)
            .map_err(|e| ShimError::Setup("cannot wait for signals", e))?;
        if sig != Signal::SIGCHLD {
            // To the agent only: it decides how to stop its own children, and
            // whatever it leaves behind is killed after it exits.
            pid1::send_signal(agent, sig);
            continue;
        }
        // Signals coalesce: one SIGCHLD may stand for many exits.
        while let Some(pid) = pid1::exited_child() {
            if pid == agent && !contained {
                // Kill the group while the agent is an unreaped zombie: its
                // pid, which is the group id, cannot have been reused.
                pid1::kill_group(agent);
            }
            match pid1::reap(pid, true) {
                Ok(Some((_, status, usage))) if pid == agent => return Ok((status, usage)),
                Ok(_) => {}
                Err(e) if pid == agent => {
                    return Err(ShimError::Setup("cannot reap the agent", e));
                }
                Err(_) => break,
            }
        }
    }
}

fn read_payload(max_payload: usize) -> Result<InitPayload, ShimError> {
    let file = pid1::take_init_fd()
        .map_err(|e| ShimError::Payload(format!("init payload descriptor {INIT_FD}: {e}")))?;
    let bytes = read_capped(&file, max_payload);
    // Closed whether the read worked or not: the agent must never hold it.
    drop(file);
    let bytes = bytes.map_err(|e| ShimError::Payload(e.to_string()))?;
    InitPayload::decode(&bytes).map_err(|e| ShimError::Payload(e.to_string()))
}

/// What the shim sees of its isolation. Anything unreadable reads as
/// missing isolation, which `verify` refuses in nsjail mode.
fn self_check() -> SelfCheck {
    let (uid, gid) = pid1::uid_gid();
    SelfCheck {
        pid: pid1::pid(),
        uid,
        gid,
        uid_map: read_proc("/proc/self/uid_map").trim().to_string(),
        gid_map: read_proc("/proc/self/gid_map").trim().to_string(),
        net_interfaces: parse_net_dev(&read_proc("/proc/net/dev")),
        no_new_privs: pid1::no_new_privs(),
        env_keys: std::env::vars_os()
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect(),
        root_read_only: pid1::root_read_only(),
        hostname: pid1::hostname(),
    }
}

fn read_proc(path: &str) -> String {
    let mut text = String::new();
    if let Ok(file) = File::open(path) {
        let _ = file.take(MAX_PROC_FILE).read_to_string(&mut text);
    }
    text
}

/// Interface names of `/proc/net/dev`: two header lines, then `name: stats`.
fn parse_net_dev(text: &str) -> Vec<String> {
    text.lines()
        .skip(2)
        .filter_map(|line| line.split_once(':'))
        .map(|(name, _)| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .collect()
}

/// `--max-payload BYTES` (or `--max-payload=BYTES`); without it, the
/// library's default cap.
fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<usize, String> {
    let args = args
        .into_iter()
        .map(|a| a.into_string().map_err(|a| format!("bad argument {a:?}")))
        .collect::<Result<Vec<_>, _>>()?;
    let value = match args.as_slice() {
        [] => return Ok(DEFAULT_MAX_PAYLOAD),
        [flag, value] if flag == "--max-payload" => value.as_str(),
        [one] => one
            .strip_prefix("--max-payload=")
            .ok_or_else(|| format!("unexpected argument {one:?}"))?,
        _ => return Err("unexpected arguments".to_string()),
    };
    match value.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!(
            "--max-payload wants a positive number of bytes, got {value:?}"
        )),
    }
}

fn spawn_error(e: SpawnError, plan: &agent::ExecPlan, payload: &InitPayload) -> ShimError {
    match e {
        SpawnError::Clone(e) => ShimError::Setup("cannot fork the agent", e),
        SpawnError::Child { step, errno } => match step {
            ChildStep::Exec => ShimError::Exec {
                argv0: payload.argv.first().cloned().unwrap_or_default(),
                errno,
            },
            ChildStep::Chdir => ShimError::Cwd {
                cwd: payload.cwd.clone(),
                errno,
            },
            ChildStep::Rlimit(i) => ShimError::Limit {
                name: plan.rlimit_name(i),
                errno,
            },
            ChildStep::Signals => ShimError::Setup("cannot reset the agent's signals", errno),
            ChildStep::ProcessGroup => {
                ShimError::Setup("cannot give the agent its own group", errno)
            }
            ChildStep::ParentDeathSignal => {
                ShimError::Setup("cannot set the agent's parent-death signal", errno)
            }
            // Steps the shim's plan does not take (or, for a shim gone
            // mid-spawn, that nobody will read).
            step @ (ChildStep::ParentGone | ChildStep::Cgroup | ChildStep::Descriptors) => {
                ShimError::Setup(step.describe(), errno)
            }
        },
    }
}

/// The control socket, once adopted; before that, sends fail quietly.
#[derive(Default)]
struct Control(Option<UnixStream>);

impl Control {
    fn send(&self, msg: &ShimMsg) -> io::Result<()> {
        match &self.0 {
            Some(stream) => write_frame(stream, msg),
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    /// Blocks for the broker's one-byte answer to `Hello`.
    fn await_go(&self) -> Result<(), ShimError> {
        let Some(mut stream) = self.0.as_ref() else {
            return Err(ShimError::Aborted(None));
        };
        let mut byte = [0u8; 1];
        match stream.read_exact(&mut byte) {
            Ok(()) if byte == [GO] => Ok(()),
            Ok(()) => Err(ShimError::Aborted(Some(byte[0]))),
            Err(_) => Err(ShimError::Aborted(None)),
        }
    }

    /// Reports a failure to the broker (best effort) and on stderr.
    fn fail(&self, e: &ShimError) {
        let message = truncated(e.to_string().replace('\n', " "), MAX_MESSAGE);
        let _ = writeln!(io::stderr(), "turnstile-shim: {message}");
        let _ = self.send(&ShimMsg::Failed {
            class: e.class(),
            message,
        });
    }
}

fn truncated(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

#[derive(Debug)]
enum ShimError {
    /// A setup syscall failed.
    Setup(&'static str, Errno),
    /// The control socket is missing or broken.
    Control(io::Error),
    /// The LLM bridge could not listen or start.
    Bridge(String),
    Payload(String),
    SelfCheck(Vec<String>),
    /// The broker answered something else than go (`None`: nothing at all).
    Aborted(Option<u8>),
    Cwd {
        cwd: String,
        errno: Errno,
    },
    Limit {
        name: &'static str,
        errno: Errno,
    },
    Exec {
        argv0: String,
        errno: Errno,
    },
}

impl ShimError {
    fn class(&self) -> FailureClass {
        match self {
            ShimError::Setup(..)
            | ShimError::Control(_)
            | ShimError::Bridge(_)
            | ShimError::Cwd { .. }
            | ShimError::Limit { .. } => FailureClass::Setup,
            ShimError::Payload(_) => FailureClass::Payload,
            ShimError::SelfCheck(_) => FailureClass::SelfCheck,
            ShimError::Aborted(_) => FailureClass::Aborted,
            ShimError::Exec { .. } => FailureClass::Exec,
        }
    }
}

impl std::fmt::Display for ShimError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ShimError::Setup(what, errno) => write!(f, "{what}: {}", errno.desc()),
            ShimError::Control(e) => write!(f, "control socket: {e}"),
            ShimError::Payload(msg) | ShimError::Bridge(msg) => f.write_str(msg),
            ShimError::SelfCheck(problems) => {
                write!(f, "self-check failed: {}", problems.join("; "))
            }
            ShimError::Aborted(Some(byte)) => {
                write!(f, "broker answered {byte:#04x} instead of go")
            }
            ShimError::Aborted(None) => f.write_str("broker closed the control socket before go"),
            ShimError::Cwd { cwd, errno } => {
                write!(f, "cannot enter working directory {cwd}: {}", errno.desc())
            }
            ShimError::Limit { name, errno } => {
                write!(f, "cannot set the {name} limit: {}", errno.desc())
            }
            ShimError::Exec { argv0, errno } => {
                write!(f, "cannot execute {argv0}: {}", errno.desc())
            }
        }
    }
}

impl std::error::Error for ShimError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ShimError::Control(e) => Some(e),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn argv_parsing() {
        assert_eq!(parse_args(args(&[])), Ok(DEFAULT_MAX_PAYLOAD));
        assert_eq!(parse_args(args(&["--max-payload", "100"])), Ok(100));
        assert_eq!(parse_args(args(&["--max-payload=7"])), Ok(7));
        for bad in [
            &["--max-payload"][..],
            &["--max-payload", "0"],
            &["--max-payload", "-1"],
            &["--max-payload", "1k"],
            &["--max-payload", "1", "x"],
            &["--other", "1"],
            &["x"],
        ] {
            assert!(parse_args(args(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn net_dev_parsing() {
        let text = "Inter-|   Receive                            |  Transmit\n \
                    face |bytes    packets errs drop fifo frame compressed multicast|bytes\n    \
                    lo:    1234      10    0    0    0     0          0         0     1234\n  \
                    eth0: 99 1 0 0 0 0 0 0 99\n";
        assert_eq!(parse_net_dev(text), ["lo", "eth0"]);
        assert_eq!(parse_net_dev(""), Vec::<String>::new());
        assert_eq!(parse_net_dev("h1\nh2\n"), Vec::<String>::new());
    }

    #[test]
    fn messages_are_truncated_on_char_boundaries() {
        assert_eq!(truncated("abc".into(), 10), "abc");
        assert_eq!(truncated("aéb".into(), 2), "a");
        assert_eq!(truncated("x".repeat(5000), MAX_MESSAGE).len(), MAX_MESSAGE);
    }

    #[test]
    fn errors_map_to_their_classes_and_codes() {
        let e = ShimError::Exec {
            argv0: "/nope".into(),
            errno: Errno::ENOENT,
        };
        assert_eq!(e.class().exit_code(), exit_code::EXEC);
        assert_eq!(
            e.to_string(),
            "cannot execute /nope: No such file or directory"
        );
        let e = ShimError::Cwd {
            cwd: "/w".into(),
            errno: Errno::ENOENT,
        };
        assert_eq!(e.class().exit_code(), exit_code::SETUP);
        assert_eq!(
            ShimError::Aborted(None).class().exit_code(),
            exit_code::ABORTED
        );
        assert_eq!(
            ShimError::Payload(String::new()).class().exit_code(),
            exit_code::PAYLOAD
        );
        assert_eq!(
            ShimError::SelfCheck(vec![]).class().exit_code(),
            exit_code::SELF_CHECK
        );
    }
}
