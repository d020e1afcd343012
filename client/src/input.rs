//! What an executor sends into a running turn: stdin, signals and LLM
//! frames, through one cloneable handle. The turn driver and the LLM relay
//! both hold one; neither needs the other's types.

use crate::pb;
use bytes::Bytes;
use tokio::sync::mpsc;

/// The turn's stream ended: the broker is gone or the turn is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the turn is over")]
pub struct TurnGone;

/// Sends input to a running turn.
#[derive(Clone)]
pub struct TurnInput(pub(crate) mpsc::Sender<pb::TurnRequest>);

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
