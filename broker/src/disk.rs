//! Disk limits of sessions and the free-space reserve of the state dir.
//!
//! Owns the choice of how a session's disk limit (bytes and inodes of its
//! home + work) is enforced on this host, the walk that measures a session
//! tree, the watch that ends a turn `disk_limit`, and the reserve check that
//! refuses turns and imports up front when the state dir's filesystem is
//! nearly full.
//!
//! Two backends ([`detect`] picks one at start-up; `doctor` says which):
//!
//! - **image** (root, loop devices and e2fsprogs on the host): each session's
//!   home and work live on an ext4 image of its own ([`crate::volume`]); the
//!   limit binds in the kernel, a write past it fails `ENOSPC` for that
//!   session's agent and nobody else. The watch below measures such a
//!   session with one `statvfs` and ends a turn whose limit is lower than
//!   its image (the image is sized to the highest limit the session had).
//! - **accounting** (elsewhere, and for sessions made before the image
//!   backend was on): while a turn runs, a blocking-pool task walks home and
//!   work by descriptor (no link is followed) and ends the turn when the
//!   session is over its limit; its processes are SIGKILLed at once (no
//!   grace: a grace would be time to write more). The walk repeats every
//!   `max(MIN_PERIOD, PERIOD_FACTOR × the walk's own duration)`, at most
//!   `MAX_PERIOD`, so its CPU cost stays near 1/`PERIOD_FACTOR` of a core
//!   while a walk takes under `MAX_PERIOD / PERIOD_FACTOR`; a session
//!   growing toward its limit is walked more often (see `Pace`). The
//!   overshoot is what the agent writes in one period plus one walk; and
//!   `RLIMIT_FSIZE` is capped at the session's remaining budget, so no
//!   single file ever exceeds it.
//!
//! The reserve: below it, turns and imports are refused up front; below
//! half of it (the floor), every running turn whose session grew since the
//! turn began ends `disk_limit`, so the broker's own records always have
//! room, whatever the sessions' limits add up to.

use crate::tree;
use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tracing::{Instrument, debug, warn};

use crate::config::DiskBackend;
use crate::volume::Volumes;

/// Shortest period between two walks of a running turn's session.
pub const MIN_PERIOD: Duration = Duration::from_millis(20);
/// Longest period between two walks.
pub const MAX_PERIOD: Duration = Duration::from_secs(2);
/// The period is this many times the last walk's duration (the walk's share
/// of a core stays near 1/PERIOD_FACTOR).
pub const PERIOD_FACTOR: u32 = 20;
/// Automatic reserve: this share of the filesystem...
const RESERVE_PERCENT: u64 = 5;
/// ...at most this much.
const RESERVE_MAX: u64 = 1 << 30;

pub use crate::tree::Usage;

/// A session's disk limit; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskLimit {
    pub bytes: Option<u64>,
    pub inodes: Option<u64>,
}

impl DiskLimit {
    pub fn is_unlimited(&self) -> bool {
        self.bytes.is_none() && self.inodes.is_none()
    }

    /// Whether `u` is over this limit.
    pub fn exceeded_by(&self, u: Usage) -> bool {
        self.bytes.is_some_and(|b| u.bytes > b) || self.inodes.is_some_and(|i| u.inodes > i)
    }

