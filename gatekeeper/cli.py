"""Command line: flags into a `Config`, then run the server until a signal.

Conventions: bad usage prints one line to stderr and exits 2; a startup
failure (port in use, no such socket, an unusable socket-activated fd) prints
one line and exits 1; SIGTERM and SIGINT stop gracefully and exit 0.

``gatekeeper [options] -- COMMAND [ARGS...]`` is inetd mode: everything after
the first ``--`` is the command run once per admitted connection.

Signals, one meaning each: SIGTERM and SIGINT stop gracefully (stop accepting,
close queued clients, give running jobs ``--drain-timeout`` seconds). SIGHUP
is caught and logged as unsupported: every limit comes from the command line,
which a running process cannot re-read, so a reload would silently change
nothing -- restart the service instead (queued clients fall back to a local
compile; running jobs drain). Without the handler SIGHUP would kill us.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import resource
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from gatekeeper import __version__
from gatekeeper.config import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_JOB_MEM_MB,
    DEFAULT_MAX_PAUSE,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MIN_FREE_MB,
    DEFAULT_QUEUE_TIMEOUT,
    DEFAULT_REQUEST_IDLE_TIMEOUT,
    DISTCC_PORT,
    LOOPBACK_ONLY,
    PAUSE_FLOOR_SHARE,
    Config,
    InetdIo,
    default_max_queued_per_client,
)
from gatekeeper.distcc.policy import ArgvPolicy
from gatekeeper.fairness import FairBy, Priorities
from gatekeeper.footprints import state_dir_problem
from gatekeeper.inetd.command import Command, filters_peers
from gatekeeper.memory.sources import MemorySource, build_memory_source
from gatekeeper.net.addresses import Address, TcpAddress, parse_address
from gatekeeper.net.allow import DEFAULT_ALLOW, AllowList
from gatekeeper.net.listen import FdPlan, open_all
from gatekeeper.net.window import DEFAULT_QUEUED_WINDOW, MAX_QUEUED_WINDOW
from gatekeeper.observe import statuscmd
from gatekeeper.observe.logformat import JsonFormatter
from gatekeeper.observe.metrics import DEFAULT_METRICS
from gatekeeper.observe.units import format_mib
from gatekeeper.server import DEFAULT_DRAIN_TIMEOUT, Server
from gatekeeper.service.activation import (
    ActivationError,
    Notifier,
    adopt,
    check_socket,
    current_status,
    describe,
    inherited_sockets,
    listen_mismatch,
    report_status,
    watchdog,
    watchdog_interval,
)
from gatekeeper.usage import EXIT_USAGE, Parser, UsageError

log = logging.getLogger("gatekeeper")

# `gatekeeper status|weight [--metrics ADDR]` read a running gatekeeper's /status.
SUBCOMMANDS = ("status", "weight")
EXIT_STARTUP = 1
# Every signal a person may send has a meaning, and each is logged (issue 16:
# SIGUSR1, SIGUSR2 and SIGALRM killed gatekeeper silently). SIGTERM, SIGINT
# and SIGQUIT stop it with the drain; SIGHUP says reloading is unsupported;
# SIGUSR1 logs the status line; SIGUSR2 saves learned footprints now; SIGALRM
# is ignored. SIGPIPE is ignored by Python already; SIGKILL and SIGSTOP
# cannot be caught; job-control signals keep their meaning.
SIGNALS_HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
                   signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM)
DEFAULT_BACKEND = "127.0.0.1:3633"


def _whole(text: str, *, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(
            f"{text!r} must be at least 1" if minimum == 1 else f"{text!r} must not be negative")
    return value


def _positive_int(text: str) -> int:
    return _whole(text, minimum=1)


def _non_negative_int(text: str) -> int:
    return _whole(text, minimum=0)


def _queued_window(text: str) -> int:
    value = _whole(text, minimum=0)
    if value > MAX_QUEUED_WINDOW:
        raise argparse.ArgumentTypeError(
            f"{value} is above {MAX_QUEUED_WINDOW} (a queued connection's window is "
            "meant to be a few KiB; 0 keeps the kernel's)")
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
    p = Parser(
        prog="gatekeeper",
        usage="%(prog)s [options] [-- COMMAND [ARGS...]]\n"
              "       %(prog)s status|weight [--metrics ADDR]",
        description="Hold incoming jobs until the box has a free slot and enough memory, "
                    "then splice them through to the backend -- or, after '--', run "
                    "COMMAND once per job with the connection as its stdin and stdout "
                    "(inetd mode, e.g. -- distccd --inetd).",
        allow_abbrev=False,
    )
    p.add_argument("--listen", action="append", metavar="ADDR",
                   help=f"where to accept clients: PORT, HOST:PORT, [IPv6]:PORT or unix:/path; "
                        f"repeatable (default: all interfaces, port {DISTCC_PORT})")
    p.add_argument("--backend", default=None, metavar="ADDR",
                   help=f"where admitted jobs go (default: {DEFAULT_BACKEND}); "
                        f"not with -- COMMAND")
    p.add_argument("-j", "--jobs", "--max-jobs", dest="max_jobs", type=_positive_int,
                   default=cpus, metavar="N",
                   help=f"at most N jobs running at once (default: CPUs, here {cpus})")
    p.add_argument("--min-free-mb", type=_non_negative_number, default=DEFAULT_MIN_FREE_MB,
                   metavar="MB",
                   help="start a job only while at least this much memory is available "
                        f"(default: {DEFAULT_MIN_FREE_MB:.0f})")
    p.add_argument("--cgroup", metavar="PATH",
                   help="also respect this cgroup's memory limit: a cgroupfs directory or a "
                        "path as /proc/PID/cgroup shows it, e.g. /system.slice/distcc.service "
                        "(default: gatekeeper's own cgroups)")
    p.add_argument("--max-memory-pressure", type=_non_negative_number, metavar="PCT",
                   help="also hold jobs while memory pressure (PSI 'some avg10') is above "
                        "PCT percent (default: off)")
    p.add_argument("--job-mem-mb", type=_non_negative_number, default=DEFAULT_JOB_MEM_MB,
                   metavar="MB",
                   help="peak memory assumed for a job never seen before, until enough "
                        f"jobs have been measured (default: {DEFAULT_JOB_MEM_MB:.0f})")
    p.add_argument("--state-dir", metavar="DIR",
                   help="keep learned job footprints here across restarts (created if "
                        "missing; default: not kept)")
    p.add_argument("--identify", choices=["distcc", "none"], default="distcc",
                   help="read each job's distcc command line (without consuming it) to "
                        "learn footprints per compile and check it against the argv "
                        "policy; 'none' for other protocols, which also turns the "
                        "policy off (default: distcc)")
    p.add_argument("--allow-compiler", action="append", metavar="NAME",
                   help="also let distcc jobs run compiler NAME (a bare name, repeatable); "
                        "the gcc/g++/cc/c++/clang family, with target-triplet and version "
                        "suffixes, is allowed already")
    p.add_argument("--request-idle-timeout", type=_positive_number,
                   default=DEFAULT_REQUEST_IDLE_TIMEOUT, metavar="SECONDS",
                   help="refuse or cut off a distcc client that pauses this long while its "
                        "request is still arriving (default: "
                        f"{DEFAULT_REQUEST_IDLE_TIMEOUT:.0f})")
    p.add_argument("--fair-by", default="client", metavar="{none,client,subnet/N}",
                   help="share the queue round-robin between clients (by address) or "
                        "IPv4 subnets of N bits (IPv6: /64); none: one FIFO (default: client)")
    p.add_argument("--max-per-client", type=_positive_int, metavar="N",
                   help="at most N running jobs per client (or subnet); others wait, they "
                        "are not refused (default: no such limit)")
    p.add_argument("--priority", action="append", metavar="CIDR=WEIGHT",
                   help="clients in CIDR get WEIGHT turns in a row in the round-robin "
                        "(repeatable; first match wins; default weight 1)")
    p.add_argument("--idle-timeout", type=_positive_number, metavar="SECONDS",
                   help="cut off a running job that moved no byte either way for this long "
                        "(default: off -- distccd is silent until a compile ends)")
    p.add_argument("--data-path", choices=["splice", "copy"], default="splice",
                   help="move bytes in the kernel with splice(2) (Linux), or copy them "
                        "through a buffer (default: splice where available)")
    p.add_argument("--clear-env", action="store_true",
                   help="inetd mode: give COMMAND only PATH, LANG, LANGUAGE, LC_*, TZ, TMPDIR "
                        "and DISTCC_* of gatekeeper's environment (default: all of it, "
                        "less what a service manager passed to gatekeeper)")
    p.add_argument("--inetd-io", choices=[m.value for m in InetdIo], default="auto",
                   help="inetd mode: give COMMAND the client socket itself (direct), or a "
                        "socket gatekeeper relays (relay: distccd's compile status is read "
                        "and distccd --inetd's one-second wait for its compiler is cut "
                        "short, but distccd sees a unix-domain client, which its --allow "
                        "refuses); auto: relay distcc jobs unless COMMAND has --allow "
                        "(default: auto)")
    p.add_argument("--backfill", choices=["on", "off"], default="on",
                   help="while the next job waits for memory, start later jobs that cannot "
                        "delay it by their learned peak and duration (EASY backfilling; "
                        "off: strict FIFO per client) (default: on)")
    p.add_argument("--pause-below-mb", type=_non_negative_number, metavar="MB",
                   help="pause (freeze) the youngest running job while available memory, "
                        "less the growth still expected from running jobs, is below MB and "
                        "another job runs, and let it go on once twice that is free, "
                        "instead of letting the OOM killer end a compile; unknown jobs are "
                        "then admitted on a typical, not a worst-case, estimate; 0: off "
                        "(default: half of --min-free-mb)")
    p.add_argument("--max-pause", type=_positive_number, default=DEFAULT_MAX_PAUSE,
                   metavar="SECONDS",
                   help="let a paused job go on after this long, or cut it (its client "
                        "compiles locally) if there is still no room "
                        f"(default: {DEFAULT_MAX_PAUSE:.0f})")
    p.add_argument("--job-cgroups", choices=["auto", "off"], default="auto",
                   help="give each job a memory cgroup of its own (v1: and a freezer "
                        "cgroup), so its footprint is the kernel's own count, short jobs "
                        "included: inetd mode starts the child in one below gatekeeper's, "
                        "proxy mode moves the distccd child serving the job into one below "
                        "distccd's for the job; auto: where gatekeeper "
                        "may make them (root, or Delegate=yes), else sample process trees "
                        "and say so once (default: auto)")
    p.add_argument("--queue-timeout", type=_positive_number, default=DEFAULT_QUEUE_TIMEOUT,
                   metavar="SECONDS",
                   help="close a job that waited this long (default: "
                        f"{DEFAULT_QUEUE_TIMEOUT:.0f}, below distcc's 300 s I/O timeout)")
    p.add_argument("--max-queue", type=_non_negative_int, default=DEFAULT_MAX_QUEUE,
                   metavar="N",
                   help=f"at most N jobs waiting; more are closed at once "
                        f"(default: {DEFAULT_MAX_QUEUE})")
    p.add_argument("--max-queued-per-client", type=_positive_int, metavar="N",
                   help="at most N jobs waiting from one client address; more from it are "
                        "closed at once, others still queue (default: a quarter of "
                        "--max-queue, at least 1)")
    p.add_argument("--queued-window", type=_queued_window, default=DEFAULT_QUEUED_WINDOW,
                   metavar="BYTES",
                   help="receive buffer of a TCP connection until its job is admitted, so a "
                        "waiting request stays on the client; 0 keeps the kernel's "
                        f"(at most {MAX_QUEUED_WINDOW}; "
                        f"default: {DEFAULT_QUEUED_WINDOW})")
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
    p.add_argument("--drain-timeout", type=_non_negative_number,
                   default=DEFAULT_DRAIN_TIMEOUT, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, give running jobs this long to finish "
                        f"(default: {DEFAULT_DRAIN_TIMEOUT:.0f})")
    p.add_argument("--metrics", metavar="ADDR",
                   help="serve /metrics (Prometheus), /status (JSON) and / (a live page) over "
                        "HTTP here; a bare PORT means 127.0.0.1:PORT (default: off; "
                        f"'gatekeeper status' looks at {DEFAULT_METRICS})")
    p.add_argument("--agent", metavar="ADDR",
                   help="answer HAProxy agent-checks here (up/drain/down, free capacity, "
                        "maxconn); a bare PORT means every interface (default: off)")
    p.add_argument("--metrics-allow", action="append", metavar="CIDR",
                   help="who may connect to --metrics (repeatable; default: loopback only)")
    p.add_argument("--metrics-host", action="append", metavar="NAME",
                   help="also answer /status and / to a Host header of NAME (repeatable; IP "
                        "literals, localhost and this machine's host name always work)")
    p.add_argument("--peer", action="append", metavar="URL",
                   help="another gatekeeper's --metrics address (http://HOST:PORT): what it "
                        "measures is learned here, and what this box measures is served "
                        "there, every 10 s (repeatable; give each peer --metrics-allow "
                        "for this box)")
    p.add_argument("--trusted-proxy", action="append", metavar="CIDR",
                   help="a director (HAProxy send-proxy / send-proxy-v2) whose connections "
                        "start with a PROXY header: its client's address is the client for "
                        "--allow, fairness, limits, logs and /status (repeatable; a header "
                        "from anyone else is just bytes)")
    p.add_argument("--agent-allow", action="append", metavar="CIDR",
                   help="who may connect to --agent (repeatable; default: as --allow)")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"],
                   help="log verbosity (default: info: one line per connection)")
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="text: 'gatekeeper: LEVEL: message' lines; json: one object per line "
                        "with the connection's fields typed (default: text)")
    p.add_argument("--version", action="version", version=f"gatekeeper {__version__}")
    return p


@dataclass(frozen=True, slots=True)
class Options:
    """The whole command line: the Config, plus how this process runs the service."""

    config: Config
    command: Command | None = None
    """inetd mode: run this per job instead of connecting to config.backend."""
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    listen_given: bool = False
    log_format: str = "text"
    """Whether --listen was on the command line (not just the default)."""


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """(flags, COMMAND after the first ``--`` or None when there is no ``--``)."""
    args = list(argv)
    if "--" not in args:
        return args, None
    cut = args.index("--")
    return args[:cut], args[cut + 1:]


def _side_address(flag: str, text: str | None, bare_port_host: str | None) -> Address | None:
    if text is None:
        return None
    try:
        return parse_address(text, bare_port_host=bare_port_host)
    except ValueError as e:
        raise UsageError(f"{flag} {e}") from None


def _peer(text: str) -> TcpAddress:
    """`http://HOST:PORT` (or `HOST:PORT`): a peer's --metrics address."""
    rest = text.removeprefix("http://").removesuffix("/")
    try:
        address = parse_address(rest, bare_port_host=None)
    except ValueError as e:
        raise UsageError(f"--peer {e}") from None
    if not isinstance(address, TcpAddress) or address.host is None:
        raise UsageError(f"--peer {text!r}: expected http://HOST:PORT")
    return address


