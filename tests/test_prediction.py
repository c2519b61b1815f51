"""The cold-estimate model (prediction.py) and the book's use of it (footprints.judge)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatekeeper.distcc.identity import Features
from gatekeeper.footprints import FootprintBook, Source
from gatekeeper.prediction import (
    MAX_KINDS,
    MAX_SLOPE,
    MIN_SAMPLES,
    NEIGHBOURS,
    SAFE_QUANTILE,
    TYPICAL_QUANTILE,
    PeakModel,
    _Pairs,
    fit,
)

MiB = 2**20
CEILING = 64 * 2**30
NO_CEILING = 2**62  # the model alone, no box-wide bound


def feats(size: int | None, *, compiler: str = "g++", encoding: str = "plain",
          opt: str = "2") -> Features:
    return Features(compiler=compiler, language="c++", optimisation=opt, debug=False,
                    encoding=encoding, size=size)


def compiler_law(size: int) -> int:
    """A compiler's peak: a fixed base plus a share per byte read."""
    return 30 * MiB + 40 * size


def test_a_size_law_is_learned_and_predicts_sizes_never_seen() -> None:
    model = PeakModel()
    for size in (200_000, 400_000, 800_000, 1_600_000, 3_200_000, 6_400_000) * 2:
        model.learn(feats(size), compiler_law(size))
    for size in (300_000, 1_000_000, 5_000_000):
        predicted = model.predict(feats(size), TYPICAL_QUANTILE, ceiling=NO_CEILING)
        assert predicted is not None
        assert 0.8 <= predicted / compiler_law(size) <= 1.5, size


def two_regimes(size: int) -> int:
    """googletest's shape (prediction.py's docstring): a small file costs the
    compiler's base; past the common headers (2.3 MB, 140 MiB) each byte of a
    test's own code costs far more than a header's (5.3 MB: 1,591 MiB)."""
    if size < 1_000_000:
        return 5 * MiB + size
    return int(140 * MiB * (size / 2_300_000) ** 2.9)


def test_a_prediction_is_local_to_its_size() -> None:
    """One line through all sizes is pulled flat by the small files and the
    header-bound ones; the heavy tests are predicted from their neighbours."""
    model = PeakModel()
    sizes = [2_000, 5_000, 20_000, 40_000] * 4 + [
        2_300_000 + 20_000 * i for i in range(24)] + [3_000_000, 3_400_000, 3_800_000,
                                                      4_200_000, 4_600_000, 5_000_000]
    for size in sizes:
        model.learn(feats(size), two_regimes(size))
    for size in (10_000, 2_400_000, 4_400_000, 5_300_000):
        for quantile in (TYPICAL_QUANTILE, SAFE_QUANTILE):
            predicted = model.predict(feats(size), quantile, ceiling=NO_CEILING)
            assert predicted is not None
            assert 0.8 <= predicted / two_regimes(size) <= 1.5, (size, quantile)
    # The global line the model used before (all pairs in one fit) misses
    # the heavy end by far: the test would fail without locality.
    everything = fit([(s, two_regimes(s)) for s in sizes])
    assert everything.at(5_300_000, SAFE_QUANTILE) < 0.8 * two_regimes(5_300_000)


@given(st.lists(st.tuples(st.integers(1, 2**50), st.integers(1, 2**40)), max_size=60),
       st.integers(1, 2**50), st.integers(1, 20), st.integers(1, 30))
def test_neighbours_are_the_nearest_in_ratio_and_eviction_keeps_order(
        pairs: list[tuple[int, int]], size: int, count: int, limit: int) -> None:
    kept = _Pairs(limit)
    for s, p in pairs:
        kept.add(s, p)
    last = pairs[-limit:]
    assert sorted((s, p) for _, s, p in kept.learned) == sorted(last)
    assert sorted((s, p) for s, _, p in kept.by_size) == sorted(last)
    assert [s for s, _, _ in kept.by_size] == sorted(s for s, _ in last)
    assert kept.highest == (max(p for _, p in last) if last else 0)
    near = kept.nearest(size, count)
    assert len(near) == min(count, len(last))
    def distance(s: int) -> float:
        return abs(math.log(s) - math.log(size))
    chosen = sorted(distance(s) for s, _ in near)
    best = sorted(distance(s) for s, _ in last)[:len(near)]
    assert chosen == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_among_pairs_of_one_size_the_newest_are_the_neighbours() -> None:
    """A rebuild adds the same file's size again: its newest peaks count (a
    compiler upgrade is forgotten), from either side of the size asked."""
    kept = _Pairs(256)
    for peak in range(100, 120):
        kept.add(1000, peak)
    for size in (999, 1000, 1001):
        assert sorted(p for _, p in kept.nearest(size, 16)) == list(range(104, 120)), size


