//! Per-connection flow control of the LLM relay, shared by both ends of the
//! turn stream (the broker and the executor's client).
//!
//! Each direction of each connection has a window: the sender may have at
//! most [`LLM_INITIAL_WINDOW`] bytes of `data` that the receiver has not yet
//! handed on; the receiver grants bytes back (`window` frames) as it writes
//! them out. So a receiver buffers at most one window per connection and
//! never has to stall the shared stream for one slow connection.

pub use crate::LLM_INITIAL_WINDOW;
use crate::v1 as pb;
use bytes::{BufMut, BytesMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::Semaphore;

/// Grants are sent once this many bytes were handed on, or when the
/// receiver's queue ran dry, whichever comes first.
pub const GRANT_BATCH: u64 = LLM_INITIAL_WINDOW / 4;

/// The sending side's credit: bytes the peer still accepts.
#[derive(Debug, Clone)]
pub struct Credit(Arc<Semaphore>);

impl Default for Credit {
    fn default() -> Self {
        Credit(Arc::new(Semaphore::new(LLM_INITIAL_WINDOW as usize)))
    }
}

impl Credit {
    /// Adds `n` bytes of credit. Refused (false) when the peer would grant
    /// more than a window in total: that peer is broken.
    pub fn grant(&self, n: u64) -> bool {
        let now = self.0.available_permits() as u64;
        match usize::try_from(n) {
            Ok(n) if now + n as u64 <= LLM_INITIAL_WINDOW => {
                self.0.add_permits(n);
                true
            }
            _ => false,
        }
    }

    /// Waits for credit and takes up to `max` bytes of it (at least one).
    pub async fn take(&self, max: usize) -> usize {
        match self.0.acquire().await {
            Ok(p) => p.forget(),
            // The semaphore is never closed.
            Err(_) => return 0,
        }
        let more = self.0.available_permits().min(max.saturating_sub(1));
        if more > 0
            && let Ok(p) = self.0.try_acquire_many(more as u32)
        {
            p.forget();
            return 1 + more;
        }
        1
    }

    /// Returns credit taken but not used.
    pub fn give_back(&self, n: usize) {
        if n > 0 {
            self.0.add_permits(n);
        }
    }
}

/// Reads what the peer's window allows (at most `chunk` bytes) from one
/// side of a connection: the next frame to send, `data`, or `eof` at the
/// end, or `reset` on an error. Waits for credit first.
pub async fn next_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    credit: &Credit,
    buf: &mut BytesMut,
    chunk: usize,
) -> pb::llm_frame::Kind {
    let allowed = credit.take(chunk).await;
    buf.reserve(allowed);
    match reader.read_buf(&mut (&mut *buf).limit(allowed)).await {
        Ok(n) => {
            credit.give_back(allowed - n);
            if n == 0 {
                pb::llm_frame::Kind::Eof(pb::LlmEof {})
            } else {
                pb::llm_frame::Kind::Data(buf.split().freeze())
            }
        }
        Err(e) => pb::llm_frame::Kind::Reset(pb::LlmReset {
            reason: e.to_string(),
        }),
    }
}

/// The receiving side's count of bytes received and not yet handed on.
#[derive(Debug, Clone, Default)]
pub struct Inbox {
    pending: Arc<AtomicU64>,
}

impl Inbox {
    /// Accounts for `n` bytes received; false when they overflow the
    /// sender's window (a protocol error: the caller resets the connection).
    pub fn receive(&self, n: u64) -> bool {
        let before = self.pending.fetch_add(n, Ordering::AcqRel);
        if before + n > LLM_INITIAL_WINDOW {
            self.pending.fetch_sub(n, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Accounts for `n` bytes handed on (call before granting them back).
    pub fn handed_on(&self, n: u64) {
        self.pending.fetch_sub(n, Ordering::AcqRel);
    }
}

/// Batches grants: `add` returns the bytes to grant now, if any.
#[derive(Debug, Default)]
pub struct Grants {
    owed: u64,
}

impl Grants {
    pub fn add(&mut self, n: u64, queue_empty: bool) -> Option<u64> {
        self.owed += n;
        if self.owed >= GRANT_BATCH || (queue_empty && self.owed > 0) {
            Some(std::mem::take(&mut self.owed))
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn credit_is_taken_up_to_the_window_and_granted_back() {
        let c = Credit::default();
        let w = LLM_INITIAL_WINDOW as usize;
        assert_eq!(c.take(64 * 1024).await, 64 * 1024);
        assert_eq!(c.take(usize::MAX).await, w - 64 * 1024);
        // Out of credit: take waits until a grant.
        let waiter = tokio::spawn({
            let c = c.clone();
            async move { c.take(10).await }
        });
        assert!(c.grant(5));
        assert_eq!(waiter.await.expect("join"), 5);
        c.give_back(3);
        assert_eq!(c.take(10).await, 3);
        // Granting more than a window in total is refused.
        assert!(c.grant(LLM_INITIAL_WINDOW));
        assert!(!c.grant(1));
    }

    #[test]
    fn the_inbox_refuses_data_beyond_the_window() {
        let i = Inbox::default();
        assert!(i.receive(LLM_INITIAL_WINDOW - 1));
        assert!(i.receive(1));
        assert!(!i.receive(1));
        i.handed_on(10);
        assert!(i.receive(10));
        assert!(!i.receive(1));
    }

    #[test]
    fn grants_are_batched_until_the_queue_runs_dry() {
        let mut g = Grants::default();
        assert_eq!(g.add(100, false), None);
        assert_eq!(g.add(GRANT_BATCH, false), Some(GRANT_BATCH + 100));
        assert_eq!(g.add(7, true), Some(7));
        assert_eq!(g.add(0, true), None);
    }
}
