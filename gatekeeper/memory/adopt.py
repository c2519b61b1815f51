"""Proxy mode's per-job cgroups: the distccd child serving a job is moved into a
cgroup of its own below distccd's, for exactly that job, and back.

Why: in proxy mode gatekeeper does not start the job's processes, distccd's
pre-forked children do, each serving job after job. Sampling their trees misses
short compiles and guesses the charge; a job cgroup makes the kernel count it.
The child is moved in before the job's request reaches it (the job's task
holds the request in the client's socket until then), so everything it and its
compiler allocate for the job is charged there; memory it had before (its own
baseline) stays with distccd's cgroup (neither v1 nor v2 moves old charges).

One adoption, in the job's task (`ProxyJobs.run`):

    FIND      our backend connection's other end -> its inode (sock_diag) ->
              the distccd child holding it (/proc/PID/fd; pids that served
              earlier jobs first, newest first), in one pass with every job
              looking at the same time (`_look_up`). distccd's child accepts at
              once when one is idle; it is looked for for up to ADOPT_WAIT,
              else the job is sampled like before.
    ADOPTED   a job cgroup made below the child's own cgroup, the child moved in
    SENT HOME at the job's hand-off, before its slot goes on: the child moved
              back to its cgroup if it is still in the job's (it may already
              serve the next job, which moved it on)
    RELEASED  in the job's own task: the peak read, the job cgroup removed

Moves are cgroup.procs writes, done in the trio thread with no checkpoint
between checking where the child is and moving it, so two jobs that the same
child serves one after the other never move it in the wrong order (measured:
41 us per move, v1, median of 40; the first after a while took 14.6 ms).

Assumes distccd's model, where the process that accepted a connection serves
it, one at a time: a backend that accepts in a parent and forks per connection
may be found as that parent (it holds the socket until it forks), which would
then be moved for the job, children and all (a distcc request is needed to
adopt at all, so the backend is a distccd). A backend whose one process serves
several connections at once (an event loop, threads) is found out the first
time the process a job is found in still holds the socket of the job adopted
into it before: a job cgroup would charge every connection's memory to
whichever job moved it last, so adoption stops, said once.
A distccd child serving job after job is not mistaken for one: it closes a
job's socket before it accepts the next, though gatekeeper's side of the
earlier job may still be running.

Where gatekeeper may not make cgroups below distccd's (not root; cgroup v2,
where distccd's own cgroup holding processes forbids memory-controlled
children), the first failure is logged once with its reason, and `/status`
says jobs are sampled.
"""

from __future__ import annotations

import logging
import os
import re
from collections import deque

import trio

from gatekeeper.memory.job_cgroup import (
    PREFIX,
    CgroupError,
    JobCgroup,
    JobCgroups,
    move_pid,
    pids_in,
    transient,
)
from gatekeeper.memory.meter import (
    Ends,
    SocketFinder,
    backend_processes,
    match_everywhere,
    match_holders,
    socket_targets,
    still_serves,
)

log = logging.getLogger("gatekeeper")

# How long a job's start waits for distccd to accept its connection so its
# child can be adopted: an idle pre-forked child accepts within a millisecond;
# a busy distccd (all --jobs children at work) keeps it in its backlog, and the
# job is then sampled instead of waiting longer.
ADOPT_WAIT = 0.25
# Until one job's process has been found, this many jobs in a row whose
# process is not found mean it cannot be (no permission to read distccd's
# /proc/PID/fd, a backend in another network namespace): adoption stops, and
# no later job waits ADOPT_WAIT for nothing.
GIVE_UP_AFTER = 3
# Lookups back off from 1 ms to this between tries.
MAX_PAUSE = 0.02
# Distinct /proc/PID/cgroup texts remembered: one per cgroup distccd's
# children live in (one, usually); bounded all the same.
MAX_PLACES = 16
_JOB_CGROUP = re.compile(rb"/" + PREFIX.encode() + rb"\d+-\d+(?=/|\n|$)")

class _Lookup:
    """One job's turn in a batched lookup (`Adopter._look_up`)."""

    __slots__ = ("answered", "ends", "pid")

    def __init__(self, ends: Ends) -> None:
        self.ends = ends
        self.answered = False
        self.pid: int | None = None


