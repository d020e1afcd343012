//! The LLM relay against a hostile executor: random sequences of `open`,
//! `data`, `eof`, `reset`, `window` and empty frames, with random
//! connection ids and sizes (0, 2^64-1, just past a window, ...), sent to
//! a turn whose agent keeps connections open. The broker (the `turnstile`
//! binary) must not panic, must keep its memory bounded, and must keep
//! serving the turn's stdio and its one well-behaved connection after
//! every batch.

use super::harness::*;
use crate::both_modes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tokio_stream::StreamExt;
use turnstile_broker::config::Mode;
use turnstile_proto::LLM_INITIAL_WINDOW;
use turnstile_proto::v1 as pb;

both_modes!(random_llm_frames_never_panic_grow_or_stall_the_broker);

/// Batches of random frames; after each, the probes must come back.
const ROUNDS: usize = 40;
const FRAMES_PER_ROUND: usize = 48;
/// The broker's peak RSS may grow by at most this much over the run,
/// while several times more data is thrown at it.
const RSS_GROWTH_MAX_KIB: u64 = 48 * 1024;
/// A safety net against a stalled broker, not a synchronisation.
const SAFETY: Duration = Duration::from_secs(120);

/// The agent: one well-behaved connection that echoes what it receives
/// ("good;" first), and three that say "fuzz;", drain whatever arrives and
/// reconnect whenever they are closed or reset; stdin lines come back on
/// stdout as "stdin:<line>", and each opens one more connection that says
/// "stuck;" and is never read, with a small receive buffer: what is sent
/// to it can only pile up in the broker, or be refused. Past the broker's
/// cap on connections, new ones are refused.
const AGENT: &str = r#"python3 -c '
import os, socket, sys, threading, urllib.parse
u = urllib.parse.urlparse(os.environ["ANTHROPIC_BASE_URL"])
addr = (u.hostname, u.port)
good = socket.create_connection(addr)
good.sendall(b"good;")
def echo():
    while True:
        b = good.recv(65536)
        if not b:
            break
        good.sendall(b)
def fuzzed():
    while True:
        s = socket.create_connection(addr)
        try:
            s.sendall(b"fuzz;")
            while s.recv(65536):
                pass
        except OSError:
            pass
        s.close()
threading.Thread(target=echo, daemon=True).start()
for _ in range(3):
    threading.Thread(target=fuzzed, daemon=True).start()
print("ready", flush=True)
stuck = []
for line in sys.stdin:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(addr)
    s.sendall(b"stuck;")
    stuck.append(s)
    print("stdin:" + line.strip(), flush=True)
'"#;

fn llm(conn: u64, kind: Option<pb::llm_frame::Kind>) -> pb::TurnRequest {
    pb::TurnRequest {
        kind: Some(pb::turn_request::Kind::Llm(pb::LlmFrame { conn, kind })),
    }
}

/// A size around the window's edges, or anywhere up to two windows.
fn size(rng: &mut StdRng) -> u64 {
    let w = LLM_INITIAL_WINDOW;
    match rng.random_range(0..8) {
        0 => 0,
        1 => rng.random_range(1..1024),
        2 => w,
        3 => w + 1,
        4 => w - 1,
        _ => rng.random_range(64 * 1024..=2 * w),
    }
}

/// One random frame for any connection but `good`; one in six is data for
/// `stuck` (and nothing else is), the first connection the agent never reads (more than the
/// kernel's socket buffers hold over the run: a broker that queued it
/// instead of refusing it past the window would grow by as much).
fn random_frame(rng: &mut StdRng, known: &[u64], stuck: Option<u64>, good: u64) -> pb::TurnRequest {
    use pb::llm_frame::Kind;
    if let Some(stuck) = stuck
        && rng.random_range(0..6) == 0
    {
        let data = vec![b'x'; size(rng) as usize];
        return llm(stuck, Some(Kind::Data(data.into())));
    }
    let conn = loop {
        let c = match rng.random_range(0..10) {
            0 => 0,
            1 => u64::MAX,
            2 => rng.random(),
            3 => known.iter().max().copied().unwrap_or(0) + 1,
            _ => known[rng.random_range(0..known.len())],
        };
        if c != good && Some(c) != stuck {
            break c;
        }
    };
    let kind = match rng.random_range(0..14) {
        0 => Some(Kind::Open(pb::LlmOpen {})),
        1 | 2 => Some(Kind::Eof(pb::LlmEof {})),
        3 => Some(Kind::Reset(pb::LlmReset {
            reason: "fuzz".into(),
        })),
        4..=6 => Some(Kind::Window(pb::LlmWindow {
            bytes: match rng.random_range(0..4) {
                0 => u64::MAX,
                1 => rng.random(),
                _ => size(rng),
            },
        })),
        7 => None,
        _ => Some(Kind::Data(bytes::Bytes::from(vec![
            b'x';
            size(rng) as usize
        ]))),
    };
    llm(conn, kind)
}

