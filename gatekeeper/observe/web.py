"""The `--metrics` HTTP endpoint and the `--agent` line server.

HTTP here is the smallest useful subset, on purpose: one GET (or HEAD) per
connection, answered HTTP/1.0-style with a Content-Length and closed. No
keep-alive, no request bodies, no chunking. That is all Prometheus, curl, a
browser and `gatekeeper status` need, and it leaves nothing to get wrong.

Resource handling: each connection is its own task and its stream is closed
in that task's `finally`. A request may be at most MAX_REQUEST bytes and must
arrive, and its answer leave, within EXCHANGE_TIMEOUT seconds; at most
MAX_CLIENTS are served at once (the others wait in the limiter). So a slow,
huge or hostile client costs one bounded task and is then gone.

/status and / (which name clients) are refused (403) to a Host header that
is neither an IP literal nor one of this machine's names (DNS rebinding).
Who may connect at all, how many at once and for how long is the accept
loop's business (`net.sideport`).

Error handling: garbage gets a 400 and the connection closes; a client that
resets or stalls is simply dropped. Nothing a client sends can reach the gate:
the handlers only read snapshots.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import trio
from prometheus_client import CONTENT_TYPE_LATEST

from gatekeeper.observe.metrics import Observatory

log = logging.getLogger("gatekeeper")

# A request line plus a few headers. Prometheus sends ~300 bytes, a browser
# ~1 KiB; 8 KiB is what nginx's default large_client_header_buffers line is.
MAX_REQUEST = 8192
# Whole exchange: request in, response out. A scrape on loopback takes a
# millisecond; Prometheus's own default scrape timeout is 10 s.
EXCHANGE_TIMEOUT = 5.0
# The request itself must be in within this of the connection's start:
# Prometheus, curl and browsers send it with the connect (microseconds on
# loopback), so a connection silent for a second is idle, and closing it
# frees its place for a scrape (issue 16: 100 idle connections held
# `curl /status` for 29.2 s).
REQUEST_TIMEOUT = 1.0
# How much of a refused request is read and dropped before closing.
LINGER_BYTES = 8 * MAX_REQUEST
# Concurrent HTTP clients. A few scrapers and browsers at most; the bound keeps
# a flood of idle connections from holding many tasks.
MAX_CLIENTS = 16


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    content_type: str
    body: bytes


_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed",
            431: "Request Header Fields Too Large"}


def _error(status: int) -> Response:
    return Response(status, "text/plain; charset=utf-8", f"{_REASONS[status]}\n".encode())


def parse_request_line(head: bytes) -> tuple[str, str] | None:
    """(method, path) from a request head, or None if it is not HTTP."""
    line, _, _ = head.partition(b"\n")
    parts = line.rstrip(b"\r").split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return None
    try:
        method, target = parts[0].decode("ascii"), parts[1].decode("ascii")
    except UnicodeDecodeError:
        return None
    if not method.isalpha() or not target.startswith("/"):
        return None
    return method, target.partition("?")[0]


def request_query(head: bytes) -> str:
    """The request target's query (after `?`; "" if none), of a head that
    `parse_request_line` accepted."""
    line = head.partition(b"\n")[0].rstrip(b"\r")
    parts = line.split(b" ")
    return parts[1].decode("ascii", "replace").partition("?")[2] if len(parts) == 3 else ""


def host_header(head: bytes) -> str | None:
    """The Host header's value (the last one), or None if there is none."""
    found = None
    for line in head.split(b"\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"host":
            found = value.strip().decode("latin-1")
    return found


def host_allowed(host: str | None, names: frozenset[str]) -> bool:
    """Whether a request's Host may see /status and /: none (HTTP/1.0), an IP
    literal, or one of this machine's `names`. A DNS name that is none of
    ours is how a web page rebinds its own name to 127.0.0.1 to read a
    loopback-only page; refusing it (as the Docker and Jupyter daemons do)
    closes that door."""
    if host is None:
        return True
    name = host.strip().lower()
    if name.startswith("["):  # [IPv6]:port
        name, bracket, _ = name[1:].partition("]")
        if not bracket:
            return False
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    name = name.rstrip(".")  # "localhost." is localhost
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return name in names


def local_names() -> frozenset[str]:
    """The names a person may use for this machine in a URL."""
    names = {"localhost", "localhost.localdomain"}
    hostname = socket.gethostname().lower()
    names.update({hostname, hostname.partition(".")[0]})
    return frozenset(names)


def footprints_since(query: str) -> int | None:
    """`/footprints`'s query: "" or `since=G` (G a generation, decimal, at
    most 18 digits): G, 0, or None for anything else."""
    if query == "":
        return 0
    prefix = "since="
    digits = query[len(prefix):]
    if (not query.startswith(prefix) or not 0 < len(digits) <= 18 or not digits.isascii()
            or not digits.isdigit()):
        return None
    return int(digits)


def encode(response: Response, *, head_only: bool = False) -> bytes:
    head = (f"HTTP/1.0 {response.status} {_REASONS[response.status]}\r\n"
            f"Content-Type: {response.content_type}\r\n"
            f"Content-Length: {len(response.body)}\r\n"
            "Cache-Control: no-store\r\n"
            "Connection: close\r\n\r\n").encode("ascii")
    return head if head_only else head + response.body


class StatusWeb:
    """Routes: /metrics (Prometheus), /status (JSON), / (HTML page, if any)."""

    def __init__(self, observatory: Observatory, *,
                 page: Callable[[], bytes] | None = None,
                 host_names: Iterable[str] = ()) -> None:
        self.observatory = observatory
        self.page = page
        self._limiter = trio.CapacityLimiter(MAX_CLIENTS)
        self.names = local_names() | {n.lower().rstrip(".") for n in host_names}

    async def respond(self, method: str, path: str, host: str | None = None,
                      query: str = "") -> Response:
        if method not in ("GET", "HEAD"):
            return _error(405)
        if path in ("/status", "/", "/farm") and not host_allowed(host, self.names):
            return _error(403)
        if path == "/metrics":
            return Response(200, CONTENT_TYPE_LATEST, self.observatory.exposition())
        if path == "/footprints" and self.observatory.footprints is not None:
            since = footprints_since(query)
            if since is None:
                return _error(400)
            return Response(200, "application/json", self.observatory.footprints(since))
        if path == "/status":
            await self.observatory.backend.refresh()
            return Response(200, "application/json", self.observatory.status_json())
        if path == "/farm":
            await self.observatory.backend.refresh()
            return Response(200, "application/json", self.observatory.farm_json())
        if path == "/" and self.page is not None:
            return Response(200, "text/html; charset=utf-8", self.page())
        return _error(404)

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            async with self._limiter:
                with trio.move_on_after(EXCHANGE_TIMEOUT):
                    await self._exchange(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away: nothing to answer
        finally:
            await trio.aclose_forcefully(stream)

    async def _exchange(self, stream: trio.SocketStream) -> None:
        head = b""
        with trio.move_on_after(REQUEST_TIMEOUT) as waiting:
            while b"\r\n\r\n" not in head and b"\n\n" not in head:
                if len(head) > MAX_REQUEST:
                    break
                data = await stream.receive_some(4096)
                if not data:
                    if not head:
                        return  # connected and left (a port check)
                    break  # a request without its blank line: judge what came
                head += data
        if waiting.cancelled_caught:
            return  # idle: its place goes to the next client
        if len(head) > MAX_REQUEST:
            await _refuse(stream, 431)
            return
        request = parse_request_line(head)
        if request is None:
            await _refuse(stream, 400)
            return
        method, path = request
        response = await self.respond(method, path, host_header(head), request_query(head))
        await stream.send_all(encode(response, head_only=method == "HEAD"))


async def _refuse(stream: trio.SocketStream, status: int) -> None:
    """Answer an error, then read and drop what the client is still sending:
    closing with unread bytes makes Linux send RST, which can destroy the
    answer before the client reads it. Bounded by LINGER_BYTES and the
    caller's EXCHANGE_TIMEOUT."""
    await stream.send_all(encode(_error(status)))
    await stream.send_eof()
    dropped = 0
    while dropped < LINGER_BYTES:
        data = await stream.receive_some(4096)
        if not data:
            return
        dropped += len(data)
