"""What the orchestration needs to know about a job's protocol, in one object.

The connection and job code never test "is this distcc?" themselves: they ask
the job's `Speaks`, chosen once from its request head (`identify`). A
distcc job keeps distccd's status from the reply (`reply_prefix`), hands its
slot on when distccd closes (`hand_off_at_backend_eof`: distccd answers, then
closes; only the client's close is still to come) and, in inetd mode, gets a
relay that wakes `distccd --inetd` (`relays_inetd`). Anything else is passed
through opaquely.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from gatekeeper.distcc.peek import peek_distcc_job, peek_distcc_job_now
from gatekeeper.distcc.reply import REPLY_HEAD, CompileStatus, parse_reply_status
from gatekeeper.distcc.request import INCOMPLETE, DistccJob, HeadReader, Unparsed
from gatekeeper.outcome import Request

# How long a new connection may take to show its request head before it joins
# the queue as an unknown job. A distcc client writes the head right after
# connecting, so this is normally not waited at all; it bounds the wait when
# the head is slow or never comes (not distcc: use --identify none). 0.3 s,
# not the 0.1 s it was: on a loaded 2-core box running make -j12 a distcc
# client can take over 100 ms, and an unidentified job loses its learned
# footprint and the check of distccd's status.
IDENTIFY_GRACE = 0.3


@dataclass(frozen=True, slots=True)
class Speaks:
    """A job's protocol, as far as moving and judging its bytes goes."""

    request: Request
    reply_prefix: int
    """Bytes at the start of the reply to keep a copy of (distccd's status)."""
    hand_off_at_backend_eof: bool
    """The backend's EOF ends the job's use of the slot (see the module doc)."""
    relays_inetd: bool
    """`--inetd-io auto` gives this job a relayed socketpair (distcc/inetd_wake)."""

    def compile_status(self, reply_head: bytes) -> CompileStatus | None:
        """What the backend said of the compile, where this protocol says anything."""
        return parse_reply_status(reply_head) if self.reply_prefix else None


DISTCC = Speaks(Request.DISTCC, REPLY_HEAD, hand_off_at_backend_eof=True, relays_inetd=True)
NOT_DISTCC_BYTES = Speaks(Request.NOT_DISTCC, 0, hand_off_at_backend_eof=False,
                          relays_inetd=False)
OPAQUE = Speaks(Request.UNKNOWN, 0, hand_off_at_backend_eof=False, relays_inetd=False)


def speaks(head: DistccJob | Unparsed) -> Speaks:
    if isinstance(head, DistccJob):
        return DISTCC
    return OPAQUE if head is INCOMPLETE else NOT_DISTCC_BYTES


async def identify(sock: trio.socket.SocketType, patience: float = IDENTIFY_GRACE, *,
                   want_doti: bool = False) -> DistccJob | Unparsed:
    """Read the job's request head without consuming it: at once if it is there
    (the usual case), else within `patience` seconds. INCOMPLETE if it did not
    come in time (or the client left mid-head), NOT_DISTCC for other bytes or
    a client that closed, UNREADABLE for a head gatekeeper cannot read."""
    reader = HeadReader(want_doti=want_doti)
    head = peek_distcc_job_now(sock, reader)
    if head is not INCOMPLETE:
        return head
    with trio.move_on_after(patience):
        return await peek_distcc_job(sock, reader)
    return INCOMPLETE
