"""A picture of one memory-bench build (issue 18), to be trusted at a glance:
the limiting cgroup's usage against its limit, what gatekeeper still reserves
for its running jobs, each job as a bar coloured by its state over time
(waiting, running, paused, handed off), and the OOM killer's strikes.

`Sampler` reads the cgroup (and gatekeeper's `/status`, when there is one)
every `INTERVAL` in a thread while the build runs; `render` turns the samples
into a self-contained SVG (no plotting library: the bench's only extra would be
for one picture). A build without gatekeeper has no states to ask for: its bars
come from the compiler wrapper's log (when each compile ran, and how it ended).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from xml.sax.saxutils import escape

MiB = 2**20
# Ten readings a second: a compile's growth (~100-150 MB/s at its steepest) shows
# as a slope, and a pause of a fraction of a second still shows as a bar.
INTERVAL = 0.1

COLOURS = {"waiting": "#d0d0d0", "admitted": "#9ad19a", "running": "#2e8b57",
           "paused": "#e8590c", "handed-off": "#9ad19a", "killed": "#c00000"}


@dataclasses.dataclass
class Sample:
    t: float
    """Seconds since the sampler started."""
    usage: int
    oom_kills: int | None
    reserved: int | None = None
    jobs: dict[str, str] = dataclasses.field(default_factory=dict)
    """Job name -> its state (gatekeeper runs only)."""


@dataclasses.dataclass
class Bar:
    name: str
    segments: list[tuple[float, float, str]]
    """(from, to, state)"""
    killed_at: float | None = None


def _oom_kills(cgroup: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in (cgroup / "memory.oom_control").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    return None


class Sampler:
    """Reads the cgroup and /status every INTERVAL until `stop`."""

    def __init__(self, cgroup: Path, status_url: str | None = None, *,
                 interval: float = INTERVAL) -> None:
        self.cgroup = cgroup
        self.status_url = status_url
        self.interval = interval
        self.samples: list[Sample] = []
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="timeline", daemon=True)

    def __enter__(self) -> Sampler:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(OSError, ValueError):
                usage = int((self.cgroup / "memory.usage_in_bytes").read_text())
                sample = Sample(time.monotonic() - self.started, usage,
                                _oom_kills(self.cgroup))
                if self.status_url is not None:
                    self._add_status(sample)
                self.samples.append(sample)

    def _add_status(self, sample: Sample) -> None:
        assert self.status_url is not None
        try:
            with urllib.request.urlopen(self.status_url, timeout=0.5) as answer:
                status = json.loads(answer.read())
        except (OSError, ValueError):
            return
        sample.reserved = status.get("reserved_bytes")
        for entry in status.get("queue", []):
            if entry.get("job"):
                sample.jobs[entry["job"]] = "waiting"
        for entry in status.get("jobs", []):
            if entry.get("job"):
                sample.jobs[entry["job"]] = entry.get("state", "running")


def bars_from_samples(samples: Sequence[Sample]) -> list[Bar]:
    """Each job's states over time, from gatekeeper's /status readings."""
    bars: dict[str, Bar] = {}
    for i, sample in enumerate(samples):
        end = samples[i + 1].t if i + 1 < len(samples) else sample.t + INTERVAL
        for name, state in sample.jobs.items():
            bar = bars.setdefault(name, Bar(name, []))
            if bar.segments and bar.segments[-1][2] == state and \
                    abs(bar.segments[-1][1] - sample.t) < 1e-6:
                start, _, _ = bar.segments[-1]
                bar.segments[-1] = (start, end, state)
            else:
                bar.segments.append((sample.t, end, state))
    return list(bars.values())


def bars_from_compiles(compiles: Sequence[tuple[int, int | None, int | None]],
                       started_ns: int) -> list[Bar]:
    """Each compile the wrapper logged, (start ns, end ns, exit status): when it
    ran, and a mark where the kernel killed it (status -9)."""
    out = []
    for n, (start, end, status) in enumerate(sorted(compiles)):
        begin = (start - started_ns) / 1e9
        finish = (end - started_ns) / 1e9 if end is not None else begin
        out.append(Bar(f"compile {n + 1}", [(begin, finish, "running")],
                       killed_at=finish if status == -9 else None))
    return out


def kills_at(samples: Sequence[Sample]) -> list[float]:
    """When the cgroup's OOM-kill count rose (one mark per kill)."""
    out: list[float] = []
    for before, after in itertools.pairwise(samples):
        if before.oom_kills is not None and after.oom_kills is not None:
            out += [after.t] * max(0, after.oom_kills - before.oom_kills)
    return out


