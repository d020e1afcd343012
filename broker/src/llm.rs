//! The broker side of the LLM relay. The agent's only way out of the jail is
//! the turn's unix socket (`<turn>/llm.sock`, which the shim in a jail
//! reaches through the turn dir's descriptor as `/proc/self/fd/6/llm.sock`;
//! the shim bridges 127.0.0.1:<port> to it). Each
//! connection accepted there gets an id and is multiplexed over the turn's
//! gRPC stream as `LlmFrame`s: `open`, `data`, `eof` (half-close), `reset`.
//! Credentials are added on the executor side; nothing here parses HTTP.
//! With broker-side forwarding ([`upstream`]), the turn's connections are
//! served here instead, by a forwarder the binary installs ([`Forwarding`]).
//!
//! Flow control is per connection and direction (`turnstile_proto::flow`):
//! a connection reads from the agent only within the executor's window, and
//! buffers at most a window of the executor's bytes, granting it back as the
//! agent's socket takes them. So one slow connection never stalls the turn
//! stream (other connections, stdin, signals), and memory stays bounded.

use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, warn};
use turnstile_proto::flow::{self, Credit, Grants, Inbox};
use turnstile_proto::v1 as pb;

pub mod upstream;

/// Read size from an agent connection (and largest `data` frame).
const CHUNK: usize = 64 * 1024;

/// Where the relay sends its events (the LLM frames towards the executor):
/// the turn's event stream, which the relay is handed, not borrowed from
/// the turn's types.
pub type EventSink = mpsc::Sender<Result<pb::TurnEvent, tonic::Status>>;

/// The executor stream attached to the turn now: the relay's frames go to
/// it. Connections belong to the stream they were opened on: when it goes
/// (detached, or taken over), they are reset, since the executor side that
/// served them is gone; while no stream is attached, new connections wait
/// (up to [`WAIT_FOR_EXECUTOR`]).
#[derive(Debug, Clone)]
pub struct Attached {
    pub epoch: u64,
    pub sink: EventSink,
}

/// How long a connection the agent opens while no executor is attached
/// waits for one before it is refused.
pub const WAIT_FOR_EXECUTOR: std::time::Duration = std::time::Duration::from_secs(30);

enum ToAgent {
    Data(Bytes),
    Eof,
}

struct Conn {
    /// Unbounded, but holds at most a window of bytes: `inbox` refuses more.
    tx: Option<mpsc::UnboundedSender<ToAgent>>,
    inbox: Inbox,
    /// The reader's credit: bytes the executor still accepts.
    credit: Credit,
    reader: tokio::task::AbortHandle,
    writer: tokio::task::AbortHandle,
    /// Directions finished (0..=2); the connection is forgotten at 2.
    halves_done: u8,
    gate: Gate,
    /// The stream the connection was opened on.
    epoch: u64,
}

/// Orders a connection's frames towards the executor around its reset:
/// the reader sends each frame holding the gate and only while it is open;
/// a reset closes it and is sent holding it. An abort alone would not do:
/// the reader may be mid-send on another thread when the reset goes out.
#[derive(Clone, Default)]
struct Gate(Arc<tokio::sync::Mutex<bool>>);

impl Gate {
    /// Sends `event` unless the connection was reset; `false` if it was (or
    /// the stream is gone).
    async fn send(&self, events: &EventSink, event: Result<pb::TurnEvent, tonic::Status>) -> bool {
        let closed = self.0.lock().await;
        !*closed && events.send(event).await.is_ok()
    }

    /// Closes the gate and sends the reset through it: no frame of the
    /// connection follows.
    async fn reset(&self, events: &EventSink, conn: u64, reason: String) {
        let mut closed = self.0.lock().await;
        *closed = true;
        let reset = pb::llm_frame::Kind::Reset(pb::LlmReset { reason });
        let _ = events.send(frame(conn, reset)).await;
    }
}

impl Conn {
    /// Stops both directions' tasks.
    fn abort(&self) {
        self.reader.abort();
        self.writer.abort();
    }
}

