"""inetd mode: one COMMAND per admitted connection on the client's own socket.

In-process tests run small commands (cat, sh, python) through a real `Server` over
loopback; the end-to-end test runs the stock distcc client against a gatekeeper
that starts the real `distccd --inetd` per job, with concurrency measured by the
compiler wrapper distccd runs (as in test_e2e_distcc) and the process table
checked for leftovers in /proc.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from distcc_harness import (
    LOOPBACK,
    InetdDistccd,
    Project,
    ServiceProcess,
    children_of,
    distcc_build,
    distcc_client_env,
    gatekeeper_env,
    generate_project,
    local_build,
    missing_binaries,
    object_mismatches,
    read_objects,
    run_program,
)
from fakes import Running, config, receive_all, receive_until_closed

from gatekeeper.config import Config, InetdIo
from gatekeeper.distcc.inetd_wake import oob_available
from gatekeeper.distcc.request import encode_request_head
from gatekeeper.inetd.command import Command, CommandRunner, Exit, filters_peers
from gatekeeper.memory.sources import FixedMemory
from gatekeeper.net.addresses import TcpAddress
from gatekeeper.net.copy import abort
from gatekeeper.net.listen import open_all
from gatekeeper.server import Server

# Real processes and sockets: each test here is bounded well below the suite-wide limit.
pytestmark = pytest.mark.timeout(60)

UNUSED_BACKEND = TcpAddress("127.0.0.1", 9)  # inetd mode never connects to it


@asynccontextmanager
async def inetd_gatekeeper(cfg: Config, argv: list[str], *, drain_timeout: float = 5.0,
                           command: Command | None = None) -> AsyncIterator[Running]:
    server = Server(cfg, FixedMemory(2**40), drain_timeout=drain_timeout,
                    command=command or Command.resolve(argv))
    listeners = await open_all(cfg.listen)
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(server.run, listeners)
        host, _, port = addresses[0].rpartition(":")
        yield Running(server, FixedMemory(2**40), TcpAddress(host, int(port)))
        server.stop()


def runner_of(gk: Running) -> CommandRunner:
    assert gk.server.runner is not None
    return gk.server.runner


async def cat_round_trip(gk: Running) -> bytes:
    """3 MiB through a `cat` job, sent while read back; the child is reaped after."""
    client = await gk.connect()
    payload = os.urandom(3 * 2**20)
    async with trio.open_nursery() as nursery:
        async def send() -> None:
            await client.send_all(payload)
            await client.send_eof()
        nursery.start_soon(send)
        assert await receive_all(client) == payload
    await gk.wait_settled(1)
    assert runner_of(gk).children == {}
    return payload


def is_reaped(pid: int) -> bool:
    """True once `pid` is gone from the process table (a zombie still answers kill 0)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_command_gets_the_connection_as_blocking_stdin_and_stdout() -> None:
    # cat fails with EAGAIN on a non-blocking stdin: this also proves the hand-over
    # clears O_NONBLOCK for the child.
    async with inetd_gatekeeper(config(UNUSED_BACKEND), ["cat"]) as gk:
        await cat_round_trip(gk)


async def test_child_sees_the_real_peer_and_no_other_fd() -> None:
    script = ("import os, socket; s = socket.socket(fileno=0); h, p = s.getpeername()[:2]; "
              "print(f'{h}:{p}', *sorted(os.listdir('/proc/self/fd'))); s.detach()")
    async with inetd_gatekeeper(config(UNUSED_BACKEND), [sys.executable, "-c", script]) as gk:
        client = await gk.connect()
        host, port = client.socket.getsockname()[:2]
        me = f"{host}:{port}"
        reply = (await receive_all(client)).decode().split()
        # The child's stdin is our own client socket, not a proxy connection; it
        # inherited fds 0-2 only (3 is listdir's own): no listener, no other client.
        assert reply == [me, "0", "1", "2", "3"]