/// The broker's peak resident memory (VmHWM), KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// What the executor has seen of the agent's connections and output.
#[derive(Default)]
struct Seen {
    /// Connections announced by `open`, with what they sent so far.
    conns: HashMap<u64, Vec<u8>>,
    good: Option<u64>,
    fuzz: HashSet<u64>,
    /// The first connection the agent never reads.
    stuck: Option<u64>,
    out: Outcome,
}

impl Seen {
    fn good_bytes(&self) -> String {
        self.good
            .and_then(|g| self.conns.get(&g))
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default()
    }

    /// Takes one event; anything but what a hostile executor may cause
    /// fails the test.
    fn take(&mut self, ev: pb::TurnEvent, seed: u64) {
        use pb::llm_frame::Kind;
        match ev.kind {
            Some(pb::turn_event::Kind::Llm(f)) => {
                let is_good = Some(f.conn) == self.good;
                match f.kind {
                    Some(Kind::Open(_)) => {
                        assert!(
                            self.conns.insert(f.conn, Vec::new()).is_none(),
                            "connection {} opened twice (seed {seed})",
                            f.conn
                        );
                    }
                    Some(Kind::Data(b)) => {
                        let buf = self.conns.get_mut(&f.conn).unwrap_or_else(|| {
                            panic!("data before open on {} (seed {seed})", f.conn)
                        });
                        buf.extend_from_slice(&b);
                        if buf.starts_with(b"good;") {
                            self.good = Some(f.conn);
                        } else if buf.starts_with(b"fuzz;") {
                            self.fuzz.insert(f.conn);
                        } else if buf.starts_with(b"stuck;") && self.fuzz.insert(f.conn) {
                            self.stuck.get_or_insert(f.conn);
                        }
                    }
                    Some(Kind::Window(_)) => {}
                    Some(Kind::Eof(_)) | Some(Kind::Reset(_)) if !is_good => {}
                    other => panic!(
                        "the well-behaved connection {} got {other:?} (seed {seed}); stderr {}",
                        f.conn,
                        self.out.stderr()
                    ),
                }
            }
            Some(pb::turn_event::Kind::Notice(n)) => self.out.notices.push(n.message),
            Some(pb::turn_event::Kind::Started(s)) => self.out.started = Some(s),
            Some(pb::turn_event::Kind::Stdout(b)) => self.out.stdout.extend_from_slice(&b),
            Some(pb::turn_event::Kind::Stderr(b)) => self.out.stderr.extend_from_slice(&b),
            other => panic!(
                "unexpected event while frames were thrown: {other:?} (seed {seed}); stderr {}",
                self.out.stderr()
            ),
        }
    }
}

