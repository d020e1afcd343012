//! Broker-side forwarding (feature `broker`): the broker's
//! [`Upstreams`](turnstile_broker::llm::upstream::Upstreams) implemented
//! with [`LlmForwarder`], so that a broker serves a turn's LLM connections
//! itself with the very forwarder an executor would use. The `turnstile`
//! binary installs it (`Broker::set_llm_upstreams`); the broker crate itself
//! has no HTTP client and no TLS.

use crate::forward::{
    CredentialHeader, ForwarderConfig, ForwarderError, LlmForwarder, Observer, RequestSummary,
    TlsRoots, UpstreamPool,
};
use std::sync::Arc;
use turnstile_broker::llm::upstream::{Report, Serving, TurnForwarder, UpstreamSpec, Upstreams};
use turnstile_broker::profile::CredentialHeader as ProfileHeader;
use turnstile_proto::v1 as pb;

/// Makes every turn's forwarder; they share one upstream connection pool.
#[derive(Debug, Clone)]
pub struct BrokerUpstreams {
    pool: UpstreamPool,
}

impl BrokerUpstreams {
    /// `https` upstreams are verified against `roots` (the system's, or a
    /// configured CA file: a bad file is an error now).
    pub fn new(roots: TlsRoots) -> Result<BrokerUpstreams, ForwarderError> {
        Ok(BrokerUpstreams {
            pool: UpstreamPool::new(roots)?,
        })
    }
}

impl Upstreams for BrokerUpstreams {
    fn forwarder(&self, spec: &UpstreamSpec) -> Result<Arc<dyn TurnForwarder>, String> {
        let header = match spec.header {
            ProfileHeader::XApiKey => CredentialHeader::XApiKey,
            ProfileHeader::AuthorizationBearer => CredentialHeader::AuthorizationBearer,
        };
        let mut config = ForwarderConfig::new(spec.base_url.clone(), "", header);
        config.key.push_str(&spec.credential);
        config.max_request_body = spec.max_request_bytes;
        match LlmForwarder::with_pool(config, &self.pool) {
            Ok(f) => Ok(Arc::new(Turn(f))),
            Err(ForwarderError::Upstream(_, why)) => Err(why),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// One turn's forwarder.
struct Turn(LlmForwarder);

impl TurnForwarder for Turn {
    fn serve(&self, conn: tokio::net::UnixStream, report: Report) -> Serving {
        let forwarder = self.0.clone();
        let observer: Observer = Arc::new(move |s: RequestSummary| report(summary(s)));
        Box::pin(async move {
            if let Err(e) = forwarder
                .serve_connection_observed(conn, Some(observer))
                .await
            {
                tracing::debug!("llm connection (forwarded by the broker): {e}");
            }
        })
    }
}

/// The event of one request.
pub fn summary(s: RequestSummary) -> pb::LlmRequest {
    pb::LlmRequest {
        method: s.method,
        path: s.path,
        status: u32::from(s.status),
        request_bytes: s.request_bytes,
        response_bytes: s.response_bytes,
        duration_us: u64::try_from(s.duration.as_micros()).unwrap_or(u64::MAX),
        error: s.error.unwrap_or_default(),
    }
}
