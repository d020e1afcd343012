//! [`LlmForwarder`]: serves a relayed LLM connection as HTTP/1.1 and
//! forwards each request to the upstream with the credential added.
//!
//! What the agent sends is passed on except credential-looking headers
//! (removed: the only credential upstream sees is the executor's) and
//! hop-by-hop headers (each side of the forwarder is its own connection).
//! Responses are streamed frame by frame, so server-sent events reach the
//! agent as the upstream writes them, and every upstream status (429, 529,
//! 5xx...) is passed through unchanged so that the agent's own retry logic
//! applies. The forwarder's own answers are JSON errors: `502` when the
//! upstream cannot be reached, `413` when the request body is over the cap.
//!
//! A connection upgrade (WebSocket) is passed through: the request goes
//! upstream with its `upgrade` header (and the credential replaced like any
//! other), and when the upstream switches protocols both upgraded
//! connections are joined byte for byte, both ways, until either closes.
//!
//! How the credential is sent is either fixed by the executor
//! ([`ForwarderConfig::new`]) or taken from the turn's agent profile
//! ([`ForwarderConfig::for_profile`]): the broker names it in `Started`
//! (`llm_profile.credential_header`), and [`crate::Turn`] switches the
//! forwarder to it for that turn (a clone that shares the upstream pool).

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

/// Default cap on a request body forwarded upstream.
pub const DEFAULT_MAX_REQUEST_BODY: u64 = 32 << 20;
/// How long an idle pooled upstream connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(90);
/// Time allowed to connect to the upstream before the request gets a 502.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Headers an agent might carry a credential in; never forwarded.
const CREDENTIAL_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "cookie",
];

/// Headers that belong to one connection, not to the request (RFC 9110
/// section 7.6.1), plus `host`, which the client sets for the upstream.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

/// How the credential is sent upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialHeader {
    /// `x-api-key: <key>` (Anthropic).
    XApiKey,
    /// `authorization: Bearer <key>` (OpenAI and most others).
    AuthorizationBearer,
}

impl std::str::FromStr for CredentialHeader {
    type Err = ForwarderError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "x-api-key" => Ok(CredentialHeader::XApiKey),
            "authorization" | "bearer" => Ok(CredentialHeader::AuthorizationBearer),
            _ => Err(ForwarderError::Header(s.to_string())),
        }
    }
}

impl CredentialHeader {
    /// What the broker's `Started` names; `None` when it names nothing
    /// (a broker without profiles).
    pub fn from_profile(profile: Option<&turnstile_proto::v1::LlmProfile>) -> Option<Self> {
        use turnstile_proto::v1::CredentialHeader as Pb;
        match profile.map(|p| Pb::try_from(p.credential_header)) {
            Some(Ok(Pb::XApiKey)) => Some(CredentialHeader::XApiKey),
            Some(Ok(Pb::AuthorizationBearer)) => Some(CredentialHeader::AuthorizationBearer),
            _ => None,
        }
    }
}

/// What an [`LlmForwarder`] forwards to, and with which credential.
#[derive(Clone)]
pub struct ForwarderConfig {
    /// Base URL of the upstream (`http://` or `https://`); the agent's
    /// request path is appended to its path.
    pub upstream: String,
    /// The credential. Never logged, never shown by `Debug`.
    pub key: String,
    /// How the credential is sent; `None`: as the turn's agent profile
    /// says (`x-api-key` until a turn says otherwise).
    pub header: Option<CredentialHeader>,
    /// Requests with a larger body get `413` (default 32 MiB).
    pub max_request_body: u64,
}

impl ForwarderConfig {
    pub fn new(
        upstream: impl Into<String>,
        key: impl Into<String>,
        header: CredentialHeader,
    ) -> Self {
        ForwarderConfig {
            upstream: upstream.into(),
            key: key.into(),
            header: Some(header),
            max_request_body: DEFAULT_MAX_REQUEST_BODY,
        }
    }

    /// The credential sent the way each turn's agent profile says
    /// (`Started.llm_profile`): `x-api-key` for Claude Code,
    /// `authorization: Bearer` for Codex.
    pub fn for_profile(upstream: impl Into<String>, key: impl Into<String>) -> Self {
        ForwarderConfig {
            header: None,
            ..ForwarderConfig::new(upstream, key, CredentialHeader::XApiKey)
        }
    }
}

