//! The LLM bridge: a TCP listener on 127.0.0.1 whose every connection is
//! joined, byte for byte, to a new connection on the turn's unix socket.
//!
//! Nothing is parsed: keep-alive, chunked bodies, SSE and large bodies pass
//! because the bridge only moves bytes. Half-closes are passed on (EOF read
//! on one side becomes `shutdown(Write)` on the other, and the other
//! direction keeps flowing until its own EOF); an error on either side ends
//! both, the TCP side with a reset.
//!
//! Threads: one accept thread, and one thread per connection that moves both
//! directions with `poll` over non-blocking sockets, so that the jail's pids
//! budget (which counts threads) pays at most 1 + [`MAX_CONNS`]. Each thread
//! has a small stack and each direction one fixed buffer of [`BUF`] bytes.
//! The threads are detached: they never keep the shim alive, and die with it
//! when the turn ends. They inherit the main thread's blocked signals, so
//! only the main thread ever takes the shim's signals. Every socket here is
//! close-on-exec (std opens them so), so the agent inherits none.
//!
//! Only the agent's own uid may connect: in direct mode the listener is on
//! the host's loopback, where any local user could otherwise reach the
//! model with the executor's credential. TCP has no `SO_PEERCRED`, so the
//! peer's uid is read from its socket's line in `/proc/net/tcp` (what
//! identd does); a connection from another uid, or one whose socket is
//! already gone, is reset before anything is forwarded.

use crate::sys;
use nix::sys::socket::{setsockopt, sockopt};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;
use turnstile_shim::LlmBridge;

/// Bridged connections open at once; further ones are reset at accept.
pub const MAX_CONNS: usize = 64;
/// Copy buffer of one direction of one connection.
const BUF: usize = 64 * 1024;
/// Stack of each bridge thread (the buffers are on the heap).
const STACK: usize = 64 * 1024;
/// Buffers moved in one direction before the other direction gets a turn.
const ROUND: usize = 16;
/// Pause after an accept error such as EMFILE, which would otherwise repeat
/// at once until some connection ends.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);

/// Binds 127.0.0.1:`llm.port` (0: an ephemeral port) and starts the accept
/// thread. Returns the port actually bound, for the agent's environment.
/// Call it from the main thread after the shim's signals are blocked.
pub fn start(llm: &LlmBridge) -> Result<u16, String> {
    let listen_error = |e: io::Error| format!("cannot listen on 127.0.0.1:{}: {e}", llm.port);
    let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, llm.port))
        .map_err(listen_error)?;
    let port = listener.local_addr().map_err(listen_error)?.port();
    let path: Arc<Path> = Arc::from(Path::new(&llm.socket_path));
    thread::Builder::new()
        .name("llm-accept".into())
        .stack_size(STACK)
        .spawn(move || accept_loop(&listener, &path))
        .map_err(|e| format!("cannot start the LLM bridge: {e}"))?;
    Ok(port)
}

fn accept_loop(listener: &TcpListener, path: &Arc<Path>) {
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let tcp = match listener.accept() {
            Ok((tcp, peer)) if peer_is_ours(&tcp, peer) => tcp,
            Ok((tcp, _)) => {
                abort(&tcp);
                continue;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                ) =>
            {
                continue;
            }
            // Out of descriptors or memory: wait for connections to end.
            Err(_) => {
                thread::sleep(ACCEPT_BACKOFF);
                continue;
            }
        };
        // Only this thread takes slots, so the check cannot race another
        // taker; slots freed meanwhile only make room.
        if open.load(Ordering::Acquire) >= MAX_CONNS {
            abort(&tcp);
            continue;
        }
        let slot = Slot::take(&open);
        let path = Arc::clone(path);
        // If the thread cannot start, the closure is dropped: the connection
        // closes and the slot is given back.
        let _ = thread::Builder::new()
            .name("llm-conn".into())
            .stack_size(STACK)
            .spawn(move || {
                let _slot = slot;
                serve(tcp, &path);
            });
    }
}

/// Whether the connecting socket `peer` (of accepted `tcp`) belongs to this
/// process's uid.
fn peer_is_ours(tcp: &TcpStream, peer: std::net::SocketAddr) -> bool {
    let (Ok(std::net::SocketAddr::V4(local)), std::net::SocketAddr::V4(peer)) =
        (tcp.local_addr(), peer)
    else {
        return false;
    };
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    peer_uid(&table, peer, local) == Some(nix::unistd::geteuid().as_raw())
}