def parse_config(argv: Sequence[str]) -> Config:
    """Flags into a validated Config; raises UsageError with a one-line reason."""
    return parse_options(argv).config


def parse_options(argv: Sequence[str]) -> Options:
    """Flags and an optional ``-- COMMAND`` into Options; raises UsageError (one line)."""
    flags, command_argv = split_command(argv)
    args = build_parser().parse_args(flags)
    command: Command | None = None
    if command_argv is not None:
        if args.backend is not None:
            raise UsageError("--backend and -- COMMAND are mutually exclusive: a job goes "
                             "either to a backend or to its own COMMAND")
        try:
            command = Command.resolve(command_argv)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if args.clear_env:
            command = command.clearing_env(os.environ)
    elif args.clear_env:
        raise UsageError("--clear-env applies to inetd mode: it needs -- COMMAND")
    try:
        listen = tuple(parse_address(a, bare_port_host=None)
                       for a in (args.listen or [str(DISTCC_PORT)]))
    except ValueError as e:
        raise UsageError(f"--listen {e}") from None
    try:
        backend = parse_address(args.backend or DEFAULT_BACKEND, bare_port_host="127.0.0.1")
    except ValueError as e:
        raise UsageError(f"--backend {e}") from None
    if getattr(backend, "port", 1) == 0:
        raise UsageError(f"--backend {args.backend!r}: port 0 cannot be connected to")
    try:
        allow = AllowList.parse(args.allow or DEFAULT_ALLOW)
    except ValueError as e:
        raise UsageError(f"--allow {e}") from None
    try:
        fair_by = FairBy.parse(args.fair_by)
    except ValueError as e:
        raise UsageError(f"--fair-by {e}") from None
    try:
        priorities = Priorities.parse(args.priority or [])
    except ValueError as e:
        raise UsageError(f"--priority {e}") from None
    try:
        policy = ArgvPolicy.allowing(args.allow_compiler or [])
    except ValueError as e:
        raise UsageError(f"--allow-compiler {e}") from None
    identify = args.identify == "distcc"
    if args.allow_compiler and not identify:
        raise UsageError("--allow-compiler needs --identify distcc: with none, no "
                         "command line is read or checked")
    try:
        metrics_allow = (AllowList.parse(args.metrics_allow) if args.metrics_allow
                         else LOOPBACK_ONLY)
    except ValueError as e:
        raise UsageError(f"--metrics-allow {e}") from None
    try:
        agent_allow = AllowList.parse(args.agent_allow) if args.agent_allow else allow
    except ValueError as e:
        raise UsageError(f"--agent-allow {e}") from None
    peers = tuple(_peer(text) for text in args.peer or ())
    try:
        trusted = AllowList.parse(args.trusted_proxy) if args.trusted_proxy else None
    except ValueError as e:
        raise UsageError(f"--trusted-proxy {e}") from None
    metrics = _side_address("--metrics", args.metrics, "127.0.0.1")
    agent = _side_address("--agent", args.agent, None)
    config = Config(
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
        job_mem_bytes=int(args.job_mem_mb * 2**20),
        state_dir=Path(args.state_dir) if args.state_dir else None,
        identify=identify,
        argv_policy=policy if identify else None,
        request_idle_timeout=args.request_idle_timeout,
        cgroup=args.cgroup,
        max_memory_pressure=args.max_memory_pressure,
        metrics=metrics,
        agent=agent,
        metrics_allow=metrics_allow,
        metrics_hosts=tuple(args.metrics_host or ()),
        agent_allow=agent_allow,
        trusted_proxies=trusted,
        peers=peers,
        fair_by=fair_by,
        zero_copy=args.data_path == "splice",
        inetd_io=InetdIo(args.inetd_io),
        job_cgroups=args.job_cgroups == "auto",
        backfill=args.backfill == "on",
        pause_below_bytes=int((args.pause_below_mb if args.pause_below_mb is not None
                               else PAUSE_FLOOR_SHARE * args.min_free_mb) * 2**20),
        max_pause=args.max_pause,
        idle_timeout=args.idle_timeout,
        max_per_client=args.max_per_client,
        max_queued_per_client=(args.max_queued_per_client
                               if args.max_queued_per_client is not None
                               else default_max_queued_per_client(args.max_queue)),
        priorities=priorities,
        queued_window=args.queued_window,
    )
    return Options(config, command=command, drain_timeout=args.drain_timeout,
                   listen_given=args.listen is not None, log_format=args.log_format)


