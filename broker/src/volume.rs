//! Session disk images: the disk-limit backend that binds in the kernel.
//!
//! A session on this backend keeps its home and work on a filesystem of its
//! own: an ext4 image file, `disk.img` in its session dir, mounted through
//! a loop device at the session dir's `.vol` (`nosuid,nodev,discard`), whose
//! `home` and `work` are bind-mounted onto the session's `home` and `work`.
//! Every path and every descriptor walk of the session is thus what it is
//! on plain directories; only the filesystem under them is the session's
//! own, so a full session is `ENOSPC` for its agent and for nobody else.
//!
//! The image is made by the broker (`mkfs.ext4` on a new sparse file) and
//! only ever filled through the kernel's filesystem: an agent writes files,
//! never the image's bytes; an import extracts an archive into a new image
//! with the same descriptor rules as a plain import. No image from outside
//! is ever mounted.
//!
//! Size: the image is made so that its free space is the session's byte
//! limit (ext4's own metadata comes on top), with at least the limit's
//! inodes; a later turn with a higher limit grows it online (`resize2fs`).
//! A turn with a lower limit than the image is ended `disk_limit` by the
//! disk watch, which measures an image with one `statvfs`. The image file
//! is sparse and mounted with `discard`: on the host it takes what the
//! session holds, plus ext4's metadata as it is written.
//!
//! Mounts outlive the broker process (a broker that restarts finds them and
//! uses them); a clean stop and a session's deletion unmount them, and the
//! loop device goes with its last mount (autoclear).

use crate::process::own;
use crate::tree::{self, Usage};
use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The image file in a session dir.
pub const IMAGE: &str = "disk.img";
/// Where the image is mounted in a session dir.
pub const VOL: &str = ".vol";
/// What a session's parts are called, in its dir and in its image.
const PARTS: [&str; 2] = ["home", "work"];
/// Inodes of a new ext4 that are not the session's (reserved inodes 1–10
/// and `lost+found`).
const BASE_INODES: u64 = 11;
/// Smallest image made (ext4 wants room for its journal and metadata).
const MIN_IMAGE: u64 = 8 << 20;
/// Largest journal (ext4 picks up to 1 GiB for big filesystems; each
/// image's journal takes host space as it is written).
const JOURNAL_MIB: u64 = 16;
/// Attempts at sizing an image to its limit (each adds what was short).
const SIZE_ROUNDS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed for {path}: {detail}")]
    Tool {
        tool: &'static str,
        path: PathBuf,
        detail: String,
    },
}

fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> VolumeError {
    VolumeError::Io {
        what,
        path: path.into(),
        source,
    }
}

