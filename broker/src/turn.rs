//! One turn, from a validated `Start` to its single `Exited`: the per-turn
//! dir and payload, the spawn (nsjail or direct, one code path), the shim's
//! self-check handshake, the stdio relay, the stop sequence and cleanup.

use crate::cgroup::{CgroupLimits, TurnCgroup};
use crate::config::{Limits, Mode};
use crate::disk::{DiskLimit, Exceeded};
use crate::error::{BrokerError, InputError};
use crate::process::{kill_group, kill_pid};
use crate::session::{Lease, LeasePolicy, SessionMeta, SessionPaths, now_unix_ms};
use crate::spawn::{Child, ChildSetup, LaunchError, Launcher};
use crate::warm::Spare;
use crate::{Admitted, Broker, StopReason, jail, validate};
use bytes::{Bytes, BytesMut};
use nix::sys::signal::Signal;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};
use turnstile_proto::v1 as pb;
use turnstile_proto::v1::exited::Reason;
use turnstile_shim::{AgentStatus, FailureClass, InitPayload, SelfCheck, ShimMsg, Usage};

/// Read size of the stdout/stderr relay; also the largest chunk per event.
pub const RELAY_CHUNK: usize = 256 * 1024;
/// Processes of a turn that are not the agent's: nsjail and the shim.
pub(crate) const SUPERVISORS: u64 = 2;
/// Kernel buffer of the agent's stdout/stderr pipes.
const PIPE_SIZE: i32 = 1 << 20;
/// Events buffered per turn between the relay and gRPC.
pub const EVENT_QUEUE: usize = 16;
/// Stdin chunks buffered per turn.
const STDIN_QUEUE: usize = 16;
/// Default LLM bridge variable.
pub const DEFAULT_LLM_ENV: &str = "ANTHROPIC_BASE_URL";
/// After the jail is gone, how long an idle stdout/stderr may stay open
/// (held by a process that escaped the turn) before the relay gives up.
const DRAIN_IDLE: Duration = Duration::from_secs(2);

/// The turn's events towards the executor (the LLM relay sends on it too).
pub type EventTx = crate::llm::EventSink;

/// A validated `Start`.
#[derive(Debug, Clone)]
pub struct TurnSpec {
    pub session_id: String,
    pub turn_id: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Normalised cwd relative to the work dir.
    pub cwd: String,
    pub limits: Limits,
    pub lease: LeasePolicy,
    pub llm_env_vars: Vec<String>,
    /// `RLIMIT_FSIZE` from the session's disk limit: what is left of it.
    pub disk_file_cap: Option<u64>,
}

/// A fresh unique id (turns, spool files).
pub fn new_turn_id() -> String {
    use rand::Rng;
    let n: u64 = rand::rng().random();
    format!("t-{:x}-{n:016x}", now_unix_ms())
}

/// Effective limits: 0 takes the broker's default; above the cap is refused.
pub fn effective_limits(
    req: Option<&pb::Limits>,
    defaults: &Limits,
    caps: &Limits,
) -> Result<Limits, InputError> {
    let req = req.cloned().unwrap_or_default();
    let pick = |name: &'static str, asked: u64, default: Option<u64>, cap: Option<u64>| {
        if asked == 0 {
            return Ok(default);
        }
        // Whatever the broker's caps (even none), never past what the
        // kernel's types and the broker's arithmetic hold.
        let max = crate::config::limit_max(name);
        if asked > max {
            return Err(InputError::OverMax {
                name,
                value: asked,
                max,
            });
        }
        match cap {
            Some(cap) if asked > cap => Err(InputError::OverCap {
                name,
                value: asked,
                cap,
            }),
            _ => Ok(Some(asked)),
        }
    };
    Ok(Limits {
        wall_time_ms: pick(
            "wall_time_ms",
            req.wall_time_ms,
            defaults.wall_time_ms,
            caps.wall_time_ms,
        )?,
        memory_bytes: pick(
            "memory_bytes",
            req.memory_bytes,
            defaults.memory_bytes,
            caps.memory_bytes,
        )?,
        cpu_time_ms: pick(
            "cpu_time_ms",
            req.cpu_time_ms,
            defaults.cpu_time_ms,
            caps.cpu_time_ms,
        )?,
        max_processes: pick(
            "max_processes",
            req.max_processes,
            defaults.max_processes,
            caps.max_processes,
        )?,
        max_open_files: pick(
            "max_open_files",
            req.max_open_files,
            defaults.max_open_files,
            caps.max_open_files,
        )?,
        max_file_size_bytes: pick(
            "max_file_size_bytes",
            req.max_file_size_bytes,
            defaults.max_file_size_bytes,
            caps.max_file_size_bytes,
        )?,
        disk_bytes: pick(
            "disk_bytes",
            req.disk_bytes,
            defaults.disk_bytes,
            caps.disk_bytes,
        )?,
        disk_inodes: pick(
            "disk_inodes",
            req.disk_inodes,
            defaults.disk_inodes,
            caps.disk_inodes,
        )?,
    })
}

impl TurnSpec {
    /// Validates a `Start` completely; nothing touches disk.
    pub fn from_start(start: pb::Start, broker: &Broker) -> Result<TurnSpec, InputError> {
        validate::session_id(&start.session_id)?;
        let turn_id = if start.turn_id.is_empty() {
            new_turn_id()
        } else {
            validate::turn_id(&start.turn_id)?;
            start.turn_id
        };
        validate::argv(&start.argv)?;
        let llm_env_vars = if start.llm_env_vars.is_empty() {
            vec![DEFAULT_LLM_ENV.to_string()]
        } else {
            start.llm_env_vars
        };
        for v in &llm_env_vars {
            if !validate::is_env_key(v) || validate::is_protected_env(v) {
                return Err(InputError::LlmEnvVar(v.clone()));
            }
        }
        let mut env: Vec<(String, String)> = start.env.into_iter().collect();
        env.sort();
        for (k, v) in &env {
            validate::env_entry(k, v, &llm_env_vars)?;
        }
        let cwd = validate::cwd(&start.cwd)?;
        let limits = effective_limits(
            start.limits.as_ref(),
            &broker.config.default_limits,
            &broker.config.max_limits,
        )?;
        let lease = match start.lease {
            Some(l) if l.policy == pb::lease::Policy::Wait as i32 => {
                LeasePolicy::Wait(Duration::from_millis(l.wait_ms))
            }
            _ => LeasePolicy::Reject,
        };
        let disk_file_cap = broker
            .disk
            .file_size_cap(&start.session_id, disk_limit(&limits));
        Ok(TurnSpec {
            disk_file_cap,
            session_id: start.session_id,
            turn_id,
            argv: start.argv,
            env,
            cwd,
            limits,
            lease,
            llm_env_vars,
        })
    }
}

/// The session disk limit within a turn's limits.
pub fn disk_limit(limits: &Limits) -> DiskLimit {
    DiskLimit {
        bytes: limits.disk_bytes,
        inodes: limits.disk_inodes,
    }
}

/// Where a turn's files are, on the host and as the agent sees them.
#[derive(Debug, Clone)]
pub struct TurnPaths {
    pub session: SessionPaths,
    pub turn_dir: PathBuf,
    pub payload: PathBuf,
    pub jail_config: PathBuf,
    /// The LLM socket on the host, and as the shim sees it.
    pub llm_socket: PathBuf,
    pub llm_socket_jail: String,
    /// As the agent sees them.
    pub home: String,
    pub work: String,
    pub cwd: String,
    pub tmp: String,
}

