//! The LLM bridge: a TCP listener on 127.0.0.1 whose every connection is
//! joined, byte for byte, to a new connection on the turn's unix socket.
//!
//! Nothing is parsed: keep-alive, chunked bodies, SSE and large bodies pass
//! because the bridge only moves bytes. Half-closes are passed on (EOF read
//! on one side becomes `shutdown(Write)` on the other, and the other
//! direction keeps flowing until its own EOF); an error on either side ends
//! both, the TCP side with a reset.
//!
//! One thread, started before the agent, accepts and moves every
//! connection's bytes with one `poll` over non-blocking sockets. The jail's
//! pids budget counts threads, so the bridge costs it exactly one task, for
//! the whole turn: it never needs another (an agent at its process limit
//! cannot starve it of threads) and never takes one the agent could have
//! used (it cannot push the agent over its limit). The broker counts it
//! among the turn's supervisors. Each connection has one fixed buffer of
//! [`BUF`] bytes per direction, and none gets more than [`ROUND`] buffers a
//! direction before the others get a turn. The thread is detached: it never
//! keeps the shim alive, and dies with it when the turn ends. It inherits
//! the main thread's blocked signals, so only the main thread ever takes the
//! shim's signals. Every socket here is close-on-exec (std opens them so),
//! so the agent inherits none.
//!
//! Only the agent's own uid may connect: in direct mode the listener is on
//! the host's loopback, where any local user could otherwise reach the
//! model with the executor's credential. TCP has no `SO_PEERCRED`, so the
//! peer's uid is read from its socket's line in `/proc/net/tcp` (what
//! identd does); a connection from another uid, or one whose socket is
//! already gone, is reset before anything is forwarded.

use crate::pid1;
use nix::sys::socket::{setsockopt, sockopt};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};
use turnstile_shim::LlmBridge;

/// Bridged connections open at once; further ones are reset at accept.
pub const MAX_CONNS: usize = 64;
/// Copy buffer of one direction of one connection.
const BUF: usize = 64 * 1024;
/// Stack of the bridge's thread (the buffers are on the heap).
const STACK: usize = 64 * 1024;
/// Buffers moved in one direction before the other direction gets a turn.
const ROUND: usize = 16;
/// Pause in accepting after an accept error such as EMFILE, which would
/// otherwise repeat at once until some connection ends.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);

/// Binds 127.0.0.1:`llm.port` (0: an ephemeral port) and starts the
/// bridge's thread. Returns the port actually bound, for the agent's
/// environment. Call it from the main thread after the shim's signals are
/// blocked.
pub fn start(llm: &LlmBridge) -> Result<u16, String> {
    let listen_error = |e: io::Error| format!("cannot listen on 127.0.0.1:{}: {e}", llm.port);
    let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, llm.port))
        .map_err(listen_error)?;
    let port = listener.local_addr().map_err(listen_error)?.port();
    listener.set_nonblocking(true).map_err(listen_error)?;
    let bridge = Bridge::new(listener, PathBuf::from(&llm.socket_path));
    thread::Builder::new()
        .name("llm-bridge".into())
        .stack_size(STACK)
        .spawn(move || bridge.run())
        .map_err(|e| format!("cannot start the LLM bridge: {e}"))?;
    Ok(port)
}

/// The bridge's state: its listener, the unix socket each connection is
/// joined to, and the connections.
struct Bridge {
    listener: TcpListener,
    path: PathBuf,
    conns: Vec<Conn>,
    /// Accepting resumes then, after an accept error.
    paused_until: Option<Instant>,
}

impl Bridge {
    fn new(listener: TcpListener, path: PathBuf) -> Bridge {
        Bridge {
            listener,
            path,
            conns: Vec::new(),
            paused_until: None,
        }
    }

    /// Serves until the process ends (a failing `poll` is retried after a
    /// pause: the bridge has no one to report to but its connections).
    fn run(mut self) {
        loop {
            if self.round().is_err() {
                thread::sleep(ACCEPT_BACKOFF);
            }
        }
    }

