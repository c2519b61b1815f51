"""A cgroup of its own for one job, to measure the job's peak memory exactly.

Why: in inetd mode gatekeeper starts each job itself; putting the job's process in a
fresh child cgroup makes the kernel track its peak (v2 `memory.peak`, v1
`memory.max_usage_in_bytes`) including every process it forks, with no sampling.
Not wired in yet: footprints still come from the meter's RSS samples; issue 17
(exact per-job memory) puts each job in one of these and learns from its peak.

Every failure is a `CgroupError` whose message is one line saying what was refused
and why, so the caller can log it and fall back to measuring without a cgroup.
"""

from __future__ import annotations

import errno
import os

from gatekeeper.memory.cgroups import CgroupDir, memory_reader


class CgroupError(Exception):
    """Creating, joining or removing a cgroup failed; the message is one line."""


def _write(path: str, text: str, what: str) -> None:
    """One write(2) of the whole value: cgroupfs acts on each write, and reports a
    refusal (EPERM, EBUSY, EINVAL, ESRCH) as that write's error."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise CgroupError(f"cannot {what} ({path}: {exc.strerror or exc})") from exc


class ChildCgroup:
    """A cgroup gatekeeper creates under `parent` for one job, to measure its peak.

    Needs write access to `parent` (root, or a subtree delegated to gatekeeper's
    user). On v2 the parent must pass the memory controller down: this enables it in
    the parent's cgroup.subtree_control, which the kernel refuses (EBUSY) while the
    parent itself has processes (the no-internal-processes rule) — so put gatekeeper
    in a leaf of its own and give jobs sibling cgroups.
    """

    def __init__(self, parent: CgroupDir, name: str) -> None:
        if "/" in name or name in ("", ".", ".."):
            raise CgroupError(f"bad cgroup name {name!r}")
        self.parent = parent
        self.path = os.path.join(parent.path, name)
        if parent.version == 2:
            self._enable_v2_memory(parent.path)
        try:
            os.mkdir(self.path)
        except OSError as exc:
            raise CgroupError(f"cannot create cgroup {self.path}: {exc.strerror}") from exc
        try:
            self.memory = memory_reader(parent.version, self.path)
        except OSError as exc:
            self._rmdir()
            raise CgroupError(f"cgroup {self.path} has no memory files: {exc.strerror}") from exc

    @staticmethod
    def _enable_v2_memory(parent: str) -> None:
        def words(name: str) -> list[str]:
            try:
                with open(os.path.join(parent, name)) as f:
                    return f.read().split()
            except OSError as exc:
                raise CgroupError(f"cannot read {parent}/{name}: {exc.strerror}") from exc

        if "memory" in words("cgroup.subtree_control"):
            return
        if "memory" not in words("cgroup.controllers"):
            raise CgroupError(f"cgroup v2 {parent} does not offer the memory controller "
                              f"(bound to cgroup v1 here, or not delegated to this subtree)")
        try:
            _write(os.path.join(parent, "cgroup.subtree_control"), "+memory",
                   f"enable the memory controller for children of {parent}")
        except CgroupError as exc:
            if isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.EBUSY:
                raise CgroupError(f"cannot enable the memory controller for children of "
                                  f"{parent}: it has processes of its own (cgroup v2 "
                                  f"no-internal-processes rule)") from exc
            raise

    def set_limit(self, limit: int | None) -> None:
        """Set (or with None lift) the hard limit: v2 memory.max, v1 limit_in_bytes."""
        if self.parent.version == 2:
            _write(os.path.join(self.path, "memory.max"), "max" if limit is None
                   else str(limit), f"set the memory limit of {self.path}")
        else:
            _write(os.path.join(self.path, "memory.limit_in_bytes"),
                   "-1" if limit is None else str(limit), f"set the memory limit of {self.path}")

    def add_pid(self, pid: int) -> None:
        """Move a process into the cgroup; what it allocates from now on is charged here
        (v1 does not move already-charged memory unless move_charge_at_immigrate)."""
        _write(os.path.join(self.path, "cgroup.procs"), str(pid),
               f"move pid {pid} into {self.path}")

    def peak(self) -> int | None:
        return self.memory.peak()

    def pids(self) -> list[int]:
        try:
            with open(os.path.join(self.path, "cgroup.procs")) as f:
                return [int(line) for line in f if line.strip()]
        except OSError:
            return []

    def remove(self) -> None:
        """Remove the (empty) cgroup. EBUSY means processes are still inside."""
        self.memory.close()
        self._rmdir()

    def _rmdir(self) -> None:
        try:
            os.rmdir(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            inside = f" (pids still inside: {self.pids()})" if exc.errno == errno.EBUSY else ""
            raise CgroupError(f"cannot remove cgroup {self.path}: {exc.strerror}"
                              f"{inside}") from exc