/// The host tools the backend runs (e2fsprogs and util-linux).
#[derive(Debug, Clone)]
pub struct Volumes {
    mkfs: PathBuf,
    resize2fs: PathBuf,
    e2fsck: PathBuf,
    losetup: PathBuf,
    dumpe2fs: PathBuf,
    mount: PathBuf,
    /// Owner of new home and work dirs (the jail's host uid/gid), if any.
    owner: Option<(u32, u32)>,
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

impl Volumes {
    /// The backend, if this host can run it: root (mounting), a loop
    /// control device, and the tools. `Err` says what is missing.
    pub fn probe(owner: Option<(u32, u32)>) -> Result<Volumes, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("not root (mounting an image needs CAP_SYS_ADMIN)".into());
        }
        if !Path::new("/dev/loop-control").exists() {
            return Err("no /dev/loop-control (loop devices)".into());
        }
        let tool = |n: &str| find_tool(n).ok_or_else(|| format!("{n} not found"));
        Ok(Volumes {
            mkfs: tool("mkfs.ext4")?,
            resize2fs: tool("resize2fs")?,
            e2fsck: tool("e2fsck")?,
            losetup: tool("losetup")?,
            dumpe2fs: tool("dumpe2fs")?,
            mount: tool("mount")?,
            owner,
        })
    }

    /// Makes session dir `dir`'s image for `bytes` of data and `inodes`
    /// files (`dir` holds no home, work or image yet) and mounts it.
    ///
    /// ext4's metadata takes part of an image: the image is made, its free
    /// space read, and made again bigger by what was short (cheap: it holds
    /// nothing yet, and it is never mounted before it is right, so no other
    /// mount namespace can hold an old copy of it), so the free space is
    /// the limit.
    pub fn create(
        &self,
        dir: &OwnedFd,
        path: &Path,
        bytes: u64,
        inodes: Option<u64>,
    ) -> Result<(), VolumeError> {
        let image = path.join(IMAGE);
        let f = rustix::fs::openat(
            dir,
            IMAGE,
            rustix::fs::OFlags::WRONLY
                | rustix::fs::OFlags::CREATE
                | rustix::fs::OFlags::EXCL
                | rustix::fs::OFlags::NOFOLLOW
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .map_err(|e| io("cannot create", &image, e.into()))?;
        let mut size = bytes.max(MIN_IMAGE);
        for _ in 0..SIZE_ROUNDS {
            rustix::fs::ftruncate(&f, size).map_err(|e| io("cannot size", &image, e.into()))?;
            self.mkfs(&image, size, inodes)?;
            let free = self.free_after_mkfs(&image)?;
            if free >= bytes {
                break;
            }
            size += bytes - free;
        }
        drop(f);
        self.attach(dir, path)
    }

    /// What a writer will have free on a new image once it is mounted:
    /// its free blocks less the kernel's reserve for delayed allocation
    /// (2 % of the blocks, at most 4096), read from the superblock
    /// (`dumpe2fs -h`) without mounting it.
    fn free_after_mkfs(&self, image: &Path) -> Result<u64, VolumeError> {
        let out = own::output(Command::new(&self.dumpe2fs).arg("-h").arg(image))
            .map_err(|e| io("cannot run", "dumpe2fs", e))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        match (
            field("Block count"),
            field("Free blocks"),
            field("Block size"),
        ) {
            (Some(count), Some(free), Some(size)) => Ok(free
                .saturating_sub((count / 50).min(4096))
                .saturating_mul(size)),
            _ => Err(VolumeError::Tool {
                tool: "dumpe2fs",
                path: image.to_path_buf(),
                detail: format!("no block counts in its output: {}", text.trim()),
            }),
        }
    }

    fn mkfs(&self, image: &Path, size: u64, inodes: Option<u64>) -> Result<(), VolumeError> {
        let mut mkfs = Command::new(&self.mkfs);
        mkfs.args(["-q", "-F", "-t", "ext4", "-m", "0", "-L", "turnstile"])
            // Inode tables and the journal are not written now (nor later
            // by the kernel: `noinit_itable`), so the file stays sparse.
            .args(["-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"]);
        if size >= 256 << 20 {
            mkfs.args(["-J", &format!("size={JOURNAL_MIB}")]);
        }
        if let Some(n) = inodes {
            mkfs.args(["-N", &n.saturating_add(BASE_INODES).to_string()]);
        }
        run(mkfs.arg(image), "mkfs.ext4", image)
    }

    /// Mounts the image at `.vol`, unless it is mounted there already.
    fn mount_vol(&self, dir: &OwnedFd, path: &Path) -> Result<OwnedFd, VolumeError> {
        let vol_path = path.join(VOL);
        mkdir_at(dir, VOL).map_err(|e| io("cannot create", &vol_path, e))?;
        let open =
            || tree::open_dir(dir, OsStr::new(VOL)).map_err(|e| io("cannot open", &vol_path, e));
        let vol = open()?;
        if dev_of(&vol, &vol_path)? != dev_of(dir, path)? {
            return Ok(vol);
        }
        let mut mount = Command::new(&self.mount);
        mount
            .args(["-t", "ext4", "-o"])
            .arg("loop,nosuid,nodev,noatime,discard,noinit_itable,errors=remount-ro")
            .arg(path.join(IMAGE))
            .arg(&vol_path);
        run(&mut mount, "mount", &vol_path)?;
        make_private(&vol_path)?;
        let vol = open()?;
        rustix::fs::fchmod(&vol, rustix::fs::Mode::from_raw_mode(0o700))
            .map_err(|e| io("cannot chmod", &vol_path, e.into()))?;
        Ok(vol)
    }

    /// Mounts session dir `dir`'s image and binds its home and work, where
    /// not mounted yet (a restarted broker finds its mounts in place).
    pub fn attach(&self, dir: &OwnedFd, path: &Path) -> Result<(), VolumeError> {
        let dev = dev_of(dir, path)?;
        // The common case, every turn of a session after its first: both
        // parts are mounted already.
        let mounted = |part: &str| {
            tree::open_dir(dir, OsStr::new(part))
                .ok()
                .and_then(|fd| rustix::fs::fstat(fd).ok())
                .is_some_and(|st| tree::num(st.st_dev) != dev)
        };
        if PARTS.iter().all(|p| mounted(p)) {
            return Ok(());
        }
        let vol_path = path.join(VOL);
        let vol = self.mount_vol(dir, path)?;
        for part in PARTS {
            let inner = part_in(&vol, part, self.owner)
                .map_err(|e| io("cannot open", vol_path.join(part), e))?;
            let target = path.join(part);
            mkdir_at(dir, part).map_err(|e| io("cannot create", &target, e))?;
            let at =
                tree::open_dir(dir, OsStr::new(part)).map_err(|e| io("cannot open", &target, e))?;
            if dev_of(&at, &target)? == dev {
                bind(&inner, &target)?;
            }
        }
        Ok(())
    }

    /// Grows session dir `dir`'s image so that `bytes` fit, if they do not
    /// yet: online where the kernel lets the broker (`CAP_SYS_RESOURCE`),
    /// else offline: unmounted, checked (`e2fsck`), grown (`resize2fs`) and
    /// mounted again. Offline needs the image wholly released: a jail being
    /// set up for another turn copies every mount of the host for a moment,
    /// so the broker waits (boundedly) for the image's loop device to go
    /// before it touches the file. An image still in use after that is left
    /// as it is, and says so: the turn runs with the room it has.
    pub fn grow_to(&self, dir: &OwnedFd, path: &Path, bytes: u64) -> Result<(), VolumeError> {
        let vol = path.join(VOL);
        let st = rustix::fs::statvfs(&vol).map_err(|e| io("cannot statvfs", &vol, e.into()))?;
        // What a writer can reach: what is used plus what is still free.
        let room = st
            .f_blocks
            .saturating_sub(st.f_bfree)
            .saturating_add(st.f_bavail)
            .saturating_mul(st.f_frsize);
        if room >= bytes {
            return Ok(());
        }
        let image = path.join(IMAGE);
        let size = size_of(dir, path)? + (bytes - room);
        set_size(dir, &image, size)?;
        let device = loop_device(&vol);
        let online = device.as_ref().is_some_and(|d| {
            own::output(Command::new(&self.losetup).arg("-c").arg(d))
                .is_ok_and(|o| o.status.success())
                && run(Command::new(&self.resize2fs).arg(d), "resize2fs", d).is_ok()
        });
        if online {
            return Ok(());
        }
        for name in PARTS.iter().chain(&[VOL]) {
            if let Err(e) = unmount(&path.join(name)) {
                tracing::warn!(error = %e, "session image in use: not grown to its new limit");
                return self.attach(dir, path);
            }
        }
        if !released(&image) {
            tracing::warn!(image = %image.display(), "session image still held: not grown");
            return self.attach(dir, path);
        }
        let grown = run(
            Command::new(&self.e2fsck).args(["-f", "-p"]).arg(&image),
            "e2fsck",
            &image,
        )
        .and_then(|()| {
            run(
                Command::new(&self.resize2fs).arg(&image),
                "resize2fs",
                &image,
            )
        });
        // Mounted again whatever happened: the session keeps its data.
        self.attach(dir, path)?;
        grown
    }
}