impl TurnPaths {
    pub fn new(broker: &Broker, spec: &TurnSpec) -> TurnPaths {
        let session = broker.sessions.paths(&spec.session_id);
        let turn_dir = broker.turns_dir.join(&spec.turn_id);
        let (home, work, tmp) = match broker.mode() {
            Mode::Nsjail => (
                jail::JAIL_HOME.to_string(),
                jail::JAIL_WORK.to_string(),
                "/tmp".to_string(),
            ),
            Mode::Direct => (
                session.home.to_string_lossy().into_owned(),
                session.work.to_string_lossy().into_owned(),
                turn_dir.join("tmp").to_string_lossy().into_owned(),
            ),
        };
        let cwd = if spec.cwd.is_empty() {
            work.clone()
        } else {
            format!("{work}/{}", spec.cwd)
        };
        let llm_socket = turn_dir.join("llm.sock");
        let llm_socket_jail = match broker.mode() {
            Mode::Nsjail => format!("{}/llm.sock", jail::JAIL_RUN),
            Mode::Direct => llm_socket.to_string_lossy().into_owned(),
        };
        TurnPaths {
            llm_socket,
            llm_socket_jail,
            payload: turn_dir.join("init.msgpack"),
            jail_config: turn_dir.join("jail.cfg"),
            turn_dir,
            session,
            home,
            work,
            cwd,
            tmp,
        }
    }
}

/// The agent's environment: the allowlist, then `Start.env` (sorted).
pub fn agent_env(broker: &Broker, spec: &TurnSpec, paths: &TurnPaths) -> Vec<(String, String)> {
    let mut env = vec![
        ("HOME".to_string(), paths.home.clone()),
        ("USER".to_string(), "agent".to_string()),
        ("LOGNAME".to_string(), "agent".to_string()),
        ("TMPDIR".to_string(), paths.tmp.clone()),
        ("PWD".to_string(), paths.cwd.clone()),
    ];
    for (k, default) in [
        ("PATH", broker.config.agent_path.as_str()),
        ("LANG", "C.UTF-8"),
    ] {
        if !spec.env.iter().any(|(key, _)| key == k) {
            env.push((k.to_string(), default.to_string()));
        }
    }
    env.extend(spec.env.iter().cloned());
    env
}

/// Builds and encodes the init payload, refusing one over the cap. Nothing
/// touches disk.
pub fn build_payload(
    broker: &Broker,
    spec: &TurnSpec,
    paths: &TurnPaths,
) -> Result<Vec<u8>, BrokerError> {
    let l = &spec.limits;
    let no_cgroups = broker.cgroups.is_none();
    let payload = InitPayload {
        version: turnstile_shim::PROTOCOL_VERSION,
        mode: match broker.mode() {
            Mode::Nsjail => turnstile_shim::Mode::Nsjail,
            Mode::Direct => turnstile_shim::Mode::Direct,
        },
        session_id: spec.session_id.clone(),
        turn_id: spec.turn_id.clone(),
        argv: spec.argv.clone(),
        env: agent_env(broker, spec, paths),
        cwd: paths.cwd.clone(),
        rlimits: turnstile_shim::Rlimits {
            cpu_seconds: l.cpu_time_ms.map(|ms| ms.div_ceil(1000).max(1)),
            open_files: l.max_open_files,
            file_size_bytes: match (l.max_file_size_bytes, spec.disk_file_cap) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
            address_space_bytes: if no_cgroups { l.memory_bytes } else { None },
            processes: if no_cgroups { l.max_processes } else { None },
        },
        llm: Some(turnstile_shim::LlmBridge {
            port: match broker.mode() {
                Mode::Nsjail => broker.config.llm_port,
                Mode::Direct => 0,
            },
            socket_path: paths.llm_socket_jail.clone(),
            env_vars: spec.llm_env_vars.clone(),
        }),
    };
    let bytes = payload.encode()?;
    let cap = broker.config.max_payload_bytes;
    if bytes.len() > cap {
        return Err(BrokerError::PayloadTooLarge {
            size: bytes.len(),
            cap,
        });
    }
    Ok(bytes)
}

/// Everything that must be undone when the turn ends.
struct Prepared {
    paths: TurnPaths,
    meta: SessionMeta,
    cgroup: Option<TurnCgroup>,
    llm: Option<std::os::unix::net::UnixListener>,
    /// A ready launcher in `cgroup`, taken for the spawn.
    launcher: Option<Launcher>,
    /// The session's home and work, opened as real directories: nsjail
    /// must mount exactly these (checked right before the spawn).
    dirs: Option<crate::session::SessionDirs>,
}

fn prepare(
    broker: &Broker,
    spec: &TurnSpec,
    lease: &Lease,
    paths: TurnPaths,
    payload: &[u8],
) -> Result<Prepared, BrokerError> {
    let (_, meta, dirs) = broker.sessions.ensure(lease)?;
    // The turn dir: a ready one (with its llm.sock bound, and tmp/ in direct
    // mode) renamed to the turn's name, or a new one.
    let spare = take_spare(broker, &spec.turn_id, cgroup_limits(&spec.limits)).and_then(|s| {
        match std::fs::rename(&s.dir, &paths.turn_dir) {
            Ok(()) => Some(s),
            Err(e) => {
                warn!(error = %e, "cannot take a spare turn dir; making a new one");
                s.discard();
                None
            }
        }
    });
    if spare.is_none() {
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(&paths.turn_dir)
            .map_err(|e| BrokerError::io("cannot create", &paths.turn_dir, e))?;
    }
    // From here on a failure must not leave the turn dir behind.
    populate(broker, spec, paths.clone(), meta, payload, spare)
        .map(|p| Prepared {
            dirs: Some(dirs),
            ..p
        })
        .inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&paths.turn_dir);
        })
}

fn populate(
    broker: &Broker,
    spec: &TurnSpec,
    paths: TurnPaths,
    meta: SessionMeta,
    payload: &[u8],
    spare: Option<Spare>,
) -> Result<Prepared, BrokerError> {
    match spare {
        Some(spare) => {
            // Nothing of the spare may leak if the turn cannot be prepared.
            if let Err(e) = write_files(broker, spec, &paths, payload, true) {
                spare.discard();
                return Err(e);
            }
            let Spare {
                cgroup,
                launcher,
                llm,
                ..
            } = spare;
            Ok(prepared(
                spec,
                paths,
                meta,
                Some(cgroup),
                llm,
                Some(launcher),
            ))
        }
        None => {
            write_files(broker, spec, &paths, payload, false)?;
            let owner = (broker.mode() == Mode::Nsjail && crate::process::is_root())
                .then_some(broker.outside_ids);
            let llm = crate::llm::bind(&paths.llm_socket, owner)
                .map_err(|e| BrokerError::io("cannot bind", &paths.llm_socket, e))?;
            let cgroup = match &broker.cgroups {
                Some(cg) => Some(
                    cg.create(&spec.turn_id, cgroup_limits(&spec.limits))
                        .map_err(BrokerError::Cgroup)?,
                ),
                None => None,
            };
            Ok(prepared(spec, paths, meta, cgroup, llm, None))
        }
    }
}

