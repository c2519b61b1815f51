"""The server: listeners, one task per connection, and a graceful stop.

Resource handling: every accepted stream belongs to its handler task and is
closed in that task's ``finally``; the backend stream is opened and closed
inside the same task. In inetd mode (``command``) the job is a child process
on the client socket instead, started, reaped and if need be killed by
`inetd.CommandRunner` inside the same task. A slot or queue place is held by
the gate's ticket context manager and released when the handler leaves it,
whatever happened.

Error handling: anything one connection does wrong (reset, garbage, a dead
backend) ends that connection only, with a logged outcome. Errors that are
not about one connection (a bug) propagate and stop the server, loudly.

Nesting: root nursery (gate timer, client watch) > handler nursery (accept
loops and connection tasks). Stopping cancels the accept loops, closes queued
clients, and gives running jobs `drain_timeout` seconds before cancelling them.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import resource
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from gatekeeper.admission import Admission, Limits
from gatekeeper.config import Config, InetdIo
from gatekeeper.distcc.inetd_wake import Waker, hang_up, oob_available
from gatekeeper.distcc.peek import peek_distcc_job, peek_distcc_job_now
from gatekeeper.distcc.reply import REPLY_HEAD, CompileStatus, parse_reply_status
from gatekeeper.distcc.request import INCOMPLETE, DistccJob, Unparsed
from gatekeeper.footprints import FootprintBook
from gatekeeper.gate import Gate, Ticket, Verdict
from gatekeeper.inetd.command import Command, CommandRunner, Exit, filters_peers
from gatekeeper.memory.meter import Meter, SocketFinder, Usage, backend_process
from gatekeeper.memory.oom import OomKills
from gatekeeper.memory.sources import MemorySource, format_bytes
from gatekeeper.net.addresses import (
    Address,
    connect,
    connected_now,
    finish_connect,
    listener_address,
    open_listeners,
    start_connect,
)
from gatekeeper.net.copy import ZERO_COPY_AVAILABLE, Side, Transfer, abort, splice
from gatekeeper.net.liveness import ClientWatch
from gatekeeper.net.relay import Relay, RelayJob
from gatekeeper.observe.agent import BackendCheck
from gatekeeper.observe.metrics import Observatory
from gatekeeper.observe.page import page
from gatekeeper.observe.web import Agent, StatusWeb

log = logging.getLogger("gatekeeper")

# After SIGTERM running jobs get this long to finish. A compile that is half
# done is worth finishing; systemd's own stop timeout (90 s) is above this.
DEFAULT_DRAIN_TIMEOUT = 60.0

# How long a new connection may take to show its request head before it joins
# the queue as an unknown job. A distcc client writes the head right after
# connecting, so this is normally not waited at all; it bounds the wait when
# the head is slow or never comes (not distcc: use --identify none). 0.3 s,
# not the 0.1 s it was: on a loaded 2-core box running make -j12 a distcc
# client can take over 100 ms, and an unidentified job loses its learned
# footprint and the check of distccd's status.
IDENTIFY_GRACE = 0.3

# Out of fds (or kernel memory) at accept: wait this long before trying again
# (trio's serve_listeners uses the same 100 ms).
ACCEPT_RETRY = 0.1
_ACCEPT_OVERLOAD = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
# Errors accept() reports about the one connection it was taking (Linux passes
# on errors pending on the new socket; netfilter can refuse with EPERM): skip
# it and accept the next, as trio's own SocketListener does.
_ACCEPT_IGNORABLE = {getattr(errno, name) for name in (
    "EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET",
    "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH", "ETIMEDOUT", "ECONNRESET")
    if hasattr(errno, name)}

# fds kept back from the connection budget for everything that is not a
# client: listeners, epoll sets, logging, /proc reads, the state file.
FD_RESERVE = 64
# A running job holds its backend connection and a splice pipe pair per
# direction besides its client socket; relayed inetd mode adds the child's end
# of the socketpair and the child's pidfd.
FDS_PER_RUNNING_JOB = 8


def connection_budget(config: Config) -> int:
    """How many client connections may be open at once without starving running
    jobs of the fds they need: the soft RLIMIT_NOFILE less what running jobs and
    the process itself need; at least one per job slot."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return config.max_queue + config.max_jobs
    spare = soft - FD_RESERVE - FDS_PER_RUNNING_JOB * config.max_jobs
    return max(config.max_jobs, min(spare, config.max_queue + config.max_jobs + 64))


