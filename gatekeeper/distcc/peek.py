"""Finding out who a waiting job is, from its request bytes, without taking them.

The bytes are read with MSG_PEEK, so they stay in the socket buffer for the
backend. A distcc client sends its request head right after connecting, so
the first peek almost always has it. A partial head is looked at again only
when more bytes have arrived: on TCP the kernel says so (SO_RCVLOWAT set one
byte past what is there, so the socket turns readable on the next byte, a FIN
or an error, and nothing is polled); on a unix socket, whose poll ignores
SO_RCVLOWAT, after a short sleep that backs off. Each look resumes the parse
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

# A partial head on a unix socket is looked at again after this, doubling up
# to RETRY_MAX: rare (a distcc client writes its head at once), so a short
# first poll costs nothing, and the cap bounds what a slow client can cost
# (20 looks a second at most, each a FIONREAD when nothing new came).
RETRY = 0.005
RETRY_MAX = 0.05
# Most command lines fit in 4 KiB; peeking copies, so start small.
FIRST_PEEK = 4096
# A TCP wake-up with nothing new past this much unread head means a full
# receive buffer (see below); below it, a spurious wake-up, met with the
# unix path's backed-off sleep instead of a spin. 16 KiB: far under what
# Linux's default 128 KiB receive buffer holds unread (about 120 KB on
# loopback, measured), far over a real distcc head (a few hundred bytes to a
# few KiB: the client strips preprocessor options).
FULL_BUFFER_HINT = 16 * 1024


def woken_idle(woken: bool, data: bytes | None, reader: HeadReader) -> bool:
    """The kernel woke us and nothing new is there: do not wait on it again at once."""
    return woken and (data is None or len(data) == reader.seen)


def _peek(sock: trio.socket.SocketType, size: int) -> bytes | None:
    """What is in the buffer (up to `size`) now; None if nothing yet; b"" when
    the client closed before sending anything or the socket failed."""
    raw = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.fileno())
    try:
        return raw.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None
    except OSError:
        return b""
    finally:
        raw.detach()  # the fd stays the caller's


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
    partial head. Unbounded: callers bound it with a cancel scope."""
    reader = reader or HeadReader()
    size = FIRST_PEEK
    lowat = 0  # SO_RCVLOWAT as we set it (0: the kernel default, untouched)
    tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
    retry = RETRY
    woken = False  # by the kernel, on TCP: it says more came, or no more can
    try:
        while True:
            data = _peek(sock, size)
            if data is None or (data and len(data) == reader.seen):
                # Nothing new. A departed client's head can no longer grow.
                if peer_gone(sock, keep_half_closed=False):
                    return INCOMPLETE if reader.seen else NOT_DISTCC
                if woken and reader.seen >= FULL_BUFFER_HINT:
                    # TCP wakes a SO_RCVLOWAT waiter early when its receive
                    # buffer is full (tcp_epollin_ready: memory pressure, a
                    # closed window): the head is larger than the kernel will
                    # hold unread, so it can never be read whole.
                    return UNREADABLE
            elif not data:
                return NOT_DISTCC
            else:
                result = reader.feed(data)
                if result is not INCOMPLETE:
                    return result
                if len(data) == size and size < MAX_HEADER:
                    size = min(MAX_HEADER, size * 8)  # a long command line: look further
                    continue
            if tcp and not woken_idle(woken, data, reader):
                want = reader.seen + 1
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
