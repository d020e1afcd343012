//! The wire format between the broker and the shim, and nothing else.
//!
//! The broker and the shim meet on two inherited file descriptors:
//!
//! - [`INIT_FD`] (3): a read-only descriptor of the turn's init payload file
//!   (`init.msgpack`, written 0600 by the broker). The shim reads at most
//!   `max_payload + 1` bytes from it, refuses anything larger, and closes it
//!   before the agent runs, so the agent never holds it. The payload never
//!   travels in argv or the environment.
//! - [`CONTROL_FD`] (4): one end of a unix `SOCK_STREAM` socketpair. The shim
//!   sends [`ShimMsg`] frames (u32 big-endian length, then MessagePack); the
//!   broker answers the [`ShimMsg::Hello`] self-check with one byte:
//!   [`GO`] to run the agent, anything else (or EOF) to abort. This is how a
//!   turn fails closed: the agent is not started until the broker has seen
//!   the jail from inside and agreed.
//!
//! The shim's argv is `turnstile-shim --max-payload BYTES`; nothing secret.
//!
//! The same binary has a second, tiny role: `turnstile-shim --launcher` is a
//! process the broker starts ahead of a turn, inside a cgroup made ready for
//! the next turn (moving a process into a cgroup can cost a kernel RCU grace
//! period, ~10 ms). It waits on [`LAUNCH_FD`] for one [`launch`] request
//! (descriptors plus an argv), puts the descriptors in place and execs the
//! argv (nsjail, or the shim itself in direct mode).
//!
//! This crate's library half is shared with the broker so that both ends use
//! one definition; it depends only on serde and rmp-serde.

use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};

/// Descriptor number of the init payload inside the shim.
pub const INIT_FD: i32 = 3;
/// Descriptor number of the control socket inside the shim.
pub const CONTROL_FD: i32 = 4;
/// Version of [`InitPayload`]; the shim refuses any other.
pub const PROTOCOL_VERSION: u32 = 1;
/// Default cap on the init payload size.
pub const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;
/// Cap on one control frame (self-check reports are a few hundred bytes).
pub const MAX_CONTROL_FRAME: usize = 64 * 1024;
/// The broker's answer that lets the shim start the agent.
pub const GO: u8 = b'G';

/// The launcher's request socket (a `SOCK_SEQPACKET` socketpair end).
pub const LAUNCH_FD: i32 = 3;

/// The launcher's request: which received descriptor goes where, and what
/// to exec. One `SOCK_SEQPACKET` message carries the encoding below and the
/// descriptors (`SCM_RIGHTS`, in the order of `targets`): a count byte, one
/// little-endian i32 target per descriptor, then the argv strings, each
/// NUL-terminated, the program path first. The launcher answers only on
/// failure, with [`launch::Failure`]; success is its end of the socket
/// closing at exec.
pub mod launch {
    /// Cap on one request (argv included).
    pub const MAX_REQUEST: usize = 16 * 1024;
    /// Cap on the descriptors of one request.
    pub const MAX_FDS: usize = 8;

    /// Encodes a request; `None` if it breaks a cap or an argument holds NUL.
    pub fn encode(targets: &[i32], argv: &[&[u8]]) -> Option<Vec<u8>> {
        if targets.len() > MAX_FDS || argv.is_empty() {
            return None;
        }
        let mut out = vec![u8::try_from(targets.len()).ok()?];
        for t in targets {
            out.extend_from_slice(&t.to_le_bytes());
        }
        for a in argv {
            if a.contains(&0) {
                return None;
            }
            out.extend_from_slice(a);
            out.push(0);
        }
        (out.len() <= MAX_REQUEST).then_some(out)
    }

