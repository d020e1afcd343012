//! The gRPC service: admission of a turn (validation, payload cap, lease,
//! shutdown check, in that order, so a refused `Start` changes nothing), then
//! hand-off to [`Turn::run_to_exit`].

use crate::Broker;
use crate::error::BrokerError;
use crate::fleet::CatalogEntry;
use crate::session::LeasePolicy;
use crate::turn::fleet::FleetTurn;
use crate::turn::link::{self, Link};
use crate::turn::registry::{self, Begin, Found};
use crate::turn::{self, Turn, TurnPaths, TurnSpec};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, info, warn};
use turnstile_proto::v1 as pb;
use turnstile_proto::v1::broker_server::Broker as BrokerApi;

#[derive(Debug, Clone)]
pub struct Service {
    broker: Arc<Broker>,
}

impl Service {
    pub fn new(broker: Arc<Broker>) -> Self {
        Service { broker }
    }

    /// A `Start`: a new turn, or the turn its key names.
    async fn start(
        &self,
        start: pb::Start,
        requests: Streaming<pb::TurnRequest>,
        received: Instant,
    ) -> Result<Response<EventStream>, Status> {
        let broker = &self.broker;
        let spec = TurnSpec::from_start(start, broker).map_err(BrokerError::from)?;
        let paths = TurnPaths::new(broker, &spec);
        let payload = turn::build_payload(broker, &spec, &paths)?;
        // Below the reserve a turn would fail on a full disk, and take the
        // broker's records with it: refused before anything is written.
        broker.disk.check_reserve().map_err(BrokerError::from)?;
        let (signals, signals_rx) = crate::signals();
        let link = match broker.turns.begin(&spec, signals.clone())? {
            Begin::New(link) => link,
            Begin::Attach(link) => {
                info!(session.id = %spec.session_id, turn.key = %spec.turn_key, "start with a running turn's key: attached to it");
                let from = link.first_kept_seq().saturating_sub(1);
                return join(&link, from, requests);
            }
            Begin::Replay(path) => {
                info!(session.id = %spec.session_id, turn.key = %spec.turn_key, "start with an ended turn's key: replaying it");
                let link = registry::replay(&path)?;
                let from = link.first_kept_seq().saturating_sub(1);
                return join(&link, from, requests);
            }
        };
        // From here a refusal forgets the turn it registered.
        let admission = async {
            let waited = Instant::now();
            let lease = broker
                .sessions
                .lease(&spec.session_id, &spec.turn_id, spec.lease)
                .await?;
            // Fleet mode: the fleet-wide lease, after the host's (so this
            // worker asks the database once per session at a time), with
            // what is left of a WAIT.
            let fleet_lease = match &broker.fleet {
                Some(fleet) => {
                    let policy = match spec.lease {
                        LeasePolicy::Reject => LeasePolicy::Reject,
                        LeasePolicy::Wait(max) => {
                            LeasePolicy::Wait(max.saturating_sub(waited.elapsed()))
                        }
                    };
                    let taken = fleet
                        .acquire_for(&broker.sessions, &lease, &spec.turn_id, policy)
                        .await?;
                    Some((fleet.clone(), taken))
                }
                None => None,
            };
            let admitted =
                match broker.admit(&spec.turn_id, &spec.session_id, (signals, signals_rx)) {
                    Ok(a) => a,
                    Err(e) => {
                        if let Some((fleet, taken)) = fleet_lease {
                            let _ = fleet.release(&taken).await;
                        }
                        return Err(e);
                    }
                };
            let fleet =
                fleet_lease.map(|(fleet, taken)| FleetTurn::keep(fleet, taken, &admitted.turn));
            Ok::<_, BrokerError>((lease, fleet, admitted))
        };
        let (lease, fleet, admitted) = match admission.await {
            Ok(admitted) => admitted,
            Err(e) => {
                let status = Status::from(e);
                link.fail(status.clone());
                broker.turns.abandon(&spec.session_id, &spec.turn_id);
                return Err(status);
            }
        };
        info!(session.id = %spec.session_id, turn.id = %spec.turn_id, "turn admitted");
        let response = join(&link, 0, requests)?;
        let turn = Turn {
            broker: broker.clone(),
            spec,
            paths,
            payload,
            lease,
            fleet,
            admitted,
            link,
            received,
        };
        broker.tracker.spawn(turn.run_to_exit());
        Ok(response)
    }

