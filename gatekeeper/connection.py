"""One client connection, start to end: allow -> identify -> ticket -> wait ->
run -> record. The states it passes are `job.State`'s (that module's header);
this is the task that walks a `Job` through them.

Resource handling: the accepted stream belongs to this task and is closed in
`Connections.handle`'s ``finally``; the slot or queue place is the gate
ticket's, released when the ticket's scope is left, whatever happened; a start
made at admission (`job.ProxyStart`) is taken over by the task or dropped in
its ``finally``.

Error handling: anything one connection does wrong (reset, garbage, a dead
backend) ends that connection only, with a logged outcome. Errors that are not
about one connection (a bug) propagate and stop the server, loudly. A running
job cancelled by the drain deadline ends `drain-timeout`.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable, Sequence
from typing import Protocol

import trio

from gatekeeper.accuracy import Accuracy
from gatekeeper.config import Config
from gatekeeper.distcc.policy import ArgvPolicy
from gatekeeper.distcc.protocol import IDENTIFY_GRACE, identify, speaks
from gatekeeper.distcc.request import INCOMPLETE, NOT_DISTCC, UNREADABLE, DistccJob, Unparsed
from gatekeeper.farm.ledger import Entry, Ledger
from gatekeeper.footprints import FootprintBook, Source
from gatekeeper.gate import Gate, Ticket, Verdict
from gatekeeper.job import Job, ProxyStart, State
from gatekeeper.learning import Lesson, Observation, carried_work, lesson, needs_oom_check
from gatekeeper.memory.meter import Meter, SocketFinder, backend_process
from gatekeeper.memory.oom import OomKills
from gatekeeper.net.copy import abort
from gatekeeper.net.liveness import ClientWatch
from gatekeeper.net.proxy_header import Malformed, ProxyHeader
from gatekeeper.net.proxy_read import read_proxy_header
from gatekeeper.net.sockqueue import receive_memory_of
from gatekeeper.net.window import hold_narrow, is_narrow, open_window
from gatekeeper.observe.escape import printable
from gatekeeper.observe.logbudget import LogBudget
from gatekeeper.observe.units import format_bytes
from gatekeeper.outcome import CUT_OFF, Outcome
from gatekeeper.outcome import Verdict as Ending
from gatekeeper.pauses import Pauses

log = logging.getLogger("gatekeeper")

# A trusted director writes its PROXY header with, or just before, the client's
# first bytes; one that has not within this long is not sending one (the
# distcc client's own connect timeout is 4 s).
PROXY_HEADER_TIMEOUT = 3.0

# Queued jobs estimated again when the unknown-job estimate moves: those the
# admission decisions can reach soon (admission.BACKFILL_WINDOW is 64), so a
# job end costs O(this) however long the queue, not O(queue).
REESTIMATE_LIMIT = 64


class Runner(Protocol):
    """How an admitted job runs: `job.ProxyJobs` or `inetd.job.InetdJobs`."""

    def prepare(self, stream: trio.SocketStream, job: Job, ticket: Ticket,
                waited: bool) -> ProxyStart | None: ...

    async def run(self, stream: trio.SocketStream, job: Job, ticket: Ticket,
                  start: ProxyStart | None) -> None: ...

    def drop(self, start: ProxyStart | None) -> None: ...


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


class Connections:
    """Runs each accepted connection's task and knows the live ones (for /status)."""

    def __init__(self, config: Config, gate: Gate, runner: Runner, *, watch: ClientWatch,
                 meter: Meter, book: FootprintBook, oom: OomKills,
                 on_end: Callable[[Job], None], pauses: Pauses | None = None,
                 ledger: Ledger | None = None) -> None:
        self.config = config
        self.gate = gate
        self.runner = runner
        self.watch = watch
        self.meter = meter
        self.book = book
        self.oom = oom
        self.on_end = on_end
        self.pauses = pauses
        """Freezes running jobs when memory runs out (None: pausing is off)."""
        self.repeatable_lines = {Outcome.DENIED: LogBudget(), Outcome.ARGV_POLICY: LogBudget(),
                                 Outcome.PROXY_HEADER: LogBudget(),
                                 Outcome.CLIENT_QUEUE_FULL: LogBudget(),
                                 Outcome.QUEUE_FULL: LogBudget()}
        """End lines any peer can cause at will, each kind rate-limited."""
        self.live: dict[int, Job] = {}
        """Live connections (by id), so /status can name the peers queued."""
        self.by_ticket: dict[int, Job] = {}
        """Live connections that hold a gate ticket, by its id."""
        self.ledger = ledger
        """This box's own measurements, for its peers (farm/ledger.py)."""
        self.estimates = Accuracy()
        """How good the estimates of finished jobs were."""
        self._queued_memory: tuple[float, int] | None = None

    def mark_admitted(self, job: Job) -> None:
        """The job has its slot: when, and the OOM-kill count to judge it by."""
        now = trio.current_time()
        job.mark_admitted(now, self.oom.baseline(now))

    def queued_memory(self) -> int:
        """(Cached for a second: /status, the page, the farm view, peers and
        scrapes may all ask at once.)"""
        now = trio.current_time()
        if self._queued_memory is None or now - self._queued_memory[0] >= 1.0:
            self._queued_memory = (now, self._read_queued_memory())
        return self._queued_memory[1]

    def _read_queued_memory(self) -> int:
        """Kernel memory the queued connections' receive queues hold now (the
        request bytes that came before the job's admission), in bytes: a few
        syscalls each (about 3 us), so read for /status and metrics, not for
        agent checks or decisions."""
        return sum(receive_memory_of(fd) for fd in self.watch.fds())

    def queue_peers(self) -> dict[int, tuple[str, str | None]]:
        """Each ticket's (peer, job) for /status; the job's name escaped (the
        client names it)."""
        return {j.ticket: (j.peer, printable(j.name) if j.name else None)
                for j in self.live.values() if j.ticket is not None}

    async def handle(self, stream: trio.SocketStream) -> None:
        peer, host = describe_peer(stream)
        job = Job(peer=peer, accepted=trio.current_time())
        # Read before a long head widens it (distcc/peek.py), whatever
        # --queued-window says now (a socket-activated listener keeps the buffer
        # an earlier run gave it): one getsockopt.
        job.narrow = is_narrow(stream.socket)  # type: ignore[arg-type]
        if job.narrow:
            hold_narrow(stream.socket)  # type: ignore[arg-type]
        self.live[id(job)] = job
        try:
            await self._handle(stream, host, job)
        finally:
            if job.outcome is None:
                job.settle(CUT_OFF)  # cancelled while it ran: the drain deadline
            job.state = State.DONE
            job.ended = trio.current_time()
            # Log before closing: the close is a checkpoint, and under
            # cancellation nothing after it would run.
            if log.isEnabledFor(logging.INFO):
                self._log_end(job)
            del self.live[id(job)]
            if job.ticket is not None:
                self.by_ticket.pop(job.ticket, None)
            self.on_end(job)
            self.gate.notify_watchers()  # /status lists connections
            stream.socket.close()  # no checkpoint: nothing after it to lose

    def _log_end(self, job: Job) -> None:
        if job.director_own and job.outcome is Outcome.CLIENT_GONE:
            # The director's own connection that asked for nothing: its health
            # check (HAProxy `check check-send-proxy`), every few seconds.
            # Counted (rejected client-gone), not logged.
            return
        budget = self.repeatable_lines.get(job.outcome) if job.outcome else None
        if budget is not None:  # a peer can repeat these at will
            unwritten = budget.admit(trio.current_time())
            if unwritten is None:
                return
            if unwritten:
                assert job.outcome is not None
                log.info("%d %s connections were not logged (more than %d a second; "
                         "gatekeeper_rejected_total counts them all)", unwritten,
                         job.outcome.value, budget.burst)
        log.info("%s", job.line(), extra={"fields": job.fields()})

    async def _handle(self, stream: trio.SocketStream, host: str | None, job: Job) -> None:
        trusted = self.config.trusted_proxies
        if host is not None and trusted is not None and trusted.permits(host):
            # A director: the client is the one its PROXY header names.
            header: ProxyHeader | Malformed = Malformed(
                f"no whole PROXY header within {PROXY_HEADER_TIMEOUT:g}s")
            with trio.move_on_after(PROXY_HEADER_TIMEOUT):
                header = await read_proxy_header(stream.socket)
            if isinstance(header, Malformed):
                job.outcome, job.detail = Outcome.PROXY_HEADER, header.why
                return
            if header.source is not None:
                host, port = header.source
                job.peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            else:
                job.director_own = True
        if host is not None and not self.config.allow.permits(host):
            job.settle(Outcome.DENIED)
            return
        if self.config.identify:
            # Before joining the queue, so a known compile's learned footprint
            # counts from its first admission decision on, and a command line
            # the policy refuses never takes a place.
            policy = self.config.argv_policy
            head = await identify(stream.socket, IDENTIFY_GRACE if policy is None
                                  else self.config.request_idle_timeout,
                                  want_doti=policy is not None)
            job.speaks = speaks(head)
            if job.director_own and head is NOT_DISTCC:
                # The director's health check (LOCAL header, then nothing):
                # not a job, never queued nor sent to the backend.
                job.settle(Outcome.CLIENT_GONE)
                return
            if isinstance(head, DistccJob):
                job.key, job.name = head.key, head.output
                job.request_bytes = head.request_bytes
                job.features = head.features
            if policy is not None:
                refusal = refusal_of(policy, head)
                if refusal is not None:
                    # (Its end line says why, rate-limited like a denied peer's.)
                    job.outcome, job.detail = Outcome.ARGV_POLICY, refusal
                    return
        job.estimate, job.estimate_from = self.book.judge(job.key, job.features)
        key = self.config.fair_by.key(host)
        weight = self.config.priorities.weight(host)
        async with self.gate.ticket(job.estimate, key=key, weight=weight,
                                    duration=self.book.duration(job.key, job.features),
                                    client=host) as ticket:
            job.ticket = ticket.job
            self.by_ticket[ticket.job] = job
            if ticket.refused is not None:
                job.settle(Outcome(ticket.refused.value))
                return
            # A job admitted the moment it arrived never waited: a FIN it sent
            # already is a request-then-shutdown, not a client that gave up.
            waited = not ticket.admitted
            job.state = State.QUEUED
            start = self.runner.prepare(stream, job, ticket, waited)
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
                moving = start is not None and start.moving is not None
                if not moving and (gone or (waited and verdict is Verdict.ADMITTED
                                            and self.watch.is_gone(stream.socket))):
                    job.settle(Outcome.CLIENT_GONE)
                    return
                if verdict is not Verdict.ADMITTED:
                    job.settle(Outcome(verdict.value))
                    return
                if job.admitted is None:
                    if job.narrow:
                        open_window(stream.socket)  # type: ignore[arg-type]
                    self.mark_admitted(job)
                with self.meter.measuring(
                        lambda hints, finder: _locate(job, hints, finder),
                        lambda usage: self.gate.observe(ticket, usage)) as usage:
                    job.usage = usage
                    if job.state is State.HANDED_OFF:  # done before its task got here
                        usage.stop()
                    cut_why: list[str] = []
                    with trio.CancelScope() as cutting:
                        def cut(why: str) -> None:
                            cut_why.append(why)
                            cutting.cancel()

                        with (self.pauses.pausable(job, ticket, cut)
                              if self.pauses is not None else contextlib.nullcontext()):
                            await self.runner.run(stream, job, ticket, start)
                    if cut_why and cutting.cancelled_caught:
                        # Reset, not a clean end: the client compiles it locally.
                        abort(stream)
                        job.settle(Ending(Outcome.PAUSE_TIMEOUT, cut_why[0]))
                if usage.samples or usage.exact:
                    job.peak = usage.peak
                    self._learn(job, Observation(usage.peak, usage.samples, usage.exact))
            finally:
                self.runner.drop(start)

    def _learn(self, job: Job, seen: Observation) -> None:
        """Learn from a job that ran to its end (see `learning`)."""
        outcome = job.outcome
        assert outcome is not None
        carried = carried_work(identified=(job.key is not None) if self.config.identify
                               else None, bytes_in=job.bytes_in, bytes_out=job.bytes_out)
        peak = seen.peak
        if needs_oom_check(outcome, job.compile):
            before = job.oom_kills
            after = self.oom.count() if before is not None else None
            job.oom_seen = before is not None and after is not None and after > before
        teaching = lesson(outcome, job.compile, oom_struck=job.oom_seen, carried=carried,
                          observed=seen.observed)
        if teaching.lesson is Lesson.CUT_SHORT:
            if job.estimate_from is not None:
                self.estimates.record_cut(job.estimate_from)
            self.book.learn_cut_short(job.key, peak)
            log.warning("job %s was cut short at %s (%s); it needs more than that",
                        printable(job.name or job.key or job.peer), format_bytes(peak),
                        teaching.why)
        elif teaching.lesson is Lesson.LEARN:
            seconds = (trio.current_time() - job.admitted if job.admitted is not None
                       else None)
            if job.estimate is not None and job.estimate_from is not None:
                self.estimates.record(job.estimate_from, job.estimate, peak)
            self.book.learn(job.key, peak, seconds=seconds, feats=job.features)
            if self.ledger is not None and job.key is not None:
                feats = job.features
                self.ledger.record(Entry(job.key, peak, feats.encoding if feats else None,
                                         feats.size if feats else None))
            self.reestimate_queued()

    def reestimate_queued(self) -> None:
        """The book learned: the jobs queued on a guess (a cold build's make -jN
        queues many at once) are estimated again, head first, as far as
        backfilling looks (REESTIMATE_LIMIT)."""
        changed: list[tuple[int, int]] = []
        for ticket, _ in self.gate.admission.queue_view(REESTIMATE_LIMIT):
            job = self.by_ticket.get(ticket)
            if job is None or job.estimate_from is Source.LEARNED:
                continue
            estimate, source = self.book.judge(job.key, job.features)
            job.estimate_from = source
            if estimate != job.estimate:
                job.estimate = estimate
                changed.append((ticket, estimate))
        if changed:
            self.gate.reestimate_many(changed)


def refusal_of(policy: ArgvPolicy, head: DistccJob | Unparsed) -> str | None:
    """Why the argv policy refuses this request head, or None. Sound: what
    gatekeeper could not read, but distccd might, is refused too."""
    if isinstance(head, DistccJob):
        return policy.check(head.argv)
    if head is UNREADABLE:
        return "request head not readable by gatekeeper's strict parser or past its bounds"
    if head is INCOMPLETE:
        return "request head incomplete (client paused or left mid-head)"
    return None  # not a distcc request at all: distccd will not run it either


def _locate(job: Job, hints: Sequence[int], finder: SocketFinder) -> int | None:
    """The job's root process: the inetd child, or the backend process holding
    the other end of our connection. Called in a worker thread."""
    if job.pid is not None:
        return job.pid
    if job.backend_ends is not None:
        ours, theirs = job.backend_ends
        return backend_process(ours, theirs, hints, finder)
    return None
