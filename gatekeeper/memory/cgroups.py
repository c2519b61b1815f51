"""Finding and reading memory cgroups (v1 and v2), cheaply enough for the admission path.

Why: inside a container or a systemd unit with `MemoryMax=`, the host's MemAvailable
is huge while the compiles' cgroup is nearly full (psutil issue 2100). The truth
is the cgroup: its limit minus what it really uses.

How it reads:
- Each watched cgroup directory is a `CgroupMemory` (`CgroupV1Memory`, `CgroupV2Memory`)
  holding its files open; a reading is one `os.pread` per file (a few microseconds).
  The limit is read first and, while there is none, nothing else is read, so an
  unlimited ancestor costs one pread.
- "Used" is usage minus `inactive_file`: page cache that reclaim drops first is not
  a reason to hold a job (the same working-set rule as cAdvisor / `docker stats`).
  `active_file` stays counted: it is reclaimable too, but only by evicting the
  headers the build is reading right now, so counting it errs on the safe side.
- v2: the limit is the smaller of `memory.max` and `memory.high` ("max" = none):
  above `memory.high` the kernel throttles the cgroup's tasks, so a compile crawls.
  v1: `memory.limit_in_bytes`; the kernel's "unlimited" is LONG_MAX rounded down to
  a page (9223372036854771712 with 4 KiB pages), so anything >= 2**62 is none.
- A parent's limit covers its children, so `CgroupChain` also reads every ancestor
  up to the top of the visible hierarchy (skipping the real root, which cannot
  carry a limit); the binding figure is the smallest headroom of all.

A cgroup that vanishes (`rmdir`: reads fail with ENODEV, files are gone with ENOENT)
never crashes the reader. Choice: log once, count it as *no constraint* (nothing
runs in a cgroup that does not exist; its ancestors still count), and try to
reopen it by path at most once per `REOPEN_INTERVAL`, so a watched systemd service
that restarts (and gets a fresh cgroup) is picked up again.

Peak readers (`CgroupMemory.peak`: v2 `memory.peak`, v1 `memory.max_usage_in_bytes`)
measure a job in a cgroup of its own; job_cgroup.py creates those.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from gatekeeper.memory.procfs import KeptOpenFile

log = logging.getLogger("gatekeeper")

# v1 reports "no limit" as PAGE_COUNTER_MAX pages, about 2**63 whatever the page
# size; no real limit comes near 2**62 bytes (4 EiB).
V1_UNLIMITED = 2**62

# How often a vanished cgroup is looked for again: often enough to pick up a
# restarted service within a blink of the admission timer (100 ms), rarely enough
# that a cgroup that is gone for good costs nothing (one failed open a second).
REOPEN_INTERVAL = 1.0

V2_FSTYPE = "cgroup2"
V1_FSTYPE = "cgroup"

Clock = Callable[[], float]


def stat_value(data: bytes, key: bytes) -> int | None:
    """The value of `key` in a flat-keyed file like memory.stat ("key value" lines)."""
    if data.startswith(key + b" "):
        start = 0
    else:
        start = data.find(b"\n" + key + b" ")
        if start < 0:
            return None
        start += 1
    end = data.find(b"\n", start)
    return int(data[start + len(key) + 1:end if end >= 0 else None])


# --- /proc/PID/cgroup and /proc/self/mountinfo ---------------------------------


@dataclass(frozen=True, slots=True)
class CgroupEntry:
    """One line of /proc/PID/cgroup: `ID:CONTROLLERS:PATH`.

    v2 is `0::/path` (no controllers); v1 lists controllers comma-joined
    (`4:memory:/x`, `2:cpu,cpuacct:/x`, `1:name=systemd:/x`).
    """

    hierarchy_id: int
    controllers: tuple[str, ...]
    path: str

    @property
    def is_v2(self) -> bool:
        return self.hierarchy_id == 0 and not self.controllers


def parse_proc_cgroup(text: str) -> list[CgroupEntry]:
    entries = []
    for line in text.splitlines():
        if not line.strip():
            continue
        ident, controllers, path = line.split(":", 2)  # the path may contain ':'
        entries.append(CgroupEntry(int(ident), tuple(c for c in controllers.split(",") if c),
                                   path))
    return entries


@dataclass(frozen=True, slots=True)
class CgroupMount:
    """A mounted cgroup hierarchy from mountinfo: `root` is the cgroup path shown at
    `mount_point` (not "/" when a container sees only its own subtree)."""

    version: int
    mount_point: str
    root: str
    controllers: frozenset[str]


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo octal."""
    if "\\" not in field:
        return field
    return field.encode().decode("unicode_escape").encode("latin-1").decode()


