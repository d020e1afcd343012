//! Turnstile fleet mode: any worker resumes any session.
//!
//! [`PgFleet`] implements the broker's [`Fleet`] trait with the session
//! catalog in PostgreSQL ([`db`]) and session archives in an object store
//! ([`store`]). What each worker keeps beside its local copy is in
//! [`local`].
//!
//! A turn's life in fleet mode:
//!
//! 1. **acquire**: the session's lease, with a fencing token, by one
//!    statement that grants it only if it is free or expired (the
//!    database's clock decides);
//! 2. **hydrate**: if the local copy is not the catalog's generation, the
//!    archive is streamed from the store into an import under the broker's
//!    import rules into staging, its size and SHA-256 checked against the
//!    catalog at its end, and only then swapped in atomically. A local copy with changes no turn committed (a worker
//!    killed mid-turn, a failed commit) is never overwritten: it is kept
//!    under a new session id;
//! 3. the turn runs, renewing the lease ([`turnstile_broker::fleet::keep_alive`]);
//! 4. **commit**: if home or work changed (fingerprint), a new immutable
//!    archive is uploaded and the generation advanced by one statement that
//!    only succeeds for the current token; a commit that loses keeps the
//!    turn's files under a new session id. Archives beyond the newest
//!    `keep_generations` are deleted;
//! 5. **release**.

pub mod db;
pub mod doctor;
pub mod local;
pub mod store;
pub mod watch;

use crate::db::Db;
use crate::local::Mark;
use crate::store::{Archives, DownloadError};
use crate::watch::{Armed, Watch, Watches};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tracing::{debug, info, warn};
use turnstile_broker::archive::{ImportCaps, ImportError};
use turnstile_broker::error::BrokerError;
use turnstile_broker::fleet::{
    ArchiveRef, BoxFuture, CatalogEntry, Commit, CommitFailed, Fleet, FleetConfig, FleetError,
    FleetLease, Hydrated,
};
use turnstile_broker::session::{Lease, LeasePolicy, Sessions};

/// Fleet mode over PostgreSQL and an object store.
#[derive(Debug)]
pub struct PgFleet {
    worker: String,
    ttl: Duration,
    keep: u32,
    db: Db,
    archives: Archives,
    caps: ImportCaps,
    /// Change watches on local copies (see [`watch`]).
    watches: Watches,
    /// What each turn's acquire did to its local copy, by fencing token,
    /// until its hydrate (or release).
    early: std::sync::Mutex<std::collections::HashMap<i64, Early>>,
}

fn store_err(e: impl std::fmt::Display) -> FleetError {
    FleetError::Store(e.to_string())
}

/// Runs blocking work that borrows from the caller: on a multi-threaded
/// runtime the worker thread hands its other tasks off first.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// A local copy that its record says is clean (no turn since its
/// fingerprint), marked as in a turn while that turn's lease was asked for:
/// its record as it was.
#[derive(Debug)]
struct Early {
    path: std::path::PathBuf,
    mark: Mark,
}

impl Early {
    /// Marks the copy at `path` as in turn `turn` if its record says it is
    /// clean; `None` for any other copy (hydrate looks at it).
    fn mark(path: std::path::PathBuf, turn: String) -> Option<Early> {
        let dir = local::open_session_dir(&path).ok()??;
        let mark = local::read_mark(&dir)?;
        if mark.turn.is_some() || mark.fingerprint.is_none() {
            return None;
        }
        let next = Mark {
            turn: Some(turn),
            ..mark.clone()
        };
        local::write_mark(&dir, &next, false).ok()?;
        Some(Early { path, mark })
    }

    /// Puts the record back: the turn never ran.
    fn undo(self) {
        let put = local::open_session_dir(&self.path)
            .and_then(|dir| dir.map_or(Ok(()), |d| local::write_mark(&d, &self.mark, false)));
        if let Err(e) = put {
            // The next turn fingerprints the copy.
            warn!(path = %self.path.display(), error = %e, "cannot restore the fleet record of a turn that did not run");
        }
    }
}

