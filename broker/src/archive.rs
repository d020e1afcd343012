//! Session archives: export a session (home, work, metadata) as a tar, import
//! one safely, and copy a session tree for a fork. Nothing here follows a
//! link the agent made: exports store links as links, imports refuse any
//! entry that would land outside the new session, and copies recreate links.

use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// The top-level names a session archive may hold.
const TOP: &[&str] = &["home", "work", "meta.json"];

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("archive entry {path:?} refused: {why}")]
    Refused { path: String, why: &'static str },
    #[error("archive is over the {cap}-byte cap")]
    TooLarge { cap: u64 },
    #[error("archive has more than {cap} entries")]
    TooManyEntries { cap: u64 },
    #[error("archive is corrupt or truncated: {0}")]
    Corrupt(#[source] io::Error),
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
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

/// Writes `dir`'s home, work and meta.json as a tar to `w`.
pub fn export(dir: &Path, w: impl Write) -> io::Result<()> {
    let mut b = tar::Builder::new(w);
    b.follow_symlinks(false);
    for name in TOP {
        let p = dir.join(name);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => b.append_dir_all(name, &p)?,
            Ok(m) if m.is_file() => b.append_path_with_name(&p, name)?,
            _ => {}
        }
    }
    b.into_inner()?.flush()
}

/// Lexically resolves `target` (a link's target) against `link_dir`, both
/// relative to the archive root; `None` when it leaves the root.
fn resolve_inside(link_dir: &Path, target: &Path) -> Option<PathBuf> {
    if target.is_absolute() {
        return None;
    }
    let mut parts: Vec<&std::ffi::OsStr> = Vec::new();
    for c in link_dir.components().chain(target.components()) {
        match c {
            Component::Normal(p) => parts.push(p),
            Component::CurDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(parts.iter().collect())
}

/// A relative archive path made only of normal components under a known
/// top-level name.
fn checked_path(raw: &Path) -> Result<PathBuf, &'static str> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => return Err("contains '..'"),
            Component::RootDir | Component::Prefix(_) => return Err("absolute path"),
        }
    }
    let top = out
        .components()
        .next()
        .and_then(|c| c.as_os_str().to_str())
        .unwrap_or("");
    if !TOP.contains(&top) {
        return Err("not under home/, work/ or meta.json");
    }
    Ok(out)
}

/// Every existing ancestor of `rel` below `root` must be a real directory
/// (never a link), so nothing is written through a link.
fn parents_are_dirs(root: &Path, rel: &Path) -> Result<(), &'static str> {
    let mut p = root.to_path_buf();
    let comps: Vec<_> = rel.components().collect();
    for c in comps.iter().take(comps.len().saturating_sub(1)) {
        p.push(c);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err("a parent is a link or a file"),
            Err(_) => {
                std::fs::create_dir(&p).map_err(|_| "cannot create a parent")?;
            }
        }
    }
    Ok(())
}

/// Extracts a session archive into `dest` (which must exist and be empty).
/// On error, `dest` may hold a partial tree: the caller removes it.
pub fn import(r: impl Read, dest: &Path, caps: ImportCaps) -> Result<(), ImportError> {
    let mut archive = tar::Archive::new(r);
    let mut bytes = 0u64;
    let mut count = 0u64;
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ImportError::Io { path, source }
    };
    for entry in archive.entries().map_err(ImportError::Corrupt)? {
        let mut entry = entry.map_err(ImportError::Corrupt)?;
        count += 1;
        if count > caps.max_entries {
            return Err(ImportError::TooManyEntries {
                cap: caps.max_entries,
            });
        }
        let raw = entry.path().map_err(ImportError::Corrupt)?.into_owned();
        let refuse = |why| ImportError::Refused {
            path: raw.to_string_lossy().into_owned(),
            why,
        };
        let rel = checked_path(&raw).map_err(refuse)?;
        parents_are_dirs(dest, &rel).map_err(refuse)?;
        let target = dest.join(&rel);
        let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
        match entry.header().entry_type() {
            tar::EntryType::Directory => match std::fs::symlink_metadata(&target) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(refuse("a directory over an existing link or file")),
                Err(_) => std::fs::create_dir(&target).map_err(io_err(&target))?,
            },
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.header().size().map_err(ImportError::Corrupt)?;
                bytes = bytes.saturating_add(size);
                if bytes > caps.max_bytes {
                    return Err(ImportError::TooLarge {
                        cap: caps.max_bytes,
                    });
                }
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&target)
                    .map_err(|_| refuse("duplicate entry or a name over a link"))?;
                let copied =
                    io::copy(&mut (&mut entry).take(size), &mut f).map_err(ImportError::Corrupt)?;
                if copied != size {
                    return Err(ImportError::Corrupt(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "entry shorter than its header",
                    )));
                }
                f.set_permissions(std::fs::Permissions::from_mode(mode & 0o777))
                    .map_err(io_err(&target))?;
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(ImportError::Corrupt)?
                    .ok_or_else(|| refuse("symlink without a target"))?
                    .into_owned();
                let parent = rel.parent().unwrap_or(Path::new(""));
                match resolve_inside(parent, &link) {
                    Some(resolved) if resolved.components().next().is_some() => {}
                    _ => return Err(refuse("symlink pointing outside the session")),
                }
                std::os::unix::fs::symlink(&link, &target)
                    .map_err(|_| refuse("duplicate entry"))?;
            }
            tar::EntryType::Link => return Err(refuse("hard links are not accepted")),
            _ => return Err(refuse("device, fifo or unknown entry type")),
        }
    }
    Ok(())
}

