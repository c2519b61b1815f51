"""Client-supplied text made safe for a one-line-per-event log.

A distcc client names its output file (`-o`), and that name is logged as
``job=``. Written raw, a name holding ``\\n`` or escape sequences forged whole
lines (``gatekeeper: INFO: end ... outcome=ok``) or rewrote the terminal
(issue 16). `printable` keeps what is plainly printable and writes everything
else as a Python-style escape, so a line stays one line, its ``key=value``
fields stay separable (a space is escaped too), and the original bytes can be
read back: non-UTF-8 bytes (decoded with surrogateescape) come out as
``\\xNN``. Pure: used by the text format; JSON escapes for itself.
"""

from __future__ import annotations

# Logged values are bounded too: a command line's output name is short, and a
# 200 KB one would make each of its lines 200 KB.
MAX_LOGGED = 256


def printable(text: str, *, limit: int = MAX_LOGGED) -> str:
    """`text` with control, space, backslash, non-printable and undecodable
    characters escaped, cut to `limit` characters (then marked with ``...``)."""
    cut = len(text) > limit
    out = []
    for ch in text[:limit]:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch == "\\":
            out.append("\\\\")
        elif ch.isprintable() and ch != " ":
            out.append(ch)
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out) + ("..." if cut else "")
