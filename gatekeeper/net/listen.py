"""The client listeners: opening them, accepting, and the one fd budget.

Accepting stops while the connection budget is spent, and the kernel's listen
backlog holds the rest (as s6-tcpserverd does), so the fds that running jobs
need for their backend connection and pipes are never taken by waiting
clients. The budget and the open-files warning at startup come from one
reckoning (`FdPlan`), for every data path and inetd mode.

Resource handling: each accept loop owns its listener (closed on exit) and a
dup of it that it accepts through; each accepted stream is handed to a task in
the caller's nursery together with its place in the budget, which that task
gives back when it ends.

Error handling: errors about the one connection being accepted are skipped;
overload errnos (EMFILE, ENFILE, ...) are logged and retried after
`ACCEPT_RETRY`; anything else propagates.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import resource
import socket
from dataclasses import dataclass
from typing import Protocol

import trio

from gatekeeper.config import Config, InetdIo
from gatekeeper.net.addresses import Address, open_listeners
from gatekeeper.net.copy import ZERO_COPY_AVAILABLE
from gatekeeper.net.relay import SPARE_PIPES
from gatekeeper.net.window import narrow_listener

log = logging.getLogger("gatekeeper")

# Out of fds (or kernel memory) at accept: wait this long before trying again
# (trio's serve_listeners uses the same 100 ms).
ACCEPT_RETRY = 0.1
ACCEPT_OVERLOAD = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
# Errors accept() reports about the one connection it was taking (Linux passes
# on errors pending on the new socket; netfilter can refuse with EPERM): skip
# it and accept the next, as trio's own SocketListener does.
ACCEPT_IGNORABLE = {getattr(errno, name) for name in (
    "EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET",
    "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH", "ETIMEDOUT", "ECONNRESET")
    if hasattr(errno, name)}

# fds kept back for everything that is not a job: listeners, epoll sets,
# logging, /proc and cgroup files, the state file (side-port clients are
# counted on their own: SIDE_CONNECTIONS per port).
FD_RESERVE = 64
# Connections open at once per side port (net.sideport): the web server serves
# 16 at a time (observe.web.MAX_CLIENTS) and lets as many wait; an agent
# answer takes well under a millisecond, so 32 covers many HAProxies checking
# every second. Counted in the fd plan: each is one fd.
SIDE_CONNECTIONS = 32
# Connections accepted beyond --max-queue + --max-jobs, so that a full queue
# still answers (refuses with queue-full) instead of leaving the newcomer in
# the backlog.
OVERFLOW = 64

# A client whose machine died or whose network vanished sends no FIN and no
# RST: only TCP keepalive finds out. Set on the listeners: accepted sockets
# inherit the options. Probing after 60 s idle, every 10 s, 6
# times, a half-open client is dropped in about 2 minutes -- well inside the
# 240 s queue timeout -- instead of the kernel default of over 2 hours.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 60, 10, 6
# Each accepted connection's idle time is drawn from KEEPALIVE_IDLE plus up to
# this many seconds, so that clients who connected together (a make -j64, a
# bench's 10,000) are not probed together: 10,000 probes and their answers in
# the same instant overflow the kernel's input backlog (netdev_max_backlog,
# 1000), and measured (bench/held.py, 10,000 queued at MTU 1500) the same 757
# live clients lost their answers in every round and were cut 121.5 s after
# they connected. A half-open client is still dropped within 2.5 minutes.
KEEPALIVE_SPREAD = 30


@dataclass(frozen=True, slots=True)
class FdPlan:
    """How many fds the limits need: one per queued client, `per_running_job`
    for each running one, and `fixed` for the process itself."""

    per_running_job: int
    fixed: int

    @classmethod
    def of(cls, config: Config, *, inetd: bool) -> FdPlan:
        relay = config.zero_copy and ZERO_COPY_AVAILABLE
        # client socket; proxy: its backend connection; inetd: the child's pidfd
        per_job = 2
        if inetd and config.inetd_io is not InetdIo.DIRECT:
            # our end of the socketpair, the child's until it exits, and the
            # pidfd of its compiler (distcc.inetd_wake)
            per_job += 3
        if relay and (not inetd or config.inetd_io is not InetdIo.DIRECT):
            per_job += 4  # a pipe (two fds) per direction
        side_ports = (config.metrics is not None) + (config.agent is not None)
        fixed = (FD_RESERVE + (2 * SPARE_PIPES if relay else 0)
                 + SIDE_CONNECTIONS * side_ports)
        return cls(per_job, fixed)

    def needed(self, config: Config) -> int:
        """fds for a full queue and every slot running."""
        return self.fixed + config.max_queue + self.per_running_job * config.max_jobs

    def connection_budget(self, config: Config, soft_limit: int) -> int:
        """How many client connections may be open at once without starving
        running jobs of the fds they need; at least one per job slot."""
        wanted = config.max_queue + config.max_jobs + OVERFLOW
        if soft_limit == resource.RLIM_INFINITY:
            return wanted
        spare = soft_limit - self.fixed - (self.per_running_job - 1) * config.max_jobs
        return max(config.max_jobs, min(spare, wanted))


def spread_keepalive(sock: socket.socket) -> None:
    """Give an accepted TCP connection an idle time of its own (KEEPALIVE_SPREAD)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6) and hasattr(socket, "TCP_KEEPIDLE"):
        with contextlib.suppress(OSError):  # already gone: the handler will find out
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE,
                            KEEPALIVE_IDLE + random.randrange(KEEPALIVE_SPREAD + 1))


