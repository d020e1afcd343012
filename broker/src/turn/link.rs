//! A turn's link to its executors: the events it sends them (numbered and
//! journaled), the stream that receives them now (at most one: a new
//! `Attach` takes over), and the input that streams send into the turn.
//!
//! Events go into the link, never straight to a stream: each gets the next
//! `seq`, is appended to the turn's journal (see [`crate::journal`]) and kept
//! in memory while it is recent. The attached stream has a delivery task
//! that sends everything after its cursor: from memory when it is there,
//! from the journal file when the stream is behind (a replay, or an executor
//! slower than the agent). So the agent never waits for an executor while
//! the journal has room, an executor can come back and ask for what it
//! missed, and memory stays bounded (a few MiB per turn): the journal is on
//! disk.
//!
//! Back-pressure: the agent's output (`send_output`) waits while the events
//! no stream has taken yet fill the journal's cap (or, with the journal off,
//! [`MEM_CAP`]); so with no executor attached, the agent blocks on its pipe
//! and nothing is lost. Control events (`Started`, notices, `Exited`) never
//! wait.

use crate::journal::{Journal, Place, Reader};
use crate::{StopReason, llm};
use bytes::Bytes;
use nix::sys::signal::Signal;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tracing::{Instrument, debug, warn};
use turnstile_proto::v1 as pb;

/// Recent events kept in memory (beyond it, streams read the journal).
pub const MEM_CAP: u64 = 2 << 20;
/// Events queued per executor stream.
pub const STREAM_QUEUE: usize = 16;
/// Bytes read from the journal per batch.
const BATCH: u64 = 1 << 20;
/// How long a stream that was taken over gets to take its last status.
const TAKEOVER_NOTICE: Duration = Duration::from_secs(5);
/// Of the events handed to a stream, how many bytes the executor may not
/// have received yet when it goes (the stream's queue of 16 events of at
/// most a MiB, and HTTP/2's windows): the journal always keeps them, so
/// that an executor that attaches again with the last seq it has finds the
/// events after it.
pub const IN_FLIGHT: u64 = 16 << 20;
/// Bytes of stdin queued towards an agent that has not read them yet.
/// Below it, a stream's stdin never holds up its other requests (LLM
/// frames, window grants, signals); past it, the stream is read no further
/// until the agent reads (back-pressure to the executor).
pub const STDIN_BUFFER: usize = 8 << 20;

/// Where events for one executor stream go.
pub type Sink = llm::EventSink;
/// The stream an executor reads: it ends after the `Exited` or an error,
/// whoever else holds its sink (the LLM relay, the request reader).
#[derive(Debug)]
pub struct EventStream {
    rx: ReceiverStream<Result<pb::TurnEvent, Status>>,
    done: bool,
}

impl tokio_stream::Stream for EventStream {
    type Item = Result<pb::TurnEvent, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if self.done {
            return Poll::Ready(None);
        }
        let item = std::pin::Pin::new(&mut self.rx).poll_next(cx);
        if let Poll::Ready(
            Some(
                Err(_)
                | Ok(pb::TurnEvent {
                    kind: Some(pb::turn_event::Kind::Exited(_)),
                    ..
                }),
            )
            | None,
        ) = &item
        {
            self.done = true;
        }
        item
    }
}

pub use llm::Attached;

#[derive(Debug)]
struct Entry {
    event: pb::TurnEvent,
    /// Position after the event (its journal offset's end).
    end: u64,
    size: u64,
}

#[derive(Debug)]
struct Current {
    epoch: u64,
    /// The next seq its delivery task sends.
    cursor: u64,
}

#[derive(Debug, Default)]
struct State {
    next_seq: u64,
    /// The most recent events, contiguous, oldest first.
    mem: VecDeque<Entry>,
    mem_bytes: u64,
    /// Position after the last event.
    appended_end: u64,
    /// Highest seq (and its end) handed to a stream.
    delivered_seq: u64,
    delivered_end: u64,
    journal: Option<Journal>,
    /// Seq from which events are not in the journal (its writes failed).
    unjournaled_from: Option<u64>,
    epoch: u64,
    current: Option<Current>,
    finished: bool,
    /// Set when the turn never ran: its streams end with this.
    failed: Option<Status>,
}

