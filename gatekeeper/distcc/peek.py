"""Finding out who a waiting job is, from its request bytes, without taking them.

The bytes are read with MSG_PEEK, so they stay in the socket buffer for the
backend. A distcc client sends its request head right after connecting, so
the first peek almost always has it; a partial head is peeked again shortly
after, within a bound, and anything else is simply "unknown".
"""

from __future__ import annotations

import socket

import trio

from gatekeeper.distcc.request import (
    INCOMPLETE,
    MAX_HEADER,
    NOT_DISTCC,
    DistccJob,
    Unparsed,
    parse_request_head,
)

# A partial head (a client writing its command line in pieces) is looked at
# again this often: rare, so a short poll costs nothing.
RETRY = 0.005
# Most command lines fit in 4 KiB; peeking copies, so start small.
FIRST_PEEK = 4096


def peek_distcc_job_now(sock: trio.socket.SocketType) -> DistccJob | Unparsed:
    """One non-blocking look: the job, INCOMPLETE (nothing or part of a head
    there yet: wait with `peek_distcc_job`), or NOT_DISTCC (also for a client
    already gone). Costs no trip through the scheduler, which under a storm of
    small jobs is worth having: the head is nearly always there already."""
    raw = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.fileno())
    try:
        data = raw.recv(FIRST_PEEK, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return INCOMPLETE
    except OSError:
        return NOT_DISTCC
    finally:
        raw.detach()  # the fd stays the caller's
    if not data:
        return NOT_DISTCC
    result = parse_request_head(data)
    if result is INCOMPLETE and len(data) == FIRST_PEEK:
        return INCOMPLETE  # a long command line: the async peek looks further
    return result


async def peek_distcc_job(sock: trio.socket.SocketType) -> DistccJob | Unparsed:
    """Wait for and parse a distcc request head; NOT_DISTCC if the bytes are not
    one or the client closed. Unbounded: callers bound it with a cancel scope."""
    size = FIRST_PEEK
    while True:
        try:
            data = await sock.recv(size, socket.MSG_PEEK)
        except OSError:
            return NOT_DISTCC
        if not data:
            return NOT_DISTCC
        result = parse_request_head(data)
        if isinstance(result, DistccJob):
            return result
        if result is not INCOMPLETE:
            return result
        if len(data) == size and size < MAX_HEADER:
            size = min(MAX_HEADER, size * 8)  # a long command line: look further at once
        else:
            await trio.sleep(RETRY)  # the rest has not arrived yet