    /// Decodes a request carrying `nfds` descriptors: (targets, argv).
    pub fn decode(buf: &[u8], nfds: usize) -> Result<(Vec<i32>, Vec<Vec<u8>>), &'static str> {
        let (&count, rest) = buf.split_first().ok_or("empty request")?;
        let count = usize::from(count);
        if count != nfds || count > MAX_FDS {
            return Err("descriptor count does not match the request");
        }
        let (words, strings) = rest
            .split_at_checked(count * 4)
            .ok_or("request cut short")?;
        let targets = words
            .chunks_exact(4)
            .map(|w| i32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .collect::<Vec<_>>();
        if targets.iter().any(|&t| !(0..64).contains(&t)) {
            return Err("descriptor target out of range");
        }
        let Some(body) = strings.strip_suffix(&[0]) else {
            return Err("argv not NUL-terminated");
        };
        let argv: Vec<Vec<u8>> = body.split(|&b| b == 0).map(<[u8]>::to_vec).collect();
        if argv[0].is_empty() {
            return Err("empty program path");
        }
        Ok((targets, argv))
    }

    /// The launcher's failure report: the step and errno, 8 bytes.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Failure {
        pub step: LaunchStep,
        pub errno: i32,
    }

    /// What the launcher was doing when it failed.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum LaunchStep {
        /// The request was malformed or too large.
        Request,
        /// Descriptors could not be put in place.
        Descriptors,
        /// Signal dispositions or mask could not be reset.
        Signals,
        /// `execve` failed.
        Exec,
    }

    impl Failure {
        pub fn encode(self) -> [u8; 8] {
            let step: i32 = match self.step {
                LaunchStep::Request => 1,
                LaunchStep::Descriptors => 2,
                LaunchStep::Signals => 3,
                LaunchStep::Exec => 4,
            };
            let mut out = [0u8; 8];
            out[..4].copy_from_slice(&step.to_le_bytes());
            out[4..].copy_from_slice(&self.errno.to_le_bytes());
            out
        }

        pub fn decode(buf: &[u8]) -> Option<Failure> {
            let step = i32::from_le_bytes(buf.get(..4)?.try_into().ok()?);
            let errno = i32::from_le_bytes(buf.get(4..8)?.try_into().ok()?);
            let step = match step {
                1 => LaunchStep::Request,
                2 => LaunchStep::Descriptors,
                3 => LaunchStep::Signals,
                4 => LaunchStep::Exec,
                _ => return None,
            };
            Some(Failure { step, errno })
        }
    }
}

/// Exit codes of the shim when it fails before or while starting the agent.
/// Once the agent has started, the shim exits with the agent's own code
/// (128 + n when the agent was killed by signal n); the broker tells the two
/// apart by whether it received [`ShimMsg::AgentStarted`].
pub mod exit_code {
    /// The payload could not be read, was over the cap, or did not decode.
    pub const PAYLOAD: i32 = 121;
    /// The shim's own view of its isolation did not match the payload's mode.
    pub const SELF_CHECK: i32 = 122;
    /// The agent could not be executed (not found, not executable, ...).
    pub const EXEC: i32 = 123;
    /// Any other setup step failed (cwd, rlimits, signals, control socket).
    pub const SETUP: i32 = 124;
    /// The broker did not answer [`super::GO`] to the self-check.
    pub const ABORTED: i32 = 125;
    /// Wrong command line.
    pub const USAGE: i32 = 126;
}

/// How the shim was started; the isolation it must find around itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// PID 1 of an nsjail jail: new user, mount, pid, ipc, uts, net namespaces.
    Nsjail,
    /// A plain child of the broker (developer mode): no namespaces.
    Direct,
}

/// Resource limits the shim applies to the agent with `setrlimit` (soft and
/// hard). Every value is in the unit its name says: bytes are bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimits {
    /// `RLIMIT_CPU`, seconds of CPU time per process: SIGXCPU at this soft
    /// limit, SIGKILL one second later (the hard limit).
    pub cpu_seconds: Option<u64>,
    /// `RLIMIT_NOFILE`, open descriptors per process.
    pub open_files: Option<u64>,
    /// `RLIMIT_FSIZE`, bytes per written file (SIGXFSZ when hit).
    pub file_size_bytes: Option<u64>,
    /// `RLIMIT_AS`, bytes; only used when the broker has no memory cgroup.
    pub address_space_bytes: Option<u64>,
    /// `RLIMIT_NPROC`; only used when the broker has no pids cgroup.
    pub processes: Option<u64>,
}

