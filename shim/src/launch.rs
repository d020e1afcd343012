//! `turnstile-shim --launcher`: a process started by the broker ahead of a
//! turn, already inside the cgroup made ready for it, that waits for one
//! request and execs it (see `turnstile_shim::launch`). Moving a process
//! into a cgroup may wait for a kernel RCU grace period (~10 ms); the
//! launcher takes that wait before the turn exists instead of during its
//! start.

use crate::sys;
use nix::errno::Errno;
use std::ffi::CString;
use std::os::fd::OwnedFd;
use turnstile_shim::launch::{self, Failure, Step};

/// Runs the launcher; returns its exit code (it only returns on failure or
/// when the broker closed the socket without a request).
pub fn run() -> i32 {
    let sock = match sys::take_launch_fd() {
        Ok(s) => s,
        Err(_) => return 126,
    };
    match launch_one(&sock) {
        Ok(()) => 0,
        Err(failure) => {
            let _ = nix::unistd::write(&sock, &failure.encode());
            127
        }
    }
}

/// Waits for the request and execs it; `Ok` only when the broker closed the
/// socket without one (the spare was discarded).
fn launch_one(sock: &OwnedFd) -> Result<(), Failure> {
    let fail = |step: Step| {
        move |e: Errno| Failure {
            step,
            errno: e as i32,
        }
    };
    let mut buf = vec![0u8; launch::MAX_REQUEST];
    let received = sys::recv_with_fds(sock, &mut buf, launch::MAX_FDS).map_err(|e| Failure {
        step: Step::Request,
        errno: e.raw_os_error().unwrap_or(libc::EIO),
    })?;
    let Some((n, fds)) = received else {
        return Ok(());
    };
    let (targets, argv) =
        launch::decode(&buf[..n], fds.len()).map_err(|_| fail(Step::Request)(Errno::EINVAL))?;
    let argv: Vec<CString> = argv
        .into_iter()
        .map(CString::new)
        .collect::<Result<_, _>>()
        .map_err(|_| fail(Step::Request)(Errno::EINVAL))?;
    sys::place_fds(fds, &targets).map_err(fail(Step::Descriptors))?;
    sys::reset_signals_for_exec().map_err(fail(Step::Signals))?;
    Err(fail(Step::Exec)(sys::exec(&argv)))
}
