"""The `/status` picture: one typed document, built in one place.

`gatekeeper status`, `gatekeeper weight`, the HAProxy agent, the status page
and sd_notify's STATUS all read this picture (the first two over HTTP, as
JSON), so the health verdict is the same whoever asks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypedDict

from gatekeeper import __version__
from gatekeeper.admission import JobId, Snapshot

# At most this many queue entries in /status: enough for any human, bounded
# whatever --max-queue is.
QUEUE_VIEW_LIMIT = 200


class BackendView(TypedDict):
    ok: bool | None
    """None: not checked yet (or inetd mode: nothing to reach)."""
    error: str | None


class QueueEntry(TypedDict):
    peer: str
    job: str | None
    """Its output file (escaped), once its request head was read."""
    waiting_seconds: float


class ClientView(TypedDict):
    queued: int
    running: int


class RunningJob(TypedDict):
    """One admitted job, for an admin watching a pause happen."""

    peer: str
    job: str | None
    """Its output file (escaped: the client names it)."""
    state: str
    """running, paused, handed-off (the backend is done, the reply is still
    going out) or admitted (its backend being connected)."""
    running_seconds: float
    paused_seconds: float
    pauses: int
    estimate_bytes: int | None
    estimate_from: str | None
    """learned, predicted or default (footprints.Source)."""
    charge_bytes: int | None
    """What it is charged now (its cgroup's usage, or its sampled tree)."""


class PausingView(TypedDict):
    floor_bytes: int
    resume_bytes: int
    max_pause_seconds: float
    paused: int
    pauses_total: int
    cuts_total: int


class HealthView(TypedDict):
    state: str
    percent: int
    reason: str


class StatusPicture(TypedDict, total=False):
    version: str
    stopping: bool
    running: int
    max_jobs: int
    queued: int
    queued_kernel_bytes: int | None
    """Kernel memory the queued connections' receive queues hold."""
    max_queue: int
    hold: str | None
    available_bytes: int | None
    min_free_bytes: int
    reserved_bytes: int
    next_job_bytes: int | None
    job_footprint_bytes: int
    measuring: str
    """How running jobs are measured: their own cgroups, or sampling and why."""
    memory_pressure: float | None
    admitted_total: int
    backfilled_total: int
    """Of those, started beside a job that waited for memory (backfill.py)."""
    jobs: list[RunningJob]
    """The admitted jobs, oldest first (at most QUEUE_VIEW_LIMIT)."""
    pausing: PausingView | None
    """None: pausing is off (--pause-below-mb 0)."""
    estimates: Mapping[str, object] | None
    """How good finished jobs' estimates were, per source (accuracy.Accuracy.view)."""
    completed_total: dict[str, int]
    rejected_total: dict[str, int]
    backend: BackendView
    queue: list[QueueEntry]
    queue_shown: int
    clients: dict[str, ClientView]
    """The busiest fairness keys only (bounded: admission.TOP_KEYS)."""
    health: HealthView
    """Added last, from the rest (observe.agent.health)."""


def picture(s: Snapshot, *, now: float, queue: list[tuple[JobId, float]],
            peers: Mapping[JobId, tuple[str, str | None]], available: int | None, stopping: bool,
            unknown_footprint: int, pressure: float | None, completed: Mapping[str, int],
            rejected: Mapping[str, int], backend: BackendView,
            health: Callable[[StatusPicture], HealthView],
            measuring: str = "process-tree sampling", jobs: list[RunningJob] | None = None,
            pausing: PausingView | None = None,
            estimates: Mapping[str, object] | None = None,
            queued_memory: int | None = None) -> StatusPicture:
    """The whole picture from the gate's snapshot and the counters."""
    entries: list[QueueEntry] = []
    for job, arrived in queue:
        peer, name = peers.get(job, ("?", None))
        entries.append({"peer": peer, "job": name, "waiting_seconds": round(now - arrived, 3)})
    status: StatusPicture = {
        "version": __version__,
        "stopping": stopping,
        "running": s.running,
        "max_jobs": s.max_jobs,
        "queued": s.queued,
        "queued_kernel_bytes": queued_memory,
        "max_queue": s.max_queue,
        "hold": None if s.hold is None else s.hold.value,
        "available_bytes": available,
        "min_free_bytes": s.min_free,
        "reserved_bytes": s.reserved,
        "next_job_bytes": s.head_footprint,
        "job_footprint_bytes": unknown_footprint,
        "measuring": measuring,
        "memory_pressure": pressure,
        "admitted_total": s.admitted_total,
        "backfilled_total": s.backfilled_total,
        "jobs": (jobs or [])[:QUEUE_VIEW_LIMIT],
        "pausing": pausing,
        "estimates": estimates,
        "completed_total": dict(completed),
        "rejected_total": dict(rejected),
        "backend": backend,
        "queue": entries,
        "queue_shown": len(entries),
        "clients": {key: {"queued": q, "running": r} for key, (q, r) in s.keys.items()},
    }
    status["health"] = health(status)
    return status
