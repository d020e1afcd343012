//! `turnstile-sys`: the process syscalls the broker and the shim share, and
//! with them the project's `unsafe` (the shim keeps only what it needs as
//! PID 1 of a jail, in `shim/src/pid1.rs`).
//!
//! - [`spawn`]: one vfork-style spawn (`clone(CLONE_VM | CLONE_VFORK)` on a
//!   guard-paged stack), driven by a [`ChildPlan`] the parent prepares, with
//!   one failure report ([`ChildStep`] and errno through shared memory).
//! - [`stack`]: the child's stack, fresh pages above a guard page.
//! - [`signals`]: blocking every signal across the clone, and the one
//!   routine that resets signal handling for a new program.
//! - [`fd`]: putting descriptors at fixed numbers.
//! - [`wait`]: reaping a child with its status and resource usage; pidfds.
//!
//! Each helper's doc says whether it may run in a child between its clone
//! and `execve` ("child-safe": async-signal-safe, no allocation, no panic).
//! Nothing here depends on tokio unless the `tokio` feature asks for
//! [`wait::watch_pidfd`] (the broker does; the static shim does not).

pub mod fd;
pub mod signals;
pub mod spawn;
pub mod stack;
pub mod wait;

pub use spawn::{ChildPlan, ChildStep, Rlimit, SpawnError, spawn};
