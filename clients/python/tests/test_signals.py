"""Signals, interrupt, cancel and leaving a turn, in both modes. Each agent says
"ready" once its trap is set; the test acts only after reading it."""

from __future__ import annotations

from conftest import Daemon, async_test, new_session

from turnstile_client import (
    PIPE,
    Broker,
    ExitReason,
    Signal,
    Stdout,
    Turn,
    TurnGone,
)

# `wait` returns as soon as a trapped signal arrives; the sleep is only there to
# keep the agent alive until then.
TRAPPED = "trap 'echo got-{name}; exit {code}' {name}; echo ready; sleep 60 & wait"


async def until_ready(turn: Turn) -> bytes:
    """Reads stdout up to the agent's "ready" line; returns what was read."""
    seen = b""
    async for event in turn:
        if isinstance(event, Stdout):
            seen += event.data
            if b"ready\n" in seen:
                return seen
    raise AssertionError(f"the agent ended before it was ready: {turn.exited}")


@async_test
async def test_interrupt_and_terminate_reach_the_agent(daemon: Daemon) -> None:
    async with Broker(daemon.socket) as broker:
        for name, code, send in [
            ("INT", 7, lambda t: t.interrupt()),
            ("TERM", 8, lambda t: t.signal(Signal.TERMINATE)),
        ]:
            script = TRAPPED.format(name=name, code=code)
            async with broker.run_turn(new_session(), ["/bin/sh", "-c", script]) as turn:
                await until_ready(turn)
                await send(turn)
                result = await turn.collect()
            assert result.stdout == f"got-{name}\n".encode()
            assert (result.exited.reason, result.exited.exit_code) == (ExitReason.EXITED, code)


@async_test
async def test_an_untrapped_terminate_kills_the_agent(daemon: Daemon) -> None:
    async with Broker(daemon.socket) as broker:
        turn = await broker.run_turn(new_session(), ["/bin/sh", "-c", "echo ready; sleep 60 & wait"])
        await until_ready(turn)
        await turn.terminate()
        exited = await turn.wait()
    assert (exited.reason, exited.signal, exited.exit_code) == (ExitReason.KILLED, 15, None)


@async_test
async def test_interrupt_turn_by_session(daemon: Daemon) -> None:
    session = new_session()
    async with Broker(daemon.socket) as broker:
        script = TRAPPED.format(name="INT", code=5)
        turn = await broker.run_turn(session, ["/bin/sh", "-c", script])
        await until_ready(turn)
        ref = await broker.interrupt_turn(session)
        assert (ref.session_id, ref.turn_id) == (session, turn.turn_id)
        exited = await turn.wait()
    assert exited.exit_code == 5


@async_test
async def test_cancel_ends_the_turn_with_reason_cancelled(daemon: Daemon) -> None:
    session = new_session()
    async with Broker(daemon.socket) as broker:
        # The agent ignores SIGTERM: the broker's SIGKILL after the grace ends it.
        script = "trap '' TERM; echo ready; sleep 60 & wait; sleep 60"
        turn = await broker.run_turn(session, ["/bin/sh", "-c", script], stdin=PIPE)
        await until_ready(turn)
        await turn.cancel()
        exited = await turn.wait()
        assert exited.reason == ExitReason.CANCELLED
        await turn.cancel()  # once over, cancel does nothing
        info = await broker.get_session(session)
    assert info.running_turn_id is None
    assert info.last_exit_reason == "cancelled"


@async_test
async def test_leaving_a_turn_ends_it(daemon: Daemon) -> None:
    session = new_session()
    async with Broker(daemon.socket) as broker:
        async with broker.run_turn(session, ["/bin/sh", "-c", "echo ready; sleep 60"]) as turn:
            await until_ready(turn)
        # The block ended before the turn: the stream was dropped, and the
        # broker ends the turn; the next one waits for it, not for the sleep.
        after = await broker.run_turn(session, ["true"], wait_ms=30_000)
        assert (await after.wait()).ok
        info = await broker.get_session(session)
        assert info.turn_count == 2
        with_abort = await broker.run_turn(session, ["/bin/sh", "-c", "echo ready; sleep 60"])
        await until_ready(with_abort)
        with_abort.abort()
        try:
            async for _ in with_abort:
                pass
            raise AssertionError("iterating an aborted turn must raise")
        except TurnGone:
            pass
        again = await broker.run_turn(session, ["true"], wait_ms=30_000)
        assert (await again.wait()).ok