/// The LLM bridge the shim runs inside the jail (see the broker's relay).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LlmBridge {
    /// TCP port on 127.0.0.1 to listen on; 0 picks an ephemeral port.
    pub port: u16,
    /// Unix socket each accepted connection is joined to.
    pub socket_path: String,
    /// Environment variables set to `http://127.0.0.1:<port>` plus
    /// `url_path` for the agent.
    pub env_vars: Vec<String>,
    /// Path appended to the bridge URL (an agent profile's, e.g. `/v1`);
    /// empty for none.
    #[serde(default)]
    pub url_path: String,
}

/// Everything the shim needs to run one turn's agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitPayload {
    pub version: u32,
    pub mode: Mode,
    pub session_id: String,
    pub turn_id: String,
    /// The agent's argv; `argv[0]` is looked up in the agent's `PATH`.
    pub argv: Vec<String>,
    /// The agent's complete environment, in order. Nothing else is inherited.
    pub env: Vec<(String, String)>,
    /// Absolute working directory of the agent, as the shim sees paths.
    pub cwd: String,
    pub rlimits: Rlimits,
    #[serde(default)]
    pub llm: Option<LlmBridge>,
}

impl InitPayload {
    pub fn encode(&self) -> Result<Vec<u8>, rmp_serde::encode::Error> {
        rmp_serde::to_vec_named(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, PayloadError> {
        let payload: InitPayload = rmp_serde::from_slice(bytes).map_err(PayloadError::Decode)?;
        if payload.version != PROTOCOL_VERSION {
            return Err(PayloadError::Version(payload.version));
        }
        if payload.argv.is_empty() || payload.argv[0].is_empty() {
            return Err(PayloadError::EmptyArgv);
        }
        Ok(payload)
    }
}

/// Reads a payload of at most `cap` bytes: one byte more is an error, never a
/// truncation.
pub fn read_capped(reader: impl Read, cap: usize) -> Result<Vec<u8>, PayloadError> {
    let mut buf = Vec::new();
    reader
        .take(cap as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(PayloadError::Read)?;
    if buf.len() > cap {
        return Err(PayloadError::TooLarge { cap });
    }
    Ok(buf)
}

#[derive(Debug)]
pub enum PayloadError {
    Read(io::Error),
    TooLarge { cap: usize },
    Decode(rmp_serde::decode::Error),
    Version(u32),
    EmptyArgv,
}

impl std::fmt::Display for PayloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PayloadError::Read(e) => write!(f, "cannot read init payload: {e}"),
            PayloadError::TooLarge { cap } => write!(f, "init payload is over the {cap}-byte cap"),
            PayloadError::Decode(e) => write!(f, "init payload does not decode: {e}"),
            PayloadError::Version(v) => write!(
                f,
                "init payload version {v} is not the shim's version {PROTOCOL_VERSION}"
            ),
            PayloadError::EmptyArgv => write!(f, "init payload has an empty argv"),
        }
    }
}

impl std::error::Error for PayloadError {}

/// What the shim sees of its own isolation, measured from inside before the
/// agent runs. The broker checks it against the mode with [`SelfCheck::verify`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfCheck {
    /// The shim's pid as it sees it (1 inside a new pid namespace).
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    /// `/proc/self/uid_map`, trimmed.
    pub uid_map: String,
    /// `/proc/self/gid_map`, trimmed.
    pub gid_map: String,
    /// Names of the network interfaces in `/proc/net/dev`.
    pub net_interfaces: Vec<String>,
    /// `prctl(PR_GET_NO_NEW_PRIVS)`.
    pub no_new_privs: bool,
    /// Keys of the shim's own environment (empty when nothing leaked in).
    pub env_keys: Vec<String>,
    /// Whether `/` is mounted read-only.
    pub root_read_only: bool,
    /// The uts hostname.
    pub hostname: String,
}