impl State {
    fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    fn mem_first(&self) -> u64 {
        self.mem.front().map_or(self.next_seq, |e| e.event.seq)
    }

    /// The first event a stream can still get.
    fn first_kept(&self) -> u64 {
        match &self.journal {
            Some(j) => j.first_seq().min(self.mem_first()),
            None => self.mem_first(),
        }
    }

    fn journaled(&self, seq: u64) -> bool {
        self.journal.is_some() && self.unjournaled_from.is_none_or(|u| seq < u)
    }
}

/// A stream attached to the turn.
#[derive(Debug)]
pub struct Attachment {
    /// The events, for the executor.
    pub stream: EventStream,
    /// The stream's number (its requests count only while it is current).
    pub epoch: u64,
    /// Where else events for this stream go (LLM frames, its errors).
    pub sink: Sink,
}

/// What a delivery task does next.
enum Step {
    Fail(Status),
    Send(Vec<(pb::TurnEvent, u64)>),
    Read(Reader, u64),
    Wait(watch::Receiver<u64>),
    TakenOver,
    Done,
}

/// The executor's input into the turn, shared by every stream that attaches.
#[derive(Debug)]
pub struct Inputs {
    /// `None` once the agent's stdin is closed. Unbounded, but holds at
    /// most [`STDIN_BUFFER`] bytes: each chunk takes that many of `room`'s
    /// permits first, and the writer gives them back once written.
    stdin: Mutex<Option<mpsc::UnboundedSender<Bytes>>>,
    stdin_rx: Mutex<Option<mpsc::UnboundedReceiver<Bytes>>>,
    room: Arc<tokio::sync::Semaphore>,
    pub stdin_total: AtomicU64,
    pub signals: mpsc::Sender<Signal>,
    /// The turn's LLM relay: `Pending` until the agent starts (frames that
    /// come sooner wait for it), then `Running`, or `None` when the turn has
    /// none or is over.
    llm: watch::Sender<Relay>,
}

/// The turn's LLM relay as the executors' frames see it.
#[derive(Debug, Clone, Default)]
pub enum Relay {
    #[default]
    Pending,
    Running(Arc<llm::Relay>),
    None,
}

impl Inputs {
    fn new(signals: mpsc::Sender<Signal>) -> Inputs {
        let (tx, rx) = mpsc::unbounded_channel();
        Inputs {
            stdin: Mutex::new(Some(tx)),
            stdin_rx: Mutex::new(Some(rx)),
            room: Arc::new(tokio::sync::Semaphore::new(STDIN_BUFFER)),
            stdin_total: AtomicU64::new(0),
            signals,
            llm: watch::Sender::new(Relay::Pending),
        }
    }

    /// The turn's relay runs (`Some`) or it will have none.
    pub fn set_llm(&self, relay: Option<Arc<llm::Relay>>) {
        self.llm
            .send_replace(relay.map_or(Relay::None, Relay::Running));
    }

    /// The relay once it is known: `None` when the turn has none.
    async fn llm(&self) -> Option<Arc<llm::Relay>> {
        let mut rx = self.llm.subscribe();
        let known = rx.wait_for(|r| !matches!(r, Relay::Pending)).await;
        match known.as_deref() {
            Ok(Relay::Running(r)) => Some(r.clone()),
            _ => None,
        }
    }

    /// The queue the stdin writer reads (once), and the room it gives back
    /// ([`stdin_cost`] permits per chunk written).
    pub fn take_stdin(
        &self,
    ) -> Option<(mpsc::UnboundedReceiver<Bytes>, Arc<tokio::sync::Semaphore>)> {
        let rx = self.stdin_rx.lock().ok()?.take()?;
        Some((rx, self.room.clone()))
    }

    pub fn close_stdin(&self) {
        if let Ok(mut s) = self.stdin.lock() {
            *s = None;
        }
    }

    /// The turn is over: stdin sent from now on goes nowhere, and no stream
    /// waits for room in its queue.
    fn end(&self) {
        self.close_stdin();
        self.room.close();
        self.set_llm(None);
    }

