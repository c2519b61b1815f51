"""Socket activation and sd_notify, in-process: fake environments, real sockets.

The passed fds are real sockets dup'd onto a block of high fd numbers (a test
process cannot own fd 3); `inherited_sockets(start=...)` reads them from there.
The same code under the real systemd-socket-activate is in test_systemd.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from fakes import backend, config, echo, receive_all

from gatekeeper.admission import Admission, Hold, Limits
from gatekeeper.gate import Gate
from gatekeeper.memory.sources import FixedMemory
from gatekeeper.net.addresses import TcpAddress, UnixAddress, parse_address
from gatekeeper.server import Server
from gatekeeper.service.activation import (
    ActivationError,
    Inherited,
    Notifier,
    adopt,
    check_socket,
    describe,
    inherited_sockets,
    listen_mismatch,
    report_status,
    status_text,
    watchdog_interval,
)

# Real processes and sockets: each test here is bounded well below the suite-wide limit.
pytestmark = pytest.mark.timeout(60)

FD_BASE = 700  # far above anything pytest or trio opens


@contextlib.contextmanager
def passed(*socks: socket.socket) -> Iterator[int]:
    """Put `socks` on consecutive fds from FD_BASE, as a service manager would from 3."""
    fds = []
    try:
        for i, s in enumerate(socks):
            os.dup2(s.fileno(), FD_BASE + i, inheritable=True)
            fds.append(FD_BASE + i)
        yield FD_BASE
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def tcp_listener(host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.bind((host, 0))
    s.listen()
    return s


def env_for(count: int, names: str | None = None, pid: int | None = None) -> dict[str, str]:
    env = {"LISTEN_PID": str(os.getpid() if pid is None else pid), "LISTEN_FDS": str(count),
           "OTHER": "kept"}
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    return env


def test_inherited_reads_names_sets_cloexec_and_unsets() -> None:
    a, b = tcp_listener(), tcp_listener()
    with passed(a, b) as start:
        env = env_for(2, "distcc:other")
        found = inherited_sockets(env, start=start)
        assert found == [Inherited(start, "distcc"), Inherited(start + 1, "other")]
        assert env == {"OTHER": "kept"}  # unset, so inetd children never see them
        assert not os.get_inheritable(start)
    a.close()
    b.close()


def test_names_default_to_unknown() -> None:
    a = tcp_listener()
    with passed(a) as start:
        assert inherited_sockets(env_for(1), start=start) == [Inherited(start, "unknown")]
    a.close()


@pytest.mark.parametrize("env", [
    {},                                                  # not activated
    {"LISTEN_FDS": "1"},                                 # no LISTEN_PID: not for us
    {"LISTEN_PID": "1", "LISTEN_FDS": "1"},              # another process's
    {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"},
])
def test_nothing_for_us(env: dict[str, str]) -> None:
    assert inherited_sockets(dict(env), start=FD_BASE) == []


@pytest.mark.parametrize(("env", "message"), [
    ({"LISTEN_PID": "me", "LISTEN_FDS": "1"}, "LISTEN_PID"),
    ({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "x"}, "LISTEN_FDS"),
    ({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "-1"}, "negative"),
    ({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "a:b"}, "2 names"),
    ({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"}, "not open"),  # nothing at FD_BASE
])
def test_malformed_environment_is_one_line(env: dict[str, str], message: str) -> None:
    with pytest.raises(ActivationError) as info:
        inherited_sockets(env, start=FD_BASE)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def _check(sock: socket.socket | int) -> socket.socket:
    fd = sock if isinstance(sock, int) else sock.fileno()
    return check_socket(Inherited(fd, "test"))


@pytest.mark.parametrize(("make", "message"), [
    (lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM), "not a stream socket"),
    (lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM), "not listening"),
    (lambda: socket.socketpair()[0], "not listening"),
])
def test_check_refuses_what_cannot_serve(make: object, message: str) -> None:
    sock = make()  # type: ignore[operator]
    with pytest.raises(ActivationError) as info:
        _check(sock)
    assert message in str(info.value)
    sock.fileno()  # still open: a refused fd is not ours to close
    sock.close()


def test_check_refuses_a_pipe(tmp_path: Path) -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(ActivationError, match="not a socket"):
            _check(r)
    finally:
        os.close(r)
        os.close(w)


async def test_adopted_tcp_and_unix_listeners_serve(tmp_path: Path) -> None:
    tcp = tcp_listener()
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = str(tmp_path / "gk.sock")
    unix.bind(path)
    unix.listen()
    checked = [_check(tcp), _check(unix)]
    assert describe(checked[0]) == f"127.0.0.1:{tcp.getsockname()[1]}"
    assert describe(checked[1]) == f"unix:{path}"
    listeners = adopt(checked)
    async with backend(echo) as be:
        server = Server(config(be.address), FixedMemory(2**40), drain_timeout=1.0)
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(server.run, listeners)
            assert addresses == [describe(checked[0]), f"unix:{path}"]
            for stream in (await trio.open_tcp_stream("127.0.0.1", tcp.getsockname()[1]),
                           await trio.open_unix_socket(path)):
                await stream.send_all(b"hello")
                await stream.send_eof()
                assert await receive_all(stream) == b"hello"
                await stream.aclose()
            server.stop()


async def test_adopted_ipv6_listener_serves() -> None:
    try:
        six = tcp_listener("::1")
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    checked = _check(six)
    port = six.getsockname()[1]
    assert describe(checked) == f"[::1]:{port}"
    assert listen_mismatch([parse_address(f"[::1]:{port}", bare_port_host=None)],
                           [checked]) is None
    async with backend(echo) as be:
        server = Server(config(be.address), FixedMemory(2**40), drain_timeout=1.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run, adopt([checked]))
            stream = await trio.open_tcp_stream("::1", port)
            await stream.send_all(b"six")
            await stream.send_eof()
            assert await receive_all(stream) == b"six"
            await stream.aclose()
            server.stop()


def _bound(*addrs: str) -> list[socket.socket]:
    out = []
    for a in addrs:
        host, _, port = a.rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, int(port)))
        out.append(s)
    return out


def test_listen_must_name_the_activated_sockets(tmp_path: Path) -> None:
    v4, = _bound("127.0.0.1:0")
    port = v4.getsockname()[1]
    try:
        same = [parse_address(f"127.0.0.1:{port}", bare_port_host=None)]
        assert listen_mismatch(same, [v4]) is None
        assert listen_mismatch([TcpAddress("localhost", port)], [v4]) is None
        other = [parse_address(f"127.0.0.1:{port + 1}", bare_port_host=None)]
        text = listen_mismatch(other, [v4])
        assert text is not None and "\n" not in text
        assert f"--listen 127.0.0.1:{port + 1} is not among them" in text
        assert "drop --listen" in text
        # A bare port means every interface: 127.0.0.1 is not that.
        assert listen_mismatch([TcpAddress(None, port)], [v4]) is not None
    finally:
        v4.close()
    wild = socket.socket()
    wild.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    wild.bind(("0.0.0.0", 0))
    try:
        assert listen_mismatch([TcpAddress(None, wild.getsockname()[1])], [wild]) is None
        # An activated socket the command line does not name is a mismatch too.
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix.bind(str(tmp_path / "a.sock"))
        text = listen_mismatch([TcpAddress(None, wild.getsockname()[1])], [wild, unix])
        assert text is not None and "not named by --listen" in text
        assert listen_mismatch([TcpAddress(None, wild.getsockname()[1]),
                                UnixAddress(str(tmp_path / "a.sock"))], [wild, unix]) is None
        unix.close()
    finally:
        wild.close()


# -- sd_notify -------------------------------------------------------------------------


@contextlib.contextmanager
def notify_socket(abstract: bool, tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"gk-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        address = "@" + name
    else:
        address = str(tmp_path / "notify")
        sock.bind(address)
    sock.settimeout(5)
    try:
        yield address, sock
    finally:
        sock.close()


@pytest.mark.parametrize("abstract", [True, False])
def test_notifier_sends_one_datagram(abstract: bool, tmp_path: Path) -> None:
    with notify_socket(abstract, tmp_path) as (address, sock):
        env = {"NOTIFY_SOCKET": address}
        notifier = Notifier.from_environ(env)
        assert env == {}  # children must not report in our name
        assert notifier.send("READY=1", "STATUS=one\ntwo")
        assert sock.recv(4096) == b"READY=1\nSTATUS=one two"
        notifier.close()


def test_notifier_never_blocks_and_never_raises(tmp_path: Path) -> None:
    with notify_socket(True, tmp_path) as (address, _unread):
        notifier = Notifier(address)
        # Nobody reads: the receive queue fills (net.unix.max_dgram_qlen, 10 by
        # default), then sends fail at once with EAGAIN instead of blocking.
        results = [notifier.send(f"STATUS={i}") for i in range(200)]
        assert results[0] is True
        assert False in results
    assert Notifier(address).send("READY=1") is False  # receiver gone: dropped
    assert Notifier(None).send("READY=1") is False
    assert not Notifier("vsock:2:1234").enabled


def test_watchdog_interval() -> None:
    assert watchdog_interval({}) is None
    env = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(env) == 15.0
    assert env == {}
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "2000000"}) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}) is None


def test_status_text() -> None:
    admission = Admission(Limits(max_jobs=4, min_free=2**30, max_queue=10, queue_timeout=10))
    snap = admission.statistics()
    text = status_text(snap, int(3.1 * 2**30))
    assert text == "0/4 running, 0 queued, 3.1 GiB available"
    assert status_text(snap, None, stopping=True).startswith("stopping: 0 running")
    held = dataclasses.replace(snap, running=1, queued=2, hold=Hold.MEMORY)
    assert status_text(held, 2**29) == ("1/4 running, 2 queued, 0.5 GiB available, "
                                        "holding for memory (min free 1.0 GiB)")


async def test_report_status_follows_the_gate(tmp_path: Path) -> None:
    memory = FixedMemory(8 * 2**30)
    gate = Gate(Admission(Limits(max_jobs=1, min_free=0, max_queue=10, queue_timeout=60)),
                memory)
    with notify_socket(True, tmp_path) as (address, sock):
        notifier = Notifier(address)
        sock.setblocking(False)
        trio_sock = trio.socket.from_stdlib_socket(sock)

        async def next_status() -> str:
            with trio.fail_after(5):
                return (await trio_sock.recv(4096)).decode()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(gate.run)
            nursery.start_soon(report_status, notifier, gate)
            assert await next_status() == "STATUS=0/1 running, 0 queued, 8.0 GiB available"
            async with gate.ticket() as first, gate.ticket() as second:
                assert first.admitted and not second.admitted
                assert await next_status() == "STATUS=1/1 running, 1 queued, 8.0 GiB available"
            assert await next_status() == "STATUS=0/1 running, 0 queued, 8.0 GiB available"
            nursery.cancel_scope.cancel()
