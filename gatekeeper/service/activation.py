"""Running under a service manager: activated sockets in, readiness and status out.

Socket activation (sd_listen_fds(3)): systemd, ``systemd-socket-activate`` and
friends bind the listening sockets themselves and start us with them already
open as fds 3, 4, ... and three variables: ``LISTEN_PID`` (who they are for:
a child inheriting the variables must not take them), ``LISTEN_FDS`` (how
many) and ``LISTEN_FDNAMES`` (colon-separated names, ``FileDescriptorName=``).
`inherited_sockets` reads and then unsets them, so an inetd-mode child never
sees them; `check_socket` makes sure each fd really is a listening stream
socket of a family gatekeeper can serve (IPv4, IPv6, unix) before `adopt` turns
it into a trio listener, in the spirit of s6-tcpserverd's "takes an
already-bound socket and checks that it is one".

Notification (sd_notify(3)) is one datagram of ``KEY=VALUE`` lines to the
AF_UNIX socket named by ``NOTIFY_SOCKET`` (a leading ``@`` means Linux's
abstract namespace). It is sent with the standard library only and never
blocks: if the manager is slow or gone, a message is dropped and logged, and
the service goes on serving -- readiness reporting must not be able to stall
admission. ``NOTIFY_SOCKET`` and the ``WATCHDOG_*`` variables are unset too,
so children cannot report in our name.

What is sent: ``READY=1`` once every listener is open (cli), a ``STATUS=``
line whenever the admission picture changes (`report_status`, coalesced to at
most one message per `STATUS_MIN_INTERVAL`), ``STOPPING=1`` when a graceful
stop begins, and ``WATCHDOG=1`` every half ``WATCHDOG_USEC`` from a trio task,
so a wedged event loop stops the pings and systemd restarts us.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import logging
import os
import socket
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass

import trio

from gatekeeper.admission import Hold, Snapshot
from gatekeeper.gate import Gate
from gatekeeper.net.addresses import Address, TcpAddress, UnixAddress
from gatekeeper.observe.units import format_bytes

log = logging.getLogger("gatekeeper")

# sd_listen_fds(3): passed fds always start right after stdin, stdout, stderr.
SD_LISTEN_FDS_START = 3

_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")

# The families a listener may have: what describe_peer and the allow list
# understand. Anything else (AF_VSOCK, AF_NETLINK...) is refused at start.
_FAMILIES = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6", socket.AF_UNIX: "unix"}

# At most one STATUS= message this often. A busy box changes its picture on
# every connection; systemd keeps only the last STATUS= anyway, and a human
# reading `systemctl status` needs nothing faster than a few per second.
STATUS_MIN_INTERVAL = 0.25


class ActivationError(Exception):
    """The service manager handed us something unusable: one line, exit 1."""


@dataclass(frozen=True, slots=True)
class Inherited:
    """One fd passed by the service manager, not yet checked."""

    fd: int
    name: str


def inherited_sockets(environ: MutableMapping[str, str] | None = None, *,
                      pid: int | None = None, unset: bool = True,
                      start: int = SD_LISTEN_FDS_START) -> list[Inherited]:
    """The fds passed to this process by socket activation ([] when none were).

    Follows sd_listen_fds(3): without ``LISTEN_PID``, or with another
    process's pid, nothing was meant for us. The variables are removed when
    `unset` (always, in production), and every passed fd is made close-on-exec
    so inetd-mode children do not inherit listeners. `start` exists for tests
    only, which cannot own fd 3.
    """
    env = os.environ if environ is None else environ
    pid_text = env.get("LISTEN_PID")
    fds_text = env.get("LISTEN_FDS")
    names_text = env.get("LISTEN_FDNAMES")
    if unset:
        for name in _LISTEN_VARS:
            env.pop(name, None)
    if fds_text is None or pid_text is None:
        return []
    try:
        listen_pid = int(pid_text)
    except ValueError:
        raise ActivationError(f"LISTEN_PID={pid_text!r} is not a process id") from None
    if listen_pid != (os.getpid() if pid is None else pid):
        log.debug("LISTEN_PID=%d is not us: ignoring LISTEN_FDS", listen_pid)
        return []
    try:
        count = int(fds_text)
    except ValueError:
        raise ActivationError(f"LISTEN_FDS={fds_text!r} is not a number") from None
    if count < 0:
        raise ActivationError(f"LISTEN_FDS={fds_text!r} is negative")
    if names_text is None:
        names = ["unknown"] * count  # what sd_listen_fds_with_names reports
    else:
        names = names_text.split(":")
        if len(names) != count:
            raise ActivationError(
                f"LISTEN_FDNAMES has {len(names)} names for LISTEN_FDS={count} sockets")
    found: list[Inherited] = []
    for fd, name in zip(range(start, start + count), names, strict=True):
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        except OSError as e:
            raise ActivationError(f"passed fd {fd} ({name}) is not open: {e.strerror}") from None
        found.append(Inherited(fd, name))
    return found


def check_socket(item: Inherited) -> socket.socket:
    """The passed fd as a socket object, once it is known to be a listening stream
    socket of a family we serve. Raises ActivationError (one line) otherwise."""
    what = f"passed fd {item.fd} ({item.name})"
    try:
        sock = socket.socket(fileno=item.fd)
    except OSError as e:
        if e.errno == errno.ENOTSOCK:
            raise ActivationError(f"{what} is not a socket") from None
        raise ActivationError(f"{what}: {e.strerror or e}") from None
    try:
        if sock.family not in _FAMILIES:
            raise ActivationError(f"{what} has address family {sock.family!r}; "
                                  f"gatekeeper serves IPv4, IPv6 and unix sockets")
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) != socket.SOCK_STREAM:
            raise ActivationError(f"{what} is not a stream socket (use ListenStream=, "
                                  f"not ListenDatagram= or ListenSequentialPacket=)")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ActivationError(f"{what} is not listening (Accept=yes units pass connections: "
                                  f"gatekeeper needs Accept=no)")
    except BaseException:
        sock.detach()  # not ours to close: the manager passed it and will clean up
        raise
    return sock


def adopt(sockets: Sequence[socket.socket]) -> list[trio.SocketListener]:
    """Checked stdlib sockets as trio listeners (trio makes them non-blocking)."""
    return [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in sockets]


def describe(sock: socket.socket) -> str:
    """An adopted socket's address as users write it."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        text = name.decode(errors="replace") if isinstance(name, bytes) else name
        return f"unix:{'@' + text[1:] if text.startswith(chr(0)) else text}"
    return str(TcpAddress(name[0], name[1]))


