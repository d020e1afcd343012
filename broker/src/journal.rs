//! A turn's event journal on disk: every event the turn sends its executor
//! (but LLM frames), in order, so that an executor that reattaches — after a
//! crash, on another process, after the broker itself restarted — gets them
//! again from the `seq` it names.
//!
//! Layout of `<state>/journals/<session>/<turn>.journal` (0600, in 0700
//! dirs the agent never sees):
//!
//! | bytes | what |
//! | --- | --- |
//! | 0..8 | magic `TSJRNL01` |
//! | 8..16 | offset of the first record kept (u64 LE) |
//! | 16..20 | length of the header (u32 LE), then the header (MessagePack) |
//! | 4096.. | records: length (u32 LE), then a `TurnEvent` (protobuf, `seq` set) |
//!
//! The journal keeps a window: once it holds more than its cap, records the
//! executor has already received are dropped from the front, a checkpoint
//! (about 1 MiB of records) at a time, by punching a hole in the file, so
//! offsets never move and the disk use stays near the cap. The offset of the
//! first record kept is written before the hole is punched: a broker killed
//! in between still finds a record there.
//!
//! Nothing here trusts the file's contents: a record past the end, over
//! [`MAX_RECORD`], or that does not decode ends the journal there (a broker
//! killed mid-write leaves such a tail; recovery cuts it).

use bytes::{Bytes, BytesMut};
use prost::Message;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use turnstile_proto::v1 as pb;

const MAGIC: &[u8; 8] = b"TSJRNL01";
/// Where the records start; the header block before it is never punched.
pub const RECORDS: u64 = 4096;
/// Largest record read back (an event is at most a relay chunk, 1 MiB).
pub const MAX_RECORD: u32 = 8 << 20;
/// Records between two checkpoints (the granularity of dropping).
const CHECKPOINT_EVERY: u64 = 1 << 20;
/// Largest header read back.
const MAX_HEADER: u32 = 3000;

/// Who the journal belongs to, written once at its creation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub session_id: String,
    pub turn_id: String,
    /// The `Start`'s idempotency key ("" for none).
    pub turn_key: String,
    /// Hash of the `Start`'s argv, env and cwd (see `TurnSpec::fingerprint`).
    pub fingerprint: String,
    pub created_unix_ms: u64,
}

/// A record's place: its seq, its offset, the offset after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    pub seq: u64,
    pub offset: u64,
    pub end: u64,
}

/// An open journal, appended to by one writer.
#[derive(Debug)]
pub struct Journal {
    file: Arc<File>,
    path: PathBuf,
    /// Offset after the last record.
    end: u64,
    /// The first record kept; `None` while the journal is empty.
    first: Option<Place>,
    last_seq: u64,
    /// Record starts about [`CHECKPOINT_EVERY`] apart, oldest first; the
    /// first is always `first`.
    checkpoints: VecDeque<Place>,
    since_checkpoint: u64,
    /// Set once punching a hole failed (the filesystem cannot): the file
    /// then grows with the turn's output, and this is said once.
    cannot_punch: bool,
    buf: BytesMut,
}

/// What recovery found in a journal left by an earlier broker.
#[derive(Debug)]
pub struct Recovered {
    pub header: Header,
    pub journal: Journal,
    /// Whether its last event is an `Exited`.
    pub exited: bool,
}

fn bad(path: &Path, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("journal {}: {what}", path.display()),
    )
}

