"""The server in-process over loopback, against fake backends that misbehave on cue."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing
from fakes import (
    DATA_PATH,
    Running,
    answer_reversed,
    backend,
    closed_port,
    config,
    echo,
    gatekeeper,
    receive_all,
    receive_until_closed,
    reset,
)

from gatekeeper import job as serve
from gatekeeper.distcc.reply import encode_reply_head
from gatekeeper.distcc.request import encode_request_head
from gatekeeper.fairness import FairBy
from gatekeeper.job import ProxyStart
from gatekeeper.net import addresses
from gatekeeper.net.allow import AllowList
from gatekeeper.net.copy import ZERO_COPY_AVAILABLE
from gatekeeper.net.listen import (
    KEEPALIVE_COUNT,
    KEEPALIVE_IDLE,
    KEEPALIVE_INTERVAL,
    KEEPALIVE_SPREAD,
)
from gatekeeper.net.relay import SPARE_PIPES
from gatekeeper.net.sockqueue import receive_queue
from gatekeeper.server import Server

MiB = 2**20


@pytest.fixture(autouse=True, params=["splice", "copy"])
def data_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test here runs against both data paths (zero-copy and buffer copy)."""
    if request.param == "splice" and not ZERO_COPY_AVAILABLE:
        pytest.skip("no os.splice on this platform")
    DATA_PATH["zero_copy"] = request.param == "splice"
    yield request.param
    DATA_PATH["zero_copy"] = True


async def test_echo_with_half_close_passes_reply_through() -> None:
    """The client half-closes after its request; the reply must still arrive."""
    async with backend(echo) as be, gatekeeper(config(be.address)) as gk:
        client = await gk.connect()
        await client.send_all(b"request" * 1000)
        await client.send_eof()
        assert await receive_all(client) == b"request" * 1000
        await client.aclose()
        await gk.wait_settled(1)
        assert gk.server.gate.snapshot().running == 0


async def test_backend_half_close_reaches_client_and_client_can_keep_sending() -> None:
    """Backend says its piece and half-closes first; the client may still talk."""
    got = trio.Event()
    received: list[bytes] = []

    async def greeter(stream: trio.SocketStream) -> None:
        await stream.send_all(b"hello")
        await stream.send_eof()
        received.append(await receive_all(stream))
        got.set()

    async with backend(greeter) as be, gatekeeper(config(be.address)) as gk:
        client = await gk.connect()
        assert await receive_all(client) == b"hello"
        await client.send_all(b"after your eof")
        await client.send_eof()
        await got.wait()
        assert received == [b"after your eof"]
        await client.aclose()


async def hold_until_eof(stream: trio.SocketStream) -> None:
    """A job that runs until its client half-closes, then answers 'done'."""
    await receive_all(stream)
    await stream.send_all(b"done")


async def test_holds_beyond_max_jobs_and_admits_in_fifo_order() -> None:
    order: list[bytes] = []

    async def record(stream: trio.SocketStream) -> None:
        order.append(await stream.receive_some(100))
        await hold_until_eof(stream)

    async with backend(record) as be, gatekeeper(config(be.address, max_jobs=2)) as gk:
        clients = []
        for i in range(5):
            c = await gk.connect()
            await c.send_all(b"%d" % i)
            clients.append(c)
            await gk.wait_for(functools.partial(_seen_is, n=i + 1))
        await be.wait_for(lambda b: b.connections == 2)
        snap = gk.server.gate.snapshot()
        assert (snap.running, snap.queued) == (2, 3)
        for c in clients:
            await c.send_eof()
            assert await receive_all(c) == b"done"
            await c.aclose()
        assert be.max_active <= 2
        assert be.connections == 5
        assert order == [b"0", b"1", b"2", b"3", b"4"]


