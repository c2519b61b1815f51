"""Issue 16's attacks, each run against a real gatekeeper, with the outcome asserted.

Remote command execution first: the request that made the stock distccd run
a shell behind gatekeeper is shown to work without the argv policy (so this
test can fail) and to run nothing with it, while real compiles (gcc, g++,
clang) still pass. Then the head reader's hostile inputs in-process: a head
that never completes, one that arrives a byte at a time, one whose client
leaves, each bounded and cheap.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import psutil
import pytest
import trio
import trio.testing
from distcc_harness import (
    DistccServer,
    GatekeeperProcess,
    distcc_client_env,
    exchange,
    missing_binaries,
)
from fakes import Running, backend, config, echo, gatekeeper, receive_until_closed

from gatekeeper.distcc import request as request_module
from gatekeeper.distcc.policy import ArgvPolicy
from gatekeeper.distcc.request import encode_request_head
from gatekeeper.net.relay import SPARE_PIPES
from gatekeeper.server import Server

MISSING = missing_binaries()
needs_distcc = pytest.mark.skipif(
    bool(MISSING), reason=f"needs {', '.join(MISSING)} on PATH "
    "(Debian: apt-get install -y distcc g++ make)")
END = re.compile(r"end peer=\S+ outcome=(?P<outcome>\S+) .*")
POLICY = ArgvPolicy()


def _doti(argv: list[str], source: bytes) -> bytes:
    return encode_request_head(argv) + b"DOTI%08x" % len(source) + source


@pytest.fixture
def marker_dir() -> Iterator[Path]:
    # distccd runs compilers as an unprivileged user: it must be able to write here.
    path = Path(tempfile.mkdtemp(prefix="gk-hostile-", dir="/tmp"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        for p in path.iterdir():
            p.unlink()
        path.rmdir()


@needs_distcc
@pytest.mark.e2e
def test_wrapper_request_runs_a_shell_without_the_policy_and_nothing_with_it(
        marker_dir: Path) -> None:
    source = b"int f(void) { return 1; }\n"

    def attack(name: str) -> bytes:
        marker = marker_dir / name
        return _doti(["gcc", "-wrapper", f"/bin/sh,-c,echo ran > {marker}",
                      "-c", "x.c", "-o", "x.o"], source)

    with DistccServer(jobs=2, hold_s=0) as d:
        with GatekeeperProcess(["--listen", "127.0.0.1:0", "--backend", d.address,
                                "--identify", "none"]) as open_gate:
            exchange(open_gate.port, attack("open"))
            assert open_gate.wait_until(lambda lines: any(END.search(x) for x in lines), 30)
        # The attack is real: distccd ran the shell.
        assert (marker_dir / "open").read_text() == "ran\n"

        with GatekeeperProcess(["--listen", "127.0.0.1:0", "--backend", d.address]) as g:
            compiles = d.compile_log().count
            assert exchange(g.port, attack("gated")) == b""  # closed: compile locally
            assert g.wait_until(lambda lines: any(END.search(x) for x in lines), 30)
            line = next(x for x in g.log_lines if END.search(x))
            assert "outcome=argv-policy" in line and "-wrapper" in line, line
            assert "in=0 out=0" in line, line
            # A real compile on the same gatekeeper still runs.
            reply = exchange(g.port, _doti(["gcc", "-c", "ok.c", "-o", "ok.o"], source))
            assert reply.startswith(b"DONE") and b"STAT00000000" in reply, reply[:64]
            assert g.wait_until(lambda ls: sum(1 for x in ls if "outcome=ok" in x) == 1, 30)
            assert "Traceback" not in g.log_text
        assert not (marker_dir / "gated").exists()
        assert d.compile_log().count == compiles + 1  # only the real one reached a compiler


@needs_distcc
@pytest.mark.e2e
@pytest.mark.parametrize("compiler", ["gcc", "g++", "clang", "clang++"])
def test_real_compilers_pass_the_policy(compiler: str, tmp_path: Path) -> None:
    if subprocess.run(["which", compiler], capture_output=True).returncode != 0:
        pytest.skip(f"{compiler} not installed (Debian: apt-get install -y clang)")
    if not Path("/usr/lib/distcc", compiler).exists():
        pytest.skip(f"distccd has no masquerade link for {compiler} (update-distcc-symlinks)")
    suffix = ".cc" if "+" in compiler else ".c"
    src = tmp_path / f"unit{suffix}"
    src.write_text("int twice(int x) { return 2 * x; }\n")
    with DistccServer(jobs=2, hold_s=0) as d, GatekeeperProcess(
            ["--listen", "127.0.0.1:0", "--backend", d.address]) as g:
        env = distcc_client_env("127.0.0.1", g.port, tmp_path / ".distcc")
        done = subprocess.run(["distcc", compiler, "-O2", "-Wall", "-c", src.name, "-o",
                               "unit.o"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert g.wait_until(lambda lines: any("outcome=ok" in x for x in lines), 30), g.log_text
        assert "argv-policy" not in g.log_text
    assert (tmp_path / "unit.o").stat().st_size > 0


def refused(count: int) -> Callable[[Server], bool]:
    """The argv policy has refused `count` connections, and their tasks are done."""
    return lambda s: (s.observatory.rejected["argv-policy"] == count
                      and not s.connections.live)


async def _refused_unanswered(gk: Running, payload: bytes) -> None:
    """Send `payload`; the connection is closed unanswered, counted as argv-policy."""
    c = await gk.connect()
    await c.send_all(payload)
    with trio.fail_after(5):
        assert await receive_until_closed(c) == b""
        await gk.wait_for(refused(1))
    await c.aclose()
    assert gk.server.observatory.rejected["argv-policy"] == 1


# In-process: the head reader under hostile timing. The policy is on here
# (fakes.config turns it off for the tests that send made-up bytes).

async def test_refused_job_is_counted_and_never_reaches_the_backend() -> None:
    async with backend(echo) as be, gatekeeper(
            config(be.address, argv_policy=POLICY)) as gk:
        await _refused_unanswered(gk, _doti(["gcc", "-fplugin=/tmp/x.so", "-c", "x.c"],
                                            b"int x;\n"))
        assert be.connections == 0
        text = gk.server.observatory.exposition().decode()
        assert 'gatekeeper_rejected_total{reason="argv-policy"} 1' in text


async def test_a_head_that_never_completes_is_refused_at_the_request_deadline(
        autojump_clock: trio.testing.MockClock) -> None:
    async with backend(echo) as be, gatekeeper(
            config(be.address, argv_policy=POLICY, request_idle_timeout=30.0)) as gk:
        c = await gk.connect()
        await c.send_all(encode_request_head(["gcc", "-c", "x.c"])[:20])
        begin = trio.current_time()
        with trio.fail_after(60):
            assert await receive_until_closed(c) == b""
        assert 30.0 <= trio.current_time() - begin < 31.0
        await c.aclose()
        assert be.connections == 0
        assert gk.server.observatory.rejected["argv-policy"] == 1


async def test_a_head_in_pieces_is_read_once_per_arrival(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 16's CPU burn: a 49 KB head re-parsed every 5 ms. Now each look
    at the buffer happens only when more bytes came, and resumes the parse."""
    feeds: list[int] = []
    real_feed = request_module.HeadReader.feed

    def counting_feed(self: request_module.HeadReader, data: bytes) -> object:
        feeds.append(len(data))
        return real_feed(self, data)

    monkeypatch.setattr(request_module.HeadReader, "feed", counting_feed)
    argv = ["gcc", *(f"-DN{i}" for i in range(2700)), "-c", "x.c"]
    head = encode_request_head(argv)
    assert len(head) > 49_000  # the 49 KB head
    async with backend(echo) as be, gatekeeper(config(be.address, argv_policy=POLICY)) as gk:
        c = await gk.connect()
        pieces = [head[i:i + 8_000] for i in range(0, len(head), 8_000)]
        for piece in pieces[:-1]:
            await c.send_all(piece)
            # Idle spells between pieces: the reader waits (in the kernel for a
            # small head, else in a backed-off sleep that asks FIONREAD) and
            # does not look at the buffer again until bytes came.
            for _ in range(3):
                await trio.testing.wait_all_tasks_blocked(cushion=0.01)
        await c.send_all(pieces[-1] + b"DOTI00000000")
        await c.send_eof()
        with trio.fail_after(10):
            await be.wait_for(lambda b: b.connections == 1)
        await c.aclose()
    # One look per piece at most (the first peek grows its buffer once), never a poll.
    assert len(feeds) <= len(pieces) + 2, feeds
    assert be.connections == 1


