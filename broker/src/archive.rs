//! Session archives: export a session (home, work, metadata) as a tar and
//! import one, both walking the real tree by descriptor (see [`crate::tree`]).
//!
//! Export writes what the agent built, faithfully: directories, files (holes
//! as GNU sparse entries), symlinks with their exact target bytes, hard
//! links as links, fifos, modes and mtimes. Sockets and devices are not
//! session state: skipped and named.
//!
//! Import trusts nothing in the archive. Every entry must sit under `home/`,
//! `work/` or be `meta.json`, with plain names only; each parent directory
//! is opened from its own parent with `O_NOFOLLOW`, so a link in the
//! archive is only ever data (any target is allowed, none is followed by
//! the host); a hard link may point only at a file this archive created;
//! setuid/setgid bits are dropped, devices refused; all-zero blocks are
//! written as holes, so the disk cost is the real data. An empty, truncated
//! or corrupt archive is refused. Each file's writeback is started as soon
//! as it is written; making the tree durable is the caller's (a fleet
//! restore syncs it before swapping it in).

use crate::tree::{self, MAX_DEPTH};
use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;
use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The largest `meta.json` accepted or read.
pub const META_CAP: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("archive entry {path:?} refused: {why}")]
    Refused { path: String, why: &'static str },
    #[error("archive is over the {cap}-byte cap")]
    TooLarge { cap: u64 },
    #[error("archive has more than {cap} entries")]
    TooManyEntries { cap: u64 },
    #[error("archive is corrupt: {0}")]
    Corrupt(#[source] io::Error),
    #[error("archive is truncated: it ends without the end-of-archive marker")]
    Truncated,
    #[error(
        "not a session archive: it holds no home/ or work/ (an empty file, or not made by export)"
    )]
    NotASession,
    #[error("meta.json is not valid session metadata: {0}")]
    BadMeta(String),
    #[error("cannot write {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// Limits of an import.
#[derive(Debug, Clone, Copy)]
pub struct ImportCaps {
    pub max_bytes: u64,
    pub max_entries: u64,
}

// ---------------------------------------------------------------- export

/// Writes the session in directory `dir` (its home, work and meta.json) as
/// a tar to `w`. Returns what was left out (sockets, devices).
pub fn export(dir: impl AsFd, w: impl Write) -> io::Result<tree::Skipped> {
    let dir = dir.as_fd();
    let mut b = tar::Builder::new(w);
    let mut skipped = Vec::new();
    // Shared by home and work: a hard link may join the two.
    let mut links = HashMap::new();
    for top in ["home", "work"] {
        let fd = match tree::open_dir(dir, OsStr::new(top)) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("{top} is not a directory ({e})"),
                ));
            }
        };
        let st = rfs::fstat(&fd)?;
        let mut h = header(&st, tar::EntryType::Directory);
        b.append_data(&mut h, top, io::empty())?;
        let mut ex = Exporter {
            b: &mut b,
            top: Path::new(top),
            links: &mut links,
            skipped: &mut skipped,
        };
        tree::walk(&fd, &mut ex)?;
    }
    match tree::read_capped(dir, OsStr::new("meta.json"), META_CAP) {
        Ok(Some(bytes)) => {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o600);
            h.set_size(tree::num(bytes.len()));
            h.set_mtime(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            );
            b.append_data(&mut h, "meta.json", &bytes[..])?;
        }
        Ok(None) => {}
        Err(e) => return Err(io::Error::other(format!("meta.json: {e}"))),
    }
    b.into_inner()?.flush()?;
    Ok(skipped)
}

/// A GNU header carrying a `stat`'s mode, owner and mtime.
fn header(st: &rfs::Stat, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(st.st_mode & 0o7777);
    h.set_uid(tree::num(st.st_uid));
    h.set_gid(tree::num(st.st_gid));
    h.set_mtime(tree::num(st.st_mtime));
    h.set_size(0);
    h
}

struct Exporter<'a, W: Write> {
    b: &'a mut tar::Builder<W>,
    top: &'a Path,
    /// Archive name of the first entry of each hard-linked inode.
    links: &'a mut HashMap<(u64, u64), PathBuf>,
    skipped: &'a mut tree::Skipped,
}

impl<W: Write> Exporter<'_, W> {
    /// Appends a link entry (symbolic or hard) whose target is kept byte for
    /// byte: tar's own link-name setter normalises paths (`a/./b/` would
    /// come back as `a/b`), so short targets go in the header raw and long
    /// ones in a GNU long-link record.
    fn link(&mut self, mut h: tar::Header, name: &Path, target: &[u8]) -> io::Result<()> {
        let field = &mut h.as_old_mut().linkname;
        if target.len() <= field.len() {
            field[..target.len()].copy_from_slice(target);
        } else {
            let mut long = tar::Header::new_gnu();
            let magic = b"././@LongLink";
            long.as_old_mut().name[..magic.len()].copy_from_slice(magic);
            long.set_mode(0o644);
            long.set_size(tree::num(target.len()) + 1);
            long.set_entry_type(tar::EntryType::GNULongLink);
            long.set_cksum();
            self.b.append(&long, target.chain(&[0u8][..]))?;
            let n = field.len();
            field.copy_from_slice(&target[..n]);
        }
        self.b.append_data(&mut h, name, io::empty())
    }
}

