//! `turnstile run`: one turn attached to this terminal, on a running broker
//! (`--socket`) or on a broker started in this process for the turn (the
//! same broker, served on a private socket: the production code path).

use crate::args::{
    EXIT_BROKER_LOST, EXIT_NOT_STARTED, EXIT_REFUSED, EXIT_UNREACHABLE, EventsFormat, LlmForward,
    LlmHeader, RunArgs,
};
use std::path::PathBuf;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use turnstile_broker::config::{Config, Mode};
use turnstile_broker::{Broker, server};
use turnstile_client::{CredentialHeader, ForwarderConfig, LlmForwarder, Turn};
use turnstile_client::{connect_unix, reason_name};
use turnstile_proto::v1 as pb;

/// A broker served in this process on a private socket, for one turn.
struct Embedded {
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    _dir: PathBuf,
}

impl Embedded {
    fn start(args: &RunArgs) -> Result<(Embedded, PathBuf), String> {
        let mut cfg = Config {
            mode: if args.jail {
                Mode::Nsjail
            } else {
                Mode::Direct
            },
            // One turn: a ready launcher for a next turn would go unused.
            warm_spares: 0,
            ..Config::default()
        };
        if let Some(d) = &args.state_dir {
            cfg.state_dir = d.clone();
        }
        if let Some(p) = &args.nsjail {
            cfg.nsjail = p.clone();
        }
        if let Some(p) = &args.shim {
            cfg.shim = p.clone();
        }
        if let Some(p) = &args.jail_config {
            cfg.jail_config = p.clone();
        }
        let broker = Broker::new(cfg).map_err(|e| e.to_string())?;
        if args.llm_forward == LlmForward::Broker {
            crate::serve::install_forwarder(&broker)?;
        }
        // A private directory per run: nothing else can reach this broker.
        let dir = broker
            .config
            .state_dir
            .join(format!(".run-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let socket = dir.join("broker.sock");
        let listener = server::bind_unix(&socket).map_err(|e| format!("cannot listen: {e}"))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(server::serve(broker, vec![listener], async {
            let _ = stopped.await;
        }));
        Ok((
            Embedded {
                stop,
                server,
                _dir: dir,
            },
            socket,
        ))
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.server.await;
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

fn new_session_id() -> String {
    use rand::Rng;
    format!("s-{:012x}", rand::rng().random::<u64>() & 0xffff_ffff_ffff)
}

/// One event as a JSON line.
fn event_json(ev: &pb::TurnEvent) -> serde_json::Value {
    let mut json = event_body(ev);
    if let Some(o) = json.as_object_mut() {
        o.insert("seq".into(), ev.seq.into());
    }
    json
}

fn event_body(ev: &pb::TurnEvent) -> serde_json::Value {
    use pb::turn_event::Kind;
    match &ev.kind {
        Some(Kind::Started(s)) => serde_json::json!({
            "event": "started", "turn_id": s.turn_id, "session_id": s.session_id,
            "mode": pb::Mode::try_from(s.mode).map(|m| m.as_str_name()).unwrap_or("?"),
            "home": s.home, "work_dir": s.work_dir, "cwd": s.cwd, "spawn_us": s.spawn_us,
            "llm_upstream": s.llm_upstream,
        }),
        Some(Kind::Stdout(b)) => {
            serde_json::json!({"event": "stdout", "data": String::from_utf8_lossy(b), "len": b.len()})
        }
        Some(Kind::Stderr(b)) => {
            serde_json::json!({"event": "stderr", "data": String::from_utf8_lossy(b), "len": b.len()})
        }
        Some(Kind::Exited(e)) => serde_json::json!({
            "event": "exited", "reason": reason_name(e.reason),
            "exit_code": match e.status { Some(pb::exited::Status::ExitCode(c)) => Some(c), _ => None },
            "signal": match e.status { Some(pb::exited::Status::Signal(s)) => Some(s), _ => None },
            "message": e.message, "wall_time_us": e.wall_time_us,
            "stdout_bytes": e.stdout_bytes, "stderr_bytes": e.stderr_bytes, "stdin_bytes": e.stdin_bytes,
        }),
        Some(Kind::Llm(f)) => serde_json::json!({"event": "llm", "conn": f.conn}),
        Some(Kind::LlmRequest(r)) => serde_json::json!({
            "event": "llm_request", "method": r.method, "path": r.path, "status": r.status,
            "request_bytes": r.request_bytes, "response_bytes": r.response_bytes,
            "duration_us": r.duration_us, "error": r.error,
        }),
        Some(Kind::Notice(n)) => serde_json::json!({"event": "notice", "message": n.message}),
        None => serde_json::json!({"event": "empty"}),
    }
}

/// `turnstile run`: returns the process exit code.
pub async fn run_turn(args: RunArgs) -> i32 {
    let (embedded, socket) = match &args.socket {
        Some(s) => (None, s.clone()),
        None => match Embedded::start(&args) {
            Ok((e, s)) => (Some(e), s),
            Err(msg) => {
                eprintln!("turnstile: cannot start a broker for this turn: {msg}");
                return EXIT_NOT_STARTED;
            }
        },
    };
    let code = drive(&args, &socket).await;
    if let Some(e) = embedded {
        e.stop().await;
    }
    code
}

/// `--llm-upstream` and the key read from `--llm-key-env` here, outside
/// the jail.
fn upstream_and_key(args: &crate::args::LlmArgs) -> Result<Option<(String, String)>, String> {
    let (Some(url), Some(var)) = (&args.llm_upstream, &args.llm_key_env) else {
        return Ok(None);
    };
    let key = std::env::var(var).map_err(|_| {
        format!("--llm-key-env {var}: that variable is not set (or not UTF-8) in this environment; export the key in it first")
    })?;
    Ok(Some((url.clone(), key)))
}

/// `Start.llm_upstream` for `--llm-forward broker`: the broker forwards.
fn broker_upstream(args: &crate::args::LlmArgs) -> Result<Option<pb::LlmUpstream>, String> {
    let Some((base_url, credential)) = upstream_and_key(args)? else {
        return Ok(None);
    };
    let credential_header = match args.llm_header {
        Some(LlmHeader::XApiKey) => pb::CredentialHeader::XApiKey,
        Some(LlmHeader::Authorization) => pb::CredentialHeader::AuthorizationBearer,
        None => pb::CredentialHeader::Unspecified,
    } as i32;
    Ok(Some(pb::LlmUpstream {
        base_url,
        credential,
        credential_header,
        max_request_bytes: 0,
    }))
}

/// The forwarder for `--llm-upstream` (executor-side forwarding).
fn forwarder(args: &crate::args::LlmArgs) -> Result<Option<LlmForwarder>, String> {
    let header = args.llm_header;
    let Some((url, key)) = upstream_and_key(args)? else {
        return Ok(None);
    };
    // Without --llm-header, the credential goes as the turn's agent
    // profile says (the broker names it in `Started`).
    let config = match header {
        Some(LlmHeader::XApiKey) => {
            ForwarderConfig::new(url.clone(), key, CredentialHeader::XApiKey)
        }
        Some(LlmHeader::Authorization) => {
            ForwarderConfig::new(url.clone(), key, CredentialHeader::AuthorizationBearer)
        }
        None => ForwarderConfig::for_profile(url.clone(), key),
    };
    LlmForwarder::new(config)
        .map(Some)
        .map_err(|e| e.to_string())
}

async fn drive(args: &RunArgs, socket: &std::path::Path) -> i32 {
    let llm = match args.llm_forward {
        LlmForward::Executor => forwarder(&args.llm).map(|f| (f, None)),
        LlmForward::Broker => broker_upstream(&args.llm).map(|u| (None, u)),
    };
    let (forwarder, llm_upstream) = match llm {
        Ok(f) => f,
        Err(msg) => {
            eprintln!("turnstile: {msg}");
            return EXIT_NOT_STARTED;
        }
    };
    let channel = match connect_unix(socket.to_path_buf()).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "turnstile: cannot reach the broker at {}: {e}; start it with `turnstile serve`, or drop --socket to run without one",
                socket.display()
            );
            return EXIT_UNREACHABLE;
        }
    };
    let mut client = pb::broker_client::BrokerClient::new(channel)
        .max_decoding_message_size(turnstile_client::MAX_MESSAGE);
    let session = match &args.session {
        Some(s) => s.clone(),
        None => {
            let id = new_session_id();
            if !args.quiet {
                eprintln!("turnstile: session {id}");
            }
            id
        }
    };
    let start = pb::Start {
        session_id: session.clone(),
        argv: args.argv.clone(),
        env: args.env.iter().cloned().collect(),
        cwd: args.cwd.clone(),
        limits: Some(pb::Limits {
            wall_time_ms: args.timeout.map(|s| s * 1000).unwrap_or(0),
            ..Default::default()
        }),
        lease: args.wait.map(|s| pb::Lease {
            policy: pb::lease::Policy::Wait as i32,
            wait_ms: s * 1000,
        }),
        llm_env_vars: args.llm_env_vars.clone(),
        llm_credential_env_vars: args.llm_credential_env_vars.clone(),
        profile: args.profile.clone().unwrap_or_default(),
        turn_key: args.turn_key.clone().unwrap_or_default(),
        detach_grace_ms: args.detach_grace_ms,
        llm_upstream,
        ..Default::default()
    };
    // Ctrl-C is taken over before the turn starts: a press between the start
    // and a handler installed later would kill this process (and so the
    // turn) instead of interrupting the agent.
    let interrupts = {
        use tokio::signal::unix::{SignalKind, signal};
        signal(SignalKind::interrupt()).ok()
    };
    let mut turn = match Turn::start(&mut client, start, forwarder).await {
        Ok(t) => t,
        Err(status) => {
            eprintln!("turnstile: turn refused: {}", status.message());
            return EXIT_REFUSED;
        }
    };
    let view = View {
        events: args.events,
        quiet: args.quiet,
    };
    let code = follow(&mut turn, client.clone(), &session, interrupts, view).await;
    drop(turn);
    if args.rm
        && let Err(s) = client
            .delete_session(pb::SessionRef {
                session_id: session.clone(),
            })
            .await
    {
        eprintln!(
            "turnstile: cannot delete session {session}: {}",
            s.message()
        );
    }
    code
}

/// `turnstile attach`: joins a turn and follows it as `run` does.
pub async fn attach(args: crate::args::AttachArgs) -> i32 {
    let forwarder = match forwarder(&args.llm) {
        Ok(f) => f,
        Err(msg) => {
            eprintln!("turnstile: {msg}");
            return EXIT_NOT_STARTED;
        }
    };
    let channel = match connect_unix(args.socket.clone()).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "turnstile: cannot reach the broker at {}: {e}",
                args.socket.display()
            );
            return EXIT_UNREACHABLE;
        }
    };
    let mut client = pb::broker_client::BrokerClient::new(channel)
        .max_decoding_message_size(turnstile_client::MAX_MESSAGE);
    let interrupts = {
        use tokio::signal::unix::{SignalKind, signal};
        signal(SignalKind::interrupt()).ok()
    };
    let request = pb::Attach {
        session_id: args.session.clone(),
        turn_id: args.turn.clone().unwrap_or_default(),
        turn_key: args.turn_key.clone().unwrap_or_default(),
        after_seq: args.after,
    };
    let mut turn = match Turn::attach(&mut client, request, forwarder).await {
        Ok(t) => t,
        Err(status) => {
            eprintln!("turnstile: cannot attach: {}", status.message());
            return EXIT_REFUSED;
        }
    };
    let view = View {
        events: args.events,
        quiet: args.quiet,
    };
    follow(&mut turn, client, &args.session, interrupts, view).await
}

