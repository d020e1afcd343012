from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    MODE_NSJAIL: _ClassVar[Mode]
    MODE_DIRECT: _ClassVar[Mode]

class CredentialHeader(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CREDENTIAL_HEADER_UNSPECIFIED: _ClassVar[CredentialHeader]
    CREDENTIAL_HEADER_X_API_KEY: _ClassVar[CredentialHeader]
    CREDENTIAL_HEADER_AUTHORIZATION_BEARER: _ClassVar[CredentialHeader]
MODE_UNSPECIFIED: Mode
MODE_NSJAIL: Mode
MODE_DIRECT: Mode
CREDENTIAL_HEADER_UNSPECIFIED: CredentialHeader
CREDENTIAL_HEADER_X_API_KEY: CredentialHeader
CREDENTIAL_HEADER_AUTHORIZATION_BEARER: CredentialHeader

class ForkSessionRequest(_message.Message):
    __slots__ = ("source_session_id", "new_session_id")
    SOURCE_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    source_session_id: str
    new_session_id: str
    def __init__(self, source_session_id: _Optional[str] = ..., new_session_id: _Optional[str] = ...) -> None: ...

class ArchiveChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class ImportSessionRequest(_message.Message):
    __slots__ = ("session_id", "data")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    data: bytes
    def __init__(self, session_id: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class GcRequest(_message.Message):
    __slots__ = ("dry_run",)
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    dry_run: bool
    def __init__(self, dry_run: bool = ...) -> None: ...

class GcReply(_message.Message):
    __slots__ = ("sessions",)
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sessions: _Optional[_Iterable[str]] = ...) -> None: ...

class SessionRef(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class TurnRef(_message.Message):
    __slots__ = ("session_id", "turn_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    turn_id: str
    def __init__(self, session_id: _Optional[str] = ..., turn_id: _Optional[str] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "created_unix_ms", "turn_count", "last_turn_id", "last_turn_start_unix_ms", "last_turn_end_unix_ms", "last_exit_reason", "disk_usage_bytes", "running_turn_id", "holder_worker", "generation", "archive_bytes", "last_worker", "local_copy")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    TURN_COUNT_FIELD_NUMBER: _ClassVar[int]
    LAST_TURN_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_TURN_START_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_TURN_END_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_EXIT_REASON_FIELD_NUMBER: _ClassVar[int]
    DISK_USAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RUNNING_TURN_ID_FIELD_NUMBER: _ClassVar[int]
    HOLDER_WORKER_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    ARCHIVE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAST_WORKER_FIELD_NUMBER: _ClassVar[int]
    LOCAL_COPY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    created_unix_ms: int
    turn_count: int
    last_turn_id: str
    last_turn_start_unix_ms: int
    last_turn_end_unix_ms: int
    last_exit_reason: str
    disk_usage_bytes: int
    running_turn_id: str
    holder_worker: str
    generation: int
    archive_bytes: int
    last_worker: str
    local_copy: bool
    def __init__(self, session_id: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., turn_count: _Optional[int] = ..., last_turn_id: _Optional[str] = ..., last_turn_start_unix_ms: _Optional[int] = ..., last_turn_end_unix_ms: _Optional[int] = ..., last_exit_reason: _Optional[str] = ..., disk_usage_bytes: _Optional[int] = ..., running_turn_id: _Optional[str] = ..., holder_worker: _Optional[str] = ..., generation: _Optional[int] = ..., archive_bytes: _Optional[int] = ..., last_worker: _Optional[str] = ..., local_copy: bool = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSessionsReply(_message.Message):
    __slots__ = ("sessions",)
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[SessionInfo]
    def __init__(self, sessions: _Optional[_Iterable[_Union[SessionInfo, _Mapping]]] = ...) -> None: ...

class DeleteSessionReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TurnRequest(_message.Message):
    __slots__ = ("start", "stdin", "stdin_eof", "signal", "llm", "attach")
    START_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    STDIN_EOF_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    LLM_FIELD_NUMBER: _ClassVar[int]
    ATTACH_FIELD_NUMBER: _ClassVar[int]
    start: Start
    stdin: bytes
    stdin_eof: StdinEof
    signal: SignalRequest
    llm: LlmFrame
    attach: Attach
    def __init__(self, start: _Optional[_Union[Start, _Mapping]] = ..., stdin: _Optional[bytes] = ..., stdin_eof: _Optional[_Union[StdinEof, _Mapping]] = ..., signal: _Optional[_Union[SignalRequest, _Mapping]] = ..., llm: _Optional[_Union[LlmFrame, _Mapping]] = ..., attach: _Optional[_Union[Attach, _Mapping]] = ...) -> None: ...

class Attach(_message.Message):
    __slots__ = ("session_id", "turn_id", "turn_key", "after_seq")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    TURN_KEY_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    turn_id: str
    turn_key: str
    after_seq: int
    def __init__(self, session_id: _Optional[str] = ..., turn_id: _Optional[str] = ..., turn_key: _Optional[str] = ..., after_seq: _Optional[int] = ...) -> None: ...

class LlmFrame(_message.Message):
    __slots__ = ("conn", "open", "data", "eof", "reset", "window")
    CONN_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    EOF_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    conn: int
    open: LlmOpen
    data: bytes
    eof: LlmEof
    reset: LlmReset
    window: LlmWindow
    def __init__(self, conn: _Optional[int] = ..., open: _Optional[_Union[LlmOpen, _Mapping]] = ..., data: _Optional[bytes] = ..., eof: _Optional[_Union[LlmEof, _Mapping]] = ..., reset: _Optional[_Union[LlmReset, _Mapping]] = ..., window: _Optional[_Union[LlmWindow, _Mapping]] = ...) -> None: ...

class LlmWindow(_message.Message):
    __slots__ = ("bytes",)
    BYTES_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    def __init__(self, bytes: _Optional[int] = ...) -> None: ...

class LlmOpen(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LlmEof(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LlmReset(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class Start(_message.Message):
    __slots__ = ("session_id", "turn_id", "argv", "env", "cwd", "limits", "lease", "llm_env_vars", "profile", "llm_credential_env_vars", "turn_key", "detach_grace_ms", "llm_upstream")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    ARGV_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    CWD_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    LLM_ENV_VARS_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    LLM_CREDENTIAL_ENV_VARS_FIELD_NUMBER: _ClassVar[int]
    TURN_KEY_FIELD_NUMBER: _ClassVar[int]
    DETACH_GRACE_MS_FIELD_NUMBER: _ClassVar[int]
    LLM_UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    turn_id: str
    argv: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.ScalarMap[str, str]
    cwd: str
    limits: Limits
    lease: Lease
    llm_env_vars: _containers.RepeatedScalarFieldContainer[str]
    profile: str
    llm_credential_env_vars: _containers.RepeatedScalarFieldContainer[str]
    turn_key: str
    detach_grace_ms: int
    llm_upstream: LlmUpstream
    def __init__(self, session_id: _Optional[str] = ..., turn_id: _Optional[str] = ..., argv: _Optional[_Iterable[str]] = ..., env: _Optional[_Mapping[str, str]] = ..., cwd: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., lease: _Optional[_Union[Lease, _Mapping]] = ..., llm_env_vars: _Optional[_Iterable[str]] = ..., profile: _Optional[str] = ..., llm_credential_env_vars: _Optional[_Iterable[str]] = ..., turn_key: _Optional[str] = ..., detach_grace_ms: _Optional[int] = ..., llm_upstream: _Optional[_Union[LlmUpstream, _Mapping]] = ...) -> None: ...

class LlmUpstream(_message.Message):
    __slots__ = ("base_url", "credential", "credential_header", "max_request_bytes")
    BASE_URL_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_HEADER_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    base_url: str
    credential: str
    credential_header: CredentialHeader
    max_request_bytes: int
    def __init__(self, base_url: _Optional[str] = ..., credential: _Optional[str] = ..., credential_header: _Optional[_Union[CredentialHeader, str]] = ..., max_request_bytes: _Optional[int] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("wall_time_ms", "memory_bytes", "cpu_time_ms", "max_processes", "max_open_files", "max_file_size_bytes", "disk_bytes", "disk_inodes")
    WALL_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPU_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_PROCESSES_FIELD_NUMBER: _ClassVar[int]
    MAX_OPEN_FILES_FIELD_NUMBER: _ClassVar[int]
    MAX_FILE_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_INODES_FIELD_NUMBER: _ClassVar[int]
    wall_time_ms: int
    memory_bytes: int
    cpu_time_ms: int
    max_processes: int
    max_open_files: int
    max_file_size_bytes: int
    disk_bytes: int
    disk_inodes: int
    def __init__(self, wall_time_ms: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., cpu_time_ms: _Optional[int] = ..., max_processes: _Optional[int] = ..., max_open_files: _Optional[int] = ..., max_file_size_bytes: _Optional[int] = ..., disk_bytes: _Optional[int] = ..., disk_inodes: _Optional[int] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("policy", "wait_ms")
    class Policy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        REJECT: _ClassVar[Lease.Policy]
        WAIT: _ClassVar[Lease.Policy]
    REJECT: Lease.Policy
    WAIT: Lease.Policy
    POLICY_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    policy: Lease.Policy
    wait_ms: int
    def __init__(self, policy: _Optional[_Union[Lease.Policy, str]] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class StdinEof(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SignalRequest(_message.Message):
    __slots__ = ("signal",)
    class Signal(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        SIGNAL_UNSPECIFIED: _ClassVar[SignalRequest.Signal]
        INTERRUPT: _ClassVar[SignalRequest.Signal]
        TERMINATE: _ClassVar[SignalRequest.Signal]
    SIGNAL_UNSPECIFIED: SignalRequest.Signal
    INTERRUPT: SignalRequest.Signal
    TERMINATE: SignalRequest.Signal
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    signal: SignalRequest.Signal
    def __init__(self, signal: _Optional[_Union[SignalRequest.Signal, str]] = ...) -> None: ...

class TurnEvent(_message.Message):
    __slots__ = ("started", "stdout", "stderr", "exited", "llm", "notice", "llm_request", "seq")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    EXITED_FIELD_NUMBER: _ClassVar[int]
    LLM_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    LLM_REQUEST_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    started: Started
    stdout: bytes
    stderr: bytes
    exited: Exited
    llm: LlmFrame
    notice: Notice
    llm_request: LlmRequest
    seq: int
    def __init__(self, started: _Optional[_Union[Started, _Mapping]] = ..., stdout: _Optional[bytes] = ..., stderr: _Optional[bytes] = ..., exited: _Optional[_Union[Exited, _Mapping]] = ..., llm: _Optional[_Union[LlmFrame, _Mapping]] = ..., notice: _Optional[_Union[Notice, _Mapping]] = ..., llm_request: _Optional[_Union[LlmRequest, _Mapping]] = ..., seq: _Optional[int] = ...) -> None: ...

class Notice(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...

class Started(_message.Message):
    __slots__ = ("turn_id", "session_id", "mode", "home", "work_dir", "cwd", "spawn_us", "isolation", "started_at_unix_ms", "hydrate_us", "generation", "llm_profile", "llm_upstream")
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    HOME_FIELD_NUMBER: _ClassVar[int]
    WORK_DIR_FIELD_NUMBER: _ClassVar[int]
    CWD_FIELD_NUMBER: _ClassVar[int]
    SPAWN_US_FIELD_NUMBER: _ClassVar[int]
    ISOLATION_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    HYDRATE_US_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    LLM_PROFILE_FIELD_NUMBER: _ClassVar[int]
    LLM_UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    turn_id: str
    session_id: str
    mode: Mode
    home: str
    work_dir: str
    cwd: str
    spawn_us: int
    isolation: Isolation
    started_at_unix_ms: int
    hydrate_us: int
    generation: int
    llm_profile: LlmProfile
    llm_upstream: str
    def __init__(self, turn_id: _Optional[str] = ..., session_id: _Optional[str] = ..., mode: _Optional[_Union[Mode, str]] = ..., home: _Optional[str] = ..., work_dir: _Optional[str] = ..., cwd: _Optional[str] = ..., spawn_us: _Optional[int] = ..., isolation: _Optional[_Union[Isolation, _Mapping]] = ..., started_at_unix_ms: _Optional[int] = ..., hydrate_us: _Optional[int] = ..., generation: _Optional[int] = ..., llm_profile: _Optional[_Union[LlmProfile, _Mapping]] = ..., llm_upstream: _Optional[str] = ...) -> None: ...

class LlmRequest(_message.Message):
    __slots__ = ("method", "path", "status", "request_bytes", "response_bytes", "duration_us", "error")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DURATION_US_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    method: str
    path: str
    status: int
    request_bytes: int
    response_bytes: int
    duration_us: int
    error: str
    def __init__(self, method: _Optional[str] = ..., path: _Optional[str] = ..., status: _Optional[int] = ..., request_bytes: _Optional[int] = ..., response_bytes: _Optional[int] = ..., duration_us: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class LlmProfile(_message.Message):
    __slots__ = ("name", "credential_header", "base_path")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_HEADER_FIELD_NUMBER: _ClassVar[int]
    BASE_PATH_FIELD_NUMBER: _ClassVar[int]
    name: str
    credential_header: CredentialHeader
    base_path: str
    def __init__(self, name: _Optional[str] = ..., credential_header: _Optional[_Union[CredentialHeader, str]] = ..., base_path: _Optional[str] = ...) -> None: ...

class Isolation(_message.Message):
    __slots__ = ("pid", "uid", "gid", "uid_map", "gid_map", "net_interfaces", "no_new_privs", "root_read_only", "hostname")
    PID_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    UID_MAP_FIELD_NUMBER: _ClassVar[int]
    GID_MAP_FIELD_NUMBER: _ClassVar[int]
    NET_INTERFACES_FIELD_NUMBER: _ClassVar[int]
    NO_NEW_PRIVS_FIELD_NUMBER: _ClassVar[int]
    ROOT_READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    pid: int
    uid: int
    gid: int
    uid_map: str
    gid_map: str
    net_interfaces: _containers.RepeatedScalarFieldContainer[str]
    no_new_privs: bool
    root_read_only: bool
    hostname: str
    def __init__(self, pid: _Optional[int] = ..., uid: _Optional[int] = ..., gid: _Optional[int] = ..., uid_map: _Optional[str] = ..., gid_map: _Optional[str] = ..., net_interfaces: _Optional[_Iterable[str]] = ..., no_new_privs: bool = ..., root_read_only: bool = ..., hostname: _Optional[str] = ...) -> None: ...

class Exited(_message.Message):
    __slots__ = ("reason", "exit_code", "signal", "message", "wall_time_us", "stdout_bytes", "stderr_bytes", "stdin_bytes", "usage", "limits_hit")
    class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        REASON_UNSPECIFIED: _ClassVar[Exited.Reason]
        EXITED: _ClassVar[Exited.Reason]
        TIMED_OUT: _ClassVar[Exited.Reason]
        CANCELLED: _ClassVar[Exited.Reason]
        KILLED: _ClassVar[Exited.Reason]
        SPAWN_FAILED: _ClassVar[Exited.Reason]
        PAYLOAD_REJECTED: _ClassVar[Exited.Reason]
        BROKER_SHUTDOWN: _ClassVar[Exited.Reason]
        MEMORY_LIMIT: _ClassVar[Exited.Reason]
        CPU_LIMIT: _ClassVar[Exited.Reason]
        FILE_SIZE_LIMIT: _ClassVar[Exited.Reason]
        ISOLATION_CHECK_FAILED: _ClassVar[Exited.Reason]
        PROCESS_LIMIT: _ClassVar[Exited.Reason]
        DISK_LIMIT: _ClassVar[Exited.Reason]
        BROKER_RESTART: _ClassVar[Exited.Reason]
        LEASE_LOST: _ClassVar[Exited.Reason]
        COMMIT_FAILED: _ClassVar[Exited.Reason]
    REASON_UNSPECIFIED: Exited.Reason
    EXITED: Exited.Reason
    TIMED_OUT: Exited.Reason
    CANCELLED: Exited.Reason
    KILLED: Exited.Reason
    SPAWN_FAILED: Exited.Reason
    PAYLOAD_REJECTED: Exited.Reason
    BROKER_SHUTDOWN: Exited.Reason
    MEMORY_LIMIT: Exited.Reason
    CPU_LIMIT: Exited.Reason
    FILE_SIZE_LIMIT: Exited.Reason
    ISOLATION_CHECK_FAILED: Exited.Reason
    PROCESS_LIMIT: Exited.Reason
    DISK_LIMIT: Exited.Reason
    BROKER_RESTART: Exited.Reason
    LEASE_LOST: Exited.Reason
    COMMIT_FAILED: Exited.Reason
    REASON_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_US_FIELD_NUMBER: _ClassVar[int]
    STDOUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    STDERR_BYTES_FIELD_NUMBER: _ClassVar[int]
    STDIN_BYTES_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_HIT_FIELD_NUMBER: _ClassVar[int]
    reason: Exited.Reason
    exit_code: int
    signal: int
    message: str
    wall_time_us: int
    stdout_bytes: int
    stderr_bytes: int
    stdin_bytes: int
    usage: Usage
    limits_hit: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, reason: _Optional[_Union[Exited.Reason, str]] = ..., exit_code: _Optional[int] = ..., signal: _Optional[int] = ..., message: _Optional[str] = ..., wall_time_us: _Optional[int] = ..., stdout_bytes: _Optional[int] = ..., stderr_bytes: _Optional[int] = ..., stdin_bytes: _Optional[int] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., limits_hit: _Optional[_Iterable[str]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("user_cpu_us", "system_cpu_us", "max_rss_kib")
    USER_CPU_US_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_CPU_US_FIELD_NUMBER: _ClassVar[int]
    MAX_RSS_KIB_FIELD_NUMBER: _ClassVar[int]
    user_cpu_us: int
    system_cpu_us: int
    max_rss_kib: int
    def __init__(self, user_cpu_us: _Optional[int] = ..., system_cpu_us: _Optional[int] = ..., max_rss_kib: _Optional[int] = ...) -> None: ...