fn prepared(
    spec: &TurnSpec,
    paths: TurnPaths,
    mut meta: SessionMeta,
    cgroup: Option<TurnCgroup>,
    llm: std::os::unix::net::UnixListener,
    launcher: Option<Launcher>,
) -> Prepared {
    meta.turn_count += 1;
    meta.last_turn_id = Some(spec.turn_id.clone());
    meta.last_turn_start_unix_ms = Some(now_unix_ms());
    meta.last_turn_end_unix_ms = None;
    Prepared {
        paths,
        meta,
        cgroup,
        llm: Some(llm),
        launcher,
        dirs: None,
    }
}

/// The turn dir's files: the payload, and the jail config (nsjail mode) or
/// the agent's tmp dir (direct mode; a spare turn dir has one already).
fn write_files(
    broker: &Broker,
    spec: &TurnSpec,
    paths: &TurnPaths,
    payload: &[u8],
    spare: bool,
) -> Result<(), BrokerError> {
    let write = |path: &PathBuf, bytes: &[u8]| -> Result<(), BrokerError> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| BrokerError::io("cannot create", path, e))?;
        std::io::Write::write_all(&mut f, bytes)
            .map_err(|e| BrokerError::io("cannot write", path, e))
    };
    write(&paths.payload, payload)?;
    if let Some((_, profile)) = &broker.nsjail {
        let bundle_mounts = broker
            .config
            .bundle_mounts
            .iter()
            .filter_map(|m| crate::config::parse_bundle_mount(m).ok())
            .collect();
        let wall_s = spec
            .limits
            .wall_time_ms
            .map(|ms| ms.div_ceil(1000) + broker.config.kill_grace_ms.div_ceil(1000) + 5)
            .unwrap_or(0);
        let cfg = jail::render(
            profile,
            &jail::JailTurn {
                home: paths.session.home.clone(),
                work: paths.session.work.clone(),
                turn_dir: paths.turn_dir.clone(),
                shim: broker.config.shim.clone(),
                bundle_mounts,
                outside_uid: broker.outside_ids.0,
                outside_gid: broker.outside_ids.1,
                time_limit_s: wall_s,
                max_payload: broker.config.max_payload_bytes,
            },
        );
        write(&paths.jail_config, cfg.as_bytes())?;
    } else if !spare {
        let tmp = PathBuf::from(&paths.tmp);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(|e| BrokerError::io("cannot create", &tmp, e))?;
    }
    Ok(())
}

/// The cgroup's share of a turn's limits.
pub(crate) fn cgroup_limits(limits: &Limits) -> CgroupLimits {
    CgroupLimits {
        memory_bytes: limits.memory_bytes,
        // nsjail and the shim live in the turn's cgroup too.
        processes: limits.max_processes.map(|n| n + SUPERVISORS),
    }
}

/// A ready cgroup and launcher from the warm pool, made the turn's: its
/// limits set and (where the kernel allows) its name changed to the turn id.
fn take_spare(broker: &Broker, turn_id: &str, limits: CgroupLimits) -> Option<Spare> {
    let mut spare = broker.warm.as_ref()?.take()?;
    if let Err(e) = spare.cgroup.set_limits(limits) {
        warn!(error = %e, "cannot set limits on a spare cgroup; making a new one");
        spare.discard();
        return None;
    }
    spare.cgroup.rename(turn_id);
    Some(spare)
}

/// How the turn ended, before it becomes an `Exited`.
#[derive(Debug, Default)]
struct Outcome {
    stopped: Option<StopReason>,
    failed: Option<(FailureClass, String)>,
    isolation: Option<String>,
    agent: Option<(AgentStatus, Usage)>,
    agent_started: bool,
    child_status: Option<std::process::ExitStatus>,
    spawn_error: Option<String>,
    nsjail_log: String,
    /// stderr of the jail or shim when no agent ever ran.
    early_stderr: String,
    /// The session's disk use that was over its limit.
    disk_exceeded: Option<Exceeded>,
    /// What was wrong with the shim's control socket before the agent
    /// started (an undecodable or out-of-order frame, a read error).
    control_error: Option<String>,
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<ShimMsg>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > turnstile_shim::MAX_CONTROL_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "control frame over cap",
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    turnstile_shim::decode_frame(&body).map(Some)
}

