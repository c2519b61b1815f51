"""The pure admission core: scripted cases and property tests. No sockets, no clock."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gatekeeper.admission import Admission, Hold, Limits, Refusal

MiB = 2**20


def make(max_jobs: int = 2, min_free: int = 0, max_queue: int = 10,
         queue_timeout: float = 100.0, default_footprint: int = 0) -> Admission:
    return Admission(Limits(max_jobs=max_jobs, min_free=min_free, max_queue=max_queue,
                            queue_timeout=queue_timeout, default_footprint=default_footprint))


def test_admits_up_to_max_jobs_in_arrival_order() -> None:
    a = make(max_jobs=2)
    for job in (1, 2, 3):
        assert a.arrive(job, now=0.0) is None
    assert a.admit(0.0, available=10 * MiB) == [1, 2]
    assert (a.running, a.queued, a.hold) == (2, 1, Hold.SLOTS)
    assert a.admit(0.0, 10 * MiB) == []
    a.finish(1)
    assert a.admit(0.0, 10 * MiB) == [3]
    assert a.hold is None


def test_memory_rule_holds_head_and_everyone_behind_it() -> None:
    a = make(max_jobs=4, min_free=100 * MiB)
    a.arrive(1, 0.0)
    a.arrive(2, 0.0)
    assert a.admit(0.0, available=99 * MiB) == []
    assert a.hold is Hold.MEMORY
    assert a.wants_memory_reading
    assert a.admit(1.0, available=100 * MiB) == [1, 2]


def test_reservation_limits_a_burst_from_one_reading() -> None:
    a = make(max_jobs=8, min_free=100 * MiB, default_footprint=200 * MiB)
    for job in range(5):
        a.arrive(job, 0.0)
    # 550 MiB available: job 0 leaves 350, job 1 leaves 150, job 2 would leave -50.
    assert a.admit(0.0, 550 * MiB) == [0, 1]
    assert a.reserved == 400 * MiB
    assert a.hold is Hold.MEMORY
    # Memory did not change, and nothing of the running jobs shows yet: still held.
    assert a.admit(1.0, 550 * MiB) == []
    # Job 0 has grown to 150 MiB: the reading shows it, its reservation shrinks to 50.
    a.observe(0, 150 * MiB)
    assert a.reserved == 250 * MiB
    assert a.admit(2.0, 400 * MiB) == []  # 400 - 250 - 200 < 100
    a.finish(0)  # its memory comes back in the reading, its reservation goes
    assert a.reserved == 200 * MiB
    assert a.admit(3.0, 550 * MiB) == [2]


def test_per_job_footprints_and_estimates() -> None:
    a = make(max_jobs=8, min_free=0, default_footprint=10 * MiB)
    a.arrive(1, 0.0, footprint=900 * MiB)
    a.arrive(2, 0.0)
    assert a.footprint(2) == 10 * MiB
    assert a.admit(0.0, 500 * MiB) == []  # the heavy head holds everyone: FIFO
    a.estimate(1, 400 * MiB)  # its request named a file we know is lighter
    assert a.admit(0.0, 500 * MiB) == [1, 2]
    assert a.statistics().reserved == 410 * MiB
    a.observe(1, 1000 * MiB)  # over its estimate: reservation is zero, never negative
    assert a.reserved == 10 * MiB


def test_pressure_holds_everyone_until_it_falls() -> None:
    a = make(max_jobs=2)
    a.arrive(1, 0.0)
    assert a.admit(0.0, 10 * MiB, pressure_high=True) == []
    assert a.hold is Hold.PRESSURE
    assert a.wants_memory_reading
    assert a.admit(1.0, 10 * MiB) == [1]


def test_queue_full_refuses_and_counts() -> None:
    a = make(max_jobs=1, max_queue=1)
    assert a.arrive(1, 0.0) is None
    assert a.arrive(2, 0.0) is Refusal.QUEUE_FULL
    assert a.statistics().refused_total["queue-full"] == 1
    assert a.admit(0.0, 0) == [1]
    # running jobs do not count against the queue
    assert a.arrive(3, 0.0) is None


def test_a_client_at_its_queue_cap_is_refused_while_others_still_queue() -> None:
    a = Admission(Limits(max_jobs=1, min_free=0, max_queue=10, queue_timeout=60.0,
                         max_queued_per_client=2))
    assert a.arrive(1, 0.0, client="10.0.0.1") is None  # runs at once
    a.admit(0.0, 100)
    assert a.arrive(2, 0.0, client="10.0.0.1") is None
    assert a.arrive(3, 0.0, client="10.0.0.1") is None
    assert a.arrive(4, 0.0, client="10.0.0.1") is Refusal.CLIENT_QUEUE_FULL
    assert a.arrive(5, 0.0, client="10.0.0.2") is None  # another client still queues
    assert a.arrive(6, 0.0) is None  # a unix peer names no client: not counted
    assert a.statistics().refused_total["client-queue-full"] == 1
    # Running jobs do not count against the queue cap; leaving the queue frees a place.
    a.finish(1)
    assert a.admit(0.0, 100) == [2]
    assert a.arrive(7, 0.0, client="10.0.0.1") is None
    a.abandon(3)
    assert a.arrive(8, 0.0, client="10.0.0.1") is None
    assert a.arrive(9, 0.0, client="10.0.0.1") is Refusal.CLIENT_QUEUE_FULL
    # Drained and expired jobs are uncounted too.
    a.drain()
    b = Admission(Limits(max_jobs=1, min_free=0, max_queue=10, queue_timeout=1.0,
                         max_queued_per_client=1))
    assert b.arrive(1, 0.0, client="x") is None
    b.admit(0.0, 100)
    assert b.arrive(2, 0.0, client="x") is None
    assert b.expire(5.0) == [2]
    assert b.arrive(3, 5.0, client="x") is None


def test_max_queue_zero_refuses_everything() -> None:
    a = make(max_queue=0)
    assert a.arrive(1, 0.0) is Refusal.QUEUE_FULL


def test_expiry_takes_only_timed_out_heads() -> None:
    a = make(max_jobs=1, queue_timeout=10.0)
    a.arrive(1, 0.0)
    a.admit(0.0, 0)
    a.arrive(2, 1.0)
    a.arrive(3, 5.0)
    assert a.next_deadline() == 11.0
    assert a.expire(10.999) == []
    assert a.expire(11.0) == [2]
    assert a.next_deadline() == 15.0
    a.finish(1)
    # A timed-out job is never admitted, even if expire was not called.
    assert a.admit(20.0, 0) == []
    assert a.expire(20.0) == [3]
    assert a.statistics().expired_total == 2


def test_abandon_removes_from_middle() -> None:
    a = make(max_jobs=1)
    for job in (1, 2, 3):
        a.arrive(job, 0.0)
    a.admit(0.0, 0)
    a.abandon(2)
    a.finish(1)
    assert a.admit(0.0, 0) == [3]
    assert a.statistics().abandoned_total == 1


def test_drain_returns_queue_and_refuses_new() -> None:
    a = make(max_jobs=1)
    for job in (1, 2, 3):
        a.arrive(job, 0.0)
    a.admit(0.0, 0)
    assert a.drain() == [2, 3]
    assert a.arrive(4, 0.0) is Refusal.DRAINING
    assert a.running == 1
    a.finish(1)
    assert a.admit(0.0, 0) == []


def test_wants_memory_reading_only_with_a_free_slot_and_a_queue() -> None:
    a = make(max_jobs=1)
    assert not a.wants_memory_reading
    a.arrive(1, 0.0)
    assert a.wants_memory_reading
    a.admit(0.0, 0)
    a.arrive(2, 0.0)
    assert not a.wants_memory_reading


def test_duplicate_job_is_a_bug() -> None:
    a = make()
    a.arrive(1, 0.0)
    with pytest.raises(ValueError):
        a.arrive(1, 0.0)


@pytest.mark.parametrize("kwargs", [
    {"max_jobs": 0}, {"min_free": -1}, {"max_queue": -1}, {"queue_timeout": 0.0},
    {"queue_timeout": float("nan")}, {"default_footprint": -1},
])
def test_limits_validate(kwargs: dict[str, float]) -> None:
    base: dict[str, float] = {"max_jobs": 1, "min_free": 0, "max_queue": 1, "queue_timeout": 1.0}
    base.update(kwargs)
    with pytest.raises(ValueError):
        Limits(**base)  # type: ignore[arg-type]


class AdmissionMachine(RuleBasedStateMachine):
    """Random interleavings of every event, with a model kept beside the core."""

    def __init__(self) -> None:
        super().__init__()
        self.core: Admission | None = None
        self.now = 0.0
        self.next_id = 0
        self.arrival_order: list[int] = []  # model of the queue, FIFO
        self.running: set[int] = set()
        self.finished: set[int] = set()
        self.footprints: dict[int, int] = {}
        self.usage: dict[int, int] = {}
        self.paused: set[int] = set()
        self.available = 0
        self.pressure_high = False
        self.draining = False
        self.keyed = False
        self.weights: dict[str | None, int] = {None: 1}
        self.key: dict[int, str | None] = {}
        self.client: dict[int, str] = {}

    @precondition(lambda self: self.core is None)
    @rule(max_jobs=st.integers(1, 4), min_free=st.integers(0, 3),
          max_queue=st.integers(0, 6), timeout=st.integers(1, 20), reserve=st.integers(0, 2),
          keyed=st.booleans(), max_per_key=st.none() | st.integers(1, 3),
          weights=st.lists(st.integers(1, 3), min_size=3, max_size=3),
          per_client=st.none() | st.integers(1, 3))
    def setup(self, max_jobs: int, min_free: int, max_queue: int, timeout: int,
              reserve: int, keyed: bool, max_per_key: int | None, weights: list[int],
              per_client: int | None) -> None:
        self.core = Admission(Limits(max_jobs=max_jobs, min_free=min_free, max_queue=max_queue,
                                     queue_timeout=float(timeout), default_footprint=reserve,
                                     max_per_key=max_per_key,
                                     max_queued_per_client=per_client))
        self.keyed = keyed
        if keyed:
            self.weights = dict(zip("abc", weights, strict=True))

    def running_of(self, key: str | None) -> int:
        return sum(1 for j in self.running if self.key[j] == key)

    def queued_of(self, client: str) -> int:
        return sum(1 for j in self.arrival_order if self.client[j] == client)

    def queued_keys(self) -> set[str | None]:
        return {self.key[j] for j in self.arrival_order}

    @precondition(lambda self: self.core is not None)
    @rule(footprint=st.none() | st.integers(0, 4), which=st.integers(0, 2),
          client=st.sampled_from(["10.0.0.1", "10.0.0.2"]))
    def arrive(self, footprint: int | None, which: int, client: str) -> None:
        assert self.core is not None
        job = self.next_id
        self.next_id += 1
        cap = self.core.limits.max_queued_per_client
        mine = self.queued_of(client)
        full = len(self.arrival_order) >= self.core.limits.max_queue
        key = "abc"[which] if self.keyed else None
        self.key[job] = key
        self.client[job] = client
        refusal = self.core.arrive(job, self.now, footprint, key=key, weight=self.weights[key],
                                   client=client)
        if self.draining:
            assert refusal is Refusal.DRAINING
        elif cap is not None and mine >= cap:
            # The client's own cap comes first: it is that client's doing.
            assert refusal is Refusal.CLIENT_QUEUE_FULL
        else:
            # Exactly: a cap counter leaking upward would refuse where this says queue.
            assert refusal is (Refusal.QUEUE_FULL if full else None)
        if refusal is None:
            self.arrival_order.append(job)
            self.footprints[job] = (self.core.limits.default_footprint if footprint is None
                                    else footprint)

    @precondition(lambda self: self.core is not None
                  and bool(self.arrival_order or self.running))
    @rule(data=st.data(), footprint=st.integers(0, 4))
    def estimate(self, data: st.DataObject, footprint: int) -> None:
        assert self.core is not None
        job = data.draw(st.sampled_from(self.arrival_order + sorted(self.running)))
        self.core.estimate(job, footprint)
        self.footprints[job] = footprint

    @precondition(lambda self: self.core is not None and bool(self.running))
    @rule(data=st.data(), usage=st.integers(0, 5))
    def observe(self, data: st.DataObject, usage: int) -> None:
        assert self.core is not None
        job = data.draw(st.sampled_from(sorted(self.running)))
        self.core.observe(job, usage)
        self.usage[job] = usage

    def model_reserved(self) -> int:
        return sum(max(0, self.footprints[j] - self.usage.get(j, 0)) for j in self.running)

    @precondition(lambda self: self.core is not None and bool(self.arrival_order))
    @rule(data=st.data())
    def abandon(self, data: st.DataObject) -> None:
        assert self.core is not None
        job = data.draw(st.sampled_from(self.arrival_order))
        self.core.abandon(job)
        self.arrival_order.remove(job)

    @precondition(lambda self: self.core is not None and bool(self.running))
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        assert self.core is not None
        job = data.draw(st.sampled_from(sorted(self.running)))
        self.core.finish(job)
        self.running.remove(job)
        self.usage.pop(job, None)
        self.paused.discard(job)
        self.finished.add(job)

    @precondition(lambda self: self.core is not None and bool(self.running))
    @rule(data=st.data())
    def pause(self, data: st.DataObject) -> None:
        assert self.core is not None
        job = data.draw(st.sampled_from(sorted(self.running)))
        self.core.pause(job)
        self.paused.add(job)
        assert self.core.paused == len(self.paused)

    @precondition(lambda self: self.core is not None and bool(self.paused))
    @rule(data=st.data())
    def unpause(self, data: st.DataObject) -> None:
        assert self.core is not None
        job = data.draw(st.sampled_from(sorted(self.paused)))
        self.core.unpause(job)
        self.paused.discard(job)
        assert self.core.paused == len(self.paused)

    @precondition(lambda self: self.core is not None)
    @rule(dt=st.integers(0, 8))
    def advance(self, dt: int) -> None:
        self.now += dt

    @precondition(lambda self: self.core is not None)
    @rule(available=st.integers(0, 8))
    def memory_changes(self, available: int) -> None:
        self.available = available

    @precondition(lambda self: self.core is not None)
    @rule(high=st.booleans())
    def pressure_changes(self, high: bool) -> None:
        self.pressure_high = high

    @precondition(lambda self: self.core is not None)
    @rule()
    def decide(self) -> None:
        """What the gate does at every event: expire, then admit."""
        core = self.core
        assert core is not None
        timeout = core.limits.queue_timeout
        expired = core.expire(self.now)
        # Expired jobs are exactly the timed-out prefix of the queue.
        assert expired == self.arrival_order[:len(expired)]
        del self.arrival_order[:len(expired)]
        assert not expired or all(self.now - timeout >= 0 for _ in expired)
        before_running = len(self.running)
        reserved = self.model_reserved()
        admitted = (core.admit(self.now, self.available, pressure_high=self.pressure_high)
                    if core.wants_memory_reading else [])
        if self.pressure_high or self.paused:
            assert admitted == []  # a paused job's memory comes first
        # FIFO per key: each admitted job was the oldest queued job of its key.
        for job in admitted:
            key = self.key[job]
            assert job == next(j for j in self.arrival_order if self.key[j] == key)
            self.arrival_order.remove(job)
        if not self.keyed:  # one key: plain FIFO
            assert admitted == sorted(admitted)
        limits = core.limits
        # Memory rule: each admitted job fit beside the growth still expected from
        # the running jobs and from those admitted before it in this decision.
        for job in admitted:
            assert self.available - reserved - self.footprints[job] >= limits.min_free
            reserved += self.footprints[job]
        for job in admitted:
            assert job not in self.finished
            self.running.add(job)
        if limits.max_per_key is not None:
            for key in self.weights:
                assert self.running_of(key) <= limits.max_per_key
        # Work-conserving: if something is still queued with a free slot, a per-key
        # limit, pressure or memory held it.
        if self.arrival_order and before_running + len(admitted) < limits.max_jobs:
            eligible = [k for k in self.queued_keys()
                        if limits.max_per_key is None or self.running_of(k) < limits.max_per_key]
            if not eligible:
                assert core.hold is Hold.PER_KEY
            elif self.pressure_high:
                assert core.hold is Hold.PRESSURE
            elif self.paused:
                assert core.hold is Hold.PAUSED
            else:
                assert core.hold is Hold.MEMORY
                heads = [next(j for j in self.arrival_order if self.key[j] == k)
                         for k in eligible]
                assert any(self.available - reserved - self.footprints[h] < limits.min_free
                           for h in heads)

    @precondition(lambda self: self.core is not None)
    @rule()
    def drain(self) -> None:
        assert self.core is not None
        assert self.core.drain() == self.arrival_order
        self.arrival_order.clear()
        self.draining = True

    @invariant()
    def matches_model(self) -> None:
        core = self.core
        if core is None:
            return
        assert core.running == len(self.running) <= core.limits.max_jobs
        assert core.queued == len(self.arrival_order) <= core.limits.max_queue
        cap = core.limits.max_queued_per_client
        if cap is not None:
            for client in ("10.0.0.1", "10.0.0.2"):
                assert self.queued_of(client) <= cap
        assert [job for job, _ in core.queue_view(1000)] == self.arrival_order
        s = core.statistics()
        assert s.finished_total == len(self.finished)
        assert s.admitted_total == len(self.finished) + len(self.running)
        assert core.reserved == s.reserved == self.model_reserved()
        assert (core.hold is None) == (not self.arrival_order)


AdmissionMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=60,
                                              deadline=None)
TestAdmissionMachine = AdmissionMachine.TestCase


@given(jobs=st.integers(1, 30), max_jobs=st.integers(1, 5), finishes=st.lists(st.booleans()))
def test_queue_drains_when_capacity_returns(jobs: int, max_jobs: int,
                                            finishes: list[bool]) -> None:
    """Whatever happens first, finishing every running job eventually runs everyone."""
    a = make(max_jobs=max_jobs, max_queue=jobs)
    for job in range(jobs):
        a.arrive(job, 0.0)
    order: list[int] = []
    running: list[int] = []
    for step in range(jobs * 2 + len(finishes)):
        new = a.admit(0.0, 0)
        order += new
        running += new
        if running and (step >= len(finishes) or finishes[step]):
            a.finish(running.pop(0))
    while running:
        a.finish(running.pop())
        new = a.admit(0.0, 0)
        order += new
        running += new
    assert order == list(range(jobs))
    assert a.queued == 0 and a.running == 0


@settings(max_examples=300, deadline=None)
@given(
    jobs=st.lists(st.tuples(st.integers(1, 400), st.integers(1, 12)), min_size=1, max_size=25),
    total=st.integers(200, 1200),
    other=st.integers(0, 150),
    min_free=st.integers(0, 100),
    max_jobs=st.integers(1, 8),
    observe=st.booleans(),
)
def test_usage_following_growth_curves_never_crosses_the_limit(
        jobs: list[tuple[int, int]], total: int, other: int, min_free: int, max_jobs: int,
        observe: bool) -> None:
    """Compilers start small and grow to their peak over their run. With learned
    footprints equal to the peaks, admitting against a memory source that only ever
    shows what has already grown never lets usage cross total - min_free."""
    core = make(max_jobs=max_jobs, min_free=min_free, max_queue=len(jobs),
                queue_timeout=10_000.0)
    for job, (peak, _duration) in enumerate(jobs):
        core.arrive(job, 0.0, footprint=peak)
    started: dict[int, int] = {}
    done: set[int] = set()

    def usage(job: int, tick: int) -> int:
        peak, duration = jobs[job]
        ramp = max(1, duration // 2)
        return min(peak, peak * (tick - started[job]) // ramp)

    for tick in range(400):
        running = [j for j in started if j not in done]
        in_use = sum(usage(j, tick) for j in running)
        assert other + in_use <= total - min_free or not running
        for j in running:
            if tick - started[j] >= jobs[j][1]:
                core.finish(j)
                done.add(j)
            elif observe:
                core.observe(j, usage(j, tick))
        running = [j for j in started if j not in done]
        available = total - other - sum(usage(j, tick) for j in running)
        for j in core.admit(float(tick), available):
            started[j] = tick
        if len(done) == len(jobs):
            break
    # Everyone whose peak fits the box at all has run.
    fits = {j for j, (peak, _) in enumerate(jobs) if other + peak <= total - min_free}
    first_misfit = min((j for j in range(len(jobs)) if j not in fits), default=len(jobs))
    assert set(range(first_misfit)) <= done  # FIFO: a misfit holds those behind it


@settings(max_examples=300, deadline=None)
@given(
    arrivals=st.lists(st.integers(0, 3), min_size=1, max_size=60),
    weights=st.lists(st.integers(1, 4), min_size=4, max_size=4),
    max_jobs=st.integers(1, 3),
)
def test_no_key_starves_and_weights_bound_the_wait(arrivals: list[int], weights: list[int],
                                                   max_jobs: int) -> None:
    """Everyone queued up front, capacity returning one job at a time: while a key
    has jobs waiting, the other keys get at most their weights in turns between
    two of its turns; within a key, order is arrival order."""
    core = make(max_jobs=max_jobs, max_queue=len(arrivals))
    keys = [f"k{i}" for i in arrivals]
    for job, key in enumerate(keys):
        core.arrive(job, 0.0, key=key, weight=weights[int(key[1:])])
    order: list[int] = []
    running: list[int] = []
    while len(order) < len(arrivals):
        new = core.admit(0.0, 0)
        assert new, "capacity is free and jobs wait: someone must be admitted"
        order += new
        running += new
        core.finish(running.pop(0))
    by_key: dict[str, list[int]] = {}
    for job in order:
        by_key.setdefault(keys[job], []).append(job)
    for jobs in by_key.values():
        assert jobs == sorted(jobs)
    for key in set(keys):
        others = sum(weights[int(k[1:])] for k in set(keys) if k != key)
        positions = [i for i, job in enumerate(order) if keys[job] == key]
        # before its first turn and between its turns, the others have at most
        # one round (their weights), plus up to max_jobs admitted in the first burst
        gaps = [positions[0]] + [b - a - 1 for a, b in itertools.pairwise(positions)]
        assert max(gaps) <= others + max_jobs


def test_light_user_is_not_stuck_behind_a_heavy_backlog() -> None:
    core = make(max_jobs=2, max_queue=100)
    for job in range(64):
        core.arrive(job, 0.0, key="heavy")
    for job in range(64, 68):
        core.arrive(job, 0.0, key="light")
    order: list[int] = []
    running: list[int] = []
    while len(order) < 68:
        new = core.admit(0.0, 0)
        order += new
        running += new
        core.finish(running.pop(0))
    light_positions = [order.index(j) for j in range(64, 68)]
    assert max(light_positions) <= 2 + 2 * 4  # not after the 64 heavy jobs


def test_max_per_key_makes_jobs_wait_not_fail() -> None:
    a = Admission(Limits(max_jobs=4, min_free=0, max_queue=10, queue_timeout=100.0,
                         max_per_key=1))
    for job in range(3):
        assert a.arrive(job, 0.0, key="one") is None
    a.arrive(3, 0.0, key="two")
    assert a.admit(0.0, 0) == [0, 3]
    assert a.hold is Hold.PER_KEY
    assert not a.wants_memory_reading  # no timer needed: only a finish can help
    a.finish(0)
    assert a.admit(0.0, 0) == [1]
    assert a.statistics().keys == {"one": (1, 1), "two": (0, 1)}