impl std::fmt::Debug for ForwarderConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwarderConfig")
            .field("upstream", &self.upstream)
            .field("key", &"<redacted>")
            .field("header", &self.header)
            .field("max_request_body", &self.max_request_body)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ForwarderError {
    #[error("invalid LLM upstream URL {0:?}: {1}")]
    Upstream(String, String),
    #[error("invalid LLM credential header {0:?}: use x-api-key or authorization")]
    Header(String),
    #[error("the LLM credential is empty or holds characters a header cannot carry")]
    Key,
    #[error("cannot set up TLS for the LLM upstream: {0}")]
    Tls(String),
}

type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;
type HttpsConnector = hyper_rustls::HttpsConnector<HttpConnector>;

/// Forwards the agent's HTTP requests to the upstream with the credential
/// added. Cheap to clone; clones share one upstream connection pool, so keep
/// one forwarder for many turns.
#[derive(Clone)]
pub struct LlmForwarder {
    inner: Arc<Inner>,
    header: CredentialHeader,
    /// Whether the executor fixed `header` (a turn's profile then does not
    /// change it).
    fixed: bool,
}

struct Inner {
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    /// The upstream's base path without its trailing `/`.
    base_path: String,
    /// The credential's header values (sensitive), one per way to send it.
    x_api_key: HeaderValue,
    bearer: HeaderValue,
    max_request_body: u64,
    client: Client<HttpsConnector, Body>,
}

impl std::fmt::Debug for LlmForwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmForwarder")
            .field(
                "upstream",
                &format!(
                    "{}://{}{}",
                    self.inner.scheme, self.inner.authority, self.inner.base_path
                ),
            )
            .finish_non_exhaustive()
    }
}

impl LlmForwarder {
    pub fn new(config: ForwarderConfig) -> Result<LlmForwarder, ForwarderError> {
        let bad = |why: &str| ForwarderError::Upstream(config.upstream.clone(), why.to_string());
        let uri: Uri = config
            .upstream
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        let scheme = uri.scheme().cloned().ok_or_else(|| bad("no scheme"))?;
        if scheme != http::uri::Scheme::HTTP && scheme != http::uri::Scheme::HTTPS {
            return Err(bad("the scheme must be http or https"));
        }
        let authority = uri.authority().cloned().ok_or_else(|| bad("no host"))?;
        if uri.query().is_some() {
            return Err(bad("a query is not allowed in the base URL"));
        }
        let base_path = uri.path().trim_end_matches('/').to_string();
        let sensitive = |v: Result<HeaderValue, _>| match v {
            Ok(mut v) if !config.key.is_empty() => {
                v.set_sensitive(true);
                Ok(v)
            }
            _ => Err(ForwarderError::Key),
        };
        let x_api_key = sensitive(HeaderValue::from_str(&config.key))?;
        let bearer = sensitive(HeaderValue::from_str(&format!("Bearer {}", config.key)))?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        // The crypto provider is named, not left to rustls' process default:
        // a binary that links both of rustls' providers (the cli, through
        // the fleet's cloud SDKs) has no default.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(provider)
            .map_err(|e| ForwarderError::Tls(e.to_string()))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .build(connector);
        Ok(LlmForwarder {
            inner: Arc::new(Inner {
                scheme,
                authority,
                base_path,
                x_api_key,
                bearer,
                max_request_body: config.max_request_body,
                client,
            }),
            header: config.header.unwrap_or(CredentialHeader::XApiKey),
            fixed: config.header.is_some(),
        })
    }

    /// This forwarder for a turn whose agent profile sends the credential
    /// as `header` (`None`: the profile does not say): unchanged when the
    /// executor fixed the header. Shares the upstream pool.
    pub fn for_turn(&self, header: Option<CredentialHeader>) -> LlmForwarder {
        let mut f = self.clone();
        if !self.fixed
            && let Some(h) = header
        {
            f.header = h;
        }
        f
    }

    /// How this forwarder sends the credential.
    pub fn header(&self) -> CredentialHeader {
        self.header
    }

    fn credential(&self) -> (HeaderName, HeaderValue) {
        match self.header {
            CredentialHeader::XApiKey => (
                HeaderName::from_static("x-api-key"),
                self.inner.x_api_key.clone(),
            ),
            CredentialHeader::AuthorizationBearer => {
                (header::AUTHORIZATION, self.inner.bearer.clone())
            }
        }
    }

