"""Command line: flags into a `Config`, then run the server until a signal.

Conventions: bad usage prints one line to stderr and exits 2; a startup
failure (port in use, no such socket) prints one line and exits 1; SIGTERM and
SIGINT stop gracefully and exit 0.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

import trio

from . import __version__
from .addresses import parse_address
from .allow import DEFAULT_ALLOW, AllowList
from .config import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MIN_FREE_MB,
    DEFAULT_QUEUE_TIMEOUT,
    DISTCC_PORT,
    Config,
)
from .memory import SystemMemory
from .serve import Server, open_all

log = logging.getLogger("gatekeeper")

EXIT_USAGE = 2
EXIT_STARTUP = 1


class UsageError(Exception):
    """A bad flag or value: one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def _number(text: str, *, positive: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise argparse.ArgumentTypeError(
            f"{text!r} must be a {'positive' if positive else 'non-negative'} number")
    return value


def _positive_number(text: str) -> float:
    return _number(text, positive=True)


def _non_negative_number(text: str) -> float:
    return _number(text, positive=False)


def build_parser() -> argparse.ArgumentParser:
    cpus = os.cpu_count() or 1
    p = _Parser(
        prog="gatekeeper",
        description="Hold incoming jobs until the box has a free slot and enough memory, "
                    "then splice them through to the backend.",
        allow_abbrev=False,
    )
    p.add_argument("--listen", action="append", metavar="ADDR",
                   help=f"where to accept clients: PORT, HOST:PORT, [IPv6]:PORT or unix:/path; "
                        f"repeatable (default: all interfaces, port {DISTCC_PORT})")
    p.add_argument("--backend", default="127.0.0.1:3633", metavar="ADDR",
                   help="where admitted jobs go (default: 127.0.0.1:3633)")
    p.add_argument("-j", "--jobs", "--max-jobs", dest="max_jobs", type=_positive_int,
                   default=cpus, metavar="N",
                   help=f"at most N jobs running at once (default: CPUs, here {cpus})")
    p.add_argument("--min-free-mb", type=_non_negative_number, default=DEFAULT_MIN_FREE_MB,
                   metavar="MB",
                   help="start a job only while at least this much memory is available "
                        f"(default: {DEFAULT_MIN_FREE_MB:.0f})")
    p.add_argument("--queue-timeout", type=_positive_number, default=DEFAULT_QUEUE_TIMEOUT,
                   metavar="SECONDS",
                   help="close a job that waited this long (default: "
                        f"{DEFAULT_QUEUE_TIMEOUT:.0f}, below distcc's 300 s I/O timeout)")
    p.add_argument("--max-queue", type=_non_negative_int, default=DEFAULT_MAX_QUEUE,
                   metavar="N",
                   help=f"at most N jobs waiting; more are closed at once "
                        f"(default: {DEFAULT_MAX_QUEUE})")
    p.add_argument("--allow", action="append", metavar="CIDR",
                   help="clients that may connect, repeatable (default: loopback and "
                        "private ranges, as distccd)")
    p.add_argument("--keep-half-closed", action="store_true",
                   help="keep a queued client that half-closed (for request-then-shutdown "
                        "protocols; distcc clients never do)")
    p.add_argument("--connect-timeout", type=_positive_number, default=DEFAULT_CONNECT_TIMEOUT,
                   metavar="SECONDS",
                   help=f"give up on a backend connect after this long "
                        f"(default: {DEFAULT_CONNECT_TIMEOUT:.0f})")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"],
                   help="log verbosity (default: info: one line per connection)")
    p.add_argument("--version", action="version", version=f"gatekeeper {__version__}")
    return p


def parse_config(argv: Sequence[str]) -> Config:
    """Flags into a validated Config; raises UsageError with a one-line reason."""
    args = build_parser().parse_args(list(argv))
    try:
        listen = tuple(parse_address(a, bare_port_host=None)
                       for a in (args.listen or [str(DISTCC_PORT)]))
    except ValueError as e:
        raise UsageError(f"--listen {e}") from None
    try:
        backend = parse_address(args.backend, bare_port_host="127.0.0.1")
    except ValueError as e:
        raise UsageError(f"--backend {e}") from None
    if getattr(backend, "port", 1) == 0:
        raise UsageError(f"--backend {args.backend!r}: port 0 cannot be connected to")
    try:
        allow = AllowList.parse(args.allow or DEFAULT_ALLOW)
    except ValueError as e:
        raise UsageError(f"--allow {e}") from None
    return Config(
        listen=listen,
        backend=backend,
        max_jobs=args.max_jobs,
        min_free_bytes=int(args.min_free_mb * 2**20),
        queue_timeout=args.queue_timeout,
        max_queue=args.max_queue,
        allow=allow,
        keep_half_closed=args.keep_half_closed,
        connect_timeout=args.connect_timeout,
        log_level=args.log_level,
    )


def setup_logging(level: str) -> None:
    # No timestamps: journald (and most supervisors) add their own.
    logging.basicConfig(stream=sys.stderr, level=level.upper(),
                        format="gatekeeper: %(levelname)s: %(message)s")


async def run(config: Config) -> None:
    """Open the listeners, serve, and stop gracefully on SIGTERM/SIGINT."""
    listeners = await open_all(config.listen)
    server = Server(config, SystemMemory())
    log.info("gatekeeper %s: max-jobs %d, min-free %.0f MiB, max-queue %d, "
             "queue-timeout %gs, backend %s", __version__, config.max_jobs,
             config.min_free_bytes / 2**20, config.max_queue, config.queue_timeout,
             config.backend)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for signum in signals:
                    log.info("got %s, stopping", signal.Signals(signum).name)
                    server.stop()

            nursery.start_soon(stop_on_signal)
            await server.run(listeners)
            nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = parse_config(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        print(f"gatekeeper: {e}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(config.log_level)
    try:
        trio.run(run, config)
    except OSError as e:
        # Startup failures only (binding, permissions): a connection's errors
        # never get this far.
        print(f"gatekeeper: cannot start: {e}", file=sys.stderr)
        return EXIT_STARTUP
    except KeyboardInterrupt:
        return 0
    return 0