/// The uid of the socket whose local address is `peer` and remote address
/// `local`, from the text of `/proc/net/tcp`.
fn peer_uid(table: &str, peer: SocketAddrV4, local: SocketAddrV4) -> Option<u32> {
    // The kernel prints an address as the %08X of its in-memory (network
    // order) bytes read as a native u32, and the port as %04X.
    let hex = |a: SocketAddrV4| {
        format!(
            "{:08X}:{:04X}",
            u32::from_ne_bytes(a.ip().octets()),
            a.port()
        )
    };
    let (want_local, want_remote) = (hex(peer), hex(local));
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.get(1) == Some(&want_local.as_str()) && f.get(2) == Some(&want_remote.as_str()))
            .then(|| f.get(7)?.parse().ok())
            .flatten()
    })
}

/// One of the [`MAX_CONNS`] places, given back on drop.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(open: &Arc<AtomicUsize>) -> Slot {
        open.fetch_add(1, Ordering::AcqRel);
        Slot(Arc::clone(open))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Joins one accepted connection to a new connection on the unix socket,
/// until both directions have ended; both sockets are closed on return.
fn serve(tcp: TcpStream, path: &Path) {
    let Ok(unix) = UnixStream::connect(path) else {
        abort(&tcp);
        return;
    };
    let _ = tcp.set_nodelay(true);
    if relay(&tcp, &unix).is_err() {
        abort(&tcp);
        let _ = unix.shutdown(Shutdown::Both);
    }
}

/// Makes the coming close of `tcp` a reset rather than a clean EOF.
fn abort(tcp: &TcpStream) {
    let reset = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ = setsockopt(tcp, sockopt::Linger, &reset);
}

/// Moves bytes both ways between the two sockets until both directions have
/// seen EOF and passed it on; the first error ends everything.
fn relay(tcp: &TcpStream, unix: &UnixStream) -> io::Result<()> {
    tcp.set_nonblocking(true)?;
    unix.set_nonblocking(true)?;
    let mut up = Pipe::new(); // agent -> broker
    let mut down = Pipe::new(); // broker -> agent
    loop {
        let up_wants = up.pump(tcp, unix)?;
        let down_wants = down.pump(unix, tcp)?;
        if up.done && down.done {
            return Ok(());
        }
        if up_wants == Wants::Again || down_wants == Wants::Again {
            continue;
        }
        let mut fds = [pollfd(tcp), pollfd(unix)];
        match up_wants {
            Wants::Readable => fds[0].events |= libc::POLLIN,
            Wants::Writable => fds[1].events |= libc::POLLOUT,
            Wants::Nothing | Wants::Again => {}
        }
        match down_wants {
            Wants::Readable => fds[1].events |= libc::POLLIN,
            Wants::Writable => fds[0].events |= libc::POLLOUT,
            Wants::Nothing | Wants::Again => {}
        }
        // poll reports hang-ups even when no event is asked for: a socket
        // with nothing to wait for must not be polled, or the loop spins.
        for fd in &mut fds {
            if fd.events == 0 {
                fd.fd = -1;
            }
        }
        sys::poll(&mut fds)?;
        if fds.iter().any(|fd| fd.revents & libc::POLLNVAL != 0) {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
        // Errors and hang-ups show up in the next read or write.
    }
}

fn pollfd(socket: &impl AsRawFd) -> libc::pollfd {
    libc::pollfd {
        fd: socket.as_raw_fd(),
        events: 0,
        revents: 0,
    }
}

/// What a direction waits for after a [`Pipe::pump`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wants {
    /// Its source to become readable.
    Readable,
    /// Its destination to become writable.
    Writable,
    /// Nothing: it is done.
    Nothing,
    /// Nothing either, but it still has work: pump it again without waiting.
    Again,
}

/// A socket whose write half can be closed.
trait HalfClose {
    fn shutdown_write(&self) -> io::Result<()>;
}

impl HalfClose for TcpStream {
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

impl HalfClose for UnixStream {
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

/// One direction of a connection: a fixed buffer holding the bytes read from
/// the source and not yet written to the destination.
struct Pipe {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The source has reached EOF.
    eof: bool,
    /// ... and the EOF has been passed on to the destination.
    done: bool,
}

impl Pipe {
    fn new() -> Pipe {
        Pipe {
            buf: vec![0; BUF],
            start: 0,
            end: 0,
            eof: false,
            done: false,
        }
    }

