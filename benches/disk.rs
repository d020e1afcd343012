//! Cost of session disk limits (broker/src/disk.rs, broker/src/volume.rs):
//! the backend `auto` picks on this host (`image` as root with loop devices)
//! against a broker with limits and the reserve off.
//!
//! - Turn start, `Start` sent → `Started` received, with a disk limit and
//!   the free-space reserve on, against a broker with both off measured in
//!   the same run, samples taken in pairs. Goal: p50 ≤ +1 ms.
//! - A write-heavy agent, `head -c 256 MiB /dev/zero > f` in its work dir,
//!   `Started` → `Exited`, in a session with a limit (walked while it runs)
//!   against the same agent with limit and reserve off, in a session of 0 and
//!   of 10 000 files (the walk's cost grows with the tree). Goal: ≤ 5 % on
//!   the agent's throughput.
//!
//! Reproduce: `sudo cargo bench -p turnstile-benches --bench disk` (after
//! scripts/setup-nsjail.sh and scripts/build-shim.sh);
//! `TURNSTILE_BENCH_MODES=direct` runs one mode. REPORT lines carry p50/p90.

use criterion::{Criterion, criterion_group, criterion_main};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use turnstile_benches::{Served, drain, report, runtime};
use turnstile_broker::config::Mode;
use turnstile_proto::v1 as pb;

const WRITE_BYTES: u64 = 256 << 20;
const TREE_FILES: usize = 10_000;

