//! The Turnstile gRPC API, generated from `proto/turnstile/v1/turnstile.proto`.
//! The wire format lives only here.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("turnstile.v1");
}