class Adoption:
    """One job's adopted backend process and its cgroup."""

    def __init__(self, pid: int, cgroup: JobCgroup, place: JobCgroups, home: str,
                 freezer_home: str | None, ends: Ends) -> None:
        self.pid = pid
        self.ends = ends
        """Our connection's ends: whether the process still serves it."""
        self.cgroup = cgroup
        self.place = place
        self.home = home
        """The child's own memory cgroup (distccd's), where it goes back."""
        self.freezer_home = freezer_home
        self.home_sent = False
        """`Adopter.send_home` ran: the process is no longer this job's."""


class Adopter:
    """Adopts the backend processes of proxy-mode jobs (see the module docstring).
    Owned by `job.ProxyJobs`; `close` at the server's end."""

    def __init__(self) -> None:
        self._finder: SocketFinder | None = None  # opened at the first job
        self._lookups = trio.Lock()  # the finder is one netlink socket; fair (FIFO)
        self._waiting: list[_Lookup] = []
        self._places: dict[bytes, JobCgroups] = {}
        self._known: deque[int] = deque(maxlen=64)
        self.failure: str | None = None
        """Why jobs cannot be adopted (set once, at the first failure)."""
        self.adopted = 0
        self._misses = 0
        self._live: dict[int, Adoption] = {}
        """The adoption each process was last moved for, until released."""

    def close(self) -> None:
        """At the server's end: the finder, and a last try at job cgroups a zombie
        kept (what is still left is swept by the next start)."""
        if self._finder is not None:
            self._finder.close()
            self._finder = None
        for place in self._places.values():
            place.leftovers.retry()

    async def adopt(self, ends: Ends) -> Adoption | None:
        """Find the process serving our connection `ends` and move it into a new
        job cgroup. None if it cannot be (logged once; the job is sampled)."""
        if self.failure is not None:
            return None
        pid = await self._find(ends)
        if pid is None:
            self._misses += 1
            if self.adopted == 0 and self._misses >= GIVE_UP_AFTER:
                self._fail(f"the backend's process serving a job was not found for "
                           f"{GIVE_UP_AFTER} jobs in a row")
            return None
        if pid == os.getpid():
            return None  # never ourselves (a backend in gatekeeper's own process)
        earlier = self._live.get(pid)
        if earlier is not None and await self._still_serves(pid, earlier.ends):
            self._fail(f"pid {pid}, the backend's process, serves several connections at "
                       f"once; per-job cgroups need one job per process at a time, as "
                       f"distccd's children")
            return None
        try:
            place, home, freezer_home = self._place_of(pid)
            cgroup = place.create(for_child=False)
        except CgroupError as e:
            if transient(e):
                log.warning("job measured by sampling: %s", e)
            else:
                self._fail(str(e))
            return None
        try:
            move_pid(pid, cgroup.path)
            if cgroup.freezer is not None:
                move_pid(pid, cgroup.freezer)
        except CgroupError as e:
            self._restore(pid, home, freezer_home)
            cgroup.close_fds()
            _quietly_remove(cgroup, place)
            log.debug("could not adopt pid %d: %s", pid, e)  # gone already: its job ended
            return None
        cgroup.close_fds()
        self.adopted += 1
        self._live[pid] = adoption = Adoption(pid, cgroup, place, home, freezer_home, ends)
        return adoption

    def send_home(self, adoption: Adoption) -> None:
        """The job's backend part is over: its process goes back home unless it
        already serves another job. What must happen before the job's slot goes
        on (the next job may be served by the same child); the rest of `release`
        can wait (measured: 197 us for all of it per job as root, at -j 1)."""
        if adoption.home_sent:
            return
        adoption.home_sent = True
        if self._live.get(adoption.pid) is adoption:
            del self._live[adoption.pid]
        if adoption.pid in pids_in(adoption.cgroup.path):
            self._restore(adoption.pid, adoption.home, adoption.freezer_home)

    def release(self, adoption: Adoption) -> int | None:
        """The job is over: its process home (unless `send_home` did it), the job
        cgroup's peak read, the cgroup removed. Returns the peak."""
        self.send_home(adoption)
        peak = adoption.cgroup.peak()
        _quietly_remove(adoption.cgroup, adoption.place)
        return peak

    # -- internals --------------------------------------------------------

    async def _find(self, ends: Ends) -> int | None:
        if self._finder is None:
            self._finder = SocketFinder()
        deadline = trio.current_time() + ADOPT_WAIT
        pause = 0.001
        while True:
            pid = await self._look_up(ends)
            if pid is not None:
                if pid not in self._known:
                    self._known.append(pid)
                return pid
            if trio.current_time() + pause > deadline:
                return None
            await trio.sleep(pause)  # distccd has not accepted it yet
            pause = min(MAX_PAUSE, pause * 2)

    async def _look_up(self, ends: Ends) -> int | None:
        """One look for the process serving `ends`, in one pass with every job
        that waits for a look meanwhile: the job holding the lock looks up all
        that are waiting; those it answered find their answer when their turn
        comes (a waiter cancelled leaves its question to be answered for
        nobody, which costs one more fd match). The sockets' inodes and the
        fds of the processes that served earlier jobs are read here, in the
        event loop (procfs and sock_diag answer from memory, ~0.1 ms): in a
        worker thread, each look took 0.7 ms and the event loop, waiting for
        the GIL behind it, 8 ms to make and enter a job cgroup (bench/
        small_jobs.py, as root). Only a search of every process, for a child
        never seen, goes to a thread."""
        assert self._finder is not None  # opened by _find
        mine = _Lookup(ends)
        self._waiting.append(mine)
        async with self._lookups:
            if not mine.answered:
                batch, self._waiting = self._waiting, []
                found: list[int | None] = [None] * len(batch)
                connections = [q.ends for q in batch]
                # Newest first: a distccd child that served lately serves again;
                # pids from long ago may be gone, or reused by anything.
                known = list(reversed(self._known))
                if self._finder.exact:
                    wanted = socket_targets(connections, self._finder)
                    tried = match_holders(known, wanted, found)
                    if wanted:
                        await trio.to_thread.run_sync(match_everywhere, wanted, found, tried)
                else:  # each question reads the whole TCP table: not in the loop
                    found = await trio.to_thread.run_sync(
                        backend_processes, connections, known, self._finder)
                for question, pid in zip(batch, found, strict=True):
                    question.pid, question.answered = pid, True
        return mine.pid

    async def _still_serves(self, pid: int, ends: Ends) -> bool:
        """Whether `pid` still holds the backend's socket of the connection
        with these ends (a distccd child closed it before it accepted again)."""
        assert self._finder is not None  # opened by _find
        ours, theirs = ends
        if self._finder.exact:
            return still_serves(pid, ours, theirs, self._finder)  # one process's fds
        return await trio.to_thread.run_sync(still_serves, pid, ours, theirs, self._finder)

    def _place_of(self, pid: int) -> tuple[JobCgroups, str, str | None]:
        """Where the child's job cgroups go: below its own memory cgroup (the one
        above, if a failed release left it in a job cgroup), one place per cgroup."""
        try:
            with open(f"/proc/{pid}/cgroup", "rb") as f:
                # A few hundred bytes, the cache key; a job cgroup the child is
                # still in (its last job not yet released) counts as its parent.
                key = _JOB_CGROUP.sub(b"", f.read())
        except OSError as e:
            raise CgroupError(f"cannot read pid {pid}'s cgroups: {e.strerror}") from e
        cached = self._places.get(key)
        if cached is None:
            cached = JobCgroups.of_process(pid)  # looked up, swept, probed: once
            log.info("distccd's jobs each get a cgroup of their own under %s",
                     cached.describe())
            if len(self._places) >= MAX_PLACES:
                del self._places[next(iter(self._places))]  # the oldest
            self._places[key] = cached
        return cached, cached.parent.path, cached.freezer

    def _restore(self, pid: int, home: str, freezer_home: str | None) -> None:
        for where in (home, freezer_home):
            if where is None:
                continue
            try:
                move_pid(pid, where)
            except CgroupError as e:
                log.debug("could not move pid %d back: %s", pid, e)  # it exited

    def _fail(self, why: str) -> None:
        self.failure = why
        log.warning("proxy-mode jobs measured by sampling: cannot give distccd's jobs "
                    "cgroups of their own (%s)", why)


def _quietly_remove(cgroup: JobCgroup, place: JobCgroups) -> None:
    """Remove it, or leave it to be removed at a later job (a zombie of a
    forking backend keeps it busy until reaped)."""
    try:
        if not cgroup.remove():
            place.leftovers.keep(cgroup)
    except CgroupError as e:
        log.warning("%s", e)
