"""How a connection ended: the one vocabulary of outcomes, and the pure rule
that reads an outcome off what a job's bytes (and, in inetd mode, its child) did.

Pure: no trio, no socket, no clock (tests/test_purity.py checks the imports).
The I/O shell gathers the facts (a `Moved` record, the child's exit, what the
request head was) and asks `classify`; logs, metrics and learning then all
read the same `Outcome`.

Two families, kept apart in the metrics:

- *not run*: the connection was closed without a job running (`NOT_RUN`):
  denied, refused by the argv policy, refused by the queue, gone before its
  turn, a backend that could not be reached, a command that could not start;
- *completed*: a job ran and ended somehow (`COMPLETED`): ok, a client or
  backend failure, an idle or drain cut-off, a command that failed.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gatekeeper.distcc.reply import REPLY_HEAD, parse_reply_status

# distcc's src/exitcode.h: what distccd reports when talking to its client failed.
DISTCC_EXIT_IO_ERROR = 107


class Outcome(enum.Enum):
    OK = "ok"
    # not run
    DENIED = "denied"
    ARGV_POLICY = "argv-policy"
    PROXY_HEADER = "proxy-header"
    """A --trusted-proxy peer sent no PROXY header, or a broken one."""
    QUEUE_FULL = "queue-full"
    CLIENT_QUEUE_FULL = "client-queue-full"
    """Its client already had --max-queued-per-client jobs queued."""
    DRAINING = "draining"
    QUEUE_TIMEOUT = "queue-timeout"
    CLIENT_GONE = "client-gone"
    BACKEND_ERROR = "backend-error"
    COMMAND_ERROR = "command-error"
    # completed, not ok
    CLIENT_ERROR = "client-error"
    BACKEND_FAILED = "backend-failed"
    IDLE_TIMEOUT = "idle-timeout"
    DRAIN_TIMEOUT = "drain-timeout"
    PAUSE_TIMEOUT = "pause-timeout"
    """Paused for --max-pause with no room to go on: cut so its client
    compiles locally (pausing.py)."""
    COMMAND_FAILED = "command-failed"

    @property
    def ran(self) -> bool:
        """A job ran (the counter family `gatekeeper_completed_total`)."""
        return self not in NOT_RUN

    @property
    def client_left(self) -> bool:
        """The client broke off or never asked: what the backend then reported
        (distccd's EXIT_IO_ERROR 107 for a vanished client) is not a verdict on
        the compile."""
        return self in (Outcome.CLIENT_ERROR, Outcome.CLIENT_GONE, Outcome.IDLE_TIMEOUT,
                        Outcome.DRAIN_TIMEOUT, Outcome.PAUSE_TIMEOUT)


NOT_RUN = frozenset({Outcome.DENIED, Outcome.ARGV_POLICY, Outcome.PROXY_HEADER,
                     Outcome.QUEUE_FULL, Outcome.CLIENT_QUEUE_FULL, Outcome.DRAINING,
                     Outcome.QUEUE_TIMEOUT, Outcome.CLIENT_GONE, Outcome.BACKEND_ERROR,
                     Outcome.COMMAND_ERROR})
# In the order the metrics list them (a scrape's label order stays stable).
REJECT_REASONS: tuple[Outcome, ...] = (
    Outcome.DENIED, Outcome.QUEUE_FULL, Outcome.DRAINING, Outcome.QUEUE_TIMEOUT,
    Outcome.CLIENT_GONE, Outcome.BACKEND_ERROR, Outcome.COMMAND_ERROR, Outcome.ARGV_POLICY,
    Outcome.PROXY_HEADER, Outcome.CLIENT_QUEUE_FULL)
COMPLETED: tuple[Outcome, ...] = (
    Outcome.OK, Outcome.CLIENT_ERROR, Outcome.BACKEND_FAILED, Outcome.IDLE_TIMEOUT,
    Outcome.DRAIN_TIMEOUT, Outcome.PAUSE_TIMEOUT, Outcome.COMMAND_FAILED)


class Side(enum.Enum):
    """One end of a relayed job."""

    CLIENT = "client"
    BACKEND = "backend"


class Request(enum.Enum):
    """What the request head said before the job ran (`--identify distcc`)."""

    DISTCC = "distcc"
    """A distcc request head: distccd's reply must start with its status."""
    NOT_DISTCC = "not-distcc"
    """Bytes that are not a distcc request (or no bytes at all: the client
    closed at once)."""
    UNKNOWN = "unknown"
    """Not looked at (`--identify none`), or not complete in time."""


class Moved(Protocol):
    """What a job's byte transfer did (net.copy.Transfer)."""

    @property
    def to_backend(self) -> int: ...

    @property
    def to_client(self) -> int: ...

    @property
    def failed(self) -> Side | None: ...

    @property
    def error(self) -> str | None: ...

    @property
    def eofs(self) -> Sequence[Side]: ...

    @property
    def idle(self) -> bool: ...

    @property
    def reply_head(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Exited:
    """How an inetd child ended, as far as the outcome cares."""

    ok: bool
    text: str


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Outcome
    detail: str | None = None


def classify(moved: Moved, request: Request, *, idle_timeout: float | None = None,
             exited: Exited | None = None, pump: bool = False) -> Verdict:
    """The outcome of a job that ran, from how its bytes and its child ended.

    Blame goes where the fault was: a request that was not distcc at all is the
    client's error whatever distccd then did with it (it resets or closes); a
    client that connected and closed without a byte never asked for a job.
    `pump`: the request was pump mode's (protocol 3), whose client resets as
    it closes."""
    if moved.idle:
        return Verdict(Outcome.IDLE_TIMEOUT, f"no byte either way for {idle_timeout or 0:g}s")
    if (request is Request.NOT_DISTCC and moved.failed is not Side.CLIENT
            and moved.to_client == 0):
        # Bytes that are not a distcc request, and no answer came back (distccd
        # closes or resets on them): the client's error, not the backend's. A
        # backend that did answer speaks some other protocol: judged as usual.
        if moved.to_backend > 0:
            return Verdict(Outcome.CLIENT_ERROR, "not a distcc request; the backend did not "
                                                 "answer it")
        if moved.failed is None:
            return Verdict(Outcome.CLIENT_GONE, "closed without sending a request")
    if (pump and moved.failed is Side.CLIENT and request is Request.DISTCC
            and (moved.error or "").startswith("ConnectionResetError")
            and _finished(moved.reply_head)):
        # distccd sends its status only once the compiler has exited: the job
        # is done and the client has its verdict. A pump-mode client (protocol
        # 3) then closes with a reset, before distccd's own close (seen on every
        # pump job with distcc 3.4): how it ends, not a failure. (Plain and lzo
        # clients close cleanly: a reset from one after the status -- killed
        # while the object streamed -- stays a client error.)
        return Verdict(Outcome.OK)
    if moved.failed is not None:
        outcome = Outcome.CLIENT_ERROR if moved.failed is Side.CLIENT else Outcome.BACKEND_FAILED
        return Verdict(outcome, moved.error)
    if exited is not None and not exited.ok:
        return Verdict(Outcome.COMMAND_FAILED, exited.text)
    client_eof = list(moved.eofs[:1]) == [Side.CLIENT]
    if request is Request.DISTCC and len(moved.reply_head) >= REPLY_HEAD and client_eof:
        # A distcc client never half-closes before it has its reply: its EOF
        # first, with distccd reporting EXIT_IO_ERROR, means it went away
        # (killed mid-compile) and distccd gave up on it: a verdict on the
        # client, not on the compile. Any other status stands: a client that
        # has its whole reply closes at once, and its EOF can overtake
        # distccd's own in the relay (seen with an OOM-killed compile).
        status = parse_reply_status(moved.reply_head)
        if status is not None and status.exit_code == DISTCC_EXIT_IO_ERROR:
            return Verdict(Outcome.CLIENT_GONE,
                           f"the client closed before its reply; distccd then reported "
                           f"{status.describe()}")
    if request is Request.DISTCC and len(moved.reply_head) < REPLY_HEAD:
        # distccd answers every request it finished with DONE and STAT; a clean
        # EOF before them is a distccd that died or gave up (a restart, a
        # crash; a client half-close makes it kill the job).
        return Verdict(
            Outcome.CLIENT_GONE if client_eof else Outcome.BACKEND_FAILED,
            f"{'after the client half-closed, ' if client_eof else ''}"
            f"the backend closed after {len(moved.reply_head)} bytes of reply, "
            "before distccd's status")
    return Verdict(Outcome.OK)


def _finished(reply_head: bytes) -> bool:
    """distccd's status is in: the compiler ran to its end (and the client was
    there to be answered: not EXIT_IO_ERROR)."""
    status = parse_reply_status(reply_head)
    return status is not None and status.exit_code != DISTCC_EXIT_IO_ERROR


# A running job that the drain deadline cancelled (the only thing that cancels
# a running job's task; a bug propagates and stops the server instead).
CUT_OFF = Verdict(Outcome.DRAIN_TIMEOUT, "cut off by the drain timeout")
