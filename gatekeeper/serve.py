"""The server: listeners, one task per connection, and a graceful stop.

Resource handling: every accepted stream belongs to its handler task and is
closed in that task's ``finally``; the backend stream is opened and closed
inside the same task. A slot or queue place is held by the gate's ticket
context manager and released when the handler leaves it, whatever happened.

Error handling: anything one connection does wrong (reset, garbage, a dead
backend) ends that connection only, with a logged outcome. Errors that are
not about one connection (a bug) propagate and stop the server, loudly.

Nesting: root nursery (gate timer, client watch) > handler nursery (accept
loops and connection tasks). Stopping cancels the accept loops, closes queued
clients, and gives running jobs `drain_timeout` seconds before cancelling them.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

import trio

from .addresses import Address, connect, listener_address, open_listeners
from .admission import Admission, Limits
from .config import Config
from .gate import Gate, Verdict
from .liveness import ClientWatch
from .memory import MemorySource
from .splice import Side, Transfer, abort, splice

log = logging.getLogger("gatekeeper")

# After SIGTERM running jobs get this long to finish. A compile that is half
# done is worth finishing; systemd's own stop timeout (90 s) is above this.
DEFAULT_DRAIN_TIMEOUT = 60.0


def limits_from(config: Config) -> Limits:
    return Limits(
        max_jobs=config.max_jobs,
        min_free=config.min_free_bytes,
        max_queue=config.max_queue,
        queue_timeout=config.queue_timeout,
    )


def describe_peer(stream: trio.SocketStream) -> tuple[str, str | None]:
    """(printable peer, IP host or None for unix peers)."""
    sock = stream.socket
    if sock.family == socket.AF_UNIX:
        return "unix", None
    try:
        name = sock.getpeername()
    except OSError:
        return "?", None
    host, port = name[0], name[1]
    text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return text, host


@dataclass(slots=True)
class ConnectionLog:
    """What one connection did, for its end-of-connection log line."""

    peer: str
    accepted: float
    outcome: str = "?"
    admitted: float | None = None
    ended: float | None = None
    detail: str | None = None
    transfer: Transfer | None = None

    def line(self) -> str:
        end = self.ended if self.ended is not None else self.accepted
        wait_end = self.admitted if self.admitted is not None else end
        run = end - self.admitted if self.admitted is not None else 0.0
        t = self.transfer or Transfer()
        text = (f"end peer={self.peer} outcome={self.outcome} wait={wait_end - self.accepted:.3f}s"
                f" run={run:.3f}s in={t.to_backend} out={t.to_client}")
        if self.detail:
            text += f" reason={self.detail!r}"
        return text


class Server:
    def __init__(self, config: Config, memory: MemorySource, *,
                 drain_timeout: float = DEFAULT_DRAIN_TIMEOUT) -> None:
        self.config = config
        self.gate = Gate(Admission(limits_from(config)), memory)
        self.watch = ClientWatch(keep_half_closed=config.keep_half_closed)
        self.drain_timeout = drain_timeout
        self._stop = trio.Event()
        self.addresses: list[str] = []

    def stop(self) -> None:
        """Begin a graceful stop (idempotent)."""
        self._stop.set()

    async def run(self, listeners: list[trio.SocketListener], *,
                  task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        self.addresses = [listener_address(lst) for lst in listeners]
        async with trio.open_nursery() as root:
            root.start_soon(self.gate.run)
            root.start_soon(self.watch.run)
            async with trio.open_nursery() as handlers:
                accept_scope = trio.CancelScope()

                async def accept() -> None:
                    with accept_scope:
                        await trio.serve_listeners(self.handle, listeners,
                                                   handler_nursery=handlers)

                handlers.start_soon(accept)
                for address in self.addresses:
                    log.info("listening on %s", address)
                task_status.started(self.addresses)
                await self._stop.wait()
                accept_scope.cancel()
                closed = self.gate.drain()
                running = self.gate.snapshot().running
                log.info("stopping: closed %d queued, waiting up to %.0fs for %d running",
                         closed, self.drain_timeout, running)
                handlers.cancel_scope.deadline = trio.current_time() + self.drain_timeout
            if handlers.cancel_scope.cancelled_caught:
                log.warning("drain timeout: cut off the jobs still running")
            root.cancel_scope.cancel()

    async def handle(self, stream: trio.SocketStream) -> None:
        peer, host = describe_peer(stream)
        record = ConnectionLog(peer=peer, accepted=trio.current_time())
        try:
            await self._handle(stream, host, record)
        finally:
            record.ended = trio.current_time()
            await trio.aclose_forcefully(stream)
            log.info("%s", record.line())

    async def _handle(self, stream: trio.SocketStream, host: str | None,
                      record: ConnectionLog) -> None:
        if host is not None and not self.config.allow.permits(host):
            record.outcome = "denied"
            return
        async with self.gate.ticket() as ticket:
            if ticket.refused is not None:
                record.outcome = ticket.refused.value
                return
            gone = False
            with trio.CancelScope() as waiting:
                def on_gone() -> None:
                    nonlocal gone
                    gone = True
                    waiting.cancel()

                with self.watch.watching(stream.socket, on_gone):
                    verdict = await self.gate.wait(ticket)
            if gone or (verdict is Verdict.ADMITTED and self.watch.is_gone(stream.socket)):
                record.outcome = "client-gone"
                return
            if verdict is not Verdict.ADMITTED:
                record.outcome = verdict.value
                return
            record.admitted = trio.current_time()
            await self._run_job(stream, self.config.backend, record)

    async def _run_job(self, stream: trio.SocketStream, backend_address: Address,
                       record: ConnectionLog) -> None:
        try:
            with trio.fail_after(self.config.connect_timeout):
                backend = await connect(backend_address)
        except (OSError, trio.TooSlowError) as e:
            record.outcome = "backend-error"
            record.detail = f"connect {backend_address}: {e or 'timed out'}"
            return
        transfer = record.transfer = Transfer()
        try:
            await splice(stream, backend, transfer)
        finally:
            if transfer.failed is Side.BACKEND:
                abort(stream)
            elif transfer.failed is Side.CLIENT:
                abort(backend)
            await trio.aclose_forcefully(backend)
        if transfer.failed is None:
            record.outcome = "ok"
        else:
            record.outcome = "client-error" if transfer.failed is Side.CLIENT else "backend-failed"
            record.detail = transfer.error


async def open_all(addresses: tuple[Address, ...]) -> list[trio.SocketListener]:
    listeners: list[trio.SocketListener] = []
    try:
        for address in addresses:
            listeners.extend(await open_listeners(address))
    except BaseException:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
        raise
    return listeners
