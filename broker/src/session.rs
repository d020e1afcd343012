//! Sessions: their stable paths on the host, their metadata, and the turn
//! lease that admits at most one turn per session at a time. The lock lives
//! here and nowhere else.

use crate::disk::DiskLimit;
use crate::error::BrokerError;
use crate::tree;
use crate::volume::{self, Volumes};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
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

/// Session disk images, when the image backend is on (see [`volume`]).
#[derive(Debug)]
pub struct Images {
    pub volumes: Volumes,
    /// What an image made for an import or a fork is sized for (no turn's
    /// limit is known then): the cap of per-turn limits.
    pub copy_limit: DiskLimit,
    /// The limit most first turns ask for (the default), and how many
    /// images of it to keep ready ([`volume::Spares`]); 0 makes none.
    pub spare_limit: DiskLimit,
    pub spare_count: usize,
}

impl Images {
    /// Makes session dir `dir`'s image for `limit`; a failure leaves
    /// nothing of it behind. Without a byte limit there is no image.
    fn create(&self, dir: &OwnedFd, path: &Path, limit: DiskLimit) -> Result<(), BrokerError> {
        let Some(bytes) = limit.bytes else {
            return Ok(());
        };
        self.volumes
            .create(dir, path, bytes, limit.inodes)
            .map_err(|e| {
                volume::remove(dir, path);
                e.into()
            })
    }
}

#[derive(Debug)]
pub struct Sessions {
    root: PathBuf,
    images: Option<Images>,
    spares: Option<volume::Spares>,
    /// The sessions dir, opened once: every session is reached from here by
    /// descriptor, never by a path the kernel would resolve through links.
    root_fd: OwnedFd,
    /// Owner of new home and work dirs (the jail's host uid/gid), if any.
    owner: Option<(u32, u32)>,
    leases: Arc<Mutex<HashMap<String, Arc<Slot>>>>,
}

/// A session's home and work, opened as the real directories they are
/// (never through a link): what a turn mounts.
#[derive(Debug)]
pub struct SessionDirs {
    pub home: OwnedFd,
    pub work: OwnedFd,
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

/// `mkdirat`, where an existing entry is fine (checked when opened).
fn mkdir_at(dir: impl AsFd, name: &str, mode: u32) -> std::io::Result<()> {
    match rustix::fs::mkdirat(dir, name, rustix::fs::Mode::from_raw_mode(mode)) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn damaged(id: &str, what: String) -> BrokerError {
    BrokerError::Damaged {
        session: id.to_string(),
        what,
    }
}

/// Opens `home` or `work` of a session dir, making it (owned by `owner`)
/// when missing; an existing one must be a real directory. `shown` is the
/// session dir's path, for messages.
fn part_dir(
    id: &str,
    dir: impl AsFd,
    part: &str,
    owner: Option<(u32, u32)>,
    shown: &Path,
) -> Result<OwnedFd, BrokerError> {
    let dir = dir.as_fd();
    match tree::open_dir(dir, OsStr::new(part)) {
        Ok(fd) => Ok(fd),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            mkdir_at(dir, part, 0o700)
                .map_err(|e| BrokerError::io("cannot create", shown.join(part), e))?;
            let fd = open_part(id, dir, part)?;
            if let Some((uid, gid)) = owner {
                rustix::fs::fchown(
                    &fd,
                    Some(rustix::fs::Uid::from_raw(uid)),
                    Some(rustix::fs::Gid::from_raw(gid)),
                )
                .map_err(|e| BrokerError::io("cannot chown", shown.join(part), e.into()))?;
            }
            Ok(fd)
        }
        Err(_) => open_part(id, dir, part),
    }
}

/// Opens `home` or `work` of a session dir: it must be a real directory.
fn open_part(id: &str, dir: impl AsFd, part: &str) -> Result<OwnedFd, BrokerError> {
    tree::open_dir(dir, OsStr::new(part)).map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP | libc::ENOTDIR) => damaged(id, format!("{part} is not a directory")),
        _ => damaged(id, format!("cannot open {part}: {e}")),
    })
}

