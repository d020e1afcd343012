//! The integration suite: a real broker (in-process on a temp socket, or the
//! `turnstile` binary), the real static shim, and real nsjail. Tests needing
//! root or nsjail fail with what is missing; they never pass silently.

mod harness;

mod admission;
mod cli;
mod clients;
mod continuation;
mod disk;
mod durable;
mod fleet;
mod hardening;
mod isolation;
mod lifecycle;
mod limits;
mod llm;
mod llm_broker;
mod llm_frames;
mod llm_http;
mod profiles;
mod relay;
mod session_data;
mod sessions;
mod socket_access;
mod upstream;
mod warm;

/// Generates `nsjail` and `direct` tests from one `async fn(Mode)`.
#[macro_export]
macro_rules! both_modes {
    ($($case:ident),* $(,)?) => {
        $(
            mod $case {
                use turnstile_broker::config::Mode;
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn nsjail() {
                    super::$case(Mode::Nsjail).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn direct() {
                    super::$case(Mode::Direct).await
                }
            }
        )*
    };
}
