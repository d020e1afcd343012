//! Ready launchers (`warm_spares`): a turn starts in a cgroup and process
//! made before it, falls back to a fresh spawn when they are gone, and
//! nothing of them outlives the broker.

use super::harness::*;
use crate::both_modes;
use turnstile_broker::config::Mode;

both_modes!(
    a_ready_launcher_becomes_the_turn,
    turns_start_when_the_ready_launchers_were_killed
);

/// The command line of a live process, NUL-separated args joined by spaces.
fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

fn cgroups_of(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default()
}

/// A broker with its pool full, and the ready launchers' pids.
async fn started_full(mode: Mode) -> (Harness, Vec<i32>) {
    let h = Harness::start(mode).await;
    let launchers = full(&h).await;
    (h, launchers)
}

/// Waits for the pool to be full; the ready launchers' pids.
async fn full(h: &Harness) -> Vec<i32> {
    let warm = h
        .broker
        .warm
        .as_ref()
        .expect("a warm pool (cgroups are on)");
    warm.wait_ready(2).await;
    let launchers = warm.launcher_pids();
    assert_eq!(launchers.len(), 2, "{launchers:?}");
    launchers
}

/// Dead: gone, or a zombie waiting for its reaper.
fn is_dead(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.is_empty() || stat.contains(") Z ")
}

async fn a_ready_launcher_becomes_the_turn(mode: Mode) {
    let (h, launchers) = started_full(mode).await;
    let warm = h.broker.warm.as_ref().expect("pool");
    // Each is the shim binary (its command line may not be readable yet:
    // the kernel lets the spawner go on before the new program's arguments
    // are in place).
    let shim = std::fs::canonicalize(shim()).expect("shim");
    for pid in &launchers {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe");
        assert_eq!(exe, shim, "launcher {pid}");
    }
    let mut t = h
        .turn(start(
            "warm",
            "echo \"ready $PPID\"; read line; echo x > \"$TMPDIR/x\" && echo \"got $line\"",
        ))
        .await
        .expect("turn");
    let mut seen = Outcome::default();
    t.wait_stdout("ready", &mut seen).await;
    let turn_id = seen.started.as_ref().expect("started").turn_id.clone();
    // The first ready launcher is now the turn's: nsjail (the same pid,
    // exec'd), or in direct mode the shim itself, run in place by the
    // launcher (the same binary: no second exec), the agent's parent. Either
    // way in the cgroup that now carries the turn's id.
    let pid = launchers[0];
    match mode {
        Mode::Nsjail => {
            assert!(
                cmdline(pid).contains("--config"),
                "pid {pid}: {}",
                cmdline(pid)
            );
        }
        Mode::Direct => {
            assert!(
                seen.stdout().starts_with(&format!("ready {pid}\n")),
                "{}",
                seen.stdout()
            );
            assert!(
                cmdline(pid).contains("--launcher"),
                "pid {pid}: {}",
                cmdline(pid)
            );
        }
    }
    // Its turn dir was a spare one too, renamed: llm.sock bound in it.
    let turn_dir = h.state().join("turns").join(&turn_id);
    assert!(turn_dir.join("llm.sock").exists(), "{}", turn_dir.display());
    let cg = cgroups_of(pid);
    assert!(
        cg.lines().any(|l| l.ends_with(&format!("/{turn_id}"))),
        "turn {turn_id} not in the cgroups of {pid}:\n{cg}"
    );
    t.stdin(b"hello\n").await;
    t.close_stdin().await;
    t.collect_into(&mut seen).await;
    seen.assert_exited_ok();
    assert!(
        seen.stdout().ends_with("\ngot hello\n"),
        "{}",
        seen.stdout()
    );
    // The pool is topped up once the turn has started: two ready again, one
    // of them new.
    warm.wait_ready(2).await;
    let now = warm.launcher_pids();
    assert!(now.contains(&launchers[1]), "{now:?}");
    assert!(now.iter().any(|p| !launchers.contains(p)), "{now:?}");
    h.stop().await;
}

