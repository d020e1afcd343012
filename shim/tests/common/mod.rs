//! Drives the built shim in direct mode the way the broker does: the payload
//! file on fd 3, one end of a socketpair on fd 4, an empty environment.
//! Shared by the integration tests; not every test file uses every helper.
#![allow(unsafe_code, dead_code)]

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use turnstile_shim::{
    AgentStatus, FailureClass, GO, InitPayload, Mode, PROTOCOL_VERSION, Rlimits, ShimMsg,
    read_frame,
};

pub const SHIM: &str = env!("CARGO_BIN_EXE_turnstile-shim");

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("turnstile-shim-test-{}-{n}", std::process::id()));
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

pub fn payload(dir: &Path, argv: &[&str]) -> InitPayload {
    InitPayload {
        version: PROTOCOL_VERSION,
        mode: Mode::Direct,
        session_id: "s1".into(),
        turn_id: "t1".into(),
        argv: argv.iter().map(|a| a.to_string()).collect(),
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        cwd: dir.to_str().expect("utf-8 temp dir").into(),
        rlimits: Rlimits::default(),
        llm: None,
    }
}

/// A duplicate of `fd` numbered 100 or more, close-on-exec, so that the
/// `dup2` to 3 and 4 in the child can never clobber its own source.
pub fn high_dup(fd: &impl AsRawFd) -> OwnedFd {
    // SAFETY: F_DUPFD_CLOEXEC only creates a new descriptor.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 100) };
    assert!(new >= 100, "dup failed: {}", io::Error::last_os_error());
    // SAFETY: `new` was just created and nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(new) }
}

pub struct Shim {
    pub child: Child,
    pub ctl: UnixStream,
    pub dir: TempDir,
}

impl Shim {
    pub fn start(dir: TempDir, payload: &InitPayload) -> Shim {
        let bytes = payload.encode().expect("encode");
        let max = bytes.len();
        Shim::start_raw(dir, &bytes, max)
    }

    pub fn start_raw(dir: TempDir, bytes: &[u8], max_payload: usize) -> Shim {
        let path = dir.0.join("init.msgpack");
        fs::write(&path, bytes).expect("write payload");
        let file = File::open(&path).expect("open payload");
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        let (init, control) = (high_dup(&file), high_dup(&theirs));
        let (init_raw, control_raw) = (init.as_raw_fd(), control.as_raw_fd());
        let mut cmd = Command::new(SHIM);
        cmd.env_clear()
            .arg("--max-payload")
            .arg(max_payload.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: the closure only calls dup2, which is async-signal-safe,
        // on two integers copied in; dup2 clears close-on-exec on 3 and 4.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(init_raw, 3) == -1 || libc::dup2(control_raw, 4) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn shim");
        // Only the shim may hold its end, or we would never see EOF.
        drop((init, control, theirs, file));
        // A safety net against a hung shim, not a synchronisation.
        ours.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        Shim {
            child,
            ctl: ours,
            dir,
        }
    }

    pub fn frame(&self) -> ShimMsg {
        read_frame(&self.ctl)
            .expect("read frame")
            .expect("frame before EOF")
    }

    /// Reads Hello, checks it, answers go, reads AgentStarted.
    pub fn go(&mut self) -> i32 {
        match self.frame() {
            ShimMsg::Hello(check) => {
                assert!(check.verify(Mode::Direct).is_empty(), "{check:?}");
                assert!(check.env_keys.is_empty());
                assert!(check.pid > 1);
            }
            other => panic!("want hello, got {other:?}"),
        }
        self.ctl.write_all(&[GO]).expect("send go");
        match self.frame() {
            ShimMsg::AgentStarted { pid } => pid,
            other => panic!("want agent started, got {other:?}"),
        }
    }

    /// Reads Hello, answers go, and reads the shim's failure to start the
    /// agent.
    pub fn go_and_fail(&mut self) -> (FailureClass, String) {
        match self.frame() {
            ShimMsg::Hello(_) => {}
            other => panic!("want hello, got {other:?}"),
        }
        self.ctl.write_all(&[GO]).expect("send go");
        self.failed()
    }

    pub fn exited(&self) -> AgentStatus {
        match self.frame() {
            ShimMsg::AgentExited { status, .. } => status,
            other => panic!("want agent exited, got {other:?}"),
        }
    }

    pub fn failed(&self) -> (FailureClass, String) {
        match self.frame() {
            ShimMsg::Failed { class, message } => (class, message),
            other => panic!("want failed, got {other:?}"),
        }
    }

    /// Waits for the shim: exit code, stdout, stderr.
    pub fn finish(self) -> (i32, String, String) {
        self.finish_keeping_dir().0
    }

    /// [`Shim::finish`], handing back the turn's directory so that what the
    /// agent left there (or not) can still be checked.
    pub fn finish_keeping_dir(self) -> ((i32, String, String), TempDir) {
        let out = self.child.wait_with_output().expect("wait shim");
        let result = (
            out.status.code().expect("shim exited, not killed"),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        (result, self.dir)
    }
}
