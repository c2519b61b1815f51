"""One job's life, from accepted connection to its end line.

States (`State`), in the order a job passes them; any state may end in DONE:

    IDENTIFYING  accepted and allowed; its request head is being read (peeked,
                 never consumed) so its footprint is known before it queues
    QUEUED       holds a ticket in the gate, waiting for a slot and memory
    ADMITTED     the gate granted the slot; the backend is being connected
                 (for a queued proxy job this starts inside the releasing task,
                 `ProxyJobs.start_at_admission`, before the job's own task runs)
    RUNNING      its bytes move (or its inetd child runs) and it is metered
    HANDED_OFF   the backend's part is over and the slot already went to the
                 next job (distccd answered and closed); only the client's
                 close, or the rest of the reply, is still to come
    DONE         its outcome is settled, its end line logged, its slot and
                 queue place released exactly once (the gate's ticket scope)

The slot belongs to the ticket from ADMITTED on and is released by whichever
comes first: the hand-off (`hand_off`, in the relay task) or the end of the
ticket's scope in the job's task. Nothing else changes admission state.

`Job` is the one record of all this (the end line, the metrics and learning
read it); `ProxyJobs` runs the ADMITTED -> RUNNING -> HANDED_OFF part for a
TCP or unix backend, `inetd.job.InetdJobs` for a command per connection.
"""

from __future__ import annotations

import enum
import errno
import functools
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

import trio

from gatekeeper.config import Config
from gatekeeper.distcc.identity import Features
from gatekeeper.distcc.protocol import OPAQUE, Speaks
from gatekeeper.distcc.reply import CompileStatus
from gatekeeper.footprints import Source
from gatekeeper.gate import Gate, Ticket
from gatekeeper.memory.adopt import Adopter, Adoption
from gatekeeper.memory.job_cgroup import JobCgroup
from gatekeeper.memory.meter import Usage
from gatekeeper.net.addresses import connect, connected_now, finish_connect, start_connect
from gatekeeper.net.copy import Transfer, abort
from gatekeeper.net.datapath import move_bytes, open_on_relay
from gatekeeper.net.relay import Relay, RelayJob
from gatekeeper.net.sockqueue import send_queue
from gatekeeper.net.window import open_window
from gatekeeper.observe.escape import printable
from gatekeeper.observe.units import format_mib
from gatekeeper.outcome import Exited, Outcome, Verdict, classify

log = logging.getLogger("gatekeeper")

# The slowest a running job's request may arrive, overall, before it is cut
# (on top of --request-idle-timeout): 64 KiB/s is a 512 kbit/s link, far below
# any build farm's, and a 10 MB preprocessed source still has 160 s.
MIN_REQUEST_RATE = 64 * 1024

# What goes ahead of an adoption (`_prime_and_adopt`): one distcc token, less
# than any request, enough for distccd's TCP_DEFER_ACCEPT to let a child accept.
PRIME_BYTES = 12

# A reason can quote the client (the argv policy names the refused option);
# repr() escapes it, and this bounds it.
MAX_REASON = 400


class State(enum.Enum):
    IDENTIFYING = "identifying"
    QUEUED = "queued"
    ADMITTED = "admitted"
    RUNNING = "running"
    HANDED_OFF = "handed-off"
    DONE = "done"


