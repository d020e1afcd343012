//! Sessions: their stable paths on the host, their metadata, and the turn
//! lease that admits at most one turn per session at a time. The lock lives
//! here and nowhere else.

use crate::error::BrokerError;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::OwnedMutexGuard;

/// Host paths of one session.
#[derive(Debug, Clone)]
pub struct SessionPaths {
    pub dir: PathBuf,
    pub home: PathBuf,
    pub work: PathBuf,
    pub meta: PathBuf,
}

/// What the broker records of a session, beside its home and work dirs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionMeta {
    pub session_id: String,
    pub created_unix_ms: u64,
    pub turn_count: u64,
    pub last_turn_id: Option<String>,
    pub last_turn_start_unix_ms: Option<u64>,
    pub last_turn_end_unix_ms: Option<u64>,
    pub last_exit_reason: Option<String>,
    #[serde(default)]
    pub forked_from: Option<String>,
}

#[derive(Debug, Default)]
struct Slot {
    /// tokio's Mutex queues waiters in arrival order (fair), which is what a
    /// waiting lease needs.
    lock: Arc<tokio::sync::Mutex<()>>,
    running: Mutex<Option<String>>,
}

/// The right to run one turn of a session. Dropping it ends the lease.
#[derive(Debug)]
pub struct Lease {
    session_id: String,
    slot: Arc<Slot>,
    leases: Arc<Mutex<HashMap<String, Arc<Slot>>>>,
    _guard: OwnedMutexGuard<()>,
}

impl Lease {
    pub fn session_id(&self) -> &str {
        &self.session_id
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Ok(mut running) = self.slot.running.lock() {
            *running = None;
        }
        if let Ok(mut map) = self.leases.lock() {
            // The map's reference and ours: nobody else waits for this slot.
            if Arc::strong_count(&self.slot) == 2 {
                map.remove(&self.session_id);
            }
        }
    }
}

/// How a `Start` for a busy session is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeasePolicy {
    Reject,
    Wait(Duration),
}

#[derive(Debug)]
pub struct Sessions {
    root: PathBuf,
    /// Owner of new home and work dirs (the jail's host uid/gid), if any.
    owner: Option<(u32, u32)>,
    leases: Arc<Mutex<HashMap<String, Arc<Slot>>>>,
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn mkdir(path: &Path, mode: u32) -> Result<(), BrokerError> {
    match std::fs::DirBuilder::new().mode(mode).create(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(BrokerError::io("cannot create", path, e)),
    }
}

impl Sessions {
    pub fn new(root: PathBuf, owner: Option<(u32, u32)>) -> Result<Self, BrokerError> {
        // Traversable, not listable: nsjail binds a session's home and work
        // from inside the jail's user namespace.
        mkdir(&root, 0o711)?;
        Ok(Sessions {
            root,
            owner,
            leases: Arc::default(),
        })
    }

    /// Paths of a session; `id` must already be validated.
    pub fn paths(&self, id: &str) -> SessionPaths {
        let dir = self.root.join(id);
        SessionPaths {
            home: dir.join("home"),
            work: dir.join("work"),
            meta: dir.join("meta.json"),
            dir,
        }
    }

    /// Takes the session's lease according to `policy`.
    pub async fn lease(
        &self,
        id: &str,
        turn_id: &str,
        policy: LeasePolicy,
    ) -> Result<Lease, BrokerError> {
        let slot = {
            let mut map = self.leases.lock().map_err(|_| BrokerError::ShuttingDown)?;
            map.entry(id.to_string()).or_default().clone()
        };
        let guard = match policy {
            LeasePolicy::Reject => slot.lock.clone().try_lock_owned().map_err(|_| {
                let turn = slot
                    .running
                    .lock()
                    .ok()
                    .and_then(|r| r.clone())
                    .unwrap_or_else(|| "?".into());
                BrokerError::Busy {
                    session: id.to_string(),
                    turn,
                }
            })?,
            LeasePolicy::Wait(max) => tokio::time::timeout(max, slot.lock.clone().lock_owned())
                .await
                .map_err(|_| BrokerError::BusyAfterWait {
                    session: id.to_string(),
                    waited_ms: max.as_millis() as u64,
                })?,
        };
        if let Ok(mut running) = slot.running.lock() {
            *running = Some(turn_id.to_string());
        }
        Ok(Lease {
            session_id: id.to_string(),
            slot,
            leases: self.leases.clone(),
            _guard: guard,
        })
    }

