//! Session trees, walked by descriptor. Every name, link, size and file type
//! under a session's home and work was made by an agent, so nothing here
//! builds a path string for the kernel to resolve: a directory is entered
//! with `openat(O_DIRECTORY | O_NOFOLLOW)` from its parent's descriptor, an
//! entry is examined with `fstatat(AT_SYMLINK_NOFOLLOW)`, a file is opened
//! `O_NOFOLLOW | O_NONBLOCK` (a fifo never blocks the broker) and checked
//! with `fstat` to be what the walk saw. A link is data: read with
//! `readlinkat`, never followed. Paths deeper than `PATH_MAX` work, since
//! every call is relative to a descriptor; depth is bounded by [`MAX_DEPTH`]
//! so a walk holds a bounded number of descriptors.
//!
//! Users: export, import and fork (`archive`), disk usage, the session's
//! own dirs and metadata (`session`).

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, Stat};
use rustix::io::Errno;
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// The deepest a session tree may be (directories below home or work).
pub const MAX_DEPTH: usize = 2048;

const DIR: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// A number from a `stat` field, whatever its width on this target.
pub fn num<T: TryInto<u64>>(x: T) -> u64 {
    x.try_into().unwrap_or(0)
}

/// A signed number from a `stat` field (times).
fn signed<T: TryInto<i64>>(x: T) -> i64 {
    x.try_into().unwrap_or(0)
}

/// The file type of a `stat`.
pub fn kind(st: &Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode)
}

/// Opens directory `name` of `parent`; a link or a non-directory is refused
/// (`ELOOP`/`ENOTDIR`) instead of followed.
pub fn open_dir(parent: impl AsFd, name: &OsStr) -> io::Result<OwnedFd> {
    Ok(rfs::openat(parent, name, DIR, Mode::empty())?)
}

/// Opens a directory by host path (a path the broker owns, not the agent).
pub fn open_dir_path(path: &Path) -> io::Result<OwnedFd> {
    Ok(rfs::open(path, DIR, Mode::empty())?)
}

/// The `stat` of `name` in `parent`, not following a link.
pub fn stat_at(parent: impl AsFd, name: &OsStr) -> io::Result<Stat> {
    Ok(rfs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)?)
}

/// Why a capped regular-file read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("is not a regular file")]
    NotRegular,
    #[error("is over the {cap}-byte cap")]
    TooLarge { cap: u64 },
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Reads regular file `name` of `parent` whole, at most `cap` bytes; `None`
/// if it does not exist. A link, fifo, device or socket is refused without
/// being opened for reading in a way that could block.
pub fn read_capped(
    parent: impl AsFd,
    name: &OsStr,
    cap: u64,
) -> Result<Option<Vec<u8>>, ReadError> {
    let fd = match rfs::openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(None),
        Err(Errno::LOOP) => return Err(ReadError::NotRegular),
        Err(e) => return Err(ReadError::Io(e.into())),
    };
    let st = rfs::fstat(&fd).map_err(io::Error::from)?;
    if kind(&st) != FileType::RegularFile {
        return Err(ReadError::NotRegular);
    }
    let mut out = Vec::new();
    let mut f = std::fs::File::from(fd);
    io::Read::read_to_end(&mut io::Read::take(&mut f, cap.saturating_add(1)), &mut out)?;
    if num(out.len()) > cap {
        return Err(ReadError::TooLarge { cap });
    }
    Ok(Some(out))
}

/// Writes `name` in directory `dir` atomically: a temp file, fsync, rename
/// over the old one, fsync of the directory. A full disk leaves the old
/// file as it was.
pub fn write_atomic(dir: impl AsFd, name: &OsStr, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = dir.as_fd();
    let mut tmp = OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".tmp-{:08x}", rand::random::<u32>()));
    let fd = rfs::openat(
        dir,
        tmp.as_os_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
    )?;
    let result = (|| {
        let mut f = std::fs::File::from(fd);
        io::Write::write_all(&mut f, bytes)?;
        f.sync_all()?;
        rfs::renameat(dir, tmp.as_os_str(), dir, name)?;
        Ok::<_, io::Error>(())
    })();
    if result.is_err() {
        let _ = rfs::unlinkat(dir, tmp.as_os_str(), AtFlags::empty());
    }
    result?;
    rfs::fsync(dir)?;
    Ok(())
}