fn set_size(dir: &OwnedFd, image: &Path, size: u64) -> Result<(), VolumeError> {
    let f = rustix::fs::openat(
        dir,
        IMAGE,
        rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| io("cannot open", image, e.into()))?;
    rustix::fs::ftruncate(&f, size).map_err(|e| io("cannot size", image, e.into()))
}

/// The loop device under the filesystem mounted at `vol`, if it is one.
fn loop_device(vol: &Path) -> Option<PathBuf> {
    let st = rustix::fs::stat(vol).ok()?;
    (rustix::fs::major(st.st_dev) == 7)
        .then(|| PathBuf::from(format!("/dev/loop{}", rustix::fs::minor(st.st_dev))))
}

/// How long [`released`] waits for an image's loop device to go.
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether no loop device is backed by `image` any more, waiting up to
/// [`RELEASE_WAIT`] for the last one to go (autoclear, when the last
/// mount of it anywhere is gone).
fn released(image: &Path) -> bool {
    let deadline = std::time::Instant::now() + RELEASE_WAIT;
    loop {
        let held = std::fs::read_dir("/sys/block")
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                std::fs::read_to_string(e.path().join("loop/backing_file"))
                    .is_ok_and(|b| Path::new(b.trim_end()) == image)
            });
        if !held {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// Detaches every mount below `dir` (not `dir` itself), deepest first:
/// what a broker that did not stop cleanly left mounted (session images,
/// ready spares), so that the dir can be removed. Best effort; for test
/// and benchmark harnesses and tools cleaning up after a broker.
pub fn unmount_all_below(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut below: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|m| m.starts_with(dir) && m != dir)
        .collect();
    below.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for m in below {
        let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Unmounts `target` now (not lazily: `EBUSY` while in use); not mounted
/// is fine.
fn unmount(target: &Path) -> Result<(), VolumeError> {
    use nix::mount::{MntFlags, umount2};
    match umount2(target, MntFlags::UMOUNT_NOFOLLOW) {
        Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(io("cannot unmount", target, e.into())),
    }
}

/// Whether session dir `dir` has an image (a regular file; anything else
/// by that name is an error).
pub fn has_image(dir: impl AsFd, path: &Path) -> Result<bool, VolumeError> {
    match tree::stat_at(dir, OsStr::new(IMAGE)) {
        Ok(st) if tree::kind(&st) == rustix::fs::FileType::RegularFile => Ok(true),
        Ok(_) => Err(io(
            "not a regular file:",
            path.join(IMAGE),
            std::io::Error::from(std::io::ErrorKind::InvalidData),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io("cannot stat", path.join(IMAGE), e)),
    }
}

/// Unmounts a session dir's home, work and image, lazily (a process still
/// inside keeps its view; the loop device goes when the last user does).
/// What is not mounted is skipped.
pub fn detach(path: &Path) {
    use nix::mount::{MntFlags, umount2};
    for name in PARTS.iter().chain(&[VOL]) {
        let target = path.join(name);
        match umount2(&target, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
            Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
            Err(e) => tracing::warn!(path = %target.display(), error = %e, "cannot unmount"),
        }
    }
}

/// Removes what [`Volumes::create`] made in session dir `dir` (after a
/// failure): the mounts, the image, and the empty mount points.
pub fn remove(dir: &OwnedFd, path: &Path) {
    detach(path);
    let _ = rustix::fs::unlinkat(dir, IMAGE, rustix::fs::AtFlags::empty());
    for name in PARTS.iter().chain(&[VOL]) {
        let _ = rustix::fs::unlinkat(dir, *name, rustix::fs::AtFlags::REMOVEDIR);
    }
}

/// The use of a session whose `home` is an image's (one `statvfs`); `None`
/// when `home` is a plain directory.
pub fn usage(session_dir: &Path) -> Option<Usage> {
    image_statvfs(session_dir).map(|st| used(&st))
}

/// The `statvfs` of a session's image, through its `home`; `None` when
/// `home` is a plain directory.
fn image_statvfs(session_dir: &Path) -> Option<rustix::fs::StatVfs> {
    let dir = tree::open_dir_path(session_dir).ok()?;
    let home = tree::open_dir(&dir, OsStr::new("home")).ok()?;
    let (d, h) = (
        rustix::fs::fstat(&dir).ok()?,
        rustix::fs::fstat(&home).ok()?,
    );
    if d.st_dev == h.st_dev {
        return None;
    }
    rustix::fs::fstatvfs(&home).ok()
}

fn used(st: &rustix::fs::StatVfs) -> Usage {
    Usage {
        bytes: st
            .f_blocks
            .saturating_sub(st.f_bfree)
            .saturating_mul(st.f_frsize),
        inodes: st
            .f_files
            .saturating_sub(st.f_ffree)
            .saturating_sub(BASE_INODES),
    }
}

/// The use of a session on an image that has no room left (the kernel
/// refuses its writes): under 1 % of the image (at least 256 KiB) or no
/// inode free. `None` for a session with room, or on plain directories.
pub fn full(session_dir: &Path) -> Option<Usage> {
    let st = image_statvfs(session_dir)?;
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    let total = st.f_blocks.saturating_mul(st.f_frsize);
    (free < (total / 100).max(256 << 10) || st.f_favail == 0).then(|| used(&st))
}

fn size_of(dir: &OwnedFd, path: &Path) -> Result<u64, VolumeError> {
    tree::stat_at(dir, OsStr::new(IMAGE))
        .map(|st| tree::num(st.st_size))
        .map_err(|e| io("cannot stat", path.join(IMAGE), e))
}

fn dev_of(fd: impl AsFd, path: &Path) -> Result<u64, VolumeError> {
    rustix::fs::fstat(fd)
        .map(|st| tree::num(st.st_dev))
        .map_err(|e| io("cannot stat", path, e.into()))
}

/// Opens (making, owned by `owner`) directory `part` of an image's root.
fn part_in(vol: &OwnedFd, part: &str, owner: Option<(u32, u32)>) -> std::io::Result<OwnedFd> {
    match tree::open_dir(vol, OsStr::new(part)) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            mkdir_at(vol, part)?;
            let fd = tree::open_dir(vol, OsStr::new(part))?;
            if let Some((uid, gid)) = owner {
                rustix::fs::fchown(
                    &fd,
                    Some(rustix::fs::Uid::from_raw(uid)),
                    Some(rustix::fs::Gid::from_raw(gid)),
                )?;
            }
            Ok(fd)
        }
        r => r,
    }
}

fn mkdir_at(dir: impl AsFd, name: &str) -> std::io::Result<()> {
    match rustix::fs::mkdirat(dir, name, rustix::fs::Mode::from_raw_mode(0o700)) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Bind-mounts the directory open as `src` (opened by descriptor, never
/// through a link) onto `target`, a directory of the broker's own.
fn bind(src: &OwnedFd, target: &Path) -> Result<(), VolumeError> {
    use nix::mount::{MsFlags, mount};
    let from = PathBuf::from(format!("/proc/self/fd/{}", src.as_raw_fd()));
    mount(
        Some(&from),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| io("cannot bind-mount onto", target, e.into()))?;
    make_private(target)
}

/// Makes the mount at `target` private: its unmount never waits on the
/// copies other mount namespaces (jails being set up) hold for a moment.
fn make_private(target: &Path) -> Result<(), VolumeError> {
    use nix::mount::{MsFlags, mount};
    mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| io("cannot make private", target, e.into()))
}

fn run(cmd: &mut Command, tool: &'static str, path: &Path) -> Result<(), VolumeError> {
    let out = own::output(cmd).map_err(|e| io("cannot run", tool, e))?;
    if out.status.success() {
        return Ok(());
    }
    let detail = String::from_utf8_lossy(&out.stderr).trim().to_string();
    Err(VolumeError::Tool {
        tool,
        path: path.to_path_buf(),
        detail: if detail.is_empty() {
            out.status.to_string()
        } else {
            detail
        },
    })
}

/// Images made ahead, mounted and ready, for new sessions whose first turn
/// asks for the default limit (most do): such a session's dir is one
/// `rename` of a ready one (mounts move with their dir), instead of a
/// `mkfs` and a `mount` on its turn's start path. Ready dirs wait in the
/// sessions dir under hidden names (`.spare-…`; ids never start with a
/// dot); a background thread makes new ones as they are taken.
#[derive(Debug, Clone)]
pub struct Spares {
    inner: std::sync::Arc<SparesInner>,
}

#[derive(Debug)]
struct SparesInner {
    volumes: Volumes,
    root: PathBuf,
    root_fd: OwnedFd,
    bytes: u64,
    inodes: Option<u64>,
    target: usize,
    ready: std::sync::Mutex<Vec<String>>,
    made: std::sync::Condvar,
    refilling: std::sync::atomic::AtomicBool,
    closed: std::sync::atomic::AtomicBool,
}

/// The prefix of ready spare dirs in the sessions dir.
pub const SPARE_PREFIX: &str = ".spare-";

impl Spares {
    /// A pool of `target` images of `bytes` / `inodes` under the sessions
    /// dir `root` (open as `root_fd`); filled in the background from now.
    pub fn new(
        volumes: Volumes,
        root: &Path,
        root_fd: OwnedFd,
        bytes: u64,
        inodes: Option<u64>,
        target: usize,
    ) -> Spares {
        let s = Spares {
            inner: std::sync::Arc::new(SparesInner {
                volumes,
                root: root.to_path_buf(),
                root_fd,
                bytes,
                inodes,
                target,
                ready: Default::default(),
                made: Default::default(),
                refilling: Default::default(),
                closed: Default::default(),
            }),
        };
        s.refill();
        s
    }

    /// The limit the ready images are made for.
    pub fn limit(&self) -> (u64, Option<u64>) {
        (self.inner.bytes, self.inner.inodes)
    }

    /// Moves a ready image's dir into place as session dir `id` (which
    /// must not exist); `false` when none is ready.
    pub fn take(&self, id: &str) -> Result<bool, VolumeError> {
        let name = match self.inner.ready.lock() {
            Ok(mut r) => r.pop(),
            Err(_) => None,
        };
        let Some(name) = name else {
            self.refill();
            return Ok(false);
        };
        let fd = &self.inner.root_fd;
        let moved = rustix::fs::renameat_with(
            fd,
            name.as_str(),
            fd,
            id,
            rustix::fs::RenameFlags::NOREPLACE,
        );
        if moved.is_err()
            && let Ok(mut r) = self.inner.ready.lock()
        {
            r.push(name);
        }
        self.refill();
        moved.map(|()| true).map_err(|e| {
            io(
                "cannot move a ready image to",
                self.inner.root.join(id),
                e.into(),
            )
        })
    }

    /// Waits up to `timeout` for `n` ready images; whether they are.
    pub fn wait_ready(&self, n: usize, timeout: std::time::Duration) -> bool {
        let Ok(r) = self.inner.ready.lock() else {
            return false;
        };
        self.inner
            .made
            .wait_timeout_while(r, timeout, |r| r.len() < n)
            .is_ok_and(|(r, _)| r.len() >= n)
    }

    /// Makes images in the background until `target` are ready.
    fn refill(&self) {
        use std::sync::atomic::Ordering;
        if self.inner.closed.load(Ordering::Acquire)
            || self.inner.refilling.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let inner = self.inner.clone();
        let spawned = std::thread::Builder::new()
            .name("turnstile-spare-images".into())
            .spawn(move || {
                while inner.ready.lock().is_ok_and(|r| r.len() < inner.target)
                    && !inner.closed.load(Ordering::Acquire)
                {
                    match inner.make() {
                        Ok(name) => {
                            // Checked under the lock `close` takes after
                            // setting `closed`: an image made while the pool
                            // closed is unmounted here, not left mounted.
                            let kept = inner.ready.lock().is_ok_and(|mut r| {
                                let open = !inner.closed.load(Ordering::Acquire);
                                if open {
                                    r.push(name.clone());
                                }
                                open
                            });
                            if !kept {
                                let path = inner.root.join(&name);
                                detach(&path);
                                let _ = std::fs::remove_dir_all(&path);
                            }
                            inner.made.notify_all();
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot make a ready session image");
                            break;
                        }
                    }
                }
                inner.refilling.store(false, Ordering::Release);
            });
        if spawned.is_err() {
            self.inner.refilling.store(false, Ordering::Release);
        }
    }

    /// Unmounts and removes the ready images (a clean stop); no more are
    /// made.
    pub fn close(&self) {
        use std::sync::atomic::Ordering;
        self.inner.closed.store(true, Ordering::Release);
        // An image being made is unmounted by its maker once done (it sees
        // `closed`): wait for that (a few hundred ms at most; bounded), so
        // that a broker exiting right after this leaves nothing mounted.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.inner.refilling.load(Ordering::Acquire) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let names = match self.inner.ready.lock() {
            Ok(mut r) => std::mem::take(&mut *r),
            Err(_) => Vec::new(),
        };
        for name in names {
            let path = self.inner.root.join(name);
            detach(&path);
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

impl SparesInner {
    /// Makes one ready image dir; a failure leaves nothing behind.
    fn make(&self) -> Result<String, VolumeError> {
        use rand::Rng;
        let name = format!("{SPARE_PREFIX}{:016x}", rand::rng().random::<u64>());
        let path = self.root.join(&name);
        rustix::fs::mkdirat(
            &self.root_fd,
            name.as_str(),
            rustix::fs::Mode::from_raw_mode(0o711),
        )
        .map_err(|e| io("cannot create", &path, e.into()))?;
        let made = tree::open_dir(&self.root_fd, OsStr::new(&name))
            .map_err(|e| io("cannot open", &path, e))
            .and_then(|dir| self.volumes.create(&dir, &path, self.bytes, self.inodes));
        if let Err(e) = made {
            detach(&path);
            let _ = std::fs::remove_dir_all(&path);
            return Err(e);
        }
        Ok(name)
    }
}
