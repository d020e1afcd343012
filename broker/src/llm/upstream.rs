//! Broker-side forwarding: a turn whose `Start` names an upstream
//! (`Start.llm_upstream`) has its LLM connections served by the broker
//! itself, with the same forwarder an executor would use. The broker has no
//! HTTP client of its own (no hyper client, no TLS here): the forwarder
//! comes through [`Upstreams`], which the binary installs
//! ([`crate::Broker::set_llm_upstreams`]; the `turnstile-client` crate
//! implements it around its `LlmForwarder`).
//!
//! The credential is held in memory only: it is taken out of the `Start`
//! into a [`Zeroizing`] buffer, handed to the forwarder (which keeps it in
//! buffers of its own that are zeroed when their last user goes, see the
//! implementation), and is never written to disk, never logged (every
//! `Debug` here redacts it), never part of the turn's key fingerprint and
//! never in the jail. The executor sees, per request, an `LlmRequest`
//! summary event (method, path, status, bytes, duration), which is
//! journaled like any other event: it holds no secret.

use crate::profile::CredentialHeader;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use turnstile_proto::v1 as pb;
pub use zeroize::Zeroizing;

/// Longest credential a `Start` may carry.
pub const MAX_CREDENTIAL_BYTES: usize = 8192;
/// Longest upstream base URL.
pub const MAX_URL_BYTES: usize = 2048;
/// Request body cap when the `Start` names none.
pub const DEFAULT_MAX_REQUEST_BYTES: u64 = 32 << 20;
/// Highest request body cap a `Start` may ask for.
pub const MAX_REQUEST_BYTES: u64 = 1 << 30;

/// A turn's upstream, checked as far as the broker can (the forwarder
/// checks the URL itself). `Debug` never shows the credential.
pub struct UpstreamSpec {
    pub base_url: String,
    pub credential: Zeroizing<String>,
    pub header: CredentialHeader,
    pub max_request_bytes: u64,
}

impl std::fmt::Debug for UpstreamSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamSpec")
            .field("base_url", &self.base_url)
            .field("credential", &"<redacted>")
            .field("header", &self.header)
            .field("max_request_bytes", &self.max_request_bytes)
            .finish()
    }
}

/// Why a `Start`'s upstream is refused (an `InvalidArgument`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error("invalid llm_upstream.base_url {url:?}: {why}")]
    Url { url: String, why: String },
    #[error(
        "invalid llm_upstream.credential: it must be 1 to {MAX_CREDENTIAL_BYTES} bytes a header can carry (no control characters)"
    )]
    Credential,
    #[error("llm_upstream.max_request_bytes = {0} is out of range: at most {MAX_REQUEST_BYTES}")]
    MaxRequestBytes(u64),
    #[error("llm_upstream.credential_header = {0} is not a known value")]
    Header(i32),
    #[error(
        "this broker cannot forward LLM requests itself (no forwarder is installed); serve the turn's LLM connections on the executor side instead"
    )]
    Unsupported,
}

impl UpstreamSpec {
    /// Takes the upstream out of `Start.llm_upstream` (its credential moves
    /// into a zeroed-on-drop buffer; what is left in the message is empty),
    /// with `profile_header` for a `Start` that does not say how the
    /// upstream takes the credential.
    pub fn take(
        up: &mut pb::LlmUpstream,
        profile_header: CredentialHeader,
    ) -> Result<UpstreamSpec, UpstreamError> {
        let credential = Zeroizing::new(std::mem::take(&mut up.credential));
        let base_url = Zeroizing::new(std::mem::take(&mut up.base_url));
        let lower = base_url.to_ascii_lowercase();
        let rest = lower
            .strip_prefix("http://")
            .or_else(|| lower.strip_prefix("https://"));
        let authority = rest
            .and_then(|r| r.split(['/', '?', '#']).next())
            .unwrap_or_default();
        // User info may be a secret: an error never repeats the URL then.
        let secret = base_url.contains('@');
        let bad_url = |why: &str| UpstreamError::Url {
            url: if secret {
                "<not shown: it holds an @>".into()
            } else {
                base_url.chars().take(200).collect()
            },
            why: why.to_string(),
        };
        if base_url.len() > MAX_URL_BYTES {
            return Err(bad_url(&format!("longer than {MAX_URL_BYTES} bytes")));
        }
        if rest.is_none() {
            return Err(bad_url("the scheme must be http or https"));
        }
        if authority.contains('@') {
            return Err(bad_url(
                "user info is not allowed in the URL: pass the credential as llm_upstream.credential",
            ));
        }
        if authority.is_empty() {
            return Err(bad_url("no host"));
        }
        if base_url.contains(['?', '#']) {
            return Err(bad_url(
                "a query or fragment is not allowed in the base URL",
            ));
        }
        if base_url.chars().any(|c| c.is_control() || c == ' ') {
            return Err(bad_url("it holds spaces or control characters"));
        }
        // What a header value can carry: visible ASCII and spaces inside.
        let c = credential.as_bytes();
        let visible = |b: &u8| (0x21..=0x7e).contains(b);
        if c.is_empty()
            || c.len() > MAX_CREDENTIAL_BYTES
            || !c.iter().all(|b| visible(b) || *b == b' ')
            || !c.first().is_some_and(visible)
            || !c.last().is_some_and(visible)
        {
            return Err(UpstreamError::Credential);
        }
        let max_request_bytes = match up.max_request_bytes {
            0 => DEFAULT_MAX_REQUEST_BYTES,
            n if n > MAX_REQUEST_BYTES => return Err(UpstreamError::MaxRequestBytes(n)),
            n => n,
        };
        use pb::CredentialHeader as Pb;
        let header = match Pb::try_from(up.credential_header) {
            Ok(Pb::Unspecified) => profile_header,
            Ok(Pb::XApiKey) => CredentialHeader::XApiKey,
            Ok(Pb::AuthorizationBearer) => CredentialHeader::AuthorizationBearer,
            Err(_) => return Err(UpstreamError::Header(up.credential_header)),
        };
        Ok(UpstreamSpec {
            base_url: base_url.to_string(),
            credential,
            header,
            max_request_bytes,
        })
    }
}

