"""The start-up check for an absent backend (issue 21): the kernel's own LISTEN table,
read without connecting, and the one warning a gatekeeper in front of nothing gives."""

from __future__ import annotations

import ipaddress
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.testing

from gatekeeper.net import backend_check
from gatekeeper.net.addresses import TcpAddress, UnixAddress
from gatekeeper.net.backend_check import listeners, listening, present

# The kernel's own format (one IPv4 listener on 127.0.0.1:3633, one established
# connection, one IPv6 wildcard listener on 3632), as /proc/net/tcp{,6} print it.
TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:0E31 00000000:0000 0A 00000000:00000000 00:00000000 00000000   110        0 1 1
   1: 0100007F:0E30 0100007F:D2A4 01 00000000:00000000 00:00000000 00000000     0        0 2 1
"""
TCP6 = """\
  sl  local_address                         remote_address                        st
   0: 00000000000000000000000000000000:0E30 00000000000000000000000000000000:0000 0A 0 0
   1: garbage
"""


def test_the_kernel_table_is_read_as_it_is_written() -> None:
    table = listeners([TCP, TCP6])
    assert table == {(ipaddress.ip_address("127.0.0.1"), 3633),
                     (ipaddress.ip_address("::"), 3632)}
    assert listening(TcpAddress("127.0.0.1", 3633), table) is True
    assert listening(TcpAddress("127.0.0.2", 3633), table) is False  # bound to .1 only
    assert listening(TcpAddress("127.0.0.1", 3634), table) is False
    assert listening(TcpAddress("::1", 3632), table) is True  # the wildcard takes it
    assert listening(TcpAddress("127.0.0.1", 3632), table) is True
    # A v6 socket bound to the IPv4-mapped loopback serves an IPv4 backend.
    mapped = listeners([TCP6.replace("00000000000000000000000000000000:0E30",
                                     "0000000000000000FFFF00000100007F:0E32")])
    assert listening(TcpAddress("127.0.0.1", 3634), mapped) is True
    # Where the table cannot tell: a remote backend, a name.
    assert listening(TcpAddress("10.1.2.3", 3633), table) is None
    assert listening(TcpAddress("buildbox", 3633), table) is None


def test_big_endian_hosts_print_the_address_as_it_is() -> None:
    assert backend_check._address("7F000001", "big") == ipaddress.ip_address("127.0.0.1")
    assert backend_check._address("0100007F", "little") == ipaddress.ip_address("127.0.0.1")


def test_real_sockets_are_seen_and_a_closed_port_is_not() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert present(TcpAddress("127.0.0.1", port)) is False  # bound, not listening
        s.listen()
        assert present(TcpAddress("127.0.0.1", port)) is True
    assert present(TcpAddress("127.0.0.1", port)) is False


def test_a_unix_backend_is_a_socket_file(tmp_path: Path) -> None:
    path = tmp_path / "backend.sock"
    assert present(UnixAddress(str(path))) is False
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        s.listen()
        assert present(UnixAddress(str(path))) is True
    (tmp_path / "file").write_text("")
    assert present(UnixAddress(str(tmp_path / "file"))) is False


async def test_warned_once_after_the_grace_and_not_when_it_appears(
        autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        start = trio.current_time()
        await backend_check.warn_if_absent(TcpAddress("127.0.0.1", port), grace=5.0)
        assert trio.current_time() - start >= 5.0
        warnings = [r for r in caplog.records if "nothing listens at backend" in r.message]
        assert len(warnings) == 1 and f"127.0.0.1:{port}" in warnings[0].message
        caplog.clear()
        s.listen()
        await backend_check.warn_if_absent(TcpAddress("127.0.0.1", port), grace=5.0)
        assert not caplog.records


def test_gatekeeper_in_front_of_nothing_says_so_once() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # a port no one listens on (held, so no one will)
        port = s.getsockname()[1]
        proc = subprocess.Popen(
            [sys.executable, "-m", "gatekeeper", "--listen", "127.0.0.1:0", "--backend",
             f"127.0.0.1:{port}", "--min-free-mb", "0"], stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        try:
            seen: list[str] = []
            for line in proc.stderr:  # ends at EOF if it exits instead
                seen.append(line)
                if "nothing listens at backend" in line or len(seen) > 50:
                    break
            assert seen and f"WARNING: nothing listens at backend 127.0.0.1:{port}" in seen[-1], \
                seen
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
            assert "nothing listens" not in proc.stderr.read()  # once
        finally:
            proc.kill()
            proc.wait()