async def test_a_head_larger_than_the_kernel_holds_is_refused_at_once() -> None:
    """A head the receive buffer cannot hold whole can never be read: refused
    as soon as the buffer is full, not after the request deadline."""
    argv = ["gcc", *(f"-DNAME{i}=value{i}" for i in range(8000)), "-c", "x.c"]
    head = encode_request_head(argv)
    async with backend(echo) as be, gatekeeper(
            config(be.address, argv_policy=POLICY, request_idle_timeout=3600.0)) as gk:
        c = await gk.connect()
        async with trio.open_nursery() as nursery:
            async def send() -> None:
                with contextlib.suppress(trio.BrokenResourceError):
                    await c.send_all(head)
            nursery.start_soon(send)
            with trio.fail_after(10):
                await gk.wait_for(refused(1))
            nursery.cancel_scope.cancel()
        await c.aclose()
        assert be.connections == 0
        assert gk.server.observatory.rejected["argv-policy"] == 1


async def test_a_client_that_leaves_mid_head_is_let_go_at_once() -> None:
    async with backend(echo) as be, gatekeeper(
            config(be.address, argv_policy=POLICY, request_idle_timeout=3600.0)) as gk:
        c = await gk.connect()
        await c.send_all(encode_request_head(["gcc", "-c", "x.c"])[:30])
        await trio.testing.wait_all_tasks_blocked()
        await c.aclose()
        with trio.fail_after(5):  # not the hour-long deadline
            await gk.wait_for(refused(1))
        assert be.connections == 0


