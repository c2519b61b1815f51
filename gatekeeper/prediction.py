"""What a compile never seen will need, from what its request head says.

Pure: no trio, no socket, no clock (tests/test_purity.py checks the imports).

Before this, every unknown job got one figure (issue 19: a second checkout of
fmtlib reserved 1,154 MiB for each of 43 jobs whose median real peak was
306 MiB). But a request head tells its size, and within one kind of compile
(compiler, language, -O and -g levels, size unit: `identity.Features.kind`) a
compiler's peak grows with what it reads. It does not grow by one law over
all sizes: a file of a few KiB costs the compiler's base (4-5 MiB of a job's
own cgroup for cc1plus), a 2.3 MB translation unit that is mostly common
headers 140 MiB, and one of 5.3 MB whose own part instantiates templates
1,591 MiB (googletest, 2026-12-07: a log-log slope of 0.7 between the first
two, 2.9 between the last two; headers are parsed, tests instantiated).
One straight line through all of them (this module until 2026-12-07) was
pulled flat by the small files and the many header-bound ones and put every
heavy test at 200-300 MiB.

So a prediction is local: for each kind the model keeps the last `PER_KIND`
(size, peak) pairs of finished jobs, takes the `NEIGHBOURS` nearest to the
job's size (in ratio, so log size), and fits those alone

    log(peak) = a + b * log(size)                      (least squares)

with b held within 0..MAX_SLOPE (a peak does not fall as the source grows),
then predicts at a quantile of that fit's own residuals:
`exp(a + b * log(size) + residual_q)`. In log space a quantile of residuals
is a ratio, so the estimate is "the local fit, times what the q-th quantile
of the jobs of about this size needed above it". A kind with fewer than
`MIN_SAMPLES` pairs borrows from the pooled pairs of its size unit (all
compilers and flags with that encoding: a heavier guess for a C file, since
C++ dominates, which errs high); with fewer still there is no prediction and
the book's distribution stands.

Bounded: at most `MAX_KINDS` kinds (least recently learned dropped), each
`PER_KIND` pairs, kept in size order as well so that the neighbours of a
size are found by bisection, not by a sort (`predict` runs for each queued
job the book re-estimates after each job ends).
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from gatekeeper.distcc.identity import MAX_NAME, Features

# Pairs kept per kind: 256 is several builds of a large target's files, and
# forgets a compiler upgrade's old peaks within a few builds.
PER_KIND: Final = 256
# Kinds kept: compilers x languages x levels x encodings in use on one box;
# 64 is far more than a farm uses (issue 19's builds: 3), and bounds a client
# that sends made-up compiler names.
MAX_KINDS: Final = 64
# A fit from fewer pairs than this is not believed: 8, as for the unknown-job
# percentile (footprints.MIN_SAMPLES); with two sizes of files a fit from 8
# already separates them (the memory bench's heavy and light files).
MIN_SAMPLES: Final = 8
# Pairs a prediction is fitted on: the 16 nearest in size, twice MIN_SAMPLES,
# so that the safe quantile of their residuals is not the single highest (0.9
# of 16 is the second highest; of 8 it would be the highest). Replaying
# googletest's 102 jobs (module docstring) with 8, 12, 16, 24 and 32 put
# 69-78 % of the judged jobs within issue 19's band at either quantile, the
# global fit 31-66 %: the choice among them is not what matters, being local is.
NEIGHBOURS: Final = 16
# The slope's bounds in log-log space: 0 (a bigger source never needs less)
# to 3: googletest's test files climb at 2.9 between 2.3 and 5.3 MB (module
# docstring); a steeper local fit comes from too close sizes and extrapolates
# wildly (above the largest peak seen, the ceiling holds it anyway).
MAX_SLOPE: Final = 3.0
# Sizes spread less than this (ln 1.1: within 10 %) say nothing of a slope:
# the fit is flat, the quantile of the peaks themselves.
MIN_SPREAD: Final = math.log(1.1)
# Where predictions are read among the residuals. SAFE where a wrong guess
# means an OOM kill: the 90th percentile (one job in ten needs more than the
# local fit says -- and admission's --min-free-mb covers some of that); TYPICAL
# where the pause backstop stands (footprints.TYPICAL_PERCENTILE's reasoning):
# the median, a little above it so that the -20 % edge of issue 19's
# error band is met by more than half the jobs.
SAFE_QUANTILE: Final = 0.9
# Above the largest peak seen (of the box, or of the job's own kind), a
# prediction is an extrapolation: it is held to that peak plus this, the
# unknown-job estimate's margin (footprints.MARGIN).
CEILING_MARGIN: Final = 0.10
TYPICAL_QUANTILE: Final = 0.6
POOLED: Final = "*/"
# Sizes believed: a request head's length field is 32 bits, and pump mode's
# extrapolation (request.MAX_FILES files) stays below this; anything larger
# is not a measurement (the state file's bound too).
MAX_SIZE: Final = 2**50


@dataclass(frozen=True, slots=True)
class Fit:
    intercept: float
    slope: float
    residuals: tuple[float, ...]
    """Sorted residuals of the pairs fitted."""
    lowest: int
    """The smallest peak among them: no prediction goes below it."""

    def at(self, size: int, quantile: float) -> int:
        index = min(len(self.residuals) - 1,
                    max(0, math.ceil(quantile * len(self.residuals)) - 1))
        value = self.intercept + self.slope * math.log(max(size, 1)) + self.residuals[index]
        return max(self.lowest, int(math.exp(min(value, 60.0))))


def fit(pairs: list[tuple[int, int]]) -> Fit:
    """Least squares of log(peak) on log(size), slope within 0..MAX_SLOPE."""
    xs = [math.log(max(s, 1)) for s, _ in pairs]
    ys = [math.log(max(p, 1)) for _, p in pairs]
    n = len(pairs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs) / n
    slope = 0.0
    if var >= MIN_SPREAD ** 2:
        cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / n
        slope = min(MAX_SLOPE, max(0.0, cov / var))
    intercept = my - slope * mx
    residuals = tuple(sorted(y - (intercept + slope * x) for x, y in zip(xs, ys, strict=True)))
    return Fit(intercept, slope, residuals, min(p for _, p in pairs))


class _Pairs:
    """One kind's last pairs, in learning order (what is forgotten first, and
    the state file's order) and in size order (whose neighbours a size has)."""

    __slots__ = ("by_size", "highest", "learned", "seq")

    def __init__(self, limit: int) -> None:
        self.learned: deque[tuple[int, int, int]] = deque(maxlen=limit)
        """(seq, size, peak), oldest first."""
        self.by_size: list[tuple[int, int, int]] = []
        """(size, seq, peak), smallest first."""
        self.seq = 0
        self.highest = 0

    def __len__(self) -> int:
        return len(self.learned)

    def add(self, size: int, peak: int) -> None:
        if len(self.learned) == self.learned.maxlen:
            seq, old_size, old_peak = self.learned[0]
            del self.by_size[bisect.bisect_left(self.by_size, (old_size, seq, old_peak))]
            if old_peak == self.highest:
                self.highest = 0  # recomputed below
        self.seq += 1
        self.learned.append((self.seq, size, peak))
        bisect.insort(self.by_size, (size, self.seq, peak))
        self.highest = max(peak, self.highest or max(p for _, _, p in self.learned))

    def nearest(self, size: int, count: int) -> list[tuple[int, int]]:
        """The `count` pairs whose sizes are nearest `size` in ratio; among
        pairs of one size, the most recently learned (a rebuild adds the same
        file's size again, and its newest peaks are the ones to believe)."""
        pairs = self.by_size
        below = self._downward(bisect.bisect_left(pairs, (size,)) - 1)
        above = self._upward(bisect.bisect_left(pairs, (size,)))
        lo, hi = next(below, None), next(above, None)
        out: list[tuple[int, int]] = []
        while len(out) < count and (lo is not None or hi is not None):
            # size/s_lo <= s_hi/size, with no division: size^2 <= s_lo * s_hi.
            if hi is None or (lo is not None and size * size <= lo[0] * hi[0]):
                assert lo is not None
                out.append((lo[0], lo[2]))
                lo = next(below, None)
            else:
                out.append((hi[0], hi[2]))
                hi = next(above, None)
        return out

    def _downward(self, index: int) -> Iterator[tuple[int, int, int]]:
        """From `index` to the smallest: newest first within a size, as
        (size, seq) order read backwards is."""
        for i in range(index, -1, -1):
            yield self.by_size[i]

    def _upward(self, index: int) -> Iterator[tuple[int, int, int]]:
        """From `index` to the largest, newest first within each size."""
        pairs = self.by_size
        while index < len(pairs):
            end = bisect.bisect_right(pairs, (pairs[index][0], math.inf), lo=index)
            for i in range(end - 1, index - 1, -1):
                yield pairs[i]
            index = end


