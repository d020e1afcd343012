//! One turn on the broker's `Turn` stream, with its LLM connections served,
//! resumed from the last event seen when the stream breaks.

use crate::forward::LlmForwarder;
use crate::input::TurnInput;
use crate::pb;
use crate::relay::LlmRelay;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

/// Requests queued towards the broker before a sender waits: with the
/// stream's own flow control, this is what bounds memory when the broker
/// (or the agent behind it) reads slower than the executor writes.
const REQUEST_QUEUE: usize = 16;

/// How a turn whose stream breaks is resumed: the stream is opened again
/// with an `Attach` from the last event seen, up to `retries` times in a
/// row, `backoff` × the attempt apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    pub retries: u32,
    pub backoff: Duration,
}

impl Default for Resume {
    fn default() -> Self {
        Resume {
            retries: 5,
            backoff: Duration::from_millis(200),
        }
    }
}

impl Resume {
    /// No resuming: a broken stream is the end of the turn for this client.
    pub const NEVER: Resume = Resume {
        retries: 0,
        backoff: Duration::ZERO,
    };
}

/// A running turn.
///
/// Events are read with [`Turn::next`], which also serves the turn's LLM
/// connections: frames for them never come out of it, so the relay only
/// moves while the caller keeps reading events (which it must do anyway to
/// see the agent's output and its `Exited`). Input goes through
/// [`Turn::input`].
///
/// When the stream breaks (the connection to the broker is lost), `next`
/// opens it again with an `Attach` from the last `seq` it returned (see
/// [`Resume`]): no event is returned twice or skipped. The turn's LLM
/// connections do not survive that (the agent sees them reset and retries),
/// and input sent while the stream was breaking may be lost. Dropping the
/// turn drops the stream: the broker keeps the turn running for its detach
/// grace, for an executor to attach again ([`Turn::attach`]).
pub struct Turn {
    client: pb::broker_client::BrokerClient<Channel>,
    events: tonic::Streaming<pb::TurnEvent>,
    input: TurnInput,
    /// The stable end of the input, moved into each stream by `pump`.
    requests: Arc<tokio::sync::Mutex<mpsc::Receiver<pb::TurnRequest>>>,
    /// A request taken from `requests` and not yet handed to a stream.
    held: Arc<Mutex<Option<pb::TurnRequest>>>,
    pump: JoinHandle<()>,
    relay: LlmRelay,
    /// What a resume attaches to.
    session_id: String,
    turn_id: String,
    turn_key: String,
    last_seq: u64,
    resume: Resume,
    resumes: u64,
}

impl Turn {
    /// Sends `start` and opens the stream. A refusal (busy session, invalid
    /// id, payload too large, ...) is the error status, and nothing ran.
    /// Without a forwarder, every LLM connection the agent opens is reset
    /// with a reason saying so. With `start.turn_key` set, a `Start` that
    /// names a running turn attaches to it, and one that names an ended turn
    /// replays it.
    pub async fn start(
        client: &mut pb::broker_client::BrokerClient<Channel>,
        start: pb::Start,
        forwarder: Option<LlmForwarder>,
    ) -> Result<Turn, tonic::Status> {
        let (session_id, turn_id, turn_key) = (
            start.session_id.clone(),
            start.turn_id.clone(),
            start.turn_key.clone(),
        );
        let first = pb::turn_request::Kind::Start(start);
        Turn::open(client, first, forwarder, (session_id, turn_id, turn_key)).await
    }

    /// Joins a turn that runs (or ran) on the broker: every event after
    /// `attach.after_seq`, then the live ones. The stream attached before,
    /// if any, ends with ABORTED.
    pub async fn attach(
        client: &mut pb::broker_client::BrokerClient<Channel>,
        attach: pb::Attach,
        forwarder: Option<LlmForwarder>,
    ) -> Result<Turn, tonic::Status> {
        let ids = (
            attach.session_id.clone(),
            attach.turn_id.clone(),
            attach.turn_key.clone(),
        );
        let after = attach.after_seq;
        let first = pb::turn_request::Kind::Attach(attach);
        let mut turn = Turn::open(client, first, forwarder, ids).await?;
        turn.last_seq = after;
        Ok(turn)
    }

    async fn open(
        client: &mut pb::broker_client::BrokerClient<Channel>,
        first: pb::turn_request::Kind,
        forwarder: Option<LlmForwarder>,
        (session_id, turn_id, turn_key): (String, String, String),
    ) -> Result<Turn, tonic::Status> {
        let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
        let input = TurnInput(tx);
        let requests = Arc::new(tokio::sync::Mutex::new(rx));
        let held = Arc::default();
        let (events, pump) = connect(client, first, &requests, &held).await?;
        let relay = LlmRelay::new(forwarder, input.clone());
        Ok(Turn {
            client: client.clone(),
            events,
            input,
            requests,
            held,
            pump,
            relay,
            session_id,
            turn_id,
            turn_key,
            last_seq: 0,
            resume: Resume::default(),
            resumes: 0,
        })
    }

