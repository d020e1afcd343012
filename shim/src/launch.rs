//! `turnstile-shim --launcher`: a process started by the broker ahead of a
//! turn, already inside the cgroup made ready for it, that waits for one
//! request and execs it (see `turnstile_shim::launch`). Moving a process
//! into a cgroup may wait for a kernel RCU grace period (~10 ms); the
//! launcher takes that wait before the turn exists instead of during its
//! start.

use crate::pid1;
use nix::errno::Errno;
use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use turnstile_shim::launch::{self, Failure, LaunchStep};

/// A file's identity: (device, inode).
fn identity(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// What the launcher does once it has its request.
pub enum Next {
    /// Exit with this code: the request failed (and was reported), or the
    /// broker closed the socket without one (the spare was discarded).
    Exit(i32),
    /// The request is to run this very binary as the shim: do so in this
    /// process, with this `--max-payload`, instead of exec'ing it again
    /// (an exec and a process start saved on every direct-mode turn).
    RunShim(usize),
}

/// Waits for the one request and execs it; returns only without an exec.
pub fn serve_request() -> Next {
    let sock = match pid1::take_launch_fd() {
        Ok(s) => s,
        Err(_) => return Next::Exit(126),
    };
    match launch_one(&sock) {
        Ok(None) => Next::Exit(0),
        // The socket closes here, as an exec would have closed it.
        Ok(Some(max_payload)) => Next::RunShim(max_payload),
        Err(failure) => {
            let _ = nix::unistd::write(&sock, &failure.encode());
            Next::Exit(127)
        }
    }
}

/// Waits for the request and execs it; `Ok(None)` when the broker closed
/// the socket without one, `Ok(Some(max_payload))` when the request is this
/// binary as the shim.
fn launch_one(sock: &OwnedFd) -> Result<Option<usize>, Failure> {
    // The file this process runs, taken before the wait: a request for the
    // same file (not one replaced on disk since) runs the shim in place.
    let this_binary = identity(std::path::Path::new("/proc/self/exe"));
    let fail = |step: LaunchStep| {
        move |e: Errno| Failure {
            step,
            errno: e as i32,
        }
    };
    let mut buf = vec![0u8; launch::MAX_REQUEST];
    let received = turnstile_sys::fd::recv_with_fds(sock.as_fd(), &mut buf, launch::MAX_FDS)
        .map_err(|e| Failure {
            step: LaunchStep::Request,
            errno: e.raw_os_error().unwrap_or(libc::EIO),
        })?;
    let Some((n, fds)) = received else {
        return Ok(None);
    };
    let (targets, argv) = launch::decode(&buf[..n], fds.len())
        .map_err(|_| fail(LaunchStep::Request)(Errno::EINVAL))?;
    let argv: Vec<CString> = argv
        .into_iter()
        .map(CString::new)
        .collect::<Result<_, _>>()
        .map_err(|_| fail(LaunchStep::Request)(Errno::EINVAL))?;
    turnstile_sys::fd::place_owned(fds, &targets).map_err(fail(LaunchStep::Descriptors))?;
    let program = std::path::Path::new(std::ffi::OsStr::from_bytes(argv[0].as_bytes()));
    if this_binary.is_some()
        && identity(program) == this_binary
        && let Ok(max_payload) = crate::parse_args(
            argv[1..]
                .iter()
                .map(|a| std::ffi::OsString::from(std::ffi::OsStr::from_bytes(a.as_bytes()))),
        )
    {
        return Ok(Some(max_payload));
    }
    // Default dispositions and an empty mask for the program (the Rust
    // runtime ignores SIGPIPE, which exec keeps): the routine a spawned
    // child runs too.
    turnstile_sys::signals::reset_for_exec().map_err(fail(LaunchStep::Signals))?;
    Err(fail(LaunchStep::Exec)(turnstile_sys::spawn::exec_in_place(
        &argv,
    )))
}
