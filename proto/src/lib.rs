//! The Turnstile gRPC API, generated from `proto/turnstile/v1/turnstile.proto`,
//! and the rules both ends of a turn stream must agree on (the LLM relay's
//! per-connection flow control, [`flow`]). The wire format lives only here.

pub mod flow;

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("turnstile.v1");
}

/// The window of `data` bytes each side of an LLM connection starts with, per
/// direction (see `LlmFrame` in the proto file).
pub const LLM_INITIAL_WINDOW: u64 = 256 * 1024;
