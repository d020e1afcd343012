"""One running turn: its events as an async iterator, and its input (stdin, signals)."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterable, Awaitable, Callable, Generator, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Union

import grpc

from . import _wire
from ._proto import turnstile_pb2 as pb
from .errors import NotFound, StdinNotPiped, TurnGone, TurnLost, from_rpc_error
from .models import (
    Event,
    Exited,
    LlmRequest,
    Notice,
    Signal,
    Started,
    Stderr,
    Stdout,
    TurnResult,
)

if TYPE_CHECKING:
    from .broker import Broker

#: Largest stdin message sent to the broker (its default message cap is 4 MiB).
STDIN_CHUNK: Final = 256 * 1024

#: How many times a turn with a detach grace resumes a broken stream by itself.
RESUMES: Final = 5

#: Pause before the first resume; it doubles each time.
RESUME_BACKOFF_S: Final = 0.05

#: Why the agent's LLM connections are refused: this client does not relay them.
NO_LLM_RELAY: Final = (
    "no LLM upstream is configured for this turn (the Python client does not "
    "relay LLM connections: pass run_turn(..., llm_upstream=LlmUpstream(...)) for "
    "the broker to forward them)"
)


class _Pipe:
    """The type of :data:`PIPE`."""

    _instance: _Pipe | None = None

    def __new__(cls) -> _Pipe:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "PIPE"


#: ``stdin=PIPE``: the agent's stdin stays open; write it with
#: :meth:`Turn.write_stdin` and end it with :meth:`Turn.close_stdin`.
PIPE: Final = _Pipe()

#: What ``run_turn(stdin=...)`` takes: None (the agent's stdin is closed at once),
#: bytes (sent, then closed), an iterable or async iterable of bytes (sent as they
#: come, then closed), or PIPE.
StdinSource = Union[
    None,
    bytes,
    bytearray,
    memoryview,
    Iterable[bytes],
    AsyncIterable[bytes],
    _Pipe,
]

_TurnCall = Any  # grpc.aio.StreamStreamCall[pb.TurnRequest, pb.TurnEvent]


class Turn:
    """A running turn.

    Iterate it (``async for event in turn``) for its events: :class:`Started`
    first (unless the agent could not start), then :class:`Stdout` and
    :class:`Stderr` chunks in the order the agent wrote them, then exactly one
    :class:`Exited`, sent after every byte of output. A broken stream raises the
    :class:`~turnstile_client.TurnstileError` for its status (``TurnLost`` when it
    ended without ``Exited``).

    Leaving the turn (:meth:`abort`, the ``async with`` block, or cancelling the
    task that reads it) drops the stream, which the broker takes as the executor
    going away: it ends the turn and kills the agent, unless the turn has a detach
    grace (``run_turn(detach_grace_ms=...)``): then it runs on, and a stream that
    broke under this client is resumed from :attr:`last_seq` (up to
    :data:`RESUMES` times), input included.
    """

    def __init__(
        self,
        broker: Broker,
        call: _TurnCall,
        session_id: str,
        piped: bool,
        resumable: bool = False,
    ) -> None:
        self._broker = broker
        self._call = call
        self._piped = piped
        self._resumable = resumable
        self._attach_req: pb.Attach | None = None
        #: Set (and replaced) when the stream is replaced or over: input that
        #: could not be sent waits on it.
        self._stream_changed = asyncio.Event()
        #: The seq of the last event read (0 before any): what a new stream
        #: attaches after.
        self.last_seq = 0
        #: How many times this turn's stream was resumed.
        self.resumes = 0
        self._write_lock = asyncio.Lock()
        self._pending: collections.deque[Event] = collections.deque()
        self._stdin_closed = not piped
        self._ended = False
        self._aborted = False
        self._feeder: asyncio.Task[None] | None = None
        self._feeder_error: BaseException | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._first_read = asyncio.Event()
        #: The session this turn runs in.
        self.session_id = session_id
        #: The ``Started`` event once read (None if the agent never started).
        self.started: Started | None = None
        #: The ``Exited`` event once read.
        self.exited: Exited | None = None

    @property
    def turn_id(self) -> str | None:
        """The turn's id, once started."""
        return self.started.turn_id if self.started else None

    # -- events -----------------------------------------------------------------

    def __aiter__(self) -> Turn:
        return self

    async def __anext__(self) -> Event:
        if self._pending:
            return self._pending.popleft()
        while True:
            self._raise_feeder_error()
            if self._ended:
                raise StopAsyncIteration
            try:
                msg = await self._call.read()
            except grpc.aio.AioRpcError as e:
                if self._may_resume(e):
                    await self._resume()
                    continue
                self._end()
                raise from_rpc_error(e) from None
            except asyncio.CancelledError:
                if self._aborted and not _task_cancelling():
                    # The call was dropped here (abort, a failed stdin source),
                    # not this task cancelled.
                    self._end()
                    self._raise_feeder_error()
                    raise TurnGone("the turn was aborted by this client") from None
                raise
            if msg is grpc.aio.EOF:
                self._end()
                if self.exited is None:
                    raise TurnLost(self._lost_message())
                raise StopAsyncIteration
            event = self._event(msg)
            if event is not None:
                return event

    def _lost_message(self) -> str:
        if self.started is None:
            return "the turn's stream ended before the turn started"
        return (
            f"the turn's stream ended without Exited: turn {self.started.turn_id} "
            "had started, its outcome is unknown"
        )

    def _end(self) -> None:
        self._ended = True
        self._stream_changed.set()

    def _may_resume(self, err: grpc.aio.AioRpcError) -> bool:
        """Whether a stream that failed with ``err`` is resumed: a broken
        transport, on a turn with a detach grace that has started (or was
        attached to), within the budget."""
        return (
            self._resumable
            and not self._aborted
            and self.exited is None
            and (self.started is not None or self._attach_req is not None)
            and err.code() == grpc.StatusCode.UNAVAILABLE
            and self.resumes < RESUMES
        )

    async def _resume(self) -> None:
        """Replaces the stream with a new one attached after :attr:`last_seq`."""
        self.resumes += 1
        await asyncio.sleep(RESUME_BACKOFF_S * 2 ** (self.resumes - 1))
        attach = pb.Attach(session_id=self.session_id, after_seq=self.last_seq)
        if self.started is not None:
            attach.turn_id = self.started.turn_id
        elif self._attach_req is not None:
            attach.turn_id = self._attach_req.turn_id
            attach.turn_key = self._attach_req.turn_key
        async with self._write_lock:
            old, self._call = self._call, self._broker._rpc().Turn(metadata=self._broker._metadata)
            old.cancel()
            changed, self._stream_changed = self._stream_changed, asyncio.Event()
            try:
                # False or a status: the read says how the new stream failed.
                await _wire.send(self._call, pb.TurnRequest(attach=attach), first=True)
            except grpc.aio.AioRpcError:
                pass
        changed.set()

    def _event(self, msg: pb.TurnEvent) -> Event | None:
        if msg.seq:
            self.last_seq = msg.seq
        kind = msg.WhichOneof("kind")
        if kind == "stdout":
            return Stdout(msg.stdout)
        if kind == "stderr":
            return Stderr(msg.stderr)
        if kind == "started":
            self.started = Started.from_pb(msg.started)
            return self.started
        if kind == "exited":
            self.exited = Exited.from_pb(msg.exited)
            return self.exited
        if kind == "notice":
            return Notice(msg.notice.message)
        if kind == "llm_request":
            return LlmRequest.from_pb(msg.llm_request)
        if kind == "llm":
            if msg.llm.WhichOneof("kind") == "open":
                # Refused at once, as the Rust client does without a forwarder, so
                # the agent's request fails instead of hanging. Sent from a task:
                # reading must never wait for the stream's write side.
                reset = pb.TurnRequest(
                    llm=pb.LlmFrame(conn=msg.llm.conn, reset=pb.LlmReset(reason=NO_LLM_RELAY))
                )
                self._spawn(self._send_quietly(reset))
            return None
        return None

    async def _first_event(self) -> None:
        """Reads the first event (``Started``, or ``Exited`` when the agent never
        ran); a refusal raises here. Called by ``run_turn`` before it returns."""
        try:
            event = await self.__anext__()
        except StopAsyncIteration:
            raise TurnLost(self._lost_message()) from None
        self._pending.append(event)
        self._first_read.set()

    async def collect(self) -> TurnResult:
        """Reads the turn to its end; returns its whole stdout, stderr and ``Exited``."""
        out: list[bytes] = []
        err: list[bytes] = []
        async for event in self:
            if isinstance(event, Stdout):
                out.append(event.data)
            elif isinstance(event, Stderr):
                err.append(event.data)
        if self.exited is None:
            raise TurnLost(self._lost_message())
        return TurnResult(self.started, self.exited, b"".join(out), b"".join(err))

    async def wait(self) -> Exited:
        """Reads the turn to its end, dropping its output; returns its ``Exited``."""
        async for _ in self:
            pass
        if self.exited is None:
            raise TurnLost(self._lost_message())
        return self.exited

    # -- input ------------------------------------------------------------------

    async def _send(self, req: pb.TurnRequest, *, first: bool = False) -> None:
        while True:
            async with self._write_lock:
                if self._aborted or self.exited is not None or self._ended:
                    raise TurnGone("the turn is over")
                changed = self._stream_changed
                try:
                    sent = await _wire.send(self._call, req, first=first)
                except grpc.aio.AioRpcError:
                    sent = False  # The reader raises the status.
                if sent:
                    return
            if first or not self._resumable:
                raise TurnGone("the turn is over")
            # The stream broke: the reader resumes it (or ends the turn), and
            # this input goes to the new stream.
            await changed.wait()

    async def _send_quietly(self, req: pb.TurnRequest) -> None:
        try:
            await self._send(req)
        except TurnGone:
            pass

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def write_stdin(self, data: bytes | bytearray | memoryview) -> None:
        """Sends bytes to the agent's stdin (``stdin=PIPE`` only). Waits while the
        broker holds as much as it buffers, i.e. while the agent does not read."""
        if not self._piped:
            raise StdinNotPiped("this turn's stdin is not PIPE")
        if self._stdin_closed:
            raise TurnGone("stdin is closed")
        await self._write_stdin(data)

    async def _write_stdin(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        for i in range(0, len(view), STDIN_CHUNK):
            await self._send(pb.TurnRequest(stdin=bytes(view[i : i + STDIN_CHUNK])))

    async def close_stdin(self) -> None:
        """Closes the agent's stdin (``stdin=PIPE`` only); a second call does nothing."""
        if not self._piped:
            raise StdinNotPiped("this turn's stdin is not PIPE")
        if self._stdin_closed:
            return
        self._stdin_closed = True
        await self._send(pb.TurnRequest(stdin_eof=pb.StdinEof()))

    async def signal(self, signal: Signal) -> None:
        """Delivers a signal to the agent (SIGINT or SIGTERM); the turn goes on if
        the agent survives it."""
        await self._send(pb.TurnRequest(signal=pb.SignalRequest(signal=signal.name)))

    async def interrupt(self) -> None:
        """SIGINT to the agent (what Ctrl-C does to ``turnstile run``)."""
        await self.signal(Signal.INTERRUPT)

    async def terminate(self) -> None:
        """SIGTERM to the agent."""
        await self.signal(Signal.TERMINATE)

    async def cancel(self) -> None:
        """Ends the turn through the broker: SIGTERM to the agent, a grace period,
        then SIGKILL of everything. Keep reading: the last event is an
        ``Exited`` with reason ``CANCELLED``. Does nothing once the turn is over."""
        if self.exited is not None or self._ended:
            return
        try:
            await self._broker.cancel_turn(self.session_id)
        except NotFound:
            pass  # The turn ended meanwhile.

    def abort(self) -> None:
        """Drops the stream: the broker ends the turn and kills the agent; no
        ``Exited`` comes. Iterating afterwards raises ``TurnGone``."""
        if self._ended or self._aborted:
            return
        self._aborted = True
        self._call.cancel()
        self._stop_tasks()

    async def aclose(self) -> None:
        """Leaves the turn: aborts it unless it is over."""
        if self.exited is None:
            self.abort()
        self._stop_tasks()

    def _stop_tasks(self) -> None:
        if self._feeder is not None and not self._feeder.done():
            self._feeder.cancel()
        for task in list(self._background):
            task.cancel()

    async def __aenter__(self) -> Turn:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- the turn's opening input: Start, then run_turn's stdin=... ----------------

    def _open(self, start: pb.Start, stdin: StdinSource) -> None:
        """Sends ``Start``, then feeds (or closes) stdin, from a task of its own:
        the caller reads the first event meanwhile, and an agent that writes
        before it reads never stalls behind its own stdin."""
        self._feeder = asyncio.ensure_future(self._send_input(start, stdin))

    async def _send_input(self, start: pb.Start, source: StdinSource) -> None:
        try:
            await self._send(pb.TurnRequest(start=start), first=True)
        except TurnGone:
            return  # Refused: the reader raises the status.
        if source is PIPE:
            return
        # Stdin waits for the first event: the agent reads none of it before it
        # runs, and this process stays quiet while the broker spawns it.
        await self._first_read.wait()
        try:
            if source is None:
                pass
            elif isinstance(source, (bytes, bytearray, memoryview)):
                await self._write_stdin(source)
            elif isinstance(source, AsyncIterable):
                async for chunk in source:
                    await self._write_stdin(chunk)
            elif isinstance(source, Iterable):
                for chunk in source:
                    await self._write_stdin(chunk)
            await self._send(pb.TurnRequest(stdin_eof=pb.StdinEof()))
        except TurnGone:
            pass  # The turn ended before taking all of stdin, as agents may.
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - handed to the reader
            # A stdin source that fails leaves the agent with partial input:
            # the turn is ended, and the reader gets the error.
            self._feeder_error = e
            self.abort()

    async def _attach(self, attach: pb.Attach) -> None:
        """Sends ``Attach`` as the stream's first message (before any input); a
        refusal is raised by the first read."""
        self._attach_req = attach
        try:
            await self._send(pb.TurnRequest(attach=attach), first=True)
        except TurnGone:
            pass

    def _raise_feeder_error(self) -> None:
        err, self._feeder_error = self._feeder_error, None
        if err is not None:
            self._end()
            raise err


def _task_cancelling() -> bool:
    """True when the current task is being cancelled (Python 3.11+ can tell)."""
    task = asyncio.current_task()
    cancelling: Callable[[], int] | None = getattr(task, "cancelling", None)
    return bool(cancelling()) if cancelling is not None else False


class TurnStart:
    """What :meth:`Broker.run_turn` returns: await it for the :class:`Turn`, or use
    it as ``async with broker.run_turn(...) as turn:``, which leaves (aborts) the
    turn if the block ends before it did."""

    def __init__(self, begin: Callable[[], Awaitable[Turn]]) -> None:
        self._begin = begin
        self._turn: Turn | None = None
        self._used = False

    async def _start(self) -> Turn:
        if self._used:
            raise RuntimeError("a run_turn(...) result starts one turn: call run_turn again")
        self._used = True
        self._turn = await self._begin()
        return self._turn

    def __await__(self) -> Generator[Any, None, Turn]:
        return self._start().__await__()

    async def __aenter__(self) -> Turn:
        return await self._start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._turn is not None:
            await self._turn.aclose()
