"""The fault matrix: each fault's outcome for its own client, other clients unaffected,
and afterwards nothing held: running = 0, queued = 0, gatekeeper's fd count back to
its baseline. Plus a flood against --max-queue and an fd-starved gatekeeper."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from fakes import (
    Running,
    answer_reversed,
    backend,
    closed_port,
    config,
    echo,
    gatekeeper,
    held_fds,
    receive_all,
    receive_until_closed,
    reset,
)

MiB = 2**20


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def good_job(gk: Running, tag: bytes) -> None:
    """An innocent bystander: its job must come back intact whatever else happens."""
    c = await gk.connect()
    await c.send_all(tag)
    assert await receive_all(c) == tag[::-1]
    await c.aclose()


async def echoed_job(gk: Running, data: bytes) -> None:
    """A job through an echo backend after a fault: it must come back whole."""
    c = await gk.connect()
    await c.send_all(data)
    await c.send_eof()
    assert await receive_all(c) == data
    await c.aclose()


@asynccontextmanager
async def settled(gk: Running) -> AsyncIterator[None]:
    """Check after the block that nothing is held and no fd leaked."""
    await gk.server.meter.quiescent()
    await trio.testing.wait_all_tasks_blocked()
    baseline = held_fds(gk)
    yield
    with trio.fail_after(30):
        # Every handler done too: a slot is handed on before the finished job's
        # handler has logged, learned and stopped being measured.
        await gk.wait_for(lambda s: s.gate.snapshot().running == 0
                          and s.gate.snapshot().queued == 0 and not s.connections.live)
    await gk.server.meter.quiescent()
    await trio.testing.wait_all_tasks_blocked()
    assert held_fds(gk) == baseline


async def with_bystanders(gk: Running, fault: Callable[[], Awaitable[None]]) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fault)
        for i in range(3):
            nursery.start_soon(good_job, gk, b"ok%02d" % i)


async def test_backend_refuses() -> None:
    async with gatekeeper(config(closed_port(), max_jobs=2)) as gk, settled(gk):
        c = await gk.connect()
        await c.send_all(b"DIST")
        assert await receive_until_closed(c) == b""
        await c.aclose()
        await gk.wait_settled(1)


@pytest.mark.parametrize("fault", ["accept-then-reset", "dies-mid-reply"])
async def test_backend_faults_end_only_their_job(fault: str) -> None:
    async def faulty(stream: trio.SocketStream) -> None:
        request = await stream.receive_some(4)
        if request.startswith(b"F"):
            if fault == "dies-mid-reply":
                await stream.send_all(b"half a rep")
            reset(stream)
            return
        await answer_reversed(stream, 4, request)

    async with backend(faulty) as be, gatekeeper(config(be.address, max_jobs=2)) as gk:
        async with settled(gk):
            async def victim() -> None:
                c = await gk.connect()
                await c.send_all(b"FAIL")
                got = b""
                with pytest.raises(trio.BrokenResourceError):  # a reset, never a clean EOF
                    async for data in c:
                        got += data
                assert got in (b"", b"half a rep")
                await c.aclose()

            await with_bystanders(gk, victim)


async def test_backend_never_answers_is_cut_off_by_idle_timeout(
        autojump_clock: trio.testing.MockClock) -> None:
    async def silent(stream: trio.SocketStream) -> None:
        async for _ in stream:  # reads the request, never answers
            pass

    async with backend(silent) as be:
        cfg = config(be.address, max_jobs=1, idle_timeout=3600.0)
        async with gatekeeper(cfg) as gk, settled(gk):
            c = await gk.connect()
            await c.send_all(b"DIST")
            start = trio.current_time()
            assert await receive_until_closed(c) == b""
            assert 3600 <= trio.current_time() - start < 3601
            await c.aclose()


@pytest.mark.parametrize("when", ["queued", "running"])
async def test_client_reset(when: str) -> None:
    release = trio.Event()

    async def slow(stream: trio.SocketStream) -> None:
        request = await stream.receive_some(4)
        if request == b"HOLD":
            await release.wait()
        with trio.move_on_after(5):
            await answer_reversed(stream, 4, request)

    async with backend(slow) as be, gatekeeper(config(be.address, max_jobs=1)) as gk:
        async with settled(gk):
            holder = await gk.connect()
            await holder.send_all(b"HOLD")
            await be.wait_for(lambda b: b.connections == 1)
            rude = await gk.connect()
            await rude.send_all(b"RUDE")
            if when == "queued":
                await gk.wait_for(lambda s: s.gate.snapshot().queued == 1)
                reset(rude)
                await gk.wait_for(lambda s: s.gate.snapshot().abandoned_total == 1)
                release.set()
                assert await receive_all(holder) == b"DLOH"
            else:
                release.set()
                assert await receive_all(holder) == b"DLOH"
                await holder.aclose()
                await be.wait_for(lambda b: b.connections == 2)
                reset(rude)
            await holder.aclose()
            await good_job(gk, b"ok!!")


async def test_client_half_close_gets_its_reply() -> None:
    async with backend(echo) as be, gatekeeper(config(be.address, max_jobs=1)) as gk:
        async with settled(gk):
            c = await gk.connect()
            await c.send_all(b"request")
            await c.send_eof()
            assert await receive_all(c) == b"request"
            await c.aclose()


async def test_client_that_never_reads_gets_back_pressure_not_buffering() -> None:
    """The backend writes 512 MiB to a client that reads nothing: gatekeeper must
    stall the backend through TCP flow control, not buffer the reply."""
    total = 512 * MiB
    sent = [0]

    async def firehose(stream: trio.SocketStream) -> None:
        chunk = bytes(MiB)
        try:
            while sent[0] < total:
                await stream.send_all(chunk)
                sent[0] += len(chunk)
        except trio.BrokenResourceError:
            pass

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    async with backend(firehose) as be, gatekeeper(config(be.address)) as gk:
        async with settled(gk):
            before = rss()
            c = await gk.connect()
            await c.send_all(b"gimme")
            await be.wait_for(lambda b: b.connections == 1)
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            stalled_at = sent[0]
            grown = rss() - before
            print(f"backend stalled after {stalled_at / MiB:.1f} MiB; "
                  f"RSS grew {grown / MiB:.1f} MiB")
            assert stalled_at < 64 * MiB  # socket buffers, not gatekeeper memory
            assert grown < 32 * MiB
            await good_job_via(gk)
            reset(c)


async def good_job_via(gk: Running) -> None:
    """A bystander against the firehose backend: it just sees the stream start."""
    c = await gk.connect()
    await c.send_all(b"hello")
    assert len(await c.receive_some(1024)) > 0
    reset(c)


async def test_flood_against_max_queue() -> None:
    """5,000 connection attempts in about a second against --max-queue 1000: the
    queue never passes its bound, the excess is closed at once, gatekeeper stays up,
    and every admitted job comes back intact."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 12_000:
        pytest.skip(f"needs 12,000 fds for 5,000 clients and their accepted ends; "
                    f"hard limit {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    release = trio.Event()

    async def gated(stream: trio.SocketStream) -> None:
        request = await stream.receive_some(4)
        await release.wait()
        await answer_reversed(stream, 4, request)

    max_seen = 0
    results = {"served": 0, "refused": 0}
    turned_away = trio.Event()  # most of the excess has been closed

    def refused() -> None:
        results["refused"] += 1
        if results["refused"] >= 3000:
            turned_away.set()
    async with backend(gated) as be:
        cfg = config(be.address, max_jobs=4, max_queue=1000)
        async with gatekeeper(cfg) as gk:
            async def watch_bound() -> None:
                nonlocal max_seen
                while True:
                    await gk.server.gate.wait_changed()
                    max_seen = max(max_seen, gk.server.gate.snapshot().queued)

            async def client(i: int) -> None:
                try:
                    c = await gk.connect()
                except OSError:
                    refused()
                    return
                tag = b"%04d" % i
                try:
                    await c.send_all(tag)
                    reply = await receive_until_closed(c)
                except trio.BrokenResourceError:
                    reply = b""
                await c.aclose()
                if reply:
                    assert reply == tag[::-1]
                    results["served"] += 1
                else:
                    refused()

            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_bound)
                with trio.fail_after(90):
                    async with trio.open_nursery() as clients:
                        for i in range(5000):
                            clients.start_soon(client, i)
                        # Hold every job until the queue has filled and the excess
                        # has been turned away, then let them all run.
                        await gk.wait_for(lambda s: s.gate.snapshot().queued >= 1000)
                        await turned_away.wait()
                        release.set()
                nursery.cancel_scope.cancel()
            elapsed = trio.current_time() - start
    print(f"flood: {results}, queue peak {max_seen}, {elapsed:.1f}s")
    assert max_seen <= 1000
    assert results["served"] >= 1004  # at least everyone queued or running at release
    assert results["served"] + results["refused"] == 5000


