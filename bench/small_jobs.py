"""Small jobs: many short connections through gatekeeper and its peers, side by side.

Run from the repository root: ``python3 bench/small_jobs.py [--seconds S] [--rounds N]``.

Each job is one connection shaped like a small compile: the client sends 64 KiB
(starting with a real distcc request head, so ``--identify distcc`` parses it at
once), the backend answers 16 KiB and closes. 16 clients run jobs back to back
for a fixed time. Limits are not binding (gatekeeper ``-j 64 --min-free-mb 0``).

The load generator runs in its own processes (asyncio, 2 processes x 8
clients), the backend in another (asyncio protocol server), so neither shares
an interpreter with the proxy. Everything still shares this machine's CPUs:
the client's and backend's CPU use is printed so a saturated generator shows.
Peers run interleaved, round by round; the table has the total connections per
second over all rounds and latency percentiles (connect to EOF) over all jobs.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bulk import free_port, haproxy, process, socket_proxyd, wait_port

ROOT = Path(__file__).resolve().parent.parent
REQUEST = 64 * 1024
REPLY = 16 * 1024
CLIENTS = 16
CLIENT_PROCESSES = 2


def _head() -> bytes:
    args = [b"gcc", b"-c", b"small.c", b"-o", b"small.o"]
    head = b"DIST00000001" + b"ARGC%08x" % len(args)
    for a in args:
        head += b"ARGV%08x" % len(a) + a
    return head + b"DOTI%08x" % (REQUEST - len(head) - 24)


PAYLOAD = (_head() + bytes(REQUEST))[:REQUEST]


class _Backend(asyncio.Protocol):
    def __init__(self) -> None:
        self.got = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self.got >= REQUEST and self.transport is not None:
            self.transport.write(bytes(REPLY))
            self.transport.close()
            self.transport = None

    def eof_received(self) -> bool:
        return False


def _backend_main(port: int, conn: Connection) -> None:
    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Backend, "127.0.0.1", port, backlog=4096)
        conn.send("ready")
        async with server:
            await loop.run_in_executor(None, conn.recv)  # "stop"
        ru = resource.getrusage(resource.RUSAGE_SELF)
        conn.send(ru.ru_utime + ru.ru_stime)

    asyncio.run(serve())


class _Client(asyncio.Protocol):
    def __init__(self, done: asyncio.Future[int]) -> None:
        self.done = done
        self.got = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(PAYLOAD)

    def data_received(self, data: bytes) -> None:
        self.got += len(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(self.got)


def _client_main(port: int, clients: int, seconds: float, conn: Connection) -> None:
    """Run `clients` loops of back-to-back jobs for `seconds`; send back latencies."""
    async def one(deadline: float, lat: list[float], errors: list[int]) -> None:
        loop = asyncio.get_running_loop()
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            done: asyncio.Future[int] = loop.create_future()
            try:
                transport, _ = await loop.create_connection(functools.partial(_Client, done),
                                                            "127.0.0.1", port)
                got = await asyncio.wait_for(done, 10)
                transport.close()
            except (TimeoutError, OSError):
                errors[0] += 1
                continue
            if got != REPLY:
                errors[0] += 1
                continue
            lat.append(time.perf_counter() - start)

    async def run() -> tuple[list[float], int, float]:
        lat: list[float] = []
        errors = [0]
        t0 = time.perf_counter()
        await asyncio.gather(*(one(t0 + seconds, lat, errors) for _ in range(clients)))
        return lat, errors[0], time.perf_counter() - t0

    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    lat, errors, wall = asyncio.run(run())
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    conn.send((lat, errors, wall, cpu))


def load(port: int, seconds: float) -> tuple[list[float], int, float, float]:
    """(latencies, errors, wall seconds, client CPU seconds) for one run."""
    ctx = mp.get_context("fork")
    pipes, procs = [], []
    for _ in range(CLIENT_PROCESSES):
        mine, theirs = ctx.Pipe()
        p = ctx.Process(target=_client_main,
                        args=(port, CLIENTS // CLIENT_PROCESSES, seconds, theirs), daemon=True)
        p.start()
        pipes.append(mine)
        procs.append(p)
    lat: list[float] = []
    errors, wall, cpu = 0, 0.0, 0.0
    for mine, p in zip(pipes, procs, strict=True):
        if not mine.poll(seconds + 30):
            p.kill()
            raise RuntimeError("client process hung")
        part, e, w, c = mine.recv()
        p.join(10)
        lat += part
        errors += e
        wall = max(wall, w)
        cpu += c
    return lat, errors, wall, cpu


def gatekeeper(backend: int, identify: str, data_path: str = "splice",
               extra: tuple[str, ...] = ()) -> Callable[[], object]:
    return lambda: (port := free_port(), process(
        [sys.executable, "-m", "gatekeeper", "--listen", f"127.0.0.1:{port}", "--backend",
         f"127.0.0.1:{backend}", "-j", "64", "--min-free-mb", "0", "--identify", identify,
         "--data-path", data_path, "--log-level", "warning", *extra],
        port, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}))[1]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="per peer per round")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    ctx = mp.get_context("fork")
    backend_port = free_port()
    mine, theirs = ctx.Pipe()
    backend = ctx.Process(target=_backend_main, args=(backend_port, theirs), daemon=True)
    backend.start()
    if not mine.poll(10):
        raise RuntimeError("backend did not start")
    mine.recv()
    wait_port(backend_port)
    results: dict[str, tuple[list[float], int, float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        peers: dict[str, Callable[[], object] | None] = {
            "direct": None,
            "haproxy": haproxy(backend_port, Path(tmp)),
            "systemd-socket-proxyd": socket_proxyd(backend_port),
            "gatekeeper splice, identify distcc": gatekeeper(backend_port, "distcc"),
            "gatekeeper splice, identify none": gatekeeper(backend_port, "none"),
            "gatekeeper splice, identify distcc, --queued-window 0": gatekeeper(
                backend_port, "distcc", extra=("--queued-window", "0")),
            # Per-job cgroups (on by default as root) adopt the backend's process
            # for each job: here one asyncio process serves every job, so each
            # job pays for the lookup and two moves, without distccd's gain.
            "gatekeeper splice, identify distcc, --job-cgroups off": gatekeeper(
                backend_port, "distcc", extra=("--job-cgroups", "off")),
            "gatekeeper copy, identify none": gatekeeper(backend_port, "none", "copy"),
        }
        for _ in range(args.rounds):
            for name, start in peers.items():
                if name != "direct" and start is None:
                    continue
                if start is None:
                    load(backend_port, 0.5)  # warm-up
                    run = load(backend_port, args.seconds)
                else:
                    with start() as port:  # type: ignore[attr-defined]
                        load(port, 0.5)
                        run = load(port, args.seconds)
                old = results.get(name, ([], 0, 0.0, 0.0))
                results[name] = (old[0] + run[0], old[1] + run[1], old[2] + run[2],
                                 old[3] + run[3])
    mine.send("stop")
    backend_cpu = mine.recv() if mine.poll(10) else float("nan")
    backend.join(10)
    print(f"small jobs: {CLIENTS} clients ({CLIENT_PROCESSES} processes), {REQUEST // 1024} KiB "
          f"in / {REPLY // 1024} KiB out, {args.rounds} x {args.seconds:g} s per peer, "
          f"{os.cpu_count()} CPUs, loopback")
    print("| path | conn/s | vs haproxy | p50 ms | p99 ms | added p50 ms | added p99 ms "
          "| errors | client CPU % |")
    print("|---|---|---|---|---|---|---|---|---|")
    rate = {n: len(r[0]) / r[2] for n, r in results.items() if r[2] > 0}
    d50 = pct(results["direct"][0], 0.5)
    d99 = pct(results["direct"][0], 0.99)
    ref = rate.get("haproxy")
    for name, (lat, errors, wall, cpu) in results.items():
        p50, p99 = pct(lat, 0.5), pct(lat, 0.99)
        ratio = f"{rate[name] / ref:.2f}x" if ref else "-"
        print(f"| {name} | {rate[name]:.0f} | {ratio} | {p50 * 1e3:.2f} | {p99 * 1e3:.2f} | "
              f"{(p50 - d50) * 1e3:+.2f} | {(p99 - d99) * 1e3:+.2f} | {errors} | "
              f"{100 * cpu / wall:.0f} |")
    print(f"(backend process CPU over the whole run: {backend_cpu:.1f} s; "
          f"median of all latencies {statistics.median(results['direct'][0]) * 1e3:.2f} ms "
          "direct)")


if __name__ == "__main__":
    main()