    /// Queues stdin for the agent; waits only while [`STDIN_BUFFER`] bytes
    /// are queued already.
    async fn stdin(&self, bytes: Bytes) {
        self.stdin_total
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let Some(tx) = self.stdin.lock().ok().and_then(|s| s.clone()) else {
            return;
        };
        match self.room.acquire_many(stdin_cost(&bytes)).await {
            Ok(permit) => permit.forget(),
            Err(_) => return,
        }
        if tx.send(bytes).is_err() {
            // The agent closed its stdin; later bytes have nowhere to go.
            self.close_stdin();
        }
    }
}

/// The permits a stdin chunk takes (a chunk over the buffer takes all).
pub fn stdin_cost(bytes: &Bytes) -> u32 {
    bytes.len().clamp(1, STDIN_BUFFER) as u32
}

/// One turn's link to its executors.
#[derive(Debug)]
pub struct Link {
    state: Mutex<State>,
    /// Bumped on every change a waiter may care for.
    changed: watch::Sender<u64>,
    attached: watch::Sender<Option<Attached>>,
    /// The journal's cap (0: no journal).
    cap: u64,
    pub inputs: Inputs,
}

impl Link {
    /// A link for a new turn; `journal` is `None` with the journal off.
    pub fn new(journal: Option<Journal>, cap: u64, signals: mpsc::Sender<Signal>) -> Arc<Link> {
        let appended_end = journal.as_ref().map_or(0, Journal::end);
        Arc::new(Link {
            state: Mutex::new(State {
                next_seq: 1,
                appended_end,
                delivered_end: appended_end,
                journal,
                ..State::default()
            }),
            changed: watch::Sender::new(0),
            attached: watch::Sender::new(None),
            cap,
            inputs: Inputs::new(signals),
        })
    }

