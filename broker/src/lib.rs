//! Turnstile broker: one daemon per worker host that runs agent turns.
//!
//! [`Broker`] owns the state dir, the session leases, the per-turn cgroups
//! and the set of running turns; [`server::serve`] serves it over gRPC until a
//! shutdown trigger fires. The binary `turnstile` only parses flags and calls
//! into here, which is what lets tests run a real broker on a temp socket.
//!
//! Where things live:
//!
//! - start-up (state lock, checks, stale cleanup), admission and shutdown:
//!   [`Broker`], here; the gRPC server and its rpcs: [`server`], [`service`];
//!   settings: [`config`]; errors and their one mapping to status codes:
//!   [`error`]; the rules for what an executor names: [`validate`].
//! - sessions: paths, metadata and the turn lease in [`session`], their
//!   trees walked by descriptor in [`tree`], archives in [`archive`], disk
//!   limits and the free-space reserve in [`disk`], session disk images in
//!   [`volume`].
//! - one turn, as its steps: [`turn`].
//! - a turn's jail on the host: [`jail`] (nsjail config, cgroups, spawning,
//!   ready spares); process control behind a trait: [`process`].
//! - the broker side of the LLM relay: [`llm`]; what an agent's CLI needs
//!   to use it (variables, placeholder credentials, config files, mounts):
//!   [`profile`].

pub mod archive;
pub mod config;
pub mod disk;
pub mod error;
pub mod fleet;
pub mod jail;
pub mod journal;
pub mod llm;
pub mod process;
pub mod profile;
pub mod server;
pub mod service;
pub mod session;
pub mod tree;
pub mod turn;
pub mod validate;
pub mod volume;

use crate::config::{CgroupPolicy, Config, Mode};
use crate::error::BrokerError;
use crate::jail::cgroup::Cgroups;
use crate::jail::warm;
use crate::session::Sessions;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// A turn's signal channel: from its executors' streams and
/// `InterruptTurn` to its supervision.
pub type Signals = (
    tokio::sync::mpsc::Sender<nix::sys::signal::Signal>,
    tokio::sync::mpsc::Receiver<nix::sys::signal::Signal>,
);

/// A new [`Signals`] channel.
pub fn signals() -> Signals {
    tokio::sync::mpsc::channel(8)
}

/// Why the broker ended a turn itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    TimedOut,
    Cancelled,
    BrokerShutdown,
    ExecutorGone,
    /// No executor attached within the turn's detach grace (ms) after its
    /// stream went.
    NotReattached(u64),
    /// The session went over its disk limit (see [`disk`]).
    DiskLimit,
    /// Fleet mode: the session's fleet lease could not be renewed in time
    /// (see [`fleet::keep_alive`]).
    LeaseLost,
}

/// A running turn as the broker tracks it.
#[derive(Debug, Clone)]
pub struct ActiveTurn {
    pub session_id: String,
    pub token: CancellationToken,
    pub reason: Arc<OnceLock<StopReason>>,
    /// Signals for the agent (from the turn stream or `InterruptTurn`).
    pub signals: tokio::sync::mpsc::Sender<nix::sys::signal::Signal>,
}

impl ActiveTurn {
    /// Ends the turn for `reason` (the first reason given wins).
    pub fn stop(&self, reason: StopReason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }
}

#[derive(Debug, Default)]
struct Admission {
    closed: bool,
    active: HashMap<String, ActiveTurn>,
}

/// Problems that keep the broker from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("cannot use state dir {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "state dir {0} is in use by another broker (its lock is held); stop it or pick another --state-dir"
    )]
    StateDirLocked(PathBuf),
    #[error("cannot lock {path}: {source}")]
    StateLock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Nsjail(String),
    #[error(
        "shim {0} is missing or not executable: build it with scripts/build-shim.sh and pass --shim"
    )]
    Shim(PathBuf),
    #[error("cannot read jail profile {path}: {source}")]
    Profile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("jail profile {path}: {msg}")]
    BadProfile { path: PathBuf, msg: String },
    #[error("cgroups are required but unusable: {0}")]
    Cgroups(String),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// The broker's state, shared by every turn.
