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
    # Job 2 was let go for good: never frozen again; the other one is, now.
    assert p.decide(300.0, 0, running) == Action(Act.FREEZE, 1, "headroom 0 MiB < 100 MiB floor")
    action = p.decide(300.0 + BOUND, FLOOR - 1, running)
    assert action is not None and action.act is Act.CUT and action.job == 1


def test_expected_growth_freezes_before_the_headroom_is_gone() -> None:
    """Two jobs past their estimates, each expected to grow 100 MiB more: 150 MiB
    of headroom is not enough for both, so the younger is frozen now; it goes
    on once the other has ended... or once there is room for its own growth."""
    p = pauser()
    running = [(1, 0.0), (2, 5.0)]
    growth = {1: 100 * M, 2: 100 * M}
    assert p.decide(10.0, 150 * M, running, growth=growth) == Action(
        Act.FREEZE, 2, "headroom 150 MiB less 200 MiB expected growth < 100 MiB floor")
    assert p.decide(11.0, 150 * M, running, growth=growth) is None  # 50 - 100 < 150
    assert p.decide(12.0, 400 * M, running, growth=growth) == Action(
        Act.THAW, 2, "headroom 400 MiB less 100 MiB expected growth and its own 100 MiB "
                     ">= 150 MiB to resume")


def test_limits_validate() -> None:
    with pytest.raises(ValueError):
        Pauser(floor=10, resume=5, max_pause=1.0)
    with pytest.raises(ValueError):
        Pauser(floor=10, resume=10, max_pause=0.0)


steps = st.lists(st.tuples(st.floats(0.0, 100.0), st.integers(-50, 300).map(lambda n: n * M),
                           st.lists(st.integers(0, 6), max_size=6, unique=True)),
                 max_size=60)


@settings(max_examples=300)
@given(steps, st.dictionaries(st.integers(0, 6), st.floats(0.0, 2000.0)),
       st.dictionaries(st.integers(0, 6), st.integers(-10, 200).map(lambda n: n * M)),
       st.none() | st.sets(st.integers(0, 6)))
def test_never_every_job_paused_never_past_the_bound(
        readings: list[tuple[float, int, list[int]]], deadlines: dict[int, float],
        growth: dict[int, int], freezable: set[int] | None) -> None:
    """Whatever the readings and deadlines: at least one running job is never
    paused; an overdue pause (past max_pause or its deadline) is dealt with
    before anything else, earliest bound first, so with one decision per
    reading none outlives its bound by more than a reading per paused job; a
    freeze comes only when the outlook (headroom less the unpaused jobs'
    expected growth) is below the floor, a plain thaw only when the outlook
    less the thawed job's own growth reaches the resume mark, a cut only when
    the headroom itself is below the floor; only a freezable job not past its
    deadline is frozen, and one let go at its bound never again."""
    p = pauser()
    now = 0.0
    admitted: dict[int, float] = {}
    let_go: set[int] = set()
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
        outlook = headroom - sum(max(0, growth.get(j, 0)) for j in ids if j not in alive_paused)
        action = p.decide(now, headroom, running, deadlines, growth, freezable)
        let_go &= set(ids)
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
            let_go.add(action.job)
        elif action is not None and action.act is Act.FREEZE:
            assert outlook < FLOOR
            assert action.job not in let_go
            assert freezable is None or action.job in freezable
            assert now < deadlines.get(action.job, float("inf"))
        elif action is not None:
            assert action.act is Act.THAW
            assert outlook - max(0, growth.get(action.job, 0)) >= RESUME
        if action is not None and action.act is Act.CUT:
            assert headroom < FLOOR
