//! Every per-turn limit binds, and a limit hit ends the turn with the
//! matching reason.

use super::harness::*;
use crate::both_modes;
use turnstile_broker::config::Mode;
use turnstile_proto::v1 as pb;

both_modes!(
    wall_time_limit_times_out,
    memory_limit_ends_the_turn,
    cpu_limit_ends_the_turn,
    file_size_limit_ends_the_turn,
    process_limit_binds,
    open_files_limit_binds,
);

fn limited(session: &str, script: &str, limits: pb::Limits) -> pb::Start {
    pb::Start {
        limits: Some(limits),
        ..start(session, script)
    }
}

async fn wall_time_limit_times_out(mode: Mode) {
    let h = Harness::start(mode).await;
    let tok = token();
    let o = h
        .run(limited(
            "wall",
            &format!("echo ready; sleep {tok}"),
            pb::Limits {
                wall_time_ms: 1500,
                ..Default::default()
            },
        ))
        .await;
    assert_eq!(o.reason(), Reason::TimedOut, "{:?}", o.exited);
    assert_eq!(o.stdout(), "ready\n");
    assert_eq!(pids_with(&format!("sleep {tok}")), Vec::<i32>::new());
    h.stop().await;
}

async fn memory_limit_ends_the_turn(mode: Mode) {
    let h = Harness::start(mode).await;
    // The shell holds 200 MB in one variable; the limit is 64 MiB.
    let o = h
        .run(limited(
            "mem",
            "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived ${#x}",
            pb::Limits {
                memory_bytes: 64 << 20,
                ..Default::default()
            },
        ))
        .await;
    assert_eq!(
        o.reason(),
        Reason::MemoryLimit,
        "{:?} {}",
        o.exited,
        o.stdout()
    );
    assert!(o.exited().limits_hit.contains(&"memory".to_string()));
    assert!(!o.stdout().contains("survived"));
    h.stop().await;
}

async fn cpu_limit_ends_the_turn(mode: Mode) {
    let h = Harness::start(mode).await;
    let o = h
        .run(limited(
            "cpu",
            "while :; do :; done",
            pb::Limits {
                cpu_time_ms: 1000,
                ..Default::default()
            },
        ))
        .await;
    assert_eq!(o.reason(), Reason::CpuLimit, "{:?}", o.exited);
    assert_eq!(o.signal(), Some(24));
    h.stop().await;
}

async fn file_size_limit_ends_the_turn(mode: Mode) {
    let h = Harness::start(mode).await;
    let o = h
        .run(limited(
            "fsize",
            "head -c 1048576 /dev/zero > ok.bin && echo wrote-1mib; exec head -c 5000000 /dev/zero > big.bin",
            pb::Limits {
                max_file_size_bytes: 1 << 20,
                ..Default::default()
            },
        ))
        .await;
    assert_eq!(
        o.reason(),
        Reason::FileSizeLimit,
        "{:?} {}",
        o.exited,
        o.stderr()
    );
    assert_eq!(o.stdout(), "wrote-1mib\n");
    let big = std::fs::metadata(h.state().join("sessions/fsize/work/big.bin")).expect("big");
    assert_eq!(big.len(), 1 << 20, "the write stopped at the limit");
    h.stop().await;
}

async fn process_limit_binds(mode: Mode) {
    let h = Harness::start(mode).await;
    let tok = token();
    // 64 background sleeps against a limit of 16 processes for the turn.
    let o = h
        .run(limited(
            "procs",
            &format!("for i in $(seq 64); do sleep {tok} & done; echo all-forked"),
            pb::Limits {
                max_processes: 16,
                ..Default::default()
            },
        ))
        .await;
    assert_eq!(
        o.reason(),
        Reason::ProcessLimit,
        "{:?} {}",
        o.exited,
        o.stderr()
    );
    assert!(o.exited().limits_hit.contains(&"processes".to_string()));
    assert!(!o.stdout().contains("all-forked"));
    assert_eq!(pids_with(&format!("sleep {tok}")), Vec::<i32>::new());
    h.stop().await;
}

async fn open_files_limit_binds(mode: Mode) {
    let h = Harness::start(mode).await;
    // Open descriptors until the kernel refuses: the highest one is the
    // limit minus one, and the refusal is EMFILE.
    let script = "python3 -c '\nimport os\nfds = []\ntry:\n    while True: fds.append(os.open(\"/dev/null\", os.O_RDONLY))\nexcept OSError as e: print(max(fds) + 1, e.errno)'";
    let o = h
        .run(limited(
            "nofile",
            script,
            pb::Limits {
                max_open_files: 32,
                ..Default::default()
            },
        ))
        .await;
    o.assert_exited_ok();
    assert_eq!(o.stdout(), "32 24\n", "{}", o.stderr());
    h.stop().await;
}