def parse_mountinfo(text: str) -> list[CgroupMount]:
    """The cgroup mounts in a mountinfo text. Format (proc(5)):
    `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS`."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or not tail or tail[0] not in (V1_FSTYPE, V2_FSTYPE):
            continue
        version = 2 if tail[0] == V2_FSTYPE else 1
        options = tail[2].split(",") if version == 1 and len(tail) > 2 else []
        mounts.append(CgroupMount(version, _unescape(fields[4]), _unescape(fields[3]),
                                  frozenset(o for o in options if o not in ("rw", "ro"))))
    return mounts


def read_mounts(path: str = "/proc/self/mountinfo") -> list[CgroupMount]:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return parse_mountinfo(f.read())


# --- locating cgroup directories -------------------------------------------------


@dataclass(frozen=True, slots=True)
class CgroupDir:
    """A cgroup as a directory: where to read it and how far up its ancestors go."""

    version: int
    path: str
    top: str           # the mount point: ancestors are walked up to here
    top_is_root: bool  # `top` is the real root cgroup, which never carries a limit
    memory: bool       # the memory controller accounts this hierarchy


def _has_memory(mount: CgroupMount) -> bool:
    if mount.version == 1:
        return "memory" in mount.controllers
    try:
        with open(os.path.join(mount.mount_point, "cgroup.controllers")) as f:
            return "memory" in f.read().split()
    except OSError:
        return False


def _in_mount(mount: CgroupMount, cgroup_path: str) -> str | None:
    """The directory of a /proc/PID/cgroup path under `mount`, or None if it is
    outside what the mount shows (e.g. "/../x" seen across a cgroup namespace)."""
    root = mount.root.rstrip("/")
    if ".." in cgroup_path.split("/"):
        return None
    if cgroup_path != root and not cgroup_path.startswith(root + "/"):
        return None
    return os.path.normpath(mount.mount_point + cgroup_path[len(root):])


def _cgroup_dir(mount: CgroupMount, path: str) -> CgroupDir:
    return CgroupDir(mount.version, path, os.path.normpath(mount.mount_point),
                     mount.root == "/", _has_memory(mount))


def locate(entries: Iterable[CgroupEntry], mounts: Sequence[CgroupMount]) -> list[CgroupDir]:
    """The memory-relevant cgroup directories of a process: its v1 memory cgroup and
    its v2 cgroup (whose memory.pressure counts even when memory is on v1)."""
    found = []
    for entry in entries:
        if entry.is_v2:
            candidates = [m for m in mounts if m.version == 2]
        elif "memory" in entry.controllers:
            candidates = [m for m in mounts if m.version == 1 and "memory" in m.controllers]
        else:
            continue
        for mount in candidates:
            path = _in_mount(mount, entry.path)
            if path is not None and os.path.isdir(path):
                found.append(_cgroup_dir(mount, path))
                break
    return found


def own_cgroups(pid: int | str = "self", *, mounts: Sequence[CgroupMount] | None = None,
                proc: str = "/proc") -> list[CgroupDir]:
    """The cgroups of `pid` (default: gatekeeper itself); empty where there are none
    to find (not Linux, no /proc)."""
    try:
        with open(f"{proc}/{pid}/cgroup", encoding="utf-8") as f:
            entries = parse_proc_cgroup(f.read())
        if mounts is None:
            mounts = read_mounts(f"{proc}/self/mountinfo")
    except (OSError, ValueError) as exc:
        log.debug("no cgroups found for %s: %s", pid, exc)
        return []
    return locate(entries, mounts)


def resolve_cgroup(path: str, mounts: Sequence[CgroupMount]) -> list[CgroupDir]:
    """Directories for a user-given cgroup: a cgroupfs directory (/sys/fs/cgroup/...)
    or the path /proc/PID/cgroup shows (/system.slice/distcc.service), looked up in
    the v2 hierarchy and the v1 memory hierarchy. Raises ValueError (one line) when
    it names no cgroup or none whose memory is accounted."""
    if not path.startswith("/"):
        raise ValueError(f"cgroup {path!r}: give an absolute path")
    path = os.path.normpath(path)
    under = [m for m in mounts if path == m.mount_point or
             path.startswith(m.mount_point.rstrip("/") + "/")]
    if under:  # a cgroupfs directory
        mount = max(under, key=lambda m: len(m.mount_point))
        if not os.path.isdir(path):
            raise ValueError(f"cgroup {path}: no such directory")
        found = [_cgroup_dir(mount, path)]
    else:  # a /proc/PID/cgroup path
        tried, found = [], []
        for mount in mounts:
            if mount.version == 1 and "memory" not in mount.controllers:
                continue
            candidate = _in_mount(mount, path)
            if candidate is None:
                continue
            tried.append(candidate)
            if os.path.isdir(candidate):
                found.append(_cgroup_dir(mount, candidate))
        if not found:
            raise ValueError(f"cgroup {path}: not found (looked in "
                             f"{', '.join(tried) or 'no cgroup mount'})")
    if not any(d.memory for d in found):
        v1_memory = [m.mount_point for m in mounts if "memory" in m.controllers]
        hint = f" (memory is on cgroup v1 here, under {v1_memory[0]})" if v1_memory else ""
        raise ValueError(f"cgroup {path}: no memory controller in the hierarchy at "
                         f"{', '.join(d.top for d in found)}{hint}")
    return found


# --- reading one cgroup's memory ----------------------------------------------


@dataclass(frozen=True, slots=True)
class CgroupSample:
    """One reading of a limited cgroup. `used` excludes inactive page cache."""

    path: str
    limit: int
    used: int

    @property
    def headroom(self) -> int:
        return max(0, self.limit - self.used)


class CgroupMemory(abc.ABC):
    """A cgroup's memory files, kept open. Subclasses name the files per version."""

    version: ClassVar[int]
    LIMIT_FILES: ClassVar[tuple[str, ...]]
    USAGE_FILE: ClassVar[str]
    PEAK_FILE: ClassVar[str]
    RECLAIMABLE_KEYS: ClassVar[tuple[bytes, ...]]

    def __init__(self, path: str, *, clock: Clock = time.monotonic) -> None:
        """Raises FileNotFoundError when `path` has no memory limit files (not a
        memory cgroup, or the v2 controller is not enabled for it)."""
        self.path = path
        self._clock = clock
        self._files: dict[str, KeptOpenFile] = {}
        self._peak: KeptOpenFile | None = None
        self._gone_at: float | None = None
        self._warned = False  # log a loss once, and its end once
        self._open()

    def _open(self) -> None:
        files: dict[str, KeptOpenFile] = {}
        try:
            for name in (*self.LIMIT_FILES, self.USAGE_FILE, "memory.stat"):
                try:
                    files[name] = KeptOpenFile(os.path.join(self.path, name))
                except FileNotFoundError:
                    if name in (self.LIMIT_FILES[0], self.USAGE_FILE):
                        raise
        except BaseException:
            for f in files.values():
                f.close()
            raise
        self._files = files

    @staticmethod
    @abc.abstractmethod
    def parse_limit(data: bytes) -> int | None:
        """A limit file's value in bytes; None for "no limit" (each version spells it
        differently)."""

    def sample(self) -> CgroupSample | None:
        """The current limit and use, or None while there is no constraint (no
        limit, or the cgroup is gone)."""
        if self._gone_at is not None and not self._revive():
            return None
        try:
            limit: int | None = None
            for name in self.LIMIT_FILES:
                f = self._files.get(name)
                value = None if f is None else self.parse_limit(f.read())
                if value is not None and (limit is None or value < limit):
                    limit = value
            if limit is None:
                self._warned = False
                return None
            usage = int(self._files[self.USAGE_FILE].read())
            stat = self._files.get("memory.stat")
            reclaimable = self._reclaimable(stat.read()) if stat is not None else 0
        except (OSError, ValueError) as exc:
            self._vanish(exc)
            return None
        if self._warned:
            self._warned = False
            log.warning("cgroup %s is back: its limit counts again", self.path)
        return CgroupSample(self.path, limit, max(0, usage - reclaimable))

    def headroom(self) -> int | None:
        sample = self.sample()
        return None if sample is None else sample.headroom

    def usage(self) -> int | None:
        """Bytes charged now (including page cache), or None if unreadable."""
        try:
            return int(self._files[self.USAGE_FILE].read())
        except (OSError, ValueError, KeyError):
            return None

    def peak(self) -> int | None:
        """The highest usage since the cgroup was created (or the v1 peak last reset),
        or None where the kernel has no peak file (v2 before Linux 5.19)."""
        try:
            if self._peak is None:
                self._peak = KeptOpenFile(os.path.join(self.path, self.PEAK_FILE))
            return int(self._peak.read())
        except (OSError, ValueError):
            return None

    def _reclaimable(self, stat: bytes) -> int:
        for key in self.RECLAIMABLE_KEYS:
            value = stat_value(stat, key)
            if value is not None:
                return value
        return 0

    def _vanish(self, exc: Exception) -> None:
        if not self._warned:
            self._warned = True
            log.warning("cgroup %s unreadable (%s): counting it as no limit until it returns",
                        self.path, exc)
        self._close_files()
        self._gone_at = self._clock()

    def _revive(self) -> bool:
        assert self._gone_at is not None
        now = self._clock()
        if now - self._gone_at < REOPEN_INTERVAL:
            return False
        try:
            self._open()
        except OSError:
            self._gone_at = now
            return False
        self._gone_at = None
        return True

    @property
    def gone(self) -> bool:
        return self._gone_at is not None

    def _close_files(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}
        if self._peak is not None:
            self._peak.close()
            self._peak = None

    def close(self) -> None:
        self._close_files()
        self._gone_at = None


