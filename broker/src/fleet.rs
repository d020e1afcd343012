//! Fleet mode as the broker sees it: a session that lives on every worker.
//!
//! In fleet mode a session's committed state is a numbered *generation*
//! (an immutable archive in an object store) recorded in a catalog shared
//! by every worker, and a turn holds a fleet-wide *lease* with a fencing
//! token. A turn then runs as: acquire the lease, hydrate the local copy
//! if it is not the catalog's generation, run, commit (a new generation,
//! only if home or work changed, only while the token is still the
//! current one), release. The broker only knows the [`Fleet`] trait;
//! `turnstile-fleet` implements it over PostgreSQL and an object store, so
//! this library does not link a database client or a cloud SDK.
//!
//! Without a `[fleet]` table the broker runs as one host ([`Local`]): the
//! lease is the host's own lock, nothing is hydrated or committed.

use crate::error::BrokerError;
use crate::session::{Lease, LeasePolicy, Sessions};
use serde::Deserialize;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A boxed future, so that [`Fleet`] can be used as a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The `[fleet]` table of the config file.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// PostgreSQL URL (`postgres://user:password@host:port/db`, or the
    /// key=value form): leases, generations and the session catalog.
    pub database: String,
    /// Object store URL for session archives: `file:///shared/dir`,
    /// `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`;
    /// credentials come from the store's usual environment variables.
    pub archives: String,
    /// This worker's name in the catalog (default: the host name).
    #[serde(default)]
    pub worker_id: Option<String>,
    /// How long a lease lasts without renewal. A worker that cannot renew
    /// it ends its turn (`lease_lost`); a crashed worker's lease frees the
    /// session after this long.
    #[serde(default = "default_lease_ttl_ms")]
    pub lease_ttl_ms: u64,
    /// Archives kept per session: the newest N generations.
    #[serde(default = "default_keep_generations")]
    pub keep_generations: u32,
}

/// `lease_ttl_ms` when not set.
pub const DEFAULT_LEASE_TTL_MS: u64 = 30_000;
/// `keep_generations` when not set.
pub const DEFAULT_KEEP_GENERATIONS: u32 = 3;

fn default_lease_ttl_ms() -> u64 {
    DEFAULT_LEASE_TTL_MS
}

fn default_keep_generations() -> u32 {
    DEFAULT_KEEP_GENERATIONS
}

/// Bounds of `lease_ttl_ms`: renewal runs every third of it, so a very
/// short lease would be all renewals; one longer than an hour would keep a
/// crashed worker's sessions locked for longer than anyone waits.
pub const LEASE_TTL_RANGE_MS: (u64, u64) = (100, 3_600_000);
/// Upper bound of `keep_generations`.
pub const MAX_KEEP_GENERATIONS: u32 = 1000;

impl std::fmt::Debug for FleetConfig {
    /// The database URL may carry a password: never shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetConfig")
            .field("database", &redact_url(&self.database))
            .field("archives", &self.archives)
            .field("worker_id", &self.worker_id)
            .field("lease_ttl_ms", &self.lease_ttl_ms)
            .field("keep_generations", &self.keep_generations)
            .finish()
    }
}

