"""How a running job is paused and let go on: the mechanisms `pausing` decides
between, each for one job's processes.

* `CgroupFreezer`: the job's own cgroup (memory/job_cgroup.py) is frozen by
  the kernel -- v1 `freezer.state` (FROZEN/THAWED) in the freezer hierarchy's
  twin of the job's cgroup, v2 `cgroup.freeze` (1/0) in the cgroup itself.
  Every process in it stops at once, those it forks later included, and no
  signal is seen by the job (a compiler cannot tell it was paused).
* `SignalFreezer`: SIGSTOP/SIGCONT, where the job has no cgroup with a freezer:
  the job's root process (an inetd child, a proxy job's distccd child) and its
  descendants, found in /proc. Not its process group: distccd puts each
  compiler in a new group of its own (dcc_new_pgrp), so signalling the inetd
  child's group stopped distccd and not the compiler, which grew on (the e2e
  test saw the OOM kill); and a proxy job's distccd child shares distccd's.

A cut (a job paused too long, with no room to let it go on: `pausing.Act.CUT`)
SIGKILLs the job's processes -- except `spare`, the distccd child that serves
the job in proxy mode, which lives on to serve the next one -- and then thaws
them, so the kill is delivered and the memory freed.

Every call is a few small writes to cgroupfs or a few kill(2)s: done in the trio
thread, between two checkpoints, so a job cannot end and its processes be
reused half-way through. Failures (the job ended: ESRCH, ENOENT, ENODEV) are
swallowed: a job that is gone needs no pausing; anything else raises `OSError`
to the caller, which logs it and stops pausing that job.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from collections.abc import Iterable
from typing import Protocol

from gatekeeper.memory.job_cgroup import JobCgroup, pids_in
from gatekeeper.memory.meter import descendants

# The job is gone (its processes exited, its cgroup removed): nothing to do.
_GONE = frozenset({errno.ESRCH, errno.ENOENT, errno.ENODEV})
# SIGSTOP goes round the tree this many times: a process forked while the tree
# was being walked (the compiler driver starting cc1plus) is met on a later
# round; a stopped parent forks no more.
STOP_ROUNDS = 3


class Freezer(Protocol):
    how: str
    """For logs and /status: "freezer", "cgroup.freeze" or "SIGSTOP"."""

    def freeze(self) -> None: ...

    def thaw(self) -> None: ...

    def kill(self) -> None:
        """SIGKILL the job's processes (not its `spare`) and thaw them."""


def _write(path: str, text: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in _GONE:
            return
        raise
    try:
        os.write(fd, text.encode())
    except OSError as e:
        if e.errno not in _GONE:
            raise
    finally:
        os.close(fd)


def _signal(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


class CgroupFreezer:
    """Freezes a job's cgroup (v1 freezer twin, or v2 `cgroup.freeze`)."""

    def __init__(self, cgroup: JobCgroup, *, spare: int | None = None) -> None:
        self.cgroup = cgroup
        self.spare = spare
        if cgroup.freezer is not None:
            self.how = "freezer"
            self._state, self._frozen, self._thawed = (
                os.path.join(cgroup.freezer, "freezer.state"), "FROZEN", "THAWED")
        else:
            self.how = "cgroup.freeze"
            self._state, self._frozen, self._thawed = (
                os.path.join(cgroup.path, "cgroup.freeze"), "1", "0")

    @classmethod
    def of(cls, cgroup: JobCgroup, *, spare: int | None = None) -> CgroupFreezer | None:
        """None where the cgroup cannot be frozen (v1 without a freezer
        hierarchy, v2 before Linux 5.2): then signals do it."""
        if cgroup.freezer is None and not os.path.exists(
                os.path.join(cgroup.path, "cgroup.freeze")):
            return None
        return cls(cgroup, spare=spare)

    def freeze(self) -> None:
        _write(self._state, self._frozen)

    def thaw(self) -> None:
        _write(self._state, self._thawed)

    def kill(self) -> None:
        pids = pids_in(self.cgroup.path)
        _signal((p for p in pids if p != self.spare), signal.SIGKILL)
        self.thaw()


class SignalFreezer:
    """SIGSTOP/SIGCONT of a process and its descendants."""

    how = "SIGSTOP"

    def __init__(self, root: int, *, spare: int | None = None) -> None:
        self.root = root
        self.spare = spare

    def _send(self, sig: int) -> None:
        _signal([self.root, *descendants(self.root)], sig)

    def freeze(self) -> None:
        for _ in range(STOP_ROUNDS):
            self._send(signal.SIGSTOP)

    def thaw(self) -> None:
        self._send(signal.SIGCONT)

    def kill(self) -> None:
        tree = [self.root, *descendants(self.root)]
        _signal((p for p in tree if p != self.spare), signal.SIGKILL)
        self.thaw()


def thaw(cgroup: JobCgroup) -> None:
    """Let a job cgroup go on, whether or not it was frozen (a job being stopped
    must be able to see its signal and die)."""
    freezer = CgroupFreezer.of(cgroup)
    if freezer is not None:
        freezer.thaw()
