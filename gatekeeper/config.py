"""The validated run-time configuration (what the command line turns into)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from gatekeeper.distcc.policy import ArgvPolicy
from gatekeeper.fairness import FairBy, Priorities
from gatekeeper.net.addresses import Address, TcpAddress
from gatekeeper.net.allow import AllowList
from gatekeeper.net.window import DEFAULT_QUEUED_WINDOW

DISTCC_PORT = 3632

# The distcc client waits at most DISTCC_IO_TIMEOUT (default 300 s) for each
# read, and distccd sends nothing until the compile ends, so queue time plus
# compile time must stay under 300 s. 240 s leaves a minute for the compile and
# makes a timed-out client fail cleanly and fall back to a local build.
DEFAULT_QUEUE_TIMEOUT = 240.0

# distccd's own listen backlog is 1024; holding as many is nothing for us
# (one socket and one small task each) and covers a few make -j64 clients.
DEFAULT_MAX_QUEUE = 1024
# A client's fair share of the queue (--max-queued-per-client's default): a
# quarter, so one peer can never hold more than that and at least three others
# of its size still fit. At the default 1024 that is 256 waiting jobs per
# client, more than a `make -j256` can have outstanding at once (a distcc
# client host sends at most its DISTCC_HOSTS slots together), so no honest
# build is ever refused by it; 1,100 idle connections from one address (the
# issue 22 finding) are cut at 256 instead of turning everyone away.
QUEUE_SHARE_PER_CLIENT = 4


def default_max_queued_per_client(max_queue: int) -> int:
    return max(1, max_queue // QUEUE_SHARE_PER_CLIENT)

# 512 MiB: enough for a typical C++ compile to start and grow for a while
# without swapping, small enough not to idle a modest build box. Raise it to the
# peak of your heaviest translation unit; a value above the machine's memory
# holds every job (a way to drain a box).
DEFAULT_MIN_FREE_MB = 512.0

# A backend on loopback answers a connect at once; a remote one that has not
# answered within this long is down, and the client is better off falling back
# to a local compile than waiting (its own connect timeout is only 4 s, but by
# now it has long been connected to us).
DEFAULT_CONNECT_TIMEOUT = 10.0


# What a job never seen before is assumed to need at its peak, until enough
# jobs have been measured to know the farm's own distribution. 256 MiB is a
# heavy-ish C++ translation unit: a cold start errs towards admitting fewer
# jobs at once, and learning corrects it within the first few jobs.
DEFAULT_JOB_MEM_MB = 256.0

# Pausing (pausing.py) judges the headroom less the running jobs' expected
# growth -- what admission counts as free -- so by default it freezes a job when
# that falls to half of --min-free-mb (admission keeps min-free spare: a pause
# means the estimates were wrong by more than half of it) and lets it go on at
# min-free, where admission would start a job again.
PAUSE_FLOOR_SHARE = 0.5
# A paused job waits for others to end; compiles that need a pause are heavy
# ones of tens of seconds. Two minutes covers a few of them; the client's own
# 300 s timeout is guarded apart (pauses.CLIENT_DEADLINE).
DEFAULT_MAX_PAUSE = 120.0


# How long a distcc client may take to send the rest of its request while the
# argv policy waits for its head (before it queues), and while its request is
# still arriving once it runs: distcc clients write their whole request at
# once (corked), so a pause this long is a stuck or hostile client. 30 s is far
# above a loaded client's scheduling delay (over 100 ms seen under make -j12
# on 2 cores) and far below distcc's own 300 s I/O timeout.
DEFAULT_REQUEST_IDLE_TIMEOUT = 30.0

DEFAULT_ARGV_POLICY = ArgvPolicy()

# The metrics port serves /status, which names clients: loopback unless told.
LOOPBACK_ONLY = AllowList.parse(["127.0.0.0/8", "::1/128"])

# Fair by client address by default: one developer's make -j64 must not make
# every other client wait behind all 64 of its jobs.
DEFAULT_FAIR_BY = FairBy("client")
NO_PRIORITIES = Priorities()


class InetdIo(enum.Enum):
    """What an inetd-mode COMMAND gets as its stdin and stdout.

    DIRECT: the client socket itself, as inetd does: the child sees the real
    peer address, and no byte passes through gatekeeper.
    RELAY: one end of a socketpair that gatekeeper relays: distccd's compile
    status is read like a backend's, and ``distccd --inetd``'s whole-second
    wait for its compiler is cut short (`inetd_wake`); the child sees a
    unix-domain peer, so distccd's own --allow would refuse it.
    AUTO: RELAY for distcc jobs unless COMMAND has --allow; DIRECT otherwise.
    """

    AUTO = "auto"
    DIRECT = "direct"
    RELAY = "relay"


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    listen: tuple[Address, ...]
    backend: Address
    max_jobs: int
    min_free_bytes: int
    queue_timeout: float
    max_queue: int
    allow: AllowList
    keep_half_closed: bool = False
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    job_mem_bytes: int = int(DEFAULT_JOB_MEM_MB * 2**20)
    """Seed estimate of an unknown job's peak memory."""
    state_dir: Path | None = None
    """Where learned footprints are kept across restarts (None: not kept)."""
    identify: bool = True
    """Peek at distcc request heads to key learned footprints by compile."""
    argv_policy: ArgvPolicy | None = DEFAULT_ARGV_POLICY
    """Refuse distcc requests whose command line runs, loads or reads what the
    client names (distcc/policy.py). None only with identify off."""
    request_idle_timeout: float = DEFAULT_REQUEST_IDLE_TIMEOUT
    """The longest pause allowed while a distcc request is still arriving."""
    cgroup: str | None = None
    """Watch this cgroup's memory (None: gatekeeper's own cgroups)."""
    fair_by: FairBy = DEFAULT_FAIR_BY
    """How clients are grouped for round-robin sharing of the queue."""
    max_per_client: int | None = None
    """At most this many running jobs per fairness key."""
    max_queued_per_client: int | None = None
    """At most this many queued jobs per client address (None: no such limit;
    the command line's default is a quarter of max_queue)."""
    queued_window: int = DEFAULT_QUEUED_WINDOW
    """The receive buffer (bytes) a TCP connection has until it is admitted,
    set on the listeners (net/window.py); 0: the kernel's."""
    priorities: Priorities = NO_PRIORITIES
    """Weights of keys in the round-robin."""
    idle_timeout: float | None = None
    """Cut off a running job that moved no byte either way for this long (None:
    never: distccd sends nothing until a compile ends, and big compiles are long)."""
    zero_copy: bool = True
    """Move bytes with os.splice where the platform has it (else a buffer copy)."""
    inetd_io: InetdIo = InetdIo.AUTO
    """inetd mode: what COMMAND gets as stdin/stdout (see InetdIo)."""
    backfill: bool = True
    """While the next job waits for memory, start later jobs that cannot delay
    it (backfill.py), by learned peaks and durations."""
    job_cgroups: bool = True
    """Give each job a cgroup of its own where gatekeeper may make one (inetd:
    memory/job_cgroup.py; proxy: memory/adopt.py); else, or False, sample its
    process tree."""
    pause_below_bytes: int = 0
    """Freeze the youngest running job while headroom is below this (0: never;
    pausing.py)."""
    max_pause: float = DEFAULT_MAX_PAUSE
    """The longest a job stays frozen before it is let go, or cut."""
    max_memory_pressure: float | None = None
    """Hold jobs while PSI memory `some avg10` exceeds this percentage."""
    metrics: Address | None = None
    """Serve /metrics, /status and / over HTTP here (None: off)."""
    agent: Address | None = None
    """Answer HAProxy agent-checks here (None: off)."""
    metrics_hosts: tuple[str, ...] = ()
    """Host names, besides IP literals and this machine's own, that /status and
    / answer to (`--metrics-host`: the box's FQDN, a DNS alias)."""
    metrics_allow: AllowList = LOOPBACK_ONLY
    """Who may connect to the metrics port (its /status names clients)."""
    agent_allow: AllowList | None = None
    """Who may connect to the agent port (None: the same as `allow`)."""
    peers: tuple[TcpAddress, ...] = ()
    """Other gatekeepers' --metrics addresses, to share learned footprints with
    (`--peer`)."""
    peer_interval: float = 10.0
    """Seconds between exchanges with the peers (farm/peers.EXCHANGE_INTERVAL)."""
    trusted_proxies: AllowList | None = None
    """Directors whose connections start with a PROXY header naming the real
    client (`--trusted-proxy`; None: nobody's)."""
    log_level: str = "info"