impl Sessions {
    pub fn new(root: PathBuf, owner: Option<(u32, u32)>) -> Result<Self, BrokerError> {
        // Traversable, not listable: nsjail binds a session's home and work
        // from inside the jail's user namespace.
        mkdir(&root, 0o711)?;
        let root_fd =
            tree::open_dir_path(&root).map_err(|e| BrokerError::io("cannot open", &root, e))?;
        Ok(Sessions {
            root,
            images: None,
            spares: None,
            root_fd,
            owner,
            leases: Arc::default(),
        })
    }

    /// Puts new sessions on disk images of their own (see [`volume`]).
    /// With images of the default limit kept ready (made in the
    /// background from now).
    pub fn with_images(self, images: Option<Images>) -> Self {
        let spares = images.as_ref().and_then(|i| {
            let bytes = i.spare_limit.bytes?;
            let root_fd = self.root_fd.try_clone().ok()?;
            (i.spare_count > 0).then(|| {
                volume::Spares::new(
                    i.volumes.clone(),
                    &self.root,
                    root_fd,
                    bytes,
                    i.spare_limit.inodes,
                    i.spare_count,
                )
            })
        });
        Sessions {
            images,
            spares,
            ..self
        }
    }

    /// The ready images for new sessions, if any are kept.
    pub fn spares(&self) -> Option<&volume::Spares> {
        self.spares.as_ref()
    }

    /// Whether new sessions get disk images.
    pub fn has_images(&self) -> bool {
        self.images.is_some()
    }