@dataclass(slots=True)
class Job:
    """What one connection did: its state, its facts, and its end line."""

    peer: str
    accepted: float
    state: State = State.IDENTIFYING
    outcome: Outcome | None = None
    detail: str | None = None
    admitted: float | None = None
    ended: float | None = None
    speaks: Speaks = OPAQUE
    key: str | None = None
    """The compile's identity for learned footprints (distcc jobs)."""
    name: str | None = None
    """The compile's output file, for logs (distcc jobs)."""
    narrow: bool = False
    """Its receive window was narrow when accepted (net/window.py): opened at
    admission."""
    request_bytes: int | None = None
    """The distcc request's whole length, when its head said (DOTI)."""
    transfer: Transfer | None = None
    pid: int | None = None
    """inetd mode: the job's child process."""
    features: Features | None = None
    """What the request head says of the compile (distcc jobs)."""
    estimate: int | None = None
    estimate_from: Source | None = None
    """Where `estimate` came from: the key's peaks, a prediction, the default."""
    peak: int | None = None
    ticket: int | None = None
    """The gate's id for this connection's ticket, once it has one."""
    compile: CompileStatus | None = None
    """distccd's report on the compiler (distcc jobs whose reply was relayed)."""
    oom_kills: int | None = None
    """The box's OOM-kill count when the job was admitted."""
    oom_seen: bool = False
    """The OOM killer struck while this job ran, and the job failed."""
    backend_ends: tuple[tuple[str, int], tuple[str, int]] | None = None
    """(our end, the backend's end) of a TCP backend connection, to find the
    backend process that serves the job."""
    usage: Usage | None = None
    """The meter's measurements of the job, while it is measured."""
    adoption: Adoption | None = None
    """Proxy mode: its distccd child, while it is in the job's cgroup."""
    cgroup: JobCgroup | None = None
    """inetd mode: the job's own cgroup, while it exists."""
    child_running: bool = False
    """inetd mode: its child has started and has not been reaped."""
    paused_since: float | None = None
    """When it was frozen, while it is (pauses.py)."""
    paused_seconds: float = 0.0
    """How long it was frozen before, in all."""
    pauses: int = 0
    director_own: bool = False
    """A trusted director's own connection (its PROXY header named no client)."""

    def settle(self, verdict: Verdict | Outcome) -> None:
        if isinstance(verdict, Outcome):
            self.outcome, self.detail = verdict, None
        else:
            self.outcome, self.detail = verdict.outcome, verdict.detail

    def mark_admitted(self, now: float, oom_kills: int | None) -> None:
        self.state = State.ADMITTED
        self.admitted, self.oom_kills = now, oom_kills

    def finish_moving(self, transfer: Transfer, *, idle_timeout: float | None,
                      exited: Exited | None = None) -> None:
        """Settle a job whose bytes stopped moving: its outcome, and what the
        backend said of the compile unless the client left (then distccd's
        report, EXIT_IO_ERROR 107 for a vanished client, says nothing of it)."""
        pump = self.features is not None and self.features.encoding == "pump"
        self.settle(classify(transfer, self.speaks.request, idle_timeout=idle_timeout,
                             exited=exited, pump=pump))
        assert self.outcome is not None
        status = self.speaks.compile_status(transfer.reply_head)
        self.compile = None if self.outcome.client_left else status

    @property
    def bytes_in(self) -> int:
        return self.transfer.to_backend if self.transfer is not None else 0

    @property
    def bytes_out(self) -> int:
        return self.transfer.to_client if self.transfer is not None else 0

    def paused_for(self, now: float) -> float:
        """Seconds it has been frozen in all, until `now`."""
        since = self.paused_since
        return self.paused_seconds + (now - since if since is not None else 0.0)

    def _times(self) -> tuple[float, float]:
        end = self.ended if self.ended is not None else self.accepted
        wait_end = self.admitted if self.admitted is not None else end
        run = end - self.admitted if self.admitted is not None else 0.0
        return wait_end - self.accepted, run

    def fields(self) -> dict[str, object]:
        """The end line's facts as typed values (for --log-format json)."""
        wait, run = self._times()
        out: dict[str, object] = {
            "event": "end", "peer": self.peer, "outcome": _outcome_text(self.outcome),
            "wait_seconds": round(wait, 3), "run_seconds": round(run, 3),
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
        }
        extra = {"pid": self.pid, "job": self.name,
                 "compile": self.compile.describe() if self.compile is not None else None,
                 "oom": True if self.oom_seen else None,
                 "estimate_bytes": self.estimate,
                 "estimate_from": (self.estimate_from.value if self.estimate_from is not None
                                   else None),
                 "peak_bytes": self.peak,
                 "pauses": self.pauses or None,
                 "paused_seconds": round(self.paused_seconds, 3) if self.pauses else None,
                 "reason": self.detail}
        out.update((k, v) for k, v in extra.items() if v is not None and v != "")
        return out

    def line(self) -> str:
        wait, run = self._times()
        text = (f"end peer={self.peer} outcome={_outcome_text(self.outcome)} wait={wait:.3f}s"
                f" run={run:.3f}s in={self.bytes_in} out={self.bytes_out}")
        if self.pid is not None:
            text += f" pid={self.pid}"
        if self.name:
            text += f" job={printable(self.name)}"  # the client's -o: escaped
        if self.compile is not None:
            text += f" compile={self.compile.describe()}"
        if self.oom_seen:
            text += " oom=yes"
        if self.estimate is not None:
            text += f" est={format_mib(self.estimate, space=False)}"
            if self.estimate_from is not None:
                text += f" est_from={self.estimate_from.value}"
        if self.peak is not None:
            text += f" peak={format_mib(self.peak, space=False)}"
        if self.pauses:
            text += f" paused={self.paused_seconds:.1f}s/{self.pauses}"
        if self.detail:
            text += f" reason={self.detail[:MAX_REASON]!r}"
        return text


