"""A farm on one machine (issue 20): three boxes, a director, a client, each in
a network namespace this test creates (bench/farmnet.py: a bridge in a
namespace of its own, veth pairs, 10.77.0.0/24; nothing touches the host's
network).

Each box: a v1 memory cgroup of its own size, a real distccd in it on the box's
loopback, and gatekeeper in front (--agent, --metrics, --peer the other two,
--trusted-proxy the director, --state-dir). The director: real HAProxy,
send-proxy-v2, health checks and agent-check. The client: the stock distcc
client and make.

Asserted (not timings; those are bench/farm.py's):
- the farm builds the project with 0 failed compiles, every job seen by the box
  that ran it as coming from the client (the PROXY header), never the director;
- after one farm-wide build, a second build's jobs are known (est_from=learned)
  on whichever box runs them: over 90 %, including jobs on boxes that never
  compiled that file before (shared footprints);
- a box whose distccd is killed mid-build is taken out by HAProxy after the agent's
  next check, and a build with client fallback still completes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
from distcc_harness import generate_project

from bench.farmnet import (
    BOXES,
    Box,
    Procs,
    cgroups,
    farm_view,
    haproxy_sessions,
    haproxy_state,
    make,
    network,
    start_box,
    start_director,
    until,
    why_not,
)

WHY_NOT = why_not()
pytestmark = [pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or ""),
              pytest.mark.timeout(600)]

CLIENT = "10.77.0.3"
END = re.compile(r"end peer=(?P<peer>\S+) outcome=(?P<outcome>\S+) .*? job=(?P<job>\S+)"
                 r"(?: compile=\S+)?(?: est=\d+MiB est_from=(?P<source>\w+))?")


def ends(procs: Procs, box: str, skip: int = 0) -> list[re.Match[str]]:
    return [m for line in procs.log(f"{box}-gk").splitlines()[skip:]
            if (m := END.search(line)) is not None]


def learned_from_peers(box: Box) -> int:
    try:
        return sum(int(p.get("learned", 0)) for p in json.loads(farm_view(box))["peers"])
    except (ValueError, KeyError, TypeError):
        return 0


def test_a_farm_of_three_boxes_learns_as_one() -> None:
    # distccd drops to its own user: its TMPDIR must be reachable, and pytest's
    # temporary directories are root's alone.
    work = Path(tempfile.mkdtemp(prefix="gkf-", dir="/tmp"))
    work.chmod(0o755)
    try:
        run_farm(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_farm(work: Path) -> None:
    project = generate_project(work / "project", cxx_files=24, c_files=6)
    procs = Procs(work)
    with network({"gkf-cli": CLIENT}), cgroups() as groups:
        try:
            for box in BOXES:
                start_box(procs, box, groups[box.name], work, ["--max-jobs", "2",
                                                               "--min-free-mb", "32"])
            sock = start_director(procs, work)
            until("every box served by HAProxy",
                  lambda: len(state := haproxy_state(sock)) == 3
                  and all(s == "UP" for s in state.values()))

            first, _ = make("gkf-cli", project.root, work, "1", jobs=12, fallback=False)
            assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
            ran_on: dict[str, set[str]] = {}
            marks = {}
            for box in BOXES:
                lines = ends(procs, box.name)
                marks[box.name] = len(procs.log(f"{box.name}-gk").splitlines())
                assert all(m["outcome"] == "ok" for m in lines), procs.log(f"{box.name}-gk")
                # The client, not the director: the PROXY header was read.
                assert all(m["peer"].startswith(f"{CLIENT}:") for m in lines), lines
                for m in lines:
                    ran_on.setdefault(m["job"], set()).add(box.name)
            assert sum(len(v) for v in ran_on.values()) == project.translation_units
            assert len({b for v in ran_on.values() for b in v}) == 3  # all three worked

            # Each box learns what the other two measured (one exchange: 10 s).
            expected = {b.name: sum(1 for v in ran_on.values() if b.name not in v)
                        for b in BOXES}
            until("every box learned its peers' measurements",
                  lambda: all(learned_from_peers(b) >= expected[b.name] for b in BOXES),
                  timeout=40)

            for obj in project.objects:
                (project.root / obj).unlink()
            second, _ = make("gkf-cli", project.root, work, "2", jobs=12, fallback=False)
            assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
            jobs = [(b.name, m) for b in BOXES for m in ends(procs, b.name, marks[b.name])]
            assert len(jobs) == project.translation_units
            known = [m for _, m in jobs if m["source"] == "learned"]
            strangers = [(box, m) for box, m in jobs if box not in ran_on.get(m["job"], set())]
            print(f"second build: {len(known)}/{len(jobs)} learned; "
                  f"{len(strangers)} on a box that never compiled the file, "
                  f"{sum(1 for _, m in strangers if m['source'] == 'learned')} of them learned")
            assert len(known) > 0.9 * len(jobs), jobs
            assert strangers and all(m["source"] == "learned" for _, m in strangers)

            # A box's distccd dies mid-build: HAProxy takes the box out at the
            # agent's next check and sends it nothing more; the jobs it held
            # fail cleanly, their clients compile them locally, the build ends.
            for obj in project.objects:
                (project.root / obj).unlink()
            mark = len(procs.log("gkf-box2-gk").splitlines())
            third: list[subprocess.CompletedProcess[str]] = []
            builder = threading.Thread(target=lambda: third.append(make(
                "gkf-cli", project.root, work, "3", jobs=12, fallback=True)[0]))
            builder.start()
            try:
                # Once box2 is working on this build (its first job of it
                # ended: more are queued or running there, the build is not).
                until("box2 working on the third build",
                      lambda: len(ends(procs, "gkf-box2", mark)) > 0, timeout=60)
                procs.stop("gkf-box2-distccd")
                until("box2 taken out", lambda: haproxy_state(sock).get("gkf-box2") not in (
                    "UP", "no check"), timeout=20)
                sent = haproxy_sessions(sock)["gkf-box2"]
            finally:
                builder.join(300)
            assert third and third[0].returncode == 0, (
                third[0].stdout[-2000:] + third[0].stderr[-2000:] if third else "no build")
            assert all((project.root / obj).exists() for obj in project.objects)
            assert haproxy_sessions(sock)["gkf-box2"] == sent  # nothing after it was out
        finally:
            procs.stop_all()
