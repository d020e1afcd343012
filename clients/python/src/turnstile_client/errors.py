"""Exceptions: one class per status the broker refuses with, carrying its message.

Every refusal is a :class:`TurnstileError` whose ``message`` is the broker's own text
(it names what was wrong and what is allowed) and whose ``code`` is the gRPC status.
Catch the class for the case, e.g. :class:`SessionBusy` for a session whose turn is
still running, :class:`NotFound` for an unknown session.
"""

from __future__ import annotations

import grpc


class TurnstileError(Exception):
    """Base of every error this package raises."""

    #: The gRPC status code, or None for errors that are not a broker status.
    code: grpc.StatusCode | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class InvalidArgument(TurnstileError):
    """Bad input: an invalid session or turn id, env key, cwd, limit, argv; a
    corrupt or unsafe archive on import."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(TurnstileError):
    """An unknown session, or (cancel, interrupt) a session with no running turn."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(TurnstileError):
    """The session id of a fork or import is taken, or the turn id is running."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(TurnstileError):
    """The session cannot take this now: busy (see :class:`SessionBusy`),
    damaged, or the broker is not configured for it (gc without a TTL)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class SessionBusy(FailedPrecondition):
    """The session has a running turn (a turn, delete, fork or export refused at once)."""


class DeadlineExceeded(TurnstileError):
    """A deadline passed (see :class:`SessionBusyTimeout` for the broker's lease wait)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class SessionBusyTimeout(DeadlineExceeded, SessionBusy):
    """The session was still busy when the turn's lease wait ran out."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ResourceExhausted(TurnstileError):
    """Over a cap: the init payload, an import's size or entries, the disk reserve."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(TurnstileError):
    """The broker cannot be reached, went away, or is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(TurnstileError):
    """A missing or wrong bearer token on the broker's TCP listener."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(TurnstileError):
    """This client may not use the broker."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Internal(TurnstileError):
    """The broker failed on its side (I/O, spawn of its helpers, export failure)."""

    code = grpc.StatusCode.INTERNAL


class OutOfRange(TurnstileError):
    """An ``attach`` asked for events the turn does not have: after the last one,
    or before the first one its journal still keeps (the message names the range)."""

    code = grpc.StatusCode.OUT_OF_RANGE


class Aborted(TurnstileError):
    """Another executor attached to the turn and took it over from this stream."""

    code = grpc.StatusCode.ABORTED


class Cancelled(TurnstileError):
    """The call was cancelled (on this side, or the broker dropped it)."""

    code = grpc.StatusCode.CANCELLED


class Unknown(TurnstileError):
    """Any other status; ``code`` says which."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class TurnGone(TurnstileError):
    """Input for a turn whose stream is over (the turn ended, or was left)."""


class StdinNotPiped(TurnstileError):
    """``write_stdin``/``close_stdin`` on a turn started without ``stdin=PIPE``:
    its stdin is fed (or closed) by :meth:`Broker.run_turn` itself."""


class TurnLost(TurnstileError):
    """The turn's stream ended without an ``Exited``: if the turn had started, the
    agent ran and how it ended is unknown."""


_BY_CODE: dict[grpc.StatusCode, type[TurnstileError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        DeadlineExceeded,
        ResourceExhausted,
        Unavailable,
        Unauthenticated,
        PermissionDenied,
        Internal,
        OutOfRange,
        Aborted,
        Cancelled,
    )
    if cls.code is not None
}


def from_status(code: grpc.StatusCode | None, message: str | None) -> TurnstileError:
    """The exception for a status the broker (or gRPC) ended a call with."""
    text = message or (code.name.lower() if code is not None else "unknown error")
    if code == grpc.StatusCode.FAILED_PRECONDITION and " is busy: " in text:
        return SessionBusy(text)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and " is still busy after waiting" in text:
        return SessionBusyTimeout(text)
    cls = _BY_CODE.get(code) if code is not None else None
    if cls is None:
        return Unknown(text, code)
    return cls(text)


def from_rpc_error(err: grpc.aio.AioRpcError) -> TurnstileError:
    """The exception for a failed call."""
    return from_status(err.code(), err.details())