def _outcome_text(outcome: Outcome | None) -> str:
    return "?" if outcome is None else outcome.value


@dataclass(slots=True, eq=False)
class ProxyStart:
    """A queued job's start at the moment it is admitted (`ProxyJobs.
    start_at_admission`, as the ticket's on_admit), and what that start got
    before the job's own task ran again: a connect in progress, or its backend
    connection with the bytes already moving. Owned by the job's task, which
    takes it over or, if it ends first, drops it. (One object, not a closure
    plus a holder: one exists per queued client.)"""

    jobs: ProxyJobs | None = None
    stream: trio.SocketStream | None = None
    job: Job | None = None
    ticket: Ticket | None = None
    raw: socket.socket | None = None
    backend: trio.SocketStream | None = None
    moving: RelayJob | None = None
    client: trio.SocketStream | None = None
    """Set once bytes may have moved: then the client must see a reset if the
    job is dropped, never a clean end."""
    broken: str | None = None
    """Why a start that may have moved bytes was given up: the job cannot be
    started again (part of its request is gone), it fails."""
    primed: bytes | None = None
    """A job to adopt: the request's first bytes, sent to the backend at
    admission (`_prime_and_adopt` then finds and moves the child)."""

    def __call__(self) -> None:
        if self.jobs is not None:
            self.jobs.start_at_admission(self)

    def drop(self, relay: Relay | None) -> None:
        """Undo whatever was started and not taken over (the task was cut off
        before it got there): the backend, and the client if any of its bytes
        moved, get a reset. Also lets go of the runner, stream, job and ticket
        (the ticket refers back to this: no cycle left for the GC)."""
        self.jobs = self.stream = self.job = self.ticket = None
        self.primed = None  # (`broken` says whether the job can start again)
        if self.moving is not None and relay is not None:
            relay.discard(self.moving)
            self.moving = None
        if self.client is not None:
            abort(self.client)
            self.client = None
        if self.backend is not None:
            abort(self.backend)
            self.backend.socket.close()
            self.backend = None
        if self.raw is not None:
            self.raw.close()
            self.raw = None


