"""Pressure stall information (PSI) for memory: how much time tasks lose waiting on it.

Why: available bytes say whether a job *fits*; PSI says whether the box is already
thrashing (reclaim, refaults, swap-in) even when the numbers look fine. `some avg10`
is the share of the last 10 s in which at least one task stalled on memory, in
percent; `--max-memory-pressure PCT` holds jobs while it is above PCT.

Files: /proc/pressure/memory (system-wide) and, on cgroup v2, a cgroup's own
memory.pressure (the same format, counting only its tasks). Format (Linux
Documentation/accounting/psi.rst):

    some avg10=0.12 avg60=0.05 avg300=0.01 total=123456
    full avg10=0.00 avg60=0.00 avg300=0.00 total=4567

`total` is microseconds stalled since boot (or since the cgroup was made). Older
kernels had no `full` line in /proc/pressure/cpu; memory always has both, but the
parser does not insist.

A kernel without PSI (CONFIG_PSI off, or `psi=0`, where reads fail with
EOPNOTSUPP) has no file or an unreadable one: the reader then reports None, never
an error. A cgroup pressure file that vanishes with its cgroup is reopened by path
at most once per `REOPEN_INTERVAL`, like the cgroup memory readers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from gatekeeper.memory.cgroups import REOPEN_INTERVAL, Clock
from gatekeeper.memory.procfs import KeptOpenFile

log = logging.getLogger("gatekeeper")

SYSTEM_MEMORY_PRESSURE = "/proc/pressure/memory"


@dataclass(frozen=True, slots=True)
class PsiFigures:
    """One PSI line: stall percentages over 10 s, 60 s, 300 s, and total µs stalled."""

    avg10: float
    avg60: float
    avg300: float
    total: int


@dataclass(frozen=True, slots=True)
class Pressure:
    """`some`: at least one task stalled; `full`: all non-idle tasks stalled at once."""

    some: PsiFigures
    full: PsiFigures | None


def _parse_line(words: list[bytes]) -> PsiFigures:
    values = dict(word.split(b"=", 1) for word in words[1:])
    return PsiFigures(float(values[b"avg10"]), float(values[b"avg60"]),
                      float(values[b"avg300"]), int(values[b"total"]))


def parse_psi(data: bytes) -> Pressure:
    """Parse a PSI file; ValueError if it has no well-formed `some` line."""
    lines: dict[bytes, PsiFigures] = {}
    try:
        for line in data.splitlines():
            words = line.split()
            if words and words[0] in (b"some", b"full"):
                lines[words[0]] = _parse_line(words)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"malformed PSI text: {data[:200]!r}") from exc
    if b"some" not in lines:
        raise ValueError(f"no 'some' line in PSI text: {data[:200]!r}")
    return Pressure(lines[b"some"], lines.get(b"full"))


def parse_some_avg10(data: bytes) -> float:
    """Just `some avg10` (the admission figure), without building the whole record."""
    start = data.find(b"some avg10=")
    if start < 0:
        raise ValueError(f"no 'some avg10' in PSI text: {data[:200]!r}")
    start += len(b"some avg10=")
    end = data.find(b" ", start)
    return float(data[start:end if end >= 0 else None])


class PressureReader:
    """A PSI file kept open and re-read with pread; None whenever it can't be read."""

    def __init__(self, path: str = SYSTEM_MEMORY_PRESSURE, *,
                 clock: Clock = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        self._gone_at: float | None = None
        self._file: KeptOpenFile | None = None
        self._retry = True
        self._warned = False  # log a loss once, not at every retry
        try:
            self._file = KeptOpenFile(path, size=256)
        except OSError as exc:
            # not there at start: a kernel without PSI, or a cgroup without the
            # file. That does not change while we run, so never look again.
            log.debug("no memory pressure from %s: %s", path, exc)
            self._retry = False

    @property
    def available(self) -> bool:
        """Whether the file was there at start (whether PSI can ever be reported)."""
        return self._retry

    def _data(self) -> bytes | None:
        if self._file is None and not self._reopen():
            return None
        assert self._file is not None
        try:
            return self._file.read()
        except OSError as exc:
            self._lost(exc)
            return None

    def _ok(self) -> None:
        if self._warned:
            self._warned = False
            log.warning("memory pressure %s readable again", self.path)

    def read(self) -> Pressure | None:
        data = self._data()
        if data is None:
            return None
        try:
            pressure = parse_psi(data)
        except ValueError as exc:
            self._lost(exc)
            return None
        self._ok()
        return pressure

    def some_avg10(self) -> float | None:
        """`some avg10` in percent, or None when PSI can't be read."""
        data = self._data()
        if data is None:
            return None
        try:
            avg10 = parse_some_avg10(data)
        except ValueError as exc:
            self._lost(exc)
            return None
        self._ok()
        return avg10

    def _lost(self, exc: Exception) -> None:
        if not self._warned:
            self._warned = True
            log.warning("memory pressure %s unreadable (%s): ignoring it until it returns",
                        self.path, exc)
        self._drop()
        self._gone_at = self._clock()

    def _reopen(self) -> bool:
        if not self._retry:
            return False
        now = self._clock()
        if self._gone_at is not None and now - self._gone_at < REOPEN_INTERVAL:
            return False
        try:
            self._file = KeptOpenFile(self.path, size=256)
        except OSError:
            self._gone_at = now
            return False
        self._gone_at = None
        return True

    def _drop(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        self._retry = False
        self._drop()
