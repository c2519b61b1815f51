"""What an oracle could do with the same compiles: the yardstick for the memory bench.

Given every job's measured peak and duration (from a real build), how soon could a
scheduler that knew them all in advance have finished, on `slots` CPUs and
`memory` bytes? Two figures (issue 17's "lower bound"):

* `area_bound`: no schedule beats the largest of the longest job, the total work
  spread over every slot, the total memory-time spread over the memory, and the
  jobs above half the memory one after another. A true lower bound, often loose.
* `list_schedule`: an achievable schedule by an oracle that knows each job's peak
  and duration: at each moment, start the longest waiting jobs that fit both the
  free slots and the free memory (longest-processing-time-first list scheduling,
  each job holding its peak for its whole run, which is how gatekeeper reserves).
  Not optimal in general, but what "knowing every job" buys in practice; a
  gatekeeper build close to it has little left to gain from better estimates.

Pure: no clock, no I/O; tests/test_schedule.py checks it.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Job:
    name: str
    peak: int
    """Bytes it holds while it runs (its cgroup's peak)."""
    seconds: float


@dataclass(frozen=True, slots=True)
class Placement:
    job: Job
    start: float

    @property
    def end(self) -> float:
        return self.start + self.job.seconds


def area_bound(jobs: Sequence[Job], *, slots: int, memory: int) -> float:
    if not jobs:
        return 0.0
    return max(max(j.seconds for j in jobs),
               sum(j.seconds for j in jobs) / slots,
               sum(j.peak * j.seconds for j in jobs) / memory,
               # no two jobs above half the memory ever run together
               sum(j.seconds for j in jobs if 2 * j.peak > memory))


def list_schedule(jobs: Sequence[Job], *, slots: int, memory: int) -> list[Placement]:
    """Start times for every job (see the module docstring). A job bigger than
    all the memory runs alone (it would anyway: the real build ran it)."""
    waiting = sorted(jobs, key=lambda j: (-j.seconds, -j.peak, j.name))
    running: list[tuple[float, int, int]] = []  # (end, peak, tiebreak)
    placed: list[Placement] = []
    now, free, idle = 0.0, memory, slots
    while waiting:
        for job in list(waiting):
            if idle == 0:
                break
            if job.peak <= free or not running:  # an empty box runs anything
                waiting.remove(job)
                placed.append(Placement(job, now))
                heapq.heappush(running, (now + job.seconds, job.peak, len(placed)))
                free -= job.peak
                idle -= 1
        if waiting:  # wait for the next end (something runs: see above)
            now, peak, _ = heapq.heappop(running)
            free += peak
            idle += 1
            while running and running[0][0] <= now:  # all that end together
                _, peak, _ = heapq.heappop(running)
                free += peak
                idle += 1
    return placed


def makespan(placements: Sequence[Placement]) -> float:
    return max((p.end for p in placements), default=0.0)
