//! Test harness: a real broker on a temp unix socket (in-process, or the
//! `turnstile` binary as a child process), a client, and helpers that fail
//! loudly when root, nsjail or the static shim are missing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use turnstile_broker::config::{CgroupPolicy, Config, Limits, Mode};
use turnstile_broker::{Broker, server};
use turnstile_proto::v1 as pb;
use turnstile_proto::v1::broker_client::BrokerClient;

pub use pb::exited::Reason;

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn path_from_env(var: &str, default: PathBuf) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or(default)
}

/// The static shim; panics with the remedy when it is missing.
pub fn shim() -> PathBuf {
    let p = path_from_env(
        "TURNSTILE_SHIM",
        workspace().join("target/x86_64-unknown-linux-gnu/shim/turnstile-shim"),
    );
    assert!(
        p.is_file(),
        "MISSING: the static shim {} — build it with scripts/build-shim.sh (or run scripts/test.sh)",
        p.display()
    );
    p
}

/// The real nsjail binary; panics with the remedy when it is missing.
pub fn nsjail() -> PathBuf {
    let p = path_from_env("TURNSTILE_NSJAIL", workspace().join(".tools/bin/nsjail"));
    assert!(
        p.exists(),
        "MISSING: nsjail at {} — install it with scripts/setup-nsjail.sh (or run scripts/test.sh)",
        p.display()
    );
    p
}

/// Panics unless the tests run as root (nsjail mode with a separate jail
/// uid, cgroups and the process checks need it; CI runs as root).
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "MISSING: root — the broker's nsjail-mode and cgroup tests must run as root (CI does)"
    );
}

/// A temp dir the jail can traverse (nsjail binds session dirs below it
/// from inside its user namespace).
pub fn tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).expect("chmod");
    dir
}

/// A broker config for tests: a temp state dir, short grace periods.
pub fn config(mode: Mode, state: &Path) -> Config {
    require_root();
    let mut cfg = Config {
        state_dir: state.to_path_buf(),
        mode,
        shim: shim(),
        jail_config: workspace().join("jail-configs/agent.cfg"),
        kill_grace_ms: 300,
        shutdown_grace_ms: 5_000,
        // A turn ends with its executor's stream, as before durable turns;
        // their tests set a grace.
        detach_grace_ms: 0,
        cgroups: CgroupPolicy::Required,
        default_limits: Limits {
            wall_time_ms: Some(120_000),
            max_processes: Some(256),
            max_open_files: Some(1024),
            ..Limits::unlimited()
        },
        ..Config::default()
    };
    if mode == Mode::Nsjail {
        cfg.nsjail = nsjail();
    }
    cfg
}

/// Unmounts, when dropped, whatever is still mounted below a dir (session
/// disk images a broker that did not stop cleanly left mounted), deepest
/// first, so the temp dir above it can go.
pub struct Unmount(pub PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        turnstile_broker::volume::unmount_all_below(&self.0);
    }
}

