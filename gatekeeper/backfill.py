"""Backfilling: while the job whose turn it is waits for memory, a later job may
start now if that cannot make the waiting job start later.

Why: strict FIFO lets one job that does not fit hold back every job behind it.
Issue 18 measured it: make queued three heavy compiles before the medium ones;
the second heavy waited for the first, and every medium waited behind it for
9-10 s although each would have fit beside the running heavy.

The rule is EASY backfilling, as HPC batch schedulers do it (Slurm's backfill
plugin): assume running jobs end when expected (admitted + learned duration)
and each then frees its footprint and its slot. The head's *shadow time* is
the first such end after which it fits; what is then left over beyond the head
(memory, slots) is the *spare*. A later job may start now if it fits now and
either ends before the shadow time, or stays within the spare (which it then
uses up). Either way the head finds at the shadow time what it would have found
without it, so it starts no later -- with the learned durations taken as true.

A running job whose end is unknown (never run before: no learned duration)
never ends in this reckoning. If the head needs such a job to end, there is no
shadow and nothing is backfilled: strict FIFO, as before. A job with no learned
duration can only be backfilled into the spare.

Pure: no clock, no I/O (tests/test_purity.py); `admission.Admission` asks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Shadow:
    """When the waiting head can start at the latest, and what is spare then."""

    time: float
    spare_memory: int
    spare_slots: int


def shadow(*, now: float, headroom: int, free_slots: int,
           running: Iterable[tuple[int, float | None]], need: int) -> Shadow | None:
    """The head's shadow. `headroom`: memory a new job may take now (available
    - reserved - min_free); `free_slots`: slots free now; `running`: each
    running job's (footprint, expected end or None); `need`: the head's
    footprint. None if the head's start depends on a job whose end is unknown."""
    if headroom >= need and free_slots >= 1:
        return Shadow(now, headroom - need, free_slots - 1)
    for end, footprint in sorted((end, fp) for fp, end in running if end is not None):
        headroom += footprint
        free_slots += 1
        if headroom >= need and free_slots >= 1:
            return Shadow(max(end, now), headroom - need, free_slots - 1)
    return None


def backfill(found: Shadow, *, now: float, footprint: int,
             duration: float | None) -> Shadow | None:
    """Whether a job that fits now may start beside the waiting head: the
    shadow that is left if it does, or None if it may not."""
    if duration is not None and now + duration <= found.time:
        return found  # done before the head needs anything
    if footprint <= found.spare_memory and found.spare_slots >= 1:
        return Shadow(found.time, found.spare_memory - footprint, found.spare_slots - 1)
    return None
