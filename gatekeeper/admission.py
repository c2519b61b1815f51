"""The admission policy: who runs next, and who must keep waiting.

This is the whole of gatekeeper's judgement, as a plain object in the style of
h11's state machine: it does no I/O and never reads a clock. The trio shell
(`gate.py`) feeds it events (a job arrived, left the queue, finished) together
with the current time and a memory reading, and carries out the decisions it
returns (admit these jobs, expire those). Because of that it can be tested
exhaustively, without sockets and without waiting.

Invariants (checked by the property tests after every step):

* ``running <= max_jobs``.
* ``queued <= max_queue``; an arrival past that is refused, never queued.
* ``queued(client) <= max_queued_per_client`` for every client (the peer's
  address, whatever the fairness key): one peer cannot fill the queue and turn
  everyone else away; its arrival past that is refused, never queued.
* Fair queueing between keys (a client, a subnet; the shell decides): one FIFO
  per key, served round-robin, a key getting `weight` turns in a row. Within a
  key, admission order equals arrival order; with one key (or fairness off)
  that is plain FIFO. The job whose turn it is blocks everyone when it cannot
  run (no slot, not enough memory) -- letting a later job jump ahead would
  starve the first one. A key at `max_per_key` running jobs is skipped, not
  refused: its jobs wait for one of its own to end. Between two turns of a
  waiting key, every other key gets at most its weight in turns: no key starves.
* The memory rule: the head is admitted only while
  ``available - reserved - footprint(head) >= min_free``. ``available`` is the
  caller's fresh reading; ``footprint`` is what the job is expected to need at
  its peak; ``reserved`` is the growth still expected from running jobs: each
  reserves ``footprint - observed usage`` (never below zero) until its real
  usage shows up in ``available``. A compiler starts small and grows for
  seconds, so without reservations one reading taken while memory looked free
  would let a whole burst in, all growing past the limit together.
* While a running job is paused (`pause`: memory ran out under it, see
  `pausing`), no job starts: the memory it will need when it goes on comes
  first. A paused job keeps its slot; `unpause` or its `finish` ends that.
* If nothing runs and memory is short because of other processes, the queue
  simply holds until memory returns or queue timeouts fire: there is no state
  in which the policy waits for an event that cannot come.
* Every admitted job is released exactly once (`finish`); every queued job
  leaves the queue exactly once (admitted, expired, abandoned or drained).
* Queue deadlines are ``arrival + queue_timeout``, the same span for all, so the
  earliest deadline is always the head's: expiry never scans the queue.

Every operation is O(1) per job it touches, whatever the queue length,
except skipping keys that are at their per-key limit: O(keys with queued jobs),
and a backfill attempt while the head waits for memory: O(BACKFILL_WINDOW +
running log running).

Backfilling (`Limits.backfill`, `backfill.py`): while the head fails the memory
rule, a later job may start if it cannot delay the head (it ends before the
head's shadow time by its learned duration, or fits what the head leaves spare
then) -- the one exception to arrival order within a key. With `max_per_key`,
a job of the head's own key is backfilled only while a slot of that key stays
free for the head.
"""

from __future__ import annotations

import enum
import itertools
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

from gatekeeper.backfill import backfill, shadow

JobId = int
Key = str | None
"""Who a job belongs to for fairness (None: the one shared queue)."""
Client = str | None
"""A queued job's client (its peer's address), for the per-client queue cap."""


class Hold(enum.Enum):
    """Why the head of the queue is waiting (for logs and status)."""

    SLOTS = "slots"
    PER_KEY = "per-client"
    MEMORY = "memory"
    PRESSURE = "pressure"
    PAUSED = "paused"
    DRAINING = "draining"


def memory_fits(available: int, reserved: int, footprint: int, min_free: int) -> bool:
    """The memory rule, the one place it is written: a job expected to peak at
    `footprint` may start while `min_free` bytes would still be left after it
    and the growth `reserved` for the running jobs. The health verdict
    (observe.agent) asks the same question for a new unknown job."""
    return available - reserved - footprint >= min_free