fn start(session: &str, script: &str, limited: bool) -> pb::Start {
    pb::Start {
        session_id: session.to_string(),
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        limits: limited.then(|| pb::Limits {
            disk_bytes: 100 << 30,
            disk_inodes: 10_000_000,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A broker with disk limits and the reserve off (`limited` false) or on.
async fn served(mode: Mode, limited: bool) -> Served {
    let s = Served::start_with(mode, |cfg| {
        if limited {
            // The limit the turns ask for is the default: new sessions
            // can take a ready image.
            cfg.default_limits.disk_bytes = Some(100 << 30);
            cfg.default_limits.disk_inodes = Some(10_000_000);
        } else {
            cfg.disk_reserve_bytes = Some(0);
        }
    })
    .await;
    if let Some(w) = &s.broker.warm {
        w.wait_ready(s.broker.config.warm_spares).await;
    }
    s
}

async fn start_once(s: &mut Served, limited: bool, n: u64) -> Duration {
    let (d, tx, events) = s
        .start_turn_with(start(&format!("s{}", n % 8), "true", limited))
        .await;
    drop(tx);
    drain(events).await;
    d
}

/// `Started` → `Exited` of the writer.
async fn write_once(s: &mut Served, session: &str, limited: bool) -> Duration {
    let script = format!("head -c {WRITE_BYTES} /dev/zero > big && rm big");
    let (_, tx, events) = s.start_turn_with(start(session, &script, limited)).await;
    let t0 = Instant::now();
    drop(tx);
    drain(events).await;
    t0.elapsed()
}

/// Gives `session` a work dir of `files` small files.
async fn tree(s: &mut Served, session: &str, files: usize) {
    let (_, tx, events) = s.start_turn_with(start(session, "true", false)).await;
    drop(tx);
    drain(events).await;
    let work = s.broker.sessions.paths(session).work;
    for i in 0..files {
        let dir = work.join(format!("d{}", i / 100));
        if i.is_multiple_of(100) {
            std::fs::create_dir(&dir).expect("mkdir");
        }
        std::fs::write(dir.join(format!("f{i}")), b"0123456789").expect("file");
    }
}

fn bench_mode(c: &mut Criterion, rt: &tokio::runtime::Runtime, mode: Mode) {
    let name = mode.as_str();
    // TURNSTILE_BENCH_DISK_AA=1: both brokers off, turn start only (the
    // noise floor of the comparison).
    let aa = std::env::var("TURNSTILE_BENCH_DISK_AA").as_deref() == Ok("1");
    let mut off = rt.block_on(served(mode, false));
    let mut on = rt.block_on(served(mode, !aa));
    let (on_samples, off_samples) = (
        Arc::new(Mutex::new(Vec::new())),
        Arc::new(Mutex::new(Vec::new())),
    );
    let mut group = c.benchmark_group(format!("disk/{name}"));
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(6));
    let mut n = 0u64;
    group.bench_function("turn_start", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    n += 1;
                    // Alternating which goes first (a broker's spare refill
                    // runs during the other's start).
                    let (d, r) = if n.is_multiple_of(2) {
                        let d = start_once(&mut on, !aa, n).await;
                        (d, start_once(&mut off, false, n).await)
                    } else {
                        let r = start_once(&mut off, false, n).await;
                        (start_once(&mut on, !aa, n).await, r)
                    };
                    total += d;
                    on_samples.lock().expect("samples").push(d);
                    off_samples.lock().expect("samples").push(r);
                }
                total
            })
        })
    });
    group.finish();
    let a = on_samples.lock().expect("samples").clone();
    let b = off_samples.lock().expect("samples").clone();
    report(
        &format!("disk/{name} turn start, limit and reserve on"),
        &a,
        Some(("off", &b)),
    );

    if aa {
        on.stop();
        off.stop();
        return;
    }
    // `cargo bench` passes --bench; the smoke run takes one sample.
    let samples: u32 = if std::env::args().any(|a| a == "--bench") {
        20
    } else {
        1
    };
    // A new session's first turn. On the image backend: with a ready image
    // (made ahead; waited for here) it is one rename on the start path;
    // with a limit other than the default, its image is made and mounted
    // on the start path (`mkfs.ext4`, `dumpe2fs`, `mount`).
    let backend = on.broker.disk.detected().backend;
    for (what, odd) in [("ready image", false), ("image made on start", true)] {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        rt.block_on(async {
            for i in 0..samples.max(2) * 2 {
                if let Some(spares) = on.broker.sessions.spares() {
                    let spares = spares.clone();
                    tokio::task::spawn_blocking(move || {
                        spares.wait_ready(1, Duration::from_secs(60))
                    })
                    .await
                    .expect("wait");
                }
                let mut st = start(&format!("first{odd}{i}"), "true", true);
                if odd && let Some(l) = st.limits.as_mut() {
                    l.disk_bytes = 50 << 30;
                }
                let (d, tx, events) = on.start_turn_with(st).await;
                drop(tx);
                drain(events).await;
                a.push(d);
                let st = start(&format!("first{odd}{i}"), "true", false);
                let (d, tx, events) = off.start_turn_with(st).await;
                drop(tx);
                drain(events).await;
                b.push(d);
            }
        });
        report(
            &format!("disk/{name} first turn of a new session ({backend}, {what})"),
            &a,
            Some(("off", &b)),
        );
    }
    for files in [0, TREE_FILES] {
        let session = format!("w{files}");
        rt.block_on(async {
            tree(&mut on, &session, files).await;
            tree(&mut off, &session, files).await;
        });
        let (mut a, mut b) = (Vec::new(), Vec::new());
        rt.block_on(async {
            // Alternating which goes first, so the writeback one leaves
            // behind weighs on both alike.
            for i in 0..samples {
                if i.is_multiple_of(2) {
                    a.push(write_once(&mut on, &session, true).await);
                    b.push(write_once(&mut off, &session, false).await);
                } else {
                    b.push(write_once(&mut off, &session, false).await);
                    a.push(write_once(&mut on, &session, true).await);
                }
            }
        });
        report(
            &format!(
                "disk/{name} write {} MiB, {files} files, watched",
                WRITE_BYTES >> 20
            ),
            &a,
            Some(("unwatched", &b)),
        );
        let mbps = |d: &[Duration]| {
            let p50 = turnstile_benches::percentile(d, 0.5).as_secs_f64();
            WRITE_BYTES as f64 / p50.max(1e-9) / 1e6
        };
        println!(
            "REPORT disk/{name} write throughput, {files} files: watched {:.0} MB/s, unwatched {:.0} MB/s ({:+.1} %)",
            mbps(&a),
            mbps(&b),
            (mbps(&a) / mbps(&b) - 1.0) * 100.0
        );
    }
    on.stop();
    off.stop();
}

fn benches(c: &mut Criterion) {
    let rt = runtime();
    let modes = std::env::var("TURNSTILE_BENCH_MODES").unwrap_or_default();
    for mode in [Mode::Nsjail, Mode::Direct] {
        if modes.is_empty() || modes.split(',').any(|m| m == mode.as_str()) {
            bench_mode(c, &rt, mode);
        }
    }
}

criterion_group!(disk, benches);
criterion_main!(disk);