    /// What the limit says, for messages.
    pub fn describe(&self) -> String {
        match (self.bytes, self.inodes) {
            (Some(b), Some(i)) => format!("{b} bytes / {i} inodes"),
            (Some(b), None) => format!("{b} bytes"),
            (None, Some(i)) => format!("{i} inodes"),
            (None, None) => "none".to_string(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("cannot stat the filesystem of {path}: {source}")]
    Statvfs {
        path: PathBuf,
        #[source]
        source: nix::errno::Errno,
    },
    #[error(
        "state dir {path} has {free} bytes free, below its reserve of {reserve} bytes \
         (disk_reserve_bytes): free space or delete sessions"
    )]
    BelowReserve {
        path: PathBuf,
        free: u64,
        reserve: u64,
    },
    #[error("cannot measure the disk use of {0}: {1}")]
    Walk(PathBuf, #[source] std::io::Error),
    #[error("disk_backend = \"image\" cannot run on this host: {0}")]
    ImageUnavailable(String),
}

/// How session disk limits are enforced on this host's state dir.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Detected {
    /// `image` (each session on a filesystem image of its own: the limit
    /// binds) or `accounting` (usage measured while a turn runs).
    pub backend: &'static str,
    /// The state dir's filesystem type, e.g. `ext4`, `tmpfs`.
    pub filesystem: String,
    /// Whether the kernel enforces project quotas on that filesystem.
    pub project_quotas: bool,
    /// Why this backend, in a sentence.
    pub why: String,
}

/// The backend `choice` resolves to on the state dir `dir`, and the image
/// tools when it is `image`. `image` asked for where this host cannot run
/// it is an error naming what is missing.
pub fn detect(
    dir: &Path,
    choice: DiskBackend,
    owner: Option<(u32, u32)>,
) -> Result<(Detected, Option<Volumes>), DiskError> {
    let filesystem = fs_name(dir);
    let project_quotas = project_quotas_on(dir);
    let probe = match choice {
        DiskBackend::Accounting => Err("disk_backend = \"accounting\"".to_string()),
        _ => Volumes::probe(owner),
    };
    let (backend, why, volumes) = match probe {
        Ok(v) => (
            "image",
            "each session's home and work are on an ext4 image of its own (loop device): \
             the limit binds in the kernel, writes past it fail with ENOSPC"
                .to_string(),
            Some(v),
        ),
        Err(missing) if choice == DiskBackend::Image => {
            return Err(DiskError::ImageUnavailable(missing));
        }
        Err(missing) => (
            "accounting",
            format!(
                "no image backend ({missing}): usage on {filesystem} is accounted while a turn \
                 runs and the turn ends disk_limit within one check period"
            ),
            None,
        ),
    };
    Ok((
        Detected {
            backend,
            filesystem,
            project_quotas,
            why,
        },
        volumes,
    ))
}

fn fs_name(dir: &Path) -> String {
    use nix::sys::statfs::{
        BTRFS_SUPER_MAGIC, EXT4_SUPER_MAGIC, TMPFS_MAGIC, XFS_SUPER_MAGIC, statfs,
    };
    match statfs(dir) {
        Ok(s) => {
            let t = s.filesystem_type();
            if t == EXT4_SUPER_MAGIC {
                "ext4".into()
            } else if t == XFS_SUPER_MAGIC {
                "xfs".into()
            } else if t == TMPFS_MAGIC {
                "tmpfs".into()
            } else if t == BTRFS_SUPER_MAGIC {
                "btrfs".into()
            } else {
                format!("filesystem 0x{:x}", t.0)
            }
        }
        Err(e) => format!("unknown filesystem ({e})"),
    }
}

/// Whether project quotas are on for the filesystem holding `dir`
/// (`quotactl_fd(Q_GETINFO, PRJQUOTA)` succeeds).
#[allow(unsafe_code)]
fn project_quotas_on(dir: &Path) -> bool {
    use std::os::fd::AsRawFd;
    const PRJQUOTA: libc::c_int = 2;
    let Ok(f) = std::fs::File::open(dir) else {
        return false;
    };
    // struct if_dqinfo: two u64 and two u32.
    let mut info = [0u64; 3];
    // SAFETY: quotactl_fd(2) with Q_GETINFO writes one `struct if_dqinfo`
    // (24 bytes) to the buffer, which is 24 bytes and lives across the call;
    // the descriptor is open for the whole call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_quotactl_fd,
            f.as_raw_fd(),
            libc::QCMD(libc::Q_GETINFO, PRJQUOTA),
            0,
            info.as_mut_ptr(),
        )
    };
    rc == 0
}