/// A broker served in-process on a temp unix socket.
pub struct Harness {
    _mounts: Unmount,
    _dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub broker: Arc<Broker>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Harness {
    pub async fn start(mode: Mode) -> Harness {
        Harness::start_with(mode, |_| {}).await
    }

    pub async fn start_with(mode: Mode, tweak: impl FnOnce(&mut Config)) -> Harness {
        Harness::start_in_fleet(mode, None, tweak).await
    }

    /// A broker in fleet mode when `fleet` is given (opened by the caller).
    pub async fn start_in_fleet(
        mode: Mode,
        fleet: Option<Arc<dyn turnstile_broker::fleet::Fleet>>,
        tweak: impl FnOnce(&mut Config),
    ) -> Harness {
        let dir = tempdir();
        let mut cfg = config(mode, &dir.path().join("state"));
        let socket = dir.path().join("broker.sock");
        cfg.socket = Some(socket.clone());
        tweak(&mut cfg);
        let access = server::SocketAccess::from_config(&cfg).expect("socket access");
        let broker = Broker::with_fleet(cfg, fleet).expect("broker starts");
        let listener = server::bind_unix_with(&socket, &access).expect("bind");
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(server::serve(broker.clone(), vec![listener], async {
            let _ = stopped.await;
        }));
        Harness {
            _mounts: Unmount(dir.path().to_path_buf()),
            _dir: dir,
            socket,
            broker,
            stop: Some(stop),
            server: Some(server),
        }
    }

    pub fn state(&self) -> PathBuf {
        self.broker.config.state_dir.clone()
    }

    pub async fn client(&self) -> BrokerClient<Channel> {
        client(&self.socket).await
    }

    /// Starts a turn on a fresh connection.
    pub async fn turn(&self, start: pb::Start) -> Result<Turn, tonic::Status> {
        Turn::start(self.client().await, start).await
    }

    /// Runs a turn to its end with no stdin.
    pub async fn run(&self, start: pb::Start) -> Outcome {
        let t = self.turn(start).await.expect("turn admitted");
        t.close_stdin().await;
        t.collect().await
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.server.take() {
            h.await.expect("server task").expect("server result");
        }
    }
}

pub async fn client(socket: &Path) -> BrokerClient<Channel> {
    let channel = turnstile_client::connect_unix(socket.to_path_buf())
        .await
        .expect("connect");
    BrokerClient::new(channel).max_decoding_message_size(64 << 20)
}

pub fn start(session: &str, script: &str) -> pb::Start {
    pb::Start {
        session_id: session.to_string(),
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

/// One running turn: its request sender and its events.
#[derive(Debug)]
pub struct Turn {
    pub tx: mpsc::Sender<pb::TurnRequest>,
    pub events: tonic::Streaming<pb::TurnEvent>,
}

/// Everything a turn sent, in order.
#[derive(Debug, Default)]
pub struct Outcome {
    pub started: Option<pb::Started>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exited: Option<pb::Exited>,
    /// Event kinds in arrival order.
    pub order: Vec<&'static str>,
    pub notices: Vec<String>,
    /// The `seq` of every event that has one, in arrival order.
    pub seqs: Vec<u64>,
}

impl Outcome {
    pub fn exited(&self) -> &pb::Exited {
        self.exited.as_ref().expect("an exited event")
    }
    pub fn reason(&self) -> Reason {
        Reason::try_from(self.exited().reason).expect("known reason")
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
    pub fn code(&self) -> Option<i32> {
        match self.exited().status {
            Some(pb::exited::Status::ExitCode(c)) => Some(c),
            _ => None,
        }
    }
    pub fn signal(&self) -> Option<i32> {
        match self.exited().status {
            Some(pb::exited::Status::Signal(s)) => Some(s),
            _ => None,
        }
    }
    #[track_caller]
    pub fn assert_exited_ok(&self) {
        assert_eq!(
            (self.reason(), self.code()),
            (Reason::Exited, Some(0)),
            "exited: {:?}\nstdout: {}\nstderr: {}",
            self.exited,
            self.stdout(),
            self.stderr()
        );
    }
}

impl Turn {
    pub async fn start(
        client: BrokerClient<Channel>,
        start: pb::Start,
    ) -> Result<Turn, tonic::Status> {
        Turn::open(client, pb::turn_request::Kind::Start(start)).await
    }

    /// Joins a turn with an `Attach` as the first request.
    pub async fn attach(
        client: BrokerClient<Channel>,
        attach: pb::Attach,
    ) -> Result<Turn, tonic::Status> {
        Turn::open(client, pb::turn_request::Kind::Attach(attach)).await
    }

    async fn open(
        mut client: BrokerClient<Channel>,
        first: pb::turn_request::Kind,
    ) -> Result<Turn, tonic::Status> {
        let (tx, rx) = mpsc::channel(16);
        tx.send(pb::TurnRequest { kind: Some(first) })
            .await
            .expect("queue the first request");
        let events = client
            .turn(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Turn { tx, events })
    }

    /// Reads events until stderr contains `needle`.
    pub async fn wait_stderr(&mut self, needle: &str, seen: &mut Outcome) {
        self.wait_until(needle, seen, |o| o.stderr().contains(needle))
            .await
    }

    pub async fn send(&self, kind: pb::turn_request::Kind) {
        let _ = self.tx.send(pb::TurnRequest { kind: Some(kind) }).await;
    }

    pub async fn stdin(&self, data: &[u8]) {
        self.send(pb::turn_request::Kind::Stdin(
            bytes::Bytes::copy_from_slice(data),
        ))
        .await;
    }

    pub async fn close_stdin(&self) {
        self.send(pb::turn_request::Kind::StdinEof(pb::StdinEof {}))
            .await;
    }

    pub async fn signal(&self, sig: pb::signal_request::Signal) {
        self.send(pb::turn_request::Kind::Signal(pb::SignalRequest {
            signal: sig as i32,
        }))
        .await;
    }

    /// Reads events until stdout contains `needle`; returns what was read.
    pub async fn wait_stdout(&mut self, needle: &str, seen: &mut Outcome) {
        self.wait_until(needle, seen, |o| o.stdout().contains(needle))
            .await
    }

    /// Reads events into `seen` until `done` holds; the turn must not end
    /// first.
    async fn wait_until(
        &mut self,
        what: &str,
        seen: &mut Outcome,
        done: impl Fn(&Outcome) -> bool,
    ) {
        while !done(seen) {
            let ev = self
                .events
                .next()
                .await
                .unwrap_or_else(|| panic!("stream ended before {what:?}; so far {seen:?}"))
                .expect("event");
            record(seen, ev);
            assert!(
                seen.exited.is_none(),
                "turn ended before {what:?}: {seen:?}"
            );
        }
    }

    /// Reads every remaining event.
    pub async fn collect(mut self) -> Outcome {
        let mut o = Outcome::default();
        self.collect_into(&mut o).await;
        o
    }

    pub async fn collect_into(&mut self, o: &mut Outcome) {
        while let Some(ev) = self.events.next().await {
            record(o, ev.expect("event"));
        }
        assert_eq!(
            o.order.last(),
            Some(&"exited"),
            "exited must be the last event: {:?}",
            o.order
        );
        assert_eq!(
            o.order.iter().filter(|k| **k == "exited").count(),
            1,
            "exactly one exited"
        );
    }
}

pub fn record(o: &mut Outcome, ev: pb::TurnEvent) {
    if ev.seq != 0 {
        o.seqs.push(ev.seq);
    }
    match ev.kind {
        Some(pb::turn_event::Kind::Started(s)) => {
            o.order.push("started");
            o.started = Some(s);
        }
        Some(pb::turn_event::Kind::Stdout(b)) => {
            o.order.push("stdout");
            o.stdout.extend_from_slice(&b);
        }
        Some(pb::turn_event::Kind::Stderr(b)) => {
            o.order.push("stderr");
            o.stderr.extend_from_slice(&b);
        }
        Some(pb::turn_event::Kind::Exited(e)) => {
            o.order.push("exited");
            o.exited = Some(e);
        }
        Some(pb::turn_event::Kind::Llm(_)) => o.order.push("llm"),
        Some(pb::turn_event::Kind::LlmRequest(_)) => o.order.push("llm_request"),
        Some(pb::turn_event::Kind::Notice(n)) => {
            o.order.push("notice");
            o.notices.push(n.message);
        }
        None => o.order.push("empty"),
    }
}

/// Host pids whose command line contains `token`.
pub fn pids_with(token: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .contains(token)
                })
                .unwrap_or(false)
        })
        .collect()
}

