//! The catalog in PostgreSQL: one row per session (its lease and its
//! committed generation) and one per kept archive. Every state change is
//! one statement, so it is atomic without a client-side transaction:
//!
//! - acquire: an upsert that takes the row only if it is free or its lease
//!   expired (by the database's clock), with a new fencing token from a
//!   sequence (never reused, for any session);
//! - renew: extends the lease only for the current token, before expiry;
//! - commit: advances the generation only for the current token and the
//!   generation the lease saw, and records the archive, in one statement;
//! - release: frees the row only for the current token.
//!
//! The schema is versioned ([`MIGRATIONS`]); a broker migrates an older
//! schema at start-up (under an advisory lock, so brokers starting together
//! do it once) and refuses a newer one.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::{Client, NoTls, Row, Statement};
use turnstile_broker::fleet::{ArchiveRef, CatalogEntry, FleetError, Holder};

/// Versioned migrations, in order: entry `i` takes the schema from version
/// `i` to `i + 1`. Never edit one that shipped; add the next.
pub const MIGRATIONS: &[&str] = &[
    // 1: leases, generations, archives.
    "CREATE SEQUENCE turnstile_fence;
     CREATE TABLE turnstile_sessions (
         session_id     text PRIMARY KEY,
         generation     bigint NOT NULL DEFAULT 0,
         archive_key    text,
         archive_sha256 text,
         archive_bytes  bigint NOT NULL DEFAULT 0,
         token          bigint NOT NULL,
         holder_worker  text,
         holder_turn    text,
         expires_at     timestamptz,
         last_turn_id   text,
         last_worker    text,
         created_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
         updated_at     timestamptz NOT NULL DEFAULT clock_timestamp()
     );
     CREATE TABLE turnstile_archives (
         session_id  text NOT NULL,
         generation  bigint NOT NULL,
         object_key  text NOT NULL,
         sha256      text NOT NULL,
         bytes       bigint NOT NULL,
         created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
         PRIMARY KEY (session_id, generation)
     );",
];

/// The schema version this code knows.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Key of the advisory lock held while migrating.
const MIGRATION_LOCK: i64 = 0x7475_726e_7374_696c; // "turnstil"

/// How long one statement (or a connection attempt) may take before the
/// connection is dropped and the operation fails.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The catalog's database: one connection (statements are pipelined on
/// it), made again when it breaks.
#[derive(Debug)]
pub struct Db {
    config: tokio_postgres::Config,
    shown: String,
    client: tokio::sync::Mutex<Option<Arc<Conn>>>,
    timeout: Duration,
}

/// A connection and the statements prepared on it: each is parsed once
/// per connection, so that a statement is one round trip, not two.
#[derive(Debug)]
struct Conn {
    client: Client,
    prepared: std::sync::Mutex<HashMap<&'static str, Statement>>,
}

impl Conn {
    fn prepared(&self, sql: &str) -> Option<Statement> {
        self.prepared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(sql)
            .cloned()
    }

    async fn query(
        &self,
        sql: &'static str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        let statement = match self.prepared(sql) {
            Some(s) => s,
            None => {
                let s = self.client.prepare(sql).await?;
                self.prepared
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(sql, s.clone());
                s
            }
        };
        let rows = self.client.query(&statement, params).await;
        if rows.is_err() {
            // A plan the schema outdated is prepared again next time.
            self.prepared
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(sql);
        }
        rows
    }
}

fn db_err(shown: &str, what: &str, e: impl std::fmt::Display) -> FleetError {
    FleetError::Database(format!("{what} ({shown}): {e}"))
}

/// A driver error with what the server said (its `Display` alone is often
/// just "db error").
fn pg(e: tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} {}: {}", db.severity(), db.code().code(), db.message());
    }
    match std::error::Error::source(&e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// A row's session as the catalog holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acquired {
    pub token: i64,
    pub generation: i64,
    pub archive: Option<ArchiveRef>,
}

/// Why a lease was not granted: who holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldBy {
    pub worker: String,
    pub turn: String,
}

