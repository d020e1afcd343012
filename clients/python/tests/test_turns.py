"""Turns through the Python client against a real broker, in both modes: output
relayed complete and in order, stdin in every form, how turns end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from conftest import Daemon, async_test, new_session

from turnstile_client import (
    PIPE,
    Broker,
    Exited,
    ExitReason,
    Limits,
    Mode,
    Started,
    Stderr,
    StdinNotPiped,
    Stdout,
    TurnGone,
)

# 90,000 numbered lines of 12 bytes ("out 0000001\n"): just over 1 MB.
LINES = 90_000


def numbered(prefix: str) -> bytes:
    return b"".join(b"%s %07d\n" % (prefix.encode(), i) for i in range(1, LINES + 1))


def sh(script: str) -> list[str]:
    return ["/bin/sh", "-c", script]


@async_test
async def test_a_megabyte_of_numbered_lines_arrives_complete_and_in_order(daemon: Daemon) -> None:
    script = f"seq -f 'out %07g' 1 {LINES}; seq -f 'err %07g' 1 {LINES} >&2"
    async with Broker(daemon.socket) as broker:
        events = []
        async with broker.run_turn(new_session(), sh(script)) as turn:
            async for event in turn:
                events.append(event)
    assert isinstance(events[0], Started)
    assert isinstance(events[-1], Exited)
    assert sum(isinstance(e, Exited) for e in events) == 1
    stdout = b"".join(e.data for e in events if isinstance(e, Stdout))
    stderr = b"".join(e.data for e in events if isinstance(e, Stderr))
    assert len(stdout) > 1_000_000
    assert stdout == numbered("out")
    assert stderr == numbered("err")
    exited = events[-1]
    assert exited.reason == ExitReason.EXITED and exited.exit_code == 0 and exited.ok
    assert (exited.stdout_bytes, exited.stderr_bytes) == (len(stdout), len(stderr))


@async_test
async def test_started_describes_the_turn(daemon: Daemon) -> None:
    session = new_session()
    async with Broker(daemon.socket) as broker:
        turn = await broker.run_turn(session, sh("pwd"), turn_id="t-1", cwd="")
        result = await turn.collect()
    started = result.started
    assert started is not None and turn.started is started
    assert (started.session_id, started.turn_id, turn.turn_id) == (session, "t-1", "t-1")
    assert started.mode == (Mode.NSJAIL if daemon.mode == "nsjail" else Mode.DIRECT)
    assert result.stdout.decode().strip() == started.cwd == started.work_dir
    assert started.isolation is not None


@async_test
async def test_exit_codes_and_reasons_map(daemon: Daemon) -> None:
    async with Broker(daemon.socket) as broker:

        async def run(argv: list[str], **kw: object) -> Exited:
            turn = await broker.run_turn(new_session(), argv, **kw)  # type: ignore[arg-type]
            return await turn.wait()

        e = await run(sh("exit 3"))
        assert (e.reason, e.exit_code, e.signal, e.ok) == (ExitReason.EXITED, 3, None, False)

        e = await run(sh("kill -KILL $$"))
        assert (e.reason, e.exit_code, e.signal) == (ExitReason.KILLED, None, 9)

        e = await run(sh("sleep 60"), limits=Limits(wall_time_ms=300))
        assert e.reason == ExitReason.TIMED_OUT

        e = await run(
            sh("exec head -c 1048576 /dev/zero > big"), limits=Limits(max_file_size_bytes=65536)
        )
        assert e.reason == ExitReason.FILE_SIZE_LIMIT

        # An agent that cannot be started: admitted, so no exception, but the
        # first event is its Exited.
        turn = await broker.run_turn(new_session(), ["/nonexistent/agent"])
        events = [ev async for ev in turn]
    assert turn.started is None
    assert len(events) == 1 and isinstance(events[0], Exited)
    assert events[0].reason == ExitReason.SPAWN_FAILED
    assert "/nonexistent/agent" in events[0].message


@async_test
async def test_env_and_cwd_reach_the_agent(daemon: Daemon) -> None:
    session = new_session()
    async with Broker(daemon.socket) as broker:
        await (await broker.run_turn(session, sh("mkdir -p sub/dir"))).wait()
        turn = await broker.run_turn(
            session, sh('echo "$GREETING"; pwd'), env={"GREETING": "hello there"}, cwd="sub/dir"
        )
        result = await turn.collect()
    greeting, cwd = result.stdout.decode().splitlines()
    assert greeting == "hello there"
    assert cwd.endswith("/sub/dir")


@async_test
async def test_stdin_bytes_are_sent_then_closed(daemon: Daemon) -> None:
    data = numbered("in")
    async with Broker(daemon.socket) as broker:
        result = await (await broker.run_turn(new_session(), ["cat"], stdin=data)).collect()
    assert result.stdout == data
    assert result.exited.stdin_bytes == len(data)


@async_test
async def test_stdin_from_an_async_iterable_and_an_iterable(daemon: Daemon) -> None:
    parts = [b"one\n", b"two\n", b"three\n"]

    async def agen() -> AsyncIterator[bytes]:
        for p in parts:
            yield p

    async with Broker(daemon.socket) as broker:
        a = await (await broker.run_turn(new_session(), ["cat"], stdin=agen())).collect()
        b = await (await broker.run_turn(new_session(), ["cat"], stdin=iter(parts))).collect()
    assert a.stdout == b.stdout == b"".join(parts)


@async_test
async def test_no_stdin_means_the_agent_sees_eof(daemon: Daemon) -> None:
    async with Broker(daemon.socket) as broker:
        result = await (await broker.run_turn(new_session(), ["wc", "-c"])).collect()
    assert result.stdout.strip() == b"0"
    assert result.exited.ok


@async_test
async def test_piped_stdin_is_written_while_output_is_read(daemon: Daemon) -> None:
    # 4 MB through cat: more than any buffer on the way, so writing only
    # finishes because output is read at the same time.
    data = numbered("pipe") * 4
    async with Broker(daemon.socket) as broker:
        async with broker.run_turn(new_session(), ["cat"], stdin=PIPE) as turn:

            async def write() -> None:
                await turn.write_stdin(data[: len(data) // 2])
                await turn.write_stdin(memoryview(data)[len(data) // 2 :])
                await turn.close_stdin()
                await turn.close_stdin()  # a second close does nothing

            _, result = await asyncio.gather(write(), turn.collect())
            with pytest.raises(TurnGone):
                await turn.write_stdin(b"late")
    assert result.stdout == data
    assert result.exited.stdin_bytes == len(data)


@async_test
async def test_input_after_the_turn_is_over_raises_turn_gone(daemon: Daemon) -> None:
    async with Broker(daemon.socket) as broker:
        turn = await broker.run_turn(new_session(), ["true"], stdin=PIPE)
        await turn.close_stdin()
        await turn.wait()
        with pytest.raises(TurnGone):
            await turn.interrupt()
        piped = await broker.run_turn(new_session(), ["cat"], stdin=PIPE)
        await piped.close_stdin()
        with pytest.raises(TurnGone):
            await piped.write_stdin(b"late")
        await piped.wait()
        closed = await broker.run_turn(new_session(), ["cat"])
        with pytest.raises(StdinNotPiped):
            await closed.write_stdin(b"x")
        with pytest.raises(StdinNotPiped):
            await closed.close_stdin()
        await closed.wait()


@async_test
async def test_a_failing_stdin_source_ends_the_turn_and_raises(daemon: Daemon) -> None:
    class SourceBroke(Exception):
        pass

    async def source() -> AsyncIterator[bytes]:
        yield b"partial input\n"
        raise SourceBroke("the prompt store went away")

    session = new_session()
    async with Broker(daemon.socket) as broker:
        with pytest.raises(SourceBroke):
            # The source may fail before the agent started (run_turn raises)
            # or after (iterating raises): either way, the caller gets it.
            turn = await broker.run_turn(session, ["cat"], stdin=source())
            async for _ in turn:
                pass
        # The turn was ended: the session takes a new one (waiting for the
        # broker to finish the old one's cleanup, not a fixed time).
        after = await broker.run_turn(session, ["true"], wait_ms=60_000)
        assert (await after.wait()).ok


@async_test
async def test_an_llm_connection_is_refused_not_left_hanging(daemon: Daemon) -> None:
    # The Python client relays no LLM connections: the agent's request fails
    # at once instead of waiting for an answer that never comes.
    script = (
        "import os, sys, urllib.request\n"
        "try:\n"
        "    urllib.request.urlopen(os.environ['ANTHROPIC_BASE_URL'] + '/v1/messages', timeout=600)\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
        "    sys.exit(4)\n"
    )
    async with Broker(daemon.socket) as broker:
        result = await (await broker.run_turn(new_session(), ["python3", "-c", script])).collect()
    assert result.exited.exit_code == 4, result


@async_test
async def test_an_agent_that_exits_with_stdin_unread_still_ends_with_exited(
    daemon: Daemon,
) -> None:
    # Input is still being written when the agent exits and the broker ends the
    # stream: the writer learns the turn is over, and the reader still gets
    # every event up to Exited (grpcio's own write would have replaced the
    # status and lost them: see turnstile_client._wire).
    session = new_session()
    async with Broker(daemon.socket) as broker:
        for _ in range(20):
            script = "head -c 1 >/dev/null; echo done"
            async with broker.run_turn(session, ["/bin/sh", "-c", script], stdin=PIPE) as turn:

                async def feed() -> None:
                    try:
                        while True:
                            await turn.write_stdin(b"x" * 65536)
                    except TurnGone:
                        pass

                _, result = await asyncio.gather(feed(), turn.collect())
            assert result.stdout == b"done\n"
            assert result.exited.ok
