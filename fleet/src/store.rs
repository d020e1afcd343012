//! The archive store: session archives as immutable objects, named by
//! session, generation and fencing token so that no two commits ever
//! write the same object.
//!
//! Uploads stream: the export runs on the blocking pool and hands chunks
//! to the upload as it writes them, so an archive is never held whole in
//! memory nor written to local disk first. Downloads stream too, straight
//! into the import ([`ObjectReader`]): counted and hashed on another
//! thread as the import consumes them, and checked against the catalog's
//! size and SHA-256 at the object's end, before what was imported from
//! them is used.

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{GetResultPayload, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Size of one upload part (S3's minimum part is 5 MiB).
pub const CHUNK: usize = 8 << 20;
/// Parts uploaded at once.
const PARTS_IN_FLIGHT: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("archive store URL {url:?}: {why}")]
    Url { url: String, why: String },
    #[error("{op} {key}: {source}")]
    Op {
        op: &'static str,
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{0}")]
    Other(String),
}

impl StoreError {
    fn op(op: &'static str, key: &ObjectPath) -> impl FnOnce(object_store::Error) -> StoreError {
        let key = key.to_string();
        move |source| StoreError::Op { op, key, source }
    }
}

/// The archive store of a fleet: an object store and the prefix under
/// which this fleet's archives live.
#[derive(Debug, Clone)]
pub struct Archives {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    url: String,
}

/// What an upload wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    pub sha256: String,
    pub bytes: u64,
}

