"""Handoff: with the job limit binding, how soon the next queued job reaches the backend.

Run from the repository root: ``python3 bench/handoff.py [--jobs N] [--rounds N]``.

gatekeeper runs with ``-j 1``; N clients connect at once, each sending a small
distcc-like request (1 KiB) and waiting for its reply, so all but one queue.
The backend (its own process, one blocking thread, one job at a time) answers
each request with 1 KiB and closes, like distccd (the first job only after
HOLD_FIRST, so that every other job is queued by then). The handoff is the
time from the moment it ends job i (stamped just before its close(), which sends
the FIN) to the moment the first byte of job i+1 arrived at its socket, as the
kernel stamped that byte on arrival (SO_TIMESTAMPNS). So it covers all the
proxy does in between -- seeing the EOF, releasing the slot, admitting the
next job, connecting to the backend and moving its buffered request (and, for
a proxy that waits for it, passing the reply on and seeing the client close)
-- and not how soon the backend process itself gets a CPU to read the byte:
on 2 cores shared by client, proxy and backend that can add hundreds of
microseconds of nobody's making. That figure (the backend's recv() returning)
is reported as well, as "backend reads it".

The client process also stamps its own close (CLOCK_REALTIME, the clock of the
kernel's stamps, is one clock for all processes), so "after client close" is
the proxy's share after the client's close: negative where the next job
reached the backend before the client closed.

HAProxy (TCP mode, server ``maxconn 1``, which queues) is the peer;
systemd-socket-proxyd refuses instead of queueing, so it has no handoff.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import multiprocessing as mp
import os
import shutil
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bulk import free_port, process

ROOT = Path(__file__).resolve().parent.parent
REQUEST = 1024
REPLY = 1024
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux; the stdlib lacks the name
_TIMESPEC = struct.Struct("qq")
# The backend holds the first job this long, so every other job is queued (not
# still connecting) when the measured handoffs begin.
HOLD_FIRST = 0.5


def payload(job: int) -> bytes:
    args = [b"gcc", b"-c", b"x.c", b"-o", b"x.o"]
    head = b"DIST00000001" + b"ARGC%08x" % len(args)
    for a in args:
        head += b"ARGV%08x" % len(a) + a
    head += b"DOTI%08x" % (REQUEST - len(head) - 12)
    return head + bytes(REQUEST - len(head) - 8) + job.to_bytes(8, "big")


def _first_byte(c: socket.socket) -> tuple[bytes, int | None]:
    """Read the first byte, with the time the kernel stamped it on arrival."""
    data, ancillary, _, _ = c.recvmsg(1, socket.CMSG_SPACE(_TIMESPEC.size))
    for level, kind, value in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
            sec, nsec = _TIMESPEC.unpack(value[:_TIMESPEC.size])
            return data, sec * 1_000_000_000 + nsec
    return data, None


def _backend_main(sock: socket.socket, jobs: int, conn: Connection) -> None:
    """Serve `jobs` jobs one at a time; send back [(job id, first byte arrived ns,
    first byte read ns, end ns)], all CLOCK_REALTIME."""
    stamps: list[tuple[int, int, int, int]] = []
    sock.settimeout(60)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)  # inherited on accept
    try:
        while len(stamps) < jobs:
            c, _ = sock.accept()
            c.settimeout(30)
            with c:
                data, arrived = _first_byte(c)
                read = time.time_ns()
                while data and len(data) < REQUEST:
                    more = c.recv(REQUEST - len(data))
                    if not more:
                        break
                    data += more
                if len(data) < REQUEST:
                    continue  # a probe (wait_port), not a job
                if arrived is None:
                    raise OSError("the kernel gave no arrival time (SO_TIMESTAMPNS)")
                if not stamps:
                    time.sleep(HOLD_FIRST)  # the others queue meanwhile
                c.sendall(bytes(REPLY))
                end = time.time_ns()  # then close() sends the FIN
            stamps.append((int.from_bytes(data[-8:], "big"), arrived, read, end))
    except OSError as e:
        print(f"backend: {e}", file=sys.stderr)
    conn.send(stamps)


def _clients_main(port: int, jobs: int, conn: Connection) -> None:
    """Connect `jobs` clients one after another (job 0 first); each sends its request,
    reads the reply to EOF and closes. Sends back {job: close ns}."""
    closed: dict[int, int] = {}

    async def one(job: int, connected: asyncio.Event) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(payload(job))
        connected.set()
        try:
            await asyncio.wait_for(reader.read(), 120)
        finally:
            closed[job] = time.time_ns()
            writer.close()

    async def run() -> None:
        tasks = []
        for job in range(jobs):
            connected = asyncio.Event()
            tasks.append(asyncio.create_task(one(job, connected)))
            await connected.wait()  # arrival order = job order
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(run())
    conn.send(closed)


Result = tuple[list[int], list[int], list[int], int]


def measure(start: Callable[[int], object], jobs: int) -> Result:
    """(handoffs: after the backend's end, after the client's close, until the
    backend read it (ns); jobs out of order)."""
    ctx = mp.get_context("fork")
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(64)
    backend_port = lsock.getsockname()[1]
    b_mine, b_theirs = ctx.Pipe()
    backend = ctx.Process(target=_backend_main, args=(lsock, jobs, b_theirs), daemon=True)
    backend.start()
    lsock.close()
    try:
        with start(backend_port) as port:  # type: ignore[attr-defined]
            c_mine, c_theirs = ctx.Pipe()
            clients = ctx.Process(target=_clients_main, args=(port, jobs, c_theirs), daemon=True)
            clients.start()
            if not c_mine.poll(180) or not b_mine.poll(30):
                raise RuntimeError("handoff run did not finish")
            closed: dict[int, int] = c_mine.recv()
            stamps: list[tuple[int, int, int, int]] = b_mine.recv()
            clients.join(10)
    finally:
        backend.join(5)
        if backend.is_alive():
            backend.kill()
    after_backend, after_client, until_read = [], [], []
    out_of_order = sum(1 for i, s in enumerate(stamps) if s[0] != i)
    for prev, nxt in itertools.pairwise(stamps):
        after_backend.append(nxt[1] - prev[3])
        until_read.append(nxt[2] - prev[3])
        if prev[0] in closed:
            after_client.append(nxt[1] - closed[prev[0]])
    return after_backend, after_client, until_read, out_of_order


def gatekeeper(identify: str, data_path: str = "splice",
               extra: tuple[str, ...] = ()) -> Callable[[int], object]:
    def start(backend: int) -> object:
        port = free_port()
        return process(
            [sys.executable, "-m", "gatekeeper", "--listen", f"127.0.0.1:{port}", "--backend",
             f"127.0.0.1:{backend}", "-j", "1", "--min-free-mb", "0", "--identify", identify,
             "--data-path", data_path, "--fair-by", "none", "--queue-timeout", "600",
             # Every bench client is 127.0.0.1: the per-client queue cap
             # (a quarter of --max-queue) must not turn the 300 away.
             "--max-queued-per-client", "100000",
             "--log-level", "warning", *extra],
            port, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return start


def haproxy(tmp: Path) -> Callable[[int], object]:
    @contextmanager
    def start(backend: int) -> Iterator[int]:
        port = free_port()
        cfg = tmp / "handoff.cfg"
        cfg.write_text(f"""global
    maxconn 4000
defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    timeout queue 120s
listen handoff
    bind 127.0.0.1:{port}
    server s 127.0.0.1:{backend} maxconn 1
""")
        with process(["haproxy", "-f", str(cfg), "-db"], port) as p:
            yield p
    return start


def pct(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e3 if ordered else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=300, help="queued jobs per run")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        peers: dict[str, Callable[[int], object]] = {
            "gatekeeper splice, identify distcc": gatekeeper("distcc"),
            "gatekeeper splice, identify none": gatekeeper("none"),
            "gatekeeper splice, identify distcc, --queued-window 0": gatekeeper(
                "distcc", extra=("--queued-window", "0")),
            # The job's own task adopts the backend's process before the request
            # moves (per-job cgroups, on by default as root), so no start at
            # admission: this is the data path alone.
            "gatekeeper splice, identify distcc, --job-cgroups off": gatekeeper(
                "distcc", extra=("--job-cgroups", "off")),
            "gatekeeper copy, identify distcc": gatekeeper("distcc", "copy"),
        }
        if shutil.which("haproxy"):
            peers["haproxy maxconn 1"] = haproxy(Path(tmp))
        results: dict[str, Result] = {}
        for _ in range(args.rounds):
            for name, start in peers.items():
                ab, ac, ur, ooo = measure(start, args.jobs)
                old = results.get(name, ([], [], [], 0))
                results[name] = (old[0] + ab, old[1] + ac, old[2] + ur, old[3] + ooo)
    print(f"handoff, -j 1, {args.jobs} queued jobs x {args.rounds} rounds, "
          f"{os.cpu_count()} CPUs, loopback (microseconds; first byte = its arrival, "
          "kernel-stamped)")
    print("| path | handoffs | after backend's end p50 | p99 | after client close p50 | p99 "
          "| backend reads it p50 | p99 | out of order |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (ab, ac, ur, ooo) in results.items():
        print(f"| {name} | {len(ab)} | {pct(ab, 0.5):.0f} | {pct(ab, 0.99):.0f} | "
              f"{pct(ac, 0.5):.0f} | {pct(ac, 0.99):.0f} | {pct(ur, 0.5):.0f} | "
              f"{pct(ur, 0.99):.0f} | {ooo} |")


if __name__ == "__main__":
    main()
