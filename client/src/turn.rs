//! One turn on the broker's `Turn` stream, with its LLM connections served.

use crate::forward::LlmForwarder;
use crate::input::TurnInput;
use crate::pb;
use crate::relay::LlmRelay;
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
                Some(pb::turn_event::Kind::Started(ref s)) => {
                    self.relay.started(s);
                    return Some(Ok(event));
                }
                _ => return Some(Ok(event)),
            }
        }
    }

    /// How many LLM connections the agent opened in this turn so far.
    pub fn llm_connections(&self) -> u64 {
        self.relay.opened()
    }
}