impl Archives {
    /// Opens the store `url` names: `file:///dir` (the directory must
    /// exist), `s3://bucket/prefix`, `gs://bucket/prefix`,
    /// `az://container/prefix` (also `abfs://`, `azure://`). Credentials and
    /// endpoints come from each store's usual environment variables
    /// (`AWS_*`, `GOOGLE_*`, `AZURE_*`).
    pub fn open(url: &str) -> Result<Archives, StoreError> {
        let bad = |why: String| StoreError::Url {
            url: url.to_string(),
            why,
        };
        let parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
        let path = parsed.path().trim_start_matches('/').to_string();
        let (store, prefix): (Arc<dyn ObjectStore>, String) = match parsed.scheme() {
            "file" => {
                if parsed.host_str().is_some_and(|h| !h.is_empty()) {
                    return Err(bad("want file:///absolute/dir (no host)".into()));
                }
                let dir = std::path::PathBuf::from(parsed.path());
                if !dir.is_dir() {
                    return Err(bad(format!("{} is not a directory", dir.display())));
                }
                let store = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| bad(e.to_string()))?
                    // Committed means on stable storage, as with a cloud store.
                    .with_fsync(true)
                    .with_automatic_cleanup(true);
                (Arc::new(store), String::new())
            }
            "s3" | "s3a" => (
                Arc::new(
                    object_store::aws::AmazonS3Builder::from_env()
                        .with_url(url)
                        .build()
                        .map_err(|e| bad(e.to_string()))?,
                ),
                path,
            ),
            "gs" => (
                Arc::new(
                    object_store::gcp::GoogleCloudStorageBuilder::from_env()
                        .with_url(url)
                        .build()
                        .map_err(|e| bad(e.to_string()))?,
                ),
                path,
            ),
            "az" | "azure" | "abfs" | "abfss" => (
                Arc::new(
                    object_store::azure::MicrosoftAzureBuilder::from_env()
                        .with_url(url)
                        .build()
                        .map_err(|e| bad(e.to_string()))?,
                ),
                path,
            ),
            other => {
                return Err(bad(format!(
                    "unknown scheme {other:?}: want file, s3, gs or az"
                )));
            }
        };
        let prefix = ObjectPath::parse(&prefix).map_err(|e| bad(e.to_string()))?;
        Ok(Archives {
            store,
            prefix,
            url: url.to_string(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The object of `session`'s generation `generation`, committed under
    /// fencing token `token`.
    pub fn key(&self, session: &str, generation: i64, token: i64) -> ObjectPath {
        self.prefix
            .clone()
            .join("sessions")
            .join(session)
            .join(format!("{generation:012}-{token}.tar"))
    }

    /// Parses a key as stored in the catalog.
    pub fn parse_key(key: &str) -> Result<ObjectPath, StoreError> {
        ObjectPath::parse(key).map_err(|e| StoreError::Other(format!("bad key {key:?}: {e}")))
    }

    /// Uploads what `produce` writes (run on the blocking pool) as object
    /// `key`, streaming. `produce`'s error aborts the upload.
    pub async fn upload<F>(&self, key: &ObjectPath, produce: F) -> Result<Uploaded, StoreError>
    where
        F: FnOnce(&mut dyn Write) -> std::io::Result<()> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<Bytes>(2);
        let producer = tokio::task::spawn_blocking(move || {
            let mut w = ChunkWriter {
                tx,
                buf: Vec::with_capacity(CHUNK),
            };
            produce(&mut w)?;
            w.flush_chunk()
        });
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        let first = rx.recv().await;
        let second = match first {
            Some(_) => rx.recv().await,
            None => None,
        };
        // Small archives (one chunk): one plain put.
        let result = if second.is_none() {
            let data = first.unwrap_or_default();
            let produced = join(producer).await;
            match produced {
                Ok(()) => {
                    hasher.update(&data);
                    bytes = data.len() as u64;
                    self.store
                        .put(key, PutPayload::from_bytes(data))
                        .await
                        .map(|_| ())
                        .map_err(StoreError::op("cannot upload", key))
                }
                Err(e) => Err(e),
            }
        } else {
            let upload = self
                .store
                .put_multipart(key)
                .await
                .map_err(StoreError::op("cannot start the upload of", key))?;
            let mut w = WriteMultipart::new_with_chunk_size(upload, CHUNK);
            let mut sent = Ok(());
            let mut next = first;
            let mut after = second;
            while let Some(chunk) = next {
                hasher.update(&chunk);
                bytes += chunk.len() as u64;
                if let Err(e) = w.wait_for_capacity(PARTS_IN_FLIGHT).await {
                    sent = Err(StoreError::op("cannot upload", key)(e));
                    break;
                }
                w.put(chunk);
                next = after.take();
                if next.is_some() {
                    after = rx.recv().await;
                }
            }
            drop(rx);
            let produced = join(producer).await;
            match (sent, produced) {
                (Ok(()), Ok(())) => w
                    .finish()
                    .await
                    .map(|_| ())
                    .map_err(StoreError::op("cannot complete the upload of", key)),
                (Err(e), _) | (Ok(()), Err(e)) => {
                    let _ = w.abort().await;
                    Err(e)
                }
            }
        };
        result?;
        Ok(Uploaded {
            sha256: hex(&hasher.finalize()),
            bytes,
        })
    }

    /// Opens object `key` for reading by an import: see [`ObjectReader`].
    /// The object's size is checked against `want_bytes` before anything
    /// is read; its bytes are read by a thread of the blocking pool, in
    /// large reads (a local object of a `file://` store) or as the store
    /// streams them (cloud stores; this needs tokio's multi-threaded
    /// runtime, on which the blocking import can wait for the stream).
    pub async fn read_object(
        &self,
        key: &ObjectPath,
        want_bytes: u64,
        want_sha256: &str,
    ) -> Result<ObjectReader, DownloadError> {
        let got = self
            .store
            .get(key)
            .await
            .map_err(|e| DownloadError::Store(StoreError::op("cannot download", key)(e)))?;
        if got.meta.size != want_bytes {
            return Err(DownloadError::Mismatch(format!(
                "the object is {} bytes, the catalog says {want_bytes}",
                got.meta.size
            )));
        }
        let shown = key.to_string();
        let want = Want {
            bytes: want_bytes,
            sha256: want_sha256.to_string(),
        };
        match got.payload {
            GetResultPayload::File(file, _) => Ok(ObjectReader::start(want, move |buf| {
                let mut buf = buf.unwrap_or_else(|| vec![0u8; READ]);
                buf.resize(READ, 0);
                loop {
                    match std::io::Read::read(&mut &file, &mut buf) {
                        Ok(0) => return Ok(None),
                        Ok(n) => {
                            buf.truncate(n);
                            return Ok(Some(Chunk::Owned(buf)));
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            return Err(DownloadError::Store(StoreError::Other(format!(
                                "cannot download {shown}: {e}"
                            ))));
                        }
                    }
                }
            })),
            GetResultPayload::Stream(mut stream) => {
                let handle = tokio::runtime::Handle::current();
                if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
                    return Err(DownloadError::Store(StoreError::Other(format!(
                        "cannot download {shown}: a streamed object is read on tokio's multi-threaded runtime only"
                    ))));
                }
                Ok(ObjectReader::start(want, move |_| {
                    match handle.block_on(stream.next()) {
                        None => Ok(None),
                        Some(Ok(bytes)) => Ok(Some(Chunk::Shared(bytes))),
                        Some(Err(e)) => Err(DownloadError::Store(StoreError::Other(format!(
                            "cannot download {shown}: {e}"
                        )))),
                    }
                }))
            }
        }
    }

    /// Copies object `from` to a new object `to` (a fork's first archive).
    pub async fn copy(&self, from: &ObjectPath, to: &ObjectPath) -> Result<(), StoreError> {
        let copied = match self.store.copy_if_not_exists(from, to).await {
            // Not every store can refuse an existing target; keys are
            // unique per fencing token, so a plain copy is as safe.
            Err(
                object_store::Error::NotSupported { .. }
                | object_store::Error::NotImplemented { .. },
            ) => self.store.copy(from, to).await,
            r => r,
        };
        copied.map_err(StoreError::op("cannot copy", from))
    }

    pub async fn delete(&self, key: &ObjectPath) -> Result<(), StoreError> {
        match self.store.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(StoreError::op("cannot delete", key)(e)),
        }
    }

