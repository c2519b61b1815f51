"""The zero-copy relay on its own: what its task does within one turn.

(The data-path behaviour -- integrity, half-close, resets, cancellation -- is
tested through the server against both data paths in test_serve.py.)
"""

from __future__ import annotations

import select
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from gatekeeper.distcc.reply import REPLY_HEAD, encode_reply_head
from gatekeeper.net.copy import ZERO_COPY_AVAILABLE, Transfer
from gatekeeper.net.relay import Relay, RelayJob
from gatekeeper.outcome import Side

pytestmark = pytest.mark.skipif(not ZERO_COPY_AVAILABLE, reason="no os.splice on this platform")


def _pair() -> tuple[socket.socket, socket.socket]:
    """(gatekeeper's end, the peer's end)."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.settimeout(10)
    return ours, theirs


async def test_a_backend_end_that_comes_in_during_a_turn_is_handed_off_before_other_tasks_run(
) -> None:
    """distccd closes right after its reply; when that happens while the relay is
    busy (here: inside the previous job's hand-off), the relay looks again
    before yielding, so the next hand-off does not wait behind the tasks woken
    meanwhile (log lines, bookkeeping). trio runs each batch of runnable tasks
    in a random order, so a relay that merely yielded would come first about
    half of the time: hence the repetitions."""
    for _ in range(20):
        assert await _two_hand_offs_and_a_bystander() == ["A", "B", "bystander"]


async def _two_hand_offs_and_a_bystander() -> list[str]:
    relay = Relay()
    order: list[str] = []
    all_in = trio.Event()
    woken = trio.Event()

    def note(what: str) -> None:
        order.append(what)
        if len(order) == 3:
            all_in.set()
    a_client, a_client_peer = _pair()
    a_backend, a_backend_peer = _pair()
    b_client, b_client_peer = _pair()
    b_backend, b_backend_peer = _pair()

    def a_done() -> None:
        note("A")
        woken.set()  # a task now runnable, as a finished job's handler would be
        b_backend_peer.sendall(b"reply B")
        b_backend_peer.close()

    async def bystander() -> None:
        await woken.wait()
        note("bystander")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay.run)
        nursery.start_soon(bystander)
        a = relay.open(a_client, a_backend, Transfer(), on_complete=a_done,
                       hand_off_at_backend_eof=True)
        b = relay.open(b_client, b_backend, Transfer(), on_complete=lambda: note("B"),
                       hand_off_at_backend_eof=True)
        await wait_all_tasks_blocked()
        a_backend_peer.sendall(b"reply A")
        a_backend_peer.close()
        with trio.fail_after(10):
            await all_in.wait()
        for peer, reply in ((a_client_peer, b"reply A"), (b_client_peer, b"reply B")):
            assert peer.recv(100) == reply
            peer.close()
        with trio.fail_after(10):
            assert (await relay.wait(a)).failed is None
            assert (await relay.wait(b)).failed is None
        nursery.cancel_scope.cancel()
    for s in (a_client, a_backend, b_client, b_backend):
        s.close()
    return order


REPLY = encode_reply_head(0) + b"DOTO%08x" % 1000 + bytes(1000)


@asynccontextmanager
async def _running() -> AsyncIterator[Relay]:
    relay = Relay()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay.run)
        yield relay
        nursery.cancel_scope.cancel()


def _open_distcc_job(relay: Relay, client: socket.socket, backend: socket.socket,
                     handed_off: list[bool]) -> RelayJob:
    return relay.open(client, backend, Transfer(), reply_prefix=REPLY_HEAD,
                      on_complete=lambda: handed_off.append(True), hand_off_at_backend_eof=True)


def _read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


async def test_a_backend_reset_after_its_reply_is_no_clean_end() -> None:
    """distccd killed with its reply sent but input unread resets the
    connection: the data before the reset is readable, the error comes after
    it. That is a failed job (its client gets a reset from the server), not a
    hand-off with a clean EOF."""
    listener = socket.create_server(("127.0.0.1", 0))
    backend = socket.create_connection(listener.getsockname())
    backend_peer, _ = listener.accept()
    listener.close()
    backend.setblocking(False)
    client, client_peer = _pair()
    backend_peer.sendall(REPLY)
    backend_peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    backend_peer.close()  # a reset, no FIN
    waiter = select.poll()
    waiter.register(backend, select.POLLERR)
    assert waiter.poll(10_000), "the reset never arrived"
    handed_off: list[bool] = []
    async with _running() as relay:
        job = _open_distcc_job(relay, client, backend, handed_off)
        with trio.fail_after(10):
            transfer = await relay.wait(job)
    for s in (client, client_peer, backend):
        s.close()
    assert (transfer.failed, handed_off) == (Side.BACKEND, [])
    assert transfer.error is not None and "ConnectionResetError" in transfer.error
    assert Side.BACKEND not in transfer.eofs


async def test_a_client_byte_seen_with_the_backends_end_is_forwarded_and_the_reply_kept(
) -> None:
    """A byte the client sent before distccd's reply and EOF came in, all seen
    in one turn of the relay: the byte still goes to the backend (it was sent
    while the backend was there), the reply reaches the client whole, then its
    EOF; the job ends cleanly when the client closes."""
    client, client_peer = _pair()
    backend, backend_peer = _pair()
    handed_off: list[bool] = []
    async with _running() as relay:
        job = _open_distcc_job(relay, client, backend, handed_off)
        await wait_all_tasks_blocked()
        # No checkpoint in between: the relay sees all three at once.
        client_peer.sendall(b"!")
        backend_peer.sendall(REPLY)
        backend_peer.shutdown(socket.SHUT_WR)
        assert await trio.to_thread.run_sync(_read_to_eof, client_peer) == REPLY
        client_peer.close()
        with trio.fail_after(10):
            transfer = await relay.wait(job)
    assert backend_peer.recv(10) == b"!"
    for s in (client, backend, backend_peer):
        s.close()
    assert (transfer.failed, handed_off) == (None, [True])