    /// A finished turn's link from its journal (replay only).
    pub fn replay(journal: Journal) -> Arc<Link> {
        let (last, end) = (journal.last_seq(), journal.end());
        let cap = journal.kept();
        let link = Link::new(Some(journal), cap, mpsc::channel(1).0);
        if let Ok(mut st) = link.state.lock() {
            st.next_seq = last + 1;
            st.delivered_seq = last;
            st.delivered_end = end;
            st.finished = true;
            drop(st);
        }
        link.inputs.end();
        link
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent state behind
        // (every update is a few assignments); go on with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Whether the agent's output may be read on: while a stream is
    /// attached, up to [`MEM_CAP`] bytes ahead of it (it is sent them from
    /// memory, never read back from the journal: the relay's own pace);
    /// with none, up to the journal's cap.
    fn has_room(&self, st: &State) -> bool {
        let pending = st.appended_end - st.delivered_end;
        let cap = if st.current.is_none() && st.journal.is_some() && st.unjournaled_from.is_none() {
            self.cap
        } else {
            MEM_CAP
        };
        pending == 0 || pending < cap
    }

    /// Sends an event of the agent's output, waiting while the events no
    /// executor has taken fill the journal. Once `give_up` is cancelled, a
    /// wait with no stream attached ends: the event is dropped (`false`).
    pub async fn send_output(
        &self,
        kind: pb::turn_event::Kind,
        give_up: &tokio_util::sync::CancellationToken,
    ) -> bool {
        loop {
            let mut wait = {
                let st = self.lock();
                if self.has_room(&st) || st.finished {
                    break;
                }
                if give_up.is_cancelled() && st.current.is_none() {
                    return false;
                }
                self.changed.subscribe()
            };
            tokio::select! {
                _ = wait.changed() => {}
                _ = give_up.cancelled(), if !give_up.is_cancelled() => {}
            }
        }
        self.send(kind);
        true
    }

    /// Sends an event at once (control events: `Started`, notices).
    pub fn send(&self, kind: pb::turn_event::Kind) {
        let mut st = self.lock();
        if st.finished {
            return;
        }
        self.push(&mut st, kind);
        drop(st);
        self.bump();
    }

    /// Sends the turn's `Exited`, its last event.
    pub fn finish(&self, exited: pb::Exited) {
        self.inputs.end();
        let mut st = self.lock();
        if st.finished {
            return;
        }
        self.push(&mut st, pb::turn_event::Kind::Exited(exited));
        st.finished = true;
        drop(st);
        self.bump();
    }

    fn push(&self, st: &mut State, kind: pb::turn_event::Kind) {
        let seq = st.next_seq;
        let event = pb::TurnEvent {
            kind: Some(kind),
            seq,
        };
        let size = event_size(&event);
        let mut end = st.appended_end + size;
        if st.unjournaled_from.is_none()
            && let Some(j) = &mut st.journal
        {
            match j.append(&event) {
                Ok(Place { end: e, .. }) => end = e,
                Err(e) => {
                    warn!(error = %e, "cannot write the turn's journal: events from now on are kept in memory only");
                    st.unjournaled_from = Some(seq);
                }
            }
        }
        st.next_seq += 1;
        st.appended_end = end;
        st.mem_bytes += size;
        st.mem.push_back(Entry { event, end, size });
        // Old events leave memory once a stream took them; those no stream
        // took yet once the journal has them and memory holds twice
        // [`MEM_CAP`] (an attached stream is never further behind than
        // about one: it reads from memory).
        while st.mem_bytes > MEM_CAP {
            let Some(front) = st.mem.front() else { break };
            let seq = front.event.seq;
            let taken = seq <= st.delivered_seq;
            let spilled = st.journaled(seq) && st.mem_bytes > 2 * MEM_CAP;
            if !(taken || spilled) {
                break;
            }
            st.mem_bytes -= front.size;
            st.mem.pop_front();
        }
    }

    /// Makes a new stream the turn's executor, from the event after
    /// `after_seq`; the stream attached before ends with ABORTED.
    pub fn attach(self: &Arc<Self>, after_seq: u64) -> Result<Attachment, Status> {
        let mut st = self.lock();
        let last = st.last_seq();
        if after_seq > last {
            return Err(Status::out_of_range(format!(
                "after_seq {after_seq} is past the turn's last event ({last})"
            )));
        }
        let first = st.first_kept();
        if after_seq + 1 < first {
            return Err(Status::out_of_range(format!(
                "events {}..{} of this turn are no longer kept (the journal keeps the last {} bytes); attach with after_seq {} or more",
                after_seq + 1,
                first - 1,
                self.cap,
                first - 1
            )));
        }
        st.epoch += 1;
        let epoch = st.epoch;
        st.current = Some(Current {
            epoch,
            cursor: after_seq + 1,
        });
        drop(st);
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        self.attached.send_replace(Some(Attached {
            epoch,
            sink: tx.clone(),
        }));
        self.bump();
        let deliver = self.clone().deliver(epoch, after_seq + 1, tx.clone());
        tokio::spawn(deliver.in_current_span());
        Ok(Attachment {
            stream: EventStream {
                rx: ReceiverStream::new(rx),
                done: false,
            },
            epoch,
            sink: tx,
        })
    }

    /// Ends the turn's streams with `status`: the turn never ran (its
    /// admission failed after a `Start` with its key attached).
    pub fn fail(&self, status: Status) {
        self.inputs.end();
        let mut st = self.lock();
        st.failed = Some(status);
        st.finished = true;
        drop(st);
        self.bump();
    }

    /// The first event a stream can still get.
    pub fn first_kept_seq(&self) -> u64 {
        self.lock().first_kept()
    }

    /// The stream of `epoch` is gone; unless another took over, the turn
    /// is now detached.
    pub fn detach(&self, epoch: u64) {
        let mut st = self.lock();
        if st.current.as_ref().is_some_and(|c| c.epoch == epoch) {
            st.current = None;
            drop(st);
            debug!(epoch, "executor stream detached");
            self.attached.send_replace(None);
            self.bump();
        }
    }

    /// Whether `epoch` is the stream attached now.
    pub fn is_current(&self, epoch: u64) -> bool {
        self.lock()
            .current
            .as_ref()
            .is_some_and(|c| c.epoch == epoch)
    }

    /// Watches the attached stream (for the LLM relay).
    pub fn watch_attached(&self) -> watch::Receiver<Option<Attached>> {
        self.attached.subscribe()
    }

    /// The attached stream's sink, if any.
    pub fn attached_sink(&self) -> Option<Sink> {
        self.attached.borrow().as_ref().map(|a| a.sink.clone())
    }

    /// Resolves when no executor came back within `grace` of its stream
    /// going (at once with a grace of 0): the reason to end the turn for.
    pub async fn abandoned(&self, grace: Duration) -> StopReason {
        let mut rx = self.attached.subscribe();
        loop {
            if rx.wait_for(Option::is_none).await.is_err() {
                return std::future::pending().await;
            }
            if grace.is_zero() {
                return StopReason::ExecutorGone;
            }
            let back = rx.wait_for(Option::is_some);
            if tokio::time::timeout(grace, back).await.is_err() {
                return StopReason::NotReattached(grace.as_millis() as u64);
            }
        }
    }

    /// What the delivery task of `epoch`, at `cursor`, does next.
    fn next_step(&self, epoch: u64, cursor: u64) -> Step {
        let st = self.lock();
        if st.epoch != epoch {
            return Step::TakenOver;
        }
        if let Some(status) = &st.failed {
            return Step::Fail(status.clone());
        }
        if cursor >= st.next_seq {
            return if st.finished {
                Step::Done
            } else {
                Step::Wait(self.changed.subscribe())
            };
        }
        if cursor >= st.mem_first() {
            let mut batch = Vec::new();
            let mut bytes = 0;
            for e in st.mem.iter().skip_while(|e| e.event.seq < cursor) {
                batch.push((e.event.clone(), e.end));
                bytes += e.size;
                if bytes >= BATCH || batch.len() >= STREAM_QUEUE {
                    break;
                }
            }
            return Step::Send(batch);
        }
        match &st.journal {
            Some(j) => match j.start_for(cursor) {
                Some(offset) => Step::Read(j.reader(), offset),
                None => Step::Done,
            },
            None => Step::Done,
        }
    }

    /// Sends the stream of `epoch` every event from `cursor` on, until the
    /// `Exited`, a take-over, or the stream's end (then detaches it).
    async fn deliver(self: Arc<Self>, epoch: u64, mut cursor: u64, sink: Sink) {
        loop {
            let batch = match self.next_step(epoch, cursor) {
                Step::Send(batch) => batch,
                Step::Read(reader, offset) => match read_batch(&reader, offset, cursor) {
                    Some(batch) if !batch.is_empty() => batch,
                    _ => {
                        let message =
                            format!("event {cursor} of this turn is no longer in its journal");
                        let _ = sink.send(Err(Status::out_of_range(message))).await;
                        return self.detach(epoch);
                    }
                },
                Step::Wait(mut changed) => {
                    tokio::select! {
                        _ = changed.changed() => continue,
                        _ = sink.closed() => return self.detach(epoch),
                    }
                }
                Step::TakenOver => {
                    let status = Status::aborted("another executor attached to this turn");
                    let _ = tokio::time::timeout(TAKEOVER_NOTICE, sink.send(Err(status))).await;
                    return;
                }
                Step::Fail(status) => {
                    let _ = sink.send(Err(status)).await;
                    return;
                }
                Step::Done => return,
            };
            let mut sent = None;
            for (event, end) in batch {
                let seq = event.seq;
                if sink.send(Ok(event)).await.is_err() {
                    break;
                }
                sent = Some((seq, end));
                cursor = seq + 1;
            }
            let Some((seq, end)) = sent else {
                return self.detach(epoch);
            };
            self.delivered(epoch, seq, end, cursor);
        }
    }

    /// Stream `epoch` took every event up to `seq` (ending at `end`).
    fn delivered(&self, epoch: u64, seq: u64, end: u64, cursor: u64) {
        let mut st = self.lock();
        if st.epoch != epoch {
            return;
        }
        st.delivered_seq = st.delivered_seq.max(seq);
        st.delivered_end = st.delivered_end.max(end);
        if let Some(c) = &mut st.current {
            c.cursor = cursor;
        }
        let keep_from = st.delivered_seq.saturating_add(1).min(cursor);
        let keep_offset = st.delivered_end.saturating_sub(IN_FLIGHT);
        let cap = self.cap;
        if let Some(j) = &mut st.journal
            && j.kept() > cap
        {
            j.trim(cap, keep_from, keep_offset);
        }
        drop(st);
        self.bump();
    }

    /// The last seq so far.
    pub fn last_seq(&self) -> u64 {
        self.lock().last_seq()
    }

    pub fn is_finished(&self) -> bool {
        self.lock().finished
    }
}

/// Up to [`BATCH`] bytes of events from `offset`, skipping those before
/// `cursor`; `None` when the journal cannot be read there.
fn read_batch(reader: &Reader, mut offset: u64, cursor: u64) -> Option<Vec<(pb::TurnEvent, u64)>> {
    let mut batch = Vec::new();
    let mut bytes = 0;
    let mut want = cursor;
    while bytes < BATCH && batch.len() < STREAM_QUEUE {
        let Ok(Some((event, place))) = reader.read_at(offset) else {
            break;
        };
        offset = place.end;
        if place.seq < want {
            continue;
        }
        if place.seq != want {
            // A gap: the journal was trimmed under the reader.
            return None;
        }
        want += 1;
        bytes += place.end - place.offset;
        batch.push((event, place.end));
    }
    Some(batch)
}

/// An event's size as the journal and the caps count it.
fn event_size(event: &pb::TurnEvent) -> u64 {
    use prost::Message;
    event.encoded_len() as u64 + 4
}

/// Reads one executor stream's requests into the turn: stdin, its EOF,
/// signals, LLM frames. Its failure detaches the stream (the executor is gone, or sent something the
/// broker cannot take: it is told why first).
pub async fn forward_requests(
    link: Arc<Link>,
    epoch: u64,
    sink: Sink,
    mut stream: tonic::Streaming<pb::TurnRequest>,
) {
    loop {
        match stream.message().await {
            Ok(Some(req)) => {
                if !link.is_current(epoch) {
                    // Taken over: this stream's input no longer counts.
                    return;
                }
                take(&link, req.kind).await;
            }
            // A half-close ends this stream's input only: the agent's stdin
            // closes on `StdinEof`, not when an executor goes (the turn
            // outlives it), and its events still flow.
            Ok(None) => return,
            Err(status) => {
                debug!(error = %status, "executor stream failed");
                if !matches!(status.code(), tonic::Code::Cancelled | tonic::Code::Unknown) {
                    let message = format!("the turn's request stream failed: {}", status.message());
                    let _ = sink.try_send(Err(Status::new(status.code(), message)));
                }
                return link.detach(epoch);
            }
        }
    }
}

async fn take(link: &Link, kind: Option<pb::turn_request::Kind>) {
    use pb::turn_request::Kind;
    let inputs = &link.inputs;
    match kind {
        Some(Kind::Stdin(bytes)) => inputs.stdin(bytes).await,
        Some(Kind::StdinEof(_)) => inputs.close_stdin(),
        Some(Kind::Signal(s)) => match pb::signal_request::Signal::try_from(s.signal) {
            Ok(pb::signal_request::Signal::Interrupt) => {
                let _ = inputs.signals.try_send(Signal::SIGINT);
            }
            Ok(pb::signal_request::Signal::Terminate) => {
                let _ = inputs.signals.try_send(Signal::SIGTERM);
            }
            _ => warn!(signal = s.signal, "ignoring an unknown signal request"),
        },
        Some(Kind::Start(_) | Kind::Attach(_)) => {
            warn!("ignoring a second start or attach on a running turn")
        }
        Some(Kind::Llm(frame)) => match inputs.llm().await {
            Some(r) => r.from_executor(frame).await,
            None => debug!("ignoring an llm frame: no relay on this turn"),
        },
        None => warn!("ignoring an empty turn request"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    fn never() -> tokio_util::sync::CancellationToken {
        tokio_util::sync::CancellationToken::new()
    }

    fn out(n: u64) -> pb::turn_event::Kind {
        pb::turn_event::Kind::Stdout(Bytes::from(format!("{n}\n")))
    }

    fn journal(dir: &tempfile::TempDir) -> Journal {
        let header = crate::journal::Header {
            session_id: "s".into(),
            turn_id: "t".into(),
            turn_key: String::new(),
            fingerprint: String::new(),
            created_unix_ms: 0,
        };
        Journal::create(&dir.path().join("t.journal"), &header).expect("journal")
    }

    /// `fut` polled once: its output if it is ready at once.
    fn poll_once<F: Future>(fut: F) -> Option<F::Output> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match std::pin::pin!(fut).poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }

    async fn collect(stream: &mut EventStream, n: usize) -> Vec<pb::TurnEvent> {
        let mut got = Vec::new();
        while got.len() < n {
            match stream.next().await {
                Some(Ok(e)) => got.push(e),
                other => panic!("stream ended early: {other:?}"),
            }
        }
        got
    }

    #[tokio::test]
    async fn a_reattached_stream_gets_every_event_after_its_seq_once_and_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let link = Link::new(Some(journal(&dir)), 64 << 20, mpsc::channel(1).0);
        let mut first = link.attach(0).expect("attach").stream;
        for n in 1..=5 {
            link.send_output(out(n), &never()).await;
        }
        let got = collect(&mut first, 3).await;
        assert_eq!(got.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
        drop(first);
        let mut second = link.attach(3).expect("attach").stream;
        link.finish(pb::Exited::default());
        let got = collect(&mut second, 3).await;
        assert_eq!(got.iter().map(|e| e.seq).collect::<Vec<_>>(), [4, 5, 6]);
        assert!(matches!(got[2].kind, Some(pb::turn_event::Kind::Exited(_))));
        assert!(
            second.next().await.is_none(),
            "the stream ends after Exited"
        );
    }

    /// While a stream is attached, the agent's output is read at most
    /// [`MEM_CAP`] ahead of it, and what it has not taken is sent from
    /// memory (the journal emptied under it changes nothing); detached,
    /// the journal's cap applies.
    #[tokio::test(flavor = "current_thread")]
    async fn an_attached_stream_is_sent_from_memory_and_holds_the_agent_within_mem_cap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let link = Link::new(Some(journal(&dir)), 64 << 20, mpsc::channel(1).0);
        let attachment = link.attach(0).expect("attach");
        let (epoch, mut stream) = (attachment.epoch, attachment.stream);
        // No await: the delivery task has not run, nothing is taken.
        let chunk = Bytes::from(vec![b'x'; 256 << 10]);
        let n = (MEM_CAP / (256 << 10)) as usize + 2;
        for _ in 0..n {
            link.send(pb::turn_event::Kind::Stdout(chunk.clone()));
        }
        let more = || pb::turn_event::Kind::Stdout(Bytes::from_static(b"more"));
        assert_eq!(poll_once(link.send_output(more(), &never())), None);
        // The journal's records are gone: only memory can serve them.
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("t.journal"))
            .and_then(|f| f.set_len(crate::journal::RECORDS))
            .expect("truncate");
        let got = collect(&mut stream, n).await;
        assert!(got.iter().enumerate().all(|(i, e)| e.seq == i as u64 + 1
            && matches!(&e.kind, Some(pb::turn_event::Kind::Stdout(b)) if *b == chunk)));
        drop(stream);
        link.detach(epoch);
        for _ in 0..n {
            link.send(pb::turn_event::Kind::Stdout(chunk.clone()));
        }
        assert_eq!(poll_once(link.send_output(more(), &never())), Some(true));
    }

