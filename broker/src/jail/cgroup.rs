//! Per-turn cgroups: the memory and process limits of a turn, the count of
//! OOM kills and failed forks that tells why it ended, and the one place that
//! can kill every process a turn started, whatever it did to escape its
//! process group. The broker owns `<root>/<parent>/<turn_id>` and puts the
//! jail (or the direct-mode shim) there before exec.

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
enum Layout {
    /// cgroup v1: one hierarchy per controller.
    V1 { memory: PathBuf, pids: PathBuf },
    /// cgroup v2: one unified hierarchy.
    V2 { base: PathBuf },
}

/// The broker's cgroup parent, found at start-up.
#[derive(Debug, Clone)]
pub struct Cgroups {
    layout: Layout,
}

/// Limits applied through the cgroup (`None`: unlimited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupLimits {
    pub memory_bytes: Option<u64>,
    pub processes: Option<u64>,
}

/// What the cgroup saw during the turn.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupStats {
    pub oom_kills: u64,
    pub fork_failures: u64,
}

/// One turn's cgroup(s).
#[derive(Debug)]
pub struct TurnCgroup {
    /// v1: the memory then the pids hierarchy's directory; v2: the one.
    dirs: Vec<PathBuf>,
    v2: bool,
    /// The limits the cgroup has now (a new cgroup has none).
    limits: CgroupLimits,
}

fn mounts() -> Vec<(String, String, String)> {
    fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_src, dst, fstype, opts) = (f.next()?, f.next()?, f.next()?, f.next()?);
            Some((dst.to_string(), fstype.to_string(), opts.to_string()))
        })
        .collect()
}

impl Cgroups {
    /// Finds usable memory and pids controllers and creates the broker's
    /// parent cgroup `parent` in them. `Ok(None)` when there are none.
    pub fn detect(parent: &str) -> io::Result<Option<Cgroups>> {
        let mounts = mounts();
        let v1 = |ctrl: &str| {
            mounts
                .iter()
                .find(|(_, t, o)| t == "cgroup" && o.split(',').any(|x| x == ctrl))
                .map(|(d, _, _)| PathBuf::from(d))
        };
        let layout = if let (Some(memory), Some(pids)) = (v1("memory"), v1("pids")) {
            Layout::V1 {
                memory: memory.join(parent),
                pids: pids.join(parent),
            }
        } else if let Some((root, _, _)) = mounts.iter().find(|(_, t, _)| t == "cgroup2") {
            let root = PathBuf::from(root);
            let controllers =
                fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
            if !(has("memory") && has("pids")) {
                return Ok(None);
            }
            // Controllers must be enabled on the way down to the turn cgroups.
            let _ = fs::write(root.join("cgroup.subtree_control"), "+memory +pids");
            Layout::V2 {
                base: root.join(parent),
            }
        } else {
            return Ok(None);
        };
        let cg = Cgroups { layout };
        for dir in cg.parents() {
            match fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        if let Layout::V2 { base } = &cg.layout {
            fs::write(base.join("cgroup.subtree_control"), "+memory +pids")?;
        }
        Ok(Some(cg))
    }

    /// The broker's parent cgroup directories (one per hierarchy).
    pub fn parents(&self) -> Vec<PathBuf> {
        match &self.layout {
            Layout::V1 { memory, pids } => vec![memory.clone(), pids.clone()],
            Layout::V2 { base } => vec![base.clone()],
        }
    }

    /// Removes the broker's parent cgroups (at a clean stop, once every turn
    /// and spare cgroup is gone); returns those that could not be removed.
    pub fn remove_parents(&self) -> Vec<(PathBuf, io::Error)> {
        self.parents()
            .into_iter()
            .filter_map(|d| match fs::remove_dir(&d) {
                Ok(()) => None,
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => Some((d, e)),
            })
            .collect()
    }

    pub fn version(&self) -> u8 {
        match self.layout {
            Layout::V1 { .. } => 1,
            Layout::V2 { .. } => 2,
        }
    }

    /// Creates the turn's cgroup with its limits.
    pub fn create(&self, turn_id: &str, limits: CgroupLimits) -> io::Result<TurnCgroup> {
        let (dirs, v2) = match &self.layout {
            Layout::V1 { memory, pids } => (vec![memory.join(turn_id), pids.join(turn_id)], false),
            Layout::V2 { base } => (vec![base.join(turn_id)], true),
        };
        let mut cg = TurnCgroup {
            dirs,
            v2,
            limits: CgroupLimits::default(),
        };
        for i in 0..cg.dirs.len() {
            if let Err(e) = fs::create_dir(&cg.dirs[i]) {
                let path = cg.dirs[i].display().to_string();
                // The controllers' dirs made so far go too: none is left
                // behind when a later one fails.
                cg.dirs.truncate(i);
                cg.remove_now();
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot create {path}: {e}"),
                ));
            }
        }
        if let Err(e) = cg.set_limits(limits) {
            cg.remove_now();
            return Err(e);
        }
        Ok(cg)
    }

    /// Kills and removes every turn cgroup a previous broker left behind.
    pub fn clean_stale(&self) -> Vec<String> {
        let mut removed = Vec::new();
        for parent in self.parents() {
            let Ok(entries) = fs::read_dir(&parent) else {
                continue;
            };
            for e in entries.flatten() {
                if !e.path().is_dir() {
                    continue;
                }
                kill_dir(&e.path(), self.version() == 2);
                if fs::remove_dir(e.path()).is_ok() {
                    removed.push(e.file_name().to_string_lossy().into_owned());
                }
            }
        }
        removed.sort();
        removed.dedup();
        removed
    }
}