class Refusal(enum.Enum):
    """Why an arrival was refused instead of queued."""

    QUEUE_FULL = "queue-full"
    CLIENT_QUEUE_FULL = "client-queue-full"
    """The arrival's client already has max_queued_per_client jobs queued."""
    DRAINING = "draining"


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Static limits; validated here so a bad value can never reach the policy."""

    max_jobs: int
    min_free: int
    """Bytes of available memory that must remain for a job to start."""
    max_queue: int
    queue_timeout: float
    default_footprint: int = 0
    """Bytes a job is expected to need when its arrival names no estimate."""
    max_per_key: int | None = None
    """At most this many running jobs per key (None: no such limit)."""
    max_queued_per_client: int | None = None
    """At most this many queued jobs per client (None: no such limit)."""
    backfill: bool = False
    """While the job whose turn it is waits for memory, let later jobs start
    that cannot delay it (`backfill`)."""

    def __post_init__(self) -> None:
        if self.max_jobs < 1:
            raise ValueError("max_jobs must be at least 1")
        if self.min_free < 0:
            raise ValueError("min_free must not be negative")
        if self.max_queue < 0:
            raise ValueError("max_queue must not be negative")
        if not self.queue_timeout > 0:
            raise ValueError("queue_timeout must be positive")
        if self.default_footprint < 0:
            raise ValueError("default_footprint must not be negative")
        if self.max_per_key is not None and self.max_per_key < 1:
            raise ValueError("max_per_key must be at least 1")
        if self.max_queued_per_client is not None and self.max_queued_per_client < 1:
            raise ValueError("max_queued_per_client must be at least 1")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A frozen picture of the policy, for status, metrics and tests."""

    running: int
    queued: int
    max_jobs: int
    max_queue: int
    min_free: int
    reserved: int
    """Growth still expected from running jobs (bytes)."""
    head_footprint: int | None
    hold: Hold | None
    available: int | None
    """The last memory reading the policy was given (None before the first)."""
    oldest_arrival: float | None
    admitted_total: int
    finished_total: int
    expired_total: int
    abandoned_total: int
    refused_total: dict[str, int] = field(default_factory=dict)
    backfilled_total: int = 0
    """Of admitted_total, those started ahead of a head waiting for memory."""
    keys: dict[str, tuple[int, int]] = field(default_factory=dict)
    """(queued, running) of the busiest keys (at most TOP_KEYS)."""


# Status shows this many keys at most: bounded cardinality for metrics labels.
TOP_KEYS = 10
# Backfilling looks this far behind the waiting head (Slurm's bf_max_job_test
# in spirit): a queue of 10,000 costs no more per decision than one of 64, and
# a build's make -jN rarely queues more distinct work than that at once.
BACKFILL_WINDOW = 64


