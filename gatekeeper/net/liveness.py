"""Noticing that a queued client has gone away.

A held distcc client has already written its request, so its socket is
readable the whole time it waits: readability says nothing. What does is the
peer's FIN or RST, which Linux reports as EPOLLRDHUP / EPOLLHUP / EPOLLERR. One
shared epoll set watches every queued socket for exactly those (never EPOLLIN),
and one task waits on that set's fd through trio; so watching costs no task and
no extra fd per client, and a departure is seen within one loop iteration.

By default a FIN counts as gone: distcc never half-closes before it has its
reply. With ``keep_half_closed`` only a reset or a full close counts, for
protocols that send a request, half-close, and then wait for the answer.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Callable

import trio

_HAS_EPOLL = hasattr(select, "epoll")


class _Watching:
    """The context manager `ClientWatch.watching` returns: a plain class, not
    @contextmanager, because one lives per queued client (10,000 may wait) and
    a suspended generator costs five times its few bytes."""

    __slots__ = ("_fd", "_on_gone", "_watch")

    def __init__(self, watch: ClientWatch, fd: int, on_gone: Callable[[], None]) -> None:
        self._watch, self._fd, self._on_gone = watch, fd, on_gone

    def __enter__(self) -> None:
        self._watch._start(self._fd, self._on_gone)

    def __exit__(self, *exc_info: object) -> None:
        self._watch._stop(self._fd)
_RDHUP: int = getattr(select, "EPOLLRDHUP", 0x2000)
_POLLRDHUP: int = getattr(select, "POLLRDHUP", 0x2000)


class ClientWatch:
    """Calls a callback once when a watched socket's peer closes or resets."""

    def __init__(self, *, keep_half_closed: bool = False) -> None:
        self.keep_half_closed = keep_half_closed
        self._epoll = select.epoll() if _HAS_EPOLL else None
        self._callbacks: dict[int, Callable[[], None]] = {}
        # EPOLLHUP and EPOLLERR are always reported, whatever the mask says.
        self._mask = 0 if keep_half_closed else _RDHUP

    def watching(self, sock: socket.socket | trio.socket.SocketType,
                 on_gone: Callable[[], None]) -> _Watching:
        """``with watch.watching(sock, on_gone):`` watch `sock` for the duration
        of the block. Must be left before the socket is closed (epoll forgets
        closed fds only when no dup remains)."""
        return _Watching(self, sock.fileno(), on_gone)

    def fds(self) -> list[int]:
        """The sockets watched now: every queued client's."""
        return list(self._callbacks)

    def _start(self, fd: int, on_gone: Callable[[], None]) -> None:
        if self._epoll is None:
            return  # no epoll: departure is only noticed at admission time
        self._epoll.register(fd, self._mask)
        self._callbacks[fd] = on_gone

    def _stop(self, fd: int) -> None:
        # `run` may already have dropped it when it reported the departure.
        if self._callbacks.pop(fd, None) is not None and self._epoll is not None:
            self._epoll.unregister(fd)

    async def run(self) -> None:
        """Dispatch departures forever. Runs in the server's nursery."""
        if self._epoll is None:
            await trio.sleep_forever()
            return
        epoll = self._epoll
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                for fd, _events in epoll.poll(0):
                    callback = self._callbacks.pop(fd, None)
                    if callback is not None:
                        # Level-triggered: stop watching at once, or the set stays
                        # readable until the owner gets round to leaving `watching`.
                        epoll.unregister(fd)
                        callback()
        finally:
            epoll.close()
            self._epoll = None

    def is_gone(self, sock: socket.socket | trio.socket.SocketType) -> bool:
        """Check right now, without blocking, whether the peer has left."""
        return peer_gone(sock, keep_half_closed=self.keep_half_closed)


def peer_gone(sock: socket.socket | trio.socket.SocketType, *, keep_half_closed: bool) -> bool:
    """Non-blocking check for a peer's FIN (unless `keep_half_closed`) or RST."""
    poller = select.poll()
    mask = 0 if keep_half_closed else _POLLRDHUP
    poller.register(sock.fileno(), mask)
    for _fd, events in poller.poll(0):
        if events & (select.POLLHUP | select.POLLERR | select.POLLNVAL | mask):
            return True
    return False