def test_fd_exhaustion_logs_and_recovers() -> None:
    """gatekeeper limited to 128 fds, 500 clients: it logs EMFILE, keeps serving what
    it can, and serves everyone once load drops."""
    script = r"""
import socket, sys, threading
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1024)
print(srv.getsockname()[1], flush=True)
def serve(c):
    data = b""
    while len(data) < 4:
        more = c.recv(4 - len(data))
        if not more: break
        data += more
    c.sendall(data[::-1]); c.close()
while True:
    c, _ = srv.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"""
    be = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert be.stdout is not None
    be_port = int(be.stdout.readline())

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    gk = subprocess.Popen(
        [sys.executable, "-m", "gatekeeper", "--listen", "127.0.0.1:0", "--backend",
         f"127.0.0.1:{be_port}", "-j", "4", "--min-free-mb", "0", "--max-queue", "1000"],
        stderr=subprocess.PIPE, text=True, preexec_fn=limit)
    try:
        assert gk.stderr is not None
        port = 0
        for line in gk.stderr:
            if "listening on 127.0.0.1:" in line:
                port = int(line.rsplit(":", 1)[1])
                break
        log: list[str] = []

        def drain_log() -> None:
            assert gk.stderr is not None
            log.extend(gk.stderr)

        reader = threading.Thread(target=drain_log, daemon=True)
        reader.start()
        ok = trio.run(_hammer, port, 500)
        assert ok == 500
        assert gk.poll() is None  # still up
        gk.terminate()
        assert gk.wait(30) == 0
        reader.join(10)
        text = "".join(log)
        # It either met EMFILE and retried, or (the design) saw its fd budget
        # spent first and left the excess in the listen backlog; either way, said so.
        assert "EMFILE" in text or "Too many open files" in text, text[-2000:]
        assert "connection budget recovered" in text
        assert "Traceback" not in text
    finally:
        gk.kill()
        be.kill()
        gk.wait()
        be.wait()


