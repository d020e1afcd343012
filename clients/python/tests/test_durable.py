"""Durable turns through the Python client against a real broker: idempotent starts
by turn key, attaching to a turn another stream left, resuming a stream whose
connection broke, and the refusals of attach."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest
from conftest import Daemon, async_test, new_session

from turnstile_client import (
    PIPE,
    Aborted,
    AlreadyExists,
    Broker,
    Exited,
    NotFound,
    OutOfRange,
    Started,
    Stdout,
    Turn,
)

GRACE_MS = 60_000


def sh(script: str) -> list[str]:
    return ["/bin/sh", "-c", script]


def lines(first: int, last: int) -> bytes:
    return b"".join(b"%d\n" % i for i in range(first, last + 1))


async def read_until(turn: Turn, needle: bytes, resumes: int = 0) -> bytes:
    """Stdout read up to and including the chunk that holds ``needle`` (and, with
    ``resumes``, the first chunk once the turn has resumed that many times)."""
    out = b""
    async for event in turn:
        if isinstance(event, Stdout):
            out += event.data
            if needle in out and turn.resumes >= resumes:
                return out
        if isinstance(event, Exited):
            break
    pytest.fail(f"{needle!r} never came: {out[-200:]!r}")


async def rest(turn: Turn) -> tuple[bytes, Exited]:
    out = b""
    async for event in turn:
        if isinstance(event, Stdout):
            out += event.data
    assert turn.exited is not None
    return out, turn.exited


@async_test
async def test_a_turn_key_attaches_to_its_running_turn_and_replays_it_once_ended(
    daemon: Daemon,
) -> None:
    session = new_session()
    script = "echo pid $$; read x; echo got $x"
    async with Broker(daemon.socket) as broker:
        first = await broker.run_turn(
            session, sh(script), stdin=PIPE, turn_key="wf-1", detach_grace_ms=GRACE_MS
        )
        pid_line = await read_until(first, b"\n")
        # The same key while it runs: the same turn (one agent), from its start.
        second = await broker.run_turn(
            session, sh(script), stdin=PIPE, turn_key="wf-1", detach_grace_ms=GRACE_MS
        )
        assert second.started is not None and first.started is not None
        assert second.started.turn_id == first.started.turn_id
        assert await read_until(second, b"\n") == pid_line
        # The first stream was taken over.
        with pytest.raises(Aborted, match="another executor attached"):
            async for _ in first:
                pass
        # The same key with another argv names the key.
        with pytest.raises(AlreadyExists, match="wf-1"):
            await broker.run_turn(session, sh("true"), turn_key="wf-1")
        await second.write_stdin(b"hi\n")
        await second.close_stdin()
        out, exited = await rest(second)
        assert out == b"got hi\n" and exited.ok
        # Once ended: the same events again, through its Exited.
        replay = await broker.run_turn(session, sh(script), stdin=PIPE, turn_key="wf-1")
        result = await replay.collect()
        assert result.started is not None
        assert result.started.turn_id == first.started.turn_id
        assert result.stdout == pid_line + b"got hi\n"
        assert result.exited == exited


@async_test
async def test_a_turn_left_with_a_grace_is_attached_from_its_last_seq(daemon: Daemon) -> None:
    session = new_session()
    async with Broker(daemon.socket) as broker:
        turn = await broker.run_turn(
            session,
            sh("seq 1 1000; read x; seq 1001 2000"),
            stdin=PIPE,
            detach_grace_ms=GRACE_MS,
        )
        seen = await read_until(turn, b"\n1000\n")
        assert seen == lines(1, 1000)
        assert turn.started is not None
        turn_id, last = turn.started.turn_id, turn.last_seq
        assert last > 1
        turn.abort()
    # Another client (as a rescheduled activity would be) takes it from there.
    async with Broker(daemon.socket) as broker:
        async with broker.attach_turn(session, turn_id=turn_id, after_seq=last) as again:
            await again.write_stdin(b"go\n")
            await again.close_stdin()
            out, exited = await rest(again)
    assert out == lines(1001, 2000)
    assert exited.ok


@async_test
async def test_attach_refusals_name_what_was_wrong(direct_daemon: Daemon) -> None:
    session = new_session()
    async with Broker(direct_daemon.socket) as broker:
        done = await broker.run_turn(session, sh("echo one"), turn_key="k")
        await done.wait()
        assert done.started is not None
        with pytest.raises(NotFound, match="nope"):
            async with broker.attach_turn(session, turn_id="nope") as t:
                await t.wait()
        with pytest.raises(NotFound):
            async with broker.attach_turn(new_session(), turn_key="k") as t:
                await t.wait()
        with pytest.raises(OutOfRange):
            async with broker.attach_turn(session, turn_key="k", after_seq=10_000) as t:
                await t.wait()
        with pytest.raises(ValueError):
            broker.attach_turn(session)
        # An ended turn attached by key: its events again.
        async with broker.attach_turn(session, turn_key="k") as t:
            result = await t.collect()
        assert isinstance(result.started, Started) and result.stdout == b"one\n"


class CuttingProxy:
    """A unix socket that relays to the broker's and can cut every connection it
    carries, as a broken network path (or a restarted sidecar) would."""

    def __init__(self, upstream: Path) -> None:
        self.upstream = upstream
        self.dir = tempfile.TemporaryDirectory(prefix="turnstile-proxy-")
        self.path = Path(self.dir.name) / "proxy.sock"
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> CuttingProxy:
        self.server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        self.dir.cleanup()

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_unix_connection(str(self.upstream))
        self.writers += [w, uw]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(1 << 16):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(r, uw), pump(ur, w))

    def cut(self) -> None:
        for w in self.writers:
            w.transport.abort()
        self.writers.clear()


@async_test
async def test_a_broken_connection_is_resumed_and_every_line_arrives_once(
    daemon: Daemon,
) -> None:
    total = 200_000
    cuts_at = (b"\n50000\n", b"\n120000\n")
    async with CuttingProxy(daemon.socket) as proxy, Broker(proxy.path) as broker:
        turn = await broker.run_turn(
            new_session(),
            sh(f"seq 1 {total}; read x; echo after $x"),
            stdin=PIPE,
            detach_grace_ms=GRACE_MS,
        )
        out = b""
        # Each cut comes after a chunk read on the stream before it broke: what
        # the client had buffered from a broken stream is read first.
        for i, needle in enumerate(cuts_at):
            out += await read_until(turn, needle, resumes=i)
            proxy.cut()
        out += await read_until(turn, b"\n%d\n" % total)
        # Input after the cuts goes to the resumed stream.
        await turn.write_stdin(b"resumed\n")
        await turn.close_stdin()
        tail, exited = await rest(turn)
    assert out + tail == lines(1, total) + b"after resumed\n"
    assert exited.ok
    assert turn.resumes == 2
