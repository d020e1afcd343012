//! The turn's stdio relay: the agent's stdout and stderr pumped into the
//! turn's link as events (when the executors fall a journal behind, the
//! agent waits; no byte is lost), its stdin written from the link's queue,
//! its LLM relay started, and the drain once the jail is gone.

use super::link::Link;
use super::{Counters, RELAY_CHUNK, Turn};
use crate::jail::spawn::Child;
use crate::llm;
use bytes::{Bytes, BytesMut};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, warn};
use turnstile_proto::v1 as pb;

/// Kernel buffer of the agent's stdout/stderr pipes.
const PIPE_SIZE: i32 = 1 << 20;
/// After the jail is gone, how long an idle stdout/stderr may stay open
/// (held by a process that escaped the turn) before the relay gives up.
const DRAIN_IDLE: Duration = Duration::from_secs(2);
/// After the jail is gone, how long the relay goes on reading a pipe that a
/// process outside the turn still holds open and keeps busy; then the pipe
/// is cut and the turn ends with what was read (its `Exited` says so). A
/// pipe whose writers are all gone is always read to its end.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);
/// Most of the jail's stderr kept when no agent ran.
const EARLY_STDERR: u64 = 4096;
/// How long reading that stderr may take (the jail is gone: EOF is near).
const EARLY_STDERR_WAIT: Duration = Duration::from_secs(1);

/// The broker's ends of the jail's stdio pipes (which the shim hands on to
/// the agent).
#[derive(Debug, Default)]
pub(super) struct Stdio {
    pub stdin: Option<pipe::Sender>,
    pub stdout: Option<pipe::Receiver>,
    pub stderr: Option<pipe::Receiver>,
}

impl Stdio {
    /// Takes the pipes out of a spawned child.
    pub fn take(child: &mut Child) -> Stdio {
        Stdio {
            stdin: child.stdin.take(),
            stdout: child.stdout.take(),
            stderr: child.stderr.take(),
        }
    }

    /// Gives the pipes to the agent's host uid and gid. The agent may open
    /// /dev/stdout and friends by path (`echo >/dev/stderr`), which needs
    /// the pipes to belong to its uid. A pipe is one inode for both ends, so
    /// chowning the broker's end is enough; the agent has not started yet
    /// (it waits for GO).
    pub fn give_to(&self, (uid, gid): (u32, u32)) {
        let fds = [
            self.stdin.as_ref().map(|p| p.as_fd()),
            self.stdout.as_ref().map(|p| p.as_fd()),
            self.stderr.as_ref().map(|p| p.as_fd()),
        ];
        for fd in fds.into_iter().flatten() {
            let _ = nix::unistd::fchown(fd, Some(uid.into()), Some(gid.into()));
        }
    }
}

/// The start of what the jail wrote on stderr, trimmed; empty if it does
/// not reach EOF in time.
pub(super) async fn read_early(stderr: pipe::Receiver) -> String {
    let mut buf = Vec::new();
    let mut limited = stderr.take(EARLY_STDERR);
    let read = limited.read_to_end(&mut buf);
    match tokio::time::timeout(EARLY_STDERR_WAIT, read).await {
        Ok(_) => String::from_utf8_lossy(&buf).trim().to_string(),
        Err(_) => String::new(),
    }
}

/// The stdout and stderr pumps.
pub(super) struct Output {
    stdout: Option<JoinHandle<Pumped>>,
    stderr: Option<JoinHandle<Pumped>>,
    /// Ends reads on an idle pipe, once the drain has waited long enough.
    stop_idle: CancellationToken,
    /// Ends reads on a busy pipe that a writer still holds, at the drain's
    /// deadline.
    stop_busy: CancellationToken,
}

/// What one pump relayed, and whether it was cut while a writer still held
/// its pipe (what that writer writes from then on is not relayed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Pumped {
    pub bytes: u64,
    pub cut: bool,
}

