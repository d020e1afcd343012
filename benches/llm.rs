//! The LLM relay, measured by an agent: a python3 script inside the turn
//! talks HTTP to its bridge URL (`ANTHROPIC_BASE_URL`), so every figure
//! includes the shim's bridge, the broker, the turn's gRPC stream, the
//! executor's `turnstile_client` relay and its `LlmForwarder`. The baseline,
//! measured in the same run, is the same script run as a plain host process
//! talking straight to the same stand-in upstream (hyper on 127.0.0.1).
//!
//! - `small`: sequential 100-byte POSTs with a small answer on one keep-alive
//!   connection, each timed by the agent (`perf_counter_ns`). Goal: ≤ 0.5 ms
//!   added at p50.
//! - `sse`: the upstream stamps each server-sent event with its
//!   CLOCK_MONOTONIC send time; the agent subtracts it from its own
//!   `monotonic_ns()` on receipt (the same clock: nsjail makes no time
//!   namespace, and a negative or absurd latency fails the bench). Goal:
//!   ≤ 0.5 ms added at p50.
//! - `large`: one GET of a 256 MiB body; the agent times it from request to
//!   last byte. GB/s for both, and their ratio.
//!
//! Broker-side forwarding (`Start.llm_upstream`: the broker serves the
//! agent's connections itself with the same forwarder) is measured beside
//! the executor-side relay for `small` and `sse`, in the same run: `broker`
//! rows. Goal: no worse than the relay.
//!
//! Criterion's own figure per iteration is what the agent measured in one
//! run (the sum of its request times, of its event latencies, or its
//! transfer time), never the turn's or python's start-up. Under `--test`
//! (CI) every run is cut short.
//!
//! Reproduce: `sudo cargo bench -p turnstile-benches --bench llm` (after
//! scripts/setup-nsjail.sh and scripts/build-shim.sh). The REPORT lines carry
//! the figures and ratios.

use bytes::Bytes;
use criterion::measurement::WallTime;
use criterion::{
    BenchmarkGroup, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use nix::time::{ClockId, clock_gettime};
use std::convert::Infallible;
use std::time::Duration;
use turnstile_benches::{Served, percentile, report, runtime};
use turnstile_broker::config::Mode;
use turnstile_client::broker_side::BrokerUpstreams;
use turnstile_client::{CredentialHeader, ForwarderConfig, LlmForwarder, TlsRoots, Turn, pb};

/// The agent. argv: what (`small`, `sse`, `large`), base URL (`env`: the
/// bridge URL from `ANTHROPIC_BASE_URL`), then the figures of the test.
/// Prints the measurements as one line of integers (nanoseconds).
const AGENT: &str = r#"
import http.client, os, sys, time, urllib.parse
what, base = sys.argv[1], sys.argv[2]
u = urllib.parse.urlparse(os.environ["ANTHROPIC_BASE_URL"] if base == "env" else base)
c = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
if what == "small":
    n, body, out = int(sys.argv[3]), b"x" * int(sys.argv[4]), []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        c.request("POST", "/v1/small", body=body, headers={"content-type": "application/json"})
        r = c.getresponse()
        r.read()
        out.append(time.perf_counter_ns() - t0)
        assert r.status == 200, r.status
elif what == "sse":
    n, out = int(sys.argv[3]), []
    c.request("GET", "/v1/sse?n=%d&gap_us=%s" % (n, sys.argv[4]))
    r = c.getresponse()
    assert r.status == 200, r.status
    while len(out) < n:
        line = r.readline()
        if not line:
            break
        if line.startswith(b"data: "):
            out.append(time.monotonic_ns() - int(line[6:]))
else:
    n, got, buf = int(sys.argv[3]), 0, memoryview(bytearray(1 << 20))
    t0 = time.perf_counter_ns()
    c.request("GET", "/v1/large?bytes=%d" % n)
    r = c.getresponse()
    assert r.status == 200, r.status
    while True:
        k = r.readinto(buf)
        if not k:
            break
        got += k
    out = [got, time.perf_counter_ns() - t0]
print(*out, flush=True)
"#;

/// The interpreter, the same for the agent in the turn and on the host.
const PYTHON: &str = "/usr/bin/python3";

/// The figures of one run of each test.
#[derive(Clone, Copy)]
struct Sizes {
    /// Sequential small requests per agent run, and their body size.
    requests: usize,
    request_body: usize,
    /// Events per SSE response, and their spacing.
    events: usize,
    event_gap_us: u64,
    /// Leading requests or events of a run left out of the samples
    /// (connection set-up, cold caches).
    warm: usize,
    /// Bytes of the large response.
    large: u64,
}

const FULL: Sizes = Sizes {
    requests: 220,
    request_body: 100,
    events: 220,
    event_gap_us: 2000,
    warm: 20,
    large: 256 << 20,
};

/// `--test` (CI): every path once, in a few seconds.
const QUICK: Sizes = Sizes {
    requests: 25,
    request_body: 100,
    events: 25,
    event_gap_us: 2000,
    warm: 5,
    large: 16 << 20,
};

fn now_ns() -> i64 {
    let t = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    t.tv_sec() * 1_000_000_000 + t.tv_nsec()
}

// ---------------------------------------------------------------------------
// The stand-in upstream.

type Body = BoxBody<Bytes, Infallible>;

/// `name=value` from a query string.
fn query(req: &Request<Incoming>, name: &str) -> u64 {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("query parameter {name} in {}", req.uri()))
}