async def test_max_jobs_bounds_running_children() -> None:
    counts: list[int] = []
    two_running = trio.Event()
    async with inetd_gatekeeper(config(UNUSED_BACKEND, max_jobs=2), ["cat"]) as gk:
        runner = runner_of(gk)

        def on_start(pid: int) -> None:
            counts.append(len(runner.children))
            if len(runner.children) == 2:
                two_running.set()

        runner.on_start = on_start
        clients = [await gk.connect() for _ in range(5)]
        for i, c in enumerate(clients):
            await c.send_all(b"job %d" % i)
        with trio.fail_after(5):
            await two_running.wait()
            await gk.wait_for(lambda s: s.gate.snapshot().queued == 3)
        assert len(runner.children) == 2
        for i, c in enumerate(clients):
            await c.send_eof()
            assert await receive_all(c) == b"job %d" % i
            await c.aclose()
        await gk.wait_settled(5)
    assert len(counts) == 5
    assert max(counts) <= 2


async def test_command_that_cannot_start_is_logged_and_client_closed(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="gatekeeper")
    broken = Command(("/nonexistent/gk-no-such-program",), "/nonexistent/gk-no-such-program")
    async with inetd_gatekeeper(config(UNUSED_BACKEND, max_jobs=1), [], command=broken) as gk:
        for _ in range(2):  # the slot comes back each time
            client = await gk.connect()
            await client.send_all(b"DIST00000001")
            with trio.fail_after(5):
                assert await receive_until_closed(client) == b""
            await client.aclose()
        await gk.wait_settled(2)
        assert gk.server.gate.snapshot().running == 0
    assert caplog.text.count("outcome=command-error") == 2
    assert "cannot run /nonexistent/gk-no-such-program" in caplog.text


async def test_exit_status_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="gatekeeper")
    async with inetd_gatekeeper(config(UNUSED_BACKEND), ["sh", "-c", "echo bye; exit 3"]) as gk:
        client = await gk.connect()
        assert await receive_all(client) == b"bye\n"
        await gk.wait_settled(1)
    assert "outcome=command-failed" in caplog.text
    assert "exit status 3" in caplog.text
    assert re.search(r"pid=\d+", caplog.text)


async def test_drain_timeout_kills_and_reaps_the_running_child() -> None:
    started: list[int] = []
    got_pid = trio.Event()

    def note(pid: int) -> None:
        started.append(pid)
        got_pid.set()

    async with inetd_gatekeeper(config(UNUSED_BACKEND, max_jobs=1), ["sleep", "60"],
                                drain_timeout=0.2) as gk:
        runner_of(gk).on_start = note
        client = await gk.connect()
        with trio.fail_after(5):
            await got_pid.wait()
        begin = trio.current_time()
        gk.server.stop()
        with trio.fail_after(5):
            assert await receive_until_closed(client) == b""
        assert trio.current_time() - begin < 5  # SIGTERM ended it, no SIGKILL grace needed
    assert runner_of(gk).children == {}
    assert is_reaped(started[0])


def test_exit_describe() -> None:
    assert Exit(1, 0).ok
    assert Exit(1, 2).describe() == "exit status 2"
    assert Exit(1, -signal.SIGKILL).describe() == "killed by SIGKILL"
    assert Exit(None, None, "cannot run x: No such file").describe() == "cannot run x: No such file"


def test_command_resolve() -> None:
    cat = Command.resolve(["cat", "-u"])
    assert cat.argv == ("cat", "-u")
    assert os.path.isabs(cat.executable)
    assert str(Command.resolve(["echo", "a b"])) == "echo 'a b'"
    for bad in ([], ["gk-surely-not-a-program"], ["/nonexistent/x"]):
        with pytest.raises(ValueError) as info:
            Command.resolve(bad)
        assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------
# Relayed inetd mode (--inetd-io): the child gets a socketpair gatekeeper relays
# --------------------------------------------------------------------------------------