/// `url` with any password replaced by `***` (URL form `user:pw@` and the
/// key=value form `password=...`), for logs and messages.
pub fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let (auth, host) = match rest.rsplit_once('@') {
            Some((auth, host)) => (auth, host),
            None => return url.to_string(),
        };
        return match auth.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => url.to_string(),
        };
    }
    url.split_whitespace()
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => kv.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl FleetConfig {
    /// Fleet mode on `database` and `archives`, everything else defaulted.
    pub fn new(database: impl Into<String>, archives: impl Into<String>) -> FleetConfig {
        FleetConfig {
            database: database.into(),
            archives: archives.into(),
            worker_id: None,
            lease_ttl_ms: DEFAULT_LEASE_TTL_MS,
            keep_generations: DEFAULT_KEEP_GENERATIONS,
        }
    }

    /// The worker id: the configured one, or the host name.
    pub fn worker_id(&self) -> String {
        self.worker_id.clone().unwrap_or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "localhost".to_string())
        })
    }

    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms)
    }

    /// Checks what can be checked without connecting anywhere.
    pub fn validate(&self) -> Result<(), String> {
        if self.database.trim().is_empty() {
            return Err("[fleet] database is empty: want a PostgreSQL URL".into());
        }
        if self.archives.trim().is_empty() {
            return Err("[fleet] archives is empty: want an object store URL".into());
        }
        let (lo, hi) = LEASE_TTL_RANGE_MS;
        if !(lo..=hi).contains(&self.lease_ttl_ms) {
            return Err(format!(
                "[fleet] lease_ttl_ms = {} is out of range: want {lo}..={hi}",
                self.lease_ttl_ms
            ));
        }
        if !(1..=MAX_KEEP_GENERATIONS).contains(&self.keep_generations) {
            return Err(format!(
                "[fleet] keep_generations = {} is out of range: want 1..={MAX_KEEP_GENERATIONS}",
                self.keep_generations
            ));
        }
        let worker = self.worker_id();
        if crate::validate::session_id(&worker).is_err() {
            return Err(format!(
                "[fleet] worker_id {worker:?} is not a valid name: want [A-Za-z0-9][A-Za-z0-9._-]{{0,127}}"
            ));
        }
        Ok(())
    }
}

/// A committed archive as the catalog records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveRef {
    /// Object key in the archive store.
    pub key: String,
    /// SHA-256 of the archive's bytes, hex.
    pub sha256: String,
    pub bytes: u64,
}

/// A session's fleet lease, held by this worker for one turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetLease {
    pub session_id: String,
    pub turn_id: String,
    /// Fencing token: greater than every token handed out before it, for
    /// any session. Only the current token's holder can renew or commit.
    pub token: i64,
    /// The session's committed generation when the lease was taken (0: no
    /// generation committed yet).
    pub generation: i64,
    /// The archive of that generation.
    pub archive: Option<ArchiveRef>,
    /// When the request that took the lease was sent: the lease is valid
    /// at least until this plus the TTL.
    pub acquired_at: Instant,
}

/// What hydrating the local copy did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hydrated {
    /// The generation the local copy now holds.
    pub generation: i64,
    /// Bytes of the archive restored; `None` when the local copy was the
    /// catalog's generation already.
    pub restored_bytes: Option<u64>,
    /// Session id under which a local copy that could not be kept in place
    /// (changes no turn ever committed, or a history the catalog no longer
    /// has) was kept.
    pub kept_as: Option<String>,
    pub elapsed: Duration,
}

/// What a commit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// Home and work were unchanged: nothing was written anywhere.
    Unchanged { generation: i64 },
    /// A new generation was committed.
    Advanced { generation: i64, bytes: u64 },
}

/// A commit that did not happen. The committed state is untouched; the
/// local files were kept under `kept_as` (when they could be).
#[derive(Debug, thiserror::Error)]
#[error("{error}{}", kept_as.as_ref().map(|k| format!("; the turn's files are kept as session {k}")).unwrap_or_default())]
pub struct CommitFailed {
    #[source]
    pub error: FleetError,
    pub kept_as: Option<String>,
}

/// Who holds a session's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub worker: String,
    pub turn: String,
    pub expires_unix_ms: u64,
}

/// One session of the fleet's catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogEntry {
    pub session_id: String,
    pub generation: i64,
    /// Size of the committed archive.
    pub bytes: u64,
    /// The current holder, if its lease has not expired.
    pub holder: Option<Holder>,
    pub last_turn_id: Option<String>,
    pub last_worker: Option<String>,
    pub updated_unix_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("session {session} is busy: turn {turn} is running on worker {worker}")]
    Busy {
        session: String,
        worker: String,
        turn: String,
    },
    #[error(
        "session {session} is still busy after waiting {waited_ms} ms: turn {turn} is running on worker {worker}"
    )]
    BusyAfterWait {
        session: String,
        worker: String,
        turn: String,
        waited_ms: u64,
    },
    #[error("lease of session {session} lost: {why}")]
    LeaseLost { session: String, why: String },
    #[error(
        "commit of session {session} refused: lease token {token} is no longer the current one ({why})"
    )]
    Fenced {
        session: String,
        token: i64,
        why: String,
    },
    #[error("session {0} already exists in the fleet's catalog")]
    Exists(String),
    #[error("fleet database: {0}")]
    Database(String),
    #[error("archive store: {0}")]
    Store(String),
    #[error("archive of session {session} generation {generation} refused: {why}")]
    Archive {
        session: String,
        generation: i64,
        why: String,
    },
    #[error(
        "fleet database schema is version {found}, newer than this broker knows ({known}): upgrade this broker before pointing it at this database"
    )]
    SchemaTooNew { found: i32, known: i32 },
    #[error(transparent)]
    Local(#[from] BrokerError),
}