def test_a_model_of_nothing_is_refused() -> None:
    for bad in ({"per_kind": 0}, {"neighbours": 0}, {"min_samples": 0}, {"max_kinds": 0}):
        with pytest.raises(ValueError):
            PeakModel(**bad)


def test_neighbours_is_twice_the_fewest_believed() -> None:
    assert NEIGHBOURS == 2 * MIN_SAMPLES


def test_too_few_pairs_predict_nothing_then_the_pooled_fit_helps() -> None:
    model = PeakModel()
    for size in range(1, MIN_SAMPLES):
        model.learn(feats(size * 100_000), compiler_law(size * 100_000))
    assert model.predict(feats(500_000), SAFE_QUANTILE, ceiling=NO_CEILING) is None
    model.learn(feats(900_000), compiler_law(900_000))
    assert model.predict(feats(500_000), SAFE_QUANTILE, ceiling=NO_CEILING) is not None
    # clang never seen: the plain size unit's pooled fit answers.
    clang = feats(500_000, compiler="clang++")
    assert model.predict(clang, SAFE_QUANTILE, ceiling=NO_CEILING) is not None
    # lzo never seen: another unit, nothing to say.
    assert model.predict(feats(500_000, encoding="lzo"), SAFE_QUANTILE, ceiling=NO_CEILING) is None
    assert model.predict(feats(None), SAFE_QUANTILE, ceiling=NO_CEILING) is None


def test_a_higher_quantile_never_predicts_less() -> None:
    model = PeakModel()
    for i in range(40):
        size = 100_000 * (1 + i % 7)
        model.learn(feats(size), int(compiler_law(size) * (1 + (i % 5) / 10)))
    for size in (50_000, 350_000, 2_000_000):
        low = model.predict(feats(size), TYPICAL_QUANTILE, ceiling=NO_CEILING)
        high = model.predict(feats(size), SAFE_QUANTILE, ceiling=NO_CEILING)
        assert low is not None and high is not None and low <= high


def test_one_size_gives_a_flat_fit() -> None:
    f = fit([(1000, 10 * MiB), (1000, 12 * MiB), (1050, 11 * MiB)] * 3)
    assert f.slope == 0.0
    assert f.at(10**9, 1.0) == pytest.approx(12 * MiB, rel=1e-6)


@given(st.lists(st.tuples(st.integers(1, 2**40), st.integers(1, 2**36)),
                min_size=1, max_size=40), st.integers(1, 2**40), st.floats(0, 1))
def test_any_fit_is_bounded_and_never_below_its_smallest_peak(
        pairs: list[tuple[int, int]], size: int, quantile: float) -> None:
    f = fit(pairs)
    assert 0.0 <= f.slope <= MAX_SLOPE
    value = f.at(size, quantile)
    assert value >= min(p for _, p in pairs)
    assert math.isfinite(value)


def test_kinds_are_bounded() -> None:
    model = PeakModel()
    for i in range(MAX_KINDS * 3):
        model.learn(feats(1000, compiler=f"cc{i}"), MiB)
    assert len(model.to_json()) == MAX_KINDS


@given(st.lists(st.tuples(st.sampled_from(["g++", "clang++"]), st.integers(1, 10**8),
                          st.integers(1, 10**10)), max_size=50))
def test_json_round_trip(samples: list[tuple[str, int, int]]) -> None:
    model = PeakModel()
    for compiler, size, peak in samples:
        model.learn(feats(size, compiler=compiler), peak)
    again = PeakModel()
    assert again.load_json(json.loads(json.dumps(model.to_json())), ceiling=CEILING) == 0
    for compiler in ("g++", "clang++"):
        assert (again.predict(feats(12345, compiler=compiler), 0.9, ceiling=NO_CEILING)
                == model.predict(feats(12345, compiler=compiler), 0.9, ceiling=NO_CEILING))


@pytest.mark.parametrize("data", [
    {"g++/c++/O2/plain": [[1, 2**62]]}, {"k": [[0, 5]]}, {"k": [[True, 5]]},
    {"k": [[1.5, 5]]}, {"k": "x"}, {"k" * 1000: [[1, 1]]}, {"k": [[1, 2, 3]]},
])
def test_hostile_pairs_are_dropped(data: dict[str, object]) -> None:
    model = PeakModel()
    assert model.load_json(data, ceiling=CEILING) >= 1
    assert model.to_json() == {}


def test_a_model_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(ValueError):
        PeakModel().load_json([1, 2], ceiling=CEILING)


# -- the book: learned, predicted, default ------------------------------------