/// Relays one output pipe to the executor. Reads stop early only when
/// `stop_idle` fires while the pipe is idle; sends never time out, so a slow
/// executor slows the agent instead of losing bytes.
async fn pump<R: AsyncRead + Unpin>(
    mut r: R,
    tx: EventTx,
    stderr: bool,
    stop_idle: CancellationToken,
) -> u64 {
    let mut total = 0u64;
    let mut buf = BytesMut::with_capacity(RELAY_CHUNK);
    loop {
        if buf.capacity() < RELAY_CHUNK / 4 {
            buf.reserve(RELAY_CHUNK);
        }
        let read = tokio::select! {
            biased;
            r = r.read_buf(&mut buf) => r,
            _ = stop_idle.cancelled() => break,
        };
        match read {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                total += n as u64;
                let chunk = buf.split().freeze();
                let kind = if stderr {
                    pb::turn_event::Kind::Stderr(chunk)
                } else {
                    pb::turn_event::Kind::Stdout(chunk)
                };
                if tx
                    .send(Ok(pb::TurnEvent { kind: Some(kind) }))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    total
}

/// Reads the executor's frames after `Start`: stdin goes to the stdin
/// writer (with backpressure), signals to the turn loop. The end of the
/// request stream closes the agent's stdin; an error means the executor is
/// gone.
async fn inbound(
    mut stream: tonic::Streaming<pb::TurnRequest>,
    stdin_tx: mpsc::Sender<Bytes>,
    sig_tx: mpsc::Sender<Signal>,
    gone: CancellationToken,
    total: Arc<AtomicU64>,
    relay: Option<Arc<crate::llm::Relay>>,
) {
    use pb::turn_request::Kind;
    let mut stdin_tx = Some(stdin_tx);
    loop {
        match stream.message().await {
            Ok(Some(req)) => match req.kind {
                Some(Kind::Stdin(bytes)) => {
                    total.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    if let Some(tx) = &stdin_tx
                        && tx.send(bytes).await.is_err()
                    {
                        // The agent closed its stdin; later bytes have nowhere to go.
                        stdin_tx = None;
                    }
                }
                Some(Kind::StdinEof(_)) => stdin_tx = None,
                Some(Kind::Signal(s)) => {
                    let sig = match pb::signal_request::Signal::try_from(s.signal) {
                        Ok(pb::signal_request::Signal::Interrupt) => Signal::SIGINT,
                        Ok(pb::signal_request::Signal::Terminate) => Signal::SIGTERM,
                        _ => {
                            warn!(signal = s.signal, "ignoring an unknown signal request");
                            continue;
                        }
                    };
                    let _ = sig_tx.try_send(sig);
                }
                Some(Kind::Start(_)) => warn!("ignoring a second start on a running turn"),
                Some(Kind::Llm(frame)) => match &relay {
                    Some(r) => r.from_executor(frame).await,
                    None => warn!("ignoring an llm frame: no relay on this turn"),
                },
                None => warn!("ignoring an empty turn request"),
            },
            Ok(None) => break,
            Err(status) => {
                debug!(error = %status, "executor stream failed");
                gone.cancel();
                break;
            }
        }
    }
}

async fn stdin_writer(mut w: tokio::net::unix::pipe::Sender, mut rx: mpsc::Receiver<Bytes>) {
    while let Some(chunk) = rx.recv().await {
        if w.write_all(&chunk).await.is_err() {
            break;
        }
    }
    // Dropping `w` closes the agent's stdin.
}

/// Runs a turn to its end and sends its `Exited` (after every output byte,
/// after cleanup and after the lease is released).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    broker: Arc<Broker>,
    spec: TurnSpec,
    paths: TurnPaths,
    payload: Vec<u8>,
    lease: Lease,
    admitted: Admitted,
    stream: tonic::Streaming<pb::TurnRequest>,
    tx: EventTx,
    received: Instant,
) {
    let span = tracing::info_span!("turn", session.id = %spec.session_id, turn.id = %spec.turn_id, jail.pid = tracing::field::Empty);
    async move {
        let exited = run_inner(
            &broker, &spec, paths, payload, &lease, &admitted, stream, &tx, received,
        )
        .await;
        info!(
            reason = ?Reason::try_from(exited.reason).unwrap_or(Reason::Unspecified),
            status = ?exited.status,
            stdout = exited.stdout_bytes,
            "turn ended"
        );
        drop(lease);
        drop(admitted);
        let _ = tx
            .send(Ok(pb::TurnEvent {
                kind: Some(pb::turn_event::Kind::Exited(exited)),
            }))
            .await;
    }
    .instrument(span)
    .await
}

#[allow(clippy::too_many_arguments)]
async fn run_inner(
    broker: &Arc<Broker>,
    spec: &TurnSpec,
    paths: TurnPaths,
    payload: Vec<u8>,
    lease: &Lease,
    admitted: &Admitted,
    stream: tonic::Streaming<pb::TurnRequest>,
    tx: &EventTx,
    received: Instant,
) -> pb::Exited {
    let disk = broker.prepare_session_disk(&spec.session_id, disk_limit(&spec.limits));
    let mut prepared = match disk
        .await
        .and_then(|()| prepare(broker, spec, lease, paths, &payload))
    {
        Ok(p) => p,
        Err(e) => {
            warn!(error = %e, "cannot prepare the turn");
            return pb::Exited {
                reason: Reason::SpawnFailed as i32,
                message: e.to_string(),
                ..Default::default()
            };
        }
    };
    let mut counters = Counters::default();
    let launcher = prepared.launcher.take();
    let outcome = supervise(
        broker,
        spec,
        &prepared,
        launcher,
        admitted,
        stream,
        tx,
        received,
        &mut counters,
    )
    .await;
    finish(broker, spec, prepared, outcome, counters, received).await
}

#[derive(Debug, Default)]
struct Counters {
    stdout: u64,
    stderr: u64,
    stdin: u64,
}

/// Spawns the jail or shim and follows it to its end.
#[allow(clippy::too_many_arguments)]
async fn supervise(
    broker: &Arc<Broker>,
    spec: &TurnSpec,
    prepared: &Prepared,
    launcher: Option<Launcher>,
    admitted: &Admitted,
    stream: tonic::Streaming<pb::TurnRequest>,
    tx: &EventTx,
    received: Instant,
    counters: &mut Counters,
) -> Outcome {
    let mut outcome = Outcome::default();
    let paths = &prepared.paths;
    let spawned = spawn(broker, prepared, launcher).await;
    let llm_listener = prepared.llm.as_ref().map(|l| l.try_clone());
    let (mut child, ctl, log_rx) = match spawned {
        Ok(s) => s,
        Err(e) => {
            outcome.spawn_error = Some(e.to_string());
            return outcome;
        }
    };
    let child_pid = child.id();
    tracing::Span::current().record("jail.pid", child_pid);
    if broker.mode() == Mode::Nsjail {
        // The agent may open /dev/stdout and friends by path (`echo >/dev/stderr`),
        // which needs the pipes to belong to its uid. A pipe is one inode for
        // both ends, so chowning the broker's end is enough; the agent has not
        // started yet (it waits for GO).
        use std::os::fd::AsFd;
        let (uid, gid) = broker.outside_ids;
        let fds = [
            child.stdin.as_ref().map(|p| p.as_fd()),
            child.stdout.as_ref().map(|p| p.as_fd()),
            child.stderr.as_ref().map(|p| p.as_fd()),
        ];
        for fd in fds.into_iter().flatten() {
            let _ = nix::unistd::fchown(fd, Some(uid.into()), Some(gid.into()));
        }
    }
    let mut ctl = match ctl {
        Ok(c) => c,
        Err(e) => {
            outcome.spawn_error = Some(format!("control socket: {e}"));
            kill_group(child_pid, Signal::SIGKILL);
            outcome.child_status = child.wait().await.ok();
            return outcome;
        }
    };

    let turn = &admitted.turn;
    let gone = CancellationToken::new();
    let wall = spec.limits.wall_time_ms.map(Duration::from_millis);
    let deadline = wall.map(|w| tokio::time::Instant::from_std(received) + w);
    // Resolves with the reason the broker must end the turn for.
    let stop_reason = || async {
        let timed_out = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = timed_out => StopReason::TimedOut,
            _ = turn.token.cancelled() => turn.reason.get().copied().unwrap_or(StopReason::Cancelled),
            _ = tx.closed() => StopReason::ExecutorGone,
            _ = gone.cancelled() => StopReason::ExecutorGone,
        }
    };

    // Handshake: the self-check, then GO, then the agent's pid.
    let mut shim_pid = if broker.mode() == Mode::Direct {
        child_pid
    } else {
        0
    };
    let handshake = async {
        match read_frame(&mut ctl).await {
            Ok(Some(ShimMsg::Hello(check))) => Ok(check),
            Ok(Some(ShimMsg::Failed { class, message })) => Err((Some((class, message)), None)),
            Ok(Some(other)) => Err((None, Some(format!("{other:?} before Hello")))),
            Ok(None) => Err((None, None)),
            Err(e) => Err((None, Some(e.to_string()))),
        }
    };
    let hello = tokio::select! {
        h = handshake => h,
        reason = stop_reason() => {
            outcome.stopped = Some(reason);
            Err((None, None))
        }
    };
    let hello: SelfCheck = match hello {
        Ok(h) => h,
        Err((failed, control)) => {
            outcome.failed = failed;
            outcome.control_error = control;
            end_child(broker, &mut child, child_pid, prepared, &mut outcome).await;
            collect_rest(&mut ctl, &mut outcome).await;
            outcome.nsjail_log = log_text(log_rx).await;
            return outcome;
        }
    };
    let problems = broker_checks(broker, &hello);
    if !problems.is_empty() {
        outcome.isolation = Some(problems.join("; "));
        let _ = ctl.write_all(b"X").await;
        end_child(broker, &mut child, child_pid, prepared, &mut outcome).await;
        collect_rest(&mut ctl, &mut outcome).await;
        outcome.nsjail_log = log_text(log_rx).await;
        return outcome;
    }
    if ctl.write_all(&[turnstile_shim::GO]).await.is_err() {
        end_child(broker, &mut child, child_pid, prepared, &mut outcome).await;
        collect_rest(&mut ctl, &mut outcome).await;
        outcome.nsjail_log = log_text(log_rx).await;
        return outcome;
    }
    let started = tokio::select! {
        f = read_frame(&mut ctl) => f,
        reason = stop_reason() => { outcome.stopped = Some(reason); Ok(None) }
    };
    match started {
        Ok(Some(ShimMsg::AgentStarted { .. })) => outcome.agent_started = true,
        Ok(Some(ShimMsg::Failed { class, message })) => {
            outcome.failed = Some((class, message));
        }
        Ok(Some(other)) => outcome.control_error = Some(format!("{other:?} after GO")),
        Ok(None) => {}
        Err(e) => outcome.control_error = Some(e.to_string()),
    }
    if !outcome.agent_started {
        end_child(broker, &mut child, child_pid, prepared, &mut outcome).await;
        collect_rest(&mut ctl, &mut outcome).await;
        outcome.nsjail_log = log_text(log_rx).await;
        return outcome;
    }
    if broker.mode() == Mode::Nsjail {
        shim_pid = jail::init_pid(child_pid).unwrap_or(0);
    }
    let spawn_us = received.elapsed().as_micros() as u64;
    let mode = match broker.mode() {
        Mode::Nsjail => pb::Mode::Nsjail,
        Mode::Direct => pb::Mode::Direct,
    };
    let started = pb::Started {
        turn_id: spec.turn_id.clone(),
        session_id: spec.session_id.clone(),
        mode: mode as i32,
        home: paths.home.clone(),
        work_dir: paths.work.clone(),
        cwd: paths.cwd.clone(),
        spawn_us,
        isolation: Some(pb::Isolation {
            pid: hello.pid,
            uid: hello.uid,
            gid: hello.gid,
            uid_map: hello.uid_map.clone(),
            gid_map: hello.gid_map.clone(),
            net_interfaces: hello.net_interfaces.clone(),
            no_new_privs: hello.no_new_privs,
            root_read_only: hello.root_read_only,
            hostname: hello.hostname.clone(),
        }),
        started_at_unix_ms: now_unix_ms(),
    };
    info!(spawn_us, shim.pid = shim_pid, "agent started");
    let _ = tx
        .send(Ok(pb::TurnEvent {
            kind: Some(pb::turn_event::Kind::Started(started)),
        }))
        .await;
    // The start record, off the start path and off the runtime's threads: a
    // write and a rename cost 0.2-0.5 ms, and running them here would hold
    // back the `Started` just queued (tokio runs the task it woke only when
    // this one yields). Awaited before this function returns, so the end
    // record (`finish`) always comes last. A turn that never starts is
    // recorded by `finish` alone.
    let start_record = {
        let (broker, session, meta) =
            (broker.clone(), paths.session.clone(), prepared.meta.clone());
        tokio::task::spawn_blocking(move || broker.sessions.write_meta(&session, &meta))
    };
    // Let the task that sends `Started` out run before the relay is set up.
    tokio::task::yield_now().await;
    // The next spare is made now, not while this turn was starting.
    if let Some(w) = &broker.warm {
        w.refill();
    }
    // The session's disk use and the state dir's free space, watched from
    // now on (never on the start path: the first walk of a big tree takes a
    // while).
    let limit = disk_limit(&spec.limits);
    let disk_watch = (!limit.is_unlimited() || broker.disk.reserve() > 0).then(|| {
        let turn = admitted.turn.clone();
        let mut roots = vec![paths.session.home.clone(), paths.session.work.clone()];
        if broker.mode() == Mode::Direct {
            // The agent's TMPDIR is on the state dir too (in nsjail mode
            // /tmp is the jail's own tmpfs).
            roots.push(PathBuf::from(&paths.tmp));
        }
        broker.disk.watch(&spec.session_id, roots, limit, move || {
            turn.stop(StopReason::DiskLimit)
        })
    });

    // Relay.
    use std::os::fd::AsFd;
    if let Some(out) = &child.stdout {
        crate::process::grow_pipe(out.as_fd(), PIPE_SIZE);
    }
    if let Some(err) = &child.stderr {
        crate::process::grow_pipe(err.as_fd(), PIPE_SIZE);
    }
    let stop_idle = CancellationToken::new();
    let out = child
        .stdout
        .take()
        .map(|r| tokio::spawn(pump(r, tx.clone(), false, stop_idle.clone()).in_current_span()));
    let err = child
        .stderr
        .take()
        .map(|r| tokio::spawn(pump(r, tx.clone(), true, stop_idle.clone()).in_current_span()));
    let (stdin_tx, stdin_rx) = mpsc::channel(STDIN_QUEUE);
    if let Some(w) = child.stdin.take() {
        tokio::spawn(stdin_writer(w, stdin_rx).in_current_span());
    }
    let listener = match llm_listener.map(|l| l.and_then(tokio::net::UnixListener::from_std)) {
        Some(Ok(l)) => Some(l),
        Some(Err(e)) => {
            // The agent's LLM connections will fail: say so, never drop
            // the relay silently.
            warn!(error = %e, "the LLM relay cannot listen for this turn");
            let message = format!("the LLM relay is unavailable for this turn: {e}");
            let notice = pb::turn_event::Kind::Notice(pb::Notice { message });
            let _ = tx.send(Ok(pb::TurnEvent { kind: Some(notice) })).await;
            None
        }
        None => None,
    };
    let relay = listener.map(|l| {
        Arc::new(crate::llm::Relay::start(
            l,
            tx.clone(),
            broker.config.llm_max_connections,
        ))
    });
    let sig_tx = admitted.turn.signals.clone();
    let mut sig_rx = match admitted.take_signals() {
        Some(rx) => rx,
        None => mpsc::channel(1).1,
    };
    let stdin_total = Arc::new(AtomicU64::new(0));
    let inbound_task = tokio::spawn(
        inbound(
            stream,
            stdin_tx,
            sig_tx,
            gone.clone(),
            stdin_total.clone(),
            relay.clone(),
        )
        .in_current_span(),
    );

    let grace = Duration::from_millis(broker.config.kill_grace_ms);
    let mut kill_at: Option<tokio::time::Instant> = None;
    let mut ctl_open = true;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status.ok(),
            reason = stop_reason(), if outcome.stopped.is_none() => {
                info!(?reason, "ending the turn");
                outcome.stopped = Some(reason);
                if reason == StopReason::DiskLimit {
                    // A grace would be time to write more.
                    kill_all(child_pid, prepared);
                } else {
                    // SIGTERM first: the shim forwards it, and the agent may
                    // save its state; everything is SIGKILLed after the grace.
                    kill_pid(shim_pid, Signal::SIGTERM);
                    kill_at = Some(tokio::time::Instant::now() + grace);
                }
            }
            _ = async { match kill_at { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                kill_all(child_pid, prepared);
                kill_at = None;
            }
            Some(sig) = sig_rx.recv() => kill_pid(shim_pid, sig),
            frame = read_frame(&mut ctl), if ctl_open => match frame {
                Ok(Some(ShimMsg::AgentExited { status, usage })) => outcome.agent = Some((status, usage)),
                Ok(Some(ShimMsg::Failed { class, message })) => outcome.failed = Some((class, message)),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => ctl_open = false,
            },
        }
    };
    outcome.child_status = status;
    // The jail's init is gone (and with it the pid namespace); in direct mode
    // the shim killed what it could see. Kill anything left, by group and
    // cgroup, so the output pipes reach EOF.
    kill_all(child_pid, prepared);
    if ctl_open {
        collect_rest(&mut ctl, &mut outcome).await;
    }
    let idle = stop_idle.clone();
    let idle_timer = tokio::spawn(async move {
        tokio::time::sleep(DRAIN_IDLE).await;
        idle.cancel();
    });
    if let Some(h) = out {
        counters.stdout = h.await.unwrap_or(0);
    }
    if let Some(h) = err {
        counters.stderr = h.await.unwrap_or(0);
    }
    idle_timer.abort();
    if stop_idle.is_cancelled() {
        warn!("an output pipe stayed open after the turn ended; relay cut");
    }
    inbound_task.abort();
    if let Some(r) = &relay {
        // No LLM frame may follow `Exited`.
        r.close();
    }
    counters.stdin = stdin_total.load(Ordering::Relaxed);
    outcome.disk_exceeded = disk_watch.and_then(|w| w.exceeded());
    outcome.nsjail_log = log_text(log_rx).await;
    match start_record.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "cannot record the turn's start in the session metadata"),
        Err(e) => warn!(error = %e, "the turn's start record did not finish"),
    }
    outcome
}

