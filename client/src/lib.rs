//! Executor-side helper for Turnstile.
//!
//! An executor drives a turn over the broker's gRPC `Turn` stream with
//! [`Turn`], and serves the agent's LLM connections (relayed by the broker
//! as `LlmFrame`s on that stream) with an [`LlmForwarder`]: each connection is
//! served as HTTP/1.1 and each request forwarded to the configured upstream
//! with the credential added there, outside the jail.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use turnstile_client::{CredentialHeader, ForwarderConfig, LlmForwarder, Turn, connect_unix};
//! use turnstile_proto::v1 as pb;
//!
//! let mut broker = pb::broker_client::BrokerClient::new(connect_unix("/run/turnstile.sock").await?);
//! let forwarder = LlmForwarder::new(ForwarderConfig::new(
//!     "https://api.anthropic.com",
//!     std::env::var("ANTHROPIC_API_KEY")?,
//!     CredentialHeader::XApiKey,
//! ))?;
//! let start = pb::Start {
//!     session_id: "wf-42".into(),
//!     argv: vec!["claude".into(), "-p".into(), "hello".into()],
//!     ..Default::default()
//! };
//! let mut turn = Turn::start(&mut broker, start, Some(forwarder)).await?;
//! turn.input().close_stdin().await?;
//! while let Some(event) = turn.next().await {
//!     println!("{:?}", event?.kind);
//! }
//! # Ok(()) }
//! ```
//!
//! The crate depends on the API (`turnstile-proto`), never on the broker,
//! except with its `broker` feature: [`broker_side`] then implements the
//! broker's forwarder factory with [`LlmForwarder`], for broker-side
//! forwarding (what `turnstile serve` installs).

pub use turnstile_proto::flow;
#[cfg(feature = "broker")]
pub mod broker_side;
mod forward;
mod input;
mod relay;
mod turn;

pub use forward::{
    CredentialHeader, ForwarderConfig, ForwarderError, LlmForwarder, Observer, RequestSummary,
    TlsRoots, UpstreamPool,
};
pub use input::{TurnGone, TurnInput};
pub use turn::{Resume, Turn};
pub use turnstile_proto::v1 as pb;

use std::path::PathBuf;

/// Largest HTTP/2 frame the channel asks for (the broker's own setting).
const MAX_FRAME: u32 = 1 << 20;
/// Largest gRPC message the client accepts (a stdout chunk is at most 1 MiB).
pub const MAX_MESSAGE: usize = 64 << 20;

/// A channel to the broker listening on the unix socket at `path`.
pub async fn connect_unix(
    path: impl Into<PathBuf>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let path = path.into();
    tonic::transport::Endpoint::from_static("http://turnstile.invalid")
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(8 << 20))
        .max_frame_size(Some(MAX_FRAME))
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
}

/// A turn-ending reason as a short name (`timed_out`, `spawn_failed`, ...).
pub fn reason_name(reason: i32) -> String {
    pb::exited::Reason::try_from(reason)
        .map(|r| r.as_str_name().to_ascii_lowercase())
        .unwrap_or_else(|_| format!("reason {reason}"))
}