class CgroupV2Memory(CgroupMemory):
    version = 2
    LIMIT_FILES = ("memory.max", "memory.high")
    USAGE_FILE = "memory.current"
    PEAK_FILE = "memory.peak"
    RECLAIMABLE_KEYS = (b"inactive_file",)  # v2 memory.stat is already hierarchical

    @staticmethod
    def parse_limit(data: bytes) -> int | None:
        text = data.strip()
        return None if text == b"max" else int(text)


class CgroupV1Memory(CgroupMemory):
    version = 1
    LIMIT_FILES = ("memory.limit_in_bytes",)
    USAGE_FILE = "memory.usage_in_bytes"
    PEAK_FILE = "memory.max_usage_in_bytes"
    # usage_in_bytes includes the children; so does total_inactive_file
    RECLAIMABLE_KEYS = (b"total_inactive_file", b"inactive_file")

    @staticmethod
    def parse_limit(data: bytes) -> int | None:
        value = int(data)
        return None if value >= V1_UNLIMITED else value


def memory_reader(version: int, path: str, *, clock: Clock = time.monotonic) -> CgroupMemory:
    cls: type[CgroupMemory] = CgroupV2Memory if version == 2 else CgroupV1Memory
    return cls(path, clock=clock)


def _v1_hierarchical(path: str) -> bool:
    """Whether a v1 cgroup's children count against its limit (use_hierarchy; always
    1 since Linux 5.16 and the default long before; a missing file means 1)."""
    try:
        with open(os.path.join(path, "memory.use_hierarchy")) as f:
            return f.read().strip() != "0"
    except OSError:
        return True


