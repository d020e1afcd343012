//! What a worker records beside its local copy of a session: the
//! generation it holds and a fingerprint of its home and work.
//!
//! The record is `fleet.json` in the session dir (beside `meta.json`, out
//! of the jail's reach, never exported). The fingerprint hashes what
//! `stat` says of every entry (type, mode, owner, size, inode, mtime and
//! ctime, in name order): any change to a file's content or metadata moves
//! its ctime, which no unprivileged process can set back, so equal
//! fingerprints mean an unchanged tree without reading a byte of it.

use rustix::fs::{self as rfs, AtFlags, Mode, OFlags};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use turnstile_broker::tree::{self, num};

/// The record's file name in a session dir.
pub const MARK: &str = "fleet.json";
const MARK_CAP: u64 = 4096;

/// What this worker knows of its local copy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// The committed generation the copy was restored from or committed as.
    pub generation: i64,
    /// Home and work as they were at that point (or, with `turn` set, when
    /// that turn started). `None`: not known.
    pub fingerprint: Option<String>,
    /// A turn that may have changed home and work since: set before a turn
    /// runs, cleared when its outcome is committed (or found unchanged).
    pub turn: Option<String>,
    /// The host boot the record was written in ([`boot_id`]). Nothing of
    /// the copy is synced to disk (neither a restore nor a turn's writes):
    /// after the host restarts, a record of another boot vouches for a tree
    /// that may have lost data, so the copy is hydrated again.
    #[serde(default)]
    pub boot: Option<String>,
}

/// This host boot's id (`/proc/sys/kernel/random/boot_id`); "unknown" if
/// it cannot be read (then records are trusted across restarts).
pub fn boot_id() -> &'static str {
    static BOOT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BOOT.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".to_string())
    })
}

impl Mark {
    /// A record written now, in this host boot.
    pub fn now(generation: i64, fingerprint: Option<String>, turn: Option<String>) -> Mark {
        Mark {
            generation,
            fingerprint,
            turn,
            boot: Some(boot_id().to_string()),
        }
    }

    /// Whether the record was written in this host boot.
    pub fn this_boot(&self) -> bool {
        self.boot.as_deref() == Some(boot_id())
    }

    /// Whether home and work, now fingerprinted `now` (computed only when
    /// needed), are still what the record says.
    pub fn is_clean(&self, now: impl FnOnce() -> io::Result<String>) -> io::Result<bool> {
        match (&self.turn, &self.fingerprint) {
            (None, Some(_)) => Ok(true),
            (_, Some(fp)) => Ok(now()? == *fp),
            (_, None) => Ok(false),
        }
    }
}

/// Reads the record of session dir `dir`; `None` if there is none or it is
/// unreadable (then nothing is assumed about the copy).
pub fn read_mark(dir: impl AsFd) -> Option<Mark> {
    match tree::read_capped(dir, OsStr::new(MARK), MARK_CAP) {
        Ok(Some(bytes)) => match serde_json::from_slice(&bytes) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(error = %e, "unreadable fleet record; treating the local copy as unknown");
                None
            }
        },
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %e, "unreadable fleet record; treating the local copy as unknown");
            None
        }
    }
}

