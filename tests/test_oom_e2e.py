"""A real compile, OOM-killed for real, seen for what it was.

The stock distcc client sends one memory-hungry C++ file (bench/hungry.py's
heavy unit: cc1plus grows steadily to about 230 MB) through gatekeeper to a
real distccd that runs inside a v1 memory cgroup too small for it. The OOM
killer kills cc1plus; g++ reports "Killed signal terminated program cc1plus"
and exit 1, and distccd sends that back as an ordinary failed compile.
gatekeeper must not take the peak it measured at the kill as what the file
needs: it reads distccd's status from the reply (exit-1), sees the box's
OOM-kill counter move while the job ran, logs ``oom=yes`` and remembers the
compile as needing more than it had -- more than the cgroup allows, so the next
run of it would wait instead of being killed again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from distcc_harness import LOOPBACK, DistccServer, distcc_client_env, missing_binaries
from fakes import config, gatekeeper
from test_cgroup_admission import Cgroup, _cgroup_or_skip

from bench.hungry import CXXFLAGS, Spec, heavy_source
from gatekeeper.footprints import CUT_SHORT_GROWTH
from gatekeeper.net.addresses import TcpAddress

MiB = 2**20
# One heavy compile peaks near 230 MB here; distccd and its pre-forked children
# take a few MB. 160 MiB lets cc1plus grow for a couple of seconds (the meter
# samples it every 200 ms) and then kills it.
LIMIT = 160 * MiB

MISSING = missing_binaries()


@pytest.fixture
def small_cgroup() -> Iterator[Cgroup]:
    if MISSING:
        print(f"SKIP: needs {', '.join(MISSING)} on PATH")
        pytest.skip(f"needs {', '.join(MISSING)} on PATH")
    path = _cgroup_or_skip()
    cgroup = Cgroup(path)
    try:
        (path / "memory.limit_in_bytes").write_text(str(LIMIT))
        (path / "memory.swappiness").write_text("0")
        yield cgroup
    finally:
        cgroup.remove()


async def test_an_oom_killed_compile_is_not_learned_as_its_cut_short_peak(
        small_cgroup: Cgroup, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gatekeeper")
    source = tmp_path / "heavy.cc"
    source.write_text(heavy_source(1, Spec()))
    before = small_cgroup.oom_kills()
    with DistccServer(jobs=2, hold_s=0, cgroup_procs=small_cgroup.path / "cgroup.procs") as d:
        cfg = config(TcpAddress(LOOPBACK, d.port), max_jobs=1, job_mem_bytes=10 * MiB)
        async with gatekeeper(cfg) as gk:
            env = distcc_client_env(LOOPBACK, gk.address.port, tmp_path / "distcc")
            with trio.fail_after(60):
                client = await trio.run_process(
                    ["distcc", "g++", *CXXFLAGS.split(), "-c", str(source),
                     "-o", str(tmp_path / "heavy.o")],
                    env=env, cwd=tmp_path, check=False, capture_stdout=True,
                    capture_stderr=True)
        book = gk.server.book.to_json()
        diag = (f"client {client.returncode}: {client.stderr.decode(errors='replace')}\n"
                f"--- distccd ---\n{d.log_text}")
    kills = small_cgroup.oom_kills() - before
    ends = [r.getMessage() for r in caplog.records if r.getMessage().startswith("end ")]
    print(f"OOM kills in the cgroup: {kills}; gatekeeper: {ends}; learned: {book['keys']}")
    assert kills >= 1, f"the compile was not OOM-killed: the test proves nothing\n{diag}"
    assert client.returncode != 0, diag
    assert len(ends) == 1, ends
    end = ends[0]
    assert "job=" in end and "heavy.o" in end, end
    assert "compile=exit-1" in end or "compile=killed-SIGKILL" in end, end
    assert "peak=" in end, end
    peak = int(end.split("peak=")[1].split("MiB")[0]) * MiB
    keys = book["keys"]
    assert isinstance(keys, dict) and len(keys) == 1, keys
    (learned,) = keys.values()
    # Remembered as needing more than it had when it died: more than the cgroup
    # allows here, so its next run would be held, not admitted into a kill.
    assert max(learned) >= CUT_SHORT_GROWTH * peak - MiB
    assert max(learned) > LIMIT
    assert book["recent"] == []  # the cut-short peak is not a sample of real jobs
