//! The executor's end of a turn's LLM connections: each connection the
//! broker announces is joined to an in-memory stream that the forwarder
//! serves as HTTP/1.1.
//!
//! Per connection: a duplex pipe (the forwarder's HTTP server on one end),
//! a task moving bytes from the pipe to the broker as `data` frames (then
//! `eof`, or `reset` on error) within the broker's window, and a task
//! writing the broker's `data` into the pipe (closing its write half on
//! `eof`) and granting the window back as it goes (see [`crate::flow`]). So
//! the turn stream never waits for one connection, and a connection buffers
//! at most a window.

use crate::flow::{self, Credit, Grants, Inbox};
use crate::forward::LlmForwarder;
use crate::input::TurnInput;
use crate::pb;
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Bytes buffered in each direction of the in-memory pipe.
const PIPE: usize = 256 * 1024;
/// Largest `data` frame sent to the broker.
const CHUNK: usize = 64 * 1024;

/// One connection: the queue to its writer, flow control, and its tasks.
struct Conn {
    /// `None` once the broker half-closed its direction. Unbounded, but
    /// holds at most a window of bytes: `inbox` refuses more.
    to_pipe: Option<mpsc::UnboundedSender<Bytes>>,
    inbox: Inbox,
    /// Credit of the reader task (bytes the broker still accepts).
    credit: Credit,
    tasks: [JoinHandle<()>; 3],
}

impl Conn {
    fn finished(&self) -> bool {
        self.tasks.iter().all(JoinHandle::is_finished)
    }

    fn abort(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub(crate) struct LlmRelay {
    forwarder: Option<LlmForwarder>,
    input: TurnInput,
    conns: HashMap<u64, Conn>,
    opened: u64,
}

impl LlmRelay {
    pub(crate) fn new(forwarder: Option<LlmForwarder>, input: TurnInput) -> LlmRelay {
        LlmRelay {
            forwarder,
            input,
            conns: HashMap::new(),
            opened: 0,
        }
    }

    pub(crate) fn opened(&self) -> u64 {
        self.opened
    }

    /// The turn started: its agent profile says how the upstream takes the
    /// credential (see [`LlmForwarder::for_turn`]).
    pub(crate) fn started(&mut self, started: &pb::Started) {
        let header = crate::CredentialHeader::from_profile(started.llm_profile.as_ref());
        if let Some(f) = &mut self.forwarder {
            *f = f.for_turn(header);
        }
    }

    /// Ends every connection: they belonged to a stream that broke (the
    /// broker resets the agent's side of them).
    pub(crate) fn reset_all(&mut self) {
        for (_, c) in self.conns.drain() {
            c.abort();
        }
    }

    /// Handles one frame from the broker. Never waits for a connection;
    /// only for the request queue, when it sends a frame itself.
    pub(crate) async fn handle(&mut self, frame: pb::LlmFrame) {
        let id = frame.conn;
        match frame.kind {
            Some(pb::llm_frame::Kind::Open(_)) => self.open(id).await,
            Some(pb::llm_frame::Kind::Data(data)) => {
                let Some(c) = self.conns.get(&id) else {
                    tracing::debug!(conn = id, "llm data for a closed connection dropped");
                    return;
                };
                let Some(tx) = c.to_pipe.as_ref() else {
                    tracing::debug!(conn = id, "llm data after the broker's eof dropped");
                    return;
                };
                if !c.inbox.receive(data.len() as u64) {
                    self.violation(id, "data beyond its window").await;
                    return;
                }
                if tx.send(data).is_err() {
                    // The HTTP side is gone; its reader task tells the broker.
                    tracing::debug!(conn = id, "llm data after the connection ended");
                }
            }
            Some(pb::llm_frame::Kind::Window(w)) => {
                let Some(c) = self.conns.get(&id) else {
                    return;
                };
                if !c.credit.grant(w.bytes) {
                    self.violation(id, "a window grant beyond the window").await;
                }
            }
            Some(pb::llm_frame::Kind::Eof(_)) => {
                if let Some(c) = self.conns.get_mut(&id) {
                    c.to_pipe = None;
                }
            }
            Some(pb::llm_frame::Kind::Reset(r)) => {
                if let Some(c) = self.conns.remove(&id) {
                    tracing::debug!(conn = id, reason = %r.reason, "llm connection reset by the agent side");
                    c.abort();
                }
            }
            None => {}
        }
    }

    /// The broker broke the flow-control contract on `id`: reset it.
    async fn violation(&mut self, id: u64, what: &str) {
        tracing::warn!(conn = id, "llm connection reset: the broker sent {what}");
        if let Some(c) = self.conns.remove(&id) {
            c.abort();
        }
        let reason = format!("the executor received {what}");
        let _ = self
            .input
            .llm(id, pb::llm_frame::Kind::Reset(pb::LlmReset { reason }))
            .await;
    }

    async fn open(&mut self, id: u64) {
        self.opened += 1;
        self.conns.retain(|_, c| !c.finished());
        let Some(forwarder) = self.forwarder.clone() else {
            let reason = "no LLM upstream is configured for this turn".to_string();
            let _ = self
                .input
                .llm(id, pb::llm_frame::Kind::Reset(pb::LlmReset { reason }))
                .await;
            return;
        };
        let (ours, theirs) = tokio::io::duplex(PIPE);
        let (read, write) = tokio::io::split(ours);
        let (tx, rx) = mpsc::unbounded_channel();
        let serve = tokio::spawn(async move {
            if let Err(e) = forwarder.serve_connection(theirs).await {
                tracing::debug!(conn = id, "llm connection: {e}");
            }
        });
        let (inbox, credit) = (Inbox::default(), Credit::default());
        let up = tokio::spawn(pipe_to_broker(id, read, self.input.clone(), credit.clone()));
        let down = tokio::spawn(broker_to_pipe(
            id,
            rx,
            write,
            inbox.clone(),
            self.input.clone(),
        ));
        self.conns.insert(
            id,
            Conn {
                to_pipe: Some(tx),
                inbox,
                credit,
                tasks: [serve, up, down],
            },
        );
    }
}

impl Drop for LlmRelay {
    fn drop(&mut self) {
        for c in self.conns.values() {
            c.abort();
        }
    }
}

/// The forwarder's bytes to the broker, within the broker's window: `data`
/// frames, then `eof` when the server closed its side, or `reset` on an
/// error.
async fn pipe_to_broker(
    id: u64,
    mut read: tokio::io::ReadHalf<DuplexStream>,
    input: TurnInput,
    credit: Credit,
) {
    let mut buf = BytesMut::with_capacity(CHUNK);
    loop {
        let kind = flow::next_frame(&mut read, &credit, &mut buf, CHUNK).await;
        let last = !matches!(kind, pb::llm_frame::Kind::Data(_));
        if input.llm(id, kind).await.is_err() || last {
            return;
        }
    }
}

/// The broker's bytes into the pipe, granting the window back as they go;
/// then its half-close.
async fn broker_to_pipe(
    id: u64,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    mut write: tokio::io::WriteHalf<DuplexStream>,
    inbox: Inbox,
    input: TurnInput,
) {
    let mut grants = Grants::default();
    while let Some(data) = rx.recv().await {
        if write.write_all(&data).await.is_err() {
            return;
        }
        let n = data.len() as u64;
        inbox.handed_on(n);
        if let Some(bytes) = grants.add(n, rx.is_empty()) {
            let window = pb::llm_frame::Kind::Window(pb::LlmWindow { bytes });
            if input.llm(id, window).await.is_err() {
                return;
            }
        }
    }
    let _ = write.shutdown().await;
}