impl From<FleetError> for BrokerError {
    /// A fleet refusal as the broker reports it: busy stays busy (naming
    /// the holder), a local failure stays local, the rest is the fleet's.
    fn from(e: FleetError) -> BrokerError {
        match e {
            FleetError::Busy {
                session,
                worker,
                turn,
            } => BrokerError::FleetBusy {
                session,
                worker,
                turn,
            },
            FleetError::BusyAfterWait {
                session,
                worker,
                turn,
                waited_ms,
            } => BrokerError::FleetBusyAfterWait {
                session,
                worker,
                turn,
                waited_ms,
            },
            FleetError::Local(e) => e,
            FleetError::Exists(id) => BrokerError::SessionExists(id),
            e => BrokerError::Fleet(e.to_string()),
        }
    }
}

/// The fleet operations a turn needs. Implementations must be cheap to
/// share (`Arc<dyn Fleet>`); every method is cancel-safe in the sense that
/// dropping its future never leaves a half-committed generation.
pub trait Fleet: Send + Sync + std::fmt::Debug {
    /// This worker's name in the catalog.
    fn worker_id(&self) -> &str;

    fn lease_ttl(&self) -> Duration;

    /// Takes session `session_id`'s lease for turn `turn_id`: granted if
    /// nobody holds it or its holder's lease expired; otherwise refused
    /// (`Busy`, naming the holder) or waited for, per `policy`.
    fn acquire<'a>(
        &'a self,
        session_id: &'a str,
        turn_id: &'a str,
        policy: LeasePolicy,
    ) -> BoxFuture<'a, Result<FleetLease, FleetError>>;

    /// [`Fleet::acquire`] for a turn that holds the host lease `local` of
    /// its session: a fleet may look at the local copy for the hydrate
    /// that follows while it waits for the lease.
    fn acquire_for<'a>(
        &'a self,
        sessions: &'a Sessions,
        local: &'a Lease,
        turn_id: &'a str,
        policy: LeasePolicy,
    ) -> BoxFuture<'a, Result<FleetLease, FleetError>> {
        let _ = sessions;
        self.acquire(local.session_id(), turn_id, policy)
    }

    /// Extends the lease by the TTL; refused (`LeaseLost`) once it expired
    /// or another token took it.
    fn renew<'a>(&'a self, lease: &'a FleetLease) -> BoxFuture<'a, Result<(), FleetError>>;

    /// Gives the lease up (if it is still this one).
    fn release<'a>(&'a self, lease: &'a FleetLease) -> BoxFuture<'a, Result<(), FleetError>>;

    /// Makes the local copy of the session (whose host lease `local` the
    /// caller holds) the catalog's generation, restoring it from its
    /// archive if it is not; then notes that a turn is about to change it.
    fn hydrate<'a>(
        &'a self,
        sessions: &'a Sessions,
        local: &'a Lease,
        lease: &'a FleetLease,
    ) -> BoxFuture<'a, Result<Hydrated, FleetError>>;

    /// After the turn: if home or work changed since hydrate, uploads a new
    /// archive and advances the generation in one fenced update.
    fn commit<'a>(
        &'a self,
        sessions: &'a Sessions,
        local: &'a Lease,
        lease: &'a FleetLease,
    ) -> BoxFuture<'a, Result<Commit, CommitFailed>>;

    /// Every session of the catalog, sorted by id.
    fn catalog(&self) -> BoxFuture<'_, Result<Vec<CatalogEntry>, FleetError>>;

    /// Removes session `session_id` from the catalog and deletes its
    /// archives; refused (`Busy`) while a turn holds its lease anywhere.
    /// `false`: it was not in the catalog.
    fn forget<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, Result<bool, FleetError>> {
        let _ = session_id;
        Box::pin(async { Ok(false) })
    }

    /// Makes session `dst` a copy of `src`'s committed generation (its
    /// archive copied in the store; its first turn anywhere hydrates it).
    /// `false`: `src` has no committed generation. `dst` must not be in
    /// the catalog.
    fn fork<'a>(&'a self, src: &'a str, dst: &'a str) -> BoxFuture<'a, Result<bool, FleetError>> {
        let _ = (src, dst);
        Box::pin(async { Ok(false) })
    }
}