/// One turn's relay: the listener's accept loop and its connections.
pub struct Relay {
    conns: Arc<Mutex<HashMap<u64, Conn>>>,
    /// Connections the broker reset: the executor's frames still in flight
    /// for them are dropped without a notice.
    gone: Arc<Mutex<HashSet<u64>>>,
    attached: watch::Receiver<Option<Attached>>,
    accept: tokio::task::AbortHandle,
    follow: tokio::task::AbortHandle,
}

fn frame(conn: u64, kind: pb::llm_frame::Kind) -> Result<pb::TurnEvent, tonic::Status> {
    Ok(pb::TurnEvent {
        kind: Some(pb::turn_event::Kind::Llm(pb::LlmFrame {
            conn,
            kind: Some(kind),
        })),
        seq: 0,
    })
}

/// Binds the turn's socket, reachable only by the agent's uid.
pub fn bind(
    path: &Path,
    owner: Option<(u32, u32)>,
) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    }
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// What the accept loop and every connection's tasks share with the relay.
#[derive(Clone)]
struct Shared {
    conns: Arc<Mutex<HashMap<u64, Conn>>>,
    gone: Arc<Mutex<HashSet<u64>>>,
}

/// One connection as each of its two tasks sees it.
#[derive(Clone)]
struct ConnTask {
    shared: Shared,
    id: u64,
    gate: Gate,
    /// The stream it was opened on.
    events: EventSink,
}

impl Relay {
    /// Starts accepting the agent's connections (at most `max_conns` at once).
    pub fn start(
        listener: UnixListener,
        attached: watch::Receiver<Option<Attached>>,
        max_conns: usize,
    ) -> Relay {
        let shared = Shared {
            conns: Arc::default(),
            gone: Arc::default(),
        };
        let accept = accept_loop(listener, shared.clone(), attached.clone(), max_conns);
        let accept = tokio::spawn(accept.in_current_span()).abort_handle();
        let follow = follow_streams(shared.clone(), attached.clone());
        let follow = tokio::spawn(follow.in_current_span()).abort_handle();
        Relay {
            conns: shared.conns,
            gone: shared.gone,
            attached,
            accept,
            follow,
        }
    }

    /// The sink of the stream attached now.
    fn sink(&self) -> Option<EventSink> {
        self.attached.borrow().as_ref().map(|a| a.sink.clone())
    }
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("open", &self.open())
            .finish_non_exhaustive()
    }
}

/// Resets the connections of a stream that is no longer attached.
async fn follow_streams(shared: Shared, mut attached: watch::Receiver<Option<Attached>>) {
    while attached.changed().await.is_ok() {
        let epoch = attached.borrow_and_update().as_ref().map(|a| a.epoch);
        let stale: Vec<Conn> = match shared.conns.lock() {
            Ok(mut m) => {
                let ids: Vec<u64> = m
                    .iter()
                    .filter(|(_, c)| Some(c.epoch) != epoch)
                    .map(|(id, _)| *id)
                    .collect();
                ids.iter().filter_map(|id| m.remove(id)).collect()
            }
            Err(_) => Vec::new(),
        };
        if !stale.is_empty() {
            debug!(
                conns = stale.len(),
                "llm connections reset: their executor stream is gone"
            );
        }
        for c in stale {
            c.abort();
        }
    }
}

