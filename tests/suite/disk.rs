//! Session disk limits: a session that writes past its limit is stopped
//! (its writes refused, or its turn ended `disk_limit`) while another
//! session's concurrent turn writes normally, on the default state dir and on
//! a small tmpfs one; the broker's records survive; below the free-space
//! reserve turns and imports are refused up front.

use super::harness::*;
use crate::both_modes;
use std::path::{Path, PathBuf};
use turnstile_broker::config::{DiskBackend, Mode};
use turnstile_broker::session::SessionMeta;
use turnstile_proto::v1 as pb;

both_modes!(
    disk_limit_stops_the_writer_not_its_neighbour,
    accounted_disk_limit_stops_the_writer_not_its_neighbour,
    disk_limit_on_a_small_tmpfs_state_dir,
    inode_limit_stops_the_writer,
    accounted_inode_limit_stops_the_writer,
    a_nearly_full_state_dir_stops_the_growing_session,
    image_refuses_writes_past_the_limit_with_enospc,
    image_grows_with_the_limit_and_a_lower_limit_ends_the_turn,
    image_survives_a_restart_export_and_import,
    a_new_session_takes_a_ready_image,
);

/// A tmpfs mounted for one test, unmounted when dropped (also on failure).
struct Tmpfs {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Tmpfs {
    fn mount(size_mib: u64) -> Tmpfs {
        require_root();
        let dir = tempdir();
        let path = dir.path().join("state");
        std::fs::create_dir(&path).expect("mkdir");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size_mib}m,mode=0711"))
            .arg("tmpfs")
            .arg(&path)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "cannot mount a tmpfs at {}",
            path.display()
        );
        Tmpfs { _dir: dir, path }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a jail's mount namespace may still hold it for a moment.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

const MIB: u64 = 1 << 20;

fn limited(session: &str, script: &str, limits: pb::Limits) -> pb::Start {
    pb::Start {
        limits: Some(limits),
        ..start(session, script)
    }
}

fn meta(state: &Path, session: &str) -> SessionMeta {
    let path = state.join("sessions").join(session).join("meta.json");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The writer fills its work dir 1 MiB at a time past a 16 MiB limit while
/// the other session, at the same time, writes 8 MiB and checks it.
async fn writer_and_neighbour(h: &Harness) {
    let writer = "head -c 4194304 /dev/zero > base && echo ready && read go && \
                  i=0; while head -c 1048576 /dev/zero > f$i; do i=$((i+1)); done; echo refused at $i";
    let neighbour = "echo ready && read go && head -c 8388608 /dev/zero > other.bin && \
                     echo wrote $(wc -c < other.bin)";
    let mut w = h
        .turn(limited(
            "writer",
            writer,
            pb::Limits {
                disk_bytes: 16 * MIB,
                ..Default::default()
            },
        ))
        .await
        .expect("writer admitted");
    let mut n = h
        .turn(limited(
            "neighbour",
            neighbour,
            pb::Limits {
                disk_bytes: 64 * MIB,
                ..Default::default()
            },
        ))
        .await
        .expect("neighbour admitted");
    let mut wo = Outcome::default();
    let mut no = Outcome::default();
    w.wait_stdout("ready", &mut wo).await;
    n.wait_stdout("ready", &mut no).await;
    // Both turns are running: both go at once.
    n.stdin(b"go\n").await;
    w.stdin(b"go\n").await;
    n.close_stdin().await;
    w.close_stdin().await;
    tokio::join!(w.collect_into(&mut wo), n.collect_into(&mut no));

    no.assert_exited_ok();
    assert_eq!(no.stdout(), "ready\nwrote 8388608\n");
    let other = h.state().join("sessions/neighbour/work/other.bin");
    assert_eq!(std::fs::metadata(&other).expect("other.bin").len(), 8 * MIB);

    // Stopped by the limit: its writes refused by the kernel (the agent
    // says so and exits), or its turn ended disk_limit by the broker.
    let refused = wo.stdout().contains("refused at");
    assert!(
        wo.reason() == Reason::DiskLimit || refused,
        "writer: {:?}\nstdout: {}\nstderr: {}",
        wo.exited,
        wo.stdout(),
        wo.stderr()
    );
    assert!(
        wo.exited().limits_hit.contains(&"disk".to_string()),
        "{:?}",
        wo.exited
    );
    let used = turnstile_broker::disk::walk(
        &[
            h.state().join("sessions/writer/home"),
            h.state().join("sessions/writer/work"),
        ],
        None,
    )
    .expect("walk");
    eprintln!(
        "writer stopped at {} bytes / {} inodes of its 16 MiB limit: {}",
        used.bytes,
        used.inodes,
        wo.exited().message
    );

    // The records of both sessions are whole.
    let wm = meta(&h.state(), "writer");
    assert_eq!(wm.turn_count, 1);
    assert_eq!(
        wm.last_exit_reason.as_deref(),
        Some(if refused { "exited" } else { "disk_limit" })
    );
    let nm = meta(&h.state(), "neighbour");
    assert_eq!(nm.turn_count, 1);
    assert_eq!(nm.last_exit_reason.as_deref(), Some("exited"));

    // The neighbour's next turn runs as usual.
    h.run(start("neighbour", "test -s other.bin && echo again"))
        .await
        .assert_exited_ok();
}

/// The image backend where this host has it (root, loop devices: CI).
async fn disk_limit_stops_the_writer_not_its_neighbour(mode: Mode) {
    let h = Harness::start(mode).await;
    assert_eq!(
        h.broker.disk.detected().backend,
        "image",
        "{:?}",
        h.broker.disk.detected()
    );
    writer_and_neighbour(&h).await;
    h.stop().await;
}

async fn accounted_disk_limit_stops_the_writer_not_its_neighbour(mode: Mode) {
    let h = Harness::start_with(mode, accounting).await;
    assert_eq!(h.broker.disk.detected().backend, "accounting");
    writer_and_neighbour(&h).await;
    h.stop().await;
}

fn accounting(cfg: &mut turnstile_broker::config::Config) {
    cfg.disk_backend = DiskBackend::Accounting;
}

fn image(cfg: &mut turnstile_broker::config::Config) {
    cfg.disk_backend = DiskBackend::Image;
}

/// Mount points below `dir` and what is mounted there (`source[root]`).
fn mounts_below(dir: &Path) -> Vec<(PathBuf, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            let point = PathBuf::from(f.get(4)?);
            let source = format!("{}[{}]", f.get(sep + 2)?, f.get(3)?);
            point.starts_with(dir).then_some((point, source))
        })
        .collect()
}

