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
}