@pytest.mark.parametrize("payload", [
    b"DIST00000001ARGC%08x" % 5000,                       # more arguments than read
    b"DIST00000001ARGC00000001ARGV%08x" % (1 << 20),      # an argument past the bound
    b"DIST   +0x1ARGC00000001ARGV00000003gcc",            # distccd's strtoul reads it
    b"*\x00\x00\x00\x10GSSAPI",                           # a ,auth handshake hides argv
], ids=["argc", "huge-arg", "lax-digits", "gssapi"])
async def test_what_gatekeeper_cannot_read_is_refused_not_waved_through(payload: bytes) -> None:
    async with backend(echo) as be, gatekeeper(config(be.address, argv_policy=POLICY)) as gk:
        await _refused_unanswered(gk, payload)
        assert be.connections == 0


async def test_bytes_that_are_not_distcc_still_pass_with_the_policy_on() -> None:
    """Soundness costs nothing for other protocols: bytes distccd would never
    read as a request (not starting DIST) go through as before."""
    async with backend(echo) as be, gatekeeper(config(be.address, argv_policy=POLICY)) as gk:
        c = await gk.connect()
        await c.send_all(b"hello")
        await c.send_eof()
        with trio.fail_after(5):
            assert await receive_until_closed(c) == b"hello"
        await c.aclose()


# The state file: each poisoned form from issue 16, against a real gatekeeper
# process. It must start promptly, serve its first connection and keep running.

def _recent_peaks(number: str) -> str:
    return '{"format":1,"keys":{},"recent":[' + ",".join([number] * 9) + "]}"


def _poison(state: Path, kind: str) -> None:
    path = state / "footprints.json"
    if kind == "huge-ints":
        path.write_text(_recent_peaks("1" + "0" * 400))
    elif kind == "deep-nesting":
        path.write_text("[" * 100_000)
    elif kind == "symlink-to-dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "absurd-peaks":
        path.write_text(_recent_peaks("1" + "0" * 30))
    elif kind == "100-MB":
        with path.open("wb") as f:
            f.truncate(100 * 2**20)


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["huge-ints", "deep-nesting", "symlink-to-dev-zero", "fifo",
                                  "absurd-peaks", "100-MB"])