#[derive(Debug)]
pub struct Broker {
    pub config: Config,
    pub sessions: Sessions,
    pub turns_dir: PathBuf,
    /// Turns an executor can attach to: running, and kept since they ended.
    pub turns: turn::registry::Registry,
    /// The resolved nsjail binary and profile text (nsjail mode only).
    pub nsjail: Option<(PathBuf, String)>,
    pub cgroups: Option<Cgroups>,
    /// Session disk limits and the state dir's free-space reserve.
    pub disk: Arc<disk::Disk>,
    /// Ready launchers in ready cgroups (with cgroups on); see [`warm`].
    pub warm: Option<warm::WarmPool>,
    /// Host uid/gid of the agent in nsjail mode.
    pub outside_ids: (u32, u32),
    /// Fleet mode (see [`fleet`]): the session leases, generations and
    /// archives every worker shares. `None`: one host, as without `[fleet]`.
    pub fleet: Option<Arc<dyn fleet::Fleet>>,
    admission: Mutex<Admission>,
    pub tracker: TaskTracker,
    /// Makes the forwarders of turns with broker-side forwarding (see
    /// [`llm::upstream`]); installed by the binary, none without it.
    llm_upstreams: OnceLock<Arc<dyn llm::upstream::Upstreams>>,
    _state_lock: nix::fcntl::Flock<File>,
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

impl Broker {
    /// Checks the config and the system, takes the state dir, cleans what a
    /// previous broker left there, and returns a broker ready to serve.
    pub fn new(config: Config) -> Result<Arc<Broker>, StartupError> {
        Broker::with_fleet(config, None)
    }

    /// [`Broker::new`] in fleet mode: every turn takes `fleet`'s lease,
    /// hydrates the session before it runs and commits it after. The
    /// caller opens the fleet (its database and store) from the config's
    /// `[fleet]` table; this library links neither.
    pub fn with_fleet(
        config: Config,
        fleet: Option<Arc<dyn fleet::Fleet>>,
    ) -> Result<Arc<Broker>, StartupError> {
        config.validate()?;
        let state = config.state_dir.clone();
        let io_err = |source| StartupError::StateDir {
            path: state.clone(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&state)
            .map_err(io_err)?;
        let lock_file = File::create(state.join("broker.lock")).map_err(io_err)?;
        let state_lock = lock_state(lock_file).map_err(|e| match e {
            nix::errno::Errno::EWOULDBLOCK => StartupError::StateDirLocked(state.clone()),
            e => StartupError::StateLock {
                path: state.join("broker.lock"),
                source: e.into(),
            },
        })?;

        if !is_executable(&config.shim) {
            return Err(StartupError::Shim(config.shim.clone()));
        }
        let nsjail = match config.mode {
            Mode::Direct => None,
            Mode::Nsjail => {
                let bin = jail::check_binary(&config.nsjail).map_err(StartupError::Nsjail)?;
                let profile = std::fs::read_to_string(&config.jail_config).map_err(|source| {
                    StartupError::Profile {
                        path: config.jail_config.clone(),
                        source,
                    }
                })?;
                jail::check_profile(&profile).map_err(|msg| StartupError::BadProfile {
                    path: config.jail_config.clone(),
                    msg,
                })?;
                // The jail binds the session dirs and the shim: their
                // directories must be traversable from the user namespace.
                std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o711))
                    .map_err(io_err)?;
                jail::check_traversable(&state.join("sessions"))
                    .and_then(|()| jail::check_traversable(&config.shim))
                    .map_err(StartupError::Nsjail)?;
                Some((bin, profile))
            }
        };

        let root = process::is_root();
        let outside_ids = if root {
            (config.jail_uid, config.jail_gid)
        } else {
            (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            )
        };
        let cgroups = match config.cgroups {
            CgroupPolicy::Off => None,
            policy => {
                let parent = format!(
                    "turnstile-{:016x}",
                    fnv1a(state.as_os_str().as_encoded_bytes())
                );
                match Cgroups::detect(&parent) {
                    Ok(Some(cg)) => Some(cg),
                    Ok(None) if policy == CgroupPolicy::Required => {
                        return Err(StartupError::Cgroups(
                            "no memory and pids controllers mounted".into(),
                        ));
                    }
                    Err(e) if policy == CgroupPolicy::Required => {
                        return Err(StartupError::Cgroups(e.to_string()));
                    }
                    Ok(None) | Err(_) => {
                        warn!(
                            "no usable memory/pids cgroups: memory and process limits fall back to \
                             RLIMIT_AS and RLIMIT_NPROC, and leftover processes are found through the process tree only"
                        );
                        None
                    }
                }
            }
        };