class PeakModel:
    """Per-kind local fits of peak on request size (see the module's docstring)."""

    def __init__(self, *, per_kind: int = PER_KIND, max_kinds: int = MAX_KINDS,
                 min_samples: int = MIN_SAMPLES, neighbours: int = NEIGHBOURS) -> None:
        if min(per_kind, max_kinds, min_samples, neighbours) < 1:
            raise ValueError("per_kind, max_kinds, min_samples and neighbours must be >= 1")
        self.per_kind = per_kind
        self.max_kinds = max_kinds
        self.min_samples = min_samples
        self.neighbours = neighbours
        self._pairs: OrderedDict[str, _Pairs] = OrderedDict()

    def __len__(self) -> int:
        return sum(len(p) for k, p in self._pairs.items() if not k.startswith(POOLED))

    def learn(self, feats: Features, peak: int) -> None:
        """A finished job of these features peaked at `peak` bytes."""
        if feats.size is None or not 0 < feats.size <= MAX_SIZE or peak <= 0:
            return
        for kind in (feats.kind, POOLED + feats.encoding):
            self._add(kind, feats.size, peak)
        while len(self._pairs) > self.max_kinds:
            self._pairs.popitem(last=False)

    def _add(self, kind: str, size: int, peak: int) -> None:
        pairs = self._pairs.pop(kind, None)
        if pairs is None:
            pairs = _Pairs(self.per_kind)
        pairs.add(size, peak)
        self._pairs[kind] = pairs

    def predict(self, feats: Features, quantile: float, *, ceiling: int) -> int | None:
        """The peak expected of a job with these features, read at `quantile`
        of the local fit of its kind's (or its size unit's pooled) pairs
        nearest its size, at most the larger of `ceiling` and what that kind's
        own jobs needed, plus CEILING_MARGIN; None when neither has
        MIN_SAMPLES pairs or the head gave no size."""
        if feats.size is None or not 0 < feats.size <= MAX_SIZE:
            return None
        for kind in (feats.kind, POOLED + feats.encoding):
            pairs = self._pairs.get(kind)
            if pairs is not None and len(pairs) >= self.min_samples:
                model = fit(pairs.nearest(feats.size, self.neighbours))
                return min(model.at(feats.size, quantile), max(ceiling, int(
                    pairs.highest * (1 + CEILING_MARGIN))))
        return None

    # -- persistence (inside the footprint file) -------------------------

    def to_json(self) -> dict[str, list[list[int]]]:
        return {kind: [[size, peak] for _, size, peak in pairs.learned]
                for kind, pairs in self._pairs.items()}

    def load_json(self, data: object, *, ceiling: int) -> int:
        """Replace the pairs with `data`'s; pairs that cannot be measurements
        are dropped (returns how many). Raises ValueError if it is not a
        mapping of kinds to pairs."""
        if not isinstance(data, dict):
            raise ValueError("model is not a mapping")
        dropped = 0
        pairs: OrderedDict[str, _Pairs] = OrderedDict()
        for kind, values in list(data.items())[-self.max_kinds:]:
            if not isinstance(kind, str) or not 0 < len(kind) <= 6 * MAX_NAME \
                    or not isinstance(values, list):
                dropped += 1
                continue
            kept = _Pairs(self.per_kind)
            for v in values[-self.per_kind:]:
                if (isinstance(v, list) and len(v) == 2 and type(v[0]) is int
                        and type(v[1]) is int and 0 < v[0] <= MAX_SIZE and 0 < v[1] <= ceiling):
                    kept.add(v[0], v[1])
                else:
                    dropped += 1
            if kept:
                pairs[kind] = kept
        self._pairs = pairs
        return dropped
