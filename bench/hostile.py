"""Issue 16's CPU-burn attack, measured: what it costs gatekeeper, and what it
costs the legitimate jobs served meanwhile.

The attack: 20 connections a second, each a valid but never-completed 49 KB
request head (ARGC 4096), held 0.3 s and then closed. The peer is the same
gatekeeper with no attack, in the same run: legitimate jobs (a small distcc
request to a backend that answers at once, one after another) are timed
quiet and under attack, alternating rounds, and reported as medians and as
the ratio attack/quiet. gatekeeper's own CPU seconds are read from /proc for
each phase.

    python3 bench/hostile.py [--rounds 3] [--jobs 250] [--rate 50]
"""

from __future__ import annotations

import argparse
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gatekeeper.distcc.request import encode_request_head

SOURCE = b"int f(void) { return 1; }\n"
GOOD = (encode_request_head(["gcc", "-c", "ok.c", "-o", "ok.o"])
        + b"DOTI%08x" % len(SOURCE) + SOURCE)
REPLY = b"DONE00000001STAT00000000SERR00000000SOUT00000000DOTO00000004obj!"
ATTACK = encode_request_head(["gcc", *(f"-DN{i}" for i in range(4095))])[:49_000]


def backend() -> tuple[socket.socket, threading.Thread]:
    """Reads a whole GOOD request, answers like distccd, closes."""
    srv = socket.create_server(("127.0.0.1", 0), backlog=128)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                got = 0
                while got < len(GOOD) and (chunk := conn.recv(65536)):
                    got += len(chunk)
                conn.sendall(REPLY)
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv, t


def legit_jobs(port: int, count: int, rate: float) -> list[float]:
    """`count` jobs, one after another, paced at `rate` a second."""
    out = []
    begin = time.monotonic()
    for i in range(count):
        time.sleep(max(0.0, begin + i / rate - time.monotonic()))
        start = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(GOOD)
            while s.recv(65536):
                pass
        out.append(time.perf_counter() - start)
    return out


def attack(port: int, stop: threading.Event) -> None:
    held: list[tuple[float, socket.socket]] = []
    start, i = time.monotonic(), 0
    while not stop.is_set():
        with_sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        with_sock.sendall(ATTACK)
        held.append((time.monotonic(), with_sock))
        while held and time.monotonic() - held[0][0] > 0.3:
            held.pop(0)[1].close()
        i += 1
        time.sleep(max(0.0, start + i / 20 - time.monotonic()))
    for _, s in held:
        s.close()


def cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=250, help="legitimate jobs per phase")
    ap.add_argument("--rate", type=float, default=50.0, help="legitimate jobs a second")
    ap.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent,
                    help="run the gatekeeper of this checkout (to compare releases)")
    args = ap.parse_args()
    srv, _ = backend()
    with tempfile.NamedTemporaryFile("w+", suffix=".log") as log:
        gk = subprocess.Popen(
            [sys.executable, "-m", "gatekeeper", "--listen", "127.0.0.1:0", "--backend",
             f"127.0.0.1:{srv.getsockname()[1]}", "--log-level", "warning", "--max-jobs", "4"],
            stderr=log, cwd=args.tree)
        try:
            port = None
            for _ in range(300):  # bounded: 30 s for the startup line
                found = re.search(r"listening on 127\.0\.0\.1:(\d+)", Path(log.name).read_text())
                if found:
                    port = int(found.group(1))
                    break
                time.sleep(0.1)
            if port is None:
                # --log-level warning hides the line: ask the kernel instead.
                conns = psutil.Process(gk.pid).net_connections(kind="tcp")
                port = next(c.laddr.port for c in conns if c.status == "LISTEN")
            proc = psutil.Process(gk.pid)
            rows: dict[str, list[tuple[float, float, float]]] = {"quiet": [], "attack": []}
            for _ in range(args.rounds):
                for phase in ("quiet", "attack"):
                    stop = threading.Event()
                    attacker = threading.Thread(target=attack, args=(port, stop))
                    before = cpu(proc)
                    began = time.monotonic()
                    if phase == "attack":
                        attacker.start()
                    lat = legit_jobs(port, args.jobs, args.rate)
                    stop.set()
                    if phase == "attack":
                        attacker.join()
                    spent = cpu(proc) - before
                    took = time.monotonic() - began
                    q = statistics.quantiles(lat, n=100)
                    rows[phase].append((q[49] * 1e6, q[98] * 1e6, spent / took * 100))
        finally:
            gk.terminate()
            gk.wait(30)
            srv.close()
    print(f"hostile: {args.jobs} legitimate jobs per phase at {args.rate:g}/s, "
          f"{args.rounds} rounds, "
          "attack = 20 conn/s of never-completed 49 KB heads (medians of rounds)")
    print("| phase | job p50 µs | job p99 µs | gatekeeper CPU % |")
    print("|---|---|---|---|")
    med = {}
    for phase, values in rows.items():
        med[phase] = tuple(statistics.median(v[i] for v in values) for i in range(3))
        p50, p99, load = med[phase]
        print(f"| {phase} | {p50:.0f} | {p99:.0f} | {load:.1f} |")
    print(f"attack/quiet: p50 {med['attack'][0] / med['quiet'][0]:.2f}x, "
          f"p99 {med['attack'][1] / med['quiet'][1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