# Like distccd --inetd: read the whole request, run a "compiler", and wait for it
# with waitpid(WNOHANG) + select() on the client socket with a 1 s timeout, taking
# a readable socket whose read finds nothing for a spurious wakeup. Its reply is
# distccd's status head, then what it saw: how often it was woken that way, any
# stray byte it read while waiting, its stdin's blocking flag and family, and a
# digest of the request.
FAKE_DISTCCD = r"""
import hashlib, os, select, socket, subprocess, sys
need = int(sys.argv[1])
stdin = socket.socket(fileno=0)
family, blocking = stdin.family.name, os.get_blocking(0)
stdin.detach()
data = b""
while len(data) < need:
    select.select([0], [], [], 1.0)
    try:
        chunk = os.read(0, need - len(data))
    except BlockingIOError:
        continue
    if not chunk:
        sys.exit(2)
    data += chunk
child = subprocess.Popen(["sleep", "0.3"])
wakeups, extra = 0, b""
while os.waitpid(child.pid, os.WNOHANG)[0] == 0:
    if select.select([0], [], [], 1.0)[0]:
        try:
            b = os.read(0, 1)
        except BlockingIOError:
            wakeups += 1
            continue
        if not b:
            sys.exit(3)
        extra += b
report = f"wakeups={wakeups} extra={extra!r} blocking={blocking} family={family} "
report += "sha=" + hashlib.sha256(data).hexdigest()
os.write(1, b"DONE00000001STAT00000000" + report.encode())
"""
DISTCC_REQUEST = encode_request_head(["g++", "-c", "a.cc", "-o", "a.o"]) + os.urandom(200_000)


def fake_distccd(*extra: str) -> list[str]:
    return [sys.executable, "-c", FAKE_DISTCCD, str(len(DISTCC_REQUEST)), *extra]


def report_of(reply: bytes) -> dict[str, str]:
    assert reply[:24] == b"DONE00000001STAT00000000", reply[:100]
    return dict(field.split("=", 1) for field in reply[24:].decode().split())


async def run_distcc_job(gk: Running) -> dict[str, str]:
    client = await gk.connect()
    await client.send_all(DISTCC_REQUEST)
    with trio.fail_after(10):
        reply = await receive_all(client)
    await client.aclose()
    return report_of(reply)


@pytest.mark.skipif(not oob_available(), reason="needs AF_UNIX out-of-band data (Linux 5.15+)")
async def test_distcc_job_is_relayed_and_its_waiting_child_woken(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="gatekeeper")
    async with inetd_gatekeeper(config(UNUSED_BACKEND), fake_distccd()) as gk:
        report = await run_distcc_job(gk)
        await gk.wait_settled(1)
    # The child got a non-blocking unix socket, saw the request intact and no
    # stray byte, and its 1 s wait was cut short (without the nudge: 0 wakeups).
    assert report["family"] == "AF_UNIX" and report["blocking"] == "False"
    assert report["sha"] == hashlib.sha256(DISTCC_REQUEST).hexdigest()
    assert report["extra"] == "b''"
    assert int(report["wakeups"]) >= 1
    # The relay read distccd's status and counted the bytes, as in proxy mode.
    assert re.search(rf"outcome=ok .*in={len(DISTCC_REQUEST)} .*pid=\d+ job=a\.o "
                     r"compile=ok", caplog.text), caplog.text


async def test_auto_gives_a_command_with_allow_the_real_socket() -> None:
    # distccd --allow would refuse a unix-domain client: auto mode leaves it direct.
    async with inetd_gatekeeper(config(UNUSED_BACKEND),
                                fake_distccd("--allow", "127.0.0.1")) as gk:
        report = await run_distcc_job(gk)
    assert report["family"] == "AF_INET" and report["blocking"] == "True"
    assert report["wakeups"] == "0"
    assert report["sha"] == hashlib.sha256(DISTCC_REQUEST).hexdigest()


