"""Footprint learning end to end in-process: peek the distcc head, measure the real
backend process's memory, learn the peak, hold the next run of the same compile."""

from __future__ import annotations

import functools
import logging
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from fakes import config, gatekeeper, receive_all
from prometheus_client import generate_latest

from gatekeeper.distcc.reply import encode_reply_head, parse_reply_status
from gatekeeper.distcc.request import DistccJob, encode_request_head, parse_request_head
from gatekeeper.footprints import CUT_SHORT_GROWTH, STATE_FILE, FootprintBook
from gatekeeper.learning import MIN_SAMPLES
from gatekeeper.memory.oom import OomKills
from gatekeeper.net.addresses import TcpAddress
from gatekeeper.server import Server

MiB = 2**20

# A forking backend like distccd: each connection is served by its own child,
# which reads a distcc head whose last argument says how many MiB to allocate,
# holds them for a while (the "compile"), then answers and exits.
BACKEND = r"""
import os, socket, sys, time
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(16)
print(srv.getsockname()[1], flush=True)
while True:
    conn, _ = srv.accept()
    if os.fork() == 0:
        srv.close()
        data = b""
        while not data.endswith(b"END"):
            chunk = conn.recv(65536)
            if not chunk:
                os._exit(1)
            data += chunk
        mib = int(data[:-3].rsplit(b"MIB=", 1)[1])
        # Answer like distccd: DONE, then the compiler's wait status (STAT=x or 0).
        stat = int(data.split(b"STAT=")[1][:8], 16) if b"STAT=" in data else 0
        head = b"DONE00000001STAT%08x" % stat
        block = bytearray(mib * 2**20)
        for i in range(0, len(block), 4096):
            block[i] = 1
        time.sleep(float(data.split(b"HOLD=")[1][:5]) if b"HOLD=" in data else 0.8)
        conn.sendall(head + b"done %d" % mib)
        conn.close()
        os._exit(0)
    conn.close()
    while True:  # reap finished children
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
"""