/// What the drain relayed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Drained {
    pub stdout: u64,
    pub stderr: u64,
    /// A pipe was cut (idle or at the deadline) while a writer still held it.
    pub cut: bool,
}

impl Output {
    /// Starts pumping both pipes into `link`.
    pub fn start(
        stdout: Option<pipe::Receiver>,
        stderr: Option<pipe::Receiver>,
        link: &Arc<Link>,
    ) -> Output {
        let stop_idle = CancellationToken::new();
        let stop_busy = CancellationToken::new();
        let start = |r: pipe::Receiver, stderr: bool| {
            crate::process::grow_pipe(r.as_fd(), PIPE_SIZE);
            let stop = (stop_idle.clone(), stop_busy.clone());
            let pump = pump(r, link.clone(), stderr, stop);
            tokio::spawn(pump.in_current_span())
        };
        Output {
            stdout: stdout.map(|r| start(r, false)),
            stderr: stderr.map(|r| start(r, true)),
            stop_idle,
            stop_busy,
        }
    }

    /// Waits for both pipes' end, once the jail is gone: a pipe that stays
    /// open and idle for [`DRAIN_IDLE`], or open and busy past
    /// [`DRAIN_DEADLINE`] (held by a process that escaped the turn), is cut.
    pub async fn drain(self) -> Drained {
        self.drain_within(DRAIN_IDLE, DRAIN_DEADLINE).await
    }

    async fn drain_within(self, idle: Duration, deadline: Duration) -> Drained {
        let (stop_idle, stop_busy) = (self.stop_idle.clone(), self.stop_busy.clone());
        let timer = tokio::spawn(async move {
            tokio::time::sleep(idle).await;
            stop_idle.cancel();
            tokio::time::sleep(deadline.saturating_sub(idle)).await;
            stop_busy.cancel();
        });
        let mut drained = Drained::default();
        for (h, total) in [
            (self.stdout, &mut drained.stdout),
            (self.stderr, &mut drained.stderr),
        ] {
            if let Some(h) = h {
                let pumped = h.await.unwrap_or_default();
                *total = pumped.bytes;
                drained.cut |= pumped.cut;
            }
        }
        timer.abort();
        if drained.cut {
            warn!("a process outside the turn still held its output open; relay cut");
        }
        drained
    }
}

/// Whether every writer of the pipe `r` reads from is gone (`POLLHUP`): what
/// is left in it is all there will be.
fn writers_gone(r: std::os::fd::BorrowedFd<'_>) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(r, PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO).is_ok()
        && fds[0]
            .revents()
            .is_some_and(|e| e.intersects(PollFlags::POLLHUP | PollFlags::POLLERR))
}

