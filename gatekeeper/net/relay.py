"""The zero-copy data path: one epoll set moves the bytes of every running job.

Why not a task per direction (as `copy.copy_both_ways` does for the portable path):
each job then costs a nursery and two tasks, and every chunk a trio
wait_readable/wait_writable, i.e. an epoll_ctl to register and one to
unregister. Under a storm of small jobs that was most of gatekeeper's CPU
(a bare trio proxy of that shape does ~2,100 jobs/s here). Here each socket is
registered once, edge-triggered, in one epoll set that one task waits on; an
event runs that job's two directions until both would block. The handler task
of a job only waits for its end (and for its idle deadline).

Per direction, exactly as in the portable path: socket -> pipe -> socket with
os.splice (the bytes never enter Python), one pipe's worth in flight so a
side that stops reading stalls the other through TCP flow control; an EOF
travels on as a half-close in that direction only; an error ends the job
with the failing side named, and the caller resets the other peer. The first
bytes of a reply can be kept (``reply_prefix``, distccd's status): those few
go through Python with os.read/os.write.

Handoff: with the slot limit binding, what matters is how soon the next
queued job's bytes reach the backend after one ends. So a job may name an
`on_complete` callback, run by the relay task itself the moment both
directions have ended cleanly, or for a distcc job the moment all of distccd's
reply and its EOF are in (after the backend left the epoll set; the reply's
last bytes wait in the pipe and reach the client right after the callback):
the server closes the backend connection and releases the slot there, and the
gate starts the next job's data path in the same step (`Relay.open` is
synchronous) -- no trip through the scheduler to the finished job's task and
back to the next one's. The finished job's own task does its bookkeeping
(logging, learning) afterwards, and the relay polls again before yielding to
it (`EAGER_ROUNDS`).

Fairness: one event pumps a job for at most `BUDGET` chunks; a job with more
to move goes on the ready list and the relay yields to trio after at most
1 + `EAGER_ROUNDS` rounds, so a 1 GiB transfer cannot starve the accept loop,
the gate or other jobs.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import logging
import os
import select
import socket
from collections.abc import Callable
from typing import Protocol

import trio

from gatekeeper.net.copy import PIPE_SIZE, Transfer, describe_error, means_peer_gone
from gatekeeper.net.sockqueue import receive_queue
from gatekeeper.outcome import Side

log = logging.getLogger("gatekeeper")

_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_EVENTS = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
# A socket readable (or at EOF, or broken) moves the direction it is the
# source of; writable (or broken), the direction it is the destination of.
_READ_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_WRITE_EVENTS = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
# A client whose backend has finished: only its EOF (or a stray byte) matters.
_SINK_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET

# Chunks (pipe loads) one job may move per turn before others get theirs.
BUDGET = 16
DEFAULT_PIPE = 65536  # Linux's default pipe capacity (16 pages)
# A direction that has moved this much is a big transfer: its pipe grows to
# PIPE_SIZE, so it moves in fewer splices.
GROW_AFTER = 4 * DEFAULT_PIPE
MAX_EVENTS = 256  # per epoll_wait; more simply wait for the next round
# Extra rounds of polling and pumping before the relay yields to other tasks
# (bounded: a busy relay must still let the accept loop and the gate run).
EAGER_ROUNDS = 2
# Empty default-size pipes kept for the next job: making and closing two pipes
# per job was a visible share of the handoff from one job to the next.
SPARE_PIPES = 8


class Socket(Protocol):
    """What the relay needs of a socket: a trio socket, or a plain one (the
    server hands a just-connected backend socket over before wrapping it)."""

    def fileno(self) -> int: ...

    def shutdown(self, how: int, /) -> None: ...

    def getsockopt(self, level: int, optname: int, /) -> int: ...


class _PipePool:
    """Spare pipes (read end, write end), each known to be empty."""

    def __init__(self) -> None:
        self._free: list[tuple[int, int]] = []
        self._closed = False

    def take(self) -> tuple[int, int]:
        return self._free.pop() if self._free else os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def give(self, pipe: tuple[int, int], *, empty: bool) -> None:
        if empty and not self._closed and len(self._free) < SPARE_PIPES:
            self._free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    @property
    def fds(self) -> int:
        """File descriptors the spares hold (at most 2 x SPARE_PIPES)."""
        return 2 * len(self._free)

    def close(self) -> None:
        """Close the spares; pipes given back later are closed at once."""
        self._closed = True
        while self._free:
            self.give(self._free.pop(), empty=False)


class _State(enum.Enum):
    BLOCKED = "blocked"
    """Waiting for the kernel: an edge-triggered event will come."""
    BUSY = "busy"
    """Budget spent with more to do: pump again after a yield."""
    DONE = "done"


class _Direction:
    __slots__ = ("complete", "dst", "dst_fd", "dst_side", "ended", "grown", "hup", "moved",
                 "out", "pending", "pipe_r", "pipe_w", "ready", "sink", "size", "src", "src_fd",
                 "src_side", "to_backend", "want")

    def __init__(self, src: Socket, dst: Socket, src_side: Side, dst_side: Side, want: int,
                 pipe: tuple[int, int]) -> None:
        self.src, self.dst = src, dst
        self.src_fd, self.dst_fd = src.fileno(), dst.fileno()
        self.src_side, self.dst_side = src_side, dst_side
        self.to_backend = dst_side is Side.BACKEND
        self.pipe_r, self.pipe_w = pipe
        # The kernel's default pipe until the direction has moved GROW_AFTER:
        # most requests and replies are smaller, and growing costs a syscall.
        self.size = DEFAULT_PIPE
        self.grown = False
        self.moved = 0
        self.pending = 0
        """Bytes in the pipe, read from src, not yet written to dst."""
        self.out = b""
        """Bytes read into Python (the kept prefix), not yet written to dst."""
        self.want = want
        """Bytes of prefix still to read through Python."""
        self.ended = False
        """The source said EOF."""
        self.hup = False
        """epoll said the source shut down: all it sent is in our receive queue."""
        self.complete = False
        """EOF passed on and nothing left to write: this direction is over."""
        self.ready = True
        """The kernel said (or may have said) there is something to do."""
        self.sink = False
        """The destination is gone (a backend that finished, see `RelayJob`):
        only the source's EOF is waited for; a byte from it is an error."""

    def close(self, pool: _PipePool) -> None:
        """Give the pipe up (idempotent): kept for another job only if it is
        empty and still the default size."""
        if self.pipe_r < 0:
            return
        pool.give((self.pipe_r, self.pipe_w), empty=self.pending == 0 and not self.grown)
        self.pipe_r = self.pipe_w = -1

    def pump(self, job: RelayJob) -> _State:
        transfer = job.transfer
        if self.sink:
            return self._drain(job)
        for _ in range(BUDGET):
            if self.out:
                try:
                    n = os.write(self.dst_fd, self.out)
                except BlockingIOError:
                    return _State.BLOCKED
                except OSError as e:
                    return job.fail(self.dst_side, e)
                transfer.reply_head += self.out[:n]  # kept once delivered, as splice.py does
                self.out = self.out[n:]
                self._count(transfer, n)
                continue
            if self.pending:
                try:
                    n = os.splice(self.pipe_r, self.dst_fd, self.pending, flags=_FLAGS)
                except BlockingIOError:
                    return _State.BLOCKED
                except OSError as e:
                    return job.fail(self.dst_side, e)
                self.pending -= n
                self._count(transfer, n)
                continue
            if self.ended:
                return self._pass_eof(job)
            try:
                n = self._read()
            except BlockingIOError:
                return _State.BLOCKED
            except OSError as e:
                return job.fail(self.src_side, e)
            if n == 0:
                self._saw_eof(job)
                continue  # passed on next, as a half-close
        return _State.BUSY

    def _read(self) -> int:
        """Read from the source into the empty pipe, or the kept prefix into
        `out`: how much (0 at EOF). Raises what the read raises."""
        if self.want:
            data = os.read(self.src_fd, self.want)
            n = len(data)
            self.want -= n
            self.out += data
        else:
            n = self.pending = os.splice(self.src_fd, self.pipe_w, self.size, flags=_FLAGS)
        self.moved += n
        if self.moved >= GROW_AFTER and not self.grown:
            self._grow()
        return n

    def gather(self, job: RelayJob) -> bool:
        """Take in what is left of a source that has shut down (`hup`) without
        writing any of it yet: whether its EOF is now all that remains unread.

        For a job whose slot is handed on at the backend's EOF: the next job is
        then started before this reply's last bytes go out to its client, so
        the backend idles for the least time; those bytes follow a moment
        later. Reads only into an empty pipe (a splice into a pipe that is not
        empty may fail for want of room, indistinguishable from an empty
        socket); what does not fit stays for the usual path."""
        for _ in range(3):  # the rest of the kept prefix, then one pipe load
            if self.ended:
                return True
            if self.pending:
                break
            try:
                n = self._read()
            except BlockingIOError:
                return False
            except OSError as e:
                job.fail(self.src_side, e)
                return False
            if n == 0:
                self._saw_eof(job)
                return True
        try:
            if receive_queue(self.src_fd):
                return False
        except OSError:
            return False
        # Shut down, and nothing of it left in the receive queue (a FIN is
        # taken in order, after all data before it): the EOF is what remains
        # -- unless it was a reset, whose error the kernel reports only after
        # the data that came before it: that fails the job as a read would.
        try:
            err = self.src.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as e:
            err = e.errno or errno.EBADF
        if err:
            job.fail(self.src_side, OSError(err, os.strerror(err)))
            return False
        self._saw_eof(job)
        return True

    def _drain(self, job: RelayJob) -> _State:
        """Wait for the source's EOF after the destination finished: the client
        closing after its reply. A byte instead is what a closed backend would
        answer with a reset."""
        if self.ended:  # its EOF came in before the hand-off
            self.complete = True
            return _State.DONE
        try:
            data = os.read(self.src_fd, 1)
        except BlockingIOError:
            return _State.BLOCKED
        except OSError as e:
            return job.fail(self.src_side, e)
        if data:
            return job.fail(self.dst_side, BrokenPipeError(
                errno.EPIPE, "the backend had closed; the client sent more (a closed "
                "backend resets it)"))
        self.ended = self.complete = True
        job.transfer.eofs.append(self.src_side)
        return _State.DONE

    def _grow(self) -> None:
        """A big transfer: it moves in fewer splices through 1 MiB."""
        self.grown = True
        # Refused (pipe-max-size, pipe-user-pages-soft): the default pipe works.
        with contextlib.suppress(OSError):
            self.size = fcntl.fcntl(self.pipe_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)

    def _count(self, transfer: Transfer, n: int) -> None:
        if self.to_backend:
            transfer.to_backend += n
        else:
            transfer.to_client += n
        transfer.last_activity = trio.current_time()

    def _saw_eof(self, job: RelayJob) -> None:
        self.ended = True
        job.transfer.eofs.append(self.src_side)

    def _pass_eof(self, job: RelayJob) -> _State:
        """The source said EOF and all it sent is written: pass the EOF on as a
        half-close."""
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError as e:
            if e.errno != errno.ENOTCONN:
                return job.fail(self.dst_side, e)
        self.complete = True
        return _State.DONE


