"""End-to-end (issue 22): a real `make -j16` through gatekeeper --max-jobs 1 of
files whose preprocessed size is over 1 MiB. The objects must be identical to a
plain local build, and while the build runs, the receive queues of the queued
connections -- sampled with ``ss -tm`` on gatekeeper's side, independently of
gatekeeper's own count -- stay under the 16 KiB target. The control, with
``--queued-window 0``, must break it (the test can fail)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from distcc_harness import (
    LOOPBACK,
    DistccServer,
    GatekeeperProcess,
    Module,
    Project,
    copy_project,
    distcc_build,
    distcc_client_env,
    generate_project,
    local_build,
    missing_binaries,
    object_mismatches,
    read_objects,
)

MISSING = missing_binaries()
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(MISSING) or shutil.which("ss") is None,
                       reason=f"needs {', '.join(MISSING) or 'ss (iproute2)'} on PATH"),
]

TARGET = 16 * 1024
END = re.compile(r"end peer=\S+ outcome=\S+ ")
# A client-side send queue this long, twice the same, is a blocked writer: 8x
# the queued window (4 KiB); a blocked distcc client's measured 68 KiB at MTU
# 1500, 354 KB at 9000, 2 MB at loopback's 65536.
BLOCKED = 32 * 1024
FILES = 16
# A preprocessed size over 1 MiB for every file: an unused table in the shared
# header (-O2 drops it, so it costs the compiler a parse, not code).
# 400,000 numbers of 1-3 digits: about 1.4 MB of text.
BLOB_VALUES = 400_000


def big_project(dest: Path) -> Project:
    project = generate_project(dest, cxx_files=FILES, c_files=0)
    header = project.root / "include" / "gk_e2e.h"
    values = ",".join(str(i % 251) for i in range(BLOB_VALUES))
    header.write_text(header.read_text() + (
        "\n__attribute__((unused)) static const unsigned char gk_blob[] = {"
        + values + "};\n"))
    return project


def preprocessed_size(project: Project, source: str) -> int:
    out = subprocess.run(["g++", "-E", "-Iinclude", "-std=c++17", source],
                         cwd=project.root, capture_output=True, check=True)
    return len(out.stdout)


class Sampler:
    """`ss -tm` of gatekeeper's accepted sockets, over and over until stopped:
    per sample, the receive memory (skmem r) of each."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.samples: list[list[int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.samples) < 20_000:
            out = subprocess.run(
                ["ss", "-tmnH", "state", "established", f"( sport = :{self.port} )"],
                capture_output=True, text=True, check=False).stdout
            self.samples.append([int(r) for r in re.findall(r"skmem:\(r(\d+)", out)])
            self._stop.wait(0.01)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    project = big_project(tmp_path_factory.mktemp("big") / "reference")
    assert all(preprocessed_size(project, m.source) > 1 << 20 for m in project.modules)
    build = local_build(project, timeout=300)
    assert build.ok, build.describe()
    return read_objects(project)


@pytest.fixture
def distccd() -> Iterator[DistccServer]:
    with DistccServer(jobs=8, hold_s=0.0) as server:
        yield server


def _build_through(window: int, distccd: DistccServer, project: Project
                   ) -> tuple[list[list[int]], str]:
    args = ["--listen", f"{LOOPBACK}:0", "--backend", f"{LOOPBACK}:{distccd.port}",
            "--max-jobs", "1", "--min-free-mb", "0", "--queued-window", str(window)]
    with GatekeeperProcess(args) as gk, Sampler(gk.port) as sampler:
        build = distcc_build(project, gk.port, jobs=FILES, host_slots=FILES,
                             io_timeout=240, timeout=300)
        assert build.ok, f"{build.describe()}\n--- gatekeeper ---\n{gk.log_text}"
        assert build.client_complaints == [], build.describe()
        return sampler.samples, gk.log_text