@pytest.mark.parametrize("mode", [InetdIo.DIRECT, InetdIo.RELAY])
async def test_inetd_io_mode_is_obeyed(mode: InetdIo) -> None:
    async with inetd_gatekeeper(config(UNUSED_BACKEND, inetd_io=mode), fake_distccd()) as gk:
        report = await run_distcc_job(gk)
    assert report["family"] == ("AF_INET" if mode is InetdIo.DIRECT else "AF_UNIX")
    assert report["sha"] == hashlib.sha256(DISTCC_REQUEST).hexdigest()


async def test_direct_mode_logs_the_bytes_the_kernel_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    """No byte passes through gatekeeper in direct mode, yet the end line says
    what moved: the client socket's own TCP counters (was in=0 out=0)."""
    caplog.set_level("INFO", logger="gatekeeper")
    async with inetd_gatekeeper(config(UNUSED_BACKEND, inetd_io=InetdIo.DIRECT),
                                ["cat"]) as gk:
        payload = await cat_round_trip(gk)
    ends = [r.getMessage() for r in caplog.records if r.getMessage().startswith("end ")]
    assert len(ends) == 1, ends
    assert f" in={len(payload)} out={len(payload)} " in ends[0], ends[0]


async def test_relay_mode_serves_any_command_on_blocking_stdio(
        caplog: pytest.LogCaptureFixture) -> None:
    # Not a distcc job: relayed, but not nudged, and cat gets a blocking stdin.
    caplog.set_level("INFO", logger="gatekeeper")
    async with inetd_gatekeeper(config(UNUSED_BACKEND, inetd_io=InetdIo.RELAY),
                                ["cat"]) as gk:
        payload = await cat_round_trip(gk)
    assert "outcome=ok wait=" in caplog.text
    assert f"in={len(payload)} out={len(payload)}" in caplog.text


async def test_relay_ends_when_the_child_exits_whatever_it_left_behind(
        caplog: pytest.LogCaptureFixture) -> None:
    # The background sleep keeps a copy of the child's socket for 30 s; the job
    # must still end, cleanly, when the child itself exits (as in direct mode).
    caplog.set_level("INFO", logger="gatekeeper")
    pids: list[int] = []
    async with inetd_gatekeeper(config(UNUSED_BACKEND, inetd_io=InetdIo.RELAY),
                                ["sh", "-c", "sleep 30 & echo hi"]) as gk:
        runner_of(gk).on_start = pids.append
        client = await gk.connect()
        try:
            with trio.fail_after(10):
                assert await receive_all(client) == b"hi\n"
                await client.aclose()
                await gk.wait_settled(1)
        finally:
            for pid in pids:  # the background sleep
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
    assert "outcome=ok" in caplog.text


# Reads the request, then stops reading for a while (nudges arrive and stay
# unread), then answers and exits: a unix socket closed with unread data gives
# its peer ECONNRESET, which must not turn the delivered reply into a failure.
LATE_REPLY = r"""
import os, select, subprocess, sys
need, data = int(sys.argv[1]), b""
while len(data) < need:
    select.select([0], [], [], 1.0)
    try:
        data += os.read(0, need - len(data))
    except BlockingIOError:
        pass
subprocess.run(["sleep", "0.3"])  # its compiler: the nudge comes when it ends
select.select([0], [], [], 10)    # woken by it, and leaves it unread
os.write(1, b"DONE00000001STAT00000000" + b"late" * 1000)
"""


@pytest.mark.skipif(not oob_available(), reason="needs AF_UNIX out-of-band data (Linux 5.15+)")
async def test_nudge_left_unread_at_exit_does_not_fail_the_job(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="gatekeeper")
    argv = [sys.executable, "-c", LATE_REPLY, str(len(DISTCC_REQUEST))]
    async with inetd_gatekeeper(config(UNUSED_BACKEND), argv) as gk:
        for _ in range(3):
            client = await gk.connect()
            await client.send_all(DISTCC_REQUEST)
            with trio.fail_after(10):
                reply = await receive_all(client)  # a reset would raise here
            await client.aclose()
            assert reply == b"DONE00000001STAT00000000" + b"late" * 1000
        await gk.wait_settled(3)
        assert gk.server.waker is not None and gk.server.waker.pokes > 0
    assert caplog.text.count("outcome=ok") == 3, caplog.text