    #[tokio::test]
    async fn a_second_attach_takes_over_and_the_first_stream_ends_aborted() {
        let link = Link::new(None, 0, mpsc::channel(1).0);
        let mut first = link.attach(0).expect("attach").stream;
        let _second = link.attach(0).expect("attach").stream;
        match first.next().await {
            Some(Err(s)) => assert_eq!(s.code(), tonic::Code::Aborted, "{s:?}"),
            other => panic!("expected ABORTED, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn attach_past_the_end_or_before_the_window_is_out_of_range() {
        let link = Link::new(None, 0, mpsc::channel(1).0);
        link.send(out(1));
        let e = link.attach(2).expect_err("past the end");
        assert_eq!(e.code(), tonic::Code::OutOfRange);
        assert!(
            e.message().contains("past the turn's last event (1)"),
            "{e:?}"
        );
        // Without a journal, memory keeps MEM_CAP: a stream takes the
        // rest, then the first events are gone.
        let mut s = link.attach(1).expect("attach").stream;
        let big = Bytes::from(vec![b'x'; 512 * 1024]);
        for _ in 0..8 {
            link.send_output(pb::turn_event::Kind::Stdout(big.clone()), &never())
                .await;
            collect(&mut s, 1).await;
        }
        link.send(out(2));
        let e = link.attach(0).expect_err("trimmed");
        assert_eq!(e.code(), tonic::Code::OutOfRange);
        assert!(e.message().contains("no longer kept"), "{e:?}");
    }

    #[tokio::test]
    async fn with_no_stream_the_output_waits_at_the_cap_and_goes_on_once_one_attaches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let link = Link::new(Some(journal(&dir)), 1 << 20, mpsc::channel(1).0);
        let first = link.attach(0).expect("attach").stream;
        drop(first);
        // The delivery task sees the stream gone at its first send, or
        // while it waits: detached either way once it has run.
        let mut attached = link.watch_attached();
        link.send(out(0));
        attached.wait_for(Option::is_none).await.expect("detached");
        let chunk = Bytes::from(vec![b'y'; 256 * 1024]);
        let writer = {
            let link = link.clone();
            let chunk = chunk.clone();
            tokio::spawn(async move {
                for _ in 0..12 {
                    link.send_output(pb::turn_event::Kind::Stdout(chunk.clone()), &never())
                        .await;
                }
            })
        };
        // The writer stops at the cap: wait until it is blocked there.
        let mut changed = link.changed.subscribe();
        loop {
            let pending = {
                let st = link.lock();
                st.appended_end - st.delivered_end
            };
            if pending >= 1 << 20 {
                break;
            }
            changed.changed().await.expect("changes");
        }
        assert!(
            !writer.is_finished(),
            "the output must wait for an executor"
        );
        let mut s = link.attach(0).expect("attach").stream;
        let got = collect(&mut s, 13).await;
        writer.await.expect("writer");
        let bytes: usize = got
            .iter()
            .map(|e| match &e.kind {
                Some(pb::turn_event::Kind::Stdout(b)) => b.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(bytes, 2 + 12 * chunk.len(), "nothing lost");
    }

    #[tokio::test(start_paused = true)]
    async fn stdin_the_agent_does_not_read_holds_up_no_signal_below_its_buffer() {
        let (signals, mut signals_rx) = mpsc::channel(8);
        let link = Link::new(None, 0, signals);
        // No agent reads: the queue is never drained.
        let (_queue, _room) = link.inputs.take_stdin().expect("queue");
        let chunk = Bytes::from(vec![b'i'; 64 * 1024]);
        let below = STDIN_BUFFER / chunk.len();
        // Far more chunks than a chunk-counted queue held, within the bytes.
        for _ in 0..below {
            let sent = take(&link, Some(pb::turn_request::Kind::Stdin(chunk.clone())));
            tokio::time::timeout(Duration::from_secs(1), sent)
                .await
                .expect("stdin below the buffer never waits");
        }
        let signal = pb::turn_request::Kind::Signal(pb::SignalRequest {
            signal: pb::signal_request::Signal::Interrupt as i32,
        });
        take(&link, Some(signal)).await;
        assert_eq!(signals_rx.try_recv().ok(), Some(Signal::SIGINT));
        // Past the buffer, the stream waits for the agent (back-pressure)…
        let over = take(&link, Some(pb::turn_request::Kind::Stdin(chunk.clone())));
        assert!(
            tokio::time::timeout(Duration::from_secs(1), over)
                .await
                .is_err(),
            "past the buffer, stdin waits"
        );
        // …and never once the turn is over.
        link.finish(pb::Exited::default());
        let after = take(&link, Some(pb::turn_request::Kind::Stdin(chunk)));
        tokio::time::timeout(Duration::from_secs(1), after)
            .await
            .expect("no wait after the end");
    }

    #[tokio::test(start_paused = true)]
    async fn a_detached_turn_is_abandoned_after_its_grace_unless_a_stream_comes_back() {
        let link = Link::new(None, 0, mpsc::channel(1).0);
        let s = link.attach(0).expect("attach").stream;
        let abandoned = tokio::spawn({
            let link = link.clone();
            async move { link.abandoned(Duration::from_secs(60)).await }
        });
        drop(s);
        link.send(out(1));
        link.watch_attached()
            .wait_for(Option::is_none)
            .await
            .expect("detached");
        tokio::time::sleep(Duration::from_secs(30)).await;
        let _back = link.attach(1).expect("attach");
        tokio::time::sleep(Duration::from_secs(90)).await;
        assert!(!abandoned.is_finished(), "reattached within the grace");
        drop(_back);
        link.send(out(2));
        assert_eq!(
            abandoned.await.expect("task"),
            StopReason::NotReattached(60_000)
        );
    }
}