impl<W: Write> tree::Visitor for Exporter<'_, W> {
    fn entry(&mut self, e: &tree::Entry<'_>) -> io::Result<bool> {
        let name = self.top.join(e.rel);
        let st = e.stat;
        match tree::kind(st) {
            FileType::Directory => {
                let mut h = header(st, tar::EntryType::Directory);
                self.b.append_data(&mut h, &name, io::empty())?;
                Ok(true)
            }
            FileType::RegularFile => {
                let key = (tree::num(st.st_dev), tree::num(st.st_ino));
                if tree::num(st.st_nlink) > 1 {
                    if let Some(first) = self.links.get(&key) {
                        let first = first.as_os_str().as_bytes().to_vec();
                        self.link(header(st, tar::EntryType::Link), &name, &first)?;
                        return Ok(false);
                    }
                    self.links.insert(key, name.clone());
                }
                let fd = rfs::openat(
                    e.parent,
                    e.name,
                    OFlags::RDONLY
                        | OFlags::NOFOLLOW
                        | OFlags::NONBLOCK
                        | OFlags::CLOEXEC
                        | OFlags::NOCTTY,
                    Mode::empty(),
                )?;
                let now = rfs::fstat(&fd)?;
                if tree::kind(&now) != FileType::RegularFile || now.st_ino != st.st_ino {
                    return Err(io::Error::other(format!(
                        "{} changed during the export",
                        name.display()
                    )));
                }
                let mut f = std::fs::File::from(fd);
                // Holes become GNU sparse entries (SEEK_DATA/SEEK_HOLE).
                self.b.append_file(&name, &mut f)?;
                Ok(false)
            }
            FileType::Symlink => {
                let target = rfs::readlinkat(e.parent, e.name, Vec::new())?;
                self.link(
                    header(st, tar::EntryType::Symlink),
                    &name,
                    target.as_bytes(),
                )?;
                Ok(false)
            }
            FileType::Fifo => {
                let mut h = header(st, tar::EntryType::Fifo);
                self.b.append_data(&mut h, &name, io::empty())?;
                Ok(false)
            }
            other => {
                self.skipped.push(format!(
                    "{}: {} not exported",
                    name.display(),
                    tree::describe(other)
                ));
                Ok(false)
            }
        }
    }
}

// ---------------------------------------------------------------- import

/// What an import brings besides the tree: the archive's `meta.json`.
#[derive(Debug, Default)]
pub struct Imported {
    pub meta: Option<Vec<u8>>,
}

/// A reader that notes whether the archive ran out (EOF) instead of ending
/// with tar's end-of-archive marker, which is how truncation shows.
struct EofWatch<R> {
    inner: R,
    hit_eof: bool,
}

impl<R: Read> Read for EofWatch<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.hit_eof = true;
        }
        Ok(n)
    }
}

/// The plain components of an archive path under a known top-level name.
fn components(raw: &[u8]) -> Result<Vec<&[u8]>, &'static str> {
    if raw.first() == Some(&b'/') {
        return Err("absolute path");
    }
    if raw.contains(&0) {
        return Err("a NUL byte in the name");
    }
    let mut out = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("contains '..'"),
            c => out.push(c),
        }
    }
    match out.first().copied() {
        Some(b"home" | b"work") => {}
        Some(b"meta.json") if out.len() == 1 => {}
        _ => return Err("not under home/, work/ or meta.json"),
    }
    if out.len() > MAX_DEPTH + 2 {
        return Err("deeper than the broker's depth limit");
    }
    Ok(out)
}

/// The directories an import is writing into, as a stack of descriptors
/// matching the current entry's parents. Each is opened from its parent
/// with `O_NOFOLLOW`: an archive's link can never redirect a later write.
/// A directory's own mode and mtime are set when it is left, after its
/// contents.
struct Dirs<'a> {
    root: BorrowedFd<'a>,
    open: Vec<OpenDir>,
    owner: Option<(u32, u32)>,
}

impl<'a> Dirs<'a> {
    fn cur(&self) -> BorrowedFd<'_> {
        self.open.last().map(|f| f.1.as_fd()).unwrap_or(self.root)
    }

    fn pop(&mut self) -> io::Result<()> {
        if let Some((_, fd, meta)) = self.open.pop()
            && let Some((mode, mtime)) = meta
        {
            rfs::fchmod(&fd, tree::safe_mode(mode))?;
            rfs::futimens(&fd, &tree::mtime(mtime))?;
        }
        Ok(())
    }

    fn chown(&self, fd: impl AsFd) -> io::Result<()> {
        tree::chown_to(fd, self.owner)
    }

    /// Makes `comps` the open stack (creating missing directories) and
    /// returns the innermost one.
    fn enter(&mut self, comps: &[&[u8]]) -> Result<BorrowedFd<'_>, EntryError> {
        let keep = self
            .open
            .iter()
            .zip(comps)
            .take_while(|(open, c)| open.0 == **c)
            .count();
        while self.open.len() > keep {
            self.pop()?;
        }
        for c in &comps[keep..] {
            let name = OsStr::from_bytes(c);
            let fd = match tree::open_dir(self.cur(), name) {
                Ok(fd) => fd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    rfs::mkdirat(self.cur(), name, Mode::from_raw_mode(0o700))?;
                    let fd = tree::open_dir(self.cur(), name)?;
                    self.chown(&fd)?;
                    fd
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
                    return Err(EntryError::Refused("a parent is a link or a file"));
                }
                Err(e) => return Err(e.into()),
            };
            self.open.push((c.to_vec(), fd, None));
        }
        Ok(self.cur())
    }

    fn finish(mut self) -> io::Result<()> {
        while !self.open.is_empty() {
            self.pop()?;
        }
        Ok(())
    }
}

