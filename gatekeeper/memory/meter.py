"""Measuring what each running job really uses.

Two uses: a running job's reservation shrinks as its real usage shows up in
the memory reading (see `admission`), and its peak is learned for next time
(see `footprints`).

Method: the private and shared resident memory of the job's process tree
(what its cgroup would be charged, `charge`), sampled every
`INTERVAL` while jobs run (once per `CALM_INTERVAL` while every running job
holds steady; no timer when none runs). The tree's root is

* in inetd mode, the child gatekeeper started for the job (known exactly);
* in proxy mode, the backend process holding the other end of our backend
  connection: the kernel's sock_diag names that socket's inode (exact lookup
  by addresses; /proc/net/tcp{,6} where netlink is refused), and the process
  holding that inode is found in /proc/*/fd. For distccd that is the child
  that accepted the job, and the compiler it runs is its child.

Accuracy: compilers grow over seconds, so 200 ms sampling sees the peak within
a few percent; a job shorter than one interval may go unmeasured (it is then
not learned: `learning.MIN_SAMPLES`). In the fallback, /proc/net/tcp is read once per
sampling round however many jobs are looked up (see `_TableCache`). Left out:
file pages (the compiler's text, headers it reads: charged to whoever read
them first) and files the job writes in a tmpfs. Finding the
proxy-mode process needs permission to read other users' /proc/PID/fd (root or
CAP_SYS_PTRACE); without it jobs go unmeasured and keep their full reservation
until they end, which is safe but slower.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import trio

from gatekeeper.memory.sock_diag import SockDiag

log = logging.getLogger("gatekeeper")

# Sampling period while jobs run: compilers grow over seconds, so five reads
# a second see their peak closely and cost well under 1 % of a core.
INTERVAL = 0.2
# When every running job's usage has stayed within 1 % for CALM_ROUNDS samples
# (a job that waits on something, not a growing compiler), sample once a
# second until something changes or a new job starts: five rounds a second
# of a steady job were all of gatekeeper's CPU while it held 10,000 clients.
CALM_ROUNDS = 5
CALM_INTERVAL = 1.0



def tree_charge(pid: int) -> int | None:
    """What a memory cgroup would charge for `pid` and all its descendants,
    as near as /proc tells: each one's private resident memory plus its
    shared memory (`charge`); None if `pid` is gone."""
    total = 0
    stack = [pid]
    seen: set[int] = set()
    first = True
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        rss = charge(p)
        if rss is None:
            if first:
                return None
            continue
        first = False
        total += rss
        stack.extend(_children(p))
    return total


def _read(path: str) -> bytes:
    """A small /proc file in one read: os.open/os.read, not open(), which adds an
    fstat, an lseek and an isatty ioctl per file -- this runs five times a
    second for every process of every running job."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 65536)
    finally:
        os.close(fd)


def charge(pid: int) -> int | None:
    """RssAnon + RssShmem of one process, in bytes. Not its whole RSS: that
    counts the compiler's text and shared libraries once per process (cc1plus
    alone maps ~30 MB of them), while a cgroup charges a page once, to
    whoever first read it -- usually not the job. Issue 17 measured a heavy and
    a medium compile at 338 MiB by RSS(+10 %) where their cgroup peaked at
    221-272 MiB."""
    try:
        status = _read(f"/proc/{pid}/status")
        return (_status_kib(status, b"\nRssAnon:") + _status_kib(status, b"\nRssShmem:")) * 1024
    except (OSError, ValueError):
        return None


