"""End-to-end: the stock distcc client builds a real C/C++ project through distccd.

The number of compilers running at once is measured on the server side by a wrapper that
distccd runs instead of gcc/g++ (see distcc_harness), independently of gatekeeper.

* The control test goes straight to distccd (--jobs 8) and must see more than 2 compiles
  at once: it proves the measurement catches an over-limit, i.e. that the gatekeeper
  test can fail.
* The gatekeeper test puts `python -m gatekeeper --max-jobs 2` in front of the same
  distccd and must see at most 2, with the build still correct and nothing failing.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from distcc_harness import (
    LOOPBACK,
    PROGRAM,
    BuildResult,
    CompileLog,
    DistccServer,
    GatekeeperProcess,
    Project,
    distcc_build,
    distcc_client_env,
    generate_project,
    local_build,
    missing_binaries,
    object_mismatches,
    read_objects,
    run_make,
    run_program,
)

MISSING = missing_binaries()
requires_toolchain = pytest.mark.skipif(
    bool(MISSING),
    reason=(
        f"end-to-end tests need {', '.join(MISSING)} on PATH "
        "(Debian: apt-get install -y distcc g++ make)"
    ),
)

DISTCCD_JOBS = 8  # distccd's own limit: well above what gatekeeper allows
MAKE_JOBS = 12  # more parallel jobs than distccd slots
HOST_SLOTS = 16  # DISTCC_HOSTS=.../16: the client must not be the limiting factor
GATEKEEPER_MAX_JOBS = 2


@dataclasses.dataclass(frozen=True)
class Reference:
    """Objects and output of a plain local build (no distcc) with the same flags."""

    objects: dict[str, bytes]
    output: str


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    project = generate_project(tmp_path_factory.mktemp("reference"))
    build = local_build(project)
    assert build.ok, build.describe()
    run = run_program(project)
    # Self-check of the generator: the expected line is computed in Python.
    assert run.returncode == 0 and run.stdout == project.expected_output, (run.stdout, run.stderr)
    return Reference(read_objects(project), run.stdout)


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return generate_project(tmp_path / "project")


@pytest.fixture
def distccd() -> Iterator[DistccServer]:
    with DistccServer(jobs=DISTCCD_JOBS) as server:
        yield server


@pytest.fixture
def gatekeeper(distccd: DistccServer) -> Iterator[GatekeeperProcess]:
    args = [
        "--listen",
        f"{LOOPBACK}:0",
        "--backend",
        f"{LOOPBACK}:{distccd.port}",
        "--max-jobs",
        str(GATEKEEPER_MAX_JOBS),
        "--min-free-mb",
        "0",
        "--log-level",
        "info",
    ]
    with GatekeeperProcess(args) as gk:
        yield gk


def _diagnostics(
    build: BuildResult, distccd: DistccServer, gatekeeper: GatekeeperProcess | None = None
) -> str:
    parts = [build.describe(), "--- distccd ---", distccd.log_text]
    if distccd.compile_log_path is not None and distccd.compile_log_path.exists():
        parts += ["--- compile log ---", distccd.compile_log_path.read_text()]
    if gatekeeper is not None:
        parts += ["--- gatekeeper ---", gatekeeper.log_text]
    return "\n".join(parts)


def _check_build(
    project: Project,
    build: BuildResult,
    distccd: DistccServer,
    reference: Reference,
    gatekeeper: GatekeeperProcess | None = None,
) -> CompileLog:
    """Everything that must hold for any correct remote build; returns the compile log."""
    diag = _diagnostics(build, distccd, gatekeeper)
    assert build.ok, f"build failed\n{diag}"
    assert build.client_complaints == [], f"distcc client reported problems\n{diag}"

    run = run_program(project)
    assert run.returncode == 0, f"program failed: {run.stderr}\n{diag}"
    assert run.stdout == project.expected_output == reference.output

    # distcc preprocesses locally and compiles remotely; with the same compiler and
    # flags and no -g the objects are byte-identical to a plain local compile.
    assert object_mismatches(reference.objects, project) == [], diag

    log = distccd.compile_log()
    assert log.malformed == (), diag
    assert log.unfinished == [], f"compiles without an end record\n{diag}"
    assert log.failed == [], f"compiles exited non-zero\n{diag}"
    # Each translation unit compiled exactly once, remotely: no retry, no local fallback.
    assert log.count == project.translation_units, diag

    summaries = distccd.wait_for_compile_ok(project.translation_units)
    results = [s.result for s in summaries]
    assert results == ["COMPILE_OK"] * project.translation_units, f"{results}\n{diag}"
    return log


@pytest.mark.e2e
@requires_toolchain
def test_control_direct_to_distccd_exceeds_two(
    project: Project, distccd: DistccServer, reference: Reference
) -> None:
    build = distcc_build(project, distccd.port, jobs=MAKE_JOBS, host_slots=HOST_SLOTS)
    log = _check_build(project, build, distccd, reference)
    print(
        f"control: {log.count} remote compiles, max concurrency {log.max_concurrency}, "
        f"build {build.seconds:.1f}s"
    )
    # Proves the measurement sees an over-limit when nothing limits to 2.
    assert log.max_concurrency > GATEKEEPER_MAX_JOBS, _diagnostics(build, distccd)
    assert log.max_concurrency <= DISTCCD_JOBS, _diagnostics(build, distccd)


@pytest.mark.e2e
@requires_toolchain
def test_gatekeeper_limits_concurrent_compiles(
    project: Project,
    distccd: DistccServer,
    gatekeeper: GatekeeperProcess,
    reference: Reference,
) -> None:
    build = distcc_build(project, gatekeeper.port, jobs=MAKE_JOBS, host_slots=HOST_SLOTS)
    log = _check_build(project, build, distccd, reference, gatekeeper)
    diag = _diagnostics(build, distccd, gatekeeper)
    print(
        f"gatekeeper: {log.count} remote compiles, max concurrency {log.max_concurrency}, "
        f"build {build.seconds:.1f}s"
    )
    assert 1 <= log.max_concurrency <= GATEKEEPER_MAX_JOBS, diag
    assert gatekeeper.is_running(), f"gatekeeper exited during the build\n{diag}"
    assert "Traceback" not in gatekeeper.log_text, diag


@pytest.mark.e2e
@requires_toolchain
def test_memory_rule_holds_real_jobs_until_queue_timeout(
    project: Project, distccd: DistccServer
) -> None:
    """--min-free-mb above the machine's memory holds every job (the documented way to
    drain a box): the real client waits, is closed at --queue-timeout, and reports a
    failed remote compile; distccd never sees the job."""
    args = ["--listen", f"{LOOPBACK}:0", "--backend", f"{LOOPBACK}:{distccd.port}",
            "--max-jobs", "4", "--min-free-mb", str(2**40), "--queue-timeout", "1"]
    with GatekeeperProcess(args) as gk:
        env = distcc_client_env(LOOPBACK, gk.port, project.root / ".distccdir")
        # With backoff off, distcc retries a failed host forever; a real client backs off.
        env["DISTCC_BACKOFF_PERIOD"] = "60"
        source = project.root / project.sources[0]
        proc = subprocess.run(
            ["distcc", "g++", "-Iinclude", "-c", str(source), "-o", str(project.root / "held.o")],
            env=env, capture_output=True, text=True, timeout=30, cwd=project.root)
        diag = f"{proc.stderr}\n--- gatekeeper ---\n{gk.log_text}"
        assert proc.returncode != 0, diag  # DISTCC_FALLBACK=0: held-then-closed is an error
        assert not (project.root / "held.o").exists(), diag
        assert distccd.compile_log().count == 0, diag
        assert "outcome=queue-timeout" in gk.log_text, diag
        assert "holding 1:" in gk.log_text and "min free" in gk.log_text, diag
        assert gk.is_running(), diag


@pytest.mark.e2e
@requires_toolchain
def test_distccd_restart_mid_build_fails_in_flight_jobs_cleanly_and_the_queue_resumes(
    project: Project, distccd: DistccServer, reference: Reference
) -> None:
    """An admin restarts distccd while a build runs through gatekeeper: the jobs in
    flight fail (the client sees an error, never a hang or a bad object; with
    backoff off it retries them), the queue does not stall, and the next build
    through the same gatekeeper is correct."""
    import re
    import threading

    args = ["--listen", f"{LOOPBACK}:0", "--backend", f"{LOOPBACK}:{distccd.port}",
            "--max-jobs", "2", "--min-free-mb", "0"]
    with GatekeeperProcess(args) as gk:
        result: list[BuildResult] = []
        builder = threading.Thread(target=lambda: result.append(distcc_build(
            project, gk.port, jobs=MAKE_JOBS, host_slots=HOST_SLOTS)))
        builder.start()
        assert gk._output is not None
        first_done = gk._output.wait_for(re.compile(r"end peer=.* outcome=ok"), 30)
        assert first_done, gk.log_text
        distccd.restart()
        builder.join(60)
        assert not builder.is_alive(), "the build hung after the restart"
        broken = result[0]
        diag = _diagnostics(broken, distccd, gk)
        # The restart cut jobs off in flight, and gatekeeper says so ...
        assert re.search(r"outcome=(backend-failed|backend-error)", gk.log_text), diag
        # ... and the client saw errors, never bad objects: with backoff off it
        # retries the host, so the build either fails or completes correctly.
        if broken.ok:
            assert object_mismatches(reference.objects, project) == [], diag
        assert gk.is_running(), diag

        # The same gatekeeper serves the next build correctly.
        for built in (*project.objects, project.program.name):
            (project.root / built).unlink(missing_ok=True)
        again = distcc_build(project, gk.port, jobs=MAKE_JOBS, host_slots=HOST_SLOTS)
        diag = _diagnostics(again, distccd, gk)
        assert again.ok, diag
        run = run_program(project)
        assert run.stdout == reference.output, diag
        assert object_mismatches(reference.objects, project) == [], diag
        assert "Traceback" not in gk.log_text, diag


@pytest.mark.e2e
@requires_toolchain
def test_lzo_builds_through_gatekeeper_are_identified_and_correct(
    project: Project,
    distccd: DistccServer,
    gatekeeper: GatekeeperProcess,
    reference: Reference,
) -> None:
    """Protocol 2 (`,lzo`): the request's length is the compressed one, the
    head is the same; every job is identified (its end line names it) and the
    objects are those of a local build."""
    env = distcc_client_env(LOOPBACK, gatekeeper.port, project.root / ".distccdir",
                            host_slots=HOST_SLOTS)
    env["DISTCC_HOSTS"] += ",lzo"
    build = run_make(project.root, jobs=MAKE_JOBS, env=env)
    _check_build(project, build, distccd, reference, gatekeeper)
    named = [line for line in gatekeeper.log_lines
             if "end peer=" in line and " job=" in line and "est_from=" in line]
    assert len(named) == project.translation_units, gatekeeper.log_text


PUMP_SHIM = Path(__file__).parent / "pump"


def _pump_missing() -> str | None:
    if MISSING or shutil.which("distcc-pump") is None:
        return "needs distcc-pump (apt-get install -y distcc-pump python3-lzo)"
    probe = subprocess.run(["/usr/bin/python3", "-c", "import lzo"], capture_output=True)
    if probe.returncode != 0:
        return "needs python3-lzo for the include server's LZO (apt-get install -y python3-lzo)"
    return None


@pytest.mark.e2e
@pytest.mark.skipif(_pump_missing() is not None, reason=_pump_missing() or "")
def test_pump_builds_through_gatekeeper_are_identified_and_correct(
    project: Project,
    distccd: DistccServer,
    gatekeeper: GatekeeperProcess,
    reference: Reference,
) -> None:
    """Protocol 3 (`distcc-pump`, `,cpp,lzo`): the server preprocesses from the
    files the client ships. Every job is identified, ends `ok` with distccd's
    status (a pump client resets as it closes, once it has that status), and
    the objects are those of a local build. Debian bookworm's include server
    needs tests/pump/sitecustomize.py to run at all (its C helper fails on
    Python 3.11); without it pump silently preprocesses locally, which the
    distccd log would show: pump jobs go through dcc_fix_debug_info."""
    # A plain build first: what it learns is what the pump build's jobs find
    # (pump sends the -I and -D a plain client strips; one identity for both).
    plain = distcc_build(project, gatekeeper.port, jobs=MAKE_JOBS, host_slots=HOST_SLOTS)
    assert plain.ok, _diagnostics(plain, distccd, gatekeeper)
    for obj in project.objects:
        (project.root / obj).unlink()
    (project.root / PROGRAM).unlink(missing_ok=True)
    seen = len(gatekeeper.log_lines)
    env = distcc_client_env(LOOPBACK, gatekeeper.port, project.root / ".distccdir",
                            host_slots=HOST_SLOTS)
    env["DISTCC_HOSTS"] += ",cpp,lzo"
    env["PYTHONPATH"] = str(PUMP_SHIM)
    begin = time.monotonic()
    done = subprocess.run(["distcc-pump", "make", f"-j{MAKE_JOBS}", "-C", str(project.root)],
                          env=env, capture_output=True, text=True, timeout=120)
    build = BuildResult(tuple(done.args), done.returncode, done.stdout, done.stderr,
                        time.monotonic() - begin)
    assert build.ok, _diagnostics(build, distccd, gatekeeper)
    pumped = distccd.log_text.count("client_path_plus_slashes")
    assert pumped == project.translation_units, distccd.log_text
    ends = [line for line in gatekeeper.log_lines[seen:] if "end peer=" in line]
    assert len(ends) == project.translation_units, gatekeeper.log_text
    assert all("outcome=ok" in line and " job=" in line and "compile=ok" in line
               and "est_from=learned" in line for line in ends), gatekeeper.log_text
    run = run_program(project)
    assert run.returncode == 0 and run.stdout == reference.output
    assert object_mismatches(reference.objects, project) == []