    /// Moves bytes from `src` to `dst` (both non-blocking) until one of them
    /// would block, the direction is done, or it had [`ROUND`] turns.
    fn pump<S, D>(&mut self, src: &S, dst: &D) -> io::Result<Wants>
    where
        for<'a> &'a S: Read,
        for<'a> &'a D: Write,
        D: HalfClose,
    {
        for _ in 0..ROUND {
            if self.done {
                return Ok(Wants::Nothing);
            }
            if self.start < self.end {
                match (&mut &*dst).write(&self.buf[self.start..self.end]) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => self.start += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Wants::Writable),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            } else if self.eof {
                dst.shutdown_write()?;
                self.done = true;
            } else {
                match (&mut &*src).read(&mut self.buf) {
                    Ok(0) => self.eof = true,
                    Ok(n) => (self.start, self.end) = (0, n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Wants::Readable),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(if self.done {
            Wants::Nothing
        } else {
            Wants::Again
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A bridged pair: (agent's TCP end, broker's unix end), joined by
    /// `relay` on a thread.
    fn bridged() -> (TcpStream, UnixStream, thread::JoinHandle<io::Result<()>>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let agent = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (tcp, _) = listener.accept().expect("accept");
        let (unix, broker) = UnixStream::pair().expect("pair");
        let relay = thread::spawn(move || relay(&tcp, &unix));
        (agent, broker, relay)
    }

    #[test]
    fn the_peer_uid_is_read_from_its_socket_line() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:A1B2 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1000        0 1 1 0 20 4 30 10 -1\n\
   1: 0100007F:1F90 0100007F:A1B2 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1\n";
        let peer = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0xA1B2);
        let bridge = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0x1F90);
        assert_eq!(peer_uid(table, peer, bridge), Some(1000));
        assert_eq!(peer_uid(table, bridge, peer), Some(0));
        let other = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0xA1B3);
        assert_eq!(peer_uid(table, other, bridge), None);
        assert_eq!(peer_uid("", peer, bridge), None);
    }

    #[test]
    fn a_real_connection_of_this_process_is_ours() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let _client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (tcp, peer) = listener.accept().expect("accept");
        assert!(peer_is_ours(&tcp, peer));
    }

    #[test]
    fn half_closes_pass_and_the_other_direction_keeps_flowing() {
        let (mut agent, mut broker, relay) = bridged();
        agent.write_all(b"request").expect("write");
        agent.shutdown(Shutdown::Write).expect("half-close");
        let mut got = Vec::new();
        broker.read_to_end(&mut got).expect("broker reads to EOF");
        assert_eq!(got, b"request");
        // The agent's half-close did not end the response direction.
        broker.write_all(b"response").expect("write back");
        broker.shutdown(Shutdown::Write).expect("half-close");
        let mut got = Vec::new();
        agent.read_to_end(&mut got).expect("agent reads to EOF");
        assert_eq!(got, b"response");
        relay.join().expect("join").expect("clean end");
    }

    #[test]
    fn broker_closing_first_still_lets_the_agent_finish_sending() {
        let (mut agent, mut broker, relay) = bridged();
        broker.shutdown(Shutdown::Write).expect("half-close");
        let mut got = Vec::new();
        agent.read_to_end(&mut got).expect("EOF reaches the agent");
        assert!(got.is_empty());
        let data = vec![7u8; 3 * BUF + 5];
        agent.write_all(&data).expect("write after EOF");
        agent.shutdown(Shutdown::Write).expect("half-close");
        let mut got = Vec::new();
        broker.read_to_end(&mut got).expect("read");
        assert_eq!(got, data);
        relay.join().expect("join").expect("clean end");
    }

    #[test]
    fn a_reset_on_one_side_ends_both() {
        let (agent, mut broker, relay) = bridged();
        abort(&agent);
        drop(agent);
        let mut got = Vec::new();
        broker.read_to_end(&mut got).expect("EOF after the reset");
        assert!(relay.join().expect("join").is_err());
    }

    #[test]
    fn connecting_to_a_missing_socket_resets_the_agent() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut agent = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (tcp, _) = listener.accept().expect("accept");
        serve(tcp, Path::new("/nonexistent/turnstile/llm.sock"));
        let mut got = Vec::new();
        let err = agent.read_to_end(&mut got).expect_err("a reset, not EOF");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }

    #[test]
    fn serve_relays_through_a_real_unix_socket() {
        let dir = std::env::temp_dir().join(format!("shim-bridge-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("llm.sock");
        let _ = std::fs::remove_file(&path);
        let unix_listener = UnixListener::bind(&path).expect("bind unix");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut agent = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (tcp, _) = listener.accept().expect("accept");
        let server = {
            let path = path.clone();
            thread::spawn(move || serve(tcp, &path))
        };
        let (mut broker, _) = unix_listener.accept().expect("accept unix");
        agent.write_all(b"x").expect("write");
        agent.shutdown(Shutdown::Write).expect("half-close");
        let mut got = Vec::new();
        broker.read_to_end(&mut got).expect("read");
        broker.write_all(b"y").expect("write");
        drop(broker);
        let mut back = Vec::new();
        agent.read_to_end(&mut back).expect("read");
        server.join().expect("join");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!((got.as_slice(), back.as_slice()), (&b"x"[..], &b"y"[..]));
    }
}
