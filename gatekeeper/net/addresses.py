"""Socket addresses as users write them, and opening them.

Forms: ``PORT``, ``HOST:PORT``, ``[IPv6]:PORT``, ``unix:/path``. Parsing is
strict and gives a one-line reason on failure, because these strings come from
command lines and unit files.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import math
import os
import socket
import stat
from dataclasses import dataclass

import trio


@dataclass(frozen=True, slots=True)
class TcpAddress:
    host: str | None
    """None means every interface (listening) -- never used for connecting."""
    port: int

    def __str__(self) -> str:
        if self.host is None:
            return f"*:{self.port}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UnixAddress:
    path: str

    def __str__(self) -> str:
        return f"unix:{self.path}"


Address = TcpAddress | UnixAddress


def parse_address(text: str, *, bare_port_host: str | None) -> Address:
    """Parse an address; a bare PORT gets `bare_port_host` (None = all interfaces)."""
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path:
            raise ValueError(f"{text!r}: empty unix socket path")
        if "\0" in path:
            raise ValueError(f"{text!r}: NUL in unix socket path")
        if len(os.fsencode(path)) > 107:
            raise ValueError(f"{text!r}: unix socket path longer than 107 bytes")
        return UnixAddress(path)
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1:close + 2] != ":":
            raise ValueError(f"{text!r}: expected [IPv6]:PORT")
        host: str | None = text[1:close]
        port_text = text[close + 2:]
        try:
            ipaddress.IPv6Address(host or "")  # accepts scope ids (fe80::1%eth0)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
        if ":" in host:
            raise ValueError(f"{text!r}: write IPv6 addresses as [ADDR]:PORT")
        if not host:
            raise ValueError(f"{text!r}: empty host")
    else:
        host, port_text = bare_port_host, text
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: port must be a number from 0 to 65535")
    return TcpAddress(host, int(port_text))


# Why the maximum: the kernel clamps it to net.core.somaxconn anyway, and a
# listen backlog gives no back-pressure worth having -- gatekeeper accepts at
# once and does its own queueing (trio's open_tcp_listeners reasons the same).
LISTEN_BACKLOG = 0xFFFF


async def open_listeners(address: Address) -> list[trio.SocketListener]:
    """Bind and listen. A TCP address without a host listens on every interface
    (IPv4 and IPv6 where available)."""
    if isinstance(address, TcpAddress):
        return await trio.open_tcp_listeners(
            address.port, host=address.host, backlog=LISTEN_BACKLOG
        )
    return [await open_unix_listener(address.path)]


async def open_unix_listener(path: str, mode: int = 0o666) -> trio.SocketListener:
    """Listen on a unix socket path, replacing a stale socket left by a dead
    process but never a live one or a non-socket file.

    `mode` defaults to world-connectable, like distccd's TCP port; tighten it
    with the directory's permissions or systemd's SocketMode=.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # stale: nobody is listening behind it
        else:
            raise OSError(errno.EADDRINUSE, f"{path} is in use by a live listener")
        finally:
            probe.close()
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Created with its mode, under a umask, never chmod-ed after: a chmod
        # by path follows whatever was swapped in there since (a symlink to
        # a file of ours). Synchronous, so no other task runs under this umask.
        old_umask = os.umask(0o777 & ~mode)
        try:
            raw.bind(path)
        finally:
            os.umask(old_umask)
        raw.listen(LISTEN_BACKLOG)
        sock = trio.socket.from_stdlib_socket(raw)
    except BaseException:
        raw.close()
        raise
    await trio.lowlevel.checkpoint()
    return trio.SocketListener(sock)


async def connect(address: Address, *, connect_timeout: float = math.inf) -> trio.SocketStream:
    """Open a stream to a backend address; trio.TooSlowError after `connect_timeout`
    seconds (the deadline is only set up if the connect has to be waited for)."""
    raw = start_connect(address)
    if raw is None:  # a host name: trio resolves it (and tries each address)
        assert isinstance(address, TcpAddress) and address.host is not None
        with trio.fail_after(connect_timeout):
            return await trio.open_tcp_stream(address.host, address.port)
    return await finish_connect(raw, connect_timeout=connect_timeout)


def start_connect(address: Address) -> socket.socket | None:
    """Begin a non-blocking connect to a literal address, without a checkpoint
    (the server starts a just-admitted job's connection from inside the gate);
    `finish_connect` completes it. None for a host name, which needs the
    resolver. Raises OSError if the connect failed at once (refused on
    loopback)."""
    if isinstance(address, TcpAddress):
        assert address.host is not None
        family = _literal_family(address.host)
        if family is None:
            return None
        # A literal address (the usual backend) needs no resolver and no happy
        # eyeballs: a plain non-blocking connect saves a nursery and two tasks
        # per job (trio.open_tcp_stream) and trio's address normalisation.
        target: object = (address.host, address.port)
    else:
        family, target = socket.AF_UNIX, address.path
    raw = socket.socket(family, socket.SOCK_STREAM)
    try:
        raw.setblocking(False)
        err = raw.connect_ex(target)  # type: ignore[arg-type]
        # EAGAIN: a unix listener's backlog is full (nothing is in progress then;
        # `finish_connect` reports it). For TCP it means no local port was free.
        if err not in (0, errno.EINPROGRESS) and not (err == errno.EAGAIN
                                                      and family == socket.AF_UNIX):
            raise OSError(err, os.strerror(err))
    except BaseException:
        raw.close()
        raise
    return raw


async def finish_connect(raw: socket.socket, *,
                         connect_timeout: float = math.inf) -> trio.SocketStream:
    """Complete a connect `start_connect` began (waiting for it only if it is
    still in progress) and wrap it; closes `raw` on failure."""
    try:
        if connected_now(raw):
            await trio.lowlevel.checkpoint_if_cancelled()
        else:
            with trio.fail_after(connect_timeout):
                await trio.lowlevel.wait_writable(raw)
            err = raw.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
            if not connected_now(raw):
                # A unix listener whose backlog was full (EAGAIN) is "writable"
                # without a connection: the job fails (backend-error) and its
                # client falls back, as with a refused connection.
                raise OSError(errno.EAGAIN, "backend's listen backlog is full")
    except BaseException:
        raw.close()
        raise
    return trio.SocketStream(trio.socket.from_stdlib_socket(raw))


@functools.lru_cache(maxsize=64)
def _literal_family(host: str) -> socket.AddressFamily | None:
    """AF_INET/AF_INET6 for a literal IP address, None for a host name (cached:
    parsing the backend's address on every connect cost several microseconds)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


def connected_now(sock: socket.socket) -> bool:
    """Whether a connect in progress (`start_connect`) has already completed: to a backend on
    loopback the handshake is usually done before connect() returns, and then
    waiting for writability would cost two epoll_ctl calls and a trip through
    the scheduler for nothing."""
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


def listener_address(listener: trio.SocketListener) -> str:
    """The address a listener actually bound, as users write it (port 0 resolved)."""
    sock = listener.socket
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{name if isinstance(name, str) else name.decode()}"
    host, port = name[0], name[1]
    return str(TcpAddress(host, port))