    /// An `Attach`: the turn it names, from the event after `after_seq`.
    fn attach(
        &self,
        a: pb::Attach,
        requests: Streaming<pb::TurnRequest>,
    ) -> Result<Response<EventStream>, Status> {
        use crate::validate;
        validate::session_id(&a.session_id).map_err(BrokerError::from)?;
        if !a.turn_id.is_empty() {
            validate::turn_id(&a.turn_id).map_err(BrokerError::from)?;
        }
        if !a.turn_key.is_empty() {
            validate::turn_key(&a.turn_key).map_err(BrokerError::from)?;
        }
        let link = match self
            .broker
            .turns
            .find(&a.session_id, &a.turn_id, &a.turn_key)?
        {
            Found::Running(link) => link,
            Found::Ended(path) => registry::replay(&path)?,
        };
        info!(session.id = %a.session_id, after_seq = a.after_seq, "executor attached");
        join(&link, a.after_seq, requests)
    }
}

/// Makes `requests` and a new event stream the turn's executor stream.
fn join(
    link: &Arc<Link>,
    after_seq: u64,
    requests: Streaming<pb::TurnRequest>,
) -> Result<Response<EventStream>, Status> {
    let attachment = link.attach(after_seq)?;
    let forward = link::forward_requests(link.clone(), attachment.epoch, attachment.sink, requests);
    tokio::spawn(forward.in_current_span());
    Ok(Response::new(Box::pin(attachment.stream)))
}