async def _hammer(port: int, count: int) -> int:
    served = 0
    limit = trio.CapacityLimiter(count)

    async def one(i: int) -> None:
        nonlocal served
        async with limit:
            c = await trio.open_tcp_stream("127.0.0.1", port)
            tag = b"%04d" % i
            await c.send_all(tag)
            if await receive_all(c) == tag[::-1]:
                served += 1
            await c.aclose()

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(one, i)
    return served


async def test_a_peer_that_opens_and_never_sends_harms_nobody(
        autojump_clock: trio.testing.MockClock) -> None:
    """It is queued like anyone (its identity unknown after the short peek), takes
    one slot at most, never blocks others, and --idle-timeout finally cuts it off."""
    async def reverse_or_wait(stream: trio.SocketStream) -> None:
        request = b""
        async for data in stream:
            request += data
            if len(request) >= 4:
                await stream.send_all(request[:4][::-1])
                return

    cfg_kwargs = {"max_jobs": 2, "idle_timeout": 600.0}
    async with backend(reverse_or_wait) as be, \
            gatekeeper(config(be.address, **cfg_kwargs)) as gk, settled(gk):
        silent = await gk.connect()
        await gk.wait_for(lambda s: s.gate.snapshot().running == 1)
        for i in range(5):
            await good_job(gk, b"ok%02d" % i)
        start = trio.current_time()
        assert await receive_until_closed(silent) == b""
        assert 600 <= trio.current_time() - start <= 601
        await silent.aclose()