@pytest.fixture
def forking_backend() -> Iterator[TcpAddress]:
    if not Path("/proc/net/tcp").exists():
        pytest.skip("needs Linux /proc to find the backend process")
    proc = subprocess.Popen([sys.executable, "-c", BACKEND], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield TcpAddress("127.0.0.1", port)
    finally:
        proc.kill()
        proc.wait()


def request(output: str, mib: int, stat: int | None = None, hold: float | None = None) -> bytes:
    """A distcc head for `output` whose compile touches `mib`; with `stat`, the
    backend answers as distccd would for a compiler that ended with that status;
    with `hold`, the compile lasts that many seconds (else 0.8)."""
    argv = ["g++", "-O2", "-c", output.replace(".o", ".cc"), "-o", output]
    if hold is not None:
        argv.append(f"HOLD={hold:05.3f}")
    if stat is not None:
        argv.append(f"STAT={stat:08x}")
    argv.append(f"MIB={mib}")
    return encode_request_head(argv) + b"END"


def reply(mib: int, stat: int = 0) -> bytes:
    """What the backend answers to `request(..., mib, stat)`."""
    return encode_reply_head(stat) + b"done %d" % mib


def key_of(output: str, mib: int, stat: int | None = None, hold: float | None = None) -> str:
    job = parse_request_head(request(output, mib, stat, hold))
    assert isinstance(job, DistccJob)
    return job.key


async def run_job(client: trio.SocketStream, data: bytes) -> bytes:
    """Like a distcc client: send the request, read the reply, close."""
    await client.send_all(data)
    reply = await receive_all(client)
    await client.aclose()
    return reply


async def test_learns_peak_and_holds_the_next_run_until_it_fits(
        forking_backend: TcpAddress, tmp_path: Path) -> None:
    state = tmp_path / "state"
    cfg = config(forking_backend, max_jobs=4, min_free_bytes=100 * MiB, state_dir=state)
    async with gatekeeper(cfg, available=10_000 * MiB) as gk:
        client = await gk.connect()
        assert await run_job(client, request("big.o", 120)) == reply(120)
        await gk.wait_settled(1)
        book = gk.server.book
        key = key_of("big.o", 120)
        assert book.knows(key)
        learned = book.estimate(key)
        # The measured peak covers the 120 MiB the child touched (plus the interpreter).
        assert 120 * MiB < learned < 400 * MiB

        # Now 10 MiB less than it needed is free above the floor: it must wait.
        gk.memory.value = 100 * MiB + learned - 10 * MiB
        held = await gk.connect()
        await held.send_all(request("big.o", 120))
        await gk.wait_for(lambda s: s.gate.snapshot().queued == 1)
        snap = gk.server.gate.snapshot()
        assert snap.hold is not None and snap.hold.value == "memory"
        await gk.wait_for(lambda s: s.gate.snapshot().head_footprint == learned)
        gk.memory.value = 100 * MiB + learned + MiB  # now it fits
        assert await receive_all(held) == reply(120)
        await held.aclose()
    # Saved at stop, and a new server starts out knowing it.
    assert (state / STATE_FILE).exists()
    again = FootprintBook(seed=0)
    again.load(state, ceiling=2**40)
    assert again.knows(key)


async def test_reservation_of_a_running_job_shrinks_as_its_usage_shows(
        forking_backend: TcpAddress) -> None:
    cfg = config(forking_backend, max_jobs=4, job_mem_bytes=500 * MiB)
    async with gatekeeper(cfg) as gk:
        client = await gk.connect()
        await client.send_all(request("a.o", 80))
        await gk.wait_for(lambda s: s.gate.snapshot().running == 1)
        assert gk.server.gate.snapshot().reserved == 500 * MiB
        # The meter finds the forked child and reports its growing usage.
        await gk.wait_for(lambda s: s.gate.snapshot().reserved <= 500 * MiB - 80 * MiB)
        assert await receive_all(client) == reply(80)
        await client.aclose()
        await gk.wait_for(lambda s: s.gate.snapshot().running == 0)
        assert gk.server.gate.snapshot().reserved == 0


@pytest.mark.parametrize(("stat", "oom", "learned"), [
    (0, False, "peak"),            # a clean compile: its peak is the truth
    (0, True, "peak"),             # it completed; the kill was something else's
    (signal.SIGKILL, False, "cut-short"),  # the compiler itself was killed
    (1 << 8, True, "cut-short"),   # g++'s "Killed signal terminated program cc1plus"
    (1 << 8, False, "nothing"),    # a compile error: its peak means nothing
])
async def test_what_is_learned_follows_how_the_compile_ended(
        forking_backend: TcpAddress, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        stat: int, oom: bool, learned: str) -> None:
    vmstat = tmp_path / "vmstat"
    vmstat.write_text("nr_free_pages 1\noom_kill 7\nnuma_hit 3\n")
    caplog.set_level(logging.INFO, logger="gatekeeper")
    cfg = config(forking_backend, max_jobs=1)
    async with gatekeeper(cfg) as gk:
        gk.server.connections.oom = OomKills(str(vmstat))
        client = await gk.connect()
        await client.send_all(request("x.o", 30, stat))
        await gk.wait_for(lambda s: s.gate.snapshot().running == 1)
        if oom:
            vmstat.write_text("nr_free_pages 1\noom_kill 8\nnuma_hit 3\n")
        # The reply reaches the client whole, the status included.
        assert await receive_all(client) == reply(30, stat)
        await client.aclose()
    # The server has stopped: every connection's end is logged and learned from.
    book, key = gk.server.book, key_of("x.o", 30, stat)
    metrics = generate_latest(gk.server.observatory.registry).decode()
    result = "ok" if stat == 0 else "killed" if stat == signal.SIGKILL else "failed"
    assert f'gatekeeper_compiles_total{{result="{result}"}} 1.0' in metrics
    assert f"gatekeeper_oom_struck_jobs_total {1.0 if oom and stat else 0.0}" in metrics
    end = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("end "))
    status = parse_reply_status(encode_reply_head(stat))
    assert status is not None and f"compile={status.describe()}" in end
    assert ("oom=yes" in end) == (oom and stat != 0)
    peak = book._recent[-1] if book._recent else 0
    if learned == "peak":
        assert book.knows(key) and 30 * MiB < book.estimate(key) < 300 * MiB
    elif learned == "cut-short":
        assert book.knows(key) and not book._recent  # a guess, not a measurement
        assert book.estimate(key) >= CUT_SHORT_GROWTH * 30 * MiB
        assert any("cut short" in r.getMessage() for r in caplog.records)
    else:
        assert not book.knows(key) and peak == 0


