"""Waking ``distccd --inetd`` the moment its compiler is done.

Why: distccd waits for its compiler in ``dcc_collect_child``: ``waitpid(WNOHANG)``
then ``select()`` on its client socket with a one-second timeout, to notice a
client that hangs up. A daemon-mode distccd is woken early by its SIGCHLD
handler; an inetd-started one has none, so every job lasts a whole number of
seconds (measured: a 20 ms compile takes 1.01 s), which throws away most of
what admission control wins on a farm of short compiles.

How: in relayed inetd mode the child's stdin/stdout is one end of an AF_UNIX
socketpair, non-blocking, and gatekeeper relays the client's bytes through the
other end (and keeps a copy of the child's end until the child exits: see
`hang_up`). When the job's compiler ends -- seen through its pidfd; the
compiler is found by listing distccd's children while none runs -- it sends
one byte of out-of-band data (``MSG_OOB``, Linux >= 5.15) on its end (without
pidfds: every `WAKE_INTERVAL`, the whole job long). On AF_UNIX an out-of-band byte makes
the socket readable, but an ordinary ``read()`` skips it: distccd's ``select()``
returns, its ``read()`` finds nothing (EAGAIN, which distccd takes as a spurious
wakeup), its ``waitpid`` sees the finished compiler, and it replies at once.

Why this cannot corrupt the stream: ordinary reads never return an
out-of-band byte, wherever it sits in the stream -- except that a second one
sent before the first was read turns the first into ordinary data (TCP's rule,
which AF_UNIX follows). So a poke is sent only when the peer has read
everything sent to it (``TIOCOUTQ`` == 0): the previous byte is gone.
And why the child's end must be non-blocking: a blocking ``read()`` that skips
the byte would wait for data that never comes.

One task serves every relayed job (`Waker.run`): it sleeps on one epoll set of
the compilers' pidfds, and ticks only while some job has no compiler known (a
few ms while distccd reads the request, and after its compiler ended), so a
running compile costs nothing.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import os
import select
import socket
from collections.abc import Iterator

import trio

from gatekeeper.net.sockqueue import send_queue

# How often each waiting distccd is nudged: a finished compile is noticed
# within this (10 ms on average), instead of within distccd's second.
WAKE_INTERVAL = 0.02

def unread(sock: socket.socket) -> int:
    """Bytes we sent on `sock` that its peer has not read yet (kernel memory
    charged, for AF_UNIX: 0 exactly when the peer has read everything)."""
    return send_queue(sock.fileno())


def poke(sock: socket.socket) -> bool:
    """Nudge the reader of `sock`'s peer end with an out-of-band byte, if it has
    read everything so far. False once the peer is gone (stop poking)."""
    try:
        if unread(sock) == 0:
            sock.send(b"\0", socket.MSG_OOB)
    except BlockingIOError:
        pass  # its buffer is full: it is busy reading, no nudge needed
    except OSError:
        return False
    return True


def hang_up(sock: socket.socket, *, limit: int = 1 << 20) -> None:
    """Close gatekeeper's copy of the child's end once the child has exited.

    First read away what the child left unread -- normally just a nudge that
    came after its last read; else request bytes it never wanted -- because
    closing a unix socket with unread data gives its peer ECONNRESET instead
    of EOF, and the relay would take a delivered reply for a failed one. Then
    shut it down, so whatever the child left behind holding a copy cannot keep
    the job open: our end sees EOF after the last byte the child wrote."""
    try:
        sock.setblocking(False)
        while limit > 0:
            chunk = sock.recv(min(limit, 65536))
            if not chunk:
                break
            limit -= len(chunk)
    except OSError:
        pass  # EAGAIN: nothing left (the usual case); anything else: closing anyway
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


@functools.cache
def oob_available() -> bool:
    """Whether this kernel has AF_UNIX out-of-band data, and skips it on an
    ordinary read as `poke` relies on (checked once, on a private pair)."""
    try:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError:
        return False
    with ours, theirs:
        theirs.setblocking(False)
        try:
            ours.send(b"x", socket.MSG_OOB)
            ours.send(b"y")
            return theirs.recv(4) == b"y"
        except OSError:
            return False


def can_follow_children() -> bool:
    """Whether a job's compiler can be watched: pidfds (Linux >= 5.3) and
    /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN)."""
    me = os.getpid()
    return hasattr(os, "pidfd_open") and os.path.exists(f"/proc/{me}/task/{me}/children")


def _command_name(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().strip()
    except OSError:
        return b""


def children(pid: int) -> list[int]:
    """The children of a single-threaded process (distccd), [] once it is gone."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children", "rb") as f:
            return [int(word) for word in f.read().split()]
    except (OSError, ValueError):
        return []


class Wake:
    """One relayed job's registration: its socket, distccd's pid once started,
    and pidfds of the children (compilers) being waited for."""

    __slots__ = ("pid", "pidfds", "sock")

    def __init__(self, sock: socket.socket, pid: int | None) -> None:
        self.sock, self.pid = sock, pid
        self.pidfds: dict[int, int] = {}
        """child pid -> its pidfd."""

    @property
    def looking(self) -> bool:
        """Started, and no compiler known yet (or the last one ended)."""
        return self.pid is not None and not self.pidfds