/// The broker's own checks of the shim's report, beyond the mode rules.
fn broker_checks(broker: &Broker, hello: &SelfCheck) -> Vec<String> {
    let mode = match broker.mode() {
        Mode::Nsjail => turnstile_shim::Mode::Nsjail,
        Mode::Direct => turnstile_shim::Mode::Direct,
    };
    let mut problems = hello.verify(mode);
    if mode == turnstile_shim::Mode::Nsjail {
        let want = broker.outside_ids.0;
        match turnstile_shim::map_outside(&hello.uid_map, hello.uid) {
            Some(uid) if uid == want => {}
            other => problems.push(format!("jail uid maps to host uid {other:?}, want {want}")),
        }
    }
    problems
}

/// SIGKILLs every process of the turn: the child's group and the cgroup.
fn kill_all(child_pid: i32, prepared: &Prepared) {
    kill_group(child_pid, Signal::SIGKILL);
    if let Some(cg) = &prepared.cgroup {
        cg.kill_all();
    }
}

/// A spawn failure, named after what was spawned.
fn spawn_error(broker: &Broker, source: std::io::Error) -> BrokerError {
    let what = if broker.nsjail.is_some() {
        "nsjail"
    } else {
        "shim"
    };
    BrokerError::Spawn { what, source }
}