async def queue_and_serve(gk: Running, requests: list[bytes]) -> None:
    """Queue one client per request, in order (each counted in before the next
    connects), then read every reply in order (each the request reversed) and
    close; wait until all are settled."""
    clients = []
    for i, request in enumerate(requests):
        c = await gk.connect()
        await c.send_all(request)
        clients.append(c)
        await gk.wait_for(functools.partial(_seen_is, n=i + 1))
    for request, c in zip(requests, clients, strict=True):
        assert await receive_all(c) == request[::-1]
        await c.aclose()
    await gk.wait_settled(len(requests))


def _seen(server: Server) -> int:
    s = server.gate.snapshot()
    return s.running + s.queued + s.finished_total


def _seen_is(server: Server, n: int) -> bool:
    return _seen(server) == n


async def answer_reversed_4(stream: trio.SocketStream) -> None:
    await answer_reversed(stream)


async def test_memory_rule_holds_until_memory_returns() -> None:
    async with backend(echo) as be:
        cfg = config(be.address, min_free_bytes=512 * MiB)
        async with gatekeeper(cfg, available=100 * MiB) as gk:
            client = await gk.connect()
            await client.send_all(b"x")
            await gk.wait_for(lambda s: s.gate.snapshot().queued == 1)
            assert gk.server.gate.snapshot().hold is not None
            assert gk.server.gate.snapshot().hold.value == "memory"  # type: ignore[union-attr]
            assert be.connections == 0
            gk.memory.value = 600 * MiB  # the timer re-reads it while memory holds
            await be.wait_for(lambda b: b.connections == 1)
            await client.send_eof()
            assert await receive_all(client) == b"x"


async def test_queue_timeout_closes_held_client(autojump_clock: trio.testing.MockClock) -> None:
    async with backend(hold_until_eof) as be:
        async with gatekeeper(config(be.address, max_jobs=1, queue_timeout=240.0)) as gk:
            first = await gk.connect()
            await be.wait_for(lambda b: b.connections == 1)
            second = await gk.connect()
            start = trio.current_time()
            with trio.fail_after(300):
                assert await receive_until_closed(second) == b""  # closed by gatekeeper
            assert 240.0 <= trio.current_time() - start < 241.0
            assert gk.server.gate.snapshot().expired_total == 1
            assert be.connections == 1
            await first.send_eof()
            assert await receive_all(first) == b"done"


async def test_max_queue_closes_excess_at_once() -> None:
    async with backend(hold_until_eof) as be:
        async with gatekeeper(config(be.address, max_jobs=1, max_queue=1)) as gk:
            running = await gk.connect()
            await be.wait_for(lambda b: b.connections == 1)
            queued = await gk.connect()
            await gk.wait_for(lambda s: s.gate.snapshot().queued == 1)
            excess = await gk.connect()
            assert await receive_until_closed(excess) == b""
            assert gk.server.gate.snapshot().refused_total["queue-full"] == 1
            await running.send_eof()
            assert await receive_all(running) == b"done"
            # Half-close only once admitted: a FIN while queued means "gone".
            await be.wait_for(lambda b: b.connections == 2)
            await queued.send_eof()
            assert await receive_all(queued) == b"done"


async def connect_from(source: str, gk: Running) -> trio.SocketStream:
    """A connection from another loopback address (127.0.0.0/8 is all this host's)."""
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect((str(gk.address.host), gk.address.port))
    return trio.SocketStream(sock)