impl Db {
    /// Parses `url`; connects lazily.
    pub fn new(url: &str, timeout: Duration) -> Result<Db, FleetError> {
        let shown = turnstile_broker::fleet::redact_url(url);
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| FleetError::Database(format!("bad database URL {shown:?}: {e}")))?;
        Ok(Db {
            config,
            shown,
            client: tokio::sync::Mutex::new(None),
            timeout,
        })
    }

    /// The URL, password hidden.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    async fn connect(&self) -> Result<Client, FleetError> {
        let (client, conn) = tokio::time::timeout(self.timeout, self.config.connect(NoTls))
            .await
            .map_err(|_| {
                db_err(
                    &self.shown,
                    "cannot connect",
                    format!("no answer within {} ms", self.timeout.as_millis()),
                )
            })?
            .map_err(|e| db_err(&self.shown, "cannot connect", pg(e)))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "fleet database connection ended");
            }
        });
        Ok(client)
    }

    async fn client(&self) -> Result<Arc<Conn>, FleetError> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.client.is_closed()) {
            return Ok(c.clone());
        }
        *slot = None;
        let c = Arc::new(Conn {
            client: self.connect().await?,
            prepared: std::sync::Mutex::default(),
        });
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Forgets the connection (after a timeout: it may be stuck).
    async fn reset(&self) {
        *self.client.lock().await = None;
    }

    /// Runs one statement with the timeout; a connection that broke or
    /// stalled is made again by the next call.
    async fn query(
        &self,
        what: &str,
        sql: &'static str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>, FleetError> {
        let conn = self.client().await?;
        match tokio::time::timeout(self.timeout, conn.query(sql, params)).await {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(e)) => {
                if conn.client.is_closed() {
                    self.reset().await;
                }
                Err(db_err(&self.shown, what, pg(e)))
            }
            Err(_) => {
                self.reset().await;
                Err(db_err(
                    &self.shown,
                    what,
                    format!("no answer within {} ms", self.timeout.as_millis()),
                ))
            }
        }
    }

    /// Brings the schema to [`SCHEMA_VERSION`]; refuses a newer one.
    /// Returns the version found before migrating.
    pub async fn migrate(&self) -> Result<i32, FleetError> {
        let mut client = self.connect().await?;
        let work = async {
            let tx = client.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS turnstile_schema (version integer NOT NULL)",
            )
            .await?;
            let found: i32 = tx
                .query_opt("SELECT max(version) FROM turnstile_schema", &[])
                .await?
                .and_then(|r| r.get::<_, Option<i32>>(0))
                .unwrap_or(0);
            if found > SCHEMA_VERSION {
                return Ok(Err(FleetError::SchemaTooNew {
                    found,
                    known: SCHEMA_VERSION,
                }));
            }
            for (i, sql) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
                tx.batch_execute(sql).await?;
                tracing::info!(version = i + 1, "fleet database schema migrated");
            }
            tx.execute("DELETE FROM turnstile_schema", &[]).await?;
            tx.execute(
                "INSERT INTO turnstile_schema (version) VALUES ($1)",
                &[&SCHEMA_VERSION],
            )
            .await?;
            tx.commit().await?;
            Ok::<_, tokio_postgres::Error>(Ok(found))
        };
        tokio::time::timeout(self.timeout * 3, work)
            .await
            .map_err(|_| db_err(&self.shown, "cannot migrate the schema", "no answer"))?
            .map_err(|e| db_err(&self.shown, "cannot migrate the schema", pg(e)))?
    }

    /// The schema version of the database (0: none), without changing it.
    pub async fn schema_version(&self) -> Result<i32, FleetError> {
        let what = "cannot read the schema version";
        let rows = self
            .query(
                what,
                "SELECT to_regclass('turnstile_schema') IS NOT NULL",
                &[],
            )
            .await?;
        if !rows.first().is_some_and(|r| r.get::<_, bool>(0)) {
            return Ok(0);
        }
        let rows = self
            .query(what, "SELECT max(version) FROM turnstile_schema", &[])
            .await?;
        Ok(rows
            .first()
            .and_then(|r| r.get::<_, Option<i32>>(0))
            .unwrap_or(0))
    }

    /// Takes the lease of `session` for `turn` if it is free or expired.
    pub async fn acquire(
        &self,
        session: &str,
        worker: &str,
        turn: &str,
        ttl_ms: i64,
    ) -> Result<Result<Acquired, HeldBy>, FleetError> {
        loop {
            let rows = self
                .query(
                    "cannot take the lease",
                    "INSERT INTO turnstile_sessions AS s
                         (session_id, token, holder_worker, holder_turn, expires_at)
                     VALUES ($1, nextval('turnstile_fence'), $2, $3,
                             clock_timestamp() + $4::bigint * interval '1 millisecond')
                     ON CONFLICT (session_id) DO UPDATE
                        SET token = EXCLUDED.token,
                            holder_worker = EXCLUDED.holder_worker,
                            holder_turn = EXCLUDED.holder_turn,
                            expires_at = EXCLUDED.expires_at
                      WHERE s.holder_worker IS NULL OR s.expires_at <= clock_timestamp()
                     RETURNING s.token, s.generation, s.archive_key, s.archive_sha256, s.archive_bytes",
                    &[&session, &worker, &turn, &ttl_ms],
                )
                .await?;
            if let Some(r) = rows.first() {
                let key: Option<String> = r.get(2);
                let sha: Option<String> = r.get(3);
                let bytes: i64 = r.get(4);
                return Ok(Ok(Acquired {
                    token: r.get(0),
                    generation: r.get(1),
                    archive: key.zip(sha).map(|(key, sha256)| ArchiveRef {
                        key,
                        sha256,
                        bytes: bytes.max(0) as u64,
                    }),
                }));
            }
            // Freed between the two statements: try again.
            if let Some((Some(worker), Some(turn))) = self.holder(session).await? {
                return Ok(Err(HeldBy { worker, turn }));
            }
        }
    }

    /// Extends the lease of token `token` by `ttl_ms`; `Err(why)` if it is
    /// no longer held by that token.
    pub async fn renew(
        &self,
        session: &str,
        token: i64,
        ttl_ms: i64,
    ) -> Result<Result<(), String>, FleetError> {
        let rows = self
            .query(
                "cannot renew the lease",
                "UPDATE turnstile_sessions
                    SET expires_at = clock_timestamp() + $3::bigint * interval '1 millisecond'
                  WHERE session_id = $1 AND token = $2 AND holder_worker IS NOT NULL
                    AND expires_at > clock_timestamp()
                 RETURNING token",
                &[&session, &token, &ttl_ms],
            )
            .await?;
        if !rows.is_empty() {
            return Ok(Ok(()));
        }
        self.why_not(session, token).await.map(Err)
    }

    /// Why token `token` no longer holds `session`.
    async fn why_not(&self, session: &str, token: i64) -> Result<String, FleetError> {
        let rows = self
            .query(
                "cannot read the lease",
                "SELECT token, holder_worker, holder_turn, expires_at <= clock_timestamp()
                   FROM turnstile_sessions WHERE session_id = $1",
                &[&session],
            )
            .await?;
        let Some(r) = rows.first() else {
            return Ok("the session is no longer in the catalog".into());
        };
        let (now, worker, turn, expired): (i64, Option<String>, Option<String>, Option<bool>) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        Ok(if now != token {
            match (worker, turn) {
                (Some(w), Some(t)) => format!("taken over by turn {t} on worker {w} (token {now})"),
                _ => format!("taken over by a later lease (token {now})"),
            }
        } else if worker.is_none() {
            "released".into()
        } else if expired.unwrap_or(true) {
            "expired".into()
        } else {
            "not held".into()
        })
    }

    /// Frees the lease if token `token` still holds it, noting the turn.
    pub async fn release(
        &self,
        session: &str,
        token: i64,
        worker: &str,
        turn: &str,
    ) -> Result<(), FleetError> {
        self.query(
            "cannot release the lease",
            "UPDATE turnstile_sessions
                SET holder_worker = NULL, holder_turn = NULL, expires_at = NULL,
                    last_turn_id = $3, last_worker = $4, updated_at = clock_timestamp()
              WHERE session_id = $1 AND token = $2",
            &[&session, &token, &turn, &worker],
        )
        .await
        .map(|_| ())
    }

    /// Advances `session` from generation `from` to `from + 1` with
    /// `archive`, only if token `token` is still the current one.
    /// `Ok(Err(why))`: fenced off, nothing changed.
    #[allow(clippy::too_many_arguments)]
    pub async fn commit(
        &self,
        session: &str,
        token: i64,
        from: i64,
        archive: &ArchiveRef,
        worker: &str,
        turn: &str,
    ) -> Result<Result<i64, String>, FleetError> {
        let bytes = archive.bytes as i64;
        let rows = self
            .query(
                "cannot commit",
                "WITH up AS (
                     UPDATE turnstile_sessions
                        SET generation = generation + 1, archive_key = $4,
                            archive_sha256 = $5, archive_bytes = $6,
                            last_turn_id = $7, last_worker = $8, updated_at = clock_timestamp()
                      WHERE session_id = $1 AND token = $2 AND generation = $3
                        AND holder_worker IS NOT NULL
                     RETURNING session_id, generation)
                 INSERT INTO turnstile_archives (session_id, generation, object_key, sha256, bytes)
                 SELECT session_id, generation, $4, $5, $6 FROM up
                 RETURNING generation",
                &[
                    &session,
                    &token,
                    &from,
                    &archive.key,
                    &archive.sha256,
                    &bytes,
                    &turn,
                    &worker,
                ],
            )
            .await?;
        match rows.first() {
            Some(r) => Ok(Ok(r.get(0))),
            None => self.why_not(session, token).await.map(Err),
        }
    }

    /// The committed generation and archive key of `session` (after an
    /// ambiguous commit: did it land?).
    pub async fn committed(
        &self,
        session: &str,
    ) -> Result<Option<(i64, Option<String>)>, FleetError> {
        let rows = self
            .query(
                "cannot read the catalog",
                "SELECT generation, archive_key FROM turnstile_sessions WHERE session_id = $1",
                &[&session],
            )
            .await?;
        Ok(rows.first().map(|r| (r.get(0), r.get(1))))
    }

    /// Archives of `session` at or below generation `upto`.
    pub async fn old_archives(
        &self,
        session: &str,
        upto: i64,
    ) -> Result<Vec<(i64, String)>, FleetError> {
        let rows = self
            .query(
                "cannot list archives",
                "SELECT generation, object_key FROM turnstile_archives
                  WHERE session_id = $1 AND generation <= $2 ORDER BY generation",
                &[&session, &upto],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    pub async fn forget_archive(&self, session: &str, generation: i64) -> Result<(), FleetError> {
        self.query(
            "cannot forget an archive",
            "DELETE FROM turnstile_archives WHERE session_id = $1 AND generation = $2",
            &[&session, &generation],
        )
        .await
        .map(|_| ())
    }

    /// Removes `session` from the catalog with its archives' records,
    /// unless a live lease holds it. `Ok(Ok(keys))`: the removed archives'
    /// object keys (empty: it was not in the catalog, or had none);
    /// `Ok(Err(holder))`: refused, a turn holds it.
    pub async fn forget(
        &self,
        session: &str,
    ) -> Result<Result<Option<Vec<String>>, HeldBy>, FleetError> {
        let rows = self
            .query(
                "cannot remove the session",
                "WITH s AS (
                     DELETE FROM turnstile_sessions
                      WHERE session_id = $1
                        AND (holder_worker IS NULL OR expires_at <= clock_timestamp())
                     RETURNING session_id),
                 a AS (
                     DELETE FROM turnstile_archives
                      WHERE session_id IN (SELECT session_id FROM s)
                     RETURNING object_key)
                 SELECT (SELECT count(*) FROM s), (SELECT array_agg(object_key) FROM a)",
                &[&session],
            )
            .await?;
        let (removed, keys): (i64, Option<Vec<String>>) = rows
            .first()
            .map(|r| (r.get(0), r.get(1)))
            .unwrap_or((0, None));
        if removed > 0 {
            return Ok(Ok(Some(keys.unwrap_or_default())));
        }
        match self.holder(session).await? {
            Some((worker, turn)) => Ok(Err(HeldBy {
                worker: worker.unwrap_or_default(),
                turn: turn.unwrap_or_default(),
            })),
            None => Ok(Ok(None)),
        }
    }

    /// The worker and turn columns of `session`'s row while its lease is
    /// unexpired; `None` when it is free (or not in the catalog).
    async fn holder(
        &self,
        session: &str,
    ) -> Result<Option<(Option<String>, Option<String>)>, FleetError> {
        let rows = self
            .query(
                "cannot read the lease",
                "SELECT holder_worker, holder_turn FROM turnstile_sessions
                  WHERE session_id = $1 AND expires_at > clock_timestamp()",
                &[&session],
            )
            .await?;
        Ok(rows.first().map(|r| (r.get(0), r.get(1))))
    }

    /// Records session `dst` as a fork of `src`'s committed generation:
    /// generation 1 with `archive` (a copy of src's). `Ok(false)`: `dst`
    /// is in the catalog already.
    pub async fn fork(
        &self,
        src: &str,
        dst: &str,
        archive: &ArchiveRef,
    ) -> Result<bool, FleetError> {
        let bytes = archive.bytes as i64;
        let rows = self
            .query(
                "cannot fork the session",
                "WITH s AS (
                     INSERT INTO turnstile_sessions AS s
                         (session_id, generation, archive_key, archive_sha256, archive_bytes,
                          token, last_turn_id, last_worker)
                     SELECT $2, 1, $3, $4, $5, nextval('turnstile_fence'), last_turn_id, last_worker
                       FROM turnstile_sessions WHERE session_id = $1
                     ON CONFLICT (session_id) DO NOTHING
                     RETURNING session_id)
                 INSERT INTO turnstile_archives (session_id, generation, object_key, sha256, bytes)
                 SELECT session_id, 1, $3, $4, $5 FROM s
                 RETURNING session_id",
                &[&src, &dst, &archive.key, &archive.sha256, &bytes],
            )
            .await?;
        Ok(!rows.is_empty())
    }

    /// The committed archive of `session`, if it has one.
    pub async fn archive(&self, session: &str) -> Result<Option<ArchiveRef>, FleetError> {
        let rows = self
            .query(
                "cannot read the catalog",
                "SELECT archive_key, archive_sha256, archive_bytes FROM turnstile_sessions
                  WHERE session_id = $1 AND archive_key IS NOT NULL",
                &[&session],
            )
            .await?;
        Ok(rows.first().map(|r| ArchiveRef {
            key: r.get(0),
            sha256: r.get(1),
            bytes: r.get::<_, i64>(2).max(0) as u64,
        }))
    }

    /// Every session, sorted by id.
    pub async fn catalog(&self) -> Result<Vec<CatalogEntry>, FleetError> {
        let rows = self
            .query(
                "cannot read the catalog",
                "SELECT session_id, generation, archive_bytes,
                        CASE WHEN expires_at > clock_timestamp() THEN holder_worker END,
                        CASE WHEN expires_at > clock_timestamp() THEN holder_turn END,
                        (extract(epoch FROM expires_at) * 1000)::bigint,
                        last_turn_id, last_worker,
                        (extract(epoch FROM updated_at) * 1000)::bigint
                   FROM turnstile_sessions ORDER BY session_id",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let worker: Option<String> = r.get(3);
                let turn: Option<String> = r.get(4);
                let expires: Option<i64> = r.get(5);
                CatalogEntry {
                    session_id: r.get(0),
                    generation: r.get(1),
                    bytes: r.get::<_, i64>(2).max(0) as u64,
                    holder: worker.zip(turn).map(|(worker, turn)| Holder {
                        worker,
                        turn,
                        expires_unix_ms: expires.unwrap_or(0).max(0) as u64,
                    }),
                    last_turn_id: r.get(6),
                    last_worker: r.get(7),
                    updated_unix_ms: r.get::<_, Option<i64>>(8).unwrap_or(0).max(0) as u64,
                }
            })
            .collect())
    }
}