/// The state dir's free space and the reserve kept there.
#[derive(Debug)]
pub struct Disk {
    dir: PathBuf,
    reserve: u64,
    detected: Detected,
    /// Last measured usage per session, for the next turn's file-size cap.
    usage: Mutex<HashMap<String, Usage>>,
}

impl Disk {
    /// Resolves the reserve (`None`: 5 % of the filesystem, at most 1 GiB).
    pub fn new(dir: &Path, reserve: Option<u64>, detected: Detected) -> Result<Disk, DiskError> {
        let reserve = match reserve {
            Some(r) => r,
            None => {
                let st = statvfs(dir)?;
                let total = st.blocks().saturating_mul(st.fragment_size());
                (total / 100 * RESERVE_PERCENT).min(RESERVE_MAX)
            }
        };
        Ok(Disk {
            dir: dir.to_path_buf(),
            reserve,
            detected,
            usage: Mutex::default(),
        })
    }

    pub fn reserve(&self) -> u64 {
        self.reserve
    }

    pub fn detected(&self) -> &Detected {
        &self.detected
    }

    /// Bytes free for unprivileged writers under the state dir.
    pub fn free(&self) -> Result<u64, DiskError> {
        let st = statvfs(&self.dir)?;
        Ok(st.blocks_available().saturating_mul(st.fragment_size()))
    }

    /// Refuses (`ResourceExhausted`) when free space is below the reserve.
    pub fn check_reserve(&self) -> Result<(), DiskError> {
        if self.reserve == 0 {
            return Ok(());
        }
        let free = self.free()?;
        if free < self.reserve {
            return Err(DiskError::BelowReserve {
                path: self.dir.clone(),
                free,
                reserve: self.reserve,
            });
        }
        Ok(())
    }

    /// The `RLIMIT_FSIZE` a turn of `session` gets from its disk limit: the
    /// bytes left of it as last measured (the whole limit when unknown).
    pub fn file_size_cap(&self, session: &str, limit: DiskLimit) -> Option<u64> {
        let bytes = limit.bytes?;
        let used = self
            .usage
            .lock()
            .ok()
            .and_then(|m| m.get(session).copied())
            .map(|u| u.bytes)
            .unwrap_or(0);
        Some(bytes.saturating_sub(used))
    }

    /// Drops what is known of a deleted session (a new one may take its id).
    pub fn forget(&self, session: &str) {
        if let Ok(mut m) = self.usage.lock() {
            m.remove(session);
        }
    }

    fn record(&self, session: &str, usage: Usage) {
        if let Ok(mut m) = self.usage.lock() {
            m.insert(session.to_string(), usage);
        }
    }

