"""Load-balancer feedback: one health verdict, spoken as HAProxy agent-check
lines and as keepalived MISC_CHECK exit codes.

`health()` is pure: it maps a status picture (the same dictionary `/status`
serves, so `gatekeeper weight` reading it over HTTP decides exactly as the
in-process agent does) to a `Health`. The mapping, also in the README:

- ``down #<why>``: gatekeeper is stopping, or the backend did not accept a
  connection at the last check. Nothing new should come here.
- ``drain``: the memory rule would hold a new job right now (a new unknown job
  does not fit: available - reserved - its footprint < min free), memory
  pressure holds the queue, or a running job is paused because memory ran out.
  Running jobs finish; new ones should go elsewhere.
- otherwise ``up ready <pct>% maxconn:<max-jobs>``, pct the share of job slots
  neither running nor already claimed by the queue. ``ready`` cancels a
  previous ``drain`` (HAProxy keeps an agent's DRAIN until told ``ready``).

The percentage never goes below 1: a box that is merely busy (every slot
taken) is still the right place to queue, and weight 0 on every box of a farm
would leave HAProxy or LVS nowhere to send anything.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from gatekeeper.admission import memory_fits
from gatekeeper.net.addresses import Address, connect
from gatekeeper.observe.status import BackendView, HealthView, StatusPicture

# A busy box still takes (and queues) work: see the module docstring.
MIN_PERCENT = 1

# How long one backend reachability check may take, and how long its answer is
# reused. HAProxy polls the agent every `inter` (2 s by default) from each of
# its processes; reusing the answer for a few seconds keeps the backend from
# seeing a stream of empty connections, and a dead backend is still noticed
# within seconds (jobs sent meanwhile fail fast and fall back locally).
BACKEND_CHECK_TIMEOUT = 1.0
BACKEND_CHECK_TTL = 5.0

# How long an agent connection may take to receive its line.
AGENT_SEND_TIMEOUT = 5.0


class State(enum.Enum):
    UP = "up"
    DRAIN = "drain"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class Health:
    state: State
    percent: int
    """Free capacity, MIN_PERCENT..100 when up; 0 otherwise."""
    max_jobs: int
    reason: str = ""


def _int(status: Mapping[str, Any], key: str) -> int | None:
    value = status.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def memory_would_hold(status: Mapping[str, Any]) -> bool:
    """Whether the memory rule would hold a new (unknown) job right now."""
    if status.get("hold") in ("memory", "pressure", "paused"):
        return True
    pausing = status.get("pausing")
    if isinstance(pausing, Mapping) and _int(pausing, "paused"):
        return True
    available = _int(status, "available_bytes")
    if available is None:
        return False  # no reading: nothing to say
    reserved = _int(status, "reserved_bytes") or 0
    footprint = _int(status, "job_footprint_bytes") or 0
    min_free = _int(status, "min_free_bytes") or 0
    return not memory_fits(available, reserved, footprint, min_free)


def health(status: Mapping[str, Any]) -> Health:
    """The verdict for a `/status` picture (see the module docstring)."""
    max_jobs = max(1, _int(status, "max_jobs") or 1)
    if status.get("stopping"):
        return Health(State.DOWN, 0, max_jobs, "stopping")
    backend = status.get("backend")
    if isinstance(backend, Mapping) and backend.get("ok") is False:
        return Health(State.DOWN, 0, max_jobs, f"backend unreachable: {backend.get('error')}")
    if memory_would_hold(status):
        return Health(State.DRAIN, 0, max_jobs, "memory")
    busy = (_int(status, "running") or 0) + (_int(status, "queued") or 0)
    free = max(0, max_jobs - busy)
    percent = max(MIN_PERCENT, min(100, (100 * free) // max_jobs))
    return Health(State.UP, percent, max_jobs)


def _one_line(text: str) -> str:
    """Printable ASCII only: the reason ends the agent's line."""
    clean = "".join(c if " " <= c <= "~" else " " for c in text)
    return clean[:200]


def health_view(status: Mapping[str, Any]) -> HealthView:
    """The verdict as /status carries it."""
    h = health(status)
    return {"state": h.state.value, "percent": h.percent, "reason": h.reason}


def agent_line(h: Health) -> str:
    """One HAProxy agent-check response line, newline included."""
    if h.state is State.DOWN:
        # "down #why": HAProxy 2.6 takes "down#why" (no space) for no state at
        # all and leaves the server up (tried: tests/test_farm_netns.py).
        return f"down #{_one_line(h.reason)}\n"
    if h.state is State.DRAIN:
        return "drain\n"
    return f"up ready {h.percent}% maxconn:{h.max_jobs}\n"


# keepalived MISC_CHECK misc_dynamic: 0 healthy (weight unchanged), 1 failed,
# 2..255 healthy with weight = code - 2.
EXIT_FAILED = 1


def keepalived_exit(h: Health) -> int:
    """The MISC_CHECK exit code: 1 down, 2 (weight 0) draining, 2 + pct up."""
    if h.state is State.DOWN:
        return EXIT_FAILED
    if h.state is State.DRAIN:
        return 2
    return 2 + h.percent


class BackendCheck:
    """Whether the backend accepts a connection, checked on demand and reused
    for BACKEND_CHECK_TTL seconds; concurrent askers share one check."""

    def __init__(self, address: Address | None) -> None:
        self.address = address
        self.ok: bool | None = None
        self.error: str | None = None
        self._checked: float | None = None
        self._lock = trio.Lock()

    async def refresh(self) -> None:
        if self.address is None:
            return  # inetd mode: the job is our own child, nothing to reach
        async with self._lock:
            now = trio.current_time()
            if self._checked is not None and now - self._checked < BACKEND_CHECK_TTL:
                return
            try:
                with trio.fail_after(BACKEND_CHECK_TIMEOUT):
                    stream = await connect(self.address)
                await trio.aclose_forcefully(stream)
                self.ok, self.error = True, None
            except (OSError, trio.TooSlowError) as e:
                self.ok, self.error = False, f"connect {self.address}: {e or 'timed out'}"
            self._checked = trio.current_time()

    def view(self) -> BackendView:
        return {"ok": self.ok, "error": self.error}


class Watched(Protocol):
    """What the agent reads (observe.metrics.Observatory)."""

    @property
    def backend(self) -> BackendCheck: ...

    def status(self, *, queue_memory: bool = True) -> StatusPicture: ...


class Agent:
    """HAProxy agent-check: one line per connection, then close."""

    def __init__(self, observatory: Watched) -> None:
        self.observatory = observatory

    async def line(self) -> str:
        await self.observatory.backend.refresh()
        # (The queue's kernel memory costs a syscall per queued client and
        # the verdict does not use it: HAProxy may ask every second.)
        return agent_line(health(self.observatory.status(queue_memory=False)))

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(AGENT_SEND_TIMEOUT):
                await stream.send_all((await self.line()).encode("ascii"))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(stream)
