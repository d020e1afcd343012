//! Turn start latency: `Start` sent → `Started` received.
//!
//! - nsjail mode, against a raw nsjail spawn of the same work measured in the
//!   same run: `nsjail --config <the same rendered agent.cfg>` running the
//!   shim, with the payload on fd 3 and the control socket on fd 4, timed from
//!   spawn to the shim's `AgentStarted` (what `Started` waits for). Goal:
//!   broker p50 ≤ 1.15× raw.
//! - direct mode, against a raw spawn of the shim with the same handshake.
//!   Goal: broker p50 ≤ 2 ms.
//!
//! Reproduce: `sudo cargo bench -p turnstile-benches --bench turn_start`
//! (after scripts/setup-nsjail.sh and scripts/build-shim.sh). The REPORT lines
//! carry p50/p90 and the ratios.

use criterion::{Criterion, criterion_group, criterion_main};
use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use turnstile_benches::{Served, drain, nsjail, report, runtime, shim, workspace};
use turnstile_broker::config::Mode;
use turnstile_broker::jail;
use turnstile_broker::jail::spawn::{self, ChildSetup};
use turnstile_shim::{InitPayload, ShimMsg};

async fn frame(s: &mut tokio::net::UnixStream) -> ShimMsg {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.expect("frame length");
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).await.expect("frame body");
    turnstile_shim::decode_frame(&body).expect("frame")
}

/// The same work without the broker: spawn, handshake, agent started.
struct Raw {
    dir: tempfile::TempDir,
    mode: Mode,
    config: std::path::PathBuf,
    payload: std::path::PathBuf,
}

