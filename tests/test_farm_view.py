"""A peer's /status cut down to what the farm view shows (farm/view.py)."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from gatekeeper.farm.view import MAX_ITEMS, MAX_TEXT, sanitize


def test_what_the_view_shows_is_kept() -> None:
    status = {"version": "0.1.0", "running": 1, "max_jobs": 2, "queued": 0,
              "available_bytes": 3 * 2**30, "health": {"state": "up", "reason": None,
                                                        "percent": 50},
              "pausing": {"paused": 1, "pauses_total": 3, "cuts_total": 0},
              "jobs": [{"job": "src/a.o", "peer": "10.0.0.7:5", "state": "running",
                        "running_seconds": 1.5, "estimate_bytes": 9, "charge_bytes": 8}],
              "backend": {"ok": True, "error": None}, "secret": {"x": 1}}
    out = sanitize(status)
    assert out["running"] == 1 and out["health"] == {"state": "up", "reason": None,
                                                      "percent": 50}
    assert out["jobs"] == [{"job": "src/a.o", "peer": "10.0.0.7:5", "state": "running",
                            "running_seconds": 1.5, "paused_seconds": None,
                            "estimate_bytes": 9, "charge_bytes": 8}]
    assert "secret" not in out


def test_hostile_fields_are_made_harmless() -> None:
    status = {"version": "\x1b[2J" + "x" * 5000, "running": [1], "max_jobs": True,
              "queued": 2**80, "health": "up", "backend": {"ok": [1], "error": 5},
              "jobs": [{"job": {"toString": 1}, "running_seconds": float("nan")}] * 500,
              "completed_total": {str(i): i for i in range(100)}}
    out = sanitize(status)
    version = out["version"]
    assert isinstance(version, str) and "\x1b" not in version and len(version) <= MAX_TEXT
    assert out["running"] is None and out["max_jobs"] is None and out["queued"] is None
    assert "health" not in out and out["backend"] == {"ok": None, "error": None}
    jobs = out["jobs"]
    assert isinstance(jobs, list) and len(jobs) == MAX_ITEMS
    assert jobs[0]["job"] is None and jobs[0]["running_seconds"] is None
    assert isinstance(out["completed_total"], dict) and len(out["completed_total"]) == 32
    json.dumps(out, allow_nan=False)  # what /farm sends is strict JSON


def test_deep_nesting_is_dropped_not_re_encoded() -> None:
    deep: object = []
    for _ in range(50_000):
        deep = [deep]
    out = sanitize({"jobs": [deep], "health": {"state": deep}})
    assert out["jobs"] == [] and out["health"] == {"state": None, "reason": None,
                                                    "percent": None}
    json.dumps(out)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=6), max_leaves=40)


@given(st.dictionaries(st.sampled_from(["version", "running", "jobs", "queue", "health",
                                        "backend", "pausing", "completed_total", "x"]),
                       json_values))
def test_any_status_sanitizes_to_strict_json(status: dict[str, object]) -> None:
    json.dumps(sanitize(status), allow_nan=False)
