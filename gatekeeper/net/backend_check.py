"""Is anything listening at the backend? Asked once at start, without connecting.

A connect probe was tried and reverted: a single-threaded backend (distccd
--inetd behind a test's listener, a fake) counted it as a job and stalled. The
kernel's socket tables answer the same question for a backend on this host
and disturb nobody: /proc/net/tcp and tcp6 list every LISTEN socket of this
network namespace, and a unix backend is a socket file. A remote backend
cannot be known this way and is not checked.

`listeners` and `listening` (parsing) are pure; `warn_if_absent` is the thin shell that reads
the files, allows the backend a grace period (under systemd it is started
just before gatekeeper and binds a moment later) and says so once.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import stat
import sys
from collections.abc import Iterable

import trio

from gatekeeper.net.addresses import TcpAddress, UnixAddress

log = logging.getLogger("gatekeeper")

# How long a backend may take to appear before the warning: distccd (Type=simple,
# started just before gatekeeper) binds within milliseconds; 5 s is far above
# that and still at start, where an admin looks.
GRACE_S = 5.0
_LISTEN = "0A"  # TCP_LISTEN in the st column

Ip = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address(hex_addr: str, byteorder: str = sys.byteorder) -> Ip:
    """/proc/net/tcp's address: 32-bit words printed in host byte order. An
    IPv4-mapped IPv6 address (a v6 socket bound to ::ffff:127.0.0.1) is its IPv4
    address, so it compares with an IPv4 backend."""
    raw = bytes.fromhex(hex_addr)
    if byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw)
    v6 = ipaddress.IPv6Address(raw)
    return v6.ipv4_mapped or v6


def listeners(tables: Iterable[str]) -> set[tuple[Ip, int]]:
    """Every (address, port) in LISTEN state in the given /proc/net/tcp{,6} texts.
    Lines that do not parse are skipped (the file is the kernel's, but a parser
    that crashes on a surprise would take start-up down with it)."""
    out: set[tuple[Ip, int]] = set()
    for table in tables:
        for line in table.splitlines()[1:]:
            fields = line.split()
            if len(fields) < 4 or fields[3] != _LISTEN:
                continue
            host, _, port = fields[1].partition(":")
            try:
                out.add((_address(host), int(port, 16)))
            except ValueError:
                continue
    return out


def listening(backend: TcpAddress, table: set[tuple[Ip, int]]) -> bool | None:
    """Whether a LISTEN socket would take a connection to `backend`; None when
    the table cannot tell (a backend that is not on loopback)."""
    if backend.host is None:
        return None
    try:
        want = ipaddress.ip_address(backend.host)
    except ValueError:
        return None  # a name: not resolved at start
    if isinstance(want, ipaddress.IPv6Address) and want.ipv4_mapped is not None:
        want = want.ipv4_mapped
    if not want.is_loopback:
        return None
    # A wildcard of either family counts (0.0.0.0 for ::1, or a v6only [::] for
    # 127.0.0.1, would be wrong): the table has no v6only flag, and erring this
    # way only spares a warning, never causes a false one.
    return any(port == backend.port and (address.is_unspecified or address == want)
               for address, port in table)


def _read_tables() -> list[str]:
    texts = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                texts.append(f.read())
        except OSError:
            continue
    return texts


def present(backend: TcpAddress | UnixAddress) -> bool | None:
    """True or False where this host can tell, None where it cannot."""
    if isinstance(backend, UnixAddress):
        try:
            return stat.S_ISSOCK(os.stat(backend.path).st_mode)
        except OSError:
            return False
    return listening(backend, listeners(_read_tables()))


async def warn_if_absent(backend: TcpAddress | UnixAddress, grace: float = GRACE_S) -> None:
    """One warning if nothing listens at the backend `grace` seconds after start.

    Two synchronous reads (now, and after the grace if it was absent), not a
    poll: a busy box's tables are megabytes, and a read in a worker thread would
    hold a file open across the loop's checkpoints, where the fd accounting of
    the tests (and the accept budget) looks."""
    if present(backend) is not False:
        return
    await trio.sleep(grace)
    if present(backend) is False:
        log.warning("nothing listens at backend %s (checked for %gs after start): jobs "
                    "admitted now fail at once and their clients compile locally, until it "
                    "does", backend, grace)
