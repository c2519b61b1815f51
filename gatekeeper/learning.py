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
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from gatekeeper.distcc.reply import CompileStatus
from gatekeeper.outcome import Outcome


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


def lesson(outcome: Outcome, status: CompileStatus | None, *, oom_struck: bool) -> Teaching:
    """What to learn from a measured job that ended with `outcome` and, for a
    distcc job, distccd's `status`; `oom_struck`: the box's OOM-kill count
    rose while it ran (only read where `needs_oom_check`)."""
    completed = _completed(outcome, status)
    if status is not None and status.signal is not None:
        return Teaching(Lesson.CUT_SHORT, f"signal {status.signal}")
    if oom_struck and not completed:
        return Teaching(Lesson.CUT_SHORT, "the OOM killer struck while it ran")
    if completed and not oom_struck:
        return Teaching(Lesson.LEARN)
    return Teaching(Lesson.NOTHING)