async def test_client_reset_hangs_up_on_the_relayed_child(
        caplog: pytest.LogCaptureFixture) -> None:
    # The child reads until EOF: it ends only if the client's reset reaches it.
    caplog.set_level("INFO", logger="gatekeeper")
    script = "import sys; sys.stdin.buffer.read()"
    async with inetd_gatekeeper(config(UNUSED_BACKEND, inetd_io=InetdIo.RELAY),
                                [sys.executable, "-c", script]) as gk:
        started = trio.Event()
        runner_of(gk).on_start = lambda pid: started.set()
        client = await gk.connect()
        await client.send_all(b"some request bytes")
        with trio.fail_after(5):
            await started.wait()
        abort(client)
        await client.aclose()
        with trio.fail_after(10):
            await gk.wait_settled(1)
        assert runner_of(gk).children == {}
    assert "outcome=client-error" in caplog.text


def test_filters_peers() -> None:
    def argv(*args: str) -> Command:
        return Command(("distccd", *args), "/usr/bin/distccd")

    assert filters_peers(argv("--inetd", "--allow", "10.0.0.0/8"))
    assert filters_peers(argv("--inetd", "--allow-private"))
    assert filters_peers(argv("-a", "10.0.0.0/8"))
    assert filters_peers(argv("-a10.0.0.0/8"))
    assert not filters_peers(argv("--inetd", "--log-stderr"))
    assert not filters_peers(Command(("--allow",), "/bin/x"))  # argv[0] is the program


# --------------------------------------------------------------------------------------
# End to end: the stock distcc client, gatekeeper, and a real distccd --inetd per job
# --------------------------------------------------------------------------------------

MISSING = missing_binaries()
requires_toolchain = pytest.mark.skipif(
    bool(MISSING),
    reason=f"needs {', '.join(MISSING)} on PATH (Debian: apt-get install -y distcc g++ make)",
)
# distccd --inetd makes every job last a whole number of seconds (its wait loop
# polls the client once a second and, unlike the daemon, has no SIGCHLD handler to
# cut the poll short), so this project is smaller than test_e2e_distcc's: 10 units.
PROJECT_SHAPE = {"cxx_files": 7, "c_files": 2}
_READY = re.compile(r"listening on 127\.0\.0\.1:(?P<port>\d+)")
_END_OK = re.compile(r"end peer=(?P<peer>\S+) outcome=ok .* pid=(?P<pid>\d+)")
_DISTCCD_OK = re.compile(r"client: (?P<client>\S+)\s+COMPILE_OK .* time:(?P<ms>\d+)ms")


@dataclasses.dataclass(frozen=True)
class Reference:
    objects: dict[str, bytes]
    output: str


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    project = generate_project(tmp_path_factory.mktemp("inetd-reference"), **PROJECT_SHAPE)
    build = local_build(project)
    assert build.ok, build.describe()
    run = run_program(project)
    assert run.returncode == 0 and run.stdout == project.expected_output
    return Reference(read_objects(project), run.stdout)


@pytest.fixture(params=["direct", "relay"])
def inetd_distccd(request: pytest.FixtureRequest) -> Iterator[InetdDistccd]:
    """distccd with --allow (auto mode gives it the client socket) and without
    (auto mode relays it and cuts its one-second wait short)."""
    distccd = InetdDistccd()
    distccd.allow = request.param == "direct"
    with distccd as d:
        yield d


