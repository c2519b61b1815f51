"""The trio side of admission: waiting for a decision and carrying it out.

`Admission` decides; the `Gate` reads the clock and the memory source, feeds
them in, and wakes the waiting connection tasks. Decisions are taken
synchronously at every event (arrival, departure, job end), so a finished job
hands its slot to the next one without a trip through a scheduler task; the
gate's own task only exists for time: queue timeouts, and re-reading memory
while the head is held for memory. When nothing is queued it sleeps with no
timer at all.
"""

from __future__ import annotations

import enum
import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import trio

from gatekeeper.admission import Admission, Client, Hold, JobId, Key, Refusal, Snapshot
from gatekeeper.memory.sources import MemorySource
from gatekeeper.observe.units import format_mib

log = logging.getLogger("gatekeeper")

# How often memory is re-read while a free slot waits only for memory. Short
# enough that a job starts within a blink of memory returning, long enough to
# cost nothing (a reading is a few microseconds).
MEMORY_RECHECK_INTERVAL = 0.1


class Verdict(enum.Enum):
    """How a wait ended (besides the waiter's own cancellation)."""

    ADMITTED = "admitted"
    EXPIRED = "queue-timeout"
    DRAINED = "draining"


@dataclass(eq=False, slots=True)
class Ticket:
    """One connection's place in the gate, from arrival to release."""

    job: JobId
    refused: Refusal | None
    verdict: Verdict | None = None
    event: trio.Event | None = None
    on_admit: Callable[[], None] | None = None
    """Run at the moment of admission, synchronously, in whichever task caused
    it (a release, the timer): lets the server start the job's data path
    before any task switch. Must not raise."""

    @property
    def admitted(self) -> bool:
        return self.verdict is Verdict.ADMITTED


class TicketScope:
    """The async context manager `Gate.ticket` returns. A plain class, not
    @asynccontextmanager: one is entered per connection, and the generator
    machinery cost more than the arrival itself."""

    __slots__ = ("_client", "_duration", "_footprint", "_gate", "_key", "_ticket", "_weight")

    def __init__(self, gate: Gate, footprint: int | None, key: Key, weight: int,
                 duration: float | None, client: Client) -> None:
        self._gate, self._footprint, self._key, self._weight = gate, footprint, key, weight
        self._duration, self._client = duration, client
        self._ticket: Ticket | None = None

    async def __aenter__(self) -> Ticket:
        self._ticket = self._gate._arrive(self._footprint, self._key, self._weight,
                                          self._duration, self._client)
        return self._ticket

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._ticket is not None
        self._gate._release(self._ticket)


