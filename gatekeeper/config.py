"""The validated run-time configuration (what the command line turns into)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .addresses import Address
from .allow import AllowList

DISTCC_PORT = 3632

# The distcc client waits at most DISTCC_IO_TIMEOUT (default 300 s) for each
# read, and distccd sends nothing until the compile ends, so queue time plus
# compile time must stay under 300 s. 240 s leaves a minute for the compile and
# makes a timed-out client fail cleanly and fall back to a local build.
DEFAULT_QUEUE_TIMEOUT = 240.0

# distccd's own listen backlog is 1024; holding as many is nothing for us
# (one socket and one small task each) and covers a few make -j64 clients.
DEFAULT_MAX_QUEUE = 1024

# 512 MiB: enough for a typical C++ compile to start and grow for a while
# without swapping, small enough not to idle a modest build box. Raise it to the
# peak of your heaviest translation unit; a value above the machine's memory
# holds every job (a way to drain a box).
DEFAULT_MIN_FREE_MB = 512.0

# A backend on loopback answers a connect at once; a remote one that has not
# answered within this long is down, and the client is better off falling back
# to a local compile than waiting (its own connect timeout is only 4 s, but by
# now it has long been connected to us).
DEFAULT_CONNECT_TIMEOUT = 10.0


# What a job never seen before is assumed to need at its peak, until enough
# jobs have been measured to know the farm's own distribution. 256 MiB is a
# heavy-ish C++ translation unit: a cold start errs towards admitting fewer
# jobs at once, and learning corrects it within the first few jobs.
DEFAULT_JOB_MEM_MB = 256.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    listen: tuple[Address, ...]
    backend: Address
    max_jobs: int
    min_free_bytes: int
    queue_timeout: float
    max_queue: int
    allow: AllowList
    keep_half_closed: bool = False
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    job_mem_bytes: int = int(DEFAULT_JOB_MEM_MB * 2**20)
    """Seed estimate of an unknown job's peak memory."""
    state_dir: Path | None = None
    """Where learned footprints are kept across restarts (None: not kept)."""
    identify: bool = True
    """Peek at distcc request heads to key learned footprints by compile."""
    cgroup: str | None = None
    """Watch this cgroup's memory (None: gatekeeper's own cgroups)."""
    max_memory_pressure: float | None = None
    """Hold jobs while PSI memory `some avg10` exceeds this percentage."""
    log_level: str = "info"
