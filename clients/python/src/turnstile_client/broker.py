"""The connection to a broker: turns and session operations."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Union

import grpc

from . import _wire
from ._proto import turnstile_pb2 as pb
from ._proto import turnstile_pb2_grpc as pb_grpc
from .errors import from_rpc_error
from .models import Limits, LlmUpstream, SessionInfo, TurnRef
from .turn import PIPE, StdinSource, Turn, TurnStart

#: Largest gRPC message accepted from the broker (a stdout chunk is at most 256 KiB;
#: the Rust client accepts as much).
MAX_RECEIVE_MESSAGE: Final = 64 << 20
#: Size of the archive chunks sent on import.
IMPORT_CHUNK: Final = 256 * 1024

#: What :meth:`Broker.import_session` reads an archive from.
ArchiveSource = Union[bytes, bytearray, memoryview, IO[bytes], Iterable[bytes], AsyncIterable[bytes]]


class Broker:
    """A Turnstile broker, reached on its unix socket (or, with :meth:`tcp`, on its
    loopback TCP listener with a bearer token).

    The gRPC channel is opened on first use, in the running event loop (a later
    loop gets its own); :meth:`close` (or ``async with``) closes it. One broker
    object serves any number of concurrent turns.

    >>> broker = Broker("/var/lib/turnstile/broker.sock")   # doctest: +SKIP
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._target = "unix:" + os.path.abspath(os.fspath(socket_path))
        self._metadata: tuple[tuple[str, str], ...] = ()
        self._options = [
            # grpcio sends the percent-encoded socket path as :authority, which is
            # not a valid authority; the broker does not route on it.
            ("grpc.default_authority", "localhost"),
            ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE),
            *options,
        ]
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def tcp(
        cls,
        address: str,
        token: str,
        *,
        options: Sequence[tuple[str, Any]] = (),
    ) -> Broker:
        """A broker on its loopback TCP listener (``turnstile serve --listen
        127.0.0.1:PORT --token-file F``): ``address`` is ``host:port``, ``token``
        the file's content, sent as ``authorization: Bearer`` on every call."""
        broker = cls.__new__(cls)
        broker._target = address
        broker._metadata = (("authorization", f"Bearer {token.strip()}"),)
        broker._options = [("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE), *options]
        broker._channel = None
        broker._stub = None
        broker._loop = None
        return broker

    def _rpc(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._stub is None or self._loop is not loop:
            # A channel belongs to the loop it was opened in: another loop (a
            # second asyncio.run) gets a channel of its own.
            self._channel = grpc.aio.insecure_channel(self._target, options=self._options)
            self._stub = pb_grpc.BrokerStub(self._channel)  # type: ignore[no-untyped-call]
            self._loop = loop
        return self._stub

    async def close(self) -> None:
        """Closes the channel; running turns on it are left (and so ended)."""
        if self._channel is not None:
            channel, self._channel, self._stub = self._channel, None, None
            if self._loop is asyncio.get_running_loop():
                await channel.close()

    async def __aenter__(self) -> Broker:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- turns ------------------------------------------------------------------

    def run_turn(
        self,
        session_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str = "",
        limits: Limits | None = None,
        stdin: StdinSource = None,
        turn_id: str = "",
        wait_ms: int | None = None,
        detach_grace_ms: int = 0,
        turn_key: str = "",
        llm_upstream: LlmUpstream | None = None,
    ) -> TurnStart:
        """Starts a turn of ``session_id`` (a new id creates the session) running
        ``argv`` (``argv[0]`` is looked up in the agent's PATH).

        ``env`` is added to the broker's small environment allowlist; ``cwd`` is
        relative to the session's work dir; ``limits`` per turn (0 = the broker's
        default). ``stdin``: None closes the agent's stdin at once; bytes, or an
        iterable or async iterable of bytes, are sent (as the agent reads them)
        and then closed; :data:`PIPE` leaves it to :meth:`Turn.write_stdin` and
        :meth:`Turn.close_stdin`. ``wait_ms``: when the session has a running
        turn, wait up to that long for it to end instead of failing at once with
        :class:`~turnstile_client.SessionBusy`.

        Durable turns: ``detach_grace_ms`` is how long the turn keeps running once
        this client's stream is gone (the default 0 ends the turn with its stream,
        as leaving the ``async with`` block does). With a grace, a stream that
        breaks is resumed from the last event read (:attr:`Turn.last_seq`), up to
        :data:`~turnstile_client.turn.RESUMES` times; another process can take the
        turn over with :meth:`attach_turn`. ``turn_key`` makes the start
        idempotent (e.g. workflow id + activity id): a second ``run_turn`` with
        the key of a running turn of the session attaches to it (no second agent),
        one with the key of an ended turn replays its events through its
        ``Exited``, and one with the same key but another argv, env or cwd raises
        :class:`~turnstile_client.AlreadyExists`.

        ``llm_upstream``: the broker serves the agent's LLM connections itself,
        forwarding to that upstream with its credential (see :class:`LlmUpstream`);
        the turn then yields an :class:`LlmRequest` summary per request. Without it
        the agent's LLM connections are refused (this client does not serve them).

        Returns once the agent started (or could not: then the first event is an
        ``Exited`` with reason ``SPAWN_FAILED``); a refusal raises the exception
        of its status, and nothing ran. Use as ``turn = await broker.run_turn(...)``
        or ``async with broker.run_turn(...) as turn:``.
        """
        if isinstance(argv, (str, bytes)):
            raise TypeError("argv is a sequence of strings, not one string")
        if isinstance(stdin, str):
            raise TypeError("stdin takes bytes (encode the text), not str")
        start = pb.Start(
            session_id=session_id,
            turn_id=turn_id,
            argv=list(argv),
            env=dict(env or {}),
            cwd=cwd,
            detach_grace_ms=detach_grace_ms,
            turn_key=turn_key,
        )
        if limits is not None:
            start.limits.CopyFrom(limits.to_pb())
        if llm_upstream is not None:
            start.llm_upstream.CopyFrom(llm_upstream.to_pb())
        if wait_ms is not None:
            start.lease.CopyFrom(pb.Lease(policy=pb.Lease.WAIT, wait_ms=wait_ms))

        async def begin() -> Turn:
            call = self._rpc().Turn(metadata=self._metadata)
            turn = Turn(
                self, call, session_id, piped=stdin is PIPE, resumable=detach_grace_ms > 0
            )
            # Start goes out from the turn's input task while this reads the
            # first event: Started, Exited, or the refusal's status.
            turn._open(start, stdin)
            try:
                await turn._first_event()
            except BaseException:
                await turn.aclose()
                raise
            return turn

        return TurnStart(begin)

    def attach_turn(
        self,
        session_id: str,
        *,
        turn_id: str = "",
        turn_key: str = "",
        after_seq: int = 0,
    ) -> TurnStart:
        """Attaches to a turn of ``session_id`` by its id or its ``turn_key``: its
        events after ``after_seq`` (the :attr:`Turn.last_seq` a previous stream
        had read; 0 for all of them), then its live ones, through its ``Exited``.
        A running turn takes stdin (the returned turn is ``stdin=PIPE``), signals
        and cancel from this stream, and the stream it had before ends with
        :class:`~turnstile_client.Aborted`; an ended turn (kept for the broker's
        ``finished_turn_retention_ms``) is replayed. Leaving the returned turn
        detaches it again: it runs on for its detach grace.

        Refusals raise when the turn is first read: :class:`NotFound` for an
        unknown turn or a key of another session, :class:`OutOfRange` for an
        ``after_seq`` past the last event or before the first one still kept,
        :class:`InvalidArgument` for malformed ids.
        """
        if bool(turn_id) == bool(turn_key):
            raise ValueError("attach_turn takes a turn_id or a turn_key (one of them)")
        attach = pb.Attach(
            session_id=session_id, turn_id=turn_id, turn_key=turn_key, after_seq=after_seq
        )

        async def begin() -> Turn:
            call = self._rpc().Turn(metadata=self._metadata)
            turn = Turn(self, call, session_id, piped=True, resumable=True)
            await turn._attach(attach)
            return turn

        return TurnStart(begin)

    async def cancel_turn(self, session_id: str) -> TurnRef:
        """Ends the session's running turn (SIGTERM, grace, SIGKILL; its ``Exited``
        has reason ``CANCELLED``). :class:`~turnstile_client.NotFound` when the
        session has no running turn."""
        reply = await self._unary("CancelTurn", pb.SessionRef(session_id=session_id))
        return TurnRef(reply.session_id, reply.turn_id)

    async def interrupt_turn(self, session_id: str) -> TurnRef:
        """SIGINT to the agent of the session's running turn.
        :class:`~turnstile_client.NotFound` when there is none."""
        reply = await self._unary("InterruptTurn", pb.SessionRef(session_id=session_id))
        return TurnRef(reply.session_id, reply.turn_id)

    # -- sessions ---------------------------------------------------------------

    async def list_sessions(self) -> list[SessionInfo]:
        """Every session on the broker, sorted by id."""
        reply = await self._unary("ListSessions", pb.ListSessionsRequest())
        return [SessionInfo.from_pb(s) for s in reply.sessions]

    async def get_session(self, session_id: str) -> SessionInfo:
        """One session's metadata; :class:`~turnstile_client.NotFound` if unknown."""
        return SessionInfo.from_pb(
            await self._unary("GetSession", pb.SessionRef(session_id=session_id))
        )

    async def delete_session(self, session_id: str) -> None:
        """Deletes a session's home, work dir and metadata
        (:class:`~turnstile_client.SessionBusy` while a turn runs)."""
        await self._unary("DeleteSession", pb.SessionRef(session_id=session_id))

    async def fork_session(self, source_session_id: str, new_session_id: str) -> SessionInfo:
        """Copies a session to a new id, atomically
        (:class:`~turnstile_client.AlreadyExists` when the new id is taken)."""
        req = pb.ForkSessionRequest(
            source_session_id=source_session_id, new_session_id=new_session_id
        )
        return SessionInfo.from_pb(await self._unary("ForkSession", req))

    async def gc_sessions(self, *, dry_run: bool = False) -> list[str]:
        """Deletes (or with ``dry_run`` only lists) sessions idle past the broker's
        TTL; :class:`~turnstile_client.FailedPrecondition` when it has none."""
        reply = await self._unary("GcSessions", pb.GcRequest(dry_run=dry_run))
        return list(reply.sessions)

    async def export_session(self, session_id: str) -> AsyncIterator[bytes]:
        """The session's archive (a tar of its home, work and metadata), in chunks.
        Errors (unknown session, busy session, a failed export) are raised while
        iterating."""
        call = self._rpc().ExportSession(
            pb.SessionRef(session_id=session_id), metadata=self._metadata
        )
        try:
            while True:
                chunk = await call.read()
                if chunk is grpc.aio.EOF:
                    return
                yield chunk.data
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    async def export_session_to(self, session_id: str, path: str | os.PathLike[str]) -> None:
        """Writes the session's archive to ``path``; the file appears only when the
        whole archive is in (a failed export leaves nothing behind)."""
        dest = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=".turnstile-export-", dir=dest.parent or ".")
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in self.export_session(session_id):
                    await asyncio.to_thread(f.write, chunk)
                await asyncio.to_thread(f.flush)
                await asyncio.to_thread(os.fsync, f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            os.unlink(tmp)
            raise

    async def import_session(self, session_id: str, archive: ArchiveSource) -> SessionInfo:
        """Creates session ``session_id`` from an exported archive: bytes, a binary
        file, or an iterable or async iterable of bytes.
        :class:`~turnstile_client.AlreadyExists` when the id is taken,
        :class:`~turnstile_client.InvalidArgument` for an unsafe or corrupt
        archive (nothing is left behind),
        :class:`~turnstile_client.ResourceExhausted` over the broker's caps."""
        call = self._rpc().ImportSession(metadata=self._metadata)
        try:
            if await _wire.send(call, pb.ImportSessionRequest(session_id=session_id)):
                async for chunk in _archive_chunks(archive):
                    if not await _wire.send(call, pb.ImportSessionRequest(data=chunk)):
                        break  # Refused already: the status says why.
                else:
                    try:
                        await call.done_writing()
                    except Exception:  # noqa: BLE001 - the call is over: see its status
                        pass
        except grpc.aio.AioRpcError:
            pass  # The call ended early: its status is read below.
        except BaseException:
            call.cancel()
            raise
        try:
            reply = await call
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from None
        return SessionInfo.from_pb(reply)

    async def import_session_from(
        self, session_id: str, path: str | os.PathLike[str]
    ) -> SessionInfo:
        """:meth:`import_session` from an archive file."""
        with open(path, "rb") as f:
            return await self.import_session(session_id, f)

    async def _unary(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self._rpc(), method)(request, metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from None


async def _archive_chunks(source: ArchiveSource) -> AsyncIterator[bytes]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        view = memoryview(source).cast("B")
        for i in range(0, len(view), IMPORT_CHUNK):
            yield bytes(view[i : i + IMPORT_CHUNK])
    elif hasattr(source, "read"):
        reader: IO[bytes] = source  # type: ignore[assignment]
        while chunk := await asyncio.to_thread(reader.read, IMPORT_CHUNK):
            yield chunk
    elif isinstance(source, AsyncIterable):
        async for chunk in source:
            yield chunk
    else:
        for chunk in source:
            yield chunk


__all__ = ["PIPE", "ArchiveSource", "Broker"]
