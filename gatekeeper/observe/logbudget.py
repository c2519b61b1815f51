"""A budget of log lines for one kind of event that a peer can repeat at will.

Each connection from a denied peer used to write its own INFO line, so anyone
who could reach the port could fill the journal (issue 16). `LogBudget` lets
`burst` lines through per `period` and counts the rest; the next line let
through says how many were not written. Metrics still count every one.

Pure: the caller passes the time.
"""

from __future__ import annotations

# 10 lines a second: a human reading the journal sees every denial of a
# mistaken client, a flood costs at most 864,000 short lines a day instead of
# one per connection (thousands a second).
BURST = 10
PERIOD = 1.0


class LogBudget:
    __slots__ = ("_suppressed", "_used", "_window_start", "burst", "period")

    def __init__(self, burst: int = BURST, period: float = PERIOD) -> None:
        self.burst, self.period = burst, period
        self._window_start: float | None = None
        self._used = 0
        self._suppressed = 0

    def admit(self, now: float) -> int | None:
        """None: do not write this line. Otherwise write it, and report the
        returned number of lines that were not written before it (often 0)."""
        if self._window_start is None or now - self._window_start >= self.period:
            self._window_start, self._used = now, 0
        if self._used >= self.burst:
            self._suppressed += 1
            return None
        self._used += 1
        suppressed, self._suppressed = self._suppressed, 0
        return suppressed
