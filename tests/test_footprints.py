"""Learned footprints: estimates, adaptation, bounds and a state file that survives."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatekeeper.distcc.identity import Features
from gatekeeper.footprints import (
    CUT_SHORT_GROWTH,
    DURATION_MARGIN,
    FIRST_MARGIN,
    MARGIN,
    MAX_KEYS,
    MAX_MARGIN,
    MAX_STATE_BYTES,
    MIN_MARGIN,
    MIN_SAMPLES,
    MIN_TYPICAL_SAMPLES,
    PEAKS_PER_KEY,
    STATE_FILE,
    TYPICAL_PERCENTILE,
    FootprintBook,
    margin,
)
from gatekeeper.prediction import MAX_KINDS, PER_KIND

MiB = 2**20

# Peaks above this are not measurements (the machine's memory, in production).
CEILING = 2**40


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


def test_with_pausing_an_unknown_job_is_estimated_as_a_typical_one() -> None:
    """Issue 18: where a wrong guess costs a pause, the median, not the 99th
    percentile; known keys and the seed are unchanged."""
    book = FootprintBook(seed=256 * MiB, percentile=TYPICAL_PERCENTILE)
    assert book.estimate(None) == 256 * MiB  # too few peaks: the seed stands
    for i in range(104):
        book.learn(f"f{i}", 232 * MiB if i % 13 == 0 else 37 * MiB)
    assert book.estimate(None) == int(37 * MiB * (1 + MARGIN))
    assert book.estimate("f0") == int(232 * MiB * (1 + FIRST_MARGIN))
    with pytest.raises(ValueError):
        FootprintBook(seed=1, percentile=0.0)
    with pytest.raises(ValueError):
        FootprintBook(seed=1, min_samples=0)
    # Three peaks make a median; the worst case still waits for MIN_SAMPLES.
    early = FootprintBook(seed=256 * MiB, percentile=TYPICAL_PERCENTILE,
                          min_samples=MIN_TYPICAL_SAMPLES)
    for peak in (200, 40, 40):
        early.learn(None, peak * MiB)
    assert early.unknown_estimate() == int(40 * MiB * (1 + MARGIN))
    assert early.worst_unknown() == 256 * MiB


def test_known_key_uses_its_own_peaks_and_adapts() -> None:
    book = FootprintBook(seed=256 * MiB)
    book.learn("heavy", 900 * MiB)
    book.learn("light", 40 * MiB)
    assert book.estimate("heavy") == int(900 * MiB * (1 + FIRST_MARGIN))
    assert book.estimate("light") == int(40 * MiB * (1 + FIRST_MARGIN))
    for _ in range(3):  # the file got lighter: believed after three builds
        book.learn("heavy", 100 * MiB)
    assert book.estimate("heavy") == int(100 * MiB * (1 + MIN_MARGIN))


def test_a_keys_margin_is_the_spread_of_its_own_peaks() -> None:
    book = FootprintBook(seed=1)
    book.learn("steady", 200 * MiB)
    assert book.estimate("steady") == int(200 * MiB * (1 + FIRST_MARGIN))  # no spread yet
    book.learn("steady", 201 * MiB)  # 0.5 % apart: the floor
    assert book.estimate("steady") == int(201 * MiB * (1 + MIN_MARGIN))
    for peak in (80, 100):  # 20 % apart
        book.learn("jumpy", peak * MiB)
    assert book.estimate("jumpy") == int(100 * MiB * 1.2)
    for peak in (10, 100):  # not one compile: capped
        book.learn("wild", peak * MiB)
    assert book.estimate("wild") == int(100 * MiB * (1 + MAX_MARGIN))


@given(st.lists(st.integers(1, 2**40), min_size=1, max_size=PEAKS_PER_KEY))
def test_margin_bounds(peaks: list[int]) -> None:
    m = margin(peaks)
    assert MIN_MARGIN <= m <= MAX_MARGIN
    if len(peaks) > 1 and m < MAX_MARGIN:
        # the estimate reaches as far above the largest peak as the peaks spread
        top, spread = max(peaks), max(peaks) - min(peaks)
        assert top * (1 + m) >= top + spread - 1e-6 * top


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
    again.load(tmp_path / "state", ceiling=CEILING)
    assert again.estimate("x") == book.estimate("x")
    assert list(tmp_path.joinpath("state").iterdir()) == [tmp_path / "state" / STATE_FILE]


@pytest.mark.parametrize("content", [
    b"", b"{", b"[]", b'{"format": 2}', b'{"format": 3, "keys": {}, "recent": []}',
    b'{"format": 2, "keys": {"a": [-1]}, "recent": []}',
    b'{"format": 2, "keys": {"a": "x"}, "recent": []}', b"\xff\xfe",
])
def test_corrupt_state_is_logged_and_ignored(tmp_path: Path, content: bytes,
                                             caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / STATE_FILE).write_bytes(content)
    book = FootprintBook(seed=7)
    book.load(tmp_path, ceiling=CEILING)
    assert book.estimate("a") == 7
    # The whole file ignored, or (a bad entry in a good file) that entry dropped.
    assert ("ignoring learned footprints" in caplog.text
            or "dropped 1 learned footprints" in caplog.text)


def test_missing_state_is_a_fresh_start(tmp_path: Path) -> None:
    book = FootprintBook(seed=7)
    book.load(tmp_path / "nowhere", ceiling=CEILING)
    assert len(book) == 0


@given(st.lists(st.tuples(st.sampled_from("abcdef"), st.integers(1, 10**10)), max_size=60))
def test_json_round_trip(samples: list[tuple[str, int]]) -> None:
    book = FootprintBook(seed=5)
    for key, peak in samples:
        book.learn(key, peak)
    again = FootprintBook(seed=5)
    again.load_json(json.loads(json.dumps(book.to_json())), ceiling=CEILING)
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
    assert book.estimate("heavy") == int(250 * (1 + MIN_MARGIN))
    before = book.unknown_estimate()
    book.learn_cut_short(None, 500)  # unidentified: nothing to remember it by
    assert book.unknown_estimate() == before


# -- the state file is hostile input (issue 16) ---------------------------------

@pytest.mark.parametrize("content", [
    b'{"format": 2, "keys": {}, "recent": [' + b",".join([b"1" + b"0" * 400] * 8) + b"]}",
    b"[" * 100_000,
    b'{"format": 2, "keys": {"a": [1e400]}, "recent": []}',
    b'{"format": 2, "keys": {"a": [true]}, "recent": [true, 1.5, "9"]}',
    b'{"format": 2, "keys": {"a": [' + b"9" * 5000 + b"]}, \"recent\": []}",
], ids=["huge-ints", "deep-nesting", "float-inf", "not-whole", "int-digit-limit"])
def test_poisoned_state_is_ignored_not_fatal(tmp_path: Path, content: bytes,
                                             caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / STATE_FILE).write_bytes(content)
    book = FootprintBook(seed=7)
    book.load(tmp_path, ceiling=CEILING)
    assert book.estimate("a") == 7
    assert book.estimate(None) == 7  # nothing absurd reached the unknown estimate
    assert "Traceback" not in caplog.text


def test_peaks_above_the_machine_are_not_measurements(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """10**30 was accepted before, and then held every job forever."""
    state = {"format": 2, "keys": {"big": [10**30], "ok": [5 * MiB], "mixed": [10**30, MiB]},
             "recent": [10**30] * 10 + [MiB] * 10}
    (tmp_path / STATE_FILE).write_text(json.dumps(state))
    book = FootprintBook(seed=7)
    book.load(tmp_path, ceiling=64 * 2**30)
    assert not book.knows("big")
    assert book.knows("ok") and book.knows("mixed")
    assert book.estimate("mixed") < 2 * MiB
    assert book.estimate(None) < 2 * MiB  # ten real peaks of 1 MiB, the absurd ones dropped
    assert "dropped 11 learned footprints" in caplog.text


@pytest.mark.parametrize("kind", ["symlink-to-dev-zero", "fifo", "directory", "too-big"])
def test_state_file_that_is_not_a_small_regular_file_is_refused_at_once(
        tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / STATE_FILE
    if kind == "symlink-to-dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)  # opened without O_NONBLOCK, this hangs startup
    elif kind == "directory":
        path.mkdir()
    else:
        with path.open("wb") as f:
            f.truncate(MAX_STATE_BYTES + 1)
    book = FootprintBook(seed=7)
    book.load(tmp_path, ceiling=CEILING)  # returns: no hang, no MemoryError
    assert len(book) == 0
    assert "ignoring learned footprints" in caplog.text


def test_a_full_book_fits_the_state_file_cap(tmp_path: Path) -> None:
    """MAX_STATE_BYTES is sized to MAX_KEYS: a full book of big peaks saves and loads."""
    book = FootprintBook(seed=7)
    for i in range(MAX_KEYS):
        key = f"p2-{i:020x}"
        for _ in range(3):
            book.learn(key, 99_999_999_999, seconds=86_399.123456789,
                       feats=Features(compiler="x" * 64, language="c++", optimisation="fast",
                                      debug=True, encoding="pump", size=2**50))
    # ...and a full model: every kind, every pair, the longest names and numbers.
    for k in range(MAX_KINDS):
        feats = Features(compiler=f"{k:02d}" + "c" * 62, language="l" * 64,
                         optimisation="other", debug=True, encoding="plain", size=2**50)
        for _ in range(PER_KIND):
            book.model.learn(feats, 99_999_999_999)
    book.save(tmp_path)
    size = (tmp_path / STATE_FILE).stat().st_size
    print(f"full book: {size} bytes ({size / MAX_STATE_BYTES:.0%} of the cap)")
    assert size < MAX_STATE_BYTES
    again = FootprintBook(seed=7)
    again.load(tmp_path, ceiling=CEILING)
    assert len(again) == MAX_KEYS
    assert len(again.model.to_json()) == MAX_KINDS


def test_state_dirs_are_created_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        FootprintBook(seed=1).save(tmp_path / "a" / "b" / "state")
    finally:
        os.umask(old)
    for d in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "state"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


def test_durations_are_learned_kept_and_checked(tmp_path: Path) -> None:
    book = FootprintBook(seed=1)
    assert book.duration("c") is None and book.duration(None) is None
    book.learn("c", 10 * MiB, seconds=2.0)
    book.learn("c", 10 * MiB, seconds=4.0)
    assert book.duration("c") == 4.0 * (1 + DURATION_MARGIN)
    book.learn("c", 10 * MiB)  # no time known: the peak alone
    assert book.duration("c") == 4.0 * (1 + DURATION_MARGIN)
    book.save(tmp_path)
    again = FootprintBook(seed=1)
    again.load(tmp_path, ceiling=2**40)
    assert again.duration("c") == book.duration("c")
    # Hostile or absurd run times are dropped, the peaks stay.
    data = json.loads((tmp_path / STATE_FILE).read_text())
    data["seconds"] = {"c": [float("inf"), -1, True, "9", 1e9, 3.0], "ghost": [1.0]}
    (tmp_path / STATE_FILE).write_text(json.dumps(data))
    third = FootprintBook(seed=1)
    third.load(tmp_path, ceiling=2**40)
    assert third.duration("c") == 3.0 * (1 + DURATION_MARGIN)
    assert third.duration("ghost") is None  # no peak: not a key
    # An older file without run times loads as before.
    del data["seconds"]
    (tmp_path / STATE_FILE).write_text(json.dumps(data))
    fourth = FootprintBook(seed=1)
    fourth.load(tmp_path, ceiling=2**40)
    assert fourth.knows("c") and fourth.duration("c") is None


def test_a_format_1_file_keeps_its_peaks_and_drops_its_command_line_keys(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Format 1 keyed jobs by a hash of the whole command line: no way to a
    portable key (identity.py), so those keys go, loudly, and the measured
    peaks stay to estimate unknown jobs; the next save writes format 2."""
    state = {"format": 1, "keys": {"0123456789abcdef0123": [5 * MiB]},
             "recent": [3 * MiB] * 10}
    (tmp_path / STATE_FILE).write_text(json.dumps(state))
    book = FootprintBook(seed=7)
    book.load(tmp_path, ceiling=CEILING)
    assert len(book) == 0
    assert book.estimate(None) == int(3 * MiB * 1.1)
    assert "dropped 1 learned footprints" in caplog.text and "format 1" in caplog.text
    assert book.dirty
    book.save(tmp_path)
    assert json.loads((tmp_path / STATE_FILE).read_text())["format"] == 2
