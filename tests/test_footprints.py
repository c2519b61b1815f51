"""Learned footprints: estimates, adaptation, bounds and a state file that survives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatekeeper.footprints import (
    CUT_SHORT_GROWTH,
    MARGIN,
    MIN_SAMPLES,
    PEAKS_PER_KEY,
    STATE_FILE,
    FootprintBook,
)

MiB = 2**20


def test_unknown_jobs_get_the_seed_until_enough_peaks_are_seen() -> None:
    book = FootprintBook(seed=256 * MiB)
    assert book.estimate(None) == book.estimate("new") == 256 * MiB
    for _ in range(MIN_SAMPLES - 1):
        book.learn(None, 40 * MiB)
    assert book.estimate(None) == 256 * MiB
    book.learn(None, 40 * MiB)
    assert book.estimate(None) == int(40 * MiB * (1 + MARGIN))


def test_unknown_estimate_is_a_high_percentile_of_a_mix() -> None:
    book = FootprintBook(seed=1)
    for i in range(100):
        book.learn(f"k{i}", 900 * MiB if i % 5 == 0 else 40 * MiB)  # 20 % heavy
    assert book.estimate(None) == int(900 * MiB * (1 + MARGIN))


def test_known_key_uses_its_own_peaks_and_adapts() -> None:
    book = FootprintBook(seed=256 * MiB)
    book.learn("heavy", 900 * MiB)
    book.learn("light", 40 * MiB)
    assert book.estimate("heavy") == int(900 * MiB * (1 + MARGIN))
    assert book.estimate("light") == int(40 * MiB * (1 + MARGIN))
    for _ in range(3):  # the file got lighter: believed after three builds
        book.learn("heavy", 100 * MiB)
    assert book.estimate("heavy") == int(100 * MiB * (1 + MARGIN))


def test_bounded_by_least_recently_used() -> None:
    book = FootprintBook(seed=1, max_keys=3)
    for key in "abc":
        book.learn(key, 10)
    book.estimate("a")  # touch a: b is now the oldest
    book.learn("d", 10)
    assert {k for k in "abcd" if book.knows(k)} == {"a", "c", "d"}


def test_state_survives_a_restart(tmp_path: Path) -> None:
    book = FootprintBook(seed=1)
    book.learn("x", 123 * MiB)
    book.save(tmp_path / "state")
    again = FootprintBook(seed=1)
    again.load(tmp_path / "state")
    assert again.estimate("x") == book.estimate("x")
    assert list(tmp_path.joinpath("state").iterdir()) == [tmp_path / "state" / STATE_FILE]


@pytest.mark.parametrize("content", [
    b"", b"{", b"[]", b'{"format": 2}', b'{"format": 1, "keys": {"a": [-1]}, "recent": []}',
    b'{"format": 1, "keys": {"a": "x"}, "recent": []}', b"\xff\xfe",
])
def test_corrupt_state_is_logged_and_ignored(tmp_path: Path, content: bytes,
                                             caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / STATE_FILE).write_bytes(content)
    book = FootprintBook(seed=7)
    book.load(tmp_path)
    assert book.estimate("a") == 7
    assert "ignoring learned footprints" in caplog.text


def test_missing_state_is_a_fresh_start(tmp_path: Path) -> None:
    book = FootprintBook(seed=7)
    book.load(tmp_path / "nowhere")
    assert len(book) == 0


@given(st.lists(st.tuples(st.sampled_from("abcdef"), st.integers(1, 10**10)), max_size=60))
def test_json_round_trip(samples: list[tuple[str, int]]) -> None:
    book = FootprintBook(seed=5)
    for key, peak in samples:
        book.learn(key, peak)
    again = FootprintBook(seed=5)
    again.load_json(json.loads(json.dumps(book.to_json())))
    for key in "abcdef":
        assert again.estimate(key) == book.estimate(key)
    assert again.estimate(None) == book.estimate(None)


def test_rare_heavy_jobs_still_set_the_unknown_estimate() -> None:
    """The memory bench's mix: heavy files are 8 % of the jobs. A new file must be
    assumed heavy, or two new heavy files start together and get OOM-killed."""
    book = FootprintBook(seed=256 * MiB)
    for i in range(104):
        book.learn(f"f{i}", 232 * MiB if i % 13 == 0 else 37 * MiB)
    assert book.estimate(None) >= 232 * MiB


def test_a_cut_short_job_is_remembered_as_needing_more() -> None:
    book = FootprintBook(seed=100)
    for _ in range(8):
        book.learn("other", 50)
    unknown = book.unknown_estimate()
    book.learn_cut_short("heavy", 200)
    assert book.knows("heavy")
    assert book.estimate("heavy") >= int(200 * CUT_SHORT_GROWTH)
    assert book.unknown_estimate() == unknown  # a guess is not a measurement
    # Cut short again at a lower point: the guess never shrinks from that.
    book.learn_cut_short("heavy", 100)
    assert book.estimate("heavy") >= int(200 * CUT_SHORT_GROWTH)
    # Completed runs replace the guess within PEAKS_PER_KEY runs.
    for _ in range(PEAKS_PER_KEY):
        book.learn("heavy", 250)
    assert book.estimate("heavy") == int(250 * (1 + MARGIN))
    before = book.unknown_estimate()
    book.learn_cut_short(None, 500)  # unidentified: nothing to remember it by
    assert book.unknown_estimate() == before