def setup_logging(level: str, log_format: str = "text") -> None:
    # No timestamps: journald (and most supervisors) add their own.
    logging.basicConfig(stream=sys.stderr, level=level.upper(),
                        format="gatekeeper: %(levelname)s: %(message)s")
    if log_format == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())


def raise_open_files_limit(config: Config, *, inetd: bool = False) -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit (the soft default, 1024, would
    quietly cap --max-queue), and warn if even that is too low for the limits.

    inetd-mode children inherit the raised limit; that is harmless for programs
    that use poll/epoll (distccd) and for select() users that open few files,
    since only fd *numbers* above 1023 trouble select()."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.debug("open files limit raised from %d to %d", soft, hard)
            soft = hard
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, hard, e)
    needed = FdPlan.of(config, inetd=inetd).needed(config)
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning("open files limit %d is below what --max-queue %d and --max-jobs %d "
                    "need (%d): connections past it fail (raise LimitNOFILE=)",
                    soft, config.max_queue, config.max_jobs, needed)


def inetd_io_reason(mode: InetdIo, command: Command) -> str:
    """What COMMAND gets as stdin/stdout, and why (issue 21: an --allow in
    COMMAND silently switched a sqlite build to direct mode, 63.3 s instead of
    24.9 s)."""
    if mode is InetdIo.AUTO:
        if filters_peers(command):
            return ("--inetd-io auto: each job gets the client socket itself (direct), "
                    "because COMMAND has its own --allow, which a relayed job's "
                    "unix-domain peer would fail; drop it (gatekeeper's --allow checks "
                    "clients) to relay and wake distccd when its compiler ends")
        return ("--inetd-io auto: distcc jobs are relayed (COMMAND has no --allow of its "
                "own), distccd woken when its compiler ends")
    return f"--inetd-io {mode.value}: as asked"


