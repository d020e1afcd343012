//! Fleet mode end to end: brokers "A" and "B" with state dirs of their own
//! share a real PostgreSQL server (started on a throwaway data dir and
//! port, see `fleet/tests/pg`) and a `file://` archive store, as two hosts
//! would. Leases have short TTLs; nothing waits on a sleep: conditions are
//! polled with a deadline, or waited for by the broker's own WAIT policy.

#[allow(dead_code)]
#[path = "../../fleet/tests/pg/mod.rs"]
mod pg;

use super::harness::{Daemon, Harness, Outcome, Reason, Turn, start, tempdir};
use pg::Pg;
use std::path::{Path, PathBuf};
use turnstile_broker::config::{Config, Mode};
use turnstile_broker::fleet::FleetConfig;
use turnstile_fleet::PgFleet;
use turnstile_proto::v1 as pb;

/// A database and an archive store that workers share.
struct Shared {
    pg: Pg,
    store: tempfile::TempDir,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            pg: Pg::start(),
            store: tempfile::tempdir().expect("store"),
        }
    }

    fn config(&self, worker: &str, ttl_ms: u64) -> FleetConfig {
        FleetConfig {
            database: self.pg.url(),
            archives: format!("file://{}", self.store.path().display()),
            worker_id: Some(worker.to_string()),
            lease_ttl_ms: ttl_ms,
            keep_generations: 3,
        }
    }

    /// An in-process broker in fleet mode.
    async fn broker(&self, mode: Mode, worker: &str, ttl_ms: u64) -> Harness {
        self.broker_with(mode, worker, ttl_ms, |_| {}).await
    }

    /// [`Shared::broker`] with its config adjusted by `tweak` first.
    async fn broker_with(
        &self,
        mode: Mode,
        worker: &str,
        ttl_ms: u64,
        tweak: impl FnOnce(&mut Config),
    ) -> Harness {
        let fleet = PgFleet::open(
            &self.config(worker, ttl_ms),
            Config::default().import_caps(),
        )
        .await
        .expect("fleet opens");
        Harness::start_in_fleet(mode, Some(turnstile_fleet::shared(fleet)), tweak).await
    }

    /// A `turnstile serve` child process in fleet mode, on `dir`.
    fn daemon(&self, dir: &Path, worker: &str, ttl_ms: u64) -> Daemon {
        let c = self.config(worker, ttl_ms);
        let file = dir.join("turnstile.toml");
        std::fs::write(
            &file,
            format!(
                "[fleet]\ndatabase = {:?}\narchives = {:?}\nworker_id = {:?}\nlease_ttl_ms = {}\n",
                c.database, c.archives, worker, ttl_ms
            ),
        )
        .expect("config file");
        Daemon::spawn_args(
            Mode::Direct,
            &dir.join("state"),
            &dir.join("daemon.sock"),
            &["--config".as_ref(), file.as_os_str()],
            &[],
        )
    }

    /// The session's committed generation in the catalog (0: none).
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

    /// Every object in the store, sorted.
    fn objects(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, out);
                } else {
                    out.push(p);
                }
            }
        }
        let mut out = Vec::new();
        walk(self.store.path(), &mut out);
        out.sort();
        out
    }
}

/// A start that waits up to `ms` for the session's lease.
fn waiting(mut s: pb::Start, ms: u64) -> pb::Start {
    s.lease = Some(pb::Lease {
        policy: pb::lease::Policy::Wait as i32,
        wait_ms: ms,
    });
    s
}

fn started(o: &Outcome) -> &pb::Started {
    o.started.as_ref().expect("a started event")
}