async fn random_llm_frames_never_panic_grow_or_stall_the_broker(mode: Mode) {
    let seed = std::env::var("TURNSTILE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(match mode {
            Mode::Direct => 0x5eed_0001,
            Mode::Nsjail => 0x5eed_0002,
        });
    eprintln!("llm frame fuzz: seed {seed} (TURNSTILE_FUZZ_SEED)");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempdir();
    let mut d = Daemon::spawn(mode, dir.path(), &[]);
    let pid = d.child.id();
    let client = d.ready().await;
    let mut t = Turn::start(client, start("llm-fuzz", AGENT))
        .await
        .expect("turn");
    let mut seen = Seen::default();

    // The agent is up with its good connection and three others.
    let ready = async {
        while seen.good.is_none() || seen.fuzz.len() < 3 || !seen.out.stdout().contains("ready") {
            let ev = t.events.next().await.expect("event").expect("ok");
            seen.take(ev, seed);
        }
    };
    tokio::time::timeout(SAFETY, ready)
        .await
        .unwrap_or_else(|_| panic!("the agent never got ready (seed {seed})"));
    let good = seen.good.expect("good connection");
    let rss_before = peak_rss_kib(pid);

    let mut thrown = 0u64;
    for round in 0..ROUNDS {
        let known: Vec<u64> = seen.fuzz.iter().copied().collect();
        let mut batch: Vec<pb::TurnRequest> = (0..FRAMES_PER_ROUND)
            .map(|_| random_frame(&mut rng, &known, seen.stuck, good))
            .collect();
        thrown += batch
            .iter()
            .map(|r| match &r.kind {
                Some(pb::turn_request::Kind::Llm(pb::LlmFrame {
                    kind: Some(pb::llm_frame::Kind::Data(b)),
                    ..
                })) => b.len() as u64,
                _ => 0,
            })
            .sum::<u64>();
        // The probes go after the batch on the same stream: when they come
        // back, the broker has handled every frame before them.
        let probe = format!("probe-{round};");
        batch.push(llm(
            good,
            Some(pb::llm_frame::Kind::Data(probe.clone().into_bytes().into())),
        ));
        batch.push(pb::TurnRequest {
            kind: Some(pb::turn_request::Kind::Stdin(
                format!("probe-{round}\n").into_bytes().into(),
            )),
        });
        // Sent while the events are read, as an executor does: the broker
        // answers many of these frames with notices.
        let tx = t.tx.clone();
        let sender = tokio::spawn(async move {
            for req in batch {
                if tx.send(req).await.is_err() {
                    break;
                }
            }
        });
        let stdin_probe = format!("stdin:probe-{round}\n");
        let answered = async {
            while !seen.good_bytes().contains(&probe) || !seen.out.stdout().contains(&stdin_probe) {
                let ev = t
                    .events
                    .next()
                    .await
                    .unwrap_or_else(|| panic!("stream ended in round {round} (seed {seed})"))
                    .expect("event");
                seen.take(ev, seed);
            }
        };
        tokio::time::timeout(SAFETY, answered)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "round {round}: the broker stalled the turn's stdio or its good connection \
                 (seed {seed}); stdout {:?}, good connection {:?}",
                    seen.out.stdout(),
                    seen.good_bytes()
                )
            });
        sender.await.expect("sender");
    }

    let rss_after = peak_rss_kib(pid);
    eprintln!(
        "llm frame fuzz ({mode:?}): {} MiB of data in {} frames; broker peak RSS {} → {} MiB; \
         {} notices",
        thrown >> 20,
        ROUNDS * FRAMES_PER_ROUND,
        rss_before >> 10,
        rss_after >> 10,
        seen.out.notices.len()
    );
    assert!(
        thrown > 2 * RSS_GROWTH_MAX_KIB * 1024,
        "the run must throw more data than the memory bound ({thrown} bytes, seed {seed})"
    );
    assert!(
        rss_after <= rss_before + RSS_GROWTH_MAX_KIB,
        "broker peak RSS grew from {rss_before} to {rss_after} KiB (seed {seed})"
    );
    // Every notice is a refusal the broker explained, never silence.
    assert!(!seen.out.notices.is_empty(), "no notices (seed {seed})");

    // The turn still ends normally (its good connection with it).
    seen.good = None;
    t.close_stdin().await;
    let ended = async {
        while let Some(ev) = t.events.next().await {
            let ev = ev.expect("event");
            match ev.kind {
                Some(pb::turn_event::Kind::Exited(e)) => seen.out.exited = Some(e),
                kind => seen.take(pb::TurnEvent { kind, seq: 0 }, seed),
            }
        }
    };
    tokio::time::timeout(SAFETY, ended)
        .await
        .unwrap_or_else(|_| panic!("the turn did not end (seed {seed})"));
    seen.out.assert_exited_ok();

    d.signal(nix::sys::signal::Signal::SIGTERM);
    let log = d.wait_log("stopped");
    let panics: Vec<&String> = log.iter().filter(|l| l.contains("panicked")).collect();
    assert!(
        panics.is_empty(),
        "the broker panicked (seed {seed}): {panics:#?}"
    );
    assert!(d.wait().await.success(), "broker exit (seed {seed})");
}
