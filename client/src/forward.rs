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
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use zeroize::{Zeroize, Zeroizing};

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

impl Drop for ForwarderConfig {
    fn drop(&mut self) {
        self.key.zeroize();
    }
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
        let mut config = ForwarderConfig::new(upstream, key, CredentialHeader::XApiKey);
        config.header = None;
        config
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

/// The certificates that verify an `https` upstream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum TlsRoots {
    /// Mozilla's roots, built in (`webpki-roots`).
    #[default]
    Bundled,
    /// The system's roots (as `rustls-native-certs` finds them: the
    /// platform's store, or `SSL_CERT_FILE` / `SSL_CERT_DIR`).
    System,
    /// Only the certificates of this PEM file (a private CA).
    CaFile(PathBuf),
}

/// Upstream connections, pooled (idle ones kept 90 s): forwarders made
/// with one pool ([`LlmForwarder::with_pool`]) share its connections,
/// whatever their credentials. Cheap to clone.
#[derive(Clone)]
pub struct UpstreamPool {
    client: Client<HttpsConnector, Body>,
    roots: TlsRoots,
}

impl std::fmt::Debug for UpstreamPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamPool")
            .field("roots", &self.roots)
            .finish_non_exhaustive()
    }
}

impl UpstreamPool {
    /// A pool whose `https` upstreams are verified against `roots`; a CA
    /// file that cannot be read or holds no certificate, or a system with
    /// no roots, is an error here, not at the first request.
    pub fn new(roots: TlsRoots) -> Result<UpstreamPool, ForwarderError> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        // The crypto provider is named, not left to rustls' process default:
        // a binary that links both of rustls' providers (the cli, through
        // the fleet's cloud SDKs) has no default.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = |e: &dyn std::fmt::Display| ForwarderError::Tls(e.to_string());
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = match &roots {
            TlsRoots::Bundled => builder
                .with_provider_and_webpki_roots(provider)
                .map_err(|e| tls(&e))?,
            TlsRoots::System | TlsRoots::CaFile(_) => {
                let store = root_store(&roots)?;
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| tls(&e))?
                    .with_root_certificates(store)
                    .with_no_client_auth();
                builder.with_tls_config(config)
            }
        };
        let connector = builder.https_or_http().enable_http1().wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .build(connector);
        Ok(UpstreamPool { client, roots })
    }
}

/// The root store of [`TlsRoots::System`] or [`TlsRoots::CaFile`].
fn root_store(roots: &TlsRoots) -> Result<rustls::RootCertStore, ForwarderError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut store = rustls::RootCertStore::empty();
    match roots {
        TlsRoots::CaFile(path) => {
            let shown = path.display();
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| ForwarderError::Tls(format!("cannot read CA file {shown}: {e}")))?;
            for cert in certs {
                let cert = cert.map_err(|e| {
                    ForwarderError::Tls(format!("CA file {shown} is not valid PEM: {e}"))
                })?;
                store.add(cert).map_err(|e| {
                    ForwarderError::Tls(format!("CA file {shown} holds a bad certificate: {e}"))
                })?;
            }
            if store.is_empty() {
                return Err(ForwarderError::Tls(format!(
                    "CA file {shown} holds no certificate"
                )));
            }
        }
        TlsRoots::System | TlsRoots::Bundled => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                let errors: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
                return Err(ForwarderError::Tls(format!(
                    "no system root certificates found{}; set SSL_CERT_FILE or configure a CA file",
                    if errors.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", errors.join("; "))
                    }
                )));
            }
        }
    }
    Ok(store)
}

/// One request the forwarder served, once its response ended: no bodies,
/// no headers, no query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestSummary {
    pub method: String,
    /// The path the agent asked for, without its query.
    pub path: String,
    /// What the agent got: the upstream's status or the forwarder's own.
    pub status: u16,
    /// Body bytes from the agent and to it.
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// From the request's head to the response's end.
    pub duration: Duration,
    /// Why the response ended early, if it did.
    pub error: Option<String>,
}

