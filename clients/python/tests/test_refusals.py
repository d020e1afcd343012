"""Each refusal of the broker raises its own exception type, with the broker's
message; nothing ran and nothing was left behind."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest
from conftest import Daemon, async_test, new_session

from turnstile_client import (
    PIPE,
    AlreadyExists,
    Broker,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    Limits,
    NotFound,
    ResourceExhausted,
    SessionBusy,
    SessionBusyTimeout,
    TurnstileError,
    Unavailable,
)


@async_test
async def test_a_busy_session_refuses_turns_and_session_operations(daemon: Daemon) -> None:
    session = new_session()
    async with Broker(daemon.socket) as broker:
        running = await broker.run_turn(session, ["cat"], stdin=PIPE)
        with pytest.raises(SessionBusy) as busy:
            await broker.run_turn(session, ["true"])
        assert busy.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert isinstance(busy.value, FailedPrecondition)
        assert busy.value.message == (
            f"session {session} is busy: turn {running.turn_id} is running"
        )
        with pytest.raises(SessionBusy):
            await broker.delete_session(session)
        with pytest.raises(SessionBusy):
            await broker.fork_session(session, new_session())
        with pytest.raises(SessionBusy):
            async for _ in broker.export_session(session):
                pass
        with pytest.raises(SessionBusyTimeout) as waited:
            await broker.run_turn(session, ["true"], wait_ms=50)
        assert isinstance(waited.value, SessionBusy)
        assert isinstance(waited.value, DeadlineExceeded)
        assert "still busy after waiting 50 ms" in waited.value.message
        await running.close_stdin()
        assert (await running.wait()).ok
        # Only the running turn ran: the refused ones left no trace.
        info = await broker.get_session(session)
        assert info.turn_count == 1


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"session_id": "../escape"}, "invalid session id"),
        ({"session_id": ""}, "invalid session id"),
        ({"turn_id": "bad turn"}, "invalid turn id"),
        ({"argv": []}, "argv is empty"),
        ({"argv": ["a\0b"]}, "holds a NUL byte"),
        ({"env": {"HOME": "/tmp"}}, "env key HOME is protected"),
        ({"env": {"1BAD": "x"}}, "invalid env key"),
        ({"env": {"K": "line\nbreak"}}, "control character"),
        ({"cwd": "../up"}, "invalid cwd"),
        ({"limits": Limits(wall_time_ms=10**15)}, "wall_time_ms"),
    ],
)
@async_test
async def test_invalid_starts_raise_invalid_argument(
    direct_daemon: Daemon, kwargs: dict[str, object], needle: str
) -> None:
    args: dict[str, object] = {"session_id": new_session(), "argv": ["true"], **kwargs}
    async with Broker(direct_daemon.socket) as broker:
        with pytest.raises(InvalidArgument) as err:
            await broker.run_turn(**args)  # type: ignore[arg-type]
        assert needle in err.value.message
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        if args["session_id"] and "invalid session id" not in needle:
            with pytest.raises(NotFound):
                await broker.get_session(str(args["session_id"]))


@async_test
async def test_an_oversized_start_raises_resource_exhausted(direct_daemon: Daemon) -> None:
    async with Broker(direct_daemon.socket) as broker:
        with pytest.raises(ResourceExhausted) as err:
            await broker.run_turn(new_session(), ["true"], env={"BIG": "x" * (2 << 20)})
    assert "init payload is" in err.value.message


@async_test
async def test_unknown_sessions_raise_not_found(direct_daemon: Daemon) -> None:
    unknown = new_session()
    async with Broker(direct_daemon.socket) as broker:
        for op in (
            broker.get_session(unknown),
            broker.delete_session(unknown),
            broker.fork_session(unknown, new_session()),
            broker.cancel_turn(unknown),
            broker.interrupt_turn(unknown),
        ):
            with pytest.raises(NotFound):
                await op
        with pytest.raises(NotFound) as err:
            async for _ in broker.export_session(unknown):
                pass
    assert unknown in err.value.message


@async_test
async def test_invalid_ids_in_session_operations_raise_invalid_argument(
    direct_daemon: Daemon,
) -> None:
    async with Broker(direct_daemon.socket) as broker:
        for op in (
            broker.get_session("bad id"),
            broker.delete_session("../x"),
            broker.fork_session("ok", "bad/new"),
            broker.import_session(".hidden", b""),
        ):
            with pytest.raises(InvalidArgument):
                await op


@async_test
async def test_taken_ids_raise_already_exists(direct_daemon: Daemon) -> None:
    a, b = new_session(), new_session()
    async with Broker(direct_daemon.socket) as broker:
        for s in (a, b):
            assert (await (await broker.run_turn(s, ["true"])).wait()).ok
        with pytest.raises(AlreadyExists):
            await broker.fork_session(a, b)
        archive = b"".join([c async for c in broker.export_session(a)])
        with pytest.raises(AlreadyExists) as err:
            await broker.import_session(b, archive)
    assert b in err.value.message


@async_test
async def test_importing_garbage_raises_invalid_argument_and_leaves_nothing(
    direct_daemon: Daemon,
) -> None:
    session = new_session()
    async with Broker(direct_daemon.socket) as broker:
        with pytest.raises(InvalidArgument) as err:
            await broker.import_session(session, os.urandom(64 * 1024))
        assert err.value.message.startswith("import refused")
        with pytest.raises(NotFound):
            await broker.get_session(session)
        assert session not in [s.session_id for s in await broker.list_sessions()]


@async_test
async def test_gc_without_a_ttl_is_a_failed_precondition_not_busy(direct_daemon: Daemon) -> None:
    async with Broker(direct_daemon.socket) as broker:
        with pytest.raises(FailedPrecondition) as err:
            await broker.gc_sessions(dry_run=True)
    assert not isinstance(err.value, SessionBusy)
    assert "session_ttl_ms" in err.value.message


@async_test
async def test_an_unreachable_broker_raises_unavailable(tmp_path: Path) -> None:
    async with Broker(tmp_path / "nobody.sock") as broker:
        with pytest.raises(Unavailable):
            await broker.list_sessions()
        with pytest.raises(Unavailable):
            await broker.run_turn(new_session(), ["true"])


def test_every_exception_is_a_turnstile_error() -> None:
    import turnstile_client

    for name in turnstile_client.__all__:
        obj = getattr(turnstile_client, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, TurnstileError), name