def _wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::")


def _same_host(wanted: str, actual: str) -> bool:
    try:
        return ipaddress.ip_address(wanted.partition("%")[0]) == \
            ipaddress.ip_address(actual.partition("%")[0])
    except ValueError:
        pass
    # A name (localhost): the socket matches if the name resolves to its address.
    try:
        infos = socket.getaddrinfo(wanted, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    return any(_same_host(str(info[4][0]), actual) for info in infos)


def matches(address: Address, sock: socket.socket) -> bool:
    """Whether `--listen address` names this (already bound) socket."""
    name = sock.getsockname()
    if isinstance(address, UnixAddress):
        if sock.family != socket.AF_UNIX or not name:
            return False
        path = name.decode(errors="replace") if isinstance(name, bytes) else name
        return os.path.abspath(address.path) == os.path.abspath(path)
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or name[1] != address.port:
        return False
    host = str(name[0])
    if address.host is None:
        return _wildcard(host)
    return _same_host(address.host, host)


def listen_mismatch(addresses: Sequence[Address], sockets: Sequence[socket.socket]) -> str | None:
    """None if the --listen addresses name exactly the activated sockets, else a
    one-line explanation. Each address must name at least one socket and each
    socket must be named (a bare PORT names both its IPv4 and IPv6 socket)."""
    unnamed = [s for s in sockets if not any(matches(a, s) for a in addresses)]
    unknown = [a for a in addresses if not any(matches(a, s) for s in sockets)]
    if not unnamed and not unknown:
        return None
    got = ", ".join(describe(s) for s in sockets)
    parts = []
    if unknown:
        parts.append(f"--listen {', '.join(str(a) for a in unknown)} is not among them")
    if unnamed:
        parts.append(f"{', '.join(describe(s) for s in unnamed)} not named by --listen")
    return (f"socket-activated with {got}: {'; '.join(parts)} "
            f"(drop --listen to use the activated sockets as they are)")


# -- sd_notify ----------------------------------------------------------------


class Notifier:
    """sd_notify(3) in the standard library: never blocks, never raises.

    Disabled (every send a no-op) when there is no ``NOTIFY_SOCKET``. A send
    that fails (manager busy: EAGAIN; gone: ECONNREFUSED/ENOENT) is dropped;
    the first failure is logged as a warning, later ones at debug level.
    """

    def __init__(self, address: str | None) -> None:
        self.address: str | None = None
        self._sock: socket.socket | None = None
        self._warned = False
        if not address:
            return
        if address.startswith("@"):
            target = "\0" + address[1:]  # abstract namespace
        elif address.startswith("/"):
            target = address
        else:
            log.warning("NOTIFY_SOCKET=%r: only unix socket paths and @abstract names are "
                        "supported; not notifying", address)
            return
        self.address = target
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        self._sock = sock

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None, *,
                     unset: bool = True) -> Notifier:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET")
        if unset:
            env.pop("NOTIFY_SOCKET", None)
        return cls(address)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram; True if the kernel took it."""
        if self._sock is None or self.address is None:
            return False
        payload = "\n".join(a.replace("\n", " ") for a in assignments).encode()
        try:
            self._sock.sendto(payload, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL, self.address)
        except OSError as e:
            level = logging.DEBUG if self._warned else logging.WARNING
            self._warned = True
            log.log(level, "sd_notify %s dropped: %s", assignments[0].partition("=")[0],
                    e.strerror or e)
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(environ: MutableMapping[str, str] | None = None, *,
                      pid: int | None = None, unset: bool = True) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC, as sd_watchdog_enabled(3)
    advises), or None when no watchdog is asked of this process."""
    env = os.environ if environ is None else environ
    usec_text = env.get("WATCHDOG_USEC")
    pid_text = env.get("WATCHDOG_PID")
    if unset:
        env.pop("WATCHDOG_USEC", None)
        env.pop("WATCHDOG_PID", None)
    if not usec_text:
        return None
    try:
        usec = int(usec_text)
        if pid_text and int(pid_text) != (os.getpid() if pid is None else pid):
            return None
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC=%r / WATCHDOG_PID=%r", usec_text, pid_text)
        return None
    if usec <= 0:
        return None
    return usec / 1e6 / 2


