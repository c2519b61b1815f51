"""A queued client's request stays on the client (issue 22): the receive window a
connection gets until admission is narrow (net/window.py), opened at admission.

Measured from the client's side, which is exact on loopback: what the client's
send() calls accepted, less what its kernel still holds (TIOCOUTQ), is what
arrived in gatekeeper's receive queue."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from fakes import Running, backend, config, gatekeeper

from gatekeeper.distcc.policy import ArgvPolicy
from gatekeeper.distcc.request import encode_request_head
from gatekeeper.net.sockqueue import send_queue
from gatekeeper.net.window import DEFAULT_QUEUED_WINDOW, SO_BUF_LOCK, WIDEN_MAX
from gatekeeper.server import Server

# The target for a queued connection: at most 16 KiB of this box's memory.
TARGET = 16 * 1024
# A request of the size (preprocessed C++ is often 1-5 MB).
REQUEST = 2 * 1024 * 1024
DIGEST = 32


def request(name: str, size: int = REQUEST) -> bytes:
    payload = hashlib.shake_256(name.encode()).digest(size)
    argv = ["gcc", "-c", name, "-o", name.replace(".c", ".o")]
    return encode_request_head(argv) + b"DOTI%08x" % size + payload


def _whole(data: bytes | bytearray) -> bool:
    doti = data.find(b"DOTI")
    return doti >= 0 and len(data) >= doti + 12 + int(data[doti + 4:doti + 12], 16)


def digesting(hold: trio.Event) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """A backend that reads a whole request (up to its DOTI's end), waits for
    `hold` on the first one, and answers its sha256 (so a corrupted or
    reordered byte shows)."""
    first = [True]

    async def handle(stream: trio.SocketStream) -> None:
        was_first, first[0] = first[0], False
        data = bytearray()
        while not _whole(data):
            chunk = await stream.receive_some(1 << 20)
            if not chunk:
                return
            data += chunk
        if was_first:
            await hold.wait()
        await stream.send_all(hashlib.sha256(data).digest())
    return handle


class Writer:
    """A client writing its request without blocking trio: counts what its
    kernel took, so the receiver's share is known exactly."""

    def __init__(self, stream: trio.SocketStream, data: bytes) -> None:
        self.stream, self.data, self.sent = stream, memoryview(data), 0
        self.done = trio.Event()

    async def run(self) -> None:
        sock = self.stream.socket
        while self.sent < len(self.data):
            self.sent += await sock.send(self.data[self.sent:self.sent + (1 << 20)])
        self.done.set()

    def at_receiver(self) -> int:
        """Bytes that left the client's kernel (on loopback: are in the
        receiver's queue, or were read)."""
        return self.sent - send_queue(self.stream.socket.fileno())


async def receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        assert chunk, "closed early"
        data += chunk
    return data


def _queued_is(n: int, server: Server) -> bool:
    return server.gate.snapshot().queued == n


async def _queued_behind_a_running_job(gk: Running, nursery: trio.Nursery, names: list[str]
                                       ) -> tuple[trio.SocketStream, list[tuple[Writer, bytes]]]:
    first = await gk.connect()
    await first.send_all(request("first.c"))
    await gk.wait_for(lambda s: s.gate.snapshot().running == 1)
    writers: list[tuple[Writer, bytes]] = []
    for i, name in enumerate(names):
        data = request(name)
        w = Writer(await gk.connect(), data)
        nursery.start_soon(w.run)
        writers.append((w, data))
        await gk.wait_for(functools.partial(_queued_is, i + 1))
    await trio.testing.wait_all_tasks_blocked()
    return first, writers


@pytest.mark.parametrize("window", [DEFAULT_QUEUED_WINDOW, 6144])
async def test_a_queued_request_stays_on_the_client_and_arrives_whole(window: int) -> None:
    hold = trio.Event()
    async with backend(digesting(hold)) as be, gatekeeper(
            config(be.address, max_jobs=1, queued_window=window)) as gk:
        async with trio.open_nursery() as nursery:
            first, writers = await _queued_behind_a_running_job(
                gk, nursery, ["job-a.c", "job-b.c", "job-c.c"])
            for w, _ in writers:
                assert not w.done.is_set()  # its writer is blocked ...
                assert 0 < w.at_receiver() <= TARGET, w.at_receiver()  # ... on the client
            # /status and the metrics say what the queue holds in the kernel.
            held = gk.server.observatory.status()["queued_kernel_bytes"]
            assert held is not None and 0 < held <= 3 * TARGET, held
            assert f"gatekeeper_queued_kernel_memory_bytes {float(held)}" in (
                gk.server.observatory.exposition().decode())
            # The heads were still read: each waiting job is known by name.
            names = sorted(str(name) for _, name in gk.server.connections.queue_peers().values())
            assert names == ["first.o", "job-a.o", "job-b.o", "job-c.o"]
            hold.set()
            assert await receive_exactly(first, DIGEST) == hashlib.sha256(
                request("first.c")).digest()
            # Admitted one after the other, in arrival order, every byte intact.
            for w, data in writers:
                with trio.fail_after(30):
                    assert await receive_exactly(w.stream, DIGEST) == hashlib.sha256(
                        data).digest()
                    await w.done.wait()
            await first.aclose()
            for w, _ in writers:
                await w.stream.aclose()
        await gk.wait_settled(4)


async def test_without_a_queued_window_the_kernel_takes_far_more() -> None:
    """The control: with --queued-window 0 the same waiting client leaves over
    64 KiB of its request in this box's kernel (the test above can fail)."""
    hold = trio.Event()
    async with backend(digesting(hold)) as be, gatekeeper(
            config(be.address, max_jobs=1, queued_window=0)) as gk:
        async with trio.open_nursery() as nursery:
            first, writers = await _queued_behind_a_running_job(gk, nursery, ["a.c"])
            (w, data), = writers
            assert w.at_receiver() > 64 * 1024
            held = gk.server.observatory.status()["queued_kernel_bytes"]
            assert held is not None and held >= w.at_receiver()
            hold.set()
            with trio.fail_after(30):
                assert await receive_exactly(w.stream, DIGEST) == hashlib.sha256(data).digest()
            await first.aclose()
            await w.stream.aclose()
        await gk.wait_settled(2)


def server_end(client: trio.SocketStream) -> socket.socket:
    """gatekeeper's socket for `client` (it runs in this process): a dup."""
    me = client.socket.getsockname()
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = os.dup(int(name))
        except OSError:
            continue  # the listing's own fd, closed by now
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            continue
        try:
            if sock.type == socket.SOCK_STREAM and sock.getpeername() == me:
                return sock
        except OSError:
            pass
        sock.close()
    raise AssertionError("no server end")


def window_of(sock: socket.socket) -> tuple[int, int]:
    return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_WINDOW_CLAMP))