async def test_a_client_at_its_queue_cap_is_refused_while_another_still_queues() -> None:
    """--max-queued-per-client (issue 22): one peer cannot fill the queue."""
    async with backend(answer_reversed_4) as be:
        # One FIFO (no round-robin between the two clients), so the order is known;
        # no identification, so a connection queues the moment it is accepted.
        async with gatekeeper(config(be.address, max_jobs=1, max_queue=10,
                                     max_queued_per_client=2, identify=False,
                                     fair_by=FairBy.parse("none"))) as gk:
            running = await gk.connect()
            await be.wait_for(lambda b: b.connections == 1)
            mine = [await gk.connect() for _ in range(2)]
            await gk.wait_for(lambda s: s.gate.snapshot().queued == 2)
            excess = await gk.connect()
            assert await receive_until_closed(excess) == b""  # closed at once
            assert gk.server.gate.snapshot().refused_total["client-queue-full"] == 1
            other = await connect_from("127.0.0.2", gk)
            await gk.wait_for(lambda s: s.gate.snapshot().queued == 3)
            assert gk.server.gate.snapshot().refused_total["queue-full"] == 0
            # Everyone queued is served, in order: a whole request each, answered
            # (no half-close, which while queued would mean "gone").
            for n, stream in enumerate((running, *mine, other), start=1):
                await stream.send_all(b"abc%d" % n)
                answer = b""
                while len(answer) < 4:
                    data = await stream.receive_some(4 - len(answer))
                    assert data, n
                    answer += data
                assert answer == (b"abc%d" % n)[::-1]
                assert be.connections == n
                await stream.aclose()


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_queued_client_that_leaves_never_reaches_backend(how: str) -> None:
    async with backend(hold_until_eof) as be, gatekeeper(config(be.address, max_jobs=1)) as gk:
        running = await gk.connect()
        await be.wait_for(lambda b: b.connections == 1)
        leaver = await gk.connect()
        await leaver.send_all(b"DIST00000001")  # request bytes stay buffered
        await gk.wait_for(lambda s: s.gate.snapshot().queued == 1)
        if how == "reset":
            reset(leaver)
        else:
            await leaver.aclose()
        with trio.fail_after(1):  # the bound: gone from the queue within 1 s
            await gk.wait_for(lambda s: s.gate.snapshot().queued == 0)
        assert gk.server.gate.snapshot().abandoned_total == 1
        await running.send_eof()
        assert await receive_all(running) == b"done"
        assert be.connections == 1


async def test_half_closed_queued_client_is_kept_with_flag() -> None:
    async with backend(echo) as be:
        cfg = config(be.address, max_jobs=1, keep_half_closed=True)
        async with gatekeeper(cfg) as gk:
            blocker = await gk.connect()
            await gk.wait_for(lambda s: s.gate.snapshot().running == 1)
            client = await gk.connect()
            await client.send_all(b"request")
            await client.send_eof()
            await gk.wait_for(lambda s: s.gate.snapshot().queued == 1)
            await blocker.aclose()  # frees the slot; the half-closed one must still run
            assert await receive_all(client) == b"request"


