"""What a compile never seen will need, from what its request head says.

Pure: no trio, no socket, no clock (tests/test_purity.py checks the imports).

Before this, every unknown job got one figure (issue 19: a second checkout of
fmtlib reserved 1,154 MiB for each of 43 jobs whose median real peak was
306 MiB). But a request head tells its size, and within one kind of compile
(compiler, language, -O and -g levels, size unit: `identity.Features.kind`) a
compiler's peak grows with what it reads: a fixed base (the compiler's own
image and tables, 20-40 MiB for cc1plus) plus a share per byte of source.
So for each kind the model keeps the last `PER_KIND` (size, peak) pairs of
finished jobs and fits

    log(peak) = a + b * log(size)                      (least squares)

with b held within 0..MAX_SLOPE (a peak does not fall as the source grows,
nor grow much faster than it), and predicts at a quantile of the fit's own
residuals: `exp(a + b * log(size) + residual_q)`. In log space a quantile of
residuals is a ratio, so the estimate is "the fit, times what the q-th
quantile of jobs of this kind needed above the fit". A kind with fewer than
`MIN_SAMPLES` pairs borrows from the pooled fit of its size unit (all
compilers and flags with that encoding: a heavier guess for a C file, since
C++ dominates, which errs high); with fewer still there is no prediction and
the book's distribution stands.

Bounded: at most `MAX_KINDS` kinds (least recently learned dropped), each
`PER_KIND` pairs; a fit is cached until its kind learns again.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
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
# The slope's bounds in log-log space: 0 (a bigger source never needs less)
# to 1.5 (template-heavy C++ grows faster than linearly with its size, but a
# steeper fit comes from too few or too close sizes and extrapolates wildly).
MAX_SLOPE: Final = 1.5
# Sizes spread less than this (ln 1.1: within 10 %) say nothing of a slope:
# the fit is flat, the quantile of the peaks themselves.
MIN_SPREAD: Final = math.log(1.1)
# Where predictions are read among the residuals. SAFE where a wrong guess
# means an OOM kill: the 90th percentile (one job in ten needs more than its
# kind's fit says -- and admission's --min-free-mb covers some of that); TYPICAL
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
    highest: int
    """The largest: with a margin, no prediction goes above it unless the box
    has seen more (footprints.FootprintBook.judge)."""

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
    return Fit(intercept, slope, residuals, min(p for _, p in pairs), max(p for _, p in pairs))


class PeakModel:
    """Per-kind fits of peak on request size (see the module's docstring)."""

    def __init__(self, *, per_kind: int = PER_KIND, max_kinds: int = MAX_KINDS,
                 min_samples: int = MIN_SAMPLES) -> None:
        self.per_kind = per_kind
        self.max_kinds = max_kinds
        self.min_samples = min_samples
        self._pairs: OrderedDict[str, deque[tuple[int, int]]] = OrderedDict()
        self._fits: dict[str, Fit] = {}

    def __len__(self) -> int:
        return sum(len(p) for k, p in self._pairs.items() if not k.startswith(POOLED))

    def learn(self, feats: Features, peak: int) -> None:
        """A finished job of these features peaked at `peak` bytes."""
        if feats.size is None or not 0 < feats.size <= MAX_SIZE or peak <= 0:
            return
        for kind in (feats.kind, POOLED + feats.encoding):
            pairs = self._pairs.pop(kind, None)
            if pairs is None:
                pairs = deque(maxlen=self.per_kind)
            pairs.append((feats.size, peak))
            self._pairs[kind] = pairs
            self._fits.pop(kind, None)
        while len(self._pairs) > self.max_kinds:
            old, _ = self._pairs.popitem(last=False)
            self._fits.pop(old, None)

    def predict(self, feats: Features, quantile: float, *, ceiling: int) -> int | None:
        """The peak expected of a job with these features, read at `quantile`
        of its kind's fit (or its size unit's pooled one), at most the larger
        of `ceiling` and what that fit's own jobs needed, plus `margin`; None
        when neither has MIN_SAMPLES pairs or the head gave no size."""
        if feats.size is None or not 0 < feats.size <= MAX_SIZE:
            return None
        for kind in (feats.kind, POOLED + feats.encoding):
            model = self._fit(kind)
            if model is not None:
                return min(model.at(feats.size, quantile), max(ceiling, int(
                    model.highest * (1 + CEILING_MARGIN))))
        return None

    def _fit(self, kind: str) -> Fit | None:
        cached = self._fits.get(kind)
        if cached is not None:
            return cached
        pairs = self._pairs.get(kind)
        if pairs is None or len(pairs) < self.min_samples:
            return None
        self._fits[kind] = made = fit(list(pairs))
        return made

    # -- persistence (inside the footprint file) -------------------------

    def to_json(self) -> dict[str, list[list[int]]]:
        return {kind: [list(p) for p in pairs] for kind, pairs in self._pairs.items()}

    def load_json(self, data: object, *, ceiling: int) -> int:
        """Replace the pairs with `data`'s; pairs that cannot be measurements
        are dropped (returns how many). Raises ValueError if it is not a
        mapping of kinds to pairs."""
        if not isinstance(data, dict):
            raise ValueError("model is not a mapping")
        dropped = 0
        pairs: OrderedDict[str, deque[tuple[int, int]]] = OrderedDict()
        for kind, values in list(data.items())[-self.max_kinds:]:
            if not isinstance(kind, str) or not 0 < len(kind) <= 6 * MAX_NAME \
                    or not isinstance(values, list):
                dropped += 1
                continue
            kept: deque[tuple[int, int]] = deque(maxlen=self.per_kind)
            for v in values[-self.per_kind:]:
                if (isinstance(v, list) and len(v) == 2 and type(v[0]) is int
                        and type(v[1]) is int and 0 < v[0] <= MAX_SIZE and 0 < v[1] <= ceiling):
                    kept.append((v[0], v[1]))
                else:
                    dropped += 1
            if kept:
                pairs[kind] = kept
        self._pairs, self._fits = pairs, {}
        return dropped