/// Accepts the agent's connections until the listener fails (or the relay
/// is closed), refusing those over `max_conns`.
async fn accept_loop(
    listener: UnixListener,
    shared: Shared,
    mut attached: watch::Receiver<Option<Attached>>,
    max_conns: usize,
) {
    let mut next_id = 1u64;
    let mut per_conn = JoinSet::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "llm socket accept failed");
                    break;
                }
            },
            Some(_) = per_conn.join_next(), if !per_conn.is_empty() => continue,
        };
        let open = shared.conns.lock().map(|m| m.len()).unwrap_or(usize::MAX);
        if open >= max_conns {
            warn!(
                limit = max_conns,
                "llm connection refused: too many open connections"
            );
            drop(stream);
            continue;
        }
        // While no executor is attached, the connection waits for one; a
        // stream that goes as the connection opens hands it to the next.
        let id = next_id;
        next_id += 1;
        let mut stream = Some(stream);
        let placed = tokio::time::timeout(WAIT_FOR_EXECUTOR, async {
            while let Some(s) = stream.take() {
                let current = attached.wait_for(Option::is_some).await.ok()?.clone()?;
                if current.sink.is_closed() {
                    // Gone, and not yet seen detached: wait for what is next.
                    stream = Some(s);
                    attached.changed().await.ok()?;
                    continue;
                }
                let conn = (current.epoch, current.sink);
                if let Err(s) = shared.add_conn(id, s, conn, &attached, &mut per_conn) {
                    stream = Some(s);
                }
            }
            Some(())
        });
        match placed.await {
            Ok(Some(())) => {}
            Ok(None) => break,
            Err(_) => warn!("llm connection refused: no executor attached to the turn"),
        }
    }
    per_conn.shutdown().await;
}

impl Shared {
    /// Starts both directions of connection `id` and registers it, unless
    /// the stream of `epoch` is no longer attached by then: checked under
    /// the map's lock, which [`follow_streams`] takes after each change, so
    /// no connection of a gone stream stays. The connection comes back then.
    fn add_conn(
        &self,
        id: u64,
        stream: UnixStream,
        (epoch, events): (u64, EventSink),
        attached: &watch::Receiver<Option<Attached>>,
        per_conn: &mut JoinSet<()>,
    ) -> Result<(), UnixStream> {
        let Ok(mut m) = self.conns.lock() else {
            return Err(stream);
        };
        if attached.borrow().as_ref().map(|a| a.epoch) != Some(epoch) {
            return Err(stream);
        }
        let (rd, wr) = stream.into_split();
        let (tx, rx) = mpsc::unbounded_channel::<ToAgent>();
        let (inbox, credit) = (Inbox::default(), Credit::default());
        let task = ConnTask {
            shared: self.clone(),
            id,
            gate: Gate::default(),
            events,
        };
        // The reader announces the connection (`open`, before any of its
        // data) once it is in the map, so that the executor's first answer,
        // which can come right after, finds it.
        let (announce, announced) = tokio::sync::oneshot::channel::<()>();
        let reader = task
            .clone()
            .relay_agent_bytes(rd, credit.clone(), announced);
        let reader = per_conn.spawn(reader.in_current_span());
        let writer = task.clone().relay_executor_bytes(wr, rx, inbox.clone());
        let writer = per_conn.spawn(writer.in_current_span());
        m.insert(
            id,
            Conn {
                tx: Some(tx),
                inbox,
                credit,
                reader,
                writer,
                halves_done: 0,
                gate: task.gate,
                epoch,
            },
        );
        drop(m);
        debug!(conn = id, "llm connection opened");
        let _ = announce.send(());
        Ok(())
    }
}

impl ConnTask {
    /// Agent → executor: `open`, then the agent's bytes within the
    /// executor's window, then `eof` or `reset`; nothing after a reset.
    async fn relay_agent_bytes(
        self,
        mut rd: OwnedReadHalf,
        credit: Credit,
        announced: tokio::sync::oneshot::Receiver<()>,
    ) {
        let (id, events) = (self.id, &self.events);
        let open = frame(id, pb::llm_frame::Kind::Open(pb::LlmOpen {}));
        if announced.await.is_err() || !self.gate.send(events, open).await {
            finish_half(&self.shared.conns, id);
            return;
        }
        let mut buf = BytesMut::with_capacity(CHUNK);
        loop {
            let kind = flow::next_frame(&mut rd, &credit, &mut buf, CHUNK).await;
            let last = !matches!(kind, pb::llm_frame::Kind::Data(_));
            if !self.gate.send(events, frame(id, kind)).await || last {
                break;
            }
        }
        finish_half(&self.shared.conns, id);
    }