/// Writes the record. `durable`: fsynced (after a commit or a restore); a
/// lost non-durable write only costs a fingerprint at the next turn.
pub fn write_mark(dir: impl AsFd, mark: &Mark, durable: bool) -> io::Result<()> {
    let bytes = serde_json::to_vec(mark).map_err(io::Error::other)?;
    if durable {
        return tree::write_atomic(dir, OsStr::new(MARK), &bytes, 0o600);
    }
    let dir = dir.as_fd();
    let tmp = format!(".{MARK}.tmp-{:08x}", rand::random::<u32>());
    let fd = rfs::openat(
        dir,
        tmp.as_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?;
    let written = io::Write::write_all(&mut std::fs::File::from(fd), &bytes)
        .and_then(|()| rfs::renameat(dir, tmp.as_str(), dir, MARK).map_err(io::Error::from));
    if written.is_err() {
        let _ = rfs::unlinkat(dir, tmp.as_str(), AtFlags::empty());
    }
    written
}

/// Removes the record (from a copy kept under another id).
pub fn remove_mark(dir: impl AsFd) -> io::Result<()> {
    match rfs::unlinkat(dir, MARK, AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

struct Fingerprint {
    h: Sha256,
}

impl Fingerprint {
    fn add(&mut self, rel: &[u8], st: &rfs::Stat) {
        self.h.update(num(rel.len()).to_le_bytes());
        self.h.update(rel);
        for v in [
            num(st.st_mode),
            num(st.st_uid),
            num(st.st_gid),
            num(st.st_size),
            num(st.st_ino),
            num(st.st_nlink),
            num(st.st_rdev),
            num(st.st_mtime),
            num(st.st_mtime_nsec),
            num(st.st_ctime),
            num(st.st_ctime_nsec),
        ] {
            self.h.update(v.to_le_bytes());
        }
    }
}

impl tree::Visitor for Fingerprint {
    fn entry(&mut self, e: &tree::Entry<'_>) -> io::Result<bool> {
        self.add(e.rel.as_os_str().as_bytes(), e.stat);
        Ok(e.dir.is_some())
    }
}

/// The fingerprint of home and work in session dir `dir`.
pub fn fingerprint(dir: impl AsFd) -> io::Result<String> {
    let dir = dir.as_fd();
    let mut fp = Fingerprint { h: Sha256::new() };
    for part in ["home", "work"] {
        match tree::open_dir(dir, OsStr::new(part)) {
            Ok(fd) => {
                let st = rfs::fstat(&fd)?;
                fp.add(part.as_bytes(), &st);
                tree::walk(&fd, &mut fp)?;
                // Marks the end of the part: entries cannot run into the next.
                fp.h.update([0xff]);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => fp.h.update(b"-"),
            Err(e) => return Err(e),
        }
    }
    Ok(crate::store::hex(&fp.h.finalize()))
}

/// Opens session dir `path`; `None` if there is none.
pub fn open_session_dir(path: &Path) -> io::Result<Option<OwnedFd>> {
    match tree::open_dir_path(path) {
        Ok(fd) => Ok(Some(fd)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// A new session id for a local copy of `id` kept aside from generation
/// `generation`: `<id>.kept-g<generation>-<random>`, `id` shortened to fit
/// the id length limit.
pub fn kept_name(id: &str, generation: i64) -> String {
    let suffix = format!(".kept-g{generation}-{:08x}", rand::random::<u32>());
    let room = turnstile_broker::validate::MAX_ID_LEN.saturating_sub(suffix.len());
    let mut prefix: String = id.chars().take(room).collect();
    // Ids may not end in '.' before another '.' ("..").
    while prefix.ends_with('.') {
        prefix.pop();
    }
    format!("{prefix}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> (tempfile::TempDir, OwnedFd) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("home/.claude")).expect("home");
        std::fs::create_dir_all(dir.path().join("work")).expect("work");
        std::fs::write(dir.path().join("home/.claude/history"), "one").expect("write");
        let fd = tree::open_dir_path(dir.path()).expect("open");
        (dir, fd)
    }

    #[test]
    fn the_fingerprint_moves_with_every_change_and_only_then() {
        let (dir, fd) = session();
        let first = fingerprint(&fd).expect("fp");
        assert_eq!(fingerprint(&fd).expect("fp"), first, "stable");
        // Reading changes nothing.
        std::fs::read(dir.path().join("home/.claude/history")).expect("read");
        assert_eq!(fingerprint(&fd).expect("fp"), first);
        type Change = Box<dyn Fn(&Path)>;
        let changes: Vec<Change> = vec![
            Box::new(|p| std::fs::write(p.join("work/new"), "").expect("create")),
            Box::new(|p| std::fs::write(p.join("home/.claude/history"), "two").expect("rewrite")),
            Box::new(|p| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(
                    p.join("home/.claude/history"),
                    std::fs::Permissions::from_mode(0o600),
                )
                .expect("chmod")
            }),
            Box::new(|p| std::os::unix::fs::symlink("x", p.join("work/link")).expect("symlink")),
            Box::new(|p| std::fs::remove_file(p.join("work/new")).expect("remove")),
        ];
        let mut seen = vec![first];
        for change in changes {
            change(dir.path());
            let now = fingerprint(&fd).expect("fp");
            assert!(!seen.contains(&now), "a change must move the fingerprint");
            seen.push(now);
        }
    }

    #[test]
    fn marks_round_trip_and_judge_cleanliness() {
        let (_dir, fd) = session();
        assert_eq!(read_mark(&fd), None);
        let fp = fingerprint(&fd).expect("fp");
        let mark = Mark {
            generation: 4,
            fingerprint: Some(fp.clone()),
            turn: Some("t1".into()),
            boot: Some(boot_id().into()),
        };
        assert!(mark.this_boot());
        assert!(
            !Mark {
                boot: Some("another".into()),
                ..mark.clone()
            }
            .this_boot()
        );
        assert!(
            !Mark {
                boot: None,
                ..mark.clone()
            }
            .this_boot(),
            "a record of no known boot"
        );
        write_mark(&fd, &mark, false).expect("write");
        assert_eq!(read_mark(&fd), Some(mark.clone()));
        write_mark(
            &fd,
            &Mark {
                turn: None,
                ..mark.clone()
            },
            true,
        )
        .expect("write");
        assert_eq!(read_mark(&fd).and_then(|m| m.turn), None);
        assert!(mark.is_clean(|| Ok(fp.clone())).expect("clean"));
        assert!(!mark.is_clean(|| Ok("other".into())).expect("dirty"));
        let settled = Mark {
            turn: None,
            ..mark.clone()
        };
        assert!(settled.is_clean(|| panic!("not needed")).expect("clean"));
        let unknown = Mark {
            fingerprint: None,
            ..mark
        };
        assert!(!unknown.is_clean(|| Ok(fp.clone())).expect("unknown"));
        remove_mark(&fd).expect("remove");
        remove_mark(&fd).expect("absent is fine");
        assert_eq!(read_mark(&fd), None);
    }

    #[test]
    fn kept_names_are_valid_session_ids() {
        for id in [
            "a",
            "s-1",
            &"x".repeat(128),
            &format!("{}.{}", "y".repeat(100), "z".repeat(27)),
        ] {
            let k = kept_name(id, 12);
            turnstile_broker::validate::session_id(&k).expect(&k);
            assert!(k.contains(".kept-g12-"), "{k}");
        }
    }
}
