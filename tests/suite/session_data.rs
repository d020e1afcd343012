//! Session data against a hostile agent or archive: imports that try to
//! reach another session or the host, trees that must survive export,
//! import and fork as they are, the cost of a fork, and the import spool.

use super::continuation::{archive, export, import, raw_entry};
use super::harness::*;
use crate::both_modes;
use tonic::Code;
use turnstile_broker::config::Mode;
use turnstile_proto::v1 as pb;

both_modes!(
    hostile_imports_cannot_reach_another_session,
    ordinary_sessions_survive_export_import_and_fork
);

/// A raw tar entry; an empty `link` is none.
fn entry(b: &mut tar::Builder<Vec<u8>>, path: &str, kind: tar::EntryType, link: &str, data: &[u8]) {
    raw_entry(b, path, kind, (!link.is_empty()).then_some(link), data);
}

use tar::EntryType::{Directory as D, Fifo as P, Link as H, Regular as F, Symlink as L};

/// The chain of links that passed a check on paper: each link's target
/// stays inside when read alone, together they climb out.
fn chain(b: &mut tar::Builder<Vec<u8>>) {
    entry(b, "work", D, "", b"");
    entry(b, "work/d", D, "", b"");
    entry(b, "work/d/a", L, "..", b"");
    entry(b, "work/d/b", L, "a/..", b"");
    entry(b, "work/d/c", L, "b/../..", b"");
    entry(b, "work/d/e", L, "c/../../..", b"");
}

async fn hostile_imports_cannot_reach_another_session(mode: Mode) {
    let h = Harness::start(mode).await;
    let mut c = h.client().await;
    h.run(start("victim", "echo secret-v > $HOME/marker"))
        .await
        .assert_exited_ok();
    let victim_marker = h.state().join("sessions/victim/home/marker");
    let refused: Vec<(Vec<u8>, &str)> = vec![
        (
            archive(|b| {
                chain(b);
                entry(b, "home", L, "work/d/e/victim/home", b"");
            }),
            "home and work must be directories",
        ),
        (
            archive(|b| {
                chain(b);
                entry(b, "work/d/e/victim/home/pwned", F, "", b"x");
            }),
            "a parent is a link",
        ),
        (
            archive(|b| {
                chain(b);
                entry(b, "meta.json", L, "work/d/e/victim/meta.json", b"");
            }),
            "meta.json must be a regular file",
        ),
        (
            archive(|b| {
                entry(b, "home", D, "", b"");
                entry(b, "meta.json", P, "", b"");
            }),
            "meta.json must be a regular file",
        ),
        (
            archive(|b| {
                chain(b);
                entry(b, "work/x", H, "work/d/e/victim/home/marker", b"");
            }),
            "not an earlier file",
        ),
    ];
    for (bytes, want) in refused {
        let err = import(&mut c, "attacker", bytes).await.expect_err(want);
        assert_eq!(err.code(), Code::InvalidArgument, "{want}: {err:?}");
        assert!(err.message().contains(want), "{want}: {}", err.message());
        assert_eq!(
            entries(&h.state().join("sessions")),
            ["victim"],
            "nothing left"
        );
        assert_eq!(
            std::fs::read_to_string(&victim_marker).expect("victim intact"),
            "secret-v\n"
        );
    }
    // Links are the agent's data: the chain and a link towards the victim
    // import fine, and the host never follows them.
    let accepted = archive(|b| {
        chain(b);
        entry(b, "home", D, "", b"");
        entry(b, "home/v", L, "../../victim/home", b"");
        entry(b, "home/up", L, "../work/d/e", b"");
    });
    import(&mut c, "attacker", accepted)
        .await
        .expect("links as data");
    // What each mount of the turn really is: the device and inode the
    // agent sees at its home and work (in the jail, a plain session dir
    // or the session's own disk image: either way the same inode as the
    // host's session dir, and nothing else).
    let script = "cat $HOME/v/marker $HOME/up/victim/home/marker 2>/dev/null; \
                  stat -c 'mount %d %i' \"$HOME\" \"$PWD\"";
    let out = h.run(start("attacker", script)).await;
    out.assert_exited_ok();
    let stdout = out.stdout();
    // (Direct mode has no jail: its agent can follow a link anywhere.)
    if mode == Mode::Nsjail {
        assert!(
            !stdout.contains("secret-v"),
            "the jail reached the victim: {stdout}"
        );
    }
    let seen: Vec<(u64, u64)> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("mount "))
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(d, i)| Some((d.parse().ok()?, i.parse().ok()?)))
        .collect();
    use std::os::unix::fs::MetadataExt;
    let host: Vec<(u64, u64)> = ["home", "work"]
        .iter()
        .map(|part| {
            let m = std::fs::symlink_metadata(h.state().join("sessions/attacker").join(part))
                .expect("stat");
            assert!(m.is_dir(), "{part} is a real directory on the host");
            (m.dev(), m.ino())
        })
        .collect();
    assert_eq!(
        seen, host,
        "home and work of the turn are the session's own: {stdout}"
    );
    assert_eq!(
        std::fs::read_to_string(&victim_marker).expect("victim intact"),
        "secret-v\n"
    );
    h.stop().await;
}

