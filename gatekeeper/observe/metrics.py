"""What the server is doing, for Prometheus, `/status` and the load balancers.

Two kinds of numbers, kept apart so the data path never pays for either:

- the *picture* (running, queued, limits, memory, the queue itself) is read
  from the gate's `Snapshot` and the memory source at scrape time by a custom
  collector: nothing is updated between scrapes;
- the *history* (jobs ended by outcome, queue waits, run times, bytes) is
  counted once per connection end, from the record the end-of-connection log
  line is made of. Never per chunk, never per byte.

Counters start at zero for every known reason, so a rate() works from the
first scrape. Metric names follow Prometheus conventions (`_total`,
`_seconds`, `_bytes`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

import trio
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from gatekeeper.accuracy import BUCKETS, Accuracy
from gatekeeper.admission import JobId, Snapshot
from gatekeeper.distcc.reply import CompileStatus
from gatekeeper.gate import Gate
from gatekeeper.memory.sources import MemorySource
from gatekeeper.observe.agent import BackendCheck, health_view
from gatekeeper.observe.status import (
    QUEUE_VIEW_LIMIT,
    PausingView,
    RunningJob,
    StatusPicture,
    picture,
)
from gatekeeper.outcome import COMPLETED, Outcome
from gatekeeper.outcome import REJECT_REASONS as REJECTED_ORDER

# Where `gatekeeper status` and `weight` look when not told: loopback (the
# status page names clients), the port after distccd's 3632 and its --stats 3633.
DEFAULT_METRICS = "127.0.0.1:3634"

# Connection ends, in the two families of `outcome` (that module says which is
# which); the labels are the outcomes' names.
REJECT_REASONS = tuple(o.value for o in REJECTED_ORDER)
COMPLETED_OUTCOMES = tuple(o.value for o in COMPLETED)
# How distccd said a compile went (proxy mode; see distcc_reply).
COMPILE_RESULTS = ("ok", "failed", "killed")

# Queue waits: from "admitted at once" to the 240 s queue timeout.
WAIT_BUCKETS = (0.001, 0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 240, float("inf"))
# Job run times: compiles from a fraction of a second to many minutes.
RUN_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, float("inf"))

class Ended(Protocol):
    """What a connection end tells the metrics (job.Job)."""

    outcome: Outcome | None
    accepted: float
    admitted: float | None
    ended: float | None
    compile: CompileStatus | None
    oom_seen: bool

    @property
    def bytes_in(self) -> int: ...

    @property
    def bytes_out(self) -> int: ...


class Observatory:
    """Counts connection ends and renders the live picture."""

    def __init__(self, gate: Gate, memory: MemorySource, *,
                 unknown_footprint: Callable[[], int],
                 queue_peers: Callable[[], Mapping[JobId, tuple[str, str | None]]],
                 stopping: Callable[[], bool],
                 backend: BackendCheck) -> None:
        self.gate = gate
        self.memory = memory
        self.unknown_footprint = unknown_footprint
        self.queue_peers = queue_peers
        self.stopping = stopping
        self.backend = backend
        self.measuring: Callable[[], str] = lambda: "process-tree sampling"
        """How jobs are measured, for /status (set by the server at start)."""
        self.running_jobs: Callable[[], list[RunningJob]] = list
        """The admitted jobs' states (set by the server)."""
        self.pausing: Callable[[], PausingView | None] = lambda: None
        """Pausing's settings and counts (set by the server; None: off)."""
        self.farm: Callable[[], list[dict[str, object]]] = list
        """The peers as this box last saw them (set by the server)."""
        self.footprints: Callable[[int], bytes] | None = None
        """This box's ledger after a generation, encoded (set by the server)."""
        self.queued_memory: Callable[[], int | None] = lambda: None
        """Kernel memory held by queued connections' receive queues (set by
        the server)."""
        self.estimates: Callable[[], Accuracy | None] = lambda: None
        """How good finished jobs' estimates were (set by the server)."""
        self.registry = CollectorRegistry()
        self.completed: dict[str, int] = dict.fromkeys(COMPLETED_OUTCOMES, 0)
        self.rejected: dict[str, int] = dict.fromkeys(REJECT_REASONS, 0)
        r = self.registry
        self._completed = Counter("gatekeeper_completed", "Jobs that ran, by how they ended",
                                  ["outcome"], registry=r)
        self._rejected = Counter("gatekeeper_rejected",
                                 "Connections closed without running a job, by reason",
                                 ["reason"], registry=r)
        for outcome in COMPLETED_OUTCOMES:
            self._completed.labels(outcome)
        for reason in REJECT_REASONS:
            self._rejected.labels(reason)
        self._wait = Histogram("gatekeeper_queue_wait_seconds",
                               "Time admitted jobs waited in the queue", buckets=WAIT_BUCKETS,
                               registry=r)
        self._run = Histogram("gatekeeper_job_run_seconds", "Time jobs ran once admitted",
                              buckets=RUN_BUCKETS, registry=r)
        self._compiles = Counter("gatekeeper_compiles",
                                 "distcc compiles by what distccd reported: ok, failed (an exit "
                                 "status), killed (by a signal)", ["result"], registry=r)
        for result in COMPILE_RESULTS:
            self._compiles.labels(result)
        self._oom_struck = Counter("gatekeeper_oom_struck_jobs",
                                   "Jobs that failed while the kernel's OOM killer struck",
                                   registry=r)
        self._in = Counter("gatekeeper_client_to_backend_bytes",
                           "Bytes passed from clients to the backend", registry=r)
        self._out = Counter("gatekeeper_backend_to_client_bytes",
                            "Bytes passed from the backend to clients", registry=r)
        r.register(_Picture(self))
        ProcessCollector(namespace="gatekeeper", registry=r)

    # -- per connection end -------------------------------------------------

    def connection_ended(self, record: Ended) -> None:
        ran = record.outcome is not None and record.outcome.ran
        outcome = "?" if record.outcome is None else record.outcome.value
        if record.admitted is None or not ran:
            self.rejected[outcome] = self.rejected.get(outcome, 0) + 1
            self._rejected.labels(outcome).inc()
        else:
            self.completed[outcome] = self.completed.get(outcome, 0) + 1
            self._completed.labels(outcome).inc()
        if record.admitted is not None:
            self._wait.observe(max(0.0, record.admitted - record.accepted))
            if ran and record.ended is not None:
                self._run.observe(max(0.0, record.ended - record.admitted))
        status = record.compile
        if status is not None:
            result = "ok" if status.ok else "killed" if status.signal is not None else "failed"
            self._compiles.labels(result).inc()
        if record.oom_seen:
            self._oom_struck.inc()
        if record.bytes_in:
            self._in.inc(record.bytes_in)
        if record.bytes_out:
            self._out.inc(record.bytes_out)

    # -- the picture --------------------------------------------------------

    def status(self, *, queue_memory: bool = True) -> StatusPicture:
        """The `/status` document (observe.status); `queue_memory=False` leaves
        out the queue's kernel memory (a few syscalls per queued client)."""
        s = self.gate.snapshot()
        return picture(
            s, now=trio.current_time(),
            queue=self.gate.admission.queue_view(QUEUE_VIEW_LIMIT), peers=self.queue_peers(),
            available=self.gate.available_now(), stopping=self.stopping(),
            unknown_footprint=self.unknown_footprint(), pressure=self.gate.pressure,
            completed=self.completed, rejected=self.rejected, backend=self.backend.view(),
            health=health_view, measuring=self.measuring(), jobs=self.running_jobs(),
            pausing=self.pausing(), estimates=_view(self.estimates()),
            queued_memory=self.queued_memory() if queue_memory else None)

    def status_json(self) -> bytes:
        return json.dumps(self.status(), separators=(",", ":")).encode()

    def farm_json(self) -> bytes:
        """This box's /status and each peer's last one (`/farm`)."""
        return json.dumps({"self": self.status(), "peers": self.farm()},
                          separators=(",", ":")).encode()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Picture(Collector):
    """Gauges read from the gate at scrape time."""

    def __init__(self, observatory: Observatory) -> None:
        self.o = observatory

    @staticmethod
    def _per_client(s: Snapshot) -> list[Metric]:
        """Queued and running per fairness key, for the busiest keys only: label
        cardinality stays bounded however many clients a farm has."""
        queued = GaugeMetricFamily("gatekeeper_client_queued",
                                   "Jobs waiting per client (busiest clients only)",
                                   labels=["client"])
        running = GaugeMetricFamily("gatekeeper_client_running",
                                    "Jobs running per client (busiest clients only)",
                                    labels=["client"])
        for key, (q, r) in s.keys.items():
            queued.add_metric([key], q)
            running.add_metric([key], r)
        return [queued, running]

    def collect(self) -> Iterable[Metric]:
        o = self.o
        s = o.gate.snapshot()

        def gauge(name: str, doc: str, value: float | None) -> Metric | None:
            if value is None:
                return None
            return GaugeMetricFamily(name, doc, value=value)

        available = o.gate.available_now()
        hold = GaugeMetricFamily("gatekeeper_hold",
                                 "1 for why the head of the queue waits (0 for the others)",
                                 labels=["reason"])
        for reason in ("slots", "per-client", "memory", "pressure", "paused", "draining"):
            hold.add_metric([reason], 1.0 if s.hold is not None and s.hold.value == reason
                            else 0.0)
        metrics: list[Metric | None] = [
            gauge("gatekeeper_running", "Jobs running now", s.running),
            gauge("gatekeeper_queued", "Jobs waiting in the queue", s.queued),
            gauge("gatekeeper_queued_kernel_memory_bytes",
                  "Kernel memory the queued connections' receive queues hold (what of "
                  "their requests arrived before admission)", o.queued_memory()),
            gauge("gatekeeper_max_jobs", "--max-jobs", s.max_jobs),
            gauge("gatekeeper_max_queue", "--max-queue", s.max_queue),
            gauge("gatekeeper_min_free_memory_bytes", "--min-free-mb in bytes", s.min_free),
            gauge("gatekeeper_available_memory_bytes",
                  "Available memory (the smallest of the host and watched cgroups)", available),
            gauge("gatekeeper_reserved_memory_bytes",
                  "Growth still expected from running jobs", s.reserved),
            gauge("gatekeeper_next_job_footprint_bytes",
                  "Expected peak of the job at the head of the queue", s.head_footprint),
            gauge("gatekeeper_job_footprint_bytes",
                  "Expected peak of a job never seen before (learned)", o.unknown_footprint()),
            gauge("gatekeeper_memory_pressure_percent",
                  "Memory pressure (PSI some avg10) at the last reading", o.gate.pressure),
            gauge("gatekeeper_oldest_queued_seconds", "How long the head of the queue waited",
                  None if s.oldest_arrival is None
                  else max(0.0, trio.current_time() - s.oldest_arrival)),
            gauge("gatekeeper_stopping", "1 while draining for a stop",
                  1.0 if o.stopping() else 0.0),
            hold,
            CounterMetricFamily("gatekeeper_admitted", "Jobs the policy admitted",
                                value=s.admitted_total),
            CounterMetricFamily("gatekeeper_backfilled",
                                "Jobs admitted ahead of a head that waited for memory, "
                                "without delaying it (backfilling)", value=s.backfilled_total),
            *self._per_client(s),
            *self._pausing(),
            *self._estimates(),
        ]
        return [m for m in metrics if m is not None]

    def _estimates(self) -> list[Metric]:
        accuracy = self.o.estimates()
        if accuracy is None:
            return []
        family = HistogramMetricFamily(
            "gatekeeper_estimate_ratio",
            "Finished jobs' estimate / measured peak, by where the estimate came from "
            "(learned: the job's own peaks; predicted: its request's size; default: the "
            "recent peaks' distribution)", labels=["source"])
        for source, tally in accuracy.tallies.items():
            buckets = [(str(bound), float(count))
                       for bound, count in zip(BUCKETS, tally.buckets, strict=True)]
            buckets.append(("+Inf", float(tally.jobs)))
            family.add_metric([source.value], buckets, sum_value=tally.ratio_sum)
        return [family]

    def _pausing(self) -> list[Metric]:
        view = self.o.pausing()
        if view is None:
            return []
        return [
            GaugeMetricFamily("gatekeeper_paused_jobs",
                              "Running jobs frozen now because memory ran out",
                              value=view["paused"]),
            CounterMetricFamily("gatekeeper_pauses", "Times a running job was frozen",
                                value=view["pauses_total"]),
            CounterMetricFamily("gatekeeper_pause_cuts",
                                "Paused jobs cut at --max-pause with still no room "
                                "(their clients compile locally)", value=view["cuts_total"]),
        ]


def _view(accuracy: Accuracy | None) -> Mapping[str, object] | None:
    return accuracy.view() if accuracy is not None else None
