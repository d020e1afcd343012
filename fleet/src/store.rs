//! The archive store: session archives as immutable objects, named by
//! session, generation and fencing token so that no two commits ever
//! write the same object.
//!
//! Uploads stream: the export runs on the blocking pool and hands chunks
//! to the upload as it writes them, so an archive is never held whole in
//! memory nor written to local disk first. Downloads go to an anonymous
//! temp file (`O_TMPFILE`: nothing is left behind by a crash) and their
//! SHA-256 is checked against the catalog before anything is imported.

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{GetResultPayload, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use sha2::{Digest, Sha256};
use std::io::{Seek, Write};
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

    /// Downloads object `key` into an anonymous temp file in `dir` (on the
    /// same filesystem as where it will be imported), refusing it unless it
    /// is exactly `want.bytes` long with SHA-256 `want.sha256`. Returns the
    /// file, rewound.
    pub async fn download(
        &self,
        key: &ObjectPath,
        want_bytes: u64,
        want_sha256: &str,
        dir: &std::path::Path,
    ) -> Result<std::fs::File, DownloadError> {
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
        let file = tempfile::tempfile_in(dir).map_err(|e| {
            DownloadError::Store(StoreError::Other(format!(
                "cannot make a temp file in {}: {e}",
                dir.display()
            )))
        })?;
        let write_err = |e: std::io::Error| {
            DownloadError::Store(StoreError::Other(format!("cannot write the download: {e}")))
        };
        let too_long = move || {
            DownloadError::Mismatch(format!(
                "the object is longer than the catalog's {want_bytes} bytes"
            ))
        };
        let mut hasher = Sha256::new();
        let mut seen = 0u64;
        let mut file = match got.payload {
            // A local object (a `file://` store): copied on the blocking
            // pool in large reads. Its stream would take a blocking-pool
            // round trip for every 8 KiB, most of a hydrate's time.
            GetResultPayload::File(src, _) => {
                let shown = key.to_string();
                let copied = tokio::task::spawn_blocking(move || {
                    let mut src = std::io::Read::take(src, want_bytes.saturating_add(1));
                    let mut file = file;
                    let mut buf = vec![0u8; 1 << 20];
                    loop {
                        let n = match std::io::Read::read(&mut src, &mut buf) {
                            Ok(0) => break,
                            Ok(n) => n,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                            Err(e) => {
                                return Err(DownloadError::Store(StoreError::Other(format!(
                                    "cannot download {shown}: {e}"
                                ))));
                            }
                        };
                        seen += n as u64;
                        if seen > want_bytes {
                            return Err(too_long());
                        }
                        hasher.update(&buf[..n]);
                        file.write_all(&buf[..n]).map_err(write_err)?;
                    }
                    Ok((file, hasher, seen))
                })
                .await
                .map_err(|e| {
                    DownloadError::Store(StoreError::Other(format!("download task: {e}")))
                })??;
                (hasher, seen) = (copied.1, copied.2);
                copied.0
            }
            GetResultPayload::Stream(mut stream) => {
                let mut file = tokio::fs::File::from_std(file);
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(|e| {
                        DownloadError::Store(StoreError::op("cannot download", key)(e))
                    })?;
                    seen += chunk.len() as u64;
                    if seen > want_bytes {
                        return Err(too_long());
                    }
                    hasher.update(&chunk);
                    tokio::io::AsyncWriteExt::write_all(&mut file, &chunk)
                        .await
                        .map_err(write_err)?;
                }
                file.into_std().await
            }
        };
        let digest = hex(&hasher.finalize());
        if seen != want_bytes || digest != want_sha256 {
            return Err(DownloadError::Mismatch(format!(
                "its content ({seen} bytes, sha256 {digest}) is not what was committed ({want_bytes} bytes, sha256 {want_sha256})"
            )));
        }
        file.rewind().map_err(|e| {
            DownloadError::Store(StoreError::Other(format!(
                "cannot rewind the download: {e}"
            )))
        })?;
        Ok(file)
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
            let mut f = archives
                .download(&key, up.bytes, &up.sha256, dir.path())
                .await
                .expect("download");
            let mut back = Vec::new();
            std::io::Read::read_to_end(&mut f, &mut back).expect("read");
            assert!(back == data, "size {size}");
            // A wrong digest or size is refused.
            let err = archives
                .download(&key, up.bytes, &"0".repeat(64), dir.path())
                .await
                .expect_err("digest");
            assert!(
                err.to_string().contains("is not what was committed"),
                "{err}"
            );
            let err = archives
                .download(&key, up.bytes + 1, &up.sha256, dir.path())
                .await
                .expect_err("size");
            assert!(err.to_string().contains("the catalog says"), "{err}");
        }
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
                .download(&key, 0, "", dir.path())
                .await
                .expect_err("absent");
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