class Waker:
    """Wakes each registered job's distccd once its compiler has ended.

    Following children (the default where the kernel can): while a job has
    no compiler running, its distccd's children are listed every `interval`
    (while it receives the request, a few ms; and after the compiler ended,
    until distccd answers); a compiler found is waited for through its pidfd,
    in one epoll set that one task sleeps on, and its end sends one nudge. So
    a long compile costs nothing while it runs (measured before: a nudge and a
    distccd wake-up every 20 ms, 2.5 % of a core per running job). A job not
    yet started, or a kernel without pidfds, is nudged every `interval`, as
    before (see the module docstring)."""

    def __init__(self, interval: float = WAKE_INTERVAL, *,
                 follow_children: bool | None = None) -> None:
        self.interval = interval
        follow = can_follow_children() if follow_children is None else follow_children
        self._epoll: select.epoll | None = select.epoll() if follow else None
        self._jobs: dict[int, Wake] = {}
        self._by_fd: dict[int, Wake] = {}
        self._nap: trio.CancelScope | None = None
        self.pokes = 0
        """Nudges sent or attempted (for tests and curiosity)."""
        self.looks = 0
        """Children listings read (for tests and curiosity)."""

    @property
    def following(self) -> bool:
        return self._epoll is not None

    @contextlib.contextmanager
    def waking(self, sock: socket.socket, pid: int | None = None) -> Iterator[Wake]:
        """Wake `sock`'s reader while the block runs (the caller owns and
        closes it); tell `started` the child's pid when it has one."""
        wake = Wake(sock, pid)
        self._jobs[id(wake)] = wake
        self._changed()
        try:
            yield wake
        finally:
            self._jobs.pop(id(wake), None)
            for fd in list(wake.pidfds.values()):
                self._unwatch(wake, fd)

    def started(self, wake: Wake, pid: int) -> None:
        wake.pid = pid
        self._changed()

    def _changed(self) -> None:
        if self._nap is not None:
            self._nap.cancel()

    def _unwatch(self, wake: Wake, fd: int) -> None:
        self._by_fd.pop(fd, None)
        for child, child_fd in list(wake.pidfds.items()):
            if child_fd == fd:
                del wake.pidfds[child]
        if self._epoll is not None:
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)
        os.close(fd)

    def _stop_following(self) -> None:
        """No more pidfds (none here, or the waker's end): every one closed,
        including those of jobs dropped as gone but not yet unregistered."""
        for fd, wake in self._by_fd.items():
            os.close(fd)
            wake.pidfds.clear()
        self._by_fd.clear()
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None

    def _poke(self, key: int, wake: Wake) -> None:
        self.pokes += 1
        if not poke(wake.sock):
            self._jobs.pop(key, None)

    def _look(self, wake: Wake) -> None:
        """Find the compiler(s) distccd started; one already gone is a poke."""
        assert wake.pid is not None and self._epoll is not None
        self.looks += 1
        found = children(wake.pid)
        parent = _command_name(wake.pid)
        if found and parent != b"distccd":
            # COMMAND may fork distccd (a shell, timeout, sudo): follow it. A
            # child still named as its parent has not run distccd yet: look
            # again next tick rather than take it for the compiler.
            names = {child: _command_name(child) for child in found}
            for child, name in names.items():
                if name == b"distccd":
                    wake.pid = child
                    found = children(child)
                    break
            else:
                if parent in names.values():
                    return
        for child in found:
            try:
                fd = os.pidfd_open(child)
            except ProcessLookupError:
                self._poke(id(wake), wake)  # ended (and reaped) before we looked
                continue
            except OSError as e:
                if e.errno in (errno.ENOSYS, errno.EINVAL, errno.EPERM):
                    self._stop_following()  # no pidfds here: nudge by the clock
                    return
                return  # out of fds or memory for now: look again next tick
            try:
                self._epoll.register(fd, select.EPOLLIN)
            except OSError:
                os.close(fd)
                return
            wake.pidfds[child] = fd
            self._by_fd[fd] = wake

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            self._stop_following()

    async def _run(self) -> None:
        next_tick: float | None = None
        while True:
            ticking = any(w.pid is None or self._epoll is None or w.looking
                          for w in self._jobs.values())
            if not ticking:
                next_tick = None
            elif next_tick is None:
                next_tick = trio.current_time() + self.interval
            with trio.CancelScope(deadline=math.inf if next_tick is None else next_tick) as nap:
                self._nap = nap
                if self._epoll is not None:
                    await trio.lowlevel.wait_readable(self._epoll.fileno())
                else:
                    await trio.sleep_forever()
            self._nap = None
            if self._epoll is not None:
                for fd, _ in self._epoll.poll(0):
                    wake = self._by_fd.get(fd)
                    if wake is None:
                        continue
                    self._unwatch(wake, fd)
                    if not wake.pidfds and id(wake) in self._jobs:
                        self._poke(id(wake), wake)  # its compiler ended
            if next_tick is None or trio.current_time() < next_tick:
                continue  # woken by an exit or a new job: no tick due yet
            next_tick = None
            for key, wake in list(self._jobs.items()):
                if wake.pid is None or self._epoll is None:
                    self._poke(key, wake)
                elif wake.looking:
                    self._look(wake)