    /// Serves one connection from the agent (any byte stream) as HTTP/1.1
    /// with keep-alive, until the agent or the forwarder closes it.
    pub async fn serve_connection<IO>(&self, io: IO) -> Result<(), hyper::Error>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let this = self.clone();
        let service = hyper::service::service_fn(move |req| {
            let this = this.clone();
            async move { Ok::<_, Infallible>(this.forward(req).await) }
        });
        hyper::server::conn::http1::Builder::new()
            .half_close(true)
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades()
            .await
    }

    /// Forwards one request; never fails (errors become JSON responses).
    pub async fn forward(&self, mut req: Request<Incoming>) -> Response<Body> {
        let inner = &self.inner;
        // A connection upgrade (WebSocket): the protocol asked for, and the
        // agent's side of the upgraded connection once answered 101.
        let upgrade = upgrade_protocol(req.headers()).map(|p| (p, hyper::upgrade::on(&mut req)));
        let (mut parts, body) = req.into_parts();
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > inner.max_request_body) {
            // Read and drop the body first, so that an agent that sends it
            // all before reading can read the answer; memory stays flat.
            drain(body).await;
            return self.too_large();
        }
        let path_and_query = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let uri = Uri::builder()
            .scheme(inner.scheme.clone())
            .authority(inner.authority.clone())
            .path_and_query(format!("{}{}", inner.base_path, path_and_query))
            .build();
        let uri = match uri {
            Ok(u) => u,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    &format!("bad request path: {e}"),
                );
            }
        };
        strip_hop_by_hop(&mut parts.headers);
        for name in CREDENTIAL_HEADERS {
            parts.headers.remove(*name);
        }
        let (name, value) = self.credential();
        parts.headers.insert(name, value);
        if let Some((protocol, _)) = &upgrade {
            set_upgrade(&mut parts.headers, protocol.clone());
        }
        parts.uri = uri;
        parts.version = http::Version::HTTP_11;
        let over = Arc::new(AtomicBool::new(false));
        let body = Capped {
            inner: body,
            left: inner.max_request_body,
            over: Arc::clone(&over),
        };
        let upstream = Request::from_parts(parts, body.boxed());
        match inner.client.request(upstream).await {
            Ok(resp) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => match upgrade {
                Some((_, agent)) => switch(agent, resp),
                None => error(
                    StatusCode::BAD_GATEWAY,
                    "upstream_protocol_error",
                    "turnstile: the LLM upstream switched protocols unasked",
                ),
            },
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, body.map_err(Into::into).boxed())
            }
            Err(_) if over.load(Ordering::Acquire) => self.too_large(),
            Err(e) => {
                tracing::warn!(upstream = %inner.authority, "LLM upstream unreachable: {e:?}");
                error(
                    StatusCode::BAD_GATEWAY,
                    "upstream_unreachable",
                    &format!(
                        "turnstile: the LLM upstream {} cannot be reached: {}",
                        inner.authority,
                        root_cause(&e)
                    ),
                )
            }
        }
    }

    fn too_large(&self) -> Response<Body> {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            &format!(
                "turnstile: the request body is over the relay's cap of {} bytes",
                self.inner.max_request_body
            ),
        )
    }
}

/// The protocol a request asks to upgrade to (`connection: upgrade` and an
/// `upgrade` header), if any.
fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let asked = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    asked
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten()
}

/// The two headers of an upgrade, after the hop-by-hop ones went.
fn set_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
}

/// The upstream switched protocols: the agent gets the 101, and a task
/// joins the two upgraded connections until either side closes.
fn switch(agent: hyper::upgrade::OnUpgrade, mut resp: Response<Incoming>) -> Response<Body> {
    let upstream = hyper::upgrade::on(&mut resp);
    let (mut parts, _) = resp.into_parts();
    let protocol = parts.headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(p) = protocol {
        set_upgrade(&mut parts.headers, p);
    }
    tokio::spawn(async move {
        let (agent, upstream) = match tokio::join!(agent, upstream) {
            (Ok(a), Ok(u)) => (a, u),
            (a, u) => {
                tracing::debug!(agent = ?a.err(), upstream = ?u.err(), "llm upgrade failed");
                return;
            }
        };
        let (mut agent, mut upstream) = (TokioIo::new(agent), TokioIo::new(upstream));
        if let Err(e) = tokio::io::copy_bidirectional(&mut agent, &mut upstream).await {
            tracing::debug!("llm upgraded connection ended: {e}");
        }
    });
    let body = http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed();
    Response::from_parts(parts, body)
}

