//! The integration test binary (`cargo test -p turnstile-cli --test all`):
//! one crate for the whole suite, which lives in [`suite`].

mod suite;
