//! Descriptors: putting them at the fixed numbers a program expects (its
//! stdio, the shim's payload and control socket, nsjail's log), in a spawned
//! child ([`place`]) and in the shim's launcher, which execs in place
//! ([`place_owned`]); receiving them with a launch request
//! ([`recv_with_fds`]).
#![allow(unsafe_code)]

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, fcntl};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Most descriptors a program may be given at fixed numbers (stdio
/// included).
pub const MAX_FDS: usize = 8;
/// Copies are made at this number or above, clear of every target.
const HIGH: RawFd = 64;

/// Child-safe. A close-on-exec copy of `fd` at [`HIGH`] or above, clear of
/// every number a program is given.
pub fn copy_high(fd: BorrowedFd<'_>) -> Result<OwnedFd, Errno> {
    let copy = fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(HIGH))?;
    // SAFETY: F_DUPFD_CLOEXEC just returned this new descriptor; nothing
    // else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(copy) })
}

/// Child-safe. Copies of `fds` at high numbers, at most [`MAX_FDS`]
/// (EINVAL otherwise); no allocation.
fn copies_high<'a>(
    fds: impl ExactSizeIterator<Item = BorrowedFd<'a>>,
) -> Result<[Option<OwnedFd>; MAX_FDS], Errno> {
    if fds.len() > MAX_FDS {
        return Err(Errno::EINVAL);
    }
    let mut copies: [Option<OwnedFd>; MAX_FDS] = Default::default();
    for (slot, fd) in copies.iter_mut().zip(fds) {
        *slot = Some(copy_high(fd)?);
    }
    Ok(copies)
}

/// Child-safe. `dup2(copy, target)` for each pair: `target` then refers to
/// the copy's file, with close-on-exec cleared (whatever was at `target` is
/// closed).
fn put_all(copies: &[Option<OwnedFd>], targets: impl Iterator<Item = RawFd>) -> Result<(), Errno> {
    for (copy, target) in copies.iter().flatten().zip(targets) {
        // SAFETY: dup2 reads no memory; `copy` is open (owned here) and
        // `target` is a number the caller means to replace.
        if unsafe { libc::dup2(copy.as_raw_fd(), target) } < 0 {
            return Err(Errno::last());
        }
    }
    Ok(())
}

/// Child-safe. Puts each source at its target, through copies at high
/// numbers first so that one target never overwrites a later source; the
/// targets come out without close-on-exec. At most [`MAX_FDS`] pairs
/// (EINVAL otherwise).
pub fn place(pairs: &[(BorrowedFd<'_>, RawFd)]) -> Result<(), Errno> {
    let copies = copies_high(pairs.iter().map(|p| p.0))?;
    put_all(&copies, pairs.iter().map(|p| p.1))
}

/// Puts `fds[i]` at `targets[i]` like [`place`], taking the sources: they
/// are closed before any target is taken (a source may sit at a target's
/// number, and closing it afterwards would close the target), so only the
/// targets stay open. For a process that may go on without an exec.
pub fn place_owned(fds: Vec<OwnedFd>, targets: &[RawFd]) -> Result<(), Errno> {
    let copies = copies_high(fds.iter().map(|f| f.as_fd()))?;
    drop(fds);
    put_all(&copies, targets.iter().copied())
}

/// One `SOCK_SEQPACKET` message and the descriptors it carries (received
/// close-on-exec, at most `max_fds`, itself at most [`MAX_FDS`]).
/// `Ok(None)` at EOF; EMSGSIZE if the message or its control data was cut
/// short or carried too many.
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    max_fds: usize,
) -> io::Result<Option<(usize, Vec<OwnedFd>)>> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(Errno::EINTR) => continue,
            other => break other?,
        }
    };
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for fd in raw {
                // SAFETY: SCM_RIGHTS installed these descriptors in this
                // process just now; each is wrapped exactly once.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    let cut = msg
        .flags
        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
    let n = msg.bytes;
    if cut || fds.len() > max_fds.min(MAX_FDS) {
        return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
    }
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    Ok(Some((n, fds)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{IoSlice, Read, Write};
    use std::os::fd::AsFd;

    #[test]
    fn descriptors_travel_with_their_message() {
        use nix::sys::socket::{
            AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, sendmsg, socketpair,
        };
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair");
        let (r, w) = std::io::pipe().expect("pipe");
        let w: OwnedFd = w.into();
        sendmsg::<()>(
            a.as_raw_fd(),
            &[IoSlice::new(b"req")],
            &[ControlMessage::ScmRights(&[w.as_raw_fd()])],
            MsgFlags::empty(),
            None,
        )
        .expect("send");
        let mut buf = [0u8; 16];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf, 1)
            .expect("recv")
            .expect("a message");
        assert_eq!(&buf[..n], b"req");
        assert_eq!(fds.len(), 1);
        drop(w);
        let mut got = std::fs::File::from(fds.into_iter().next().expect("fd"));
        got.write_all(b"x").expect("write");
        drop(got);
        let mut out = String::new();
        std::io::BufReader::new(r)
            .read_to_string(&mut out)
            .expect("read");
        assert_eq!(out, "x");
        // More descriptors than asked for is refused; EOF is `None`.
        let (r2, w2) = std::io::pipe().expect("pipe");
        let (r2, w2): (OwnedFd, OwnedFd) = (r2.into(), w2.into());
        sendmsg::<()>(
            a.as_raw_fd(),
            &[IoSlice::new(b"two")],
            &[ControlMessage::ScmRights(&[r2.as_raw_fd(), w2.as_raw_fd()])],
            MsgFlags::empty(),
            None,
        )
        .expect("send");
        let err = recv_with_fds(b.as_fd(), &mut buf, 1).expect_err("two fds");
        assert_eq!(err.raw_os_error(), Some(libc::EMSGSIZE));
        drop(a);
        assert!(
            recv_with_fds(b.as_fd(), &mut buf, 1)
                .expect("eof")
                .is_none()
        );
    }
}