def _status_kib(status: bytes, field: bytes) -> int:
    """A "Name:   123 kB" line of /proc/PID/status; ValueError if it is absent
    (a zombie has no memory lines: it is gone as far as memory goes)."""
    at = status.find(field)
    if at < 0:
        raise ValueError(field)
    end = status.find(b"kB", at)
    return int(status[at + len(field):end])


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            out.extend(int(c) for c in _read(f"/proc/{pid}/task/{tid}/children").split())
        except (OSError, ValueError):
            continue
    return out


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (children first), from /proc's children
    lists; a process that exits meanwhile is left out."""
    out: list[int] = []
    stack = _children(pid)
    seen = {pid}
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        out.append(p)
        stack.extend(_children(p))
    return out


def _hex_endpoint(host: str, port: int) -> tuple[int, str]:
    """(IP version, the address as /proc/net/tcp{,6} prints it: each 32-bit word of
    the address read in host byte order, in hex)."""
    addr = ipaddress.ip_address(host.split("%", 1)[0])
    packed = addr.packed
    words = "".join(f"{int.from_bytes(packed[i:i + 4], sys.byteorder):08X}"
                    for i in range(0, len(packed), 4))
    return addr.version, f"{words}:{port:04X}"


class _TableCache(dict[str, bytes]):
    """/proc/net/tcp{,6} read once per sampling round, however many jobs are looked
    up in it: the table lists every TCP socket on the host (38,000 lines, 5 MB after
    a burst of small jobs, TIME_WAIT ones included), and reading it per job had cost
    40 % of gatekeeper's CPU under 1,000 small jobs a second. Used by the meter's one
    worker thread only."""

    caching = False


_TABLES = _TableCache()


class SocketFinder:
    """Finds a TCP socket's inode by its two ends: one exact sock_diag question
    to the kernel; where netlink is refused or fails, a search of /proc/net/tcp
    (logged once). The `Meter`'s is opened with it, closed when its run ends,
    and used from its one worker thread at a time; the adopter has its own,
    asked in the event loop while `exact` (memory/adopt.py)."""

    def __init__(self) -> None:
        self._diag = SockDiag.open()

    def inode(self, local: tuple[str, int], remote: tuple[str, int]) -> int | None:
        """Inode of the TCP socket on this host whose local end is `local` and
        remote end is `remote` (both (host, port)); None if there is none."""
        if self._diag is not None:
            try:
                return self._diag.inode(local, remote)
            except OSError as e:
                self.close()
                log.warning("sock_diag lookups failed (%s): reading /proc/net/tcp instead", e)
        return _table_inode(local, remote)

    @property
    def exact(self) -> bool:
        """Asking is one netlink round trip that the kernel answers within
        the send (not a read of the whole TCP table)."""
        return self._diag is not None

    def close(self) -> None:
        if self._diag is not None:
            self._diag.close()
            self._diag = None


def _table_inode(local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    try:
        version, want_local = _hex_endpoint(*local)
        _, want_remote = _hex_endpoint(*remote)
    except ValueError:
        return None
    path = "/proc/net/tcp" if version == 4 else "/proc/net/tcp6"
    table = _TABLES.get(path)
    if table is None:
        try:
            with open(path, "rb") as f:
                table = f.read()
        except OSError:
            return None
        if _TABLES.caching:
            _TABLES[path] = table
    # One substring search in C instead of splitting every line in Python: the
    # table holds every TCP socket on the host (TIME_WAIT ones included), and a
    # busy proxy looks a job up in it several times a second.
    at = table.find(f" {want_local} {want_remote} ".encode())
    if at < 0:
        return None
    end = table.find(b"\n", at)
    fields = table[at:end if end >= 0 else len(table)].split()
    # local, remote, st, tx:rx, tr:when, retrnsmt, uid, timeout, inode
    return int(fields[8]) if len(fields) > 8 and fields[8].isdigit() and int(fields[8]) else None


Ends = tuple[tuple[str, int], tuple[str, int]]
"""A TCP connection of ours: (our end, the backend's end), each (host, port)."""


def backend_processes(connections: Sequence[Ends], candidates: Iterable[int],
                      finder: SocketFinder) -> list[int | None]:
    """The process on this host serving each of our `connections` (the
    backend's accepted socket has the ends the other way round), or None:
    `candidates` are read first (the processes that served earlier jobs), then
    every process, each one's fds once for all the connections."""
    found: list[int | None] = [None] * len(connections)
    wanted = socket_targets(connections, finder)
    match_everywhere(wanted, found, match_holders(candidates, wanted, found))
    return found


def socket_targets(connections: Sequence[Ends], finder: SocketFinder) -> dict[str, int]:
    """What /proc/PID/fd shows for the backend's socket of each connection that
    has one (accepted or not yet), to its index: one sock_diag question each."""
    wanted: dict[str, int] = {}
    for i, (local, remote) in enumerate(connections):
        inode = finder.inode(remote, local)
        if inode is not None:
            wanted[f"socket:[{inode}]"] = i
    return wanted


def match_holders(candidates: Iterable[int], wanted: dict[str, int],
                  found: list[int | None]) -> set[int]:
    """Mark in `found` the connections whose sockets one of `candidates` holds
    (they are wanted no more); returns the pids read."""
    tried: set[int] = set()
    for pid in candidates:
        if not wanted:
            break
        tried.add(pid)
        _match(pid, wanted, found)
    return tried


def match_everywhere(wanted: dict[str, int], found: list[int | None],
                     tried: set[int]) -> None:
    """`match_holders` over every process but ours and those `tried`: slow on
    a busy host (every process's fds), so not in the event loop."""
    if not wanted:
        return
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        if pid in tried or pid == os.getpid():
            continue
        _match(pid, wanted, found)
        if not wanted:
            return


def _match(pid: int, wanted: dict[str, int], found: list[int | None]) -> None:
    """Mark the connections whose sockets `pid` holds (and want them no more)."""
    base = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(base)
    except OSError:
        return
    for fd in fds:
        try:
            index = wanted.pop(os.readlink(f"{base}/{fd}"), None)
        except OSError:
            continue
        if index is not None:
            found[index] = pid
            if not wanted:
                return


def backend_process(local: tuple[str, int], remote: tuple[str, int],
                    candidates: Iterable[int], finder: SocketFinder) -> int | None:
    """The process on this host serving our connection from `local` to `remote`
    (the backend's accepted socket has them the other way round)."""
    return backend_processes([(local, remote)], candidates, finder)[0]


def still_serves(pid: int, local: tuple[str, int], remote: tuple[str, int],
                 finder: SocketFinder) -> bool:
    """Whether process `pid` holds the backend's socket of our connection from
    `local` to `remote` (one look: not every process's, as `backend_process`)."""
    found: list[int | None] = [None]
    match_holders([pid], socket_targets([(local, remote)], finder), found)
    return found[0] == pid


Locate = Callable[[Sequence[int], SocketFinder], int | None]


@dataclass(eq=False)
class Usage:
    """One running job's measurements, filled in by the `Meter`."""

    locate: Locate
    """Finds the job's root process (called in a worker thread, with the pids
    that served earlier jobs as hints and the meter's socket finder); None
    until it can be found."""
    on_sample: Callable[[int], None]
    """Told each new reading of the tree's resident bytes (in the trio thread)."""
    pid: int | None = None
    current: int | None = None
    previous: int | None = None
    peak: int = 0
    samples: int = 0
    exact: bool = False
    """`peak` is the job's own cgroup's peak, not the largest sample."""
    cgroup_usage: str | None = None
    """The job's own cgroup's usage file: read instead of its process tree."""
    stopped: bool = False
    """No more samples: the job's backend part is over (its process may already
    serve another job), though its handler still runs."""

    def stop(self) -> None:
        self.stopped = True

    @property
    def steady(self) -> bool:
        """The last two readings are within 1 % of each other."""
        now, before = self.current, self.previous
        return now is not None and before is not None and abs(now - before) * 100 <= before


class Meter:
    """Samples every running job's process tree while any job runs.

    Owns no job: handlers register theirs with `measuring` for the job's
    lifetime. The sampling itself (a few /proc reads per process, plus a /proc
    scan when a proxy-mode job's process is first looked for) runs in a worker
    thread so the event loop never waits on /proc.
    """

    def __init__(self, *, interval: float = INTERVAL) -> None:
        self.interval = interval
        self._jobs: set[Usage] = set()
        self._wakeup = trio.Event()
        self._known_pids: deque[int] = deque(maxlen=64)
        self._sampled = trio.Event()
        self._sampled.set()  # no sampling in progress
        self.finder = SocketFinder()
        self._calm = 0  # rounds in a row in which every job was steady
        self._news = trio.Event()  # a job started: ends a calm wait

    @contextmanager
    def measuring(self, locate: Locate,
                  on_sample: Callable[[int], None]) -> Iterator[Usage]:
        usage = Usage(locate, on_sample)
        self._jobs.add(usage)
        self._wakeup.set()
        self._calm = 0
        self._news.set()
        try:
            yield usage
        finally:
            self._jobs.discard(usage)

    async def quiescent(self) -> None:
        """Wait until no sampling is under way (its thread holds /proc files open:
        tests that count fds wait for this)."""
        await self._sampled.wait()

    async def run(self) -> None:
        try:
            while True:
                await self._round()
        finally:
            self.finder.close()  # the worker thread is done with it: run_sync waits

    async def _round(self) -> None:
        if not self._jobs:
            self._wakeup = trio.Event()
            await self._wakeup.wait()
        if self._calm >= CALM_ROUNDS:
            self._news = trio.Event()
            with trio.move_on_after(CALM_INTERVAL - self.interval):
                await self._news.wait()
        await trio.sleep(self.interval)
        jobs = list(self._jobs)
        hints = list(self._known_pids)
        self._sampled = trio.Event()
        try:
            await trio.to_thread.run_sync(_sample_all, jobs, hints, self.finder)
        finally:
            self._sampled.set()
        steady = bool(jobs)
        for usage in jobs:
            steady = steady and usage.steady
            if usage.pid is not None and usage.pid not in self._known_pids:
                self._known_pids.append(usage.pid)
            if usage in self._jobs and usage.current is not None and not usage.stopped:
                usage.on_sample(usage.current)
        self._calm = self._calm + 1 if steady else 0


def _sample_all(jobs: list[Usage], hints: list[int], finder: SocketFinder) -> None:
    # Short jobs are looked for too: a light compile's small peak is exactly what
    # lets the next build run it beside a heavy one. The table cache keeps that
    # to one /proc/net/tcp read per round.
    _TABLES.clear()
    _TABLES.caching = True
    try:
        for usage in jobs:
            _sample_one(usage, hints, finder)
    finally:
        _TABLES.caching = False
        _TABLES.clear()


def _sample_one(usage: Usage, hints: list[int], finder: SocketFinder) -> None:
    if usage.stopped:
        return
    if usage.cgroup_usage is not None:
        try:
            charged = int(_read(usage.cgroup_usage))
        except (OSError, ValueError):
            return  # removed: the job is over
        usage.previous, usage.current = usage.current, charged
        usage.peak = max(usage.peak, charged)
        usage.samples += 1
        return
    if usage.pid is None:
        usage.pid = usage.locate(hints, finder)
        if usage.pid is None:
            return
    rss = tree_charge(usage.pid)
    if rss is None:
        usage.pid = None  # gone (an inetd child that exited): nothing more to see
        return
    usage.previous, usage.current = usage.current, rss
    usage.peak = max(usage.peak, rss)
    usage.samples += 1