    /// Writes, reads back and deletes a small probe object (the doctor's
    /// check that this worker can use the store).
    pub async fn probe(&self, worker: &str) -> Result<(), StoreError> {
        let key = self
            .prefix
            .clone()
            .join("probes")
            .join(format!("{worker}-{}", std::process::id()));
        let data = Bytes::from_static(b"turnstile store probe");
        self.store
            .put(&key, PutPayload::from_bytes(data.clone()))
            .await
            .map_err(StoreError::op("cannot write", &key))?;
        let back = self
            .store
            .get(&key)
            .await
            .map_err(StoreError::op("cannot read", &key))?
            .bytes()
            .await
            .map_err(StoreError::op("cannot read", &key))?;
        if back != data {
            return Err(StoreError::Other(format!(
                "{key} read back differs from what was written"
            )));
        }
        self.store
            .delete(&key)
            .await
            .map_err(StoreError::op("cannot delete", &key))
    }
}

/// A download refused: the store failed, or the object is not what the
/// catalog committed.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error(transparent)]
    Store(StoreError),
    #[error("{0}")]
    Mismatch(String),
}

impl DownloadError {
    /// The same failure again (a reader reports its outcome to each caller).
    fn again(&self) -> DownloadError {
        match self {
            DownloadError::Store(e) => DownloadError::Store(StoreError::Other(e.to_string())),
            DownloadError::Mismatch(why) => DownloadError::Mismatch(why.clone()),
        }
    }
}

/// Size of one read of a local object.
const READ: usize = 1 << 20;
/// Chunks read ahead of the import (bounds a reader's memory, with
/// [`READ`] or the store's own chunk size).
const AHEAD: usize = 4;

/// What the catalog says an object is.
struct Want {
    bytes: u64,
    sha256: String,
}

/// A piece of an object: a buffer of ours (handed back for the next read)
/// or one the store's stream made.
enum Chunk {
    Owned(Vec<u8>),
    Shared(Bytes),
}

impl Chunk {
    fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Owned(v) => v,
            Chunk::Shared(b) => b,
        }
    }
}

enum Msg {
    Data(Chunk),
    /// The object ended (or its reading failed): whether it is what the
    /// catalog says.
    End(Result<(), DownloadError>),
}

/// An archive object read straight into an import (blocking `Read`).
///
/// A thread of the blocking pool reads the object ahead (at most
/// [`AHEAD`] chunks), counts and hashes it, and refuses it as soon as it
/// runs past the catalog's size; the import consumes what it read on its
/// own thread, so hashing and extracting overlap. Tar's end-of-archive
/// blocks are not the object's end: [`ObjectReader::finish`] reads on to
/// the object's very end and says whether it is exactly what the catalog
/// committed (size and SHA-256). Nothing an import made from it may be
/// used before `finish` said so.
pub struct ObjectReader {
    rx: std::sync::mpsc::Receiver<Msg>,
    /// Buffers handed back to the reading thread.
    spent: std::sync::mpsc::SyncSender<Vec<u8>>,
    cur: Option<Chunk>,
    pos: usize,
    outcome: Option<Result<(), DownloadError>>,
}