impl Journal {
    /// Creates the journal at `path` (replacing one of a turn with the same
    /// id that ended earlier).
    pub fn create(path: &Path, header: &Header) -> io::Result<Journal> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        let encoded = rmp_serde::to_vec_named(header).map_err(|e| bad(path, e))?;
        if encoded.len() > MAX_HEADER as usize {
            return Err(bad(path, "header too large"));
        }
        let mut block = Vec::with_capacity(RECORDS as usize);
        block.extend_from_slice(MAGIC);
        block.extend_from_slice(&RECORDS.to_le_bytes());
        block.extend_from_slice(&(encoded.len() as u32).to_le_bytes());
        block.extend_from_slice(&encoded);
        block.resize(RECORDS as usize, 0);
        file.write_all_at(&block, 0)?;
        Ok(Journal::empty(file, path, RECORDS))
    }

    /// A journal over `file` with no record known yet, appending at `end`.
    fn empty(file: File, path: &Path, end: u64) -> Journal {
        Journal {
            file: Arc::new(file),
            path: path.to_path_buf(),
            end,
            first: None,
            last_seq: 0,
            checkpoints: VecDeque::new(),
            since_checkpoint: 0,
            cannot_punch: false,
            buf: BytesMut::new(),
        }
    }

    /// Opens a journal an earlier broker (or an earlier turn) left, cutting
    /// a torn or corrupt tail.
    pub fn recover(path: &Path) -> io::Result<Recovered> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        if !file.metadata()?.is_file() {
            return Err(bad(path, "not a regular file"));
        }
        let mut block = [0u8; 20];
        file.read_exact_at(&mut block, 0)
            .map_err(|e| bad(path, format!("cannot read the header: {e}")))?;
        if &block[..8] != MAGIC {
            return Err(bad(path, "not a journal (bad magic)"));
        }
        let first = u64::from_le_bytes(block[8..16].try_into().unwrap_or_default());
        let len = u32::from_le_bytes(block[16..20].try_into().unwrap_or_default());
        if len > MAX_HEADER || first < RECORDS {
            return Err(bad(path, "corrupt header"));
        }
        let mut encoded = vec![0u8; len as usize];
        file.read_exact_at(&mut encoded, 20)
            .map_err(|e| bad(path, format!("cannot read the header: {e}")))?;
        let header: Header = rmp_serde::from_slice(&encoded).map_err(|e| bad(path, e))?;
        let mut journal = Journal::empty(file, path, first);
        let reader = journal.reader();
        let mut offset = first;
        let mut exited = false;
        while let Ok(Some((event, place))) = reader.read_at(offset) {
            if place.seq <= journal.last_seq {
                break;
            }
            exited = matches!(event.kind, Some(pb::turn_event::Kind::Exited(_)));
            journal.note(place);
            offset = place.end;
        }
        journal.file.set_len(journal.end)?;
        Ok(Recovered {
            header,
            journal,
            exited,
        })
    }

    /// Records a new record's place: last seq, end, checkpoints.
    fn note(&mut self, place: Place) {
        if self.first.is_none() {
            self.first = Some(place);
        }
        if self.checkpoints.is_empty() || self.since_checkpoint >= CHECKPOINT_EVERY {
            self.checkpoints.push_back(place);
            self.since_checkpoint = 0;
        }
        self.since_checkpoint += place.end - place.offset;
        self.last_seq = place.seq;
        self.end = place.end;
    }

    /// Appends `event` (whose `seq` follows the last one's): its place.
    pub fn append(&mut self, event: &pb::TurnEvent) -> io::Result<Place> {
        let len = event.encoded_len();
        if len > MAX_RECORD as usize {
            return Err(bad(&self.path, format!("event of {len} bytes")));
        }
        self.buf.clear();
        self.buf.extend_from_slice(&(len as u32).to_le_bytes());
        // Output, most of what a journal holds, is written from its own
        // buffer (no copy into ours): the message's few bytes around it are
        // encoded by hand, as prost does (field, length, bytes; then seq).
        let written = match &event.kind {
            Some(pb::turn_event::Kind::Stdout(data) | pb::turn_event::Kind::Stderr(data))
                if data.len() >= 4096 =>
            {
                let field = match &event.kind {
                    Some(pb::turn_event::Kind::Stdout(_)) => 2,
                    _ => 3,
                };
                use prost::encoding::{WireType, encode_key, encode_varint, uint64};
                encode_key(field, WireType::LengthDelimited, &mut self.buf);
                encode_varint(data.len() as u64, &mut self.buf);
                let mut seq = Vec::new();
                if event.seq != 0 {
                    uint64::encode(15, &event.seq, &mut seq);
                }
                self.write_parts(&[&self.buf[..], &data[..], &seq[..]])?
            }
            _ => {
                event
                    .encode(&mut self.buf)
                    .map_err(|e| bad(&self.path, e))?;
                self.file.write_all_at(&self.buf, self.end)?;
                self.buf.len() as u64
            }
        };
        if written != 4 + len as u64 {
            return Err(bad(&self.path, "record length mismatch"));
        }
        let place = Place {
            seq: event.seq,
            offset: self.end,
            end: self.end + written,
        };
        self.note(place);
        Ok(place)
    }

    /// Writes `parts` one after the other at the end: the bytes written.
    fn write_parts(&self, parts: &[&[u8]]) -> io::Result<u64> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let slices: Vec<std::io::IoSlice<'_>> =
            parts.iter().map(|p| std::io::IoSlice::new(p)).collect();
        let n = nix::sys::uio::pwritev(&*self.file, &slices, self.end as i64)
            .map_err(io::Error::from)?;
        if n < total {
            // A short write (rare on a regular file): the rest, plainly.
            let rest: Vec<u8> = parts.concat();
            self.file.write_all_at(&rest[n..], self.end + n as u64)?;
        }
        Ok(total as u64)
    }

    /// Offset after the last record.
    pub fn end(&self) -> u64 {
        self.end
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Seq of the first event kept (the last one's + 1 when empty).
    pub fn first_seq(&self) -> u64 {
        self.first.map_or(self.last_seq + 1, |p| p.seq)
    }

    /// Bytes of records kept.
    pub fn kept(&self) -> u64 {
        self.first.map_or(0, |p| self.end - p.offset)
    }

    /// Where to start reading for the event `seq`: a record at or before
    /// it (the reader skips what comes before `seq`).
    pub fn start_for(&self, seq: u64) -> Option<u64> {
        self.checkpoints
            .iter()
            .rev()
            .find(|p| p.seq <= seq)
            .map(|p| p.offset)
    }

    /// Drops records from the front, a checkpoint at a time, while more
    /// than `cap` bytes are kept, never the event `keep_from` or any after
    /// it, nor any record that ends past the offset `keep_offset`.
    pub fn trim(&mut self, cap: u64, keep_from: u64, keep_offset: u64) {
        let mut new_first = None;
        while self.kept() > cap && self.checkpoints.len() > 1 {
            let next = self.checkpoints[1];
            if next.seq > keep_from || next.offset > keep_offset {
                break;
            }
            self.checkpoints.pop_front();
            self.first = Some(next);
            new_first = Some(next);
        }
        let Some(first) = new_first else { return };
        // First the header names the new first record, then the hole: a
        // broker killed in between finds a record where the header says.
        if let Err(e) = self.file.write_all_at(&first.offset.to_le_bytes(), 8) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot update the journal header");
            return;
        }
        if self.cannot_punch {
            return;
        }
        let from = RECORDS;
        let to = first.offset / RECORDS * RECORDS;
        if to > from
            && let Err(e) = rustix::fs::fallocate(
                &*self.file,
                rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
                from,
                to - from,
            )
        {
            self.cannot_punch = true;
            tracing::warn!(path = %self.path.display(), error = %e, "cannot punch holes in journals on this filesystem: they grow with the turn's output");
        }
    }

    /// A reader sharing the file (reads need no lock on the writer).
    pub fn reader(&self) -> Reader {
        Reader {
            file: self.file.clone(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads records of a journal by offset.
#[derive(Debug, Clone)]
pub struct Reader {
    file: Arc<File>,
}

impl Reader {
    /// The record at `offset` and its place; `None` at the end or at a
    /// record that is torn, too large or does not decode.
    pub fn read_at(&self, offset: u64) -> io::Result<Option<(pb::TurnEvent, Place)>> {
        let mut len = [0u8; 4];
        match self.file.read_exact_at(&mut len, offset) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let len = u32::from_le_bytes(len);
        if len == 0 || len > MAX_RECORD {
            return Ok(None);
        }
        let mut body = BytesMut::zeroed(len as usize);
        match self.file.read_exact_at(&mut body, offset + 4) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let body: Bytes = body.freeze();
        let Ok(event) = pb::TurnEvent::decode(body) else {
            return Ok(None);
        };
        if event.seq == 0 {
            return Ok(None);
        }
        let place = Place {
            seq: event.seq,
            offset,
            end: offset + 4 + u64::from(len),
        };
        Ok(Some((event, place)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            session_id: "s".into(),
            turn_id: "t".into(),
            turn_key: "k".into(),
            fingerprint: "f".into(),
            created_unix_ms: 1,
        }
    }

    fn stdout(seq: u64, data: &[u8]) -> pb::TurnEvent {
        pb::TurnEvent {
            kind: Some(pb::turn_event::Kind::Stdout(Bytes::copy_from_slice(data))),
            seq,
        }
    }

    fn read_all(j: &Journal) -> Vec<pb::TurnEvent> {
        let r = j.reader();
        let mut offset = j.first.map_or(j.end, |p| p.offset);
        let mut out = Vec::new();
        while let Some((e, p)) = r.read_at(offset).expect("read") {
            out.push(e);
            offset = p.end;
        }
        out
    }

    #[test]
    fn events_come_back_in_order_and_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.journal");
        let mut j = Journal::create(&path, &header()).expect("create");
        for seq in 1..=3 {
            j.append(&stdout(seq, format!("line {seq}\n").as_bytes()))
                .expect("append");
        }
        assert_eq!(read_all(&j).len(), 3);
        drop(j);
        let r = Journal::recover(&path).expect("recover");
        assert_eq!(r.header, header());
        assert!(!r.exited);
        assert_eq!((r.journal.first_seq(), r.journal.last_seq()), (1, 3));
        assert_eq!(
            read_all(&r.journal),
            (1..=3)
                .map(|s| stdout(s, format!("line {s}\n").as_bytes()))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn big_output_written_from_its_own_buffer_reads_back_the_same() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.journal");
        let mut j = Journal::create(&path, &header()).expect("create");
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let events = [
            stdout(1, &big),
            pb::TurnEvent {
                kind: Some(pb::turn_event::Kind::Stderr(Bytes::copy_from_slice(
                    &big[..5000],
                ))),
                seq: 2,
            },
            stdout(300, b"small"),
        ];
        for e in &events {
            j.append(e).expect("append");
        }
        assert_eq!(read_all(&j), events);
    }

    #[test]
    fn a_torn_tail_is_cut_and_appending_goes_on_after_the_last_whole_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.journal");
        let mut j = Journal::create(&path, &header()).expect("create");
        j.append(&stdout(1, b"whole")).expect("append");
        let end = j.end();
        drop(j);
        // A record that claims 100 bytes and has 3, as a kill mid-write leaves.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        f.write_all_at(&[100, 0, 0, 0, 1, 2, 3], end)
            .expect("write");
        let mut r = Journal::recover(&path).expect("recover").journal;
        assert_eq!((r.last_seq(), r.end()), (1, end));
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), end);
        r.append(&stdout(2, b"next")).expect("append");
        assert_eq!(read_all(&r).len(), 2);
    }

    #[test]
    fn garbage_is_refused_or_read_as_empty_never_trusted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bad.journal");
        std::fs::write(&path, b"not a journal at all").expect("write");
        assert!(Journal::recover(&path).is_err());
        let mut block = vec![0u8; RECORDS as usize];
        block[..8].copy_from_slice(MAGIC);
        block[8..16].copy_from_slice(&RECORDS.to_le_bytes());
        block[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        std::fs::write(&path, &block).expect("write");
        assert!(
            Journal::recover(&path).is_err(),
            "a header length past the cap"
        );
        let link = dir.path().join("link.journal");
        std::os::unix::fs::symlink(&path, &link).expect("symlink");
        assert!(Journal::recover(&link).is_err(), "a link is not followed");
    }

    #[test]
    fn trimming_keeps_the_cap_and_never_drops_what_is_still_wanted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.journal");
        let mut j = Journal::create(&path, &header()).expect("create");
        let chunk = vec![b'x'; 256 * 1024];
        for seq in 1..=40 {
            j.append(&stdout(seq, &chunk)).expect("append");
        }
        // Nothing delivered yet: nothing may go, whatever the cap.
        j.trim(1 << 20, 0, u64::MAX);
        assert_eq!(j.first_seq(), 1);
        // Nothing before an offset that must stay either.
        j.trim(1 << 20, 40, RECORDS);
        assert_eq!(j.first_seq(), 1);
        // All delivered: the front goes, a checkpoint at a time, to the cap.
        j.trim(4 << 20, 40, u64::MAX);
        assert!(
            j.kept() <= (4 << 20) + CHECKPOINT_EVERY + 512 * 1024,
            "{}",
            j.kept()
        );
        let first = j.first_seq();
        assert!(first > 1);
        let events = read_all(&j);
        assert_eq!(events.first().map(|e| e.seq), Some(first));
        assert_eq!(events.last().map(|e| e.seq), Some(40));
        // The disk use follows the window, not the output.
        let used = std::fs::metadata(&path).map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.blocks() * 512
        });
        assert!(used.expect("stat") < 8 << 20);
        // And a reopen starts where the header says.
        drop(j);
        let r = Journal::recover(&path).expect("recover").journal;
        assert_eq!((r.first_seq(), r.last_seq()), (first, 40));
    }
}
