"""The pausing mechanisms for real (memory/freeze.py): a job cgroup frozen by
the kernel's freezer, a process group or tree stopped with SIGSTOP, thawed, and
a cut that kills all but the spared process.

The cgroup tests need root and a writable memory hierarchy (CI runs as root);
elsewhere they skip with the reason `JobCgroups.find` gives.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from test_job_cgroups import find_place

from gatekeeper.memory.freeze import CgroupFreezer, SignalFreezer, thaw
from gatekeeper.memory.job_cgroup import JobCgroup, pids_in

pytestmark = pytest.mark.timeout(60)

# A process that counts on its stdout, one line per 10 ms, and (with an
# argument) first forks a child that does the same: the child's pid is its
# first line.
COUNTER = r"""
import os, sys, time
if len(sys.argv) > 1:
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        print(f"child {pid}", flush=True)
        os.write(w, b"go")
    else:
        os.setpgid(0, 0)  # as distccd does for its compiler
        os.read(r, 2)  # the parent's line comes first
n = 0
while True:
    n += 1
    print(n, flush=True)
    time.sleep(0.01)
"""


def state_of(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return stat[stat.rfind(")") + 2]


def wait_state(pid: int, want: set[str], what: str) -> None:
    """The kernel changes a process's state asynchronously (a stop is delivered,
    a freeze completes): re-read for a bounded while."""
    for _ in range(500):
        if state_of(pid) in want:
            return
        time.sleep(0.01)
    raise AssertionError(f"{pid} did not become {what}: {state_of(pid)}")


def freezer_state(cgroup: JobCgroup) -> str:
    if cgroup.freezer is not None:
        with open(os.path.join(cgroup.freezer, "freezer.state")) as f:
            return f.read().strip()
    with open(os.path.join(cgroup.path, "cgroup.events")) as f:
        return "FROZEN" if "frozen 1" in f.read() else "THAWED"


def wait_frozen(cgroup: JobCgroup, want: str) -> None:
    for _ in range(500):
        if freezer_state(cgroup) == want:
            return
        time.sleep(0.01)
    raise AssertionError(f"freezer state stayed {freezer_state(cgroup)}, not {want}")


def progresses(proc: subprocess.Popen[str]) -> bool:
    """It prints a next line (a frozen one never does; the read is bounded by
    the test timeout)."""
    assert proc.stdout is not None
    return bool(proc.stdout.readline())


@pytest.fixture
def in_cgroup() -> Iterator[tuple[JobCgroup, subprocess.Popen[str]]]:
    place = find_place()
    cgroup = place.create()
    proc = subprocess.Popen([sys.executable, "-c", COUNTER, "fork"], preexec_fn=cgroup.enter,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    cgroup.close_fds()
    try:
        yield cgroup, proc
    finally:
        for pid in pids_in(cgroup.path):  # the child is in a group of its own
            with_suppressed_kill(pid, group=False)
        thaw(cgroup)
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
        cgroup.remove(quiet=True)


def with_suppressed_kill(pid: int, *, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError):
        (os.killpg if group else os.kill)(pid, signal.SIGKILL)


def test_a_frozen_job_cgroup_stops_and_thaws(
        in_cgroup: tuple[JobCgroup, subprocess.Popen[str]]) -> None:
    cgroup, proc = in_cgroup
    freezer = CgroupFreezer.of(cgroup)
    assert freezer is not None
    assert freezer.how in ("freezer", "cgroup.freeze")
    assert progresses(proc)
    freezer.freeze()
    wait_frozen(cgroup, "FROZEN")
    freezer.thaw()
    wait_frozen(cgroup, "THAWED")
    assert progresses(proc)


def test_a_cut_kills_all_but_the_spared_process_and_thaws(
        in_cgroup: tuple[JobCgroup, subprocess.Popen[str]]) -> None:
    """Proxy mode spares the distccd child (it serves the next job) and kills
    what it runs for this one; the kill is delivered because it is thawed."""
    cgroup, proc = in_cgroup
    assert proc.stdout is not None
    child = int(proc.stdout.readline().split()[1])
    freezer = CgroupFreezer(cgroup, spare=proc.pid)
    freezer.freeze()
    wait_frozen(cgroup, "FROZEN")
    freezer.kill()
    wait_frozen(cgroup, "THAWED")
    wait_state(child, {"Z", "X"}, "killed")  # the parent has not reaped it
    assert progresses(proc)  # spared, and going on
    assert proc.poll() is None


def test_a_frozen_inetd_child_can_still_be_stopped(
        in_cgroup: tuple[JobCgroup, subprocess.Popen[str]]) -> None:
    """What inetd.command does for a cancelled job: SIGTERM, then thaw, so the
    signal is delivered (a frozen task never sees it)."""
    cgroup, proc = in_cgroup
    freezer = CgroupFreezer(cgroup)
    freezer.freeze()
    wait_frozen(cgroup, "FROZEN")
    os.killpg(proc.pid, signal.SIGTERM)
    thaw(cgroup)
    assert proc.wait(timeout=10) == -signal.SIGTERM


@pytest.fixture
def counter() -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc = subprocess.Popen([sys.executable, "-c", COUNTER, "fork"], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    assert proc.stdout is not None
    child = int(proc.stdout.readline().split()[1])
    try:
        yield proc, child
    finally:
        with_suppressed_kill(child, group=False)  # (a group of its own)
        with_suppressed_kill(proc.pid, group=True)
        proc.wait()
        proc.stdout.close()


def test_sigstop_stops_the_whole_tree_and_sigcont_lets_it_go_on(
        counter: tuple[subprocess.Popen[str], int]) -> None:
    """A process and its descendants (an inetd child or a proxy job's distccd
    child, and its compiler -- which distccd puts in a process group of its
    own: the child here does the same)."""
    proc, child = counter
    freezer = SignalFreezer(proc.pid)
    assert freezer.how == "SIGSTOP"
    freezer.freeze()
    wait_state(proc.pid, {"T"}, "stopped")
    wait_state(child, {"T"}, "stopped")
    freezer.thaw()
    wait_state(proc.pid, {"S", "R"}, "running")
    wait_state(child, {"S", "R"}, "running")
    assert progresses(proc)


def test_a_sigstop_cut_spares_the_root_and_kills_the_rest(
        counter: tuple[subprocess.Popen[str], int]) -> None:
    proc, child = counter
    freezer = SignalFreezer(proc.pid, spare=proc.pid)
    freezer.freeze()
    wait_state(child, {"T"}, "stopped")
    freezer.kill()
    wait_state(child, {"Z", "X"}, "killed")
    wait_state(proc.pid, {"S", "R"}, "running")
    assert progresses(proc)