    /// Moves what every connection can move, waits for what they wait for
    /// and for new connections, and accepts those.
    fn round(&mut self) -> io::Result<()> {
        let mut again = false;
        self.conns.retain_mut(|c| match c.step() {
            Ok(Step::Done) => false,
            Ok(Step::Again) => {
                again = true;
                true
            }
            Ok(Step::Wait) => true,
            Err(_) => {
                c.fail();
                false
            }
        });
        let now = Instant::now();
        let paused = self.paused_until.filter(|t| *t > now);
        self.paused_until = paused;
        let mut fds = Vec::with_capacity(1 + 2 * self.conns.len());
        let mut listener = pollfd(&self.listener);
        if paused.is_none() {
            listener.events = libc::POLLIN;
        } else {
            listener.fd = -1;
        }
        fds.push(listener);
        for c in &self.conns {
            fds.extend(c.pollfds());
        }
        let timeout = match paused {
            _ if again => 0,
            Some(t) => i32::try_from(t.duration_since(now).as_millis())
                .unwrap_or(i32::MAX)
                .max(1),
            None => -1,
        };
        pid1::poll(&mut fds, timeout)?;
        // A closed descriptor (never expected: the bridge owns them) fails
        // its connection at its next step.
        for (c, pair) in self.conns.iter_mut().zip(fds[1..].chunks(2)) {
            if pair.iter().any(|fd| fd.revents & libc::POLLNVAL != 0) {
                c.broken = true;
            }
        }
        if fds[0].revents & libc::POLLIN != 0 {
            self.accept_all();
        }
        Ok(())
    }

    /// Accepts every pending connection.
    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((tcp, peer)) => self.admit(tcp, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                // Out of descriptors or memory: wait for connections to end.
                Err(_) => {
                    self.paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    return;
                }
            }
        }
    }

    /// Joins an accepted connection to a new one on the unix socket, or
    /// resets it: a peer of another uid, one over [`MAX_CONNS`], a socket
    /// that cannot be reached.
    fn admit(&mut self, tcp: TcpStream, peer: std::net::SocketAddr) {
        if !peer_is_ours(&tcp, peer) || self.conns.len() >= MAX_CONNS {
            abort(&tcp);
            return;
        }
        match Conn::join(tcp, &self.path) {
            Ok(conn) => self.conns.push(conn),
            Err(tcp) => abort(&tcp),
        }
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

/// Makes the coming close of `tcp` a reset rather than a clean EOF.
fn abort(tcp: &TcpStream) {
    let reset = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ = setsockopt(tcp, sockopt::Linger, &reset);
}

/// What a connection's [`Conn::step`] leaves it waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Both directions have seen EOF and passed it on: it is over.
    Done,
    /// A direction still has work without waiting: step it again.
    Again,
    /// Its sockets' readiness ([`Conn::pollfds`]).
    Wait,
}

/// One bridged connection: the agent's TCP socket, the broker's unix
/// socket, and a buffer each way.
struct Conn {
    tcp: TcpStream,
    unix: UnixStream,
    /// agent -> broker
    up: Pipe,
    /// broker -> agent
    down: Pipe,
    up_wants: Wants,
    down_wants: Wants,
    /// A descriptor was found closed.
    broken: bool,
}

impl Conn {
    /// Connects to the unix socket at `path` for `tcp` (blocking: the
    /// broker's listener has room for every connection the bridge holds, so
    /// the connect does not wait for its accept); gives `tcp` back when it
    /// cannot.
    fn join(tcp: TcpStream, path: &std::path::Path) -> Result<Conn, TcpStream> {
        let Ok(unix) = UnixStream::connect(path) else {
            return Err(tcp);
        };
        let _ = tcp.set_nodelay(true);
        if tcp.set_nonblocking(true).is_err() || unix.set_nonblocking(true).is_err() {
            let _ = unix.shutdown(Shutdown::Both);
            return Err(tcp);
        }
        Ok(Conn::new(tcp, unix))
    }

    fn new(tcp: TcpStream, unix: UnixStream) -> Conn {
        Conn {
            tcp,
            unix,
            up: Pipe::new(),
            down: Pipe::new(),
            up_wants: Wants::Readable,
            down_wants: Wants::Readable,
            broken: false,
        }
    }