fn kind_name(kind: &Option<pb::turn_request::Kind>) -> &'static str {
    use pb::turn_request::Kind;
    match kind {
        Some(Kind::Start(_)) => "start",
        Some(Kind::Stdin(_)) => "stdin",
        Some(Kind::StdinEof(_)) => "stdin_eof",
        Some(Kind::Signal(_)) => "signal",
        Some(Kind::Llm(_)) => "llm",
        Some(Kind::Attach(_)) => "attach",
        None => "an empty request",
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::TurnEvent, Status>> + Send>>;

#[tonic::async_trait]
impl BrokerApi for Service {
    type TurnStream = EventStream;

    async fn turn(
        &self,
        request: Request<Streaming<pb::TurnRequest>>,
    ) -> Result<Response<Self::TurnStream>, Status> {
        let received = Instant::now();
        let mut stream = request.into_inner();
        let first = stream.message().await?.ok_or(BrokerError::NoStart)?;
        match first.kind {
            Some(pb::turn_request::Kind::Start(s)) => self.start(s, stream, received).await,
            Some(pb::turn_request::Kind::Attach(a)) => self.attach(a, stream),
            other => Err(BrokerError::NotStart(kind_name(&other)).into()),
        }
    }

    async fn cancel_turn(
        &self,
        request: Request<pb::SessionRef>,
    ) -> Result<Response<pb::TurnRef>, Status> {
        let id = request.into_inner().session_id;
        let (turn_id, turn) = self.running(&id)?;
        info!(session.id = %id, turn.id = %turn_id, "cancel requested");
        turn.stop(crate::StopReason::Cancelled);
        Ok(Response::new(pb::TurnRef {
            session_id: id,
            turn_id,
        }))
    }

    async fn interrupt_turn(
        &self,
        request: Request<pb::SessionRef>,
    ) -> Result<Response<pb::TurnRef>, Status> {
        let id = request.into_inner().session_id;
        let (turn_id, turn) = self.running(&id)?;
        let _ = turn.signals.try_send(nix::sys::signal::Signal::SIGINT);
        Ok(Response::new(pb::TurnRef {
            session_id: id,
            turn_id,
        }))
    }

    async fn get_session(
        &self,
        request: Request<pb::SessionRef>,
    ) -> Result<Response<pb::SessionInfo>, Status> {
        let id = request.into_inner().session_id;
        crate::validate::session_id(&id).map_err(BrokerError::from)?;
        self.info(id).await
    }

    async fn list_sessions(
        &self,
        _request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsReply>, Status> {
        let mut ids = self.broker.sessions.ids();
        let catalog = self.catalog().await?;
        ids.extend(catalog.iter().map(|e| e.session_id.clone()));
        ids.sort();
        ids.dedup();
        let sessions = self.infos_with(ids, catalog).await?;
        Ok(Response::new(pb::ListSessionsReply { sessions }))
    }

    async fn fork_session(
        &self,
        request: Request<pb::ForkSessionRequest>,
    ) -> Result<Response<pb::SessionInfo>, Status> {
        let r = request.into_inner();
        crate::validate::session_id(&r.source_session_id).map_err(BrokerError::from)?;
        crate::validate::session_id(&r.new_session_id).map_err(BrokerError::from)?;
        self.broker
            .disk
            .check_reserve()
            .map_err(BrokerError::from)?;
        // Fleet mode: a fork of the source's committed generation, in the
        // catalog and the store (its first turn anywhere hydrates it); a
        // session only this worker has is forked here, as on one host.
        let in_fleet = match &self.broker.fleet {
            Some(fleet) => {
                if self.broker.sessions.meta(&r.new_session_id).is_some() {
                    return Err(BrokerError::SessionExists(r.new_session_id).into());
                }
                fleet
                    .fork(&r.source_session_id, &r.new_session_id)
                    .await
                    .map_err(BrokerError::from)?
            }
            None => false,
        };
        if !in_fleet {
            self.broker
                .sessions
                .fork(&r.source_session_id, &r.new_session_id)
                .await?;
        }
        info!(session.id = %r.new_session_id, from = %r.source_session_id, "session forked");
        self.info(r.new_session_id).await
    }

    type ExportSessionStream = ReceiverStream<Result<pb::ArchiveChunk, Status>>;

    async fn export_session(
        &self,
        request: Request<pb::SessionRef>,
    ) -> Result<Response<Self::ExportSessionStream>, Status> {
        let id = request.into_inner().session_id;
        crate::validate::session_id(&id).map_err(BrokerError::from)?;
        let (lease, dir) = self.broker.sessions.export_lease(&id).await?;
        let (tx, rx) = mpsc::channel(8);
        tokio::task::spawn_blocking(move || {
            let mut w = ChunkWriter {
                tx: tx.clone(),
                buf: Vec::with_capacity(ChunkWriter::CHUNK),
            };
            match crate::archive::export(&dir, &mut w) {
                Ok(skipped) => {
                    for s in skipped {
                        warn!(session.id = %id, skipped = %s, "export: entry left out");
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(Status::internal(format!("export failed: {e}"))));
                }
            }
            // The lease is held until the whole archive is out.
            drop(lease);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn import_session(
        &self,
        request: Request<Streaming<pb::ImportSessionRequest>>,
    ) -> Result<Response<pb::SessionInfo>, Status> {
        use tokio::io::AsyncWriteExt;
        let mut stream = request.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("stream ended before the session id"))?;
        let id = first.session_id.clone();
        crate::validate::session_id(&id).map_err(BrokerError::from)?;
        let broker = &self.broker;
        broker.disk.check_reserve().map_err(BrokerError::from)?;
        let lease = broker.sessions.new_session_lease(&id).await?;
        // Spool to a file first: extraction is blocking, and a truncated
        // upload must not leave a half session. The spool is owner-only and
        // goes with this request, however it ends (a client that goes away
        // drops this future, and the guard with it).
        let spool_dir = broker.config.state_dir.join("imports");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&spool_dir)
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => Ok(()),
                _ => Err(e),
            })
            .map_err(|e| BrokerError::io("cannot create", &spool_dir, e))?;
        let spool = Spool(spool_dir.join(format!("{}.tar", crate::turn::new_turn_id())));
        let result = async {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&spool.0)
                .map_err(|e| BrokerError::io("cannot create", &spool.0, e))?;
            let mut f = tokio::fs::File::from_std(f);
            // Content cap plus generous room for tar headers.
            let raw_cap = broker
                .config
                .import_max_bytes
                .saturating_mul(2)
                .saturating_add(1 << 20);
            let mut total = first.data.len() as u64;
            f.write_all(&first.data)
                .await
                .map_err(|e| BrokerError::io("cannot write", &spool.0, e))?;
            while let Some(msg) = stream.message().await? {
                total += msg.data.len() as u64;
                if total > raw_cap {
                    return Err(BrokerError::from(crate::archive::ImportError::TooLarge {
                        cap: broker.config.import_max_bytes,
                    })
                    .into());
                }
                f.write_all(&msg.data)
                    .await
                    .map_err(|e| BrokerError::io("cannot write", &spool.0, e))?;
            }
            f.flush()
                .await
                .map_err(|e| BrokerError::io("cannot write", &spool.0, e))?;
            drop(f);
            let caps = broker.config.import_caps();
            let b = broker.clone();
            let path = spool.0.clone();
            let meta = tokio::task::spawn_blocking(move || {
                let file = std::fs::File::open(&path)
                    .map_err(|e| BrokerError::io("cannot open", &path, e))?;
                b.sessions
                    .import(&lease, std::io::BufReader::new(file), caps)
            })
            .await
            .map_err(|e| Status::internal(format!("import task: {e}")))??;
            Ok::<_, Status>(meta)
        }
        .await;
        drop(spool);
        result?;
        info!(session.id = %id, "session imported");
        self.info(id).await
    }

    async fn gc_sessions(
        &self,
        request: Request<pb::GcRequest>,
    ) -> Result<Response<pb::GcReply>, Status> {
        let dry_run = request.into_inner().dry_run;
        let sessions = Service::gc(&self.broker, dry_run).await?;
        Ok(Response::new(pb::GcReply { sessions }))
    }

    async fn delete_session(
        &self,
        request: Request<pb::SessionRef>,
    ) -> Result<Response<pb::DeleteSessionReply>, Status> {
        let id = request.into_inner().session_id;
        crate::validate::session_id(&id).map_err(BrokerError::from)?;
        // Fleet mode: out of the catalog (refused while a turn anywhere
        // holds it) with its archives, then this worker's copy if any.
        let in_fleet = match &self.broker.fleet {
            Some(fleet) => fleet.forget(&id).await.map_err(BrokerError::from)?,
            None => false,
        };
        match self.broker.sessions.delete(&id).await {
            Ok(()) => {}
            Err(BrokerError::SessionNotFound(_)) if in_fleet => {}
            Err(e) => return Err(e.into()),
        }
        self.broker.disk.forget(&id);
        self.broker.turns.forget_session(&id);
        info!(session.id = %id, "session deleted");
        Ok(Response::new(pb::DeleteSessionReply {}))
    }
}

