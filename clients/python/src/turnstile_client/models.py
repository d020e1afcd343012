"""The typed values of the API: a turn's events, its limits, session metadata.

They are plain frozen dataclasses built from the broker's protobuf messages (see
proto/proto/turnstile/v1/turnstile.proto for what each field means); nothing here
talks to the broker.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Union

from ._proto import turnstile_pb2 as pb


class _OpenIntEnum(enum.IntEnum):
    """An IntEnum that keeps values it does not know (a newer broker's) as
    pseudo-members named ``UNKNOWN_<n>`` instead of failing, and prints as the
    broker's own lower-case name (``timed_out``)."""

    def __str__(self) -> str:
        return self.name.lower()

    @classmethod
    def _missing_(cls, value: object) -> _OpenIntEnum | None:
        if not isinstance(value, int):
            return None
        member = int.__new__(cls, value)
        member._name_ = f"UNKNOWN_{value}"
        member._value_ = value
        return member


class ExitReason(_OpenIntEnum):
    """Why a turn ended (``Exited.Reason``)."""

    UNSPECIFIED = pb.Exited.REASON_UNSPECIFIED
    #: The agent exited by itself (see ``exit_code`` or ``signal``).
    EXITED = pb.Exited.EXITED
    #: The wall-time limit was hit.
    TIMED_OUT = pb.Exited.TIMED_OUT
    #: The turn was cancelled.
    CANCELLED = pb.Exited.CANCELLED
    #: The agent was killed by a signal not explained by a limit.
    KILLED = pb.Exited.KILLED
    #: The agent could not be started (exec failed, nsjail failed).
    SPAWN_FAILED = pb.Exited.SPAWN_FAILED
    #: The shim refused the init payload.
    PAYLOAD_REJECTED = pb.Exited.PAYLOAD_REJECTED
    #: The broker is shutting down.
    BROKER_SHUTDOWN = pb.Exited.BROKER_SHUTDOWN
    #: The memory limit was hit (the agent was OOM-killed).
    MEMORY_LIMIT = pb.Exited.MEMORY_LIMIT
    #: The CPU-time limit was hit (SIGXCPU).
    CPU_LIMIT = pb.Exited.CPU_LIMIT
    #: The file-size limit was hit (SIGXFSZ).
    FILE_SIZE_LIMIT = pb.Exited.FILE_SIZE_LIMIT
    #: The shim's self-check did not match the requested isolation.
    ISOLATION_CHECK_FAILED = pb.Exited.ISOLATION_CHECK_FAILED
    #: The process limit was hit (a fork failed) and the agent then failed.
    PROCESS_LIMIT = pb.Exited.PROCESS_LIMIT
    #: The session's disk limit (bytes or inodes of home + work) was hit.
    DISK_LIMIT = pb.Exited.DISK_LIMIT
    #: The broker was killed while the turn ran; a new broker reports it from the
    #: turn's journal (the events before the kill come first).
    BROKER_RESTART = pb.Exited.BROKER_RESTART
    #: Fleet mode: the session's lease could not be renewed in time; the
    #: turn was ended and nothing was committed.
    LEASE_LOST = pb.Exited.LEASE_LOST
    #: Fleet mode: the turn's changes could not be committed; the message
    #: names the session id its files are kept as.
    COMMIT_FAILED = pb.Exited.COMMIT_FAILED


class Mode(_OpenIntEnum):
    """How the broker ran the turn."""

    UNSPECIFIED = pb.MODE_UNSPECIFIED
    NSJAIL = pb.MODE_NSJAIL
    DIRECT = pb.MODE_DIRECT


class Signal(enum.IntEnum):
    """Signals an executor may deliver to the agent over the turn's stream."""

    #: SIGINT to the agent.
    INTERRUPT = pb.SignalRequest.INTERRUPT
    #: SIGTERM to the agent.
    TERMINATE = pb.SignalRequest.TERMINATE


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-turn limits; 0 (the default) means the broker's default. A value above
    the broker's cap is refused with :class:`~turnstile_client.InvalidArgument`."""

    wall_time_ms: int = 0
    memory_bytes: int = 0
    cpu_time_ms: int = 0
    max_processes: int = 0
    max_open_files: int = 0
    max_file_size_bytes: int = 0
    #: Disk use of the session (home + work), not of the turn.
    disk_bytes: int = 0
    disk_inodes: int = 0

    def to_pb(self) -> pb.Limits:
        return pb.Limits(
            wall_time_ms=self.wall_time_ms,
            memory_bytes=self.memory_bytes,
            cpu_time_ms=self.cpu_time_ms,
            max_processes=self.max_processes,
            max_open_files=self.max_open_files,
            max_file_size_bytes=self.max_file_size_bytes,
            disk_bytes=self.disk_bytes,
            disk_inodes=self.disk_inodes,
        )


@dataclass(frozen=True, slots=True)
class Isolation:
    """The shim's view of its isolation, checked by the broker before the agent ran."""

    pid: int
    uid: int
    gid: int
    uid_map: str
    gid_map: str
    net_interfaces: tuple[str, ...]
    no_new_privs: bool
    root_read_only: bool
    hostname: str

    @classmethod
    def from_pb(cls, m: pb.Isolation) -> Isolation:
        return cls(
            pid=m.pid,
            uid=m.uid,
            gid=m.gid,
            uid_map=m.uid_map,
            gid_map=m.gid_map,
            net_interfaces=tuple(m.net_interfaces),
            no_new_privs=m.no_new_privs,
            root_read_only=m.root_read_only,
            hostname=m.hostname,
        )


@dataclass(frozen=True, slots=True)
class Usage:
    """Resources the turn's processes used."""

    user_cpu_us: int
    system_cpu_us: int
    max_rss_kib: int


@dataclass(frozen=True, slots=True)
class Started:
    """The agent is running. Always the first event of a turn whose agent started."""

    turn_id: str
    session_id: str
    mode: Mode
    #: Paths as the agent sees them.
    home: str
    work_dir: str
    cwd: str
    #: ``Start`` received → agent spawned, in microseconds (the broker's measure).
    spawn_us: int
    started_at_unix_ms: int
    isolation: Isolation | None
    #: The upstream base URL the broker forwards the agent's LLM requests to
    #: (broker-side forwarding); "" when it does not.
    llm_upstream: str = ""

    @classmethod
    def from_pb(cls, m: pb.Started) -> Started:
        return cls(
            turn_id=m.turn_id,
            session_id=m.session_id,
            mode=Mode(m.mode),
            home=m.home,
            work_dir=m.work_dir,
            cwd=m.cwd,
            spawn_us=m.spawn_us,
            started_at_unix_ms=m.started_at_unix_ms,
            isolation=Isolation.from_pb(m.isolation) if m.HasField("isolation") else None,
            llm_upstream=m.llm_upstream,
        )


@dataclass(frozen=True, slots=True)
class Stdout:
    """Bytes the agent wrote to its stdout, in order (chunks are not lines)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Stderr:
    """Bytes the agent wrote to its stderr, in order."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Notice:
    """A problem with something the executor sent that does not end the turn."""

    message: str


@dataclass(frozen=True, slots=True)
class LlmRequest:
    """One LLM request the broker forwarded for the agent (broker-side
    forwarding), once its response ended: no bodies, no headers, no query."""

    method: str
    #: The path the agent asked for, without its query.
    path: str
    #: What the agent got: the upstream's status, or the broker's own 502/413.
    status: int
    request_bytes: int
    response_bytes: int
    duration_us: int
    #: Why the response ended early ("" when it completed).
    error: str

    @classmethod
    def from_pb(cls, m: pb.LlmRequest) -> LlmRequest:
        return cls(
            method=m.method,
            path=m.path,
            status=m.status,
            request_bytes=m.request_bytes,
            response_bytes=m.response_bytes,
            duration_us=m.duration_us,
            error=m.error,
        )


@dataclass(frozen=True, slots=True)
class LlmUpstream:
    """Broker-side forwarding: the broker serves the turn's LLM connections
    itself, forwarding each request to ``base_url`` with ``credential`` added.
    The credential goes to the broker in the turn's ``Start`` and is held in
    its memory only (never on disk, never logged, never in the jail); it is
    never shown by ``repr``."""

    #: ``http://`` or ``https://`` base URL (no query, no user info).
    base_url: str
    credential: str = field(repr=False)
    #: ``"x-api-key"`` or ``"authorization"`` (``Bearer``); None: as the turn's
    #: agent profile says (``x-api-key`` without one).
    credential_header: str | None = None
    #: Requests with a larger body get 413; 0 = the broker's default (32 MiB).
    max_request_bytes: int = 0

    def to_pb(self) -> pb.LlmUpstream:
        headers = {
            None: pb.CREDENTIAL_HEADER_UNSPECIFIED,
            "x-api-key": pb.CREDENTIAL_HEADER_X_API_KEY,
            "authorization": pb.CREDENTIAL_HEADER_AUTHORIZATION_BEARER,
        }
        if self.credential_header not in headers:
            raise ValueError(
                f"credential_header {self.credential_header!r}: "
                "want 'x-api-key', 'authorization' or None"
            )
        return pb.LlmUpstream(
            base_url=self.base_url,
            credential=self.credential,
            credential_header=headers[self.credential_header],
            max_request_bytes=self.max_request_bytes,
        )


@dataclass(frozen=True, slots=True)
class Exited:
    """The turn is over: the last event, sent after every byte of stdout and stderr."""

    reason: ExitReason
    #: The agent's exit code when it exited by itself, else None.
    exit_code: int | None
    #: The signal that killed the agent, else None.
    signal: int | None
    #: Human-readable detail (the failure for SPAWN_FAILED and friends).
    message: str
    wall_time_us: int
    stdout_bytes: int
    stderr_bytes: int
    stdin_bytes: int
    usage: Usage | None
    #: Limits reached during the turn, whatever the reason ("memory", ...).
    limits_hit: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """True when the agent exited by itself with code 0."""
        return self.reason == ExitReason.EXITED and self.exit_code == 0

    @classmethod
    def from_pb(cls, m: pb.Exited) -> Exited:
        status = m.WhichOneof("status")
        return cls(
            reason=ExitReason(m.reason),
            exit_code=m.exit_code if status == "exit_code" else None,
            signal=m.signal if status == "signal" else None,
            message=m.message,
            wall_time_us=m.wall_time_us,
            stdout_bytes=m.stdout_bytes,
            stderr_bytes=m.stderr_bytes,
            stdin_bytes=m.stdin_bytes,
            usage=(
                Usage(m.usage.user_cpu_us, m.usage.system_cpu_us, m.usage.max_rss_kib)
                if m.HasField("usage")
                else None
            ),
            limits_hit=tuple(m.limits_hit),
        )


#: What iterating a turn yields.
Event = Union[Started, Stdout, Stderr, Notice, LlmRequest, Exited]


@dataclass(frozen=True, slots=True)
class TurnResult:
    """A whole turn, collected: its output and how it ended."""

    started: Started | None
    exited: Exited
    stdout: bytes
    stderr: bytes


@dataclass(frozen=True, slots=True)
class TurnRef:
    """The turn a cancel or interrupt reached."""

    session_id: str
    turn_id: str


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """A session's metadata."""

    session_id: str
    created_unix_ms: int
    turn_count: int
    #: None before the first turn.
    last_turn_id: str | None
    last_turn_start_unix_ms: int
    last_turn_end_unix_ms: int
    #: e.g. "exited", "timed_out"; None before the first turn ended.
    last_exit_reason: str | None
    disk_usage_bytes: int
    #: Set while a turn runs.
    running_turn_id: str | None

    @classmethod
    def from_pb(cls, m: pb.SessionInfo) -> SessionInfo:
        return cls(
            session_id=m.session_id,
            created_unix_ms=m.created_unix_ms,
            turn_count=m.turn_count,
            last_turn_id=m.last_turn_id or None,
            last_turn_start_unix_ms=m.last_turn_start_unix_ms,
            last_turn_end_unix_ms=m.last_turn_end_unix_ms,
            last_exit_reason=m.last_exit_reason or None,
            disk_usage_bytes=m.disk_usage_bytes,
            running_turn_id=m.running_turn_id or None,
        )