/// The names in a directory (without `.` and `..`), sorted so that every
/// walk of the same tree visits it in the same order.
fn list(dir: &OwnedFd) -> io::Result<Vec<OsString>> {
    let mut d = rfs::Dir::read_from(dir)?;
    let mut out = Vec::new();
    while let Some(e) = d.read() {
        let e = e?;
        let name = e.file_name().to_bytes();
        if name != b"." && name != b".." {
            out.push(OsString::from_vec(name.to_vec()));
        }
    }
    out.sort();
    Ok(out)
}

/// One entry met by [`walk`].
#[derive(Debug)]
pub struct Entry<'a> {
    /// The directory holding the entry.
    pub parent: BorrowedFd<'a>,
    pub name: &'a OsStr,
    /// Path from the walk's root, for names in archives and messages only.
    pub rel: &'a Path,
    pub stat: &'a Stat,
    /// The entry itself, opened, when it is a directory.
    pub dir: Option<BorrowedFd<'a>>,
}

/// What a [`walk`] does at each entry.
pub trait Visitor {
    /// Called for every entry, a directory before its contents. For a
    /// directory, `Ok(true)` enters it (and [`Visitor::leave`] follows).
    fn entry(&mut self, e: &Entry<'_>) -> io::Result<bool>;
    /// Called after a directory's contents (the root's too, with an empty
    /// `rel`).
    fn leave(&mut self, _dir: BorrowedFd<'_>, _rel: &Path, _stat: &Stat) -> io::Result<()> {
        Ok(())
    }
    /// Whether the tree is live (an agent may be changing it): a directory
    /// replaced between its `stat` and its opening is then skipped, not an
    /// error.
    fn live(&self) -> bool {
        false
    }
}

struct Frame {
    fd: OwnedFd,
    names: std::vec::IntoIter<OsString>,
    rel: PathBuf,
    stat: Stat,
}

fn too_deep(rel: &Path) -> io::Error {
    io::Error::other(format!(
        "{} is more than {MAX_DEPTH} directories deep",
        rel.display()
    ))
}

/// Walks everything below `root`, depth first, in name order, never
/// following a link. Entries that vanish during the walk (a live tree) are
/// skipped; a directory replaced between its `stat` and its opening is an
/// error.
pub fn walk(root: impl AsFd, v: &mut dyn Visitor) -> io::Result<()> {
    let fd = rfs::openat(root, ".", DIR, Mode::empty())?;
    let stat = rfs::fstat(&fd)?;
    let names = list(&fd)?;
    let mut stack = vec![Frame {
        fd,
        names: names.into_iter(),
        rel: PathBuf::new(),
        stat,
    }];
    while let Some(top) = stack.last_mut() {
        let Some(name) = top.names.next() else {
            if let Some(f) = stack.pop() {
                v.leave(f.fd.as_fd(), &f.rel, &f.stat)?;
            }
            continue;
        };
        let st = match rfs::statat(&top.fd, &name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => continue,
            Err(e) => return Err(e.into()),
        };
        let rel = top.rel.join(&name);
        let dir = if kind(&st) == FileType::Directory {
            match rfs::openat(&top.fd, &name, DIR, Mode::empty()) {
                Ok(fd) => {
                    let now = rfs::fstat(&fd)?;
                    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) {
                        if v.live() {
                            continue;
                        }
                        return Err(io::Error::other(format!(
                            "{} changed during the walk",
                            rel.display()
                        )));
                    }
                    Some(fd)
                }
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(e.into()),
            }
        } else {
            None
        };
        let enter = v.entry(&Entry {
            parent: top.fd.as_fd(),
            name: &name,
            rel: &rel,
            stat: &st,
            dir: dir.as_ref().map(|d| d.as_fd()),
        })?;
        if let (Some(fd), true) = (dir, enter) {
            if stack.len() > MAX_DEPTH {
                return Err(too_deep(&rel));
            }
            let names = list(&fd)?;
            stack.push(Frame {
                fd,
                names: names.into_iter(),
                rel,
                stat: st,
            });
        }
    }
    Ok(())
}

/// Real disk use of a tree: allocated bytes and inodes, each hard-linked
/// inode once.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub inodes: u64,
}

impl std::ops::Add for Usage {
    type Output = Usage;
    fn add(self, o: Usage) -> Usage {
        Usage {
            bytes: self.bytes.saturating_add(o.bytes),
            inodes: self.inodes.saturating_add(o.inodes),
        }
    }
}

