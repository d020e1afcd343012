"""Asyncio client for the Turnstile broker.

Runs agent turns on a broker over its unix socket, streams their events, feeds
their stdin, delivers signals, and manages sessions::

    from turnstile_client import Broker, Stdout, Exited

    async with Broker("/var/lib/turnstile/broker.sock") as broker:
        async with broker.run_turn("wf-42", ["claude", "-p", "hello"]) as turn:
            async for event in turn:
                if isinstance(event, Stdout):
                    print(event.data.decode(), end="")
                elif isinstance(event, Exited):
                    print(event.reason.name, event.exit_code)

Refusals raise one exception class per status (:class:`SessionBusy`,
:class:`InvalidArgument`, :class:`NotFound`, ...), all :class:`TurnstileError`.
"""

from .broker import ArchiveSource, Broker
from .errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    SessionBusy,
    SessionBusyTimeout,
    StdinNotPiped,
    TurnGone,
    TurnLost,
    TurnstileError,
    Unauthenticated,
    Unavailable,
    Unknown,
)
from .models import (
    Event,
    ExitReason,
    Exited,
    Isolation,
    Limits,
    LlmRequest,
    LlmUpstream,
    Mode,
    Notice,
    SessionInfo,
    Signal,
    Started,
    Stderr,
    Stdout,
    TurnRef,
    TurnResult,
    Usage,
)
from .turn import PIPE, StdinSource, Turn, TurnStart

__version__ = "0.1.0"

__all__ = [
    "PIPE",
    "Aborted",
    "AlreadyExists",
    "ArchiveSource",
    "Broker",
    "Cancelled",
    "DeadlineExceeded",
    "Event",
    "ExitReason",
    "Exited",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "Isolation",
    "Limits",
    "LlmRequest",
    "LlmUpstream",
    "Mode",
    "NotFound",
    "Notice",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "SessionBusy",
    "SessionBusyTimeout",
    "SessionInfo",
    "Signal",
    "Started",
    "StdinNotPiped",
    "StdinSource",
    "Stderr",
    "Stdout",
    "Turn",
    "TurnGone",
    "TurnLost",
    "TurnRef",
    "TurnResult",
    "TurnStart",
    "TurnstileError",
    "Unauthenticated",
    "Unavailable",
    "Unknown",
    "Usage",
]
