"""The farm's ledger: what a box measured, paged to its peers; hostile answers."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatekeeper.farm.ledger import (
    MAX_ANSWER,
    MAX_ENTRIES,
    PAGE,
    Answer,
    Cursor,
    Entry,
    Ledger,
    decode,
    encode,
)

CEILING = 64 * 2**30


def test_a_peer_gets_what_is_new_once() -> None:
    ledger = Ledger("e1")
    ledger.record(Entry("a", 100, "plain", 5000))
    ledger.record(Entry("b", 200))
    first = ledger.since(0)
    assert [e.key for e in first.entries] == ["a", "b"] and not first.more
    assert ledger.since(first.generation).entries == ()
    ledger.record(Entry("a", 110, "plain", 5100))  # measured again: sent again, once
    again = ledger.since(first.generation)
    assert again.entries == (Entry("a", 110, "plain", 5100),)


def test_answers_are_paged_oldest_first() -> None:
    ledger = Ledger("e1")
    for i in range(PAGE + 10):
        ledger.record(Entry(f"k{i}", i + 1))
    first = ledger.since(0)
    assert first.more and len(first.entries) == PAGE and first.entries[0].key == "k0"
    second = ledger.since(first.generation)
    assert not second.more and [e.key for e in second.entries] == [
        f"k{i}" for i in range(PAGE, PAGE + 10)]


def test_the_ledger_is_bounded() -> None:
    ledger = Ledger("e1")
    for i in range(MAX_ENTRIES + 5):
        ledger.record(Entry(f"k{i}", 1))
    assert len(ledger) == MAX_ENTRIES


def test_a_restarted_peer_is_read_again_from_its_start() -> None:
    cursor = Cursor()
    old = Ledger("before")
    for i in range(3):
        old.record(Entry(f"k{i}", 1))
    assert len(cursor.take(old.since(cursor.query()))) == 3
    assert cursor.query() == 3
    new = Ledger("after")  # the peer restarted: a new epoch, generations from 1
    new.record(Entry("n", 1))
    assert cursor.take(new.since(cursor.query())) == ()  # asked "since 3" of a new ledger
    assert cursor.query() == 0
    assert [e.key for e in cursor.take(new.since(cursor.query()))] == ["n"]


def test_a_ledger_that_went_back_is_read_again() -> None:
    cursor = Cursor()
    cursor.take(Answer("e", 10, (), False))
    assert cursor.take(Answer("e", 4, (Entry("x", 1),), False)) == ()
    assert cursor.query() == 0


def test_round_trip() -> None:
    answer = Answer("e1", 7, (Entry("p2-ab", 5, "lzo", 9), Entry("k", 6)), True)
    assert decode(encode(answer), ceiling=CEILING) == answer


@pytest.mark.parametrize("data", [
    b"", b"[]", b"{", b"[" * 100_000, b'{"format": 2}',
    json.dumps({"format": 1, "epoch": "", "generation": 0, "more": False,
                "entries": []}).encode(),
    json.dumps({"format": 1, "epoch": "e", "generation": -1, "more": False,
                "entries": []}).encode(),
    json.dumps({"format": 1, "epoch": "e", "generation": 0, "more": 0,
                "entries": []}).encode(),
    json.dumps({"format": 1, "epoch": "e", "generation": 0, "more": False,
                "entries": [["k", 1.5, None, None]]}).encode(),
    json.dumps({"format": 1, "epoch": "e", "generation": 10**18, "more": False,
                "entries": []}).encode(),
    json.dumps({"format": 1, "epoch": "e", "generation": 0, "more": False,
                "entries": [["k", 1, None, None]] * (PAGE + 1)}).encode(),
    b" " * (MAX_ANSWER + 1),
])
def test_hostile_answers_are_refused_with_a_reason(data: bytes) -> None:
    with pytest.raises(ValueError) as caught:
        decode(data, ceiling=CEILING)
    assert str(caught.value)


def test_entries_of_no_use_here_are_skipped_and_the_cursor_moves_on() -> None:
    """A bigger box's 20 GiB peak on a 16 GiB box, a newer version's unit or key:
    skipped; refusing the answer would stop learning from that peer for good."""
    entries = [["k", 10**30, None, None], ["k" * 65, 1, None, None], ["k", 1, "zip", 5],
               ["good", 7, "plain", 100]]
    answer = decode(json.dumps({"format": 1, "epoch": "e", "generation": 4, "more": False,
                                "entries": entries}).encode(), ceiling=CEILING)
    assert answer.entries == (Entry("good", 7, "plain", 100),)
    cursor = Cursor()
    cursor.take(answer)
    assert cursor.query() == 4


@given(st.binary(max_size=2000))
def test_any_bytes_decode_or_raise_value_error(data: bytes) -> None:
    try:
        answer = decode(data, ceiling=CEILING)
    except ValueError:
        return
    assert len(answer.entries) <= PAGE


@given(st.lists(st.tuples(st.sampled_from("abcdefgh"), st.integers(1, 10**9)), max_size=50),
       st.integers(0, 60))
def test_a_cursor_sees_every_latest_entry_once(records: list[tuple[str, int]],
                                               page: int) -> None:
    ledger = Ledger("e")
    cursor = Cursor()
    seen: dict[str, int] = {}
    for key, peak in records:
        ledger.record(Entry(key, peak))
        for _ in range(100):
            answer = ledger.since(cursor.query(), page=max(page, 1))
            for entry in cursor.take(answer):
                seen[entry.key] = entry.peak
            if not answer.more:
                break
    latest = dict(records)
    assert seen == latest


@pytest.mark.parametrize(("query", "since"), [
    ("", 0), ("since=0", 0), ("since=42", 42), ("since=", None), ("since=-1", None),
    ("since=1e3", None), ("since=" + "9" * 19, None), ("since=\u0663", None),
    ("x=1", None), ("since=1&x=2", None),
])
def test_the_route_reads_only_a_generation(query: str, since: int | None) -> None:
    from gatekeeper.observe.web import footprints_since
    assert footprints_since(query) == since


def test_the_query_reaches_the_route() -> None:
    """The request line's query was once dropped before routing: every exchange
    then asked for the whole ledger again."""
    from gatekeeper.observe.web import request_query
    assert request_query(b"GET /footprints?since=7 HTTP/1.0\r\n\r\n") == "since=7"
    assert request_query(b"GET /footprints HTTP/1.0\r\n\r\n") == ""
