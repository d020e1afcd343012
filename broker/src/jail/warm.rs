//! Ready launchers for the next turns.
//!
//! Every turn runs in its own cgroup, and moving a process into a cgroup
//! takes the kernel's cgroup threadgroup lock for writing, which can wait
//! for an RCU grace period: measured here, ~10 ms for the first move after
//! a quiet spell (back-to-back moves are fast, which hides it in a tight
//! benchmark loop but not in production, where turns arrive seconds apart).
//! So the broker keeps `warm_spares` [`Spare`]s: a cgroup and a
//! `turnstile-shim --launcher` already moved into it, made by one thread of
//! their own. A turn takes one, sets its limits, renames the cgroup to the
//! turn id and has the launcher exec nsjail (or the shim); the thread makes
//! the next spare meanwhile. With none ready, a turn makes its cgroup and
//! spawns as before.
//!
//! The thread is the launchers' parent, so their parent-death signal (which
//! the kernel ties to the thread that spawned them) fires when the thread
//! ends: the pool stops only once no turn runs, at shutdown or when the
//! broker is dropped.

use super::cgroup::{CgroupLimits, Cgroups, TurnCgroup};
use super::spawn::Launcher;
use std::collections::VecDeque;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use tracing::{debug, warn};

/// A cgroup and a launcher already inside it, and a turn dir with its
/// `llm.sock` bound (and `tmp/` in direct mode).
#[derive(Debug)]
pub struct Spare {
    pub cgroup: TurnCgroup,
    pub launcher: Launcher,
    /// The turn dir, under its spare name until a turn renames it.
    pub dir: PathBuf,
    pub llm: UnixListener,
}

/// What a spare turn dir needs: where spare dirs wait (on the filesystem of
/// the turn dirs, which they are renamed into), whether the agent gets a tmp
/// dir in it (direct mode), who owns `llm.sock` (nsjail mode as root).
#[derive(Debug, Clone)]
pub struct TurnDirs {
    pub spares: PathBuf,
    pub tmp: bool,
    pub llm_owner: Option<(u32, u32)>,
}

impl Spare {
    /// Kills the launcher and removes the cgroup (in the background when a
    /// runtime is at hand) and the turn dir, if it still has its spare name.
    pub fn discard(self) {
        let cgroup = self.release();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    if let Err(e) = cgroup.remove().await {
                        warn!(error = %e, "cannot remove a spare cgroup");
                    }
                });
            }
            Err(_) => remove_blocking(&cgroup),
        }
    }

    /// Kills the launcher, closes `llm.sock`, removes the turn dir (if it
    /// still has its spare name); the cgroup is left to remove.
    fn release(self) -> TurnCgroup {
        let Spare {
            cgroup,
            launcher,
            dir,
            llm,
        } = self;
        drop((launcher, llm));
        let _ = std::fs::remove_dir_all(&dir);
        cgroup
    }
}

fn remove_blocking(cgroup: &TurnCgroup) {
    for _ in 0..500 {
        cgroup.kill_all();
        if cgroup.remove_now() {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    warn!(cgroup = %cgroup.name(), "cannot remove a spare cgroup: still busy");
}

#[derive(Debug, Default)]
struct State {
    spares: VecDeque<Spare>,
    stopping: bool,
    running: bool,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    size: usize,
    cgroups: Cgroups,
    shim: PathBuf,
    /// The limits spares are made with (those of most turns).
    preset: CgroupLimits,
    dirs: TurnDirs,
    made: AtomicU64,
    /// The number of ready spares, for those who wait for them.
    ready: tokio::sync::watch::Sender<usize>,
}

/// The pool of spares; empty and inert with size 0.
#[derive(Debug)]
pub struct WarmPool {
    shared: Arc<Shared>,
}

impl WarmPool {
    pub fn new(
        cgroups: Cgroups,
        shim: PathBuf,
        size: usize,
        preset: CgroupLimits,
        dirs: TurnDirs,
    ) -> WarmPool {
        WarmPool {
            shared: Arc::new(Shared {
                state: Mutex::default(),
                changed: Condvar::new(),
                size,
                cgroups,
                shim,
                preset,
                dirs,
                made: AtomicU64::new(0),
                ready: tokio::sync::watch::Sender::new(0),
            }),
        }
    }

    /// Starts the thread that keeps the pool full (once; a no-op with size
    /// 0 or after [`WarmPool::stop`]). Needs a tokio runtime: the launchers
    /// are waited for through its reactor.
    pub fn start(&self) {
        if self.shared.size == 0 {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Ok(mut state) = self.shared.state.lock() else {
            return;
        };
        if state.running || state.stopping {
            return;
        }
        let shared = self.shared.clone();
        let started = std::thread::Builder::new()
            .name("turnstile-warm".into())
            .spawn(move || {
                let _rt = rt.enter();
                let filled =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fill(&shared)));
                if filled.is_err() {
                    // The turns started from this thread's launchers die with
                    // it (parent-death signal): after a bug, it stays, idle,
                    // until the pool is stopped.
                    warn!("the spare maker failed; turns spawn without spares from now on");
                    park_until_stopped(&shared);
                }
            });
        state.running = started.is_ok();
    }

    /// A ready spare, if any. The pool is refilled on [`WarmPool::refill`],
    /// which the turn calls once it has started, so that making the next
    /// spare does not compete with this turn's start for the CPU.
    pub fn take(&self) -> Option<Spare> {
        let mut state = self.shared.state.lock().ok()?;
        let spare = state.spares.pop_front();
        self.shared.ready.send_replace(state.spares.len());
        spare
    }

    /// Has the thread top the pool up.
    pub fn refill(&self) {
        self.shared.changed.notify_all();
    }

    /// Waits until at least `n` spares are ready.
    pub async fn wait_ready(&self, n: usize) {
        let mut rx = self.shared.ready.subscribe();
        let _ = rx.wait_for(|ready| *ready >= n).await;
    }

    /// The pids of the ready launchers.
    pub fn launcher_pids(&self) -> Vec<i32> {
        self.shared
            .state
            .lock()
            .map(|s| s.spares.iter().map(|sp| sp.launcher.id()).collect())
            .unwrap_or_default()
    }

    /// Stops the thread; it discards every spare before it ends. Returns
    /// once the thread is gone (it may be finishing one spare).
    pub async fn stop(&self) {
        if let Ok(mut state) = self.shared.state.lock() {
            state.stopping = true;
        }
        self.shared.changed.notify_all();
        let shared = self.shared.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let Ok(mut state) = shared.state.lock() else {
                return;
            };
            while state.running {
                state = match shared.changed.wait(state) {
                    Ok(s) => s,
                    Err(_) => return,
                };
            }
        })
        .await;
    }
}

