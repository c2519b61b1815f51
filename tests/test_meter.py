"""The meter samples fast while jobs change and slows down while they hold still."""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from gatekeeper.memory.meter import CALM_INTERVAL, CALM_ROUNDS, INTERVAL, Meter


@pytest.fixture
def sleeper() -> Iterator[int]:
    """A real process whose memory does not change."""
    code = "import time; print(flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # started: its memory no longer grows
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


class Readings:
    """When the meter reported, with a wait for the next report (no polling)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._next = trio.Event()

    def __call__(self, usage: int) -> None:
        self.times.append(trio.current_time())
        self._next.set()
        self._next = trio.Event()

    async def until(self, count: int) -> None:
        while len(self.times) < count:
            await self._next.wait()


async def test_a_steady_job_is_sampled_once_a_second_until_a_new_job_starts(
        sleeper: int, autojump_clock: trio.testing.MockClock) -> None:
    meter = Meter()
    readings = Readings()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(meter.run)
        with meter.measuring(lambda hints, finder: sleeper, readings) as usage:
            # Fast while it is new: CALM_ROUNDS steady rounds, INTERVAL apart ...
            await readings.until(CALM_ROUNDS + 1)
            fast = readings.times[1:CALM_ROUNDS + 1]
            assert max(b - a for a, b in itertools.pairwise(fast)) <= INTERVAL * 1.5
            assert usage.steady
            # ... then once a second, not five times.
            await readings.until(CALM_ROUNDS + 5)
            calm = readings.times[CALM_ROUNDS + 1:CALM_ROUNDS + 5]
            assert min(b - a for a, b in itertools.pairwise(calm)) >= CALM_INTERVAL * 0.9
            # A new job ends the calm at once: sampled within about one INTERVAL.
            started = trio.current_time()
            count = len(readings.times)
            with meter.measuring(lambda hints, finder: sleeper, lambda usage: None):
                await readings.until(count + 1)
                assert readings.times[-1] - started <= 2 * INTERVAL
        nursery.cancel_scope.cancel()


async def test_a_stopped_job_is_not_sampled_again(
        sleeper: int, autojump_clock: trio.testing.MockClock) -> None:
    """After a job's backend part is over its process may serve the next job:
    a stopped Usage keeps what it had and takes no more readings."""
    meter = Meter()
    readings = Readings()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(meter.run)
        with meter.measuring(lambda hints, finder: sleeper, readings) as usage:
            await readings.until(2)
            usage.stop()
            seen, peak = usage.samples, usage.peak
            await trio.sleep(10 * CALM_INTERVAL)
            await meter.quiescent()
            assert (usage.samples, usage.peak) == (seen, peak)
            assert len(readings.times) == seen
        nursery.cancel_scope.cancel()
