"""`gatekeeper status` and `gatekeeper weight`: read a running gatekeeper's
`/status` (its `--metrics` address) and show it, or turn it into a keepalived
MISC_CHECK exit code.

Plain blocking sockets: one short request, no event loop needed.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from gatekeeper.net.addresses import Address, TcpAddress, UnixAddress, parse_address
from gatekeeper.observe.agent import EXIT_FAILED, health, keepalived_exit
from gatekeeper.observe.escape import printable
from gatekeeper.observe.metrics import DEFAULT_METRICS
from gatekeeper.observe.units import format_bytes
from gatekeeper.usage import EXIT_USAGE, Parser, UsageError

# keepalived runs MISC_CHECK with its own misc_timeout (default: the check
# interval); answering within a few seconds or failing is what it wants.
FETCH_TIMEOUT = 3.0
# /status is at most a few tens of KiB (the queue view is bounded).
MAX_RESPONSE = 4 * 2**20

def fetch_status(address: Address, *, timeout: float = FETCH_TIMEOUT,
                 path: str = "/status") -> dict[str, Any]:
    """GET /status (or `path`); raises OSError or ValueError with a one-line reason."""
    if isinstance(address, UnixAddress):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(address.path)
        except OSError:
            sock.close()
            raise
    else:
        assert isinstance(address, TcpAddress)
        sock = socket.create_connection((address.host or "127.0.0.1", address.port),
                                        timeout=timeout)
    with sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_RESPONSE:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
            size += len(data)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    first = head.split(b"\r\n", 1)[0].split(b" ")
    if len(first) < 2 or not first[0].startswith(b"HTTP/") or first[1] != b"200":
        raise ValueError(f"unexpected answer: {head[:80]!r}")
    try:
        status = json.loads(body)
    except RecursionError:
        raise ValueError("answer nested too deep") from None
    if not isinstance(status, dict):
        raise ValueError("/status is not a JSON object")
    return status


def _size(n: object) -> str:
    if not isinstance(n, int) or isinstance(n, bool):
        return "?"
    return format_bytes(n)


def _counts(counts: object) -> str:
    if not isinstance(counts, Mapping):
        return "?"
    shown = [f"{k} {v}" for k, v in counts.items() if v]
    return ", ".join(shown) if shown else "none"


def _pausing(view: object) -> str:
    if not isinstance(view, Mapping):
        return "off"
    return (f"below {_size(view.get('floor_bytes'))}, resume at "
            f"{_size(view.get('resume_bytes'))}; {view.get('paused', '?')} paused now, "
            f"{view.get('pauses_total', '?')} pauses, {view.get('cuts_total', '?')} cut")


def _estimates(view: object) -> str:
    """Finished jobs per estimate source, and how many were within the band."""
    if not isinstance(view, Mapping):
        return "-"
    parts = []
    for source in ("learned", "predicted", "default"):
        entry = view.get(source)
        if not isinstance(entry, Mapping) or not isinstance(entry.get("jobs"), int):
            continue
        share = entry.get("within_band")
        within = (f", {share:.0%} within -20..+50 %"
                  if isinstance(share, (int, float)) and not isinstance(share, bool) else "")
        parts.append(f"{source} {entry['jobs']}{within}")
    return "; ".join(parts) or "-"


def _seconds(n: object) -> str:
    return f"{n:.1f}s" if isinstance(n, (int, float)) and not isinstance(n, bool) else "?"


def _job_line(entry: Mapping[str, Any]) -> str:
    """One admitted job; every field came over the network: escaped, bounded."""
    name = printable(str(entry.get("job") or entry.get("peer", "?")))
    if len(name) > 31:
        name = "..." + name[-28:]
    state = printable(str(entry.get("state", "?")))[:11]
    return (f"{'':<11}{name:<32}{state:<12}{_seconds(entry.get('running_seconds')):>8}"
            f"{_seconds(entry.get('paused_seconds')):>8}"
            f"{_size(entry.get('estimate_bytes')):>10}{_size(entry.get('charge_bytes')):>10}")


def format_status(status: Mapping[str, Any], where: str) -> str:
    """The human-readable table for `gatekeeper status`."""
    h = health(status)
    verdict = h.state.value + (f" ({h.reason})" if h.reason else "")
    if h.state.value == "up":
        verdict += f", {h.percent}% free"
    hold = status.get("hold")
    raw_backend = status.get("backend")
    backend: Mapping[str, Any] = raw_backend if isinstance(raw_backend, Mapping) else {}
    backend_text = {True: "reachable", False: f"unreachable: {backend.get('error')}",
                    None: "not checked"}.get(backend.get("ok"), "?")
    rows = [
        ("gatekeeper", f"{status.get('version', '?')} at {where}: {verdict}"),
        ("running", f"{status.get('running', '?')}/{status.get('max_jobs', '?')}"),
        ("queued", f"{status.get('queued', '?')} (max {status.get('max_queue', '?')})"
                   + (f", held for {hold}" if hold else "")
                   + (f", {_size(status['queued_kernel_bytes'])} in the kernel"
                      if isinstance(status.get("queued_kernel_bytes"), int) else "")),
        ("memory", f"{_size(status.get('available_bytes'))} available, "
                   f"{_size(status.get('min_free_bytes'))} min free, "
                   f"{_size(status.get('reserved_bytes'))} reserved, "
                   f"{_size(status.get('job_footprint_bytes'))} per new job"),
        ("backend", backend_text),
        ("admitted", f"{status.get('admitted_total', '?')} "
                     f"({status.get('backfilled_total', 0)} backfilled)"),
        ("measuring", printable(str(status.get("measuring", "?")))),
        ("pausing", _pausing(status.get("pausing"))),
        ("estimates", _estimates(status.get("estimates"))),
        ("completed", _counts(status.get("completed_total"))),
        ("rejected", _counts(status.get("rejected_total"))),
    ]
    lines = [f"{name:<11}{value}" for name, value in rows]
    jobs = status.get("jobs")
    if isinstance(jobs, list) and jobs:
        lines.append("")
        lines.append(f"{'':<11}{'JOB':<32}{'STATE':<12}{'FOR':>8}{'PAUSED':>8}"
                     f"{'EST':>10}{'NOW':>10}")
        for entry in jobs:
            if isinstance(entry, Mapping):
                lines.append(_job_line(entry))
    queue = status.get("queue")
    if isinstance(queue, list) and queue:
        lines.append("")
        lines.append(f"{'':<11}{'PEER':<42}WAITING")
        for entry in queue:
            if isinstance(entry, Mapping):
                wait = entry.get("waiting_seconds")
                wait_text = f"{wait:.1f}s" if isinstance(wait, (int, float)) else "?"
                lines.append(f"{'':<11}{entry.get('peer', '?')!s:<42}{wait_text}")
        queued = status.get("queued")
        if isinstance(queued, int) and queued > len(queue):
            lines.append(f"{'':<11}... and {queued - len(queue)} more")
    return "\n".join(lines)


def format_farm(farm: Mapping[str, Any], where: str) -> str:
    """`gatekeeper status --farm`: this box, then every peer as this box last
    saw it. A peer's status came over the network twice: escaped, bounded."""
    own = farm.get("self")
    parts = [format_status(own if isinstance(own, Mapping) else {}, where)]
    peers = farm.get("peers")
    for peer in peers if isinstance(peers, list) else []:
        if not isinstance(peer, Mapping):
            continue
        address = printable(str(peer.get("address", "?")))[:80]
        age = peer.get("age_seconds")
        seen = f"seen {age:.0f}s ago" if isinstance(age, (int, float)) else "never seen"
        if peer.get("ok") is True:
            head = f"== peer {address}: answering ({seen}) =="
        else:
            why = printable(str(peer.get("error") or "?"))[:200]
            head = f"== peer {address}: NOT answering: {why} ({seen}) =="
        status = peer.get("status")
        parts.append(head + ("\n" + format_status(status, address)
                             if isinstance(status, Mapping) else ""))
    return "\n\n".join(parts)