/// An import's spool file, removed when dropped.
struct Spool(std::path::PathBuf);

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A `Write` that sends 64 KiB archive chunks down a gRPC stream from a
/// blocking thread; the bounded channel is the backpressure.
struct ChunkWriter {
    tx: mpsc::Sender<Result<pb::ArchiveChunk, Status>>,
    buf: Vec<u8>,
}

impl ChunkWriter {
    const CHUNK: usize = 64 * 1024;

    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = bytes::Bytes::from(std::mem::take(&mut self.buf));
        self.tx
            .blocking_send(Ok(pb::ArchiveChunk { data }))
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::BrokenPipe, "export receiver gone")
            })
    }
}

impl std::io::Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= Self::CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

impl Service {
    /// Deletes (or with `dry_run` lists) the sessions idle past the TTL.
    pub async fn gc(broker: &Broker, dry_run: bool) -> Result<Vec<String>, Status> {
        let ttl = broker.config.session_ttl_ms.ok_or_else(|| {
            Status::failed_precondition("no session_ttl_ms configured: sessions are kept forever")
        })?;
        let cutoff = crate::session::now_unix_ms().saturating_sub(ttl);
        let mut out = Vec::new();
        // Fleet mode: sessions no turn anywhere touched since the cutoff
        // leave the catalog and the store (and this worker's disk).
        if let Some(fleet) = &broker.fleet {
            let catalog = fleet.catalog().await.map_err(BrokerError::from)?;
            for e in catalog {
                if e.holder.is_some() || e.updated_unix_ms >= cutoff {
                    continue;
                }
                if dry_run {
                    out.push(e.session_id);
                    continue;
                }
                match fleet.forget(&e.session_id).await {
                    Ok(_) => {
                        let _ = broker.sessions.delete(&e.session_id).await;
                        broker.disk.forget(&e.session_id);
                        info!(session.id = %e.session_id, ttl_ms = ttl, "garbage-collected an idle session of the fleet");
                        out.push(e.session_id);
                    }
                    Err(err) => {
                        info!(session.id = %e.session_id, error = %err, "session kept by the garbage collector")
                    }
                }
            }
        }
        for id in broker.sessions.idle_since(cutoff) {
            if out.contains(&id) {
                continue;
            }
            if broker.active_turn_of(&id).is_some() {
                continue;
            }
            if dry_run {
                out.push(id);
                continue;
            }
            match broker.sessions.delete(&id).await {
                Ok(()) => {
                    broker.disk.forget(&id);
                    info!(session.id = %id, ttl_ms = ttl, "garbage-collected an idle session");
                    out.push(id);
                }
                // A turn started meanwhile: the session is not idle anymore.
                Err(e) => {
                    info!(session.id = %id, error = %e, "session kept by the garbage collector")
                }
            }
        }
        Ok(out)
    }

