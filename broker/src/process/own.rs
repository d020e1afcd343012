//! The broker's own children, told apart from the orphans it adopts.
//!
//! Without cgroups only the process tree ties an agent's processes to its
//! turn, and the shim (a child subreaper) holds every orphan of the agent
//! in that tree while it lives. An agent that kills its shim (in direct
//! mode it runs with the broker's uid) cuts its processes loose: they go to
//! the nearest subreaper above, by default the host's init, and outlive
//! the turn.
//!
//! `turnstile serve` without cgroups therefore makes the broker a child
//! subreaper too ([`adopt_orphans`]): such processes come to the broker
//! instead. Every child the broker spawns is recorded here ([`spawned`],
//! [`output`]) under the lock the sweep takes, so a child of the broker
//! that is not recorded is an adopted orphan of a turn whose shim is gone,
//! and [`sweep`] kills and reaps it (and, round after round, what it had
//! started, which comes up to the broker in turn).
//!
//! A library user that never calls [`adopt_orphans`] (the in-process test
//! harness, `turnstile run`) gets no sweep: its other children are not
//! recorded here.

use super::tree::{Pinned, parse_stat};
use std::collections::BTreeSet;
use std::io;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Pids of the children the broker spawned and has not reaped yet.
static OWN: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());
/// Whether this process is a child subreaper ([`adopt_orphans`]).
static ADOPTING: AtomicBool = AtomicBool::new(false);

/// How long [`sweep`] keeps killing before it gives up.
const SWEEP_WAIT: Duration = Duration::from_secs(5);
const FIRST_PAUSE: Duration = Duration::from_micros(200);
const MAX_PAUSE: Duration = Duration::from_millis(20);

fn own() -> MutexGuard<'static, BTreeSet<i32>> {
    // A panic while the set was held leaves it whole (inserts and removes
    // only): go on with it.
    OWN.lock().unwrap_or_else(|e| e.into_inner())
}

/// Makes this process a child subreaper, so that orphans of the turns'
/// process trees come to it, and turns on [`sweep`]. For a daemon whose
/// every child is spawned through this module.
pub fn adopt_orphans() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true)?;
    ADOPTING.store(true, Ordering::Release);
    Ok(())
}

/// Whether [`adopt_orphans`] was called.
pub fn adopting() -> bool {
    ADOPTING.load(Ordering::Acquire)
}

/// Runs `spawn`, which starts one child, and records the child's pid (from
/// `pid`), both under the lock [`sweep`] takes: a sweep never sees the
/// child unrecorded.
pub fn spawned<T, E>(
    spawn: impl FnOnce() -> Result<T, E>,
    pid: impl Fn(&T) -> i32,
) -> Result<T, E> {
    let mut own = own();
    let child = spawn()?;
    own.insert(pid(&child));
    Ok(child)
}

/// Forgets `pid` once it is reaped.
pub fn reaped(pid: i32) {
    own().remove(&pid);
}

/// [`Command::output`], with the child recorded while it runs (stdin
/// null, stdout and stderr captured).
pub fn output(cmd: &mut Command) -> io::Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = spawned(|| cmd.spawn(), |c| c.id() as i32)?;
    let pid = child.id() as i32;
    let out = child.wait_with_output();
    reaped(pid);
    out
}

/// Kills and reaps every child of this process that it did not spawn
/// (orphans it adopted), round after round until none is left or
/// [`SWEEP_WAIT`] has passed: how many are left (0: none). Nothing unless
/// [`adopt_orphans`] was called. Blocks: run it off the async runtime.
pub fn sweep() -> usize {
    if !adopting() {
        return 0;
    }
    let me = std::process::id() as i32;
    let began = Instant::now();
    let mut pause = FIRST_PAUSE;
    loop {
        let pending = sweep_round(me);
        if pending == 0 || began.elapsed() >= SWEEP_WAIT {
            return pending;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// One pass over the children of `me` that it did not spawn: each is
/// SIGKILLed (through a pidfd, once checked to still be `me`'s child) and
/// reaped if it is gone: how many are not reaped yet.
fn sweep_round(me: i32) -> usize {
    let mut pending = 0;
    for pid in super::children_of(me) {
        // Held until this child is dealt with: no recorded spawn can take
        // its pid meanwhile.
        let own = own();
        if own.contains(&pid) {
            continue;
        }
        // Opened first, checked after: the pid cannot be another
        // process's by the time it is signalled.
        let Some(p) = Pinned::open(pid) else {
            continue;
        };
        let parent = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| parse_stat(&s))
            .map(|(_, ppid)| ppid);
        if parent != Some(me) {
            continue;
        }
        p.signal(nix::sys::signal::Signal::SIGKILL);
        // Only this sweep reaps children the broker did not spawn.
        if !matches!(turnstile_sys::wait::reap(pid, false), Ok(Some(_))) {
            pending += 1;
        }
    }
    pending
}
