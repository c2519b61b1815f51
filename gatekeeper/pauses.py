"""The trio shell of pausing (`pausing.Pauser` decides): reads the headroom
while two or more jobs run or one is paused, forecasts each job's growth
(`expected_growth`), finds each job's way of being frozen (`memory.freeze`),
and carries out what the pauser says.

A job is pausable from the moment its processes exist until its backend part
is over (`Job.state` RUNNING; in proxy mode the distccd child then goes on to
serve another job, which must never be frozen for this one). Leaving
`pausable` thaws the job if it is frozen, whatever ended it, so no process is
ever left stopped (an inetd child that is cancelled is also sent SIGCONT and
thawed by `inetd.command`, since it must be able to die).

While any job is paused the gate starts nothing (`Admission.pause`): the
memory the paused one will need when it goes on comes first.

Resource handling: owns nothing but the freeze state of registered jobs;
`run` lives in the server nursery and sleeps with no timer while fewer than two
jobs are registered and none is paused.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import trio

from gatekeeper.gate import Gate, Ticket
from gatekeeper.job import Job, State
from gatekeeper.memory.freeze import CgroupFreezer, Freezer, SignalFreezer
from gatekeeper.observe.escape import printable
from gatekeeper.pausing import Act, Action, Pauser

log = logging.getLogger("gatekeeper")

# How often headroom is read while jobs could need pausing. A heavy cc1plus
# grew at up to 150 MB/s here (bench/hungry.py's heavy unit: 230 MB in ~1.5 s of
# its steepest growth), so two of them take ~30 MB per 100 ms -- less than the
# default floor (half of --min-free-mb) and far less than the growth forecast
# judges ahead. A reading is a few µs.
PAUSE_INTERVAL = 0.1
# A paused job is let go (or cut) at the latest this long after its client
# connected: distcc's client waits DISTCC_IO_TIMEOUT (300 s) for its reply,
# counted from its request, and the compile still needs the rest of its run
# after the thaw -- a minute, as the queue timeout's default leaves it.
CLIENT_DEADLINE = 240.0


@dataclass(eq=False, slots=True)
class Pausable:
    job: Job
    ticket: Ticket
    cut: Callable[[str], None]
    """Ends the job's task with `Outcome.PAUSE_TIMEOUT` and this reason."""
    freezer: Freezer | None = None
    """What froze it (kept until it is let go: the thaw must use the same)."""
    unfreezable: bool = False
    """A freeze failed: not tried again for this job (no warning every 100 ms)."""


def freezer_of(job: Job) -> Freezer | None:
    """The best way to freeze this job now, or None while it has none: its own
    cgroup's freezer; else SIGSTOP of its processes."""
    if job.adoption is not None:  # proxy mode, its distccd child in a job cgroup
        pid = job.adoption.pid
        return (CgroupFreezer.of(job.adoption.cgroup, spare=pid)
                or SignalFreezer(pid, spare=pid))
    if job.cgroup is not None:
        freezer = CgroupFreezer.of(job.cgroup)
        if freezer is not None:
            return freezer
    if job.pid is not None:  # inetd mode: the child and what it runs
        return SignalFreezer(job.pid)
    if job.usage is not None and job.usage.pid is not None and not job.usage.stopped:
        pid = job.usage.pid  # proxy mode, sampled: the distccd child found by the meter
        return SignalFreezer(pid, spare=pid)
    return None


def expected_growth(job: Job, worst: int) -> int:
    """How much more the job may still take: up to its estimate while within
    it (what admission reserved for it); once past it, the estimate was wrong
    -- an unknown job admitted on a typical estimate that turns out heavy -- and
    it may grow to `worst` (a conservative guess for a job never seen)."""
    usage = job.usage
    current = usage.current if usage is not None and usage.current is not None else 0
    estimate = job.estimate or 0
    if current <= estimate:
        return estimate - current
    return max(0, worst - current)


def _may_freeze(job: Job) -> bool:
    """Its processes are its own: running, not handed off (a distccd child then
    serves another job), and in inetd mode started and not yet reaped (its
    pid may then be reused) nor being stopped (a frozen task never sees the
    signal that stops it)."""
    if job.state is not State.RUNNING or job.admitted is None:
        return False
    if job.pid is not None or job.cgroup is not None:  # inetd mode
        return job.child_running
    return True


def _signals_safe(job: Job, freezer: Freezer) -> bool:
    """Whether signalling `freezer`'s processes cannot reach a stranger: not
    for an inetd child that was reaped (a cgroup freezer only ever touches the
    job's own cgroup)."""
    return not (isinstance(freezer, SignalFreezer) and job.pid is not None
                and not job.child_running)


