"""The parts of the API that need no broker: status mapping, enums, argument checks;
and one broker object used from two event loops."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from conftest import Daemon, new_session

from turnstile_client import (
    Broker,
    Cancelled,
    ExitReason,
    Internal,
    Mode,
    PermissionDenied,
    SessionBusy,
    SessionBusyTimeout,
    Unauthenticated,
    Unknown,
)
from turnstile_client.errors import from_status


@pytest.mark.parametrize(
    ("code", "message", "cls"),
    [
        (grpc.StatusCode.FAILED_PRECONDITION, "session a is busy: turn t is running", SessionBusy),
        (
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "session a is still busy after waiting 5 ms",
            SessionBusyTimeout,
        ),
        (grpc.StatusCode.PERMISSION_DENIED, "peer uid 1000 is not allowed", PermissionDenied),
        (grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token", Unauthenticated),
        (grpc.StatusCode.INTERNAL, "export failed: disk", Internal),
        (grpc.StatusCode.CANCELLED, "", Cancelled),
        (grpc.StatusCode.DATA_LOSS, "lost", Unknown),
    ],
)
def test_statuses_map_to_their_exception(
    code: grpc.StatusCode, message: str, cls: type[Exception]
) -> None:
    err = from_status(code, message)
    assert type(err) is cls
    assert err.code == code
    assert err.message == (message or code.name.lower())
    assert str(err) == err.message


def test_enums_print_as_the_brokers_names_and_keep_unknown_values() -> None:
    assert str(ExitReason.TIMED_OUT) == "timed_out"
    assert f"{Mode.NSJAIL}" == "nsjail"
    future = ExitReason(99)
    assert future == 99 and future.name == "UNKNOWN_99" and str(future) == "unknown_99"


def test_arguments_that_are_surely_mistakes_are_refused_before_any_call() -> None:
    broker = Broker("/nonexistent.sock")
    with pytest.raises(TypeError):
        broker.run_turn("s", "echo hi")  # a string, not a sequence of strings
    with pytest.raises(TypeError):
        broker.run_turn("s", ["cat"], stdin="text")  # type: ignore[arg-type]


def test_one_broker_serves_two_event_loops(direct_daemon: Daemon) -> None:
    broker = Broker(direct_daemon.socket)

    async def once(word: str) -> bytes:
        result = await (await broker.run_turn(new_session(), ["echo", word])).collect()
        return result.stdout

    assert asyncio.run(once("first")) == b"first\n"
    assert asyncio.run(once("second")) == b"second\n"
