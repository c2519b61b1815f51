"""Bytes for people: the one formatter every log line, status text and
`gatekeeper status` uses, so a size reads the same everywhere."""

from __future__ import annotations

from typing import Literal

MIB = 2**20
GIB = 2**30


def format_bytes(n: float | None, *, unit: Literal["auto", "MiB", "GiB"] = "auto",
                 space: bool = True) -> str:
    """"512 MiB", "1.1 GiB" (`auto`: GiB from one GiB up); MiB are whole, GiB
    have one decimal. "?" for no value."""
    if n is None:
        return "?"
    gib = unit == "GiB" or (unit == "auto" and abs(n) >= GIB)
    text = f"{n / GIB:.1f}" if gib else f"{n / MIB:.0f}"
    return f"{text}{' ' if space else ''}{'GiB' if gib else 'MiB'}"


def format_mib(n: float | None, *, space: bool = True) -> str:
    """Always in whole MiB ("143MiB" with space=False, as the end line has it)."""
    return format_bytes(n, unit="MiB", space=space)
