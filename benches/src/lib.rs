//! Shared parts of the benchmarks: a real broker on a temp socket, a turn
//! driver, and percentile reports against a baseline measured in the same run.
//! Benchmarks need root and the repository's nsjail and static shim, like the
//! integration suite; they fail with what is missing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;
use turnstile_broker::config::{CgroupPolicy, Config, Limits, Mode};
use turnstile_broker::{Broker, server};
use turnstile_proto::v1 as pb;

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

pub fn shim() -> PathBuf {
    let p = std::env::var_os("TURNSTILE_SHIM")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/x86_64-unknown-linux-gnu/shim/turnstile-shim"));
    assert!(
        p.is_file(),
        "MISSING: static shim {} (scripts/build-shim.sh)",
        p.display()
    );
    p
}

pub fn nsjail() -> PathBuf {
    let p = std::env::var_os("TURNSTILE_NSJAIL")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".tools/bin/nsjail"));
    assert!(
        p.exists(),
        "MISSING: nsjail {} (scripts/setup-nsjail.sh)",
        p.display()
    );
    p
}

/// A broker served in-process, and a connected client.
pub struct Served {
    pub broker: Arc<Broker>,
    pub client: pb::broker_client::BrokerClient<tonic::transport::Channel>,
    stop: Option<oneshot::Sender<()>>,
    /// Declared before `dir`: unmounts before the dir goes.
    _mounts: Unmount,
    pub dir: tempfile::TempDir,
}

/// Unmounts, when dropped, whatever is still mounted below a dir (the
/// session disk images and ready spares of a broker the bench did not wait
/// for), deepest first, so that the temp dir above it can go.
pub struct Unmount(pub PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        turnstile_broker::volume::unmount_all_below(&self.0);
    }
}

impl Served {
    pub async fn start(mode: Mode) -> Served {
        Served::start_with(mode, |_| {}).await
    }

    /// A broker whose config `tweak` adjusts first.
    pub async fn start_with(mode: Mode, tweak: impl FnOnce(&mut Config)) -> Served {
        Served::start_in_fleet(mode, None, tweak).await
    }