impl ObjectReader {
    /// Starts reading with `next`, which returns the object's next chunk
    /// (`None` at its end), given a spent buffer to reuse if there is one.
    fn start<F>(want: Want, mut next: F) -> ObjectReader
    where
        F: FnMut(Option<Vec<u8>>) -> Result<Option<Chunk>, DownloadError> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(AHEAD);
        let (spent, spent_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(AHEAD + 2);
        let read = move || {
            let mut hasher = Sha256::new();
            let mut seen = 0u64;
            let end = loop {
                match next(spent_rx.try_recv().ok()) {
                    Ok(Some(chunk)) => {
                        let data = chunk.bytes();
                        seen = seen.saturating_add(data.len() as u64);
                        if seen > want.bytes {
                            break Err(DownloadError::Mismatch(format!(
                                "the object is longer than the catalog's {} bytes",
                                want.bytes
                            )));
                        }
                        hasher.update(data);
                        if tx.send(Msg::Data(chunk)).is_err() {
                            // The reader is gone: nobody wants the rest.
                            return;
                        }
                    }
                    Ok(None) => {
                        let digest = hex(&hasher.finalize());
                        if seen == want.bytes && digest == want.sha256 {
                            break Ok(());
                        }
                        break Err(DownloadError::Mismatch(format!(
                            "its content ({seen} bytes, sha256 {digest}) is not what was committed ({} bytes, sha256 {})",
                            want.bytes, want.sha256
                        )));
                    }
                    Err(e) => break Err(e),
                }
            };
            let _ = tx.send(Msg::End(end));
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => drop(h.spawn_blocking(read)),
            Err(_) => drop(std::thread::spawn(read)),
        }
        ObjectReader {
            rx,
            spent,
            cur: None,
            pos: 0,
            outcome: None,
        }
    }

    /// Reads the object to its end (whatever the import left unread) and
    /// says whether it is exactly what the catalog committed; a failure of
    /// the store is [`DownloadError::Store`]. Asked again, says the same.
    pub fn finish(&mut self) -> Result<(), DownloadError> {
        while self.outcome.is_none() {
            self.next_chunk();
        }
        match &self.outcome {
            Some(Ok(())) | None => Ok(()),
            Some(Err(e)) => Err(e.again()),
        }
    }

    /// Hands the spent chunk back and waits for the next one (or the end).
    fn next_chunk(&mut self) {
        if let Some(Chunk::Owned(buf)) = self.cur.take() {
            let _ = self.spent.try_send(buf);
        }
        self.pos = 0;
        match self.rx.recv() {
            Ok(Msg::Data(chunk)) => self.cur = Some(chunk),
            Ok(Msg::End(end)) => self.outcome = Some(end),
            Err(_) => {
                self.outcome = Some(Err(DownloadError::Store(StoreError::Other(
                    "the object's reader stopped".into(),
                ))));
            }
        }
    }
}

impl std::io::Read for ObjectReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if let Some(chunk) = &self.cur {
                let rest = &chunk.bytes()[self.pos..];
                if !rest.is_empty() {
                    let n = rest.len().min(buf.len());
                    buf[..n].copy_from_slice(&rest[..n]);
                    self.pos += n;
                    return Ok(n);
                }
            }
            match &self.outcome {
                Some(Ok(())) => return Ok(0),
                Some(Err(e)) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        e.to_string(),
                    ));
                }
                None => self.next_chunk(),
            }
        }
    }
}

async fn join(producer: tokio::task::JoinHandle<std::io::Result<()>>) -> Result<(), StoreError> {
    match producer.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(StoreError::Other(format!("cannot write the archive: {e}"))),
        Err(e) => Err(StoreError::Other(format!("the archive writer failed: {e}"))),
    }
}

/// Hands what is written to it to the uploader in [`CHUNK`]-sized pieces;
/// blocks while the uploader is behind (backpressure), fails once it gave
/// up.
struct ChunkWriter {
    tx: mpsc::Sender<Bytes>,
    buf: Vec<u8>,
}

