//! The broker's error type and its one conversion to `tonic::Status`.

use std::path::PathBuf;
use tonic::{Code, Status};

/// Refusals of bad input. Each names what was wrong and what is allowed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InputError {
    #[error("invalid session id {0:?}: want [A-Za-z0-9][A-Za-z0-9._-]{{0,127}} without '..'")]
    SessionId(String),
    #[error("invalid turn id {0:?}: want [A-Za-z0-9][A-Za-z0-9._-]{{0,127}} without '..'")]
    TurnId(String),
    #[error("invalid turn key {0:?}: want [A-Za-z0-9][A-Za-z0-9._-]{{0,127}} without '..'")]
    TurnKey(String),
    #[error("detach_grace_ms = {0} is out of range: at most {max}", max = crate::config::MAX_DURATION_MS)]
    DetachGrace(u64),
    #[error("invalid env key {0:?}: want [A-Za-z_][A-Za-z0-9_]{{0,255}}")]
    EnvKey(String),
    #[error("env value of {0} holds a NUL or control character")]
    EnvValue(String),
    #[error("env key {0} is protected: the broker sets it")]
    ProtectedEnv(String),
    #[error("argv is empty")]
    EmptyArgv,
    #[error("argv[{0}] holds a NUL byte")]
    ArgvNul(usize),
    #[error("invalid cwd {0:?}: want a relative path inside the work dir, without '..'")]
    Cwd(String),
    #[error("invalid llm env var {0:?}: want [A-Za-z_][A-Za-z0-9_]{{0,255}}")]
    LlmEnvVar(String),
    #[error(
        "llm env var {0} is named both as a base-URL and as a credential variable: it holds one of them"
    )]
    LlmVarTwice(String),
    #[error("unknown agent profile {name:?}: this broker has {known} (and \"\" for none)")]
    UnknownProfile { name: String, known: String },
    #[error(transparent)]
    Upstream(#[from] crate::llm::upstream::UpstreamError),
    #[error("limit {name} = {value} is out of range: at most {max}")]
    OverMax {
        name: &'static str,
        value: u64,
        max: u64,
    },
    #[error("limit {name} = {value} is over the broker's cap {cap}")]
    OverCap {
        name: &'static str,
        value: u64,
        cap: u64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error("first message must be start or attach, got {0}")]
    NotStart(&'static str),
    #[error(
        "turn key {key} of session {session} names turn {turn}, started with another argv, env or cwd"
    )]
    KeyMismatch {
        key: String,
        session: String,
        turn: String,
    },
    #[error("no turn {what} in session {session} on this broker (running, or kept since it ended)")]
    TurnNotFound { session: String, what: String },
    #[error(
        "turn {turn} (key {key}) of session {session} has ended and its events were not kept (the journal is off)"
    )]
    NotKept {
        session: String,
        turn: String,
        key: String,
    },
    #[error("turn journal {path}: {source}")]
    Journal {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("stream ended before start")]
    NoStart,
    #[error("init payload is {size} bytes, over the {cap}-byte cap (argv, env and cwd count)")]
    PayloadTooLarge { size: usize, cap: usize },
    #[error("session {session} is busy: turn {turn} is running")]
    Busy { session: String, turn: String },
    #[error("session {session} is still busy after waiting {waited_ms} ms")]
    BusyAfterWait { session: String, waited_ms: u64 },
    #[error("session {session} is busy: turn {turn} is running on worker {worker}")]
    FleetBusy {
        session: String,
        worker: String,
        turn: String,
    },
    #[error(
        "session {session} is still busy after waiting {waited_ms} ms: turn {turn} is running on worker {worker}"
    )]
    FleetBusyAfterWait {
        session: String,
        worker: String,
        turn: String,
        waited_ms: u64,
    },
    /// The fleet's database or archive store failed (see [`crate::fleet`]).
    #[error("fleet: {0}")]
    Fleet(String),
    #[error("session {0} not found")]
    SessionNotFound(String),
    #[error("broker is shutting down")]
    ShuttingDown,
    #[error("session {0} already exists")]
    SessionExists(String),
    #[error(
        "turn id {turn} is already running (in session {session}): a turn id names one running turn"
    )]
    TurnIdInUse { turn: String, session: String },
    #[error("session {session} is damaged: {what}")]
    Damaged { session: String, what: String },
    #[error("import refused: {0}")]
    Import(#[from] crate::archive::ImportError),
    #[error("session disk image: {0}")]
    Volume(#[from] crate::volume::VolumeError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot spawn {what}: {source}")]
    Spawn {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encode init payload: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("cgroup: {0}")]
    Cgroup(#[source] std::io::Error),
    #[error(transparent)]
    Disk(#[from] crate::disk::DiskError),
}

impl BrokerError {
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        BrokerError::Io {
            what,
            path: path.into(),
            source,
        }
    }

    pub fn code(&self) -> Code {
        match self {
            BrokerError::Input(_) | BrokerError::NotStart(_) | BrokerError::NoStart => {
                Code::InvalidArgument
            }
            BrokerError::PayloadTooLarge { .. }
            | BrokerError::Disk(crate::disk::DiskError::BelowReserve { .. }) => {
                Code::ResourceExhausted
            }
            BrokerError::Busy { .. } | BrokerError::FleetBusy { .. } => Code::FailedPrecondition,
            BrokerError::BusyAfterWait { .. } | BrokerError::FleetBusyAfterWait { .. } => {
                Code::DeadlineExceeded
            }
            BrokerError::Fleet(_) => Code::Unavailable,
            BrokerError::SessionNotFound(_) => Code::NotFound,
            BrokerError::ShuttingDown => Code::Unavailable,
            BrokerError::SessionExists(_)
            | BrokerError::TurnIdInUse { .. }
            | BrokerError::KeyMismatch { .. } => Code::AlreadyExists,
            BrokerError::TurnNotFound { .. } => Code::NotFound,
            BrokerError::NotKept { .. } => Code::FailedPrecondition,
            BrokerError::Damaged { .. } => Code::FailedPrecondition,
            BrokerError::Import(
                crate::archive::ImportError::TooLarge { .. }
                | crate::archive::ImportError::TooManyEntries { .. },
            ) => Code::ResourceExhausted,
            BrokerError::Import(crate::archive::ImportError::Io { .. }) => Code::Internal,
            BrokerError::Import(_) => Code::InvalidArgument,
            BrokerError::Io { .. }
            | BrokerError::Spawn { .. }
            | BrokerError::Encode(_)
            | BrokerError::Cgroup(_)
            | BrokerError::Volume(_)
            | BrokerError::Journal { .. }
            | BrokerError::Disk(_) => Code::Internal,
        }
    }
}

impl From<BrokerError> for Status {
    fn from(e: BrokerError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_maps_to_its_code() {
        let busy = BrokerError::Busy {
            session: "s".into(),
            turn: "t".into(),
        };
        let status = Status::from(busy);
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(status.message(), "session s is busy: turn t is running");
        assert_eq!(
            Status::from(BrokerError::Input(InputError::EmptyArgv)).code(),
            Code::InvalidArgument
        );
        assert_eq!(
            Status::from(BrokerError::PayloadTooLarge { size: 2, cap: 1 }).code(),
            Code::ResourceExhausted
        );
        assert_eq!(
            Status::from(BrokerError::ShuttingDown).code(),
            Code::Unavailable
        );
        assert_eq!(
            Status::from(BrokerError::SessionNotFound("x".into())).code(),
            Code::NotFound
        );
        let busy = Status::from(BrokerError::FleetBusy {
            session: "s".into(),
            worker: "B".into(),
            turn: "t".into(),
        });
        assert_eq!(busy.code(), Code::FailedPrecondition);
        assert_eq!(
            busy.message(),
            "session s is busy: turn t is running on worker B"
        );
        assert_eq!(
            Status::from(BrokerError::Fleet("database down".into())).code(),
            Code::Unavailable
        );
    }
}