    /// How a broken stream is resumed (default: [`Resume::default`]).
    pub fn set_resume(&mut self, resume: Resume) {
        self.resume = resume;
    }

    /// A handle to send stdin, its EOF and signals; it can be cloned and
    /// moved to other tasks, and it keeps working across resumes.
    pub fn input(&self) -> TurnInput {
        self.input.clone()
    }

    /// The `seq` of the last event returned (what a new `Attach` passes on).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The turn's id, once known (from `Start`, `Attach` or `Started`).
    pub fn turn_id(&self) -> &str {
        &self.turn_id
    }

    /// How many times the stream was opened again after breaking.
    pub fn resumes(&self) -> u64 {
        self.resumes
    }

    /// The next event of the turn other than an LLM frame; `None` after the
    /// stream ended (normally right after `Exited`).
    pub async fn next(&mut self) -> Option<Result<pb::TurnEvent, tonic::Status>> {
        let mut attempts = 0;
        loop {
            let event = match self.events.next().await {
                Some(Ok(event)) => event,
                Some(Err(status)) if attempts < self.resume.retries && breaks(&status) => {
                    attempts += 1;
                    tracing::debug!(error = %status, attempt = attempts, "turn stream broke; resuming");
                    tokio::time::sleep(self.resume.backoff * attempts).await;
                    if let Err(status) = self.reattach().await
                        && !breaks(&status)
                    {
                        return Some(Err(status));
                    }
                    continue;
                }
                Some(Err(status)) => return Some(Err(status)),
                None => return None,
            };
            attempts = 0;
            if event.seq != 0 {
                if event.seq <= self.last_seq {
                    continue;
                }
                self.last_seq = event.seq;
            }
            match event.kind {
                Some(pb::turn_event::Kind::Llm(frame)) => self.relay.handle(frame).await,
                Some(pb::turn_event::Kind::Started(ref s)) => {
                    self.relay.started(s);
                    self.turn_id.clone_from(&s.turn_id);
                    return Some(Ok(event));
                }
                _ => return Some(Ok(event)),
            }
        }
    }

    /// Opens the stream again from the last event seen.
    async fn reattach(&mut self) -> Result<(), tonic::Status> {
        self.pump.abort();
        self.relay.reset_all();
        let attach = pb::Attach {
            session_id: self.session_id.clone(),
            turn_id: self.turn_id.clone(),
            turn_key: if self.turn_id.is_empty() {
                self.turn_key.clone()
            } else {
                String::new()
            },
            after_seq: self.last_seq,
        };
        let first = pb::turn_request::Kind::Attach(attach);
        // An old stream's failed open leaves a pump that never ran: its
        // abort above is enough, as with a stream that did run.
        let (events, pump) = connect(&mut self.client, first, &self.requests, &self.held).await?;
        self.events = events;
        self.pump = pump;
        self.resumes += 1;
        Ok(())
    }

    /// How many LLM connections the agent opened in this turn so far.
    pub fn llm_connections(&self) -> u64 {
        self.relay.opened()
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

/// Whether a failed stream is worth opening again: the connection broke,
/// as opposed to the broker refusing or ending it.
fn breaks(status: &tonic::Status) -> bool {
    use tonic::Code;
    match status.code() {
        Code::Unavailable | Code::Unknown | Code::Cancelled => true,
        Code::Internal => status.message().starts_with("h2 protocol error"),
        _ => false,
    }
}

/// Opens a stream whose first request is `first`, and a task that moves
/// the turn's input into it.
async fn connect(
    client: &mut pb::broker_client::BrokerClient<Channel>,
    first: pb::turn_request::Kind,
    requests: &Arc<tokio::sync::Mutex<mpsc::Receiver<pb::TurnRequest>>>,
    held: &Arc<Mutex<Option<pb::TurnRequest>>>,
) -> Result<(tonic::Streaming<pb::TurnEvent>, JoinHandle<()>), tonic::Status> {
    let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
    tx.send(pb::TurnRequest { kind: Some(first) })
        .await
        .map_err(|_| tonic::Status::internal("request queue closed"))?;
    let pump = tokio::spawn(pump(requests.clone(), held.clone(), tx));
    let events = match client
        .turn(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(status) => {
            pump.abort();
            return Err(status);
        }
    };
    Ok((events, pump))
}

/// Moves the turn's input into one stream; a request taken but not handed
/// on (the task aborted for a resume) is held for the next stream.
async fn pump(
    requests: Arc<tokio::sync::Mutex<mpsc::Receiver<pb::TurnRequest>>>,
    held: Arc<Mutex<Option<pb::TurnRequest>>>,
    tx: mpsc::Sender<pb::TurnRequest>,
) {
    let mut rx = requests.lock().await;
    loop {
        let next = held.lock().ok().and_then(|mut h| h.take());
        let req = match next {
            Some(r) => r,
            None => match rx.recv().await {
                Some(r) => r,
                None => return,
            },
        };
        if let Ok(mut h) = held.lock() {
            *h = Some(req.clone());
        }
        if tx.send(req).await.is_err() {
            return;
        }
        if let Ok(mut h) = held.lock() {
            *h = None;
        }
    }
}