/// Ends a child that never ran its agent (or was refused) and reaps it.
async fn end_child(
    broker: &Broker,
    child: &mut Child,
    child_pid: i32,
    prepared: &Prepared,
    outcome: &mut Outcome,
) {
    // Without GO the shim exits by itself once the control socket closes;
    // killing it directly is faster and certain.
    kill_all(child_pid, prepared);
    outcome.child_status = child.wait().await.ok();
    // A ready launcher that could not exec the program says why.
    if let Some(e) = child.launch_failure() {
        outcome.spawn_error = Some(spawn_error(broker, e).to_string());
    }
    // What nsjail (a config error) or the shim said on stderr before any
    // agent ran; the jail is gone, so this reaches EOF at once.
    if let Some(err) = child.stderr.take() {
        let mut buf = Vec::new();
        let mut limited = err.take(4096);
        let read = limited.read_to_end(&mut buf);
        if tokio::time::timeout(Duration::from_secs(1), read)
            .await
            .is_ok()
        {
            outcome.early_stderr = String::from_utf8_lossy(&buf).trim().to_string();
        }
    }
}

async fn collect_rest(ctl: &mut tokio::net::UnixStream, outcome: &mut Outcome) {
    while let Ok(Some(frame)) = read_frame(ctl).await {
        match frame {
            ShimMsg::AgentExited { status, usage } => outcome.agent = Some((status, usage)),
            ShimMsg::Failed { class, message } if outcome.failed.is_none() => {
                outcome.failed = Some((class, message))
            }
            _ => {}
        }
    }
}

async fn log_text(rx: Option<tokio::task::JoinHandle<Vec<u8>>>) -> String {
    match rx {
        Some(h) => jail::log_tail(&h.await.unwrap_or_default(), 2048),
        None => String::new(),
    }
}

type Spawned = (
    Child,
    std::io::Result<tokio::net::UnixStream>,
    Option<tokio::task::JoinHandle<Vec<u8>>>,
);

/// Spawns nsjail (which runs the shim as the jail's init) or, in direct
/// mode, the shim itself, with the payload on fd 3 and the control socket on
/// fd 4. One code path for both modes.
async fn spawn(
    broker: &Broker,
    prepared: &Prepared,
    launcher: Option<Launcher>,
) -> Result<Spawned, BrokerError> {
    let paths = &prepared.paths;
    let payload_fd: OwnedFd = std::fs::File::open(&paths.payload)
        .map_err(|e| BrokerError::io("cannot open", &paths.payload, e))?
        .into();
    let (ctl_parent, ctl_child) = crate::process::socketpair().map_err(|e| BrokerError::Spawn {
        what: "control socket",
        source: e,
    })?;
    let mut setup = ChildSetup {
        fds: vec![
            (payload_fd, turnstile_shim::INIT_FD),
            (ctl_child, turnstile_shim::CONTROL_FD),
        ],
        cgroup_procs: match &prepared.cgroup {
            Some(cg) => cg.procs_files().map_err(BrokerError::Cgroup)?,
            None => Vec::new(),
        },
    };
    let mut log_reader = None;
    let (program, args): (&std::path::Path, Vec<std::ffi::OsString>) = match &broker.nsjail {
        Some((bin, _)) => {
            let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| {
                BrokerError::Spawn {
                    what: "nsjail log pipe",
                    source: e.into(),
                }
            })?;
            setup.fds.push((w, jail::LOG_FD));
            log_reader = Some(r);
            if let Some(dirs) = &prepared.dirs {
                crate::session::check_mount_sources(&paths.session, dirs)?;
            }
            (
                bin,
                vec!["--config".into(), paths.jail_config.clone().into()],
            )
        }
        None => (
            &broker.config.shim,
            vec![
                "--max-payload".into(),
                broker.config.max_payload_bytes.to_string().into(),
            ],
        ),
    };
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let error = |e| spawn_error(broker, e);
    let piped = crate::spawn::Stdio::Piped;
    let child = match launcher {
        Some(l) => match l.launch(program, &args, piped, &setup) {
            Ok(child) => child,
            Err(LaunchError::Failed(e)) => return Err(error(e)),
            Err(LaunchError::Unusable(e)) => {
                warn!(error = %e, "spare launcher unusable; spawning directly");
                crate::spawn::spawn(program, &args, piped, setup).map_err(error)?
            }
        },
        None => crate::spawn::spawn(program, &args, piped, setup).map_err(error)?,
    };
    let ctl = std::os::unix::net::UnixStream::from(ctl_parent);
    let ctl = ctl
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixStream::from_std(ctl));
    let log = log_reader.map(|r| {
        tokio::spawn(async move {
            let file = tokio::fs::File::from_std(std::fs::File::from(r));
            let mut buf = Vec::new();
            // nsjail logs a few lines per turn; keep at most 64 KiB of it.
            let _ = file.take(64 * 1024).read_to_end(&mut buf).await;
            buf
        })
    });
    Ok((child, ctl, log))
}

