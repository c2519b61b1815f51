"""What a finished job teaches (gatekeeper.learning): the whole table, no sockets."""

from __future__ import annotations

import signal

import pytest

from gatekeeper.distcc.reply import CompileStatus
from gatekeeper.learning import Lesson, lesson, needs_oom_check
from gatekeeper.outcome import Outcome

OK = CompileStatus(0)
EXIT1 = CompileStatus(1 << 8)
KILLED = CompileStatus(signal.SIGKILL)

TABLE = [
    # outcome, distccd's status, OOM killer struck -> lesson
    (Outcome.OK, OK, False, Lesson.LEARN),
    (Outcome.OK, None, False, Lesson.LEARN),        # inetd direct, other backends
    (Outcome.OK, None, True, Lesson.NOTHING),       # clean, but the OOM killer was about
    (Outcome.OK, KILLED, False, Lesson.CUT_SHORT),  # a signal: died where it was measured
    (Outcome.OK, EXIT1, True, Lesson.CUT_SHORT),    # g++ reports a killed cc1plus as exit 1
    (Outcome.OK, EXIT1, False, Lesson.NOTHING),     # a compile error says nothing
    (Outcome.CLIENT_ERROR, None, False, Lesson.NOTHING),
    (Outcome.CLIENT_ERROR, None, True, Lesson.CUT_SHORT),
    (Outcome.BACKEND_FAILED, None, True, Lesson.CUT_SHORT),
    (Outcome.COMMAND_FAILED, None, False, Lesson.NOTHING),
    (Outcome.DRAIN_TIMEOUT, None, False, Lesson.NOTHING),
]


@pytest.mark.parametrize(("outcome", "status", "oom", "expected"), TABLE)
def test_lesson_table(outcome: Outcome, status: CompileStatus | None, oom: bool,
                      expected: Lesson) -> None:
    assert lesson(outcome, status, oom_struck=oom).lesson is expected


def test_the_oom_count_is_read_only_where_it_matters() -> None:
    assert not needs_oom_check(Outcome.OK, OK)  # distccd said done: nothing to ask
    assert needs_oom_check(Outcome.OK, None)
    assert needs_oom_check(Outcome.OK, EXIT1)
    assert needs_oom_check(Outcome.CLIENT_ERROR, OK)


def test_cut_short_says_what_cut_it() -> None:
    assert lesson(Outcome.OK, KILLED, oom_struck=False).why == f"signal {signal.SIGKILL}"
    assert "OOM killer" in lesson(Outcome.OK, EXIT1, oom_struck=True).why