/// One host, no fleet: what the broker does without `[fleet]`. The lease
/// is the host's own (taken by the caller through [`Sessions::lease`]), so
/// acquiring here always succeeds; nothing is hydrated or committed.
#[derive(Debug, Clone)]
pub struct Local {
    worker_id: String,
}

impl Local {
    pub fn new(worker_id: impl Into<String>) -> Local {
        Local {
            worker_id: worker_id.into(),
        }
    }
}

impl Fleet for Local {
    fn worker_id(&self) -> &str {
        &self.worker_id
    }

    fn lease_ttl(&self) -> Duration {
        Duration::MAX
    }

    fn acquire<'a>(
        &'a self,
        session_id: &'a str,
        turn_id: &'a str,
        _policy: LeasePolicy,
    ) -> BoxFuture<'a, Result<FleetLease, FleetError>> {
        Box::pin(async move {
            Ok(FleetLease {
                session_id: session_id.to_string(),
                turn_id: turn_id.to_string(),
                token: 0,
                generation: 0,
                archive: None,
                acquired_at: Instant::now(),
            })
        })
    }

    fn renew<'a>(&'a self, _lease: &'a FleetLease) -> BoxFuture<'a, Result<(), FleetError>> {
        Box::pin(async { Ok(()) })
    }

    fn release<'a>(&'a self, _lease: &'a FleetLease) -> BoxFuture<'a, Result<(), FleetError>> {
        Box::pin(async { Ok(()) })
    }

    fn hydrate<'a>(
        &'a self,
        _sessions: &'a Sessions,
        _local: &'a Lease,
        _lease: &'a FleetLease,
    ) -> BoxFuture<'a, Result<Hydrated, FleetError>> {
        Box::pin(async { Ok(Hydrated::default()) })
    }

    fn commit<'a>(
        &'a self,
        _sessions: &'a Sessions,
        _local: &'a Lease,
        _lease: &'a FleetLease,
    ) -> BoxFuture<'a, Result<Commit, CommitFailed>> {
        Box::pin(async { Ok(Commit::Unchanged { generation: 0 }) })
    }

    fn catalog(&self) -> BoxFuture<'_, Result<Vec<CatalogEntry>, FleetError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

/// How often a held lease is renewed: three times per TTL.
pub fn renew_interval(ttl: Duration) -> Duration {
    ttl / 3
}

/// How long before its expiry a lease that could not be renewed is given
/// up: the turn then has this long to end before another worker may take
/// the session.
pub fn give_up_margin(ttl: Duration) -> Duration {
    ttl / 4
}

