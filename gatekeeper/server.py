"""The composition root: builds the services, runs them in one nursery, stops.

Nesting: root nursery (the gate's timer, the client watch, the meter, the
relay, the inetd waker, the side ports, footprint saving) > handler nursery
(accept loops and connection tasks). Stopping cancels the accept loops,
closes queued clients, and gives running jobs `drain_timeout` seconds before
cancelling them; then footprints are saved and the root is cancelled.

What runs where: a connection's life is `connection.Connections.handle`, the
job's part of it `job.ProxyJobs` (a backend per job) or `inetd.job.InetdJobs`
(a command per job); accepting and the fd budget are `net.listen`'s.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import resource
import secrets
from collections.abc import Callable, Iterable

import trio

from gatekeeper.admission import Admission, Limits
from gatekeeper.config import Config
from gatekeeper.connection import Connections
from gatekeeper.farm.ledger import Ledger
from gatekeeper.farm.ledger import encode as encode_answer
from gatekeeper.farm.peers import Peers
from gatekeeper.footprints import MIN_TYPICAL_SAMPLES, TYPICAL_PERCENTILE, FootprintBook
from gatekeeper.gate import Gate
from gatekeeper.inetd.command import Command
from gatekeeper.inetd.job import InetdJobs
from gatekeeper.job import Job, ProxyJobs, State
from gatekeeper.memory.adopt import Adopter
from gatekeeper.memory.job_cgroup import CgroupError, JobCgroups
from gatekeeper.memory.meter import Meter
from gatekeeper.memory.oom import OomKills
from gatekeeper.memory.sources import MemorySource
from gatekeeper.net.addresses import TcpAddress, listener_address
from gatekeeper.net.backend_check import warn_if_absent
from gatekeeper.net.copy import ZERO_COPY_AVAILABLE
from gatekeeper.net.listen import Acceptor, FdPlan, open_all
from gatekeeper.net.liveness import ClientWatch
from gatekeeper.net.relay import Relay
from gatekeeper.net.sideport import SidePort
from gatekeeper.observe.agent import Agent, BackendCheck
from gatekeeper.observe.escape import printable
from gatekeeper.observe.metrics import Observatory
from gatekeeper.observe.page import page
from gatekeeper.observe.status import PausingView, RunningJob
from gatekeeper.observe.web import StatusWeb
from gatekeeper.pauses import Pauses
from gatekeeper.pausing import Pauser

log = logging.getLogger("gatekeeper")

# After SIGTERM running jobs get this long to finish. A compile that is half
# done is worth finishing; systemd's own stop timeout (90 s) is above this.
DEFAULT_DRAIN_TIMEOUT = 60.0

# Learned footprints are written out this often (when something new was
# learned) and at a clean stop, so a crash loses at most a minute of learning.
SAVE_INTERVAL = 60.0


def limits_from(config: Config) -> Limits:
    return Limits(
        max_jobs=config.max_jobs,
        min_free=config.min_free_bytes,
        max_queue=config.max_queue,
        queue_timeout=config.queue_timeout,
        max_per_key=config.max_per_client,
        max_queued_per_client=config.max_queued_per_client,
        backfill=config.backfill,
    )


def job_cgroups(config: Config) -> JobCgroups | None:
    """Where inetd jobs get cgroups of their own; said once, either way."""
    if not config.job_cgroups:
        return None
    try:
        cgroups = JobCgroups.find()
    except CgroupError as e:
        log.warning("no per-job cgroups (%s): measuring each job's process tree by "
                    "sampling, which misses jobs shorter than 0.6 s", e)
        return None
    log.info("each job runs in a cgroup of its own under %s", cgroups.describe())
    return cgroups


def adoptable(config: Config) -> bool:
    """Whether proxy-mode jobs' backend processes may be given job cgroups: a
    backend on this box (loopback), and root (moving distccd's processes
    between its cgroups, reading their /proc/PID/fd)."""
    backend = config.backend
    if not config.job_cgroups or not isinstance(backend, TcpAddress) or os.geteuid() != 0:
        return False
    if backend.host == "localhost":
        return True
    try:
        return ipaddress.ip_address((backend.host or "").split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def measuring(config: Config, inetd: InetdJobs | None, adopter: Adopter | None) -> str:
    """How jobs are measured, for /status."""
    if not config.job_cgroups:
        return "process-tree sampling (--job-cgroups off)"
    if inetd is not None:
        if inetd.cgroups is None:
            return "process-tree sampling (no per-job cgroups)"
        return f"per-job cgroups: {inetd.cgroups.describe()}"
    if adopter is None:
        return "process-tree sampling (no per-job cgroups: needs root and a loopback backend)"
    if adopter.failure is not None:
        return f"process-tree sampling (no per-job cgroups: {adopter.failure})"
    return f"per-job cgroups below the backend's ({adopter.adopted} jobs so far)"


def running_jobs(live: Iterable[Job]) -> list[RunningJob]:
    """The admitted jobs for /status, oldest first."""
    now = trio.current_time()
    out: list[RunningJob] = []
    for job in sorted((j for j in live if j.admitted is not None and j.state is not State.DONE),
                      key=lambda j: j.admitted or 0.0):
        assert job.admitted is not None
        usage = job.usage
        out.append({
            "peer": job.peer,
            "job": printable(job.name) if job.name else None,
            "state": "paused" if job.paused_since is not None else job.state.value,
            "running_seconds": round(now - job.admitted, 3),
            "paused_seconds": round(job.paused_for(now), 3),
            "pauses": job.pauses,
            "estimate_bytes": job.estimate,
            "estimate_from": job.estimate_from.value if job.estimate_from is not None else None,
            "charge_bytes": usage.current if usage is not None and not usage.stopped else None,
        })
    return out


def pausing_view(pauses: Pauses | None) -> PausingView | None:
    if pauses is None:
        return None
    pauser = pauses.pauser
    return {"floor_bytes": pauser.floor, "resume_bytes": pauser.resume,
            "max_pause_seconds": pauser.max_pause, "paused": pauses.paused,
            "pauses_total": pauses.pauses_total, "cuts_total": pauses.cuts_total}


async def _closing_at_end(close: Callable[[], None]) -> None:
    """Owns something the handlers use until the server's end (its root nursery
    is cancelled only after every handler is done)."""
    try:
        await trio.sleep_forever()
    finally:
        close()


class Server:
    def __init__(self, config: Config, memory: MemorySource, *,
                 drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
                 command: Command | None = None) -> None:
        self.config = config
        self.drain_timeout = drain_timeout
        self.gate = Gate(Admission(limits_from(config)), memory,
                         max_pressure=config.max_memory_pressure)
        self.watch = ClientWatch(keep_half_closed=config.keep_half_closed)
        # With pausing, and a way to freeze every job, a wrong guess costs a
        # pause, not a kill: unknown jobs are estimated as typical ones.
        self.optimistic = config.pause_below_bytes > 0 and (
            command is not None or (config.job_cgroups and adoptable(config)))
        self.book = (FootprintBook(seed=config.job_mem_bytes, percentile=TYPICAL_PERCENTILE,
                                   min_samples=MIN_TYPICAL_SAMPLES) if self.optimistic
                     else FootprintBook(seed=config.job_mem_bytes))
        if config.state_dir is not None:
            # A peak above the machine's memory is not a measurement.
            self.book.load(config.state_dir, ceiling=os.sysconf("SC_PHYS_PAGES")
                           * os.sysconf("SC_PAGE_SIZE"))
        self.meter = Meter()
        self.oom = OomKills()
        # The zero-copy data path (Linux): one epoll set for every running job.
        self.relay = Relay() if config.zero_copy and ZERO_COPY_AVAILABLE else None
        self.inetd = (InetdJobs(config, command, self.relay, job_cgroups(config))
                      if command is not None else None)
        self.adopter = Adopter() if command is None and adoptable(config) else None
        if command is None and config.job_cgroups and self.adopter is None:
            log.info("proxy-mode jobs measured by sampling: per-job cgroups need root and "
                     "a backend on loopback")
        self.proxy = ProxyJobs(config, self.gate, self.relay, self.watch.is_gone,
                               lambda job: self.connections.mark_admitted(job),
                               adopter=self.adopter)
        self.runner = self.inetd.runner if self.inetd is not None else None
        self.waker = self.inetd.waker if self.inetd is not None else None
        self._stop = trio.Event()
        self.observatory = Observatory(
            self.gate, memory, unknown_footprint=self.book.unknown_estimate,
            queue_peers=lambda: self.connections.queue_peers(),
            stopping=lambda: self.stopping,
            backend=BackendCheck(None if command is not None else config.backend))
        self.observatory.measuring = lambda: measuring(config, self.inetd, self.adopter)
        self.observatory.running_jobs = lambda: running_jobs(self.connections.live.values())
        self.observatory.pausing = lambda: pausing_view(self.pauses)
        self.observatory.estimates = lambda: self.connections.estimates
        self.observatory.queued_memory = lambda: self.connections.queued_memory()
        self.pauses = (Pauses(Pauser(floor=config.pause_below_bytes,
                                     resume=2 * config.pause_below_bytes,
                                     max_pause=config.max_pause), self.gate,
                              worst=self.book.worst_unknown)
                       if config.pause_below_bytes > 0 else None)
        # What this box measures, for its peers (farm/ledger.py); an epoch per
        # start tells them a restart from a ledger that moved on.
        self.ledger = Ledger(secrets.token_hex(8))
        self.connections = Connections(
            config, self.gate, self.inetd or self.proxy, watch=self.watch, meter=self.meter,
            book=self.book, oom=self.oom, on_end=self.observatory.connection_ended,
            pauses=self.pauses, ledger=self.ledger)
        self.observatory.footprints = lambda since: encode_answer(self.ledger.since(since))
        self.peers = (Peers(config.peers, self.book, ceiling=os.sysconf("SC_PHYS_PAGES")
                            * os.sysconf("SC_PAGE_SIZE"), interval=config.peer_interval,
                            on_learned=self.connections.reestimate_queued,
                            own_epoch=self.ledger.epoch)
                      if config.peers else None)
        if self.peers is not None and config.state_dir is not None:
            # Read the peers' ledgers on from where the saved book had them.
            self.peers.load(config.state_dir)
        if self.peers is not None:
            self.observatory.farm = self.peers.view
        plan = FdPlan.of(config, inetd=command is not None)
        self.acceptor = Acceptor(plan.connection_budget(
            config, resource.getrlimit(resource.RLIMIT_NOFILE)[0]), self.connections,
            queued_window=config.queued_window)
        self.addresses: list[str] = []
        self.metrics_addresses: list[str] = []
        self.agent_addresses: list[str] = []
        self._side: tuple[list[trio.SocketListener], list[trio.SocketListener]] | None = None

    def stop(self) -> None:
        """Begin a graceful stop (idempotent)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self, listeners: list[trio.SocketListener], *,
                  task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        self.addresses = [listener_address(lst) for lst in listeners]
        web, agent = self._side or await self.open_side_listeners()
        async with trio.open_nursery() as root:
            root.start_soon(self.gate.run)
            if web:
                pages = StatusWeb(self.observatory, page=page,
                                  host_names=self.config.metrics_hosts)
                web_port = SidePort("metrics", pages.handle, self.config.metrics_allow)
                for listener in web:
                    root.start_soon(web_port.serve, listener)
            if agent:
                agent_port = SidePort("agent", Agent(self.observatory).handle,
                                      self.config.agent_allow or self.config.allow)
                for listener in agent:
                    root.start_soon(agent_port.serve, listener)
            root.start_soon(self.watch.run)
            root.start_soon(self.meter.run)
            if self.peers is not None:
                root.start_soon(self.peers.run)
            if self.pauses is not None:
                root.start_soon(self.pauses.run)
            if self.adopter is not None:
                root.start_soon(_closing_at_end, self.adopter.close)
            if self.inetd is not None and self.inetd.cgroups is not None:
                root.start_soon(_closing_at_end, self.inetd.cgroups.leftovers.retry)
            if self.relay is not None:
                root.start_soon(self.relay.run)
            if self.waker is not None:
                root.start_soon(self.waker.run)
            if self.config.state_dir is not None:
                root.start_soon(self._save_periodically)
            if self.inetd is None:
                # Said once, at start: jobs still fall back while it is absent.
                root.start_soon(warn_if_absent, self.config.backend)
            async with trio.open_nursery() as handlers:
                accept_scope = trio.CancelScope()

                async def accept() -> None:
                    with accept_scope:
                        async with trio.open_nursery() as loops:
                            for listener in listeners:
                                loops.start_soon(self.acceptor.serve, listener, handlers)

                handlers.start_soon(accept)
                for address in self.addresses:
                    log.info("listening on %s", address)
                task_status.started(self.addresses)
                await self._stop.wait()
                accept_scope.cancel()
                closed = self.gate.drain()
                running = self.gate.snapshot().running
                log.info("stopping: closed %d queued, waiting up to %.0fs for %d running",
                         closed, self.drain_timeout, running)
                handlers.cancel_scope.deadline = trio.current_time() + self.drain_timeout
            if handlers.cancel_scope.cancelled_caught:
                log.warning("drain timeout: cut off the jobs still running")
            self.save_footprints()
            self.connections.oom.close()
            root.cancel_scope.cancel()

    async def open_side_listeners(
            self) -> tuple[list[trio.SocketListener], list[trio.SocketListener]]:
        """The --metrics and --agent listeners. Call before `run` (outside any
        nursery) so a port in use is a plain startup OSError; `run` opens them
        itself otherwise."""
        web = await open_all(() if self.config.metrics is None else (self.config.metrics,),
                             flag="--metrics")
        try:
            agent = await open_all(() if self.config.agent is None else (self.config.agent,),
                                   flag="--agent")
        except BaseException:
            for listener in web:
                await trio.aclose_forcefully(listener)
            raise
        self.metrics_addresses = [listener_address(lst) for lst in web]
        self.agent_addresses = [listener_address(lst) for lst in agent]
        for address in self.metrics_addresses:
            log.info("metrics and status on http://%s/", address)
        for address in self.agent_addresses:
            log.info("HAProxy agent-check on %s", address)
        self._side = web, agent
        return self._side

    def save_footprints(self) -> None:
        if self.config.state_dir is None:
            return
        try:
            if self.book.dirty:
                self.book.save(self.config.state_dir)
            # After the book: a crash between the two leaves cursors behind the
            # book (a few entries learned twice), never ahead of it (lost).
            if self.peers is not None and self.peers.dirty:
                self.peers.save(self.config.state_dir)
        except OSError as e:
            log.warning("could not save learned footprints in %s: %s",
                        self.config.state_dir, e)

    async def _save_periodically(self) -> None:
        while True:
            await trio.sleep(SAVE_INTERVAL)
            self.save_footprints()
