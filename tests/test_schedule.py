"""The memory bench's yardstick (bench/schedule.py): an oracle's schedule of the
measured jobs, and the area bound no schedule can beat."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bench.schedule import Job, area_bound, list_schedule, makespan

MiB = 2**20

jobs_st = st.lists(st.builds(Job, name=st.text(max_size=3), peak=st.integers(1, 400 * MiB),
                             seconds=st.floats(0.01, 30)), max_size=30)


@given(jobs_st, st.integers(1, 8), st.integers(100 * MiB, 1000 * MiB))
def test_every_job_runs_once_within_slots_and_memory(jobs: list[Job], slots: int,
                                                     memory: int) -> None:
    placed = list_schedule(jobs, slots=slots, memory=memory)
    assert sorted(id(p.job) for p in placed) == sorted(id(j) for j in jobs)
    # At every start, what runs fits the slots, and the memory unless one job is alone.
    for p in placed:
        running = [q for q in placed if q.start <= p.start < q.end]
        assert len(running) <= slots
        assert len(running) == 1 or sum(q.job.peak for q in running) <= memory
    assert makespan(placed) >= area_bound(jobs, slots=slots, memory=memory) - 1e-6 \
        or any(j.peak > memory for j in jobs)


def test_a_heavy_and_a_medium_fit_two_heavies_do_not() -> None:
    heavy = [Job(f"h{i}", 220 * MiB, 4.0) for i in range(3)]
    medium = [Job(f"m{i}", 94 * MiB, 0.5) for i in range(8)]
    placed = list_schedule(heavy + medium, slots=2, memory=320 * MiB)
    # The heavies run one after another (12 s), the mediums beside them.
    assert makespan(placed) == 12.0
    assert area_bound(heavy + medium, slots=2, memory=320 * MiB) == 12.0
    one_at_a_time = sum(j.seconds for j in heavy + medium)
    assert one_at_a_time == 16.0