/// Reads through a shared reader (one the caller still checks after).
struct Borrowed<'a, R>(&'a std::cell::RefCell<R>);

impl<R: std::io::Read> std::io::Read for Borrowed<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.borrow_mut().read(buf)
    }
}

/// What hydrate finds of the local copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Local {
    /// None here.
    Absent,
    /// The catalog's generation, unchanged.
    Current,
    /// A session with no committed generation, and a local copy: the
    /// local copy becomes the session's state (its first commit uploads it).
    Adopt,
    /// An older generation, unchanged: replaced.
    Stale,
    /// Changes no turn committed, or a copy of unknown origin: kept aside.
    Keep,
}

impl PgFleet {
    /// Opens the archive store, connects to the database and brings its
    /// schema to this version (refusing a newer one).
    pub async fn open(config: &FleetConfig, caps: ImportCaps) -> Result<PgFleet, FleetError> {
        config.validate().map_err(FleetError::Database)?;
        let archives = Archives::open(&config.archives).map_err(store_err)?;
        let db = Db::new(&config.database, db::STATEMENT_TIMEOUT)?;
        let found = db.migrate().await?;
        let worker = config.worker_id();
        info!(
            worker.id = %worker,
            database = %db.shown(),
            archives = %archives.url(),
            schema = db::SCHEMA_VERSION,
            migrated_from = found,
            "fleet mode"
        );
        Ok(PgFleet {
            worker,
            ttl: config.lease_ttl(),
            keep: config.keep_generations,
            db,
            archives,
            caps,
            watches: Watches::default(),
            early: std::sync::Mutex::default(),
        })
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    pub fn archives(&self) -> &Archives {
        &self.archives
    }

    /// Local copies under a change watch: (between turns, in a turn).
    pub fn watched(&self) -> (usize, usize) {
        self.watches.counts()
    }

    /// A watch on session dir `dir`, whose fleet record is `generation`
    /// and `fingerprint` (just computed): `None` without one (a tree too
    /// big, no inotify left, an error), and its next commit fingerprints.
    fn start_watch(
        &self,
        id: &str,
        dir: impl AsFd,
        generation: i64,
        fingerprint: &str,
    ) -> Option<Armed> {
        match blocking(|| Watch::start(dir)) {
            Ok(w) => w.map(|watch| Armed {
                watch,
                generation,
                fingerprint: fingerprint.to_string(),
            }),
            Err(e) => {
                warn!(session.id = %id, error = %e, "cannot watch the session for changes: its next commit fingerprints it");
                None
            }
        }
    }

    fn ttl_ms(&self) -> i64 {
        i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX)
    }

    async fn acquire_inner(
        &self,
        session: &str,
        turn: &str,
        policy: LeasePolicy,
    ) -> Result<FleetLease, FleetError> {
        let started = Instant::now();
        let deadline = match policy {
            LeasePolicy::Reject => None,
            LeasePolicy::Wait(max) => Some(started + max),
        };
        let mut pause = Duration::from_millis(20);
        loop {
            let sent = Instant::now();
            let held = match self
                .db
                .acquire(session, &self.worker, turn, self.ttl_ms())
                .await?
            {
                Ok(a) => {
                    return Ok(FleetLease {
                        session_id: session.to_string(),
                        turn_id: turn.to_string(),
                        token: a.token,
                        generation: a.generation,
                        archive: a.archive,
                        acquired_at: sent,
                    });
                }
                Err(held) => held,
            };
            let now = Instant::now();
            match deadline {
                None => {
                    return Err(FleetError::Busy {
                        session: session.to_string(),
                        worker: held.worker,
                        turn: held.turn,
                    });
                }
                Some(d) if now >= d => {
                    return Err(FleetError::BusyAfterWait {
                        session: session.to_string(),
                        worker: held.worker,
                        turn: held.turn,
                        waited_ms: u64::try_from(now.duration_since(started).as_millis())
                            .unwrap_or(u64::MAX),
                    });
                }
                Some(d) => {
                    tokio::time::sleep_until((now + pause).min(d)).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
            }
        }
    }

    /// [`Fleet::acquire_for`]: the copy is looked at and marked on the
    /// blocking pool while the lease's statement is in flight.
    async fn acquire_for_inner(
        &self,
        sessions: &Sessions,
        local: &Lease,
        turn: &str,
        policy: LeasePolicy,
    ) -> Result<FleetLease, FleetError> {
        let id = local.session_id();
        let (path, t) = (sessions.paths(id).dir, turn.to_string());
        let early = tokio::task::spawn_blocking(move || Early::mark(path, t));
        let taken = self.acquire_inner(id, turn, policy).await;
        let early = early.await.ok().flatten();
        match (taken, early) {
            (Ok(lease), Some(e)) => {
                self.early
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(lease.token, e);
                Ok(lease)
            }
            (Err(err), Some(e)) => {
                e.undo();
                Err(err)
            }
            (taken, None) => taken,
        }
    }

    fn take_early(&self, lease: &FleetLease) -> Option<Early> {
        self.early
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&lease.token)
    }