fn limit_bytes(bytes: u64) -> pb::Limits {
    pb::Limits {
        disk_bytes: bytes,
        ..Default::default()
    }
}

/// On the image backend the kernel refuses the agent's writes past its
/// limit (`ENOSPC`): the agent sees the error and goes on; its turn ends
/// as it chooses, with `disk` among the limits hit. The session's home and
/// work are its image's, mounted where its plain dirs would be.
async fn image_refuses_writes_past_the_limit_with_enospc(mode: Mode) {
    let h = Harness::start_with(mode, image).await;
    let o = h
        .run(limited(
            "full",
            "i=0; while head -c 1048576 /dev/zero > f$i; do i=$((i+1)); done; \
             echo refused at $i; echo still writable > note || echo note refused",
            limit_bytes(16 * MIB),
        ))
        .await;
    o.assert_exited_ok();
    assert!(
        o.stderr().contains("No space left on device"),
        "{}",
        o.stderr()
    );
    let at: u64 = o
        .stdout()
        .lines()
        .find_map(|l| l.strip_prefix("refused at "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("stdout: {}", o.stdout()));
    // ext4's metadata comes on top of the limit, not out of it.
    assert!(
        (14..=16).contains(&at),
        "refused after {at} MiB of a 16 MiB limit"
    );
    assert!(
        o.exited().limits_hit.contains(&"disk".to_string()),
        "{:?}",
        o.exited
    );
    let dir = h.state().join("sessions/full");
    let mounts = mounts_below(&dir);
    for part in ["home", "work", ".vol"] {
        assert!(
            mounts
                .iter()
                .any(|(p, s)| *p == dir.join(part) && s.starts_with("/dev/loop")),
            "{part} is not on the session's image: {mounts:?}"
        );
    }
    // The record beside the image is whole.
    assert_eq!(
        meta(&h.state(), "full").last_exit_reason.as_deref(),
        Some("exited")
    );

    // Deleting the session unmounts and removes its image.
    let mut client = h.client().await;
    client
        .delete_session(pb::SessionRef {
            session_id: "full".into(),
        })
        .await
        .expect("delete");
    assert!(!dir.exists());
    assert_eq!(mounts_below(&h.state()), vec![], "mounts left after delete");
    h.stop().await;
}

/// A later turn with a higher limit grows the image online; one with a
/// lower limit than the image holds is ended `disk_limit` by the watch.
async fn image_grows_with_the_limit_and_a_lower_limit_ends_the_turn(mode: Mode) {
    let h = Harness::start_with(mode, image).await;
    let fill =
        "i=0; while head -c 1048576 /dev/zero > f$i; do i=$((i+1)); done; echo refused at $i";
    let o = h.run(limited("grow", fill, limit_bytes(16 * MIB))).await;
    o.assert_exited_ok();
    let o = h
        .run(limited(
            "grow",
            "rm -f f*; head -c 33554432 /dev/zero > big && echo wrote 32 MiB",
            limit_bytes(64 * MIB),
        ))
        .await;
    o.assert_exited_ok();
    assert_eq!(o.stdout(), "wrote 32 MiB\n", "stderr: {}", o.stderr());
    let o = h
        .run(limited(
            "grow",
            // Runs until the watch ends it (stdin is closed at once).
            "echo ready; exec sleep 1000",
            limit_bytes(8 * MIB),
        ))
        .await;
    assert_eq!(o.reason(), Reason::DiskLimit, "{:?}", o.exited);
    assert!(
        o.exited().message.contains("disk limit"),
        "{}",
        o.exited().message
    );
    h.stop().await;
}

/// An image session's files survive a broker restart (its image is mounted
/// again) and an export → import round trip into another broker's image.
async fn image_survives_a_restart_export_and_import(mode: Mode) {
    let dir = tempdir();
    let _unmount = Unmount(dir.path().to_path_buf());
    let state = dir.path().join("state");
    let on_state = |cfg: &mut turnstile_broker::config::Config| {
        cfg.state_dir = state.clone();
        cfg.disk_backend = DiskBackend::Image;
    };
    let h = Harness::start_with(mode, on_state).await;
    h.run(limited(
        "kept",
        "mkdir -p d && echo hello > d/f && ln -s d/f link && echo home > $HOME/h",
        limit_bytes(32 * MIB),
    ))
    .await
    .assert_exited_ok();
    let archive = super::continuation::export(&mut h.client().await, "kept").await;
    h.stop().await;
    assert_eq!(mounts_below(&state), vec![], "a clean stop unmounts");

    let h2 = Harness::start_with(mode, on_state).await;
    let check = "cat d/f link $HOME/h";
    let o = h2.run(limited("kept", check, limit_bytes(32 * MIB))).await;
    o.assert_exited_ok();
    assert_eq!(o.stdout(), "hello\nhello\nhome\n");
    super::continuation::import(&mut h2.client().await, "copy", archive)
        .await
        .expect("import");
    let o = h2.run(limited("copy", check, limit_bytes(32 * MIB))).await;
    o.assert_exited_ok();
    assert_eq!(o.stdout(), "hello\nhello\nhome\n");
    let dir = h2.state().join("sessions/copy");
    assert!(
        mounts_below(&dir)
            .iter()
            .any(|(p, _)| *p == dir.join("home")),
        "the import is on an image of its own"
    );
    h2.stop().await;
}

async fn disk_limit_on_a_small_tmpfs_state_dir(mode: Mode) {
    // 256 MiB: the writer's 16 MiB, the neighbour's 8 MiB, the reserve
    // (5 %: 12.8 MiB) and room for the writer's overshoot (what it writes
    // in one check period).
    let fs = Tmpfs::mount(256);
    let state = fs.path.clone();
    let h = Harness::start_with(mode, |cfg| cfg.state_dir = state).await;
    assert_eq!(h.broker.disk.detected().filesystem, "tmpfs");
    writer_and_neighbour(&h).await;
    h.stop().await;
    drop(fs);
}

async fn inode_limit_stops_the_writer(mode: Mode) {
    inode_limit(Harness::start(mode).await).await;
}

async fn accounted_inode_limit_stops_the_writer(mode: Mode) {
    inode_limit(Harness::start_with(mode, accounting).await).await;
}

async fn inode_limit(h: Harness) {
    let o = h
        .run(limited(
            "inodes",
            "i=0; while : > e$i; do i=$((i+1)); done; echo refused at $i",
            pb::Limits {
                disk_inodes: 200,
                ..Default::default()
            },
        ))
        .await;
    assert!(
        o.reason() == Reason::DiskLimit || o.stdout().contains("refused at"),
        "{:?} {}",
        o.exited,
        o.stderr()
    );
    assert!(o.exited().limits_hit.contains(&"disk".to_string()));
    h.stop().await;
}

/// Runs a turn; a refusal names the free space the test saw.
async fn run_or_say_why(h: &Harness, dir: &Path, start: pb::Start) -> Outcome {
    match h.turn(start).await {
        Ok(t) => {
            t.close_stdin().await;
            t.collect().await
        }
        Err(status) => {
            let st = nix::sys::statvfs::statvfs(dir).expect("statvfs");
            panic!(
                "turn refused with {} bytes free under {}: {status:?}",
                st.blocks_available() * st.fragment_size(),
                dir.display()
            )
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_reserve_turns_and_imports_are_refused() {
    let fs = Tmpfs::mount(64);
    let state = fs.path.clone();
    let h = Harness::start_with(Mode::Direct, |cfg| {
        cfg.state_dir = state;
        cfg.disk_reserve_bytes = Some(32 * MIB);
    })
    .await;
    run_or_say_why(&h, &fs.path, start("before", "echo ok"))
        .await
        .assert_exited_ok();

    // Something else fills the filesystem to below the reserve.
    let filler = fs.path.join("filler");
    std::fs::write(&filler, vec![1u8; 40 * MIB as usize]).expect("fill");
    let err = h
        .turn(start("refused", "echo never"))
        .await
        .expect_err("refused below the reserve");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("reserve") && err.message().contains("bytes free"),
        "{}",
        err.message()
    );
    assert!(
        !h.state().join("sessions/refused").exists(),
        "a refused start changes nothing on disk"
    );
    let mut client = h.client().await;
    let import = tokio_stream::iter(vec![pb::ImportSessionRequest {
        session_id: "imported".into(),
        data: bytes::Bytes::new(),
    }]);
    let err = client
        .import_session(import)
        .await
        .expect_err("import refused below the reserve");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("reserve"), "{}", err.message());

    // Space back: turns run again, and the earlier record is intact.
    std::fs::remove_file(&filler).expect("rm filler");
    run_or_say_why(&h, &fs.path, start("before", "echo again"))
        .await
        .assert_exited_ok();
    assert_eq!(meta(&h.state(), "before").turn_count, 2);
    h.stop().await;
    drop(fs);
}

/// A session without a disk limit fills the state dir: below half the
/// reserve its turn ends `disk_limit`, so the filesystem never fills up;
/// below the reserve other turns are refused until space is freed.
async fn a_nearly_full_state_dir_stops_the_growing_session(mode: Mode) {
    // The floor (half the reserve, 128 MiB) leaves room for the filler's
    // overshoot even when the machine is busy.
    let fs = Tmpfs::mount(384);
    let state = fs.path.clone();
    let h = Harness::start_with(mode, |cfg| {
        cfg.state_dir = state;
        cfg.disk_reserve_bytes = Some(256 * MIB);
    })
    .await;
    h.run(start("bystander", "echo ok"))
        .await
        .assert_exited_ok();
    let o = h
        .run(start(
            "filler",
            "i=0; while head -c 1048576 /dev/zero > f$i; do i=$((i+1)); done; echo refused at $i",
        ))
        .await;
    assert_eq!(
        o.reason(),
        Reason::DiskLimit,
        "{:?}\nstdout: {}\nstderr: {}",
        o.exited,
        o.stdout(),
        o.stderr()
    );
    assert!(
        o.exited().message.contains("nearly full"),
        "{}",
        o.exited().message
    );
    let free = nix::sys::statvfs::statvfs(&fs.path).expect("statvfs");
    let free = free.blocks_available() * free.fragment_size();
    eprintln!("filler stopped with {free} bytes free of 384 MiB (floor 128 MiB)");
    assert!(free > 0, "the state dir filled up");
    assert_eq!(
        meta(&h.state(), "filler").last_exit_reason.as_deref(),
        Some("disk_limit")
    );
    assert_eq!(meta(&h.state(), "bystander").turn_count, 1);

    let err = h
        .turn(start("bystander", "echo never"))
        .await
        .expect_err("below the reserve");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");

    let mut client = h.client().await;
    client
        .delete_session(pb::SessionRef {
            session_id: "filler".into(),
        })
        .await
        .expect("delete");
    h.run(start("bystander", "echo again"))
        .await
        .assert_exited_ok();
    assert_eq!(meta(&h.state(), "bystander").turn_count, 2);
    h.stop().await;
    drop(fs);
}

/// On a full filesystem an atomic write fails and the previous record
/// stays whole (the helper every broker record is written with).
#[test]
fn a_full_disk_keeps_the_previous_record() {
    use std::io::Write;
    let write = |dir: &Path, bytes: &[u8]| {
        let dir = turnstile_broker::tree::open_dir_path(dir).expect("open");
        turnstile_broker::tree::write_atomic(&dir, std::ffi::OsStr::new("meta.json"), bytes, 0o600)
    };
    let fs = Tmpfs::mount(1);
    let rec = fs.path.join("meta.json");
    write(&fs.path, b"{\"turn_count\":1}").expect("first");
    let mut filler = std::fs::File::create(fs.path.join("filler")).expect("filler");
    let chunk = vec![0u8; 64 * 1024];
    while filler.write_all(&chunk).is_ok() {}
    let err = write(&fs.path, &vec![b' '; 256 * 1024]).expect_err("no room");
    assert_eq!(
        err.raw_os_error(),
        Some(nix::errno::Errno::ENOSPC as i32),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&rec).expect("read"),
        b"{\"turn_count\":1}".to_vec()
    );
    assert_eq!(entries(&fs.path).len(), 2, "{:?}", entries(&fs.path));
    drop(filler);
    drop(fs);
}

/// In direct mode the agent's TMPDIR is on the state dir: it counts
/// toward the session's limit while the turn runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_mode_tmpdir_counts() {
    let h = Harness::start(Mode::Direct).await;
    let o = h
        .run(limited(
            "tmpdir",
            "i=0; while head -c 1048576 /dev/zero > \"$TMPDIR/f$i\"; do i=$((i+1)); done; echo refused at $i",
            pb::Limits {
                disk_bytes: 8 * MIB,
                ..Default::default()
            },
        ))
        .await;
    assert_eq!(
        o.reason(),
        Reason::DiskLimit,
        "{:?} {}",
        o.exited,
        o.stderr()
    );
    h.stop().await;
}