async def test_backend_refusing_closes_client_and_frees_slot(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gatekeeper")
    async with gatekeeper(config(closed_port(), max_jobs=1)) as gk:
        for _ in range(3):  # the slot comes back every time
            client = await gk.connect()
            await client.send_all(b"x")
            assert await receive_until_closed(client) == b""
            await client.aclose()
        await gk.wait_settled(3)
        assert gk.server.gate.snapshot().running == 0
    assert "outcome=backend-error" in caplog.text
    assert "Connection refused" in caplog.text or "connect" in caplog.text


async def test_backend_reset_mid_stream_ends_job_and_frees_slot() -> None:
    async def crash(stream: trio.SocketStream) -> None:
        await stream.receive_some(10)
        await stream.send_all(b"partial")
        reset(stream)

    async with backend(crash) as be, gatekeeper(config(be.address, max_jobs=1)) as gk:
        for _ in range(2):
            client = await gk.connect()
            await client.send_all(b"x" * 10)
            got = b""
            with pytest.raises(trio.BrokenResourceError):  # the reset is passed on
                async for data in client:
                    got += data
            assert got in (b"", b"partial")
            await client.aclose()
        await gk.wait_settled(2)
        assert gk.server.gate.snapshot().running == 0
        assert be.connections == 2


async def test_client_reset_while_running_reaches_backend() -> None:
    backend_saw: list[str] = []
    done = trio.Event()

    async def watch(stream: trio.SocketStream) -> None:
        try:
            await receive_all(stream)
            backend_saw.append("eof")
        except trio.BrokenResourceError:
            backend_saw.append("reset")
        done.set()

    async with backend(watch) as be, gatekeeper(config(be.address)) as gk:
        client = await gk.connect()
        await client.send_all(b"x")
        await be.wait_for(lambda b: b.connections == 1)
        reset(client)
        await done.wait()
        assert backend_saw  # ended promptly, either way: distccd would kill its compiler
        await gk.wait_settled(1)


@pytest.mark.parametrize("size", [0, 1, 65_536 * 3 + 7, 64 * MiB])
async def test_large_payload_integrity(size: int) -> None:
    payload = os.urandom(size)
    async with backend(echo) as be, gatekeeper(config(be.address)) as gk:
        client = await gk.connect()
        digest = hashlib.sha256()
        async with trio.open_nursery() as nursery:
            async def send() -> None:
                view = memoryview(payload)
                for i in range(0, size, MiB):
                    await client.send_all(view[i:i + MiB])
                await client.send_eof()
            nursery.start_soon(send)
            received = 0
            async for data in client:
                digest.update(data)
                received += len(data)
        assert received == size
        assert digest.digest() == hashlib.sha256(payload).digest()


async def test_denied_peer_is_closed_and_never_reaches_backend() -> None:
    async with backend(echo) as be:
        cfg = config(be.address, allow=AllowList.parse(["10.0.0.0/8"]))
        async with gatekeeper(cfg) as gk:
            client = await gk.connect()
            await client.send_all(b"x")
            assert await receive_until_closed(client) == b""
            assert be.connections == 0


async def test_ipv6_listener_and_allow() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    from gatekeeper.net.addresses import TcpAddress
    async with backend(echo) as be:
        cfg = config(be.address, listen=(TcpAddress("::1", 0),))
        try:
            ctx = gatekeeper(cfg)
            gk = await ctx.__aenter__()
        except OSError as e:
            pytest.skip(f"cannot bind ::1: {e}")
        try:
            stream = await trio.open_tcp_stream("::1", gk.address.port)
            await stream.send_all(b"six")
            await stream.send_eof()
            assert await receive_all(stream) == b"six"
        finally:
            await ctx.__aexit__(None, None, None)


async def test_stop_closes_queued_and_lets_running_finish() -> None:
    async with backend(hold_until_eof) as be, gatekeeper(config(be.address, max_jobs=1)) as gk:
        running = await gk.connect()
        await be.wait_for(lambda b: b.connections == 1)
        queued = [await gk.connect() for _ in range(3)]
        await gk.wait_for(lambda s: s.gate.snapshot().queued == 3)
        gk.server.stop()
        for q in queued:
            assert await receive_until_closed(q) == b""
        await running.send_all(b"still here")
        await running.send_eof()
        assert await receive_all(running) == b"done"
        assert be.connections == 1


async def test_slot_accounting_survives_a_mix_of_faults(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Many clients doing different wrong things at once; afterwards nothing is held."""
    async with backend(answer_reversed_4) as be, gatekeeper(config(be.address, max_jobs=2)) as gk:
        # Backend connections open at once, counted where gatekeeper opens and
        # closes its sockets (the fake backend's own count lags behind a reset it
        # has not yet read, as any backend's would). A slot is handed on the
        # moment a job's bytes are done, before its handler has finished: what
        # must never exceed max-jobs is open backend connections.
        created: list[socket.socket] = []
        max_open = 0

        def counted_start(address: Any) -> socket.socket | None:
            # The count can only rise when a connection is made: look then.
            nonlocal max_open
            raw = real_start(address)
            if raw is not None:
                created.append(raw)
                max_open = max(max_open, sum(1 for s in created if s.fileno() != -1))
            return raw

        real_start = addresses.start_connect
        monkeypatch.setattr(addresses, "start_connect", counted_start)
        monkeypatch.setattr(serve, "start_connect", counted_start)

        async def good(i: int) -> None:
            c = await gk.connect()
            await c.send_all(b"%04d" % i)
            assert await receive_all(c) == (b"%04d" % i)[::-1]
            await c.aclose()

        async def rude(i: int) -> None:
            c = await gk.connect()
            await c.send_all(b"x" * i)
            reset(c)

        async def quitter(i: int) -> None:
            c = await gk.connect()
            await c.aclose()

        async with trio.open_nursery() as nursery:
            for i in range(30):
                nursery.start_soon((good, rude, quitter)[i % 3], i)
        await gk.wait_for(lambda s: _seen(s) == 30 - s.gate.snapshot().abandoned_total
                          and s.gate.snapshot().running == 0)
        snap = gk.server.gate.snapshot()
        assert (snap.running, snap.queued) == (0, 0)
        assert max_open == 2
        assert all(s.fileno() == -1 for s in created)


@pytest.mark.parametrize("pieces", [
    [encode_reply_head(0) + b"SERR00000000" + os.urandom(300_000)],  # all at once
    [b"DON", b"E00000001STAT0", b"0000000", os.urandom(70_000)],  # a head in pieces
    [b"DONE0000"],  # a reply cut short inside the head, then a clean EOF
    [],  # no reply at all
])
async def test_a_distcc_reply_head_is_read_on_the_way_and_passed_on_whole(
        pieces: list[bytes], caplog: pytest.LogCaptureFixture) -> None:
    """For a distcc job the reply's first 24 bytes go through Python to read the
    compiler's status; the client must still get every byte, in order, and the EOF."""
    async def distccd(stream: trio.SocketStream) -> None:
        got = b""
        while len(got) < len(request):  # like distccd: the request, no EOF needed
            got += await stream.receive_some()
        for piece in pieces:
            await stream.send_all(piece)
            await trio.sleep(0.01)  # let the pieces arrive apart
    request = encode_request_head(["g++", "-c", "a.cc", "-o", "a.o"]) + b"DOTI00000000"
    caplog.set_level(logging.INFO, logger="gatekeeper")
    async with backend(distccd) as be, gatekeeper(config(be.address)) as gk:
        client = await gk.connect()
        await client.send_all(request)
        assert await receive_all(client) == b"".join(pieces)
        await client.aclose()
    ends = [r.getMessage() for r in caplog.records if r.getMessage().startswith("end ")]
    complete = len(b"".join(pieces)) >= 24
    assert len(ends) == 1
    assert ("compile=ok" in ends[0]) == complete
    # A distccd that closes before its status died or gave up: not "ok".
    assert ("outcome=ok" if complete else "outcome=backend-failed") in ends[0]


async def test_a_backend_reset_inside_the_reply_head_resets_the_client() -> None:
    async def dies(stream: trio.SocketStream) -> None:
        await receive_all(stream)
        await stream.send_all(b"DONE00000001ST")
        await trio.sleep(0.01)
        reset(stream)
    request = encode_request_head(["g++", "-c", "a.cc", "-o", "a.o"])
    async with backend(dies) as be, gatekeeper(config(be.address)) as gk:
        client = await gk.connect()
        await client.send_all(request)
        await client.send_eof()
        got = b""
        with pytest.raises(trio.BrokenResourceError):
            async for data in client:
                got += data
        assert got == b"DONE00000001ST"
        await client.aclose()


async def test_a_distcc_client_that_half_closes_has_its_job_ended_by_distccd(
        caplog: pytest.LogCaptureFixture) -> None:
    """distccd kills the compile of a client that half-closes and answers nothing;
    that is the client's doing, logged as client-gone, not a backend failure."""
    async def distccd(stream: trio.SocketStream) -> None:
        await receive_all(stream)  # "Client fd disconnected, killing job"

    caplog.set_level(logging.INFO, logger="gatekeeper")
    async with backend(distccd) as be, gatekeeper(config(be.address)) as gk:
        client = await gk.connect()
        await client.send_all(encode_request_head(["g++", "-c", "a.cc", "-o", "a.o"]))
        await client.send_eof()
        assert await receive_all(client) == b""
        await client.aclose()
    ends = [r.getMessage() for r in caplog.records if r.getMessage().startswith("end ")]
    assert len(ends) == 1 and "outcome=client-gone" in ends[0], ends


async def test_clients_get_tcp_keepalive_with_idle_times_spread() -> None:
    """A client whose machine died sends nothing: keepalive drops it in ~2 min.
    The options are set on the listener and inherited by every accepted socket;
    only the idle time is each connection's own, drawn from a 30 s spread, so
    clients that connected together are not probed together (KEEPALIVE_SPREAD)."""
    seen: list[tuple[int, ...]] = []
    async with backend(echo) as be, gatekeeper(config(be.address)) as gk:
        handle = gk.server.connections.handle

        async def spy(stream: trio.SocketStream) -> None:
            sock = stream.socket
            seen.append((sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                         sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                         sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                         sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)))
            await handle(stream)

        gk.server.connections.handle = spy  # type: ignore[method-assign]
        for _ in range(40):
            client = await gk.connect()
            await client.send_all(b"x")
            await client.send_eof()
            assert await receive_all(client) == b"x"
            await client.aclose()
    assert {(on, interval, count) for on, _, interval, count in seen} == {
        (1, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)}
    idles = [idle for _, idle, _, _ in seen]
    assert all(KEEPALIVE_IDLE <= idle <= KEEPALIVE_IDLE + KEEPALIVE_SPREAD for idle in idles)
    assert len(set(idles)) >= 10, idles  # 40 draws from 31 values
    # A vanished client is found well inside the default 240 s queue timeout.
    assert KEEPALIVE_IDLE + KEEPALIVE_SPREAD + KEEPALIVE_INTERVAL * KEEPALIVE_COUNT < 240


async def test_a_bulk_transfer_does_not_starve_a_small_job() -> None:
    """While one job streams as fast as loopback allows, another job's small
    request and reply still go through promptly: the data path takes turns."""
    async with backend(echo) as be, gatekeeper(config(be.address)) as gk:
        bulk = await gk.connect()
        moved = 0
        small_done, under_way = trio.Event(), trio.Event()

        async def stream_bulk() -> None:
            nonlocal moved
            chunk = bytes(MiB)
            while not small_done.is_set() and moved < 2048 * MiB:
                await bulk.send_all(chunk)
                moved += len(chunk)
                if moved >= 64 * MiB:
                    under_way.set()
            await bulk.send_eof()

        async def drain_bulk() -> None:
            async for _ in bulk:
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream_bulk)
            nursery.start_soon(drain_bulk)
            await under_way.wait()
            small = await gk.connect()
            with trio.fail_after(5):
                await small.send_all(b"ping")
                await small.send_eof()
                assert await receive_all(small) == b"ping"
            small_done.set()
            await small.aclose()
        assert moved < 2048 * MiB  # the small job finished while the bulk one ran
        await bulk.aclose()


