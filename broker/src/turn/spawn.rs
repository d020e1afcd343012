//! Spawning the turn: nsjail (which runs the shim as the jail's init) or,
//! in direct mode, the shim itself, with the payload on fd 3 and the
//! control socket on fd 4; one code path for both modes, through a ready
//! launcher when the turn took a spare. What was spawned is a [`Jail`].

use super::stdio::Stdio;
use super::{Outcome, Turn};
use crate::config::Mode;
use crate::error::BrokerError;
use crate::jail;
use crate::jail::spawn::{Child, ChildSetup, LaunchError, Launcher};
use crate::process::ProcessControl;
use crate::process::linux::TurnProcesses;
use nix::fcntl::OFlag;
use std::ffi::{OsStr, OsString};
use std::os::fd::OwnedFd;
use std::path::Path;
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tokio::task::JoinHandle;
use tracing::warn;

/// Most of nsjail's log kept per turn (it logs a few lines).
const MAX_LOG: u64 = 64 * 1024;
/// Most of nsjail's log quoted in a turn's message.
const LOG_TAIL: usize = 2048;

/// A turn's jail once spawned: its processes (behind [`ProcessControl`]),
/// the broker's ends of its control socket, log and stdio, and what has
/// been learnt so far of how the turn ends.
pub(super) struct Jail<P> {
    pub procs: P,
    pub ctl: UnixStream,
    /// Whether the control socket may still bring frames.
    pub ctl_open: bool,
    /// nsjail's log (nsjail mode), read to its end in the background.
    log: Option<JoinHandle<Vec<u8>>>,
    stdio: Stdio,
    pub outcome: Outcome,
    /// What was spawned ("nsjail" or "shim"), to name a failure after.
    what: &'static str,
}

impl<P: ProcessControl> Jail<P> {
    pub fn new(
        procs: P,
        ctl: UnixStream,
        log: Option<JoinHandle<Vec<u8>>>,
        stdio: Stdio,
        what: &'static str,
    ) -> Self {
        Jail {
            procs,
            ctl,
            ctl_open: true,
            log,
            stdio,
            outcome: Outcome::default(),
            what,
        }
    }

    /// The broker's ends of the jail's stdio, for the relay.
    pub fn take_stdio(&mut self) -> Stdio {
        std::mem::take(&mut self.stdio)
    }

    /// Ends a jail whose agent never ran (or was refused), reaps it and
    /// gathers what it said: the one abort path of a turn.
    pub async fn abort(mut self) -> Outcome {
        // Without GO the shim exits by itself once the control socket
        // closes; killing it directly is faster and certain.
        self.procs.kill_all().await;
        self.outcome.child_status = self.procs.wait().await.ok();
        // A ready launcher that could not exec the program says why.
        if let Some(e) = self.procs.launch_failure() {
            self.outcome.spawn_error = Some(spawn_error(self.what, e).to_string());
        }
        // What nsjail (a config error) or the shim said on stderr before
        // any agent ran; the jail is gone, so this reaches EOF at once.
        if let Some(stderr) = self.stdio.stderr.take() {
            self.outcome.early_stderr = super::stdio::read_early(stderr).await;
        }
        self.collect_rest().await;
        self.into_outcome().await
    }

    /// The outcome, with the tail of nsjail's log.
    pub async fn into_outcome(mut self) -> Outcome {
        if let Some(h) = self.log.take() {
            self.outcome.nsjail_log = jail::log_tail(&h.await.unwrap_or_default(), LOG_TAIL);
        }
        self.outcome
    }
}

/// A spawn failure, named after what was spawned.
fn spawn_error(what: &'static str, source: std::io::Error) -> BrokerError {
    BrokerError::Spawn { what, source }
}