class ProxyJobs:
    """Proxy mode: each admitted job gets its own connection to the backend,
    and its bytes are relayed both ways until done."""

    def __init__(self, config: Config, gate: Gate, relay: Relay | None,
                 is_gone: Callable[[socket.socket | trio.socket.SocketType], bool],
                 mark_admitted: Callable[[Job], None], adopter: Adopter | None = None) -> None:
        self.config = config
        self.gate = gate
        self.relay = relay
        self.adopter = adopter
        """Gives each job's distccd child a cgroup of its own (memory/adopt.py)."""
        self.is_gone = is_gone
        self.mark_admitted = mark_admitted

    def prepare(self, stream: trio.SocketStream, job: Job, ticket: Ticket,
                waited: bool) -> ProxyStart:
        """The job's start; for a queued job on the zero-copy path, armed to run
        at the very moment it is admitted (not when its task next gets to run)."""
        start = ProxyStart()
        if waited and self.relay is not None:
            start.jobs, start.stream, start.job, start.ticket = self, stream, job, ticket
            ticket.on_admit = start
        return start

    def drop(self, start: ProxyStart | None) -> None:
        if start is not None:
            start.drop(self.relay)

    def start_at_admission(self, start: ProxyStart) -> None:
        """The gate just admitted this queued job (`Ticket.on_admit`), inside
        whatever task released the slot -- usually the relay, the moment the
        previous job's bytes were done. Connect and start moving the request
        now, without a checkpoint: the handoff then costs no task switch. What
        cannot be done at once (a connect still in progress, a host name to
        resolve, an error to report) is left to the job's own task."""
        stream, job, ticket = start.stream, start.job, start.ticket
        assert stream is not None and job is not None and ticket is not None
        if self.is_gone(stream.socket):
            return  # its task ends it as client-gone
        assert self.relay is not None
        try:
            raw = start.raw = start_connect(self.config.backend)
            if raw is None or not connected_now(raw):
                return
            if job.narrow:
                open_window(stream.socket)  # type: ignore[arg-type]
            if self.adopting and job.key is not None:
                self._prime_at_admission(start, raw, stream, job)
                return
            transfer = job.transfer = Transfer()
            start.client = stream
            start.moving = open_on_relay(
                self.relay, stream.socket, raw, transfer, speaks=job.speaks,
                on_complete=functools.partial(self.hand_off, raw.close, ticket, job))
            # The rest only after the first bytes moved: the backend waits for them.
            start.backend = trio.SocketStream(trio.socket.from_stdlib_socket(raw))
            start.raw = None
            self.mark_admitted(job)
            job.state = State.RUNNING
            job.backend_ends = tcp_ends(start.backend)  # the meter finds it by these
        except OSError as e:
            # Refused, out of fds: its task tries again and reports what it meets
            # -- unless its first token went already: then it fails, with resets.
            if start.primed:
                start.broken = f"backend: {type(e).__name__}: {e}"
            else:
                start.client = None  # nothing moved
            start.drop(self.relay)
        except Exception as e:
            # A bug here must not strand the job or stop the releasing task (the
            # relay, the gate's timer). Its task starts it the usual way, unless
            # bytes may have moved already: then it fails, with resets.
            log.exception("could not start job %s at admission", ticket.job)
            if start.client is not None:
                start.broken = f"internal error starting the job: {e!r}"
            start.drop(self.relay)

    def _prime_at_admission(self, start: ProxyStart, raw: socket.socket,
                            stream: trio.SocketStream, job: Job) -> None:
        """A job whose distccd child gets a job cgroup: only its first token
        goes now (so distccd, TCP_DEFER_ACCEPT, accepts while the job's task
        wakes); the task finds and moves the child before the rest follows.
        Measured (bench/handoff.py, -j 1, as root, p50): the next job's first
        byte reached the backend 562 us after the previous job's end when the
        task did it all, 289 us so (221 us with --job-cgroups off)."""
        try:
            first = os.read(stream.socket.fileno(), PRIME_BYTES)
        except BlockingIOError:
            first = None  # nothing yet: the task waits for it, as before
        if first:
            start.client = stream  # bytes moved: a dropped start resets the client
            try:
                if raw.send(first) != len(first):  # a new connection takes 12 bytes
                    raise OSError(errno.EAGAIN, "the backend took part of the first token")
            except OSError as e:
                # Part of the request is gone from the client: the job cannot
                # start again, it fails (its task says so; both ends get resets).
                start.broken = f"backend: {type(e).__name__}: {e}"
                start.drop(self.relay)
                return
        start.primed = first
        start.backend = trio.SocketStream(trio.socket.from_stdlib_socket(raw))
        start.raw = None
        self.mark_admitted(job)
        job.state = State.RUNNING
        job.backend_ends = tcp_ends(start.backend)

    def hand_off(self, close_backend: Callable[[], None], ticket: Ticket, job: Job) -> None:
        """A job's backend part is done, cleanly (`Relay.open`'s on_complete, in
        the relay task: both directions ended, or for distcc, distccd's reply
        and EOF are in): close its backend connection -- so at most max-jobs
        are ever open -- and give its slot to the next job at once. Its own
        task logs and learns afterwards, from what was measured until now."""
        close_backend()
        job.state = State.HANDED_OFF
        if job.usage is not None:
            job.usage.stop()
        # Before the slot goes on: the next job may be served by the same
        # distccd child, which must not compile it in this job's cgroup. The
        # peak and the cgroup's removal wait for the job's own task (`run`),
        # off the next job's way.
        try:
            if job.adoption is not None and self.adopter is not None:
                self.adopter.send_home(job.adoption)
        finally:
            self.gate.release(ticket)

    @property
    def adopting(self) -> bool:
        """Whether jobs' distccd children get job cgroups (an adopter that has not
        given up: then jobs need not wait for it, nor be primed)."""
        return self.adopter is not None and self.adopter.failure is None

    def _release(self, job: Job) -> None:
        """The job's distccd child goes home and its cgroup's peak is its footprint."""
        adoption, job.adoption = job.adoption, None
        if adoption is None or self.adopter is None:
            return
        peak = self.adopter.release(adoption)
        if job.usage is not None:
            job.usage.stop()
            if peak:
                job.usage.peak, job.usage.exact = peak, True

    async def run(self, stream: trio.SocketStream, job: Job, ticket: Ticket,
                  start: ProxyStart | None) -> None:
        """Connect (unless the start at admission did) and relay until done;
        settles the job's outcome. Does not close the client."""
        if start is None:
            start = ProxyStart()
        if start.broken is not None:
            job.settle(Verdict(Outcome.BACKEND_FAILED, start.broken))
            return
        moving, backend, primed = start.moving, start.backend, start.primed
        start.moving = start.backend = start.client = None  # taken over: closed below
        address = self.config.backend
        if backend is None:
            try:
                if start.raw is not None:
                    raw, start.raw = start.raw, None
                    backend = await finish_connect(
                        raw, connect_timeout=self.config.connect_timeout)
                else:
                    backend = await connect(address,
                                            connect_timeout=self.config.connect_timeout)
            except (OSError, trio.TooSlowError) as e:
                job.settle(Verdict(Outcome.BACKEND_ERROR,
                                   f"connect {address}: {e or 'timed out'}"))
                return
            job.backend_ends = tcp_ends(backend)
        if job.state is State.ADMITTED:
            job.state = State.RUNNING
        transfer = moving.transfer if moving is not None else Transfer()
        if primed:
            transfer.to_backend += len(primed)  # sent at admission
        job.transfer = transfer
        stalled: list[str] = []
        try:
            if (self.adopting and moving is None and job.backend_ends is not None
                    and job.key is not None):
                assert self.adopter is not None
                # Before the request's last bytes reach it (see memory/adopt.py).
                job.adoption, failed = await _prime_and_adopt(self.adopter, stream, backend,
                                                              transfer, job, primed)
                if failed is not None:
                    job.settle(failed)
                    return
            async with trio.open_nursery() as watching:
                if job.request_bytes is not None:
                    watching.start_soon(watch_request, transfer, job.request_bytes,
                                        self.config.request_idle_timeout, backend.socket,
                                        stalled, watching.cancel_scope)
                await move_bytes(
                    stream, backend, transfer, relay=self.relay, moving=moving,
                    speaks=job.speaks, idle_timeout=self.config.idle_timeout,
                    on_complete=functools.partial(self.hand_off, backend.socket.close,
                                                  ticket, job))
                watching.cancel_scope.cancel()  # the bytes are done: stop the watch
        finally:
            backend.socket.close()
            self._release(job)  # the peak, the cgroup gone (the hand-off sent it home)
        if stalled:
            job.settle(Verdict(Outcome.IDLE_TIMEOUT, stalled[0]))
            return
        job.finish_moving(transfer, idle_timeout=self.config.idle_timeout)