    /// Gives session `id` (whose lease the caller holds) the disk image its
    /// turn's `limit` needs, with the image backend on: a new session gets
    /// one; an existing image is mounted (after a broker restart) and grown
    /// to the limit. A session made with plain directories keeps them (its
    /// limit is accounted). Blocking: `mkfs`, `mount`, `resize2fs`.
    pub fn prepare_disk(&self, id: &str, limit: DiskLimit) -> Result<(), BrokerError> {
        let Some(images) = &self.images else {
            return Ok(());
        };
        let path = self.root.join(id);
        if self.open(id)?.is_none()
            && let Some(spares) = &self.spares
            && spares.limit() == (limit.bytes.unwrap_or(0), limit.inodes)
            && spares.take(id)?
        {
            return Ok(());
        }
        mkdir_at(&self.root_fd, id, 0o711)
            .map_err(|e| BrokerError::io("cannot create", &path, e))?;
        let dir = self.open_existing(id)?;
        if volume::has_image(&dir, &path)? {
            images.volumes.attach(&dir, &path)?;
            if let Some(bytes) = limit.bytes {
                images.volumes.grow_to(&dir, &path, bytes)?;
            }
            return Ok(());
        }
        match (limit.bytes, tree::stat_at(&dir, OsStr::new("home"))) {
            (Some(bytes), Err(e)) if e.kind() == std::io::ErrorKind::NotFound => images.create(
                &dir,
                &path,
                DiskLimit {
                    bytes: Some(bytes),
                    ..limit
                },
            ),
            _ => Ok(()),
        }
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

    /// Opens session `id`'s directory; `None` if there is no such session.
    fn open(&self, id: &str) -> Result<Option<OwnedFd>, BrokerError> {
        match tree::open_dir(&self.root_fd, OsStr::new(id)) {
            Ok(fd) => Ok(Some(fd)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(damaged(id, format!("its directory cannot be opened: {e}"))),
        }
    }

    fn open_existing(&self, id: &str) -> Result<OwnedFd, BrokerError> {
        self.open(id)?
            .ok_or_else(|| BrokerError::SessionNotFound(id.to_string()))
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

    /// Creates the session's directories if new and returns its metadata
    /// and its home and work, opened. Home and work must be real
    /// directories and `meta.json` a regular file of bounded size: a session
    /// where they are not is refused as damaged, never followed.
    pub fn ensure(
        &self,
        lease: &Lease,
    ) -> Result<(SessionPaths, SessionMeta, SessionDirs), BrokerError> {
        let id = lease.session_id();
        let paths = self.paths(id);
        mkdir_at(&self.root_fd, id, 0o711)
            .map_err(|e| BrokerError::io("cannot create", &paths.dir, e))?;
        // A session on a disk image was mounted by `prepare_disk`, which
        // every turn runs before this.
        let dir = self.open_existing(id)?;
        let home = part_dir(id, &dir, "home", self.owner, &paths.dir)?;
        let work = part_dir(id, &dir, "work", self.owner, &paths.dir)?;
        let meta = read_meta(id, &dir)?.unwrap_or_else(|| SessionMeta {
            session_id: id.to_string(),
            created_unix_ms: now_unix_ms(),
            ..SessionMeta::default()
        });
        Ok((paths, meta, SessionDirs { home, work }))
    }

    /// Writes metadata atomically (temp file, fsync, rename, fsync of the
    /// dir): a full disk leaves the previous record whole.
    pub fn write_meta(&self, paths: &SessionPaths, meta: &SessionMeta) -> Result<(), BrokerError> {
        let bytes = serde_json::to_vec_pretty(meta).map_err(std::io::Error::other);
        bytes
            .and_then(|b| {
                let dir = tree::open_dir_path(&paths.dir)?;
                tree::write_atomic(&dir, OsStr::new("meta.json"), &b, 0o600)
            })
            .map_err(|e| BrokerError::io("cannot write", &paths.meta, e))
    }

    /// Real disk use of a session's home and work (allocated bytes, inodes).
    pub fn usage(&self, id: &str) -> Option<tree::Usage> {
        if let Some(u) = volume::usage(&self.root.join(id)) {
            return Some(u);
        }
        let dir = self.open(id).ok()??;
        let mut total = tree::Usage::default();
        for part in ["home", "work"] {
            if let Ok(fd) = tree::open_dir(&dir, OsStr::new(part)) {
                total = total + tree::usage(&fd).unwrap_or_default();
            }
        }
        Some(total)
    }
}

/// Checks that the paths nsjail will mount are the directories `ensure`
/// opened. nsjail mounts by path: it enters its new mount namespace first,
/// where a descriptor opened in ours cannot be bind-mounted (`EINVAL`).
/// Every parent on the path is the broker's own (root-owned, never mounted
/// into a jail), so only home and work themselves could have changed: each
/// must still be that same real directory, not a link.
pub fn check_mount_sources(paths: &SessionPaths, dirs: &SessionDirs) -> Result<(), BrokerError> {
    use std::os::unix::fs::MetadataExt;
    let id = paths
        .dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for (part, path, fd) in [
        ("home", &paths.home, &dirs.home),
        ("work", &paths.work, &dirs.work),
    ] {
        let m =
            std::fs::symlink_metadata(path).map_err(|e| BrokerError::io("cannot stat", path, e))?;
        let st =
            rustix::fs::fstat(fd).map_err(|e| BrokerError::io("cannot stat", path, e.into()))?;
        if !m.is_dir() || (m.dev(), m.ino()) != (tree::num(st.st_dev), tree::num(st.st_ino)) {
            return Err(damaged(
                &id,
                format!("{part} changed before the jail started"),
            ));
        }
    }
    Ok(())
}

/// Reads and parses a session dir's `meta.json` (capped, never through a
/// link); `None` if there is none.
fn read_meta(id: &str, dir: impl AsFd) -> Result<Option<SessionMeta>, BrokerError> {
    match tree::read_capped(dir, OsStr::new("meta.json"), crate::archive::META_CAP) {
        Ok(Some(bytes)) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| damaged(id, format!("meta.json is not valid metadata: {e}"))),
        Ok(None) => Ok(None),
        Err(e) => Err(damaged(id, format!("meta.json {e}"))),
    }
}

/// A unique hidden name in the sessions dir for a staging tree (ids never
/// start with '.', so it is never listed as a session).
fn staging_name(kind: &str, id: &str) -> String {
    use rand::Rng;
    format!(".{kind}-{id}-{:016x}", rand::rng().random::<u64>())
}

/// A staging tree under the sessions dir, removed unless published.
struct Staging<'a> {
    sessions: &'a Sessions,
    name: String,
    fd: OwnedFd,
    published: bool,
}

impl<'a> Staging<'a> {
    fn new(sessions: &'a Sessions, kind: &str, id: &str) -> Result<Self, BrokerError> {
        let name = staging_name(kind, id);
        let path = sessions.root.join(&name);
        rustix::fs::mkdirat(
            &sessions.root_fd,
            name.as_str(),
            rustix::fs::Mode::from_raw_mode(0o700),
        )
        .map_err(|e| BrokerError::io("cannot create", &path, e.into()))?;
        let fd = tree::open_dir(&sessions.root_fd, OsStr::new(&name))
            .map_err(|e| BrokerError::io("cannot open", &path, e))?;
        Ok(Staging {
            sessions,
            name,
            fd,
            published: false,
        })
    }

