"""Pausing (gatekeeper.pausing): the pure rule for freezing and thawing running
jobs, driven by made-up readings; no cgroups, no clock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatekeeper.pausing import Act, Action, Pauser

M = 2**20
FLOOR, RESUME, BOUND = 100 * M, 150 * M, 240.0


def pauser() -> Pauser:
    return Pauser(floor=FLOOR, resume=RESUME, max_pause=BOUND)


def test_the_youngest_is_frozen_and_thawed_when_room_returns() -> None:
    p = pauser()
    running = [(1, 0.0), (2, 5.0), (3, 9.0)]
    assert p.decide(10.0, 50 * M, running) == Action(Act.FREEZE, 3,
                                                     "headroom 50 MiB < 100 MiB floor")
    assert p.decide(11.0, 60 * M, running) == Action(Act.FREEZE, 2,
                                                     "headroom 60 MiB < 100 MiB floor")
    assert p.decide(12.0, 60 * M, running) is None  # never the last one running
    assert p.decide(13.0, 120 * M, running) is None  # above the floor, below resume
    assert p.decide(14.0, 160 * M, running) == Action(Act.THAW, 3,
                                                      "headroom 160 MiB >= 150 MiB to resume")
    assert p.paused == {2: 11.0} and p.pauses_total == 2


def test_a_job_paused_too_long_is_thawed_or_cut() -> None:
    p = pauser()
    running = [(1, 0.0), (2, 1.0)]
    assert p.decide(10.0, 0, running) is not None
    action = p.decide(10.0 + BOUND, FLOOR, running)  # room enough not to kill anyone
    assert action is not None and action.act is Act.THAW and action.job == 2
    assert p.decide(300.0, 0, running) is not None  # frozen again
    action = p.decide(300.0 + BOUND, FLOOR - 1, running)
    assert action is not None and action.act is Act.CUT and action.job == 2


def test_limits_validate() -> None:
    with pytest.raises(ValueError):
        Pauser(floor=10, resume=5, max_pause=1.0)
    with pytest.raises(ValueError):
        Pauser(floor=10, resume=10, max_pause=0.0)


steps = st.lists(st.tuples(st.floats(0.0, 100.0), st.integers(-50, 300).map(lambda n: n * M),
                           st.lists(st.integers(0, 6), max_size=6, unique=True)),
                 max_size=60)


@settings(max_examples=300)
@given(steps, st.dictionaries(st.integers(0, 6), st.floats(0.0, 2000.0)))
def test_never_every_job_paused_never_past_the_bound(
        readings: list[tuple[float, int, list[int]]], deadlines: dict[int, float]) -> None:
    """Whatever the readings and deadlines: at least one running job is never
    paused; an overdue pause (past max_pause or its deadline) is dealt with
    before anything else, earliest bound first, so with one decision per
    reading none outlives its bound by more than a reading per paused job; a
    freeze comes only below the floor, a plain thaw only from the resume mark."""
    p = pauser()
    now = 0.0
    admitted: dict[int, float] = {}
    for gap, headroom, ids in readings:
        now += gap
        for job in ids:
            admitted.setdefault(job, now)
        running = [(job, admitted[job]) for job in ids]
        alive_paused = {j: t for j, t in p.paused.items() if j in ids}
        bounds = {j: min(t + BOUND, deadlines.get(j, float("inf")))
                  for j, t in alive_paused.items()}
        overdue = sorted((b, j) for j, b in bounds.items() if now >= b)
        oldest = min(alive_paused.items(), key=lambda item: item[1]) if alive_paused else None
        action = p.decide(now, headroom, running, deadlines)
        paused_running = [job for job, _ in running if job in p.paused]
        assert not running or len(paused_running) < len(running)
        assert set(p.paused) <= set(ids)
        if oldest is not None and len(alive_paused) == len(ids):
            # the last one left: let go first
            assert action is not None and action.job == oldest[0]
            assert action.act is Act.THAW
        elif overdue:
            assert action is not None and action.job == overdue[0][1]
            assert action.act in (Act.THAW, Act.CUT)
        elif action is not None and action.act is Act.FREEZE:
            assert headroom < FLOOR
        elif action is not None:
            assert action.act is Act.THAW and headroom >= RESUME
        if action is not None and action.act is Act.CUT:
            assert headroom < FLOOR