    /// Creates the session's directories if new and returns its metadata.
    /// Never follows links inside home or work: those belong to the agent.
    pub fn ensure(&self, lease: &Lease) -> Result<(SessionPaths, SessionMeta), BrokerError> {
        let paths = self.paths(lease.session_id());
        mkdir(&paths.dir, 0o711)?;
        for d in [&paths.home, &paths.work] {
            if std::fs::symlink_metadata(d).is_err() {
                mkdir(d, 0o700)?;
                if let Some((uid, gid)) = self.owner {
                    std::os::unix::fs::lchown(d, Some(uid), Some(gid))
                        .map_err(|e| BrokerError::io("cannot chown", d, e))?;
                }
            }
        }
        let meta = match std::fs::read(&paths.meta) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|_| SessionMeta {
                session_id: lease.session_id().to_string(),
                created_unix_ms: now_unix_ms(),
                ..SessionMeta::default()
            }),
            Err(_) => SessionMeta {
                session_id: lease.session_id().to_string(),
                created_unix_ms: now_unix_ms(),
                ..SessionMeta::default()
            },
        };
        Ok((paths, meta))
    }

    /// Writes metadata atomically (temp file, then rename).
    pub fn write_meta(&self, paths: &SessionPaths, meta: &SessionMeta) -> Result<(), BrokerError> {
        let tmp = paths.dir.join(".meta.json.tmp");
        let bytes = serde_json::to_vec_pretty(meta).map_err(std::io::Error::other);
        bytes
            .and_then(|b| {
                std::fs::write(&tmp, b)?;
                std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
                std::fs::rename(&tmp, &paths.meta)
            })
            .map_err(|e| BrokerError::io("cannot write", &paths.meta, e))
    }
}

/// Bytes used by everything under `path`, without following links.
pub fn disk_usage(path: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        total += meta.len();
        if meta.is_dir()
            && let Ok(rd) = std::fs::read_dir(&p)
        {
            stack.extend(rd.flatten().map(|e| e.path()));
        }
    }
    total
}

/// A unique hidden name in the sessions dir for a staging tree (ids never
/// start with '.', so it is never listed as a session).
fn staging_name(kind: &str, id: &str) -> String {
    use rand::Rng;
    format!(".{kind}-{id}-{:016x}", rand::rng().random::<u64>())
}

