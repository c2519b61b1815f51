"""inetd mode's part of a job's life (`job.State` ADMITTED -> RUNNING -> DONE):
the job is its child process, on the client socket itself (direct) or on a
socketpair gatekeeper relays (see `config.InetdIo`).

Direct: no byte passes through gatekeeper, so what moved is read from the
kernel's own count on the client socket (TCP_INFO) when the child has exited.
Relayed: the bytes go through `net.datapath` like a proxied job's, so distccd's
status is read, and a distcc job's distccd is woken when its compiler is done
(`distcc.inetd_wake`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import struct

import trio

from gatekeeper.config import Config, InetdIo
from gatekeeper.distcc.inetd_wake import Wake, Waker, hang_up, oob_available
from gatekeeper.gate import Ticket
from gatekeeper.inetd.command import Command, CommandRunner, Exit, filters_peers
from gatekeeper.job import Job, ProxyStart, State, watch_request
from gatekeeper.memory.job_cgroup import CgroupError, JobCgroup, JobCgroups
from gatekeeper.net.copy import Transfer
from gatekeeper.net.datapath import move_bytes
from gatekeeper.net.relay import Relay
from gatekeeper.net.sockqueue import send_queue, set_buffer
from gatekeeper.outcome import Exited, Outcome, Verdict

log = logging.getLogger("gatekeeper")

# struct tcp_info (linux/tcp.h): tcpi_state is its first byte; tcpi_bytes_acked
# (what the client has of the reply) and tcpi_bytes_received (what it sent) are
# u64s at these offsets since Linux 4.1 / 4.2 (8 one-byte fields, 24 u32s,
# pacing_rate, max_pacing_rate).
# The child's end of a relayed job's socketpair gets this send buffer: distccd
# sendfile()s its whole reply at once (dcc_pump_sendfile) to a non-blocking
# socket, and with the unix default (net.core.wmem_default, 212,992 bytes) it
# went out in pieces ("sendfile: partial transmission of 262144 bytes;
# retrying", logged 919 times for 153 jobs). A limit, not an allocation: the
# queue holds only what distccd wrote and the relay has not taken yet (at most
# twice this per running job, when its client reads slowly). As root
# SO_SNDBUFFORCE passes net.core.wmem_max; 4 MiB (8 in the kernel's count)
# holds most objects whole (measured, two 3 MiB objects: no partial sends;
# before, nine each); otherwise the kernel caps it at wmem_max.
CHILD_SNDBUF = 4 << 20
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
_TCPI_BYTES_ACKED = 120
_TCPI_SIZE = _TCPI_BYTES_ACKED + 16
# Each counter includes a FIN's sequence number once it is in (measured: a
# peer's FIN adds 1 to bytes_received, ours adds 1 to bytes_acked once acked).
# States (include/net/tcp_states.h) after the peer's FIN came in:
# TIME_WAIT 6, CLOSE_WAIT 8, LAST_ACK 9, CLOSING 11; after ours was acked:
# FIN_WAIT2 5, TIME_WAIT 6.
_PEER_FIN_IN = frozenset({6, 8, 9, 11})
_OUR_FIN_ACKED = frozenset({5, 6})
# ...and with our FIN sent but not yet acked, the send queue (TIOCOUTQ, a
# sequence-number difference) counts it: FIN_WAIT1 4, LAST_ACK 9, CLOSING 11.
_OUR_FIN_IN_FLIGHT = frozenset({4, 9, 11})


def kernel_byte_counts(sock: socket.socket | trio.socket.SocketType) -> tuple[int, int] | None:
    """(bytes received from, bytes sent to) the peer of a TCP socket, from the
    kernel's own counters: sent is what the peer acked plus what still waits in
    the send queue (the child may exit before the client has read it all).
    None for other sockets or an older kernel."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_SIZE)
    except OSError:
        return None
    if len(info) < _TCPI_SIZE:
        return None
    state = info[0]
    acked, received = struct.unpack_from("=QQ", info, _TCPI_BYTES_ACKED)
    received -= state in _PEER_FIN_IN
    acked -= state in _OUR_FIN_ACKED
    try:
        unacked = send_queue(sock.fileno())
    except OSError:
        unacked = 0
    unacked -= state in _OUR_FIN_IN_FLIGHT and unacked > 0
    return max(0, received), max(0, acked) + unacked


