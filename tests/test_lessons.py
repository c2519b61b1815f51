"""What a finished job teaches (gatekeeper.learning): the whole table, no sockets."""

from __future__ import annotations

import signal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatekeeper.distcc.reply import CompileStatus
from gatekeeper.learning import (
    MIN_SAMPLES,
    Lesson,
    Observation,
    carried_work,
    lesson,
    needs_oom_check,
)
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
    assert lesson(outcome, status, oom_struck=oom, carried=True, observed=True).lesson is expected


def test_the_oom_count_is_read_only_where_it_matters() -> None:
    assert not needs_oom_check(Outcome.OK, OK)  # distccd said done: nothing to ask
    assert needs_oom_check(Outcome.OK, None)
    assert needs_oom_check(Outcome.OK, EXIT1)
    assert needs_oom_check(Outcome.CLIENT_ERROR, OK)


def test_cut_short_says_what_cut_it() -> None:
    assert lesson(Outcome.OK, KILLED, oom_struck=False, carried=True,
                  observed=True).why == f"signal {signal.SIGKILL}"
    assert "OOM killer" in lesson(Outcome.OK, EXIT1, oom_struck=True, carried=True,
                                  observed=True).why


@given(outcome=st.sampled_from(list(Outcome)),
       status=st.sampled_from([None, OK, EXIT1, KILLED]), oom=st.booleans(),
       carried=st.booleans(), observed=st.booleans())
def test_only_a_measured_compile_teaches(outcome: Outcome, status: CompileStatus | None,
                                         oom: bool, carried: bool, observed: bool) -> None:
    taught = lesson(outcome, status, oom_struck=oom, carried=carried, observed=observed)
    if not (carried and observed):
        assert taught.lesson is Lesson.NOTHING  # not even a cut-short guess


def test_what_counts_as_a_measurement() -> None:
    assert not Observation(peak=2 * 2**20, samples=1).observed  # distccd's child, once
    assert not Observation(peak=2 * 2**20, samples=MIN_SAMPLES - 1).observed
    assert Observation(peak=200 * 2**20, samples=MIN_SAMPLES).observed
    assert Observation(peak=9 * 2**20, samples=0, exact=True).observed  # the cgroup's peak
    assert not Observation(peak=0, samples=0, exact=True).observed
    assert not Observation(peak=0, samples=10).observed


def test_what_counts_as_a_job() -> None:
    # identify on: only a request read as distcc's
    assert carried_work(identified=True, bytes_in=300, bytes_out=0)
    assert not carried_work(identified=False, bytes_in=300, bytes_out=40)  # a scanner's GET
    assert not carried_work(identified=True, bytes_in=0, bytes_out=0)
    # identify none: bytes both ways
    assert carried_work(identified=None, bytes_in=1, bytes_out=1)
    assert not carried_work(identified=None, bytes_in=0, bytes_out=0)  # a TCP check
    assert not carried_work(identified=None, bytes_in=10, bytes_out=0)