/// New sessions whose first turn asks for the default limit get an image
/// made ahead (a rename on the start path); it binds like any other, and a
/// clean stop leaves no mount behind, ready images included.
async fn a_new_session_takes_a_ready_image(mode: Mode) {
    let dir = tempdir();
    let _unmount = Unmount(dir.path().to_path_buf());
    let state = dir.path().join("state");
    let h = Harness::start_with(mode, |cfg| {
        cfg.state_dir = state.clone();
        cfg.disk_backend = DiskBackend::Image;
        cfg.default_limits.disk_bytes = Some(16 * MIB);
        cfg.warm_spares = 1;
    })
    .await;
    let spares = h.broker.sessions.spares().expect("ready images are kept");
    assert!(
        spares.wait_ready(1, std::time::Duration::from_secs(120)),
        "no ready image was made"
    );
    let ready = entries(&state.join("sessions"));
    assert_eq!(ready.len(), 1, "{ready:?}");
    let ready = state.join("sessions").join(&ready[0]);
    let o = h
        .run(start(
            "fresh",
            "i=0; while head -c 1048576 /dev/zero > f$i; do i=$((i+1)); done; echo refused at $i",
        ))
        .await;
    o.assert_exited_ok();
    assert!(o.stdout().starts_with("refused at 1"), "{}", o.stdout());
    assert!(
        !ready.exists(),
        "the ready image became the session's: {:?}",
        entries(&state.join("sessions"))
    );
    let session = state.join("sessions/fresh");
    assert!(session.join("disk.img").is_file());
    assert!(
        mounts_below(&session)
            .iter()
            .any(|(p, _)| *p == session.join("work")),
        "{:?}",
        mounts_below(&state)
    );
    h.stop().await;
    assert_eq!(
        mounts_below(&state),
        vec![],
        "a clean stop unmounts everything"
    );
}