fn read_counter(path: &Path, key: &str) -> u64 {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok()).flatten()
        })
        .unwrap_or(0)
}

fn procs(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// SIGKILLs every process in `dir` until it is empty (bounded).
fn kill_dir(dir: &Path, v2: bool) {
    if v2 && fs::write(dir.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    for _ in 0..1000 {
        let pids = procs(dir);
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            crate::process::kill_pid(pid, nix::sys::signal::Signal::SIGKILL);
        }
        std::thread::yield_now();
    }
}

impl TurnCgroup {
    /// Gives the cgroup exactly `want` (`None`: unlimited), writing only the
    /// limits that differ from what it has: a ready cgroup made with the
    /// broker's default limits costs a turn with those limits no write.
    pub fn set_limits(&mut self, want: CgroupLimits) -> io::Result<()> {
        if want.memory_bytes != self.limits.memory_bytes {
            self.set_memory(self.limits.memory_bytes, want.memory_bytes)?;
            self.limits.memory_bytes = want.memory_bytes;
        }
        if want.processes != self.limits.processes {
            let value = want.processes.map_or("max".to_string(), |n| n.to_string());
            fs::write(self.pids_dir().join("pids.max"), value)?;
            self.limits.processes = want.processes;
        }
        Ok(())
    }

    fn set_memory(&self, old: Option<u64>, new: Option<u64>) -> io::Result<()> {
        if self.v2 {
            let value = new.map_or("max".to_string(), |b| b.to_string());
            fs::write(self.memory_dir().join("memory.max"), value)?;
            // No swap: the limit is the memory the agent really gets.
            let _ = fs::write(self.memory_dir().join("memory.swap.max"), "0");
            return Ok(());
        }
        // v1: memory+swap (memsw, when the kernel accounts swap) must never
        // be below memory alone, so it moves first when the limit rises and
        // second when it falls. -1 is unlimited.
        let value = new.map_or("-1".to_string(), |b| b.to_string());
        let memory = self.memory_dir().join("memory.limit_in_bytes");
        let memsw = self.memory_dir().join("memory.memsw.limit_in_bytes");
        let rising = match (old, new) {
            (_, None) => true,
            (None, Some(_)) => false,
            (Some(o), Some(n)) => n > o,
        };
        if rising {
            let _ = fs::write(&memsw, &value);
            fs::write(&memory, &value)
        } else {
            fs::write(&memory, &value)?;
            let _ = fs::write(&memsw, &value);
            Ok(())
        }
    }

    /// Renames the cgroup (its directory in each hierarchy) to `name`, so a
    /// ready cgroup taken by a turn carries the turn's id. Best effort:
    /// cgroup v2 refuses renames, and then the cgroup keeps its name.
    pub fn rename(&mut self, name: &str) -> bool {
        let renamed: Vec<PathBuf> = self
            .dirs
            .iter()
            .filter_map(|d| Some(d.parent()?.join(name)))
            .collect();
        for (i, (from, to)) in self.dirs.iter().zip(&renamed).enumerate() {
            if fs::rename(from, to).is_err() {
                // Undo the ones already renamed: all or nothing.
                for (f, t) in self.dirs.iter().zip(&renamed).take(i) {
                    let _ = fs::rename(t, f);
                }
                return false;
            }
        }
        self.dirs = renamed;
        true
    }

    /// The cgroup's directories (v1: memory, then pids; v2: one).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Where the memory controller's files are (never empty: see `create`).
    fn memory_dir(&self) -> &Path {
        &self.dirs[0]
    }

    /// Where the pids controller's files are.
    fn pids_dir(&self) -> &Path {
        &self.dirs[self.dirs.len() - 1]
    }

    /// The cgroup's name (its directory's).
    pub fn name(&self) -> String {
        self.pids_dir()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Opens the `cgroup.procs` files for a child to join before exec.
    pub fn procs_files(&self) -> io::Result<Vec<OwnedFd>> {
        self.dirs
            .iter()
            .map(|d| {
                fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("cgroup.procs"))
                    .map(OwnedFd::from)
            })
            .collect()
    }

    pub fn stats(&self) -> CgroupStats {
        let oom = if self.v2 {
            read_counter(&self.memory_dir().join("memory.events"), "oom_kill")
        } else {
            read_counter(&self.memory_dir().join("memory.oom_control"), "oom_kill")
        };
        CgroupStats {
            oom_kills: oom,
            fork_failures: read_counter(&self.pids_dir().join("pids.events"), "max"),
        }
    }

    /// Whether any process is left in the turn.
    pub fn is_empty(&self) -> bool {
        procs(self.pids_dir()).is_empty()
    }

    /// SIGKILLs everything in the turn.
    pub fn kill_all(&self) {
        kill_dir(self.pids_dir(), self.v2);
        if !self.v2 {
            kill_dir(self.memory_dir(), false);
        }
    }

    /// Removes the (empty) cgroup dirs; false if one is still busy.
    pub fn remove_now(&self) -> bool {
        let mut ok = true;
        for d in &self.dirs {
            match fs::remove_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(_) => ok = false,
            }
        }
        ok
    }

    /// Kills what is left and removes the cgroup. Exiting processes can keep
    /// a cgroup busy for a moment after SIGKILL, so removal is retried.
    pub async fn remove(self) -> io::Result<()> {
        for _ in 0..500 {
            self.kill_all();
            if self.remove_now() {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        Err(io::Error::other(format!(
            "cgroup {} still busy",
            self.pids_dir().display()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_parse_by_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("memory.oom_control");
        fs::write(&f, "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n").expect("write");
        assert_eq!(read_counter(&f, "oom_kill"), 3);
        assert_eq!(read_counter(&f, "under_oom"), 0);
        assert_eq!(read_counter(&f, "missing"), 0);
        assert_eq!(read_counter(&dir.path().join("nope"), "oom_kill"), 0);
    }

    #[test]
    fn a_controller_that_cannot_be_created_leaves_nothing_and_names_its_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let memory = dir.path().join("memory");
        fs::create_dir(&memory).expect("mkdir");
        // The pids hierarchy is missing: its turn dir cannot be made.
        let pids = dir.path().join("pids");
        let cgroups = Cgroups {
            layout: Layout::V1 {
                memory: memory.clone(),
                pids: pids.clone(),
            },
        };
        let err = cgroups
            .create("t1", CgroupLimits::default())
            .expect_err("no pids hierarchy");
        assert!(
            err.to_string()
                .contains(&pids.join("t1").display().to_string()),
            "{err}"
        );
        assert!(
            !memory.join("t1").exists(),
            "the memory cgroup is removed too"
        );
    }
}