/// Turns the outcome into the `Exited` event and undoes the turn's setup.
async fn finish(
    broker: &Broker,
    spec: &TurnSpec,
    prepared: Prepared,
    outcome: Outcome,
    counters: Counters,
    received: Instant,
) -> pb::Exited {
    let Prepared {
        paths,
        mut meta,
        cgroup,
        llm: _,
        launcher: _,
        dirs: _,
    } = prepared;
    // A turn that failed before `Started` still took a spare.
    if let Some(w) = &broker.warm {
        w.refill();
    }
    let stats = cgroup.as_ref().map(|c| c.stats()).unwrap_or_default();
    if let Some(cg) = cgroup
        && let Err(e) = cg.remove().await
    {
        warn!(error = %e, "cannot remove the turn's cgroup");
    }
    if let Err(e) = std::fs::remove_dir_all(&paths.turn_dir) {
        warn!(error = %e, path = %paths.turn_dir.display(), "cannot remove the turn dir");
    }
    let mut limits_hit = Vec::new();
    if stats.oom_kills > 0 {
        limits_hit.push("memory".to_string());
    }
    if stats.fork_failures > 0 {
        limits_hit.push("processes".to_string());
    }
    if outcome.disk_exceeded.is_some() || disk_file_cap_hit(&outcome, spec) {
        limits_hit.push("disk".to_string());
    }
    let (reason, message) = classify(&outcome, stats.oom_kills > 0, stats.fork_failures > 0, spec);
    let mut exited = pb::Exited {
        reason: reason as i32,
        message,
        wall_time_us: received.elapsed().as_micros() as u64,
        stdout_bytes: counters.stdout,
        stderr_bytes: counters.stderr,
        stdin_bytes: counters.stdin,
        limits_hit,
        ..Default::default()
    };
    match outcome.agent {
        Some((status, usage)) => {
            exited.status = Some(match status {
                AgentStatus::Code(c) => pb::exited::Status::ExitCode(c),
                AgentStatus::Signal(s) => pb::exited::Status::Signal(s),
            });
            exited.usage = Some(pb::Usage {
                user_cpu_us: usage.user_cpu_us,
                system_cpu_us: usage.system_cpu_us,
                max_rss_kib: usage.max_rss_kib,
            });
        }
        None if outcome.agent_started => {
            // The shim died before it could report (SIGKILL, OOM): the agent
            // went with it.
            exited.status = Some(pb::exited::Status::Signal(Signal::SIGKILL as i32));
        }
        None => {}
    }
    meta.last_turn_end_unix_ms = Some(now_unix_ms());
    meta.last_exit_reason = Some(reason.as_str_name().to_ascii_lowercase());
    if let Err(e) = broker.sessions.write_meta(&paths.session, &meta) {
        warn!(error = %e, "cannot update session metadata");
    }
    exited
}

fn classify(outcome: &Outcome, oom: bool, fork_failed: bool, spec: &TurnSpec) -> (Reason, String) {
    // The kernel sends SIGXCPU at the soft CPU limit and SIGKILL at the hard
    // one; a SIGKILL after the agent used its whole CPU budget is the limit.
    let cpu_spent = match (outcome.agent, spec.limits.cpu_time_ms) {
        (Some((_, u)), Some(ms)) => {
            (u.user_cpu_us + u.system_cpu_us) / 1000 >= ms.saturating_sub(ms / 20)
        }
        _ => false,
    };
    if let Some(stop) = outcome.stopped {
        let reason = match stop {
            StopReason::TimedOut => Reason::TimedOut,
            StopReason::Cancelled => Reason::Cancelled,
            StopReason::BrokerShutdown => Reason::BrokerShutdown,
            StopReason::ExecutorGone => Reason::Cancelled,
            StopReason::DiskLimit => Reason::DiskLimit,
        };
        let msg = match stop {
            StopReason::TimedOut => format!(
                "wall-time limit of {} ms reached",
                spec.limits.wall_time_ms.unwrap_or(0)
            ),
            StopReason::Cancelled => "turn cancelled".to_string(),
            StopReason::BrokerShutdown => "broker shutting down".to_string(),
            StopReason::ExecutorGone => "executor disconnected".to_string(),
            StopReason::DiskLimit => disk_message(outcome.disk_exceeded, spec),
        };
        return (reason, msg);
    }
    if let Some(problems) = &outcome.isolation {
        return (
            Reason::IsolationCheckFailed,
            format!("isolation check failed: {problems}"),
        );
    }
    if let Some((class, message)) = &outcome.failed {
        let reason = match class {
            FailureClass::Payload => Reason::PayloadRejected,
            FailureClass::SelfCheck => Reason::IsolationCheckFailed,
            FailureClass::Exec | FailureClass::Setup | FailureClass::Aborted => Reason::SpawnFailed,
        };
        return (reason, message.clone());
    }
    if let Some(err) = &outcome.spawn_error {
        return (Reason::SpawnFailed, err.clone());
    }
    match outcome.agent.map(|(s, _)| s) {
        Some(AgentStatus::Signal(s))
            if s == Signal::SIGXCPU as i32 || (s == Signal::SIGKILL as i32 && cpu_spent) =>
        {
            (Reason::CpuLimit, "CPU-time limit reached".into())
        }
        Some(AgentStatus::Signal(_)) if disk_file_cap_hit(outcome, spec) => (
            Reason::DiskLimit,
            format!(
                "disk limit reached: a file hit the {} bytes left of the session's {} (SIGXFSZ)",
                spec.disk_file_cap.unwrap_or(0),
                disk_limit(&spec.limits).describe()
            ),
        ),
        Some(AgentStatus::Signal(s)) if s == Signal::SIGXFSZ as i32 => (
            Reason::FileSizeLimit,
            "file-size limit reached (SIGXFSZ)".into(),
        ),
        Some(AgentStatus::Signal(_)) | None if oom => (
            Reason::MemoryLimit,
            format!(
                "memory limit of {} bytes reached (OOM kill)",
                spec.limits.memory_bytes.unwrap_or(0)
            ),
        ),
        Some(AgentStatus::Signal(s)) => (Reason::Killed, format!("agent killed by signal {s}")),
        Some(AgentStatus::Code(c)) if c != 0 && fork_failed => (
            Reason::ProcessLimit,
            format!(
                "process limit of {} reached (a fork failed); agent exited {c}",
                spec.limits.max_processes.unwrap_or(0)
            ),
        ),
        Some(AgentStatus::Code(_)) => (Reason::Exited, String::new()),
        None if outcome.agent_started => (Reason::Killed, "the jail died before reporting".into()),
        None => {
            let code = outcome
                .child_status
                .and_then(|s| s.code())
                .and_then(FailureClass::from_exit_code);
            let mut msg = match code {
                Some(class) => format!("shim failed ({class:?})"),
                None => format!(
                    "the {} exited before the agent started ({})",
                    if outcome.nsjail_log.is_empty() {
                        "shim"
                    } else {
                        "jail"
                    },
                    outcome
                        .child_status
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "no status".into())
                ),
            };
            if let Some(e) = &outcome.control_error {
                msg = format!("the shim's control socket broke the protocol ({e}); {msg}");
            }
            if !outcome.nsjail_log.is_empty() {
                msg.push_str(": nsjail: ");
                msg.push_str(&outcome.nsjail_log);
            }
            if !outcome.early_stderr.is_empty() {
                msg.push_str(": stderr: ");
                msg.push_str(&outcome.early_stderr);
            }
            let reason = if code == Some(FailureClass::Payload) {
                Reason::PayloadRejected
            } else {
                Reason::SpawnFailed
            };
            (reason, msg)
        }
    }
}