/// Builds what agents leave in a session: a venv (absolute links), a big
/// sparse file, hard links, a fifo, a unix socket, a tree deeper than
/// PATH_MAX.
const BUILD: &str = r#"set -e
cd "$WORK_DIR"
mkdir -p venv/bin && ln -s /usr/bin/python3 venv/bin/python && ln -s python venv/bin/python3
truncate -s 7G sparse && printf tail >> sparse
head -c 1048576 /dev/urandom > data && for i in 1 2 3 4 5 6 7 8 9 10; do ln data link$i; done
mkfifo "$HOME/fifo"
python3 -c 'import socket,sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])' "$HOME/agent.sock"
python3 -c 'import os
os.mkdir("deep"); os.chdir("deep")
for i in range(1100): os.mkdir("dddd"); os.chdir("dddd")
open("deep", "w").write("bottom\n")'

echo built"#;

/// Lists a session's tree: type, path, link target, link count, size,
/// allocated KiB (sparse files stay small), mode.
const LIST: &str = r#"cd "$HOME" && find . -printf '%y %p %l %n %s %k %m\n' | sort > "$TMPDIR/h.txt"
cd "$WORK_DIR" && find . -printf '%y %p %l %n %s %k %m\n' | sort > "$TMPDIR/w.txt"
cat "$TMPDIR/h.txt" "$TMPDIR/w.txt" | md5sum; wc -l < "$TMPDIR/w.txt"; grep ' ./sparse ' "$TMPDIR/w.txt"; grep -c '^s' "$TMPDIR/h.txt" || true"#;

fn with_work(session: &str, script: &str) -> pb::Start {
    start(session, &format!("WORK_DIR=$PWD; {script}"))
}

