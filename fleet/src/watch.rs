//! A change watch on a local copy's home and work, so that the commit of a
//! turn that changed nothing skips the fingerprint (a `stat` of every
//! entry, ~4 µs each on a VM). A watch is started when a commit (or a
//! restore) has just fingerprinted the copy, and kept from turn to turn
//! while nothing happens to the tree: an unchanged turn costs no walk, at
//! its start or its end.
//!
//! inotify watches every directory of home and work (opened by descriptor,
//! links never followed). Any event at all means "maybe changed" and the
//! fingerprint decides, as without a watch: a write or truncation, a close
//! after opening for writing, a change of mode, owner, times or extended
//! attributes, an entry created, removed or renamed, a watched directory
//! removed or moved, a watch dropped, the event queue overflowing. Only a
//! watch that saw nothing proves the tree unchanged.
//!
//! A file written through a shared mapping gives no write event, but it was
//! opened for writing: its close is reported when the last mapping of it
//! goes, at the latest when its process exits, and every process of a turn
//! is gone before the turn commits. Hard links cannot reach out of home or
//! work from the jail (each is a mount of its own there, and links do not
//! cross mounts).
//!
//! A tree with more than [`MAX_DIRS`] directories, a missing home or work,
//! or a host out of inotify instances or watches gets no watch: its commit
//! fingerprints.

use rustix::fs::inotify::{self, CreateFlags, WatchFlags};
use rustix::fs::{self as rfs, FileType};
use rustix::io::Errno;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use turnstile_broker::tree;

/// The most directories one watch covers; past it, the commit fingerprints.
pub const MAX_DIRS: usize = 8192;

/// What counts as a change.
const CHANGES: WatchFlags = WatchFlags::MODIFY
    .union(WatchFlags::ATTRIB)
    .union(WatchFlags::CLOSE_WRITE)
    .union(WatchFlags::CREATE)
    .union(WatchFlags::DELETE)
    .union(WatchFlags::DELETE_SELF)
    .union(WatchFlags::MOVE_SELF)
    .union(WatchFlags::MOVED_FROM)
    .union(WatchFlags::MOVED_TO)
    .union(WatchFlags::ONLYDIR);

/// A watch on home and work of one session dir.
#[derive(Debug)]
pub struct Watch {
    fd: OwnedFd,
    dirs: usize,
    max_dirs: usize,
    /// Device and inode of home and work: a tree swapped in under the same
    /// path is another tree.
    tops: Vec<(u64, u64)>,
}

/// Errors that mean "no watch here", not "something is wrong".
fn unavailable(e: Errno) -> bool {
    // Out of instances (EMFILE) or watches (ENOSPC), no inotify (ENOSYS).
    matches!(e, Errno::MFILE | Errno::NFILE | Errno::NOSPC | Errno::NOSYS)
}

impl Watch {
    /// Starts watching home and work of session dir `dir`. `None` when this
    /// tree gets no watch (see the module docs); an error when the tree
    /// cannot be read.
    pub fn start(dir: impl AsFd) -> io::Result<Option<Watch>> {
        Watch::start_with(dir, MAX_DIRS)
    }