impl Turn {
    /// Spawns the jail (through `launcher` if the turn took one).
    pub(super) fn spawn<'a>(
        &self,
        prepared: &'a super::Prepared,
        launcher: Option<Launcher>,
    ) -> Result<Jail<TurnProcesses<'a>>, BrokerError> {
        let payload: OwnedFd = std::fs::File::open(&self.paths.payload)
            .map_err(|e| BrokerError::io("cannot open", &self.paths.payload, e))?
            .into();
        let (ctl, ctl_child) = control_socket()?;
        let mut setup = ChildSetup {
            fds: vec![
                (payload, turnstile_shim::INIT_FD),
                (ctl_child, turnstile_shim::CONTROL_FD),
            ],
            cgroup_procs: match &prepared.cgroup {
                Some(cg) => cg.procs_files().map_err(BrokerError::Cgroup)?,
                None => Vec::new(),
            },
        };
        let (program, args, log) = self.command(prepared, &mut setup)?;
        let args: Vec<&OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        let mut child = self.start_child(program, &args, launcher, setup)?;
        tracing::Span::current().record("jail.pid", child.id());
        let stdio = Stdio::take(&mut child);
        if self.broker.mode() == Mode::Nsjail {
            stdio.give_to(self.broker.outside_ids);
        }
        let procs = TurnProcesses::new(child, prepared.cgroup.as_ref());
        Ok(Jail::new(procs, ctl, log.map(read_log), stdio, self.what()))
    }

    /// The program to run and its arguments; in nsjail mode also its log
    /// pipe (added to `setup`), and the mount sources checked once more.
    fn command(
        &self,
        prepared: &super::Prepared,
        setup: &mut ChildSetup,
    ) -> Result<(&Path, Vec<OsString>, Option<OwnedFd>), BrokerError> {
        let Some((bin, _)) = &self.broker.nsjail else {
            let shim = &self.broker.config.shim;
            let max_payload = self.broker.config.max_payload_bytes.to_string();
            let args = vec!["--max-payload".into(), max_payload.into()];
            return Ok((shim.as_path(), args, None));
        };
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| BrokerError::Spawn {
            what: "nsjail log pipe",
            source: e.into(),
        })?;
        setup.fds.push((w, jail::LOG_FD));
        // The turn dir reaches the shim as a descriptor, not a mount (see
        // `jail::RUN_FD`).
        let run_dir = nix::fcntl::open(
            &self.paths.turn_dir,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| BrokerError::io("cannot open", &self.paths.turn_dir, e.into()))?;
        setup.fds.push((run_dir, jail::RUN_FD));
        crate::session::check_mount_sources(&self.paths.session, &prepared.dirs)?;
        let args = vec!["--config".into(), self.paths.jail_config.clone().into()];
        Ok((bin.as_path(), args, Some(r)))
    }

    /// Runs the program through the ready launcher, or spawns it (also when
    /// the launcher turns out unusable).
    fn start_child(
        &self,
        program: &Path,
        args: &[&OsStr],
        launcher: Option<Launcher>,
        setup: ChildSetup,
    ) -> Result<Child, BrokerError> {
        let error = |e| spawn_error(self.what(), e);
        let piped = jail::spawn::Stdio::Piped;
        if let Some(l) = launcher {
            match l.launch(program, args, piped, &setup) {
                Ok(child) => return Ok(child),
                Err(LaunchError::Failed(e)) => return Err(error(e)),
                Err(LaunchError::Unusable(e)) => {
                    warn!(error = %e, "spare launcher unusable; spawning directly");
                }
            }
        }
        jail::spawn::spawn(program, args, piped, setup).map_err(error)
    }

    /// What this broker spawns for a turn.
    fn what(&self) -> &'static str {
        if self.broker.nsjail.is_some() {
            "nsjail"
        } else {
            "shim"
        }
    }
}

/// The control socket: the broker's end (registered with tokio) and the
/// jail's.
fn control_socket() -> Result<(UnixStream, OwnedFd), BrokerError> {
    let error = |source| BrokerError::Spawn {
        what: "control socket",
        source,
    };
    let (ours, theirs) = crate::process::socketpair().map_err(error)?;
    let ours = std::os::unix::net::UnixStream::from(ours);
    ours.set_nonblocking(true).map_err(error)?;
    let ours = UnixStream::from_std(ours).map_err(error)?;
    Ok((ours, theirs))
}

/// Reads nsjail's log pipe to its end (at most [`MAX_LOG`]).
fn read_log(r: OwnedFd) -> JoinHandle<Vec<u8>> {
    tokio::spawn(async move {
        let file = tokio::fs::File::from_std(std::fs::File::from(r));
        let mut buf = Vec::new();
        let _ = file.take(MAX_LOG).read_to_end(&mut buf).await;
        buf
    })
}