async fn turns_start_when_the_ready_launchers_were_killed(mode: Mode) {
    let (h, launchers) = started_full(mode).await;
    for pid in &launchers {
        let pid = nix::unistd::Pid::from_raw(*pid);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill a launcher");
        // Until it has died (not reaped: WNOWAIT; the broker reaps it). A
        // launcher killed while a turn is handing it the request ends that
        // turn as `spawn_failed` instead; this test is about dead ones.
        use nix::sys::wait::{Id, WaitPidFlag, waitid};
        tokio::task::spawn_blocking(move || {
            waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT)
        })
        .await
        .expect("join")
        .expect("waitid");
    }
    // Both turns take a dead launcher, notice, and spawn afresh.
    for i in 0..2 {
        let o = h.run(start("cold", &format!("echo turn {i}"))).await;
        o.assert_exited_ok();
        assert_eq!(o.stdout(), format!("turn {i}\n"));
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_of_the_pool_outlives_the_broker() {
    let (h, launchers) = started_full(Mode::Direct).await;
    let broker = h.broker.clone();
    let warm = broker.warm.as_ref().expect("pool");
    let parents = broker.cgroups.as_ref().expect("cgroups").parents();
    let spares = |dir: &std::path::Path| -> Vec<String> {
        entries(dir)
            .into_iter()
            .filter(|n| n.starts_with("spare-"))
            .collect()
    };
    for p in &parents {
        assert_eq!(spares(p).len(), 2, "{}: {:?}", p.display(), entries(p));
    }
    let spare_dirs = h.state().join("spares");
    assert_eq!(entries(&spare_dirs).len(), 2, "{:?}", entries(&spare_dirs));
    h.stop().await;
    assert_eq!(entries(&spare_dirs), Vec::<String>::new());
    for pid in &launchers {
        assert!(is_dead(*pid), "launcher {pid} outlived the broker");
    }
    for p in &parents {
        assert_eq!(spares(p), Vec::<String>::new(), "{}", p.display());
    }
    assert_eq!(warm.launcher_pids(), Vec::<i32>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_spares_zero_means_no_pool() {
    let h = Harness::start_with(Mode::Direct, |c| c.warm_spares = 0).await;
    assert!(h.broker.warm.is_none());
    h.run(start("nopool", "true")).await.assert_exited_ok();
    h.stop().await;
}

both_modes!(a_launcher_that_cannot_exec_fails_the_turn_clearly);

async fn a_launcher_that_cannot_exec_fails_the_turn_clearly(mode: Mode) {
    // The program the launchers will exec, a copy that goes away once they
    // are ready (as when a package upgrade removes a binary under a broker).
    let dir = tempdir();
    let (original, copy) = match mode {
        Mode::Nsjail => (nsjail(), dir.path().join("nsjail")),
        Mode::Direct => (shim(), dir.path().join("turnstile-shim")),
    };
    std::fs::copy(&original, &copy).expect("copy");
    let h = Harness::start_with(mode, |c| match mode {
        Mode::Nsjail => c.nsjail = copy.clone(),
        Mode::Direct => c.shim = copy.clone(),
    })
    .await;
    full(&h).await;
    std::fs::remove_file(&copy).expect("remove");
    let o = h.run(start("gone", "echo never")).await;
    assert_eq!(o.reason(), Reason::SpawnFailed, "{:?}", o.exited);
    let message = &o.exited().message;
    assert!(
        message.contains(&format!("cannot execute {}", copy.display()))
            && message.contains("No such file"),
        "{message}"
    );
    assert_eq!(o.stdout(), "");
    assert!(entries(&h.state().join("turns")).is_empty());
    h.stop().await;
}

/// Reads a cgroup file from whichever of the dirs has it.
fn cg_file(dirs: &[std::path::PathBuf], name: &str) -> String {
    dirs.iter()
        .find_map(|d| std::fs::read_to_string(d.join(name)).ok())
        .unwrap_or_else(|| panic!("no {name} in {dirs:?}"))
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spares_are_made_with_the_default_limits_and_take_any_other() {
    use turnstile_broker::jail::cgroup::CgroupLimits;
    let h = Harness::start_with(Mode::Direct, |c| {
        c.default_limits.memory_bytes = Some(256 << 20);
        c.default_limits.max_processes = Some(64);
    })
    .await;
    full(&h).await;
    let warm = h.broker.warm.as_ref().expect("pool");
    let mut spare = warm.take().expect("a ready spare");
    let v2 = h.broker.cgroups.as_ref().expect("cgroups").version() == 2;
    let (memory_file, unlimited) = if v2 {
        ("memory.max", "max".to_string())
    } else {
        // v1 shows "unlimited" as the largest page-aligned i64.
        (
            "memory.limit_in_bytes",
            (i64::MAX as u64 & !4095).to_string(),
        )
    };
    let dirs = spare.cgroup.dirs().to_vec();
    // Made with the defaults (processes: the agent's plus nsjail and shim).
    assert_eq!(cg_file(&dirs, memory_file), (256u64 << 20).to_string());
    assert_eq!(cg_file(&dirs, "pids.max"), "66");
    // Lowered, raised to unlimited, and set again: each one exactly.
    for (memory, processes) in [
        (Some(128u64 << 20), Some(10u64)),
        (None, None),
        (Some(512 << 20), Some(100)),
    ] {
        let want = CgroupLimits {
            memory_bytes: memory,
            processes,
        };
        spare.cgroup.set_limits(want).expect("set limits");
        let m = memory.map_or(unlimited.clone(), |b| b.to_string());
        let p = processes.map_or("max".to_string(), |n| n.to_string());
        assert_eq!(
            (cg_file(&dirs, memory_file), cg_file(&dirs, "pids.max")),
            (m, p)
        );
    }
    spare.discard();
    h.stop().await;
}
