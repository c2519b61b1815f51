"""The out-of-band nudge that wakes `distccd --inetd` (gatekeeper.inetd_wake), on real
AF_UNIX socketpairs: it wakes a reader blocked in select(), an ordinary read never
sees it, and no mix of data, nudges and partial reads ever changes the byte stream."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import shlex
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from gatekeeper.distcc.inetd_wake import Waker, hang_up, oob_available, poke, unread

pytestmark = pytest.mark.skipif(
    not oob_available(),
    reason="this kernel has no AF_UNIX out-of-band data (Linux >= 5.15 has it)")


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    theirs.setblocking(False)
    with ours, theirs:
        yield ours, theirs


def readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def read_all(sock: socket.socket, size: int = 65536) -> bytes:
    out = b""
    while True:
        try:
            chunk = sock.recv(size)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def test_nudge_wakes_select_but_a_read_finds_nothing(
        pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    assert not readable(theirs)
    assert poke(ours)
    assert readable(theirs)  # what wakes distccd's select()
    with pytest.raises(BlockingIOError):  # ... and its read() finds nothing
        theirs.recv(1)
    assert not readable(theirs)
    assert unread(ours) == 0


def test_second_nudge_waits_until_the_first_was_read(
        pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    assert poke(ours)
    before = unread(ours)
    assert before > 0
    for _ in range(5):  # unread: sending another would turn the first into data
        assert poke(ours)
    assert unread(ours) == before
    ours.send(b"abc")
    assert read_all(theirs) == b"abc"
    assert unread(ours) == 0


def test_nudge_on_a_closed_peer_says_stop(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    theirs.close()
    assert not poke(ours)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.binary(min_size=1, max_size=64).map(lambda b: ("data", b)),
                          st.just(("poke", b"")),
                          st.integers(1, 80).map(lambda n: ("read", n))),
                max_size=40))
def test_stream_is_unchanged_by_any_mix_of_nudges(steps: list[tuple[str, object]]) -> None:
    """Whatever order data, nudges and reads of any size come in, the reader sees
    exactly the data bytes, in order."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        theirs.setblocking(False)
        sent = received = b""
        for kind, arg in steps:
            if kind == "data":
                assert isinstance(arg, bytes)
                ours.send(arg)
                sent += arg
            elif kind == "poke":
                assert poke(ours)
            else:
                assert isinstance(arg, int)
                with contextlib.suppress(BlockingIOError):
                    received += theirs.recv(arg)
        ours.shutdown(socket.SHUT_WR)
        received += read_all(theirs)
        assert received == sent


async def test_waker_nudges_registered_sockets_each_interval(
        pair: tuple[socket.socket, socket.socket],
        autojump_clock: trio.testing.MockClock) -> None:
    ours, theirs = pair
    waker = Waker(interval=0.02)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(waker.run)
        await trio.sleep(1)
        assert waker.pokes == 0  # nothing registered: asleep, not ticking
        with waker.waking(ours):
            start = trio.current_time()
            await trio.lowlevel.wait_readable(theirs)
            assert trio.current_time() - start == pytest.approx(0.02)
            with pytest.raises(BlockingIOError):
                theirs.recv(1)
            await trio.lowlevel.wait_readable(theirs)  # and again, next interval
            assert waker.pokes == 2
        await trio.sleep(1)
        assert waker.pokes == 2  # unregistered: no more nudges
        nursery.cancel_scope.cancel()


async def test_waker_drops_a_socket_whose_peer_is_gone(
        pair: tuple[socket.socket, socket.socket],
        autojump_clock: trio.testing.MockClock) -> None:
    ours, theirs = pair
    waker = Waker(interval=0.02)
    theirs.close()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(waker.run)
        with waker.waking(ours):
            await trio.sleep(1)
            assert waker.pokes == 1  # tried once, then stopped
        nursery.cancel_scope.cancel()