class Pauses:
    def __init__(self, pauser: Pauser, gate: Gate, *,
                 headroom: Callable[[], int | None] | None = None,
                 clock: Callable[[], float] = trio.current_time,
                 interval: float = PAUSE_INTERVAL,
                 find: Callable[[Job], Freezer | None] = freezer_of,
                 worst: Callable[[], int] | None = None) -> None:
        self.pauser = pauser
        self._find = find
        self._worst = worst
        """A conservative estimate for a job never seen (None: growth is not
        forecast, only the headroom itself is judged)."""
        self.gate = gate
        self._headroom = headroom or gate.available_now
        self._clock = clock
        self.interval = interval
        self._jobs: dict[int, Pausable] = {}
        """Registered jobs by ticket id."""
        self._wakeup = trio.Event()
        self.cuts_total = 0
        self.failures_total = 0

    @property
    def paused(self) -> int:
        return len(self.pauser.paused)

    @property
    def pauses_total(self) -> int:
        return self.pauser.pauses_total

    @contextmanager
    def pausable(self, job: Job, ticket: Ticket, cut: Callable[[str], None]) -> Iterator[None]:
        """The job may be frozen while this lasts (and is thawed as it ends)."""
        entry = Pausable(job, ticket, cut)
        self._jobs[ticket.job] = entry
        self._wakeup.set()
        try:
            yield
        finally:
            del self._jobs[ticket.job]
            self.pauser.paused.pop(ticket.job, None)
            self._thaw(entry, "its job is ending")

    async def run(self) -> None:
        while True:
            if len(self._jobs) < 2 and not self.pauser.paused:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            await trio.sleep(self.interval)
            self.step()

    def step(self) -> Action | None:
        """One reading, one decision, carried out (tests call it directly)."""
        headroom = self._headroom()
        if headroom is None:
            return None
        now = self._clock()
        # Every running job counts (its growth, "the last one running"); those
        # with a way to be frozen now may be frozen. The way is looked for
        # afresh each time until one is used: a proxy job's cgroup may appear
        # after its process was first found.
        running: list[tuple[int, float]] = []
        found: dict[int, Freezer] = {}
        for job_id, entry in self._jobs.items():
            job = entry.job
            if not _may_freeze(job):
                continue
            assert job.admitted is not None
            running.append((job_id, job.admitted))
            if job.paused_since is None and not entry.unfreezable:
                freezer = self._find(job)
                if freezer is not None:
                    found[job_id] = freezer
        deadlines = {job_id: self._jobs[job_id].job.accepted + CLIENT_DEADLINE
                     for job_id, _ in running}
        growth = None
        if self._worst is not None:
            worst = self._worst()
            growth = {job_id: expected_growth(self._jobs[job_id].job, worst)
                      for job_id, _ in running}
        action = self.pauser.decide(now, headroom, running, deadlines, growth, found)
        # Frozen jobs the pauser forgot (no longer running: handed off, their
        # child reaped or being stopped) are let go.
        for job_id, entry in self._jobs.items():
            if entry.job.paused_since is not None and job_id not in self.pauser.paused and (
                    action is None or action.job != job_id):
                self._thaw(entry, "it is no longer running")
        if action is None:
            return None
        entry = self._jobs[action.job]
        if action.act is Act.FREEZE:
            entry.freezer = found[action.job]
            self._freeze(entry, action.why)
        elif action.act is Act.THAW:
            self._thaw(entry, action.why)
        else:
            self._cut(entry, action.why)
        return action

    def _name(self, job: Job) -> str:
        return printable(job.name or job.key or job.peer)

    def _freeze(self, entry: Pausable, why: str) -> None:
        job, freezer = entry.job, entry.freezer
        assert freezer is not None
        try:
            freezer.freeze()
        except OSError as e:
            self.pauser.undo(entry.ticket.job)
            self.failures_total += 1
            entry.freezer, entry.unfreezable = None, True
            log.warning("could not pause job=%s (%s): %s; it is not paused again",
                        self._name(job), freezer.how, e)
            with contextlib.suppress(OSError):  # whatever was stopped goes on
                freezer.thaw()
            return
        job.paused_since = self._clock()
        job.pauses += 1
        log.info("pausing job=%s %s (%s)", self._name(job), why, freezer.how)
        self.gate.pause(entry.ticket)

    def _thaw(self, entry: Pausable, why: str) -> None:
        job, freezer = entry.job, entry.freezer
        if job.paused_since is None or freezer is None:
            return
        entry.freezer = None
        try:
            if _signals_safe(job, freezer):
                freezer.thaw()
        except OSError as e:
            self.failures_total += 1
            log.warning("could not resume job=%s (%s): %s", self._name(job), freezer.how, e)
        now = self._clock()
        paused = now - job.paused_since
        job.paused_seconds += paused
        job.paused_since = None
        log.info("resuming job=%s after %.1fs: %s", self._name(job), paused, why)
        self.gate.unpause(entry.ticket)

    def _cut(self, entry: Pausable, why: str) -> None:
        job, freezer = entry.job, entry.freezer
        assert freezer is not None
        entry.freezer = None
        log.warning("cutting job=%s: %s; its client compiles it locally",
                    self._name(job), why)
        try:
            if _signals_safe(job, freezer):
                freezer.kill()
        except OSError as e:
            log.warning("could not kill job=%s (%s): %s", self._name(job), freezer.how, e)
            with contextlib.suppress(OSError):  # (its task's cancellation ends the rest)
                freezer.thaw()
        self.cuts_total += 1
        if job.paused_since is not None:
            job.paused_seconds += self._clock() - job.paused_since
            job.paused_since = None
        self.gate.unpause(entry.ticket)
        entry.cut(why)