    /// Watches a running turn's session: `on_exceeded` is called (once) when
    /// the session is over `limit`, or when the state dir's free space is
    /// below half the reserve and the session grew since the watch began.
    /// Stops when the returned watch is dropped.
    pub fn watch(
        self: &Arc<Self>,
        session: &str,
        roots: Vec<PathBuf>,
        limit: DiskLimit,
        on_exceeded: impl FnOnce() + Send + 'static,
    ) -> Watch {
        let exceeded = Arc::new(OnceLock::new());
        let session_dir = roots
            .first()
            .and_then(|h| h.parent())
            .map(Path::to_path_buf);
        let task = {
            let (disk, session, exceeded) = (self.clone(), session.to_string(), exceeded.clone());
            tokio::spawn(
                async move {
                    let floor = disk.reserve / 2;
                    let mut first: Option<Usage> = None;
                    let mut pace = Pace::default();
                    let mut warned = false;
                    loop {
                        let free = disk.free().ok();
                        let below_floor = free.filter(|f| *f < floor);
                        let mut pause = MIN_PERIOD;
                        // Without a limit the tree is walked once, for the
                        // baseline, and again only below the floor.
                        if !limit.is_unlimited() || first.is_none() || below_floor.is_some() {
                            let began = Instant::now();
                            let r = {
                                let roots = roots.clone();
                                tokio::task::spawn_blocking(move || walk(&roots, Some(limit))).await
                            };
                            let took = began.elapsed();
                            pause = period(took);
                            debug!(took_us = took.as_micros() as u64, "session disk walk");
                            match r {
                                Ok(Ok(usage)) => {
                                    pause = pace.next(Instant::now(), usage, took, limit);
                                    disk.record(&session, usage);
                                    let base = *first.get_or_insert(usage);
                                    let hit = if limit.exceeded_by(usage) {
                                        Some(Exceeded {
                                            usage,
                                            free_below_floor: None,
                                        })
                                    } else if below_floor.is_some() && usage.bytes > base.bytes {
                                        Some(Exceeded {
                                            usage,
                                            free_below_floor: below_floor,
                                        })
                                    } else {
                                        None
                                    };
                                    if let Some(hit) = hit {
                                        let _ = exceeded.set(hit);
                                        on_exceeded();
                                        return;
                                    }
                                }
                                Ok(Err(e)) if !warned => {
                                    warned = true;
                                    warn!(error = %e, "cannot measure the session's disk use");
                                }
                                Ok(Err(_)) => {}
                                Err(e) => {
                                    warn!(error = %e, "the disk walk did not finish");
                                    return;
                                }
                            }
                        }
                        tokio::time::sleep(pause).await;
                    }
                }
                .in_current_span(),
            )
        };
        Watch {
            exceeded,
            task,
            session_dir,
        }
    }
}

/// Why a watch ended its turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exceeded {
    /// The session's use when it was seen (at least this much).
    pub usage: Usage,
    /// Set when the cause was the state dir's free space, below half the
    /// reserve, rather than the session's own limit.
    pub free_below_floor: Option<u64>,
}

/// Shortest pause between walks of a session close to its limit.
pub const NEAR_PERIOD: Duration = Duration::from_millis(2);

/// Paces one watch's walks: [`period`] of the walk's cost, shortened while
/// the session grows toward its limit to half the time it needs to reach
/// it at the rate of the last two walks (at least [`NEAR_PERIOD`] and the
/// walk's own duration). A fast writer is thus checked more often only as
/// it nears its limit, which keeps the overshoot small without walking big
/// trees often the rest of the time.
#[derive(Debug, Default)]
struct Pace {
    last: Option<(Instant, Usage)>,
}

impl Pace {
    fn next(&mut self, now: Instant, usage: Usage, took: Duration, limit: DiskLimit) -> Duration {
        let mut pause = period(took);
        let Some((then, before)) = self.last.replace((now, usage)) else {
            return pause;
        };
        let dt = now.duration_since(then).as_secs_f64();
        for (used, was, lim) in [
            (usage.bytes, before.bytes, limit.bytes),
            (usage.inodes, before.inodes, limit.inodes),
        ] {
            if let Some(lim) = lim
                && used > was
                && dt > 0.0
            {
                let rate = (used - was) as f64 / dt;
                let left = lim.saturating_sub(used) as f64;
                let near = Duration::from_secs_f64(left / rate / 2.0)
                    .max(took)
                    .max(NEAR_PERIOD);
                pause = pause.min(near);
            }
        }
        pause
    }
}

/// The pause after a walk that took `took`.
pub fn period(took: Duration) -> Duration {
    (took * PERIOD_FACTOR).clamp(MIN_PERIOD, MAX_PERIOD)
}

/// A running turn's disk watch; dropping it stops the watch.
#[derive(Debug)]
pub struct Watch {
    exceeded: Arc<OnceLock<Exceeded>>,
    task: tokio::task::JoinHandle<()>,
    session_dir: Option<PathBuf>,
}

