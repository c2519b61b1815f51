"""How the compile went, from the first bytes of distccd's reply.

A compiler that the OOM killer stops does not break the connection: distccd
reports it inside a normal reply, ``DONE`` (protocol version) then ``STAT``
(the compiler's raw wait status), then the stderr, stdout and object file
tokens (distcc's src/serve.c, doc/protocol-1.txt). To the proxy such a job
looks like any other that ended cleanly, and its measured peak is the point
where it was cut short, not what it needed. Reading the status is what lets
gatekeeper say "killed by SIGKILL" in its log and refuse to learn a footprint
that would invite the next kill.

Only the first 24 bytes are needed; the splice reads exactly those, forwards
them untouched and carries on (see `copy.copy_both_ways`, ``reply_prefix``).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Final

from gatekeeper.distcc.request import TOKEN_LEN, is_hex8

REPLY_HEAD: Final = 2 * TOKEN_LEN
"""Bytes of a reply that carry DONE and STAT."""


@dataclass(frozen=True, slots=True)
class CompileStatus:
    """The compiler's wait status as distccd reported it."""

    wait_status: int

    @property
    def ok(self) -> bool:
        return self.wait_status == 0

    @property
    def signal(self) -> int | None:
        """The signal that ended the compiler, if one did (9 is what the OOM killer sends)."""
        return os.WTERMSIG(self.wait_status) if os.WIFSIGNALED(self.wait_status) else None

    @property
    def exit_code(self) -> int | None:
        return os.WEXITSTATUS(self.wait_status) if os.WIFEXITED(self.wait_status) else None

    def describe(self) -> str:
        """Short words for logs: ``ok``, ``exit-1``, ``killed-SIGKILL``."""
        sig = self.signal
        if sig is not None:
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = str(sig)
            return f"killed-{name}"
        code = self.exit_code
        if code is not None:
            return "ok" if code == 0 else f"exit-{code}"
        return f"status-{self.wait_status:#x}"


def parse_reply_status(data: bytes) -> CompileStatus | None:
    """The status in a reply head, or None if `data` does not start with a
    complete, well-formed ``DONE``/``STAT`` pair (an error reply, a backend
    that is not distccd, a reply cut short). Never raises."""
    if len(data) < REPLY_HEAD:
        return None
    done, stat = data[:TOKEN_LEN], data[TOKEN_LEN:REPLY_HEAD]
    if done[:4] != b"DONE" or stat[:4] != b"STAT":
        return None
    if not (is_hex8(done[4:]) and is_hex8(stat[4:])):
        return None
    return CompileStatus(int(stat[4:], 16))


def encode_reply_head(wait_status: int, *, version: int = 1) -> bytes:
    """The first bytes distccd sends back (for tests and benches)."""
    return b"DONE%08x" % version + b"STAT%08x" % wait_status