/// Names in a directory (empty if it does not exist).
pub fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A unique token for process searches.
pub fn token() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(1);
    format!(
        "{}.{}{}",
        1000 + N.fetch_add(1, Ordering::Relaxed),
        std::process::id() % 1000,
        N.load(Ordering::Relaxed)
    )
}

/// The `turnstile` binary running `serve` as a child process.
pub struct Daemon {
    pub child: std::process::Child,
    pub socket: PathBuf,
    pub state: PathBuf,
    log: std::sync::mpsc::Receiver<String>,
}

impl Daemon {
    pub fn spawn(mode: Mode, dir: &Path, env: &[(&str, &str)]) -> Daemon {
        Daemon::spawn_at(mode, &dir.join("state"), &dir.join("daemon.sock"), env)
    }

    pub fn spawn_at(mode: Mode, state: &Path, socket: &Path, env: &[(&str, &str)]) -> Daemon {
        Daemon::spawn_args(mode, state, socket, &[], env)
    }

    /// [`Daemon::spawn_at`] with more `serve` arguments.
    pub fn spawn_args(
        mode: Mode,
        state: &Path,
        socket: &Path,
        args: &[&std::ffi::OsStr],
        env: &[(&str, &str)],
    ) -> Daemon {
        require_root();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_turnstile"));
        cmd.arg("serve")
            .arg("--state-dir")
            .arg(state)
            .arg("--socket")
            .arg(socket)
            .arg("--mode")
            .arg(mode.as_str())
            .arg("--shim")
            .arg(shim())
            .arg("--jail-config")
            .arg(workspace().join("jail-configs/agent.cfg"))
            .arg("--kill-grace-ms")
            .arg("300")
            .arg("--detach-grace-ms")
            .arg("0")
            .env("TURNSTILE_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        if mode == Mode::Nsjail {
            cmd.arg("--nsjail").arg(nsjail());
        }
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn turnstile serve");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, log) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                eprintln!("[daemon] {line}");
                let _ = tx.send(line);
            }
        });
        Daemon {
            child,
            socket: socket.to_path_buf(),
            state: state.to_path_buf(),
            log,
        }
    }

    /// Waits for a log line containing `needle`; the lines read on the way
    /// are returned.
    pub fn wait_log(&self, needle: &str) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            match self.log.recv() {
                Ok(line) => {
                    let hit = line.contains(needle);
                    seen.push(line);
                    if hit {
                        return seen;
                    }
                }
                Err(_) => panic!("daemon log ended before {needle:?}: {seen:#?}"),
            }
        }
    }

    /// Waits until the daemon listens, then connects.
    pub async fn ready(&mut self) -> BrokerClient<Channel> {
        let _ = self.wait_log("listening");
        client(&self.socket).await
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig)
            .expect("signal daemon");
    }

    /// Stops the daemon (SIGTERM), waits for it, and returns every line it
    /// logged that no `wait_log` took.
    pub async fn stop_and_log(mut self) -> Vec<String> {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let log = std::mem::replace(&mut self.log, std::sync::mpsc::channel().1);
        let status = self.wait().await;
        assert!(status.success(), "daemon: {status:?}");
        // The reader thread ends at the daemon's EOF.
        tokio::task::spawn_blocking(move || log.iter().collect())
            .await
            .expect("join")
    }

    pub async fn wait(mut self) -> std::process::ExitStatus {
        tokio::task::spawn_blocking(move || self.child.wait().expect("wait"))
            .await
            .expect("join")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        drop(Unmount(self.state.clone()));
    }
}
