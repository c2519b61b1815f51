"""Waking ``distccd --inetd`` the moment its compiler is done.

Why: distccd waits for its compiler in ``dcc_collect_child``: ``waitpid(WNOHANG)``
then ``select()`` on its client socket with a one-second timeout, to notice a
client that hangs up. A daemon-mode distccd is woken early by its SIGCHLD
handler; an inetd-started one has none, so every job lasts a whole number of
seconds (measured: a 20 ms compile takes 1.01 s), which throws away most of
what admission control wins on a farm of short compiles.

How: in relayed inetd mode the child's stdin/stdout is one end of an AF_UNIX
socketpair, non-blocking, and gatekeeper relays the client's bytes through the
other end (and keeps a copy of the child's end until the child exits: see
`hang_up`). Every `WAKE_INTERVAL` it sends one byte of out-of-band data
(``MSG_OOB``, Linux >= 5.15) on its end. On AF_UNIX an out-of-band byte makes
the socket readable, but an ordinary ``read()`` skips it: distccd's ``select()``
returns, its ``read()`` finds nothing (EAGAIN, which distccd takes as a spurious
wakeup), its ``waitpid`` sees the finished compiler, and it replies at once.

Why this cannot corrupt the stream: ordinary reads never return an
out-of-band byte, wherever it sits in the stream -- except that a second one
sent before the first was read turns the first into ordinary data (TCP's rule,
which AF_UNIX follows). So a poke is sent only when the peer has read
everything sent to it (``TIOCOUTQ`` == 0): the previous byte is gone.
And why the child's end must be non-blocking: a blocking ``read()`` that skips
the byte would wait for data that never comes.

One task serves every relayed job (`Waker.run`), ticking only while there is
one, so the cost is one wake-up per interval plus two syscalls per job.
"""

from __future__ import annotations

import contextlib
import functools
import socket
from collections.abc import Iterator

import trio

from gatekeeper.net.sockqueue import send_queue

# How often each waiting distccd is nudged: a finished compile is noticed
# within this (10 ms on average), instead of within distccd's second.
WAKE_INTERVAL = 0.02

def unread(sock: socket.socket) -> int:
    """Bytes we sent on `sock` that its peer has not read yet (kernel memory
    charged, for AF_UNIX: 0 exactly when the peer has read everything)."""
    return send_queue(sock.fileno())


def poke(sock: socket.socket) -> bool:
    """Nudge the reader of `sock`'s peer end with an out-of-band byte, if it has
    read everything so far. False once the peer is gone (stop poking)."""
    try:
        if unread(sock) == 0:
            sock.send(b"\0", socket.MSG_OOB)
    except BlockingIOError:
        pass  # its buffer is full: it is busy reading, no nudge needed
    except OSError:
        return False
    return True


def hang_up(sock: socket.socket, *, limit: int = 1 << 20) -> None:
    """Close gatekeeper's copy of the child's end once the child has exited.

    First read away what the child left unread -- normally just a nudge that
    came after its last read; else request bytes it never wanted -- because
    closing a unix socket with unread data gives its peer ECONNRESET instead
    of EOF, and the relay would take a delivered reply for a failed one. Then
    shut it down, so whatever the child left behind holding a copy cannot keep
    the job open: our end sees EOF after the last byte the child wrote."""
    try:
        sock.setblocking(False)
        while limit > 0:
            chunk = sock.recv(min(limit, 65536))
            if not chunk:
                break
            limit -= len(chunk)
    except OSError:
        pass  # EAGAIN: nothing left (the usual case); anything else: closing anyway
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


@functools.cache
def oob_available() -> bool:
    """Whether this kernel has AF_UNIX out-of-band data, and skips it on an
    ordinary read as `poke` relies on (checked once, on a private pair)."""
    try:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError:
        return False
    with ours, theirs:
        theirs.setblocking(False)
        try:
            ours.send(b"x", socket.MSG_OOB)
            ours.send(b"y")
            return theirs.recv(4) == b"y"
        except OSError:
            return False


class Waker:
    """Pokes every registered socket each `interval` (see the module docstring)."""

    def __init__(self, interval: float = WAKE_INTERVAL) -> None:
        self.interval = interval
        self._socks: dict[int, socket.socket] = {}
        self._some = trio.Event()
        self.pokes = 0
        """Nudges sent or attempted (for tests and curiosity)."""

    @contextlib.contextmanager
    def waking(self, sock: socket.socket) -> Iterator[None]:
        """Poke `sock` while the block runs (the caller owns and closes it)."""
        key = id(sock)
        self._socks[key] = sock
        self._some.set()
        try:
            yield
        finally:
            self._socks.pop(key, None)

    async def run(self) -> None:
        while True:
            if not self._socks:
                self._some = trio.Event()
                await self._some.wait()
            await trio.sleep(self.interval)
            for key, sock in list(self._socks.items()):
                self.pokes += 1
                if not poke(sock):
                    del self._socks[key]