impl Drop for WarmPool {
    fn drop(&mut self) {
        if let Ok(mut state) = self.shared.state.lock() {
            state.stopping = true;
        }
        self.shared.changed.notify_all();
    }
}

/// The thread: keeps `size` spares ready until told to stop, then discards
/// them.
fn fill(shared: &Shared) {
    let mut failures = 0u32;
    loop {
        {
            let Ok(mut state) = shared.state.lock() else {
                return;
            };
            while !state.stopping && state.spares.len() >= shared.size {
                state = match shared.changed.wait(state) {
                    Ok(s) => s,
                    Err(_) => return,
                };
            }
            if state.stopping {
                break;
            }
        }
        match make(shared) {
            Ok(spare) => {
                failures = 0;
                debug!(cgroup = %spare.cgroup.name(), launcher.pid = spare.launcher.id(), "spare ready");
                match shared.state.lock() {
                    Ok(mut state) if !state.stopping => {
                        state.spares.push_back(spare);
                        shared.ready.send_replace(state.spares.len());
                    }
                    _ => {
                        drop_spare(spare);
                        break;
                    }
                }
            }
            Err(e) => {
                failures += 1;
                if failures == 1 {
                    warn!(error = %e, "cannot make a spare launcher; turns spawn without one");
                }
                // Back off (up to 10 s) instead of spinning on a broken
                // system; a stop request cuts the wait short.
                let wait = Duration::from_millis(100u64 << failures.min(7));
                if let Ok(state) = shared.state.lock() {
                    let _ = shared
                        .changed
                        .wait_timeout_while(state, wait, |s| !s.stopping);
                }
            }
        }
    }
    wind_down(shared);
}

/// Discards the spares left and marks the thread gone.
fn wind_down(shared: &Shared) {
    let spares: Vec<Spare> = match shared.state.lock() {
        Ok(mut state) => state.spares.drain(..).collect(),
        Err(_) => Vec::new(),
    };
    shared.ready.send_replace(0);
    for spare in spares {
        drop_spare(spare);
    }
    if let Ok(mut state) = shared.state.lock() {
        state.running = false;
    }
    shared.changed.notify_all();
}

/// Waits for the stop request, then winds down.
fn park_until_stopped(shared: &Shared) {
    if let Ok(mut state) = shared.state.lock() {
        while !state.stopping {
            state = match shared.changed.wait(state) {
                Ok(s) => s,
                Err(_) => return,
            };
        }
    }
    wind_down(shared);
}

fn drop_spare(spare: Spare) {
    remove_blocking(&spare.release());
}

fn make(shared: &Shared) -> std::io::Result<Spare> {
    let n = shared.made.fetch_add(1, Ordering::Relaxed);
    let name = format!("spare-{}-{n}", std::process::id());
    let dir = shared.dirs.spares.join(&name);
    let cgroup = shared.cgroups.create(&name, shared.preset)?;
    let made = cgroup
        .procs_files()
        .and_then(|procs| Launcher::start(&shared.shim, procs))
        .and_then(|launcher| {
            let llm = turn_dir(&shared.dirs, &dir)?;
            Ok((launcher, llm))
        });
    match made {
        Ok((launcher, llm)) => Ok(Spare {
            cgroup,
            launcher,
            dir,
            llm,
        }),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            remove_blocking(&cgroup);
            Err(e)
        }
    }
}

/// Makes a turn dir as a turn would (0755, `llm.sock` bound, `tmp/` 0700).
fn turn_dir(dirs: &TurnDirs, dir: &std::path::Path) -> std::io::Result<UnixListener> {
    std::fs::DirBuilder::new().mode(0o755).create(dir)?;
    if dirs.tmp {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir.join("tmp"))?;
    }
    crate::llm::bind(&dir.join("llm.sock"), dirs.llm_owner)
}