async def _prime_and_adopt(adopter: Adopter, stream: trio.SocketStream,
                           backend: trio.SocketStream, transfer: Transfer,
                           job: Job, primed: bytes | None = None,
                           ) -> tuple[Adoption | None, Verdict | None]:
    """Give the job's distccd child a cgroup of its own before its compile can
    start. distccd listens with TCP_DEFER_ACCEPT: no child accepts (and none
    can be found) until request bytes arrive, so the request's first token goes
    ahead (`PRIME_BYTES`: a distcc request is always longer), then the child is
    found and moved, then the rest follows through the relay. Returns the
    adoption (None: the job is sampled) and, if a side failed here, the job's
    verdict (a client at EOF is left to the relay, which sees it again).
    `primed`: the first bytes already went at admission."""
    first = primed
    if first is None:
        try:
            first = await stream.receive_some(PRIME_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            return None, Verdict(Outcome.CLIENT_ERROR, f"{type(e).__name__}: {e}")
    if not first:
        return None, None
    try:
        if primed is None:
            await backend.send_all(first)
            transfer.to_backend += len(first)
        assert job.backend_ends is not None
        adoption = await adopter.adopt(job.backend_ends)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
        abort(stream)  # part of its request is gone: it must not see a clean end
        return None, Verdict(Outcome.BACKEND_FAILED, f"{type(e).__name__}: {e}")
    except BaseException:
        # Cancelled (the drain deadline) with part of the request gone: both
        # ends must see a reset, never a clean end.
        abort(stream)
        abort(backend)
        raise
    if adoption is not None and job.usage is not None:
        job.usage.cgroup_usage = adoption.cgroup.usage_file
    return adoption, None


async def watch_request(transfer: Transfer, total: int, idle_for: float,
                        backend: socket.socket | trio.socket.SocketType,
                        stalled: list[str], cut: trio.CancelScope) -> None:
    """Cut a running distcc job whose request stops arriving or dribbles: such
    a client holds a slot with no timeout otherwise (distccd waits for the
    rest). distcc clients write their whole request at once, so `idle_for`
    without progress, or a request slower than MIN_REQUEST_RATE overall
    (issue 16: 1 byte per 100 ms), is a stuck or hostile client. The client is
    only blamed while nothing it sent is waiting on the backend (our send
    queue to the backend is empty): a
    distccd that is slow to read (its --jobs lower than ours, a shared box) is
    not the client's doing. The watch ends once the request is all in or
    distccd has answered; the compile may then take as long as it takes."""
    begin = trio.current_time()
    deadline = begin + idle_for + total / MIN_REQUEST_RATE
    last, last_change = transfer.to_backend, begin
    while transfer.to_backend < total and transfer.to_client == 0:
        await trio.sleep(min(idle_for, max(0.0, deadline - trio.current_time())) or idle_for)
        now = trio.current_time()
        if transfer.to_backend >= total or transfer.to_client > 0:
            return
        try:
            # Bytes the backend has not taken: it is slow, not the client. (While
            # the backend takes nothing, our send queue to it stays full: the
            # relay's pipe only drains into it.)
            backend_slow = send_queue(backend.fileno()) > 0
        except OSError:
            return  # a socket is gone: the job is ending on its own
        if transfer.to_backend != last or backend_slow:
            if backend_slow:
                deadline += now - last_change  # the backend's time, not the client's
            last, last_change = transfer.to_backend, now
        elif now - last_change >= idle_for:
            stalled.append(f"request stalled at {transfer.to_backend} of {total} bytes "
                           f"for {idle_for:g}s")
            cut.cancel()  # move_bytes resets both ends as it is cancelled
            return
        if now >= deadline:
            stalled.append(f"request too slow: {transfer.to_backend} of {total} bytes in "
                           f"{now - begin:.0f}s (under {MIN_REQUEST_RATE // 1024} KiB/s)")
            cut.cancel()
            return


def tcp_ends(stream: trio.SocketStream) -> tuple[tuple[str, int], tuple[str, int]] | None:
    sock = stream.socket
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        ours, theirs = sock.getsockname(), sock.getpeername()
    except OSError:
        return None
    return (ours[0], ours[1]), (theirs[0], theirs[1])
