"""Shared footprints between gatekeepers (farm/peers.py), in-process over real
sockets: what one box measures is known on its peer within an exchange; a peer
that is down, slow or talks garbage is logged once and skipped."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
from fakes import Running, backend, config, echo, gatekeeper, receive_all

from gatekeeper.farm.ledger import Entry
from gatekeeper.farm.peers import Peers
from gatekeeper.footprints import FootprintBook
from gatekeeper.net.addresses import TcpAddress

MiB = 2**20
INTERVAL = 0.05  # the test's exchange interval (10 s in service)


def metrics_address(gk: Running) -> TcpAddress:
    host, _, port = gk.server.metrics_addresses[0].rpartition(":")
    return TcpAddress(host, int(port))


async def until_known(peers: Peers, book: FootprintBook, key: str) -> None:
    with trio.fail_after(10):
        while not book.knows(key):
            await peers.next_round()


async def test_a_compile_measured_on_one_box_is_known_on_its_peer() -> None:
    async with backend(echo) as be:
        a_cfg = config(be.address, metrics=TcpAddress("127.0.0.1", 0))
        async with gatekeeper(a_cfg) as a:
            b_cfg = config(be.address, peers=(metrics_address(a),), peer_interval=INTERVAL)
            async with gatekeeper(b_cfg) as b:
                a.server.ledger.record(Entry("p2-heavy", 900 * MiB, "plain", 4_000_000))
                peer = b.server.peers
                assert peer is not None
                await until_known(peer, b.server.book, "p2-heavy")
                assert b.server.book.judge("p2-heavy").bytes >= 900 * MiB
                # What b learned from a is not b's to pass on: not in b's ledger.
                assert len(b.server.ledger) == 0
                # Measured again on a: learned again on b, once.
                before = peer.peers[0].learned
                a.server.ledger.record(Entry("p2-heavy", 950 * MiB, "plain", 4_000_000))
                with trio.fail_after(10):
                    while peer.peers[0].learned == before:
                        await peer.next_round()
                assert peer.peers[0].learned == before + 1
                # ...and never again: later rounds ask only for what is new.
                for _ in range(3):
                    await peer.next_round()
                assert peer.peers[0].learned == before + 1


@asynccontextmanager
async def http_peer(answer: bytes, *, delay: float = 0.0) -> AsyncIterator[TcpAddress]:
    """A peer that answers every request with `answer` (after `delay`)."""
    async def serve(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(4096)
            await trio.sleep(delay)
            await stream.send_all(answer)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        yield TcpAddress("127.0.0.1", port)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("answer", "why"), [
    (b"HTTP/1.0 200 OK\r\n\r\nnot json", "not JSON"),
    (b"HTTP/1.0 404 Not Found\r\n\r\n", "HTTP 404"),
    (b"garbage", "not an HTTP answer"),
    (b"HTTP/1.0 200 OK\r\n\r\n" + b" " * (2**20 + 10), "more than"),
], ids=["not-json", "404", "garbage", "too-long"])
async def test_a_peer_that_talks_garbage_is_logged_once_and_skipped(
        answer: bytes, why: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gatekeeper")
    book = FootprintBook(seed=1)
    async with http_peer(answer) as address:
        peers = Peers([address], book, ceiling=2**40)
        for _ in range(3):
            await peers.exchange_all()
    assert peers.peers[0].failing is not None and why in peers.peers[0].failing
    assert caplog.text.count(f"peer {address}:") == 1  # once, not every round
    assert len(book) == 0


async def test_a_slow_or_down_peer_never_holds_admission(
        autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gatekeeper")
    async with http_peer(b"HTTP/1.0 200 OK\r\n\r\n{}", delay=3600) as slow, \
            backend(echo) as be:
        down = TcpAddress("127.0.0.1", 1)  # nobody listens on port 1
        cfg = config(be.address, peers=(slow, down), peer_interval=1.0, identify=False)
        async with gatekeeper(cfg) as gk:
            for _ in range(3):
                client = await gk.connect()
                await client.send_all(b"job")
                await client.send_eof()
                assert await receive_all(client) == b"job"
            await trio.sleep(30)  # several rounds, each peer given up after 5 s
            peers = gk.server.peers
            assert peers is not None
            assert all(p.failing for p in peers.peers)
    assert "no answer within 5s" in caplog.text
    assert caplog.text.count(f"peer {down}:") == 1


async def test_a_box_in_its_own_peer_list_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    """One peer list pushed to every box names each box itself too: its own
    measurements must not come back as a peer's (each key keeps three peaks)."""
    caplog.set_level(logging.INFO, logger="gatekeeper")
    async with backend(echo) as be:
        cfg = config(be.address, metrics=TcpAddress("127.0.0.1", 0), peer_interval=INTERVAL)
        async with gatekeeper(cfg) as a:
            peers = Peers([metrics_address(a)], a.server.book, ceiling=2**40,
                          own_epoch=a.server.ledger.epoch)
            a.server.ledger.record(Entry("p2-mine", 100 * MiB))
            await peers.exchange_all()
            assert peers.peers[0].learned == 0 and not a.server.book.knows("p2-mine")
            assert "this box itself" in (peers.peers[0].failing or "")


async def test_a_restarted_box_reads_its_peers_on_from_where_it_was(tmp_path: Path) -> None:
    """The cursors are saved beside the book: after a restart on the saved book,
    the peer's ledger is not learned again from its start."""
    async with backend(echo) as be:
        cfg = config(be.address, metrics=TcpAddress("127.0.0.1", 0))
        async with gatekeeper(cfg) as a:
            a.server.ledger.record(Entry("p2-k", 100 * MiB))
            book = FootprintBook(seed=1)
            first = Peers([metrics_address(a)], book, ceiling=2**40)
            await first.exchange_all()
            assert first.peers[0].learned == 1
            first.save(tmp_path)
            again = Peers([metrics_address(a)], book, ceiling=2**40)
            again.load(tmp_path)
            await again.exchange_all()
            assert again.peers[0].learned == 0  # nothing new since the saved cursor
            a.server.ledger.record(Entry("p2-k2", 100 * MiB))
            await again.exchange_all()
            assert again.peers[0].learned == 1


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b'{"format": 2}',
                                     b'{"format": 1, "cursors": {"x": [1, 2]}}',
                                     b"[" * 100_000])
def test_a_bad_cursor_file_is_a_fresh_start(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "peers.json").write_bytes(content)
    peers = Peers([TcpAddress("127.0.0.1", 9)], FootprintBook(seed=1), ceiling=2**40)
    peers.load(tmp_path)
    assert peers.peers[0].cursor.query() == 0