def test_a_poisoned_state_file_neither_crashes_nor_hangs_nor_holds(
        tmp_path: Path, kind: str) -> None:
    state = tmp_path / "state"
    state.mkdir()
    _poison(state, kind)
    with backend_process() as port, GatekeeperProcess(
            ["--listen", "127.0.0.1:0", "--backend", f"127.0.0.1:{port}", "--identify", "none",
             "--state-dir", str(state), "--min-free-mb", "0"], startup_timeout=10) as g:
        # Served at once: no crash at the first estimate, no job held by an
        # absurd learned peak.
        assert exchange(g.port, b"ping") == b"gnip"
        assert g.wait_until(lambda ls: any("outcome=ok" in x for x in ls), 10), g.log_text
        assert g.is_running()
        assert "Traceback" not in g.log_text
        assert re.search(r"ignoring learned footprints|dropped \d+ learned", g.log_text), \
            g.log_text


@contextlib.contextmanager
def backend_process() -> Iterator[int]:
    """A tiny backend in a thread: reads 4 bytes, answers them reversed."""
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn:
                data = b""
                while len(data) < 4 and (chunk := conn.recv(4 - len(data))):
                    data += chunk
                conn.sendall(data[::-1])
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        t.join(5)
        srv.close()


@needs_distcc
@pytest.mark.e2e
def test_an_output_name_cannot_forge_log_lines() -> None:
    forged = "x.o\ngatekeeper: INFO: end peer=10.9.9.9:1 outcome=ok forged=yes\x1b[2J"
    source = b"int f(void) { return 1; }\n"
    with DistccServer(jobs=2, hold_s=0) as d, GatekeeperProcess(
            ["--listen", "127.0.0.1:0", "--backend", d.address]) as g:
        exchange(g.port, _doti(["gcc", "-c", "x.c", "-o", forged], source))
        assert g.wait_until(lambda lines: any(END.search(x) for x in lines), 30), g.log_text
        ends = [x for x in g.log_lines if "end peer=" in x]
        assert len(ends) == 1, g.log_text
        assert "forged=yes" in ends[0] and "\\x0agatekeeper:" in ends[0], ends[0]
        assert "\x1b" not in g.log_text
        assert not any(x.startswith("gatekeeper: INFO: end peer=10.9.9.9") for x in g.log_lines)


@pytest.mark.e2e
def test_a_denied_flood_writes_a_bounded_log_with_a_count() -> None:
    with GatekeeperProcess(["--listen", "127.0.0.1:0", "--allow", "10.0.0.0/8",
                            "--backend", "127.0.0.1:9"]) as g:
        for _ in range(300):
            socket.create_connection(("127.0.0.1", g.port), timeout=5).close()
        # The budget's second passes; the next denied line reports the rest.
        # (Bounded: at most 50 probes, 0.1 s apart.)
        for _ in range(50):
            if g.wait_until(lambda ls: any("were not logged" in x for x in ls), 0.1):
                break
            socket.create_connection(("127.0.0.1", g.port), timeout=5).close()
        denied = [x for x in g.log_lines if "outcome=denied" in x]
        summary = [x for x in g.log_lines if "were not logged" in x]
        assert summary, g.log_text
        written = len(denied)
        unwritten = int(re.search(r"(\d+) denied connections were not logged",
                                  summary[0]).group(1))  # type: ignore[union-attr]
        assert written < 60, written  # not one line per connection
        assert written + unwritten >= 300  # nothing lost from the count
        assert "Traceback" not in g.log_text


async def _hold(stream: trio.SocketStream) -> None:
    """A backend that reads everything and answers only at EOF (or never)."""
    async for _ in stream:
        pass


