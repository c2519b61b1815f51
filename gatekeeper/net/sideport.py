"""The accept loop of the side ports (`--metrics`, `--agent`): bounded in
every way a client could stretch it (issue 16).

- Who: a peer outside the port's allow list (`--metrics-allow`, default
  loopback; `--agent-allow`, default `--allow`'s list) is closed at once.
- How many: at most `cap` connections per port are open at a time (being
  served or waiting for a place); one more is closed at once, so a hundred
  idle connections cannot queue a scraper behind them for minutes, and the
  port's fds are a fixed part of the fd budget (`net.listen.FdPlan`).
- How long: one deadline per connection, counted from its accept, covers the
  wait for a place, the request and the answer.
- EMFILE and its kin: one warning line, a short pause, never a traceback.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable

import trio

from gatekeeper.net.allow import AllowList
from gatekeeper.net.listen import (
    ACCEPT_IGNORABLE,
    ACCEPT_OVERLOAD,
    ACCEPT_RETRY,
    SIDE_CONNECTIONS,
)
from gatekeeper.observe.logbudget import LogBudget

log = logging.getLogger("gatekeeper")

# From accept to close. A scrape on loopback takes a millisecond; Prometheus's
# default scrape timeout is 10 s, keepalived's MISC_CHECK's 5 s (hence not 10).
SIDE_DEADLINE = 5.0


class SidePort:
    def __init__(self, name: str, handle: Callable[[trio.SocketStream], Awaitable[None]],
                 allow: AllowList | None, *, cap: int = SIDE_CONNECTIONS,
                 deadline: float = SIDE_DEADLINE) -> None:
        self.name, self.handle, self.allow = name, handle, allow
        self.cap, self.deadline = cap, deadline
        self.open = 0
        self.refused = 0
        """Connections closed at once: over the cap or not allowed."""
        self._overload_lines = LogBudget(burst=1, period=10.0)

    async def serve(self, listener: trio.SocketListener) -> None:
        """Accept until cancelled; the listener is closed on the way out (it
        is this loop's, as `trio.serve_listeners` owns its listeners)."""
        raw = listener.socket
        async with listener, trio.open_nursery() as nursery:
            while True:
                try:
                    sock, peer = await raw.accept()
                except OSError as e:
                    if e.errno in ACCEPT_IGNORABLE:
                        continue
                    if e.errno not in ACCEPT_OVERLOAD:
                        raise
                    if self._overload_lines.admit(trio.current_time()) is not None:
                        log.warning("%s port: accept: %s; retrying in %gs", self.name,
                                    os.strerror(e.errno or 0), ACCEPT_RETRY)
                    await trio.sleep(ACCEPT_RETRY)
                    continue
                if self.open >= self.cap or not self._permitted(sock, peer):
                    self.refused += 1
                    sock.close()  # no checkpoint: the next accept goes on at once
                    continue
                self.open += 1
                nursery.start_soon(self._one, trio.SocketStream(sock), trio.current_time())

    def _permitted(self, sock: trio.socket.SocketType, peer: object) -> bool:
        if self.allow is None or sock.family == socket.AF_UNIX:
            return True
        return isinstance(peer, tuple) and self.allow.permits(str(peer[0]))

    async def _one(self, stream: trio.SocketStream, accepted: float) -> None:
        try:
            with trio.move_on_at(accepted + self.deadline):
                await self.handle(stream)
        finally:
            self.open -= 1
            await trio.aclose_forcefully(stream)