impl Sessions {
    /// The root of all sessions.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Moves a complete staging tree into place as session `id`; refused if
    /// the id exists. The staging tree is removed on failure.
    fn publish(&self, staging: &Path, id: &str, meta: SessionMeta) -> Result<(), BrokerError> {
        let result = (|| {
            let paths = SessionPaths {
                dir: staging.to_path_buf(),
                home: staging.join("home"),
                work: staging.join("work"),
                meta: staging.join("meta.json"),
            };
            for d in [&paths.home, &paths.work] {
                if std::fs::symlink_metadata(d).is_err() {
                    mkdir(d, 0o700)?;
                }
            }
            if let Some((uid, gid)) = self.owner {
                for d in [&paths.home, &paths.work] {
                    crate::archive::chown_tree(d, uid, gid)
                        .map_err(|e| BrokerError::io("cannot chown", d, e))?;
                }
            }
            std::fs::set_permissions(staging, std::fs::Permissions::from_mode(0o711))
                .map_err(|e| BrokerError::io("cannot chmod", staging, e))?;
            self.write_meta(&paths, &meta)?;
            let dest = self.paths(id).dir;
            if dest.exists() {
                return Err(BrokerError::SessionExists(id.to_string()));
            }
            // rename(2) of a directory is atomic: the session appears whole.
            std::fs::rename(staging, &dest).map_err(|e| BrokerError::io("cannot publish", &dest, e))
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(staging);
        }
        result
    }

    /// Copies `src` to a new session `dst` (see `ForkSession`).
    pub async fn fork(&self, src: &str, dst: &str) -> Result<SessionMeta, BrokerError> {
        let lease = self.lease(src, "(fork)", LeasePolicy::Reject).await?;
        let _dst_lease = self.lease(dst, "(fork)", LeasePolicy::Reject).await?;
        let from = self.paths(src).dir;
        if !from.is_dir() {
            return Err(BrokerError::SessionNotFound(src.to_string()));
        }
        if self.paths(dst).dir.exists() {
            return Err(BrokerError::SessionExists(dst.to_string()));
        }
        let staging = self.root.join(staging_name("fork", dst));
        mkdir(&staging, 0o700)?;
        for part in ["home", "work"] {
            if let Err(e) = crate::archive::copy_tree(&from.join(part), &staging.join(part)) {
                let _ = std::fs::remove_dir_all(&staging);
                return Err(BrokerError::io("cannot copy", from.join(part), e));
            }
        }
        let meta = SessionMeta {
            session_id: dst.to_string(),
            created_unix_ms: now_unix_ms(),
            forked_from: Some(src.to_string()),
            ..SessionMeta::default()
        };
        self.publish(&staging, dst, meta.clone())?;
        drop(lease);
        Ok(meta)
    }

    /// Writes session `id` as a tar to `w` while holding its lease.
    pub async fn export_lease(&self, id: &str) -> Result<(Lease, PathBuf), BrokerError> {
        let lease = self.lease(id, "(export)", LeasePolicy::Reject).await?;
        let dir = self.paths(id).dir;
        if !dir.is_dir() {
            return Err(BrokerError::SessionNotFound(id.to_string()));
        }
        Ok((lease, dir))
    }

    /// Creates session `id` from an archive read from `r` (blocking).
    pub fn import(
        &self,
        lease: &Lease,
        r: impl std::io::Read,
        caps: crate::archive::ImportCaps,
    ) -> Result<SessionMeta, BrokerError> {
        let id = lease.session_id();
        if self.paths(id).dir.exists() {
            return Err(BrokerError::SessionExists(id.to_string()));
        }
        let staging = self.root.join(staging_name("import", id));
        mkdir(&staging, 0o700)?;
        if let Err(e) = crate::archive::import(r, &staging, caps) {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e.into());
        }
        // The archive's metadata is the session's history; its id is ours.
        let mut meta: SessionMeta = std::fs::read(staging.join("meta.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        meta.session_id = id.to_string();
        if meta.created_unix_ms == 0 {
            meta.created_unix_ms = now_unix_ms();
        }
        let _ = std::fs::remove_file(staging.join("meta.json"));
        self.publish(&staging, id, meta.clone())?;
        Ok(meta)
    }

    /// Takes the lease of a session that does not exist yet (for import).
    pub async fn new_session_lease(&self, id: &str) -> Result<Lease, BrokerError> {
        let lease = self.lease(id, "(import)", LeasePolicy::Reject).await?;
        if self.paths(id).dir.exists() {
            return Err(BrokerError::SessionExists(id.to_string()));
        }
        Ok(lease)
    }

    /// Removes staging trees a dead broker left (start-up only).
    pub fn clean_staging(&self) {
        if let Ok(rd) = std::fs::read_dir(&self.root) {
            for e in rd.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name.starts_with(".fork-") || name.starts_with(".import-") {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }

    /// Sessions idle since before `now - ttl`, with no running turn.
    pub fn idle_since(&self, cutoff_unix_ms: u64) -> Vec<String> {
        self.ids()
            .into_iter()
            .filter(|id| {
                self.meta(id)
                    .map(|m| {
                        let last = m
                            .last_turn_end_unix_ms
                            .max(m.last_turn_start_unix_ms)
                            .unwrap_or(0)
                            .max(m.created_unix_ms);
                        last < cutoff_unix_ms
                            && m.last_turn_end_unix_ms.is_some()
                                == m.last_turn_start_unix_ms.is_some()
                    })
                    .unwrap_or(false)
            })
            .collect()
    }

    /// A session's metadata, if the session exists.
    pub fn meta(&self, id: &str) -> Option<SessionMeta> {
        let paths = self.paths(id);
        if !paths.dir.is_dir() {
            return None;
        }
        let meta = std::fs::read(&paths.meta)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_else(|| SessionMeta {
                session_id: id.to_string(),
                ..SessionMeta::default()
            });
        Some(meta)
    }

    /// Ids of every session, sorted.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(&self.root)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.path().is_dir())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|id| crate::validate::session_id(id).is_ok())
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids
    }

    /// Deletes a session; refused while a turn holds its lease (the lease is
    /// taken for the deletion, so no turn can start meanwhile).
    pub async fn delete(&self, id: &str) -> Result<(), BrokerError> {
        let lease = self.lease(id, "(delete)", LeasePolicy::Reject).await?;
        let dir = self.paths(id).dir;
        if !dir.is_dir() {
            return Err(BrokerError::SessionNotFound(id.to_string()));
        }
        // remove_dir_all never follows the agent's symlinks.
        std::fs::remove_dir_all(&dir).map_err(|e| BrokerError::io("cannot delete", &dir, e))?;
        drop(lease);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Sessions) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Sessions::new(dir.path().join("sessions"), None).expect("sessions");
        (dir, s)
    }

    #[tokio::test]
    async fn second_lease_is_refused_with_the_running_turn() {
        let (_d, s) = store();
        let first = s
            .lease("a", "t1", LeasePolicy::Reject)
            .await
            .expect("first");
        let err = s
            .lease("a", "t2", LeasePolicy::Reject)
            .await
            .expect_err("busy");
        assert_eq!(err.to_string(), "session a is busy: turn t1 is running");
        // Another session is independent.
        let _other = s.lease("b", "t3", LeasePolicy::Reject).await.expect("b");
        drop(first);
        let _again = s.lease("a", "t4", LeasePolicy::Reject).await.expect("free");
    }

    #[tokio::test]
    async fn waiters_are_served_in_arrival_order() {
        let (_d, s) = store();
        let s = Arc::new(s);
        let first = s
            .lease("a", "t0", LeasePolicy::Reject)
            .await
            .expect("first");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for i in 1..=3 {
            let s2 = s.clone();
            let tx = tx.clone();
            tasks.push(tokio::spawn(async move {
                let lease = s2
                    .lease(
                        "a",
                        &format!("t{i}"),
                        LeasePolicy::Wait(Duration::from_secs(60)),
                    )
                    .await
                    .expect("lease");
                tx.send(i).expect("send");
                drop(lease);
            }));
            // Each waiter is queued before the next one is started.
            while s
                .leases
                .lock()
                .map(|m| m.get("a").map(Arc::strong_count).unwrap_or(0))
                .unwrap_or(0)
                < 2 + i
            {
                tokio::task::yield_now().await;
            }
        }
        drop(first);
        let mut order = Vec::new();
        for _ in 0..3 {
            order.push(rx.recv().await.expect("order"));
        }
        assert_eq!(order, vec![1, 2, 3]);
    }

    #[tokio::test]
    async fn a_cancelled_waiter_leaves_no_trace() {
        let (_d, s) = store();
        let first = s
            .lease("a", "t0", LeasePolicy::Reject)
            .await
            .expect("first");
        {
            // A waiter that gives up (its executor went away): its future is
            // dropped while queued.
            let waiting = s.lease("a", "t1", LeasePolicy::Wait(Duration::from_secs(60)));
            tokio::pin!(waiting);
            assert!(futures_poll_once(waiting.as_mut()).await.is_none());
        }
        drop(first);
        // The lease is free at once and the slot map is empty again.
        let again = s.lease("a", "t2", LeasePolicy::Reject).await.expect("free");
        drop(again);
        assert!(s.leases.lock().expect("map").is_empty());
    }

    /// Polls a future once; `None` if it is pending.
    async fn futures_poll_once<F: std::future::Future + Unpin>(f: F) -> Option<F::Output> {
        let mut f = f;
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut f).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }

    #[tokio::test]
    async fn waiting_lease_times_out_with_deadline_status() {
        let (_d, s) = store();
        let _first = s
            .lease("a", "t0", LeasePolicy::Reject)
            .await
            .expect("first");
        let err = s
            .lease("a", "t1", LeasePolicy::Wait(Duration::from_millis(1)))
            .await
            .expect_err("timeout");
        assert!(matches!(err, BrokerError::BusyAfterWait { .. }));
    }

    #[tokio::test]
    async fn ensure_creates_stable_dirs_and_meta_round_trips() {
        let (_d, s) = store();
        let lease = s
            .lease("a", "t0", LeasePolicy::Reject)
            .await
            .expect("lease");
        let (paths, mut meta) = s.ensure(&lease).expect("ensure");
        assert!(paths.home.is_dir() && paths.work.is_dir());
        meta.turn_count = 3;
        s.write_meta(&paths, &meta).expect("write");
        let (paths2, meta2) = s.ensure(&lease).expect("ensure again");
        assert_eq!(paths2.home, paths.home);
        assert_eq!(meta2, meta);
    }
}
