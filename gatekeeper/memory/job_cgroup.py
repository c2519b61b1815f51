"""A cgroup of its own for each job, to measure the job's peak memory exactly.

Why: sampling a process tree five times a second misses a short compile and
guesses what a cgroup will charge; a job's own cgroup makes the kernel count
every page charged to it (v2 `memory.peak`, v1 `memory.max_usage_in_bytes`),
every process it forks included, however short it is. The freezer (v1) or
`cgroup.freeze` (v2) of the same cgroup is what pausing a job needs.

Lifecycle of one `JobCgroup`:

    CREATED   mkdir'ed under `JobCgroups.parent` (and the v1 freezer's), its
              cgroup.procs files open
    JOINED    the job's first process wrote itself in (`enter`, between fork
              and exec: nothing it allocates is charged elsewhere); its
              children are born inside
     EMPTIED   the job's processes have exited; its peak is read
    REMOVED   rmdir'ed (`remove`); a process left behind is moved to the parent
              first, so no cgroup is leaked; one kept busy by a zombie (exited,
              not yet reaped) waits in `Leftovers` and is removed at a later job

`JobCgroups.find` decides once, at start, whether gatekeeper may make them
(write access to its own memory cgroup: root, or a v2 subtree delegated with
`Delegate=yes`); where not, it raises and the caller measures by sampling.

Every failure is a `CgroupError` whose message is one line saying what was refused
and why, so the caller can log it and fall back to measuring without a cgroup.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import logging
import os
from collections.abc import Sequence

from gatekeeper.memory.cgroups import (
    CgroupDir,
    CgroupEntry,
    CgroupMount,
    locate,
    memory_reader,
    parse_proc_cgroup,
    read_mounts,
)

log = logging.getLogger("gatekeeper")

# Job cgroups are named `job-<gatekeeper's pid>-<n>`: two gatekeepers in one cgroup
# never collide, and one that crashed leaves names the next start recognises.
PREFIX = "job-"
# Job cgroup numbers, one sequence for the whole process: every place (gatekeeper's
# own cgroup, distccd's) draws from it, so no two job cgroups share a name.
_NUMBERS = itertools.count(1)
# (v2) Where gatekeeper moves itself so its cgroup can have children with the
# memory controller: the no-internal-processes rule.
SUPERVISOR = "supervisor"


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
        move_pid(pid, self.path)

    def peak(self) -> int | None:
        return self.memory.peak()

    def pids(self) -> list[int]:
        return pids_in(self.path)

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


def move_pid(pid: int, path: str) -> None:
    """Move process `pid` into the cgroup at `path`. Raises CgroupError."""
    _write(os.path.join(path, "cgroup.procs"), str(pid), f"move pid {pid} into {path}")


def _read_int(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def transient(error: CgroupError) -> bool:
    """A failure of this one attempt (out of fds or memory; a process that
    exited as it was looked at), not a sign that job cgroups cannot be made."""
    cause = error.__cause__
    return isinstance(cause, OSError) and cause.errno in (
        errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOENT, errno.ESRCH)


def _cgroup_procs_fd(path: str) -> int:
    try:
        return os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise CgroupError(f"cannot open {path}/cgroup.procs: {exc.strerror}") from exc


class JobCgroup:
    """One job's cgroup (memory, and the v1 freezer's where mounted); see the
    module docstring for its states."""

    def __init__(self, memory: ChildCgroup, freezer: str | None, *,
                 for_child: bool = True, home: str | None = None) -> None:
        self.memory = memory
        self.home = home or memory.parent.path
        """Where processes left behind go (v2: the supervisor cgroup, since its
        parent, having memory-controlled children, may hold none)."""
        # Read by name when needed (`usage`, `peak`): no fd per running job.
        memory.memory.close()
        self.freezer = freezer
        """The v1 freezer cgroup's directory (None on v2: `cgroup.freeze` is in
        the memory cgroup itself; or where no freezer is mounted)."""
        self._fds: list[int] = []
        if not for_child:
            return  # (adopted processes are moved by pid: memory/adopt.py)
        try:
            self._fds.append(_cgroup_procs_fd(memory.path))
            if freezer is not None:
                self._fds.append(_cgroup_procs_fd(freezer))
        except CgroupError:
            self.remove()
            raise

    @property
    def path(self) -> str:
        return self.memory.path

    def enter(self) -> None:
        """Move the calling process in: run in the job's child between fork and
        exec (Popen's preexec_fn). Async-signal-safe in spirit: one write(2)
        per cgroup on an fd opened beforehand, no allocation worth the name.
        "0" means the writer itself (v1 and v2). A refusal leaves the child
        where it was: it runs unmeasured (its cgroup's peak stays 0, which is
        never learned) rather than not at all."""
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.write(fd, b"0")

    def close_fds(self) -> None:
        """The parent's copies, once the child is started."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    @property
    def usage_file(self) -> str:
        """The file that holds its usage now (the meter reads it by name: the
        cgroup may be removed under it)."""
        return os.path.join(self.path, self.memory.memory.USAGE_FILE)

    def usage(self) -> int | None:
        return _read_int(self.usage_file)

    def peak(self) -> int | None:
        """The highest charge since it was made; None where the kernel has no
        peak file (v2 before Linux 5.19: `JobCgroups.find` refuses those)."""
        return _read_int(os.path.join(self.path, self.memory.memory.PEAK_FILE))

    def remove(self, *, quiet: bool = False) -> bool:
        """Remove both cgroups. Processes still inside (a compiler that outlived
        its distccd) are moved to the parent first: they go on, unmeasured, and
        no cgroup is leaked. A zombie cannot be moved and keeps its cgroup busy
        until its parent reaps it: then this returns False, and the caller
        tries again later (`Leftovers`). Raises CgroupError for anything else."""
        self.close_fds()
        self.memory.memory.close()
        errors = []
        removed = True
        for path, parent in ((self.freezer, None), (self.memory.path, self.home)):
            if path is None:
                continue
            try:
                removed = _remove_dir(path, parent or os.path.dirname(path),
                                      quiet=quiet) and removed
            except CgroupError as exc:
                errors.append(str(exc))
        if errors:
            raise CgroupError("; ".join(errors))
        return removed


class Leftovers:
    """Job cgroups whose removal waits for zombies to be reaped (a forking
    backend's child that exited, not yet waited for): tried again at each new
    job, bounded."""

    # A busy box reaps within milliseconds; this many waiting means something
    # never reaps, and more are not worth keeping track of.
    LIMIT = 256

    def __init__(self) -> None:
        self._waiting: list[JobCgroup] = []

    def __len__(self) -> int:
        return len(self._waiting)

    def keep(self, cgroup: JobCgroup) -> None:
        if len(self._waiting) >= self.LIMIT:
            log.warning("job cgroup %s left behind: %d others already wait for their "
                        "zombies to be reaped", cgroup.path, self.LIMIT)
            return
        self._waiting.append(cgroup)

    def retry(self) -> None:
        still = []
        for cgroup in self._waiting:
            try:
                if not cgroup.remove(quiet=True):  # its warning was logged once
                    still.append(cgroup)
            except CgroupError as e:
                log.warning("%s", e)
        self._waiting = still


def pids_in(path: str) -> list[int]:
    """The processes in a cgroup ([] if it is gone or unreadable)."""
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []


def _remove_dir(path: str, parent: str, *, quiet: bool = False) -> bool:
    """rmdir, moving live processes out first; False if it is still busy (zombies
    not yet reaped, or processes that cannot be moved): tried again later."""
    for _ in range(3):  # a process forking as it is moved: try again
        try:
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise CgroupError(f"cannot remove cgroup {path}: {exc.strerror}") from exc
        live = [pid for pid in pids_in(path) if not _zombie(pid)]
        if not live:
            return False
        if not quiet:
            log.warning("job cgroup %s still has processes %s: moving them to %s",
                        path, live[:10], parent)
        for pid in live:
            try:
                _write(os.path.join(parent, "cgroup.procs"), str(pid), f"move pid {pid} out")
            except CgroupError:
                continue
    return False  # still busy: tried again at later jobs (`Leftovers`)


def _zombie(pid: int) -> bool:
    """Exited, not yet reaped (or gone meanwhile): cannot be moved."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True
    return stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3] in (b"Z", b"X")


class JobCgroups:
    """Where this gatekeeper makes its jobs' cgroups: found once (`find`)."""

    def __init__(self, parent: CgroupDir, freezer: str | None) -> None:
        self.parent = parent
        self.freezer = freezer
        self.leftovers = Leftovers()
        self.home: str | None = None
        """Where a job's leftover processes go, if not `parent` (v2)."""

    @classmethod
    def find(cls, *, proc: str = "/proc",
             mounts: Sequence[CgroupMount] | None = None) -> JobCgroups:
        """gatekeeper's own memory cgroup, if it may make children there; the v1
        freezer's too, where mounted and writable. On v2 gatekeeper first moves
        itself into a `supervisor` child (a cgroup whose children get the memory
        controller may hold no processes), as systemd's `Delegate=yes` allows.
        Raises CgroupError saying why not, in one line."""
        return cls._of("self", proc=proc, mounts=mounts, leave_v2=True)

    @classmethod
    def of_process(cls, pid: int, *, proc: str = "/proc",
                   mounts: Sequence[CgroupMount] | None = None) -> JobCgroups:
        """Job cgroups below another process's memory cgroup (distccd's, in proxy
        mode; a job cgroup it was left in counts as its parent). On v2 the kernel
        refuses memory-controlled children of a cgroup that holds processes, and
        this raises saying so. Raises CgroupError."""
        return cls._of(str(pid), proc=proc, mounts=mounts, leave_v2=False)

    @classmethod
    def _of(cls, pid: str, *, proc: str, mounts: Sequence[CgroupMount] | None,
            leave_v2: bool) -> JobCgroups:
        try:
            with open(f"{proc}/{pid}/cgroup", encoding="utf-8") as f:
                entries = [dataclasses.replace(e, path=_outside_jobs(e.path))
                           for e in parse_proc_cgroup(f.read())]
            if mounts is None:
                mounts = read_mounts(f"{proc}/self/mountinfo")
        except (OSError, ValueError) as exc:
            who = "gatekeeper's own" if pid == "self" else f"pid {pid}'s"
            raise CgroupError(f"cannot read {who} cgroups: {exc}") from exc
        found = [d for d in locate(entries, mounts) if d.memory]
        if not found:
            raise CgroupError("no memory cgroup hierarchy is mounted")
        # v1 first: where memory is on v1, v2 has no memory controller anyway.
        parent = min(found, key=lambda d: d.version)
        home = None
        if parent.version == 2 and leave_v2:
            parent = _leave_v2_cgroup(parent)
            home = os.path.join(parent.path, SUPERVISOR)
        if not os.access(parent.path, os.W_OK):
            raise CgroupError(f"no write access to {parent.path} (needs root, or a "
                              f"delegated subtree: Delegate=yes)")
        freezer = None
        if parent.version == 1:
            freezer = _v1_freezer(entries, mounts)
        place = cls(parent, freezer)
        place.home = home
        place.sweep(own=leave_v2)
        probe = place.create()  # proves mkdir, the memory files and rmdir work
        peak = probe.peak()
        probe.remove()
        if peak is None:
            raise CgroupError(f"{parent.path}: no {probe.memory.memory.PEAK_FILE} (cgroup v2 "
                              f"has it from Linux 5.19): a job's peak cannot be read")
        return place

    def create(self, *, for_child: bool = True) -> JobCgroup:
        """A new job's cgroup (`for_child`: ready for a child to `enter`).
        Raises CgroupError."""
        if self.leftovers:
            self.leftovers.retry()
        for _ in range(3):
            name = f"{PREFIX}{os.getpid()}-{next(_NUMBERS)}"
            try:
                memory = ChildCgroup(self.parent, name)
                break
            except CgroupError as e:
                # Left by an earlier gatekeeper with our pid (a container's
                # restart): the next number will do.
                cause = e.__cause__
                if not (isinstance(cause, OSError) and cause.errno == errno.EEXIST):
                    raise
        else:
            raise CgroupError(f"cannot create a job cgroup in {self.parent.path}: the names "
                              f"are taken")
        freezer = None
        if self.freezer is not None:
            freezer = os.path.join(self.freezer, name)
            try:
                os.mkdir(freezer)
            except OSError as exc:
                memory.remove()
                raise CgroupError(f"cannot create cgroup {freezer}: {exc.strerror}") from exc
        return JobCgroup(memory, freezer, for_child=for_child, home=self.home)

    def sweep(self, *, own: bool = True) -> None:
        """Remove what an earlier gatekeeper here left behind (it crashed): empty
        `job-*` cgroups whose gatekeeper is gone; with `own`, at start, ours too
        (a pid can be reused; a running gatekeeper passes False, so a job
        cgroup it made and has not removed yet is left alone)."""
        for base in (self.parent.path, self.freezer):
            if base is None:
                continue
            try:
                names = os.listdir(base)
            except OSError:
                continue
            for name in names:
                if not name.startswith(PREFIX):
                    continue
                owner = name[len(PREFIX):].split("-", 1)[0]
                if owner.isdigit() and int(owner) == os.getpid():
                    if not own:
                        continue
                elif owner.isdigit() and os.path.exists(f"/proc/{owner}"):
                    continue  # another live gatekeeper's
                with contextlib.suppress(OSError):  # not empty: a process runs there
                    os.rmdir(os.path.join(base, name))

    def describe(self) -> str:
        freezer = f", freezer {self.freezer}" if self.freezer else ""
        return f"cgroup v{self.parent.version} memory {self.parent.path}{freezer}"


def _outside_jobs(path: str) -> str:
    """A cgroup path with any trailing job cgroup taken off (a process a failed
    release left in one belongs to the cgroup above)."""
    while os.path.basename(path).startswith(PREFIX):
        path = os.path.dirname(path)
    return path


def _v1_freezer(entries: Sequence[CgroupEntry], mounts: Sequence[CgroupMount]) -> str | None:
    for entry in entries:
        if "freezer" not in entry.controllers:
            continue
        for mount in mounts:
            if mount.version == 1 and "freezer" in mount.controllers:
                root = mount.root.rstrip("/")
                path = entry.path
                if path != root and not path.startswith(root + "/"):
                    continue
                directory = os.path.normpath(mount.mount_point + path[len(root):])
                if os.path.isdir(directory) and os.access(directory, os.W_OK):
                    return directory
    return None


def _leave_v2_cgroup(own: CgroupDir) -> CgroupDir:
    """Make `own` (gatekeeper's v2 cgroup) able to have job children with the
    memory controller: move gatekeeper into `own/supervisor` unless `own` is
    already that, and enable memory for `own`'s children."""
    path = own.path
    if os.path.basename(path) == SUPERVISOR:  # a restart: already moved
        path = os.path.dirname(path)
    procs = pids_in(path)
    others = [p for p in procs if p != os.getpid()]
    if others:
        raise CgroupError(f"cgroup v2 {path} holds other processes {others[:5]} besides "
                          f"gatekeeper: give gatekeeper a delegated cgroup of its own")
    if procs:
        supervisor = os.path.join(path, SUPERVISOR)
        try:
            os.mkdir(supervisor)
        except FileExistsError:
            pass
        except OSError as exc:
            raise CgroupError(f"cannot create cgroup {supervisor}: {exc.strerror} "
                              f"(needs a delegated subtree: Delegate=yes)") from exc
        _write(os.path.join(supervisor, "cgroup.procs"), "0",
               f"move gatekeeper into {supervisor}")
    parent = CgroupDir(own.version, path, own.top, own.top_is_root, own.memory)
    ChildCgroup._enable_v2_memory(path)
    return parent