/// The first outside uid of a `uid_map`/`gid_map` line "inside outside count",
/// for the line that maps `inside`.
pub fn map_outside(map: &str, inside: u32) -> Option<u32> {
    map.lines().find_map(|line| {
        let mut parts = line.split_whitespace().map(str::parse::<u64>);
        let (Some(Ok(ins)), Some(Ok(out)), Some(Ok(count))) =
            (parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        let inside = u64::from(inside);
        (inside >= ins && inside < ins + count).then(|| (out + (inside - ins)) as u32)
    })
}

impl SelfCheck {
    /// The mismatches between this report and what `mode` requires; empty
    /// when the isolation is what was asked for.
    pub fn verify(&self, mode: Mode) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.env_keys.is_empty() {
            problems.push(format!(
                "shim environment is not empty: {}",
                self.env_keys.join(",")
            ));
        }
        if mode == Mode::Direct {
            return problems;
        }
        if self.pid != 1 {
            problems.push(format!(
                "not in a new pid namespace (pid {}, want 1)",
                self.pid
            ));
        }
        let full_identity = self
            .uid_map
            .split_whitespace()
            .collect::<Vec<_>>()
            .as_slice()
            == ["0", "0", "4294967295"];
        if self.uid_map.is_empty() || full_identity {
            problems.push(format!(
                "not in a new user namespace (uid_map {:?})",
                self.uid_map
            ));
        }
        match map_outside(&self.uid_map, self.uid) {
            Some(0) => problems.push("runs as host root (uid maps to 0)".to_string()),
            None => problems.push(format!("uid {} is not mapped", self.uid)),
            Some(_) => {}
        }
        if map_outside(&self.gid_map, self.gid) == Some(0) {
            problems.push("runs with host root group (gid maps to 0)".to_string());
        }
        if self.uid == 0 {
            problems.push("runs as root inside the jail".to_string());
        }
        if self.net_interfaces != ["lo"] {
            problems.push(format!(
                "network interfaces are {:?}, want only lo",
                self.net_interfaces
            ));
        }
        if !self.no_new_privs {
            problems.push("no_new_privs is not set".to_string());
        }
        if !self.root_read_only {
            problems.push("the root filesystem is writable".to_string());
        }
        problems
    }
}

/// How the agent ended, as the shim saw it through `wait4`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentStatus {
    Code(i32),
    Signal(i32),
}

impl AgentStatus {
    /// The shell convention: the code, or 128 + n for signal n.
    pub fn as_exit_code(self) -> i32 {
        match self {
            AgentStatus::Code(c) => c,
            AgentStatus::Signal(s) => 128 + s,
        }
    }
}

/// Resource usage of the agent (from `wait4`'s rusage).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub user_cpu_us: u64,
    pub system_cpu_us: u64,
    pub max_rss_kib: u64,
}

/// Which step of the shim failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    Payload,
    SelfCheck,
    Exec,
    Setup,
    Aborted,
}

impl FailureClass {
    pub fn exit_code(self) -> i32 {
        match self {
            FailureClass::Payload => exit_code::PAYLOAD,
            FailureClass::SelfCheck => exit_code::SELF_CHECK,
            FailureClass::Exec => exit_code::EXEC,
            FailureClass::Setup => exit_code::SETUP,
            FailureClass::Aborted => exit_code::ABORTED,
        }
    }

    pub fn from_exit_code(code: i32) -> Option<Self> {
        Some(match code {
            exit_code::PAYLOAD => FailureClass::Payload,
            exit_code::SELF_CHECK => FailureClass::SelfCheck,
            exit_code::EXEC => FailureClass::Exec,
            exit_code::SETUP => FailureClass::Setup,
            exit_code::ABORTED => FailureClass::Aborted,
            _ => return None,
        })
    }
}

/// Frames from the shim to the broker on [`CONTROL_FD`], in this order:
/// `Hello`, then (after [`GO`]) `AgentStarted`, then `AgentExited`; or
/// `Failed` at any point, after which the shim exits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShimMsg {
    Hello(SelfCheck),
    AgentStarted {
        pid: i32,
    },
    AgentExited {
        status: AgentStatus,
        usage: Usage,
    },
    Failed {
        class: FailureClass,
        message: String,
    },
}

