//! The executor's end of a turn's LLM connections: each connection the
//! broker announces is joined to an in-memory stream that the forwarder
//! serves as HTTP/1.1.
//!
//! Per connection: a duplex pipe (the forwarder's HTTP server on one end),
//! a task moving bytes from the pipe to the broker as `data` frames (then
//! `eof`, or `reset` on error), and a task writing the broker's `data` into
//! the pipe (closing its write half on `eof`). The broker's frames reach the
//! writer through a small bounded queue, so a slow connection slows the turn
//! stream (and so the agent), never grows memory.

use crate::forward::LlmForwarder;
use crate::pb;
use crate::turn::TurnInput;
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Bytes buffered in each direction of the in-memory pipe.
const PIPE: usize = 256 * 1024;
/// Largest `data` frame sent to the broker.
const CHUNK: usize = 64 * 1024;
/// `data` frames from the broker queued for one connection before the turn
/// stream waits for it.
const QUEUE: usize = 8;

/// One connection: the queue to its writer, and its tasks.
struct Conn {
    /// `None` once the broker half-closed its direction.
    to_pipe: Option<mpsc::Sender<Bytes>>,
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

    /// Handles one frame from the broker. Waits only when the connection's
    /// queue is full (backpressure) or the request queue is.
    pub(crate) async fn handle(&mut self, frame: pb::LlmFrame) {
        let id = frame.conn;
        match frame.kind {
            Some(pb::llm_frame::Kind::Open(_)) => self.open(id).await,
            Some(pb::llm_frame::Kind::Data(data)) => {
                let Some(tx) = self.conns.get(&id).and_then(|c| c.to_pipe.as_ref()) else {
                    tracing::debug!(conn = id, "llm data for a closed connection dropped");
                    return;
                };
                if tx.send(data).await.is_err() {
                    // The HTTP side is gone; its reader task tells the broker.
                    tracing::debug!(conn = id, "llm data after the connection ended");
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
        let (tx, rx) = mpsc::channel(QUEUE);
        let serve = tokio::spawn(async move {
            if let Err(e) = forwarder.serve_connection(theirs).await {
                tracing::debug!(conn = id, "llm connection: {e}");
            }
        });
        let up = tokio::spawn(pipe_to_broker(id, read, self.input.clone()));
        let down = tokio::spawn(broker_to_pipe(rx, write));
        self.conns.insert(
            id,
            Conn {
                to_pipe: Some(tx),
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

/// The forwarder's bytes to the broker: `data` frames, then `eof` when the
/// server closed its side, or `reset` on an error.
async fn pipe_to_broker(id: u64, mut read: tokio::io::ReadHalf<DuplexStream>, input: TurnInput) {
    let mut buf = BytesMut::with_capacity(CHUNK);
    loop {
        buf.reserve(CHUNK);
        let kind = match read.read_buf(&mut buf).await {
            Ok(0) => pb::llm_frame::Kind::Eof(pb::LlmEof {}),
            Ok(_) => pb::llm_frame::Kind::Data(buf.split().freeze()),
            Err(e) => pb::llm_frame::Kind::Reset(pb::LlmReset {
                reason: e.to_string(),
            }),
        };
        let last = !matches!(kind, pb::llm_frame::Kind::Data(_));
        if input.llm(id, kind).await.is_err() || last {
            return;
        }
    }
}

/// The broker's bytes into the pipe, then its half-close.
async fn broker_to_pipe(
    mut rx: mpsc::Receiver<Bytes>,
    mut write: tokio::io::WriteHalf<DuplexStream>,
) {
    while let Some(data) = rx.recv().await {
        if write.write_all(&data).await.is_err() {
            return;
        }
    }
    let _ = write.shutdown().await;
}
