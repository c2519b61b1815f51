"""Fair sharing: key and weight mapping, and interleaved admission over real sockets."""

from __future__ import annotations

import json

import pytest
import trio
from fakes import backend, config, gatekeeper, receive_all

from gatekeeper.fairness import FairBy, Priorities


def test_fair_by_keys() -> None:
    assert FairBy.parse("none").key("10.0.0.1") is None
    assert FairBy.parse("client").key("10.0.0.1") == "10.0.0.1"
    assert FairBy.parse("client").key("::ffff:10.0.0.1") == "10.0.0.1"
    assert FairBy.parse("client").key(None) == "unix"
    assert FairBy.parse("subnet/24").key("10.1.2.3") == "10.1.2.0/24"
    assert FairBy.parse("subnet/24").key("2001:db8::1") == "2001:db8::/64"


@pytest.mark.parametrize("text", ["", "host", "subnet/", "subnet/33", "subnet/x", "client/1"])
def test_fair_by_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        FairBy.parse(text)


def test_priorities_first_match_wins() -> None:
    p = Priorities.parse(["10.0.0.0/8=2", "10.1.0.0/16=5", "::1/128=3"])
    assert p.weight("10.1.2.3") == 2
    assert p.weight("11.0.0.1") == 1
    assert p.weight("::1") == 3
    assert p.weight(None) == 1
    for bad in (["10.0.0.0/8"], ["10.0.0.0/8=0"], ["10.0.0.0/8=x"], ["nope=2"]):
        with pytest.raises(ValueError):
            Priorities.parse(bad)


async def finish_all(clients: list[trio.SocketStream]) -> None:
    """Each client reads its reply and closes, like distcc, all at once (a job ends
    only when its client closes, so reading them one by one could deadlock)."""
    async def finish(c: trio.SocketStream) -> None:
        assert await receive_all(c) == b"ok"
        await c.aclose()

    async with trio.open_nursery() as nursery:
        for c in clients:
            nursery.start_soon(finish, c)


async def test_two_clients_are_interleaved_not_queued_behind_each_other() -> None:
    """Heavy user 127.0.0.2 queues 6 jobs before light user 127.0.0.3 queues 2; with
    one slot, the light user's jobs run 2nd and 4th, not 7th and 8th."""
    order: list[bytes] = []
    release = trio.Event()

    async def record(stream: trio.SocketStream) -> None:
        who = await stream.receive_some(1)
        if who == b"B":
            await release.wait()  # the blocker holds the only slot until told
        else:
            order.append(who)
        await stream.send_all(b"ok")

    async with backend(record) as be, gatekeeper(config(be.address, max_jobs=1)) as gk:
        port = gk.address.port

        async def connect(source: str) -> trio.SocketStream:
            return await trio.open_tcp_stream("127.0.0.1", port, local_address=source)

        blocker = await connect("127.0.0.4")
        await blocker.send_all(b"B")
        await be.wait_for(lambda b: b.connections == 1)
        clients = []
        for source, tag, n in (("127.0.0.2", b"H", 6), ("127.0.0.3", b"L", 2)):
            for _ in range(n):
                c = await connect(source)
                await c.send_all(tag)
                clients.append(c)
                await gk.wait_for(lambda s: s.gate.snapshot().queued == len(clients))
        keys = gk.server.gate.snapshot().keys
        assert keys["127.0.0.2"] == (6, 0) and keys["127.0.0.3"] == (2, 0)
        # The same per-client picture in /status and /metrics.
        status = json.loads(gk.server.observatory.status_json())
        assert status["clients"]["127.0.0.2"] == {"queued": 6, "running": 0}
        assert status["clients"]["127.0.0.4"] == {"queued": 0, "running": 1}
        metrics = gk.server.observatory.exposition().decode()
        assert 'gatekeeper_client_queued{client="127.0.0.3"} 2.0' in metrics
        assert 'gatekeeper_client_running{client="127.0.0.4"} 1.0' in metrics
        release.set()
        await finish_all([blocker, *clients])
    assert order == [b"H", b"L", b"H", b"L", b"H", b"H", b"H", b"H"]


async def test_fair_by_none_is_plain_fifo() -> None:
    order: list[bytes] = []
    release = trio.Event()

    async def record(stream: trio.SocketStream) -> None:
        who = await stream.receive_some(1)
        if who == b"B":
            await release.wait()
        else:
            order.append(who)
        await stream.send_all(b"ok")

    async with backend(record) as be:
        cfg = config(be.address, max_jobs=1, fair_by=FairBy.parse("none"))
        async with gatekeeper(cfg) as gk:
            port = gk.address.port
            blocker = await trio.open_tcp_stream("127.0.0.1", port)
            await blocker.send_all(b"B")
            await be.wait_for(lambda b: b.connections == 1)
            clients = []
            for source, tag in (("127.0.0.2", b"H"), ("127.0.0.2", b"H"), ("127.0.0.3", b"L")):
                c = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
                await c.send_all(tag)
                clients.append(c)
                await gk.wait_for(lambda s: s.gate.snapshot().queued == len(clients))
            release.set()
            await finish_all([blocker, *clients])
    assert order == [b"H", b"H", b"L"]