    async fn hydrate_inner(
        &self,
        sessions: &Sessions,
        local: &Lease,
        lease: &FleetLease,
    ) -> Result<Hydrated, FleetError> {
        let t0 = std::time::Instant::now();
        let id = lease.session_id.as_str();
        let path = sessions.paths(id).dir;
        let io = |what, e| FleetError::Local(BrokerError::io(what, &path, e));
        let early = self.take_early(lease);
        let dir = local::open_session_dir(&path).map_err(|e| io("cannot open", e))?;
        // The record as it was before this turn's acquire marked it.
        let mark = match &early {
            Some(e) => Some(e.mark.clone()),
            None => dir.as_ref().and_then(local::read_mark),
        };
        let armed = self.watches.take_idle(id);
        let state = match (&dir, &mark) {
            (None, _) => Local::Absent,
            (Some(_), None) if lease.generation == 0 => Local::Adopt,
            (Some(_), None) => Local::Keep,
            // Written before the host last started: the tree may have lost
            // data the record vouches for. Hydrated again; kept aside if a
            // turn may have changed it.
            (Some(_), Some(m)) if lease.generation > 0 && !m.this_boot() => {
                if m.turn.is_some() || m.generation > lease.generation {
                    Local::Keep
                } else {
                    Local::Stale
                }
            }
            (Some(dir), Some(m)) => {
                let clean = m
                    .is_clean(|| blocking(|| local::fingerprint(dir)))
                    .map_err(|e| io("cannot fingerprint", e))?;
                match (clean, m.generation == lease.generation) {
                    (true, true) => Local::Current,
                    (true, false) if m.generation > lease.generation => Local::Keep,
                    (true, false) => Local::Stale,
                    (false, _) if lease.generation == 0 && m.generation == 0 => Local::Adopt,
                    (false, _) => Local::Keep,
                }
            }
        };
        let mut hydrated = Hydrated {
            generation: lease.generation,
            ..Hydrated::default()
        };
        let armed = match armed {
            Some(a) if state != Local::Current => {
                a.watch.discard();
                None
            }
            a => a,
        };
        match (state, dir) {
            (Local::Current | Local::Adopt, Some(dir)) => {
                let m = mark.unwrap_or_default();
                let next = Mark::now(m.generation, m.fingerprint, Some(lease.turn_id.clone()));
                if early.is_none() {
                    local::write_mark(&dir, &next, false)
                        .map_err(|e| io("cannot write into", e))?;
                }
                // The watch kept since the last commit, if it still covers
                // this copy.
                match armed {
                    Some(a) if a.covers(&dir, &next) => self.watches.run(lease.token, a),
                    Some(a) => a.watch.discard(),
                    None => {}
                }
                hydrated.elapsed = t0.elapsed();
                return Ok(hydrated);
            }
            (Local::Keep, Some(_)) => {
                let from = mark.as_ref().map(|m| m.generation).unwrap_or(0);
                let kept = self.keep_aside(sessions, local, from)?;
                warn!(
                    session.id = %id,
                    kept_as = %kept,
                    local_generation = from,
                    catalog_generation = lease.generation,
                    "the local copy held changes no turn committed (or a history the catalog no longer has): kept under a new session id"
                );
                hydrated.kept_as = Some(kept);
            }
            _ => {}
        }
        let Some(archive) = &lease.archive else {
            hydrated.elapsed = t0.elapsed();
            return Ok(hydrated);
        };
        let fingerprint = self.restore(sessions, local, lease, archive).await?;
        let bytes = archive.bytes;
        if let Ok(Some(dir)) = local::open_session_dir(&path)
            && let Some(a) = self.start_watch(id, &dir, lease.generation, &fingerprint)
        {
            self.watches.run(lease.token, a);
        }
        hydrated.restored_bytes = Some(bytes);
        hydrated.elapsed = t0.elapsed();
        info!(
            session.id = %id,
            generation = lease.generation,
            bytes,
            elapsed_ms = hydrated.elapsed.as_millis() as u64,
            "session hydrated from its archive"
        );
        Ok(hydrated)
    }