/// A directory an import is in: its name, its descriptor, and the mode
/// and mtime to give it when it is left.
type OpenDir = (Vec<u8>, OwnedFd, Option<(u32, u64)>);

/// Why one entry failed: refused (the archive's fault) or an I/O error
/// writing it (the host's: a full disk, a permission).
#[derive(Debug)]
enum EntryError {
    Refused(&'static str),
    Corrupt(io::Error),
    TooLarge,
    Io(io::Error),
}

impl From<io::Error> for EntryError {
    fn from(e: io::Error) -> Self {
        EntryError::Io(e)
    }
}

impl From<Errno> for EntryError {
    fn from(e: Errno) -> Self {
        EntryError::Io(e.into())
    }
}

struct Importer<'a> {
    dirs: Dirs<'a>,
    caps: ImportCaps,
    bytes: u64,
    /// Regular files this import created, for hard links to point at.
    files: HashSet<Vec<u8>>,
    saw_tree: bool,
    meta: Option<Vec<u8>>,
    /// File data passes through this buffer (one for the whole import).
    buf: Vec<u8>,
}

/// Extracts a session archive into the empty directory `dest`, giving
/// every entry to `owner`. On error `dest` may hold a partial tree: the
/// caller removes it.
pub fn import(
    r: impl Read,
    dest: &OwnedFd,
    caps: ImportCaps,
    owner: Option<(u32, u32)>,
) -> Result<Imported, ImportError> {
    let mut archive = tar::Archive::new(EofWatch {
        inner: r,
        hit_eof: false,
    });
    let mut im = Importer {
        dirs: Dirs {
            root: dest.as_fd(),
            open: Vec::new(),
            owner,
        },
        caps,
        bytes: 0,
        files: HashSet::new(),
        saw_tree: false,
        meta: None,
        buf: Vec::new(),
    };
    let mut count = 0u64;
    for entry in archive.entries().map_err(ImportError::Corrupt)? {
        let mut entry = entry.map_err(ImportError::Corrupt)?;
        count += 1;
        if count > caps.max_entries {
            return Err(ImportError::TooManyEntries {
                cap: caps.max_entries,
            });
        }
        let raw = entry.path_bytes().into_owned();
        let shown = || String::from_utf8_lossy(&raw).into_owned();
        im.entry(&raw, &mut entry).map_err(|e| match e {
            EntryError::Refused(why) => ImportError::Refused { path: shown(), why },
            EntryError::Corrupt(e) => ImportError::Corrupt(e),
            EntryError::TooLarge => ImportError::TooLarge {
                cap: caps.max_bytes,
            },
            EntryError::Io(source) => ImportError::Io {
                path: shown(),
                source,
            },
        })?;
    }
    im.dirs.finish().map_err(|source| ImportError::Io {
        path: "(directory metadata)".into(),
        source,
    })?;
    if !im.saw_tree {
        return Err(ImportError::NotASession);
    }
    if archive.into_inner().hit_eof {
        return Err(ImportError::Truncated);
    }
    Ok(Imported { meta: im.meta })
}