    fn start_with(dir: impl AsFd, max_dirs: usize) -> io::Result<Option<Watch>> {
        let fd = match inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK) {
            Ok(fd) => fd,
            Err(e) if unavailable(e) => {
                tracing::debug!(error = %e, "no inotify instance: the commit fingerprints");
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let mut watch = Watch {
            fd,
            dirs: 0,
            max_dirs,
            tops: Vec::with_capacity(2),
        };
        for part in ["home", "work"] {
            let top = match tree::open_dir(&dir, OsStr::new(part)) {
                Ok(fd) => fd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            let st = rfs::fstat(&top)?;
            watch
                .tops
                .push((tree::num(st.st_dev), tree::num(st.st_ino)));
            if !watch.cover(top)? {
                return Ok(None);
            }
        }
        Ok(Some(watch))
    }

    /// Watches directory `top` and every directory below it, each before
    /// it is listed (an entry made after its listing is an event of its
    /// parent's). `false` when the tree is too big or the host is out of
    /// watches.
    fn cover(&mut self, top: OwnedFd) -> io::Result<bool> {
        let mut stack = vec![(top, 0usize)];
        while let Some((dir, depth)) = stack.pop() {
            self.dirs += 1;
            if self.dirs > self.max_dirs {
                tracing::debug!(
                    max = self.max_dirs,
                    "over the watched directory limit: the commit fingerprints"
                );
                return Ok(false);
            }
            // The opened directory itself, through its descriptor: nothing
            // on the way is followed.
            let path = format!("/proc/self/fd/{}", dir.as_raw_fd());
            match inotify::add_watch(&self.fd, path.as_str(), CHANGES) {
                Ok(_) => {}
                Err(e) if unavailable(e) => {
                    tracing::debug!(error = %e, "out of inotify watches: the commit fingerprints");
                    return Ok(false);
                }
                Err(e) => return Err(e.into()),
            }
            let mut entries = rfs::Dir::read_from(&dir)?;
            while let Some(entry) = entries.read() {
                let entry = entry?;
                let name = OsStr::from_bytes(entry.file_name().to_bytes());
                if name == "." || name == ".." {
                    continue;
                }
                let is_dir = match entry.file_type() {
                    FileType::Directory => true,
                    FileType::Unknown => match tree::stat_at(&dir, name) {
                        Ok(st) => tree::kind(&st) == FileType::Directory,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                        Err(e) => return Err(e),
                    },
                    _ => false,
                };
                if !is_dir {
                    continue;
                }
                if depth >= tree::MAX_DEPTH {
                    return Ok(false);
                }
                match tree::open_dir(&dir, name) {
                    Ok(sub) => stack.push((sub, depth + 1)),
                    // Gone or replaced since the listing: a change the
                    // parent's watch saw.
                    Err(e) => match Errno::from_io_error(&e) {
                        Some(Errno::NOENT | Errno::LOOP | Errno::NOTDIR) => {}
                        _ => return Err(e),
                    },
                }
            }
        }
        Ok(true)
    }

    /// Directories watched.
    pub fn dirs(&self) -> usize {
        self.dirs
    }

    /// Whether home and work of session dir `dir` are the directories
    /// this watch started on.
    pub fn same_tree(&self, dir: impl AsFd) -> io::Result<bool> {
        let mut now = Vec::with_capacity(2);
        for part in ["home", "work"] {
            match tree::stat_at(&dir, OsStr::new(part)) {
                Ok(st) => now.push((tree::num(st.st_dev), tree::num(st.st_ino))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(now == self.tops)
    }

    /// Drops the watch off the caller's thread: closing an inotify instance
    /// waits for an RCU grace period (10–20 ms here).
    pub fn discard(self) {
        match tokio::runtime::Handle::try_current() {
            Ok(h) => drop(h.spawn_blocking(move || drop(self))),
            Err(_) => drop(self),
        }
    }

    /// Whether nothing happened to the tree since [`Watch::start`]: no
    /// event of any kind is queued.
    pub fn quiet(&self) -> io::Result<bool> {
        let mut buf = [0u8; 1024];
        loop {
            return match rustix::io::read(&self.fd, &mut buf) {
                Err(Errno::WOULDBLOCK) => Ok(true),
                Err(Errno::INTR) => continue,
                Ok(_) => Ok(false),
                Err(e) => Err(e.into()),
            };
        }
    }
}

/// Most copies watched between turns (each holds an inotify instance; a
/// host has 128 per user by default).
pub const MAX_IDLE: usize = 32;
/// Most directories watched between turns, all copies together.
pub const MAX_IDLE_DIRS: usize = 65536;

/// A watch on a local copy whose fleet record says `generation` and
/// `fingerprint`: while it stays quiet, the copy is still that.
#[derive(Debug)]
pub struct Armed {
    pub watch: Watch,
    pub generation: i64,
    pub fingerprint: String,
}

impl Armed {
    /// Whether this watch covers session dir `dir` as its record `mark`
    /// describes it.
    pub fn covers(&self, dir: impl AsFd, mark: &crate::local::Mark) -> bool {
        self.generation == mark.generation
            && mark.fingerprint.as_deref() == Some(self.fingerprint.as_str())
            && self.watch.same_tree(dir).unwrap_or(false)
    }
}

/// The watches a worker holds: between turns by session id (the most
/// recently armed [`MAX_IDLE`], within [`MAX_IDLE_DIRS`]), during a turn by
/// its fleet lease's fencing token.
#[derive(Debug, Default)]
pub struct Watches {
    inner: std::sync::Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    idle: std::collections::HashMap<String, (u64, Armed)>,
    running: std::collections::HashMap<i64, Armed>,
    armed: u64,
}

impl Watches {
    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `armed` for session `id`'s next turn, dropping the least
    /// recently armed watches over the limits.
    pub fn arm(&self, id: &str, armed: Armed) {
        let mut out = Vec::new();
        {
            let mut h = self.held();
            h.armed += 1;
            let stamp = h.armed;
            if let Some((_, old)) = h.idle.insert(id.to_string(), (stamp, armed)) {
                out.push(old);
            }
            while h.idle.len() > MAX_IDLE
                || h.idle.values().map(|(_, a)| a.watch.dirs()).sum::<usize>() > MAX_IDLE_DIRS
            {
                let Some(oldest) = h
                    .idle
                    .iter()
                    .min_by_key(|(_, (stamp, _))| *stamp)
                    .map(|(k, _)| k.clone())
                else {
                    break;
                };
                if let Some((_, a)) = h.idle.remove(&oldest) {
                    out.push(a);
                }
            }
        }
        for a in out {
            a.watch.discard();
        }
    }

    /// Session `id`'s watch kept since its last turn.
    pub fn take_idle(&self, id: &str) -> Option<Armed> {
        self.held().idle.remove(id).map(|(_, a)| a)
    }

    /// Holds `armed` for the turn of fencing token `token`.
    pub fn run(&self, token: i64, armed: Armed) {
        if let Some(old) = self.held().running.insert(token, armed) {
            old.watch.discard();
        }
    }

    /// The watch of the turn of fencing token `token`.
    pub fn take_running(&self, token: i64) -> Option<Armed> {
        self.held().running.remove(&token)
    }

    /// Watches held: (between turns, during turns).
    pub fn counts(&self) -> (usize, usize) {
        let h = self.held();
        (h.idle.len(), h.running.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    /// A session dir: home with a nested history, work with a file.
    fn session() -> (tempfile::TempDir, OwnedFd) {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path();
        std::fs::create_dir_all(p.join("home/.claude/projects/a")).expect("home");
        std::fs::create_dir_all(p.join("work/src")).expect("work");
        std::fs::write(p.join("home/.claude/projects/a/log"), "one").expect("write");
        std::fs::write(p.join("work/src/main.rs"), "fn main() {}").expect("write");
        let fd = tree::open_dir_path(p).expect("open");
        (dir, fd)
    }

    fn watch(fd: &OwnedFd) -> Watch {
        Watch::start(fd).expect("start").expect("a watch")
    }

    #[test]
    fn a_tree_nobody_changed_is_quiet_and_reading_it_changes_nothing() {
        let (dir, fd) = session();
        let w = watch(&fd);
        assert_eq!(
            w.dirs(),
            6,
            "home, .claude, projects, a, work, src and nothing else"
        );
        assert!(w.quiet().expect("quiet"));
        std::fs::read(dir.path().join("home/.claude/projects/a/log")).expect("read");
        std::fs::read_dir(dir.path().join("work/src"))
            .expect("list")
            .for_each(drop);
        std::fs::metadata(dir.path().join("work/src/main.rs")).expect("stat");
        assert!(w.quiet().expect("quiet"), "reads are not changes");
    }

    #[test]
    fn every_kind_of_change_anywhere_in_the_tree_is_seen() {
        type Change = Box<dyn Fn(&Path)>;
        let deep = "home/.claude/projects/a/log";
        let changes: Vec<(&str, Change)> = vec![
            (
                "write",
                Box::new(move |p| std::fs::write(p.join(deep), "two").expect("write")),
            ),
            (
                "truncate",
                Box::new(move |p| {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(p.join(deep))
                        .expect("open")
                        .set_len(0)
                        .expect("truncate")
                }),
            ),
            (
                // What a write through a shared mapping leaves: the file
                // was opened for writing and closed.
                "opened for writing, closed unwritten",
                Box::new(move |p| {
                    drop(
                        std::fs::OpenOptions::new()
                            .read(true)
                            .write(true)
                            .open(p.join(deep))
                            .expect("open"),
                    )
                }),
            ),
            (
                "chmod",
                Box::new(move |p| {
                    std::fs::set_permissions(p.join(deep), std::fs::Permissions::from_mode(0o600))
                        .expect("chmod")
                }),
            ),
            (
                "create in a nested dir",
                Box::new(|p| std::fs::write(p.join("work/src/new.rs"), "").expect("create")),
            ),
            (
                "remove",
                Box::new(|p| std::fs::remove_file(p.join("work/src/main.rs")).expect("rm")),
            ),
            (
                "rename",
                Box::new(|p| {
                    std::fs::rename(p.join("work/src/main.rs"), p.join("work/src/lib.rs"))
                        .expect("rename")
                }),
            ),
            (
                "mkdir",
                Box::new(|p| std::fs::create_dir(p.join("home/.claude/todos")).expect("mkdir")),
            ),
            (
                "symlink",
                Box::new(|p| std::os::unix::fs::symlink("/etc", p.join("work/etc")).expect("ln")),
            ),
            (
                "remove a dir",
                Box::new(|p| {
                    std::fs::remove_file(p.join("home/.claude/projects/a/log")).expect("rm");
                    std::fs::remove_dir(p.join("home/.claude/projects/a")).expect("rmdir");
                }),
            ),
            (
                "times of the top dir",
                Box::new(|p| {
                    std::fs::File::open(p.join("work"))
                        .expect("open")
                        .set_modified(std::time::SystemTime::UNIX_EPOCH)
                        .expect("utimes")
                }),
            ),
        ];
        for (what, change) in changes {
            let (dir, fd) = session();
            let w = watch(&fd);
            assert!(w.quiet().expect("quiet"), "{what}: quiet before");
            change(dir.path());
            assert!(!w.quiet().expect("quiet"), "{what}: must be seen");
        }
    }

    #[test]
    fn links_are_not_followed_and_what_they_point_at_is_not_watched() {
        let (dir, fd) = session();
        let outside = tempfile::tempdir().expect("outside");
        std::os::unix::fs::symlink(outside.path(), dir.path().join("work/out")).expect("ln");
        let w = watch(&fd);
        assert_eq!(w.dirs(), 6, "the link is not a dir of the tree");
        std::fs::write(outside.path().join("x"), "").expect("write outside");
        assert!(w.quiet().expect("quiet"), "outside the tree");
    }

    #[test]
    fn a_tree_swapped_in_under_the_same_path_is_not_the_watched_one() {
        let (dir, fd) = session();
        let w = watch(&fd);
        assert!(w.same_tree(&fd).expect("same"));
        let p = dir.path();
        std::fs::rename(p.join("work"), p.join("old-work")).expect("mv");
        assert!(!w.same_tree(&fd).expect("gone"), "no work");
        std::fs::create_dir(p.join("work")).expect("mkdir");
        assert!(!w.same_tree(&fd).expect("another"), "another work");
        std::fs::remove_dir(p.join("work")).expect("rmdir");
        std::fs::rename(p.join("old-work"), p.join("work")).expect("mv back");
        assert!(w.same_tree(&fd).expect("back"));
        assert!(!w.quiet().expect("quiet"), "and the moves were seen");
        w.discard();
    }

    #[test]
    fn a_tree_without_work_or_over_the_dir_limit_gets_no_watch() {
        let (dir, fd) = session();
        assert!(Watch::start_with(&fd, 6).expect("start").is_some());
        assert!(
            Watch::start_with(&fd, 5).expect("start").is_none(),
            "over the limit"
        );
        std::fs::remove_dir_all(dir.path().join("work")).expect("rm");
        assert!(Watch::start(&fd).expect("start").is_none(), "no work");
    }
}