/// Whether the agent died of SIGXFSZ at a file-size limit that came from
/// the session's disk limit (what was left of it) rather than from
/// `max_file_size_bytes`.
fn disk_file_cap_hit(outcome: &Outcome, spec: &TurnSpec) -> bool {
    let xfsz =
        matches!(outcome.agent, Some((AgentStatus::Signal(s), _)) if s == Signal::SIGXFSZ as i32);
    match spec.disk_file_cap {
        Some(cap) => xfsz && spec.limits.max_file_size_bytes.is_none_or(|m| cap < m),
        None => false,
    }
}

fn disk_message(exceeded: Option<Exceeded>, spec: &TurnSpec) -> String {
    let limit = disk_limit(&spec.limits).describe();
    match exceeded {
        Some(Exceeded {
            usage: u,
            free_below_floor: Some(free),
        }) => format!(
            "the state dir is nearly full ({free} bytes free, below half the disk reserve) \
             and this session grew during the turn, to {} bytes / {} inodes",
            u.bytes, u.inodes
        ),
        Some(Exceeded { usage: u, .. }) => format!(
            "disk limit of {limit} reached: the session's home and work use at least {} bytes / {} inodes",
            u.bytes, u.inodes
        ),
        None => format!("disk limit of {limit} reached"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_default_cap_and_refuse() {
        let defaults = Limits {
            wall_time_ms: Some(10),
            ..Limits::unlimited()
        };
        let caps = Limits {
            wall_time_ms: Some(100),
            memory_bytes: Some(1000),
            ..Limits::unlimited()
        };
        let got = effective_limits(None, &defaults, &caps).expect("defaults");
        assert_eq!(got.wall_time_ms, Some(10));
        assert_eq!(got.memory_bytes, None);
        let req = pb::Limits {
            wall_time_ms: 100,
            cpu_time_ms: 5,
            ..Default::default()
        };
        let got = effective_limits(Some(&req), &defaults, &caps).expect("at cap");
        assert_eq!(got.wall_time_ms, Some(100));
        assert_eq!(got.cpu_time_ms, Some(5));
        let req = pb::Limits {
            memory_bytes: 1001,
            ..Default::default()
        };
        assert_eq!(
            effective_limits(Some(&req), &defaults, &caps),
            Err(InputError::OverCap {
                name: "memory_bytes",
                value: 1001,
                cap: 1000
            })
        );
    }

    fn spec() -> TurnSpec {
        TurnSpec {
            session_id: "s".into(),
            turn_id: "t".into(),
            argv: vec!["x".into()],
            env: vec![],
            cwd: String::new(),
            limits: Limits::unlimited(),
            lease: LeasePolicy::Reject,
            llm_env_vars: vec![],
            disk_file_cap: None,
        }
    }

    #[test]
    fn a_broken_control_socket_is_named_not_hidden() {
        let outcome = Outcome {
            control_error: Some("control frame over cap".into()),
            ..Default::default()
        };
        let (reason, msg) = classify(&outcome, false, false, &spec());
        assert_eq!(reason, Reason::SpawnFailed);
        assert!(
            msg.contains("the shim's control socket broke the protocol (control frame over cap)"),
            "{msg}"
        );
    }

    #[test]
    fn classify_picks_the_reason_that_explains_the_end() {
        let s = spec();
        let with_agent = |st| Outcome {
            agent: Some((st, Usage::default())),
            agent_started: true,
            ..Default::default()
        };
        let cases = [
            (
                with_agent(AgentStatus::Code(0)),
                false,
                false,
                Reason::Exited,
            ),
            (
                with_agent(AgentStatus::Code(3)),
                false,
                false,
                Reason::Exited,
            ),
            (
                with_agent(AgentStatus::Code(1)),
                false,
                true,
                Reason::ProcessLimit,
            ),
            (
                with_agent(AgentStatus::Signal(24)),
                false,
                false,
                Reason::CpuLimit,
            ),
            (
                with_agent(AgentStatus::Signal(25)),
                false,
                false,
                Reason::FileSizeLimit,
            ),
            (
                with_agent(AgentStatus::Signal(9)),
                true,
                false,
                Reason::MemoryLimit,
            ),
            (
                with_agent(AgentStatus::Signal(9)),
                false,
                false,
                Reason::Killed,
            ),
            (
                Outcome {
                    agent_started: true,
                    ..Default::default()
                },
                true,
                false,
                Reason::MemoryLimit,
            ),
            (
                Outcome {
                    stopped: Some(StopReason::TimedOut),
                    ..with_agent(AgentStatus::Signal(15))
                },
                false,
                false,
                Reason::TimedOut,
            ),
            (
                Outcome {
                    failed: Some((FailureClass::Payload, "x".into())),
                    ..Default::default()
                },
                false,
                false,
                Reason::PayloadRejected,
            ),
            (
                Outcome {
                    failed: Some((FailureClass::Exec, "x".into())),
                    ..Default::default()
                },
                false,
                false,
                Reason::SpawnFailed,
            ),
            (
                Outcome {
                    isolation: Some("x".into()),
                    ..Default::default()
                },
                false,
                false,
                Reason::IsolationCheckFailed,
            ),
        ];
        for (i, (outcome, oom, fork, want)) in cases.into_iter().enumerate() {
            assert_eq!(classify(&outcome, oom, fork, &s).0, want, "case {i}");
        }
    }

    #[test]
    fn disk_stops_and_disk_file_caps_read_disk_limit() {
        let mut s = spec();
        s.limits.disk_bytes = Some(1000);
        s.limits.max_file_size_bytes = Some(5000);
        s.disk_file_cap = Some(400);
        let xfsz = Outcome {
            agent: Some((AgentStatus::Signal(25), Usage::default())),
            agent_started: true,
            ..Default::default()
        };
        let (reason, msg) = classify(&xfsz, false, false, &s);
        assert_eq!(reason, Reason::DiskLimit);
        assert!(msg.contains("400 bytes left"), "{msg}");
        // A file-size limit below what is left of the disk limit is its own.
        s.limits.max_file_size_bytes = Some(100);
        assert_eq!(classify(&xfsz, false, false, &s).0, Reason::FileSizeLimit);
        let stopped = Outcome {
            stopped: Some(StopReason::DiskLimit),
            disk_exceeded: Some(Exceeded {
                usage: crate::disk::Usage {
                    bytes: 2000,
                    inodes: 3,
                },
                free_below_floor: None,
            }),
            ..xfsz
        };
        let (reason, msg) = classify(&stopped, false, false, &s);
        assert_eq!(reason, Reason::DiskLimit);
        assert!(msg.contains("at least 2000 bytes"), "{msg}");
    }
}
