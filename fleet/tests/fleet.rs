//! Fleet mode against a real PostgreSQL server (started per test on a
//! throwaway data dir, see `pg`) and a `file://` archive store: workers
//! are `PgFleet`s with state dirs of their own, sharing the database and
//! the store, as two hosts would.

mod pg;

use pg::Pg;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use turnstile_broker::archive::ImportCaps;
use turnstile_broker::fleet::{Commit, Fleet, FleetConfig, FleetError, FleetLease, Hydrated};
use turnstile_broker::session::{Lease, LeasePolicy, SessionPaths, Sessions};
use turnstile_fleet::PgFleet;

const CAPS: ImportCaps = ImportCaps {
    max_bytes: 1 << 30,
    max_entries: 100_000,
};

struct Worker {
    _state: tempfile::TempDir,
    sessions: Sessions,
    fleet: Arc<PgFleet>,
}

fn config(pg: &Pg, store: &Path, worker: &str, ttl_ms: u64) -> FleetConfig {
    FleetConfig {
        database: pg.url(),
        archives: format!("file://{}", store.display()),
        worker_id: Some(worker.to_string()),
        lease_ttl_ms: ttl_ms,
        keep_generations: 2,
    }
}

async fn worker(pg: &Pg, store: &Path, name: &str) -> Worker {
    worker_ttl(pg, store, name, 30_000).await
}

async fn worker_ttl(pg: &Pg, store: &Path, name: &str, ttl_ms: u64) -> Worker {
    let state = tempfile::tempdir().expect("state dir");
    let sessions = Sessions::new(state.path().join("sessions"), None).expect("sessions");
    let fleet = PgFleet::open(&config(pg, store, name, ttl_ms), CAPS)
        .await
        .expect("fleet");
    Worker {
        _state: state,
        sessions,
        fleet: Arc::new(fleet),
    }
}

/// The start of a turn of session `id` on worker `w`: the host lease, the
/// fleet lease, hydrate.
async fn begin(w: &Worker, id: &str, turn_id: &str) -> (Lease, FleetLease, Hydrated) {
    let local = w
        .sessions
        .lease(id, turn_id, LeasePolicy::Reject)
        .await
        .expect("host lease");
    let lease = w
        .fleet
        .acquire(id, turn_id, LeasePolicy::Reject)
        .await
        .expect("fleet lease");
    let hydrated = w
        .fleet
        .hydrate(&w.sessions, &local, &lease)
        .await
        .expect("hydrate");
    (local, lease, hydrated)
}

/// One turn of session `id` on worker `w`: lease, hydrate, `change` the
/// session's files, commit, release.
async fn turn(
    w: &Worker,
    id: &str,
    turn_id: &str,
    change: impl FnOnce(&SessionPaths),
) -> (
    Hydrated,
    Result<Commit, turnstile_broker::fleet::CommitFailed>,
) {
    let (local, lease, hydrated) = begin(w, id, turn_id).await;
    let (paths, _, _) = w.sessions.ensure(&local).expect("ensure");
    change(&paths);
    let committed = w.fleet.commit(&w.sessions, &local, &lease).await;
    w.fleet.release(&lease).await.expect("release");
    (hydrated, committed)
}

fn read(path: impl AsRef<Path>) -> String {
    std::fs::read_to_string(path.as_ref())
        .unwrap_or_else(|e| panic!("{}: {e}", path.as_ref().display()))
}

