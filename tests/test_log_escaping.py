"""Client text in logs (issue 16): escaped so a line stays one line, and a
denied peer's lines rate-limited with a count. Pure tables and properties."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gatekeeper.observe.escape import MAX_LOGGED, printable
from gatekeeper.observe.logbudget import LogBudget


def test_forged_line_stays_on_one_line() -> None:
    name = "x.o\ngatekeeper: INFO: end peer=1.2.3.4:5 outcome=ok\r\x1b[2J"
    text = printable(name)
    assert text == ("x.o\\x0agatekeeper:\\x20INFO:\\x20end\\x20peer=1.2.3.4:5\\x20outcome=ok"
                    "\\x0d\\x1b[2J")


def test_non_utf8_bytes_come_out_as_their_hex() -> None:
    raw = b"caf\xe9.o".decode("utf-8", "surrogateescape")
    assert printable(raw) == "caf\\xe9.o"
    assert printable("ü.o") == "ü.o"  # printable text stays readable
    assert printable("a\\b") == "a\\\\b"  # a backslash cannot fake an escape


def test_long_values_are_cut() -> None:
    assert printable("a" * 10_000) == "a" * MAX_LOGGED + "..."


@given(st.text())
def test_escaped_text_is_one_printable_field(text: str) -> None:
    out = printable(text)
    assert out.isprintable() and " " not in out
    assert len(out) <= 10 * MAX_LOGGED + 3


def test_budget_lets_a_burst_through_then_counts() -> None:
    budget = LogBudget(burst=3, period=1.0)
    assert [budget.admit(0.0) for _ in range(5)] == [0, 0, 0, None, None]
    assert budget.admit(0.5) is None
    assert budget.admit(1.0) == 3  # a new second: this line reports the 3 not written
    assert budget.admit(1.1) == 0


@given(st.lists(st.floats(0, 100), max_size=200))
def test_budget_never_exceeds_its_rate_and_loses_no_count(times: list[float]) -> None:
    budget = LogBudget(burst=4, period=1.0)
    written, reported, suppressed = [], 0, 0
    for now in sorted(times):
        got = budget.admit(now)
        if got is None:
            suppressed += 1
        else:
            written.append(now)
            reported += got
    for t in written:
        assert sum(1 for u in written if t <= u < t + 1.0) <= 2 * 4  # two windows at most
    assert suppressed - reported == budget._suppressed  # the rest awaits the next line
