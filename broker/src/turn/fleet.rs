//! A turn in fleet mode (see [`crate::fleet`]): the fleet lease taken at
//! admission is kept alive while the turn runs; the session is hydrated
//! before the turn is prepared and committed after it finished; the lease
//! is released before the turn's `Exited` goes out, so the next `Start`
//! on any worker finds the session free.

use super::Turn;
use crate::StopReason;
use crate::fleet::{Commit, Fleet, FleetLease, Hydrated, keep_alive};
use std::sync::{Arc, OnceLock};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{Instrument, info, warn};
use turnstile_proto::v1 as pb;
use turnstile_proto::v1::exited::Reason;

/// A turn's hold on its session's fleet lease.
#[derive(Debug)]
pub struct FleetTurn {
    pub fleet: Arc<dyn Fleet>,
    pub lease: FleetLease,
    /// Why the lease was lost, once it was: the turn is ended and commits
    /// nothing.
    lost: Arc<OnceLock<String>>,
    /// What hydrate did (set once it succeeded).
    hydrated: OnceLock<Hydrated>,
    /// Stops the renewals when the turn is done (or dropped).
    renewing: Option<DropGuard>,
}

impl FleetTurn {
    /// Starts keeping `lease` alive for admitted `turn`: a renewal that
    /// fails in time ends it with [`StopReason::LeaseLost`].
    pub fn keep(fleet: Arc<dyn Fleet>, lease: FleetLease, turn: &crate::ActiveTurn) -> FleetTurn {
        let lost: Arc<OnceLock<String>> = Arc::default();
        let stop = CancellationToken::new();
        let (slot, active) = (lost.clone(), turn.clone());
        let on_lost = move |e: crate::fleet::FleetError| {
            warn!(error = %e, "fleet lease lost: ending the turn");
            let _ = slot.set(e.to_string());
            active.stop(StopReason::LeaseLost);
        };
        tokio::spawn(
            keep_alive(fleet.clone(), lease.clone(), stop.clone(), on_lost).in_current_span(),
        );
        FleetTurn {
            fleet,
            lease,
            lost,
            hydrated: OnceLock::new(),
            renewing: Some(stop.drop_guard()),
        }
    }

    /// Hydrate's time (µs) and the generation the turn runs on, for
    /// `Started`.
    pub fn started_info(&self) -> (u64, i64) {
        match self.hydrated.get() {
            Some(h) => (
                if h.restored_bytes.is_some() {
                    u64::try_from(h.elapsed.as_micros()).unwrap_or(u64::MAX)
                } else {
                    0
                },
                h.generation,
            ),
            None => (0, self.lease.generation),
        }
    }

    /// Stops renewing and gives the lease up.
    pub async fn release(mut self) {
        drop(self.renewing.take());
        if let Err(e) = self.fleet.release(&self.lease).await {
            // It expires after its TTL.
            warn!(error = %e, "cannot release the fleet lease");
        }
    }
}

impl Turn {
    /// Makes the local copy the catalog's generation. An `Exited` when the
    /// turn cannot run on it (a refused archive, an unreachable store).
    pub(super) async fn hydrate(&self) -> Result<(), pb::Exited> {
        let Some(f) = &self.fleet else {
            return Ok(());
        };
        let sessions = &self.broker.sessions;
        match f.fleet.hydrate(sessions, &self.lease, &f.lease).await {
            Ok(h) => {
                if let Some(kept) = &h.kept_as {
                    let message = format!(
                        "the local copy of session {} held changes no turn committed (a turn that \
                         ended without its commit): kept as session {kept}; this turn runs on \
                         generation {}",
                        self.spec.session_id, h.generation
                    );
                    self.link
                        .send(pb::turn_event::Kind::Notice(pb::Notice { message }));
                }
                let _ = f.hydrated.set(h);
                Ok(())
            }
            Err(e) => {
                warn!(error = %e, "cannot hydrate the session");
                Err(pb::Exited {
                    reason: Reason::SpawnFailed as i32,
                    message: format!("the turn did not start: {e}"),
                    wall_time_us: self.received.elapsed().as_micros() as u64,
                    ..Default::default()
                })
            }
        }
    }

    /// After the turn: a lost lease commits nothing; otherwise the
    /// session's changes become the next generation. A commit that fails
    /// turns `exited` into `COMMIT_FAILED`, naming the cause and the
    /// session id the turn's files were kept as.
    pub(super) async fn commit(&self, mut exited: pb::Exited) -> pb::Exited {
        let Some(f) = &self.fleet else {
            return exited;
        };
        if let Some(why) = f.lost.get() {
            exited.reason = Reason::LeaseLost as i32;
            exited.message = format!("{why}: the turn was ended and nothing was committed");
            return exited;
        }
        if f.hydrated.get().is_none() {
            // The turn never ran on the catalog's state.
            return exited;
        }
        let sessions = &self.broker.sessions;
        match f.fleet.commit(sessions, &self.lease, &f.lease).await {
            Ok(Commit::Unchanged { .. }) => {}
            Ok(Commit::Advanced { generation, bytes }) => {
                info!(generation, bytes, "turn committed");
            }
            Err(e) => {
                if let Some(kept) = &e.kept_as {
                    self.record_kept(kept);
                }
                let mut message = format!(
                    "commit of session {} failed: {e}; the committed state is unchanged",
                    self.spec.session_id
                );
                if !exited.message.is_empty() {
                    message = format!("{message}; the turn: {}", exited.message);
                }
                exited.reason = Reason::CommitFailed as i32;
                exited.message = message;
            }
        }
        exited
    }

    /// The copy kept after a failed commit: its metadata says how its turn
    /// really ended (`commit_failed`, not the agent's exit `finish`
    /// recorded before the commit).
    fn record_kept(&self, kept: &str) {
        let sessions = &self.broker.sessions;
        let Some(mut meta) = sessions.meta(kept) else {
            return;
        };
        meta.last_exit_reason = Some(Reason::CommitFailed.as_str_name().to_ascii_lowercase());
        if let Err(e) = sessions.write_meta(&sessions.paths(kept), &meta) {
            warn!(session.id = %kept, error = %e, "cannot record commit_failed in the kept copy's metadata");
        }
    }
}