@pytest.mark.e2e
@requires_toolchain
@pytest.mark.parametrize("max_jobs", [2, 8])
def test_inetd_mode_with_real_distccd(max_jobs: int, tmp_path: Path, reference: Reference,
                                      inetd_distccd: InetdDistccd) -> None:
    """--max-jobs 2 must hold the compilers to 2; --max-jobs 8 is the control that shows
    the measurement sees more when nothing holds them (make -j12, client slots 16).
    Relayed, distccd must see a unix-domain client and report its compiles done in
    under its one-second poll (impossible for an unwoken distccd --inetd)."""
    project: Project = generate_project(tmp_path / "project", **PROJECT_SHAPE)
    argv = [sys.executable, "-m", "gatekeeper", "--listen", f"{LOOPBACK}:0",
            "--max-jobs", str(max_jobs), "--min-free-mb", "0", "--", *inetd_distccd.command]
    with ServiceProcess(argv, env=gatekeeper_env()) as gk:
        port = int(gk.wait_for(_READY)["port"])
        build = distcc_build(project, port, jobs=12, host_slots=16)
        units = project.translation_units
        # One end line per job, logged only after its child was reaped.
        ended = gk.wait_until(
            lambda lines: sum(1 for line in lines if _END_OK.search(line)) >= units, 10)
        leftovers = children_of(gk.pid)
        diag = f"{build.describe()}\n--- gatekeeper + distccd ---\n{gk.log_text}"
        assert build.ok, diag
        assert build.client_complaints == [], diag
        assert ended, diag
        assert leftovers == [], f"children left behind (pid, state): {leftovers}\n{diag}"
        assert gk.poll() is None, diag

    run = run_program(project)
    assert run.stdout == project.expected_output == reference.output
    assert object_mismatches(reference.objects, project) == [], diag
    log = inetd_distccd.compile_log()
    assert log.count == units and log.failed == [] and log.unfinished == [], diag
    peers = sorted(m["peer"] for m in map(_END_OK.search, gk.log_lines) if m)
    done = [m for m in map(_DISTCCD_OK.search, gk.log_lines) if m]
    seen = sorted(m["client"] for m in done)
    times = sorted(int(m["ms"]) for m in done)
    if inetd_distccd.allow:
        # distccd saw each real client address (the client's own ephemeral port), the
        # very peers gatekeeper admitted -- not a proxy connection from gatekeeper.
        assert seen == peers, diag
    else:
        # Relayed: a unix-domain client; gatekeeper read each compile's status; and
        # distccd, woken when its compiler was done, reports jobs under its 1 s poll
        # (unwoken, each takes at least that second: see direct mode's times).
        assert seen == ["UNIX-DOMAIN"] * units, diag
        assert sum(1 for line in gk.log_lines if " compile=ok " in line) == units, diag
        assert times[units // 2] < 1000, f"distccd job times (ms): {times}\n{diag}"
    print(f"inetd ({'direct' if inetd_distccd.allow else 'relay'}) --max-jobs {max_jobs}: "
          f"{log.count} compiles, max concurrency {log.max_concurrency}, "
          f"build {build.seconds:.1f}s, distccd job times {times} ms")
    if max_jobs == 2:
        assert 1 <= log.max_concurrency <= 2, diag
    else:
        assert log.max_concurrency > 2, diag



@pytest.mark.e2e
@requires_toolchain
@pytest.mark.skipif(os.geteuid() != 0, reason="a send buffer past net.core.wmem_max needs root "
                    "(SO_SNDBUFFORCE); without it distccd retries, correctly, with a notice")
def test_relayed_distccd_sends_a_big_object_in_one_piece(tmp_path: Path) -> None:
    """Issue 22: distccd sendfile()s its reply at once to its non-blocking
    socketpair end; a buffer too small for it made distccd log "partial
    transmission; retrying" for every piece (nine times per 3 MiB object)."""
    src = tmp_path / "big.c"
    src.write_text("unsigned char big[3 << 20] = {1};\n")  # a 3 MiB .data section
    distccd = InetdDistccd()
    distccd.allow = False  # relayed
    with distccd as d:
        argv = [sys.executable, "-m", "gatekeeper", "--listen", f"{LOOPBACK}:0",
                "--max-jobs", "1", "--min-free-mb", "0", "--", *d.command]
        with ServiceProcess(argv, env=gatekeeper_env()) as gk:
            port = int(gk.wait_for(_READY)["port"])
            env = distcc_client_env(LOOPBACK, port, tmp_path / ".distcc")
            remote = subprocess.run(["distcc", "gcc", "-O2", "-c", str(src), "-o", "remote.o"],
                                    cwd=tmp_path, env=env, capture_output=True, text=True,
                                    timeout=120, check=False)
            ended = gk.wait_until(lambda lines: any(_END_OK.search(x) for x in lines), 10)
            diag = f"{remote.stderr}\n--- gatekeeper + distccd ---\n{gk.log_text}"
    local = subprocess.run(["gcc", "-O2", "-c", str(src), "-o", "local.o"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120, check=False)
    assert remote.returncode == 0 and local.returncode == 0 and ended, diag
    assert (tmp_path / "remote.o").stat().st_size > 3 << 20
    assert (tmp_path / "remote.o").read_bytes() == (tmp_path / "local.o").read_bytes()
    assert "partial transmission" not in diag, diag


@pytest.mark.parametrize("clear", [False, True])
async def test_clear_env_gives_the_child_only_what_distccd_needs(clear: bool) -> None:
    environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
               "LC_ALL": "C", "TMPDIR": "/tmp", "DISTCC_SAVE_TEMPS": "0",
               "GK_TEST_SECRET": "hunter2", "LD_PRELOAD": ""}
    command = Command.resolve(["env"])
    command = command.clearing_env(environ) if clear else command
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GK_TEST_SECRET", "hunter2")
        async with inetd_gatekeeper(config(UNUSED_BACKEND, max_jobs=1), [],
                                    command=command) as gk:
            client = await gk.connect()
            with trio.fail_after(10):
                shown = (await receive_all(client)).decode()
            await client.aclose()
            await gk.wait_settled(1)
    names = {line.partition("=")[0] for line in shown.splitlines()}
    if clear:
        assert names == {"PATH", "LANG", "LC_ALL", "TMPDIR", "DISTCC_SAVE_TEMPS"}
    else:
        assert "GK_TEST_SECRET" in names


DRAIN_NONBLOCKING = """
import os, select
while True:
    select.select([0], [], [])
    try:
        if not os.read(0, 65536):
            break
    except BlockingIOError:
        continue
"""


async def test_relayed_inetd_job_whose_request_stalls_is_cut() -> None:
    """The request deadline holds in relayed inetd mode too: the child is
    told its client hung up, the slot comes back. (Real time, a short
    deadline: a mock clock would jump past it while the real child is still
    starting up, and a backend that has not read yet is not the client's fault.)"""
    source = b"x" * 1000
    request = (encode_request_head(["gcc", "-c", "x.c", "-o", "x.o"])
               + b"DOTI%08x" % len(source) + source)
    async with inetd_gatekeeper(
            config(UNUSED_BACKEND, max_jobs=1, inetd_io=InetdIo.RELAY,
                   request_idle_timeout=0.5),
            # A reader like distccd: its relayed stdin is non-blocking (it is
            # woken, inetd_wake), where `cat` would fail with EAGAIN.
            [sys.executable, "-c", DRAIN_NONBLOCKING]) as gk:
        client = await gk.connect()
        await client.send_all(request[:-900])  # and then nothing more
        with trio.fail_after(30):
            await gk.wait_for(lambda s: s.gate.snapshot().finished_total == 1)
            await gk.wait_for(lambda s: not s.connections.live)
        assert gk.server.observatory.completed["idle-timeout"] == 1
        assert runner_of(gk).children == {}
        await client.aclose()
