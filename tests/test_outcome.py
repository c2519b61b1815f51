"""How a job ended, decided from facts alone (gatekeeper.outcome): tables, no sockets."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatekeeper.distcc.reply import encode_reply_head
from gatekeeper.outcome import (
    COMPLETED,
    NOT_RUN,
    REJECT_REASONS,
    Exited,
    Outcome,
    Request,
    Side,
    classify,
)

STATUS = encode_reply_head(0)


@dataclass
class Moved:
    to_backend: int = 100
    to_client: int = 0
    failed: Side | None = None
    error: str | None = None
    eofs: list[Side] = field(default_factory=lambda: [Side.BACKEND, Side.CLIENT])
    idle: bool = False
    reply_head: bytes = STATUS


TABLE = [
    # (what moved, the request, the child's exit) -> outcome
    (Moved(), Request.DISTCC, None, Outcome.OK),
    (Moved(reply_head=b""), Request.UNKNOWN, None, Outcome.OK),
    (Moved(idle=True), Request.DISTCC, None, Outcome.IDLE_TIMEOUT),
    (Moved(failed=Side.CLIENT, error="reset"), Request.DISTCC, None, Outcome.CLIENT_ERROR),
    (Moved(failed=Side.BACKEND, error="reset"), Request.DISTCC, None, Outcome.BACKEND_FAILED),
    (Moved(failed=Side.BACKEND), Request.UNKNOWN, None, Outcome.BACKEND_FAILED),
    # distccd closed before its status: it died, or the client half-closed first
    (Moved(reply_head=b"DONE"), Request.DISTCC, None, Outcome.BACKEND_FAILED),
    (Moved(reply_head=b"", eofs=[Side.CLIENT, Side.BACKEND]), Request.DISTCC, None,
     Outcome.CLIENT_GONE),
    # not a distcc request: the client's fault, whatever distccd then did
    (Moved(reply_head=b""), Request.NOT_DISTCC, None, Outcome.CLIENT_ERROR),
    (Moved(failed=Side.BACKEND, reply_head=b""), Request.NOT_DISTCC, None,
     Outcome.CLIENT_ERROR),
    # connected and closed without a byte: never asked for a job
    (Moved(to_backend=0, reply_head=b"", eofs=[Side.CLIENT, Side.BACKEND]),
     Request.NOT_DISTCC, None, Outcome.CLIENT_GONE),
    # ... unless the backend failed on its own
    (Moved(to_backend=0, failed=Side.BACKEND, reply_head=b""), Request.NOT_DISTCC, None,
     Outcome.BACKEND_FAILED),
    # a distcc client closed first (killed mid-compile): distccd's 107 is about
    # the client; any other status stands (the client's close overtook distccd's)
    (Moved(reply_head=encode_reply_head(107 << 8), eofs=[Side.CLIENT, Side.BACKEND]),
     Request.DISTCC, None, Outcome.CLIENT_GONE),
    (Moved(reply_head=encode_reply_head(0), eofs=[Side.CLIENT, Side.BACKEND]),
     Request.DISTCC, None, Outcome.OK),
    (Moved(reply_head=encode_reply_head(1 << 8), eofs=[Side.CLIENT, Side.BACKEND]),
     Request.DISTCC, None, Outcome.OK),
    (Moved(reply_head=encode_reply_head(1 << 8)), Request.DISTCC, None, Outcome.OK),
    # not distcc, but the backend answered: another protocol, judged as usual
    (Moved(to_client=10, reply_head=b""), Request.NOT_DISTCC, None, Outcome.OK),
    (Moved(to_client=10, failed=Side.BACKEND), Request.NOT_DISTCC, None,
     Outcome.BACKEND_FAILED),
    # a pump-mode client resets as it closes, once it has distccd's status
    (Moved(failed=Side.CLIENT, error="ConnectionResetError: [Errno 104] Connection reset by peer",
           eofs=[]), Request.DISTCC, None, Outcome.CLIENT_ERROR),  # not pump mode: see below
    (Moved(failed=Side.CLIENT, error="ConnectionResetError: ...", eofs=[],
           reply_head=b"DONE00000003"), Request.DISTCC, None, Outcome.CLIENT_ERROR),
    (Moved(failed=Side.CLIENT, error="ConnectionResetError: ...", eofs=[],
           reply_head=encode_reply_head(107 << 8)), Request.DISTCC, None, Outcome.CLIENT_ERROR),
    (Moved(failed=Side.CLIENT, error="BrokenPipeError: ...", eofs=[]), Request.DISTCC, None,
     Outcome.CLIENT_ERROR),
    (Moved(failed=Side.CLIENT, error="ConnectionResetError: ...", eofs=[]), Request.UNKNOWN,
     None, Outcome.CLIENT_ERROR),
    (Moved(), Request.DISTCC, Exited(False, "exit status 1"), Outcome.COMMAND_FAILED),
    (Moved(), Request.DISTCC, Exited(True, "exit status 0"), Outcome.OK),
]


def test_a_pump_client_resets_as_it_closes() -> None:
    reset = "ConnectionResetError: [Errno 104] Connection reset by peer"
    assert classify(Moved(failed=Side.CLIENT, error=reset, eofs=[]), Request.DISTCC,
                    pump=True).outcome is Outcome.OK
    # ...but only once distccd's status (of a client still there) is in.
    for head in (b"DONE00000003", encode_reply_head(107 << 8)):
        assert classify(Moved(failed=Side.CLIENT, error=reset, eofs=[], reply_head=head),
                        Request.DISTCC, pump=True).outcome is Outcome.CLIENT_ERROR
    assert classify(Moved(failed=Side.CLIENT, error="BrokenPipeError: x", eofs=[]),
                    Request.DISTCC, pump=True).outcome is Outcome.CLIENT_ERROR


@pytest.mark.parametrize(("moved", "request_", "exited", "expected"), TABLE)
def test_classify_table(moved: Moved, request_: Request, exited: Exited | None,
                        expected: Outcome) -> None:
    assert classify(moved, request_, idle_timeout=30, exited=exited).outcome is expected


def test_details_say_why() -> None:
    assert classify(Moved(idle=True), Request.DISTCC, idle_timeout=30).detail == (
        "no byte either way for 30s")
    assert classify(Moved(reply_head=b""), Request.NOT_DISTCC).detail == (
        "not a distcc request; the backend did not answer it")
    assert classify(Moved(failed=Side.BACKEND, error="boom"), Request.DISTCC).detail == "boom"


def test_families_partition_the_vocabulary() -> None:
    assert set(COMPLETED) | set(REJECT_REASONS) == set(Outcome)
    assert not set(COMPLETED) & set(REJECT_REASONS)
    assert set(REJECT_REASONS) == NOT_RUN
    assert all(o.ran for o in COMPLETED) and not any(o.ran for o in NOT_RUN)


@given(st.builds(Moved, to_backend=st.integers(0, 10**9), to_client=st.integers(0, 9),
                 failed=st.sampled_from([None, Side.CLIENT, Side.BACKEND]),
                 eofs=st.lists(st.sampled_from(list(Side)), max_size=2), idle=st.booleans(),
                 reply_head=st.binary(max_size=30)),
       st.sampled_from(list(Request)),
       st.one_of(st.none(), st.builds(Exited, st.booleans(), st.text(max_size=5))))
def test_classify_is_total_and_blames_the_right_side(moved: Moved, request_: Request,
                                                     exited: Exited | None) -> None:
    verdict = classify(moved, request_, idle_timeout=1, exited=exited)
    if moved.idle:
        assert verdict.outcome is Outcome.IDLE_TIMEOUT
    elif moved.failed is Side.CLIENT:
        assert verdict.outcome is Outcome.CLIENT_ERROR
    elif verdict.outcome is Outcome.OK:
        assert moved.failed is None and (exited is None or exited.ok)
        assert request_ is not Request.NOT_DISTCC or moved.to_client > 0
    # Bytes that are not distcc and got no answer are never the backend's fault.
    if (request_ is Request.NOT_DISTCC and moved.to_backend > 0 and moved.to_client == 0
            and not moved.idle):
        assert verdict.outcome is Outcome.CLIENT_ERROR
