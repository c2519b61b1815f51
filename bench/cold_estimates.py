"""Cold estimates on a real project no one here wrote: googletest from Debian (issue 19).

Run as root from the repository root:

    python3 -m bench.cold_estimates [--build-type Release] [--results PATH]

Debian's `googletest` package ships the framework's own sources and tests
(/usr/src/googletest: gtest, gmock, their unit tests and samples; CMake). This
bench copies that tree, configures it with its tests and samples on and
`CXX="distcc g++"` (CMake's
compiler launcher passes the compiler's absolute path, which distccd 3.4 and the argv
policy refuse), and builds it once through gatekeeper
(proxy mode, fresh `--state-dir`, each job in its own memory cgroup, so every
peak is the kernel's count) in front of a real distccd in a v1 memory cgroup
with no limit: every job is cold. It reads each job's `est=`, `est_from=` and
`peak=` from gatekeeper's end lines, in the order the jobs ended.

Side by side, from the same end lines: what gatekeeper before issue 19 would
have estimated for each of those jobs -- the 99th percentile of the peaks of
the jobs that ended before it, plus 10 %, or the `--job-mem-mb` seed before 8
had (`footprints.FootprintBook` with no model): so the same build judges both
ways of guessing. (The replay is kind to the old way: a real job is estimated
when it arrives, before the jobs running beside it have ended.)

Reports, from the COLD_AFTER-th job on: the share of jobs estimated within
-20 %..+50 % of their peak (issue 19's target: 70 %), by where the estimate
came from; the reservations' total against the peaks' total.
"""

from __future__ import annotations

import argparse
import datetime
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.memory_pressure import (
    _DISTCCD_READY,
    _GATEKEEPER_READY,
    _GK_END,
    LOOPBACK,
    REPO,
    V1_MEMORY,
    Cgroup,
    Daemon,
    clean_env,
    free_port,
    log,
    machine,
)

SOURCE = Path("/usr/src/googletest")
COLD_AFTER = 30
BAND = (0.8, 1.5)
MiB = 2**20
SEED_MIB = 256
# The old unknown-job rule (footprints before issue 19): p99 of the last 512, +10 %.
OLD_PERCENTILE, OLD_MIN_SAMPLES, OLD_MARGIN = 0.99, 8, 0.10


# ...and where pausing stands (--optimistic): the median, from 3 peaks on.
OLD_TYPICAL_PERCENTILE, OLD_TYPICAL_MIN_SAMPLES = 0.5, 3


def old_estimate(peaks: Sequence[int], optimistic: bool = False) -> int:
    at, least = ((OLD_TYPICAL_PERCENTILE, OLD_TYPICAL_MIN_SAMPLES) if optimistic
                 else (OLD_PERCENTILE, OLD_MIN_SAMPLES))
    if len(peaks) < least:
        return SEED_MIB
    ordered = sorted(peaks[-512:])
    index = min(len(ordered) - 1, max(0, math.ceil(at * len(ordered)) - 1))
    return int(ordered[index] * (1 + OLD_MARGIN))


def parse_jobs(text: str) -> list[tuple[str, int, int, str]]:
    """(object, est MiB, peak MiB, source) of each job that has all, in end order."""
    out = []
    for line in text.splitlines():
        m = _GK_END.search(line)
        if m is None or m["est"] is None or m["peak"] is None or m["outcome"] != "ok":
            continue
        out.append((m["job"] or "?", int(m["est"]), int(m["peak"]), m["est_from"] or "?"))
    return out


def judge(ratios: Sequence[float]) -> str:
    if not ratios:
        return "- | - | - | -"
    within = sum(1 for r in ratios if BAND[0] <= r <= BAND[1])
    return (f"{within}/{len(ratios)} | {within / len(ratios):.0%} | "
            f"{statistics.median(ratios):.2f} | {min(ratios):.2f}-{max(ratios):.2f}")


