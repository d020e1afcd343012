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
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use turnstile_benches::{Served, drain, nsjail, report, runtime, shim, workspace};
use turnstile_broker::config::Mode;
use turnstile_broker::jail;
use turnstile_broker::sys::ChildSetup;
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
                turn_dir: turn.clone(),
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
        let (parent, child) = turnstile_broker::sys::socketpair().expect("socketpair");
        let payload = std::fs::File::open(&self.payload).expect("payload");
        let mut setup = ChildSetup {
            fds: vec![(payload.into(), 3), (child, 4)],
            cgroup_procs: vec![],
        };
        // nsjail's log pipe: its read end stays open until nsjail exits.
        let mut log_read = None;
        let mut cmd = match self.mode {
            Mode::Nsjail => {
                let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
                log_read = Some(r);
                setup.fds.push((w, jail::LOG_FD));
                let mut c = tokio::process::Command::new(nsjail());
                c.arg("--config").arg(&self.config);
                c
            }
            Mode::Direct => {
                let mut c = tokio::process::Command::new(shim());
                c.arg("--max-payload")
                    .arg(turnstile_shim::DEFAULT_MAX_PAYLOAD.to_string());
                c
            }
        };
        cmd.env_clear().stdin(std::process::Stdio::null());
        setup.install(&mut cmd);
        let mut proc = cmd.spawn().expect("spawn");
        drop(cmd);
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

fn bench_mode(c: &mut Criterion, rt: &tokio::runtime::Runtime, mode: Mode) {
    let name = mode.as_str();
    let mut served = rt.block_on(Served::start(mode));
    let raw = Raw::new(mode);
    let broker_samples = Arc::new(Mutex::new(Vec::new()));
    let raw_samples = Arc::new(Mutex::new(Vec::new()));
    let mut group = c.benchmark_group(format!("turn_start/{name}"));
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(6));
    let mut n = 0u64;
    group.bench_function("broker", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    n += 1;
                    let (d, tx, events) = served
                        .start_turn(&format!("b{}", n % 8), &["/bin/true"])
                        .await;
                    drop(tx);
                    drain(events).await;
                    broker_samples.lock().expect("samples").push(d);
                    total += d;
                }
                total
            })
        })
    });
    group.bench_function("raw", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let d = raw.once().await;
                    raw_samples.lock().expect("samples").push(d);
                    total += d;
                }
                total
            })
        })
    });
    group.finish();
    let b = broker_samples.lock().expect("samples").clone();
    let r = raw_samples.lock().expect("samples").clone();
    report(&format!("turn_start/{name} broker"), &b, Some(("raw", &r)));
    served.stop();
}

fn benches(c: &mut Criterion) {
    let rt = runtime();
    bench_mode(c, &rt, Mode::Nsjail);
    bench_mode(c, &rt, Mode::Direct);
    let _ = Path::new("/");
}

criterion_group!(turn_start, benches);
criterion_main!(turn_start);