    fn running(&self, id: &str) -> Result<(String, crate::ActiveTurn), Status> {
        crate::validate::session_id(id).map_err(BrokerError::from)?;
        self.broker
            .active_turn_of(id)
            .ok_or_else(|| Status::not_found(format!("session {id} has no running turn")))
    }

    /// The fleet's catalog (empty without a fleet).
    async fn catalog(&self) -> Result<Vec<CatalogEntry>, Status> {
        match &self.broker.fleet {
            Some(fleet) => Ok(fleet.catalog().await.map_err(BrokerError::from)?),
            None => Ok(Vec::new()),
        }
    }

    /// Sessions' info, read on the blocking pool: metadata files and a disk
    /// usage walk of each tree, which must never stall the runtime (and
    /// with it every running turn's relay); with what `catalog` says of
    /// them.
    async fn infos_with(
        &self,
        ids: Vec<String>,
        catalog: Vec<CatalogEntry>,
    ) -> Result<Vec<pb::SessionInfo>, Status> {
        let broker = self.broker.clone();
        tokio::task::spawn_blocking(move || {
            ids.iter()
                .filter_map(|id| {
                    let entry = catalog.iter().find(|e| &e.session_id == id);
                    with_catalog(info(&broker, id), entry)
                })
                .collect()
        })
        .await
        .map_err(|e| Status::internal(format!("session info task: {e}")))
    }

    async fn info(&self, id: String) -> Result<Response<pb::SessionInfo>, Status> {
        let catalog = self.catalog().await?;
        self.infos_with(vec![id.clone()], catalog)
            .await?
            .pop()
            .map(Response::new)
            .ok_or_else(|| BrokerError::SessionNotFound(id).into())
    }
}

/// A session's info with what the fleet's catalog says of it: who holds
/// it, its generation and archive size, the last turn anywhere. A session
/// only the catalog has (no local copy here) is shown from the catalog.
fn with_catalog(
    local: Option<pb::SessionInfo>,
    entry: Option<&CatalogEntry>,
) -> Option<pb::SessionInfo> {
    let Some(e) = entry else {
        return local;
    };
    let mut i = local.unwrap_or_else(|| pb::SessionInfo {
        session_id: e.session_id.clone(),
        last_turn_end_unix_ms: e.updated_unix_ms,
        ..Default::default()
    });
    if let Some(h) = &e.holder {
        i.holder_worker = h.worker.clone();
        if i.running_turn_id.is_empty() {
            i.running_turn_id = h.turn.clone();
        }
    }
    i.generation = e.generation;
    i.archive_bytes = e.bytes;
    i.last_worker = e.last_worker.clone().unwrap_or_default();
    if let Some(t) = &e.last_turn_id {
        // The catalog knows the last turn on any worker.
        i.last_turn_id = t.clone();
    }
    Some(i)
}

/// One session's info (blocking: reads its metadata and walks its tree).
fn info(broker: &Broker, id: &str) -> Option<pb::SessionInfo> {
    let meta = broker.sessions.meta(id)?;
    let running = broker
        .active_turn_of(id)
        .map(|(t, _)| t)
        .unwrap_or_default();
    Some(pb::SessionInfo {
        session_id: id.to_string(),
        created_unix_ms: meta.created_unix_ms,
        turn_count: meta.turn_count,
        last_turn_id: meta.last_turn_id.unwrap_or_default(),
        last_turn_start_unix_ms: meta.last_turn_start_unix_ms.unwrap_or(0),
        last_turn_end_unix_ms: meta.last_turn_end_unix_ms.unwrap_or(0),
        last_exit_reason: meta.last_exit_reason.unwrap_or_default(),
        disk_usage_bytes: broker.sessions.usage(id).map(|u| u.bytes).unwrap_or(0),
        running_turn_id: running,
        local_copy: true,
        ..Default::default()
    })
}