impl Watch {
    /// Why the watch ended the turn, if it did; or, for a session on an
    /// image, that the image is full now (the kernel refused the agent's
    /// writes past the limit).
    pub fn exceeded(&self) -> Option<Exceeded> {
        self.exceeded.get().copied().or_else(|| {
            let usage = crate::volume::full(self.session_dir.as_deref()?)?;
            Some(Exceeded {
                usage,
                free_below_floor: None,
            })
        })
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn statvfs(dir: &Path) -> Result<nix::sys::statvfs::Statvfs, DiskError> {
    nix::sys::statvfs::statvfs(dir).map_err(|source| DiskError::Statvfs {
        path: dir.to_path_buf(),
        source,
    })
}

/// Bytes (allocated blocks) and inodes under `roots` — a session's home
/// and work, then any other dirs of its turn — each root counted too,
/// without following links; a hard-linked file counts once. Home and work
/// on the session's image are measured with one `statvfs` of it. Other
/// trees are walked by descriptor ([`tree::usage_of`]); entries that vanish
/// or change meanwhile are skipped; with `stop_over`, the walk returns as
/// soon as the count is over that limit (the count is then partial).
pub fn walk(roots: &[PathBuf], stop_over: Option<DiskLimit>) -> Result<Usage, DiskError> {
    let on_image = roots
        .first()
        .and_then(|home| home.parent())
        .and_then(crate::volume::usage);
    let (base, roots) = match on_image {
        Some(u) => (u, roots.get(2..).unwrap_or_default()),
        None => (Usage::default(), roots),
    };
    let mut fds = Vec::new();
    for root in roots {
        match tree::open_dir_path(root) {
            Ok(fd) => fds.push(fd),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(DiskError::Walk(root.clone(), e)),
        }
    }
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    let over = |u: Usage| stop_over.is_some_and(|l| l.exceeded_by(base + u));
    tree::usage_of(&borrowed, true, &over)
        .map(|u| base + u)
        .map_err(|e| DiskError::Walk(roots.first().cloned().unwrap_or_default(), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn accounting(dir: &Path) -> Detected {
        detect(dir, DiskBackend::Accounting, None)
            .expect("detect")
            .0
    }

    fn fill(path: &Path, n: usize) {
        std::fs::write(path, vec![7u8; n]).expect("write");
    }

    #[test]
    fn walk_counts_blocks_and_inodes_once_without_following_links() {
        let d = tempfile::tempdir().expect("tempdir");
        let home = d.path().join("home");
        let work = d.path().join("work");
        std::fs::create_dir_all(home.join("a/b")).expect("mkdir");
        std::fs::create_dir(&work).expect("mkdir");
        fill(&home.join("a/b/f"), 64 * 1024);
        std::fs::hard_link(home.join("a/b/f"), work.join("hard")).expect("link");
        // A link out of the tree to a big file is counted as the link only.
        let outside = d.path().join("outside");
        fill(&outside, 1 << 20);
        symlink(&outside, work.join("out")).expect("symlink");
        symlink(d.path(), work.join("up")).expect("symlink");
        let u = walk(&[home.clone(), work.clone()], None).expect("walk");
        // home, a, b, f, work, out, up (hard is f again).
        assert_eq!(u.inodes, 7);
        assert!(u.bytes >= 64 * 1024, "{u:?}");
        assert!(u.bytes < (1 << 20), "the link target is not counted: {u:?}");
    }

    #[test]
    fn walk_goes_deep() {
        let d = tempfile::tempdir().expect("tempdir");
        let mut p = d.path().join("root");
        let root = p.clone();
        for _ in 0..(100 * 3 + 5) {
            p.push("d");
        }
        std::fs::create_dir_all(&p).expect("mkdir");
        fill(&p.join("f"), 4096);
        let u = walk(&[root], None).expect("walk");
        assert_eq!(u.inodes, (100 * 3 + 5) as u64 + 2);
    }

    #[test]
    fn walk_stops_once_over_the_limit_and_skips_missing_roots() {
        let d = tempfile::tempdir().expect("tempdir");
        for i in 0..50 {
            std::fs::create_dir(d.path().join(format!("d{i}"))).expect("mkdir");
        }
        let limit = DiskLimit {
            bytes: None,
            inodes: Some(3),
        };
        let u = walk(
            &[d.path().to_path_buf(), d.path().join("missing")],
            Some(limit),
        )
        .expect("walk");
        assert!(limit.exceeded_by(u));
        assert!(u.inodes < 51);
    }

    #[test]
    fn pace_shortens_near_the_limit_only() {
        let limit = DiskLimit {
            bytes: Some(100 << 20),
            inodes: None,
        };
        let t0 = Instant::now();
        let took = Duration::from_micros(100);
        let mut pace = Pace::default();
        let u = |mib: u64| Usage {
            bytes: mib << 20,
            inodes: 1,
        };
        assert_eq!(pace.next(t0, u(0), took, limit), MIN_PERIOD);
        // 10 MiB in 1 s: 90 MiB left is 9 s away; the period stands.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(pace.next(t1, u(10), took, limit), MIN_PERIOD);
        // 80 MiB in 20 ms (4 GiB/s): 10 MiB left is 2.5 ms away.
        let t2 = t1 + Duration::from_millis(20);
        assert_eq!(pace.next(t2, u(90), took, limit), NEAR_PERIOD);
        // Not growing: the period again.
        let t3 = t2 + Duration::from_millis(2);
        assert_eq!(pace.next(t3, u(90), took, limit), MIN_PERIOD);
        // Never shorter than the walk itself.
        let slow = Duration::from_millis(50);
        let t4 = t3 + Duration::from_millis(20);
        assert_eq!(pace.next(t4, u(99), slow, limit), slow);
    }

    #[test]
    fn period_follows_the_walk_within_bounds() {
        assert_eq!(period(Duration::ZERO), MIN_PERIOD);
        assert_eq!(period(Duration::from_millis(5)), Duration::from_millis(100));
        assert_eq!(period(Duration::from_secs(1)), MAX_PERIOD);
    }

    #[test]
    fn reserve_is_checked_against_free_space() {
        let d = tempfile::tempdir().expect("tempdir");
        let disk = Disk::new(d.path(), Some(u64::MAX), accounting(d.path())).expect("disk");
        let err = crate::error::BrokerError::from(
            disk.check_reserve().expect_err("nothing has u64::MAX free"),
        );
        assert!(err.to_string().contains("reserve"), "{err}");
        assert_eq!(
            tonic::Status::from(err).code(),
            tonic::Code::ResourceExhausted
        );
        let disk = Disk::new(d.path(), Some(0), accounting(d.path())).expect("disk");
        disk.check_reserve().expect("0 turns the check off");
        let auto = Disk::new(d.path(), None, accounting(d.path())).expect("disk");
        assert!(auto.reserve() <= RESERVE_MAX);
    }

    #[test]
    fn file_size_cap_is_what_is_left() {
        let d = tempfile::tempdir().expect("tempdir");
        let disk = Disk::new(d.path(), Some(0), accounting(d.path())).expect("disk");
        let limit = DiskLimit {
            bytes: Some(1000),
            inodes: None,
        };
        assert_eq!(disk.file_size_cap("s", limit), Some(1000));
        disk.record(
            "s",
            Usage {
                bytes: 400,
                inodes: 1,
            },
        );
        assert_eq!(disk.file_size_cap("s", limit), Some(600));
        disk.record(
            "s",
            Usage {
                bytes: 4000,
                inodes: 1,
            },
        );
        assert_eq!(disk.file_size_cap("s", limit), Some(0));
        assert_eq!(disk.file_size_cap("s", DiskLimit::default()), None);
    }
}
