"""A real memory cgroup with a real memory-hungry backend in it.

The backend forks a child per job (as distccd does) that touches 150 MiB and
holds it for a while. The cgroup's limit fits two such jobs, not three. Sent
straight to the backend, three at once get one OOM-killed (the control, which
proves the test can fail); through gatekeeper watching the cgroup, all three
complete and the cgroup's own OOM-kill counter does not move -- cold, from the
seed estimate, and warm, from a footprint learned by measuring a first run.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from fakes import config, gatekeeper, receive_until_closed
from test_learning import BACKEND, reply, request

from gatekeeper.memory.sources import build_memory_source
from gatekeeper.net.addresses import TcpAddress

MiB = 2**20
V1_MEMORY = Path("/sys/fs/cgroup/memory")
LIMIT = 400 * MiB  # two 150 MiB jobs (plus interpreters) fit; three do not
JOB_MIB = 150
_names = itertools.count()


@dataclass
class Cgroup:
    path: Path

    def read(self, name: str) -> str:
        return (self.path / name).read_text()

    def oom_kills(self) -> int:
        for line in self.read("memory.oom_control").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        raise AssertionError("memory.oom_control has no oom_kill line on this kernel")

    def remove(self) -> None:
        """Kill what is left in it and below it (the test started all of it) and
        remove it, job cgroups gatekeeper could not remove yet (a zombie of the
        forking backend kept them busy) first."""
        below = sorted((d for d in self.path.rglob("*") if d.is_dir()),
                       key=lambda d: len(d.parts), reverse=True)
        for directory in [*below, self.path]:
            for pid in (directory / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), 9)
        # Killed tasks leave the cgroup asynchronously; cleanup (not synchronisation)
        # retries rmdir for a bounded while.
        deadline = time.monotonic() + 10
        for directory in [*below, self.path]:
            while True:
                try:
                    directory.rmdir()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)


def _cgroup_or_skip() -> Path:
    reason = None
    if os.geteuid() != 0:
        reason = "needs root to create a memory cgroup"
    elif not (V1_MEMORY / "cgroup.procs").exists():
        reason = f"no cgroup v1 memory hierarchy at {V1_MEMORY}"
    if reason:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    path = V1_MEMORY / f"gatekeeper-test-{os.getpid()}-{next(_names)}"
    try:
        path.mkdir()
    except OSError as e:
        print(f"SKIP: cannot create {path}: {e}")
        pytest.skip(f"cannot create {path}: {e}")
    return path


@pytest.fixture
def cgroup() -> Iterator[Cgroup]:
    path = _cgroup_or_skip()
    try:
        (path / "memory.limit_in_bytes").write_text(str(LIMIT))
        (path / "memory.swappiness").write_text("0")
        yield Cgroup(path)
    finally:
        Cgroup(path).remove()


@pytest.fixture
def backend_in_cgroup(cgroup: Cgroup) -> Iterator[TcpAddress]:
    procs = cgroup.path / "cgroup.procs"
    proc = subprocess.Popen(
        ["sh", "-c", f'echo $$ > {procs} && exec "$0" -c "$1"', sys.executable, BACKEND],
        stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        assert str(proc.pid) in procs.read_text().split()
        yield TcpAddress("127.0.0.1", port)
    finally:
        proc.kill()
        proc.wait()


async def three_at_once(connect: object, name: str) -> list[bytes]:
    """Send three identical heavy jobs at once; the replies (`reply` or b'' for a
    job whose process was killed)."""
    replies: list[bytes] = [b""] * 3

    async def one(i: int) -> None:
        stream = await connect()  # type: ignore[operator]
        await stream.send_all(request(name, JOB_MIB))
        replies[i] = await receive_until_closed(stream)
        await stream.aclose()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(one, i)
    return replies


async def test_control_three_at_once_straight_to_backend_get_oom_killed(
        cgroup: Cgroup, backend_in_cgroup: TcpAddress) -> None:
    before = cgroup.oom_kills()

    async def direct() -> trio.SocketStream:
        return await trio.open_tcp_stream("127.0.0.1", backend_in_cgroup.port)

    replies = await three_at_once(direct, "ctl.o")
    killed = cgroup.oom_kills() - before
    print(f"control: replies {replies}, OOM kills {killed}")
    assert killed >= 1
    assert replies.count(reply(JOB_MIB)) < 3


async def test_gatekeeper_watching_the_cgroup_prevents_oom_cold_and_warm(
        cgroup: Cgroup, backend_in_cgroup: TcpAddress) -> None:
    memory = build_memory_source(str(cgroup.path))
    assert memory.available() <= LIMIT
    before = cgroup.oom_kills()
    # Cold: nothing learned; the seed (160 MiB) stands in for each job's peak.
    cfg = config(backend_in_cgroup, max_jobs=4, min_free_bytes=16 * MiB,
                 job_mem_bytes=160 * MiB)
    async with gatekeeper(cfg, source=memory) as gk:
        cold = await three_at_once(gk.connect, "cold.o")
        assert cold == [reply(JOB_MIB)] * 3
        assert cgroup.oom_kills() == before
        with trio.fail_after(10):
            await gk.wait_for(lambda s: s.gate.snapshot().finished_total >= 3)
        assert gk.server.gate.snapshot().running == 0

    # Warm: a seed far too small (10 MiB) would let all three in at once and get
    # one killed; the footprint learned from one measured run holds the third.
    cfg = config(backend_in_cgroup, max_jobs=4, min_free_bytes=16 * MiB,
                 job_mem_bytes=10 * MiB)
    async with gatekeeper(cfg, source=memory) as gk:
        first = await gk.connect()
        await first.send_all(request("warm.o", JOB_MIB))
        assert await receive_until_closed(first) == reply(JOB_MIB)
        await first.aclose()
        with trio.fail_after(10):
            await gk.wait_for(lambda s: s.gate.snapshot().finished_total >= 1)
        assert gk.server.book.estimate(None) == 10 * MiB  # unknown jobs still get the seed
        warm = await three_at_once(gk.connect, "warm.o")
        assert warm == [reply(JOB_MIB)] * 3
        assert cgroup.oom_kills() == before
    memory.close()