impl ChunkWriter {
    fn flush_chunk(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .blocking_send(Bytes::from(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the upload stopped"))
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.flush_chunk()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uploads_of_every_size_round_trip_with_their_digest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("file://{}", dir.path().display());
        let archives = Archives::open(&url).expect("open");
        for (i, size) in [0usize, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5]
            .into_iter()
            .enumerate()
        {
            let data: Vec<u8> = (0..size).map(|j| (j * 7 + i) as u8).collect();
            let key = archives.key("s", i as i64, 1);
            let copy = data.clone();
            let up = archives
                .upload(&key, move |w| w.write_all(&copy))
                .await
                .expect("upload");
            assert_eq!(up.bytes, size as u64);
            assert_eq!(up.sha256, hex(&Sha256::digest(&data)));
            let back = read_all(&archives, &key, up.bytes, &up.sha256)
                .await
                .expect("read");
            assert!(back == data, "size {size}");
            // A wrong digest or size is refused.
            let err = read_all(&archives, &key, up.bytes, &"0".repeat(64))
                .await
                .expect_err("digest");
            assert!(
                err.to_string().contains("is not what was committed"),
                "{err}"
            );
            let err = read_all(&archives, &key, up.bytes + 1, &up.sha256)
                .await
                .expect_err("size");
            assert!(err.to_string().contains("the catalog says"), "{err}");
        }
    }

    /// Reads object `key` as an import would, then to its end.
    async fn read_all(
        archives: &Archives,
        key: &ObjectPath,
        bytes: u64,
        sha256: &str,
    ) -> Result<Vec<u8>, DownloadError> {
        let mut r = archives.read_object(key, bytes, sha256).await?;
        tokio::task::block_in_place(|| {
            let mut back = Vec::new();
            let read = std::io::Read::read_to_end(&mut r, &mut back);
            r.finish()?;
            read.map_err(|e| DownloadError::Store(StoreError::Other(e.to_string())))?;
            Ok(back)
        })
    }

    /// A reader over `chunks` (as a store would deliver them) that the
    /// catalog says are `bytes` long with digest `sha256`.
    fn reader(chunks: Vec<Vec<u8>>, bytes: u64, sha256: &str) -> ObjectReader {
        let mut chunks = chunks.into_iter();
        let want = Want {
            bytes,
            sha256: sha256.to_string(),
        };
        ObjectReader::start(want, move |_| Ok(chunks.next().map(Chunk::Owned)))
    }

    /// A valid session archive: `work/f` holding `content`.
    fn session_tar(content: &[u8]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, "work", std::io::empty())
            .expect("dir");
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(content.len() as u64);
        b.append_data(&mut h, "work/f", content).expect("file");
        b.into_inner().expect("finish")
    }

    #[test]
    fn a_reader_refuses_what_the_catalog_did_not_commit_even_past_the_tar_end() {
        let good = session_tar(b"committed");
        let sha = hex(&Sha256::digest(&good));
        let n = good.len() as u64;
        let import = |r: &mut ObjectReader| {
            let dest = tempfile::tempdir().expect("dest");
            let fd = turnstile_broker::tree::open_dir_path(dest.path()).expect("open");
            let caps = turnstile_broker::archive::ImportCaps {
                max_bytes: 1 << 20,
                max_entries: 10,
            };
            turnstile_broker::archive::import(r, &fd, caps, None).map(|_| ())
        };
        // Exactly as committed, in chunks of every size: imported, and
        // its end checked.
        for step in [1usize, 511, 512, 4096, good.len()] {
            let chunks = good.chunks(step).map(<[u8]>::to_vec).collect();
            let mut r = reader(chunks, n, &sha);
            import(&mut r).expect("import");
            r.finish().expect("as committed");
            r.finish().expect("said again");
        }
        // A valid archive of another session, as long: the import takes
        // it, the check at the end refuses it.
        let other = session_tar(b"forged!!!");
        assert_eq!(other.len(), good.len());
        let mut r = reader(vec![other.clone()], n, &sha);
        import(&mut r).expect("a valid tar");
        let err = r.finish().expect_err("not committed");
        assert!(matches!(err, DownloadError::Mismatch(_)), "{err}");
        assert!(
            err.to_string().contains("is not what was committed"),
            "{err}"
        );
        // Longer than the catalog says, the excess after tar's end blocks
        // (which the import never reads): refused at the end, and the
        // reading stopped at the catalog's size.
        let mut longer = good.clone();
        longer.extend_from_slice(&[0u8; 1024]);
        let mut r = reader(vec![good.clone(), vec![0u8; 1024]], n, &sha);
        import(&mut r).expect("the tar part is fine");
        let err = r.finish().expect_err("longer");
        assert!(
            err.to_string()
                .contains(&format!("longer than the catalog's {n} bytes")),
            "{err}"
        );
        // Longer in the middle: the import itself fails to read.
        let mut r = reader(vec![longer], n, &sha);
        assert!(import(&mut r).is_err());
        assert!(r.finish().is_err());
        // Shorter: a valid tar with one end block fewer.
        let shorter = good[..good.len() - 512].to_vec();
        let mut r = reader(vec![shorter], n, &sha);
        import(&mut r).expect("one end block is enough for tar");
        let err = r.finish().expect_err("shorter");
        assert!(
            err.to_string()
                .contains(&format!("({} bytes, sha256", n - 512)),
            "{err}"
        );
        // A failing store is a store error, not a refusal.
        let want = Want {
            bytes: n,
            sha256: sha.clone(),
        };
        let mut first = Some(good[..100].to_vec());
        let mut r = ObjectReader::start(want, move |_| match first.take() {
            Some(c) => Ok(Some(Chunk::Owned(c))),
            None => Err(DownloadError::Store(StoreError::Other("link down".into()))),
        });
        assert!(import(&mut r).is_err());
        let err = r.finish().expect_err("store failed");
        assert!(matches!(err, DownloadError::Store(_)), "{err}");
        assert!(err.to_string().contains("link down"), "{err}");
    }

    /// A cloud store's object arrives as a stream; read on the
    /// multi-threaded runtime, refused on a current-thread one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streamed_objects_are_read_and_checked_the_same_way() {
        let archives = Archives {
            store: Arc::new(object_store::memory::InMemory::new()),
            prefix: ObjectPath::from("p"),
            url: "memory://".into(),
        };
        for size in [0usize, 1, READ + 3, 3 * CHUNK + 5] {
            let data: Vec<u8> = (0..size).map(|j| (j * 13) as u8).collect();
            let key = archives.key("s", size as i64, 1);
            let copy = data.clone();
            let up = archives
                .upload(&key, move |w| w.write_all(&copy))
                .await
                .expect("upload");
            let back = read_all(&archives, &key, up.bytes, &up.sha256)
                .await
                .expect("read");
            assert!(back == data, "size {size}");
            let err = read_all(&archives, &key, up.bytes, &"f".repeat(64))
                .await
                .expect_err("digest");
            assert!(matches!(err, DownloadError::Mismatch(_)), "{err}");
        }
        let key = archives.key("s", 1, 1);
        let up = archives
            .upload(&key, |w| w.write_all(b"x"))
            .await
            .expect("upload");
        let refused = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime");
            rt.block_on(archives.read_object(&key, up.bytes, &up.sha256))
                .err()
                .map(|e| e.to_string())
        })
        .join()
        .expect("thread");
        assert!(
            refused.is_some_and(|e| e.contains("multi-threaded runtime")),
            "a current-thread runtime cannot wait for a stream"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_producer_leaves_no_object() {
        let dir = tempfile::tempdir().expect("tempdir");
        let archives = Archives::open(&format!("file://{}", dir.path().display())).expect("open");
        let key = archives.key("s", 1, 1);
        for size in [10usize, 3 * CHUNK] {
            let err = archives
                .upload(&key, move |w| {
                    w.write_all(&vec![1u8; size])?;
                    Err(std::io::Error::other("disk on fire"))
                })
                .await
                .expect_err("fails");
            assert!(err.to_string().contains("disk on fire"), "{err}");
            let gone = archives
                .read_object(&key, 0, "")
                .await
                .err()
                .expect("absent");
            assert!(matches!(gone, DownloadError::Store(_)), "{gone}");
        }
    }

    #[test]
    fn urls_are_checked() {
        for (url, want) in [
            ("file:///nonexistent/dir", "is not a directory"),
            ("ftp://x/y", "unknown scheme \"ftp\""),
            ("not a url", "relative URL"),
            ("file://host/dir", "no host"),
        ] {
            let err = Archives::open(url).expect_err(url);
            assert!(err.to_string().contains(want), "{url}: {err}");
        }
        // Cloud URLs parse without reaching the cloud.
        let a = Archives::open("s3://bucket/some/prefix").expect("s3");
        assert_eq!(
            a.key("sess", 3, 42).to_string(),
            "some/prefix/sessions/sess/000000000003-42.tar"
        );
    }
}