struct Counter<'a> {
    usage: Usage,
    seen: std::collections::HashSet<(u64, u64)>,
    /// Stops the walk once this says the count is over.
    stop: &'a dyn Fn(Usage) -> bool,
    live: bool,
    /// Set when `stop` ended the walk.
    over: bool,
}

/// The error a [`Counter`] stops a walk with.
const OVER: &str = "over the limit";

impl Counter<'_> {
    fn count(&mut self, st: &Stat) -> io::Result<()> {
        if num(st.st_nlink) > 1
            && kind(st) != FileType::Directory
            && !self.seen.insert((num(st.st_dev), num(st.st_ino)))
        {
            return Ok(());
        }
        self.usage.inodes += 1;
        self.usage.bytes = self
            .usage
            .bytes
            .saturating_add(num(st.st_blocks).saturating_mul(512));
        self.over = (self.stop)(self.usage);
        match self.over {
            true => Err(io::Error::other(OVER)),
            false => Ok(()),
        }
    }
}

impl Visitor for Counter<'_> {
    fn entry(&mut self, e: &Entry<'_>) -> io::Result<bool> {
        self.count(e.stat)?;
        Ok(true)
    }
    fn leave(&mut self, _dir: BorrowedFd<'_>, rel: &Path, stat: &Stat) -> io::Result<()> {
        if rel.as_os_str().is_empty() {
            self.count(stat)?;
        }
        Ok(())
    }
    fn live(&self) -> bool {
        self.live
    }
}

/// The disk use of everything below (and including) `root`.
pub fn usage(root: impl AsFd) -> io::Result<Usage> {
    usage_of(&[root.as_fd()], false, &|_| false)
}

/// The disk use of `roots` together (a hard-linked inode once across all),
/// walked as by [`walk`]. `live`: the trees may change meanwhile (a
/// directory replaced during the walk is skipped). The walk stops as soon
/// as `stop` says the count so far is enough (the count is then partial).
pub fn usage_of(
    roots: &[BorrowedFd<'_>],
    live: bool,
    stop: &dyn Fn(Usage) -> bool,
) -> io::Result<Usage> {
    let mut c = Counter {
        usage: Usage::default(),
        seen: Default::default(),
        stop,
        live,
        over: false,
    };
    for root in roots {
        match walk(root, &mut c) {
            Err(_) if c.over => break,
            r => r?,
        }
    }
    Ok(c.usage)
}

/// Opens the directory `rel` below `root` one component at a time, never
/// following a link (works below `PATH_MAX` and beyond it).
pub fn open_dir_beneath(root: impl AsFd, rel: &Path) -> io::Result<OwnedFd> {
    let mut cur = rfs::openat(root, ".", DIR, Mode::empty())?;
    for c in rel.components() {
        match c {
            std::path::Component::Normal(name) => cur = open_dir(&cur, name)?,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "only plain names in a tree path",
                ));
            }
        }
    }
    Ok(cur)
}

/// Hard-links `target` (a path below `root` to a regular file) as `name`
/// in `dir`. The target's directories are opened one by one without
/// following links, and the link is made without following one either.
pub fn link_beneath(
    root: impl AsFd,
    target: &Path,
    dir: impl AsFd,
    name: &OsStr,
) -> io::Result<()> {
    let (parent, leaf) = match (target.parent(), target.file_name()) {
        (Some(p), Some(l)) => (p, l),
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a hard link needs a file to point at",
            ));
        }
    };
    let pfd = open_dir_beneath(root, parent)?;
    if kind(&stat_at(&pfd, leaf)?) != FileType::RegularFile {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a hard link may only point at a regular file",
        ));
    }
    Ok(rfs::linkat(&pfd, leaf, dir, name, AtFlags::empty())?)
}

/// The timestamps of a `stat`, for `futimens`/`utimensat`.
pub fn times(st: &Stat) -> rfs::Timestamps {
    rfs::Timestamps {
        last_access: rfs::Timespec {
            tv_sec: signed(st.st_atime),
            tv_nsec: num(st.st_atime_nsec) as _,
        },
        last_modification: rfs::Timespec {
            tv_sec: signed(st.st_mtime),
            tv_nsec: num(st.st_mtime_nsec) as _,
        },
    }
}

/// Timestamps with the given modification time (and access time).
/// Gives `fd` to `owner` (uid, gid); nothing without one.
pub fn chown_to(fd: impl AsFd, owner: Option<(u32, u32)>) -> io::Result<()> {
    if let Some((uid, gid)) = owner {
        rfs::fchown(
            fd,
            Some(rfs::Uid::from_raw(uid)),
            Some(rfs::Gid::from_raw(gid)),
        )?;
    }
    Ok(())
}

