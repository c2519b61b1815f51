"""The metrics and agent ports under issue 16's attacks: idle connections,
peers outside their allow list, rebinding Host names, fd exhaustion."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.testing
from fakes import backend, config, echo, gatekeeper, receive_all, receive_until_closed

from gatekeeper.net.addresses import TcpAddress
from gatekeeper.net.allow import AllowList
from gatekeeper.net.listen import SIDE_CONNECTIONS, FdPlan
from gatekeeper.net.sideport import SIDE_DEADLINE
from gatekeeper.observe.web import REQUEST_TIMEOUT, host_allowed

LOOPBACK = TcpAddress("127.0.0.1", 0)
NAMES = frozenset({"localhost", "buildbox"})


async def _connect(address: str) -> trio.SocketStream:
    host, _, port = address.rpartition(":")
    return await trio.open_tcp_stream(host, int(port))


async def _get(address: str, path: str, host: str = "localhost") -> int:
    stream = await _connect(address)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        answer = await receive_all(stream)
    return int(answer.split(b" ")[1])


async def test_idle_connections_cannot_queue_a_scrape_behind_them() -> None:
    """Issue 16: 100 idle connections made `curl /status` take 29.2 s."""
    async with backend(echo) as be, gatekeeper(config(be.address, metrics=LOOPBACK)) as gk:
        address = gk.server.metrics_addresses[0]
        idle = [await _connect(address) for _ in range(100)]
        # Those past the cap were closed at once: they read EOF without waiting.
        closed = 0
        for stream in idle[SIDE_CONNECTIONS:]:
            with trio.fail_after(2):
                if await receive_until_closed(stream) == b"":
                    closed += 1
        assert closed == 100 - SIDE_CONNECTIONS
        # Idle ones lose their places after REQUEST_TIMEOUT: a scrape (which,
        # like Prometheus's next one, comes again if turned away) is answered
        # within seconds, not after the idle ones' 29 s.
        with trio.fail_after(REQUEST_TIMEOUT + 2):
            while True:
                with contextlib.suppress(IndexError):  # closed at once: full
                    assert await _get(address, "/status") == 200
                    break
                await trio.sleep(0.1)
        for stream in idle:
            await stream.aclose()


async def test_deadline_counts_from_accept_not_from_a_place(
        autojump_clock: trio.testing.MockClock) -> None:
    async with backend(echo) as be, gatekeeper(config(be.address, metrics=LOOPBACK)) as gk:
        address = gk.server.metrics_addresses[0]
        begin = trio.current_time()
        idle = [await _connect(address) for _ in range(SIDE_CONNECTIONS)]
        # Every one of them, served or waiting for a place, is closed at the deadline.
        for stream in idle:
            assert await receive_until_closed(stream) == b""
            await stream.aclose()
        assert trio.current_time() - begin <= SIDE_DEADLINE + 0.5


async def test_metrics_allow_closes_other_peers_at_once() -> None:
    only_elsewhere = AllowList.parse(["10.0.0.0/8"])
    async with backend(echo) as be, gatekeeper(config(
            be.address, metrics=LOOPBACK, agent=LOOPBACK, metrics_allow=only_elsewhere,
            agent_allow=only_elsewhere)) as gk:
        for address in (gk.server.metrics_addresses[0], gk.server.agent_addresses[0]):
            stream = await _connect(address)
            with trio.fail_after(2):
                await stream.send_all(b"GET /status HTTP/1.0\r\n\r\n")
                assert await receive_until_closed(stream) == b""
            await stream.aclose()


async def test_agent_answers_loopback_by_default() -> None:
    async with backend(echo) as be, gatekeeper(config(be.address, agent=LOOPBACK)) as gk:
        stream = await _connect(gk.server.agent_addresses[0])
        with trio.fail_after(5):
            assert (await receive_all(stream)).endswith(b"\n")
        await stream.aclose()


async def test_status_refuses_a_rebound_host_name() -> None:
    async with backend(echo) as be, gatekeeper(config(be.address, metrics=LOOPBACK)) as gk:
        address = gk.server.metrics_addresses[0]
        port = address.rpartition(":")[2]
        with trio.fail_after(10):
            assert await _get(address, "/status", "evil.example") == 403
            assert await _get(address, "/", "evil.example:80") == 403
            assert await _get(address, "/metrics", "evil.example") == 200  # names no one
            assert await _get(address, "/status", f"127.0.0.1:{port}") == 200
            assert await _get(address, "/status", "localhost") == 200


@pytest.mark.parametrize(("host", "allowed"), [
    (None, True), ("127.0.0.1", True), ("127.0.0.1:3634", True), ("[::1]:3634", True),
    ("10.1.2.3", True), ("localhost", True), ("localhost.", True), ("LOCALHOST:3634", True),
    ("buildbox", True),
    ("evil.example", False), ("127.0.0.1.nip.io", False), ("localhost.evil", False),
    ("", False), ("[::1", False),
])
def test_host_allowed(host: str | None, allowed: bool) -> None:
    assert host_allowed(host, NAMES) is allowed


async def test_metrics_host_names_an_extra_host() -> None:
    """The box's FQDN when gethostname() is short: named with --metrics-host."""
    async with backend(echo) as be, gatekeeper(config(
            be.address, metrics=LOOPBACK, metrics_hosts=("build1.corp.example",))) as gk:
        address = gk.server.metrics_addresses[0]
        with trio.fail_after(10):
            assert await _get(address, "/status", "build1.corp.example:3634") == 200
            assert await _get(address, "/status", "build1.evil.example") == 403


