"""Fair sharing bench: a heavy and a light user through one gatekeeper.

Run from the repository root: ``python3 bench/fairness.py``.

A backend that takes a fixed JOB seconds per job; gatekeeper with -j SLOTS in
front. The heavy user (127.0.0.2) sends HEAVY jobs at once, then the light
user (127.0.0.3) sends LIGHT jobs. Each job's queue wait is measured at the
client: time to the reply minus the job's own duration. Reported for
``--fair-by none`` (one FIFO) and ``--fair-by client``.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import trio

JOB = 0.05
SLOTS = 2
HEAVY = 64
LIGHT = 4
ROOT = Path(__file__).resolve().parent.parent


async def backend(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    async def serve(stream: trio.SocketStream) -> None:
        await stream.receive_some(1)
        await trio.sleep(JOB)  # the "compile"
        await stream.send_all(b"ok")
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(serve, listeners)


def start_gatekeeper(backend_port: int, fair_by: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gatekeeper", "--listen", "127.0.0.1:0", "--backend",
         f"127.0.0.1:{backend_port}", "-j", str(SLOTS), "--min-free-mb", "0",
         "--identify", "none", "--fair-by", fair_by],
        stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stderr is not None
    deadline = time.monotonic() + 20
    for line in proc.stderr:
        if "listening on 127.0.0.1:" in line:
            return proc, int(line.rsplit(":", 1)[1])
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError("gatekeeper did not start")


async def user(port: int, source: str, jobs: int, waits: list[float]) -> None:
    async def one() -> None:
        start = time.monotonic()
        stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
        await stream.send_all(b"x")
        reply = b""
        async for data in stream:
            reply += data
        await stream.aclose()
        assert reply == b"ok"
        waits.append(time.monotonic() - start - JOB)

    async with trio.open_nursery() as nursery:
        for _ in range(jobs):
            nursery.start_soon(one)


async def run_once(fair_by: str) -> tuple[list[float], list[float]]:
    async with trio.open_nursery() as nursery:
        backend_port = await nursery.start(backend)
        proc, port = start_gatekeeper(backend_port, fair_by)
        try:
            heavy: list[float] = []
            light: list[float] = []
            with trio.fail_after(60):
                async with trio.open_nursery() as users:
                    users.start_soon(user, port, "127.0.0.2", HEAVY, heavy)
                    await trio.sleep(0.02)  # the heavy backlog is queued first
                    users.start_soon(user, port, "127.0.0.3", LIGHT, light)
        finally:
            proc.terminate()
            proc.wait()
        nursery.cancel_scope.cancel()
    return heavy, light


def main() -> None:
    print(f"backend job {JOB * 1000:.0f} ms, -j {SLOTS}, heavy user {HEAVY} jobs, "
          f"light user {LIGHT} jobs arriving 20 ms later")
    print("| --fair-by | light mean wait | light max wait | heavy mean wait | makespan bound |")
    print("|---|---|---|---|---|")
    for fair_by in ("none", "client"):
        heavy, light = trio.run(run_once, fair_by)
        print(f"| {fair_by} | {statistics.mean(light) * 1000:.0f} ms | "
              f"{max(light) * 1000:.0f} ms | {statistics.mean(heavy) * 1000:.0f} ms | "
              f"{(HEAVY + LIGHT) / SLOTS * JOB * 1000:.0f} ms |")
    print(f"target: light max wait <= about one job ({JOB * 1000:.0f} ms) x its position "
          f"({LIGHT}) = {JOB * LIGHT * 1000:.0f} ms with fairness")


if __name__ == "__main__":
    main()
