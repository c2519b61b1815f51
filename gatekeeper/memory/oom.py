"""Counting the OOM killer's kills, to know which jobs it may have cut short.

When the OOM killer ends a compile, nothing on the wire says so plainly: g++
turns its cc1plus's SIGKILL into "Killed signal terminated program cc1plus"
and exit status 1, which distccd reports like any compile error; in inetd
mode distccd exits 0 whatever the compile did. A job that failed while the
kernel's OOM-kill counter moved is therefore taken as cut short: its measured
peak is where it died, not what it needs, and learning it would invite the
same kill next time (see `Server._learn`).

The counter is the box's own, ``oom_kill`` in /proc/vmstat: every OOM kill,
global or inside any memory cgroup, counts (the kernel's __oom_kill_process).
A kill of something else during a failed job is taken as this job's too; the
cost of that mistake is a larger estimate for one compile, the cost of the
other mistake is another kill. Read with pread on a kept-open file (about
8 us here), at most every 100 ms for jobs being admitted and, only if a job
failed, once at its end.
"""

from __future__ import annotations

import logging
import math

from gatekeeper.memory.cgroups import stat_value
from gatekeeper.memory.procfs import KeptOpenFile

log = logging.getLogger("gatekeeper")

VMSTAT = "/proc/vmstat"
BASELINE_AGE = 0.1


class OomKills:
    """The box's OOM-kill counter (``oom_kill`` in /proc/vmstat, Linux 4.13+)."""

    def __init__(self, path: str = VMSTAT) -> None:
        self._file: KeptOpenFile | None = None
        self._last: int | None = None
        self._read_at = -math.inf
        try:
            self._file = KeptOpenFile(path, size=8192)
            if self._read() is None:
                raise OSError(f"no oom_kill line in {path}")
        except (OSError, ValueError) as e:
            log.info("OOM kills not counted: %s", e)
            self.close()

    def _read(self) -> int | None:
        if self._file is None:
            return None
        return stat_value(self._file.read(), b"oom_kill")

    def count(self) -> int | None:
        """Kills so far, or None where the kernel does not count them."""
        try:
            self._last = self._read()
        except (OSError, ValueError):
            self._last = None
        return self._last

    def baseline(self, now: float) -> int | None:
        """The count as of at most `BASELINE_AGE` ago (for a job being admitted):
        under a storm of small jobs one read serves many. A kill in that window
        is then counted against the job too, which only errs on the safe side."""
        if now - self._read_at >= BASELINE_AGE:
            self._read_at = now
            self.count()
        return self._last

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None
