"""The validated run-time configuration (what the command line turns into)."""

from __future__ import annotations

from dataclasses import dataclass

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
    log_level: str = "info"