    /// Imports `archive` straight from the store into staging, checks that
    /// it is exactly what was committed, then swaps it in as the session:
    /// the fingerprint its record holds.
    async fn restore(
        &self,
        sessions: &Sessions,
        local: &Lease,
        lease: &FleetLease,
        archive: &ArchiveRef,
    ) -> Result<String, FleetError> {
        let id = lease.session_id.as_str();
        let refused = |why: String| FleetError::Archive {
            session: id.to_string(),
            generation: lease.generation,
            why,
        };
        // An archive holds content plus a 512-byte header per entry (and
        // long names): far past that it cannot pass the import caps.
        let cap = self
            .caps
            .max_bytes
            .saturating_add(self.caps.max_entries.saturating_mul(2048))
            .saturating_add(1 << 20);
        if archive.bytes > cap {
            return Err(refused(format!(
                "it is {} bytes, over what an import may be ({cap})",
                archive.bytes
            )));
        }
        let key = Archives::parse_key(&archive.key).map_err(|e| refused(e.to_string()))?;
        let download = |e| match e {
            DownloadError::Store(e) => store_err(e),
            DownloadError::Mismatch(why) => refused(why),
        };
        let object = self
            .archives
            .read_object(&key, archive.bytes, &archive.sha256)
            .await
            .map_err(download)?;
        // The import and the check at the object's end both read it; they
        // run one after the other on this thread.
        let object = std::cell::RefCell::new(object);
        let recorded = std::cell::RefCell::new(String::new());
        let mark = |fd: &std::os::fd::OwnedFd| {
            // Nothing imported is used (the mark written, the tree swapped
            // in) unless the object is exactly what was committed.
            object
                .borrow_mut()
                .finish()
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
            let fingerprint = local::fingerprint(fd)?;
            recorded.replace(fingerprint.clone());
            local::write_mark(
                fd,
                &Mark::now(
                    lease.generation,
                    Some(fingerprint.clone()),
                    Some(lease.turn_id.clone()),
                ),
                // The tree is not synced either: the record holds for this
                // boot (see `Mark::boot`).
                false,
            )
        };
        let restored =
            blocking(|| sessions.restore(local, Borrowed(&object), self.caps, mark, false));
        if let Err(e) = restored {
            // An object that is not what was committed explains any
            // failure of its import (a changed byte may make it corrupt or
            // hostile): said as such, the rest of it read to find out.
            object.borrow_mut().finish().map_err(download)?;
            return Err(match e {
                BrokerError::Import(ImportError::Io { .. }) => FleetError::Local(e),
                BrokerError::Import(e) => refused(e.to_string()),
                e => FleetError::Local(e),
            });
        }
        Ok(recorded.into_inner())
    }