impl Importer<'_> {
    fn entry<R: Read>(
        &mut self,
        raw: &[u8],
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<(), EntryError> {
        let comps = components(raw).map_err(EntryError::Refused)?;
        let kind = entry.header().entry_type();
        let mode = entry.header().mode().unwrap_or(0o644);
        let mtime = entry.header().mtime().unwrap_or(0);
        if comps == [b"meta.json"] {
            if !kind.is_file() {
                return Err(EntryError::Refused("meta.json must be a regular file"));
            }
            if entry.size() > META_CAP {
                return Err(EntryError::Refused("meta.json is over its 64 KiB cap"));
            }
            let mut buf = Vec::new();
            entry
                .take(META_CAP + 1)
                .read_to_end(&mut buf)
                .map_err(EntryError::Corrupt)?;
            self.meta = Some(buf);
            return Ok(());
        }
        self.saw_tree = true;
        let Some((last, parents)) = comps.split_last() else {
            return Err(EntryError::Refused("empty path"));
        };
        if parents.is_empty() && !kind.is_dir() {
            return Err(EntryError::Refused("home and work must be directories"));
        }
        if kind.is_dir() {
            // Create it (or find it: a directory may be listed twice), then
            // leave it open with its metadata due when it is left.
            let parent = self.dirs.enter(parents)?;
            let name = OsStr::from_bytes(last);
            match rfs::mkdirat(parent, name, Mode::from_raw_mode(0o700)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(e.into()),
            }
            self.dirs.enter(&comps)?;
            if let Some(top) = self.dirs.open.last() {
                self.dirs.chown(&top.1)?;
            }
            if let Some(top) = self.dirs.open.last_mut() {
                top.2 = Some((mode, mtime));
            }
            return Ok(());
        }
        let owner = self.dirs.owner;
        let parent = self.dirs.enter(parents)?;
        let name = OsStr::from_bytes(last);
        let exists = |e: Errno| match e {
            Errno::EXIST => EntryError::Refused("duplicate entry"),
            e => EntryError::Io(e.into()),
        };
        let chown_at = |parent: BorrowedFd<'_>| -> Result<(), EntryError> {
            if let Some((uid, gid)) = owner {
                rfs::chownat(
                    parent,
                    name,
                    Some(rfs::Uid::from_raw(uid)),
                    Some(rfs::Gid::from_raw(gid)),
                    AtFlags::SYMLINK_NOFOLLOW,
                )?;
            }
            Ok(())
        };
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let fd = rfs::openat(
                    parent,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(exists)?;
                let size = entry.size();
                let budget = self.caps.max_bytes.saturating_sub(self.bytes);
                let written = write_sparse(entry, &fd, size, budget, &mut self.buf)?;
                self.bytes = self.bytes.saturating_add(written);
                if let Some((uid, gid)) = owner {
                    rfs::fchown(
                        &fd,
                        Some(rfs::Uid::from_raw(uid)),
                        Some(rfs::Gid::from_raw(gid)),
                    )?;
                }
                rfs::fchmod(&fd, tree::safe_mode(mode))?;
                rfs::futimens(&fd, &tree::mtime(mtime))?;
                self.files.insert(comps.join(&b'/'));
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or(EntryError::Refused("symlink without a target"))?
                    .into_owned();
                if target.is_empty() || target.contains(&0) {
                    return Err(EntryError::Refused("symlink target empty or with a NUL"));
                }
                // Any target is fine: links are the agent's data, and the
                // host never follows one.
                rfs::symlinkat(OsStr::from_bytes(&target), parent, name).map_err(exists)?;
                chown_at(parent)?;
                rfs::utimensat(parent, name, &tree::mtime(mtime), AtFlags::SYMLINK_NOFOLLOW)?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or(EntryError::Refused("hard link without a target"))?
                    .into_owned();
                let tcomps = components(&target).map_err(EntryError::Refused)?;
                let key = tcomps.join(&b'/');
                if !self.files.contains(&key) {
                    return Err(EntryError::Refused(
                        "hard link to something that is not an earlier file of this archive",
                    ));
                }
                let tpath: PathBuf = tcomps.iter().map(|c| OsStr::from_bytes(c)).collect();
                let root = self.dirs.root;
                let parent = self.dirs.enter(parents)?;
                tree::link_beneath(root, &tpath, parent, name).map_err(|e| {
                    if e.raw_os_error() == Some(libc::EEXIST) {
                        EntryError::Refused("duplicate entry")
                    } else {
                        EntryError::Io(e)
                    }
                })?;
            }
            tar::EntryType::Fifo => {
                rfs::mkfifoat(parent, name, tree::safe_mode(mode & 0o777)).map_err(exists)?;
                chown_at(parent)?;
                rfs::utimensat(parent, name, &tree::mtime(mtime), AtFlags::SYMLINK_NOFOLLOW)?;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                return Err(EntryError::Refused("device entries are not accepted"));
            }
            _ => return Err(EntryError::Refused("unknown entry type")),
        }
        Ok(())
    }
}

/// Writes an entry's `size` bytes to `fd` through `buf`, leaving every
/// all-zero 4 KiB block as a hole (holes of a sparse entry read as zeros);
/// each run of data blocks is one write. Returns the bytes written; more
/// than `budget` is [`EntryError::TooLarge`].
static ZEROS: [u8; 4096] = [0; 4096];

/// Size of the buffer an import copies file data through.
const COPY_BUF: usize = 1 << 20;

