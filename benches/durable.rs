//! Durable turns.
//!
//! - Reattach: a new stream's `Attach` → its first replayed event, against a
//!   unary RPC (`GetSession`) on the same channel measured in the same run.
//!   Goal: p50 ≤ 5 ms.
//! - The journal's cost on the stdout relay: 256 MiB through a broker with
//!   the journal on (the default cap) against one with it off
//!   (`journal_max_bytes = 0`), in the same run. Goal: ≥ 0.9× the throughput.
//!
//! Reproduce: `sudo cargo bench -p turnstile-benches --bench durable`;
//! `TURNSTILE_BENCH_MODES=direct` (or `nsjail`) runs one mode.

use criterion::{Criterion, criterion_group, criterion_main};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use turnstile_benches::{Served, drain, report, runtime};
use turnstile_broker::config::Mode;
use turnstile_proto::v1 as pb;

const BYTES: u64 = 256 << 20;
const REATTACHES: usize = 200;

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

/// Opens a stream with `attach` first; the time to its first event.
async fn reattach(
    served: &mut Served,
    attach: pb::Attach,
) -> (
    Duration,
    mpsc::Sender<pb::TurnRequest>,
    tonic::Streaming<pb::TurnEvent>,
) {
    let t0 = Instant::now();
    let (tx, mut events) = served.open(pb::turn_request::Kind::Attach(attach)).await;
    let first = events.next().await;
    let d = t0.elapsed();
    assert!(matches!(first, Some(Ok(_))), "{first:?}");
    (d, tx, events)
}

fn reattach_latency(mode: Mode) {
    let rt = runtime();
    rt.block_on(async {
        let mut served = Served::start(mode).await;
        let start = pb::Start {
            session_id: "reattach".into(),
            argv: vec!["/bin/sh".into(), "-c".into(), "echo ready; read x".into()],
            turn_key: "bench".into(),
            detach_grace_ms: Some(60_000),
            ..Default::default()
        };
        let (_, mut tx, mut events) = served.start_turn_with(start).await;
        // Up to the agent's line: the last seq there is.
        let mut last = 1;
        while let Some(Ok(ev)) = events.next().await {
            last = ev.seq;
            if matches!(ev.kind, Some(pb::turn_event::Kind::Stdout(_))) {
                break;
            }
        }
        let mut attaches = Vec::with_capacity(REATTACHES);
        let mut unary = Vec::with_capacity(REATTACHES);
        for _ in 0..REATTACHES {
            let attach = pb::Attach {
                session_id: "reattach".into(),
                turn_key: "bench".into(),
                after_seq: last - 1,
                ..Default::default()
            };
            let (d, t, e) = reattach(&mut served, attach).await;
            attaches.push(d);
            (tx, events) = (t, e);
            let t0 = Instant::now();
            served
                .client
                .get_session(pb::SessionRef {
                    session_id: "reattach".into(),
                })
                .await
                .expect("session");
            unary.push(t0.elapsed());
        }
        report(
            &format!("durable/{} reattach → first replayed event", mode.as_str()),
            &attaches,
            Some(("GetSession", &unary)),
        );
        tx.send(pb::TurnRequest {
            kind: Some(pb::turn_request::Kind::StdinEof(pb::StdinEof {})),
        })
        .await
        .expect("eof");
        drain(events).await;
        served.stop();
    });
}

fn journal_cost(c: &mut Criterion, mode: Mode) {
    let rt = runtime();
    let count = format!("{BYTES}");
    let mut on = rt.block_on(Served::start(mode));
    let mut off = rt.block_on(Served::start_with(mode, |cfg| cfg.journal_max_bytes = 0));
    let mut samples = [Vec::new(), Vec::new()];
    let mut group = c.benchmark_group(format!("durable/{}", mode.as_str()));
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8));
    for (i, (name, served)) in [("journal_on", &mut on), ("journal_off", &mut off)]
        .into_iter()
        .enumerate()
    {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let (_, tx, events) = served
                            .start_turn("relay", &["/usr/bin/head", "-c", &count, "/dev/zero"])
                            .await;
                        let t0 = Instant::now();
                        let n = drain(events).await;
                        let d = t0.elapsed();
                        drop(tx);
                        assert_eq!(n, BYTES);
                        samples[i].push(d);
                        total += d;
                    }
                    total
                })
            })
        });
    }
    group.finish();
    let p50 = |v: &[Duration]| turnstile_benches::percentile(v, 0.5);
    let (j, n) = (gbps(BYTES, p50(&samples[0])), gbps(BYTES, p50(&samples[1])));
    println!(
        "REPORT durable/{} stdout relay: journal on {j:.2} GB/s (p50) | off {n:.2} GB/s | ratio {:.2}x",
        mode.as_str(),
        j / n.max(1e-9)
    );
    on.stop();
    off.stop();
}

fn benches(c: &mut Criterion) {
    let modes = std::env::var("TURNSTILE_BENCH_MODES").unwrap_or_default();
    for mode in [Mode::Direct, Mode::Nsjail] {
        if modes.is_empty() || modes.split(',').any(|m| m == mode.as_str()) {
            reattach_latency(mode);
            journal_cost(c, mode);
        }
    }
}

criterion_group!(durable, benches);
criterion_main!(durable);