    /// Moves the local copy to a new session id (without a fleet record:
    /// a session of its own, whose next turn adopts it).
    fn keep_aside(
        &self,
        sessions: &Sessions,
        local: &Lease,
        generation: i64,
    ) -> Result<String, FleetError> {
        let id = local.session_id();
        let mut last = None;
        for _ in 0..4 {
            let to = local::kept_name(id, generation);
            match sessions.set_aside(local, &to) {
                Ok(()) => {
                    if let Ok(Some(dir)) = local::open_session_dir(&sessions.paths(&to).dir)
                        && let Err(e) = local::remove_mark(&dir)
                    {
                        warn!(session.id = %to, error = %e, "cannot remove the fleet record of a kept copy");
                    }
                    return Ok(to);
                }
                Err(BrokerError::SessionExists(_)) => last = Some(BrokerError::SessionExists(to)),
                Err(e) => return Err(FleetError::Local(e)),
            }
        }
        Err(FleetError::Local(
            last.unwrap_or(BrokerError::SessionExists(id.to_string())),
        ))
    }

    /// A commit that did not happen: the turn's files are kept aside.
    fn failed(
        &self,
        sessions: &Sessions,
        local: &Lease,
        lease: &FleetLease,
        error: FleetError,
    ) -> CommitFailed {
        warn!(session.id = %lease.session_id, error = %error, "commit failed");
        match self.keep_aside(sessions, local, lease.generation) {
            Ok(kept) => CommitFailed {
                error,
                kept_as: Some(kept),
            },
            Err(e) => {
                warn!(session.id = %lease.session_id, error = %e, "cannot keep the turn's files aside");
                CommitFailed {
                    error,
                    kept_as: None,
                }
            }
        }
    }

    async fn commit_inner(
        &self,
        sessions: &Sessions,
        local: &Lease,
        lease: &FleetLease,
    ) -> Result<Commit, CommitFailed> {
        let id = lease.session_id.as_str();
        let watch = self.watches.take_running(lease.token);
        let path = sessions.paths(id).dir;
        let plain = |error| CommitFailed {
            error,
            kept_as: None,
        };
        let io = |what, e| plain(FleetError::Local(BrokerError::io(what, &path, e)));
        let Some(dir) = local::open_session_dir(&path).map_err(|e| io("cannot open", e))? else {
            // The turn never made the session (it failed before that).
            return Ok(Commit::Unchanged {
                generation: lease.generation,
            });
        };
        let mark = local::read_mark(&dir);
        let base = mark.as_ref().map(|m| m.generation).unwrap_or(0);
        if base != lease.generation {
            return Err(plain(FleetError::Fenced {
                session: id.to_string(),
                token: lease.token,
                why: format!(
                    "the local copy is generation {base}, the lease's is {}: it was not hydrated",
                    lease.generation
                ),
            }));
        }
        // Unchanged if the turn's watch saw nothing happen to the copy its
        // record describes; else if the copy's fingerprint is the record's.
        // Either way the copy stays watched for the next turn.
        let unchanged = |m: &Mark, armed: Option<Armed>| {
            if m.turn.is_some() {
                let settled = Mark {
                    turn: None,
                    ..m.clone()
                };
                local::write_mark(&dir, &settled, false).map_err(|e| io("cannot write into", e))?;
            }
            if let Some(a) = armed {
                self.watches.arm(id, a);
            }
            Ok(Commit::Unchanged {
                generation: lease.generation,
            })
        };
        if let (Some(a), Some(m)) = (watch, &mark) {
            match a.watch.quiet() {
                Ok(true) if m.fingerprint.as_deref() == Some(a.fingerprint.as_str()) => {
                    debug!(session.id = %id, dirs = a.watch.dirs(), "the change watch saw nothing: unchanged");
                    return unchanged(m, Some(a));
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(session.id = %id, error = %e, "cannot read the change watch: fingerprinting")
                }
            }
            a.watch.discard();
        }
        let walk = dir.try_clone().map_err(|e| io("cannot open", e))?;
        let fingerprint = tokio::task::spawn_blocking(move || local::fingerprint(&walk))
            .await
            .map_err(|e| io("cannot fingerprint", std::io::Error::other(e)))?
            .map_err(|e| io("cannot fingerprint", e))?;
        if let Some(m) = &mark
            && m.fingerprint.as_deref() == Some(fingerprint.as_str())
        {
            return unchanged(m, self.start_watch(id, &dir, m.generation, &fingerprint));
        }
        let generation = lease.generation + 1;
        let key = self.archives.key(id, generation, lease.token);
        let export = dir.try_clone().map_err(|e| io("cannot open", e))?;
        let session = id.to_string();
        let uploaded = self
            .archives
            .upload(&key, move |w| {
                let skipped = turnstile_broker::archive::export(&export, w)?;
                for s in skipped {
                    warn!(session.id = %session, skipped = %s, "commit: entry not archived");
                }
                Ok(())
            })
            .await;
        let uploaded = match uploaded {
            Ok(u) => u,
            Err(e) => return Err(self.failed(sessions, local, lease, store_err(e))),
        };
        let archive = ArchiveRef {
            key: key.to_string(),
            sha256: uploaded.sha256,
            bytes: uploaded.bytes,
        };
        let landed = match self
            .db
            .commit(
                id,
                lease.token,
                lease.generation,
                &archive,
                &self.worker,
                &lease.turn_id,
            )
            .await
        {
            Ok(Ok(g)) => g,
            Ok(Err(why)) => {
                if let Err(e) = self.archives.delete(&key).await {
                    warn!(error = %e, "cannot delete the archive of a refused commit");
                }
                let error = FleetError::Fenced {
                    session: id.to_string(),
                    token: lease.token,
                    why,
                };
                return Err(self.failed(sessions, local, lease, error));
            }
            // The answer was lost: the commit may or may not have landed.
            Err(e) => match self.db.committed(id).await {
                Ok(Some((g, Some(k)))) if k == archive.key => g,
                _ => return Err(self.failed(sessions, local, lease, e)),
            },
        };
        let settled_fingerprint = fingerprint.clone();
        let settled = Mark::now(landed, Some(fingerprint), None);
        match local::write_mark(&dir, &settled, true) {
            Ok(()) => {
                if let Some(a) = self.start_watch(id, &dir, landed, &settled_fingerprint) {
                    self.watches.arm(id, a);
                }
            }
            // The next turn fingerprints the copy and finds it stale or
            // changed; nothing committed is at risk.
            Err(e) => {
                warn!(session.id = %id, error = %e, "cannot record the committed generation locally")
            }
        }
        info!(session.id = %id, generation = landed, bytes = archive.bytes, "session committed");
        self.collect(id, landed).await;
        Ok(Commit::Advanced {
            generation: landed,
            bytes: archive.bytes,
        })
    }