async fn handle(req: Request<Incoming>, block: Bytes) -> Response<Body> {
    match req.uri().path() {
        // Reads the body, answers a few bytes of JSON.
        "/v1/small" => {
            let body = req.into_body().collect().await.expect("body").to_bytes();
            let answer = format!("{{\"ok\":true,\"len\":{}}}", body.len());
            Response::new(Full::new(Bytes::from(answer)).boxed())
        }
        // `n` events `gap_us` apart, each `data: <CLOCK_MONOTONIC ns>`
        // stamped just before it is handed to hyper.
        "/v1/sse" => {
            let (n, gap) = (query(&req, "n"), query(&req, "gap_us"));
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
            tokio::spawn(async move {
                for i in 0..n {
                    if i > 0 {
                        tokio::time::sleep(Duration::from_micros(gap)).await;
                    }
                    let ev = format!("event: tick\ndata: {}\n\n", now_ns());
                    if tx.send(Ok(Frame::data(Bytes::from(ev)))).await.is_err() {
                        return;
                    }
                }
            });
            let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            let mut r = Response::new(BodyExt::boxed(body));
            r.headers_mut().insert(
                "content-type",
                hyper::header::HeaderValue::from_static("text/event-stream"),
            );
            r
        }
        // `bytes` bytes with a content-length, in 1 MiB frames of one
        // shared buffer.
        "/v1/large" => {
            let total = query(&req, "bytes");
            let step = block.len() as u64;
            let frames = (0..total.div_ceil(step)).map(move |i| {
                let len = step.min(total - i * step) as usize;
                Ok::<_, Infallible>(Frame::data(block.slice(..len)))
            });
            let body = StreamBody::new(tokio_stream::iter(frames));
            let mut r = Response::new(BodyExt::boxed(body));
            r.headers_mut()
                .insert(hyper::header::CONTENT_LENGTH, total.into());
            r
        }
        other => panic!("unexpected upstream path {other}"),
    }
}