/// Copies a session tree, recreating links as links and keeping modes and
/// owners; never follows a link.
pub fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(src)?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(src)?, dst)?;
    } else if ft.is_dir() {
        std::fs::create_dir(dst)?;
        for e in std::fs::read_dir(src)? {
            let e = e?;
            copy_tree(&e.path(), &dst.join(e.file_name()))?;
        }
        std::fs::set_permissions(dst, meta.permissions())?;
    } else if ft.is_file() {
        let mut from = std::fs::File::open(src)?;
        let mut to = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dst)?;
        io::copy(&mut from, &mut to)?;
        to.set_permissions(meta.permissions())?;
    } else {
        // Sockets, fifos, devices: not part of a session's state.
        return Ok(());
    }
    std::os::unix::fs::lchown(dst, Some(meta.uid()), Some(meta.gid()))
}

/// Gives every entry under `root` to `uid:gid` (links themselves, not their
/// targets).
pub fn chown_tree(root: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        std::os::unix::fs::lchown(&p, Some(uid), Some(gid))?;
        let m = std::fs::symlink_metadata(&p)?;
        if m.is_dir() {
            for e in std::fs::read_dir(&p)? {
                stack.push(e?.path());
            }
        }
    }
    Ok(())
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

    fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        // set_path refuses '..' and absolute paths: write the name raw.
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        b.append(&h, data).expect("append");
    }

    fn link(b: &mut tar::Builder<Vec<u8>>, path: &str, target: &str, kind: tar::EntryType) {
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_entry_type(kind);
        h.set_path(path).expect("path");
        h.set_link_name(target).expect("target");
        h.set_cksum();
        b.append(&h, &[][..]).expect("append");
    }

    #[test]
    fn round_trip_keeps_files_and_inner_links() {
        let src = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(src.path().join("home/.claude")).expect("mkdir");
        std::fs::create_dir(src.path().join("work")).expect("mkdir");
        std::fs::write(src.path().join("home/.claude/history"), "turn 1").expect("write");
        std::fs::write(src.path().join("meta.json"), "{}").expect("write");
        std::os::unix::fs::symlink(".claude/history", src.path().join("home/h")).expect("link");
        let mut buf = Vec::new();
        export(src.path(), &mut buf).expect("export");
        let dst = tempfile::tempdir().expect("tempdir");
        import(&buf[..], dst.path(), CAPS).expect("import");
        assert_eq!(
            std::fs::read_to_string(dst.path().join("home/h")).expect("via link"),
            "turn 1"
        );
        assert!(dst.path().join("work").is_dir());
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
                "outside the session",
            ),
            (
                tar_with(|b| link(b, "home/up", "../../..", tar::EntryType::Symlink)),
                "outside the session",
            ),
            (
                tar_with(|b| link(b, "home/hard", "/etc/passwd", tar::EntryType::Link)),
                "hard links",
            ),
        ];
        for (archive, want) in cases {
            let dst = tempfile::tempdir().expect("tempdir");
            let err = import(&archive[..], dst.path(), CAPS).expect_err(want);
            assert!(err.to_string().contains(want), "{want}: {err}");
            assert!(!Path::new("/etc/evil").exists());
        }
    }

    #[test]
    fn a_link_then_a_file_through_it_is_refused() {
        let archive = tar_with(|b| {
            link(b, "home/d", "sub", tar::EntryType::Symlink);
            file(b, "home/d/x", b"x");
        });
        let dst = tempfile::tempdir().expect("tempdir");
        let err = import(&archive[..], dst.path(), CAPS).expect_err("through a link");
        assert!(err.to_string().contains("a parent is a link"), "{err}");
    }

    #[test]
    fn caps_and_truncation_are_refused() {
        let big = tar_with(|b| file(b, "home/big", &vec![0u8; 2 << 20]));
        let dst = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            import(&big[..], dst.path(), CAPS),
            Err(ImportError::TooLarge { .. })
        ));
        let many = tar_with(|b| {
            for i in 0..101 {
                file(b, &format!("home/f{i}"), b"x");
            }
        });
        let dst = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            import(&many[..], dst.path(), CAPS),
            Err(ImportError::TooManyEntries { .. })
        ));
        let ok = tar_with(|b| file(b, "home/f", &[7u8; 4096]));
        let dst = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            import(&ok[..1024], dst.path(), CAPS),
            Err(ImportError::Corrupt(_))
        ));
    }

    #[test]
    fn resolve_inside_stays_in_the_root() {
        assert_eq!(
            resolve_inside(Path::new("home/a"), Path::new("../b")),
            Some(PathBuf::from("home/b"))
        );
        assert_eq!(
            resolve_inside(Path::new("home"), Path::new("../../x")),
            None
        );
        assert_eq!(resolve_inside(Path::new("home"), Path::new("/etc")), None);
    }
}
