"""The trio shell of pausing (gatekeeper/pauses.py): what it freezes, how the
gate holds while a job is paused, when it thaws, cuts, and lets go.

First with fake freezers in virtual time (the rule is pausing.py's, tested
apart); then one cut for real: a SIGSTOPped backend process whose job is cut
at --max-pause, its client reset, the other job unharmed.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import replace

import trio
import trio.testing
from fakes import config, gatekeeper
from test_inetd import UNUSED_BACKEND
from test_job_cgroups import preforked_backend  # noqa: F401  (a fixture)
from test_learning import reply, request, run_job

from gatekeeper.admission import Admission, Hold, Limits
from gatekeeper.footprints import PERCENTILE, TYPICAL_PERCENTILE
from gatekeeper.gate import Gate, Ticket, Verdict
from gatekeeper.inetd.command import Command
from gatekeeper.job import Job, State
from gatekeeper.memory.freeze import Freezer
from gatekeeper.memory.meter import Usage
from gatekeeper.memory.sources import FixedMemory
from gatekeeper.net.addresses import TcpAddress
from gatekeeper.outcome import Outcome
from gatekeeper.pauses import Pauses, expected_growth
from gatekeeper.pausing import Act, Pauser
from gatekeeper.server import Server

MiB = 2**20
FLOOR = 64 * MiB


class FakeFreezer:
    how = "fake"

    def __init__(self) -> None:
        self.log: list[str] = []

    def freeze(self) -> None:
        self.log.append("freeze")

    def thaw(self) -> None:
        self.log.append("thaw")

    def kill(self) -> None:
        self.log.append("kill")


class Rig:
    """A gate with two slots, its pauser, and jobs the test makes run."""

    def __init__(self) -> None:
        self.now = 0.0
        self.headroom: int | None = 10 * FLOOR
        self.gate = Gate(Admission(Limits(max_jobs=3, min_free=0, max_queue=10,
                                          queue_timeout=10_000.0)), FixedMemory(2**40),
                         clock=lambda: self.now)
        self.freezers: dict[int, FakeFreezer] = {}
        self.pauses = Pauses(Pauser(floor=FLOOR, resume=2 * FLOOR, max_pause=60.0),
                             self.gate, headroom=lambda: self.headroom, clock=lambda: self.now,
                             find=self.find)
        self.cuts: list[tuple[int, str]] = []

    def find(self, job: Job) -> Freezer | None:
        assert job.ticket is not None
        return self.freezers.get(job.ticket)

    @contextlib.asynccontextmanager
    async def running(self, *, freezable: bool = True):  # type: ignore[no-untyped-def]
        async with self.gate.ticket(0) as ticket:
            assert await self.gate.wait(ticket) is Verdict.ADMITTED
            job = Job(peer="p", accepted=self.now, state=State.RUNNING, admitted=self.now,
                      ticket=ticket.job)
            if freezable:
                self.freezers[ticket.job] = FakeFreezer()
            with self.pauses.pausable(job, ticket,
                                      lambda why: self.cuts.append((ticket.job, why))):
                self.now += 1.0
                yield job, ticket


def log_of(rig: Rig, ticket: Ticket) -> list[str]:
    return rig.freezers[ticket.job].log


async def test_the_youngest_is_frozen_the_gate_holds_and_room_thaws_it() -> None:
    rig = Rig()
    async with rig.running() as (_old, t_old), rig.running() as (young, t_young):
        assert rig.pauses.step() is None  # room enough
        rig.headroom = FLOOR - 1
        action = rig.pauses.step()
        assert action is not None and action.act is Act.FREEZE and action.job == t_young.job
        assert log_of(rig, t_young) == ["freeze"] and log_of(rig, t_old) == []
        assert young.paused_since == rig.now and young.pauses == 1
        # Nothing starts while it is paused, though a slot and memory are free.
        async with rig.gate.ticket(0) as waiting:
            assert rig.gate.snapshot().hold is Hold.PAUSED
            assert waiting.verdict is None
            assert rig.pauses.step() is None  # never the last one running
            rig.now += 5.0
            rig.headroom = 2 * FLOOR
            action = rig.pauses.step()
            assert action is not None and action.act is Act.THAW
            assert log_of(rig, t_young) == ["freeze", "thaw"]
            assert young.paused_since is None and young.paused_seconds == 5.0
            assert waiting.verdict is Verdict.ADMITTED  # the gate goes on at once
    assert rig.pauses.pauses_total == 1 and rig.pauses.paused == 0


async def test_a_job_paused_too_long_without_room_is_cut() -> None:
    rig = Rig()
    async with rig.running() as (_, _t_old), rig.running() as (young, t_young):
        rig.headroom = 0
        assert rig.pauses.step() is not None
        rig.now += 60.0
        action = rig.pauses.step()
        assert action is not None and action.act is Act.CUT
        assert log_of(rig, t_young) == ["freeze", "kill"]
        assert [job for job, _ in rig.cuts] == [t_young.job]
        assert "paused 60s and headroom 0 MiB < 64 MiB floor" in rig.cuts[0][1]
        assert rig.pauses.cuts_total == 1 and young.paused_seconds == 60.0
        assert rig.gate.admission.paused == 0


async def test_a_client_deadline_cuts_before_max_pause() -> None:
    """The client's I/O timeout runs from its connect: a job that queued long
    is let go well before --max-pause."""
    rig = Rig()
    async with rig.running() as _, rig.running() as (young, _t):
        young.accepted -= 235.0  # it queued for almost four minutes
        rig.headroom = 0
        assert rig.pauses.step() is not None
        rig.now += 5.0
        action = rig.pauses.step()
        assert action is not None and action.act is Act.CUT


async def test_leaving_thaws_a_frozen_job_and_handed_off_ones_are_never_frozen() -> None:
    rig = Rig()
    async with rig.running() as (_, _t_old):
        async with rig.running() as (_young, t_young):
            rig.headroom = 0
            assert rig.pauses.step() is not None
        # Its job ended (the client left) while frozen: its processes go on to die.
        assert log_of(rig, t_young) == ["freeze", "thaw"]
        assert rig.gate.admission.paused == 0
        async with rig.running() as (other, t_other):
            other.state = State.HANDED_OFF  # its backend process serves another job now
            assert rig.pauses.step() is None
            assert log_of(rig, t_other) == []


async def test_a_job_without_a_way_to_freeze_it_goes_on_and_counts() -> None:
    """It is never frozen itself, but it is a running job: its growth counts,
    and with it running another may be frozen (it makes progress)."""
    rig = Rig()
    async with rig.running() as (_, t_freezable), rig.running(freezable=False) as _:
        rig.headroom = 0
        action = rig.pauses.step()
        assert action is not None and action.act is Act.FREEZE
        assert action.job == t_freezable.job  # the older one: the other cannot be
        assert rig.pauses.step() is None  # and it goes on: never the last one


async def test_a_failed_freeze_is_undone_and_not_tried_again() -> None:
    rig = Rig()

    class Refusing(FakeFreezer):
        def freeze(self) -> None:
            self.log.append("freeze")
            raise PermissionError(1, "Operation not permitted")

    async with rig.running() as _, rig.running() as (_, t_young):
        rig.freezers[t_young.job] = Refusing()
        rig.headroom = 0
        assert rig.pauses.step() is not None
        assert log_of(rig, t_young) == ["freeze", "thaw"]  # what was stopped goes on
        assert rig.pauses.pauses_total == 0 and rig.gate.admission.paused == 0
        assert rig.pauses.failures_total == 1
        action = rig.pauses.step()  # the older one now, never the refusing one again
        assert action is not None and action.job != t_young.job


async def test_the_shell_sleeps_without_a_timer_until_two_jobs_run(
        autojump_clock: trio.testing.MockClock) -> None:
    rig = Rig()
    steps: list[float] = []
    rig.pauses.step = lambda: steps.append(trio.current_time())  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rig.pauses.run)
        async with rig.running():
            await trio.sleep(3600)
            assert steps == []
            async with rig.running():
                await trio.sleep(1.0)
                assert len(steps) == 10  # every PAUSE_INTERVAL
        nursery.cancel_scope.cancel()


# -- for real: a SIGSTOPped backend process, cut --------------------------------------


async def test_a_cut_job_ends_pause_timeout_with_a_reset_and_the_other_goes_on(
        preforked_backend: TcpAddress) -> None:  # noqa: F811
    """Proxy mode without job cgroups: the backend child serving the youngest
    job is SIGSTOPped when memory runs out; it stays out of room past
    --max-pause, so its job is cut: its client sees a reset (distcc then
    compiles locally), the end line says pause-timeout, and the older job
    finishes normally."""
    cfg = config(preforked_backend, max_jobs=2, job_cgroups=False, identify=True,
                 pause_below_bytes=FLOOR, max_pause=0.5, min_free_bytes=0,
                 job_mem_bytes=MiB)
    async with gatekeeper(cfg) as gk, trio.open_nursery() as nursery:
        assert gk.server.pauses is not None
        results: dict[str, object] = {}

        async def job(name: str, hold: float) -> None:
            client = await gk.connect()
            try:
                results[name] = await run_job(client, request(name, 1, hold=hold))
            except (trio.BrokenResourceError, ConnectionResetError) as e:
                results[name] = e

        nursery.start_soon(job, "old.o", 2.0)
        await gk.wait_for(lambda s: s.gate.snapshot().running == 1)
        nursery.start_soon(job, "young.o", 20.0)
        # Both running, and both backend processes found by the meter (each
        # sample notifies the gate): each can be frozen.
        await gk.wait_for(lambda s: s.gate.snapshot().running == 2 and all(
            j.usage is not None and j.usage.pid is not None
            for j in s.connections.live.values()))
        gk.memory.value = FLOOR - MiB  # memory runs out under both
        await gk.wait_for(lambda s: s.pauses is not None and s.pauses.cuts_total == 1)
        gk.memory.value = 2**40
    assert results["old.o"] == reply(1)
    assert isinstance(results["young.o"], (trio.BrokenResourceError, ConnectionResetError))
    ends = gk.server.observatory.completed
    assert ends.get(Outcome.PAUSE_TIMEOUT.value) == 1, ends
    assert ends.get(Outcome.OK.value) == 1, ends


async def test_unknown_jobs_are_estimated_typical_only_where_every_job_can_be_paused() -> None:
    """Optimistic admission (issue 18) where the backstop stands: inetd mode
    (each child can be frozen), or proxy mode with job cgroups for the backend's
    processes; else the conservative 99th percentile."""
    inetd = Command.resolve(["cat"])
    on = config(UNUSED_BACKEND, pause_below_bytes=FLOOR)
    cases = [
        (Server(on, FixedMemory(2**40), command=inetd), TYPICAL_PERCENTILE),
        (Server(config(UNUSED_BACKEND), FixedMemory(2**40), command=inetd), PERCENTILE),
        (Server(replace(on, job_cgroups=False), FixedMemory(2**40)), PERCENTILE),
        (Server(replace(on, job_cgroups=True, backend=TcpAddress("192.0.2.1", 3632)),
                FixedMemory(2**40)), PERCENTILE),  # not on this box: not adopted
    ]
    for server, percentile in cases:
        assert server.book.percentile == percentile
        assert (server.pauses is not None) == (server.config.pause_below_bytes > 0)


def test_expected_growth_is_the_estimate_left_or_the_worst_case_once_past_it() -> None:
    job = Job(peer="p", accepted=0.0, estimate=100 * MiB)
    assert expected_growth(job, 300 * MiB) == 100 * MiB  # not measured yet
    job.usage = Usage(lambda hints, finder: None, lambda n: None, current=60 * MiB)
    assert expected_growth(job, 300 * MiB) == 40 * MiB  # within its estimate
    job.usage.current = 120 * MiB  # a typical estimate proved wrong
    assert expected_growth(job, 300 * MiB) == 180 * MiB
    job.usage.current = 400 * MiB  # past even the worst case: nothing to forecast
    assert expected_growth(job, 300 * MiB) == 0


async def test_a_forecast_freezes_the_youngest_while_headroom_is_still_left() -> None:
    """Two jobs past their typical estimates, each maybe growing to the worst
    case: the youngest is frozen though 200 MiB are still free."""
    rig = Rig()
    rig.pauses._worst = lambda: 250 * MiB
    async with rig.running() as (old, _), rig.running() as (young, t_young):
        for job in (old, young):
            job.estimate = 40 * MiB
            job.usage = Usage(lambda hints, finder: None, lambda n: None, current=100 * MiB)
        rig.headroom = 200 * MiB  # < 2 x 150 MiB still expected
        action = rig.pauses.step()
        assert action is not None and action.act is Act.FREEZE and action.job == t_young.job
        assert "headroom 200 MiB less 300 MiB expected growth" in action.why


def tickets_held(server: Server, count: int) -> bool:
    return len(server.connections.by_ticket) >= count


async def test_queued_jobs_are_estimated_again_when_the_book_learns(
        preforked_backend: TcpAddress) -> None:  # noqa: F811
    """A cold build: make -jN queued its jobs on the seed estimate, which lets
    one run at a time. Once enough peaks are learned, the unknown-job estimate
    drops, and the jobs still queued are estimated again: two now run at once."""
    seed = 600 * MiB
    cfg = config(preforked_backend, max_jobs=2, job_cgroups=False, min_free_bytes=0,
                 job_mem_bytes=seed)
    async with gatekeeper(cfg, available=1000 * MiB) as gk, trio.open_nursery() as nursery:
        book = gk.server.book
        for n in range(7):  # one short of MIN_SAMPLES: the seed still stands
            book.learn(f"earlier{n}", 20 * MiB)
        assert book.unknown_estimate() == seed
        for holding, (name, hold) in enumerate((("first.o", 1.0), ("b.o", 1.0),
                                                 ("c.o", 0.05)), 1):
            client = await gk.connect()
            nursery.start_soon(run_job, client, request(name, 10, hold=hold))
            await gk.wait_for(functools.partial(tickets_held, count=holding))
        snapshot = gk.server.gate.snapshot()
        assert (snapshot.running, snapshot.queued) == (1, 2)  # 600 + 600 > 1000
        # first.o ends: its slot goes to b.o at once (on the seed estimate: the
        # slot is handed on before the job is learned); then first.o is learned
        # (the 8th peak: ~20 MiB jobs), and c.o, still queued, is estimated
        # again and runs beside b.o.
        await gk.wait_for(lambda s: s.gate.snapshot().admitted_total == 3)
        assert gk.server.gate.snapshot().running == 2
        ests = {j.name: j.estimate for j in gk.server.connections.live.values()}
        assert book.unknown_estimate() < 100 * MiB
        assert ests["b.o"] == seed and ests["c.o"] == book.unknown_estimate()