class InetdJobs:
    """Runs each admitted job as `command`, on the client or on a relayed pair."""

    def __init__(self, config: Config, command: Command, relay: Relay | None,
                 cgroups: JobCgroups | None = None) -> None:
        self.config = config
        self.cgroups = cgroups
        """Where each job gets its own cgroup (None: jobs are sampled)."""
        self._cgroup_warned = -math.inf
        self.runner = CommandRunner(command)
        self.relay = relay
        # auto relays distcc jobs unless the command checks client addresses
        # itself; distccd is woken (inetd_wake) where the kernel allows.
        self._auto_relay = not filters_peers(command)
        self.waker = Waker() if oob_available() else None

    def relays(self, job: Job) -> bool:
        """Whether this job gets a relayed socketpair (see `InetdIo`)."""
        mode = self.config.inetd_io
        if mode is InetdIo.AUTO:
            return job.speaks.relays_inetd and self._auto_relay
        return mode is InetdIo.RELAY

    def prepare(self, stream: trio.SocketStream, job: Job, ticket: Ticket,
                waited: bool) -> ProxyStart | None:
        return None  # a child is started by the job's own task

    def drop(self, start: ProxyStart | None) -> None:
        pass  # nothing is started ahead of the job's task

    async def run(self, stream: trio.SocketStream, job: Job, ticket: Ticket,
                  start: ProxyStart | None) -> None:
        """The job is the child's lifetime; settles its outcome. The caller
        closes the client."""
        job.state = State.RUNNING
        cgroup = self._job_cgroup(job)
        try:
            if self.relays(job):
                await self._run_relayed(stream, job, cgroup)
            else:
                await self._run_direct(stream, job, cgroup)
        finally:
            if cgroup is not None:
                self._done_with(job, cgroup)

    def _job_cgroup(self, job: Job) -> JobCgroup | None:
        """The job's own cgroup, where gatekeeper makes them (else the meter
        samples its process tree); the meter reads its usage from now on."""
        if self.cgroups is None:
            return None
        try:
            cgroup = self.cgroups.create()
        except CgroupError as e:
            # Every job would say the same: once a minute is enough.
            now = trio.current_time()
            if now >= self._cgroup_warned + 60:
                self._cgroup_warned = now
                log.warning("job measured by sampling: %s", e)
            return None
        if job.usage is not None:
            job.usage.cgroup_usage = cgroup.usage_file
        job.cgroup = cgroup
        return cgroup

    def _done_with(self, job: Job, cgroup: JobCgroup) -> None:
        """The job's processes are gone: its cgroup's peak is its footprint,
        exactly (0: the child never got in, and nothing is learned)."""
        job.cgroup = None
        usage = job.usage
        if usage is not None:
            usage.stop()
            peak = cgroup.peak()
            if peak:
                usage.peak, usage.exact = peak, True
        try:
            if not cgroup.remove() and self.cgroups is not None:
                self.cgroups.leftovers.keep(cgroup)  # a zombie in it: removed later
        except CgroupError as e:
            log.warning("%s", e)

    async def _run_direct(self, stream: trio.SocketStream, job: Job,
                          cgroup: JobCgroup | None) -> None:
        def started(pid: int) -> None:
            job.pid, job.child_running = pid, True

        def stopping() -> None:
            job.child_running = False

        try:
            result = await self.runner.run(stream.socket, started=started, cgroup=cgroup,
                                           stopping=stopping)
        finally:
            job.child_running = False
        counts = kernel_byte_counts(stream.socket)
        if counts is not None:
            job.transfer = Transfer(to_backend=counts[0], to_client=counts[1])
        if result.error is not None:
            job.settle(Outcome.COMMAND_ERROR)  # never started: the client falls back
        elif result.returncode != 0:
            job.settle(Outcome.COMMAND_FAILED)
        else:
            job.settle(Outcome.OK)
        if not result.ok:
            job.detail = result.describe()

    async def _run_relayed(self, stream: trio.SocketStream, job: Job,
                           cgroup: JobCgroup | None) -> None:
        """The child gets one end of a socketpair, the job's bytes are relayed
        through the other like a backend connection's. When the child exits,
        gatekeeper hangs up its end (`hang_up`): the relay sees EOF after the
        last byte the child wrote, whatever the child left behind; the job then
        ends as a proxied one does, when the client has its reply and closes.
        If the relay ends first (the client reset, the idle timeout), the child
        sees its client hang up."""
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as e:  # out of fds: this job fails, the server goes on
            job.settle(Verdict(Outcome.COMMAND_ERROR,
                               f"cannot make its socketpair: {e.strerror or e}"))
            return
        wake = job.speaks.relays_inetd and self.waker is not None
        theirs.setblocking(not wake)  # the wake needs it non-blocking (inetd_wake)
        with contextlib.suppress(OSError):
            set_buffer(theirs, socket.SO_SNDBUF, SO_SNDBUFFORCE, CHILD_SNDBUF)
        registered: list[Wake] = []
        backend = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
        transfer = job.transfer = Transfer()
        stalled: list[str] = []
        try:
            async with trio.open_nursery() as nursery:
                async def relay() -> None:
                    async with trio.open_nursery() as watching:
                        if job.request_bytes is not None:  # as for a proxied job
                            watching.start_soon(
                                watch_request, transfer, job.request_bytes,
                                self.config.request_idle_timeout, ours, stalled,
                                watching.cancel_scope)
                        await move_bytes(stream, backend, transfer, relay=self.relay,
                                         speaks=job.speaks,
                                         idle_timeout=self.config.idle_timeout)
                        watching.cancel_scope.cancel()
                    if transfer.failed is not None or transfer.idle or stalled:
                        with contextlib.suppress(OSError):  # the child: its client is gone
                            ours.shutdown(socket.SHUT_RDWR)

                def started(pid: int) -> None:
                    job.pid, job.child_running = pid, True
                    if registered and self.waker is not None:
                        self.waker.started(registered[0], pid)
                    nursery.start_soon(relay)

                def stopping() -> None:
                    job.child_running = False

                with contextlib.ExitStack() as waking:
                    if wake and self.waker is not None:
                        registered.append(waking.enter_context(self.waker.waking(ours)))
                    try:
                        result = await self.runner.run(theirs, blocking=False,
                                                       started=started, cgroup=cgroup,
                                                       stopping=stopping)
                    finally:
                        job.child_running = False
                hang_up(theirs)  # no checkpoint since the exit: no nudge in between
                if result.error is not None:
                    # never started: the client falls back
                    job.settle(Verdict(Outcome.COMMAND_ERROR, result.describe()))
                    return
            if stalled:
                job.settle(Verdict(Outcome.IDLE_TIMEOUT, stalled[0]))
                return
            job.finish_moving(transfer, idle_timeout=self.config.idle_timeout,
                              exited=_exited(result))
        finally:
            theirs.close()
            backend.socket.close()


def _exited(result: Exit) -> Exited:
    return Exited(result.ok, result.describe())