async def test_an_unusual_socket_error_ends_that_job_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """EHOSTUNREACH (a client whose host vanished, as keepalive reports it) from the
    data path ends that job; the relay and every other job carry on."""
    import errno

    real_splice = os.splice
    struck: list[int] = []

    def splice(src: int, dst: int, count: int, *args: object, **kw: object) -> int:
        if not struck:
            struck.append(src)
            raise OSError(errno.EHOSTUNREACH, os.strerror(errno.EHOSTUNREACH))
        return real_splice(src, dst, count, *args, **kw)  # type: ignore[arg-type]

    async with backend(echo) as be, gatekeeper(config(be.address)) as gk:
        if gk.server.relay is None:
            pytest.skip("no zero-copy relay on this platform")
        monkeypatch.setattr(os, "splice", splice)  # the module relay calls it through
        victim = await gk.connect()
        await victim.send_all(b"first")
        with pytest.raises(trio.BrokenResourceError):
            async for _ in victim:
                pass
        await victim.aclose()
        assert struck
        await echoed_job(gk, b"second")


async def test_an_accept_error_about_one_connection_is_skipped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """accept() can fail for the connection it was taking (ECONNABORTED, EPERM from
    a firewall): the server skips it and keeps accepting."""
    import errno
    import socket

    real_accept = socket.socket.accept
    failed: list[int] = []

    async with backend(echo) as be, gatekeeper(config(be.address)) as gk:
        port = gk.address.port

        def accept(self: socket.socket) -> tuple[socket.socket, object]:
            if not failed and self.getsockname()[1] == port:
                conn, _ = real_accept(self)
                conn.close()  # that connection is lost, as the kernel would lose it
                failed.append(port)
                raise OSError(errno.ECONNABORTED, "Software caused connection abort")
            return real_accept(self)

        monkeypatch.setattr(socket.socket, "accept", accept)
        lost = await gk.connect()
        assert await receive_until_closed(lost) == b""
        await lost.aclose()
        assert failed
        await echoed_job(gk, b"still here")


async def test_a_job_cut_off_by_the_drain_deadline_is_reset_both_ways(
        autojump_clock: trio.testing.MockClock) -> None:
    """A clean FIN after half a reply could pass for a whole one: a job the drain
    deadline cuts off ends with a reset to the client (and to the backend)."""
    backend_saw: list[str] = []

    async def half_then_hang(stream: trio.SocketStream) -> None:
        await stream.receive_some()
        await stream.send_all(b"half a reply")
        try:
            await stream.receive_some()
            backend_saw.append("eof")
        except trio.BrokenResourceError:
            backend_saw.append("reset")

    async with backend(half_then_hang) as be, gatekeeper(config(be.address)) as gk:
        client = await gk.connect()
        await client.send_all(b"request")
        assert await client.receive_some() == b"half a reply"
        gk.server.stop()
        with pytest.raises(trio.BrokenResourceError):
            await client.receive_some()
        await client.aclose()
    assert backend_saw == ["reset"]


async def test_a_job_cut_off_by_the_drain_deadline_says_so(
        autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture) -> None:
    """Its end line names the drain timeout (it was `outcome=?`)."""
    caplog.set_level("INFO", logger="gatekeeper")

    async def hang(stream: trio.SocketStream) -> None:
        await stream.receive_some()
        await trio.sleep_forever()

    async with backend(hang) as be, gatekeeper(config(be.address)) as gk:
        client = await gk.connect()
        await client.send_all(b"request")
        await gk.wait_for(lambda s: s.gate.snapshot().running == 1)
        gk.server.stop()
        with pytest.raises(trio.BrokenResourceError):
            await client.receive_some()
        await client.aclose()
    ends = [r.getMessage() for r in caplog.records if r.getMessage().startswith("end ")]
    assert len(ends) == 1 and "outcome=drain-timeout" in ends[0], ends