pub fn mtime(secs: u64) -> rfs::Timestamps {
    let t = rfs::Timespec {
        tv_sec: i64::try_from(secs).unwrap_or(i64::MAX),
        tv_nsec: 0,
    };
    rfs::Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// Permission bits a session file may keep: setuid and setgid never
/// survive a copy or an import.
pub fn safe_mode(mode: u32) -> Mode {
    Mode::from_raw_mode(mode & 0o1777)
}

/// Copies the bytes of `src` to `dst` (both regular files, `dst` empty) at
/// the cost of the real data: a reflink where the filesystem shares
/// extents; otherwise only the data segments (`SEEK_DATA`/`SEEK_HOLE`)
/// with `copy_file_range`, so holes stay holes.
pub fn copy_data(src: &OwnedFd, dst: &OwnedFd, size: u64) -> io::Result<()> {
    if rfs::ioctl_ficlone(dst, src).is_ok() {
        return Ok(());
    }
    let mut pos = 0u64;
    while pos < size {
        let data = match rfs::seek(src, rfs::SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = rfs::seek(src, rfs::SeekFrom::Hole(data))?.min(size);
        copy_range(src, dst, data, hole)?;
        pos = hole;
    }
    rfs::ftruncate(dst, size)?;
    Ok(())
}

fn copy_range(src: &OwnedFd, dst: &OwnedFd, from: u64, to: u64) -> io::Result<()> {
    let (mut off_in, mut off_out) = (from, from);
    while off_in < to {
        let want = usize::try_from(to - off_in)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        match rfs::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), want) {
            Ok(0) => break,
            Ok(_) => {}
            Err(Errno::XDEV | Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => {
                return copy_range_rw(src, dst, off_in, to);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn copy_range_rw(src: &OwnedFd, dst: &OwnedFd, mut off: u64, to: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    while off < to {
        let want = usize::try_from(to - off)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = rustix::io::pread(src, &mut buf[..want], off)?;
        if n == 0 {
            break;
        }
        let mut done = 0;
        while done < n {
            done += rustix::io::pwrite(dst, &buf[done..n], off + num(done))?;
        }
        off += num(n);
    }
    Ok(())
}

/// What a copy or an export left out, one line each (sockets, devices).
pub type Skipped = Vec<String>;

/// Copies the trees `parts` (e.g. home and work) of directory `src` into
/// the directory `dst`, where they are new or empty (a session image's
/// mounted parts): directories, files
/// (holes kept, reflinked where possible), links as links, hard links as
/// hard links (also between parts), fifos; owners, modes (without
/// setuid/setgid) and times kept. Sockets and devices are not session
/// state: they are skipped and named in the result.
pub fn copy(src: impl AsFd, dst: &OwnedFd, parts: &[&str]) -> io::Result<Skipped> {
    let src = src.as_fd();
    let mut c = Copier {
        dst_root: rfs::openat(dst, ".", DIR, Mode::empty())?,
        prefix: PathBuf::new(),
        stack: Vec::new(),
        links: HashMap::new(),
        skipped: Vec::new(),
    };
    for part in parts {
        let from = open_dir(src, OsStr::new(part))?;
        match rfs::mkdirat(dst, *part, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        c.stack = vec![open_dir(dst, OsStr::new(part))?];
        c.prefix = PathBuf::from(part);
        walk(&from, &mut c)?;
    }
    Ok(c.skipped)
}

struct Copier {
    dst_root: OwnedFd,
    /// The part being copied (its path below `dst_root`).
    prefix: PathBuf,
    /// The destination directory of each directory being walked.
    stack: Vec<OwnedFd>,
    /// First copy of each hard-linked inode, below `dst_root`.
    links: HashMap<(u64, u64), PathBuf>,
    skipped: Skipped,
}

fn set_owner_at(dir: impl AsFd, name: &OsStr, st: &Stat) -> io::Result<()> {
    // Owners are kept only where the broker may set them (it runs as root
    // in production); a non-root broker copies as itself.
    match rfs::chownat(
        dir,
        name,
        Some(rfs::Uid::from_raw(st.st_uid)),
        Some(rfs::Gid::from_raw(st.st_gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    ) {
        Ok(()) | Err(Errno::PERM) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn set_owner(fd: impl AsFd, st: &Stat) -> io::Result<()> {
    match rfs::fchown(
        fd,
        Some(rfs::Uid::from_raw(st.st_uid)),
        Some(rfs::Gid::from_raw(st.st_gid)),
    ) {
        Ok(()) | Err(Errno::PERM) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

impl Copier {
    fn parent(&self) -> io::Result<&OwnedFd> {
        self.stack
            .last()
            .ok_or_else(|| io::Error::other("copy: no destination directory"))
    }

    fn file(&mut self, e: &Entry<'_>) -> io::Result<()> {
        let key = (num(e.stat.st_dev), num(e.stat.st_ino));
        if num(e.stat.st_nlink) > 1
            && let Some(first) = self.links.get(&key)
        {
            return link_beneath(&self.dst_root, first, self.parent()?, e.name);
        }
        let src = rfs::openat(
            e.parent,
            e.name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY,
            Mode::empty(),
        )?;
        let st = rfs::fstat(&src)?;
        if kind(&st) != FileType::RegularFile || st.st_ino != e.stat.st_ino {
            return Err(io::Error::other(format!(
                "{} changed during the copy",
                e.rel.display()
            )));
        }
        let out = rfs::openat(
            self.parent()?,
            e.name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?;
        copy_data(&src, &out, num(st.st_size))?;
        set_owner(&out, &st)?;
        rfs::fchmod(&out, safe_mode(st.st_mode))?;
        rfs::futimens(&out, &times(&st))?;
        if num(st.st_nlink) > 1 {
            self.links.insert(key, self.prefix.join(e.rel));
        }
        Ok(())
    }
}

impl Visitor for Copier {
    fn entry(&mut self, e: &Entry<'_>) -> io::Result<bool> {
        let st = e.stat;
        match kind(st) {
            FileType::Directory => {
                let parent = self.parent()?;
                rfs::mkdirat(parent, e.name, Mode::from_raw_mode(0o700))?;
                let fd = open_dir(parent, e.name)?;
                self.stack.push(fd);
                Ok(true)
            }
            FileType::RegularFile => self.file(e).map(|()| false),
            FileType::Symlink => {
                let target = rfs::readlinkat(e.parent, e.name, Vec::new())?;
                let parent = self.parent()?;
                rfs::symlinkat(target.as_c_str(), parent, e.name)?;
                set_owner_at(parent, e.name, st)?;
                rfs::utimensat(parent, e.name, &times(st), AtFlags::SYMLINK_NOFOLLOW)?;
                Ok(false)
            }
            FileType::Fifo => {
                let parent = self.parent()?;
                rfs::mkfifoat(parent, e.name, safe_mode(st.st_mode))?;
                set_owner_at(parent, e.name, st)?;
                rfs::utimensat(parent, e.name, &times(st), AtFlags::SYMLINK_NOFOLLOW)?;
                Ok(false)
            }
            other => {
                self.skipped.push(format!(
                    "{}: {} not copied",
                    e.rel.display(),
                    describe(other)
                ));
                Ok(false)
            }
        }
    }

    fn leave(&mut self, _dir: BorrowedFd<'_>, _rel: &Path, stat: &Stat) -> io::Result<()> {
        // A directory's own metadata goes last: its mode may forbid the
        // writes above, and each write moved its mtime.
        let fd = self
            .stack
            .pop()
            .ok_or_else(|| io::Error::other("copy: unbalanced walk"))?;
        set_owner(&fd, stat)?;
        rfs::fchmod(&fd, safe_mode(stat.st_mode))?;
        rfs::futimens(&fd, &times(stat))?;
        Ok(())
    }
}

/// A file type in words, for messages.
pub fn describe(t: FileType) -> &'static str {
    match t {
        FileType::RegularFile => "regular file",
        FileType::Directory => "directory",
        FileType::Symlink => "symbolic link",
        FileType::Fifo => "fifo",
        FileType::Socket => "socket",
        FileType::CharacterDevice => "character device",
        FileType::BlockDevice => "block device",
        FileType::Unknown => "unknown file type",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> (tempfile::TempDir, OwnedFd) {
        let d = tempfile::tempdir().expect("tempdir");
        let fd = open_dir_path(d.path()).expect("open");
        (d, fd)
    }

    #[test]
    fn walk_never_follows_links_and_usage_counts_hard_links_once() {
        let (d, fd) = dir();
        let p = d.path();
        std::fs::create_dir(p.join("a")).expect("mkdir");
        std::fs::write(p.join("a/f"), vec![1u8; 8192]).expect("write");
        std::fs::hard_link(p.join("a/f"), p.join("a/g")).expect("link");
        std::os::unix::fs::symlink("/", p.join("root")).expect("symlink");
        std::os::unix::fs::symlink("..", p.join("a/up")).expect("symlink");
        let u = usage(&fd).expect("usage");
        // root dir, a, f (once), root link, up link
        assert_eq!(u.inodes, 5);
        assert!(u.bytes >= 8192 && u.bytes < 64 * 1024, "{u:?}");
    }

    #[test]
    fn read_capped_refuses_links_fifos_and_big_files() {
        let (d, fd) = dir();
        let p = d.path();
        std::fs::write(p.join("ok"), b"{}").expect("write");
        std::os::unix::fs::symlink("ok", p.join("link")).expect("symlink");
        nix::unistd::mkfifo(&p.join("fifo"), nix::sys::stat::Mode::S_IRWXU).expect("fifo");
        std::fs::write(p.join("big"), vec![b'x'; 100]).expect("write");
        let name = |s: &str| OsString::from(s);
        assert_eq!(
            read_capped(&fd, &name("ok"), 10).expect("ok"),
            Some(b"{}".to_vec())
        );
        assert!(
            read_capped(&fd, &name("missing"), 10)
                .expect("none")
                .is_none()
        );
        assert!(matches!(
            read_capped(&fd, &name("link"), 10),
            Err(ReadError::NotRegular)
        ));
        // A fifo with no writer: refused at once, never waited on.
        assert!(matches!(
            read_capped(&fd, &name("fifo"), 10),
            Err(ReadError::NotRegular)
        ));
        assert!(matches!(
            read_capped(&fd, &name("big"), 10),
            Err(ReadError::TooLarge { cap: 10 })
        ));
    }

    #[test]
    fn open_dir_refuses_links() {
        let (d, fd) = dir();
        std::fs::create_dir(d.path().join("real")).expect("mkdir");
        std::os::unix::fs::symlink("real", d.path().join("link")).expect("symlink");
        assert!(open_dir(&fd, OsStr::new("real")).is_ok());
        let err = open_dir(&fd, OsStr::new("link")).expect_err("a link");
        assert!(
            matches!(err.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)),
            "{err}"
        );
        assert!(open_dir_beneath(&fd, Path::new("link/x")).is_err());
    }

    #[test]
    fn write_atomic_replaces_whole() {
        let (d, fd) = dir();
        write_atomic(&fd, OsStr::new("m.json"), b"one", 0o600).expect("write");
        write_atomic(&fd, OsStr::new("m.json"), b"two", 0o600).expect("write");
        assert_eq!(
            std::fs::read(d.path().join("m.json")).expect("read"),
            b"two"
        );
        let left: Vec<_> = std::fs::read_dir(d.path())
            .expect("ls")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, vec![OsString::from("m.json")]);
    }

    #[test]
    fn copy_keeps_holes_links_and_fifos() {
        let (s, sfd) = dir();
        let (t, tfd) = dir();
        std::fs::create_dir(s.path().join("home")).expect("mkdir");
        let p = &s.path().join("home");
        let f = std::fs::File::create(p.join("sparse")).expect("create");
        f.set_len(1 << 30).expect("len");
        std::os::unix::fs::FileExt::write_at(&f, b"data", 1 << 20).expect("write");
        std::fs::hard_link(p.join("sparse"), p.join("again")).expect("link");
        std::os::unix::fs::symlink("/nowhere/../x", p.join("abs")).expect("symlink");
        nix::unistd::mkfifo(&p.join("fifo"), nix::sys::stat::Mode::S_IRWXU).expect("fifo");
        let skipped = copy(&sfd, &tfd, &["home"]).expect("copy");
        assert!(skipped.is_empty());
        let q = &t.path().join("home");
        let m = std::fs::metadata(q.join("sparse")).expect("meta");
        assert_eq!(m.len(), 1 << 30);
        assert!(
            std::os::unix::fs::MetadataExt::blocks(&m) < 1024,
            "holes kept"
        );
        assert_eq!(std::os::unix::fs::MetadataExt::nlink(&m), 2);
        assert_eq!(
            std::fs::read_link(q.join("abs")).expect("link"),
            PathBuf::from("/nowhere/../x")
        );
        assert!(std::fs::symlink_metadata(q.join("fifo")).is_ok());
    }
}
