"""Two gatekeepers behind the real Debian HAProxy, steered by --agent.

One is starved of memory through its memory source; HAProxy must drain it
(seen on its stats socket) and send every new job to the other one (seen in
both gatekeepers' own counts); when memory returns, traffic is shared again.
"""

from __future__ import annotations

import contextlib
import csv
import io
import shutil
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
from fakes import Running, backend, config, echo, gatekeeper, receive_all

from gatekeeper.net.addresses import TcpAddress

MiB = 2**20
HAPROXY = shutil.which("haproxy") or (
    "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)

pytestmark = pytest.mark.skipif(HAPROXY is None, reason="needs haproxy (see .ci/install)")

# HAProxy is another process: the only way to see its state is to ask its
# stats socket again, this often, up to STATE_TIMEOUT.
POLL = 0.05
STATE_TIMEOUT = 20.0
JOBS = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def stats(sock_path: Path) -> dict[str, dict[str, str]]:
    """`show stat` rows of backend `farm` by server name."""
    stream = await trio.open_unix_socket(str(sock_path))
    async with stream:
        await stream.send_all(b"show stat\n")
        text = (await receive_all(stream)).decode()
    rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
    return {r["svname"]: r for r in rows if r["pxname"] == "farm"
            and r["svname"] not in ("BACKEND", "FRONTEND")}


def serving(row: dict[str, str]) -> bool:
    """Taking new connections at full weight, after a good agent answer (no regular
    `check` is configured: it would send HAProxy's probes through as jobs)."""
    return (row.get("agent_status") == "L7OK" and row.get("weight") == "100"
            and row.get("status") in ("no check", "UP"))


def draining(row: dict[str, str]) -> bool:
    return str(row.get("status", "")).startswith("DRAIN")


async def until(sock_path: Path, server: str, wanted: Callable[[dict[str, str]], bool],
                ) -> dict[str, dict[str, str]]:
    now: dict[str, dict[str, str]] = {}
    with trio.move_on_after(STATE_TIMEOUT):
        while True:
            with contextlib.suppress(OSError):  # not listening yet
                now = await stats(sock_path)
            if wanted(now.get(server, {})):
                return now
            await trio.sleep(POLL)
    row = now.get(server, {})
    raise AssertionError(f"{server} never {wanted.__name__}: " + ", ".join(
        f"{k}={row.get(k)}" for k in ("status", "weight", "agent_status", "agent_code",
                                      "agent_desc", "last_agt", "check_status")))


@asynccontextmanager
async def haproxy(tmp_path: Path, front: int, a: Running, b: Running,
                  ) -> AsyncIterator[Path]:
    sock_path = tmp_path / "haproxy.sock"
    servers = "\n".join(
        f"    server {name} 127.0.0.1:{gk.address.port} weight 100 agent-check "
        f"agent-addr 127.0.0.1 agent-port {gk.server.agent_addresses[0].rpartition(':')[2]} "
        f"agent-inter 100ms"
        for name, gk in (("a", a), ("b", b)))
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(f"""global
    stats socket {sock_path} mode 600 level admin
defaults
    mode tcp
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend front
    bind 127.0.0.1:{front}
    default_backend farm
backend farm
    balance roundrobin
{servers}
""")
    assert HAPROXY is not None
    check = await trio.run_process([HAPROXY, "-c", "-f", str(cfg)], capture_stdout=True,
                                   capture_stderr=True, check=False)
    assert check.returncode == 0, check.stderr
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(trio.run_process, [HAPROXY, "-db", "-f", str(cfg)], check=False))
        try:
            yield sock_path
        finally:
            process.terminate()


async def job(front: int) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", front)
    async with stream:
        await stream.send_all(b"ping")
        await stream.send_eof()
        assert await receive_all(stream) == b"ping"


def done(gk: Running) -> int:
    """Jobs that ran and ended (counted when the slot is released, which may be
    just after the client saw its reply: wait for it with `settled`)."""
    return gk.server.gate.snapshot().finished_total


async def settled(gk: Running) -> None:
    """Every job whose reply a client has seen has released its slot."""
    with trio.fail_after(STATE_TIMEOUT):
        await gk.wait_for(lambda s: s.gate.snapshot().running == 0)