/// Where a turn's request summaries go (to its event stream).
pub type Report = Arc<dyn Fn(pb::LlmRequest) + Send + Sync>;

/// One connection being served.
pub type Serving = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Makes a turn's forwarder: installed by the binary (see the module docs).
pub trait Upstreams: Send + Sync + std::fmt::Debug {
    /// A forwarder for one turn's `spec`, or why it cannot be (a bad URL:
    /// the executor gets the message as `InvalidArgument`). Forwarders
    /// made here share an upstream connection pool.
    fn forwarder(&self, spec: &UpstreamSpec) -> Result<Arc<dyn TurnForwarder>, String>;
}

/// A turn's forwarder.
pub trait TurnForwarder: Send + Sync {
    /// Serves one of the agent's connections (HTTP/1.1, keep-alive) until
    /// either side closes it; each request's summary goes to `report` once
    /// its response ended (or was abandoned).
    fn serve(&self, conn: tokio::net::UnixStream, report: Report) -> Serving;
}

/// A turn's broker-side forwarding: the URL it names (for `Started`) and
/// its forwarder. `Debug` shows the URL only.
#[derive(Clone)]
pub struct TurnUpstream {
    pub base_url: String,
    pub forwarder: Arc<dyn TurnForwarder>,
}

impl std::fmt::Debug for TurnUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnUpstream")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(url: &str, key: &str) -> pb::LlmUpstream {
        pb::LlmUpstream {
            base_url: url.into(),
            credential: key.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_good_upstream_is_taken_and_its_credential_never_shows() {
        let mut u = up("https://api.example.com/base", "sk-secret-1");
        let spec = UpstreamSpec::take(&mut u, CredentialHeader::AuthorizationBearer).expect("ok");
        assert!(u.credential.is_empty(), "moved out of the message");
        assert_eq!(spec.header, CredentialHeader::AuthorizationBearer);
        assert_eq!(spec.max_request_bytes, DEFAULT_MAX_REQUEST_BYTES);
        assert_eq!(spec.credential.as_str(), "sk-secret-1");
        assert!(!format!("{spec:?}").contains("sk-secret-1"));
        let mut u = up("http://127.0.0.1:9", "k");
        u.credential_header = pb::CredentialHeader::XApiKey as i32;
        u.max_request_bytes = 5;
        let spec = UpstreamSpec::take(&mut u, CredentialHeader::AuthorizationBearer).expect("ok");
        assert_eq!(
            (spec.header, spec.max_request_bytes),
            (CredentialHeader::XApiKey, 5)
        );
    }

    #[test]
    fn bad_upstreams_are_refused_with_what_is_wrong() {
        let h = CredentialHeader::XApiKey;
        let long_url = format!("http://x/{}", "a".repeat(MAX_URL_BYTES));
        for (url, want) in [
            ("ftp://x", "scheme"),
            ("127.0.0.1:9", "scheme"),
            ("http://", "no host"),
            ("http:///v1", "no host"),
            ("http://u:p@x", "user info"),
            ("http://u:p@x/?q", "user info"),
            ("http://x/?q=1", "query"),
            ("http://x/a b", "spaces"),
            (long_url.as_str(), "longer"),
        ] {
            match UpstreamSpec::take(&mut up(url, "k"), h) {
                Err(e @ UpstreamError::Url { .. }) => {
                    assert!(e.to_string().contains(want), "{url}: {e}");
                    assert!(!e.to_string().contains("u:p"), "{e}");
                }
                other => panic!("{url}: {other:?}"),
            }
        }
        let huge = "k".repeat(MAX_CREDENTIAL_BYTES + 1);
        for key in ["", "a\nb", " lead", "trail ", huge.as_str(), "caf\u{e9}"] {
            assert_eq!(
                UpstreamSpec::take(&mut up("http://x", key), h).err(),
                Some(UpstreamError::Credential),
                "{key:?}"
            );
        }
        let mut u = up("http://x", "k");
        u.max_request_bytes = MAX_REQUEST_BYTES + 1;
        assert!(matches!(
            UpstreamSpec::take(&mut u, h),
            Err(UpstreamError::MaxRequestBytes(_))
        ));
        let mut u = up("http://x", "k");
        u.credential_header = 9;
        assert_eq!(
            UpstreamSpec::take(&mut u, h).err(),
            Some(UpstreamError::Header(9))
        );
    }
}
