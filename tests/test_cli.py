"""Command line contract: flags, addresses, exit codes and one-line errors."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatekeeper.cli import parse_config
from gatekeeper.net.addresses import TcpAddress, UnixAddress, parse_address
from gatekeeper.net.allow import DEFAULT_ALLOW, AllowList
from gatekeeper.usage import UsageError


@pytest.mark.parametrize(("text", "expected"), [
    ("3632", TcpAddress(None, 3632)),
    ("0", TcpAddress(None, 0)),
    ("127.0.0.1:3633", TcpAddress("127.0.0.1", 3633)),
    ("localhost:1", TcpAddress("localhost", 1)),
    ("[::1]:3632", TcpAddress("::1", 3632)),
    ("[fe80::1%eth0]:3632", TcpAddress("fe80::1%eth0", 3632)),
    ("unix:/run/gk.sock", UnixAddress("/run/gk.sock")),
])
def test_parse_address(text: str, expected: object) -> None:
    assert parse_address(text, bare_port_host=None) == expected


def test_bare_port_backend_means_loopback() -> None:
    assert parse_address("3633", bare_port_host="127.0.0.1") == TcpAddress("127.0.0.1", 3633)


@pytest.mark.parametrize("text", [
    "", "abc", "65536", "-1", "host:", ":80", "::1:80", "[::1]", "[::1]80", "[nothost]:1",
    "unix:", "1.2.3.4:http", "unix:/" + "x" * 200,
])
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_address(text, bare_port_host=None)
    assert "\n" not in str(info.value)


def test_defaults() -> None:
    cfg = parse_config([])
    assert cfg.listen == (TcpAddress(None, 3632),)
    assert cfg.backend == TcpAddress("127.0.0.1", 3633)
    assert cfg.max_jobs == (os.cpu_count() or 1)
    assert cfg.queue_timeout == 240.0
    assert cfg.max_queue == 1024
    assert cfg.min_free_bytes == 512 * 2**20
    assert cfg.allow == AllowList.parse(DEFAULT_ALLOW)


def test_flags_and_aliases() -> None:
    for flag in ("-j", "--jobs", "--max-jobs"):
        assert parse_config([flag, "7"]).max_jobs == 7
    cfg = parse_config(["--listen", "1", "--listen", "unix:/tmp/x", "--min-free-mb", "1.5",
                        "--queue-timeout", "0.5", "--max-queue", "0", "--allow", "10.0.0.0/8",
                        "--allow", "2001:db8::/32", "--keep-half-closed"])
    assert cfg.listen == (TcpAddress(None, 1), UnixAddress("/tmp/x"))
    assert cfg.min_free_bytes == int(1.5 * 2**20)
    assert cfg.queue_timeout == 0.5
    assert cfg.max_queue == 0
    assert cfg.keep_half_closed
    assert len(cfg.allow.networks) == 2


def test_argv_policy_flags() -> None:
    default = parse_config([])
    assert default.argv_policy is not None and default.identify
    assert default.argv_policy.check(["icx", "-c", "x.c"]) is not None
    assert default.request_idle_timeout == 30.0
    cfg = parse_config(["--allow-compiler", "icx", "--allow-compiler", "nvcc",
                        "--request-idle-timeout", "5"])
    assert cfg.argv_policy is not None
    assert cfg.argv_policy.check(["icx", "-c", "x.c"]) is None
    assert cfg.request_idle_timeout == 5.0
    assert parse_config(["--metrics-host", "b1.example", "--metrics-host", "b1"]).metrics_hosts \
        == ("b1.example", "b1")
    # Nothing is read with --identify none, so nothing can be checked: the README says so.
    assert parse_config(["--identify", "none"]).argv_policy is None


def test_min_free_above_memory_is_valid() -> None:
    assert parse_config(["--min-free-mb", "99999999"]).min_free_bytes > 0


@pytest.mark.parametrize("argv", [
    ["-j", "0"], ["-j", "x"], ["--jobs", "-3"], ["--min-free-mb", "-1"],
    ["--min-free-mb", "nan"], ["--queue-timeout", "0"], ["--queue-timeout", "inf"],
    ["--max-queue", "-1"], ["--listen", "nope"], ["--backend", "[::1]"],
    ["--backend", "0"], ["--allow", "10.0.0.1/8"], ["--allow", "banana"], ["--bogus"],
    ["--log-level", "loud"], ["--max"], ["--allow-compiler", "/usr/bin/icx"],
    ["--allow-compiler", ""], ["--identify", "none", "--allow-compiler", "icx"],
    ["--request-idle-timeout", "0"], ["--request-idle-timeout", "nan"], ["--clear-env"],
    ["--metrics-allow", "banana"], ["--agent-allow", "10.0.0.1/8"],
    ["--trusted-proxy", "haproxy"], ["--trusted-proxy", "10.0.0.1/8"],
    ["--queued-window", "-1"], ["--queued-window", "16385"],
])
def test_bad_flags_raise_usage_error(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        parse_config(argv)


def test_trusted_proxies() -> None:
    cfg = parse_config(["--trusted-proxy", "10.0.0.5", "--trusted-proxy", "fd00::/64"])
    assert cfg.trusted_proxies is not None
    assert cfg.trusted_proxies.permits("10.0.0.5") and cfg.trusted_proxies.permits("fd00::9")
    assert not cfg.trusted_proxies.permits("10.0.0.6")
    assert parse_config([]).trusted_proxies is None


@pytest.mark.parametrize("argv", [["--max-jobs", "0"], ["--listen", "[x]:1"], ["--what"],
                                  ["--trusted-proxy", "nope"]])
def test_bad_flags_exit_2_with_one_line(argv: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "gatekeeper", *argv], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("gatekeeper: ")
    assert "Traceback" not in proc.stderr


def test_port_in_use_is_a_one_line_startup_failure() -> None:
    import socket
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        proc = subprocess.run([sys.executable, "-m", "gatekeeper", "--listen", f"127.0.0.1:{port}"],
                              capture_output=True, text=True, timeout=30)
    finally:
        holder.close()
    assert proc.returncode == 1
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "in use" in proc.stderr


def test_sigterm_exits_zero() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "gatekeeper", "--listen", "127.0.0.1:0",
                             "--min-free-mb", "0"], stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    try:
        for line in proc.stderr:
            if "listening on" in line:
                break
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        rest = proc.stderr.read()
        assert "Traceback" not in rest
    finally:
        proc.kill()
        proc.wait()


@given(st.ip_addresses(), st.lists(st.ip_addresses(), max_size=4), st.integers(0, 128))
def test_allow_matches_ipaddress(addr: ipaddress.IPv4Address | ipaddress.IPv6Address,
                                 nets: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
                                 prefix: int) -> None:
    networks = [ipaddress.ip_network(f"{n}/{min(prefix, n.max_prefixlen)}", strict=False)
                for n in nets]
    allow = AllowList(tuple(networks))
    # The documented rule: an IPv4-mapped IPv6 peer is judged as the IPv4 address.
    judged = addr.ipv4_mapped if isinstance(addr, ipaddress.IPv6Address) else None
    expected = any((judged or addr) in n for n in networks)
    assert allow.permits(str(addr)) == expected


def test_allow_treats_v4_mapped_v6_as_v4() -> None:
    allow = AllowList.parse(["10.0.0.0/8"])
    assert allow.permits("::ffff:10.1.2.3")
    assert not allow.permits("::ffff:11.1.2.3")
    assert not allow.permits("not an address")


def test_memory_flags() -> None:
    cfg = parse_config(["--job-mem-mb", "100", "--state-dir", "/tmp/x", "--identify", "none",
                        "--cgroup", "/system.slice/distcc.service",
                        "--max-memory-pressure", "12.5"])
    assert cfg.job_mem_bytes == 100 * 2**20
    assert str(cfg.state_dir) == "/tmp/x"
    assert not cfg.identify
    assert cfg.cgroup == "/system.slice/distcc.service"
    assert cfg.max_memory_pressure == 12.5
    defaults = parse_config([])
    assert defaults.identify and defaults.state_dir is None and defaults.cgroup is None
    assert defaults.job_mem_bytes == 256 * 2**20


def test_pause_flags() -> None:
    """Pausing is on by default, its floor half of --min-free-mb; 0 turns it off."""
    assert parse_config([]).pause_below_bytes == 256 * 2**20
    assert parse_config(["--min-free-mb", "100"]).pause_below_bytes == 50 * 2**20
    cfg = parse_config(["--pause-below-mb", "64", "--max-pause", "30"])
    assert cfg.pause_below_bytes == 64 * 2**20 and cfg.max_pause == 30.0
    assert parse_config(["--pause-below-mb", "0"]).pause_below_bytes == 0
    assert parse_config([]).max_pause == 120.0


@pytest.mark.parametrize("argv", [
    ["--job-mem-mb", "-1"], ["--max-memory-pressure", "x"], ["--identify", "http"],
    ["--cgroup", "/no/such/cgroup-for-gatekeeper-tests"], ["--pause-below-mb", "-1"],
    ["--max-pause", "0"], ["--max-pause", "nan"],
])
def test_bad_memory_flags_exit_2(argv: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "gatekeeper", "--listen", "127.0.0.1:0", *argv],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("where", ["/proc/nonexistent/x", "/dev/null"])
def test_an_unusable_state_dir_is_a_one_line_error(where: str) -> None:
    """Found at start, not at the first save a run later (issue 21)."""
    proc = subprocess.run([sys.executable, "-m", "gatekeeper", "--state-dir", where,
                           "--listen", "127.0.0.1:0"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gatekeeper: --state-dir {where}: ")


def test_a_port_in_use_names_the_flag_and_address() -> None:
    import socket
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        proc = subprocess.run([sys.executable, "-m", "gatekeeper", "--listen", "127.0.0.1:0",
                               "--metrics", f"127.0.0.1:{port}"], capture_output=True,
                              text=True, timeout=30)
    finally:
        holder.close()
    assert proc.returncode != 0
    assert f"--metrics 127.0.0.1:{port}: Address already in use" in proc.stderr, proc.stderr


def test_inetd_io_reason_says_why() -> None:
    from gatekeeper.cli import inetd_io_reason
    from gatekeeper.config import InetdIo
    from gatekeeper.inetd.command import Command
    direct = inetd_io_reason(InetdIo.AUTO, Command(("distccd", "--inetd", "--allow",
                                                     "10.0.0.0/8"), "/usr/bin/distccd"))
    assert "direct" in direct and "--allow" in direct
    relayed = inetd_io_reason(InetdIo.AUTO, Command(("distccd", "--inetd"), "/usr/bin/distccd"))
    assert "relayed" in relayed
    asked = inetd_io_reason(InetdIo.DIRECT, Command(("distccd",), "/usr/bin/distccd"))
    assert asked == "--inetd-io direct: as asked"