/// Keeps `lease` alive until `stop` fires: renews it every
/// [`renew_interval`], retrying failed renewals until the lease is within
/// [`give_up_margin`] of expiring. When the lease is lost (refused by the
/// catalog, or not renewed in time), calls `lost` once with the cause and
/// returns; the caller ends its turn.
pub async fn keep_alive(
    fleet: Arc<dyn Fleet>,
    lease: FleetLease,
    stop: CancellationToken,
    lost: impl FnOnce(FleetError) + Send,
) {
    let ttl = fleet.lease_ttl();
    if ttl == Duration::MAX {
        return;
    }
    let every = renew_interval(ttl);
    let retry = (ttl / 10).max(Duration::from_millis(10));
    let mut valid_until = lease.acquired_at + ttl;
    let mut next = lease.acquired_at + every;
    loop {
        let give_up = valid_until - give_up_margin(ttl);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(next.min(give_up)) => {}
        }
        let sent = Instant::now();
        if sent >= give_up {
            lost(FleetError::LeaseLost {
                session: lease.session_id.clone(),
                why: format!("not renewed within its {} ms TTL", ttl.as_millis()),
            });
            return;
        }
        let attempt = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout_at(give_up, fleet.renew(&lease)) => r,
        };
        match attempt {
            Ok(Ok(())) => {
                valid_until = sent + ttl;
                next = sent + every;
            }
            Ok(Err(e @ FleetError::LeaseLost { .. })) => {
                lost(e);
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(session.id = %lease.session_id, error = %e, "cannot renew the fleet lease; retrying");
                if Instant::now() + retry >= give_up {
                    lost(FleetError::LeaseLost {
                        session: lease.session_id.clone(),
                        why: format!("cannot renew it: {e}"),
                    });
                    return;
                }
                next = Instant::now() + retry;
            }
            Err(_) => {
                lost(FleetError::LeaseLost {
                    session: lease.session_id.clone(),
                    why: format!(
                        "the renewal did not answer within its {} ms TTL",
                        ttl.as_millis()
                    ),
                });
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fleet whose renewals answer from a script.
    #[derive(Debug)]
    struct Scripted {
        ttl: Duration,
        answers: Mutex<Vec<Result<(), &'static str>>>,
        hang_after_script: bool,
        renewals: AtomicUsize,
    }

    impl Fleet for Scripted {
        fn worker_id(&self) -> &str {
            "w"
        }
        fn lease_ttl(&self) -> Duration {
            self.ttl
        }
        fn acquire<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
            _: LeasePolicy,
        ) -> BoxFuture<'a, Result<FleetLease, FleetError>> {
            unreachable!("not used")
        }
        fn renew<'a>(&'a self, lease: &'a FleetLease) -> BoxFuture<'a, Result<(), FleetError>> {
            self.renewals.fetch_add(1, Ordering::SeqCst);
            let next = self.answers.lock().expect("script").pop();
            let session = lease.session_id.clone();
            let hang = self.hang_after_script;
            Box::pin(async move {
                match next {
                    Some(Ok(())) => Ok(()),
                    Some(Err("lost")) => Err(FleetError::LeaseLost {
                        session,
                        why: "taken by worker B".into(),
                    }),
                    Some(Err(e)) => Err(FleetError::Database(e.to_string())),
                    None if hang => std::future::pending().await,
                    None => Ok(()),
                }
            })
        }
        fn release<'a>(&'a self, _: &'a FleetLease) -> BoxFuture<'a, Result<(), FleetError>> {
            Box::pin(async { Ok(()) })
        }
        fn hydrate<'a>(
            &'a self,
            _: &'a Sessions,
            _: &'a Lease,
            _: &'a FleetLease,
        ) -> BoxFuture<'a, Result<Hydrated, FleetError>> {
            unreachable!("not used")
        }
        fn commit<'a>(
            &'a self,
            _: &'a Sessions,
            _: &'a Lease,
            _: &'a FleetLease,
        ) -> BoxFuture<'a, Result<Commit, CommitFailed>> {
            unreachable!("not used")
        }
        fn catalog(&self) -> BoxFuture<'_, Result<Vec<CatalogEntry>, FleetError>> {
            unreachable!("not used")
        }
    }

    fn lease() -> FleetLease {
        FleetLease {
            session_id: "s".into(),
            turn_id: "t".into(),
            token: 7,
            generation: 0,
            archive: None,
            acquired_at: Instant::now(),
        }
    }

    /// Runs `keep_alive` over `script` (answers in order) until it reports
    /// the lease lost or `run_for` passes; returns the loss and when.
    async fn run(
        script: Vec<Result<(), &'static str>>,
        hang: bool,
        run_for: Duration,
    ) -> (Option<(String, Duration)>, usize) {
        let fleet = Arc::new(Scripted {
            ttl: Duration::from_millis(3000),
            answers: Mutex::new(script.into_iter().rev().collect()),
            hang_after_script: hang,
            renewals: AtomicUsize::new(0),
        });
        let start = Instant::now();
        let stop = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(keep_alive(fleet.clone(), lease(), stop.clone(), move |e| {
            let _ = tx.send((e.to_string(), start.elapsed()));
        }));
        let got = tokio::time::timeout(run_for, rx)
            .await
            .ok()
            .and_then(|r| r.ok());
        stop.cancel();
        task.await.expect("keep_alive");
        (got, fleet.renewals.load(Ordering::SeqCst))
    }

    #[tokio::test(start_paused = true)]
    async fn a_healthy_lease_is_renewed_every_third_of_its_ttl() {
        let (lost, renewals) = run(vec![], false, Duration::from_millis(10_500)).await;
        assert_eq!(lost, None);
        // At 1 s, 2 s, … 10 s.
        assert_eq!(renewals, 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_renewal_loses_the_lease_at_once() {
        let (lost, _) = run(vec![Ok(()), Err("lost")], false, Duration::from_secs(60)).await;
        let (msg, at) = lost.expect("lost");
        assert_eq!(msg, "lease of session s lost: taken by worker B");
        assert_eq!(at, Duration::from_millis(2000));
    }

    #[tokio::test(start_paused = true)]
    async fn failing_renewals_are_retried_then_given_up_before_expiry() {
        // The database answers errors from the second renewal on.
        let script = std::iter::once(Ok(()))
            .chain(std::iter::repeat_n(Err("connection refused"), 100))
            .collect();
        let (lost, renewals) = run(script, false, Duration::from_secs(60)).await;
        let (msg, at) = lost.expect("lost");
        assert!(
            msg.starts_with(
                "lease of session s lost: cannot renew it: fleet database: connection refused"
            ),
            "{msg}"
        );
        // Valid until 1 s + 3 s; given up a quarter TTL before that.
        assert!(at <= Duration::from_millis(3250), "{at:?}");
        assert!(at >= Duration::from_millis(3000), "{at:?}");
        assert!(renewals > 2, "retried: {renewals}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_that_never_answers_loses_the_lease_within_the_ttl() {
        let (lost, _) = run(vec![Ok(())], true, Duration::from_secs(60)).await;
        let (msg, at) = lost.expect("lost");
        assert!(
            msg.contains("did not answer within its 3000 ms TTL"),
            "{msg}"
        );
        assert_eq!(at, Duration::from_millis(3250));
    }

    #[tokio::test(start_paused = true)]
    async fn the_local_fleet_never_expires() {
        let stop = CancellationToken::new();
        let fleet: Arc<dyn Fleet> = Arc::new(Local::new("w"));
        // Returns at once: there is nothing to renew.
        keep_alive(fleet, lease(), stop, |_| panic!("lost")).await;
    }

    #[test]
    fn config_parses_with_defaults_and_hides_the_password() {
        let cfg: FleetConfig = toml::from_str(
            "database = \"postgres://ts:hunter2@db:5432/ts\"\narchives = \"file:///srv/a\"\nworker_id = \"A\"\n",
        )
        .expect("parse");
        assert_eq!(cfg.lease_ttl_ms, 30_000);
        assert_eq!(cfg.keep_generations, 3);
        assert_eq!(cfg.worker_id(), "A");
        cfg.validate().expect("valid");
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("postgres://ts:***@db:5432/ts"), "{shown}");
        assert_eq!(
            redact_url("host=db user=ts password=hunter2"),
            "host=db user=ts password=***"
        );
        assert!(
            toml::from_str::<FleetConfig>("database = \"x\"\narchives = \"y\"\nttl = 5\n").is_err()
        );
        for (bad, want) in [
            ("lease_ttl_ms = 10", "lease_ttl_ms = 10 is out of range"),
            (
                "keep_generations = 0",
                "keep_generations = 0 is out of range",
            ),
            (
                "worker_id = \"a/b\"",
                "worker_id \"a/b\" is not a valid name",
            ),
        ] {
            let cfg: FleetConfig =
                toml::from_str(&format!("database = \"x\"\narchives = \"y\"\n{bad}\n"))
                    .expect("parse");
            let err = cfg.validate().expect_err(bad);
            assert!(err.contains(want), "{err}");
        }
        // Without worker_id: the host name.
        let cfg: FleetConfig =
            toml::from_str("database = \"x\"\narchives = \"y\"\n").expect("parse");
        assert!(!cfg.worker_id().is_empty());
    }
}
