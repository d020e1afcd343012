//! The gRPC service: admission of a turn (validation, payload cap, lease,
//! shutdown check, in that order, so a refused `Start` changes nothing), then
//! hand-off to [`crate::turn::run`].

use crate::Broker;
use crate::error::BrokerError;
use crate::turn::{self, TurnPaths, TurnSpec};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::info;
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
}

fn kind_name(kind: &Option<pb::turn_request::Kind>) -> &'static str {
    use pb::turn_request::Kind;
    match kind {
        Some(Kind::Start(_)) => "start",
        Some(Kind::Stdin(_)) => "stdin",
        Some(Kind::StdinEof(_)) => "stdin_eof",
        Some(Kind::Signal(_)) => "signal",
        Some(Kind::Llm(_)) => "llm",
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
        let start = match first.kind {
            Some(pb::turn_request::Kind::Start(s)) => s,
            other => return Err(BrokerError::NotStart(kind_name(&other)).into()),
        };
        let broker = &self.broker;
        let spec = TurnSpec::from_start(start, broker).map_err(BrokerError::from)?;
        let paths = TurnPaths::new(broker, &spec);
        let payload = turn::build_payload(broker, &spec, &paths)?;
        let lease = broker
            .sessions
            .lease(&spec.session_id, &spec.turn_id, spec.lease)
            .await?;
        let admitted = broker.admit(&spec.turn_id, &spec.session_id)?;
        info!(session.id = %spec.session_id, turn.id = %spec.turn_id, "turn admitted");
        let (tx, rx) = mpsc::channel(turn::EVENT_QUEUE);
        broker.tracker.spawn(turn::run(
            broker.clone(),
            spec,
            paths,
            payload,
            lease,
            admitted,
            stream,
            tx,
            received,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
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
        self.info(&id)
            .map(Response::new)
            .ok_or_else(|| BrokerError::SessionNotFound(id).into())
    }

    async fn list_sessions(
        &self,
        _request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsReply>, Status> {
        let sessions = self
            .broker
            .sessions
            .ids()
            .iter()
            .filter_map(|id| self.info(id))
            .collect();
        Ok(Response::new(pb::ListSessionsReply { sessions }))
    }

    async fn delete_session(
        &self,
        request: Request<pb::SessionRef>,
    ) -> Result<Response<pb::DeleteSessionReply>, Status> {
        let id = request.into_inner().session_id;
        crate::validate::session_id(&id).map_err(BrokerError::from)?;
        self.broker.sessions.delete(&id).await?;
        info!(session.id = %id, "session deleted");
        Ok(Response::new(pb::DeleteSessionReply {}))
    }
}

impl Service {
    fn running(&self, id: &str) -> Result<(String, crate::ActiveTurn), Status> {
        crate::validate::session_id(id).map_err(BrokerError::from)?;
        self.broker
            .active_turn_of(id)
            .ok_or_else(|| Status::not_found(format!("session {id} has no running turn")))
    }

    fn info(&self, id: &str) -> Option<pb::SessionInfo> {
        let meta = self.broker.sessions.meta(id)?;
        let running = self
            .broker
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
            disk_usage_bytes: crate::session::disk_usage(&self.broker.sessions.paths(id).dir),
            running_turn_id: running,
        })
    }
}