async def test_a_half_closed_client_waiting_for_its_reply_costs_nothing() -> None:
    """Request, shutdown(SHUT_WR), then a long wait for the reply: while it waits,
    every task must be asleep (no data path spinning on the finished direction)."""
    release = trio.Event()

    async def slow(stream: trio.SocketStream) -> None:
        request = await receive_all(stream)
        await release.wait()
        await stream.send_all(request.upper())

    async with backend(slow) as be, gatekeeper(config(be.address)) as gk:
        client = await gk.connect()
        await client.send_all(b"request")
        await client.send_eof()
        await gk.wait_for(lambda s: s.gate.snapshot().running == 1)
        with trio.fail_after(2):
            await trio.testing.wait_all_tasks_blocked(0.05)
        release.set()
        assert await receive_all(client) == b"REQUEST"
        await client.aclose()


async def test_queued_jobs_start_moving_the_moment_their_slot_is_handed_on() -> None:
    """With the limit binding, each queued job's backend connection is opened and
    its request moved inside the step that released the slot (`ProxyJobs.start_at_admission`),
    on the splice path; every reply still reaches its own client, in order."""
    served: list[int] = []

    async def numbered(stream: trio.SocketStream) -> None:
        served.append(int(await answer_reversed(stream, 8)))

    async with backend(numbered) as be, gatekeeper(config(be.address, max_jobs=1)) as gk:
        early: list[bool] = []
        start = gk.server.proxy.start_at_admission

        def watched(started: ProxyStart) -> None:
            start(started)
            # Moving already, or (a loaded box's loopback handshake not yet done
            # when connect() returned) its connect begun, for its task to finish.
            early.append(started.moving is not None or started.raw is not None)

        gk.server.proxy.start_at_admission = watched  # type: ignore[method-assign,assignment]
        await queue_and_serve(gk, [b"%08d" % i for i in range(12)])
    assert served == list(range(12))
    if gk.server.relay is not None:
        assert early == [True] * 11  # every queued job; the first never waited
    else:
        assert early == []  # the copy path starts each job in its own task