@pytest.mark.parametrize("identify_policy", [None, POLICY])
async def test_a_dribbling_request_is_cut_and_frees_its_slot(
        autojump_clock: trio.testing.MockClock, identify_policy: ArgvPolicy | None) -> None:
    """Issue 16: a client sending its request 1 byte per 100 ms, or stopping
    mid-request, held a running slot with no timeout."""
    source = b"x" * 1000
    request = _doti(["gcc", "-c", "x.c", "-o", "x.o"], source)
    async with backend(_hold) as be, gatekeeper(
            config(be.address, max_jobs=1, argv_policy=identify_policy,
                   request_idle_timeout=30.0)) as gk:
        c = await gk.connect()
        await c.send_all(request[:-900])  # head, DOTI and 100 bytes of source
        begin = trio.current_time()
        with trio.fail_after(120):
            await gk.wait_for(lambda s: s.gate.snapshot().finished_total == 1)
        assert 30.0 <= trio.current_time() - begin <= 61.0
        assert gk.server.observatory.completed["idle-timeout"] == 1
        await c.aclose()
        # The slot is free: the next job runs.
        d = await gk.connect()
        await d.send_all(request)
        with trio.fail_after(5):
            await gk.wait_for(lambda s: s.gate.snapshot().running == 1)
        await d.aclose()


async def test_a_doti_token_sent_late_does_not_escape_the_request_deadline(
        autojump_clock: trio.testing.MockClock) -> None:
    """Found by review: a head whose DOTI token came in a later segment had no
    known length, so the job was never watched. Under the policy the head
    now ends at the DOTI token."""
    request = _doti(["gcc", "-c", "x.c", "-o", "x.o"], b"x" * 1000)
    head_end = request.index(b"DOTI")
    async with backend(_hold) as be, gatekeeper(
            config(be.address, max_jobs=1, argv_policy=POLICY,
                   request_idle_timeout=30.0)) as gk:
        c = await gk.connect()
        await c.send_all(request[:head_end])
        await trio.testing.wait_all_tasks_blocked()
        await c.send_all(request[head_end:-900])  # DOTI and 100 bytes, then silence
        with trio.fail_after(120):
            await gk.wait_for(lambda s: s.gate.snapshot().finished_total == 1)
        assert gk.server.observatory.completed["idle-timeout"] == 1
        await c.aclose()


async def test_a_request_dribbled_a_byte_at_a_time_is_cut(
        autojump_clock: trio.testing.MockClock) -> None:
    """Never idle for the whole timeout, but far too slow: cut by the overall
    request deadline (--request-idle-timeout + size / 64 KiB/s)."""
    request = _doti(["gcc", "-c", "x.c", "-o", "x.o"], b"x" * 1000)
    async with backend(_hold) as be, gatekeeper(
            config(be.address, max_jobs=1, request_idle_timeout=30.0)) as gk:
        c = await gk.connect()
        await c.send_all(request[:-900])
        begin = trio.current_time()
        with contextlib.suppress(trio.BrokenResourceError):
            for byte in request[-900:-1]:
                if gk.server.gate.snapshot().finished_total:
                    break
                await c.send_all(bytes([byte]))
                await trio.sleep(5)  # virtual: one byte every 5 s, never 30 s idle
        with trio.fail_after(120):
            await gk.wait_for(lambda s: s.gate.snapshot().finished_total == 1)
        assert trio.current_time() - begin <= 70.0
        assert gk.server.observatory.completed["idle-timeout"] == 1
        await c.aclose()


async def test_a_backend_slow_to_read_is_not_blamed_on_the_client(
        autojump_clock: trio.testing.MockClock) -> None:
    """distccd busy (its --jobs lower than ours): the client sent everything,
    the bytes wait on the backend. The request deadline must not cut that."""
    async def slow_reader(stream: trio.SocketStream) -> None:
        await trio.sleep(120)  # virtual: busy for two minutes, then reads
        await _hold(stream)

    request = _doti(["gcc", "-c", "x.c", "-o", "x.o"], b"x" * (16 * 2**20))
    async with backend(slow_reader) as be, gatekeeper(
            config(be.address, max_jobs=1, request_idle_timeout=30.0)) as gk:
        c = await gk.connect()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(c.send_all, request)
            with trio.fail_after(600):
                await gk.wait_for(lambda s: s.gate.snapshot().running == 1)
                await trio.sleep(300)  # virtual: well past the backend's two minutes
            assert gk.server.observatory.completed["idle-timeout"] == 0
            assert gk.server.gate.snapshot().running == 1
            nursery.cancel_scope.cancel()
        await c.aclose()