/// Writes one length-prefixed frame.
pub fn write_frame(mut w: impl Write, msg: &ShimMsg) -> io::Result<()> {
    let body = rmp_serde::to_vec_named(msg).map_err(io::Error::other)?;
    let len = u32::try_from(body.len()).map_err(io::Error::other)?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame)
}

/// Decodes one frame body, refusing bodies over [`MAX_CONTROL_FRAME`].
pub fn decode_frame(body: &[u8]) -> io::Result<ShimMsg> {
    if body.len() > MAX_CONTROL_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "control frame over cap",
        ));
    }
    rmp_serde::from_slice(body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Reads one frame; `Ok(None)` on a clean EOF before a frame started.
pub fn read_frame(mut r: impl Read) -> io::Result<Option<ShimMsg>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_CONTROL_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "control frame over cap",
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    decode_frame(&body).map(Some)
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    #[test]
    fn launch_requests_round_trip_and_refuse_garbage() {
        use super::launch::*;
        let req = encode(
            &[0, 1, 2, 3, 4],
            &[b"/usr/bin/nsjail", b"--config", b"/x/jail.cfg"],
        )
        .expect("encode");
        let (targets, argv) = decode(&req, 5).expect("decode");
        assert_eq!(targets, vec![0, 1, 2, 3, 4]);
        assert_eq!(
            argv,
            vec![
                b"/usr/bin/nsjail".to_vec(),
                b"--config".to_vec(),
                b"/x/jail.cfg".to_vec()
            ]
        );
        assert!(decode(&req, 4).is_err(), "descriptor count mismatch");
        assert!(
            decode(&req[..req.len() - 1], 5).is_err(),
            "unterminated argv"
        );
        assert!(decode(&req[..8], 5).is_err(), "cut short");
        assert!(decode(&[], 0).is_err(), "empty");
        assert!(decode(&[0, 0], 0).is_err(), "empty program");
        let mut far = encode(&[7], &[b"/bin/true"]).expect("encode");
        far[1..5].copy_from_slice(&99i32.to_le_bytes());
        assert!(decode(&far, 1).is_err(), "target out of range");
        assert!(encode(&[0], &[b"a\0b"]).is_none(), "NUL in argv");
        assert!(encode(&[0; 9], &[b"/bin/true"]).is_none(), "too many fds");
        assert!(
            encode(&[], &[&[b'x'; MAX_REQUEST][..]]).is_none(),
            "too large"
        );
        let f = Failure {
            step: LaunchStep::Exec,
            errno: 2,
        };
        assert_eq!(Failure::decode(&f.encode()), Some(f));
        assert_eq!(Failure::decode(&[9, 0, 0, 0, 2, 0, 0, 0]), None);
        assert_eq!(Failure::decode(&[4, 0]), None);
    }

    use super::*;

    fn payload() -> InitPayload {
        InitPayload {
            version: PROTOCOL_VERSION,
            mode: Mode::Direct,
            session_id: "s1".into(),
            turn_id: "t1".into(),
            argv: vec!["/bin/true".into()],
            env: vec![("PATH".into(), "/bin".into())],
            cwd: "/work".into(),
            rlimits: Rlimits::default(),
            llm: None,
        }
    }

    fn jailed() -> SelfCheck {
        SelfCheck {
            pid: 1,
            uid: 1000,
            gid: 1000,
            uid_map: "1000 100000 1".into(),
            gid_map: "1000 100000 1".into(),
            net_interfaces: vec!["lo".into()],
            no_new_privs: true,
            env_keys: vec![],
            root_read_only: true,
            hostname: "turnstile".into(),
        }
    }

    #[test]
    fn payload_round_trips() {
        let p = payload();
        let bytes = p.encode().expect("encode");
        assert_eq!(InitPayload::decode(&bytes).expect("decode"), p);
    }

    #[test]
    fn payload_refuses_wrong_version_empty_argv_and_garbage() {
        let mut p = payload();
        p.version = 9;
        let bytes = p.encode().expect("encode");
        assert!(matches!(
            InitPayload::decode(&bytes),
            Err(PayloadError::Version(9))
        ));
        let mut p = payload();
        p.argv.clear();
        let bytes = p.encode().expect("encode");
        assert!(matches!(
            InitPayload::decode(&bytes),
            Err(PayloadError::EmptyArgv)
        ));
        assert!(matches!(
            InitPayload::decode(b"\xc1garbage"),
            Err(PayloadError::Decode(_))
        ));
    }

    #[test]
    fn read_capped_accepts_cap_and_refuses_one_more() {
        let data = [7u8; 100];
        assert_eq!(read_capped(&data[..], 100).expect("at cap").len(), 100);
        assert!(matches!(
            read_capped(&data[..], 99),
            Err(PayloadError::TooLarge { cap: 99 })
        ));
    }

    #[test]
    fn frames_round_trip_and_eof_is_none() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &ShimMsg::AgentStarted { pid: 7 }).expect("write");
        let mut r = &buf[..];
        assert_eq!(
            read_frame(&mut r).expect("read"),
            Some(ShimMsg::AgentStarted { pid: 7 })
        );
        assert_eq!(read_frame(&mut r).expect("eof"), None);
    }

    #[test]
    fn oversized_frame_is_refused() {
        let mut buf = ((MAX_CONTROL_FRAME + 1) as u32).to_be_bytes().to_vec();
        buf.extend(std::iter::repeat_n(0u8, 16));
        assert!(read_frame(&buf[..]).is_err());
    }

    #[test]
    fn map_outside_finds_the_mapped_id() {
        assert_eq!(map_outside("1000 100000 1", 1000), Some(100000));
        assert_eq!(map_outside("0 0 4294967295", 5), Some(5));
        assert_eq!(map_outside("1000 100000 1", 0), None);
        assert_eq!(map_outside("garbage", 0), None);
    }

    #[test]
    fn verify_accepts_a_proper_jail() {
        assert!(jailed().verify(Mode::Nsjail).is_empty());
    }

    #[test]
    fn verify_refuses_each_missing_isolation() {
        type Mutation = fn(&mut SelfCheck);
        let cases: Vec<(Mutation, &str)> = vec![
            (|c| c.pid = 42, "pid namespace"),
            (|c| c.uid_map = "0 0 4294967295".into(), "user namespace"),
            (|c| c.uid_map = "1000 0 1".into(), "host root"),
            (|c| c.gid_map = "1000 0 1".into(), "root group"),
            (|c| c.net_interfaces.push("eth0".into()), "only lo"),
            (|c| c.no_new_privs = false, "no_new_privs"),
            (|c| c.env_keys.push("SECRET".into()), "environment"),
            (|c| c.root_read_only = false, "writable"),
        ];
        for (mutate, needle) in cases {
            let mut c = jailed();
            mutate(&mut c);
            let problems = c.verify(Mode::Nsjail);
            assert!(
                problems.iter().any(|p| p.contains(needle)),
                "{needle}: {problems:?}"
            );
        }
    }

    #[test]
    fn direct_mode_only_requires_an_empty_environment() {
        let mut c = jailed();
        c.pid = 4242;
        c.uid_map = "0 0 4294967295".into();
        c.net_interfaces = vec!["lo".into(), "eth0".into()];
        assert!(c.verify(Mode::Direct).is_empty());
        c.env_keys.push("X".into());
        assert_eq!(c.verify(Mode::Direct).len(), 1);
    }

    #[test]
    fn failure_classes_map_to_distinct_codes() {
        for class in [
            FailureClass::Payload,
            FailureClass::SelfCheck,
            FailureClass::Exec,
            FailureClass::Setup,
            FailureClass::Aborted,
        ] {
            assert_eq!(FailureClass::from_exit_code(class.exit_code()), Some(class));
        }
        assert_eq!(FailureClass::from_exit_code(0), None);
    }
}