    /// Executor → agent: the executor's bytes, with window grants back as
    /// the agent's socket takes them, until `eof`.
    async fn relay_executor_bytes(
        self,
        mut wr: OwnedWriteHalf,
        mut rx: mpsc::UnboundedReceiver<ToAgent>,
        inbox: Inbox,
    ) {
        let mut grants = Grants::default();
        while let Some(msg) = rx.recv().await {
            let b = match msg {
                ToAgent::Data(b) => b,
                ToAgent::Eof => break,
            };
            if let Err(e) = wr.write_all(&b).await {
                return self.agent_gone(e).await;
            }
            let n = b.len() as u64;
            inbox.handed_on(n);
            if let Some(bytes) = grants.add(n, rx.is_empty()) {
                let w = pb::llm_frame::Kind::Window(pb::LlmWindow { bytes });
                if self.events.send(frame(self.id, w)).await.is_err() {
                    break;
                }
            }
        }
        let _ = wr.shutdown().await;
        finish_half(&self.shared.conns, self.id);
    }

    /// The agent's side of the connection is gone: the executor is told,
    /// and what it sent meanwhile is dropped.
    async fn agent_gone(&self, e: std::io::Error) {
        let (id, shared) = (self.id, &self.shared);
        let reason = format!("the agent's connection closed: {e}");
        debug!(conn = id, %reason, "llm connection reset");
        let c = forget(&shared.conns, &shared.gone, id);
        self.gate.reset(&self.events, id, reason).await;
        if let Some(c) = c {
            c.reader.abort();
        }
    }
}

impl Relay {
    async fn notice(&self, message: String) {
        warn!(%message, "llm frame refused");
        if let Some(sink) = self.sink() {
            let _ = sink
                .send(Ok(pb::TurnEvent {
                    kind: Some(pb::turn_event::Kind::Notice(pb::Notice { message })),
                    seq: 0,
                }))
                .await;
        }
    }

    /// Handles one frame from the executor; never waits for a connection.
    /// Frames for unknown or closed connections get a notice, and so does
    /// a broken window (that connection is reset); the turn goes on.
    pub async fn from_executor(&self, f: pb::LlmFrame) {
        let conn = f.conn;
        let found = self.conns.lock().ok().and_then(|m| {
            m.get(&conn)
                .map(|c| (c.tx.clone(), c.inbox.clone(), c.credit.clone()))
        });
        let Some((tx, inbox, credit)) = found else {
            if self.gone.lock().map(|g| g.contains(&conn)).unwrap_or(false) {
                debug!(conn, "llm frame for a connection the broker reset, dropped");
                return;
            }
            return self
                .notice(format!("llm frame for unknown or closed connection {conn}"))
                .await;
        };
        match f.kind {
            Some(pb::llm_frame::Kind::Data(b)) => {
                let Some(tx) = tx else {
                    return self
                        .notice(format!(
                            "llm data for connection {conn} after its executor side was closed"
                        ))
                        .await;
                };
                if !inbox.receive(b.len() as u64) {
                    return self
                        .violation(conn, "llm data beyond the connection's window")
                        .await;
                }
                // A closed queue means the agent's side is gone; its reader
                // reports that (eof or reset).
                let _ = tx.send(ToAgent::Data(b));
            }
            Some(pb::llm_frame::Kind::Window(w)) => {
                if !credit.grant(w.bytes) {
                    self.violation(conn, "llm window grant beyond the window")
                        .await;
                }
            }
            Some(pb::llm_frame::Kind::Eof(_)) => {
                if let Some(tx) = &tx {
                    let _ = tx.send(ToAgent::Eof);
                }
                if let Ok(mut m) = self.conns.lock()
                    && let Some(c) = m.get_mut(&conn)
                {
                    c.tx = None;
                }
            }
            Some(pb::llm_frame::Kind::Reset(_)) => self.drop_conn(conn),
            Some(pb::llm_frame::Kind::Open(_)) | None => {
                self.notice(format!(
                    "llm frame for connection {conn} has no data, eof, reset or window"
                ))
                .await
            }
        }
    }

