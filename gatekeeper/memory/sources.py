"""Where "available memory" comes from.

The admission policy only sees a number of bytes; this module decides what the
number means. Sources are read on the admission path, so they must be cheap:
the system source keeps /proc/meminfo open and re-reads it with one pread
(a few microseconds) instead of reopening it or going through psutil
(about 50 us) each time.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

import psutil

from gatekeeper.memory.cgroups import (
    CgroupChain,
    CgroupDir,
    CgroupMount,
    CgroupSample,
    own_cgroups,
    read_mounts,
    resolve_cgroup,
)
from gatekeeper.memory.pressure import SYSTEM_MEMORY_PRESSURE, PressureReader
from gatekeeper.memory.procfs import KeptOpenFile
from gatekeeper.observe.units import format_bytes


class MemorySource(Protocol):
    """Anything that can say how many bytes a new job could use right now, and
    explain itself (the gate, the status picture and the startup line ask)."""

    def available(self) -> int: ...

    def explain(self) -> str:
        """What bound the last reading, for the "holding" line ("" : nothing to add)."""
        ...

    def pressure(self) -> float | None:
        """Memory pressure (PSI some avg10, percent), or None where there is none."""
        ...

    def describe(self) -> str:
        """What is watched, for the startup log line ("": nothing to say)."""
        ...

    def close(self) -> None: ...


class PlainSource:
    """The parts of `MemorySource` a plain number source has nothing to say in."""

    def explain(self) -> str:
        return ""

    def pressure(self) -> float | None:
        return None

    def describe(self) -> str:
        return ""

    def close(self) -> None:
        pass


class SystemMemory(PlainSource):
    """Host-wide MemAvailable: the kernel's own estimate of memory that can be
    given to new work without swapping (free + reclaimable page cache).

    Blind to cgroup limits (psutil issue 2100); `EffectiveMemory` below adds them.
    """

    def __init__(self, path: str = "/proc/meminfo") -> None:
        try:
            self._file: KeptOpenFile | None = KeptOpenFile(path, size=8192)
        except OSError:
            self._file = None  # not Linux: psutil knows the local equivalent

    def available(self) -> int:
        if self._file is None:
            return int(psutil.virtual_memory().available)
        return parse_meminfo_available(self._file.read())

    def describe(self) -> str:
        return "system MemAvailable"

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def parse_meminfo_available(data: bytes) -> int:
    """Bytes of MemAvailable in a /proc/meminfo text (values there are in kB)."""
    start = data.find(b"MemAvailable:")
    if start < 0:
        raise ValueError("no MemAvailable line in meminfo")
    end = data.find(b"\n", start)
    fields = data[start:end if end >= 0 else None].split()
    return int(fields[1]) * 1024


class FixedMemory(PlainSource):
    """A source that reports whatever it was last told: for tests and for
    running with the memory rule effectively off."""

    def __init__(self, available: int) -> None:
        self.value = available

    def available(self) -> int:
        return self.value


# --- cgroup-aware memory ---------------------------------------------------------
#
# Inside a container or a unit with MemoryMax=, MemAvailable is the host's and says
# nothing about the cgroup the compiles run in. The effective figure is the
# smallest of the system's and each watched cgroup's headroom (its limit, or an
# ancestor's, minus what it uses net of inactive page cache; see cgroups.py).


class EffectiveMemory:
    """min(system MemAvailable, headroom of each watched cgroup and its ancestors),
    plus memory pressure (PSI) for a pressure rule.

    A reading costs one pread of /proc/meminfo, one per cgroup level for its limit,
    and for a level that has a limit two more (usage, memory.stat). `explain()`
    names what bound the last reading, for the "holding" log line.
    """

    def __init__(self, system: MemorySource, chains: Sequence[CgroupChain] = (),
                 pressure: Sequence[PressureReader] = ()) -> None:
        self.system = system
        self.chains = list(chains)
        self.pressure_readers = list(pressure)
        self._bound: CgroupSample | None = None  # what bound the last reading
        self._last: int | None = None

    def available(self) -> int:
        best = self.system.available()
        bound = None
        for chain in self.chains:
            sample = chain.tightest()
            if sample is not None and sample.headroom < best:
                best, bound = sample.headroom, sample
        self._last, self._bound = best, bound
        return best

    def explain(self) -> str:
        """What bound the last reading (takes one if there was none), e.g.
        "cgroup /sys/fs/cgroup/memory/x: 1.1 GiB headroom (limit 2.0 GiB, used 0.9 GiB)"."""
        if self._last is None:
            self.available()
        assert self._last is not None
        bound = self._bound
        if bound is None:
            return f"system MemAvailable: {format_bytes(self._last)}"
        return (f"cgroup {bound.path}: {format_bytes(bound.headroom)} headroom "
                f"(limit {format_bytes(bound.limit)}, used {format_bytes(bound.used)})")

    def pressure(self) -> float | None:
        """PSI memory `some avg10` in percent: the highest of the system's and the
        watched cgroups' own, or None where the kernel has no PSI."""
        values = [v for r in self.pressure_readers if (v := r.some_avg10()) is not None]
        return max(values) if values else None

    def describe(self) -> str:
        """What is watched, for the startup log line."""
        parts = ["system MemAvailable"]
        for chain in self.chains:
            c = chain.cgroup
            limited = [lvl.path for lvl in chain.levels]
            parts.append(f"cgroup v{c.version} {c.path} ({len(limited)} level(s) that "
                         f"can carry a limit)")
        parts += [f"pressure {r.path}" for r in self.pressure_readers if r.available]
        return "; ".join(parts)

    def close(self) -> None:
        for chain in self.chains:
            chain.close()
        for reader in self.pressure_readers:
            reader.close()
        self.system.close()


def build_memory_source(cgroup: str | None = None, *,
                        mounts: Sequence[CgroupMount] | None = None,
                        own: Sequence[CgroupDir] | None = None,
                        meminfo: str = "/proc/meminfo",
                        system_pressure: str = SYSTEM_MEMORY_PRESSURE) -> EffectiveMemory:
    """The memory source for `--cgroup`: with None, gatekeeper's own cgroups
    (auto-detected from /proc/self/cgroup; none found means system only); else the
    given cgroup, as a cgroupfs directory or a /proc/PID/cgroup path. Raises
    ValueError with a one-line message if the given cgroup can't be found.

    `mounts` and `own` replace /proc/self/mountinfo and /proc/self/cgroup (tests).
    """
    if mounts is None:
        try:
            mounts = read_mounts()
        except OSError:
            mounts = []
    if cgroup is None:
        dirs = list(own) if own is not None else own_cgroups(mounts=mounts)
    else:
        dirs = resolve_cgroup(cgroup, mounts)
    chains = [CgroupChain.open(d) for d in dirs if d.memory]
    pressure = [PressureReader(system_pressure)]
    for d in dirs:
        # a v2 cgroup's own PSI counts only its tasks; the root's is the system's
        if d.version == 2 and not (d.top_is_root and os.path.normpath(d.path) == d.top):
            pressure.append(PressureReader(os.path.join(d.path, "memory.pressure")))
    return EffectiveMemory(SystemMemory(meminfo), chains, pressure)

