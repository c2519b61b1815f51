"""Where "available memory" comes from.

The admission policy only sees a number of bytes; this module decides what the
number means. Sources are read on the admission path, so they must be cheap:
the system source keeps /proc/meminfo open and re-reads it with one pread
(a few microseconds) instead of reopening it or going through psutil
(about 50 us) each time.
"""

from __future__ import annotations

import os
from typing import Protocol

import psutil


class MemorySource(Protocol):
    """Anything that can say how many bytes a new job could use right now."""

    def available(self) -> int: ...


class SystemMemory:
    """Host-wide MemAvailable: the kernel's own estimate of memory that can be
    given to new work without swapping (free + reclaimable page cache).

    Blind to cgroup limits (psutil issue 2100); cgroup-aware sources are a
    separate concern.
    """

    def __init__(self, path: str = "/proc/meminfo") -> None:
        try:
            self._fd: int | None = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._fd = None  # not Linux: psutil knows the local equivalent

    def available(self) -> int:
        if self._fd is None:
            return int(psutil.virtual_memory().available)
        data = os.pread(self._fd, 8192, 0)
        return parse_meminfo_available(data)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def parse_meminfo_available(data: bytes) -> int:
    """Bytes of MemAvailable in a /proc/meminfo text (values there are in kB)."""
    start = data.find(b"MemAvailable:")
    if start < 0:
        raise ValueError("no MemAvailable line in meminfo")
    end = data.find(b"\n", start)
    fields = data[start:end if end >= 0 else None].split()
    return int(fields[1]) * 1024


class FixedMemory:
    """A source that reports whatever it was last told: for tests and for
    running with the memory rule effectively off."""

    def __init__(self, available: int) -> None:
        self.value = available

    def available(self) -> int:
        return self.value