    fn drop_conn(&self, conn: u64) {
        if let Some(c) = self.conns.lock().ok().and_then(|mut m| m.remove(&conn)) {
            c.abort();
        }
    }

    /// The executor broke the flow-control contract: the connection is
    /// reset on both sides, and a notice says why.
    async fn violation(&self, conn: u64, what: &str) {
        let gate = forget(&self.conns, &self.gone, conn).map(|c| {
            c.abort();
            c.gate
        });
        let reason = format!("{what}; connection {conn} reset");
        if let Some(sink) = self.sink() {
            gate.unwrap_or_default()
                .reset(&sink, conn, reason.clone())
                .await;
        }
        self.notice(reason).await;
    }

    /// Number of open connections.
    pub fn open(&self) -> usize {
        self.conns.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Ends every connection and the accept loop.
    pub fn close(&self) {
        self.accept.abort();
        self.follow.abort();
        if let Ok(mut m) = self.conns.lock() {
            for (_, c) in m.drain() {
                c.abort();
            }
        }
    }
}

/// Removes a connection the broker resets, remembering its id as gone.
fn forget(conns: &Mutex<HashMap<u64, Conn>>, gone: &Mutex<HashSet<u64>>, id: u64) -> Option<Conn> {
    if let Ok(mut g) = gone.lock() {
        g.insert(id);
    }
    conns.lock().ok().and_then(|mut m| m.remove(&id))
}

/// Marks one direction of a connection done; forgets the connection when
/// both are.
fn finish_half(conns: &Mutex<HashMap<u64, Conn>>, id: u64) {
    if let Ok(mut m) = conns.lock()
        && let Some(c) = m.get_mut(&id)
    {
        c.halves_done += 1;
        if c.halves_done >= 2 {
            m.remove(&id);
        }
    }
}

/// A turn's LLM connections served by the broker itself (broker-side
/// forwarding, see [`upstream`]): each connection accepted on the turn's
/// socket is handed to the turn's forwarder; no frame goes to the executor,
/// only each request's summary through `report`.
pub struct Forwarding {
    accept: tokio::task::AbortHandle,
    conns: Arc<Mutex<JoinSet<()>>>,
}

impl std::fmt::Debug for Forwarding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarding").finish_non_exhaustive()
    }
}

impl Forwarding {
    /// Starts accepting the agent's connections (at most `max_conns` at
    /// once; the next is closed and logged).
    pub fn start(
        listener: UnixListener,
        forwarder: Arc<dyn upstream::TurnForwarder>,
        max_conns: usize,
        report: upstream::Report,
    ) -> Forwarding {
        let conns: Arc<Mutex<JoinSet<()>>> = Arc::default();
        let set = conns.clone();
        let accept = async move {
            let mut next_id = 1u64;
            loop {
                let stream = match listener.accept().await {
                    Ok((s, _)) => s,
                    Err(e) => {
                        warn!(error = %e, "llm socket accept failed");
                        break;
                    }
                };
                let Ok(mut set) = set.lock() else { break };
                while set.try_join_next().is_some() {}
                if set.len() >= max_conns {
                    warn!(
                        limit = max_conns,
                        "llm connection refused: too many open connections"
                    );
                    continue;
                }
                let id = next_id;
                next_id += 1;
                debug!(conn = id, "llm connection opened (forwarded by the broker)");
                let serve = forwarder.serve(stream, report.clone());
                set.spawn(serve.in_current_span());
            }
        };
        let accept = tokio::spawn(accept.in_current_span()).abort_handle();
        Forwarding { accept, conns }
    }

    /// Stops accepting and ends every connection (with them the turn's last
    /// handles on its forwarder, and so on the credential).
    pub fn close(&self) {
        self.accept.abort();
        if let Ok(mut set) = self.conns.lock() {
            set.abort_all();
        }
    }
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        self.close();
    }
}
