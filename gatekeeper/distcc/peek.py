"""Finding out who a waiting job is, from its request bytes, without taking them.

The bytes are read with MSG_PEEK, so they stay in the socket buffer for the
backend. A distcc client sends its request head right after connecting, so
the first peek almost always has it. A partial head is looked at again only
when more bytes have arrived: on TCP the kernel says so (SO_RCVLOWAT set one
byte past what is there, so the socket turns readable on the next byte, a FIN
or an error, and nothing is polled); a head longer than a queued connection's
narrow window (net/window.py) widens it about as far as the head needs; on a
unix socket, whose poll ignores
SO_RCVLOWAT, and for heads past 4 KiB (LOWAT_SHARE), after a short
sleep that backs off, and FIONREAD tells whether anything came before any
byte is copied. Each look resumes the parse
where the last one stopped (`HeadReader`), and a client that has left (FIN or
reset) ends the wait at once: its head can no longer grow.
"""

from __future__ import annotations

import contextlib
import socket

import trio

from gatekeeper.distcc.request import (
    INCOMPLETE,
    MAX_HEADER,
    NOT_DISTCC,
    UNREADABLE,
    DistccJob,
    HeadReader,
    Unparsed,
)
from gatekeeper.net.liveness import peer_gone
from gatekeeper.net.sockqueue import peek_now, receive_memory, receive_queue
from gatekeeper.net.window import WIDEN_MAX, is_narrow, widen

# A partial head on a unix socket is looked at again after this, doubling up
# to RETRY_MAX: rare (a distcc client writes its head at once), so a short
# first poll costs nothing, and the cap bounds what a slow client can cost
# (20 looks a second at most, each a FIONREAD when nothing new came).
RETRY = 0.005
RETRY_MAX = 0.05
# SO_RCVLOWAT is used only up to 1/32 of the receive buffer (4 KiB at Linux's
# default 128 KiB; real heads are smaller): when the buffer it implies is
# larger than the socket's (tcp_set_rcvlowat: the value scaled by the
# measured payload-to-truesize ratio), Linux grows the buffer but clamps the
# receive window to the value, and a head arriving in pieces stalls for good
# (seen: 8 KB pieces of a 49 KB head stopped at 40,000 bytes with 1/4).
LOWAT_SHARE = 32
# Most command lines fit in 4 KiB; peeking copies, so start small.
FIRST_PEEK = 4096
# A receive buffer with less than this fraction free takes no more: the
# window it advertises is below a segment. Measured on loopback: a 200 KB head
# stalls with 1,856 of 131,072 bytes free; a 90 KB one still has 40,240.
FULL_FRACTION = 8


def _rcvbuf(sock: trio.socket.SocketType) -> int:
    try:
        return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
    except OSError:
        return 0


def _buffer_full(sock: trio.socket.SocketType) -> bool:
    try:
        allocated, size = receive_memory(sock)  # type: ignore[arg-type]
    except OSError:
        return False
    return size - allocated < size // FULL_FRACTION


def _peek(sock: trio.socket.SocketType, size: int) -> bytes | None:
    """What is in the buffer (up to `size`) now; None if nothing yet; b"" when
    the client closed before sending anything or the socket failed."""
    return peek_now(sock, size)  # type: ignore[arg-type]


def peek_distcc_job_now(sock: trio.socket.SocketType,
                        reader: HeadReader | None = None) -> DistccJob | Unparsed:
    """One non-blocking look: the job, INCOMPLETE (nothing or part of a head
    there yet: wait with `peek_distcc_job`), NOT_DISTCC (also for a client
    already gone) or UNREADABLE. Costs no trip through the scheduler, which
    under a storm of small jobs is worth having: the head is nearly always
    there already."""
    data = _peek(sock, FIRST_PEEK)
    if data is None:
        return INCOMPLETE
    if not data:
        return NOT_DISTCC
    return (reader or HeadReader()).feed(data)


async def peek_distcc_job(sock: trio.socket.SocketType,
                          reader: HeadReader | None = None) -> DistccJob | Unparsed:
    """Wait for and parse a distcc request head. NOT_DISTCC if the client
    closed before sending a byte; INCOMPLETE if it left (FIN or reset) with a
    partial head; UNREADABLE if it outgrew what the kernel will hold unread.
    Unbounded: callers bound it with a cancel scope."""
    reader = reader or HeadReader()
    size = FIRST_PEEK
    lowat = 0  # SO_RCVLOWAT as we set it (0: the kernel default, untouched)
    tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
    retry = RETRY
    woken = False  # the kernel said "readable" last round
    # A narrow queued window is widened for a long head, step by step.
    narrow = tcp and is_narrow(sock)  # type: ignore[arg-type]
    window = _rcvbuf(sock) // 2 if narrow else 0
    fd = sock.fileno()
    try:
        while True:
            # Has anything come since the last look? FIONREAD costs no copy.
            try:
                fresh = not reader.seen or receive_queue(fd) > reader.seen
            except OSError:
                return INCOMPLETE if reader.seen else NOT_DISTCC
            if fresh:
                data = _peek(sock, size)
                if data is None:
                    fresh = False  # nothing at all yet
                elif not data:
                    return NOT_DISTCC
                else:
                    result = reader.feed(data)
                    if result is not INCOMPLETE:
                        return result
                    if len(data) == size and size < MAX_HEADER:
                        size = min(MAX_HEADER, size * 8)  # a long command line: look further
                        continue
            if not fresh:
                # A departed client's head can no longer grow, nor one that
                # fills the receive buffer (the client cannot send the rest).
                if peer_gone(sock, keep_half_closed=False):
                    # The last bytes may have come with the FIN, after the
                    # look above: one more look decides, never the FIN alone.
                    last = _peek(sock, MAX_HEADER)
                    if last and len(last) > reader.seen:
                        return reader.feed(last)
                    return INCOMPLETE if reader.seen else NOT_DISTCC
                if narrow and window < WIDEN_MAX and (
                        reader.seen * 2 >= window or _buffer_full(sock)):
                    # A partial head fills at least half a narrow window
                    # (net/window.py; measured: 1,448 of 2,048, 4,096-6,362 of
                    # 4,096): it may be closed. Let in about what the head
                    # needs (four times what came, doubling per stall), never
                    # the request; then wait as for any byte. (A short head
                    # whose rest is late is left alone: the window is open.)
                    window = min(WIDEN_MAX, max(2 * window, 4 * reader.seen))
                    widen(sock, window)  # type: ignore[arg-type]
                    # A look that copies a byte makes the kernel tell the
                    # client at once (tcp_cleanup_rbuf) instead of at its next
                    # window probe.
                    _peek(sock, 1)
                    retry = RETRY  # the next bytes come at once
                elif tcp and reader.seen and _buffer_full(sock):
                    return UNREADABLE  # (a narrow one: only once widened all it may)
            want = reader.seen + 1
            if tcp and not (woken and not fresh) and want * LOWAT_SHARE <= _rcvbuf(sock):
                # Sleep in the kernel until a byte more than we have came (or a
                # FIN, an error).
                if want != lowat:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
                    lowat = want
                await trio.lowlevel.wait_readable(sock)
                woken = True
            else:
                await trio.sleep(retry)
                retry = min(RETRY_MAX, retry * 2)
                woken = False
    finally:
        if lowat:
            # Back to the default (the data path waits for single bytes); a
            # closed or failed socket has nothing waiting on it any more.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