/// Where [`LlmForwarder::serve_connection_observed`] reports each request.
pub type Observer = Arc<dyn Fn(RequestSummary) + Send + Sync>;

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
    /// The credential's header values (sensitive), one per way to send it;
    /// their bytes are zeroed when the last request holding them is gone.
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
    /// A forwarder with a pool of its own (Mozilla's roots for `https`).
    pub fn new(config: ForwarderConfig) -> Result<LlmForwarder, ForwarderError> {
        LlmForwarder::with_pool(config, &UpstreamPool::new(TlsRoots::Bundled)?)
    }

    /// A forwarder that shares `pool`'s upstream connections.
    pub fn with_pool(
        config: ForwarderConfig,
        pool: &UpstreamPool,
    ) -> Result<LlmForwarder, ForwarderError> {
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
        // (`Uri` takes any digits as a port; `port_u16` then says nothing.)
        if let Some((_, port)) = authority.as_str().rsplit_once(':')
            && !port.contains(']')
            && port.parse::<u16>().map_or(true, |p| p == 0)
        {
            return Err(bad("the port must be a number from 1 to 65535"));
        }
        if uri.query().is_some() {
            return Err(bad("a query is not allowed in the base URL"));
        }
        let base_path = uri.path().trim_end_matches('/').to_string();
        if config.key.is_empty() {
            return Err(ForwarderError::Key);
        }
        let x_api_key = secret_header(config.key.as_bytes().to_vec())?;
        let mut bearer = Zeroizing::new(Vec::with_capacity(config.key.len() + 7));
        bearer.extend_from_slice(b"Bearer ");
        bearer.extend_from_slice(config.key.as_bytes());
        let bearer = secret_header(std::mem::take(&mut *bearer))?;
        Ok(LlmForwarder {
            inner: Arc::new(Inner {
                scheme,
                authority,
                base_path,
                x_api_key,
                bearer,
                max_request_body: config.max_request_body,
                client: pool.client.clone(),
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
        self.serve_connection_observed(io, None).await
    }

    /// [`LlmForwarder::serve_connection`], telling `observer` about each
    /// request once its response ended (or was abandoned).
    pub async fn serve_connection_observed<IO>(
        &self,
        io: IO,
        observer: Option<Observer>,
    ) -> Result<(), hyper::Error>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let this = self.clone();
        let service = hyper::service::service_fn(move |req| {
            let this = this.clone();
            let observer = observer.clone();
            async move { Ok::<_, Infallible>(this.forward_observed(req, observer).await) }
        });
        hyper::server::conn::http1::Builder::new()
            .half_close(true)
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades()
            .await
    }

    /// Forwards one request; never fails (errors become JSON responses).
    pub async fn forward(&self, req: Request<Incoming>) -> Response<Body> {
        self.forward_observed(req, None).await
    }

    /// [`LlmForwarder::forward`], telling `observer` about the request once
    /// its response ended.
    pub async fn forward_observed(
        &self,
        req: Request<Incoming>,
        observer: Option<Observer>,
    ) -> Response<Body> {
        let Some(observer) = observer else {
            return self.forward_counted(req, None).await;
        };
        let started = Instant::now();
        let (method, path) = (req.method().to_string(), req.uri().path().to_string());
        let sent = Arc::new(AtomicU64::new(0));
        let resp = self.forward_counted(req, Some(&sent)).await;
        let meter = Meter {
            observer,
            method,
            path,
            status: resp.status().as_u16(),
            sent,
            started,
        };
        let (parts, body) = resp.into_parts();
        let body = Metered {
            inner: body,
            bytes: 0,
            meter: Some(meter),
        };
        Response::from_parts(parts, body.boxed())
    }

    /// Forwards one request, counting its body bytes into `sent`.
    async fn forward_counted(
        &self,
        mut req: Request<Incoming>,
        sent: Option<&Arc<AtomicU64>>,
    ) -> Response<Body> {
        let sent = sent.cloned().unwrap_or_default();
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
            sent.fetch_add(drain(body).await, Ordering::Relaxed);
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
            sent,
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

/// Reads and drops a body: its length.
async fn drain(mut body: Incoming) -> u64 {
    let mut n = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
            Err(_) => break,
        }
    }
    n
}

/// A header value holding a secret: marked sensitive, and its bytes are
/// zeroed when the last value sharing them is dropped. (What hyper copies
/// into a connection's write buffer to send it is beyond reach.)
fn secret_header(bytes: Vec<u8>) -> Result<HeaderValue, ForwarderError> {
    let owned = Bytes::from_owner(Zeroizing::new(bytes));
    let mut v = HeaderValue::from_maybe_shared(owned).map_err(|_| ForwarderError::Key)?;
    v.set_sensitive(true);
    Ok(v)
}

/// What a request's summary needs besides the response's bytes.
struct Meter {
    observer: Observer,
    method: String,
    path: String,
    status: u16,
    sent: Arc<AtomicU64>,
    started: Instant,
}

impl Meter {
    fn report(self, response_bytes: u64, error: Option<String>) {
        (self.observer)(RequestSummary {
            method: self.method,
            path: self.path,
            status: self.status,
            request_bytes: self.sent.load(Ordering::Relaxed),
            response_bytes,
            duration: self.started.elapsed(),
            error,
        });
    }
}

/// A response body that counts its bytes and reports the request when it
/// ends, fails, or is dropped unfinished (the agent went away).
struct Metered {
    inner: Body,
    bytes: u64,
    meter: Option<Meter>,
}

impl http_body::Body for Metered {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                this.bytes += frame.data_ref().map_or(0, |d| d.len() as u64);
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(m) = this.meter.take() {
                    m.report(
                        this.bytes,
                        Some(format!("the upstream's response failed: {e}")),
                    );
                }
            }
            Poll::Ready(None) => {
                if let Some(m) = this.meter.take() {
                    m.report(this.bytes, None);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        if let Some(m) = self.meter.take() {
            let error = (!http_body::Body::is_end_stream(&self.inner))
                .then(|| "the agent went away before the response ended".to_string());
            m.report(self.bytes, error);
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
    /// Bytes that went through.
    sent: Arc<AtomicU64>,
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
                this.sent.fetch_add(len, Ordering::Relaxed);
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
            "http://x:99999",
            "http://x:0",
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
    fn tls_roots_come_from_the_system_or_a_ca_file_and_a_bad_file_says_why() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.pem");
        let err = UpstreamPool::new(TlsRoots::CaFile(missing.clone()))
            .expect_err("a missing CA file")
            .to_string();
        assert!(err.contains("cannot read CA file"), "{err}");
        assert!(err.contains(&missing.display().to_string()), "{err}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").expect("write");
        let err = UpstreamPool::new(TlsRoots::CaFile(empty))
            .expect_err("a file with no certificate")
            .to_string();
        assert!(err.contains("holds no certificate"), "{err}");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        assert!(UpstreamPool::new(TlsRoots::CaFile(garbage)).is_err());
        // The system's roots (CI images carry a CA bundle), and a pool
        // shared by two forwarders with different keys.
        let pool = UpstreamPool::new(TlsRoots::System).expect("system roots");
        let a = LlmForwarder::with_pool(ForwarderConfig::for_profile("https://x", "ka"), &pool);
        let b = LlmForwarder::with_pool(ForwarderConfig::for_profile("https://x", "kb"), &pool);
        assert_eq!(a.expect("a").credential().1.as_bytes(), b"ka");
        assert_eq!(b.expect("b").credential().1.as_bytes(), b"kb");
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
