"""The distcc request-head peek: partial, hostile and real requests."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gatekeeper.distcc.request import (
    INCOMPLETE,
    MAX_ARGC,
    NOT_DISTCC,
    UNREADABLE,
    DistccJob,
    HeadReader,
    encode_request_head,
    parse_request_head,
)

ARGV = ["x86_64-linux-gnu-g++", "-O2", "-std=c++17", "-c", "src/a.cc", "-o", "src/a.o"]


def test_parses_a_full_head_followed_by_the_source() -> None:
    data = encode_request_head(ARGV) + b"DOTI00000010" + b"int x;"
    job = parse_request_head(data)
    assert isinstance(job, DistccJob)
    assert job.argv == tuple(ARGV)
    assert job.output == "src/a.o"
    assert job.key.startswith("p2-") and len(job.key) == 23


def test_key_is_stable_and_distinguishes_flags() -> None:
    a = parse_request_head(encode_request_head(ARGV))
    b = parse_request_head(encode_request_head(ARGV))
    c = parse_request_head(encode_request_head([*ARGV[:1], "-O0", *ARGV[2:]]))
    assert isinstance(a, DistccJob) and isinstance(b, DistccJob) and isinstance(c, DistccJob)
    assert a.key == b.key != c.key


def test_protocol_3_with_cdir() -> None:
    cdir = b"/home/me/tree"
    data = b"DIST00000003" + b"CDIR%08x" % len(cdir) + cdir + encode_request_head(ARGV)[12:]
    job = parse_request_head(data)
    assert isinstance(job, DistccJob) and job.argv == tuple(ARGV)


def test_every_strict_prefix_is_incomplete() -> None:
    data = encode_request_head(ARGV)
    for n in range(len(data)):
        assert parse_request_head(data[:n]) is INCOMPLETE, n
    assert isinstance(parse_request_head(data), DistccJob)


def test_garbage_is_not_distcc() -> None:
    for data in (b"GET / HTTP/1.1\r\n", b"\x16\x03\x01\x02\x00", b"dist00000001",
                 b"DISX", b"\x00"):
        assert parse_request_head(data) is NOT_DISTCC, data


def test_what_starts_like_distcc_but_cannot_be_read_is_unreadable() -> None:
    # distccd reads each token's digits with strtoul, which takes " +0x1" too:
    # anything after DIST that gatekeeper's strict reading rejects might still
    # run there, so it is UNREADABLE (refused by the argv policy), not "other".
    for data in (b"DIST0000000g", b"DIST00000001ARGV00000001x", b"DIST00000009ARGC00000001",
                 b"DIST   +0x1ARGC00000001", b"DIST00000001ARGC 0000001",
                 b"DIST00000000ARGC00000001", b"*\x01\x00\x00\x10"):
        assert parse_request_head(data) is UNREADABLE, data


def test_huge_argc_or_length_is_refused_without_reading_on() -> None:
    assert parse_request_head(b"DIST00000001ARGC%08x" % (MAX_ARGC + 1)) is UNREADABLE
    assert parse_request_head(b"DIST00000001ARGC00000001ARGVffffffff") is UNREADABLE


@given(st.binary(max_size=300))
def test_never_raises_on_any_bytes(data: bytes) -> None:
    parse_request_head(data)


# A NUL inside an argument makes the head UNREADABLE (tested on its own).
ARG = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0"),
              max_size=40)


@given(st.lists(ARG, max_size=30), st.integers(0, 2000))
def test_round_trip_and_truncation(argv: list[str], cut: int) -> None:
    data = encode_request_head(argv)
    job = parse_request_head(data)
    assert isinstance(job, DistccJob) and list(job.argv) == argv
    if cut < len(data):
        assert parse_request_head(data[:cut]) is INCOMPLETE


@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=8))
def test_reading_in_pieces_agrees_with_reading_at_once(data: bytes, cuts: list[int]) -> None:
    """The incremental reader (one look per arrival) ends where one whole look
    ends, whatever the pieces: resuming never skips or re-reads a token."""
    reader = HeadReader()
    result = None
    for cut in sorted(c for c in cuts if c <= len(data)):
        if cut == 0:
            continue
        result = reader.feed(data[:cut])
        if result is not INCOMPLETE:
            break
    if result is None or result is INCOMPLETE:
        result = reader.feed(data)
    whole = parse_request_head(data)
    assert result == whole


@given(st.lists(ARG, max_size=12), st.integers(1, 50))
def test_real_heads_read_in_pieces(argv: list[str], step: int) -> None:
    data = encode_request_head(argv)
    reader = HeadReader()
    for end in range(step, len(data), step):
        assert reader.feed(data[:end]) is INCOMPLETE
    job = reader.feed(data)
    assert isinstance(job, DistccJob) and list(job.argv) == argv


@given(st.binary(max_size=200))
def test_what_starts_with_dist_is_never_waved_through(tail: bytes) -> None:
    """Soundness for the argv policy: a request distccd would start reading
    (it checks the first four bytes are DIST) is never NOT_DISTCC."""
    assert parse_request_head(b"DIST" + tail) is not NOT_DISTCC
    assert parse_request_head(b"*" + tail) is UNREADABLE


def test_with_want_doti_the_head_ends_at_the_doti_token() -> None:
    """Under the argv policy the request's length must be known (its deadline
    needs it): protocols 1 and 2 wait for the DOTI token, refuse anything else."""
    head = encode_request_head(ARGV)
    for cut in range(len(head), len(head) + 12):
        data = (head + b"DOTI00000010")[:cut]
        assert HeadReader(want_doti=True).feed(data) is INCOMPLETE, cut
    job = HeadReader(want_doti=True).feed(head + b"DOTI00000010")
    assert isinstance(job, DistccJob) and job.request_bytes == len(head) + 12 + 16
    assert HeadReader(want_doti=True).feed(head + b"NFIL00000001") is UNREADABLE
    assert HeadReader(want_doti=True).feed(head + b"DOTI 0000010") is UNREADABLE
    # Without it (the policy off), the head ends at the last argument, as before.
    assert isinstance(HeadReader().feed(head), DistccJob)