def test_the_book_says_where_an_estimate_came_from() -> None:
    book = FootprintBook(seed=256 * MiB)
    assert book.judge("k", feats(10_000)).source is Source.DEFAULT
    for i in range(MIN_SAMPLES):
        size = 100_000 * (i + 1)
        book.learn(f"f{i}", compiler_law(size), feats=feats(size))
    judged = book.judge("new", feats(450_000))
    assert judged.source is Source.PREDICTED
    assert 0.8 <= judged.bytes / compiler_law(450_000) <= 1.5
    assert book.judge("f3", feats(400_000)).source is Source.LEARNED
    assert book.judge("new", None).source is Source.DEFAULT


def test_a_key_whose_request_changed_much_is_not_trusted() -> None:
    """Two projects' main.cc with the same flags share a portable key."""
    book = FootprintBook(seed=256 * MiB)
    book.learn("main", 900 * MiB, feats=feats(4_000_000))
    assert book.judge("main", feats(4_100_000)).source is Source.LEARNED
    assert book.judge("main", feats(400_000)).source is not Source.LEARNED
    # In another size unit, sizes do not compare: the key stands.
    assert book.judge("main", feats(400_000, encoding="lzo")).source is Source.LEARNED
    # The other compile runs: it replaces the old one's peaks.
    book.learn("main", 40 * MiB, feats=feats(400_000))
    assert book.judge("main", feats(400_000)) == (int(40 * MiB * 1.05), Source.LEARNED)


def test_no_prediction_above_what_the_box_has_seen() -> None:
    book = FootprintBook(seed=256 * MiB)
    for i in range(MIN_SAMPLES):
        size = 100_000 * (i + 1)
        book.learn(None, compiler_law(size), feats=feats(size))
    huge = book.judge(None, feats(10**10))
    assert huge.source is Source.PREDICTED
    assert huge.bytes == int(compiler_law(800_000) * 1.1)


def test_optimistic_books_read_predictions_lower() -> None:
    safe = FootprintBook(seed=256 * MiB)
    typical = FootprintBook(seed=256 * MiB, percentile=0.5, min_samples=3)
    for i in range(30):
        size = 100_000 * (1 + i % 6)
        for book in (safe, typical):
            book.learn(None, int(compiler_law(size) * (1 + (i % 4) / 8)), feats=feats(size))
    assert typical.judge(None, feats(300_000)).bytes < safe.judge(None, feats(300_000)).bytes


def test_the_model_and_sizes_survive_a_restart(tmp_path: object) -> None:
    book = FootprintBook(seed=256 * MiB)
    for i in range(MIN_SAMPLES):
        size = 100_000 * (i + 1)
        book.learn(f"f{i}", compiler_law(size), feats=feats(size))
    again = FootprintBook(seed=256 * MiB)
    again.load_json(json.loads(json.dumps(book.to_json())), ceiling=CEILING)
    assert again.judge("x", feats(123_456)) == book.judge("x", feats(123_456))
    assert again.judge("f1", feats(20_000)).source is not Source.LEARNED  # size drift kept


def test_a_heavy_kind_is_not_capped_below_its_own_history() -> None:
    """After a run of light jobs of other kinds the box's recent maximum is
    low; a kind whose own jobs needed more is held to its own largest peak."""
    model = PeakModel()
    for i in range(MIN_SAMPLES):
        model.learn(feats(1_000_000 * (i + 1), compiler="heavy"), (800 + 20 * i) * MiB)
    largest = (800 + 20 * (MIN_SAMPLES - 1)) * MiB
    predicted = model.predict(feats(4_000_000, compiler="heavy"), SAFE_QUANTILE,
                              ceiling=50 * MiB)
    assert predicted is not None and 800 * MiB <= predicted <= largest * 1.1
    # Far beyond anything seen: held to that, plus the margin.
    huge = model.predict(feats(10**12, compiler="heavy"), SAFE_QUANTILE, ceiling=50 * MiB)
    assert huge == int(largest * 1.1)


def test_sizes_past_the_bound_teach_nothing() -> None:
    model = PeakModel()
    for _ in range(MIN_SAMPLES):
        model.learn(feats(2**51), MiB)
    assert model.to_json() == {}


def test_pump_sizes_are_not_judged_for_drift() -> None:
    """A pump-mode size is extrapolated from the files in the first look:
    it varies from run to run, and says nothing about another compile."""
    book = FootprintBook(seed=256 * MiB)
    book.learn("k", 300 * MiB, feats=feats(50_000, encoding="pump"))
    assert book.judge("k", feats(400_000, encoding="pump")).source is Source.LEARNED
    book.learn("k", 310 * MiB, feats=feats(400_000, encoding="pump"))
    assert book.estimate("k") >= 310 * MiB  # both peaks kept: not a new compile
    assert book.duration("k", feats(9, encoding="pump")) is None  # never timed, not drift