# Learned footprints are written out this often (when something new was
# learned) and at a clean stop, so a crash loses at most a minute of learning.
SAVE_INTERVAL = 60.0


# A client whose machine died or whose network vanished sends no FIN and no
# RST: only TCP keepalive finds out. Set on the listeners: accepted sockets
# inherit the options. Probing after 60 s idle, every 10 s, 6
# times, a half-open client is dropped in about 2 minutes -- well inside the
# 240 s queue timeout -- instead of the kernel default of over 2 hours.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 60, 10, 6


def enable_keepalive(sock: trio.socket.SocketType) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
    except OSError:
        pass  # already gone: the handler will find out


def limits_from(config: Config) -> Limits:
    return Limits(
        max_jobs=config.max_jobs,
        min_free=config.min_free_bytes,
        max_queue=config.max_queue,
        queue_timeout=config.queue_timeout,
        max_per_key=config.max_per_client,
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
    pid: int | None = None
    """inetd mode: the job's child process."""
    job_key: str | None = None
    job_name: str | None = None
    estimate: int | None = None
    peak: int | None = None
    job: int | None = None
    """The gate's id for this connection's ticket, once it has one."""
    compile: CompileStatus | None = None
    """distccd's report on the compiler (proxy mode, distcc jobs)."""
    oom_kills: int | None = None
    """The box's OOM-kill count when the job was admitted."""
    oom_seen: bool = False
    """The OOM killer struck while this job ran, and the job failed."""
    backend_ends: tuple[tuple[str, int], tuple[str, int]] | None = None
    """(our end, the backend's end) of a TCP backend connection, to find the
    backend process that serves the job."""
    usage: Usage | None = None
    """The meter's measurements of the job, while it is measured."""
    handed_off: bool = False
    """The backend's part is over and the slot handed on (`Server._hand_off`):
    nothing more is measured (a pre-forked distccd child may already serve the
    next job), though the handler still waits for the client."""

    @property
    def bytes_in(self) -> int:
        return self.transfer.to_backend if self.transfer is not None else 0

    @property
    def bytes_out(self) -> int:
        return self.transfer.to_client if self.transfer is not None else 0

    def fields(self) -> dict[str, object]:
        """The end line's facts as typed values (for --log-format json)."""
        end = self.ended if self.ended is not None else self.accepted
        wait_end = self.admitted if self.admitted is not None else end
        out: dict[str, object] = {
            "event": "end", "peer": self.peer, "outcome": self.outcome,
            "wait_seconds": round(wait_end - self.accepted, 3),
            "run_seconds": round(end - self.admitted, 3) if self.admitted is not None else 0.0,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
        }
        extra = {"pid": self.pid, "job": self.job_name,
                 "compile": self.compile.describe() if self.compile is not None else None,
                 "oom": True if self.oom_seen else None,
                 "estimate_bytes": self.estimate, "peak_bytes": self.peak, "reason": self.detail}
        out.update((k, v) for k, v in extra.items() if v is not None and v != "")
        return out

    def line(self) -> str:
        end = self.ended if self.ended is not None else self.accepted
        wait_end = self.admitted if self.admitted is not None else end
        run = end - self.admitted if self.admitted is not None else 0.0
        t = self.transfer or Transfer()
        text = (f"end peer={self.peer} outcome={self.outcome} wait={wait_end - self.accepted:.3f}s"
                f" run={run:.3f}s in={t.to_backend} out={t.to_client}")
        if self.pid is not None:
            text += f" pid={self.pid}"
        if self.job_name:
            text += f" job={self.job_name}"
        if self.compile is not None:
            text += f" compile={self.compile.describe()}"
        if self.oom_seen:
            text += " oom=yes"
        if self.estimate is not None:
            text += f" est={self.estimate / 2**20:.0f}MiB"
        if self.peak is not None:
            text += f" peak={self.peak / 2**20:.0f}MiB"
        if self.detail:
            text += f" reason={self.detail!r}"
        return text


@dataclass(slots=True, eq=False)
class Started:
    """A queued job's start at the moment it is admitted (`Server._start`, as
    the ticket's on_admit), and what that start got before the job's own task
    ran again: a connect in progress, or its backend connection with the bytes
    already moving. Owned by the job's handler, which takes it over or, if it
    ends first, drops it. (One object, not a closure plus a holder: one exists
    per queued client.)"""

    server: Server | None = None
    stream: trio.SocketStream | None = None
    record: ConnectionLog | None = None
    ticket: Ticket | None = None
    raw: socket.socket | None = None
    backend: trio.SocketStream | None = None
    job: RelayJob | None = None
    client: trio.SocketStream | None = None
    """Set once bytes may have moved: then the client must see a reset if the
    job is dropped, never a clean end."""
    broken: str | None = None
    """Why a start that may have moved bytes was given up: the job cannot be
    started again (part of its request is gone), it fails."""

    def __call__(self) -> None:
        if self.server is not None:
            self.server._start(self)

    def drop(self, relay: Relay | None) -> None:
        """Undo whatever was started and not taken over (the handler was cut off
        before it got there): the backend, and the client if any of its bytes
        moved, get a reset. Also lets go of the server, stream, record and
        ticket (the ticket refers back to this: no cycle left for the GC)."""
        self.server = self.stream = self.record = self.ticket = None
        if self.job is not None and relay is not None:
            relay.discard(self.job)
            self.job = None
        if self.client is not None:
            abort(self.client)
            self.client = None
        if self.backend is not None:
            abort(self.backend)
            self.backend.socket.close()
            self.backend = None
        if self.raw is not None:
            self.raw.close()
            self.raw = None


class Server:
    def __init__(self, config: Config, memory: MemorySource, *,
                 drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
                 command: Command | None = None) -> None:
        self.config = config
        self.gate = Gate(Admission(limits_from(config)), memory,
                         max_pressure=config.max_memory_pressure)
        self.watch = ClientWatch(keep_half_closed=config.keep_half_closed)
        self.drain_timeout = drain_timeout
        self.book = FootprintBook(seed=config.job_mem_bytes)
        if config.state_dir is not None:
            self.book.load(config.state_dir)
        self.meter = Meter()
        # The zero-copy data path (Linux): one epoll set for every running job.
        self.relay = Relay() if config.zero_copy and ZERO_COPY_AVAILABLE else None
        self.oom = OomKills()
        self._budget_size = connection_budget(config)
        self._budget = trio.Semaphore(self._budget_size)
        self._budget_spent = False
        # inetd mode: each admitted job runs `command` on the client socket
        # instead of being spliced to config.backend.
        self.runner = CommandRunner(command) if command is not None else None
        # Relayed inetd mode (see InetdIo): auto relays distcc jobs unless the
        # command checks client addresses itself; distccd is woken (inetd_wake)
        # where the kernel allows.
        self._auto_relay = command is not None and not filters_peers(command)
        self.waker = Waker() if command is not None and oob_available() else None
        self._stop = trio.Event()
        self.addresses: list[str] = []
        self.metrics_addresses: list[str] = []
        self.agent_addresses: list[str] = []
        # Live connections (by id), so /status can name the peers queued.
        self._connections: dict[int, ConnectionLog] = {}
        self._side: tuple[list[trio.SocketListener], list[trio.SocketListener]] | None = None
        self.observatory = Observatory(
            self.gate, memory, unknown_footprint=self.book.unknown_estimate,
            queue_peers=self._queue_peers, stopping=lambda: self.stopping,
            backend=BackendCheck(None if command is not None else config.backend))

    def stop(self) -> None:
        """Begin a graceful stop (idempotent)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self, listeners: list[trio.SocketListener], *,
                  task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        self.addresses = [listener_address(lst) for lst in listeners]
        for listener in listeners:
            # Accepted sockets inherit these (Linux), so no client costs setsockopts.
            if listener.socket.family in (socket.AF_INET, socket.AF_INET6):
                enable_keepalive(listener.socket)
        web, agent = self._side or await self.open_side_listeners()
        async with trio.open_nursery() as root:
            root.start_soon(self.gate.run)
            if web:
                web_server = StatusWeb(self.observatory, page=page)
                root.start_soon(trio.serve_listeners, web_server.handle, web)
            if agent:
                root.start_soon(trio.serve_listeners, Agent(self.observatory).handle, agent)
            root.start_soon(self.watch.run)
            root.start_soon(self.meter.run)
            if self.relay is not None:
                root.start_soon(self.relay.run)
            if self.waker is not None:
                root.start_soon(self.waker.run)
            if self.config.state_dir is not None:
                root.start_soon(self._save_periodically)
            async with trio.open_nursery() as handlers:
                accept_scope = trio.CancelScope()

                async def accept() -> None:
                    with accept_scope:
                        async with trio.open_nursery() as loops:
                            for listener in listeners:
                                loops.start_soon(self._accept_loop, listener, handlers)

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
            self.save_footprints()
            self.oom.close()
            root.cancel_scope.cancel()

    async def _accept_loop(self, listener: trio.SocketListener,
                           handlers: trio.Nursery) -> None:
        """Accept while the connection budget allows; when it is spent, stop
        accepting and let the kernel's listen backlog hold the rest (as
        s6-tcpserverd does), so the fds running jobs need for their backend
        connection and pipes are never taken by waiting clients. EMFILE and
        friends are logged and retried after a pause; the listener is closed on
        exit."""
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
            if self._budget.value == 0 and not self._budget_spent:
                self._budget_spent = True
                log.warning("connection budget spent (%d connections open; fd limit %d): "
                            "new connections wait in the listen backlog (EMFILE avoided)",
                            self._budget_size, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
            await self._budget.acquire()
            try:
                conn, _ = raw.accept()
            except BlockingIOError:
                self._budget.release()
                await trio.lowlevel.wait_readable(raw)
                continue
            except OSError as e:
                self._budget.release()
                if e.errno in _ACCEPT_IGNORABLE:
                    continue  # that one connection failed (a firewall, an early reset)
                if e.errno not in _ACCEPT_OVERLOAD:
                    raise
                log.error("accept: %s; retrying in %gs", os.strerror(e.errno or 0),
                          ACCEPT_RETRY)
                await trio.sleep(ACCEPT_RETRY)
                continue
            except BaseException:
                self._budget.release()
                raise
            try:
                stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
            except BaseException:
                conn.close()
                self._budget.release()
                raise
            handlers.start_soon(self._handle_in_budget, stream)

    async def _handle_in_budget(self, stream: trio.SocketStream) -> None:
        try:
            await self.handle(stream)
        finally:
            self._budget.release()
            if self._budget_spent and self._budget.value > self._budget_size // 2:
                self._budget_spent = False
                log.info("connection budget recovered: accepting again")

    async def open_side_listeners(
            self) -> tuple[list[trio.SocketListener], list[trio.SocketListener]]:
        """The --metrics and --agent listeners. Call before `run` (outside any
        nursery) so a port in use is a plain startup OSError; `run` opens them
        itself otherwise."""
        web = await open_all(() if self.config.metrics is None else (self.config.metrics,))
        try:
            agent = await open_all(() if self.config.agent is None else (self.config.agent,))
        except BaseException:
            for listener in web:
                await trio.aclose_forcefully(listener)
            raise
        self.metrics_addresses = [listener_address(lst) for lst in web]
        self.agent_addresses = [listener_address(lst) for lst in agent]
        for address in self.metrics_addresses:
            log.info("metrics and status on http://%s/", address)
        for address in self.agent_addresses:
            log.info("HAProxy agent-check on %s", address)
        self._side = web, agent
        return self._side

    def _queue_peers(self) -> dict[int, str]:
        return {r.job: r.peer for r in self._connections.values() if r.job is not None}

    def save_footprints(self) -> None:
        if self.config.state_dir is None or not self.book.dirty:
            return
        try:
            self.book.save(self.config.state_dir)
        except OSError as e:
            log.warning("could not save learned footprints in %s: %s",
                        self.config.state_dir, e)

    async def _save_periodically(self) -> None:
        while True:
            await trio.sleep(SAVE_INTERVAL)
            self.save_footprints()

    async def handle(self, stream: trio.SocketStream) -> None:
        peer, host = describe_peer(stream)
        record = ConnectionLog(peer=peer, accepted=trio.current_time())
        self._connections[id(record)] = record
        try:
            await self._handle(stream, host, record)
        finally:
            record.ended = trio.current_time()
            # Log before closing: the close is a checkpoint, and under
            # cancellation nothing after it would run.
            if log.isEnabledFor(logging.INFO):
                log.info("%s", record.line(), extra={"fields": record.fields()})
            del self._connections[id(record)]
            self.observatory.connection_ended(record)
            self.gate.notify_watchers()  # /status lists connections
            stream.socket.close()  # no checkpoint: nothing after it to lose

    async def _handle(self, stream: trio.SocketStream, host: str | None,
                      record: ConnectionLog) -> None:
        if host is not None and not self.config.allow.permits(host):
            record.outcome = "denied"
            return
        if self.config.identify:
            # Before joining the queue, so a known compile's learned footprint
            # counts from its first admission decision on.
            await self._identify(stream, record)
        record.estimate = self.book.estimate(record.job_key)
        key = self.config.fair_by.key(host)
        weight = self.config.priorities.weight(host)
        async with self.gate.ticket(record.estimate, key=key, weight=weight) as ticket:
            record.job = ticket.job
            if ticket.refused is not None:
                record.outcome = ticket.refused.value
                return
            # A job admitted the moment it arrived never waited: a FIN it sent
            # already is a request-then-shutdown, not a client that gave up.
            waited = not ticket.admitted
            started = Started()
            if waited and self.relay is not None and self.runner is None:
                # Start its data path at the very moment it is admitted (see
                # `_start`), not when its task next gets to run.
                started.server, started.stream = self, stream
                started.record, started.ticket = record, ticket
                ticket.on_admit = started
            # (Inline, not a helper coroutine: a queued connection's memory is
            # mostly its frames, and 10,000 may wait.)
            try:
                gone = False
                verdict = Verdict.ADMITTED
                if waited:
                    with trio.CancelScope() as waiting:
                        def on_gone() -> None:
                            nonlocal gone
                            gone = True
                            waiting.cancel()

                        with self.watch.watching(stream.socket, on_gone):
                            verdict = await self.gate.wait(ticket)
                # (One admitted at once is not checked: if it is already gone, its
                # first read says so, and the check would cost every job a poll. One
                # whose bytes already move is the relay's: it sees the departure.)
                if started.job is None and (gone or (waited and verdict is Verdict.ADMITTED
                                                     and self.watch.is_gone(stream.socket))):
                    record.outcome = "client-gone"
                    return
                if verdict is not Verdict.ADMITTED:
                    record.outcome = verdict.value
                    return
                if record.admitted is None:
                    record.admitted = trio.current_time()
                    record.oom_kills = self.oom.baseline(record.admitted)
                with self.meter.measuring(
                        lambda hints, finder: self._locate(record, hints, finder),
                        lambda usage: self.gate.observe(ticket, usage)) as usage:
                    record.usage = usage
                    if record.handed_off:  # done before its task got here
                        usage.stop()
                    await self._run_job(stream, self.config.backend, record, ticket, started)
                if usage.samples:
                    record.peak = usage.peak
                    self._learn(record, usage.peak)
            finally:
                started.drop(self.relay)

    def _start(self, started: Started) -> None:
        """The gate just admitted this queued job (`Ticket.on_admit`), inside
        whatever task released the slot -- usually the relay, the moment the
        previous job's bytes were done. Connect and start moving the request
        now, without a checkpoint: the handoff then costs no task switch. What
        cannot be done at once (a connect still in progress, a host name to
        resolve, an error to report) is left to the job's own task."""
        stream, record, ticket = started.stream, started.record, started.ticket
        assert stream is not None and record is not None and ticket is not None
        if self.watch.is_gone(stream.socket):
            return  # its task ends it as client-gone
        assert self.relay is not None
        try:
            raw = started.raw = start_connect(self.config.backend)
            if raw is None or not connected_now(raw):
                return
            prefix = REPLY_HEAD if record.job_key is not None else 0
            transfer = record.transfer = Transfer()
            started.client = stream
            started.job = self.relay.open(
                stream.socket, raw, transfer, reply_prefix=prefix,
                on_complete=functools.partial(self._hand_off, raw.close, ticket, record),
                hand_off_at_backend_eof=record.job_key is not None)
            # The rest only after the first bytes moved: the backend waits for them.
            started.backend = trio.SocketStream(trio.socket.from_stdlib_socket(raw))
            started.raw = None
            record.admitted = trio.current_time()
            record.oom_kills = self.oom.baseline(record.admitted)
            record.backend_ends = _tcp_ends(started.backend)  # the meter finds it by these
        except OSError:
            # Refused, out of fds: its task tries again and reports what it meets.
            started.client = None  # nothing moved
            started.drop(self.relay)
        except Exception as e:
            # A bug here must not strand the job or stop the releasing task (the
            # relay, the gate's timer). Its task starts it the usual way, unless
            # bytes may have moved already: then it fails, with resets.
            log.exception("could not start job %s at admission", ticket.job)
            if started.client is not None:
                started.broken = f"internal error starting the job: {e!r}"
            started.drop(self.relay)

    def _hand_off(self, close_backend: Callable[[], None], ticket: Ticket,
                  record: ConnectionLog) -> None:
        """A job's backend part is done, cleanly (`Relay.open`'s on_complete, in
        the relay task: both directions ended, or for distcc, distccd's reply
        and EOF are in): close its backend connection -- so at most
        max-jobs are ever open -- and give its slot to the next job at once. Its
        own task logs and learns afterwards, from what was measured until now."""
        close_backend()
        record.handed_off = True
        if record.usage is not None:
            record.usage.stop()
        self.gate.release(ticket)

    def _learn(self, record: ConnectionLog, peak: int) -> None:
        """Learn from a job that ran to its end, if its peak means something.

        A compile distccd reports as done is learned. One that was killed, or
        that failed while the OOM killer struck (g++ reports its killed
        cc1plus as exit 1), needed more than the peak it died at: remembered as
        such (`FootprintBook.learn_cut_short`). Any other failure (a compile
        error, a broken connection) says nothing about what it needs. Where the
        outcome cannot be seen (inetd mode, other backends) a job that ended
        cleanly is learned, unless the OOM killer struck while it ran."""
        status = record.compile
        completed = record.outcome == "ok" and (status is None or status.ok)
        killed = status is not None and status.signal is not None
        if not completed or status is None:
            record.oom_seen = self._oom_struck(record)
        if killed or (record.oom_seen and not completed):
            self.book.learn_cut_short(record.job_key, peak)
            log.warning("job %s was cut short at %s (%s); it needs more than that",
                        record.job_name or record.job_key or record.peer, format_bytes(peak),
                        f"signal {status.signal}" if killed and status is not None
                        else "the OOM killer struck while it ran")
        elif completed and not record.oom_seen:
            self.book.learn(record.job_key, peak)

    def _oom_struck(self, record: ConnectionLog) -> bool:
        before = record.oom_kills
        after = self.oom.count() if before is not None else None
        return before is not None and after is not None and after > before

    @staticmethod
    async def _identify(stream: trio.SocketStream, record: ConnectionLog) -> None:
        """Read the job's identity from its request head, without consuming it:
        at once if it is there (the usual case), else within `IDENTIFY_GRACE`."""
        job: DistccJob | Unparsed | None = peek_distcc_job_now(stream.socket)
        if job is INCOMPLETE:
            with trio.move_on_after(IDENTIFY_GRACE):
                job = await peek_distcc_job(stream.socket)
        if isinstance(job, DistccJob):
            record.job_key, record.job_name = job.key, job.output

    @staticmethod
    def _locate(record: ConnectionLog, hints: Sequence[int],
                finder: SocketFinder) -> int | None:
        """The job's root process: the inetd child, or the backend process holding
        the other end of our connection. Called in a worker thread."""
        if record.pid is not None:
            return record.pid
        if record.backend_ends is not None:
            ours, theirs = record.backend_ends
            return backend_process(ours, theirs, hints, finder)
        return None

    async def _run_job(self, stream: trio.SocketStream, backend_address: Address,
                       record: ConnectionLog, ticket: Ticket,
                       started: Started) -> None:
        if self.runner is not None:
            await self._run_command(self.runner, stream, record)
            return
        if started.broken is not None:
            record.outcome, record.detail = "backend-failed", started.broken
            return
        job, backend = started.job, started.backend
        started.job = started.backend = started.client = None  # taken over: closed below
        if backend is None:
            try:
                if started.raw is not None:
                    raw, started.raw = started.raw, None
                    backend = await finish_connect(
                        raw, connect_timeout=self.config.connect_timeout)
                else:
                    backend = await connect(backend_address,
                                            connect_timeout=self.config.connect_timeout)
            except (OSError, trio.TooSlowError) as e:
                record.outcome = "backend-error"
                record.detail = f"connect {backend_address}: {e or 'timed out'}"
                return
            record.backend_ends = _tcp_ends(backend)
        try:
            transfer = await self._relay_job(
                stream, backend, record, job.transfer if job is not None else Transfer(),
                job=job, on_complete=functools.partial(self._hand_off, backend.socket.close, ticket,
                                                       record))
        finally:
            backend.socket.close()
        self._settle(record, transfer)

    async def _relay_job(self, stream: trio.SocketStream, backend: trio.SocketStream,
                         record: ConnectionLog, transfer: Transfer, *,
                         job: RelayJob | None = None,
                         on_complete: Callable[[], None] | None = None) -> Transfer:
        """Move the job's bytes both ways until done, recording it in `transfer`
        (`job`: already moving, see `_start`; `on_complete`: see `Relay.open`);
        on failure make sure each peer sees a reset, never a clean end after
        half a reply. Does not close either stream."""
        record.transfer = transfer
        try:
            prefix = REPLY_HEAD if record.job_key is not None else 0
            if self.relay is not None:
                if job is None:
                    # A distcc job's slot is free once distccd closed: it has
                    # answered, its compiler is gone, only the client's close is
                    # still to come.
                    job = self.relay.open(stream.socket, backend.socket, transfer,
                                          reply_prefix=prefix,
                                          on_complete=on_complete,
                                          hand_off_at_backend_eof=record.job_key is not None)
                await self.relay.wait(job, self.config.idle_timeout)
            else:
                await splice(stream, backend, transfer, reply_prefix=prefix,
                             idle_timeout=self.config.idle_timeout)
            record.compile = parse_reply_status(transfer.reply_head)
        except OSError as e:  # no fds left for the splice's pipes (EMFILE, ENFILE)
            transfer.failed = Side.BACKEND
            transfer.error = f"cannot relay: {e}"
        except BaseException:
            # Cancelled (the drain deadline) or a bug: the job is cut off.
            abort(stream)
            abort(backend)
            raise
        finally:
            if transfer.idle:
                abort(stream)
                abort(backend)
            elif transfer.failed is Side.BACKEND:
                abort(stream)
            elif transfer.failed is Side.CLIENT:
                abort(backend)
        return transfer

    def _settle(self, record: ConnectionLog, transfer: Transfer,
                exited: Exit | None = None) -> None:
        """The job's outcome from how its bytes (and, relayed inetd, its child) ended."""
        if transfer.idle:
            record.outcome = "idle-timeout"
            record.detail = f"no byte either way for {self.config.idle_timeout:g}s"
        elif transfer.failed is not None:
            record.outcome = "client-error" if transfer.failed is Side.CLIENT else "backend-failed"
            record.detail = transfer.error
        elif exited is not None and not exited.ok:
            record.outcome = "command-failed"
            record.detail = exited.describe()
        elif record.job_key is not None and len(transfer.reply_head) < REPLY_HEAD:
            # distccd answers every request it finished with DONE and STAT; a
            # clean EOF before them is a distccd that died or gave up (a
            # restart, a crash; a client half-close makes it kill the job).
            client_eof = transfer.eofs[:1] == [Side.CLIENT]
            record.outcome = "client-gone" if client_eof else "backend-failed"
            record.detail = (f"{'after the client half-closed, ' if client_eof else ''}"
                             f"the backend closed after {len(transfer.reply_head)} bytes "
                             "of reply, before distccd's status")
        else:
            record.outcome = "ok"

    async def _run_command(self, runner: CommandRunner, stream: trio.SocketStream,
                           record: ConnectionLog) -> None:
        """inetd mode: the job is the child's lifetime; the caller closes the client."""
        if self._relays(record):
            await self._run_command_relayed(runner, stream, record)
            return

        def started(pid: int) -> None:
            record.pid = pid

        result = await runner.run(stream.socket, started=started)
        if result.error is not None:
            record.outcome = "command-error"  # never started: the client falls back
        elif result.returncode != 0:
            record.outcome = "command-failed"
        else:
            record.outcome = "ok"
        if not result.ok:
            record.detail = result.describe()

    def _relays(self, record: ConnectionLog) -> bool:
        """Whether this inetd job gets a relayed socketpair (see `InetdIo`)."""
        mode = self.config.inetd_io
        if mode is InetdIo.AUTO:
            return record.job_key is not None and self._auto_relay
        return mode is InetdIo.RELAY

    async def _run_command_relayed(self, runner: CommandRunner, stream: trio.SocketStream,
                                   record: ConnectionLog) -> None:
        """inetd mode through a socketpair: the child gets one end, the job's bytes
        are relayed through the other like a backend connection's (so distccd's
        status is read), and a distcc job's distccd is woken when its compiler
        is done (`inetd_wake`). When the child exits, gatekeeper hangs up its
        end (`hang_up`): the relay sees EOF after the last byte the child wrote,
        whatever the child left behind; the job then ends as a proxied one does,
        when the client has its reply and closes. If the relay ends first (the
        client reset, the idle timeout), the child sees its client hang up."""
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as e:  # out of fds: this job fails, the server goes on
            record.outcome = "command-error"
            record.detail = f"cannot make its socketpair: {e.strerror or e}"
            return
        wake = record.job_key is not None and self.waker is not None
        theirs.setblocking(not wake)  # the wake needs it non-blocking (inetd_wake)
        backend = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
        transfer = Transfer()
        try:
            async with trio.open_nursery() as nursery:
                async def relay() -> None:
                    await self._relay_job(stream, backend, record, transfer)
                    if transfer.failed is not None or transfer.idle:
                        with contextlib.suppress(OSError):  # the child: its client is gone
                            ours.shutdown(socket.SHUT_RDWR)

                def started(pid: int) -> None:
                    record.pid = pid
                    nursery.start_soon(relay)

                with contextlib.ExitStack() as waking:
                    if wake and self.waker is not None:
                        waking.enter_context(self.waker.waking(ours))
                    result = await runner.run(theirs, blocking=False, started=started)
                hang_up(theirs)  # no checkpoint since the exit: no nudge in between
                if result.error is not None:
                    record.outcome = "command-error"  # never started: the client falls back
                    record.detail = result.describe()
                    return
            self._settle(record, transfer, result)
        finally:
            theirs.close()
            backend.socket.close()


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


def _tcp_ends(stream: trio.SocketStream) -> tuple[tuple[str, int], tuple[str, int]] | None:
    sock = stream.socket
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        ours, theirs = sock.getsockname(), sock.getpeername()
    except OSError:
        return None
    return (ours[0], ours[1]), (theirs[0], theirs[1])
