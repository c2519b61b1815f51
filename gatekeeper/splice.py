"""Copying bytes both ways between a client and its backend.

Each direction is its own loop with exactly one bounded chunk in flight: it
does not read again until the previous chunk has been sent, so a side that
stops reading stalls the other side's sender through TCP flow control instead
of growing a buffer here. An EOF travels on as a half-close (``send_eof``) in
that direction only; the other direction keeps flowing until it too ends.
A distcc client never half-closes, but protocols that send a request and then
``shutdown(SHUT_WR)`` must still get their reply (systemd-socket-proxyd
drops it).

If either direction fails (a reset, a broken pipe), the job is over: the other
direction is cancelled, and the other peer is reset too (`abort`), never
closed cleanly: a clean FIN after half a reply could pass for a complete
reply, while a reset cannot. distccd, for its part, kills the compiler when
its client vanishes.
"""

from __future__ import annotations

import contextlib
import enum
import socket
import struct
from dataclasses import dataclass, field

import trio

# 256 KiB: big enough that a multi-MB preprocessed source moves in a handful of
# syscalls, small enough that one per direction per job is nothing.
CHUNK = 256 * 1024


class Side(enum.Enum):
    CLIENT = "client"
    BACKEND = "backend"


@dataclass(slots=True)
class Transfer:
    """What a splice did; filled in as it goes, so it is right even if cancelled."""

    to_backend: int = 0
    to_client: int = 0
    failed: Side | None = None
    """Which side broke the job, if one did (None: both ended cleanly)."""
    error: str | None = None
    eofs: set[Side] = field(default_factory=set)


async def _copy(src: trio.SocketStream, dst: trio.SocketStream, src_side: Side,
                dst_side: Side, transfer: Transfer, to_backend: bool,
                cancel: trio.CancelScope) -> None:
    while True:
        try:
            data = await src.receive_some(CHUNK)
        except trio.BrokenResourceError as e:
            _fail(transfer, src_side, e, cancel)
            return
        if not data:
            transfer.eofs.add(src_side)
            try:
                await dst.send_eof()
            except trio.BrokenResourceError as e:
                _fail(transfer, dst_side, e, cancel)
            except trio.ClosedResourceError:
                pass
            return
        try:
            await dst.send_all(data)
        except trio.BrokenResourceError as e:
            _fail(transfer, dst_side, e, cancel)
            return
        if to_backend:
            transfer.to_backend += len(data)
        else:
            transfer.to_client += len(data)


def _fail(transfer: Transfer, side: Side, exc: BaseException, cancel: trio.CancelScope) -> None:
    if transfer.failed is None:
        transfer.failed = side
        cause = exc.__cause__ or exc
        transfer.error = f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
    cancel.cancel()


async def splice(client: trio.SocketStream, backend: trio.SocketStream,
                 transfer: Transfer | None = None) -> Transfer:
    """Copy both ways until both directions have ended or one has failed.

    Does not close either stream: the caller owns them (and closes them in
    its own ``finally``)."""
    if transfer is None:
        transfer = Transfer()
    async with trio.open_nursery() as nursery:
        scope = nursery.cancel_scope
        nursery.start_soon(_copy, client, backend, Side.CLIENT, Side.BACKEND, transfer, True, scope)
        nursery.start_soon(_copy, backend, client, Side.BACKEND, Side.CLIENT, transfer, False,
                           scope)
    return transfer


_LINGER_RESET = struct.pack("ii", 1, 0)


def abort(stream: trio.SocketStream) -> None:
    """Make the coming close send RST instead of FIN (SO_LINGER with zero timeout)."""
    # An OSError means it is already dead: closing it is all that is left anyway.
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