@pytest.mark.timeout(120)
async def test_haproxy_drains_the_starved_box_and_shares_again(tmp_path: Path) -> None:
    agent = TcpAddress("127.0.0.1", 0)
    front = free_port()
    async with backend(echo) as be:
        cfg = config(be.address, agent=agent, max_jobs=4, min_free_bytes=100 * MiB,
                     identify=False)
        async with gatekeeper(cfg, available=1000 * MiB) as a, \
                gatekeeper(cfg, available=1000 * MiB) as b, \
                haproxy(tmp_path, front, a, b) as sock_path:
            await until(sock_path, "a", serving)
            await until(sock_path, "b", serving)

            a.memory.value = 10 * MiB  # below --min-free-mb: a new job would be held
            state = await until(sock_path, "a", draining)
            sessions_a = int(state["a"]["stot"])
            for _ in range(JOBS):
                await job(front)
            await settled(a)
            await settled(b)
            assert (done(a), done(b)) == (0, JOBS)
            assert int((await stats(sock_path))["a"]["stot"]) == sessions_a

            a.memory.value = 1000 * MiB
            await until(sock_path, "a", serving)
            for _ in range(JOBS):
                await job(front)
            await settled(a)
            await settled(b)
            # Round-robin again: both take a share of the new jobs.
            assert done(a) >= JOBS // 4 and done(b) - JOBS >= JOBS // 4
            assert done(a) + done(b) == 2 * JOBS


@asynccontextmanager
async def director(tmp_path: Path, front: int, gk: Running, send_proxy: str
                   ) -> AsyncIterator[None]:
    """HAProxy in front of one gatekeeper, writing PROXY headers (`send_proxy`)."""
    cfg = tmp_path / "director.cfg"
    cfg.write_text(f"""defaults
    mode tcp
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend front
    bind 127.0.0.1:{front}
    default_backend box
backend box
    server gk 127.0.0.1:{gk.address.port} {send_proxy}
""")
    assert HAPROXY is not None
    check = await trio.run_process([HAPROXY, "-c", "-f", str(cfg)], capture_stdout=True,
                                   capture_stderr=True, check=False)
    assert check.returncode == 0, check.stderr
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(trio.run_process, [HAPROXY, "-db", "-f", str(cfg)], check=False))
        try:
            yield
        finally:
            process.terminate()


async def job_from(source: str, front: int, payload: bytes) -> bytes:
    """A job from a client at `source` (a loopback address of its own)."""
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    # HAProxy may still be starting: its port refuses until it listens.
    with trio.fail_after(STATE_TIMEOUT):
        while True:
            try:
                await sock.connect(("127.0.0.1", front))
                break
            except ConnectionRefusedError:
                sock.close()
                sock = trio.socket.socket()
                await sock.bind((source, 0))
                await trio.sleep(POLL)
    stream = trio.SocketStream(sock)
    async with stream:
        await stream.send_all(payload)
        await stream.send_eof()
        return await receive_all(stream)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("send_proxy", ["send-proxy-v2", "send-proxy"])
async def test_behind_haproxy_the_client_is_the_client(
        tmp_path: Path, send_proxy: str, caplog: pytest.LogCaptureFixture) -> None:
    """HAProxy connects from 127.0.0.1 for everyone; with its PROXY header the
    client at 127.0.0.5 is the one --allow judges and the log names, the header
    never reaches the backend, and a client not allowed is denied."""
    import logging

    from gatekeeper.net.allow import AllowList
    caplog.set_level(logging.INFO, logger="gatekeeper")
    front = free_port()
    async with backend(echo) as be:
        cfg = config(be.address, identify=False,
                     trusted_proxies=AllowList.parse(["127.0.0.1/32"]),
                     allow=AllowList.parse(["127.0.0.5/32"]))
        async with gatekeeper(cfg) as gk, director(tmp_path, front, gk, send_proxy):
            assert await job_from("127.0.0.5", front, b"ping") == b"ping"
            assert await job_from("127.0.0.6", front, b"ping") == b""
            assert be.connections == 1
    ends = [line for line in caplog.text.splitlines() if "end peer=" in line]
    assert any("end peer=127.0.0.5:" in line and "outcome=ok" in line for line in ends), ends
    assert any("end peer=127.0.0.6:" in line and "outcome=denied" in line for line in ends), ends
    assert not any("peer=127.0.0.1:" in line for line in ends), ends