class Gate:
    def __init__(self, admission: Admission, memory: MemorySource, *,
                 clock: Callable[[], float] = trio.current_time,
                 max_pressure: float | None = None) -> None:
        self.admission = admission
        self.memory = memory
        self.max_pressure = max_pressure
        self.pressure: float | None = None
        self._clock = clock
        self._ids = itertools.count(1)
        self._tickets: dict[JobId, Ticket] = {}
        self._changed = trio.Event()
        self._armed = -math.inf
        """When the timer task will next wake by itself (-inf: not running yet)."""
        self._last_hold: Hold | None = None
        self._watchers = trio.lowlevel.ParkingLot()

    def ticket(self, footprint: int | None = None, *, key: Key = None,
               weight: int = 1, duration: float | None = None,
               client: Client = None) -> TicketScope:
        """``async with gate.ticket(...) as ticket``: join the queue, expected to
        need `footprint` bytes (None: the policy's default) for `duration`
        seconds (None: unknown); the slot or queue place is released on exit,
        exactly once, however the block ends (including cancellation)."""
        return TicketScope(self, footprint, key, weight, duration, client)

    def _arrive(self, footprint: int | None, key: Key, weight: int,
                duration: float | None = None, client: Client = None) -> Ticket:
        job = next(self._ids)
        refused = self.admission.arrive(job, self._clock(), footprint, key=key, weight=weight,
                                        duration=duration, client=client)
        ticket = Ticket(job, refused)
        if refused is None:
            self._tickets[job] = ticket
            ticket.event = trio.Event()
            self._decide()
        return ticket

    async def wait(self, ticket: Ticket) -> Verdict:
        """Wait until the ticket is admitted, expired or drained. Cancelling the
        wait leaves the ticket queued; leaving `ticket()` then abandons it."""
        assert ticket.event is not None
        await ticket.event.wait()
        assert ticket.verdict is not None
        return ticket.verdict

    def release(self, ticket: Ticket) -> None:
        """Give the slot (or queue place) back now, before the ticket's scope
        ends: the data path does this the moment a job's bytes are done, so the
        next job need not wait for the finished one's bookkeeping. The scope's
        exit then does nothing."""
        self._release(ticket)

    def _release(self, ticket: Ticket) -> None:
        if ticket.refused is not None or self._tickets.pop(ticket.job, None) is None:
            return  # refused, or released already
        if self.admission.is_running(ticket.job):
            self.admission.finish(ticket.job)
        elif self.admission.is_queued(ticket.job):
            self.admission.abandon(ticket.job)
        else:
            return  # expired or drained: the policy already let it go
        self._decide()

    def observe(self, ticket: Ticket, usage: int) -> None:
        """A running ticket's measured memory usage (shrinks its reservation)."""
        if ticket.refused is None and self.admission.is_running(ticket.job):
            self.admission.observe(ticket.job, usage)
            if self.admission.hold in (Hold.MEMORY, Hold.PRESSURE):
                self._decide()
            else:
                self._watchers.unpark_all()  # the reservation changed: status watchers

    def reestimate(self, job: JobId, footprint: int) -> None:
        """A queued job's footprint, estimated again (the book learned since it
        arrived): it may now fit."""
        self.reestimate_many([(job, footprint)])

    def reestimate_many(self, estimates: list[tuple[JobId, int]]) -> None:
        """Several at once, then one admission decision (not one per job: a
        job end may move the estimates of 64 queued jobs)."""
        moved = False
        for job, footprint in estimates:
            if self.admission.is_queued(job):
                self.admission.estimate(job, footprint)
                moved = True
        if moved:
            self._decide()

    def pause(self, ticket: Ticket) -> None:
        """A running ticket's job was frozen (pauses.py): nothing starts meanwhile."""
        if ticket.refused is None and self.admission.is_running(ticket.job):
            self.admission.pause(ticket.job)
            self._log_hold()
            self._watchers.unpark_all()

    def unpause(self, ticket: Ticket) -> None:
        """The job goes on: jobs may start again if memory allows."""
        if ticket.refused is None and self.admission.is_running(ticket.job):
            self.admission.unpause(ticket.job)
            self._decide()

    def drain(self) -> int:
        """Refuse new arrivals and turn away everyone queued; returns how many."""
        drained = self.admission.drain()
        for job in drained:
            self._settle(job, Verdict.DRAINED)
        self._wake_timer()
        return len(drained)

    def snapshot(self) -> Snapshot:
        return self.admission.statistics()

    def notify_watchers(self) -> None:
        """Wake `wait_changed` waiters for a change outside the policy (a
        connection's handler finished: it is gone from /status)."""
        self._watchers.unpark_all()

    async def wait_changed(self) -> None:
        """Wait until the next time the policy is consulted (for status reporting
        and tests, which must not poll)."""
        await self._watchers.park()

    def _decide(self) -> None:
        """Run the policy now and carry out what it says."""
        admission = self.admission
        now = self._clock()
        for job in admission.expire(now):
            self._settle(job, Verdict.EXPIRED)
        if admission.wants_memory_reading:
            available = self.memory.available()
            for job in admission.admit(now, available, pressure_high=self._pressure_high()):
                self._settle(job, Verdict.ADMITTED)
        self._log_hold()
        self._wake_timer()

    def available_now(self) -> int | None:
        """A fresh memory reading (a few µs), or the policy's last one if it
        fails. The policy reads memory only while jobs queue, so its own may be
        old: the status picture and sd_notify's STATUS ask here instead."""
        try:
            return self.memory.available()
        except (OSError, ValueError):
            return self.admission.statistics().available

    def _pressure_high(self) -> bool:
        if self.max_pressure is None:
            return False
        self.pressure = self.memory.pressure()
        return self.pressure is not None and self.pressure > self.max_pressure

    def _settle(self, job: JobId, verdict: Verdict) -> None:
        ticket = self._tickets[job]
        ticket.verdict = verdict
        assert ticket.event is not None
        try:
            if verdict is Verdict.ADMITTED and ticket.on_admit is not None:
                ticket.on_admit()  # first: its task need not run for the job to start
        finally:
            ticket.event.set()  # even if on_admit broke its promise not to raise

    def _wake_timer(self) -> None:
        # Only if the timer must now fire earlier than it is set to: waking it
        # on every arrival and release would cost a task switch each.
        if self._next_wakeup() < self._armed:
            self._changed.set()
        self._watchers.unpark_all()

    def _log_hold(self) -> None:
        hold = self.admission.hold
        if hold is self._last_hold:
            return
        self._last_hold = hold
        if hold is Hold.MEMORY:
            s = self.admission.statistics()
            explain = self.memory.explain()
            log.info("holding %d: %s available < %s min free + %s reserved + %s next job%s",
                     s.queued, _mib(s.available), _mib(s.min_free), _mib(s.reserved),
                     _mib(s.head_footprint), f" ({explain})" if explain else "")
        elif hold is Hold.PRESSURE:
            log.info("holding %d: memory pressure %.1f%% > %.1f%%",
                     self.admission.queued, self.pressure or 0.0, self.max_pressure or 0.0)
        elif hold is Hold.PAUSED:
            log.info("holding %d: %d running job(s) paused for memory",
                     self.admission.queued, self.admission.paused)
        elif hold is Hold.SLOTS:
            s = self.admission.statistics()
            log.debug("holding %d: %d/%d running", s.queued, s.running, s.max_jobs)

    def _next_wakeup(self) -> float:
        deadline = self.admission.next_deadline()
        wakeup = math.inf if deadline is None else deadline
        if self.admission.hold in (Hold.MEMORY, Hold.PRESSURE):
            wakeup = min(wakeup, self._clock() + MEMORY_RECHECK_INTERVAL)
        return wakeup

    async def run(self) -> None:
        """The gate's timer: sleeps until the next queue deadline or memory
        re-check, or until an event changes either. Runs in the server nursery."""
        while True:
            self._changed = trio.Event()
            self._armed = self._next_wakeup()
            with trio.move_on_at(self._armed):
                await self._changed.wait()
                continue  # an event already decided; just recompute the wakeup
            self._armed = math.inf
            self._decide()


def _mib(n: int | None) -> str:
    return format_mib(n)
