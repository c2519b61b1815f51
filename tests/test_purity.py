"""h11's rule made executable: the policy and the judgements are plain code.

The modules that decide (admission, fairness, footprints, learning, outcome,
the argv policy and the request-head parser)
import neither trio nor socket, so they can be fed events and times and
tested without I/O, and no decision can hide an await."""

from __future__ import annotations

import subprocess
import sys

import pytest

PURE = ("admission", "backfill", "fairness", "footprints", "learning", "outcome", "pausing",
        "prediction", "accuracy", "distcc.policy", "distcc.identity", "net.proxy_header",
        "farm.ledger",
        "observe.escape", "observe.logbudget",
        "distcc.request")
FORBIDDEN = ("trio", "socket")


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_neither_trio_nor_socket(module: str) -> None:
    probe = (f"import sys; import gatekeeper.{module}; "
             f"print(' '.join(m for m in {FORBIDDEN!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True)
    assert done.stdout.split() == [], f"gatekeeper.{module} imports {done.stdout.strip()}"


def test_the_probe_can_fail() -> None:
    """The same probe on a module that does import trio names it."""
    probe = ("import sys; import gatekeeper.gate; "
             f"print(' '.join(m for m in {FORBIDDEN!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True)
    assert "trio" in done.stdout.split()