/// Serves on 127.0.0.1:<ephemeral> until the runtime ends; returns its URL.
async fn upstream() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let port = listener.local_addr().expect("addr").port();
    let block = Bytes::from(vec![b'x'; 1 << 20]);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            // Like a real model API: events are not held back by Nagle.
            tcp.set_nodelay(true).expect("nodelay");
            let block = block.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let block = block.clone();
                    async move { Ok::<_, Infallible>(handle(req, block).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    format!("http://127.0.0.1:{port}")
}

// ---------------------------------------------------------------------------
// Running the agent.

/// Parses the agent's line of integers.
fn numbers(out: &str) -> Vec<i64> {
    out.split_whitespace()
        .map(|n| n.parse().unwrap_or_else(|_| panic!("agent output {out:?}")))
        .collect()
}

/// Runs the agent in a turn, its LLM connections served by `fwd` (on this
/// side), or by the broker when `fwd` is `None` (forwarding to `url`);
/// returns its stdout.
async fn in_turn(
    served: &mut Served,
    fwd: Option<&LlmForwarder>,
    url: &str,
    args: &[String],
) -> String {
    let mut argv = vec![PYTHON.to_string(), "-c".into(), AGENT.into()];
    argv.extend(args.iter().cloned());
    argv.insert(4, "env".into());
    let llm_upstream = fwd.is_none().then(|| pb::LlmUpstream {
        base_url: url.to_string(),
        credential: "sk-bench-not-a-key".into(),
        credential_header: pb::CredentialHeader::XApiKey as i32,
        max_request_bytes: 0,
    });
    let start = pb::Start {
        session_id: "llm-bench".into(),
        argv,
        llm_upstream,
        ..Default::default()
    };
    let mut turn = Turn::start(&mut served.client, start, fwd.cloned())
        .await
        .expect("turn admitted");
    turn.input().close_stdin().await.expect("stdin eof");
    let (mut out, mut err, mut exited) = (Vec::new(), Vec::new(), None);
    while let Some(ev) = turn.next().await {
        match ev.expect("turn event").kind {
            Some(pb::turn_event::Kind::Stdout(b)) => out.extend_from_slice(&b),
            Some(pb::turn_event::Kind::Stderr(b)) => err.extend_from_slice(&b),
            Some(pb::turn_event::Kind::Exited(e)) => exited = Some(e),
            _ => {}
        }
    }
    let e = exited.expect("the turn ended without Exited");
    assert!(
        e.reason == pb::exited::Reason::Exited as i32
            && e.status == Some(pb::exited::Status::ExitCode(0)),
        "agent failed in the turn: {e:?}\n{}",
        String::from_utf8_lossy(&err)
    );
    String::from_utf8(out).expect("agent output is text")
}

/// Runs the agent as a host process talking to `url` directly.
async fn on_host(url: &str, args: &[String]) -> String {
    let mut cmd = tokio::process::Command::new(PYTHON);
    cmd.arg("-c")
        .arg(AGENT)
        .arg(&args[0])
        .arg(url)
        .args(&args[1..])
        .env_clear()
        .stdin(std::process::Stdio::null());
    let o = cmd.output().await.expect("spawn python3");
    assert!(
        o.status.success(),
        "agent failed on the host: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).expect("agent output is text")
}

// ---------------------------------------------------------------------------
// The benchmarks.

/// Where the agent runs, and who forwards its requests.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    /// In a turn; the executor forwards (LLM frames over the turn stream).
    Relay,
    /// In a turn; the broker forwards (`Start.llm_upstream`).
    Broker,
    /// On the host, straight to the upstream.
    Host,
}

struct Bench<'a> {
    rt: &'a tokio::runtime::Runtime,
    served: Served,
    fwd: LlmForwarder,
    url: String,
}

