//! The shim's footprint: size on disk and peak RSS (VmHWM of the shim process
//! while its agent runs, direct mode), and the time of a direct-mode turn
//! that runs `/bin/true` end to end. Goals: ≤ 1.5 MB on disk, ≤ 1.5 MB RSS.
//!
//! Reproduce: `sudo cargo bench -p turnstile-benches --bench shim`.

use criterion::{Criterion, criterion_group, criterion_main};
use std::time::Duration;
use tokio_stream::StreamExt;
use turnstile_benches::{Served, drain, runtime, shim};
use turnstile_broker::config::Mode;
use turnstile_proto::v1 as pb;

fn vm_hwm_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn benches(c: &mut Criterion) {
    let rt = runtime();
    let path = shim();
    let size = std::fs::metadata(&path).expect("shim").len();
    let mut served = rt.block_on(Served::start(Mode::Direct));
    // Peak RSS: the shim is the broker's child whose exe is the shim binary.
    let rss = rt.block_on(async {
        let (_, tx, mut events) = served.start_turn("rss", &["/bin/cat"]).await;
        let me = std::process::id() as i32;
        let canonical = std::fs::canonicalize(&path).expect("canonical");
        let pid = turnstile_broker::process::children_of(me)
            .into_iter()
            .find(|p| {
                std::fs::read_link(format!("/proc/{p}/exe")).ok().as_deref()
                    == Some(canonical.as_path())
            })
            .expect("the shim process");
        let hwm = vm_hwm_kib(pid).expect("VmHWM");
        tx.send(pb::TurnRequest {
            kind: Some(pb::turn_request::Kind::StdinEof(pb::StdinEof {})),
        })
        .await
        .expect("eof");
        while events.next().await.is_some() {}
        hwm
    });
    println!(
        "REPORT shim: {:.2} MB on disk ({size} bytes), peak RSS {:.2} MB ({rss} KiB)",
        size as f64 / 1e6,
        rss as f64 * 1024.0 / 1e6
    );
    let mut group = c.benchmark_group("shim");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    group.bench_function("direct_turn_true", |b| {
        b.iter(|| {
            rt.block_on(async {
                let (_, tx, events) = served.start_turn("t", &["/bin/true"]).await;
                drop(tx);
                drain(events).await
            })
        })
    });
    group.finish();
    served.stop();
}

criterion_group!(shim_footprint, benches);
criterion_main!(shim_footprint);
