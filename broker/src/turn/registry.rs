//! The turns an executor can attach to: those running, and those that ended
//! less than `finished_turn_retention_ms` ago (their journals), by session,
//! id and idempotency key. A broker that starts finds the journals an earlier
//! one left; a turn that was running when it stopped gets its `Exited` with
//! reason `broker_restart` written then.

use super::link::Link;
use super::spec::TurnSpec;
use crate::error::BrokerError;
use crate::journal::{Header, Journal};
use std::collections::HashMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tracing::{info, warn};
use turnstile_proto::v1 as pb;

/// What a `Start` found in the registry.
pub enum Begin {
    /// A new turn, with its link (registered as running).
    New(Arc<Link>),
    /// The key names a turn that runs: attach to it.
    Attach(Arc<Link>),
    /// The key names a turn that ended: replay its journal.
    Replay(PathBuf),
}

/// A turn found for an `Attach`.
pub enum Found {
    Running(Arc<Link>),
    Ended(PathBuf),
}

#[derive(Debug)]
enum Life {
    Running(Arc<Link>),
    /// Its journal (`None` with the journal off) and when it ended.
    Ended(Option<PathBuf>, SystemTime),
}

#[derive(Debug)]
struct Entry {
    turn_id: String,
    key: String,
    fingerprint: String,
    life: Life,
}

/// The broker's turns, running and kept.
#[derive(Debug)]
pub struct Registry {
    dir: PathBuf,
    cap: u64,
    retention: Duration,
    sessions: Mutex<HashMap<String, Vec<Entry>>>,
}

impl Registry {
    /// The registry over `<state>/journals`, with what earlier brokers left
    /// there.
    pub fn open(dir: PathBuf, cap: u64, retention: Duration) -> std::io::Result<Registry> {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(&dir)?;
        let registry = Registry {
            dir,
            cap,
            retention,
            sessions: Mutex::default(),
        };
        registry.recover();
        Ok(registry)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Entry>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self, session: &str, turn: &str) -> PathBuf {
        self.dir.join(session).join(format!("{turn}.journal"))
    }

    /// Registers a `Start`'s turn, or finds the turn its key names.
    pub fn begin(
        &self,
        spec: &TurnSpec,
        signals: mpsc::Sender<nix::sys::signal::Signal>,
    ) -> Result<Begin, BrokerError> {
        let fingerprint = spec.fingerprint();
        let mut sessions = self.lock();
        let entries = sessions.entry(spec.session_id.clone()).or_default();
        if !spec.turn_key.is_empty()
            && let Some(e) = entries.iter().find(|e| e.key == spec.turn_key)
        {
            if e.fingerprint != fingerprint {
                return Err(BrokerError::KeyMismatch {
                    key: spec.turn_key.clone(),
                    session: spec.session_id.clone(),
                    turn: e.turn_id.clone(),
                });
            }
            return match &e.life {
                Life::Running(link) => Ok(Begin::Attach(link.clone())),
                Life::Ended(Some(path), _) => Ok(Begin::Replay(path.clone())),
                Life::Ended(None, _) => Err(BrokerError::NotKept {
                    session: spec.session_id.clone(),
                    turn: e.turn_id.clone(),
                    key: spec.turn_key.clone(),
                }),
            };
        }
        if let Some(i) = entries.iter().position(|e| e.turn_id == spec.turn_id) {
            if matches!(entries[i].life, Life::Running(_)) {
                return Err(BrokerError::TurnIdInUse {
                    turn: spec.turn_id.clone(),
                    session: spec.session_id.clone(),
                });
            }
            // A turn of the same id that ended: the new one replaces it.
            entries.remove(i);
        }
        let journal = if self.cap == 0 {
            None
        } else {
            Some(self.create_journal(spec, &fingerprint)?)
        };
        let link = Link::new(journal, self.cap, signals);
        entries.push(Entry {
            turn_id: spec.turn_id.clone(),
            key: spec.turn_key.clone(),
            fingerprint,
            life: Life::Running(link.clone()),
        });
        Ok(Begin::New(link))
    }

    fn create_journal(&self, spec: &TurnSpec, fingerprint: &str) -> Result<Journal, BrokerError> {
        let path = self.path(&spec.session_id, &spec.turn_id);
        let header = Header {
            session_id: spec.session_id.clone(),
            turn_id: spec.turn_id.clone(),
            turn_key: spec.turn_key.clone(),
            fingerprint: fingerprint.to_string(),
            created_unix_ms: crate::session::now_unix_ms(),
        };
        let create = || {
            if let Some(parent) = path.parent() {
                std::fs::DirBuilder::new()
                    .mode(0o700)
                    .recursive(true)
                    .create(parent)?;
            }
            Journal::create(&path, &header)
        };
        create().map_err(|source| BrokerError::Journal {
            path: path.clone(),
            source,
        })
    }

    /// A turn that was registered but never ran (its admission failed):
    /// forgotten, with its journal.
    pub fn abandon(&self, session: &str, turn: &str) {
        let mut sessions = self.lock();
        if let Some(entries) = sessions.get_mut(session) {
            entries.retain(|e| e.turn_id != turn);
        }
        drop(sessions);
        let _ = std::fs::remove_file(self.path(session, turn));
    }