class CgroupChain:
    """A cgroup and the ancestors whose limits also apply to it, leaf first."""

    def __init__(self, cgroup: CgroupDir, levels: Sequence[CgroupMemory]) -> None:
        self.cgroup = cgroup
        self.levels = list(levels)

    @classmethod
    def open(cls, cgroup: CgroupDir, *, clock: Clock = time.monotonic) -> CgroupChain:
        """Open every level from `cgroup` up to the top of its hierarchy that can
        carry a limit. Levels without limit files (v2 without the memory controller,
        the real root) are left out: they never constrain."""
        levels: list[CgroupMemory] = []
        path = os.path.normpath(cgroup.path)
        while True:
            is_top = path == cgroup.top or len(path) <= len(cgroup.top)
            if is_top and cgroup.top_is_root:
                break
            with contextlib.suppress(FileNotFoundError):
                levels.append(memory_reader(cgroup.version, path, clock=clock))
            if is_top:
                break
            parent = os.path.dirname(path)
            if cgroup.version == 1 and not _v1_hierarchical(parent):
                break
            path = parent
        return cls(cgroup, levels)

    def tightest(self) -> CgroupSample | None:
        """The limited level with the least headroom, or None if none is limited."""
        best: CgroupSample | None = None
        for level in self.levels:
            sample = level.sample()
            if sample is not None and (best is None or sample.headroom < best.headroom):
                best = sample
        return best

    def close(self) -> None:
        for level in self.levels:
            level.close()
