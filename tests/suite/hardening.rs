//! The jail against an agent that attacks it: no namespaces, io_uring or
//! descriptor theft (seccomp), no host `/etc` beyond what agents need, a
//! resolver that fails at once; and real agents' tools still working.

use super::harness::*;
use turnstile_broker::config::{DiskBackend, Mode};

/// Raw syscalls from Python (in the jail: Debian's /usr/bin/python3):
/// each prints its name and the result (-errno on failure).
const PROBE: &str = r#"
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def sc(n, *a):
    r = libc.syscall(n, *[ctypes.c_long(x) for x in a])
    return r if r >= 0 else -ctypes.get_errno()
buf = ctypes.create_string_buffer(256)
print("unshare_user", sc(272, 0x10000000))
print("unshare_net", sc(272, 0x40000000))
print("setns", sc(308, 0, 0))
print("clone3", sc(435, 0, 0))
print("io_uring_setup", sc(425, 1, ctypes.addressof(buf)))
pidfd = sc(434, 1, 0)
print("pidfd_getfd", sc(438, pidfd, 4, 0) if pidfd >= 0 else -1)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jail_denies_namespaces_io_uring_and_descriptor_theft() {
    let h = Harness::start(Mode::Nsjail).await;
    let script = format!(
        "python3 -c '{}'; unshare -U true 2>/dev/null; echo unshare_cmd=$?; \
         ls /proc/1/fd >/dev/null 2>&1; echo shim_fds=$?; \
         head -c1 /proc/1/mem >/dev/null 2>&1; echo shim_mem=$?",
        PROBE.replace('\'', "\"")
    );
    let out = h.run(start("probe", &script)).await;
    out.assert_exited_ok();
    let stdout = out.stdout();
    for (call, want) in [
        ("unshare_user", "-1"),
        ("unshare_net", "-1"),
        ("setns", "-1"),
        ("clone3", "-38"),
        ("io_uring_setup", "-1"),
        ("pidfd_getfd", "-1"),
    ] {
        assert!(
            stdout.lines().any(|l| l == format!("{call} {want}")),
            "{call}: want {want}\n{stdout}\n{}",
            out.stderr()
        );
    }
    assert!(stdout.contains("unshare_cmd=1"), "{stdout}");
    // The shim (PID 1) is not dumpable: its descriptors and memory are out
    // of the agent's reach.
    assert!(stdout.contains("shim_fds=2"), "{stdout}");
    assert!(stdout.contains("shim_mem=1"), "{stdout}");
    h.stop().await;
}

/// What the jail's /etc may hold (see jail-configs/agent.cfg).
const ETC_ALLOWED: &[&str] = &[
    "alternatives",
    "ca-certificates",
    "ca-certificates.conf",
    "crypto-policies",
    "debian_version",
    "gai.conf",
    "gitconfig",
    "group",
    "host.conf",
    "hostname",
    "hosts",
    "java-17-openjdk",
    "java-21-openjdk",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "mime.types",
    "nsswitch.conf",
    "os-release",
    "passwd",
    "perl",
    "pki",
    "protocols",
    "python3",
    "python3.11",
    "python3.12",
    "python3.13",
    "resolv.conf",
    "services",
    "ssl",
    "timezone",
];

/// A world-readable file in the host's /etc, removed when dropped.
struct HostEtcFile(std::path::PathBuf);

