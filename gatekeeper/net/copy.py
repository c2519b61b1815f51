"""Copying bytes both ways between a client and its backend.

Each direction is its own loop with exactly one bounded chunk in flight: it
does not read again until the previous chunk has been sent, so a side that
stops reading stalls the other side's sender through TCP flow control instead
of growing a buffer here. An EOF travels on as a half-close (``send_eof``) in
that direction only; the other direction keeps flowing until it too ends.
A distcc client never half-closes, but protocols that send a request and then
``shutdown(SHUT_WR)`` must still get their reply (systemd-socket-proxyd
drops it).

This module is the portable path: a task per direction reads into a buffer
and sends it. On Linux the server uses `relay` instead, which moves the bytes
socket -> pipe -> socket with os.splice (zero copy) for every job on one epoll
set. Both behave the same for EOF, errors, idleness and cancellation, share
`Transfer`, `Side` and `abort`, and the same tests run against both.

If either direction fails (a reset, a broken pipe), the job is over: the other
direction is cancelled, and the other peer is reset too (`abort`), never
closed cleanly: a clean FIN after half a reply could pass for a complete
reply, while a reset cannot. distccd, for its part, kills the compiler when
its client vanishes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import socket
import struct
from dataclasses import dataclass, field

import trio

from gatekeeper.outcome import Side

# 256 KiB: big enough that a multi-MB preprocessed source moves in a handful of
# syscalls, small enough that one per direction per job is nothing.
CHUNK = 256 * 1024

# The zero-copy path's pipe: 1 MiB moves a large preprocessed source in a few
# splices. F_SETPIPE_SZ may refuse it (fs.pipe-max-size, or a user over
# pipe-user-pages-soft); the kernel's default 64 KiB pipe still works.
PIPE_SIZE = 1024 * 1024
ZERO_COPY_AVAILABLE = (hasattr(os, "splice") and hasattr(fcntl, "F_SETPIPE_SZ")
                       and hasattr(select, "epoll"))


@dataclass(slots=True)
class Transfer:
    """What a job's transfer did; filled in as it goes, so it is right even if cancelled."""

    to_backend: int = 0
    to_client: int = 0
    failed: Side | None = None
    """Which side broke the job, if one did (None: both ended cleanly)."""
    error: str | None = None
    eofs: list[Side] = field(default_factory=list)
    """The sides that ended their direction cleanly, in the order they did."""
    last_activity: float = 0.0
    """trio time of the last chunk moved either way (for the idle timeout)."""
    idle: bool = False
    """The job was cut off for moving no byte for `idle_timeout` seconds."""
    reply_head: bytes = b""
    """The first bytes of the reply, when the transfer was asked to keep them."""


async def _forward_prefix(src: trio.SocketStream, dst: trio.SocketStream, want: int,
                          transfer: Transfer, cancel: trio.CancelScope) -> bool:
    """Move the first `want` bytes of the reply through Python, keeping a copy in
    ``transfer.reply_head`` (distccd's status, see `distcc_reply`). Stops early at
    EOF and leaves it for the copy loop to see again. False if a side failed."""
    while len(transfer.reply_head) < want:
        try:
            data = await src.receive_some(want - len(transfer.reply_head))
        except trio.BrokenResourceError as e:
            _fail(transfer, Side.BACKEND, e, cancel)
            return False
        if not data:
            return True
        try:
            await dst.send_all(data)
        except trio.BrokenResourceError as e:
            _fail(transfer, Side.CLIENT, e, cancel)
            return False
        transfer.reply_head += data
        transfer.to_client += len(data)
        transfer.last_activity = trio.current_time()
    return True


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
            transfer.eofs.append(src_side)
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
        transfer.last_activity = trio.current_time()


def _fail(transfer: Transfer, side: Side, exc: BaseException, cancel: trio.CancelScope) -> None:
    if transfer.failed is None:
        transfer.failed = side
        transfer.error = describe_error(exc)
    cancel.cancel()


def describe_error(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    return f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__


async def copy_both_ways(client: trio.SocketStream, backend: trio.SocketStream,
                 transfer: Transfer | None = None, *,
                 idle_timeout: float | None = None, reply_prefix: int = 0) -> Transfer:
    """Copy both ways until both directions have ended or one has failed, or
    (with `idle_timeout`) until no byte has moved either way for that long.
    With `reply_prefix`, the first that many bytes from the backend are also
    kept in ``transfer.reply_head``.

    Does not close either stream: the caller owns them (and closes them in
    its own ``finally``)."""
    if transfer is None:
        transfer = Transfer()
    transfer.last_activity = trio.current_time()
    async with trio.open_nursery() as outer:
        scope = outer.cancel_scope
        if idle_timeout is not None:
            outer.start_soon(_idle_watch, transfer, idle_timeout, scope)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_copy, client, backend, Side.CLIENT, Side.BACKEND, transfer,
                               True, scope)
            nursery.start_soon(_reply, backend, client, transfer, reply_prefix, scope)
        scope.cancel()  # both directions are done: stop the idle watch
    return transfer


async def _reply(backend: trio.SocketStream, client: trio.SocketStream,
                 transfer: Transfer, prefix: int, cancel: trio.CancelScope) -> None:
    if prefix and not await _forward_prefix(backend, client, prefix, transfer, cancel):
        return
    await _copy(backend, client, Side.BACKEND, Side.CLIENT, transfer, False, cancel)


async def _idle_watch(transfer: Transfer, idle_for: float, cancel: trio.CancelScope) -> None:
    """One timer per running job, re-armed from the last activity (not per chunk)."""
    while True:
        deadline = transfer.last_activity + idle_for
        if trio.current_time() >= deadline:
            transfer.idle = True
            cancel.cancel()
            return
        await trio.sleep_until(deadline)


# Errors that mean "this peer is gone", as trio's streams translate them.
_BROKEN = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


def means_peer_gone(e: OSError) -> bool:
    """Whether an error from a socket call means the peer is gone (as opposed to
    a bug here)."""
    return isinstance(e, _BROKEN) or e.errno in (errno.ENOTCONN, errno.EBADF)


_LINGER_RESET = struct.pack("ii", 1, 0)


def abort(stream: trio.SocketStream) -> None:
    """Make the coming close send RST instead of FIN (SO_LINGER with zero timeout)."""
    # An OSError means it is already dead: closing it is all that is left anyway.
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