    async fn forget_inner(&self, id: &str) -> Result<bool, FleetError> {
        if let Some(a) = self.watches.take_idle(id) {
            a.watch.discard();
        }
        let keys = match self.db.forget(id).await? {
            Ok(Some(keys)) => keys,
            Ok(None) => return Ok(false),
            Err(held) => {
                return Err(FleetError::Busy {
                    session: id.to_string(),
                    worker: held.worker,
                    turn: held.turn,
                });
            }
        };
        // The catalog no longer names them: an object left behind by a
        // failed delete is garbage, never state.
        for key in keys {
            let deleted = match Archives::parse_key(&key) {
                Ok(k) => self.archives.delete(&k).await,
                Err(e) => Err(e),
            };
            if let Err(e) = deleted {
                warn!(session.id = %id, key = %key, error = %e, "cannot delete an archive of a removed session");
            }
        }
        info!(session.id = %id, "session removed from the catalog");
        Ok(true)
    }

    async fn fork_inner(&self, src: &str, dst: &str) -> Result<bool, FleetError> {
        let Some(archive) = self.db.archive(src).await? else {
            return Ok(false);
        };
        let from = Archives::parse_key(&archive.key).map_err(store_err)?;
        // A key no commit can take (tokens from the sequence are
        // positive), unique per fork.
        let to = self
            .archives
            .key(dst, 1, -1 - i64::from(rand::random::<u32>()));
        self.archives.copy(&from, &to).await.map_err(store_err)?;
        let copy = ArchiveRef {
            key: to.to_string(),
            ..archive
        };
        if !self.db.fork(src, dst, &copy).await? {
            if let Err(e) = self.archives.delete(&to).await {
                warn!(error = %e, "cannot delete the archive of a refused fork");
            }
            return Err(FleetError::Exists(dst.to_string()));
        }
        info!(session.id = %dst, from = %src, "session forked in the catalog");
        Ok(true)
    }

