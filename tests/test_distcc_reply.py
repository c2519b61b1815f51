"""Reading distccd's report on the compiler from the head of its reply."""

from __future__ import annotations

import os
import signal

from hypothesis import given
from hypothesis import strategies as st

from gatekeeper.distcc.reply import REPLY_HEAD, encode_reply_head, parse_reply_status


def test_a_clean_compile() -> None:
    status = parse_reply_status(encode_reply_head(0) + b"SERR00000000")
    assert status is not None and status.ok and status.describe() == "ok"
    assert status.signal is None and status.exit_code == 0


def test_a_compile_error_is_an_exit_code() -> None:
    status = parse_reply_status(encode_reply_head(1 << 8))  # exit(1), as g++ on an error
    assert status is not None and not status.ok
    assert status.exit_code == 1 and status.signal is None
    assert status.describe() == "exit-1"


def test_a_compiler_killed_by_the_oom_killer() -> None:
    status = parse_reply_status(encode_reply_head(signal.SIGKILL, version=2))
    assert status is not None and status.signal == signal.SIGKILL
    assert status.describe() == "killed-SIGKILL"


def test_a_real_wait_status_round_trips() -> None:
    pid = os.fork()
    if pid == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    _, raw = os.waitpid(pid, 0)
    status = parse_reply_status(encode_reply_head(raw))
    assert status is not None and status.signal == signal.SIGKILL


def test_what_is_not_a_status() -> None:
    head = encode_reply_head(0)
    assert parse_reply_status(head[:REPLY_HEAD - 1]) is None  # cut short
    assert parse_reply_status(b"") is None
    assert parse_reply_status(b"done 120") is None  # not distccd
    assert parse_reply_status(b"DONE00000001SERR00000000") is None  # no STAT
    assert parse_reply_status(b"DONE00000001STAT0000zz00") is None  # not hex


@given(st.binary(max_size=64))
def test_never_raises_on_any_bytes(data: bytes) -> None:
    status = parse_reply_status(data)
    if status is not None:
        assert data[:4] == b"DONE" and data[12:16] == b"STAT"
        status.describe()


@given(st.integers(min_value=0, max_value=0xFFFF))
def test_every_status_has_words(raw: int) -> None:
    status = parse_reply_status(encode_reply_head(raw))
    assert status is not None and status.wait_status == raw and status.describe()
