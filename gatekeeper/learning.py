"""What a finished job teaches about the memory its compile needs.

Pure: no trio, no socket, no clock (tests/test_purity.py checks the imports).
The job's shell measures the peak and asks `lesson`; `FootprintBook` keeps
what is learned.

An OOM-killed compiler does not break the connection: distccd reports it
inside a normal reply, and the peak measured is where it died, not what it
needed. So:

- a compile distccd reports as done (or, where the status cannot be seen --
  inetd mode, other backends -- a job that ended cleanly while the OOM killer
  stayed quiet) is learned as it is (`Lesson.LEARN`);
- one killed by a signal, or one that failed while the OOM killer struck (g++
  reports its killed cc1plus as exit 1), needed more than the peak it died at
  (`Lesson.CUT_SHORT`: `FootprintBook.learn_cut_short`);
- any other failure (a compile error, a broken connection) says nothing about
  what it needs (`Lesson.NOTHING`).

And only a real measurement of a real compile teaches (issue 17: ten port-scanner
connections, each "learned" at 2 MiB, once made the unknown-job estimate 3 MiB
and the next real compiles peaked at 815 and 936 MiB):

- a connection that carried no compile (no distcc request was read, or with
  `--identify none` no bytes went both ways) teaches nothing (`carried_work`);
- a peak is a measurement when it is the job's own cgroup's (the kernel counted
  every page charged to it) or when its process tree was sampled at least
  `MIN_SAMPLES` times; a job shorter than that was seen at its start (distccd's
  child before the compiler) or not at all (`Observation.observed`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from gatekeeper.distcc.reply import CompileStatus
from gatekeeper.outcome import Outcome

# A sampled peak is believed from this many readings of the job's process tree
# up: at 0.2 s apart the tree has run for 0.4 s between the first and the last,
# so the compiler, not distccd's child waiting for its request, was seen. In
# the sqlite build of issue 17, jobs seen once or twice logged 2-9 MiB peaks.
MIN_SAMPLES = 3


@dataclass(frozen=True, slots=True)
class Observation:
    """What the meter saw of a job's memory."""

    peak: int
    samples: int
    """Readings taken while it ran (of its process tree, or of its cgroup's usage)."""
    exact: bool = False
    """`peak` is the job's own cgroup's: what the kernel charged, sampled or not."""

    @property
    def observed(self) -> bool:
        return self.peak > 0 and (self.exact or self.samples >= MIN_SAMPLES)


def carried_work(*, identified: bool | None, bytes_in: int, bytes_out: int) -> bool:
    """Whether the connection carried a job at all. `identified`: the request
    head read as a distcc request (None: `--identify none`, nothing is read,
    so it must at least have moved bytes both ways)."""
    if identified is not None:
        return identified and bytes_in > 0
    return bytes_in > 0 and bytes_out > 0


class Lesson(enum.Enum):
    LEARN = "learn"
    CUT_SHORT = "cut-short"
    NOTHING = "nothing"


@dataclass(frozen=True, slots=True)
class Teaching:
    lesson: Lesson
    why: str = ""
    """For a cut-short job: what cut it short, for the warning line."""


def _completed(outcome: Outcome, status: CompileStatus | None) -> bool:
    return outcome is Outcome.OK and (status is None or status.ok)


def needs_oom_check(outcome: Outcome, status: CompileStatus | None) -> bool:
    """Whether the OOM killer's count matters to the lesson: not for a compile
    distccd reported as done (one read of /proc/vmstat saved per job)."""
    return not _completed(outcome, status) or status is None


def lesson(outcome: Outcome, status: CompileStatus | None, *, oom_struck: bool,
           carried: bool, observed: bool) -> Teaching:
    """What to learn from a job that ended with `outcome` and, for a distcc
    job, distccd's `status`; `oom_struck`: the box's OOM-kill count rose while
    it ran (only read where `needs_oom_check`); `carried`: it carried a job
    (`carried_work`); `observed`: its peak is a measurement
    (`Observation.observed`). Without both, nothing is learned."""
    if not carried:
        return Teaching(Lesson.NOTHING, "it carried no compile")
    if not observed:
        return Teaching(Lesson.NOTHING, "its peak was not observed")
    completed = _completed(outcome, status)
    if outcome is Outcome.PAUSE_TIMEOUT:
        return Teaching(Lesson.CUT_SHORT, "paused as long as it may be, with no room to go on")
    if status is not None and status.signal is not None:
        return Teaching(Lesson.CUT_SHORT, f"signal {status.signal}")
    if oom_struck and not completed:
        return Teaching(Lesson.CUT_SHORT, "the OOM killer struck while it ran")
    if completed and not oom_struck:
        return Teaching(Lesson.LEARN)
    return Teaching(Lesson.NOTHING)