/// The innermost error's text (hyper's outer ones only say "client error").
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Removes hop-by-hop headers, including those the `connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
}

/// A JSON error in the shape model APIs use.
fn error(status: StatusCode, kind: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({
        "type": "error",
        "error": { "type": kind, "message": message },
    })
    .to_string();
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

async fn drain(mut body: Incoming) {
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            return;
        }
    }
}

/// A request body that fails once more than `left` bytes went through, and
/// says so in `over` (the upstream request then fails, and the agent gets
/// `413` rather than `502`).
struct Capped {
    inner: Incoming,
    left: u64,
    over: Arc<AtomicBool>,
}

#[derive(Debug, thiserror::Error)]
#[error("request body over the cap")]
struct OverCap;

impl http_body::Body for Capped {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                if len > this.left {
                    this.over.store(true, Ordering::Release);
                    return Poll::Ready(Some(Err(OverCap.into())));
                }
                this.left -= len;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_validated_and_the_key_never_shows() {
        let ok = ForwarderConfig::new(
            "http://127.0.0.1:9/v1/",
            "sk-secret",
            CredentialHeader::XApiKey,
        );
        assert!(!format!("{ok:?}").contains("sk-secret"));
        let f = LlmForwarder::new(ok).expect("valid");
        assert_eq!(f.inner.base_path, "/v1");
        assert!(!format!("{f:?}").contains("sk-secret"));
        assert!(f.credential().1.is_sensitive());
        assert!(f.inner.bearer.is_sensitive());
        for bad in [
            "ftp://x",
            "127.0.0.1:9",
            "http://",
            "http://x/?q=1",
            "not a url",
        ] {
            let cfg = ForwarderConfig::new(bad, "k", CredentialHeader::XApiKey);
            assert!(
                matches!(LlmForwarder::new(cfg), Err(ForwarderError::Upstream(..))),
                "{bad}"
            );
        }
        for key in ["", "a\nb"] {
            let cfg = ForwarderConfig::new("http://x", key, CredentialHeader::AuthorizationBearer);
            assert!(
                matches!(LlmForwarder::new(cfg), Err(ForwarderError::Key)),
                "{key:?}"
            );
        }
        assert_eq!(
            "Authorization".parse::<CredentialHeader>().ok(),
            Some(CredentialHeader::AuthorizationBearer)
        );
        assert_eq!(
            "x-api-key".parse::<CredentialHeader>().ok(),
            Some(CredentialHeader::XApiKey)
        );
        assert!("cookie".parse::<CredentialHeader>().is_err());
    }

    #[test]
    fn the_header_follows_the_turn_unless_the_executor_fixed_it() {
        use turnstile_proto::v1 as pb;
        let bearer = pb::LlmProfile {
            credential_header: pb::CredentialHeader::AuthorizationBearer as i32,
            ..Default::default()
        };
        let said = CredentialHeader::from_profile(Some(&bearer));
        assert_eq!(said, Some(CredentialHeader::AuthorizationBearer));
        assert_eq!(CredentialHeader::from_profile(None), None);
        let unspecified = pb::LlmProfile::default();
        assert_eq!(CredentialHeader::from_profile(Some(&unspecified)), None);

        let follow = LlmForwarder::new(ForwarderConfig::for_profile("http://x", "k")).expect("ok");
        assert_eq!(follow.header(), CredentialHeader::XApiKey);
        let turn = follow.for_turn(said);
        assert_eq!(turn.header(), CredentialHeader::AuthorizationBearer);
        assert_eq!(turn.credential().0, header::AUTHORIZATION);
        assert_eq!(turn.credential().1.as_bytes(), b"Bearer k");
        // A turn that says nothing keeps what the forwarder had.
        assert_eq!(
            turn.for_turn(None).header(),
            CredentialHeader::AuthorizationBearer
        );
        assert!(Arc::ptr_eq(&turn.inner, &follow.inner), "one pool");

        let fixed = ForwarderConfig::new("http://x", "k", CredentialHeader::XApiKey);
        let fixed = LlmForwarder::new(fixed).expect("ok");
        assert_eq!(fixed.for_turn(said).header(), CredentialHeader::XApiKey);
    }

    #[test]
    fn upgrades_are_recognised_by_connection_and_upgrade_headers() {
        let mut h = HeaderMap::new();
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        assert_eq!(upgrade_protocol(&h), None, "no connection: upgrade");
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert_eq!(
            upgrade_protocol(&h),
            Some(HeaderValue::from_static("websocket"))
        );
        h.remove("upgrade");
        assert_eq!(upgrade_protocol(&h), None, "no protocol named");
    }

    #[test]
    fn hop_by_hop_headers_go_including_those_connection_names() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-trace"),
        );
        h.insert("x-trace", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("host", HeaderValue::from_static("127.0.0.1:8787"));
        h.insert("content-type", HeaderValue::from_static("application/json"));
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["content-type"]);
    }
}