async def watchdog(notifier: Notifier, interval: float) -> None:
    """Ping forever; runs in the main nursery, so it stops only with the process
    (or when the event loop is wedged, which is the point)."""
    while True:
        notifier.send("WATCHDOG=1")
        await trio.sleep(interval)


def status_text(snapshot: Snapshot, available: int | None, *, stopping: bool = False) -> str:
    """The one-line picture for ``systemctl status``, e.g.
    ``2/4 running, 5 queued, 3.1 GiB available``."""
    memory = "? GiB" if available is None else format_bytes(available, unit="GiB")
    if stopping or snapshot.hold is Hold.DRAINING:
        if snapshot.running == 0:
            return "stopping: 0 running, exiting"
        return f"stopping: {snapshot.running} running, waiting for them to finish"
    text = (f"{snapshot.running}/{snapshot.max_jobs} running, {snapshot.queued} queued, "
            f"{memory} available")
    if snapshot.hold is Hold.MEMORY:
        text += f", holding for memory (min free {format_bytes(snapshot.min_free, unit='GiB')})"
    return text


def current_status(gate: Gate, *, stopping: bool = False) -> str:
    return status_text(gate.snapshot(), gate.available_now(), stopping=stopping)


async def report_status(notifier: Notifier, gate: Gate,
                        stopping: Callable[[], bool] = lambda: False, *,
                        min_interval: float = STATUS_MIN_INTERVAL) -> None:
    """Send STATUS= whenever the picture changes, at most once per `min_interval`.

    No state change is lost to the coalescing: after each pause the picture is
    read again before waiting for the next change.
    """
    last: str | None = None
    while True:
        text = current_status(gate, stopping=stopping())
        if text != last:
            notifier.send(f"STATUS={text}")
            last = text
            await trio.sleep(min_interval)
            continue
        await gate.wait_changed()

