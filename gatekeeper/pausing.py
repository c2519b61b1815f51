"""Pause instead of OOM: which running job to freeze when memory runs out, and
when to let it go on.

Why: an estimate can be wrong (a job never seen, a file that grew), and when
running compilers together outgrow the memory, the kernel's OOM killer picks
one and the compile is lost. Freezing the youngest of them instead (its cgroup's
freezer, or SIGSTOP of its tree) stops its growth while the others finish and
free memory; then it is thawed and goes on where it stopped. A paused job keeps
its slot: it still holds its memory.

A running job's states here:

    RUNNING   not paused (every job starts so)
    PAUSED    frozen since `paused[job]`; thawed back to RUNNING when room
              returns, or at `max_pause` at the latest: thawed if there is
              room, else CUT
    CUT       given up (its connection is reset: the distcc client compiles
              locally) -- better than holding it past the client's own I/O
              timeout (300 s), after which the client gives up anyway

What is judged is the *outlook*: the headroom less the growth still expected
from the running, unpaused jobs (`growth`, from their estimates and what they
use now: the shell's business; none given, the plain headroom). A job that
outgrows its estimate is what pausing exists for, and waiting until the
headroom itself is nearly gone is too late: two compilers growing side by side
use it up together, and the one left running still has its own growth ahead.

Rules (`Pauser.decide`, one action per memory reading: each freeze or thaw
changes what the next reading shows):

* freeze only while the outlook is below `floor` and at least two jobs run
  unpaused, and then the youngest of them (the last admitted: the least work
  lost, and usually the one whose arrival tipped the balance) that may be
  frozen: one with a way to be frozen (`freezable`), not past its deadline,
  not already let go at its bound;
* never freeze the last unpaused job: something must make progress and end;
  and when the unpaused ones have all ended, thaw at once;
* thaw the longest-paused job once the outlook less its own growth is at least
  `resume` (above `floor`: a thaw that would be followed at once by a freeze
  helps nobody);
* a job paused for `max_pause` (or past its own deadline: its client's I/O
  timeout runs from before it was admitted) is thawed if the headroom itself
  is at least `floor`, else cut (a cut loses a compile: only for want of room
  now, not for a forecast); one thawed so is never frozen again.

Pure: no clock, no I/O (tests/test_purity.py); the shell feeds it readings
and carries out its actions.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from gatekeeper.observe.units import format_mib

JobId = int


class Act(enum.Enum):
    FREEZE = "freeze"
    THAW = "thaw"
    CUT = "cut"


@dataclass(frozen=True, slots=True)
class Action:
    act: Act
    job: JobId
    why: str
    """For the log line: the headroom against the rule that decided."""


@dataclass(slots=True)
class Pauser:
    floor: int
    """Bytes of headroom below which a job is frozen."""
    resume: int
    """Bytes of headroom from which a paused job is thawed (>= floor)."""
    max_pause: float
    """Seconds a job may stay paused."""
    paused: dict[JobId, float] = field(default_factory=dict)
    """Paused jobs and since when."""
    released: set[JobId] = field(default_factory=set)
    """Jobs let go at their bound: never frozen again (a job thawed at its bound
    would be the youngest again at the next reading, and be frozen, thawed,
    frozen... until its client gave up)."""
    pauses_total: int = 0

    def __post_init__(self) -> None:
        if self.resume < self.floor:
            raise ValueError("resume must not be below floor")
        if not self.max_pause > 0:
            raise ValueError("max_pause must be positive")

    def bound(self, job: JobId, deadlines: Mapping[JobId, float] | None = None) -> float:
        """When a paused job must be let go at the latest: `max_pause` after it
        was frozen, or its own deadline if earlier (its client's I/O timeout
        counts from before it was even admitted)."""
        limit = self.paused[job] + self.max_pause
        if deadlines is not None and job in deadlines:
            limit = min(limit, deadlines[job])
        return limit

    def undo(self, job: JobId) -> None:
        """The freeze just decided could not be carried out: as if never decided."""
        if self.paused.pop(job, None) is not None:
            self.pauses_total -= 1

    def decide(self, now: float, headroom: int, running: Sequence[tuple[JobId, float]],
               deadlines: Mapping[JobId, float] | None = None,
               growth: Mapping[JobId, int] | None = None,
               freezable: Collection[JobId] | None = None) -> Action | None:
        """The next action, given `headroom` (bytes the jobs may still grow
        into), the running jobs with their admission times and, optionally, by
        when some must be going on again, how much each is still expected to
        grow, and which may be frozen at all (None: every one). Jobs no longer
        running are forgotten first."""
        alive = {job for job, _ in running}
        for job in [j for j in self.paused if j not in alive]:
            del self.paused[job]
        self.released &= alive
        grows = growth or {}
        unpaused = [(admitted, job) for job, admitted in running if job not in self.paused]
        outlook = headroom - sum(max(0, grows.get(job, 0)) for _, job in unpaused)
        if self.paused:
            if not unpaused:
                # The unpaused ones ended: nothing else can free memory now.
                job, _ = min(self.paused.items(), key=lambda item: item[1])
                del self.paused[job]
                return Action(Act.THAW, job, "every other running job has ended")
            due, job = min((self.bound(j, deadlines), j) for j in self.paused)
            if now >= due:
                since = self.paused.pop(job)
                self.released.add(job)
                if headroom >= self.floor:
                    return Action(Act.THAW, job, f"paused {now - since:.0f}s, the most it may be")
                return Action(Act.CUT, job, f"paused {now - since:.0f}s and headroom "
                                            f"{format_mib(headroom)} < "
                                            f"{format_mib(self.floor)} floor")
            job, _ = min(self.paused.items(), key=lambda item: item[1])
            if outlook - max(0, grows.get(job, 0)) >= self.resume:
                del self.paused[job]
                return Action(Act.THAW, job, f"{_explain(headroom, outlook)}"
                                             f"{_its_growth(grows.get(job, 0))} >= "
                                             f"{format_mib(self.resume)} to resume")
        eligible = [(admitted, job) for admitted, job in unpaused
                    if job not in self.released
                    and (freezable is None or job in freezable)
                    and (deadlines is None or now < deadlines.get(job, math.inf))]
        if outlook < self.floor and len(unpaused) >= 2 and eligible:
            _, youngest = max(eligible)
            self.paused[youngest] = now
            self.pauses_total += 1
            return Action(Act.FREEZE, youngest, f"{_explain(headroom, outlook)} < "
                                                 f"{format_mib(self.floor)} floor")
        return None


def _explain(headroom: int, outlook: int) -> str:
    """"headroom 40 MiB" or, with growth expected, "headroom 300 MiB less 260
    MiB expected growth"."""
    text = f"headroom {format_mib(headroom)}"
    if outlook != headroom:
        text += f" less {format_mib(headroom - outlook)} expected growth"
    return text


def _its_growth(growth: int) -> str:
    return f" and its own {format_mib(growth)}" if growth > 0 else ""