    /// A running turn ended (its `Exited` is in its journal).
    pub fn ended(&self, session: &str, turn: &str) {
        let path = (self.cap > 0).then(|| self.path(session, turn));
        let mut sessions = self.lock();
        if let Some(e) = sessions
            .get_mut(session)
            .and_then(|es| es.iter_mut().find(|e| e.turn_id == turn))
        {
            e.life = Life::Ended(path, SystemTime::now());
        }
    }

    /// The turn an `Attach` names: by id, by key, or (with neither) the
    /// session's running turn, else its most recent one kept.
    pub fn find(&self, session: &str, turn: &str, key: &str) -> Result<Found, BrokerError> {
        let sessions = self.lock();
        let entries = sessions.get(session).map(Vec::as_slice).unwrap_or_default();
        let entry = if !turn.is_empty() {
            entries.iter().find(|e| e.turn_id == turn)
        } else if !key.is_empty() {
            entries.iter().find(|e| e.key == key)
        } else {
            entries
                .iter()
                .find(|e| matches!(e.life, Life::Running(_)))
                .or_else(|| {
                    entries
                        .iter()
                        .rev()
                        .find(|e| matches!(e.life, Life::Ended(Some(_), _)))
                })
        };
        let not_found = || BrokerError::TurnNotFound {
            session: session.to_string(),
            what: match (turn, key) {
                ("", "") => "running or kept".to_string(),
                ("", k) => format!("with key {k}"),
                (t, _) => t.to_string(),
            },
        };
        match entry.map(|e| &e.life) {
            Some(Life::Running(link)) => Ok(Found::Running(link.clone())),
            Some(Life::Ended(Some(path), _)) => Ok(Found::Ended(path.clone())),
            Some(Life::Ended(None, _)) | None => Err(not_found()),
        }
    }

    /// Forgets a deleted session's turns and journals.
    pub fn forget_session(&self, session: &str) {
        self.lock().remove(session);
        let dir = self.dir.join(session);
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(path = %dir.display(), error = %e, "cannot remove the session's journals");
        }
    }

    /// Deletes the journals of turns that ended longer than the retention
    /// ago.
    pub fn expire(&self) {
        let now = SystemTime::now();
        let mut gone = Vec::new();
        let mut sessions = self.lock();
        for (session, entries) in sessions.iter_mut() {
            entries.retain(|e| match &e.life {
                Life::Ended(path, at)
                    if now.duration_since(*at).unwrap_or_default() >= self.retention =>
                {
                    if let Some(p) = path {
                        gone.push(p.clone());
                    }
                    let _ = session;
                    false
                }
                _ => true,
            });
        }
        sessions.retain(|_, entries| !entries.is_empty());
        drop(sessions);
        for p in gone {
            let _ = std::fs::remove_file(&p);
        }
    }

    /// Loads the journals under the dir: each becomes a kept turn; one
    /// without an `Exited` (its broker stopped mid-turn) gets one with
    /// reason `broker_restart`. Unreadable ones are removed.
    fn recover(&self) {
        let Ok(sessions) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut found = 0;
        for session in sessions.flatten() {
            let Ok(files) = std::fs::read_dir(session.path()) else {
                continue;
            };
            for file in files.flatten() {
                let path = file.path();
                match self.recover_one(&path) {
                    Ok(()) => found += 1,
                    Err(e) => {
                        warn!(path = %path.display(), error = %e, "removing a journal that cannot be read");
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
        }
        if found > 0 {
            info!(turns = found, "turn journals found from an earlier run");
        }
        self.expire();
    }

    fn recover_one(&self, path: &Path) -> std::io::Result<()> {
        let recovered = Journal::recover(path)?;
        let header = recovered.header;
        if crate::validate::session_id(&header.session_id).is_err()
            || crate::validate::turn_id(&header.turn_id).is_err()
            || path != self.path(&header.session_id, &header.turn_id)
        {
            return Err(std::io::Error::other("its header names another place"));
        }
        let mut journal = recovered.journal;
        if !recovered.exited {
            let exited = pb::Exited {
                reason: pb::exited::Reason::BrokerRestart as i32,
                message: "the broker stopped while the turn ran; its events up to then are kept"
                    .to_string(),
                ..Default::default()
            };
            journal.append(&pb::TurnEvent {
                kind: Some(pb::turn_event::Kind::Exited(exited)),
                seq: journal.last_seq() + 1,
            })?;
            info!(session.id = %header.session_id, turn.id = %header.turn_id, "turn ended by a broker restart");
        }
        let ended = std::fs::metadata(path)?
            .modified()
            .unwrap_or_else(|_| SystemTime::now());
        let mut sessions = self.lock();
        sessions.entry(header.session_id).or_default().push(Entry {
            turn_id: header.turn_id,
            key: header.turn_key,
            fingerprint: header.fingerprint,
            life: Life::Ended(Some(path.to_path_buf()), ended),
        });
        Ok(())
    }
}

/// A kept turn's journal, opened for a replay.
pub fn replay(path: &Path) -> Result<Arc<Link>, BrokerError> {
    let recovered = Journal::recover(path).map_err(|source| BrokerError::Journal {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(Link::replay(recovered.journal))
}