def receive_scale(sock: socket.socket) -> int:
    """The window scale this end offered in the handshake (struct tcp_info:
    tcpi_snd_wscale:4, tcpi_rcv_wscale:4 in byte 6)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[6] >> 4


def buffer_locks(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, SO_BUF_LOCK)


async def test_the_window_opens_at_admission() -> None:
    """Narrow while queued (the listener's buffer and clamp), wide once admitted:
    with a window scale from the handshake, so the open window is not capped
    at 64 KiB, and the buffer handed back to the kernel's autotuning."""
    hold = trio.Event()
    async with backend(digesting(hold)) as be, gatekeeper(
            config(be.address, max_jobs=1)) as gk:
        async with trio.open_nursery() as nursery:
            first, writers = await _queued_behind_a_running_job(gk, nursery, ["job-a.c"])
            (w, data), = writers
            with server_end(first) as running, server_end(w.stream) as queued:
                rcvbuf, clamp = window_of(queued)
                assert rcvbuf <= 2 * DEFAULT_QUEUED_WINDOW and clamp <= 2 * DEFAULT_QUEUED_WINDOW
                assert receive_scale(queued) > 0
                assert window_of(running)[0] >= 64 * 1024
                assert window_of(running)[1] >= 64 * 1024
                hold.set()
                with trio.fail_after(30):
                    await receive_exactly(first, DIGEST)
                    assert await receive_exactly(w.stream, DIGEST) == hashlib.sha256(
                        data).digest()
                rcvbuf, clamp = window_of(queued)
                assert rcvbuf >= 64 * 1024 and clamp >= 64 * 1024
                assert buffer_locks(queued) == 0
            await first.aclose()
            await w.stream.aclose()
        await gk.wait_settled(2)


@pytest.mark.parametrize("value", [8, 200])  # heads of about 30 KB and 225 KB
async def test_a_head_longer_than_the_window_is_still_identified(value: int) -> None:
    hold = trio.Event()
    argv = ["gcc", *(f"-DNAME{i}={'v' * value}" for i in range(1000)), "-c", "long.c",
            "-o", "long.o"]
    head = encode_request_head(argv) + b"DOTI%08x" % REQUEST
    assert len(head) > 4 * DEFAULT_QUEUED_WINDOW
    async with backend(digesting(hold)) as be, gatekeeper(
            config(be.address, max_jobs=1)) as gk:
        async with trio.open_nursery() as nursery:
            first, _ = await _queued_behind_a_running_job(gk, nursery, [])
            w = Writer(await gk.connect(), head + bytes(REQUEST))
            nursery.start_soon(w.run)
            with trio.fail_after(10):
                await gk.wait_for(lambda s: s.gate.snapshot().queued == 1)
            assert sorted(str(name) for _, name in gk.server.connections.queue_peers().values()
                          ) == ["first.o", "long.o"]
            # The window was widened for the head, about as far as it needed:
            # the rest of the 2 MiB request still waits on the client.
            await trio.testing.wait_all_tasks_blocked()
            assert not w.done.is_set()
            assert len(head) < w.at_receiver() <= 8 * len(head), (w.at_receiver(), len(head))
            hold.set()
            await receive_exactly(first, DIGEST)
            with trio.fail_after(30):
                await receive_exactly(w.stream, DIGEST)
            await first.aclose()
            await w.stream.aclose()
        await gk.wait_settled(2)


async def test_a_head_that_outgrows_every_bound_holds_little_and_is_refused() -> None:
    """Hostile: a command line past the 256 KiB a head may have (800 KB of
    arguments, then a request). The narrow window widens only to its limit
    (net/window.WIDEN_MAX), then the head is unreadable and the policy
    refuses it at once, never letting the rest in."""
    argv = ["gcc", *(f"-DNAME{i}={'v' * 200}" for i in range(3900)), "-c", "x.c"]
    data = encode_request_head(argv) + b"DOTI%08x" % REQUEST + bytes(REQUEST)
    async with backend(digesting(trio.Event())) as be, gatekeeper(
            config(be.address, argv_policy=ArgvPolicy(), request_idle_timeout=3600.0)) as gk:
        async with trio.open_nursery() as nursery:
            w = Writer(await gk.connect(), data)

            async def write() -> None:
                with contextlib.suppress(OSError):
                    await w.run()
            nursery.start_soon(write)
            with trio.fail_after(10):
                await gk.wait_for(lambda s: s.observatory.rejected["argv-policy"] == 1)
            # What left the client before the refusal: at most the widened
            # window's worth (its buffer is twice WIDEN_MAX), not the 2.8 MB.
            assert w.sent <= 2 * WIDEN_MAX + TARGET + (1 << 20), w.sent
            nursery.cancel_scope.cancel()
        await w.stream.aclose()
        assert be.connections == 0


def _why_no_namespace() -> str | None:
    """Why the dribble test cannot run here, or None."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs root, unshare(1) and ip(8) for a network namespace of its own"
    if subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False).returncode:
        return "cannot make a network namespace here (no CAP_SYS_ADMIN?)"
    with socket.socket() as probe:
        try:
            probe.getsockopt(socket.SOL_SOCKET, SO_BUF_LOCK)
        except OSError:
            return "the kernel has no SO_BUF_LOCK (before 5.14): listeners stay locked"
    return None


NO_NAMESPACE = _why_no_namespace()


@pytest.mark.skipif(NO_NAMESPACE is not None, reason=str(NO_NAMESPACE))
@pytest.mark.parametrize("how", ["hold", "clamp", "bare"])
def test_a_dribbling_client_cannot_grow_a_queued_buffer_whatever_tcp_rmem_says(
        how: str) -> None:
    """Unlocked, the kernel raises a queue-full socket's buffer to what it holds
    and rounds a scaled window up to the scale's unit: with tcp_rmem[2] at 1 GiB
    (scale 14) a client dribbling small segments grew a queued socket past the
    target ("bare", the old narrowing), and past it still with the scale capped
    by the listener's clamp alone ("clamp": 23 KiB at MTU 1500). gatekeeper also
    locks each accepted narrow socket again ("hold"); the window still opens at
    admission and every byte arrives."""
    done = subprocess.run(
        ["unshare", "-n", sys.executable, str(Path(__file__).with_name("window_dribble.py")),
         str(Path(__file__).parent.parent), how],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["read"] == seen["total"], seen
    if how == "hold":
        assert seen["locks"] & 2, seen  # SOCK_RCVBUF_LOCK, set again after accept
        assert 0 < seen["scale"] <= 9, seen
        assert seen["queued_memory"] <= TARGET and seen["rcvbuf"] <= 2 * DEFAULT_QUEUED_WINDOW, seen
    elif how == "clamp":
        assert 0 < seen["scale"] <= 9 and seen["queued_memory"] > TARGET, seen
    else:
        assert seen["scale"] >= 12 and seen["queued_memory"] > TARGET, seen
