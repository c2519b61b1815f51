"""Taking a PROXY header off a trusted director's connection (the I/O shell
of `proxy_header`).

The header is looked at with MSG_PEEK until it is whole (a director writes it
in one segment with, or before, the client's first bytes, so the first look
nearly always has it), then exactly its bytes are received: what follows, the
client's request, stays in the socket for the usual head reading. Bounded by
a deadline; a director that sends no header, or a broken one, gets the
connection closed (`read_proxy_header` says why).
"""

from __future__ import annotations

import socket

import trio

from gatekeeper.net.proxy_header import INCOMPLETE, MAX_HEADER, Malformed, ProxyHeader, parse
from gatekeeper.net.sockqueue import peek_now

# A director writes the header at once: a look finding only part of it waits
# this long, doubling up to RETRY_MAX (as the request head's reader does on a
# unix socket; distcc/peek.py).
RETRY = 0.005
RETRY_MAX = 0.05


def _consume(sock: trio.socket.SocketType, length: int) -> bool:
    """Receive exactly `length` bytes already in the buffer (peeked)."""
    raw = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.fileno())
    try:
        left = length
        while left:
            chunk = raw.recv(left, socket.MSG_DONTWAIT)
            if not chunk:
                return False
            left -= len(chunk)
        return True
    except OSError:
        return False
    finally:
        raw.detach()


async def read_proxy_header(sock: trio.socket.SocketType) -> ProxyHeader | Malformed:
    """The connection's PROXY header, taken off the stream; Malformed (why)
    if it is broken or the director left first. Unbounded: callers bound it
    with a cancel scope."""
    retry = RETRY
    seen = -1
    while True:
        data = peek_now(sock, MAX_HEADER)  # type: ignore[arg-type]
        if data == b"":
            return Malformed("the director closed before a whole PROXY header")
        if data is not None and len(data) > seen:
            seen = len(data)
            result = parse(data)
            if isinstance(result, ProxyHeader):
                if not _consume(sock, result.length):
                    return Malformed("the PROXY header could not be taken off the stream")
                return result
            if isinstance(result, Malformed):
                return result
            assert result is INCOMPLETE
        if data is None:
            await trio.lowlevel.wait_readable(sock)
        else:
            await trio.sleep(retry)
            retry = min(RETRY_MAX, retry * 2)