/// How a followed turn is shown.
#[derive(Debug, Clone, Copy)]
struct View {
    events: Option<EventsFormat>,
    quiet: bool,
}

/// Relays this terminal's stdin and Ctrl-C into the turn and its events
/// out, to its `Exited`: the exit code.
async fn follow(
    turn: &mut Turn,
    client: pb::broker_client::BrokerClient<tonic::transport::Channel>,
    session: &str,
    interrupts: Option<tokio::signal::unix::Signal>,
    view: View,
) -> i32 {
    let input = turn.input();
    let stdin_task = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = input.close_stdin().await;
                    break;
                }
                Ok(n) => {
                    if input
                        .stdin(bytes::Bytes::copy_from_slice(&buf[..n]))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    // Ctrl-C: the first interrupts the agent, the second cancels the turn.
    let input = turn.input();
    let mut cancel_client = client;
    let cancel_session = session.to_string();
    let quiet = view.quiet;
    let ctrl_c = tokio::spawn(async move {
        let Some(mut int) = interrupts else {
            return;
        };
        let mut presses = 0;
        while int.recv().await.is_some() {
            presses += 1;
            if presses == 1 {
                if !quiet {
                    eprintln!("turnstile: interrupting the agent (Ctrl-C again cancels the turn)");
                }
                let _ = input.signal(pb::signal_request::Signal::Interrupt).await;
            } else {
                if !quiet {
                    eprintln!("turnstile: cancelling the turn");
                }
                let _ = cancel_client
                    .cancel_turn(pb::SessionRef {
                        session_id: cancel_session.clone(),
                    })
                    .await;
            }
        }
    });
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let mut code = EXIT_NOT_STARTED;
    let mut spawn_us = None;
    let mut exited = false;
    let mut llm_requests = 0u64;
    while let Some(event) = turn.next().await {
        let event = match event {
            Ok(e) => e,
            Err(status) => {
                eprintln!("turnstile: turn stream failed: {}", status.message());
                break;
            }
        };
        if view.events == Some(EventsFormat::Jsonl) {
            let mut line = event_json(&event).to_string();
            line.push('\n');
            let _ = stdout.write_all(line.as_bytes()).await;
            let _ = stdout.flush().await;
        }
        match event.kind {
            Some(pb::turn_event::Kind::Stdout(b)) if view.events.is_none() => {
                let _ = stdout.write_all(&b).await;
                let _ = stdout.flush().await;
            }
            Some(pb::turn_event::Kind::Stderr(b)) if view.events.is_none() => {
                let _ = stderr.write_all(&b).await;
                let _ = stderr.flush().await;
            }
            Some(pb::turn_event::Kind::Started(s)) => spawn_us = Some(s.spawn_us),
            Some(pb::turn_event::Kind::LlmRequest(_)) => llm_requests += 1,
            Some(pb::turn_event::Kind::Notice(n)) if view.events.is_none() => {
                eprintln!("turnstile: notice: {}", n.message);
            }
            Some(pb::turn_event::Kind::Exited(e)) => {
                exited = true;
                code = match e.status {
                    Some(pb::exited::Status::ExitCode(c)) => c,
                    Some(pb::exited::Status::Signal(s)) => 128 + s,
                    None => EXIT_NOT_STARTED,
                };
                let reason = reason_name(e.reason);
                if e.reason != pb::exited::Reason::Exited as i32 {
                    eprintln!("turnstile: turn ended: {reason}: {}", e.message);
                }
                if !view.quiet {
                    eprintln!(
                        "turnstile: {reason} (code {code}) · spawn {} · wall {:.1} ms · stdout {} B · stderr {} B · stdin {} B · llm {}",
                        spawn_us
                            .map(|us| format!("{:.1} ms", us as f64 / 1000.0))
                            .unwrap_or_else(|| "-".into()),
                        e.wall_time_us as f64 / 1000.0,
                        e.stdout_bytes,
                        e.stderr_bytes,
                        e.stdin_bytes,
                        if llm_requests > 0 {
                            format!("requests {llm_requests} (forwarded by the broker)")
                        } else {
                            format!("connections {}", turn.llm_connections())
                        }
                    );
                }
            }
            _ => {}
        }
    }
    if !exited && spawn_us.is_some() {
        // The agent ran; without `Exited` nobody knows how it ended.
        eprintln!(
            "turnstile: the broker went away during the turn: the agent had started, its outcome is unknown"
        );
        code = EXIT_BROKER_LOST;
    }
    stdin_task.abort();
    ctrl_c.abort();
    code
}