    fn path(&self) -> PathBuf {
        self.sessions.root.join(&self.name)
    }

    /// With the image backend on, puts the tree being made on a new disk
    /// image (sized for the cap of turns' limits).
    fn image(&self) -> Result<(), BrokerError> {
        match &self.sessions.images {
            Some(images) => images.create(&self.fd, &self.path(), images.copy_limit),
            None => Ok(()),
        }
    }

    /// Completes the tree as a session dir: home and work, mode, metadata.
    fn seal(&self, id: &str, meta: &SessionMeta) -> Result<(), BrokerError> {
        // Both must be real directories: whatever the tree came from.
        for part in ["home", "work"] {
            part_dir(id, &self.fd, part, self.sessions.owner, &self.path())?;
        }
        rustix::fs::fchmod(&self.fd, rustix::fs::Mode::from_raw_mode(0o711))
            .map_err(|e| BrokerError::io("cannot chmod", self.path(), e.into()))?;
        let bytes = serde_json::to_vec_pretty(meta).map_err(std::io::Error::other);
        bytes
            .and_then(|b| tree::write_atomic(&self.fd, OsStr::new("meta.json"), &b, 0o600))
            .map_err(|e| BrokerError::io("cannot write", self.path().join("meta.json"), e))
    }

    /// Writes everything in the tree's filesystem to stable storage
    /// (`syncfs`: one flush for the whole tree, where an `fsync` per entry
    /// would flush once per file).
    fn sync(&self) -> Result<(), BrokerError> {
        rustix::fs::syncfs(&self.fd)
            .map_err(|e| BrokerError::io("cannot sync", self.path(), e.into()))
    }

    /// Completes the tree and moves it into place as session `id`,
    /// atomically and only if no session `id` exists.
    fn publish(self, id: &str, meta: &SessionMeta) -> Result<(), BrokerError> {
        self.seal(id, meta)?;
        self.place(id)
    }

    /// Moves the sealed tree into place as session `id`, atomically and
    /// only if no session `id` exists (`renameat2(RENAME_NOREPLACE)`).
    fn place(mut self, id: &str) -> Result<(), BrokerError> {
        let root = &self.sessions.root_fd;
        match rustix::fs::renameat_with(
            root,
            self.name.as_str(),
            root,
            id,
            rustix::fs::RenameFlags::NOREPLACE,
        ) {
            Ok(()) => {
                self.published = true;
                let _ = rustix::fs::fsync(root);
                Ok(())
            }
            Err(rustix::io::Errno::EXIST) => Err(BrokerError::SessionExists(id.to_string())),
            Err(e) => Err(BrokerError::io(
                "cannot publish",
                self.sessions.root.join(id),
                e.into(),
            )),
        }
    }
}

impl Drop for Staging<'_> {
    fn drop(&mut self) {
        if !self.published {
            volume::detach(&self.path());
            // remove_dir_all walks by descriptor and never follows a link.
            let _ = std::fs::remove_dir_all(self.path());
        }
    }
}

