"""Writing to a streaming call without losing the call's status.

grpcio's ``call.write()`` replaces the call's status with ``INTERNAL: Internal
error from Core`` when the write fails because the server has just ended the call
(grpc/grpc#36066). On a turn that is the normal end of a turn that still had
input under way (an agent that exits without reading all its stdin, a signal sent
as it ends): the events still buffered, its ``Exited`` included, would then be
lost behind a status that is not the broker's, and a refusal on import would read
as INTERNAL. So messages go through the call's own send operation, whose failure
only means "the call is over" and leaves the status as the broker sent it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from google.protobuf.message import Message


async def send(call: Any, message: Message, *, first: bool = False) -> bool:
    """Sends one message on a client-streaming or bidi call. False when the call
    is over (the server ended it, or it was cancelled): its status, read from the
    call, says how; it was not touched. A refused call's status is raised here.

    ``first``: the call's first message, sent as soon as grpcio has started the
    call (its headers queued) instead of after it saw them go out: one wake-up of
    the event loop less before the broker can act on it (a turn's ``Start``)."""
    if call.done():
        return False
    raw: Any = getattr(call, "_cython_call", None)
    usable = raw is not None and hasattr(raw, "send_serialized_message")
    if first and usable:
        # grpcio's task that starts the call was queued when the call was made:
        # one turn of the loop runs it. Should the call not be started yet after
        # all, Core refuses the send and the careful path below takes over.
        await asyncio.sleep(0)
        try:
            await raw.send_serialized_message(message.SerializeToString())
            return True
        except asyncio.CancelledError:
            if not call.cancelled():
                call.cancel()
            raise
        except Exception:  # noqa: BLE001 - not started yet, or over: see below
            pass
    # Raises the call's status if it ended before its headers went out.
    await call.wait_for_connection()
    if call.done():
        return False
    if not usable:
        # A grpcio without the operation: the public write, status caveat and all.
        try:
            await call.write(message)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return False
        return True
    try:
        await raw.send_serialized_message(message.SerializeToString())
    except asyncio.CancelledError:
        # The operation cannot be taken back: the call goes, as grpcio does it.
        if not call.cancelled():
            call.cancel()
        raise
    except Exception:  # noqa: BLE001 - grpcio's InternalError: the call is over
        return False
    return True