/// Relays one output pipe into the link. Reads stop early only when
/// `stop_idle` fires while the pipe is idle, or once `stop_busy` has fired
/// while a writer still holds the pipe; sends wait for an executor that is
/// attached however slow it is (it slows the agent instead of losing
/// bytes), and give up after `stop_idle` only with none attached.
async fn pump<R: AsyncRead + AsFd + Unpin>(
    mut r: R,
    link: Arc<Link>,
    stderr: bool,
    (stop_idle, stop_busy): (CancellationToken, CancellationToken),
) -> Pumped {
    let mut total = 0u64;
    let mut buf = BytesMut::with_capacity(RELAY_CHUNK);
    loop {
        if stop_busy.is_cancelled() && !writers_gone(r.as_fd()) {
            return Pumped {
                bytes: total,
                cut: true,
            };
        }
        if buf.capacity() < RELAY_CHUNK / 4 {
            buf.reserve(RELAY_CHUNK);
        }
        let read = tokio::select! {
            biased;
            r = r.read_buf(&mut buf) => r,
            _ = stop_idle.cancelled() => {
                // Idle, but a writer may still write: what it would write
                // is not relayed.
                return Pumped {
                    bytes: total,
                    cut: !writers_gone(r.as_fd()),
                };
            }
        };
        let n = match read {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        total += n as u64;
        let chunk = buf.split().freeze();
        let kind = if stderr {
            pb::turn_event::Kind::Stderr(chunk)
        } else {
            pb::turn_event::Kind::Stdout(chunk)
        };
        if !link.send_output(kind, &stop_idle).await {
            warn!("output cut: no executor attached to take it, and the turn is over");
            break;
        }
    }
    Pumped {
        bytes: total,
        cut: false,
    }
}

/// Writes the executors' stdin bytes to the agent.
async fn stdin_writer(
    mut w: pipe::Sender,
    (mut rx, room): (mpsc::UnboundedReceiver<Bytes>, Arc<tokio::sync::Semaphore>),
) {
    while let Some(chunk) = rx.recv().await {
        if w.write_all(&chunk).await.is_err() {
            break;
        }
        room.add_permits(super::link::stdin_cost(&chunk) as usize);
    }
    // Whatever was queued has nowhere to go: its room is given back, so no
    // stream waits for an agent that is gone.
    room.close();
    // Dropping `w` closes the agent's stdin.
}

/// The running relay of a turn.
pub(super) struct StdioRelay {
    output: Output,
    link: Arc<Link>,
    llm: Option<Arc<llm::Relay>>,
    /// Broker-side forwarding of the agent's LLM connections, instead of
    /// `llm`.
    forwarding: Option<llm::Forwarding>,
}

impl StdioRelay {
    /// Drains the output once the jail is gone and stops the rest: the
    /// bytes relayed.
    pub async fn drain(self) -> Counters {
        let Drained {
            stdout,
            stderr,
            cut,
        } = self.output.drain().await;
        if let Some(r) = &self.llm {
            // No LLM frame may follow `Exited`.
            r.close();
        }
        if let Some(f) = &self.forwarding {
            // The turn's connections end with it, and with them its hold
            // on the forwarder (and the credential).
            f.close();
        }
        Counters {
            stdout,
            stderr,
            stdin: self.link.inputs.stdin_total.load(Ordering::Relaxed),
            output_cut: cut,
        }
    }
}

impl Turn {
    /// Starts relaying the jail's stdio and the agent's LLM connections
    /// (the executors' requests come through the link).
    pub(super) async fn relay(&self, stdio: Stdio, prepared: &super::Prepared) -> StdioRelay {
        let output = Output::start(stdio.stdout, stdio.stderr, &self.link);
        if let (Some(w), Some(queue)) = (stdio.stdin, self.link.inputs.take_stdin()) {
            tokio::spawn(stdin_writer(w, queue).in_current_span());
        }
        if let Some(up) = &self.spec.llm_upstream {
            // Broker-side forwarding: the executor's LLM frames have no
            // connection to go to.
            self.link.inputs.set_llm(None);
            return StdioRelay {
                output,
                link: self.link.clone(),
                llm: None,
                forwarding: self.forwarding(prepared, up),
            };
        }
        let llm = self.llm_relay(prepared).await;
        self.link.inputs.set_llm(llm.clone());
        StdioRelay {
            output,
            link: self.link.clone(),
            llm,
            forwarding: None,
        }
    }

    /// The agent's LLM connections served by the broker (broker-side
    /// forwarding); each request's summary becomes an `LlmRequest` event.
    fn forwarding(
        &self,
        prepared: &super::Prepared,
        up: &llm::upstream::TurnUpstream,
    ) -> Option<llm::Forwarding> {
        let listener = self.llm_listener(prepared, "LLM forwarding")?;
        // Weak: a connection the turn's end has not reaped yet keeps no
        // link alive.
        let link = Arc::downgrade(&self.link);
        let report: llm::upstream::Report = Arc::new(move |summary| {
            if let Some(link) = link.upgrade() {
                link.send(pb::turn_event::Kind::LlmRequest(summary));
            }
        });
        let max = self.broker.config.llm_max_connections;
        Some(llm::Forwarding::start(
            listener,
            up.forwarder.clone(),
            max,
            report,
        ))
    }

    /// The turn's LLM socket as a listener for `what`; if it cannot be
    /// had, the executor is told (the agent's LLM connections will fail:
    /// never drop them silently).
    fn llm_listener(
        &self,
        prepared: &super::Prepared,
        what: &str,
    ) -> Option<tokio::net::UnixListener> {
        let listener = prepared
            .llm
            .try_clone()
            .and_then(tokio::net::UnixListener::from_std);
        match listener {
            Ok(l) => Some(l),
            Err(e) => {
                warn!(error = %e, "{what} cannot listen for this turn");
                let message = format!("{what} is unavailable for this turn: {e}");
                self.link
                    .send(pb::turn_event::Kind::Notice(pb::Notice { message }));
                None
            }
        }
    }

    /// The LLM relay on the turn's socket; without one, the executor is
    /// told (the agent's LLM connections will fail: never drop the relay
    /// silently).
    async fn llm_relay(&self, prepared: &super::Prepared) -> Option<Arc<llm::Relay>> {
        let listener = self.llm_listener(prepared, "the LLM relay")?;
        let max = self.broker.config.llm_max_connections;
        Some(Arc::new(llm::Relay::start(
            listener,
            self.link.watch_attached(),
            max,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::turn::link::EventStream;
    use tokio_stream::StreamExt;

    fn pipe() -> (pipe::Receiver, std::os::fd::OwnedFd) {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        (pipe::Receiver::from_owned_fd(r).expect("receiver"), w)
    }

    /// A link (no journal) with a stream attached.
    fn link() -> (Arc<Link>, EventStream) {
        let link = Link::new(None, 0, mpsc::channel(1).0);
        let stream = link.attach(0).expect("attach").stream;
        (link, stream)
    }

    /// The stdout and stderr bytes of `n` events.
    async fn received(stream: &mut EventStream, n: usize) -> (Vec<u8>, Vec<u8>) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        for _ in 0..n {
            match stream.next().await.map(|e| e.map(|e| e.kind)) {
                Some(Ok(Some(pb::turn_event::Kind::Stdout(b)))) => out.extend_from_slice(&b),
                Some(Ok(Some(pb::turn_event::Kind::Stderr(b)))) => err.extend_from_slice(&b),
                other => panic!("unexpected event {other:?}"),
            }
        }
        (out, err)
    }

    #[tokio::test(start_paused = true)]
    async fn the_drain_relays_every_byte_up_to_eof() {
        let (link, mut stream) = link();
        let (out, out_w) = pipe();
        let (err, err_w) = pipe();
        nix::unistd::write(&out_w, b"hello world").expect("write");
        nix::unistd::write(&err_w, b"oops").expect("write");
        drop((out_w, err_w));
        let output = Output::start(Some(out), Some(err), &link);
        let drained = output.drain().await;
        assert_eq!(
            (drained.stdout, drained.stderr, drained.cut),
            (11, 4, false)
        );
        assert_eq!(
            received(&mut stream, 2).await,
            (b"hello world".to_vec(), b"oops".to_vec())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_pipe_held_open_by_an_escaped_process_is_cut_after_the_idle_time() {
        let (link, mut stream) = link();
        let (out, out_w) = pipe();
        let output = Output::start(Some(out), None, &link);
        nix::unistd::write(&out_w, b"before").expect("write");
        let began = tokio::time::Instant::now();
        // `out_w` stays open: the drain must not wait for its EOF.
        let drained = output.drain().await;
        // Its writer may still write: the turn is told its output was cut.
        assert_eq!((drained.stdout, drained.stderr, drained.cut), (6, 0, true));
        assert!(began.elapsed() >= DRAIN_IDLE, "cut before the idle time");
        assert_eq!(received(&mut stream, 1).await.0, b"before");
        drop(out_w);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_executor_loses_no_bytes_even_past_the_idle_time() {
        // The executor takes nothing for longer than the idle time, with
        // more output than the journal's cap: the pump waits (an executor
        // is attached), then relays the rest.
        let dir = tempfile::tempdir().expect("tempdir");
        let header = crate::journal::Header {
            session_id: "s".into(),
            turn_id: "t".into(),
            turn_key: String::new(),
            fingerprint: String::new(),
            created_unix_ms: 0,
        };
        let journal = crate::journal::Journal::create(&dir.path().join("t"), &header);
        let link = Link::new(
            Some(journal.expect("journal")),
            64 * 1024,
            mpsc::channel(1).0,
        );
        let attachment = link.attach(0).expect("attach");
        let mut stream = attachment.stream;
        // The stream's queue is full: nothing more is delivered until the
        // executor reads.
        while attachment
            .sink
            .try_send(Ok(pb::TurnEvent::default()))
            .is_ok()
        {}
        let (out, out_w) = pipe();
        crate::process::grow_pipe(out.as_fd(), PIPE_SIZE);
        let data = vec![b'y'; 512 * 1024];
        nix::unistd::write(&out_w, &data).expect("write");
        drop(out_w);
        let output = Output::start(Some(out), None, &link);
        let drain = tokio::spawn(output.drain());
        tokio::time::sleep(3 * DRAIN_IDLE).await;
        let mut got = 0;
        while got < data.len() {
            match stream.next().await.map(|e| e.map(|e| e.kind)) {
                Some(Ok(Some(pb::turn_event::Kind::Stdout(b)))) => got += b.len(),
                Some(Ok(None)) => {}
                other => panic!("unexpected event {other:?}"),
            }
        }
        assert_eq!(got, data.len());
        // Past the deadline too: its writer is gone, so the pipe is read
        // to its end.
        let drained = drain.await.expect("drain");
        assert!(3 * DRAIN_IDLE > DRAIN_DEADLINE);
        assert_eq!((drained.stdout, drained.cut), (data.len() as u64, false));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pipe_kept_busy_by_an_escaped_writer_is_cut_at_the_deadline() {
        // A writer that never pauses (as `yes` outside the turn would) and an
        // executor slower than it: the pipe is always full, never idle, so
        // only the deadline ends the drain. Real time, short limits.
        let (link, mut stream) = link();
        let (out, out_w) = pipe();
        let writer = std::thread::spawn(move || {
            let chunk = vec![b'y'; 64 * 1024];
            // Until the relay closes its end (EPIPE: SIGPIPE is ignored).
            while nix::unistd::write(&out_w, &chunk).is_ok() {}
        });
        let output = Output::start(Some(out), None, &link);
        let executor = tokio::spawn(async move {
            let mut n = 0;
            while let Some(Ok(ev)) = stream.next().await {
                if let Some(pb::turn_event::Kind::Stdout(b)) = ev.kind {
                    n += b.len();
                }
                // Pacing, not synchronisation: an executor that reads slowly.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            n
        });
        let drained = output
            .drain_within(Duration::from_millis(20), Duration::from_millis(200))
            .await;
        assert!(drained.cut, "{drained:?}");
        link.finish(pb::Exited::default());
        let relayed = executor.await.expect("executor") as u64;
        assert_eq!(relayed, drained.stdout);
        writer.join().expect("writer");
    }

    #[tokio::test(start_paused = true)]
    async fn early_stderr_is_trimmed_and_capped() {
        let (err, w) = pipe();
        nix::unistd::write(&w, b"  first\n").expect("write");
        nix::unistd::write(&w, &[b'x'; 10_000]).expect("write");
        let got = read_early(err).await;
        assert!(got.starts_with("first\n"), "{got:?}");
        assert_eq!(got.len(), EARLY_STDERR as usize - 2);
        drop(w);
    }
}