    /// Moves what both directions can move now.
    fn step(&mut self) -> io::Result<Step> {
        if self.broken {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
        self.up_wants = self.up.pump(&self.tcp, &self.unix)?;
        self.down_wants = self.down.pump(&self.unix, &self.tcp)?;
        Ok(if self.up.done && self.down.done {
            Step::Done
        } else if self.up_wants == Wants::Again || self.down_wants == Wants::Again {
            Step::Again
        } else {
            Step::Wait
        })
    }

    /// Ends the connection after an error: the agent sees a reset.
    fn fail(&self) {
        abort(&self.tcp);
        let _ = self.unix.shutdown(Shutdown::Both);
    }

    /// The `poll` entries of its two sockets (tcp, unix) for what its
    /// directions wait for.
    fn pollfds(&self) -> [libc::pollfd; 2] {
        let mut fds = [pollfd(&self.tcp), pollfd(&self.unix)];
        match self.up_wants {
            Wants::Readable => fds[0].events |= libc::POLLIN,
            Wants::Writable => fds[1].events |= libc::POLLOUT,
            Wants::Nothing | Wants::Again => {}
        }
        match self.down_wants {
            Wants::Readable => fds[1].events |= libc::POLLIN,
            Wants::Writable => fds[0].events |= libc::POLLOUT,
            Wants::Nothing | Wants::Again => {}
        }
        // poll reports hang-ups even when no event is asked for: a socket
        // with nothing to wait for must not be polled, or the loop spins.
        // Errors and hang-ups show up in the next read or write.
        for fd in &mut fds {
            if fd.events == 0 {
                fd.fd = -1;
            }
        }
        fds
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
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A bridge on its own thread, joined to a unix listener in a fresh
    /// temp dir: (its TCP address, the broker's listener, the dir).
    fn bridge() -> (std::net::SocketAddr, UnixListener, PathBuf) {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "shim-bridge-unit-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("llm.sock");
        let unix = UnixListener::bind(&path).expect("bind unix");
        let tcp = TcpListener::bind("127.0.0.1:0").expect("bind");
        tcp.set_nonblocking(true).expect("nonblocking");
        let addr = tcp.local_addr().expect("addr");
        let bridge = Bridge::new(tcp, path);
        thread::spawn(move || bridge.run());
        (addr, unix, dir)
    }

    /// A bridged pair: (agent's TCP end, broker's unix end), through a
    /// running bridge.
    fn bridged() -> (TcpStream, UnixStream, PathBuf) {
        let (addr, unix, dir) = bridge();
        let agent = TcpStream::connect(addr).expect("connect");
        let (broker, _) = unix.accept().expect("accept unix");
        (agent, broker, dir)
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
        let (mut agent, mut broker, dir) = bridged();
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
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn broker_closing_first_still_lets_the_agent_finish_sending() {
        let (mut agent, mut broker, dir) = bridged();
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
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_reset_on_one_side_ends_both() {
        let (agent, mut broker, dir) = bridged();
        abort(&agent);
        drop(agent);
        let mut got = Vec::new();
        // The bridge shuts the broker's side down: EOF (or a reset).
        let _ = broker.read_to_end(&mut got);
        assert!(got.is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_missing_socket_resets_the_agent() {
        let (addr, unix, dir) = bridge();
        drop(unix);
        std::fs::remove_dir_all(&dir).expect("rm");
        let mut agent = TcpStream::connect(addr).expect("connect");
        let mut got = Vec::new();
        let err = agent.read_to_end(&mut got).expect_err("a reset, not EOF");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }

    /// One thread serves many connections at once: each is joined to its
    /// own unix connection, and a connection whose broker side does not read
    /// holds up none of the others.
    #[test]
    fn one_thread_relays_many_connections_at_once() {
        let (addr, unix, dir) = bridge();
        let n = 12;
        let mut pairs: Vec<(TcpStream, UnixStream)> = (0..n)
            .map(|_| {
                let agent = TcpStream::connect(addr).expect("connect");
                let (broker, _) = unix.accept().expect("accept unix");
                (agent, broker)
            })
            .collect();
        // The first connection's broker never reads: its agent fills both
        // buffers and the socket queues, then blocks (on its own thread).
        let (stuck_agent, _stuck_broker) = pairs.remove(0);
        let stuck = thread::spawn(move || {
            let mut a = stuck_agent;
            let big = vec![1u8; 64 << 20];
            let _ = a.write_all(&big);
        });
        // Every other connection, interleaved: a request out, an answer back.
        for (i, (agent, _)) in pairs.iter_mut().enumerate() {
            agent
                .write_all(format!("req-{i}").as_bytes())
                .expect("write");
            agent.shutdown(Shutdown::Write).expect("half-close");
        }
        for (i, (agent, broker)) in pairs.iter_mut().enumerate() {
            let mut got = Vec::new();
            broker.read_to_end(&mut got).expect("read");
            assert_eq!(got, format!("req-{i}").as_bytes());
            broker
                .write_all(format!("ans-{i}").as_bytes())
                .expect("write");
            broker.shutdown(Shutdown::Write).expect("half-close");
            let mut back = Vec::new();
            agent.read_to_end(&mut back).expect("read");
            assert_eq!(back, format!("ans-{i}").as_bytes());
        }
        drop(_stuck_broker);
        stuck.join().expect("join");
        let _ = std::fs::remove_dir_all(dir);
    }
}