async def test_spare_pipes_are_reused_bounded_and_closed() -> None:
    # The splice path's pipes, whichever data path the other tests here run on.
    if not ZERO_COPY_AVAILABLE:
        pytest.skip("no os.splice on this platform: no pipes to keep")
    async with backend(echo) as be, gatekeeper(config(be.address, max_jobs=12,
                                                      zero_copy=True)) as gk:
        relay = gk.server.relay
        assert relay is not None

        async def one(i: int) -> None:
            c = await gk.connect()
            await c.send_all(b"%06d" % i)
            await c.send_eof()
            assert await receive_all(c) == b"%06d" % i
            await c.aclose()

        async with trio.open_nursery() as nursery:  # 12 at once: 24 pipes in use
            for i in range(12):
                nursery.start_soon(one, i)
        await gk.wait_settled(12)
        assert 0 < relay.spare_fds <= 2 * SPARE_PIPES
        before = relay.spare_fds
        await one(99)  # one more job takes its pipes from the spares and gives them back
        await gk.wait_settled(13)
        assert relay.spare_fds == before
    assert relay.spare_fds == 0  # closed with the relay


async def test_a_bug_in_the_early_start_falls_back_to_the_jobs_own_task(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """An unexpected error while starting a job at admission (inside the relay's
    step) must neither stop the server nor strand the job: its task starts it."""
    def broken(address: Any) -> None:
        raise ValueError("simulated bug")

    monkeypatch.setattr(serve, "start_connect", broken)  # only `start_at_admission` uses this name
    async with backend(answer_reversed_4) as be, \
            gatekeeper(config(be.address, max_jobs=1)) as gk:
        await queue_and_serve(gk, [b"job%d" % i for i in range(4)])
    if gk.server.relay is not None:
        assert caplog.text.count("could not start job") == 3


DISTCC_JOB = encode_request_head(["gcc", "-c", "x.c", "-o", "x.o"]) + b"DOTI00000004int;"


async def answer_and_close(stream: trio.SocketStream) -> None:
    """Like distccd: read the whole request, answer with a status, close."""
    request = b""
    while len(request) < len(DISTCC_JOB):
        data = await stream.receive_some(len(DISTCC_JOB) - len(request))
        if not data:
            return
        request += data
    await stream.send_all(encode_reply_head(0) + b"DOTO00000003obj")


@pytest.mark.parametrize("identify", [True, False])
async def test_distcc_slot_is_free_once_distccd_closed(
        identify: bool, caplog: pytest.LogCaptureFixture) -> None:
    """A distcc job's slot is handed on when distccd's reply and EOF reached the
    client, not when the client gets round to closing; anything else keeps it
    until both sides are done."""
    caplog.set_level(logging.INFO, logger="gatekeeper")
    cfg = config(None, max_jobs=1, identify=identify)  # type: ignore[arg-type]
    async with backend(answer_and_close) as be, \
            gatekeeper(dataclasses.replace(cfg, backend=be.address)) as gk:
        slow = await gk.connect()
        await slow.send_all(DISTCC_JOB)
        assert await receive_all(slow) == encode_reply_head(0) + b"DOTO00000003obj"
        # The reply and EOF are in; the client has not closed yet.
        if identify and gk.server.relay is not None:
            await gk.wait_for(lambda s: s.gate.snapshot().running == 0)
            nxt = await gk.connect()  # gets the slot while `slow` still lingers
            await nxt.send_all(DISTCC_JOB)
            assert await receive_all(nxt) == encode_reply_head(0) + b"DOTO00000003obj"
            await nxt.aclose()
        else:
            await trio.testing.wait_all_tasks_blocked()
            assert gk.server.gate.snapshot().running == 1
        await slow.aclose()
        await gk.wait_settled(2 if identify and gk.server.relay is not None else 1)
    assert caplog.text.count("outcome=ok") >= 1
    assert "outcome=backend-failed" not in caplog.text


async def test_client_bytes_after_distccd_closed_reset_it(
        caplog: pytest.LogCaptureFixture) -> None:
    """On the splice path the slot is gone once distccd closed; a client that
    then sends more gets the reset the closed backend would have sent. (The copy
    path forwards it and waits for the client's close, as a plain proxy does.)"""
    caplog.set_level(logging.INFO, logger="gatekeeper")
    async with backend(answer_and_close) as be, gatekeeper(config(be.address)) as gk:
        c = await gk.connect()
        await c.send_all(DISTCC_JOB)
        assert await receive_all(c) == encode_reply_head(0) + b"DOTO00000003obj"
        relayed = gk.server.relay is not None
        if relayed:
            await gk.wait_for(lambda s: s.gate.snapshot().running == 0)
        await c.send_all(b"more")
        if relayed:
            await gk.wait_settled(1)  # ended (with a reset) before the client closed
        await c.aclose()
        await gk.wait_settled(1)
    if relayed:
        assert "the backend had closed; the client sent more" in caplog.text
        assert "outcome=backend-failed" in caplog.text


async def test_the_next_distcc_job_starts_before_the_last_reply_bytes_go_out(
        caplog: pytest.LogCaptureFixture) -> None:
    """When distccd's reply and its EOF are both in, the next queued job is
    started first and the finished job's reply follows a moment later: the
    backend waits least (on the splice path; the copy path hands on the slot
    when the client closes). The reply still arrives whole, then the EOF."""
    caplog.set_level(logging.INFO, logger="gatekeeper")
    reply = encode_reply_head(0) + b"DOTO%08x" % 3000 + os.urandom(3000)
    go = trio.Event()

    async def distccd(stream: trio.SocketStream) -> None:
        request = b""
        while len(request) < len(DISTCC_JOB):
            request += await stream.receive_some(len(DISTCC_JOB) - len(request))
        await go.wait()
        # The reply and the FIN together, before gatekeeper's relay runs again.
        os.write(stream.socket.fileno(), reply)
        stream.socket.close()

    async with backend(distccd) as be, gatekeeper(config(be.address, max_jobs=1)) as gk:
        start = gk.server.proxy.start_at_admission
        unread_then: list[int] = []
        first = await gk.connect()

        def watched(started: ProxyStart) -> None:
            # What `first` had got when `second` started:
            unread_then.append(receive_queue(first.socket.fileno()))
            start(started)

        gk.server.proxy.start_at_admission = watched  # type: ignore[method-assign,assignment]
        await first.send_all(DISTCC_JOB)
        await gk.wait_for(lambda s: s.gate.snapshot().running == 1)
        second = await gk.connect()
        await second.send_all(DISTCC_JOB)
        await gk.wait_for(lambda s: s.gate.snapshot().queued == 1)
        go.set()
        assert await receive_all(first) == reply
        await first.aclose()  # the copy path: only now is the slot free
        assert await receive_all(second) == reply
        await second.aclose()
        await gk.wait_settled(2)
    ends = [r.getMessage() for r in caplog.records if r.getMessage().startswith("end ")]
    assert len(ends) == 2
    assert all("outcome=ok " in e and "compile=ok " in e for e in ends)
    if gk.server.relay is not None:
        assert unread_then == [0]