def test_side_ports_are_inside_the_fd_budget() -> None:
    plain = FdPlan.of(config(LOOPBACK), inetd=False)
    both = FdPlan.of(config(LOOPBACK, metrics=LOOPBACK, agent=LOOPBACK), inetd=False)
    assert both.fixed - plain.fixed == 2 * SIDE_CONNECTIONS


def test_idle_side_connections_at_a_low_fd_limit_raise_no_traceback(tmp_path: Path) -> None:
    """Issue 16: with 256 fds, 240 idle metrics connections hit EMFILE in both
    accept loops (135 tracebacks in 12 s)."""
    script = r'''
import socket, subprocess, sys, time, re, os
gk = subprocess.Popen([sys.executable, "-m", "gatekeeper", "--listen", "127.0.0.1:0",
    "--backend", "127.0.0.1:9", "--metrics", "127.0.0.1:0", "--max-queue", "100",
    "--max-jobs", "2"], stderr=open(sys.argv[1], "w"), text=True,
    preexec_fn=lambda: __import__("resource").setrlimit(
        __import__("resource").RLIMIT_NOFILE, (256, 256)))
port = None
for _ in range(300):  # bounded: up to 30 s for the startup line
    m = re.search(r"metrics and status on http://127.0.0.1:(\d+)/", open(sys.argv[1]).read())
    if m:
        port = int(m.group(1))
        break
    time.sleep(0.1)
socks = []
for _ in range(240):
    try:
        socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
    except OSError:
        break
answer = b""
for _ in range(50):  # bounded: the idle ones lose their places within a second
    answer = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            while chunk := s.recv(65536):
                answer += chunk
    except ConnectionResetError:
        pass
    if answer.startswith(b"HTTP/1.0 200"):
        break
    time.sleep(0.1)
for x in socks:
    x.close()
gk.terminate()
try:
    gk.wait(timeout=30)
except subprocess.TimeoutExpired:
    gk.kill()
print(answer.split(b"\r\n")[0].decode())
print("TRACEBACKS", open(sys.argv[1]).read().count("Traceback"))
'''
    log = tmp_path / "gatekeeper.log"
    done = subprocess.run([sys.executable, "-c", script, str(log)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert "HTTP/1.0 200 OK" in done.stdout, done.stdout + done.stderr
    assert "TRACEBACKS 0" in done.stdout, done.stdout + done.stderr + log.read_text()


async def test_side_ports_are_closed_when_the_server_stops() -> None:
    async with backend(echo) as be:
        async with gatekeeper(config(be.address, metrics=LOOPBACK, agent=LOOPBACK)) as gk:
            addresses = [gk.server.metrics_addresses[0], gk.server.agent_addresses[0]]
        for address in addresses:
            with pytest.raises(OSError):
                await _connect(address)