impl Bench<'_> {
    /// One agent run; returns its numbers.
    fn run(&mut self, via: Via, args: &[String]) -> Vec<i64> {
        let out = match via {
            Via::Relay => {
                self.rt
                    .block_on(in_turn(&mut self.served, Some(&self.fwd), &self.url, args))
            }
            Via::Broker => self
                .rt
                .block_on(in_turn(&mut self.served, None, &self.url, args)),
            Via::Host => self.rt.block_on(on_host(&self.url, args)),
        };
        numbers(&out)
    }

    /// Benchmarks the agent run `args` both ways in `group`, one run per
    /// iteration: `per_run` turns a run's numbers into samples (pushed) and
    /// criterion's time for the run. Returns the (relay, host) samples.
    fn both(
        &mut self,
        group: &mut BenchmarkGroup<'_, WallTime>,
        args: &[String],
        per_run: impl Fn(&[i64], &mut Vec<Duration>) -> Duration + Copy,
    ) -> (Vec<Duration>, Vec<Duration>) {
        let (relay, _, host) = self.measure(group, args, false, per_run);
        (relay, host)
    }

    /// [`Bench::both`], and with `broker` the broker-side forwarding too:
    /// (relay, broker, host) samples.
    fn measure(
        &mut self,
        group: &mut BenchmarkGroup<'_, WallTime>,
        args: &[String],
        broker: bool,
        per_run: impl Fn(&[i64], &mut Vec<Duration>) -> Duration + Copy,
    ) -> (Vec<Duration>, Vec<Duration>, Vec<Duration>) {
        let mut samples = (Vec::new(), Vec::new(), Vec::new());
        let vias = [
            ("relay", Via::Relay),
            ("broker", Via::Broker),
            ("host", Via::Host),
        ];
        for (name, via) in vias {
            if via == Via::Broker && !broker {
                continue;
            }
            let mut collected = Vec::new();
            group.bench_function(name, |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let nums = self.run(via, args);
                        total += per_run(&nums, &mut collected);
                    }
                    total
                })
            });
            match via {
                Via::Relay => samples.0 = collected,
                Via::Broker => samples.1 = collected,
                Via::Host => samples.2 = collected,
            }
        }
        samples
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// p50/p90 of the relay against the host, and the p50 the relay adds
/// against the goal. Nothing when a filter left either side unmeasured.
fn latency(name: &str, relay: &[Duration], host: &[Duration], goal: Duration) {
    if relay.is_empty() || host.is_empty() {
        return;
    }
    report(name, relay, Some(("host direct", host)));
    let (r, h) = (percentile(relay, 0.5), percentile(host, 0.5));
    let add = r.saturating_sub(h);
    println!(
        "REPORT {name}: added p50={:.3} ms (relay {:.3} ms - host {:.3} ms) | goal <= {:.3} ms: {}",
        ms(add),
        ms(r),
        ms(h),
        ms(goal),
        if add <= goal { "met" } else { "NOT met" }
    );
}

/// Broker-side forwarding against the executor-side relay, same run: p50s,
/// what each adds over the host, and the goal (no worse than the relay).
fn versus(name: &str, broker: &[Duration], relay: &[Duration], host: &[Duration]) {
    if broker.is_empty() || relay.is_empty() || host.is_empty() {
        return;
    }
    report(
        &format!("{name} (broker-side)"),
        broker,
        Some(("relay", relay)),
    );
    let (b, r, h) = (
        percentile(broker, 0.5),
        percentile(relay, 0.5),
        percentile(host, 0.5),
    );
    println!(
        "REPORT {name}: broker-side p50={:.3} ms (adds {:.3} ms) | executor-side relay p50={:.3} ms (adds {:.3} ms) | host {:.3} ms | broker - relay = {:+.3} ms | goal no worse: {}",
        ms(b),
        ms(b.saturating_sub(h)),
        ms(r),
        ms(r.saturating_sub(h)),
        ms(h),
        (b.as_secs_f64() - r.as_secs_f64()) * 1e3,
        if b <= r { "met" } else { "NOT met" }
    );
}

