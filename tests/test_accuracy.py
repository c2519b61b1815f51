"""How good the estimates were (accuracy.py), as /status and metrics show it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gatekeeper.accuracy import BAND, BUCKETS, Accuracy
from gatekeeper.footprints import Source


def test_a_tally_per_source() -> None:
    acc = Accuracy()
    acc.record(Source.PREDICTED, 100, 100)   # 1.0: within
    acc.record(Source.PREDICTED, 70, 100)    # 0.7: under the band
    acc.record(Source.PREDICTED, 150, 100)   # 1.5: within (the edge)
    acc.record(Source.LEARNED, 102, 100)
    acc.record(Source.DEFAULT, 0, 100)       # not a measurement: ignored
    view = acc.view()
    assert view["band"] == list(BAND)
    assert view["predicted"] == {"jobs": 3, "cut_short": 0, "within_band": 0.667,
                                 "median_ratio": 1.0}
    assert view["learned"] == {"jobs": 1, "cut_short": 0, "within_band": 1.0,
                               "median_ratio": 1.02}
    assert view["default"] == {"jobs": 0, "cut_short": 0, "within_band": None,
                               "median_ratio": None}
    # A job cut short needed more than it got: outside the band, not a ratio.
    acc.record_cut(Source.LEARNED)
    assert acc.view()["learned"] == {"jobs": 2, "cut_short": 1, "within_band": 0.5,
                                     "median_ratio": 1.02}
    assert acc.tallies[Source.LEARNED].buckets[-1] == 1


@given(st.lists(st.tuples(st.sampled_from(list(Source)), st.integers(1, 10**9),
                          st.integers(1, 10**9)), max_size=60))
def test_buckets_are_cumulative_and_count_every_job(
        records: list[tuple[Source, int, int]]) -> None:
    acc = Accuracy()
    for source, estimate, peak in records:
        acc.record(source, estimate, peak)
    for source, tally in acc.tallies.items():
        mine = [e / p for s, e, p in records if s is source]
        assert tally.jobs == len(mine)
        assert tally.buckets == [sum(r <= b for r in mine) for b in BUCKETS]
        assert tally.within == sum(BAND[0] <= r <= BAND[1] for r in mine)
