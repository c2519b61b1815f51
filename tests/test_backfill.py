"""Backfilling (gatekeeper.backfill, used by gatekeeper.admission): a later job
starts beside a head that waits for memory only if the head is not delayed.
Pure: simulated time, no sockets."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatekeeper.admission import Admission, Limits
from gatekeeper.backfill import Shadow, backfill, shadow

MiB = 2**20


def test_shadow_is_the_first_end_after_which_the_head_fits() -> None:
    running = [(200, 10.0), (100, 4.0), (50, None)]
    # 30 free now; the head needs 120: the 100 ending at 4 s makes 130.
    assert shadow(now=1.0, headroom=30, free_slots=0, running=running, need=120) == \
        Shadow(4.0, 10, 0)
    # needs 400: both known ends (330) are not enough, the unknown one never ends
    assert shadow(now=1.0, headroom=30, free_slots=0, running=running, need=400) is None


def test_a_job_backfills_if_it_ends_in_time_or_fits_the_spare() -> None:
    found = Shadow(10.0, spare_memory=50, spare_slots=1)
    assert backfill(found, now=2.0, footprint=500, duration=8.0) == found  # ends at 10
    assert backfill(found, now=2.0, footprint=500, duration=8.5) is None  # too late, too big
    assert backfill(found, now=2.0, footprint=40, duration=None) == Shadow(10.0, 10, 0)
    assert backfill(Shadow(10.0, 50, 0), now=2.0, footprint=40, duration=None) is None


@dataclass(frozen=True)
class Job:
    footprint: int
    seconds: float
    known: bool
    """Whether the policy knows its duration (a learned one) or not."""
    key: str = "a"
    """Its client, for fair sharing."""


def simulate(jobs: Sequence[Job], *, capacity: int, max_jobs: int, backfilling: bool,
             max_per_key: int | None = None) -> dict[int, float]:
    """All jobs queue at 0 in order; each runs its true `seconds`, its learned
    duration (when known) is exact; memory is `capacity` with nothing else
    using it. Returns every job's start time."""
    adm = Admission(Limits(max_jobs=max_jobs, min_free=0, max_queue=10_000,
                           queue_timeout=1e12, backfill=backfilling,
                           max_per_key=max_per_key))
    for i, job in enumerate(jobs):
        assert adm.arrive(i, 0.0, job.footprint, key=job.key,
                          duration=job.seconds if job.known else None) is None
    start: dict[int, float] = {}
    ends: dict[int, float] = {}
    now = 0.0
    while True:
        for i in adm.admit(now, capacity):
            start[i], ends[i] = now, now + jobs[i].seconds
        if len(start) == len(jobs) and not ends:
            return start
        assert ends, "nothing runs and something waits: a job was starved"
        now = min(ends.values())
        for i in [i for i, end in ends.items() if end <= now]:
            del ends[i]
            adm.finish(i)


def fifo_start(before: Admission, head: int, now: float, available: int) -> float:
    """When strict FIFO from this state would start `head`, running jobs ending
    when the policy expects (one with no known end never ends): independent of
    backfill.shadow."""
    sim = copy.deepcopy(before)
    sim.limits = dataclasses.replace(sim.limits, backfill=False)
    while True:
        if head in sim.admit(now, available):
            return now
        known = [end for job, end in sim._ends.items() if end is not None]
        if not known:
            return math.inf
        now = max(now, min(known))
        for job in [j for j, end in sim._ends.items() if end is not None and end <= now]:
            sim.finish(job)


jobs_st = st.lists(st.builds(Job, footprint=st.integers(1, 100),
                             seconds=st.integers(1, 20).map(float), known=st.booleans(),
                             key=st.sampled_from("abc")),
                   min_size=1, max_size=25)


@settings(max_examples=300, deadline=None)
@given(jobs=jobs_st, capacity=st.integers(100, 250), max_jobs=st.integers(1, 4),
       max_per_key=st.sampled_from([None, 1, 2]))
def test_backfilling_never_delays_the_head(jobs: list[Job], capacity: int, max_jobs: int,
                                           max_per_key: int | None) -> None:
    """Every time later jobs are backfilled, the head waiting then starts no
    later than strict FIFO from that moment would start it (per-client limits
    included); every job starts (none starves)."""
    heads: list[tuple[int, float]] = []
    real = Admission._backfill

    def spy(self: Admission, head: int, now: float, available: int,
            admitted: list[int]) -> None:
        before = self._backfilled_total
        snapshot = copy.deepcopy(self)
        real(self, head, now, available, admitted)
        if self._backfilled_total > before:
            heads.append((head, fifo_start(snapshot, head, now, available)))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Admission, "_backfill", spy)
        with_backfill = simulate(jobs, capacity=capacity, max_jobs=max_jobs,
                                 backfilling=True, max_per_key=max_per_key)
    fifo = simulate(jobs, capacity=capacity, max_jobs=max_jobs, backfilling=False,
                    max_per_key=max_per_key)
    assert set(with_backfill) == set(fifo) == set(range(len(jobs)))
    for head, deadline in heads:
        assert with_backfill[head] <= deadline, (head, deadline, with_backfill)


def test_the_issue_18_head_of_line_case() -> None:
    """make queues three heavies, then mediums; two heavies do not fit together.
    Strict FIFO holds every medium behind the second heavy; backfilling runs
    them beside the first, and the heavies start exactly when they did."""
    heavy = [Job(218, 10.0, True) for _ in range(3)]
    medium = [Job(94, 2.0, True) for _ in range(8)]
    jobs = heavy + medium
    fifo = simulate(jobs, capacity=320, max_jobs=2, backfilling=False)
    with_backfill = simulate(jobs, capacity=320, max_jobs=2, backfilling=True)
    assert [with_backfill[i] for i in range(3)] == [fifo[i] for i in range(3)] == \
        [0.0, 10.0, 20.0]
    # FIFO: the mediums wait for the second heavy's end, then run beside the third
    fifo_finish = max(t + jobs[i].seconds for i, t in fifo.items())
    assert fifo_finish == 34.0 and min(fifo[i] for i in range(3, 11)) == 20.0
    assert max(with_backfill[i] for i in range(3, 11)) < 20.0  # beside the first two
    finish = max(t + jobs[i].seconds for i, t in with_backfill.items())
    assert finish == 30.0  # the three heavies back to back: the lower bound


def test_unknown_durations_only_fill_the_spare() -> None:
    """A never-seen job (no learned duration) is never assumed to end in time."""
    jobs = [Job(200, 10.0, True), Job(200, 10.0, True), Job(150, 1.0, False),
            Job(50, 1.0, False)]
    start = simulate(jobs, capacity=300, max_jobs=3, backfilling=True)
    # job 2 (150) cannot fit beside the head at its shadow (300 - 200 = 100 spare):
    # it waits; job 3 (50) fits the spare and runs at once.
    assert start[3] == 0.0 and start[2] > 0.0
    assert start[1] == 10.0
