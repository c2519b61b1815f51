"""gatekeeper as a service process: sd_notify, signals, the open files limit, and the
command-line contract of the service options (--drain-timeout, -- COMMAND).

Each test runs `python -m gatekeeper` as a real subprocess over loopback. Waiting is
on events only: log lines (read by a thread, condition-variable wake-ups), notify
datagrams (blocking receives with a deadline), socket EOFs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from distcc_harness import NotifyReceiver, ServiceProcess, gatekeeper_env

from gatekeeper.cli import parse_options
from gatekeeper.distcc.request import encode_request_head
from gatekeeper.server import DEFAULT_DRAIN_TIMEOUT
from gatekeeper.usage import UsageError

# Real processes and sockets: each test here is bounded well below the suite-wide limit.
pytestmark = pytest.mark.timeout(60)

MiB = 2**20
_READY = re.compile(r"listening on 127\.0\.0\.1:(?P<port>\d+)")


@pytest.fixture
def notify() -> Iterator[NotifyReceiver]:
    receiver = NotifyReceiver()
    yield receiver
    receiver.close()


@dataclass
class HoldingBackend:
    """A loopback backend whose jobs read their request, wait for `release`, then send
    `reply` and close. Counts connections."""

    request_size: int
    reply: bytes
    release: threading.Event = field(default_factory=threading.Event)
    accepted: int = 0
    requests: list[bytes] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.cond:
                self.accepted += 1
                self.cond.notify_all()
            threading.Thread(target=self._job, args=(conn,), daemon=True).start()

    def _job(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while len(data) < self.request_size:
                chunk = conn.recv(MiB)
                if not chunk:
                    return
                data += chunk
            with self.cond:
                self.requests.append(data)
                self.cond.notify_all()
            if self.release.wait(30):
                with contextlib.suppress(OSError):  # cut off by a drain timeout: reset
                    conn.sendall(self.reply)

    def wait_requests(self, n: int, timeout: float = 10.0) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.requests) >= n, timeout), self.requests

    def close(self) -> None:
        self.release.set()
        self.sock.close()


@contextlib.contextmanager
def holding_backend(request_size: int, reply: bytes) -> Iterator[HoldingBackend]:
    be = HoldingBackend(request_size, reply)
    try:
        yield be
    finally:
        be.close()


def start_gatekeeper(args: list[str], **env: str) -> ServiceProcess:
    argv = [sys.executable, "-m", "gatekeeper", "--listen", "127.0.0.1:0", "--min-free-mb", "0",
            *args]
    return ServiceProcess(argv, env=gatekeeper_env(env))


def receive_to_eof(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    while chunk := sock.recv(MiB):
        chunks.append(chunk)
    return b"".join(chunks)


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True if the peer closed (FIN or RST) without sending anything."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_sigterm_with_one_running_and_three_queued(notify: NotifyReceiver) -> None:
    # Opaque bytes (a first byte distccd would never read as DIST, so the argv
    # policy passes them), then queued distcc heads the policy lets queue.
    request, reply = b"\0" + os.urandom(2 * MiB - 1), os.urandom(8 * MiB)
    with holding_backend(len(request), reply) as be, start_gatekeeper(
            ["--backend", f"127.0.0.1:{be.port}", "--max-jobs", "1", "--drain-timeout", "30"],
            NOTIFY_SOCKET=notify.address) as gk:
        port = int(gk.wait_for(_READY)["port"])
        notify.wait_for(lambda m: m.fields.get("READY") == "1")
        running = socket.create_connection(("127.0.0.1", port))
        running.sendall(request)
        be.wait_requests(1)
        queued = []
        for _ in range(3):
            q = socket.create_connection(("127.0.0.1", port))
            q.sendall(encode_request_head(["gcc", "-c", "x.c", "-o", "x.o"])
                      + b"DOTI00000000")
            queued.append(q)
        notify.wait_for(lambda m: "1/1 running, 3 queued" in m.fields.get("STATUS", ""))

        signalled = time.monotonic()
        gk.send_signal(signal.SIGTERM)
        for q in queued:
            assert closed_by_peer(q, timeout=5)
            q.close()
        closed_after = time.monotonic() - signalled
        notify.wait_for(lambda m: m.fields.get("STOPPING") == "1")
        assert gk.poll() is None, "exited while a job was still running"

        be.release.set()
        received = receive_to_eof(running, timeout=10)
        running.close()
        code = gk.wait(10)
        log = gk.log_text
    print(f"queued clients closed {closed_after * 1000:.0f} ms after SIGTERM")
    assert closed_after < 1.0, log
    assert hashlib.sha256(received).digest() == hashlib.sha256(reply).digest(), log
    assert be.requests == [request]
    assert be.accepted == 1, log  # the queued ones never reached the backend
    assert code == 0, log
    assert log.count("outcome=draining") == 3, log
    assert log.count("outcome=ok") == 1, log
    assert "Traceback" not in log


def test_notify_ready_status_watchdog_stopping(notify: NotifyReceiver) -> None:
    with holding_backend(5, b"done") as be, start_gatekeeper(
            ["--backend", f"127.0.0.1:{be.port}", "--max-jobs", "2"],
            NOTIFY_SOCKET=notify.address, WATCHDOG_USEC="200000") as gk:
        gk.wait_for(_READY)
        ready = notify.wait_for(lambda m: "READY" in m.fields)
        assert ready.pid == gk.pid  # sent by the main process: NotifyAccess=main accepts it
        assert re.fullmatch(r"0/2 running, 0 queued, [\d.]+ GiB available",
                            ready.fields["STATUS"]), ready
        port = int(gk.wait_for(_READY)["port"])
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(b"hello")
        notify.wait_for(lambda m: m.fields.get("STATUS", "").startswith("1/2 running, 0 queued"))
        # WATCHDOG_USEC=0.2 s: a ping every 0.1 s from the event loop.
        for _ in range(3):
            notify.wait_for(lambda m: m.fields.get("WATCHDOG") == "1", timeout=2)
        gk.send_signal(signal.SIGTERM)
        stopping = notify.wait_for(lambda m: m.fields.get("STOPPING") == "1")
        assert stopping.fields["STATUS"] == "stopping: closing 0 queued, waiting for 1 running"
        be.release.set()
        assert receive_to_eof(client, timeout=10) == b"done"
        client.close()  # the job ends when both directions have
        notify.wait_for(lambda m: m.fields.get("STATUS", "").startswith("stopping: 0 running"))
        assert gk.wait(10) == 0
        assert "Traceback" not in gk.log_text
    assert all(m.pid == gk.pid for m in notify.seen)


def test_sighup_is_logged_as_unsupported_and_changes_nothing() -> None:
    with holding_backend(1, b"ok") as be, start_gatekeeper(
            ["--backend", f"127.0.0.1:{be.port}"]) as gk:
        port = int(gk.wait_for(_READY)["port"])
        gk.send_signal(signal.SIGHUP)
        gk.wait_for(re.compile(r"SIGHUP: reloading is not supported"))
        be.release.set()
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(b"x")
            assert receive_to_eof(client, timeout=10) == b"ok"
        assert gk.poll() is None
        gk.send_signal(signal.SIGTERM)
        assert gk.wait(10) == 0


def test_every_signal_a_person_may_send_is_logged_and_none_kills_silently(
        tmp_path: Path) -> None:
    """Issue 16: SIGUSR1, SIGUSR2 and SIGALRM killed gatekeeper with no log line."""
    state = tmp_path / "state"
    with holding_backend(1, b"ok") as be, start_gatekeeper(
            ["--backend", f"127.0.0.1:{be.port}", "--state-dir", str(state)]) as gk:
        port = int(gk.wait_for(_READY)["port"])
        gk.send_signal(signal.SIGUSR1)
        gk.wait_for(re.compile(r"got SIGUSR1: \d+/\d+ running, \d+ queued.*connections open"))
        gk.send_signal(signal.SIGALRM)
        gk.wait_for(re.compile(r"got SIGALRM: ignored"))
        be.release.set()
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(b"x")
            assert receive_to_eof(client, timeout=10) == b"ok"
        gk.send_signal(signal.SIGUSR2)
        gk.wait_for(re.compile(r"got SIGUSR2: saving learned footprints"))
        assert gk.poll() is None
        gk.send_signal(signal.SIGQUIT)  # stops like SIGTERM: drained, exit 0
        assert gk.wait(10) == 0
        assert "got SIGQUIT, stopping" in gk.log_text
        assert "Traceback" not in gk.log_text


def test_drain_timeout_cuts_off_a_job_that_does_not_finish() -> None:
    with holding_backend(1, b"never") as be, start_gatekeeper(
            ["--backend", f"127.0.0.1:{be.port}", "--drain-timeout", "0.5"]) as gk:
        port = int(gk.wait_for(_READY)["port"])
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(b"x")
            be.wait_requests(1)
            signalled = time.monotonic()
            gk.send_signal(signal.SIGTERM)
            assert gk.wait(10) == 0
            took = time.monotonic() - signalled
            with contextlib.suppress(ConnectionResetError):
                assert receive_to_eof(client, timeout=5) == b""
        assert 0.5 <= took < 5, took
        assert "drain timeout" in gk.log_text


def test_open_files_soft_limit_is_raised_to_hard() -> None:
    argv = ["sh", "-c", 'ulimit -S -n 100 && ulimit -H -n 300 && exec "$@"', "sh", sys.executable,
            "-m", "gatekeeper", "--listen", "127.0.0.1:0", "--min-free-mb", "0"]
    with ServiceProcess(argv, env=gatekeeper_env()) as gk:
        gk.wait_for(_READY)
        limits = Path(f"/proc/{gk.pid}/limits").read_text()
        match = re.search(r"Max open files\s+(\d+)\s+(\d+)", limits)
        assert match is not None, limits
        assert match.groups() == ("300", "300")
        # 300 cannot hold --max-queue 1024: said once, at start.
        assert "open files limit 300 is below" in gk.log_text
        gk.send_signal(signal.SIGTERM)
        assert gk.wait(10) == 0


# -- the command line of the service options ---------------------------------------------


def test_drain_timeout_and_command_parse() -> None:
    assert parse_options([]).drain_timeout == DEFAULT_DRAIN_TIMEOUT
    assert parse_options(["--drain-timeout", "0"]).drain_timeout == 0
    options = parse_options(["-j", "3", "--", "cat", "--", "-u"])
    assert options.command is not None
    assert options.command.argv == ("cat", "--", "-u")  # only the first -- splits
    assert options.config.max_jobs == 3
    assert parse_options(["--backend", "1234"]).command is None
    assert not parse_options([]).listen_given
    assert parse_options(["--listen", "1"]).listen_given


@pytest.mark.parametrize("argv", [
    ["--drain-timeout", "-1"], ["--drain-timeout", "x"], ["--"], ["--", "gk-no-such-program"],
    ["--backend", "127.0.0.1:3633", "--", "cat"],
])
def test_bad_service_options(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        parse_options(argv)


@pytest.mark.parametrize(("argv", "says"), [
    (["--backend", "1", "--", "cat"], "mutually exclusive"),
    (["--", "/nonexistent/distccd", "--inetd"], "no such executable"),
    (["--drain-timeout", "soon"], "not a number"),
])
def test_bad_service_options_exit_2_with_one_line(argv: list[str], says: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "gatekeeper", *argv], capture_output=True,
                          text=True, timeout=30, env=gatekeeper_env())
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("gatekeeper: ") and says in proc.stderr
