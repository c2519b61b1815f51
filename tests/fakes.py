"""Fake backends and a fake memory source, for fault injection in-process.

Real distccd is used in the end-to-end tests; these exist to make a backend
misbehave on cue (refuse, reset, stall) and to count what reached it.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from gatekeeper.config import Config
from gatekeeper.memory.sources import FixedMemory, MemorySource
from gatekeeper.net.addresses import TcpAddress
from gatekeeper.net.allow import AllowList
from gatekeeper.net.listen import open_all
from gatekeeper.server import Server

Handler = Callable[[trio.SocketStream], Awaitable[None]]


@dataclass
class Backend:
    """A fake backend that counts connections and concurrency."""

    address: TcpAddress
    connections: int = 0
    active: int = 0
    max_active: int = 0
    broken: int = 0
    arrived: trio.Event = field(default_factory=trio.Event)
    lot: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)

    def note_arrival(self) -> None:
        self.connections += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self.arrived.set()
        self.arrived = trio.Event()
        self.lot.unpark_all()

    async def wait_for(self, predicate: Callable[[Backend], bool]) -> None:
        while not predicate(self):
            await self.lot.park()

    def note_departure(self) -> None:
        self.active -= 1
        self.lot.unpark_all()


async def echo(stream: trio.SocketStream) -> None:
    """Echo until EOF, then half-close back."""
    async for data in stream:
        await stream.send_all(data)
    await stream.send_eof()


async def answer_reversed(stream: trio.SocketStream, size: int = 4,
                          request: bytes = b"") -> bytes:
    """A distccd in miniature: read a whole `size`-byte request (after the
    `request` bytes already read), answer it reversed, return it. Like a distcc
    client, the client never half-closes; an early EOF gets no answer."""
    while len(request) < size:
        data = await stream.receive_some(size - len(request))
        if not data:
            return request
        request += data
    await stream.send_all(request[::-1])
    return request


def reset(stream: trio.SocketStream) -> None:
    """Close with RST instead of FIN (SO_LINGER 0)."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


@asynccontextmanager
async def backend(handler: Handler) -> AsyncIterator[Backend]:
    """Run `handler` per connection on an ephemeral loopback port."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    info = Backend(TcpAddress("127.0.0.1", listeners[0].socket.getsockname()[1]))

    async def counted(stream: trio.SocketStream) -> None:
        info.note_arrival()
        try:
            await handler(stream)
        except trio.BrokenResourceError:
            info.broken += 1  # gatekeeper passed a client's reset on: expected in fault tests
        finally:
            info.note_departure()
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, counted, listeners)
        yield info
        nursery.cancel_scope.cancel()


def closed_port() -> TcpAddress:
    """A loopback port with nobody listening (bound, never listened, so nobody can take it
    while the test runs -- the socket is kept open by the module for the process lifetime)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    _KEEP.append(sock)
    return TcpAddress("127.0.0.1", sock.getsockname()[1])


_KEEP: list[socket.socket] = []


# Which data path `config` builds by default; test_serve flips it to run every
# data-path test against both the splice path and the buffer-copy path.
DATA_PATH = {"zero_copy": True}


def config(backend: TcpAddress, **overrides: object) -> Config:
    values: dict[str, object] = {
        "listen": (TcpAddress("127.0.0.1", 0),),
        "backend": backend,
        "max_jobs": 2,
        "min_free_bytes": 0,
        "queue_timeout": 240.0,
        "max_queue": 100,
        "allow": AllowList.parse(["127.0.0.0/8", "::1/128"]),
        "job_mem_bytes": 0,  # the plain min-free rule unless a test says otherwise
        "zero_copy": DATA_PATH["zero_copy"],
        # These tests send made-up bytes ("DIST" alone, "FAIL"...) to fake
        # backends; the argv policy is tested on its own (test_hostile,
        # test_argv_policy) and, on by default, by every CLI-started gatekeeper.
        "argv_policy": None,
        # In-process fake backends live in the test's own process (which the
        # adopter never moves) or fork per connection: per-job cgroups are
        # tested where a real process serves the job (test_job_cgroups) and,
        # on by default, by every CLI-started gatekeeper run as root.
        "job_cgroups": False,
    }
    values.update(overrides)
    return Config(**values)  # type: ignore[arg-type]


@dataclass
class Running:
    server: Server
    memory: FixedMemory
    address: TcpAddress

    async def connect(self) -> trio.SocketStream:
        return await trio.open_tcp_stream(str(self.address.host), self.address.port)

    async def wait_for(self, predicate: Callable[[Server], bool]) -> None:
        """Wait, without polling, until the gate's state satisfies `predicate`."""
        while not predicate(self.server):
            await self.server.gate.wait_changed()

    async def wait_settled(self, finished: int) -> None:
        """Wait until `finished` jobs released their slots and every handler is
        done with its bookkeeping (the slot is handed on before the finished
        job's handler logs and learns)."""
        await self.wait_for(lambda s: s.gate.snapshot().finished_total == finished
                            and not s.connections.live)


@asynccontextmanager
async def gatekeeper(cfg: Config, *, available: int = 2**40,
                     source: MemorySource | None = None) -> AsyncIterator[Running]:
    """A gatekeeper in the test's nursery. Its memory is a FixedMemory the test can
    move (`Running.memory`), unless the test brings a real `source`."""
    memory = FixedMemory(available)
    server = Server(cfg, source if source is not None else memory, drain_timeout=5.0)
    listeners = await open_all(cfg.listen)
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(server.run, listeners)
        host, _, port = addresses[0].rpartition(":")
        yield Running(server, memory, TcpAddress(host, int(port)))
        server.stop()


def held_fds(gk: Running) -> int:
    """This process's open fds, less the relay's spare pipes (a bounded cache of
    empty pipes for the next jobs, not a leak)."""
    relay = gk.server.relay
    return len(os.listdir("/proc/self/fd")) - (relay.spare_fds if relay is not None else 0)


async def receive_all(stream: trio.SocketStream) -> bytes:
    chunks = []
    async for data in stream:
        chunks.append(data)
    return b"".join(chunks)


async def receive_until_closed(stream: trio.SocketStream) -> bytes:
    """Everything received until the peer closed, by FIN or by RST (closing a socket
    with unread request bytes in it makes Linux send RST: both mean "turned away")."""
    chunks = []
    try:
        async for data in stream:
            chunks.append(data)
    except trio.BrokenResourceError:
        pass
    return b"".join(chunks)
