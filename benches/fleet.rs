//! Fleet mode's costs, against baselines measured in the same run. The
//! fleet is real: a throwaway PostgreSQL server started by the bench on a
//! temp data dir and a loopback port (the integration tests' harness,
//! `fleet/tests/pg`) and a `file://` archive store in a temp dir.
//!
//! - Turn start (`Start` sent → `Started` received) in fleet mode with an
//!   up-to-date local copy, against local mode (no fleet), samples taken in
//!   pairs. Goal: ≤ +2 ms p50. Also reported: the whole turn (`Start` →
//!   `Exited`, which adds the commit and the release), same pairs.
//! - Commit of an unchanged session: the `Fleet::commit` the turn runs after
//!   the agent exited, called on a session a hydrate just found current
//!   (what a turn that changed nothing pays between the agent's exit and
//!   `Exited`, before the release). Goal: ≤ 10 ms. The same turns' other
//!   fleet steps (acquire, hydrate of a current copy, release) are
//!   reported too: what fleet mode adds to a turn.
//! - Hydrate and commit of a 100 MiB session (400 files of incompressible
//!   data), against `tar -x` of its archive and `tar -c` of its tree (with
//!   an fsync of the archive, as the store's upload does), same run,
//!   alternating. Goal: ≤ 1.5×. The hydrate is durable (a `syncfs` before
//!   the session is swapped in), `tar -x` is not: `tar -x` + `syncfs` is
//!   reported too. Also reported, to say where the time goes: the object
//!   read and checked alone (count + SHA-256, which a hydrate overlaps
//!   with its import), and the tar stream alone (`archive::export` into a
//!   sink).
//!
//! Reproduce: `sudo cargo bench -p turnstile-benches --bench fleet` (after
//! scripts/setup-nsjail.sh and scripts/build-shim.sh, with PostgreSQL's
//! server binaries installed, as scripts/test.sh does). Turn start runs in
//! direct mode (the fleet's cost does not depend on the jail);
//! `TURNSTILE_BENCH_MODES=nsjail` (or `direct,nsjail`) picks the modes. The
//! smoke run (`cargo test --benches`) takes one sample of each with a
//! 4 MiB session.

#[allow(dead_code)]
#[path = "../fleet/tests/pg/mod.rs"]
mod pg;

use criterion::{Criterion, criterion_group, criterion_main};
use pg::Pg;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use turnstile_benches::{Served, drain, percentile, report, runtime};
use turnstile_broker::archive;
use turnstile_broker::config::{Config, Mode};
use turnstile_broker::fleet::{Commit, Fleet, FleetConfig, FleetLease};
use turnstile_broker::session::{Lease, LeasePolicy, Sessions};
use turnstile_broker::tree;
use turnstile_fleet::PgFleet;

/// `cargo bench` passes --bench; the smoke run does not.
fn full() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// A temp dir on the filesystem of the target dir (where a state dir
/// would be; /tmp may be a tmpfs).
fn on_disk(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("tempdir")
}