def render(title: str, samples: Sequence[Sample], bars: Sequence[Bar], limit: int,
           *, seconds: float | None = None) -> str:
    """The SVG: memory above, one bar per job below, a shared time axis."""
    width, left, right = 960, 64, 16
    mem_top, mem_height = 40, 170
    row = 5 if len(bars) > 40 else 9
    bars_top = mem_top + mem_height + 34
    height = bars_top + max(1, len(bars)) * row + 56
    span = max([seconds or 0.0, *(s.t for s in samples),
                *(seg[1] for b in bars for seg in b.segments), 1.0])
    top_mib = max([limit, *(s.usage + (s.reserved or 0) for s in samples)]) * 1.08 / MiB

    def x(t: float) -> float:
        return left + (width - left - right) * t / span

    def y(byte_count: float) -> float:
        return mem_top + mem_height * (1 - byte_count / MiB / top_mib)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="20" font-size="14" font-weight="bold">{escape(title)}</text>']
    # time axis
    step = 10 if span <= 200 else 30
    for t in range(0, int(span) + 1, step):
        out.append(f'<line x1="{x(t):.1f}" y1="{mem_top}" x2="{x(t):.1f}" '
                   f'y2="{height - 40}" stroke="#eee"/>')
        out.append(f'<text x="{x(t):.1f}" y="{height - 26}" text-anchor="middle">{t}s</text>')
    # memory panel
    for mib in range(0, int(top_mib) + 1, 100 if top_mib > 300 else 50):
        out.append(f'<text x="{left - 6}" y="{y(mib * MiB) + 4:.1f}" '
                   f'text-anchor="end">{mib}</text>')
    out.append(f'<text x="8" y="{mem_top + mem_height / 2:.0f}" '
               f'transform="rotate(-90 12 {mem_top + mem_height / 2:.0f})">MiB</text>')
    out.append(f'<line x1="{left}" y1="{y(limit):.1f}" x2="{width - right}" y2="{y(limit):.1f}" '
               f'stroke="#c00000" stroke-dasharray="6 4"/>')
    out.append(f'<text x="{width - right}" y="{y(limit) - 4:.1f}" text-anchor="end" '
               f'fill="#c00000">limit {limit / MiB:.0f} MiB</text>')
    if samples:
        usage = " ".join(f"{x(s.t):.1f},{y(s.usage):.1f}" for s in samples)
        out.append(f'<polyline points="{usage}" fill="none" stroke="#1f5fbf" '
                   f'stroke-width="1.5"/>')
        if any(s.reserved is not None for s in samples):
            committed = " ".join(f"{x(s.t):.1f},{y(s.usage + (s.reserved or 0)):.1f}"
                                 for s in samples)
            out.append(f'<polyline points="{committed}" fill="none" stroke="#e8a200" '
                       f'stroke-width="1" stroke-dasharray="3 2"/>')
    # job bars
    for i, bar in enumerate(sorted(bars, key=lambda b: b.segments[0][0] if b.segments else 0)):
        top = bars_top + i * row
        for begin, end, state in bar.segments:
            wide = max(0.8, x(end) - x(begin))
            out.append(f'<rect x="{x(begin):.1f}" y="{top}" width="{wide:.1f}" '
                       f'height="{row - 1}" fill="{COLOURS.get(state, "#888")}">'
                       f'<title>{escape(bar.name)}: {escape(state)} {begin:.1f}-{end:.1f}s'
                       f'</title></rect>')
        if bar.killed_at is not None:
            out.append(f'<text x="{x(bar.killed_at):.1f}" y="{top + row - 1}" fill="#c00000" '
                       f'font-weight="bold" text-anchor="middle">x</text>')
    out.append(f'<text x="{left - 6}" y="{bars_top + 8}" text-anchor="end">jobs</text>')
    # OOM kills across both panels
    for t_kill in kills_at(samples):
        out.append(f'<line x1="{x(t_kill):.1f}" y1="{mem_top}" x2="{x(t_kill):.1f}" '
                   f'y2="{height - 40}" stroke="#c00000" stroke-width="1.5"/>')
        out.append(f'<text x="{x(t_kill) + 3:.1f}" y="{mem_top + 12}" fill="#c00000">'
                   f'OOM kill</text>')
    # legend
    legend = [("#1f5fbf", "cgroup usage"), ("#e8a200", "usage + gatekeeper's reservations"),
              (COLOURS["waiting"], "waiting"), (COLOURS["running"], "running"),
              (COLOURS["paused"], "paused"), (COLOURS["handed-off"], "reply going out"),
              ("#c00000", "OOM kill")]
    lx: float = left
    for colour, text in legend:
        out.append(f'<rect x="{lx}" y="{height - 14}" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{lx + 14}" y="{height - 5}">{escape(text)}</text>')
        lx += 22 + 6.2 * len(text)
    out.append("</svg>")
    return "\n".join(out)


def write(path: Path, title: str, samples: Sequence[Sample], bars: Sequence[Bar],
          limit: int, *, seconds: float | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(title, samples, bars, limit, seconds=seconds))