fn write_sparse(
    r: &mut impl Read,
    fd: &OwnedFd,
    size: u64,
    budget: u64,
    buf: &mut Vec<u8>,
) -> Result<u64, EntryError> {
    const BLOCK: usize = 4096;
    if buf.len() < COPY_BUF {
        buf.resize(COPY_BUF, 0);
    }
    let (mut off, mut written) = (0u64, 0u64);
    while off < size {
        let want = usize::try_from(size - off)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let mut got = 0;
        while got < want {
            match r.read(&mut buf[got..want]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(EntryError::Corrupt(e)),
            }
        }
        if got < want {
            return Err(EntryError::Corrupt(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "entry shorter than its header",
            )));
        }
        let data = &buf[..got];
        let mut at = 0;
        while at < data.len() {
            // A slice compare is a memcmp: holes of gigabytes are skipped
            // at memory speed.
            let is_zero = |i: usize| {
                let block = &data[i..(i + BLOCK).min(data.len())];
                block == &ZEROS[..block.len()]
            };
            if is_zero(at) {
                at = (at + BLOCK).min(data.len());
                continue;
            }
            let mut end = (at + BLOCK).min(data.len());
            while end < data.len() && !is_zero(end) {
                end = (end + BLOCK).min(data.len());
            }
            written += tree::num(end - at);
            if written > budget {
                return Err(EntryError::TooLarge);
            }
            let mut done = at;
            while done < end {
                done += rustix::io::pwrite(fd, &data[done..end], off + tree::num(done))?;
            }
            at = end;
        }
        off += tree::num(got);
    }
    rfs::ftruncate(fd, size)?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPS: ImportCaps = ImportCaps {
        max_bytes: 1 << 20,
        max_entries: 100,
    };

    fn tar_with(f: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        f(&mut b);
        b.into_inner().expect("tar")
    }

    fn raw_header(path: &str, kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_entry_type(kind);
        // set_path refuses '..' and absolute paths: write the name raw.
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        h
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
        let mut h = raw_header(path, tar::EntryType::Regular, data.len() as u64);
        h.set_cksum();
        b.append(&h, data).expect("append");
    }

    fn dir(b: &mut tar::Builder<Vec<u8>>, path: &str) {
        let mut h = raw_header(path, tar::EntryType::Directory, 0);
        h.set_mode(0o755);
        h.set_cksum();
        b.append(&h, &[][..]).expect("append");
    }

    fn link(b: &mut tar::Builder<Vec<u8>>, path: &str, target: &str, kind: tar::EntryType) {
        let mut h = raw_header(path, kind, 0);
        let t = &mut h.as_old_mut().linkname;
        t[..target.len()].copy_from_slice(target.as_bytes());
        h.set_cksum();
        b.append(&h, &[][..]).expect("append");
    }

    fn open(p: &Path) -> OwnedFd {
        tree::open_dir_path(p).expect("open")
    }

    fn import_into(archive: &[u8]) -> (tempfile::TempDir, Result<Imported, ImportError>) {
        let dst = tempfile::tempdir().expect("tempdir");
        let r = import(archive, &open(dst.path()), CAPS, None);
        (dst, r)
    }

    #[test]
    fn round_trip_keeps_files_links_and_meta() {
        let src = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(src.path().join("home/.claude")).expect("mkdir");
        std::fs::create_dir(src.path().join("work")).expect("mkdir");
        std::fs::write(src.path().join("home/.claude/history"), "turn 1").expect("write");
        std::fs::write(src.path().join("meta.json"), "{}").expect("write");
        std::os::unix::fs::symlink(".claude/history", src.path().join("home/h")).expect("link");
        std::os::unix::fs::symlink("/usr/bin/python3", src.path().join("work/py")).expect("link");
        std::os::unix::fs::symlink("a/./b/", src.path().join("work/odd")).expect("link");
        let mut buf = Vec::new();
        export(open(src.path()), &mut buf).expect("export");
        let (dst, r) = import_into(&buf);
        let imported = r.expect("import");
        assert_eq!(imported.meta.as_deref(), Some(&b"{}"[..]));
        assert_eq!(
            std::fs::read_to_string(dst.path().join("home/h")).expect("via link"),
            "turn 1"
        );
        assert_eq!(
            std::fs::read_link(dst.path().join("work/py")).expect("link"),
            PathBuf::from("/usr/bin/python3")
        );
        assert_eq!(
            std::fs::read_link(dst.path().join("work/odd")).expect("link"),
            PathBuf::from("a/./b/"),
            "link targets are kept byte for byte"
        );
        assert!(
            !dst.path().join("meta.json").exists(),
            "meta is returned, not written"
        );
    }

    #[test]
    fn hostile_archives_are_refused() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (tar_with(|b| file(b, "home/../../escape", b"x")), "'..'"),
            (tar_with(|b| file(b, "/etc/evil", b"x")), "absolute"),
            (tar_with(|b| file(b, "elsewhere/x", b"x")), "not under"),
            (
                tar_with(|b| {
                    link(b, "home/etc", "/etc", tar::EntryType::Symlink);
                    file(b, "home/etc/passwd", b"x");
                }),
                "a parent is a link",
            ),
            (
                tar_with(|b| link(b, "home", "../../other/home", tar::EntryType::Symlink)),
                "must be directories",
            ),
            (
                tar_with(|b| link(b, "meta.json", "/etc/shadow", tar::EntryType::Symlink)),
                "meta.json must be a regular file",
            ),
            (
                tar_with(|b| link(b, "home/hard", "/etc/passwd", tar::EntryType::Link)),
                "absolute",
            ),
            (
                tar_with(|b| link(b, "home/hard", "home/none", tar::EntryType::Link)),
                "not an earlier file",
            ),
            (
                tar_with(|b| {
                    let mut h = raw_header("home/null", tar::EntryType::Char, 0);
                    h.set_cksum();
                    b.append(&h, &[][..]).expect("append");
                }),
                "device",
            ),
            (
                tar_with(|b| {
                    file(b, "home/f", b"x");
                    file(b, "home/f", b"y");
                }),
                "duplicate",
            ),
        ];
        for (archive, want) in cases {
            let (_d, r) = import_into(&archive);
            let err = r.expect_err(want);
            assert!(err.to_string().contains(want), "{want}: {err}");
            assert!(!Path::new("/etc/evil").exists());
        }
    }

    #[test]
    fn chained_links_cannot_carry_a_write_out() {
        // work/d/a -> .., work/d/b -> a/.. : on paper each stays inside; on
        // the real tree a write through them would leave. Links are data
        // here: creating them is fine, writing through them is refused.
        let archive = tar_with(|b| {
            dir(b, "work");
            dir(b, "work/d");
            link(b, "work/d/a", "..", tar::EntryType::Symlink);
            link(b, "work/d/b", "a/..", tar::EntryType::Symlink);
            link(b, "work/d/c", "b/../..", tar::EntryType::Symlink);
            file(b, "work/d/c/escaped", b"x");
        });
        let (d, r) = import_into(&archive);
        let err = r.expect_err("through a link");
        assert!(err.to_string().contains("a parent is a link"), "{err}");
        assert!(!d.path().join("escaped").exists());
        assert!(!d.path().parent().expect("parent").join("escaped").exists());
    }

    #[test]
    fn empty_zero_and_truncated_archives_are_refused() {
        let (_d, r) = import_into(&[]);
        assert!(matches!(r, Err(ImportError::NotASession)), "{r:?}");
        let (_d, r) = import_into(&[0u8; 10240]);
        assert!(matches!(r, Err(ImportError::NotASession)), "{r:?}");
        let ok = tar_with(|b| {
            dir(b, "home");
            file(b, "home/f", &[7u8; 4096]);
            file(b, "home/g", &[7u8; 4096]);
        });
        // Cut inside an entry, and cut at an entry boundary.
        let (_d, r) = import_into(&ok[..1024]);
        assert!(matches!(r, Err(ImportError::Corrupt(_))), "{r:?}");
        let (_d, r) = import_into(&ok[..512 * 10]);
        assert!(matches!(r, Err(ImportError::Truncated)), "{r:?}");
        let (_d, r) = import_into(&ok);
        r.expect("whole archive");
    }

    #[test]
    fn caps_are_refused() {
        let big = tar_with(|b| file(b, "home/big", &vec![1u8; 2 << 20]));
        let (_d, r) = import_into(&big);
        assert!(matches!(r, Err(ImportError::TooLarge { .. })), "{r:?}");
        // Zeros are holes: they cost nothing and pass the cap.
        let zeros = tar_with(|b| file(b, "home/zeros", &vec![0u8; 2 << 20]));
        let (d, r) = import_into(&zeros);
        r.expect("zeros are holes");
        let m = std::fs::metadata(d.path().join("home/zeros")).expect("meta");
        assert_eq!(m.len(), 2 << 20);
        assert_eq!(std::os::unix::fs::MetadataExt::blocks(&m), 0);
        let many = tar_with(|b| {
            for i in 0..101 {
                file(b, &format!("home/f{i}"), b"x");
            }
        });
        let (_d, r) = import_into(&many);
        assert!(
            matches!(r, Err(ImportError::TooManyEntries { .. })),
            "{r:?}"
        );
    }

    #[test]
    fn a_write_that_fails_keeps_its_cause() {
        // A name over NAME_MAX: the kernel refuses the create, and the
        // error says why (not "duplicate entry").
        let long = format!("home/{}", "n".repeat(300));
        let archive = tar_with(|b| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_size(1);
            b.append_data(&mut h, &long, &b"x"[..]).expect("append");
        });
        let (_d, r) = import_into(&archive);
        let err = r.expect_err("name too long");
        assert!(matches!(err, ImportError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("cannot write"), "{err}");
        let cause = std::error::Error::source(&err)
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(cause.contains("too long"), "{cause}");
    }

    #[test]
    fn setuid_bits_are_dropped() {
        let archive = tar_with(|b| {
            let mut h = raw_header("home/suid", tar::EntryType::Regular, 1);
            h.set_mode(0o4755);
            h.set_cksum();
            b.append(&h, &b"x"[..]).expect("append");
        });
        let (d, r) = import_into(&archive);
        r.expect("import");
        let m = std::fs::metadata(d.path().join("home/suid")).expect("meta");
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777,
            0o755
        );
    }

    /// Everything the round trip must keep, per path, read by descriptor.
    fn snapshot(root: &Path) -> std::collections::BTreeMap<PathBuf, String> {
        struct Snap(std::collections::BTreeMap<PathBuf, String>);
        impl tree::Visitor for Snap {
            fn entry(&mut self, e: &tree::Entry<'_>) -> io::Result<bool> {
                let st = e.stat;
                let k = tree::kind(st);
                let detail = match k {
                    FileType::RegularFile => format!(
                        "size={} blocks~{} nlink={}",
                        st.st_size,
                        // "allocated blocks within a block": 8 sectors.
                        tree::num(st.st_blocks).div_ceil(8),
                        st.st_nlink
                    ),
                    FileType::Symlink => {
                        let t = rfs::readlinkat(e.parent, e.name, Vec::new())?;
                        format!("-> {:?}", t)
                    }
                    FileType::Directory => format!("nlink={}", st.st_nlink),
                    _ => String::new(),
                };
                let mode = if k == FileType::Symlink {
                    0
                } else {
                    st.st_mode & 0o7777
                };
                self.0.insert(
                    e.rel.to_path_buf(),
                    format!(
                        "{} {mode:o} {detail} mtime={}",
                        tree::describe(k),
                        st.st_mtime
                    ),
                );
                Ok(true)
            }
        }
        let mut s = Snap(Default::default());
        tree::walk(open(root), &mut s).expect("walk");
        s.0
    }

    fn round_trip(src: &Path) -> tempfile::TempDir {
        let mut buf = Vec::new();
        export(open(src), &mut buf).expect("export");
        let dst = tempfile::tempdir().expect("tempdir");
        let caps = ImportCaps {
            max_bytes: 1 << 30,
            max_entries: 100_000,
        };
        import(&buf[..], &open(dst.path()), caps, None).expect("import");
        dst
    }

    #[derive(Debug, Clone)]
    enum Op {
        Dir {
            parent: usize,
            name: u8,
        },
        File {
            parent: usize,
            name: u8,
            chunks: Vec<(u32, u16)>,
            len: u32,
        },
        Symlink {
            parent: usize,
            name: u8,
            target: u8,
        },
        HardLink {
            parent: usize,
            name: u8,
            file: usize,
        },
        Fifo {
            parent: usize,
            name: u8,
        },
    }

    const TARGETS: &[&str] = &[
        "/usr/bin/python3",
        "/etc/passwd",
        "..",
        "../..",
        "a/..",
        "b/../..",
        "n3",
        "n1/n2/../../..",
        "./n0/",
        "/",
    ];

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        let p = any::<usize>();
        let n = 0u8..6;
        prop_oneof![
            (p, n.clone()).prop_map(|(parent, name)| Op::Dir { parent, name }),
            (
                p,
                n.clone(),
                proptest::collection::vec((0u32..(8 << 20), 1u16..20000), 0..4),
                0u32..(16 << 20)
            )
                .prop_map(|(parent, name, chunks, len)| Op::File {
                    parent,
                    name,
                    chunks,
                    len
                }),
            (p, n.clone(), 0u8..(TARGETS.len() as u8)).prop_map(|(parent, name, target)| {
                Op::Symlink {
                    parent,
                    name,
                    target,
                }
            }),
            (p, n.clone(), any::<usize>()).prop_map(|(parent, name, file)| Op::HardLink {
                parent,
                name,
                file
            }),
            (p, n).prop_map(|(parent, name)| Op::Fifo { parent, name }),
        ]
    }

    /// Builds a tree from `ops` under `root/home` and `root/work`.
    fn build(root: &Path, ops: &[Op]) {
        use std::os::unix::fs::FileExt;
        let mut dirs = vec![root.join("home"), root.join("work")];
        for d in &dirs {
            std::fs::create_dir(d).expect("mkdir");
        }
        let mut files: Vec<PathBuf> = Vec::new();
        let mut seed = 1u8;
        for op in ops {
            let (parent, name) = match op {
                Op::Dir { parent, name }
                | Op::File { parent, name, .. }
                | Op::Symlink { parent, name, .. }
                | Op::HardLink { parent, name, .. }
                | Op::Fifo { parent, name } => (dirs[parent % dirs.len()].clone(), name),
            };
            let path = parent.join(format!("n{name}"));
            if std::fs::symlink_metadata(&path).is_ok() {
                continue;
            }
            match op {
                Op::Dir { .. } => {
                    std::fs::create_dir(&path).expect("mkdir");
                    dirs.push(path);
                }
                Op::File { chunks, len, .. } => {
                    let f = std::fs::File::create(&path).expect("create");
                    for (off, n) in chunks {
                        seed = seed.wrapping_add(1).max(1);
                        // Never zero bytes: an all-zero block is a hole on import.
                        let data: Vec<u8> = (0..*n)
                            .map(|i| ((i as u8).wrapping_mul(7) | 1) ^ seed)
                            .map(|b| b.max(1))
                            .collect();
                        f.write_at(&data, u64::from(*off)).expect("write");
                    }
                    let size = f.metadata().expect("meta").len();
                    f.set_len(size.max(u64::from(*len))).expect("len");
                    files.push(path);
                }
                Op::Symlink { target, .. } => {
                    std::os::unix::fs::symlink(TARGETS[*target as usize], &path).expect("symlink")
                }
                Op::HardLink { file, .. } => {
                    if !files.is_empty() {
                        std::fs::hard_link(&files[file % files.len()], &path).expect("link");
                    }
                }
                Op::Fifo { .. } => {
                    nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o640))
                        .expect("fifo")
                }
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 24,
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// Any tree an agent can build comes back exactly: type, link
        /// target, link count, size, allocated blocks, mode, mtime.
        #[test]
        fn export_import_reproduces_random_trees(ops in proptest::collection::vec(op(), 0..40)) {
            let src = tempfile::tempdir().expect("tempdir");
            build(src.path(), &ops);
            let dst = round_trip(src.path());
            proptest::prop_assert_eq!(snapshot(src.path()), snapshot(dst.path()));
            // A fork (copy) keeps the same.
            let copy = tempfile::tempdir().expect("tempdir");
            tree::copy(open(src.path()), &open(copy.path()), &["home", "work"]).expect("copy");
            proptest::prop_assert_eq!(snapshot(src.path()), snapshot(copy.path()));
        }
    }

    #[test]
    fn paths_deeper_than_path_max_round_trip() {
        let src = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(src.path().join("home")).expect("mkdir");
        std::fs::create_dir_all(src.path().join("work")).expect("mkdir");
        // 1200 levels of 4-byte names: 6000 bytes, over PATH_MAX (4096).
        let mut cur = open(&src.path().join("work"));
        for _ in 0..1200 {
            rfs::mkdirat(&cur, "dddd", Mode::from_raw_mode(0o755)).expect("mkdirat");
            cur = tree::open_dir(&cur, OsStr::new("dddd")).expect("open");
        }
        let fd = rfs::openat(
            &cur,
            "deep",
            OFlags::WRONLY | OFlags::CREATE,
            Mode::from_raw_mode(0o644),
        )
        .expect("create");
        rustix::io::write(&fd, b"bottom").expect("write");
        rfs::symlinkat("../../..", &cur, "up").expect("symlink");
        let dst = round_trip(src.path());
        assert_eq!(snapshot(src.path()), snapshot(dst.path()));
        let copy = tempfile::tempdir().expect("tempdir");
        tree::copy(open(src.path()), &open(copy.path()), &["home", "work"]).expect("copy");
        assert_eq!(snapshot(src.path()), snapshot(copy.path()));
        assert_eq!(
            tree::usage(open(dst.path())).expect("usage").inodes,
            1200 + 5
        );
    }

    #[test]
    fn sockets_are_skipped_with_a_notice() {
        let src = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(src.path().join("home")).expect("mkdir");
        let _l = std::os::unix::net::UnixListener::bind(src.path().join("home/agent.sock"))
            .expect("bind");
        let mut buf = Vec::new();
        let skipped = export(open(src.path()), &mut buf).expect("export");
        assert_eq!(
            skipped,
            vec!["home/agent.sock: socket not exported".to_string()]
        );
        let (d, r) = import_into(&buf);
        r.expect("import");
        assert!(d.path().join("home").is_dir());
    }

    #[test]
    fn sparse_and_hard_linked_data_cost_their_real_size() {
        let src = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(src.path().join("home")).expect("mkdir");
        let big = src.path().join("home/sparse");
        let f = std::fs::File::create(&big).expect("create");
        f.set_len(7 << 30).expect("len");
        std::os::unix::fs::FileExt::write_at(&f, b"tail", (7 << 30) - 4).expect("write");
        std::fs::write(src.path().join("home/data"), vec![3u8; 1 << 20]).expect("write");
        for i in 0..100 {
            std::fs::hard_link(
                src.path().join("home/data"),
                src.path().join(format!("home/l{i}")),
            )
            .expect("link");
        }
        let mut buf = Vec::new();
        export(open(src.path()), &mut buf).expect("export");
        assert!(buf.len() < 2 << 20, "archive is {} bytes", buf.len());
        let (d, r) = import_into_caps(&buf, 1 << 30);
        r.expect("import");
        let used = tree::usage(open(d.path())).expect("usage");
        assert!(used.bytes < 2 << 20, "{used:?}");
        assert_eq!(snapshot(src.path()), snapshot(d.path()));
    }

    fn import_into_caps(
        archive: &[u8],
        max_bytes: u64,
    ) -> (tempfile::TempDir, Result<Imported, ImportError>) {
        let dst = tempfile::tempdir().expect("tempdir");
        let caps = ImportCaps {
            max_bytes,
            max_entries: 1000,
        };
        let r = import(archive, &open(dst.path()), caps, None);
        (dst, r)
    }

    const HOSTILE_PATHS: &[&str] = &[
        "home",
        "work",
        "meta.json",
        "home/a",
        "home/a/b",
        "home/l",
        "home/l/x",
        "work/d",
        "work/d/a",
        "work/d/b",
        "work/d/a/x",
        "work/d/b/x",
        "work/d/c/x",
        "home/../x",
        "/abs",
        "../up",
        "./home/c",
        "home//d",
        "work/d/b/../../x",
        "sentinel/x",
        "home/a/../../../sentinel/pwn",
        "home/a/b/c/d/e",
    ];
    const HOSTILE_LINKS: &[&str] = &[
        "..",
        "../..",
        "a/..",
        "/",
        "../../sentinel",
        "../../../sentinel/file",
        "/tmp",
        "home/a",
        "work/d",
        "b/../../..",
        "c/../../..",
        "sentinel/file",
        "home/a/b",
    ];
    const HOSTILE_KINDS: &[tar::EntryType] = &[
        tar::EntryType::Regular,
        tar::EntryType::Directory,
        tar::EntryType::Symlink,
        tar::EntryType::Link,
        tar::EntryType::Fifo,
        tar::EntryType::Char,
    ];

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 256,
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// Random hostile archives: whether refused or imported, nothing
        /// outside the destination is created, changed or linked to.
        #[test]
        fn hostile_archives_never_touch_anything_outside(
            entries in proptest::collection::vec(
                (0..HOSTILE_PATHS.len(), 0..HOSTILE_KINDS.len(), 0..HOSTILE_LINKS.len()),
                1..12,
            )
        ) {
            let tmp = tempfile::tempdir().expect("tempdir");
            let dest = tmp.path().join("dest");
            let sentinel = tmp.path().join("sentinel");
            std::fs::create_dir(&dest).expect("mkdir");
            std::fs::create_dir(&sentinel).expect("mkdir");
            std::fs::write(sentinel.join("file"), b"sentinel").expect("write");
            let before = snapshot(tmp.path());
            let archive = tar_with(|b| {
                for (p, k, l) in &entries {
                    let kind = HOSTILE_KINDS[*k];
                    let mut h = raw_header(HOSTILE_PATHS[*p], kind, 0);
                    if matches!(kind, tar::EntryType::Symlink | tar::EntryType::Link) {
                        let t = HOSTILE_LINKS[*l].as_bytes();
                        h.as_old_mut().linkname[..t.len()].copy_from_slice(t);
                    }
                    let data: &[u8] = if kind == tar::EntryType::Regular { b"pwn" } else { b"" };
                    h.set_size(data.len() as u64);
                    h.set_cksum();
                    b.append(&h, data).expect("append");
                }
            });
            let _ = import(&archive[..], &open(&dest), CAPS, None);
            let after = snapshot(tmp.path());
            let outside = |m: &std::collections::BTreeMap<PathBuf, String>| {
                m.iter()
                    .filter(|(p, _)| !p.starts_with("dest"))
                    .map(|(p, v)| (p.clone(), v.clone()))
                    .collect::<Vec<_>>()
            };
            proptest::prop_assert_eq!(outside(&before), outside(&after));
            proptest::prop_assert_eq!(
                std::fs::read(sentinel.join("file")).expect("sentinel"),
                b"sentinel".to_vec()
            );
        }
    }
}