        let turns_dir = state.join("turns");
        std::fs::DirBuilder::new()
            .mode(0o711)
            .create(&turns_dir)
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(io_err)?;
        // Traversable so the jail (another uid) can reach its bind-mounted
        // turn dir; not listable.
        std::fs::set_permissions(&turns_dir, std::fs::Permissions::from_mode(0o711))
            .map_err(io_err)?;
        if let Some(cg) = &cgroups {
            for stale in cg.clean_stale() {
                info!(turn.id = %stale, "killed and removed a previous broker's turn cgroup");
            }
        }
        if let Ok(entries) = std::fs::read_dir(&turns_dir) {
            for e in entries.flatten() {
                match std::fs::remove_dir_all(e.path()) {
                    Ok(()) => {
                        info!(path = %e.path().display(), "removed a previous broker's turn dir")
                    }
                    Err(err) => {
                        warn!(path = %e.path().display(), error = %err, "cannot remove stale turn dir")
                    }
                }
            }
        }
        let turns = turn::registry::Registry::open(
            state.join("journals"),
            config.journal_max_bytes,
            std::time::Duration::from_millis(config.finished_turn_retention_ms),
        )
        .map_err(io_err)?;
        let owner = (config.mode == Mode::Nsjail && root).then_some(outside_ids);
        let (detected, volumes) =
            disk::detect(&state, config.disk_backend, owner).map_err(BrokerError::Disk)?;
        let images = volumes.map(|volumes| session::Images {
            volumes,
            copy_limit: disk::DiskLimit {
                bytes: config
                    .max_limits
                    .disk_bytes
                    .or(config.default_limits.disk_bytes),
                inodes: config
                    .max_limits
                    .disk_inodes
                    .or(config.default_limits.disk_inodes),
            },
            spare_limit: disk::DiskLimit {
                bytes: config.default_limits.disk_bytes,
                inodes: config.default_limits.disk_inodes,
            },
            spare_count: config.warm_spares,
        });
        let sessions = Sessions::new(state.join("sessions"), owner)?;
        // Stale staging trees and ready images of a dead broker go before
        // new ready images are made.
        sessions.clean_staging();
        let sessions = sessions.with_images(images);
        let disk = Arc::new(
            disk::Disk::new(&state, config.disk_reserve_bytes, detected)
                .map_err(BrokerError::Disk)?,
        );
        info!(
            backend = disk.detected().backend,
            reserve_bytes = disk.reserve(),
            why = %disk.detected().why,
            "session disk limits"
        );
        let _ = std::fs::remove_dir_all(state.join("imports"));
        info!(
            mode = config.mode.as_str(),
            state_dir = %state.display(),
            cgroups = cgroups.as_ref().map(|c| c.version()).unwrap_or(0),
            "broker ready"
        );
        // Spare turn dirs wait here, out of turns/, and are renamed into it
        // when a turn takes one (same filesystem). What a previous broker
        // left here goes.
        let spares_dir = state.join("spares");
        match std::fs::DirBuilder::new().mode(0o700).create(&spares_dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(io_err(e)),
            _ => {}
        }
        if let Ok(entries) = std::fs::read_dir(&spares_dir) {
            for e in entries.flatten() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let warm = cgroups
            .as_ref()
            .filter(|_| config.warm_spares > 0)
            .map(|cg| {
                warm::WarmPool::new(
                    cg.clone(),
                    config.shim.clone(),
                    config.warm_spares,
                    turn::cgroup_limits(&config.default_limits, config.mode),
                    warm::TurnDirs {
                        spares: spares_dir.clone(),
                        tmp: config.mode == Mode::Direct,
                        llm_owner: (config.mode == Mode::Nsjail && root).then_some(outside_ids),
                    },
                )
            });
        Ok(Arc::new(Broker {
            config,
            sessions,
            turns_dir,
            turns,
            nsjail,
            cgroups,
            disk,
            warm,
            outside_ids,
            fleet,
            admission: Mutex::default(),
            tracker: TaskTracker::new(),
            llm_upstreams: OnceLock::new(),
            _state_lock: state_lock,
        }))
    }

    pub fn mode(&self) -> Mode {
        self.config.mode
    }

    /// Installs what makes the forwarders of turns whose `Start` names an
    /// upstream (broker-side forwarding); once, before serving. Without
    /// it such a `Start` is refused.
    pub fn set_llm_upstreams(&self, upstreams: Arc<dyn llm::upstream::Upstreams>) {
        if self.llm_upstreams.set(upstreams).is_err() {
            warn!("the LLM forwarder was installed twice; the first stays");
        }
    }

    /// What makes broker-side forwarders, if installed.
    pub fn llm_upstreams(&self) -> Option<&Arc<dyn llm::upstream::Upstreams>> {
        self.llm_upstreams.get()
    }

    /// Registers a turn as running, unless the broker is shutting down. The
    /// check and the insert happen under one lock, so a `Start` racing
    /// shutdown either is refused here or is stopped by [`Broker::shutdown`].
    pub fn admit(
        self: &Arc<Self>,
        turn_id: &str,
        session_id: &str,
        (signals, signals_rx): Signals,
    ) -> Result<Admitted, BrokerError> {
        let mut adm = self
            .admission
            .lock()
            .map_err(|_| BrokerError::ShuttingDown)?;
        if adm.closed {
            return Err(BrokerError::ShuttingDown);
        }
        // Turn dirs, cgroups and this registry are keyed by turn id: a
        // second running turn with the same id would take over the first's.
        if let Some(running) = adm.active.get(turn_id) {
            return Err(BrokerError::TurnIdInUse {
                turn: turn_id.to_string(),
                session: running.session_id.clone(),
            });
        }
        let turn = ActiveTurn {
            session_id: session_id.to_string(),
            token: CancellationToken::new(),
            reason: Arc::default(),
            signals,
        };
        adm.active.insert(turn_id.to_string(), turn.clone());
        Ok(Admitted {
            broker: self.clone(),
            turn_id: turn_id.to_string(),
            turn,
            signals_rx: Mutex::new(Some(signals_rx)),
            _tracked: self.tracker.token(),
        })
    }