class RelayJob:
    """One job's two directions, as the relay moves them (see `Relay.open`)."""

    __slots__ = ("backend_done", "done", "down", "early_end", "fds", "finished",
                 "on_complete", "pipes", "registered", "transfer", "up")

    def __init__(self, client: Socket, backend: Socket, transfer: Transfer, reply_prefix: int,
                 pipes: _PipePool) -> None:
        self.transfer = transfer
        self.pipes = pipes
        self.up = _Direction(client, backend, Side.CLIENT, Side.BACKEND, 0, pipes.take())
        try:
            self.down = _Direction(backend, client, Side.BACKEND, Side.CLIENT, reply_prefix,
                                   pipes.take())
        except BaseException:
            self.up.close(pipes)
            raise
        # Nothing comes back before the request has gone: the reply direction
        # waits for its first event (epoll reports a socket already readable
        # when it is registered), which saves a read that would find nothing.
        self.down.ready = False
        self.finished = False
        self.done = trio.Event()
        self.fds = (client.fileno(), backend.fileno())
        self.registered: list[int] = []
        self.on_complete: Callable[[], None] | None = None
        self.early_end = False
        """The backend's EOF ends its part of the job (`Relay.open`'s
        hand_off_at_backend_eof)."""
        self.backend_done = False
        """It has: the relay should run on_complete now, before the client closes."""

    def note(self, fd: int, events: int) -> None:
        """An epoll event on one of the job's sockets: which directions it concerns."""
        readable = events & _READ_EVENTS
        writable = events & _WRITE_EVENTS
        src, dst = (self.up, self.down) if fd == self.up.src_fd else (self.down, self.up)
        if readable:
            src.ready = True
            if events & (select.EPOLLRDHUP | select.EPOLLHUP) and not events & select.EPOLLERR:
                src.hup = True  # a shutdown; a reset (EPOLLERR) is met by reading
        if writable:
            dst.ready = True

    def pump(self) -> _State:
        """Run the directions the kernel has news for until they would block."""
        if self.finished:  # failed: its handler has yet to run; touch nothing
            return _State.DONE
        if (self.early_end and self.down.hup and self.down.ready and not self.backend_done
                and self.down.gather(self) and self._backend_part_over()):
            # Hand the slot on first; this reply's last bytes follow right after.
            self.backend_done = True
            return _State.BUSY
        if self.finished:
            return _State.DONE
        # Once the backend is done, its reply goes out before the client's
        # socket is read: a stray byte from the client fails the job, and the
        # reply must not be cut off by that.
        for direction in (self.down, self.up) if self.up.sink else (self.up, self.down):
            if not direction.ready:
                continue
            if direction.complete:  # an event on a socket whose direction is over
                direction.ready = False
                continue
            state = direction.pump(self)
            if self.finished:
                return _State.DONE
            direction.ready = state is _State.BUSY
        if self.up.complete and self.down.complete:
            self._finish()
            return _State.DONE
        if self.up.sink:
            if self.down.complete:  # the reply is out: its pipe goes back at once
                self.down.close(self.pipes)
        elif self.early_end and self.down.ended and self._backend_part_over():
            self.backend_done = True
        return _State.BUSY if self.up.ready or self.down.ready else _State.BLOCKED

    def _backend_part_over(self) -> bool:
        """The backend's whole reply and its EOF are in our hands (`down.ended`)
        and no request byte is on its way to it, not even one still unread on
        the client's socket (it goes to the backend, as before its end): the
        backend's part is over."""
        if self.up.pending or self.up.out:
            return False
        try:
            return self.up.ended or receive_queue(self.up.src_fd) == 0
        except OSError:
            return False  # the client's next read will tell

    def fail(self, side: Side, exc: OSError) -> _State:
        """A socket call on `side` failed: the job is over. Whatever the errno
        (a reset, or EHOSTUNREACH from a client whose host vanished), it is
        about this connection only; raising here would stop the relay and with
        it every other job."""
        if not means_peer_gone(exc):
            log.warning("job ended by an unusual error on the %s side: %s", side.value, exc)
        if self.transfer.failed is None:
            self.transfer.failed = side
            self.transfer.error = describe_error(exc)
        self._finish()
        return _State.DONE

    def _finish(self) -> None:
        self.finished = True
        self.done.set()

    def close(self) -> None:
        """Give both pipes up (idempotent)."""
        self.up.close(self.pipes)
        self.down.close(self.pipes)