/// The session id a notice or message names after "kept as session ".
fn kept_id(text: &str) -> String {
    let (_, rest) = text
        .split_once("kept as session ")
        .unwrap_or_else(|| panic!("no kept session named in {text:?}"));
    rest.split(|c: char| c == ';' || c.is_whitespace())
        .next()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_continues_across_workers_a_then_b_then_a() {
    let shared = Shared::new();
    let a = shared.broker(Mode::Nsjail, "A", 30_000).await;
    let b = shared.broker(Mode::Nsjail, "B", 30_000).await;

    let o = a
        .run(start(
            "s",
            "echo one > $HOME/history && echo a > from-a && echo ran on A",
        ))
        .await;
    o.assert_exited_ok();
    assert_eq!(started(&o).generation, 0);
    assert_eq!(shared.generation("s").await, 1);

    // The approval continuation lands on B: it finds A's files.
    let o = b
        .run(start(
            "s",
            "cat $HOME/history from-a && echo two >> $HOME/history",
        ))
        .await;
    o.assert_exited_ok();
    assert_eq!(o.stdout(), "one\na\n");
    assert_eq!(started(&o).generation, 1);
    assert!(started(&o).hydrate_us > 0, "B restored the archive");
    assert_eq!(shared.generation("s").await, 2);

    // Back on A: its stale local copy is refreshed with B's changes.
    let o = a.run(start("s", "cat $HOME/history")).await;
    o.assert_exited_ok();
    assert_eq!(o.stdout(), "one\ntwo\n");
    assert_eq!(started(&o).generation, 2);
    assert!(started(&o).hydrate_us > 0, "A restored the archive");

    // An unchanged session commits nothing and restores nothing.
    let before = shared.objects();
    let o = a.run(start("s", "cat $HOME/history")).await;
    o.assert_exited_ok();
    assert_eq!(started(&o).generation, 2);
    assert_eq!(started(&o).hydrate_us, 0, "A's copy was current");
    assert_eq!(shared.generation("s").await, 2);
    assert_eq!(shared.objects(), before, "nothing written");
    a.stop().await;
    b.stop().await;
}

/// A file rewritten through a shared mapping: no write event, only its
/// close after opening for writing when the mapping goes.
const MMAP_WRITE: &str = "import mmap, os
fd = os.open(os.path.expanduser('~/deep/a/b/log'), os.O_RDWR)
m = mmap.mmap(fd, 0)
os.close(fd)
m[0:3] = b'MAP'
m.flush()
m.close()";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_a_turn_makes_to_a_current_copy_is_committed_and_only_a_change() {
    let shared = Shared::new();
    let a = shared.broker(Mode::Nsjail, "A", 30_000).await;
    let run = |script: &str| start("c", script);
    let o = a
        .run(run(
            "mkdir -p $HOME/deep/a/b && echo one > $HOME/deep/a/b/log && echo x > keep",
        ))
        .await;
    o.assert_exited_ok();
    let mut generation = shared.generation("c").await;
    assert_eq!(generation, 1);
    let mmap = {
        let mut s = start("c", "");
        s.argv = vec!["python3".into(), "-c".into(), MMAP_WRITE.into()];
        s
    };
    let changes = [
        (
            "append in a deep dir",
            run("echo two >> $HOME/deep/a/b/log"),
        ),
        ("chmod", run("chmod 600 $HOME/deep/a/b/log")),
        ("times only", run("touch -d 2001-01-01 keep")),
        ("mkdir", run("mkdir $HOME/deep/a/c")),
        ("rename", run("mv keep kept")),
        ("remove", run("rm kept")),
        ("symlink", run("ln -s /etc $HOME/deep/etc")),
        (
            "truncate",
            run(": > $HOME/deep/a/b/log && echo three > $HOME/deep/a/b/log"),
        ),
        ("a write through a shared mapping", mmap),
    ];
    for (what, turn) in changes {
        let before = shared.objects();
        a.run(run("cat $HOME/deep/a/b/log >/dev/null"))
            .await
            .assert_exited_ok();
        assert_eq!(
            shared.generation("c").await,
            generation,
            "{what}: a turn that only reads"
        );
        assert_eq!(
            shared.objects(),
            before,
            "{what}: nothing written for a read"
        );
        a.run(turn).await.assert_exited_ok();
        generation += 1;
        assert_eq!(
            shared.generation("c").await,
            generation,
            "{what}: committed"
        );
    }
    // The last commit holds the mapped write.
    let b = shared.broker(Mode::Nsjail, "B", 30_000).await;
    let o = b.run(run("cat $HOME/deep/a/b/log")).await;
    o.assert_exited_ok();
    assert_eq!(o.stdout(), "MAPee\n");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_session_started_on_two_workers_200_times_never_runs_twice() {
    use std::os::unix::fs::PermissionsExt;
    let shared = Shared::new();
    let a = shared.broker(Mode::Direct, "A", 30_000).await;
    let b = shared.broker(Mode::Direct, "B", 30_000).await;
    // Outside both brokers' state dirs: what both agents see.
    let marks = tempfile::tempdir().expect("marker dir");
    std::fs::set_permissions(marks.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    // The agent takes the marker exclusively (noclobber) and gives it back
    // at its end: a second agent at once fails to take it.
    let mut s = start(
        "s",
        "set -C; : > \"$MARKS/agent\" || { echo TWO AGENTS AT ONCE >&2; exit 9; }; \
         echo x >> count; rm \"$MARKS/agent\"",
    );
    s.env
        .insert("MARKS".into(), marks.path().display().to_string());
    let (mut ran, mut busy) = (0, 0);
    for round in 0..200 {
        let (ra, rb) = tokio::join!(a.turn(s.clone()), b.turn(s.clone()));
        let mut ran_now = 0;
        for (worker, r) in [("A", ra), ("B", rb)] {
            match r {
                Ok(t) => {
                    t.close_stdin().await;
                    let o = t.collect().await;
                    assert_eq!(
                        (o.reason(), o.code()),
                        (Reason::Exited, Some(0)),
                        "round {round} on {worker}: {:?} {}",
                        o.exited,
                        o.stderr()
                    );
                    ran_now += 1;
                }
                Err(status) => {
                    assert_eq!(
                        status.code(),
                        tonic::Code::FailedPrecondition,
                        "round {round} on {worker}: {status:?}"
                    );
                    let msg = status.message();
                    assert!(
                        msg.starts_with("session s is busy: turn ") && msg.contains(" on worker "),
                        "{msg}"
                    );
                    busy += 1;
                }
            }
        }
        assert!(ran_now >= 1, "round {round}: neither ran");
        ran += ran_now;
    }
    assert_eq!(ran + busy, 400);
    // Every turn that ran appended to the session in turn: none was lost.
    assert_eq!(shared.generation("s").await, ran as i64);
    let o = a.run(start("s", "wc -l < count")).await;
    o.assert_exited_ok();
    assert_eq!(o.stdout().trim(), ran.to_string());
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_frees_the_session_after_the_ttl_and_cannot_commit_its_stale_turn() {
    let shared = Shared::new();
    let dir = tempdir();
    let ttl = 1500;
    let mut daemon = shared.daemon(dir.path(), "A", ttl);
    let client = daemon.ready().await;
    let t = Turn::start(client, start("s", "echo 1 > f"))
        .await
        .expect("t1");
    t.close_stdin().await;
    t.collect().await.assert_exited_ok();
    assert_eq!(shared.generation("s").await, 1);

    // Mid-turn (its change made, not committed), A is SIGKILLed.
    let client = super::harness::client(&daemon.socket).await;
    let mut t = Turn::start(
        client,
        start("s", "echo dirty > f; echo ready; exec sleep 100"),
    )
    .await
    .expect("t2");
    t.wait_stdout("ready", &mut Outcome::default()).await;
    daemon.signal(nix::sys::signal::Signal::SIGKILL);
    let status = daemon.wait().await;
    assert!(!status.success());

    // B waits for A's lease to expire, then runs on generation 1.
    let b = shared.broker(Mode::Direct, "B", ttl).await;
    let o = b
        .run(waiting(start("s", "cat f; echo b > g"), 30_000))
        .await;
    o.assert_exited_ok();
    assert_eq!(o.stdout(), "1\n");
    assert_eq!(started(&o).generation, 1);
    assert_eq!(shared.generation("s").await, 2);

    // A comes back: its stale turn's files are not committed, and not
    // lost either: kept under the id the notice names.
    let mut daemon = shared.daemon(dir.path(), "A", ttl);
    let client = daemon.ready().await;
    let t = Turn::start(client, start("s", "cat f g"))
        .await
        .expect("t3");
    t.close_stdin().await;
    let o = t.collect().await;
    o.assert_exited_ok();
    assert_eq!(o.stdout(), "1\nb\n");
    assert_eq!(started(&o).generation, 2);
    let notice = o.notices.join("\n");
    let kept = kept_id(&notice);
    assert!(kept.starts_with("s.kept-g1-"), "{notice}");
    assert_eq!(shared.generation("s").await, 2, "A committed nothing");
    // The kept copy is a session of its own (its first turn adopts it).
    let client = super::harness::client(&daemon.socket).await;
    let t = Turn::start(client, start(&kept, "cat f"))
        .await
        .expect("kept");
    t.close_stdin().await;
    let o = t.collect().await;
    o.assert_exited_ok();
    assert_eq!(o.stdout(), "dirty\n");
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    daemon.wait().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_stopped_mid_turn_ends_it_lease_lost_and_commits_nothing() {
    let shared = Shared::new();
    let a = shared.broker(Mode::Direct, "A", 1500).await;
    a.run(start("s", "echo 1 > f")).await.assert_exited_ok();
    assert_eq!(shared.generation("s").await, 1);

    let mut t = a
        .turn(start("s", "echo 2 > f; echo ready; exec sleep 100"))
        .await
        .expect("t2");
    let mut o = Outcome::default();
    t.wait_stdout("ready", &mut o).await;
    tokio::task::block_in_place(|| shared.pg.stop());
    t.close_stdin().await;
    t.collect_into(&mut o).await;
    assert_eq!(o.reason(), Reason::LeaseLost, "{:?}", o.exited);
    let msg = &o.exited().message;
    assert!(msg.starts_with("lease of session s lost: "), "{msg}");
    assert!(msg.ends_with("nothing was committed"), "{msg}");

    // The database is back: nothing was committed, and the session runs
    // again (on generation 1; the lost turn's files kept aside).
    tokio::task::block_in_place(|| shared.pg.restart());
    assert_eq!(shared.generation("s").await, 1);
    let o = a.run(waiting(start("s", "cat f"), 30_000)).await;
    o.assert_exited_ok();
    assert_eq!(o.stdout(), "1\n");
    let kept = kept_id(&o.notices.join("\n"));
    let o = a.run(start(&kept, "cat f")).await;
    o.assert_exited_ok();
    assert_eq!(o.stdout(), "2\n", "the lost turn's files, kept");
    a.stop().await;
}

/// A read-only bind mount of a directory over itself (unwritable even for
/// root), undone when dropped.
struct ReadOnly(PathBuf);

impl ReadOnly {
    fn mount(path: &Path) -> ReadOnly {
        use nix::mount::{MsFlags, mount};
        mount(
            Some(path),
            path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .expect("bind");
        let guard = ReadOnly(path.to_path_buf());
        mount(
            None::<&str>,
            path,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .expect("read-only");
        guard
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_store_fails_the_commit_and_the_last_generation_stays_runnable() {
    let shared = Shared::new();
    let a = shared.broker(Mode::Direct, "A", 30_000).await;
    let b = shared.broker(Mode::Direct, "B", 30_000).await;
    a.run(start("s", "echo 1 > f")).await.assert_exited_ok();
    assert_eq!(shared.generation("s").await, 1);

    let ro = ReadOnly::mount(shared.store.path());
    let o = a.run(start("s", "echo 2 > f")).await;
    assert_eq!(o.reason(), Reason::CommitFailed, "{:?}", o.exited);
    assert_eq!(o.code(), Some(0), "the agent's own status is kept");
    let msg = &o.exited().message;
    assert!(
        msg.starts_with("commit of session s failed: archive store: "),
        "{msg}"
    );
    let kept = kept_id(msg);
    assert!(kept.starts_with("s.kept-g1-"), "{msg}");
    assert_eq!(shared.generation("s").await, 1);
    // The kept copy's metadata says how its turn ended.
    let meta = a.broker.sessions.meta(&kept).expect("kept copy");
    assert_eq!(meta.last_exit_reason.as_deref(), Some("commit_failed"));

    // Generation 1 is intact and runnable, on B and on A (the store is
    // still unwritable: unchanged turns write nothing).
    for w in [&b, &a] {
        let o = w.run(start("s", "cat f")).await;
        o.assert_exited_ok();
        assert_eq!(o.stdout(), "1\n");
        assert_eq!(started(&o).generation, 1);
    }
    // Once the store takes writes again, the kept turn's files are a
    // session of their own.
    drop(ro);
    let o = a.run(start(&kept, "cat f")).await;
    o.assert_exited_ok();
    assert_eq!(o.stdout(), "2\n");
    assert_eq!(shared.generation(&kept).await, 1);
    a.stop().await;
    b.stop().await;
}

/// A tar whose second entry is `name`, a regular file.
fn hostile_tar(name: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut b = tar::Builder::new(&mut out);
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, "work", std::io::empty())
            .expect("dir");
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(5);
        h.set_cksum();
        b.append(&h, &b"pwned"[..]).expect("entry");
        b.finish().expect("finish");
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_archive_is_refused_at_hydrate_and_the_turn_does_not_start() {
    use sha2::Digest;
    let shared = Shared::new();
    let a = shared.broker(Mode::Direct, "A", 30_000).await;
    let b = shared.broker(Mode::Direct, "B", 30_000).await;
    a.run(start("s", "echo 1 > f")).await.assert_exited_ok();
    let objects = shared.objects();
    assert_eq!(objects.len(), 1, "{objects:?}");

    // Someone with access to the store and the database swaps in an
    // archive that climbs out of the session.
    let bytes = hostile_tar(b"work/../../escaped");
    std::fs::write(&objects[0], &bytes).expect("write");
    let sha: String = sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    shared
        .pg
        .sql(&format!(
            "UPDATE turnstile_sessions SET archive_sha256 = '{sha}', archive_bytes = {}",
            bytes.len()
        ))
        .await;
    let o = b.run(start("s", "echo the agent ran")).await;
    assert_eq!(o.reason(), Reason::SpawnFailed, "{:?}", o.exited);
    assert!(o.started.is_none(), "the turn must not start");
    assert!(o.stdout.is_empty());
    let msg = &o.exited().message;
    assert!(
        msg.contains("archive of session s generation 1 refused: ") && msg.contains("'..'"),
        "{msg}"
    );
    assert!(!b.state().join("sessions/s").exists(), "nothing on disk");
    assert!(!b.state().join("escaped").exists());
    assert!(!shared.store.path().join("escaped").exists());
    // The session's lease was given back: A (whose copy is current) runs it.
    let o = a.run(start("s", "cat f")).await;
    o.assert_exited_ok();
    assert_eq!(o.stdout(), "1\n");
    a.stop().await;
    b.stop().await;
}

/// Without `[fleet]`: no lease in any database, nothing hydrated or
/// committed, no fleet record beside the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_without_a_fleet_runs_as_one_host() {
    let h = Harness::start(Mode::Direct).await;
    assert!(h.broker.fleet.is_none());
    let o = h.run(start("s", "echo local")).await;
    o.assert_exited_ok();
    assert_eq!(started(&o).generation, 0);
    assert_eq!(started(&o).hydrate_us, 0);
    assert!(!h.state().join("sessions/s/fleet.json").exists());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_listed_forked_and_removed_fleet_wide() {
    let shared = Shared::new();
    let a = shared.broker(Mode::Direct, "A", 30_000).await;
    let b = shared.broker(Mode::Direct, "B", 30_000).await;
    a.run(start("s", "echo 1 > f")).await.assert_exited_ok();
    let mut cb = b.client().await;
    let r = |id: &str| pb::SessionRef {
        session_id: id.to_string(),
    };

    // B has no copy of s, and lists it from the catalog.
    let list = cb
        .list_sessions(pb::ListSessionsRequest {})
        .await
        .expect("ls")
        .into_inner()
        .sessions;
    let s = list.iter().find(|i| i.session_id == "s").expect("s listed");
    assert_eq!(
        (s.generation, s.last_worker.as_str(), s.local_copy),
        (1, "A", false)
    );
    assert!(s.archive_bytes > 0);
    assert!(s.last_turn_id.starts_with("t-"), "{s:?}");

    // While A runs a turn, B shows A holding it and cannot remove it.
    let mut t = a
        .turn(start("s", "echo ready; exec sleep 100"))
        .await
        .expect("turn");
    t.wait_stdout("ready", &mut Outcome::default()).await;
    let s = cb.get_session(r("s")).await.expect("show").into_inner();
    assert_eq!(s.holder_worker, "A");
    assert!(!s.running_turn_id.is_empty());
    let refused = cb.delete_session(r("s")).await.expect_err("busy");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(refused.message().contains("on worker A"), "{refused:?}");
    let mut ca = a.client().await;
    ca.cancel_turn(r("s")).await.expect("cancel");
    t.close_stdin().await;
    assert_eq!(t.collect().await.reason(), Reason::Cancelled);

    // A fork made on B is the committed generation, runnable on A.
    let f = cb
        .fork_session(pb::ForkSessionRequest {
            source_session_id: "s".into(),
            new_session_id: "s2".into(),
        })
        .await
        .expect("fork")
        .into_inner();
    assert_eq!((f.session_id.as_str(), f.generation), ("s2", 1));
    let again = cb
        .fork_session(pb::ForkSessionRequest {
            source_session_id: "s".into(),
            new_session_id: "s2".into(),
        })
        .await
        .expect_err("exists");
    assert_eq!(again.code(), tonic::Code::AlreadyExists, "{again:?}");
    let o = a.run(start("s2", "cat f")).await;
    o.assert_exited_ok();
    assert_eq!(o.stdout(), "1\n");
    assert_eq!(started(&o).generation, 1);

    // Removed on B: out of the catalog and the store, on every worker.
    cb.delete_session(r("s")).await.expect("rm");
    assert_eq!(
        cb.get_session(r("s")).await.expect_err("gone").code(),
        tonic::Code::NotFound
    );
    assert_eq!(shared.generation("s").await, 0);
    let left: Vec<_> = shared
        .objects()
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("/sessions/s/"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_removes_sessions_idle_fleet_wide_and_keeps_recent_and_running_ones() {
    let shared = Shared::new();
    let a = shared
        .broker_with(Mode::Direct, "A", 30_000, |c| {
            c.session_ttl_ms = Some(3_600_000);
            c.gc_interval_ms = 3_600_000;
        })
        .await;
    let b = shared.broker(Mode::Direct, "B", 30_000).await;
    a.run(start("old", "echo 1 > f")).await.assert_exited_ok();
    b.run(start("old-b", "echo 1 > f")).await.assert_exited_ok();
    a.run(start("recent", "echo 1 > f"))
        .await
        .assert_exited_ok();
    b.run(start("held", "echo 1 > f")).await.assert_exited_ok();
    let mut t = b
        .turn(start("held", "echo ready; exec sleep 100"))
        .await
        .expect("turn");
    t.wait_stdout("ready", &mut Outcome::default()).await;
    // Every session but "recent" was last touched two hours ago, as the
    // catalog sees it (the database's clock decides, not a sleep).
    shared
        .pg
        .sql(
            "UPDATE turnstile_sessions SET updated_at = updated_at - interval '2 hours' \
             WHERE session_id IN ('old', 'old-b', 'held')",
        )
        .await;
    let mut ca = a.client().await;
    let dry = ca
        .gc_sessions(pb::GcRequest { dry_run: true })
        .await
        .expect("dry run")
        .into_inner();
    assert_eq!(dry.sessions, ["old", "old-b"]);
    assert_eq!(
        shared.generation("old").await,
        1,
        "a dry run removes nothing"
    );

    // A collects "old-b" too, which only B ever ran: the catalog is
    // fleet-wide. "held" runs on B, "recent" is recent.
    let done = ca
        .gc_sessions(pb::GcRequest { dry_run: false })
        .await
        .expect("gc")
        .into_inner();
    assert_eq!(done.sessions, ["old", "old-b"]);
    for gone in ["old", "old-b"] {
        assert_eq!(shared.generation(gone).await, 0, "{gone}");
        let left: Vec<_> = shared
            .objects()
            .into_iter()
            .filter(|p| p.to_string_lossy().contains(&format!("/sessions/{gone}/")))
            .collect();
        assert!(left.is_empty(), "{gone}: {left:?}");
    }
    assert!(
        !a.state().join("sessions/old").exists(),
        "A's own copy of a collected session is removed"
    );
    assert_eq!(shared.generation("recent").await, 1);
    assert_eq!(shared.generation("held").await, 1);
    let mut cb = b.client().await;
    cb.cancel_turn(pb::SessionRef {
        session_id: "held".into(),
    })
    .await
    .expect("cancel");
    t.close_stdin().await;
    assert_eq!(t.collect().await.reason(), Reason::Cancelled);
    let o = a.run(start("recent", "cat f")).await;
    o.assert_exited_ok();
    assert_eq!(o.stdout(), "1\n");
    a.stop().await;
    b.stop().await;
}
