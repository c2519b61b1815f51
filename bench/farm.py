"""The farm bench (issue 20): three boxes behind HAProxy, a heavy and a light user.

Run as root from the repository root:

    python3 -m bench.farm [--results PATH]

The farm of bench/farmnet.py: three boxes in network namespaces, each a v1
memory cgroup of its own size (1 GiB, 768 MiB, 384 MiB) with a real distccd in
it; a director with the real HAProxy; two clients, each its own namespace: a
heavy user (`make -j32` of a project of heavy and light C++ files,
bench/hungry.py) and a light user (`make -j4` of light files only), building at
the same time with the stock distcc client (no fallback: a failed remote
compile is a failed compile). Side by side in one run:

  a. baseline: HAProxy round-robin straight to the three distccd (`--jobs 4`),
     no gatekeeper;
  b. gatekeeper on every box (`-j 2`, `--peer` the others, `--trusted-proxy`
     the director, `--fair-by client`), HAProxy with send-proxy-v2,
     `maxconn 2`, health checks and agent-check; cold (fresh state dirs);
  c. the same farm again, warm: every object removed and built again.

Reports per run: OOM kills (each box's cgroup `oom_kill`), failed compiles
(objects missing after `make -k`), each user's makespan, and with gatekeeper
the light user's mean wait for a slot against its median job length, and
(warm) how many jobs were known (`est_from=learned`) on the box that ran them.
The whole farm shares this machine's CPUs: makespans compare a with b and c,
not with a real farm.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.farmnet import (
    BOXES,
    DISTCCD_PORT,
    PORT,
    REPO,
    Procs,
    cgroups,
    haproxy_state,
    make,
    network,
    oom_kills,
    start_director,
    start_distccd,
    start_gatekeeper,
    until,
    why_not,
)
from bench.hungry import Spec, generate

HEAVY_USER, LIGHT_USER = "10.77.0.3", "10.77.0.4"
CLIENTS = {"gkf-heavy": HEAVY_USER, "gkf-light": LIGHT_USER}
# All twelve heavy files first in the Makefile: make -j32 sends them at once,
# and round-robin puts about four on each box (distccd --jobs 4): ~970 MiB
# charged where 768 or 384 MiB are. (Six, two a box, killed nothing: their
# peaks did not meet on 2 shared CPUs.)
HEAVY_SPEC = Spec(heavy=12, light=36, heavy_per_group=12, lights_per_group=36)
LIGHT_SPEC = Spec(heavy=0, light=24, lights_per_group=24)
END = re.compile(r"end peer=(?P<peer>[\d.]+):\d+ outcome=(?P<outcome>\S+) wait=(?P<wait>[\d.]+)s"
                 r" run=(?P<run>[\d.]+)s.*? job=(?P<job>\S+)"
                 r"(?: compile=\S+)?(?: est=\d+MiB est_from=(?P<source>\w+))?")


@dataclass
class Run:
    name: str
    label: str
    round: int = 1
    kills: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    light_wait: float | None = None
    light_job: float | None = None
    learned: tuple[int, int] | None = None


def log(text: str) -> None:
    print(f"[farm {datetime.datetime.now():%H:%M:%S}] {text}", flush=True)


def missing(project_root: Path, objects: Sequence[str]) -> int:
    return sum(1 for obj in objects if not (project_root / obj).exists())


def build_both(work: Path, projects: dict[str, tuple[Path, list[str]]], tag: str,
               run: Run) -> None:
    """Both users at once (make in threads: each is its own process)."""
    results: dict[str, float] = {}

    def one(client: str, jobs: int) -> None:
        root, _ = projects[client]
        _, seconds = make(client, root, work, f"{tag}-{client}", jobs=jobs, fallback=False,
                          timeout=900)
        results[client] = seconds

    threads = [threading.Thread(target=one, args=("gkf-heavy", 32)),
               threading.Thread(target=one, args=("gkf-light", 4))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for client, (root, objects) in projects.items():
        run.failed[client] = missing(root, objects)
        run.seconds[client] = results[client]


def scenario(work: Path, projects: dict[str, tuple[Path, list[str]]], *, gatekeeper: bool,
             runs: list[Run], round_: int = 1) -> None:
    # Each scenario of each round in a directory of its own: fresh state dirs
    # (a cold run is cold), its own logs.
    work = work / f"{'gatekeeper' if gatekeeper else 'baseline'}-{round_}"
    work.mkdir()
    work.chmod(0o755)
    procs = Procs(work)
    with cgroups() as groups:
        try:
            for box in BOXES:
                if gatekeeper:
                    start_distccd(procs, box, groups[box.name], work, listen="127.0.0.1",
                                  port=DISTCCD_PORT, jobs=4)
                    start_gatekeeper(procs, box, groups[box.name], work,
                                     ["-j", "2", "--min-free-mb", "32"])
                else:
                    start_distccd(procs, box, groups[box.name], work, listen=box.address,
                                  port=PORT, jobs=4)
            sock = start_director(procs, work, gatekeeper=gatekeeper)
            until("HAProxy serving every box",
                  lambda: len(state := haproxy_state(sock)) == len(BOXES)
                  and all(v in ("UP", "no check") for v in state.values()))
            passes = [("c", "gatekeeper, warm")] if gatekeeper else []
            first = Run("b", "gatekeeper, cold") if gatekeeper else Run(
                "a", "HAProxy round-robin over bare distccd")
            for run in [first, *[Run(n, label) for n, label in passes]]:
                run.round = round_
                marks = {b.name: len(procs.log(f"{b.name}-gk").splitlines())
                         for b in BOXES} if gatekeeper else {}
                kills = {b.name: oom_kills(groups[b.name]) for b in BOXES}
                for root, objects in projects.values():
                    for obj in objects:
                        (root / obj).unlink(missing_ok=True)
                log(f"{run.name}: building ({run.label})")
                build_both(work, projects, run.name, run)
                run.kills = sum(oom_kills(groups[b.name]) - kills[b.name] for b in BOXES)
                if gatekeeper:
                    judge_gatekeeper(procs, marks, run)
                log(f"{run.name}: {run.seconds} s, failed {run.failed}, OOM kills {run.kills}")
                runs.append(run)
                if run.name == "b":
                    # Every box learns what the others measured within one
                    # exchange (10 s): the warm run starts after it.
                    time.sleep(12)
        finally:
            procs.stop_all()


def judge_gatekeeper(procs: Procs, marks: dict[str, int], run: Run) -> None:
    waits, light_runs = [], []
    known = total = 0
    for box in BOXES:
        for line in procs.log(f"{box.name}-gk").splitlines()[marks[box.name]:]:
            m = END.search(line)
            if m is None:
                continue
            total += 1
            known += m["source"] == "learned"
            if m["peer"] == LIGHT_USER:
                waits.append(float(m["wait"]))
                light_runs.append(float(m["run"]))
    run.light_wait = statistics.mean(waits) if waits else None
    run.light_job = statistics.median(light_runs) if light_runs else None
    run.learned = (known, total)


def medians(runs: list[Run]) -> list[str]:
    """Per configuration: the median of each figure over the rounds."""
    out = ["| run | rounds | OOM kills (all) | failed (all) | median makespan heavy / light s | "
           "median of the light user's mean wait s | median of its median job s |",
           "|---|---|---|---|---|---|---|"]
    for name in sorted({r.name for r in runs}):
        mine = [r for r in runs if r.name == name]

        def med(values: list[float | None]) -> str:
            known = [v for v in values if v is not None]
            return f"{statistics.median(known):.2f}" if known else "-"
        out.append(
            f"| {name}: {mine[0].label} | {len(mine)} | {sum(r.kills for r in mine)} | "
            f"{sum(sum(r.failed.values()) for r in mine)} | "
            f"{med([r.seconds.get('gkf-heavy') for r in mine])} / "
            f"{med([r.seconds.get('gkf-light') for r in mine])} | "
            f"{med([r.light_wait for r in mine])} | {med([r.light_job for r in mine])} |")
    return out


def report(runs: list[Run], seconds: float) -> str:
    rounds = max((r.round for r in runs), default=0)
    lines = ["# Farm bench (issue 20)", "",
             f"Written by `python3 -m bench.farm` (see its docstring). {rounds} round(s), "
             "interleaved (a, b, c in each); the whole farm shares this machine's 2 CPUs.", "",
             f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; "
             f"runtime {seconds:.0f} s",
             f"- boxes: {', '.join(f'{b.memory_mib} MiB' for b in BOXES)} memory cgroups; "
             f"heavy user: {HEAVY_SPEC.heavy} heavy + {HEAVY_SPEC.light} light files, "
             f"make -j32; light user: {LIGHT_SPEC.light} light files, make -j4", "",
             *medians(runs), "", "Every run:", "",
             "| run | OOM kills | failed (heavy / light user) | makespan heavy / light s | "
             "light user's mean wait s | its median job s | jobs known where they ran |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        wait = f"{r.light_wait:.2f}" if r.light_wait is not None else "-"
        job = f"{r.light_job:.2f}" if r.light_job is not None else "-"
        learned = f"{r.learned[0]}/{r.learned[1]}" if r.learned else "-"
        lines.append(f"| {r.name}{r.round}: {r.label} | {r.kills} | {r.failed.get('gkf-heavy')} / "
                     f"{r.failed.get('gkf-light')} | {r.seconds.get('gkf-heavy', 0):.1f} / "
                     f"{r.seconds.get('gkf-light', 0):.1f} | {wait} | {job} | {learned} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.farm")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "RESULTS-farm.md")
    p.add_argument("--rounds", type=int, default=3,
                   help="every configuration this many times, interleaved (default 3)")
    args = p.parse_args(argv)
    why = why_not()
    if why is not None:
        print(f"farm: cannot run: {why}", file=sys.stderr)
        return 2
    begin = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="gkf-bench-", dir="/tmp"))
    work.chmod(0o755)
    runs: list[Run] = []
    try:
        heavy = generate(work / "heavy", HEAVY_SPEC)
        light = generate(work / "light", LIGHT_SPEC)
        projects = {"gkf-heavy": (heavy.root, list(heavy.objects)),
                    "gkf-light": (light.root, list(light.objects))}
        with network(CLIENTS):
            for round_ in range(1, args.rounds + 1):
                scenario(work, projects, gatekeeper=False, runs=runs, round_=round_)
                scenario(work, projects, gatekeeper=True, runs=runs, round_=round_)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(work, ignore_errors=True)
    text = report(runs, time.monotonic() - begin)
    print(text)
    if str(args.results) != "-":
        args.results.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