class Relay:
    """Moves bytes for every running job. `run` is its one task (in the server's
    nursery); each job's handler `open`s its job and `wait`s, which returns when
    the job's bytes are done, it failed, it went idle, or the handler is cancelled."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._jobs: dict[int, RelayJob] = {}
        self._ready: dict[RelayJob, None] = {}  # an ordered set
        self._pipes = _PipePool()
        self._sleep: trio.CancelScope | None = None

    async def run(self) -> None:
        try:
            while True:
                if self._ready:
                    await trio.lowlevel.checkpoint()
                else:
                    self._sleep = trio.CancelScope()
                    with self._sleep:
                        await trio.lowlevel.wait_readable(self._epoll.fileno())
                    self._sleep = None
                self._poll()
                self._pump_ready()
                # Look again before yielding: the other tasks woken meanwhile
                # (a finished job's log line, an admitted job's task) are
                # bookkeeping, and a backend's end that came in while this
                # round ran -- a short job, or distccd closing right after its
                # reply -- should start the next job now, not after them.
                for _ in range(EAGER_ROUNDS):
                    if not self._poll():
                        break
                    self._pump_ready()
        finally:
            trio.lowlevel.notify_closing(self._epoll.fileno())
            self._epoll.close()
            self._pipes.close()

    def _poll(self) -> bool:
        """Mark the jobs with events ready; whether there were any."""
        events = self._epoll.poll(0, MAX_EVENTS)
        for fd, mask in events:
            job = self._jobs.get(fd)
            if job is not None:
                job.note(fd, mask)
                self._ready[job] = None
        return bool(events)

    def _pump_ready(self) -> None:
        ready, self._ready = self._ready, {}
        for job in ready:
            state = job.pump()
            if job.backend_done and job.on_complete is not None and not job.finished:
                self._backend_finished(job)
                state = job.pump()  # the reply's last bytes, held back for the hand-off
                if job.down.complete:
                    with contextlib.suppress(OSError, ValueError):  # no more EPOLLOUT wake-ups
                        self._epoll.modify(job.fds[0], _SINK_EVENTS)
            if job.finished:
                self._completed(job)
            elif state is _State.BUSY:
                self._ready[job] = None

    def open(self, client: Socket, backend: Socket, transfer: Transfer, *, reply_prefix: int = 0,
             on_complete: Callable[[], None] | None = None,
             hand_off_at_backend_eof: bool = False) -> RelayJob:
        """Start moving a job's bytes now, without a checkpoint: its sockets join
        the epoll set and what is already buffered moves at once. The caller
        must then `wait` for it (or `discard` it). `on_complete` runs in the
        relay task once both directions ended cleanly (never on failure, idle
        or cancellation; never from inside `open`), after the job's sockets
        have left the epoll set; it must not raise. With
        `hand_off_at_backend_eof` (distcc: distccd closes when its job is done)
        it runs as soon as all of the backend's reply and its EOF are in (what
        the client has yet to get follows right after), with the backend out
        of the epoll set; the job itself then ends when the
        client closes (a byte from it instead fails the job, as the closed
        backend would have)."""
        transfer.last_activity = trio.current_time()
        job = RelayJob(client, backend, transfer, reply_prefix, self._pipes)
        job.on_complete = on_complete
        job.early_end = hand_off_at_backend_eof
        try:
            for fd in job.fds:
                self._epoll.register(fd, _EVENTS)
                job.registered.append(fd)
                self._jobs[fd] = job
            job.pump()
        except BaseException:
            self.discard(job)
            raise
        # Even a job that ended in this first pump is left to the relay task, so
        # completions never nest (a release admitting a job that completes ...).
        if job.finished or job.backend_done or job.up.ready or job.down.ready:
            self._ready[job] = None
            self._wake()
        return job

    async def wait(self, job: RelayJob, idle_timeout: float | None = None) -> Transfer:
        """Wait until the job's bytes are done, it failed, or (with
        `idle_timeout`) nothing moved for that long; then let go of it. Does not
        close either stream."""
        try:
            await _wait(job, idle_timeout, job.transfer)
        finally:
            self.discard(job)
        return job.transfer

    def discard(self, job: RelayJob) -> None:
        """Take the job out of the relay and free its pipes (idempotent)."""
        job.on_complete = None
        self._forget(job)
        job.close()

    def _forget(self, job: RelayJob) -> None:
        # Before any of the job's fds is closed: a closed fd's number may be
        # reused at once, and unregistering it then would hit another socket.
        for fd in job.registered:
            del self._jobs[fd]
            with contextlib.suppress(OSError, ValueError):  # ValueError: relay closed
                self._epoll.unregister(fd)
        job.registered.clear()
        self._ready.pop(job, None)

    def _backend_finished(self, job: RelayJob) -> None:
        """The backend's part of the job is over (see `open`): take its socket
        out of the epoll set before on_complete closes it, and from now on only
        wait for the client's EOF."""
        backend_fd = job.fds[1]
        if backend_fd in job.registered:
            job.registered.remove(backend_fd)
            del self._jobs[backend_fd]
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(backend_fd)
        job.up.sink = True
        job.up.ready = True  # the client may have closed already
        job.up.close(self._pipes)  # empty: back to the pool for the next job
        if job.down.complete:
            job.down.close(self._pipes)
        callback, job.on_complete = job.on_complete, None
        if callback is not None:
            callback()

    def _completed(self, job: RelayJob) -> None:
        callback, job.on_complete = job.on_complete, None
        if callback is not None and job.transfer.failed is None:
            # Its pipes are empty now and go back at once (the next job, started
            # by the callback, may take them): a handed-on slot holds no fds.
            self._forget(job)
            job.close()
            callback()

    @property
    def spare_fds(self) -> int:
        """File descriptors held by spare pipes (bounded: see SPARE_PIPES)."""
        return self._pipes.fds

    def _wake(self) -> None:
        if self._sleep is not None:
            self._sleep.cancel()


async def _wait(job: RelayJob, idle_timeout: float | None, transfer: Transfer) -> None:
    if idle_timeout is None:
        await job.done.wait()
        return
    while not job.finished:
        deadline = transfer.last_activity + idle_timeout
        if trio.current_time() >= deadline:
            transfer.idle = True
            return
        with trio.move_on_at(deadline):
            await job.done.wait()

