"""The trio gate in virtual time: when it reads memory, when it wakes, how it releases."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from gatekeeper.admission import Admission, Limits
from gatekeeper.gate import MEMORY_RECHECK_INTERVAL, Gate, Verdict
from gatekeeper.memory.sources import PlainSource


class CountingMemory(PlainSource):
    def __init__(self, value: int) -> None:
        self.value = value
        self.reads = 0

    def available(self) -> int:
        self.reads += 1
        return self.value


def make_gate(memory: CountingMemory, *, max_jobs: int = 1, min_free: int = 100,
              queue_timeout: float = 240.0) -> Gate:
    return Gate(Admission(Limits(max_jobs=max_jobs, min_free=min_free, max_queue=10,
                                 queue_timeout=queue_timeout)), memory)


async def test_no_timer_and_no_memory_reads_while_nothing_is_queued(
        autojump_clock: trio.testing.MockClock) -> None:
    memory = CountingMemory(1000)
    gate = make_gate(memory)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gate.run)
        await trio.sleep(3600)
        assert memory.reads == 0
        async with gate.ticket() as ticket:
            assert await gate.wait(ticket) is Verdict.ADMITTED
        reads = memory.reads
        await trio.sleep(3600)
        assert memory.reads == reads == 1
        nursery.cancel_scope.cancel()


async def test_no_memory_reads_while_held_only_by_slots(
        autojump_clock: trio.testing.MockClock) -> None:
    memory = CountingMemory(1000)
    gate = make_gate(memory, queue_timeout=10_000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gate.run)
        async with gate.ticket() as first:
            assert await gate.wait(first) is Verdict.ADMITTED
            async with gate.ticket() as second:
                reads = memory.reads
                await trio.sleep(600)  # the second waits for a slot, not for memory
                assert memory.reads == reads
                assert second.verdict is None
        nursery.cancel_scope.cancel()


async def test_memory_is_rechecked_on_a_short_timer_while_it_holds(
        autojump_clock: trio.testing.MockClock) -> None:
    memory = CountingMemory(0)
    gate = make_gate(memory)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gate.run)
        async with gate.ticket() as ticket:
            await trio.sleep(1.0 + MEMORY_RECHECK_INTERVAL / 2)
            # one read at arrival, then one per interval
            per_second = 1.0 / MEMORY_RECHECK_INTERVAL
            assert per_second <= memory.reads <= per_second + 2
            memory.value = 1000
            start = trio.current_time()
            assert await gate.wait(ticket) is Verdict.ADMITTED
            assert trio.current_time() - start <= MEMORY_RECHECK_INTERVAL
        nursery.cancel_scope.cancel()


async def test_queue_timeout_fires_at_the_deadline(autojump_clock: trio.testing.MockClock) -> None:
    memory = CountingMemory(0)
    gate = make_gate(memory, queue_timeout=240.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gate.run)
        start = trio.current_time()
        async with gate.ticket() as ticket:
            assert await gate.wait(ticket) is Verdict.EXPIRED
            assert trio.current_time() - start == 240.0
        assert gate.snapshot().queued == 0
        nursery.cancel_scope.cancel()


async def test_cancelled_wait_abandons_and_hands_on_the_slot() -> None:
    memory = CountingMemory(1000)
    gate = make_gate(memory)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gate.run)
        async with gate.ticket() as first:
            assert await gate.wait(first) is Verdict.ADMITTED
            with trio.move_on_after(0):
                async with gate.ticket() as leaver:
                    await gate.wait(leaver)
            assert gate.snapshot().abandoned_total == 1
            async with gate.ticket() as third:
                assert third.verdict is None
                nursery.start_soon(_noop)
            # third left the block unadmitted: abandoned, not leaked
        assert gate.snapshot().abandoned_total == 2
        async with gate.ticket() as fourth:
            # first finished, so the slot is free again at once
            assert fourth.verdict is Verdict.ADMITTED
        snap = gate.snapshot()
        assert (snap.running, snap.queued, snap.finished_total) == (0, 0, 2)
        nursery.cancel_scope.cancel()


async def _noop() -> None:
    pass


async def test_drain_settles_every_waiter() -> None:
    memory = CountingMemory(0)
    gate = make_gate(memory)
    results: list[Verdict] = []

    async def waiter() -> None:
        async with gate.ticket() as t:
            results.append(await gate.wait(t))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(gate.run)
        for _ in range(3):
            nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert gate.drain() == 3
        await trio.testing.wait_all_tasks_blocked()
        assert results == [Verdict.DRAINED] * 3
        async with gate.ticket() as late:
            assert late.refused is not None
        nursery.cancel_scope.cancel()


class PressuredMemory(CountingMemory):
    def __init__(self, value: int, pressure: float | None) -> None:
        super().__init__(value)
        self.psi = pressure

    def pressure(self) -> float | None:
        return self.psi


async def test_pressure_rule_holds_until_pressure_falls(
        autojump_clock: trio.testing.MockClock) -> None:
    memory = PressuredMemory(1000, pressure=50.0)
    gate = Gate(Admission(Limits(max_jobs=2, min_free=0, max_queue=10, queue_timeout=240.0)),
                memory, max_pressure=10.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gate.run)
        async with gate.ticket() as ticket:
            await trio.sleep(5)
            assert ticket.verdict is None
            assert gate.snapshot().hold is not None
            assert gate.snapshot().hold.value == "pressure"  # type: ignore[union-attr]
            memory.psi = 2.0
            assert await gate.wait(ticket) is Verdict.ADMITTED
        # No PSI on this kernel: the rule cannot hold anything.
        memory.psi = None
        async with gate.ticket() as ticket:
            assert ticket.verdict is Verdict.ADMITTED
        nursery.cancel_scope.cancel()


async def test_early_release_admits_the_next_at_once_and_only_once() -> None:
    """`release` hands the slot on before the ticket's scope ends; the next
    ticket's on_admit runs inside that call (no checkpoint), and the scope's own
    exit then releases nothing twice."""
    memory = CountingMemory(1000)
    gate = make_gate(memory)
    admitted: list[str] = []
    async with gate.ticket() as first:
        assert first.admitted
        async with gate.ticket() as second:
            second.on_admit = lambda: admitted.append("second")
            assert second.verdict is None
            gate.release(first)
            assert admitted == ["second"] and second.admitted  # synchronously
            gate.release(first)  # again: nothing
            snap = gate.snapshot()
            assert (snap.running, snap.finished_total) == (1, 1)
        # first's scope exits after second's: still one finish each
    snap = gate.snapshot()
    assert (snap.running, snap.queued, snap.finished_total) == (0, 0, 2)
    assert admitted == ["second"]


async def test_an_on_admit_that_raises_still_wakes_its_ticket() -> None:
    """on_admit must not raise; should a bug make it, the error reaches the
    releasing caller, but the admitted job's task still wakes instead of
    waiting forever."""
    gate = make_gate(CountingMemory(1000))

    def broken() -> None:
        raise RuntimeError("a bug in on_admit")

    async with gate.ticket() as first:
        async with gate.ticket() as second:
            second.on_admit = broken
            with pytest.raises(RuntimeError):
                gate.release(first)
            with trio.fail_after(5):
                assert await gate.wait(second) is Verdict.ADMITTED


async def test_on_admit_is_not_called_for_other_verdicts(
        autojump_clock: trio.testing.MockClock) -> None:
    memory = CountingMemory(1000)
    gate = make_gate(memory, queue_timeout=1.0)
    called: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gate.run)
        async with gate.ticket() as first:
            assert first.admitted
            async with gate.ticket() as late:
                late.on_admit = lambda: called.append("late")
                assert await gate.wait(late) is Verdict.EXPIRED
            async with gate.ticket() as drained:
                drained.on_admit = lambda: called.append("drained")
                gate.drain()
                assert await gate.wait(drained) is Verdict.DRAINED
        nursery.cancel_scope.cancel()
    assert called == []