/// Every archive object in the store, sorted.
fn objects(store: &Path) -> Vec<String> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, base, out);
            } else if let Ok(rel) = p.strip_prefix(base) {
                out.push(rel.display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(store, store, &mut out);
    out.sort();
    out
}

async fn generation(pg: &Pg, id: &str) -> i64 {
    pg.sql(&format!(
        "SELECT generation FROM turnstile_sessions WHERE session_id = '{id}'"
    ))
    .await
    .first()
    .map(|r| r.get(0))
    .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_is_made_once_by_brokers_starting_together_and_a_newer_one_is_refused() {
    let pg = Pg::start();
    let store = tempfile::tempdir().expect("store");
    let (ca, cb) = (
        config(&pg, store.path(), "A", 30_000),
        config(&pg, store.path(), "B", 30_000),
    );
    let (a, b) = tokio::join!(PgFleet::open(&ca, CAPS), PgFleet::open(&cb, CAPS));
    a.expect("A");
    let b = b.expect("B");
    assert_eq!(
        b.db().schema_version().await.expect("version"),
        turnstile_fleet::db::SCHEMA_VERSION
    );
    let rows = pg.sql("SELECT count(*) FROM turnstile_schema").await;
    assert_eq!(rows[0].get::<_, i64>(0), 1);

    pg.sql("UPDATE turnstile_schema SET version = 99").await;
    let err = PgFleet::open(&config(&pg, store.path(), "C", 30_000), CAPS)
        .await
        .expect_err("newer schema");
    assert!(
        matches!(err, FleetError::SchemaTooNew { found: 99, .. }),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "fleet database schema is version 99, newer than this broker knows ({}): upgrade this broker before pointing it at this database",
            turnstile_fleet::db::SCHEMA_VERSION
        )
    );
    // Refusing changed nothing.
    let rows = pg.sql("SELECT version FROM turnstile_schema").await;
    assert_eq!(rows[0].get::<_, i32>(0), 99);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_racing_200_times_never_both_hold_the_lease() {
    let pg = Pg::start();
    let store = tempfile::tempdir().expect("store");
    let a = worker(&pg, store.path(), "A").await;
    let b = worker(&pg, store.path(), "B").await;
    let mut last_token = 0;
    let (mut wins_a, mut wins_b) = (0, 0);
    for round in 0..200 {
        let (ta, tb) = (format!("a{round}"), format!("b{round}"));
        let (ra, rb) = tokio::join!(
            a.fleet.acquire("s", &ta, LeasePolicy::Reject),
            b.fleet.acquire("s", &tb, LeasePolicy::Reject),
        );
        // Neither releases before both answered: exactly one holds it, and
        // the other is told who.
        let (won, lost, by, holder, turn): (FleetLease, FleetError, &Worker, &str, &str) =
            match (ra, rb) {
                (Ok(l), Err(e)) => {
                    wins_a += 1;
                    (l, e, &a, "A", &ta)
                }
                (Err(e), Ok(l)) => {
                    wins_b += 1;
                    (l, e, &b, "B", &tb)
                }
                (ra, rb) => panic!("round {round}: want one holder, got {ra:?} and {rb:?}"),
            };
        match lost {
            FleetError::Busy {
                worker, turn: t, ..
            } => {
                assert_eq!((worker.as_str(), t.as_str()), (holder, turn));
            }
            e => panic!("round {round}: want busy, got {e}"),
        }
        assert!(won.token > last_token, "fencing tokens only grow");
        last_token = won.token;
        by.fleet.release(&won).await.expect("release");
    }
    assert_eq!(wins_a + wins_b, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_is_taken_over_and_the_old_token_can_neither_renew_nor_commit() {
    let pg = Pg::start();
    let store = tempfile::tempdir().expect("store");
    let a = worker_ttl(&pg, store.path(), "A", 200).await;
    let b = worker(&pg, store.path(), "B").await;
    // Generation 1, by A.
    let (_, c) = turn(&a, "s", "t0", |p| {
        std::fs::write(p.work.join("f"), "one").expect("write")
    })
    .await;
    assert!(matches!(
        c.expect("commit"),
        Commit::Advanced { generation: 1, .. }
    ));
    let objects_before = objects(store.path());

    // A takes the lease for a turn and stops renewing it (a stalled
    // worker). B asks while it is held: refused.
    let local_a = a
        .sessions
        .lease("s", "t1", LeasePolicy::Reject)
        .await
        .expect("host");
    let lease_a = a
        .fleet
        .acquire("s", "t1", LeasePolicy::Reject)
        .await
        .expect("A");
    a.fleet
        .hydrate(&a.sessions, &local_a, &lease_a)
        .await
        .expect("hydrate");
    // B waits: it is granted once A's 200 ms lease expired by the
    // database's clock.
    let lease_b = b
        .fleet
        .acquire("s", "u1", LeasePolicy::Wait(Duration::from_secs(60)))
        .await
        .expect("B after expiry");
    assert!(lease_b.token > lease_a.token);
    assert_eq!(lease_b.generation, 1);

    let err = a.fleet.renew(&lease_a).await.expect_err("renew");
    assert_eq!(
        err.to_string(),
        format!(
            "lease of session s lost: taken over by turn u1 on worker B (token {})",
            lease_b.token
        )
    );
    // A's turn changed files; its commit is fenced off and changes nothing
    // committed; its files are kept under the id the error names.
    std::fs::write(a.sessions.paths("s").work.join("f"), "stale").expect("write");
    let failed = a
        .fleet
        .commit(&a.sessions, &local_a, &lease_a)
        .await
        .expect_err("fenced");
    assert!(
        matches!(failed.error, FleetError::Fenced { .. }),
        "{failed}"
    );
    let kept = failed.kept_as.clone().expect("kept");
    assert!(
        failed
            .to_string()
            .ends_with(&format!("the turn's files are kept as session {kept}")),
        "{failed}"
    );
    assert_eq!(read(a.sessions.paths(&kept).work.join("f")), "stale");
    assert_eq!(generation(&pg, "s").await, 1);
    assert_eq!(
        objects(store.path()),
        objects_before,
        "no archive left behind"
    );
    // B still holds it and renews.
    b.fleet.renew(&lease_b).await.expect("B renews");
    b.fleet.release(&lease_b).await.expect("release");
    drop(local_a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_moves_between_workers_and_unchanged_turns_write_nothing() {
    let pg = Pg::start();
    let store = tempfile::tempdir().expect("store");
    let a = worker(&pg, store.path(), "A").await;
    let b = worker(&pg, store.path(), "B").await;

    // Turn 1 on A: files and a history.
    let (h, c) = turn(&a, "s", "t1", |p| {
        std::fs::create_dir_all(p.home.join(".claude/projects")).expect("mkdir");
        std::fs::write(p.home.join(".claude/projects/history.jsonl"), "turn 1\n").expect("write");
        std::fs::write(p.work.join("notes.md"), "from A").expect("write");
    })
    .await;
    assert_eq!(h.restored_bytes, None, "nothing to restore yet");
    assert!(matches!(
        c.expect("commit"),
        Commit::Advanced { generation: 1, .. }
    ));

    // Turn 2 on B sees them, and adds its own.
    let (h, c) = turn(&b, "s", "t2", |p| {
        assert_eq!(
            read(p.home.join(".claude/projects/history.jsonl")),
            "turn 1\n"
        );
        assert_eq!(read(p.work.join("notes.md")), "from A");
        std::fs::write(p.work.join("notes.md"), "from B").expect("write");
    })
    .await;
    assert_eq!(h.generation, 1);
    assert!(h.restored_bytes.is_some());
    assert!(matches!(
        c.expect("commit"),
        Commit::Advanced { generation: 2, .. }
    ));

    // Turn 3 on A: its stale copy is refreshed with B's change.
    let (h, c) = turn(&a, "s", "t3", |p| {
        assert_eq!(read(p.work.join("notes.md")), "from B");
    })
    .await;
    assert_eq!(h.generation, 2);
    assert!(h.restored_bytes.is_some(), "A's copy was stale");
    assert_eq!(h.kept_as, None, "A's copy had nothing uncommitted");
    // Unchanged: nothing uploaded, no new generation, nothing in the store.
    assert_eq!(c.expect("commit"), Commit::Unchanged { generation: 2 });
    let before = objects(store.path());
    let updated = pg
        .sql("SELECT updated_at::text, generation FROM turnstile_sessions WHERE session_id = 's'")
        .await;
    // Turn 4 on A: up to date, nothing restored; unchanged again.
    let (h, c) = turn(&a, "s", "t4", |_| {}).await;
    assert_eq!(h.restored_bytes, None, "A's copy is current");
    assert_eq!(c.expect("commit"), Commit::Unchanged { generation: 2 });
    assert_eq!(objects(store.path()), before);
    let after = pg
        .sql("SELECT updated_at::text, generation FROM turnstile_sessions WHERE session_id = 's'")
        .await;
    assert_eq!(after[0].get::<_, i64>(1), updated[0].get::<_, i64>(1));

    // Older archives beyond the newest two (keep_generations) go.
    for (i, w) in [(5, &b), (6, &a)] {
        turn(w, "s", &format!("t{i}"), |p| {
            std::fs::write(p.work.join("n"), format!("{i}")).expect("write")
        })
        .await
        .1
        .expect("commit");
    }
    assert_eq!(generation(&pg, "s").await, 4);
    let kept: Vec<String> = objects(store.path());
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert!(kept[0].starts_with("sessions/s/000000000003-"), "{kept:?}");
    assert!(kept[1].starts_with("sessions/s/000000000004-"), "{kept:?}");
    let rows = pg
        .sql("SELECT generation FROM turnstile_archives ORDER BY 1")
        .await;
    let gens: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(gens, vec![3, 4]);

    // The catalog lists the session, free, at generation 4, last run by A.
    let cat = b.fleet.catalog().await.expect("catalog");
    assert_eq!(cat.len(), 1);
    assert_eq!(cat[0].session_id, "s");
    assert_eq!(cat[0].generation, 4);
    assert_eq!(cat[0].holder, None);
    assert_eq!(cat[0].last_worker.as_deref(), Some("A"));
    assert_eq!(cat[0].last_turn_id.as_deref(), Some("t6"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_no_turn_committed_are_kept_aside_not_overwritten() {
    let pg = Pg::start();
    let store = tempfile::tempdir().expect("store");
    let a = worker(&pg, store.path(), "A").await;
    let b = worker(&pg, store.path(), "B").await;
    turn(&a, "s", "t1", |p| {
        std::fs::write(p.work.join("f"), "1").expect("w")
    })
    .await
    .1
    .expect("commit");
    // A's next turn dies mid-way (worker killed): hydrated, files changed,
    // no commit, and the lease is gone.
    {
        let local = a
            .sessions
            .lease("s", "t2", LeasePolicy::Reject)
            .await
            .expect("host");
        let lease = a
            .fleet
            .acquire("s", "t2", LeasePolicy::Reject)
            .await
            .expect("A");
        a.fleet
            .hydrate(&a.sessions, &local, &lease)
            .await
            .expect("hydrate");
        std::fs::write(a.sessions.paths("s").work.join("f"), "uncommitted").expect("w");
        pg.sql(
            "UPDATE turnstile_sessions SET expires_at = clock_timestamp() - interval '1 second'",
        )
        .await;
    }
    // B runs the session from the last committed generation.
    turn(&b, "s", "u1", |p| {
        assert_eq!(read(p.work.join("f")), "1");
        std::fs::write(p.work.join("f"), "B").expect("w");
    })
    .await
    .1
    .expect("commit");
    // A's next turn gets B's state; A's uncommitted files are kept aside.
    let (h, _) = turn(&a, "s", "t3", |p| assert_eq!(read(p.work.join("f")), "B")).await;
    let kept = h.kept_as.expect("kept");
    assert_eq!(read(a.sessions.paths(&kept).work.join("f")), "uncommitted");
    // The kept copy is a session of its own, with no fleet record.
    assert!(!a.sessions.paths(&kept).dir.join("fleet.json").exists());
    assert_eq!(
        a.sessions.meta(&kept).expect("meta").session_id,
        kept,
        "its metadata follows its new id"
    );
}

/// A tar whose first entry has `name` (raw bytes) and `kind`.
fn hostile_tar(name: &[u8], kind: tar::EntryType, link: Option<&[u8]>) -> Vec<u8> {
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
        h.set_entry_type(kind);
        h.set_mode(0o644);
        if let Some(l) = link {
            h.as_old_mut().linkname[..l.len()].copy_from_slice(l);
        }
        let data: &[u8] = if kind == tar::EntryType::Regular {
            b"pwned"
        } else {
            b""
        };
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data).expect("entry");
        b.finish().expect("finish");
    }
    out
}

/// Worker `w` takes session s's leases, hydrates, and lets them go.
async fn hydrate_once(w: &Worker) -> Result<Hydrated, FleetError> {
    let local = w
        .sessions
        .lease("s", "u", LeasePolicy::Reject)
        .await
        .expect("host");
    let lease = w
        .fleet
        .acquire("s", "u", LeasePolicy::Reject)
        .await
        .expect("fleet lease");
    let r = w.fleet.hydrate(&w.sessions, &local, &lease).await;
    w.fleet.release(&lease).await.expect("release");
    r
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    turnstile_fleet::store::hex(&sha2::Sha256::digest(bytes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_archive_object_is_refused_at_hydrate_naming_session_and_generation() {
    let pg = Pg::start();
    let store = tempfile::tempdir().expect("store");
    let a = worker(&pg, store.path(), "A").await;
    let b = worker(&pg, store.path(), "B").await;
    turn(&a, "s", "t1", |p| {
        std::fs::write(p.work.join("f"), "1").expect("w")
    })
    .await
    .1
    .expect("commit");
    let object = store.path().join(&objects(store.path())[0]);
    let good = std::fs::read(&object).expect("object");

    // Bytes changed in the store: refused before anything is extracted.
    let mut tampered = good.clone();
    let at = tampered.len() / 3;
    tampered[at] ^= 0xff;
    std::fs::write(&object, &tampered).expect("tamper");
    let err = hydrate_once(&b).await.expect_err("tampered");
    let msg = err.to_string();
    assert!(
        msg.starts_with("archive of session s generation 1 refused: its content"),
        "{msg}"
    );
    assert!(!b.sessions.paths("s").dir.exists(), "nothing of it on disk");

    // Hostile archives the catalog vouches for (a writer with database
    // access): the import rules refuse each; nothing escapes.
    let escape = store.path().join("escaped");
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            hostile_tar(b"work/../../escaped", tar::EntryType::Regular, None),
            "contains '..'",
        ),
        (
            hostile_tar(b"/tmp/escaped", tar::EntryType::Regular, None),
            "absolute path",
        ),
        (
            hostile_tar(b"etc/passwd", tar::EntryType::Regular, None),
            "not under home/, work/",
        ),
        (hostile_tar(b"work/dev", tar::EntryType::Char, None), ""),
        (b"not a tar at all, just bytes".repeat(40), ""),
        (Vec::new(), ""),
    ];
    for (bytes, why) in cases {
        std::fs::write(&object, &bytes).expect("write");
        pg.sql(&format!(
            "UPDATE turnstile_sessions SET archive_sha256 = '{}', archive_bytes = {}",
            sha256_hex(&bytes),
            bytes.len()
        ))
        .await;
        let err = hydrate_once(&b).await.expect_err("hostile");
        let msg = err.to_string();
        assert!(
            msg.starts_with("archive of session s generation 1 refused: "),
            "{msg}"
        );
        assert!(msg.contains(why), "{msg}");
        assert!(
            !b.sessions.paths("s").dir.exists(),
            "{msg}: nothing on disk"
        );
        assert!(!escape.exists());
    }

    // The good archive back: B hydrates it.
    std::fs::write(&object, &good).expect("restore");
    pg.sql(&format!(
        "UPDATE turnstile_sessions SET archive_sha256 = '{}', archive_bytes = {}",
        sha256_hex(&good),
        good.len()
    ))
    .await;
    hydrate_once(&b).await.expect("good archive");
    assert_eq!(read(b.sessions.paths("s").work.join("f")), "1");
}

/// Names in worker `w`'s sessions root, sorted (staging trees start with '.').
fn sessions_root(w: &Worker) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(w.sessions.root())
        .expect("sessions root")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_not_as_committed_is_refused_and_the_prior_local_copy_stays() {
    let pg = Pg::start();
    let store = tempfile::tempdir().expect("store");
    let a = worker(&pg, store.path(), "A").await;
    let b = worker(&pg, store.path(), "B").await;
    let write = |text: &'static str| {
        move |p: &SessionPaths| std::fs::write(p.work.join("f"), text).expect("w")
    };
    turn(&a, "s", "t1", write("gen one"))
        .await
        .1
        .expect("commit");
    // B holds generation 1 (hydrated, unchanged); A moves on to 2.
    turn(&b, "s", "t2", |_| {}).await.1.expect("unchanged");
    turn(&a, "s", "t3", write("gen two"))
        .await
        .1
        .expect("commit");
    assert_eq!(generation(&pg, "s").await, 2);
    let object = objects(store.path())
        .into_iter()
        .find(|o| o.starts_with("sessions/s/000000000002-"))
        .map(|o| store.path().join(o))
        .expect("generation 2's object");
    let good = std::fs::read(&object).expect("object");
    let mark = b.sessions.paths("s").dir.join("fleet.json");
    let mark_before = std::fs::read(&mark).expect("B's record");
    assert_eq!(read(b.sessions.paths("s").work.join("f")), "gen one");

    // A valid archive of another session, exactly as long as the
    // committed one (the import takes it whole: only the digest at the
    // object's end tells); longer and shorter ones, each still a valid tar.
    let at = good
        .windows(7)
        .position(|w| w == b"gen two")
        .expect("the file's data in the archive");
    let mut forged = good.clone();
    forged[at..at + 7].copy_from_slice(b"forged!");
    let mut longer = good.clone();
    longer.extend_from_slice(&[0u8; 1024]);
    let shorter = good[..good.len() - 512].to_vec();
    let n = good.len();
    for (bytes, why) in [
        (forged, "its content (".to_string()),
        (
            longer,
            format!("the object is {} bytes, the catalog says {n}", n + 1024),
        ),
        (
            shorter,
            format!("the object is {} bytes, the catalog says {n}", n - 512),
        ),
    ] {
        std::fs::write(&object, &bytes).expect("swap the object");
        let err = hydrate_once(&b).await.expect_err("not as committed");
        let msg = err.to_string();
        assert!(matches!(err, FleetError::Archive { .. }), "{msg}");
        assert!(
            msg.starts_with("archive of session s generation 2 refused: ") && msg.contains(&why),
            "{msg}"
        );
        // B's copy, its record and the catalog are as they were; no
        // staging tree is left.
        assert_eq!(read(b.sessions.paths("s").work.join("f")), "gen one");
        assert_eq!(std::fs::read(&mark).expect("B's record"), mark_before);
        assert_eq!(sessions_root(&b), vec!["s".to_string()]);
        assert_eq!(generation(&pg, "s").await, 2);
    }

    // The committed object back: B hydrates generation 2.
    std::fs::write(&object, &good).expect("restore");
    let h = hydrate_once(&b).await.expect("as committed");
    assert_eq!(h.generation, 2);
    assert_eq!(read(b.sessions.paths("s").work.join("f")), "gen two");
    assert_eq!(sessions_root(&b), vec!["s".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_store_fails_the_commit_and_keeps_the_last_generation_runnable() {
    let pg = Pg::start();
    let store = tempfile::tempdir().expect("store");
    let a = worker(&pg, store.path(), "A").await;
    let b = worker(&pg, store.path(), "B").await;
    turn(&a, "s", "t1", |p| {
        std::fs::write(p.work.join("f"), "1").expect("w")
    })
    .await
    .1
    .expect("commit");
    // The next archive's object name is taken by a directory: the upload
    // fails (as with a store that refuses writes), even for root.
    let local = a
        .sessions
        .lease("s", "t2", LeasePolicy::Reject)
        .await
        .expect("host");
    let lease = a
        .fleet
        .acquire("s", "t2", LeasePolicy::Reject)
        .await
        .expect("A");
    a.fleet
        .hydrate(&a.sessions, &local, &lease)
        .await
        .expect("hydrate");
    let blocked = store
        .path()
        .join(format!("sessions/s/000000000002-{}.tar", lease.token));
    std::fs::create_dir_all(blocked.join("x")).expect("block");
    std::fs::write(a.sessions.paths("s").work.join("f"), "2").expect("w");
    let failed = a
        .fleet
        .commit(&a.sessions, &local, &lease)
        .await
        .expect_err("store refuses");
    assert!(matches!(failed.error, FleetError::Store(_)), "{failed}");
    let msg = failed.to_string();
    assert!(msg.starts_with("archive store: "), "{msg}");
    let kept = failed.kept_as.clone().expect("kept");
    assert_eq!(read(a.sessions.paths(&kept).work.join("f")), "2");
    a.fleet.release(&lease).await.expect("release");
    drop(local);
    assert_eq!(generation(&pg, "s").await, 1);
    // Generation 1 is intact and runnable, on B and on A.
    turn(&b, "s", "u1", |p| assert_eq!(read(p.work.join("f")), "1"))
        .await
        .1
        .expect("commit");
    turn(&a, "s", "t3", |p| assert_eq!(read(p.work.join("f")), "1"))
        .await
        .1
        .expect("commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_database_fails_renewal_clearly_and_the_lease_is_lost_within_the_ttl() {
    let pg = Pg::start();
    let store = tempfile::tempdir().expect("store");
    let a = worker_ttl(&pg, store.path(), "A", 1_000).await;
    let lease = a
        .fleet
        .acquire("s", "t1", LeasePolicy::Reject)
        .await
        .expect("A");
    a.fleet.renew(&lease).await.expect("renews while up");

    let stop = tokio_util::sync::CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let fleet: Arc<dyn Fleet> = a.fleet.clone();
    let keeper = tokio::spawn(turnstile_broker::fleet::keep_alive(
        fleet,
        lease.clone(),
        stop.clone(),
        move |e| {
            let _ = tx.send(e);
        },
    ));
    pg.stop();
    let err = a.fleet.renew(&lease).await.expect_err("database down");
    let msg = err.to_string();
    assert!(msg.starts_with("fleet database: cannot"), "{msg}");
    assert!(msg.contains("127.0.0.1:"), "names the database: {msg}");
    // The keeper gives the lease up on its own (within the TTL; the
    // deadline here is only a guard against a hang).
    let lost = tokio::time::timeout(Duration::from_secs(30), rx)
        .await
        .expect("lease lost in time")
        .expect("lost");
    assert!(
        lost.to_string().starts_with("lease of session s lost: "),
        "{lost}"
    );
    keeper.await.expect("keeper");

    // The database returns: the session works again (A's old lease expires
    // by the database's clock; a waiting acquire gets it).
    pg.restart();
    let again = a
        .fleet
        .acquire("s", "t2", LeasePolicy::Wait(Duration::from_secs(60)))
        .await
        .expect("after the database returned");
    assert!(again.token > lease.token);
    a.fleet.release(&again).await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_checks_database_schema_and_store_each_with_a_remedy() {
    use turnstile_fleet::doctor::checks;
    let pg = Pg::start();
    let store = tempfile::tempdir().expect("store");
    let cfg = config(&pg, store.path(), "A", 30_000);
    let names = |c: &[turnstile_fleet::doctor::FleetCheck]| {
        c.iter().map(|c| (c.name, c.ok)).collect::<Vec<_>>()
    };
    let got = checks(&cfg).await;
    assert_eq!(
        names(&got),
        vec![
            ("fleet config", true),
            ("fleet database", true),
            ("fleet schema", true),
            ("archive store", true)
        ],
        "{got:?}"
    );
    assert!(got[2].detail.starts_with("none yet"), "{got:?}");
    assert!(objects(store.path()).is_empty(), "the probe is deleted");

    // A schema from a newer broker.
    PgFleet::open(&cfg, CAPS).await.expect("migrate");
    pg.sql("UPDATE turnstile_schema SET version = 99").await;
    let got = checks(&cfg).await;
    assert!(!got[2].ok, "{got:?}");
    assert!(
        got[2]
            .remedy
            .as_deref()
            .is_some_and(|r| r.starts_with("upgrade this broker"))
    );

    // A store that is not there, and a database that is down.
    let bad = FleetConfig {
        archives: format!("file://{}/missing", store.path().display()),
        ..cfg.clone()
    };
    pg.stop();
    let got = checks(&bad).await;
    assert_eq!(
        names(&got),
        vec![
            ("fleet config", true),
            ("fleet database", false),
            ("archive store", false)
        ],
        "{got:?}"
    );
    assert!(got[1].detail.contains("cannot"), "{got:?}");
    assert!(got[2].detail.contains("is not a directory"), "{got:?}");
    assert!(got.iter().all(|c| c.ok || c.remedy.is_some()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_copy_stays_watched_and_only_a_change_costs_a_walk_or_an_upload() {
    let pg = Pg::start();
    let store = tempfile::tempdir().expect("store");
    let a = worker(&pg, store.path(), "A").await;
    let (_, c) = turn(&a, "w", "t1", |p| {
        std::fs::create_dir_all(p.home.join("deep/er")).expect("mkdir");
        std::fs::write(p.home.join("deep/er/history"), "one").expect("write");
    })
    .await;
    assert!(
        matches!(c, Ok(Commit::Advanced { generation: 1, .. })),
        "{c:?}"
    );
    assert_eq!(a.fleet.watched(), (1, 0), "the committed copy is watched");

    // A turn that only reads: the watch goes with the turn and comes back.
    let before = objects(store.path());
    let (local, lease, _) = begin(&a, "w", "t2").await;
    assert_eq!(a.fleet.watched(), (0, 1), "the turn holds the watch");
    assert_eq!(
        read(a.sessions.paths("w").home.join("deep/er/history")),
        "one"
    );
    let c = a.fleet.commit(&a.sessions, &local, &lease).await;
    assert!(
        matches!(c, Ok(Commit::Unchanged { generation: 1 })),
        "{c:?}"
    );
    a.fleet.release(&lease).await.expect("release");
    drop(local);
    assert_eq!(a.fleet.watched(), (1, 0));
    assert_eq!(objects(store.path()), before, "nothing uploaded");

    // A file opened for writing and closed unchanged: seen, walked, and
    // found unchanged by the fingerprint (nothing uploaded); watched again.
    let (_, c) = turn(&a, "w", "t3", |p| {
        drop(
            std::fs::OpenOptions::new()
                .append(true)
                .open(p.home.join("deep/er/history"))
                .expect("open"),
        )
    })
    .await;
    assert!(
        matches!(c, Ok(Commit::Unchanged { generation: 1 })),
        "{c:?}"
    );
    assert_eq!(objects(store.path()), before, "nothing uploaded");
    assert_eq!(a.fleet.watched(), (1, 0));

    // A change made between turns (not by a turn) is seen by the watch
    // kept since the last commit, and the next turn commits it.
    std::fs::write(a.sessions.paths("w").home.join("deep/er/history"), "two").expect("write");
    let (h, c) = turn(&a, "w", "t4", |_| {}).await;
    assert_eq!(h.restored_bytes, None);
    assert!(
        matches!(c, Ok(Commit::Advanced { generation: 2, .. })),
        "{c:?}"
    );
    let b = worker(&pg, store.path(), "B").await;
    let (h, c) = turn(&b, "w", "t5", |_| {}).await;
    assert!(h.restored_bytes.is_some());
    assert!(
        matches!(c, Ok(Commit::Unchanged { generation: 2 })),
        "{c:?}"
    );
    assert_eq!(
        read(b.sessions.paths("w").home.join("deep/er/history")),
        "two"
    );
    assert_eq!(
        b.fleet.watched(),
        (1, 0),
        "a restored copy is watched from its restore"
    );

    let (_, c) = turn(&b, "w", "t5b", |p| {
        std::fs::write(p.work.join("from-b"), "b").expect("write")
    })
    .await;
    assert!(
        matches!(c, Ok(Commit::Advanced { generation: 3, .. })),
        "{c:?}"
    );

    // A's copy is stale now: hydrate restores it and drops the old watch.
    let (h, c) = turn(&a, "w", "t6", |p| {
        std::fs::write(p.work.join("new"), "x").expect("write")
    })
    .await;
    assert!(h.restored_bytes.is_some(), "A's copy was stale");
    assert!(
        matches!(c, Ok(Commit::Advanced { generation: 4, .. })),
        "{c:?}"
    );
    assert_eq!(read(a.sessions.paths("w").work.join("from-b")), "b");
    assert_eq!(a.fleet.watched(), (1, 0));

    // A turn that ends without its commit leaves no watch behind.
    let (_local, lease, _) = begin(&a, "w", "t7").await;
    a.fleet.release(&lease).await.expect("release");
    assert_eq!(a.fleet.watched(), (0, 0));
}

/// The copy's fleet record: whether it names a turn in progress.
fn marked_turn(w: &Worker, id: &str) -> Option<String> {
    let dir = turnstile_broker::tree::open_dir_path(&w.sessions.paths(id).dir).expect("open");
    turnstile_fleet::local::read_mark(&dir)
        .expect("a record")
        .turn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_copy_is_marked_while_the_lease_is_asked_for_and_put_back_if_refused() {
    let pg = Pg::start();
    let store = tempfile::tempdir().expect("store");
    let a = worker(&pg, store.path(), "A").await;
    let b = worker(&pg, store.path(), "B").await;
    let (_, c) = turn(&a, "m", "t1", |p| {
        std::fs::write(p.home.join("history"), "one").expect("write")
    })
    .await;
    assert!(
        matches!(c, Ok(Commit::Advanced { generation: 1, .. })),
        "{c:?}"
    );
    assert_eq!(marked_turn(&a, "m"), None);

    // B holds the session: A's turn is refused, and A's record is as it was.
    let held = b
        .fleet
        .acquire("m", "tb", LeasePolicy::Reject)
        .await
        .expect("B");
    let local = a
        .sessions
        .lease("m", "t2", LeasePolicy::Reject)
        .await
        .expect("host lease");
    let refused = a
        .fleet
        .acquire_for(&a.sessions, &local, "t2", LeasePolicy::Reject)
        .await
        .expect_err("busy");
    assert!(matches!(refused, FleetError::Busy { .. }), "{refused:?}");
    assert_eq!(marked_turn(&a, "m"), None, "put back");
    b.fleet.release(&held).await.expect("release");

    // Granted: the record names the turn before hydrate runs, and hydrate
    // takes the copy as current.
    let lease = a
        .fleet
        .acquire_for(&a.sessions, &local, "t2", LeasePolicy::Reject)
        .await
        .expect("lease");
    assert_eq!(marked_turn(&a, "m").as_deref(), Some("t2"));
    let h = a
        .fleet
        .hydrate(&a.sessions, &local, &lease)
        .await
        .expect("hydrate");
    assert_eq!(h.restored_bytes, None);
    assert_eq!(h.generation, 1);
    let c = a.fleet.commit(&a.sessions, &local, &lease).await;
    assert!(
        matches!(c, Ok(Commit::Unchanged { generation: 1 })),
        "{c:?}"
    );
    assert_eq!(marked_turn(&a, "m"), None, "settled");
    a.fleet.release(&lease).await.expect("release");

    // Granted but released without a hydrate (the turn never ran): put back.
    let lease = a
        .fleet
        .acquire_for(&a.sessions, &local, "t3", LeasePolicy::Reject)
        .await
        .expect("lease");
    assert_eq!(marked_turn(&a, "m").as_deref(), Some("t3"));
    a.fleet.release(&lease).await.expect("release");
    assert_eq!(marked_turn(&a, "m"), None, "put back");
}

/// Rewrites the copy's fleet record as if written in another host boot,
/// with `turn` as the turn in progress.
fn from_another_boot(w: &Worker, id: &str, turn: Option<&str>) {
    let dir = turnstile_broker::tree::open_dir_path(&w.sessions.paths(id).dir).expect("open");
    let mark = turnstile_fleet::local::Mark {
        boot: Some("an-earlier-boot".into()),
        turn: turn.map(str::to_string),
        ..turnstile_fleet::local::read_mark(&dir).expect("a record")
    };
    turnstile_fleet::local::write_mark(&dir, &mark, true).expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_recorded_before_the_host_restarted_is_hydrated_again_never_trusted() {
    let pg = Pg::start();
    let store = tempfile::tempdir().expect("store");
    let a = worker(&pg, store.path(), "A").await;
    let (_, c) = turn(&a, "r", "t1", |p| {
        std::fs::write(p.home.join("history"), "committed").expect("write")
    })
    .await;
    assert!(
        matches!(c, Ok(Commit::Advanced { generation: 1, .. })),
        "{c:?}"
    );
    let history = a.sessions.paths("r").home.join("history");

    // What a power loss can leave of unsynced data: the file lost its
    // content. A record of this boot would vouch for it; one of another
    // boot does not, and the copy is restored from its archive.
    std::fs::write(&history, "").expect("truncate");
    from_another_boot(&a, "r", None);
    let (h, c) = turn(&a, "r", "t2", |_| {}).await;
    assert!(h.restored_bytes.is_some(), "restored: {h:?}");
    assert_eq!(h.kept_as, None, "nothing uncommitted to keep");
    assert!(
        matches!(c, Ok(Commit::Unchanged { generation: 1 })),
        "{c:?}"
    );
    assert_eq!(read(&history), "committed");

    // With a turn in progress at the restart, the copy may hold changes no
    // turn committed: kept aside, and the session restored.
    std::fs::write(&history, "uncommitted").expect("write");
    from_another_boot(&a, "r", Some("t3"));
    let (h, _) = turn(&a, "r", "t4", |_| {}).await;
    assert!(h.restored_bytes.is_some(), "restored: {h:?}");
    let kept = h.kept_as.expect("kept aside");
    assert_eq!(
        read(a.sessions.paths(&kept).home.join("history")),
        "uncommitted"
    );
    assert_eq!(read(&history), "committed");
}
