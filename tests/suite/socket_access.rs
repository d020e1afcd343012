//! Executors that are not root: the unix socket shared with a group (0660)
//! or with an allowlist of peer uids (`SO_PEERCRED`), tried by real
//! unprivileged users made for the test (`useradd`), running the
//! `turnstile` binary under their own uid and groups (`setpriv`).

use super::harness::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use turnstile_broker::config::Mode;

const GROUP: &str = "turnstile-exec";
/// In `GROUP`.
const MEMBER: &str = "turnstile-member";
/// In no group of the broker's.
const STRANGER: &str = "turnstile-stranger";

fn run(cmd: &mut Command) -> std::process::Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

/// The users and group of these tests, made when missing; their uids.
fn users() -> (u32, u32, u32) {
    require_root();
    for tool in [
        "/usr/sbin/useradd",
        "/usr/sbin/groupadd",
        "/usr/bin/setpriv",
    ] {
        assert!(
            Path::new(tool).exists(),
            "MISSING: {tool} — these tests make real unprivileged users (passwd, util-linux)"
        );
    }
    if nix::unistd::Group::from_name(GROUP)
        .ok()
        .flatten()
        .is_none()
    {
        let out = run(Command::new("/usr/sbin/groupadd").args(["--system", GROUP]));
        // Another test binary may have made it meanwhile.
        assert!(
            out.status.success()
                || nix::unistd::Group::from_name(GROUP)
                    .ok()
                    .flatten()
                    .is_some(),
            "groupadd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for (user, groups) in [(MEMBER, Some(GROUP)), (STRANGER, None)] {
        if nix::unistd::User::from_name(user).ok().flatten().is_none() {
            let mut cmd = Command::new("/usr/sbin/useradd");
            cmd.args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
            ]);
            if let Some(g) = groups {
                cmd.args(["--groups", g]);
            }
            let out = run(cmd.arg(user));
            assert!(
                out.status.success() || nix::unistd::User::from_name(user).ok().flatten().is_some(),
                "useradd {user}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let uid = |u: &str| {
        nix::unistd::User::from_name(u)
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("user {u}"))
            .uid
            .as_raw()
    };
    let gid = nix::unistd::Group::from_name(GROUP)
        .ok()
        .flatten()
        .expect("group")
        .gid
        .as_raw();
    (uid(MEMBER), uid(STRANGER), gid)
}

/// The `turnstile` binary where any user can run it: where cargo built it
/// when others can reach it there (no copy: a binary written while other
/// tests fork can fail to exec with ETXTBSY), else a copy in `dir`.
fn binary(dir: &Path) -> PathBuf {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_turnstile"));
    let reachable = built
        .ancestors()
        .skip(1)
        .all(|d| std::fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o001 != 0));
    let runnable = std::fs::metadata(&built).is_ok_and(|m| m.permissions().mode() & 0o005 == 0o005);
    if reachable && runnable {
        return built;
    }
    let bin = dir.join("turnstile");
    std::fs::copy(&built, &bin).expect("copy the binary");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    bin
}

/// `turnstile sessions ls` on `socket` as `user` (uid, gid and the groups
/// /etc/group gives it): success, and stderr.
fn ls_as(bin: &Path, user: &str, socket: &Path) -> (bool, String) {
    let out = run(Command::new("/usr/bin/setpriv")
        .arg(format!("--reuid={user}"))
        .arg(format!("--regid={user}"))
        .arg("--init-groups")
        .arg("--")
        .arg(bin)
        .args(["sessions", "--socket"])
        .arg(socket)
        .arg("ls")
        .env_clear());
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_group_lets_its_members_in_and_no_one_else() {
    let (_, _, gid) = users();
    let h = Harness::start_with(Mode::Direct, |cfg| {
        cfg.socket_group = Some(GROUP.into());
    })
    .await;
    let meta = std::fs::metadata(&h.socket).expect("socket");
    assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, gid));
    let dir = tempdir();
    let bin = binary(dir.path());
    let (ok, err) = ls_as(&bin, MEMBER, &h.socket);
    assert!(ok, "a member of {GROUP} was refused: {err}");
    let (ok, err) = ls_as(&bin, STRANGER, &h.socket);
    assert!(!ok, "a user outside {GROUP} got in");
    assert!(err.contains("cannot reach the broker"), "{err}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_uids_are_checked_by_peer_credentials() {
    let (member, stranger, _) = users();
    let h = Harness::start_with(Mode::Direct, |cfg| {
        cfg.allowed_uids = vec![member];
    })
    .await;
    // Anyone may connect; the broker decides by the peer's uid.
    let meta = std::fs::metadata(&h.socket).expect("socket");
    assert_eq!(meta.mode() & 0o777, 0o666);
    let dir = tempdir();
    let bin = binary(dir.path());
    let (ok, err) = ls_as(&bin, MEMBER, &h.socket);
    assert!(ok, "an allowed uid was refused: {err}");
    let (ok, err) = ls_as(&bin, STRANGER, &h.socket);
    assert!(!ok, "uid {stranger} got in");
    assert!(
        err.contains(&format!("uid {stranger} may not use this broker")),
        "{err}"
    );
    // The broker's own uid (root here) always may.
    let mut c = h.client().await;
    c.list_sessions(turnstile_proto::v1::ListSessionsRequest {})
        .await
        .expect("the owner is allowed");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_the_socket_is_the_owners_only() {
    users();
    let h = Harness::start(Mode::Direct).await;
    let meta = std::fs::metadata(&h.socket).expect("socket");
    assert_eq!(meta.mode() & 0o777, 0o600);
    let dir = tempdir();
    let bin = binary(dir.path());
    let (ok, err) = ls_as(&bin, MEMBER, &h.socket);
    assert!(!ok && err.contains("cannot reach the broker"), "{err}");
    h.stop().await;
}