impl Drop for HostEtcFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etc_holds_only_what_agents_need_and_dns_fails_at_once() {
    use std::os::unix::fs::PermissionsExt;
    require_root();
    let name = format!("turnstile-test-{}", std::process::id());
    let secret = HostEtcFile(std::path::Path::new("/etc").join(&name));
    std::fs::write(&secret.0, "host-secret\n").expect("write");
    std::fs::set_permissions(&secret.0, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let h = Harness::start(Mode::Nsjail).await;
    let out = h
        .run(start(
            "etc",
            "ls -A /etc; echo ---; cat /etc/resolv.conf; echo ---; \
             getent hosts turnstile-test.invalid; echo getent=$?",
        ))
        .await;
    out.assert_exited_ok();
    let stdout = out.stdout();
    let mut parts = stdout.split("---\n");
    let listing = parts.next().unwrap_or_default();
    for entry in listing.lines() {
        assert!(
            ETC_ALLOWED.contains(&entry),
            "/etc/{entry} is visible in the jail:\n{listing}"
        );
    }
    assert!(
        !listing.contains(&name),
        "the host's /etc leaked: {listing}"
    );
    assert!(listing.lines().any(|l| l == "ssl"), "TLS roots: {listing}");
    let resolv = parts.next().unwrap_or_default();
    assert!(resolv.contains("nameserver 127.0.0.1"), "{resolv}");
    // Not found (2), not a timeout: the lookup was refused by loopback.
    assert!(stdout.contains("getent=2"), "{stdout}");
    h.stop().await;
    drop(secret);
}

/// Real tools an agent uses, each printing one line when it works.
const TOOLS: &str = r#"set -e
cd "$PWD"
python3 -c 'import ssl, json, sqlite3, hashlib, subprocess, multiprocessing.pool as p; p.ThreadPool(2).map(abs, [1]); print("python", ssl.OPENSSL_VERSION.split()[0])'
node -e 'console.log("node", require("os").userInfo().username, require("crypto").createHash("sha256").update("x").digest("hex").slice(0, 8))'
git init -q repo && git -C repo -c user.name=agent -c user.email=agent@turnstile commit -q --allow-empty -m one && echo git $(git -C repo rev-list --count HEAD)
printf '#include <stdio.h>\nint main(void){puts("cc hello");return 0;}\n' > hello.c && cc -o hello hello.c && ./hello
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_tools_keep_working_in_the_jail() {
    let h = Harness::start(Mode::Nsjail).await;
    let out = h.run(start("tools", TOOLS)).await;
    out.assert_exited_ok();
    let stdout = out.stdout();
    for want in ["python OpenSSL", "node agent 2d711642", "git 1", "cc hello"] {
        assert!(
            stdout.lines().any(|l| l.starts_with(want)),
            "{want}:\n{stdout}\n{}",
            out.stderr()
        );
    }
    h.stop().await;
}

/// `/proc/self/mountinfo` in the jail names no host state path: not the
/// state dir, not the session id, not the turn id, not where the shim lives.
/// (The session's home and work are on its disk image, whose mounts name
/// paths within the image; on plain dirs, without a disk limit, a bind's
/// root field is the dir's host path: see the README.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mountinfo_in_the_jail_names_no_host_state_path() {
    let h = Harness::start_with(Mode::Nsjail, |cfg| {
        cfg.disk_backend = DiskBackend::Image;
        cfg.default_limits.disk_bytes = Some(16 << 20);
    })
    .await;
    let session = format!("mnt-{}", token());
    let out = h
        .run(start(
            &session,
            "cat /proc/self/mountinfo; cat /proc/1/cmdline",
        ))
        .await;
    out.assert_exited_ok();
    let mountinfo = out.stdout();
    let turn = &out.started.as_ref().expect("started").turn_id;
    let state = h.state();
    let shim = shim();
    let shim_dir = shim.parent().expect("the shim's dir");
    for (what, needle) in [
        ("the state dir", state.to_string_lossy().into_owned()),
        ("the session id", session.clone()),
        ("the turn id", turn.clone()),
        (
            "the shim's host dir",
            shim_dir.to_string_lossy().into_owned(),
        ),
    ] {
        assert!(
            !mountinfo.contains(&needle),
            "{what} ({needle}) shows in the jail:\n{mountinfo}"
        );
    }
    // The state dir's last parts are named too (a bind's root field is the
    // path within its filesystem, which may not start with the full path).
    for part in ["sessions", "turns", "spares"] {
        assert!(
            !mountinfo
                .lines()
                .any(|l| l.split(' ').nth(3).is_some_and(|r| r.contains(part))),
            "a mount's root names {part}:\n{mountinfo}"
        );
    }
    // The agent's paths are still there, and LLM connections still work
    // (llm::* test that).
    for dst in [" /home/agent ", " /work ", " /proc "] {
        assert!(mountinfo.contains(dst), "{dst} missing:\n{mountinfo}");
    }
    h.stop().await;
}