fn bench_mode(c: &mut Criterion, rt: &tokio::runtime::Runtime, mode: Mode, sizes: Sizes) {
    let name = mode.as_str();
    let served = rt.block_on(Served::start(mode));
    served.broker.set_llm_upstreams(std::sync::Arc::new(
        BrokerUpstreams::new(TlsRoots::Bundled).expect("broker-side forwarder"),
    ));
    let url = rt.block_on(upstream());
    let fwd = LlmForwarder::new(ForwarderConfig::new(
        url.clone(),
        "sk-bench-not-a-key",
        CredentialHeader::XApiKey,
    ))
    .expect("forwarder");
    let mut bench = Bench {
        rt,
        served,
        fwd,
        url,
    };
    let s = sizes;
    let goal = Duration::from_micros(500);

    // Small requests.
    let mut group = c.benchmark_group(format!("llm/{name}/small"));
    group
        .sampling_mode(SamplingMode::Flat)
        .throughput(Throughput::Elements((s.requests - s.warm) as u64))
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    let args = [
        "small".to_string(),
        s.requests.to_string(),
        s.request_body.to_string(),
    ];
    let (relay, broker, host) = bench.measure(&mut group, &args, true, move |nums, out| {
        assert_eq!(nums.len(), s.requests, "request count");
        let kept: Vec<Duration> = nums[s.warm..]
            .iter()
            .map(|&ns| Duration::from_nanos(ns as u64))
            .collect();
        out.extend_from_slice(&kept);
        kept.iter().sum()
    });
    group.finish();
    latency(&format!("llm/{name} small request"), &relay, &host, goal);
    versus(&format!("llm/{name} small request"), &broker, &relay, &host);

    // Server-sent events.
    let mut group = c.benchmark_group(format!("llm/{name}/sse"));
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(100))
        .measurement_time(Duration::from_millis(500));
    let args = [
        "sse".to_string(),
        s.events.to_string(),
        s.event_gap_us.to_string(),
    ];
    let (relay, broker, host) = bench.measure(&mut group, &args, true, move |nums, out| {
        assert_eq!(nums.len(), s.events, "event count");
        let kept: Vec<Duration> = nums[s.warm..]
            .iter()
            .map(|&ns| {
                // Both stamps are CLOCK_MONOTONIC: a time namespace (or any
                // other clock) would show as a negative or absurd latency.
                assert!(
                    (0..10_000_000_000).contains(&ns),
                    "event latency {ns} ns: the agent's clock is not the upstream's"
                );
                Duration::from_nanos(ns as u64)
            })
            .collect();
        out.extend_from_slice(&kept);
        kept.iter().sum()
    });
    group.finish();
    latency(
        &format!("llm/{name} sse event latency"),
        &relay,
        &host,
        goal,
    );
    versus(
        &format!("llm/{name} sse event latency"),
        &broker,
        &relay,
        &host,
    );

    // Large response.
    let mut group = c.benchmark_group(format!("llm/{name}/large"));
    group
        .sampling_mode(SamplingMode::Flat)
        .throughput(Throughput::Bytes(s.large))
        .sample_size(10)
        .warm_up_time(Duration::from_millis(100))
        .measurement_time(Duration::from_secs(2));
    let args = ["large".to_string(), s.large.to_string()];
    let (relay, host) = bench.both(&mut group, &args, move |nums, out| {
        assert_eq!(
            nums.first().copied(),
            Some(s.large as i64),
            "bytes received"
        );
        let d = Duration::from_nanos(nums[1] as u64);
        out.push(d);
        d
    });
    group.finish();
    let gbps = |d: Duration| s.large as f64 / d.as_secs_f64().max(1e-9) / 1e9;
    let (r, h) = (percentile(&relay, 0.5), percentile(&host, 0.5));
    if !relay.is_empty() && !host.is_empty() {
        println!(
            "REPORT llm/{name} large response ({} MiB): relay {:.2} GB/s (p50 of {}) | host direct {:.2} GB/s (p50 of {}) | ratio {:.2}x",
            s.large >> 20,
            gbps(r),
            relay.len(),
            gbps(h),
            host.len(),
            gbps(r) / gbps(h).max(1e-9)
        );
    }
    bench.served.stop();
}

fn benches(c: &mut Criterion) {
    let rt = runtime();
    let sizes = if std::env::args().any(|a| a == "--test") {
        QUICK
    } else {
        FULL
    };
    for mode in [Mode::Direct, Mode::Nsjail] {
        bench_mode(c, &rt, mode, sizes);
    }
}

criterion_group!(llm, benches);
criterion_main!(llm);
