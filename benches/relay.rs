//! Stdout relay throughput, agent → executor over the turn's gRPC stream
//! (unix socket), against a raw pipe read measured in the same run (the same
//! `head -c` writer read straight from its stdout pipe). Goal: ≥ 1 GB/s.
//!
//! Reproduce: `sudo cargo bench -p turnstile-benches --bench relay`. The
//! REPORT lines give GB/s for both and their ratio.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use turnstile_benches::{Served, drain, runtime};
use turnstile_broker::config::Mode;

const BYTES: u64 = 256 << 20;

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn benches(c: &mut Criterion) {
    let rt = runtime();
    let count = format!("{BYTES}");
    for mode in [Mode::Direct, Mode::Nsjail] {
        let mut served = rt.block_on(Served::start(mode));
        let relay = Arc::new(Mutex::new(Vec::new()));
        let raw = Arc::new(Mutex::new(Vec::new()));
        let mut group = c.benchmark_group(format!("relay/{}", mode.as_str()));
        group
            .throughput(Throughput::Bytes(BYTES))
            .sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(8));
        group.bench_function("broker", |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let (_, tx, events) = served
                            .start_turn("relay", &["/usr/bin/head", "-c", &count, "/dev/zero"])
                            .await;
                        drop(tx);
                        let t0 = Instant::now();
                        let n = drain(events).await;
                        let d = t0.elapsed();
                        assert_eq!(n, BYTES);
                        relay.lock().expect("samples").push(d);
                        total += d;
                    }
                    total
                })
            })
        });
        group.bench_function("raw_pipe", |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let mut child = tokio::process::Command::new("/usr/bin/head")
                            .args(["-c", &count, "/dev/zero"])
                            .stdout(std::process::Stdio::piped())
                            .spawn()
                            .expect("spawn");
                        let mut out = child.stdout.take().expect("stdout");
                        let t0 = Instant::now();
                        let mut buf = vec![0u8; 256 * 1024];
                        let mut n = 0u64;
                        loop {
                            let r = out.read(&mut buf).await.expect("read");
                            if r == 0 {
                                break;
                            }
                            n += r as u64;
                        }
                        let d = t0.elapsed();
                        child.wait().await.expect("wait");
                        assert_eq!(n, BYTES);
                        raw.lock().expect("samples").push(d);
                        total += d;
                    }
                    total
                })
            })
        });
        group.finish();
        let med = |v: &Arc<Mutex<Vec<Duration>>>| {
            turnstile_benches::percentile(&v.lock().expect("samples"), 0.5)
        };
        let (r, p) = (med(&relay), med(&raw));
        println!(
            "REPORT relay/{}: broker {:.2} GB/s (p50) | raw pipe {:.2} GB/s | ratio {:.2}x",
            mode.as_str(),
            gbps(BYTES, r),
            gbps(BYTES, p),
            gbps(BYTES, r) / gbps(BYTES, p).max(1e-9)
        );
        served.stop();
    }
}

criterion_group!(relay, benches);
criterion_main!(relay);