def enable_keepalive(sock: trio.socket.SocketType) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
    except OSError:
        pass  # already gone: the handler will find out


async def open_all(addresses: tuple[Address, ...], *,
                   flag: str = "--listen") -> list[trio.SocketListener]:
    """Every listener for `addresses`, or none (the ones opened are closed).
    An address that cannot be opened is an OSError naming it and its flag
    ("--metrics 127.0.0.1:3634: Address already in use"), not the bare errno."""
    listeners: list[trio.SocketListener] = []
    try:
        for address in addresses:
            try:
                listeners.extend(await open_listeners(address))
            except OSError as e:
                raise OSError(e.errno, f"{flag} {address}: {e.strerror or e}") from None
    except BaseException:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
        raise
    return listeners


class Handler(Protocol):
    async def handle(self, stream: trio.SocketStream) -> None: ...


class Acceptor:
    """Accept loops over the client listeners, within one connection budget;
    each connection goes to `handler.handle` (looked up per connection)."""

    def __init__(self, size: int, handler: Handler, *, queued_window: int = 0) -> None:
        self.size = size
        self.queued_window = queued_window
        self._budget = trio.Semaphore(size)
        self._spent = False
        self._handler = handler

    async def serve(self, listener: trio.SocketListener, handlers: trio.Nursery) -> None:
        """Accept from `listener` until cancelled; each connection's task goes
        into `handlers`. The listener is closed on exit."""
        if listener.socket.family in (socket.AF_INET, socket.AF_INET6):
            # Accepted sockets inherit these (Linux): a client costs one
            # setsockopt, its own keepalive idle time (spread_keepalive).
            enable_keepalive(listener.socket)
            # And their receive buffer, narrow until admission (net/window.py).
            try:
                narrow_listener(listener.socket, self.queued_window)  # type: ignore[arg-type]
            except OSError as e:
                log.warning("--queued-window: %s; queued requests take the kernel's "
                            "buffers", e.strerror or e)
        async with listener:
            # Accepting through our own handle on the listening socket (a dup):
            # a plain non-blocking accept() per connection, and trio's
            # wait_readable only when the backlog is empty, instead of a trip
            # through the scheduler per accept.
            trio_sock = listener.socket
            raw = socket.socket(trio_sock.family, trio_sock.type, trio_sock.proto,
                                fileno=os.dup(trio_sock.fileno()))
            raw.setblocking(False)
            try:
                await self._accept_from(raw, handlers)
            finally:
                trio.lowlevel.notify_closing(raw)
                raw.close()

    async def _accept_from(self, raw: socket.socket, handlers: trio.Nursery) -> None:
        while True:
            if self._budget.value == 0 and not self._spent:
                self._spent = True
                log.warning("connection budget spent (%d connections open; fd limit %d): "
                            "new connections wait in the listen backlog (EMFILE avoided)",
                            self.size, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
            await self._budget.acquire()
            try:
                conn, _ = raw.accept()
            except BlockingIOError:
                self._budget.release()
                await trio.lowlevel.wait_readable(raw)
                continue
            except OSError as e:
                self._budget.release()
                if e.errno in ACCEPT_IGNORABLE:
                    continue  # that one connection failed (a firewall, an early reset)
                if e.errno not in ACCEPT_OVERLOAD:
                    raise
                log.error("accept: %s; retrying in %gs", os.strerror(e.errno or 0),
                          ACCEPT_RETRY)
                await trio.sleep(ACCEPT_RETRY)
                continue
            except BaseException:
                self._budget.release()
                raise
            try:
                spread_keepalive(conn)
                stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
            except BaseException:
                conn.close()
                self._budget.release()
                raise
            handlers.start_soon(self._handle_in_budget, stream)

    async def _handle_in_budget(self, stream: trio.SocketStream) -> None:
        try:
            await self._handler.handle(stream)
        finally:
            self._budget.release()
            if self._spent and self._budget.value > self.size // 2:
                self._spent = False
                log.info("connection budget recovered: accepting again")