impl Sessions {
    /// The root of all sessions.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Copies `src` to a new session `dst` (see `ForkSession`): holes stay
    /// holes, hard links stay links, extents are shared where the
    /// filesystem can (reflink). The copy runs on the blocking pool.
    pub async fn fork(&self, src: &str, dst: &str) -> Result<SessionMeta, BrokerError> {
        let lease = self.lease(src, "(fork)", LeasePolicy::Reject).await?;
        let _dst_lease = self.lease(dst, "(fork)", LeasePolicy::Reject).await?;
        let from = self.open_existing(src)?;
        if self.open(dst)?.is_some() {
            return Err(BrokerError::SessionExists(dst.to_string()));
        }
        let staging = Staging::new(self, "fork", dst)?;
        staging.image()?;
        let to = staging
            .fd
            .try_clone()
            .map_err(|e| BrokerError::io("cannot open", staging.path(), e))?;
        // Both must be real directories before anything is copied.
        open_part(src, &from, "home")?;
        open_part(src, &from, "work")?;
        let src_dir = self.paths(src).dir;
        let copied = tokio::task::spawn_blocking(move || tree::copy(&from, &to, &["home", "work"]))
            .await
            .map_err(|e| BrokerError::io("cannot copy", &src_dir, std::io::Error::other(e)))?
            .map_err(|e| BrokerError::io("cannot copy", &src_dir, e))?;
        for s in copied {
            tracing::warn!(session.id = %src, skipped = %s, "fork: entry not copied");
        }
        let meta = SessionMeta {
            session_id: dst.to_string(),
            created_unix_ms: now_unix_ms(),
            forked_from: Some(src.to_string()),
            ..SessionMeta::default()
        };
        staging.publish(dst, &meta)?;
        drop(lease);
        Ok(meta)
    }

    /// Takes session `id`'s lease for an export and opens its directory.
    pub async fn export_lease(&self, id: &str) -> Result<(Lease, OwnedFd), BrokerError> {
        let lease = self.lease(id, "(export)", LeasePolicy::Reject).await?;
        let dir = self.open_existing(id)?;
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
        if self.open(id)?.is_some() {
            return Err(BrokerError::SessionExists(id.to_string()));
        }
        let (staging, meta) = self.extract(id, r, caps)?;
        staging.publish(id, &meta)?;
        Ok(meta)
    }