async fn ordinary_sessions_survive_export_import_and_fork(mode: Mode) {
    let h = Harness::start(mode).await;
    let mut c = h.client().await;
    let built = h.run(with_work("orig", BUILD)).await;
    built.assert_exited_ok();
    assert!(built.stdout().contains("built"), "{}", built.stderr());
    let archive = export(&mut c, "orig").await;
    // 1 MiB of data, 7 GiB of holes, ten links, and 1100 directories
    // whose long names (GNU long-name records, ~4 MiB) are the rest: the
    // archive is the data, not the holes or the links.
    assert!(
        archive.len() < 8 << 20,
        "archive is {} bytes",
        archive.len()
    );
    import(&mut c, "copy", archive).await.expect("import");
    c.fork_session(pb::ForkSessionRequest {
        source_session_id: "orig".into(),
        new_session_id: "forked".into(),
    })
    .await
    .expect("fork");
    let listing = |s: &'static str| {
        let h = &h;
        async move {
            let out = h.run(with_work(s, LIST)).await;
            out.assert_exited_ok();
            out.stdout()
        }
    };
    let orig = listing("orig").await;
    let copy = listing("copy").await;
    let forked = listing("forked").await;
    // The socket is left out (the only difference); everything else,
    // down to link targets, link counts and allocated blocks, is equal.
    let sockets = |l: &str| l.lines().last().map(str::to_string);
    assert_eq!(sockets(&orig).as_deref(), Some("1"), "{orig}");
    assert_eq!(sockets(&copy).as_deref(), Some("0"), "{copy}");
    assert_eq!(sockets(&forked).as_deref(), Some("0"), "{forked}");
    let rest = |l: &str| l.lines().skip(1).take(2).collect::<Vec<_>>().join("\n");
    assert_eq!(rest(&orig), rest(&copy));
    assert_eq!(rest(&orig), rest(&forked));
    assert!(rest(&orig).contains("7516192772"), "sparse size: {orig}");
    // Without the socket, the whole listing matches.
    let no_socket = |s: &'static str| {
        let h = &h;
        async move {
            let out = h
                .run(with_work(s, &format!("rm -f $HOME/agent.sock; {LIST}")))
                .await;
            out.assert_exited_ok();
            out.stdout().lines().next().map(str::to_string)
        }
    };
    let want = no_socket("orig").await;
    assert_eq!(no_socket("copy").await, want);
    assert_eq!(no_socket("forked").await, want);
    // A fork costs the real data, not the holes or the links.
    let usage: std::collections::HashMap<String, u64> = c
        .list_sessions(pb::ListSessionsRequest {})
        .await
        .expect("ls")
        .into_inner()
        .sessions
        .into_iter()
        .map(|s| (s.session_id, s.disk_usage_bytes))
        .collect();
    let real = usage["orig"];
    assert!(real < 16 << 20, "orig uses {real} bytes");
    assert!(usage["forked"] <= 2 * real, "{usage:?}");
    assert!(usage["copy"] <= 2 * real, "{usage:?}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_import_spool_is_owner_only_and_goes_with_its_client() {
    use std::os::unix::fs::PermissionsExt;
    let h = Harness::start(Mode::Direct).await;
    let c = h.client().await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::ImportSessionRequest {
        session_id: "spooled".into(),
        data: bytes::Bytes::new(),
    })
    .await
    .expect("send");
    tx.send(pb::ImportSessionRequest {
        session_id: String::new(),
        data: bytes::Bytes::from(vec![1u8; 64 * 1024]),
    })
    .await
    .expect("send");
    let mut c2 = c.clone();
    let call = tokio::spawn(async move {
        c2.import_session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    let spool_dir = h.state().join("imports");
    let spool = wait_for(|| {
        std::fs::read_dir(&spool_dir)
            .ok()?
            .flatten()
            .find(|e| e.metadata().is_ok_and(|m| m.len() >= 64 * 1024))
            .map(|e| e.path())
    })
    .await;
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode(&spool_dir), 0o700);
    assert_eq!(mode(&spool), 0o600);
    // The client goes away mid-upload (its stream is reset, not ended).
    call.abort();
    let _ = call.await;
    drop(tx);
    wait_for(|| (!spool.exists()).then_some(())).await;
    assert!(!h.state().join("sessions/spooled").exists());
    h.stop().await;
}

/// Waits for `f` to give a value: the broker's own work, watched from
/// outside; gives up after 20 s.
async fn wait_for<T>(mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "gave up waiting");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_session_is_refused_with_its_cause_and_still_listed() {
    let h = Harness::start(Mode::Direct).await;
    let mut c = h.client().await;
    h.run(start("damaged", "true")).await.assert_exited_ok();
    h.run(start("fine", "true")).await.assert_exited_ok();
    let dir = h.state().join("sessions/damaged");
    std::fs::write(dir.join("meta.json"), b"{not json").expect("corrupt");
    // The turn is admitted, then refused before anything runs.
    let out = h.run(start("damaged", "true")).await;
    assert_eq!(out.reason(), Reason::SpawnFailed, "{:?}", out.exited);
    assert!(
        out.exited()
            .message
            .contains("session damaged is damaged: meta.json is not valid metadata"),
        "{:?}",
        out.exited
    );
    // Never reset behind the operator's back: the file is as it was.
    assert_eq!(
        std::fs::read(dir.join("meta.json")).expect("meta"),
        b"{not json"
    );
    // home as a link is refused the same way, and nothing follows it.
    std::fs::write(dir.join("meta.json"), b"{}").expect("meta");
    std::fs::rename(dir.join("home"), dir.join("home.real")).expect("rename");
    std::os::unix::fs::symlink("../fine/home", dir.join("home")).expect("symlink");
    let out = h.run(start("damaged", "true")).await;
    assert_eq!(out.reason(), Reason::SpawnFailed, "{:?}", out.exited);
    assert!(
        out.exited().message.contains("home is not a directory"),
        "{:?}",
        out.exited
    );
    // The listing still shows both sessions.
    let ids: Vec<String> = c
        .list_sessions(pb::ListSessionsRequest {})
        .await
        .expect("ls")
        .into_inner()
        .sessions
        .into_iter()
        .map(|s| s.session_id)
        .collect();
    assert_eq!(ids, ["damaged", "fine"]);
    h.stop().await;
}