/// The database and archive store the workers share.
struct Shared {
    pg: Pg,
    store: tempfile::TempDir,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            pg: Pg::start(),
            store: on_disk("turnstile-bench-store-"),
        }
    }

    async fn fleet(&self, worker: &str) -> PgFleet {
        let config = FleetConfig {
            database: self.pg.url(),
            archives: format!("file://{}", self.store.path().display()),
            worker_id: Some(worker.to_string()),
            lease_ttl_ms: 30_000,
            keep_generations: 3,
        };
        PgFleet::open(&config, Config::default().import_caps())
            .await
            .expect("fleet opens")
    }

    async fn generation(&self, id: &str) -> i64 {
        self.pg
            .sql(&format!(
                "SELECT generation FROM turnstile_sessions WHERE session_id = '{id}'"
            ))
            .await
            .first()
            .map(|r| r.get(0))
            .unwrap_or(0)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

// ---------------------------------------------------------------- turn start

/// One turn of `/bin/true`: (time to `Started`, time to `Exited`).
async fn turn_once(served: &mut Served, session: &str) -> (Duration, Duration) {
    let t0 = Instant::now();
    let (started, tx, events) = served.start_turn(session, &["/bin/true"]).await;
    drop(tx);
    drain(events).await;
    (started, t0.elapsed())
}

fn turn_start(c: &mut Criterion, rt: &tokio::runtime::Runtime, shared: &Shared, mode: Mode) {
    let name = mode.as_str();
    let mut local = rt.block_on(Served::start(mode));
    let fleet = rt.block_on(shared.fleet(&format!("bench-{name}")));
    let mut fleet_mode = rt.block_on(Served::start_in_fleet(
        mode,
        Some(turnstile_fleet::shared(fleet)),
        |_| {},
    ));
    for s in [&local, &fleet_mode] {
        if let Some(w) = &s.broker.warm {
            rt.block_on(w.wait_ready(s.broker.config.warm_spares));
        }
    }
    const SESSIONS: u64 = 8;
    let session = |n: u64| format!("fleet-{name}-{}", n % SESSIONS);
    // Each session's first turn commits its generation 1 (the empty home
    // and work); from then on every local copy is up to date.
    rt.block_on(async {
        for n in 0..SESSIONS {
            turn_once(&mut fleet_mode, &session(n)).await;
            turn_once(&mut local, &session(n)).await;
        }
    });
    let samples = Arc::new(Mutex::new([vec![], vec![], vec![], vec![]]));
    let mut group = c.benchmark_group(format!("fleet/turn_start/{name}"));
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(6));
    let mut n = 0u64;
    group.bench_function("fleet_mode", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    n += 1;
                    let (fs, fw) = turn_once(&mut fleet_mode, &session(n)).await;
                    let (ls, lw) = turn_once(&mut local, &session(n)).await;
                    total += fs;
                    let mut s = samples.lock().expect("samples");
                    s[0].push(fs);
                    s[1].push(ls);
                    s[2].push(fw);
                    s[3].push(lw);
                }
                total
            })
        })
    });
    group.finish();
    let s = samples.lock().expect("samples").clone();
    // The turns changed nothing: not one committed a generation.
    for n in 0..SESSIONS {
        let g = rt.block_on(shared.generation(&session(n)));
        assert_eq!(g, 1, "session {}: generation {g}", session(n));
    }
    report(
        &format!("fleet/{name} turn start, fleet mode, local copy up to date"),
        &s[0],
        Some(("local mode", &s[1])),
    );
    println!(
        "REPORT fleet/{name} turn start: fleet mode − local mode = {:+.3} ms p50",
        ms(percentile(&s[0], 0.5)) - ms(percentile(&s[1], 0.5))
    );
    report(
        &format!("fleet/{name} whole turn (Start → Exited), fleet mode, unchanged"),
        &s[2],
        Some(("local mode", &s[3])),
    );
    println!(
        "REPORT fleet/{name} whole turn: fleet mode − local mode = {:+.3} ms p50",
        ms(percentile(&s[2], 0.5)) - ms(percentile(&s[3], 0.5))
    );
    local.stop();
    fleet_mode.stop();
}

// ------------------------------------------------------- commit and hydrate

/// A worker: a sessions dir of its own and a fleet handle.
struct Worker {
    state: tempfile::TempDir,
    sessions: Sessions,
    fleet: PgFleet,
}

impl Worker {
    async fn new(shared: &Shared, name: &str) -> Worker {
        let state = on_disk("turnstile-bench-worker-");
        let sessions = Sessions::new(state.path().join("sessions"), None).expect("sessions");
        Worker {
            state,
            sessions,
            fleet: shared.fleet(name).await,
        }
    }