def test_a_make_j16_of_big_files_keeps_queued_requests_on_the_clients(
        tmp_path: Path, reference: dict[str, bytes], distccd: DistccServer) -> None:
    project = copy_project(big_project(tmp_path / "gen"), tmp_path / "through")
    samples, log = _build_through(4096, distccd, project)
    assert object_mismatches(reference, project) == [], log
    # The queue was really used: many connections waited at once.
    assert max(map(len, samples)) >= 8, max(map(len, samples))
    # At any moment only the running job (--max-jobs 1) may hold more than the
    # target; every queued connection holds less.
    over = [sorted(s, reverse=True) for s in samples if sum(r > TARGET for r in s) > 1]
    assert over == [], over[:5]
    waiting = [r for s in samples if len(s) > 2 for r in sorted(s)[:-1]]
    assert waiting and max(waiting) <= TARGET, max(waiting, default=None)


def test_the_control_without_a_queued_window_holds_far_more(
        tmp_path: Path, reference: dict[str, bytes], distccd: DistccServer) -> None:
    project = copy_project(big_project(tmp_path / "gen"), tmp_path / "through")
    samples, log = _build_through(0, distccd, project)
    assert object_mismatches(reference, project) == [], log
    assert max(sum(r > TARGET for r in s) for s in samples) >= 4


def _client_send_queues(port: int) -> list[int]:
    """Send-Q of every client-side connection to `port` (bytes not yet taken
    by gatekeeper's end), orphans too (FIN-WAIT-1: closed, FIN queued)."""
    out = subprocess.run(["ss", "-tnH", "state", "connected", f"( dport = :{port} )"],
                         capture_output=True, text=True, check=False).stdout
    return [int(line.split()[2]) for line in out.splitlines() if line.split()]


def test_a_client_killed_while_its_write_is_blocked_costs_no_compile(tmp_path: Path) -> None:
    """Ctrl-C of a build whose request waits, its write blocked: the client's
    kernel keeps the connection and sends its FIN only after the unsent bytes,
    so nothing says it left until the job is admitted. Then the rest of the
    request arrives with the FIN right behind it, gatekeeper passes the FIN on,
    and distccd, which polls its client during a compile, kills the compiler:
    the job ends at once instead of compiling for nobody (the wrapped compiler
    holds 6 s here, so a compile run to its end would show)."""
    hold = 6.0
    project = big_project(tmp_path / "gen")
    blocker_m, victim_m = project.modules[:2]
    args = ["--listen", f"{LOOPBACK}:0", "--max-jobs", "1", "--min-free-mb", "0"]
    with DistccServer(jobs=2, hold_s=hold) as d, GatekeeperProcess(
            [*args, "--backend", d.address]) as gk:
        env = distcc_client_env(LOOPBACK, gk.port, tmp_path / ".distcc", io_timeout=120)

        def compile_(m: Module) -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                ["distcc", "g++", "-O2", "-std=c++17", "-Iinclude", "-c", m.source,
                 "-o", m.obj], cwd=project.root, env=env, start_new_session=True,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        blocker = compile_(blocker_m)
        assert d.wait_for_compile_start(1, timeout=60), gk.log_text
        victim = compile_(victim_m)
        # Its request is queued, most of it still on the client: a client-side
        # send queue far past the narrow window, and not moving.
        # (Polled: the client's kernel has no event to wait on; bounded.)
        deadline = time.monotonic() + 30
        last = -1
        while True:
            queued = max(_client_send_queues(gk.port), default=0)
            if queued >= BLOCKED and queued == last:
                break
            assert time.monotonic() < deadline, _client_send_queues(gk.port)
            assert blocker.poll() is None, "the blocker ended before the victim queued"
            last = queued
            time.sleep(0.2)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(10)
        assert max(_client_send_queues(gk.port)) >= BLOCKED  # orphaned, still blocked
        assert blocker.wait(120) == 0
        blocker_done = time.monotonic()
        assert gk.wait_until(lambda lines: len([x for x in lines if END.search(x)]) >= 2, 60)
        ended_after = time.monotonic() - blocker_done
        ends = [x for x in gk.log_lines if END.search(x)]
        assert ended_after < hold / 2, (ended_after, ends)
        victim_ends = [x for x in ends if f"job={victim_m.obj} " in x]
        assert len(victim_ends) == 1, ends
        assert re.search(r"outcome=client-(gone|error) ", victim_ends[0]), ends
        # distccd saw its client go, and ran no compile to its end for it.
        assert d.wait_until(lambda _: len(d.job_summaries()) >= 2, 30), d.log_text
        assert [s.result for s in d.job_summaries()].count("COMPILE_OK") == 1, \
            d.job_summaries()
