"""How good the estimates were: each finished job's estimate against its peak.

Pure: no trio, no socket, no clock (tests/test_purity.py checks the imports).

An admin wants to know how warm a build was and whether cold guesses are
any good (issue 19), per source of the estimate (`footprints.Source`): the
ratio estimate / measured peak of every job that taught the book something,
as a histogram (metrics) and the share within `BAND` (/status). A job cut
short (OOM-killed, or paused past its bound) needed more than it was given and
more than its measured peak: it is counted as outside the band, never in the
histogram (its peak is not what it needed).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Final

from gatekeeper.footprints import Source

# Issue 19's band of a good estimate: from 20 % under the real peak (the
# --min-free-mb floor and the pause backstop absorb that much) to 50 % over
# (waiting longer than needed, never a kill).
BAND: Final = (0.8, 1.5)
# Histogram bounds of estimate / peak: from a quarter of the need to four times it.
BUCKETS: Final = (0.25, 0.5, 0.8, 1.0, 1.25, 1.5, 2.0, 4.0)
# Ratios kept per source for the median in /status: the last build or so.
RECENT: Final = 512


@dataclass(slots=True)
class Tally:
    jobs: int = 0
    within: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    """Cumulative: jobs with a ratio at most each bound."""
    ratio_sum: float = 0.0
    cut: int = 0
    """Jobs cut short: outside the band, not in `buckets`."""
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))

    def median(self) -> float | None:
        if not self.recent:
            return None
        ordered = sorted(self.recent)
        return ordered[(len(ordered) - 1) // 2]


class Accuracy:
    def __init__(self) -> None:
        self.tallies: dict[Source, Tally] = {s: Tally() for s in Source}

    def record_cut(self, source: Source) -> None:
        self.tallies[source].cut += 1

    def record(self, source: Source, estimate: int, peak: int) -> None:
        if estimate <= 0 or peak <= 0:
            return
        ratio = estimate / peak
        tally = self.tallies[source]
        tally.jobs += 1
        tally.ratio_sum += ratio
        tally.recent.append(ratio)
        if BAND[0] <= ratio <= BAND[1]:
            tally.within += 1
        for i, bound in enumerate(BUCKETS):
            if ratio <= bound:
                tally.buckets[i] += 1

    def view(self) -> dict[str, object]:
        """For /status: per source, jobs (finished and cut short), the share
        within BAND, the median ratio of the finished ones."""
        out: dict[str, object] = {"band": list(BAND)}
        for source, tally in self.tallies.items():
            median = tally.median()
            judged = tally.jobs + tally.cut
            out[source.value] = {
                "jobs": judged,
                "cut_short": tally.cut,
                "within_band": round(tally.within / judged, 3) if judged else None,
                "median_ratio": round(median, 3) if median is not None else None,
            }
        return out
