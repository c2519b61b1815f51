"""Run issue 7's four speed benches in one go: ``python3 -m bench [--only NAME ...]``.

Each bench runs gatekeeper and its peers side by side on the same loopback
workload and prints a table of ratios; this only runs them one after another
(each in its own process: they fork, raise fd limits and bind ports), with
their default settings (held: with ``--raise-tcp-mem``). About four minutes on
2 cores. For options, run a bench on its own: ``python3 bench/held.py --help``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = {
    "bulk": "1 GiB one way and echoed: direct, systemd-socket-proxyd, HAProxy, gatekeeper",
    "small_jobs": "short connections from 16 clients: conn/s and added latency",
    "handoff": "with -j 1 binding: a job's end to the next job's first byte at the backend",
    "held": "10,000 queued clients: RSS, kernel TCP memory, idle CPU, FIFO release",
    "hostile": "issue 16's CPU-burn attack: gatekeeper CPU and legitimate jobs' latency",
}
# 10,000 x 256 KiB held needs ~2.6 GiB of kernel TCP memory, more than a default
# tcp_mem allows on a 24 GiB box: raised for that run only (and put back).
EXTRA = {"held": ["--raise-tcp-mem"]}


def main() -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=list(BENCHES), default=list(BENCHES),
                    metavar="NAME", help=f"some of: {', '.join(BENCHES)}")
    args = ap.parse_args()
    failed = []
    for name in args.only:
        print(f"## {name}: {BENCHES[name]}", flush=True)
        started = time.monotonic()
        code = subprocess.call([sys.executable, str(HERE / f"{name}.py"), *EXTRA.get(name, [])],
                               cwd=HERE.parent)
        print(f"({name}: {time.monotonic() - started:.0f} s, exit {code})\n", flush=True)
        if code != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