@pytest.mark.parametrize("identify", [True, False])
async def test_connections_that_carry_no_compile_teach_nothing(
        forking_backend: TcpAddress, caplog: pytest.LogCaptureFixture, identify: bool) -> None:
    """Issue 17: ten connections that sent nothing (a port scanner, a director's
    TCP check) were each learned at ~2 MiB, the unknown-job estimate fell from
    256 MiB to 3 MiB, and the next real compiles were admitted at 3 MiB."""
    caplog.set_level(logging.INFO, logger="gatekeeper")
    seed = 256 * MiB
    cfg = config(forking_backend, max_jobs=16, job_mem_bytes=seed, identify=identify)
    async with gatekeeper(cfg) as gk:
        idle = [await gk.connect() for _ in range(10)]
        # Each is admitted, reaches the backend's child, and is measured for real.
        await gk.wait_for(lambda s: sum(
            1 for j in s.connections.live.values()
            if j.usage is not None and j.usage.samples >= MIN_SAMPLES) == 10)
        for client in idle:
            await client.aclose()
        await gk.wait_settled(10)
        assert gk.server.book.unknown_estimate() == seed and not gk.server.book._recent
        client = await gk.connect()
        assert await run_job(client, request("heavy.o", 60)) == reply(60)
        await gk.wait_settled(11)
    ends = [r.getMessage() for r in caplog.records if r.getMessage().startswith("end ")]
    assert len(ends) == 11 and f"est={seed // MiB}MiB" in ends[-1]
    assert all(f"est={seed // MiB}MiB" in line for line in ends)


async def test_a_compile_too_short_to_sample_is_not_learned(
        forking_backend: TcpAddress) -> None:
    """Sampling every 0.2 s sees a 50 ms compile once at most, maybe before its
    allocation: that is not a measurement (without a job cgroup it is not
    learned at all; a job cgroup's peak is exact, see test_job_cgroups)."""
    async with gatekeeper(config(forking_backend, max_jobs=4, job_cgroups=False)) as gk:
        for n in range(3):
            client = await gk.connect()
            assert await run_job(client, request("short.o", 40, hold=0.05)) == reply(40)
            await gk.wait_settled(n + 1)
        assert not gk.server.book.knows(key_of("short.o", 40, hold=0.05))
        assert not gk.server.book._recent


def holds(jobs: int, server: Server) -> bool:
    """The gate holds `jobs` jobs, running or queued."""
    snap = server.gate.snapshot()
    return snap.running + snap.queued == jobs


@pytest.mark.parametrize("backfilling", [True, False])
async def test_a_short_known_job_backfills_beside_a_head_that_waits_for_memory(
        forking_backend: TcpAddress, backfilling: bool) -> None:
    """Issue 18's head-of-line case end to end: heavy A runs, heavy B waits for
    memory (two do not fit), medium C fits now and is known to end long
    before A does: it starts beside A at once; strict FIFO holds it behind B."""
    cfg = config(forking_backend, max_jobs=3, backfill=backfilling)
    async with gatekeeper(cfg, available=150 * MiB) as gk:
        book = gk.server.book
        book.learn(key_of("a.o", 0, hold=1.0), 100 * MiB, seconds=10.0)
        book.learn(key_of("b.o", 0, hold=1.0), 100 * MiB, seconds=10.0)
        book.learn(key_of("c.o", 0, hold=0.2), 10 * MiB, seconds=0.5)
        clients = []
        for name, hold in (("a.o", 1.0), ("b.o", 1.0), ("c.o", 0.2)):
            client = await gk.connect()
            await client.send_all(request(name, 0, hold=hold))
            clients.append(client)
            await gk.wait_for(functools.partial(holds, len(clients)))  # decided on arrival
        snap = gk.server.gate.snapshot()
        if backfilling:
            assert (snap.running, snap.queued, snap.backfilled_total) == (2, 1, 1)
        else:
            assert (snap.running, snap.queued, snap.backfilled_total) == (1, 2, 0)
        for client, mib in zip(clients, (0, 0, 0), strict=True):
            assert await receive_all(client) == reply(mib)
            await client.aclose()
        await gk.wait_settled(3)
        # What a measured compile taught includes how long it ran (beside the
        # seed; c.o's 0.2 s is too short to be sampled, test_a_compile_too_short...).
        assert len(book._seconds[key_of("a.o", 0, hold=1.0)]) == 2