def report(jobs: list[tuple[str, int, int, str]], args: argparse.Namespace,
           seconds: float, optimistic: bool) -> str:
    peaks: list[int] = []
    new: list[float] = []
    old: list[float] = []
    by_source: dict[str, list[float]] = {}
    reserved_new = reserved_old = total_peak = 0
    for i, (_, est, peak, source) in enumerate(jobs):
        before = old_estimate(peaks, optimistic)
        peaks.append(peak)
        if i < COLD_AFTER or peak < 8:  # MiB resolution
            continue
        new.append(est / peak)
        old.append(before / peak)
        by_source.setdefault(source, []).append(est / peak)
        reserved_new += est
        reserved_old += before
        total_peak += peak
    m = machine()
    quantiles = ("on (optimistic: typical quantiles)" if optimistic
                 else "off (safe quantiles)")
    lines = [
        "# Cold estimates on googletest (issue 19)", "",
        "Written by `python3 -m bench.cold_estimates` (see its docstring).", "",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; "
        f"cpus {m['cpus']}; {m['g++']}; {m['distcc']}",
        f"- project: Debian's googletest sources ({SOURCE}), gtest and gmock with their "
        f"tests and samples, CMake build type {args.build_type}; "
        f"{len(jobs)} compiles measured, build {seconds:.0f} s",
        f"- gatekeeper: proxy mode, `-j 2 --min-free-mb 0 --job-mem-mb {SEED_MIB}`, "
        f"fresh state dir, job cgroups; pausing {quantiles}",
        "", f"From the {COLD_AFTER + 1}th job to end on ({len(new)} jobs): est/peak "
        f"within {BAND[0]:g}..{BAND[1]:g} (-20 %..+50 %; target 70 %).", "",
        "| estimates | within band | share | median est/peak | range |",
        "|---|---|---|---|---|",
        f"| gatekeeper now (all sources) | {judge(new)} |",
        *(f"| of which {source} | {judge(r)} |" for source, r in sorted(by_source.items())),
        f"| replayed: the old unknown-job rule "
        f"({'median' if optimistic else 'p99'} + 10 %) | {judge(old)} |",
        "",
        f"Reserved for those jobs: now {reserved_new} MiB, old rule {reserved_old} MiB, "
        f"against {total_peak} MiB measured"
        + (f" ({reserved_new / total_peak:.2f}x and {reserved_old / total_peak:.2f}x)."
           if total_peak else "."),
        "", "Every job (object, est MiB, est_from, peak MiB, old rule's MiB):", "",
        "| # | object | est | from | peak | est/peak | old rule |", "|---|---|---|---|---|---|---|",
    ]
    peaks = []
    for i, (job, est, peak, source) in enumerate(jobs):
        before = old_estimate(peaks, optimistic)
        peaks.append(peak)
        lines.append(f"| {i + 1} | {job.rsplit('/', 1)[-1]} | {est} | {source} | {peak} | "
                     f"{est / peak:.2f} | {before} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    if not SOURCE.is_dir():
        print(f"cold_estimates: {SOURCE} missing (apt-get install googletest)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="gk-cold-", dir="/tmp"))
    work.chmod(0o755)
    cgroup = Cgroup.create(Path(args.cgroup_parent))
    daemons: list[Daemon] = []
    try:
        tree = work / "googletest"
        shutil.copytree(SOURCE, tree)
        (work / "tmp").mkdir(mode=0o1777)
        (work / "tmp").chmod(0o1777)
        port = free_port()
        distccd = Daemon(cgroup.enter_argv(
            [shutil.which("distccd") or "distccd", "--daemon", "--no-detach", "--log-stderr",
             "--log-level", "info",
             "--listen", LOOPBACK, "--port", str(port), "--allow", LOOPBACK, "--jobs", "8",
             "--user", "distccd"]), work / "distccd.log",
            env=clean_env({"TMPDIR": str(work / "tmp")}), cwd=work)
        daemons.append(distccd)
        distccd.wait_for(_DISTCCD_READY)
        pausing = ["--pause-below-mb", "64"] if args.optimistic else ["--pause-below-mb", "0"]
        gk = Daemon([sys.executable, "-m", "gatekeeper", "--listen", f"{LOOPBACK}:0",
                     "--backend", f"{LOOPBACK}:{port}", "--cgroup", str(cgroup.path),
                     "-j", "2", "--min-free-mb", "0", "--job-mem-mb", str(SEED_MIB),
                     "--state-dir", str(work / "state"), "--allow", LOOPBACK,
                     "--log-level", "info", *pausing], work / "gatekeeper.log",
                    env=clean_env({"PYTHONPATH": str(Path(args.gatekeeper_src).resolve()),
                                   "PYTHONUNBUFFERED": "1"}), cwd=work)
        daemons.append(gk)
        gk_port = int(gk.wait_for(_GATEKEEPER_READY)["port"])
        env = clean_env({"DISTCC_HOSTS": f"{LOOPBACK}:{gk_port}/4", "DISTCC_FALLBACK": "0",
                         "DISTCC_SKIP_LOCAL_RETRY": "1", "DISTCC_BACKOFF_PERIOD": "0",
                         "DISTCC_DIR": str(work / "distcc")})
        (work / "distcc").mkdir()
        build = work / "build"
        configure = subprocess.run(
            ["cmake", "-S", str(tree), "-B", str(build), "-G", "Unix Makefiles",
             f"-DCMAKE_BUILD_TYPE={args.build_type}",
             "-Dgtest_build_tests=ON", "-Dgmock_build_tests=ON", "-Dgtest_build_samples=ON"],
            env={**env, "CXX": "distcc g++", "CC": "distcc gcc"}, capture_output=True,
            text=True, timeout=300)
        if configure.returncode != 0:
            print(configure.stdout[-3000:], configure.stderr[-3000:], file=sys.stderr)
            return 1
        log("configured; building")
        begin = time.monotonic()
        made = subprocess.run(["make", "-k", "-j4", "-C", str(build)], env=env,
                              capture_output=True, text=True, timeout=args.build_timeout)
        seconds = time.monotonic() - begin
        log(f"make exit {made.returncode} after {seconds:.0f} s")
        if made.returncode != 0:
            print(made.stdout[-3000:], made.stderr[-3000:], file=sys.stderr)
        jobs = parse_jobs(gk.text)
        text = report(jobs, args, seconds, args.optimistic)
        print(text)
        if str(args.results) != "-":
            args.results.write_text(text)
        return 0 if made.returncode == 0 else 1
    finally:
        for daemon in reversed(daemons):
            daemon.stop()
        cgroup.remove()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.cold_estimates",
                                description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--build-type", default="Release")
    p.add_argument("--optimistic", action="store_true",
                   help="pausing on (--pause-below-mb 64): typical, not safe, quantiles")
    p.add_argument("--build-timeout", type=float, default=1800.0)
    p.add_argument("--cgroup-parent", default=str(V1_MEMORY))
    p.add_argument("--gatekeeper-src", default=str(REPO))
    p.add_argument("--results", type=Path, default=REPO / "bench" / "RESULTS-cold-googletest.md")
    p.add_argument("--keep", action="store_true")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