    /// A broker in fleet mode when `fleet` is given (opened by the caller).
    pub async fn start_in_fleet(
        mode: Mode,
        fleet: Option<Arc<dyn turnstile_broker::fleet::Fleet>>,
        tweak: impl FnOnce(&mut Config),
    ) -> Served {
        use std::os::unix::fs::PermissionsExt;
        assert!(
            nix::unistd::geteuid().is_root(),
            "MISSING: root (benchmarks run jails)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
            .expect("chmod");
        let socket = dir.path().join("b.sock");
        let mut cfg = Config {
            state_dir: dir.path().join("state"),
            socket: Some(socket.clone()),
            mode,
            shim: shim(),
            nsjail: if mode == Mode::Nsjail {
                nsjail()
            } else {
                "nsjail".into()
            },
            jail_config: workspace().join("jail-configs/agent.cfg"),
            // TURNSTILE_BENCH_CGROUPS=off measures the cost of per-turn cgroups.
            cgroups: if std::env::var("TURNSTILE_BENCH_CGROUPS").as_deref() == Ok("off") {
                CgroupPolicy::Off
            } else {
                CgroupPolicy::Required
            },
            default_limits: Limits {
                wall_time_ms: Some(600_000),
                ..Limits::unlimited()
            },
            // TURNSTILE_BENCH_WARM=N sets the ready launchers (0: none).
            warm_spares: std::env::var("TURNSTILE_BENCH_WARM")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(Config::default().warm_spares),
            ..Config::default()
        };
        tweak(&mut cfg);
        let broker = Broker::with_fleet(cfg, fleet).expect("broker");
        let listener = server::bind_unix(&socket).expect("bind");
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(server::serve(broker.clone(), vec![listener], async {
            let _ = stopped.await;
        }));
        let channel = turnstile_client::connect_unix(socket)
            .await
            .expect("connect");
        let client =
            pb::broker_client::BrokerClient::new(channel).max_decoding_message_size(64 << 20);
        Served {
            _mounts: Unmount(dir.path().to_path_buf()),
            dir,
            broker,
            client,
            stop: Some(stop),
        }
    }

    /// Starts a turn; returns the time to `Started` and the open turn.
    pub async fn start_turn(
        &mut self,
        session: &str,
        argv: &[&str],
    ) -> (
        Duration,
        mpsc::Sender<pb::TurnRequest>,
        tonic::Streaming<pb::TurnEvent>,
    ) {
        let start = pb::Start {
            session_id: session.to_string(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        self.start_turn_with(start).await
    }

    /// Starts a turn from a whole `Start`; returns the time to `Started`
    /// and the open turn.
    pub async fn start_turn_with(
        &mut self,
        start: pb::Start,
    ) -> (
        Duration,
        mpsc::Sender<pb::TurnRequest>,
        tonic::Streaming<pb::TurnEvent>,
    ) {
        let t0 = Instant::now();
        let (tx, mut events) = self.open(pb::turn_request::Kind::Start(start)).await;
        match events.next().await {
            Some(Ok(pb::TurnEvent {
                kind: Some(pb::turn_event::Kind::Started(_)),
                ..
            })) => {}
            other => panic!("expected started, got {other:?}"),
        }
        (t0.elapsed(), tx, events)
    }

    /// Opens a `Turn` stream whose first request is `first`.
    pub async fn open(
        &mut self,
        first: pb::turn_request::Kind,
    ) -> (
        mpsc::Sender<pb::TurnRequest>,
        tonic::Streaming<pb::TurnEvent>,
    ) {
        let (tx, rx) = mpsc::channel(4);
        tx.send(pb::TurnRequest { kind: Some(first) })
            .await
            .expect("send");
        let events = self
            .client
            .turn(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("admitted")
            .into_inner();
        (tx, events)
    }

    pub fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Drains a turn to its `Exited`; returns the stdout byte count.
pub async fn drain(mut events: tonic::Streaming<pb::TurnEvent>) -> u64 {
    let mut n = 0u64;
    while let Some(ev) = events.next().await {
        match ev.expect("event").kind {
            Some(pb::turn_event::Kind::Stdout(b)) => n += b.len() as u64,
            Some(pb::turn_event::Kind::Exited(e)) => {
                assert_eq!(
                    e.reason,
                    pb::exited::Reason::Exited as i32,
                    "turn failed: {e:?}"
                );
            }
            _ => {}
        }
    }
    n
}

pub fn percentile(samples: &[Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let mut s = samples.to_vec();
    s.sort();
    let idx = ((s.len() - 1) as f64 * p).round() as usize;
    s[idx]
}

/// Prints p50/p90 of a measurement and its baseline, and their ratio.
pub fn report(name: &str, measured: &[Duration], baseline: Option<(&str, &[Duration])>) {
    let (p50, p90) = (percentile(measured, 0.5), percentile(measured, 0.9));
    print!(
        "REPORT {name}: n={} p50={:.3} ms p90={:.3} ms",
        measured.len(),
        p50.as_secs_f64() * 1e3,
        p90.as_secs_f64() * 1e3
    );
    if let Some((bname, b)) = baseline {
        let (b50, b90) = (percentile(b, 0.5), percentile(b, 0.9));
        print!(
            " | {bname}: p50={:.3} ms p90={:.3} ms | ratio p50={:.2}x p90={:.2}x",
            b50.as_secs_f64() * 1e3,
            b90.as_secs_f64() * 1e3,
            p50.as_secs_f64() / b50.as_secs_f64().max(1e-9),
            p90.as_secs_f64() / b90.as_secs_f64().max(1e-9)
        );
    }
    println!();
}

/// A multi-thread runtime for a benchmark.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}