    /// The host lease and the fleet lease of a turn of `id`.
    async fn lease(&self, id: &str, turn: &str) -> (Lease, FleetLease) {
        let local = self
            .sessions
            .lease(id, turn, LeasePolicy::Reject)
            .await
            .expect("host lease");
        let lease = self
            .fleet
            .acquire(id, turn, LeasePolicy::Reject)
            .await
            .expect("fleet lease");
        (local, lease)
    }
}

/// Writes `bytes` of incompressible data (xorshift) to `path`.
fn fill(path: &Path, bytes: usize, seed: u64) {
    let mut x = seed | 1;
    let mut data = vec![0u8; bytes];
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let mut f = std::fs::File::create(path).expect("create");
    f.write_all(&data).expect("write");
}

/// `files` files totalling `bytes`, half in home, half in work, 20 to a dir.
fn build(home: &Path, work: &Path, files: usize, bytes: usize) {
    for i in 0..files {
        let root = if i % 2 == 0 { home } else { work };
        let dir = root.join(format!("d{:02}", (i / 2) / 20));
        std::fs::create_dir_all(&dir).expect("mkdir");
        fill(&dir.join(format!("f{i:04}")), bytes / files, i as u64 + 7);
    }
}

/// Writes back every dirty page, so a measurement never pays for the
/// previous one's writes.
fn settle() {
    rustix::fs::sync();
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A session of `files` files totalling `bytes`, committed by worker `a` as
/// its generation 1.
async fn make_session(a: &Worker, id: &str, files: usize, bytes: usize) {
    let (local, lease) = a.lease(id, "make").await;
    a.fleet
        .hydrate(&a.sessions, &local, &lease)
        .await
        .expect("hydrate");
    let (paths, _, _) = a.sessions.ensure(&local).expect("ensure");
    build(&paths.home, &paths.work, files, bytes);
    let c = a
        .fleet
        .commit(&a.sessions, &local, &lease)
        .await
        .expect("commit");
    assert!(matches!(c, Commit::Advanced { generation: 1, .. }), "{c:?}");
    a.fleet.release(&lease).await.expect("release");
}

/// A turn of session `id` that changes nothing, `runs` times: the times of
/// its fleet steps (acquire, hydrate of a current copy, commit, release).
async fn unchanged_turns(a: &Worker, id: &str, runs: usize) -> [Vec<Duration>; 4] {
    let mut out: [Vec<Duration>; 4] = Default::default();
    for i in 0..runs {
        let turn = format!("unchanged-{i}");
        let local = a
            .sessions
            .lease(id, &turn, LeasePolicy::Reject)
            .await
            .expect("host lease");
        let t0 = Instant::now();
        let lease = a
            .fleet
            .acquire(id, &turn, LeasePolicy::Reject)
            .await
            .expect("fleet lease");
        out[0].push(t0.elapsed());
        let t0 = Instant::now();
        let h = a
            .fleet
            .hydrate(&a.sessions, &local, &lease)
            .await
            .expect("hydrate");
        out[1].push(t0.elapsed());
        assert_eq!(h.restored_bytes, None, "the local copy is current");
        let t0 = Instant::now();
        let c = a.fleet.commit(&a.sessions, &local, &lease).await;
        out[2].push(t0.elapsed());
        assert!(matches!(c, Ok(Commit::Unchanged { .. })), "{c:?}");
        let t0 = Instant::now();
        a.fleet.release(&lease).await.expect("release");
        out[3].push(t0.elapsed());
    }
    out
}

fn big(rt: &tokio::runtime::Runtime, shared: &Shared) {
    let (mib, files, runs, unchanged_runs) = if full() {
        (100, 400, 6, 40)
    } else {
        (4, 40, 1, 2)
    };
    let bytes = mib << 20;
    rt.block_on(async {
        let a = Worker::new(shared, "bench-a").await;
        let b = Worker::new(shared, "bench-b").await;

        // Commit of an unchanged session: a small one, many small files,
        // and the big one.
        let small = "small";
        make_session(&a, small, 20, 64 << 10).await;
        let many = "many";
        let many_files = if full() { 5000 } else { 100 };
        make_session(&a, many, many_files, many_files << 10).await;
        let id = "big";
        make_session(&a, id, files, bytes).await;
        settle();
        for (what, sid) in [
            ("20 files, 64 KiB".to_string(), small),
            (format!("{many_files} files of 1 KiB"), many),
            (format!("{files} files, {mib} MiB"), id),
        ] {
            let [acquire, hydrate, commit, release] =
                unchanged_turns(&a, sid, unchanged_runs).await;
            report(
                &format!("fleet commit of an unchanged session ({what}), Fleet::commit"),
                &commit,
                None,
            );
            for (step, t) in [
                ("acquire", &acquire),
                ("hydrate (current copy)", &hydrate),
                ("release", &release),
            ] {
                report(&format!("fleet   same turns: {step}"), t, None);
            }
        }

        // Hydrate on a worker with no local copy, against `tar -x` of the
        // same archive (and `tar -x` + `syncfs`, as durable as the
        // hydrate); and the object read and checked alone.
        let scratch = on_disk("turnstile-bench-scratch-");
        let object = latest_object(shared.store.path(), id);
        let (mut hyd, mut tarx, mut tarxs, mut read) = (vec![], vec![], vec![], vec![]);
        for i in 0..runs {
            let to = scratch.path().join(format!("x{i}"));
            if i % 2 == 1 {
                tarx.push(tar_x(&object, &to, false));
                tarxs.push(tar_x(&object, &to, true));
            }
            let (h, r) = hydrate_once(&b, id, i).await;
            hyd.push(h);
            read.push(r);
            if i % 2 == 0 {
                tarx.push(tar_x(&object, &to, false));
                tarxs.push(tar_x(&object, &to, true));
            }
        }
        report(
            &format!("fleet hydrate of a {mib} MiB session ({files} files), no local copy"),
            &hyd,
            Some(("tar -x of its archive", &tarx)),
        );
        report(
            "fleet hydrate, against an extraction as durable",
            &hyd,
            Some(("tar -x of its archive + syncfs", &tarxs)),
        );
        report(
            "fleet hydrate: the object read and checked alone (count + SHA-256, no import)",
            &read,
            Some(("the whole hydrate", &hyd)),
        );

        // Commit of a changed session (one file written), against `tar -c`
        // of the same tree into the store's filesystem with an fsync; and
        // the tar stream alone.
        let (mut com, mut tarc, mut export) = (vec![], vec![], vec![]);
        let dir = a.sessions.paths(id).dir;
        for i in 0..runs {
            let out = shared.store.path().join(format!("baseline-{i}.tar"));
            if i % 2 == 0 {
                com.push(commit_once(&a, id, i).await);
                tarc.push(tar_c(&dir, &out));
            } else {
                tarc.push(tar_c(&dir, &out));
                com.push(commit_once(&a, id, i).await);
            }
            let fd = tree::open_dir_path(&dir).expect("open");
            let t0 = Instant::now();
            archive::export(&fd, &mut std::io::sink()).expect("export");
            export.push(t0.elapsed());
        }
        report(
            &format!("fleet commit of a changed {mib} MiB session ({files} files)"),
            &com,
            Some(("tar -c of its tree + fsync", &tarc)),
        );
        report(
            "fleet commit: of which the tar stream (archive::export into a sink)",
            &export,
            Some(("the whole commit", &com)),
        );
        drop(scratch);
    });
}

/// Hydrate of session `id` by worker `b` into a sessions dir with no copy
/// of it; then the same object read and checked alone (no import).
async fn hydrate_once(b: &Worker, id: &str, i: usize) -> (Duration, Duration) {
    let sessions = Sessions::new(b.state.path().join(format!("run{i}")), None).expect("dir");
    let local = sessions
        .lease(id, "hydrate", LeasePolicy::Reject)
        .await
        .expect("host lease");
    let lease = b
        .fleet
        .acquire(id, "hydrate", LeasePolicy::Reject)
        .await
        .expect("fleet lease");
    settle();
    let t0 = Instant::now();
    let h = b
        .fleet
        .hydrate(&sessions, &local, &lease)
        .await
        .expect("hydrate");
    let hydrate = t0.elapsed();
    assert!(h.restored_bytes.is_some(), "{h:?}");
    b.fleet.release(&lease).await.expect("release");
    let archive = lease.archive.clone().expect("an archive");
    let key = turnstile_fleet::store::Archives::parse_key(&archive.key).expect("key");
    settle();
    let t0 = Instant::now();
    let mut object = b
        .fleet
        .archives()
        .read_object(&key, archive.bytes, &archive.sha256)
        .await
        .expect("read");
    tokio::task::block_in_place(|| object.finish()).expect("as committed");
    let read = t0.elapsed();
    drop(local);
    let root = sessions.root().to_path_buf();
    drop(sessions);
    std::fs::remove_dir_all(&root).expect("rm");
    (hydrate, read)
}

/// `tar -x` of `object` into a new dir `to` (removed after); with `sync`,
/// then a `syncfs` of its filesystem (what a hydrate does before the
/// session is swapped in).
fn tar_x(object: &Path, to: &Path, sync: bool) -> Duration {
    std::fs::create_dir(to).expect("mkdir");
    settle();
    let t0 = Instant::now();
    run(Command::new("tar").arg("-xf").arg(object).arg("-C").arg(to));
    if sync {
        let fd = tree::open_dir_path(to).expect("open");
        rustix::fs::syncfs(&fd).expect("syncfs");
    }
    let d = t0.elapsed();
    std::fs::remove_dir_all(to).expect("rm");
    d
}

/// A turn of session `id` on worker `a` that writes one file: its commit.
async fn commit_once(a: &Worker, id: &str, i: usize) -> Duration {
    let (local, lease) = a.lease(id, &format!("change-{i}")).await;
    a.fleet
        .hydrate(&a.sessions, &local, &lease)
        .await
        .expect("hydrate");
    let (paths, _, _) = a.sessions.ensure(&local).expect("ensure");
    std::fs::write(paths.work.join("changed"), format!("{i}")).expect("write");
    settle();
    let t0 = Instant::now();
    let c = a.fleet.commit(&a.sessions, &local, &lease).await;
    let d = t0.elapsed();
    assert!(matches!(c, Ok(Commit::Advanced { .. })), "{c:?}");
    a.fleet.release(&lease).await.expect("release");
    d
}

/// `tar -c` of `dir`'s home and work into `out`, fsynced (removed after).
fn tar_c(dir: &Path, out: &Path) -> Duration {
    settle();
    let t0 = Instant::now();
    run(Command::new("tar")
        .arg("-cf")
        .arg(out)
        .arg("-C")
        .arg(dir)
        .args(["home", "work"]));
    std::fs::File::open(out)
        .expect("open")
        .sync_all()
        .expect("sync");
    let d = t0.elapsed();
    std::fs::remove_file(out).expect("rm");
    d
}

/// The newest archive object of session `id` in the store.
fn latest_object(store: &Path, id: &str) -> PathBuf {
    let dir = store.join("sessions").join(id);
    let mut objects: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("session objects")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "tar"))
        .collect();
    objects.sort();
    objects.pop().expect("an archive object")
}

fn benches(c: &mut Criterion) {
    let rt = runtime();
    let shared = Shared::new();
    let modes = std::env::var("TURNSTILE_BENCH_MODES").unwrap_or_else(|_| "direct".into());
    for mode in [Mode::Direct, Mode::Nsjail] {
        if modes.split(',').any(|m| m == mode.as_str()) {
            turn_start(c, &rt, &shared, mode);
        }
    }
    big(&rt, &shared);
}

criterion_group!(fleet, benches);
criterion_main!(fleet);