impl Raw {
    fn new(mode: Mode) -> Raw {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
            .expect("chmod");
        let (home, work, turn) = (
            dir.path().join("home"),
            dir.path().join("work"),
            dir.path().join("turn"),
        );
        for d in [&home, &work, &turn] {
            std::fs::create_dir(d).expect("mkdir");
        }
        std::fs::set_permissions(&turn, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        for d in [&home, &work] {
            std::os::unix::fs::chown(d, Some(100_000), Some(100_000)).expect("chown");
        }
        let (cwd, smode) = match mode {
            Mode::Nsjail => ("/work".to_string(), turnstile_shim::Mode::Nsjail),
            Mode::Direct => (
                work.to_string_lossy().into_owned(),
                turnstile_shim::Mode::Direct,
            ),
        };
        let payload = InitPayload {
            version: turnstile_shim::PROTOCOL_VERSION,
            mode: smode,
            session_id: "raw".into(),
            turn_id: "raw".into(),
            argv: vec!["/bin/true".into()],
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            cwd,
            rlimits: Default::default(),
            llm: None,
        };
        let payload_path = turn.join("init.msgpack");
        std::fs::write(&payload_path, payload.encode().expect("encode")).expect("payload");
        let profile =
            std::fs::read_to_string(workspace().join("jail-configs/agent.cfg")).expect("profile");
        let rendered = jail::render(
            &profile,
            &jail::JailTurn {
                home,
                work,
                shim: shim(),
                bundle_mounts: vec![],
                outside_uid: 100_000,
                outside_gid: 100_000,
                time_limit_s: 60,
                max_payload: turnstile_shim::DEFAULT_MAX_PAYLOAD,
            },
        );
        let config = turn.join("jail.cfg");
        std::fs::write(&config, rendered).expect("config");
        Raw {
            dir,
            mode,
            config,
            payload: payload_path,
        }
    }

    async fn once(&self) -> Duration {
        let _ = self.dir.path();
        let t0 = Instant::now();
        let (parent, child) = turnstile_broker::process::socketpair().expect("socketpair");
        let payload = std::fs::File::open(&self.payload).expect("payload");
        let mut setup = ChildSetup {
            fds: vec![(payload.into(), 3), (child, 4)],
            cgroup_procs: vec![],
        };
        // nsjail's log pipe: its read end stays open until nsjail exits.
        let mut log_read = None;
        let max_payload = turnstile_shim::DEFAULT_MAX_PAYLOAD.to_string();
        let (program, args): (PathBuf, Vec<&OsStr>) = match self.mode {
            Mode::Nsjail => {
                let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
                log_read = Some(r);
                setup.fds.push((w, jail::LOG_FD));
                // The turn dir, as the broker passes it (see jail::RUN_FD).
                let run_dir = std::fs::File::open(self.payload.parent().expect("turn dir"))
                    .expect("turn dir");
                setup.fds.push((run_dir.into(), jail::RUN_FD));
                (
                    nsjail(),
                    vec![OsStr::new("--config"), self.config.as_os_str()],
                )
            }
            Mode::Direct => (
                shim(),
                vec![OsStr::new("--max-payload"), OsStr::new(&max_payload)],
            ),
        };
        // The same spawn as the broker's (no fork: see turnstile_broker::jail::spawn).
        let mut proc = spawn::spawn(&program, &args, spawn::Stdio::Null, setup).expect("spawn");
        let std = std::os::unix::net::UnixStream::from(parent);
        std.set_nonblocking(true).expect("nonblocking");
        let mut ctl = tokio::net::UnixStream::from_std(std).expect("tokio");
        assert!(matches!(frame(&mut ctl).await, ShimMsg::Hello(_)));
        ctl.write_all(&[turnstile_shim::GO]).await.expect("go");
        assert!(matches!(
            frame(&mut ctl).await,
            ShimMsg::AgentStarted { .. }
        ));
        let elapsed = t0.elapsed();
        proc.wait().await.expect("wait");
        drop(log_read);
        elapsed
    }
}

/// One broker turn start (to `Started`), the turn then run to its end.
async fn broker_once(served: &mut Served, n: u64) -> Duration {
    let (d, tx, events) = served
        .start_turn(&format!("b{}", n % 8), &["/bin/true"])
        .await;
    drop(tx);
    drain(events).await;
    d
}

/// Broker and raw samples are taken in pairs, one right after the other,
/// so that whatever else the machine does weighs on both alike.
fn bench_mode(c: &mut Criterion, rt: &tokio::runtime::Runtime, mode: Mode) {
    let name = mode.as_str();
    let mut served = rt.block_on(Served::start(mode));
    if let Some(w) = &served.broker.warm {
        rt.block_on(w.wait_ready(served.broker.config.warm_spares));
    }
    let raw = Raw::new(mode);
    let broker_samples = Arc::new(Mutex::new(Vec::new()));
    let raw_samples = Arc::new(Mutex::new(Vec::new()));
    let mut group = c.benchmark_group(format!("turn_start/{name}"));
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(6));
    let mut n = 0u64;
    // Back to back: one turn right after the other.
    group.bench_function("broker", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    n += 1;
                    let d = broker_once(&mut served, n).await;
                    total += d;
                    broker_samples.lock().expect("samples").push(d);
                    let r = raw.once().await;
                    raw_samples.lock().expect("samples").push(r);
                }
                total
            })
        })
    });
    group.finish();
    let b = broker_samples.lock().expect("samples").clone();
    let r = raw_samples.lock().expect("samples").clone();
    report(
        &format!("turn_start/{name} broker (back to back)"),
        &b,
        Some(("raw", &r)),
    );

    // Spaced: turns SPACING apart, as in production, where turns arrive
    // seconds apart and the kernel's cgroup lock has gone cold between them.
    let (mut b, mut r) = (Vec::new(), Vec::new());
    // `cargo bench` passes --bench; the smoke run (`cargo test --benches`)
    // takes one sample.
    let samples = if std::env::args().any(|a| a == "--bench") {
        SPACED_SAMPLES
    } else {
        1
    };
    rt.block_on(async {
        for _ in 0..samples {
            n += 1;
            tokio::time::sleep(SPACING).await;
            b.push(broker_once(&mut served, n).await);
            tokio::time::sleep(SPACING).await;
            r.push(raw.once().await);
        }
    });
    report(
        &format!(
            "turn_start/{name} broker (spaced {} ms)",
            SPACING.as_millis()
        ),
        &b,
        Some(("raw", &r)),
    );
    served.stop();
}

const SPACING: Duration = Duration::from_millis(200);
const SPACED_SAMPLES: usize = 40;

fn benches(c: &mut Criterion) {
    let rt = runtime();
    // TURNSTILE_BENCH_MODES=direct (or nsjail) runs one mode only.
    let modes = std::env::var("TURNSTILE_BENCH_MODES").unwrap_or_default();
    for mode in [Mode::Nsjail, Mode::Direct] {
        if modes.is_empty() || modes.split(',').any(|m| m == mode.as_str()) {
            bench_mode(c, &rt, mode);
        }
    }
}

criterion_group!(turn_start, benches);
criterion_main!(turn_start);