    /// Deletes archives older than the newest `keep` generations.
    async fn collect(&self, id: &str, newest: i64) {
        let upto = newest - i64::from(self.keep);
        if upto < 1 {
            return;
        }
        let old = match self.db.old_archives(id, upto).await {
            Ok(old) => old,
            Err(e) => {
                warn!(session.id = %id, error = %e, "cannot list old archives");
                return;
            }
        };
        for (generation, key) in old {
            let deleted = match Archives::parse_key(&key) {
                Ok(k) => self.archives.delete(&k).await,
                Err(e) => Err(e),
            };
            match deleted {
                Ok(()) => {
                    if let Err(e) = self.db.forget_archive(id, generation).await {
                        warn!(session.id = %id, generation, error = %e, "cannot forget an old archive");
                    }
                }
                Err(e) => {
                    warn!(session.id = %id, generation, error = %e, "cannot delete an old archive")
                }
            }
        }
    }
}

impl Fleet for PgFleet {
    fn worker_id(&self) -> &str {
        &self.worker
    }

    fn lease_ttl(&self) -> Duration {
        self.ttl
    }

    fn acquire<'a>(
        &'a self,
        session_id: &'a str,
        turn_id: &'a str,
        policy: LeasePolicy,
    ) -> BoxFuture<'a, Result<FleetLease, FleetError>> {
        Box::pin(self.acquire_inner(session_id, turn_id, policy))
    }

    fn acquire_for<'a>(
        &'a self,
        sessions: &'a Sessions,
        local: &'a Lease,
        turn_id: &'a str,
        policy: LeasePolicy,
    ) -> BoxFuture<'a, Result<FleetLease, FleetError>> {
        Box::pin(self.acquire_for_inner(sessions, local, turn_id, policy))
    }

    fn renew<'a>(&'a self, lease: &'a FleetLease) -> BoxFuture<'a, Result<(), FleetError>> {
        Box::pin(async move {
            self.db
                .renew(&lease.session_id, lease.token, self.ttl_ms())
                .await?
                .map_err(|why| FleetError::LeaseLost {
                    session: lease.session_id.clone(),
                    why,
                })
        })
    }

    fn release<'a>(&'a self, lease: &'a FleetLease) -> BoxFuture<'a, Result<(), FleetError>> {
        // A turn that ended without its commit, or never hydrated.
        if let Some(a) = self.watches.take_running(lease.token) {
            a.watch.discard();
        }
        if let Some(e) = self.take_early(lease) {
            e.undo();
        }
        Box::pin(
            self.db
                .release(&lease.session_id, lease.token, &self.worker, &lease.turn_id),
        )
    }

    fn hydrate<'a>(
        &'a self,
        sessions: &'a Sessions,
        local: &'a Lease,
        lease: &'a FleetLease,
    ) -> BoxFuture<'a, Result<Hydrated, FleetError>> {
        Box::pin(self.hydrate_inner(sessions, local, lease))
    }

    fn commit<'a>(
        &'a self,
        sessions: &'a Sessions,
        local: &'a Lease,
        lease: &'a FleetLease,
    ) -> BoxFuture<'a, Result<Commit, CommitFailed>> {
        Box::pin(self.commit_inner(sessions, local, lease))
    }

    fn catalog(&self) -> BoxFuture<'_, Result<Vec<CatalogEntry>, FleetError>> {
        Box::pin(self.db.catalog())
    }

    fn forget<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, Result<bool, FleetError>> {
        Box::pin(self.forget_inner(session_id))
    }

    fn fork<'a>(&'a self, src: &'a str, dst: &'a str) -> BoxFuture<'a, Result<bool, FleetError>> {
        Box::pin(self.fork_inner(src, dst))
    }
}

/// Shares a fleet as the broker's trait object.
pub fn shared(fleet: PgFleet) -> Arc<dyn Fleet> {
    Arc::new(fleet)
}