async def test_a_whole_request_waits_for_a_long_compile_uncut(
        autojump_clock: trio.testing.MockClock) -> None:
    """The deadline ends once the request is all in: a compile may take as
    long as it takes."""
    source = b"int x;\n"
    async with backend(_hold) as be, gatekeeper(
            config(be.address, max_jobs=1, argv_policy=POLICY,
                   request_idle_timeout=30.0)) as gk:
        c = await gk.connect()
        await c.send_all(_doti(["gcc", "-c", "x.c", "-o", "x.o"], source))
        await trio.sleep(600)  # virtual: ten minutes of "compiling"
        assert gk.server.gate.snapshot().running == 1
        assert gk.server.observatory.completed["idle-timeout"] == 0
        await c.aclose()


@needs_distcc
@pytest.mark.e2e
def test_after_every_attack_real_jobs_run_and_rss_and_fds_are_back() -> None:
    """The attacks above in one run against one real gatekeeper and distccd:
    legitimate compiles before and after succeed, nothing is left held, the
    fd count returns to its baseline and RSS stays within a few MiB."""
    source = b"int f(void) { return 1; }\n"
    good = _doti(["gcc", "-O2", "-c", "ok.c", "-o", "ok.o"], source)
    argv = ["gcc", *(f"-DN{i}" for i in range(4095))]
    attacks = [
        _doti(["gcc", "-wrapper", "/bin/sh,-c,id", "-c", "x.c", "-o", "x.o"], source),
        _doti(["gcc", "-c", "x.c", "-o", "x.o\ngatekeeper: INFO: forged"], source),
        b"DIST   +0x1ARGC00000001ARGV00000003gcc",
        b"*\x00\x00\x00\x10GSSAPI",
        encode_request_head(argv)[:49_000],        # never completes; the client leaves
        b"GET / HTTP/1.0\r\n\r\n",
    ]
    with DistccServer(jobs=2, hold_s=0) as d, GatekeeperProcess(
            ["--listen", "127.0.0.1:0", "--backend", d.address]) as g:
        proc = psutil.Process(g.pid)

        assert exchange(g.port, good).startswith(b"DONE")
        assert g.wait_until(lambda ls: ends_in(ls) == 1, 30)
        fds, rss = proc.num_fds(), proc.memory_info().rss
        for _round in range(20):
            for payload in attacks:
                with socket.create_connection(("127.0.0.1", g.port), timeout=10) as s:
                    s.sendall(payload)
        assert exchange(g.port, good).startswith(b"DONE")
        assert g.wait_until(lambda ls: sum(1 for x in ls if "outcome=ok" in x) == 2, 30)
        # (End lines of refused heads are rate-limited, so they cannot be
        # counted to know all 120 are done: the fd count returning is the sign.)
        # The relay keeps up to SPARE_PIPES empty pipes for the next jobs: a
        # bounded cache, not a leak.
        for _ in range(100):  # bounded: 10 s
            if proc.num_fds() <= fds + 2 * SPARE_PIPES:
                break
            time.sleep(0.1)
        assert proc.num_fds() <= fds + 2 * SPARE_PIPES
        grown = (proc.memory_info().rss - rss) / 2**20
        print(f"after {20 * len(attacks)} hostile connections: RSS {grown:+.1f} MiB, "
              f"fds {proc.num_fds() - fds:+d}")
        assert grown < 8
        assert g.is_running() and "Traceback" not in g.log_text
        assert sum(1 for x in g.log_lines if "outcome=ok" in x) == 2


def ends_in(lines: Sequence[str]) -> int:
    return sum(1 for x in lines if "end peer=" in x)