class Admission:
    """FIFO queue, running set and memory rule; see the module docstring."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        # job -> deadline; OrderedDict so the head is O(1) to find and pop even
        # after many deletions (a plain dict's iteration would skip tombstones).
        self._queue: OrderedDict[JobId, float] = OrderedDict()
        self._arrived: dict[JobId, float] = {}
        self._footprint: dict[JobId, int] = {}  # queued and running jobs
        self._usage: dict[JobId, int] = {}  # running jobs: last observed usage
        self._reserved = 0  # sum over running jobs of max(0, footprint - usage)
        self._running: set[JobId] = set()
        self._key: dict[JobId, Key] = {}  # queued and running jobs
        self._by_key: dict[Key, OrderedDict[JobId, None]] = {}  # queued, per key
        self._ring: deque[Key] = deque()  # keys with queued jobs, whose turn first
        self._turns = 0  # turns the key at the ring's front has had in a row
        self._weight: dict[Key, int] = {}
        self._running_by_key: Counter[Key] = Counter()
        self._client: dict[JobId, Client] = {}  # queued jobs that name a client
        self._queued_by_client: Counter[Client] = Counter()
        self._draining = False
        self._hold: Hold | None = None
        self._pressure_high = False
        self._available: int | None = None
        self._admitted_total = 0
        self._finished_total = 0
        self._expired_total = 0
        self._abandoned_total = 0
        self._refused: dict[Refusal, int] = {r: 0 for r in Refusal}
        self._duration: dict[JobId, float | None] = {}  # queued: expected run time
        self._ends: dict[JobId, float | None] = {}  # running: expected end
        self._backfilled_total = 0
        self._paused: set[JobId] = set()  # running jobs frozen for memory

    # -- events -----------------------------------------------------------

    def arrive(self, job: JobId, now: float, footprint: int | None = None, *,
               key: Key = None, weight: int = 1,
               duration: float | None = None, client: Client = None) -> Refusal | None:
        """A new connection wants to run, expected to need `footprint` bytes at
        its peak (None: the default) for `duration` seconds (None: unknown), on
        behalf of `key` whose turns count `weight` in a row, from `client` (its
        peer; None: not counted against max_queued_per_client). Returns why it
        is refused, or None if queued."""
        if weight < 1:
            raise ValueError("weight must be at least 1")
        if duration is not None and not 0 <= duration < float("inf"):
            raise ValueError("duration must be a finite number of seconds")
        if job in self._arrived or job in self._running:
            raise ValueError(f"job {job} is already known")
        refusal: Refusal | None = None
        if self._draining:
            refusal = Refusal.DRAINING
        elif (client is not None and self.limits.max_queued_per_client is not None
              and self._queued_by_client[client] >= self.limits.max_queued_per_client):
            refusal = Refusal.CLIENT_QUEUE_FULL
        elif len(self._queue) >= self.limits.max_queue:
            refusal = Refusal.QUEUE_FULL
        if refusal is not None:
            self._refused[refusal] += 1
            return refusal
        self._queue[job] = now + self.limits.queue_timeout
        self._arrived[job] = now
        self._footprint[job] = self.limits.default_footprint if footprint is None else footprint
        self._key[job] = key
        self._weight[key] = weight
        self._duration[job] = duration
        if client is not None:
            self._client[job] = client
            self._queued_by_client[client] += 1
        fifo = self._by_key.get(key)
        if fifo is None:
            fifo = self._by_key[key] = OrderedDict()
            self._ring.append(key)
        fifo[job] = None
        self._update_hold()
        return None

    def _uncount(self, job: JobId) -> None:
        """A queued job no longer counts against its client's queue cap."""
        client = self._client.pop(job, None)
        if client is not None:
            self._queued_by_client[client] -= 1
            if not self._queued_by_client[client]:
                del self._queued_by_client[client]

    def _unqueue(self, job: JobId) -> None:
        """Take a job out of its key's FIFO (the global queue is the caller's)."""
        self._uncount(job)
        key = self._key[job]
        fifo = self._by_key[key]
        del fifo[job]
        if not fifo:
            del self._by_key[key]
            if self._ring[0] == key:
                self._ring.popleft()
                self._turns = 0
            else:
                self._ring.remove(key)

    def _forget(self, job: JobId) -> None:
        """A job that never ran leaves for good."""
        del self._arrived[job]
        del self._footprint[job]
        del self._key[job]
        del self._duration[job]

    def estimate(self, job: JobId, footprint: int) -> None:
        """A better estimate of a job's footprint (e.g. once its request named the
        file it compiles). For a running job it moves the reservation too.
        Ignored for jobs that have left."""
        if footprint < 0:
            raise ValueError("footprint must not be negative")
        if job in self._queue:
            self._footprint[job] = footprint
        elif job in self._running:
            before = self._reservation(job)
            self._footprint[job] = footprint
            self._reserved += self._reservation(job) - before

    def observe(self, job: JobId, usage: int) -> None:
        """A running job's current memory usage, as measured. Its reservation
        shrinks by what already shows in the memory reading."""
        if job not in self._running:
            return
        before = self._reservation(job)
        self._usage[job] = max(0, usage)
        self._reserved += self._reservation(job) - before

    def _reservation(self, job: JobId) -> int:
        return max(0, self._footprint[job] - self._usage.get(job, 0))

    def pause(self, job: JobId) -> None:
        """A running job was frozen: nothing starts until it goes on or ends."""
        if job in self._running:
            self._paused.add(job)
            self._update_hold()

    def unpause(self, job: JobId) -> None:
        """A paused job goes on (thawed); the caller then tries `admit`."""
        self._paused.discard(job)
        self._update_hold()

    @property
    def paused(self) -> int:
        return len(self._paused)

    def abandon(self, job: JobId) -> None:
        """A queued job left before it was admitted (client gone, cancelled)."""
        del self._queue[job]
        self._unqueue(job)
        self._forget(job)
        self._abandoned_total += 1
        self._update_hold()

    def finish(self, job: JobId) -> None:
        """A running job ended, however it ended. Frees its slot."""
        self._running.remove(job)
        self._paused.discard(job)
        self._reserved -= self._reservation(job)
        del self._footprint[job]
        self._usage.pop(job, None)
        del self._ends[job]
        key = self._key.pop(job)
        self._running_by_key[key] -= 1
        if not self._running_by_key[key]:
            del self._running_by_key[key]
        self._finished_total += 1
        self._update_hold()

    def drain(self) -> list[JobId]:
        """Stop taking new jobs; returns every queued job, now removed from the queue."""
        self._draining = True
        drained = list(self._queue)
        self._queue.clear()
        for job in drained:
            self._uncount(job)
            self._forget(job)
        self._by_key.clear()
        self._ring.clear()
        self._turns = 0
        self._update_hold()
        return drained

    # -- decisions --------------------------------------------------------

    def expire(self, now: float) -> list[JobId]:
        """Remove and return the queued jobs whose queue timeout has passed."""
        expired: list[JobId] = []
        while self._queue:
            job, deadline = next(iter(self._queue.items()))
            if deadline > now:
                break
            self._queue.popitem(last=False)
            self._unqueue(job)
            self._forget(job)
            expired.append(job)
        self._expired_total += len(expired)
        if expired:
            self._update_hold()
        return expired

    @property
    def wants_memory_reading(self) -> bool:
        """True when a job could start if memory allows: the caller should read
        memory and call `admit`. False means `admit` would do nothing, so the
        shell can skip the reading (and its timer) entirely."""
        return (bool(self._queue) and len(self._running) < self.limits.max_jobs
                and self._hold is not Hold.PER_KEY)

    def admit(self, now: float, available: int, *, pressure_high: bool = False) -> list[JobId]:
        """Admit queued jobs, head first, while a slot is free and the memory
        rule passes with `available` bytes. `pressure_high` (memory pressure
        over its limit) holds everyone. Expired jobs are never admitted: the
        caller runs `expire(now)` first."""
        self._available = available
        self._pressure_high = pressure_high
        admitted: list[JobId] = []
        limits = self.limits
        while (self._queue and len(self._running) < limits.max_jobs and not pressure_high
               and not self._paused):
            job = self._candidate()
            if job is None:
                break  # every waiting key is at its per-key limit
            if not memory_fits(available, self._reserved, self._footprint[job],
                               limits.min_free):
                if limits.backfill:
                    self._backfill(job, now, available, admitted)
                break
            if self._queue[job] <= now:
                break  # the caller must expire it; never run a timed-out job
            key = self._key[job]
            if self._ring and self._ring[0] == key:
                self._turns += 1
                if self._turns >= self._weight[key]:
                    self._ring.rotate(-1)
                    self._turns = 0
            self._start(job, now)
            admitted.append(job)
        self._admitted_total += len(admitted)
        self._update_hold()
        return admitted

    def _start(self, job: JobId, now: float) -> None:
        """A queued job leaves the queue and runs (its key's turn is the caller's)."""
        del self._queue[job]
        del self._arrived[job]
        key = self._key[job]
        self._unqueue(job)
        self._running.add(job)
        self._running_by_key[key] += 1
        self._reserved += self._footprint[job]  # nothing of it shows yet
        duration = self._duration.pop(job)
        self._ends[job] = None if duration is None else now + duration

    def _backfill(self, head: JobId, now: float, available: int,
                  admitted: list[JobId]) -> None:
        """`head` waits for memory: start later jobs that cannot delay it
        (`backfill` says which), looking at the next BACKFILL_WINDOW queued jobs.
        They do not take the head's turn."""
        limits = self.limits
        found = shadow(now=now, headroom=available - self._reserved - limits.min_free,
                       free_slots=limits.max_jobs - len(self._running),
                       running=((self._footprint[j], self._ends[j]) for j in self._running),
                       need=self._footprint[head])
        if found is None:
            return
        limit = limits.max_per_key
        head_key = self._key[head]
        for job in list(itertools.islice(self._queue, BACKFILL_WINDOW + 1)):
            if len(self._running) >= limits.max_jobs:
                return
            if self._queue[job] <= now:
                continue
            key = self._key[job]
            # The head's own client keeps a slot free for the head: a job of
            # its started ahead must not take the per-client place it needs.
            room = 1 if key == head_key else 0
            if limit is not None and self._running_by_key[key] + room >= limit:
                continue
            footprint = self._footprint[job]
            if not memory_fits(available, self._reserved, footprint, limits.min_free):
                continue
            left = backfill(found, now=now, footprint=footprint,
                            duration=self._duration[job])
            if left is None:
                continue
            found = left
            self._start(job, now)
            admitted.append(job)
            self._backfilled_total += 1

    def _candidate(self) -> JobId | None:
        """The job whose turn it is: the head of the first key in the ring that is
        under its per-key limit (keys at their limit are passed over)."""
        limit = self.limits.max_per_key
        for _ in range(len(self._ring)):
            key = self._ring[0]
            if limit is None or self._running_by_key[key] < limit:
                return next(iter(self._by_key[key]))
            self._ring.rotate(-1)
            self._turns = 0
        return None

    def next_deadline(self) -> float | None:
        """When the head of the queue times out (None if the queue is empty)."""
        if not self._queue:
            return None
        return next(iter(self._queue.values()))

    # -- views ------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def reserved(self) -> int:
        """Growth still expected from running jobs, in bytes."""
        return self._reserved

    def footprint(self, job: JobId) -> int:
        return self._footprint[job]

    @property
    def hold(self) -> Hold | None:
        """Why the head of the queue is waiting, or None if nothing is queued."""
        return self._hold

    def is_queued(self, job: JobId) -> bool:
        return job in self._queue

    def is_running(self, job: JobId) -> bool:
        return job in self._running

    def queue_view(self, limit: int) -> list[tuple[JobId, float]]:
        """The first `limit` queued jobs with their arrival times, head first."""
        out: list[tuple[JobId, float]] = []
        for job in self._queue:
            if len(out) >= limit:
                break
            out.append((job, self._arrived[job]))
        return out

    def key_of(self, job: JobId) -> Key:
        return self._key[job]

    def statistics(self) -> Snapshot:
        oldest = next(iter(self._queue), None)
        head = self._peek_candidate()
        busiest = sorted(
            set(self._by_key) | set(self._running_by_key),
            key=lambda k: (-(len(self._by_key.get(k, ())) + self._running_by_key[k]), str(k)),
        )[:TOP_KEYS]
        return Snapshot(
            running=len(self._running),
            queued=len(self._queue),
            max_jobs=self.limits.max_jobs,
            max_queue=self.limits.max_queue,
            min_free=self.limits.min_free,
            reserved=self._reserved,
            head_footprint=None if head is None else self._footprint[head],
            hold=self._hold,
            available=self._available,
            oldest_arrival=None if oldest is None else self._arrived[oldest],
            admitted_total=self._admitted_total,
            finished_total=self._finished_total,
            expired_total=self._expired_total,
            abandoned_total=self._abandoned_total,
            refused_total={r.value: n for r, n in self._refused.items()},
            backfilled_total=self._backfilled_total,
            keys={("-" if k is None else k): (len(self._by_key.get(k, ())),
                                             self._running_by_key[k]) for k in busiest},
        )

    def _peek_candidate(self) -> JobId | None:
        """`_candidate` without moving the ring (for views)."""
        limit = self.limits.max_per_key
        for key in self._ring:
            if limit is None or self._running_by_key[key] < limit:
                return next(iter(self._by_key[key]))
        return None

    def _update_hold(self) -> None:
        if not self._queue:
            self._hold = None
        elif self._draining:
            self._hold = Hold.DRAINING
        elif len(self._running) >= self.limits.max_jobs:
            self._hold = Hold.SLOTS
        elif self._peek_candidate() is None:
            self._hold = Hold.PER_KEY
        elif self._pressure_high:
            self._hold = Hold.PRESSURE
        elif self._paused:
            self._hold = Hold.PAUSED
        else:
            # A slot is free yet something is queued: only memory holds it
            # (until the next `admit` proves otherwise).
            self._hold = Hold.MEMORY