    /// Extracts an archive into a new staging tree for session `id` (on a
    /// disk image of its own with the image backend), and reads its
    /// metadata: the session's history, under our id.
    fn extract(
        &self,
        id: &str,
        r: impl std::io::Read,
        caps: crate::archive::ImportCaps,
    ) -> Result<(Staging<'_>, SessionMeta), BrokerError> {
        let staging = Staging::new(self, "import", id)?;
        staging.image()?;
        let imported = crate::archive::import(r, &staging.fd, caps, self.owner)?;
        let mut meta: SessionMeta = match imported.meta {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| crate::archive::ImportError::BadMeta(e.to_string()))?,
            None => SessionMeta::default(),
        };
        meta.session_id = id.to_string();
        if meta.created_unix_ms == 0 {
            meta.created_unix_ms = now_unix_ms();
        }
        Ok((staging, meta))
    }

    /// Replaces session `id`'s tree (whose lease the caller holds) with
    /// one read from an archive, or creates it (blocking). The archive is
    /// extracted into staging under the same rules as [`Sessions::import`];
    /// `before` then runs on the complete staging dir (to add files of the
    /// caller's beside `meta.json`, or to refuse the tree), the tree with
    /// what `before` wrote is made durable if `durable` (`syncfs` of its
    /// filesystem: a crash after the swap finds the new tree whole, never
    /// files whose data was not yet written; a caller that passes `false`
    /// must not trust the tree after a host restart), and it is swapped into place in one
    /// `renameat2(RENAME_EXCHANGE)`: at every moment the session is either
    /// its old tree or its new one. The old tree is then removed. Any
    /// failure, `before`'s included, leaves the session as it was and no
    /// staging tree behind.
    pub fn restore(
        &self,
        lease: &Lease,
        r: impl std::io::Read,
        caps: crate::archive::ImportCaps,
        before: impl FnOnce(&OwnedFd) -> std::io::Result<()>,
        durable: bool,
    ) -> Result<SessionMeta, BrokerError> {
        let id = lease.session_id();
        let (staging, meta) = self.extract(id, r, caps)?;
        staging.seal(id, &meta)?;
        before(&staging.fd).map_err(|e| BrokerError::io("cannot write into", staging.path(), e))?;
        if durable {
            staging.sync()?;
        }
        if self.open(id)?.is_none() {
            staging.place(id)?;
            return Ok(meta);
        }
        let root = &self.root_fd;
        rustix::fs::renameat_with(
            root,
            staging.name.as_str(),
            root,
            id,
            rustix::fs::RenameFlags::EXCHANGE,
        )
        .map_err(|e| BrokerError::io("cannot swap in", self.root.join(id), e.into()))?;
        let _ = rustix::fs::fsync(root);
        // The old tree now sits under the staging name, unpublished: its
        // drop unmounts and removes it.
        drop(staging);
        Ok(meta)
    }

    /// Renames session `id` (whose lease the caller holds) to the new
    /// session id `to`, which must not exist; its metadata follows.
    pub fn set_aside(&self, lease: &Lease, to: &str) -> Result<(), BrokerError> {
        let id = lease.session_id();
        crate::validate::session_id(to)?;
        self.open_existing(id)?;
        let root = &self.root_fd;
        match rustix::fs::renameat_with(root, id, root, to, rustix::fs::RenameFlags::NOREPLACE) {
            Ok(()) => {}
            Err(rustix::io::Errno::EXIST) => {
                return Err(BrokerError::SessionExists(to.to_string()));
            }
            Err(e) => {
                return Err(BrokerError::io(
                    "cannot rename",
                    self.root.join(id),
                    e.into(),
                ));
            }
        }
        let _ = rustix::fs::fsync(root);
        if let Some(mut meta) = self.meta(to) {
            meta.session_id = to.to_string();
            self.write_meta(&self.paths(to), &meta)?;
        }
        Ok(())
    }

    /// Takes the lease of a session that does not exist yet (for import).
    pub async fn new_session_lease(&self, id: &str) -> Result<Lease, BrokerError> {
        let lease = self.lease(id, "(import)", LeasePolicy::Reject).await?;
        if self.open(id)?.is_some() {
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
                if name.starts_with(".fork-")
                    || name.starts_with(".import-")
                    || name.starts_with(volume::SPARE_PREFIX)
                {
                    volume::detach(&e.path());
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }

    /// Unmounts every session's disk image (a clean stop); the next turn
    /// of a session mounts it again.
    pub fn detach_all(&self) {
        if let Some(spares) = &self.spares {
            spares.close();
        }
        if self.images.is_none() {
            return;
        }
        for id in self.ids() {
            volume::detach(&self.root.join(id));
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

    /// A session's metadata, if the session exists. Unreadable metadata is
    /// reported (logged) and shown as empty, so one damaged session never
    /// hides the others from a listing.
    pub fn meta(&self, id: &str) -> Option<SessionMeta> {
        let dir = self.open(id).ok()??;
        let meta = match read_meta(id, &dir) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(session.id = %id, error = %e, "session metadata unreadable");
                None
            }
        };
        Some(meta.unwrap_or_else(|| SessionMeta {
            session_id: id.to_string(),
            ..SessionMeta::default()
        }))
    }

    /// Ids of every session, sorted.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(&self.root)
            .map(|rd| {
                rd.flatten()
                    // The entry's own type: a link is never a session.
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
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
        self.open_existing(id)?;
        let dir = self.paths(id).dir;
        // remove_dir_all walks by descriptor and never follows the agent's
        // links; it runs on the blocking pool.
        let path = dir.clone();
        tokio::task::spawn_blocking(move || {
            volume::detach(&path);
            std::fs::remove_dir_all(&path)
        })
        .await
        .map_err(|e| BrokerError::io("cannot delete", &dir, std::io::Error::other(e)))?
        .map_err(|e| BrokerError::io("cannot delete", &dir, e))?;
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
    async fn restore_swaps_a_tree_in_and_a_refused_archive_changes_nothing() {
        let (_d, s) = store();
        let lease = s
            .lease("a", "t0", LeasePolicy::Reject)
            .await
            .expect("lease");
        let (paths, _, _) = s.ensure(&lease).expect("ensure");
        std::fs::write(paths.work.join("f"), "old").expect("write");
        let src = tempfile::tempdir().expect("src");
        std::fs::create_dir_all(src.path().join("home")).expect("home");
        std::fs::create_dir_all(src.path().join("work")).expect("work");
        std::fs::write(src.path().join("work/f"), "new").expect("write");
        let mut tar = Vec::new();
        crate::archive::export(tree::open_dir_path(src.path()).expect("open"), &mut tar)
            .expect("export");
        let caps = crate::archive::ImportCaps {
            max_bytes: 1 << 20,
            max_entries: 100,
        };
        let read = |p: &Path| std::fs::read_to_string(p).expect("read");
        let names = || -> Vec<std::ffi::OsString> {
            let mut n: Vec<_> = std::fs::read_dir(s.root())
                .expect("list")
                .flatten()
                .map(|e| e.file_name())
                .collect();
            n.sort();
            n
        };
        s.restore(&lease, &b"not a tar"[..], caps, |_| Ok(()), true)
            .expect_err("refused");
        assert_eq!(read(&paths.work.join("f")), "old");
        // A complete tree that `before` refuses (the fleet's check of the
        // archive's digest) is never swapped in, nor left behind.
        let err = s
            .restore(
                &lease,
                &tar[..],
                caps,
                |_| Err(std::io::Error::other("not what was committed")),
                true,
            )
            .expect_err("refused by before");
        assert!(err.to_string().contains("not what was committed"), "{err}");
        assert_eq!(read(&paths.work.join("f")), "old");
        assert_eq!(names(), vec![std::ffi::OsString::from("a")]);
        s.restore(
            &lease,
            &tar[..],
            caps,
            |fd| tree::write_atomic(fd, OsStr::new("extra"), b"x", 0o600),
            false,
        )
        .expect("restore");
        assert_eq!(read(&paths.work.join("f")), "new");
        assert_eq!(read(&paths.dir.join("extra")), "x");
        // Neither staging tree nor the old one is left.
        assert_eq!(names(), vec![std::ffi::OsString::from("a")]);
        // Kept aside under a new id, metadata following.
        s.set_aside(&lease, "a.kept-1").expect("set aside");
        assert_eq!(read(&s.paths("a.kept-1").work.join("f")), "new");
        assert_eq!(s.meta("a.kept-1").expect("meta").session_id, "a.kept-1");
        assert!(s.meta("a").is_none());
    }

    #[tokio::test]
    async fn ensure_creates_stable_dirs_and_meta_round_trips() {
        let (_d, s) = store();
        let lease = s
            .lease("a", "t0", LeasePolicy::Reject)
            .await
            .expect("lease");
        let (paths, mut meta, _) = s.ensure(&lease).expect("ensure");
        assert!(paths.home.is_dir() && paths.work.is_dir());
        meta.turn_count = 3;
        s.write_meta(&paths, &meta).expect("write");
        let (paths2, meta2, _) = s.ensure(&lease).expect("ensure again");
        assert_eq!(paths2.home, paths.home);
        assert_eq!(meta2, meta);
    }
}