    /// The running turn of a session, if any.
    pub fn active_turn_of(&self, session_id: &str) -> Option<(String, ActiveTurn)> {
        let adm = self.admission.lock().ok()?;
        adm.active
            .iter()
            .find(|(_, t)| t.session_id == session_id)
            .map(|(id, t)| (id.clone(), t.clone()))
    }

    /// Gives session `session_id` (whose lease the caller holds) the disk
    /// image its turn's `limit` needs, with the image backend on (see
    /// [`Sessions::prepare_disk`]); on the blocking pool.
    pub async fn prepare_session_disk(
        self: &Arc<Self>,
        session_id: &str,
        limit: disk::DiskLimit,
    ) -> Result<(), BrokerError> {
        if !self.sessions.has_images() {
            return Ok(());
        }
        let (broker, id) = (self.clone(), session_id.to_string());
        let path = self.sessions.root().join(session_id);
        tokio::task::spawn_blocking(move || broker.sessions.prepare_disk(&id, limit))
            .await
            .map_err(|e| {
                BrokerError::io(
                    "cannot prepare the disk image of",
                    path,
                    std::io::Error::other(e),
                )
            })?
    }

    pub fn active_count(&self) -> usize {
        self.admission.lock().map(|a| a.active.len()).unwrap_or(0)
    }

    /// Stops admitting turns and ends every running turn with reason
    /// `broker_shutdown`; returns when they have all cleaned up (or after
    /// the shutdown grace).
    pub async fn shutdown(&self) {
        let active: Vec<ActiveTurn> = match self.admission.lock() {
            Ok(mut adm) => {
                adm.closed = true;
                adm.active.values().cloned().collect()
            }
            Err(_) => Vec::new(),
        };
        for turn in &active {
            turn.stop(StopReason::BrokerShutdown);
        }
        self.tracker.close();
        let grace = std::time::Duration::from_millis(
            self.config.shutdown_grace_ms + self.config.kill_grace_ms,
        );
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                turns = self.active_count(),
                "turns still running after the shutdown grace"
            );
        }
        if let Some(w) = &self.warm {
            w.stop().await;
        }
        self.sessions.detach_all();
        // The broker's own parent cgroups go with it; one that still holds
        // a turn (past the grace) stays, and says so.
        if let Some(cg) = &self.cgroups {
            for (dir, e) in cg.remove_parents() {
                warn!(path = %dir.display(), error = %e, "cannot remove the broker's cgroup");
            }
        }
    }
}

/// A turn's registration; dropping it deregisters the turn.
#[derive(Debug)]
pub struct Admitted {
    broker: Arc<Broker>,
    pub turn_id: String,
    pub turn: ActiveTurn,
    signals_rx: Mutex<Option<tokio::sync::mpsc::Receiver<nix::sys::signal::Signal>>>,
    /// Counts the turn in the broker's task tracker from admission on, so
    /// a shutdown that closes admission right after this turn's admission
    /// (before its task is spawned) still waits for it.
    _tracked: tokio_util::task::task_tracker::TaskTrackerToken,
}

impl Admitted {
    /// The receiving end of the turn's signal channel (once).
    pub fn take_signals(&self) -> Option<tokio::sync::mpsc::Receiver<nix::sys::signal::Signal>> {
        self.signals_rx.lock().ok().and_then(|mut r| r.take())
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Ok(mut adm) = self.broker.admission.lock() {
            adm.active.remove(&self.turn_id);
        }
    }
}

/// How long a starting broker waits for the state dir's lock: a broker that
/// was just killed may leave a child between its clone and its exec (or
/// waiting for the kernel in a cgroup join) that still holds the lock for a
/// few milliseconds.
const STATE_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Takes the state dir's lock, waiting up to [`STATE_LOCK_WAIT`].
fn lock_state(file: File) -> Result<nix::fcntl::Flock<File>, nix::errno::Errno> {
    use nix::fcntl::{Flock, FlockArg};
    let deadline = std::time::Instant::now() + STATE_LOCK_WAIT;
    let mut file = file;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((f, nix::errno::Errno::EWOULDBLOCK)) if std::time::Instant::now() < deadline => {
                file = f;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err((_, e)) => return Err(e),
        }
    }
}

/// FNV-1a, to name the broker's cgroup after its state dir.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}