def _parse(command: str, argv: Sequence[str]) -> tuple[Address, bool]:
    p = Parser(prog=f"gatekeeper {command}", allow_abbrev=False,
                description="Show a running gatekeeper's status." if command == "status"
                else "Exit with keepalived's MISC_CHECK misc_dynamic code: 1 failed, "
                     "2 draining (weight 0), 2+PCT up with PCT%% capacity free.")
    p.add_argument("--metrics", default=DEFAULT_METRICS, metavar="ADDR",
                   help=f"the gatekeeper's --metrics address (default: {DEFAULT_METRICS})")
    if command == "status":
        p.add_argument("--farm", action="store_true",
                       help="also every --peer, as this gatekeeper last saw it")
    args = p.parse_args(list(argv))
    try:
        return (parse_address(args.metrics, bare_port_host="127.0.0.1"),
                bool(getattr(args, "farm", False)))
    except ValueError as e:
        raise UsageError(f"--metrics {e}") from None


def main(command: str, argv: Sequence[str]) -> int:
    """`gatekeeper status|weight [--metrics ADDR]`."""
    try:
        address, farm = _parse(command, argv)
    except UsageError as e:
        print(f"gatekeeper {command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    path = "/farm" if farm else "/status"
    try:
        status = fetch_status(address, path=path)
    except (OSError, ValueError) as e:
        print(f"gatekeeper {command}: cannot read {address}{path}: {e}", file=sys.stderr)
        return EXIT_FAILED
    if farm:
        print(format_farm(status, str(address)))
        return 0
    if command == "weight":
        return keepalived_exit(health(status))
    print(format_status(status, str(address)))
    return 0
