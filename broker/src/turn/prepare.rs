//! Preparing a turn: where its files are ([`TurnPaths`]), the agent's
//! environment and the init payload (pure, checked before admission), then
//! the turn dir with its payload, jail config and LLM socket, and its
//! cgroup: a ready spare's taken over, or new ones made.

use super::{SHIM_TASKS, Turn, TurnSpec, supervisors};
use crate::config::{Limits, Mode};
use crate::error::BrokerError;
use crate::jail::cgroup::{CgroupLimits, TurnCgroup};
use crate::jail::spawn::Launcher;
use crate::jail::warm::Spare;
use crate::session::{SessionDirs, SessionMeta, SessionPaths, now_unix_ms};
use crate::{Broker, jail};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use tracing::warn;
use turnstile_shim::InitPayload;

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
    /// Port of the LLM bridge on the agent's loopback: the broker's
    /// setting in nsjail mode; in direct mode 0 (the shim picks one),
    /// unless a profile file names the URL (then one reserved here).
    pub llm_port: u16,
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
            Mode::Nsjail => format!("/proc/self/fd/{}/llm.sock", jail::RUN_FD),
            Mode::Direct => llm_socket.to_string_lossy().into_owned(),
        };
        let llm_port = match broker.mode() {
            Mode::Nsjail => broker.config.llm_port,
            Mode::Direct if spec.profile.files_need_url() => reserve_port(),
            Mode::Direct => 0,
        };
        TurnPaths {
            llm_port,
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

/// A free port on the host's loopback for a direct-mode bridge whose URL
/// must be known before the shim binds it (a profile file names it). The
/// port is free when picked; should another process take it before the
/// shim binds it, the turn fails to spawn, naming the address.
fn reserve_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// The bridge URL the agent gets (with the profile's path suffix), when
/// its port is known before the spawn.
pub fn llm_base_url(spec: &TurnSpec, paths: &TurnPaths) -> Option<String> {
    (paths.llm_port != 0).then(|| {
        format!(
            "http://127.0.0.1:{}{}",
            paths.llm_port, spec.profile.base_url_path
        )
    })
}

/// The agent's environment: the allowlist; `PATH` and `LANG` defaults; the
/// profile's environment and the placeholder credentials; then `Start.env`
/// (sorted), which wins over the three before it. The bridge URL variables
/// are set by the shim once its port is bound.
pub fn agent_env(broker: &Broker, spec: &TurnSpec, paths: &TurnPaths) -> Vec<(String, String)> {
    let mut env = vec![
        ("HOME".to_string(), paths.home.clone()),
        ("USER".to_string(), "agent".to_string()),
        ("LOGNAME".to_string(), "agent".to_string()),
        ("TMPDIR".to_string(), paths.tmp.clone()),
        ("PWD".to_string(), paths.cwd.clone()),
    ];
    let profile = &spec.profile;
    let in_start = |k: &str| spec.env.iter().any(|(key, _)| key == k);
    for (k, default) in [
        ("PATH", broker.config.agent_path.as_str()),
        ("LANG", "C.UTF-8"),
    ] {
        if !in_start(k) && !profile.env.contains_key(k) {
            env.push((k.to_string(), default.to_string()));
        }
    }
    let placeholders = spec
        .llm_credential_env_vars
        .iter()
        .map(|k| (k, &profile.placeholder));
    for (k, v) in profile.env.iter().chain(placeholders) {
        if !in_start(k) {
            env.push((k.clone(), v.clone()));
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
            // The shim and its bridge's thread count against it too.
            processes: if no_cgroups {
                l.max_processes.map(|n| n.saturating_add(SHIM_TASKS))
            } else {
                None
            },
        },
        llm: Some(turnstile_shim::LlmBridge {
            port: paths.llm_port,
            socket_path: paths.llm_socket_jail.clone(),
            env_vars: spec.llm_env_vars.clone(),
            url_path: spec.profile.base_url_path.clone(),
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

/// The cgroup's share of a turn's limits in `mode`.
pub(crate) fn cgroup_limits(limits: &Limits, mode: Mode) -> CgroupLimits {
    CgroupLimits {
        memory_bytes: limits.memory_bytes,
        // The shim, its bridge's thread and nsjail live in the turn's
        // cgroup too.
        processes: limits
            .max_processes
            .map(|n| n.saturating_add(supervisors(mode))),
    }
}

/// What a prepared turn holds; all of it is undone when the turn ends.
pub(super) struct Prepared {
    /// The session's metadata, already counting this turn.
    pub meta: SessionMeta,
    pub cgroup: Option<TurnCgroup>,
    pub llm: UnixListener,
    /// A ready launcher in `cgroup`, taken for the spawn.
    pub launcher: Option<Launcher>,
    /// The session's home and work, opened as real directories: nsjail
    /// must mount exactly these (checked right before the spawn).
    pub dirs: SessionDirs,
}

/// What the turn dir is made with besides its files.
type Resources = (Option<TurnCgroup>, UnixListener, Option<Launcher>);

impl Turn {
    /// The session's dirs, the turn dir and its files, the LLM socket and
    /// the cgroup. On an error nothing of it is left behind.
    pub(super) fn prepare(&self) -> Result<Prepared, BrokerError> {
        let (_, meta, dirs) = self.broker.sessions.ensure(&self.lease)?;
        self.write_profile_files(&dirs)?;
        let turn_dir = &self.paths.turn_dir;
        // The turn dir: a ready one (with its llm.sock bound, and tmp/ in
        // direct mode) renamed to the turn's name, or a new one.
        let spare = self.take_spare();
        if spare.is_none() {
            std::fs::DirBuilder::new()
                .mode(0o755)
                .create(turn_dir)
                .map_err(|e| BrokerError::io("cannot create", turn_dir, e))?;
        }
        // From here on a failure must not leave the turn dir behind.
        let (cgroup, llm, launcher) = self.populate(spare).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(turn_dir);
        })?;
        Ok(Prepared {
            meta: self.counted(meta),
            cgroup,
            llm,
            launcher,
            dirs,
        })
    }

    /// The profile's config files in the session home (rewritten before
    /// every turn: the bridge URL they name may change), owned by the
    /// agent. A link or file where a directory goes refuses the turn.
    fn write_profile_files(&self, dirs: &SessionDirs) -> Result<(), BrokerError> {
        let profile = &self.spec.profile;
        if profile.files.is_empty() {
            return Ok(());
        }
        let url = llm_base_url(&self.spec, &self.paths).unwrap_or_default();
        let owner = crate::process::is_root().then_some(self.broker.outside_ids);
        let owner = owner.filter(|_| self.broker.mode() == Mode::Nsjail);
        crate::profile::write_files(&dirs.home, &profile.render_files(&url), owner).map_err(|e| {
            BrokerError::Damaged {
                session: self.spec.session_id.clone(),
                what: format!("profile {}: {e}", profile.name),
            }
        })
    }

    /// A ready cgroup, launcher and turn dir from the warm pool, made the
    /// turn's: its limits set, (where the kernel allows) its cgroup renamed
    /// to the turn id, its dir renamed to the turn dir.
    fn take_spare(&self) -> Option<Spare> {
        let mut spare = self.broker.warm.as_ref()?.take()?;
        if let Err(e) = spare
            .cgroup
            .set_limits(cgroup_limits(&self.spec.limits, self.broker.mode()))
        {
            warn!(error = %e, "cannot set limits on a spare cgroup; making a new one");
            spare.discard();
            return None;
        }
        spare.cgroup.rename(&self.spec.turn_id);
        match std::fs::rename(&spare.dir, &self.paths.turn_dir) {
            Ok(()) => Some(spare),
            Err(e) => {
                warn!(error = %e, "cannot take a spare turn dir; making a new one");
                spare.discard();
                None
            }
        }
    }

    /// The turn dir's files, and the LLM socket and cgroup: the spare's, or
    /// new ones.
    fn populate(&self, spare: Option<Spare>) -> Result<Resources, BrokerError> {
        let Some(spare) = spare else {
            self.write_files(false)?;
            let llm = self.bind_llm()?;
            return Ok((self.new_cgroup()?, llm, None));
        };
        // Nothing of the spare may leak if the turn cannot be prepared.
        if let Err(e) = self.write_files(true) {
            spare.discard();
            return Err(e);
        }
        let Spare {
            cgroup,
            launcher,
            llm,
            ..
        } = spare;
        Ok((Some(cgroup), llm, Some(launcher)))
    }

    fn bind_llm(&self) -> Result<UnixListener, BrokerError> {
        let broker = &self.broker;
        let owner = (broker.mode() == Mode::Nsjail && crate::process::is_root())
            .then_some(broker.outside_ids);
        let path = &self.paths.llm_socket;
        crate::llm::bind(path, owner).map_err(|e| BrokerError::io("cannot bind", path, e))
    }

    fn new_cgroup(&self) -> Result<Option<TurnCgroup>, BrokerError> {
        let Some(cg) = &self.broker.cgroups else {
            return Ok(None);
        };
        let limits = cgroup_limits(&self.spec.limits, self.broker.mode());
        let cgroup = cg.create(&self.spec.turn_id, limits);
        cgroup.map(Some).map_err(BrokerError::Cgroup)
    }

    /// The session's metadata with this turn started.
    fn counted(&self, mut meta: SessionMeta) -> SessionMeta {
        meta.turn_count += 1;
        meta.last_turn_id = Some(self.spec.turn_id.clone());
        meta.last_turn_start_unix_ms = Some(now_unix_ms());
        meta.last_turn_end_unix_ms = None;
        meta
    }

    /// The turn dir's files: the payload, and the jail config (nsjail mode)
    /// or the agent's tmp dir (direct mode; a spare turn dir has one already).
    fn write_files(&self, spare: bool) -> Result<(), BrokerError> {
        let paths = &self.paths;
        write_new(&paths.payload, &self.payload)?;
        if let Some((_, profile)) = &self.broker.nsjail {
            write_new(&paths.jail_config, self.jail_config(profile).as_bytes())?;
        } else if !spare {
            let tmp = PathBuf::from(&paths.tmp);
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&tmp)
                .map_err(|e| BrokerError::io("cannot create", &tmp, e))?;
        }
        Ok(())
    }

    /// The nsjail config of this turn: the profile and what the turn adds.
    fn jail_config(&self, profile: &str) -> String {
        let config = &self.broker.config;
        let bundle_mounts = config
            .bundle_mounts
            .iter()
            .chain(&self.spec.profile.bundle_mounts)
            .filter_map(|m| crate::config::parse_bundle_mount(m).ok())
            .collect();
        let wall_s = self
            .spec
            .limits
            .wall_time_ms
            .map(|ms| ms.div_ceil(1000) + config.kill_grace_ms.div_ceil(1000) + 5)
            .unwrap_or(0);
        let paths = &self.paths;
        jail::render(
            profile,
            &jail::JailTurn {
                home: paths.session.home.clone(),
                work: paths.session.work.clone(),
                shim: config.shim.clone(),
                bundle_mounts,
                outside_uid: self.broker.outside_ids.0,
                outside_gid: self.broker.outside_ids.1,
                time_limit_s: wall_s,
                max_payload: config.max_payload_bytes,
            },
        )
    }
}

/// Creates `path` (owner-only; it must not exist) and writes `bytes` to it.
fn write_new(path: &Path, bytes: &[u8]) -> Result<(), BrokerError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| BrokerError::io("cannot create", path, e))?;
    std::io::Write::write_all(&mut f, bytes).map_err(|e| BrokerError::io("cannot write", path, e))
}
