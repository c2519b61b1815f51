"""A peer's /status, cut down to what the farm view shows (pure).

A peer's status came over the network: it is kept only as the fields the `/`
page and `gatekeeper status --farm` show, each checked for its type, numbers
finite, strings escaped (observe.escape) and bounded, lists bounded. So what
a peer sends can neither crash this box when it serves `/farm` (a document
nested just under json's limit, re-encoded deeper in the stack, raised
RecursionError; NaN made the browser's JSON.parse reject the whole page) nor
put control characters on an admin's terminal.

Pure: no trio, no socket, no clock (tests/test_purity.py checks the imports).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final

from gatekeeper.observe.escape import printable

MAX_TEXT: Final = 200
# Jobs and queue entries kept per peer: what /status itself shows at most.
MAX_ITEMS: Final = 200
MAX_COUNTERS: Final = 32

_INTS = ("running", "max_jobs", "queued", "max_queue", "available_bytes", "min_free_bytes",
         "reserved_bytes", "next_job_bytes", "job_footprint_bytes", "admitted_total",
         "backfilled_total")
_TEXTS = ("version", "hold", "measuring")


def _int(value: object) -> int | None:
    return value if type(value) is int and abs(value) < 2**63 else None


def _number(value: object) -> float | None:
    if type(value) in (int, float) and math.isfinite(float(value)):  # type: ignore[arg-type]
        return float(value)  # type: ignore[arg-type]
    return None


def _text(value: object) -> str | None:
    return printable(value[:MAX_TEXT * 4])[:MAX_TEXT] if isinstance(value, str) else None


def _job(entry: object) -> dict[str, object] | None:
    if not isinstance(entry, Mapping):
        return None
    return {"job": _text(entry.get("job")), "peer": _text(entry.get("peer")),
            "state": _text(entry.get("state")),
            "running_seconds": _number(entry.get("running_seconds")),
            "paused_seconds": _number(entry.get("paused_seconds")),
            "estimate_bytes": _int(entry.get("estimate_bytes")),
            "charge_bytes": _int(entry.get("charge_bytes"))}


def _queued(entry: object) -> dict[str, object] | None:
    if not isinstance(entry, Mapping):
        return None
    return {"peer": _text(entry.get("peer")), "job": _text(entry.get("job")),
            "waiting_seconds": _number(entry.get("waiting_seconds"))}


def sanitize(status: object) -> dict[str, object]:
    """The fields of a peer's /status the farm view shows, safe to show."""
    doc = status if isinstance(status, Mapping) else {}
    out: dict[str, object] = {name: _int(doc.get(name)) for name in _INTS}
    out.update((name, _text(doc.get(name))) for name in _TEXTS)
    health = doc.get("health")
    if isinstance(health, Mapping):
        out["health"] = {"state": _text(health.get("state")),
                         "reason": _text(health.get("reason")),
                         "percent": _int(health.get("percent"))}
    backend = doc.get("backend")
    if isinstance(backend, Mapping):
        ok = backend.get("ok")
        out["backend"] = {"ok": ok if ok is None or type(ok) is bool else None,
                          "error": _text(backend.get("error"))}
    pausing = doc.get("pausing")
    if isinstance(pausing, Mapping):
        out["pausing"] = {name: _int(pausing.get(name)) for name in
                          ("floor_bytes", "resume_bytes", "paused", "pauses_total",
                           "cuts_total")}
    for name in ("completed_total", "rejected_total"):
        counts = doc.get(name)
        if isinstance(counts, Mapping):
            out[name] = {printable(str(k))[:40]: _int(v)
                         for k, v in list(counts.items())[:MAX_COUNTERS]}
    for name, each in (("jobs", _job), ("queue", _queued)):
        items = doc.get(name)
        if isinstance(items, list):
            out[name] = [e for e in (each(x) for x in items[:MAX_ITEMS]) if e is not None]
    return out
