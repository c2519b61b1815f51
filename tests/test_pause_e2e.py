"""A pause really prevents an OOM kill (issue 18), with real parts: the stock
distcc client, a real distccd, real g++, a real v1 memory cgroup (and freezer).

Two heavy compiles (bench/hungry.py's heavy unit: cc1plus grows to ~220 MiB of
cgroup charge over a few seconds) do not fit together in LIMIT; one does. The
control sends both straight to distccd --jobs 2 in that cgroup: the OOM killer
ends a compile. Through gatekeeper -- the real CLI, proxy mode and inetd mode,
admitting both at once on purpose (an unknown job's estimate of 10 MiB) -- the
youngest is frozen as headroom falls below the floor, the other finishes, the
frozen one is thawed and finishes: both compiles succeed, no OOM kill.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from distcc_harness import (
    LOOPBACK,
    DistccServer,
    GatekeeperProcess,
    InetdDistccd,
    distcc_client_env,
    missing_binaries,
)
from test_cgroup_admission import Cgroup, _cgroup_or_skip

from bench.hungry import CXXFLAGS, Spec, heavy_source

pytestmark = pytest.mark.timeout(300)

MiB = 2**20
# One heavy compile peaks at ~207 MiB of charge here, distccd and its children
# take ~10 MiB: one fits in 360 MiB with room, two (~424 MiB at their peaks) do
# not, by a margin that survives their starts a second apart (at 400 MiB, one
# run in the full suite saw no kill).
LIMIT = 360 * MiB
# inetd mode: gatekeeper itself (~40 MiB of Python) is in the cgroup too.
GATEKEEPER_ROOM = 48 * MiB
# The floor: both compilers grow together until headroom falls below it (a
# 100 ms reading late at worst: ~30 MiB more); the younger one is then frozen
# at about (360 - 10 - 128 + 30) / 2 = 126 MiB, and the other can still reach
# its 207: 126 + 207 + 10 = 343 < 360.
FLOOR_MB = 128

MISSING = missing_binaries()


@pytest.fixture
def small_cgroup() -> Iterator[Cgroup]:
    if MISSING:
        print(f"SKIP: needs {', '.join(MISSING)} on PATH")
        pytest.skip(f"needs {', '.join(MISSING)} on PATH")
    path = _cgroup_or_skip()
    cgroup = Cgroup(path)
    try:
        (path / "memory.swappiness").write_text("0")
        yield cgroup
    finally:
        cgroup.remove()


def sources(tmp_path: Path) -> list[Path]:
    out = []
    for i in (1, 2):
        source = tmp_path / f"heavy{i}.cc"
        source.write_text(heavy_source(i, Spec()))
        out.append(source)
    return out


async def compile_both(port: int, tmp_path: Path) -> list[subprocess.CompletedProcess[bytes]]:
    """Both compiles at once through the stock client (no local fallback)."""
    env = distcc_client_env(LOOPBACK, port, tmp_path / "distcc", io_timeout=120)
    results: list[subprocess.CompletedProcess[bytes]] = []

    async def one(source: Path) -> None:
        results.append(await trio.run_process(
            ["distcc", "g++", *CXXFLAGS.split(), "-c", str(source),
             "-o", str(source.with_suffix(".o"))],
            env=env, cwd=tmp_path, check=False, capture_stdout=True, capture_stderr=True))

    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            for source in sources(tmp_path):
                nursery.start_soon(one, source)
    return results


def failures(results: list[subprocess.CompletedProcess[bytes]]) -> list[str]:
    return [r.stderr.decode(errors="replace")[-400:] for r in results if r.returncode != 0]


async def test_control_two_heavy_compiles_together_are_oom_killed(
        small_cgroup: Cgroup, tmp_path: Path) -> None:
    """Without gatekeeper the two do not fit: the OOM killer ends one (else the
    tests below would prove nothing)."""
    (small_cgroup.path / "memory.limit_in_bytes").write_text(str(LIMIT))
    before = small_cgroup.oom_kills()
    with DistccServer(jobs=2, hold_s=0, cgroup_procs=small_cgroup.path / "cgroup.procs") as d:
        results = await compile_both(d.port, tmp_path)
        log = d.log_text
    kills = small_cgroup.oom_kills() - before
    print(f"control: OOM kills {kills}; failed compiles {len(failures(results))}")
    assert kills >= 1, log
    assert failures(results), "both compiles succeeded although one was OOM-killed"


def _check_paused_run(small_cgroup: Cgroup, before: int,
                      results: list[subprocess.CompletedProcess[bytes]],
                      gk_log: str, distccd_log: str, how: str) -> None:
    kills = small_cgroup.oom_kills() - before
    pauses = [line for line in gk_log.splitlines() if "pausing job=" in line]
    resumes = [line for line in gk_log.splitlines() if "resuming job=" in line]
    ends = [line for line in gk_log.splitlines() if " end peer=" in line]
    print(f"OOM kills {kills}; pauses {len(pauses)}; resumes {len(resumes)}\n"
          + "\n".join(pauses + resumes + ends))
    diag = f"--- gatekeeper ---\n{gk_log}\n--- distccd ---\n{distccd_log}"
    assert kills == 0, diag
    assert failures(results) == [], diag
    assert len(results) == 2
    assert pauses, f"no job was paused: the test proves nothing\n{diag}"
    assert all(f"({how})" in line for line in pauses), diag
    assert len(resumes) == len(pauses), diag
    assert len(ends) == 2 and all("outcome=ok" in e for e in ends), diag
    assert any("paused=" in e for e in ends), diag


# auto: each job has a cgroup of its own, frozen by the v1 freezer; off: the
# job's processes are stopped with SIGSTOP.
JOB_CGROUPS = [("auto", "freezer"), ("off", "SIGSTOP")]


@pytest.mark.parametrize(("job_cgroups", "how"), JOB_CGROUPS)
async def test_proxy_mode_pauses_instead_of_an_oom_kill(
        small_cgroup: Cgroup, tmp_path: Path, job_cgroups: str, how: str) -> None:
    (small_cgroup.path / "memory.limit_in_bytes").write_text(str(LIMIT))
    before = small_cgroup.oom_kills()
    with DistccServer(jobs=2, hold_s=0, cgroup_procs=small_cgroup.path / "cgroup.procs") as d:
        with GatekeeperProcess(
                ["--listen", "127.0.0.1:0", "--backend", f"127.0.0.1:{d.port}",
                 "--cgroup", str(small_cgroup.path), "-j", "2", "--min-free-mb", "0",
                 "--job-mem-mb", "10", "--pause-below-mb", str(FLOOR_MB),
                 "--job-cgroups", job_cgroups]) as gk:
            results = await compile_both(gk.port, tmp_path)
        _check_paused_run(small_cgroup, before, results, gk.log_text, d.log_text, how)


@pytest.mark.parametrize(("job_cgroups", "how"), JOB_CGROUPS)
async def test_inetd_mode_pauses_instead_of_an_oom_kill(
        small_cgroup: Cgroup, tmp_path: Path, job_cgroups: str, how: str) -> None:
    (small_cgroup.path / "memory.limit_in_bytes").write_text(str(LIMIT + GATEKEEPER_ROOM))
    before = small_cgroup.oom_kills()
    with InetdDistccd() as d:
        with GatekeeperProcess(
                ["--listen", "127.0.0.1:0", "-j", "2", "--min-free-mb", "0",
                 "--job-mem-mb", "10", "--pause-below-mb", str(FLOOR_MB),
                 "--job-cgroups", job_cgroups, "--", *d.command],
                cgroup_procs=small_cgroup.path / "cgroup.procs") as gk:
            results = await compile_both(gk.port, tmp_path)
        _check_paused_run(small_cgroup, before, results, gk.log_text, d.log_text, how)
