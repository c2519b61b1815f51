"""unix:/path listeners and backends: the path's life cycle (stale, live, not a socket),
its permissions, and jobs through it end to end in-process."""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from distcc_harness import gatekeeper_env
from fakes import config, echo, receive_all

from gatekeeper.memory.sources import FixedMemory
from gatekeeper.net.addresses import UnixAddress, open_unix_listener
from gatekeeper.net.allow import AllowList
from gatekeeper.net.listen import open_all
from gatekeeper.server import Server

# Real processes and sockets: each test here is bounded well below the suite-wide limit.
pytestmark = pytest.mark.timeout(60)


@asynccontextmanager
async def unix_echo_backend(path: Path) -> AsyncIterator[list[int]]:
    """An echo backend on a unix socket; yields a one-element connection counter."""
    count = [0]
    listener = await open_unix_listener(str(path))

    async def handler(stream: trio.SocketStream) -> None:
        count[0] += 1
        await echo(stream)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handler, [listener])
        yield count
        nursery.cancel_scope.cancel()


async def test_unix_listener_to_unix_backend(tmp_path: Path) -> None:
    front, back = tmp_path / "front.sock", tmp_path / "back.sock"
    # Unix peers are always allowed (file permissions govern them), whatever --allow says.
    cfg = config(UnixAddress(str(back)), listen=(UnixAddress(str(front)),),  # type: ignore[arg-type]
                 allow=AllowList.parse(["10.0.0.0/8"]))
    async with unix_echo_backend(back) as connections:
        server = Server(cfg, FixedMemory(2**40), drain_timeout=1.0)
        listeners = await open_all(cfg.listen)
        async with trio.open_nursery() as nursery:
            assert await nursery.start(server.run, listeners) == [f"unix:{front}"]
            client = await trio.open_unix_socket(str(front))
            await client.send_all(b"through two unix sockets")
            await client.send_eof()
            assert await receive_all(client) == b"through two unix sockets"
            server.stop()
        assert connections == [1]


async def test_socket_file_is_world_connectable(tmp_path: Path) -> None:
    path = tmp_path / "gk.sock"
    listener = await open_unix_listener(str(path))
    try:
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode)
        # Like distccd's TCP port; restrict with the directory's permissions or
        # systemd's SocketMode= when socket-activated.
        assert stat.S_IMODE(mode) == 0o666
    finally:
        await listener.aclose()


async def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "gk.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))  # left behind by a process that died: nobody listens
    dead.close()
    listener = await open_unix_listener(str(path))
    try:
        client = await trio.open_unix_socket(str(path))
        await client.aclose()
    finally:
        await listener.aclose()


async def test_live_socket_and_non_socket_are_left_alone(tmp_path: Path) -> None:
    live = tmp_path / "live.sock"
    holder = socket.socket(socket.AF_UNIX)
    holder.bind(str(live))
    holder.listen()
    try:
        with pytest.raises(OSError) as info:
            await open_unix_listener(str(live))
        assert info.value.errno == errno.EADDRINUSE
        assert "live listener" in str(info.value)
    finally:
        holder.close()
    regular = tmp_path / "file"
    regular.write_text("precious")
    with pytest.raises(OSError) as info:
        await open_unix_listener(str(regular))
    assert info.value.errno == errno.EEXIST
    assert regular.read_text() == "precious"


def test_live_unix_listener_is_a_one_line_startup_failure(tmp_path: Path) -> None:
    live = tmp_path / "live.sock"
    holder = socket.socket(socket.AF_UNIX)
    holder.bind(str(live))
    holder.listen()
    try:
        proc = subprocess.run([sys.executable, "-m", "gatekeeper", "--listen", f"unix:{live}"],
                              capture_output=True, text=True, timeout=30, env=gatekeeper_env())
    finally:
        holder.close()
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "in use" in proc.stderr, proc.stderr