async def run(config: Config, options: Options | None = None, *,
              activated: Sequence[socket.socket] = (),
              notifier: Notifier | None = None,
              watchdog_every: float | None = None,
              memory: MemorySource | None = None) -> None:
    """Open (or adopt) the listeners, serve, and stop gracefully on SIGTERM/SIGINT."""
    if options is None:
        options = Options(config)
    if notifier is None:
        notifier = Notifier(None)
    if activated:
        listeners = adopt(activated)
        log.info("using %d socket(s) from the service manager: %s", len(listeners),
                 ", ".join(describe(s) for s in activated))
    else:
        listeners = await open_all(config.listen)
    if memory is None:
        memory = build_memory_source(config.cgroup)
    if watched := memory.describe():
        log.info("memory: %s", watched)
    server = Server(config, memory, drain_timeout=options.drain_timeout,
                    command=options.command)
    await server.open_side_listeners()  # before the nursery: in use = exit 1
    target = (f"command {options.command}" if options.command is not None
              else f"backend {config.backend}")
    per_client = ("" if config.max_queued_per_client is None
                  else f" ({config.max_queued_per_client} per client)")
    log.info("gatekeeper %s: max-jobs %d, min-free %s, max-queue %d%s, "
             "queue-timeout %gs, drain-timeout %gs, %s", __version__, config.max_jobs,
             format_mib(config.min_free_bytes), config.max_queue, per_client,
             config.queue_timeout, options.drain_timeout, target)
    if options.command is not None:
        log.info("inetd: %s", inetd_io_reason(config.inetd_io, options.command))
    if server.pauses is None:
        log.info("pausing: off (%s)", "--pause-below-mb 0" if config.min_free_bytes else
                 "half of --min-free-mb 0; give --pause-below-mb to pause jobs")
    elif config.pause_below_bytes > config.min_free_bytes:
        log.warning("pausing: --pause-below-mb %s is above --min-free-mb %s: jobs that fit "
                    "their estimates may be frozen as soon as they start",
                    format_mib(config.pause_below_bytes), format_mib(config.min_free_bytes))
    if server.pauses is not None:
        log.info("pausing: a running job is frozen below %s available, let go on from %s, "
                 "for at most %gs; unknown jobs are admitted on a %s estimate",
                 format_mib(config.pause_below_bytes), format_mib(2 * config.pause_below_bytes),
                 config.max_pause, "typical" if server.optimistic else "worst-case")
    with trio.open_signal_receiver(*SIGNALS_HANDLED) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signals() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if signum == signal.SIGHUP:
                        log.warning("got SIGHUP: reloading is not supported (every limit "
                                    "comes from the command line); restart to change them")
                        continue
                    if signum == signal.SIGUSR1:
                        log.info("got SIGUSR1: %s; %d connections open",
                                 current_status(server.gate, stopping=server.stopping),
                                 len(server.connections.live))
                        continue
                    if signum == signal.SIGUSR2:
                        if config.state_dir is None:
                            log.info("got SIGUSR2: no --state-dir, no footprints to save")
                        else:
                            log.info("got SIGUSR2: saving learned footprints in %s",
                                     config.state_dir)
                            server.save_footprints()
                        continue
                    if signum == signal.SIGALRM:
                        log.info("got SIGALRM: ignored (it has no meaning here)")
                        continue
                    log.info("got %s, stopping", name)
                    if not server.stopping:
                        s = server.gate.snapshot()
                        notifier.send("STOPPING=1", f"STATUS=stopping: closing {s.queued} "
                                      f"queued, waiting for {s.running} running")
                    server.stop()

            async def serve(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
                            ) -> None:
                await server.run(listeners, task_status=task_status)
                # The reporter dies with the nursery: say the last word here.
                notifier.send(f"STATUS={current_status(server.gate, stopping=True)}")
                nursery.cancel_scope.cancel()

            nursery.start_soon(on_signals)
            await nursery.start(serve)
            notifier.send("READY=1", f"STATUS={current_status(server.gate)}")
            if notifier.enabled:
                nursery.start_soon(report_status, notifier, server.gate,
                                   lambda: server.stopping)
                if watchdog_every is not None:
                    nursery.start_soon(watchdog, notifier, watchdog_every)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in SUBCOMMANDS:  # never a flag, so no clash with the options
        return statuscmd.main(args[0], args[1:])
    try:
        options = parse_options(args)
    except UsageError as e:
        print(f"gatekeeper: {e}", file=sys.stderr)
        return EXIT_USAGE
    # Until the signal receiver is up (and after it is gone), these would kill
    # the server silently by default: ignore them instead.
    for quiet in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM):
        signal.signal(quiet, signal.SIG_IGN)
    config = options.config
    setup_logging(config.log_level, options.log_format)
    # Read (and unset, so inetd-mode children never see them) what a service
    # manager passed: notification socket, watchdog, activated sockets.
    notifier = Notifier.from_environ()
    watchdog_every = watchdog_interval()
    try:
        activated = [check_socket(item) for item in inherited_sockets()]
    except ActivationError as e:
        print(f"gatekeeper: cannot start: socket activation: {e}", file=sys.stderr)
        return EXIT_STARTUP
    if activated and options.listen_given:
        mismatch = listen_mismatch(config.listen, activated)
        if mismatch is not None:
            print(f"gatekeeper: {mismatch}", file=sys.stderr)
            return EXIT_USAGE
    if config.state_dir is not None:
        # Found now, not at the first save: a state dir that cannot be written
        # loses a whole run's learning at stop (issue 21).
        problem = state_dir_problem(config.state_dir)
        if problem is not None:
            print(f"gatekeeper: --state-dir {config.state_dir}: {problem}", file=sys.stderr)
            return EXIT_USAGE
    raise_open_files_limit(config, inetd=options.command is not None)
    try:
        memory = build_memory_source(config.cgroup)
    except ValueError as e:
        print(f"gatekeeper: --cgroup {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        trio.run(partial(run, config, options, activated=activated, notifier=notifier,
                         watchdog_every=watchdog_every, memory=memory))
    except OSError as e:
        # Startup failures only (binding, permissions): a connection's errors
        # never get this far.
        print(f"gatekeeper: cannot start: {e}", file=sys.stderr)
        return EXIT_STARTUP
    except KeyboardInterrupt:
        return 0
    finally:
        notifier.close()
    return 0