def test_hang_up_turns_a_leftover_nudge_into_a_clean_eof(
        pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    theirs.send(b"reply")
    assert poke(ours)  # never read by the child
    spare = socket.socket(fileno=os.dup(theirs.fileno()))  # what the child left behind
    try:
        hang_up(theirs)
        assert read_all(ours) == b"reply"
        assert ours.recv(1) == b""  # EOF, not ECONNRESET, though a copy is still open
    finally:
        spare.close()


def test_plain_close_with_a_leftover_nudge_resets_the_peer(
        pair: tuple[socket.socket, socket.socket]) -> None:
    # Why hang_up drains first: the kernel behaviour it guards against.
    ours, theirs = pair
    theirs.send(b"reply")
    assert poke(ours)
    theirs.close()
    assert ours.recv(100) == b"reply"
    with pytest.raises(ConnectionResetError):
        ours.recv(1)


# distccd's wait for its compiler in miniature (dcc_collect_child): waitpid with
# WNOHANG, then select() on its non-blocking client socket (here with a 60 s
# timeout instead of distccd's 1 s, so only a nudge can end it early), then
# the reply.
_FAKE_DISTCCD = """
import os, select, socket, subprocess, sys
s = socket.socket(fileno=0)
s.setblocking(False)
child = subprocess.Popen(["sleep", sys.argv[1]])
s.send(b"S")  # its compiler runs
while child.poll() is None:
    if select.select([s], [], [], 60)[0]:
        try:
            s.recv(1)
        except BlockingIOError:
            pass  # the nudge: skipped by an ordinary read
s.send(b"done")
"""


def following_waker() -> Waker:
    waker = Waker(interval=0.02)
    if not waker.following:
        pytest.skip("this kernel has no pidfds or /proc/PID/task/TID/children")
    return waker


async def receive_when_readable(sock: socket.socket, size: int) -> bytes:
    with trio.fail_after(30):
        await trio.lowlevel.wait_readable(sock)
    return sock.recv(size)


@dataclasses.dataclass
class FollowedRun:
    """What one fake distccd's compile looked like from the waker."""
    done: bytes
    took: float
    """From distccd's start signal to its reply (trio's clock)."""
    pokes: int
    looks: int
    """Nudges and children listings over that time."""
    followed: int | None
    """The pid the waker ended up following."""


async def _follow_to_the_end(waker: Waker, ours: socket.socket,
                             proc: trio.Process) -> FollowedRun:
    """Run `waker` on the relay end `ours` of `proc` (a fake distccd, or a
    COMMAND that forks one) until the fake replies, then reap it."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(waker.run)
        with waker.waking(ours) as wake:
            waker.started(wake, proc.pid)
            assert await receive_when_readable(ours, 1) == b"S"
            start, looks, pokes = trio.current_time(), waker.looks, waker.pokes
            done = await receive_when_readable(ours, 16)
            run = FollowedRun(done, trio.current_time() - start, waker.pokes - pokes,
                              waker.looks - looks, wake.pid)
        await proc.wait()
        nursery.cancel_scope.cancel()
    return run


async def test_a_compile_end_wakes_distccd_once_and_nothing_ticks_while_it_runs(
        pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    waker = following_waker()
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", _FAKE_DISTCCD, "1.0"], stdin=theirs.fileno())
    theirs.close()
    run = await _follow_to_the_end(waker, ours, proc)
    assert run.done == b"done"
    assert 1.0 <= run.took < 10, run.took  # woken, not at its 60 s timeout
    # Nudged when the compiler ended (again at each look until distccd
    # reaped it: a zombie is still its child; the clock would have
    # nudged about 50 times) ...
    assert 1 <= run.pokes <= 10, run.pokes
    # ... and not ticking through its second of running: the children
    # were listed only until the compiler was found and after it ended
    # (a clock at 20 ms would have looked about 50 times).
    assert run.looks <= 20, run.looks


@pytest.fixture
def interpreter_named_distccd(tmp_path: Path) -> Path:
    """This Python, by a name /proc/PID/comm shows as distccd."""
    distccd = tmp_path / "distccd"
    distccd.symlink_to(os.path.realpath(sys.executable))
    return distccd


async def test_a_distccd_that_command_forked_is_followed(
        pair: tuple[socket.socket, socket.socket], interpreter_named_distccd: Path) -> None:
    """COMMAND may be a shell (or timeout, sudo) that forks distccd: its
    compiler is still found (by distccd's name) and its end still wakes it."""
    ours, theirs = pair
    waker = following_waker()
    distccd = interpreter_named_distccd
    # `; true`: the shell forks distccd instead of becoming it.
    script = f"{shlex.quote(str(distccd))} -c {shlex.quote(_FAKE_DISTCCD)} 1.0; true"
    proc = await trio.lowlevel.open_process(["sh", "-c", script], stdin=theirs.fileno())
    theirs.close()
    run = await _follow_to_the_end(waker, ours, proc)
    assert run.done == b"done"
    assert run.took < 10, run.took  # woken, not at its 60 s timeout
    assert run.followed != proc.pid  # it follows distccd, not the shell


async def test_without_pidfds_the_waker_nudges_by_the_clock(
        pair: tuple[socket.socket, socket.socket],
        autojump_clock: trio.testing.MockClock) -> None:
    ours, theirs = pair
    waker = Waker(interval=0.02, follow_children=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(waker.run)
        with waker.waking(ours) as wake, trio.fail_after(1):
            waker.started(wake, os.getpid())
            await trio.lowlevel.wait_readable(theirs)
            with pytest.raises(BlockingIOError):
                theirs.recv(1)
            await trio.lowlevel.wait_readable(theirs)
            assert waker.pokes == 2 and waker.looks == 0
        nursery.cancel_scope.cancel()
