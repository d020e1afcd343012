//! One turn on the broker's `Turn` stream, with its LLM connections served.

use crate::forward::LlmForwarder;
use crate::pb;
use crate::relay::LlmRelay;
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

/// Requests queued towards the broker before a sender waits: with the
/// stream's own flow control, this is what bounds memory when the broker
/// (or the agent behind it) reads slower than the executor writes.
const REQUEST_QUEUE: usize = 16;

/// A running turn.
///
/// Events are read with [`Turn::next`], which also serves the turn's LLM
/// connections: frames for them never come out of it, so the relay only
/// moves while the caller keeps reading events (which it must do anyway to
/// see the agent's output and its `Exited`). Input goes through
/// [`Turn::input`]. Dropping the turn drops the stream, which the broker
/// takes as the executor going away: it ends the turn and kills the agent.
pub struct Turn {
    events: tonic::Streaming<pb::TurnEvent>,
    input: TurnInput,
    relay: LlmRelay,
}

impl Turn {
    /// Sends `start` and opens the stream. A refusal (busy session, invalid
    /// id, payload too large, ...) is the error status, and nothing ran.
    /// Without a forwarder, every LLM connection the agent opens is reset
    /// with a reason saying so.
    pub async fn start(
        client: &mut pb::broker_client::BrokerClient<Channel>,
        start: pb::Start,
        forwarder: Option<LlmForwarder>,
    ) -> Result<Turn, tonic::Status> {
        let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
        let input = TurnInput(tx);
        input
            .send(pb::turn_request::Kind::Start(start))
            .await
            .map_err(|_| tonic::Status::internal("request queue closed"))?;
        let events = client
            .turn(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        let relay = LlmRelay::new(forwarder, input.clone());
        Ok(Turn {
            events,
            input,
            relay,
        })
    }

    /// A handle to send stdin, its EOF and signals; it can be cloned and
    /// moved to other tasks.
    pub fn input(&self) -> TurnInput {
        self.input.clone()
    }

    /// The next event of the turn other than an LLM frame; `None` after the
    /// stream ended (normally right after `Exited`).
    pub async fn next(&mut self) -> Option<Result<pb::TurnEvent, tonic::Status>> {
        loop {
            let event = match self.events.next().await? {
                Ok(event) => event,
                Err(status) => return Some(Err(status)),
            };
            match event.kind {
                Some(pb::turn_event::Kind::Llm(frame)) => self.relay.handle(frame).await,
                _ => return Some(Ok(event)),
            }
        }
    }

    /// How many LLM connections the agent opened in this turn so far.
    pub fn llm_connections(&self) -> u64 {
        self.relay.opened()
    }
}

/// The turn's stream ended: the broker is gone or the turn is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the turn is over")]
pub struct TurnGone;

/// Sends input to a running turn.
#[derive(Clone)]
pub struct TurnInput(mpsc::Sender<pb::TurnRequest>);

impl TurnInput {
    pub(crate) async fn send(&self, kind: pb::turn_request::Kind) -> Result<(), TurnGone> {
        self.0
            .send(pb::TurnRequest { kind: Some(kind) })
            .await
            .map_err(|_| TurnGone)
    }

    /// Bytes for the agent's stdin.
    pub async fn stdin(&self, data: Bytes) -> Result<(), TurnGone> {
        self.send(pb::turn_request::Kind::Stdin(data)).await
    }

    /// Closes the agent's stdin.
    pub async fn close_stdin(&self) -> Result<(), TurnGone> {
        self.send(pb::turn_request::Kind::StdinEof(pb::StdinEof {}))
            .await
    }

    /// Delivers a signal to the agent.
    pub async fn signal(&self, signal: pb::signal_request::Signal) -> Result<(), TurnGone> {
        self.send(pb::turn_request::Kind::Signal(pb::SignalRequest {
            signal: signal as i32,
        }))
        .await
    }

    pub(crate) async fn llm(&self, conn: u64, kind: pb::llm_frame::Kind) -> Result<(), TurnGone> {
        self.send(pb::turn_request::Kind::Llm(pb::LlmFrame {
            conn,
            kind: Some(kind),
        }))
        .await
    }
}
