"""Reading who a distcc job is from the head of its request, without consuming it.

A distcc client writes its whole request right after connecting:
``DIST`` (protocol version), in protocol 3 possibly ``CDIR`` (working
directory), ``ARGC`` (argument count), one ``ARGV`` per argument, then the
preprocessed source. Each token is 4 ASCII letters and 8 hex digits; string
tokens are followed by that many bytes (distcc's doc/protocol-1.txt).

gatekeeper needs the command line twice: the argv policy (`policy.py`)
checks it before the job may queue, and it names the output file and the
flags, which together identify a compile across rebuilds of the same tree, so
the memory a job needed last time can be looked up before it is admitted. The
parser works on a MSG_PEEK copy of the socket buffer, so the bytes still go to
distccd untouched. It never blocks, never raises on hostile input, and gives
up past fixed bounds: a head that starts with ``DIST`` but cannot be read is
UNREADABLE (refused by the policy; without it, passed as not distcc with the
default estimate), anything else is NOT_DISTCC.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Final

from gatekeeper.distcc.identity import Features, features, portable_key

TOKEN_LEN: Final = 12

# Bounds on what is worth reading: a real compile command line is a few KiB;
# Linux's own ARG_MAX is 2 MiB but distcc clients with such lines are not
# worth a bigger peek. Past these the job is treated as unknown.
MAX_ARGC: Final = 4096
MAX_HEADER: Final = 256 * 1024


@dataclass(frozen=True, slots=True)
class DistccJob:
    argv: tuple[str, ...]
    request_bytes: int | None = field(default=None, compare=False)
    """The whole request's length, head to the end of the source, when the
    DOTI token (protocols 1 and 2) was in the same look as the head; else None."""
    version: int = field(default=1, compare=False)
    """The protocol: 1 plain, 2 LZO-compressed, 3 pump mode."""
    shipped_bytes: int | None = field(default=None, compare=False)
    """Pump mode: the shipped files' compressed length, extrapolated from the
    files in the same look as the head to all NFIL of them; else None."""

    @property
    def key(self) -> str:
        """The compile's identity across checkouts and protocols (identity.py)."""
        return portable_key(self.argv)

    @property
    def features(self) -> Features:
        """What the head says of the compile's weight (identity.py)."""
        size = self.shipped_bytes if self.version == 3 else self.request_bytes
        return features(self.argv, version=self.version, size=size)

    @property
    def output(self) -> str | None:
        """The -o argument, for logs."""
        for i, arg in enumerate(self.argv[:-1]):
            if arg == "-o":
                return self.argv[i + 1]
        return None


class _Incomplete(Exception):
    pass


class _NotDistcc(Exception):
    pass


class _Unreadable(Exception):
    pass


class Unparsed(enum.Enum):
    INCOMPLETE = "incomplete"
    """A valid prefix that stops short: look again when more has arrived."""
    NOT_DISTCC = "not-distcc"
    """Cannot be a distcc request for distccd either: it does not start with
    ``DIST`` (distccd compares those 4 bytes first and gives up otherwise)."""
    UNREADABLE = "unreadable"
    """Starts like a distcc request, but gatekeeper cannot read it: malformed
    by its strict reading, or past its bounds. distccd's laxer reading
    (strtoul on each token's digits) or larger limits might still run it, so
    the argv policy refuses these; without the policy they pass as not distcc."""


INCOMPLETE: Final = Unparsed.INCOMPLETE
NOT_DISTCC: Final = Unparsed.NOT_DISTCC
UNREADABLE: Final = Unparsed.UNREADABLE


class HeadReader:
    """Reads a request head from successive looks at the same socket buffer
    (each look is the whole buffer from its first byte: MSG_PEEK), resuming
    after the last complete token, so a head that arrives in pieces is parsed
    once in all, not once per look (issue 16: a 49 KB head re-parsed every 5 ms
    cost 128 ms of CPU per connection)."""

    __slots__ = ("_argc", "_argv", "_pos", "_stage", "_version", "seen", "want_doti")

    # What the next token is: the version, CDIR-or-ARGC, or the ARGVs.
    _DIST, _COUNT, _ARGS = 0, 1, 2

    def __init__(self, *, want_doti: bool = False) -> None:
        self.want_doti = want_doti
        """Protocols 1 and 2: the head is complete only with the DOTI token
        after the arguments, so the request's length is known (the argv
        policy's request deadline needs it; a client must not be able to
        escape it by sending the token later)."""
        self._version = 0
        self._stage = self._DIST
        self._pos = 0
        self._argc = 0
        self._argv: list[str] = []
        self.seen = 0
        """How many bytes the last look had: a look with no more is not parsed."""

    def feed(self, data: bytes) -> DistccJob | Unparsed:
        """The head from this look at the buffer (a longer one than the last)."""
        self.seen = len(data)
        try:
            return self._parse(data)
        except _Incomplete:
            return INCOMPLETE if len(data) < MAX_HEADER else UNREADABLE
        except _Unreadable:
            return UNREADABLE
        except _NotDistcc:
            return NOT_DISTCC

    def _parse(self, data: bytes) -> DistccJob:
        if self._stage == self._DIST:
            if data[:1] == b"*":
                raise _Unreadable  # a GSSAPI handshake (`,auth`): argv follows unseen
            if not b"DIST".startswith(data[:4]):
                raise _NotDistcc
            name, version, pos = _token(data, 0)
            if name != b"DIST" or not 1 <= version <= 3:
                raise _Unreadable
            self._stage, self._pos, self._version = self._COUNT, pos, version
        if self._stage == self._COUNT:
            name, value, pos = _token(data, self._pos)
            if name == b"CDIR":  # protocol 3 (pump mode) sends the working directory first
                _, pos = _string(data, pos, value)
                name, value, pos = _token(data, pos)
            if name != b"ARGC" or value > MAX_ARGC:
                raise _Unreadable
            self._stage, self._pos, self._argc = self._ARGS, pos, value
        while len(self._argv) < self._argc:
            name, length, pos = _token(data, self._pos)
            if name != b"ARGV":
                raise _Unreadable
            arg, self._pos = _string(data, pos, length)
            self._argv.append(arg)
        request_bytes = self._request_bytes(data)
        if request_bytes is None and self.want_doti and self._version in (1, 2):
            # Raises _Incomplete until the token is in, _Unreadable if something else is.
            _token(data, self._pos)
            raise _Unreadable
        shipped = _shipped_bytes(data, self._pos) if self._version == 3 else None
        return DistccJob(tuple(self._argv), request_bytes=request_bytes,
                         version=self._version, shipped_bytes=shipped)

    def _request_bytes(self, data: bytes) -> int | None:
        """Head + DOTI token + source, if the DOTI token is already here."""
        end = self._pos + TOKEN_LEN
        if len(data) < end or data[self._pos:self._pos + 4] != b"DOTI":
            return None
        digits = data[self._pos + 4:end]
        return end + int(digits, 16) if is_hex8(digits) else None


# Pump mode's file count is believed up to this (a translation unit with more
# headers than this is not one gatekeeper has seen: Chromium's biggest have a
# few thousand).
MAX_FILES: Final = 100_000


def _shipped_bytes(data: bytes, pos: int) -> int | None:
    """Pump mode: NFIL n, then n x (NAME + FILE or LINK). The FILE lengths in
    this look, scaled to all n files; None if none is in it or anything is
    not as it should be (never raises: the head is already read)."""
    def token(at: int) -> tuple[bytes, int] | None:
        if len(data) < at + TOKEN_LEN or _TOKEN.match(data, at) is None:
            return None
        return data[at:at + 4], int(data[at + 4:at + TOKEN_LEN], 16)

    first = token(pos)
    if first is None or first[0] != b"NFIL" or not 0 < first[1] <= MAX_FILES:
        return None
    count, pos = first[1], pos + TOKEN_LEN
    seen = files = total = 0
    for _ in range(count):
        name = token(pos)
        if name is None or name[0] != b"NAME":
            break
        pos += TOKEN_LEN + name[1]
        body = token(pos)
        if body is None or body[0] not in (b"FILE", b"LINK"):
            break
        pos += TOKEN_LEN + body[1]
        seen += 1
        if body[0] == b"FILE":
            files += 1
            total += body[1]
    if not files:
        return None
    return total * count // seen


def parse_request_head(data: bytes) -> DistccJob | Unparsed:
    """Parse the head of a distcc request from `data` (a peeked prefix).

    Returns the job, INCOMPLETE if `data` is a valid prefix that stops short
    (peek again when more has arrived), NOT_DISTCC or UNREADABLE."""
    return HeadReader().feed(data)


def _token(data: bytes, pos: int) -> tuple[bytes, int, int]:
    if len(data) < pos + TOKEN_LEN:
        # A prefix of a token must itself look right so far.
        part = data[pos:]
        if not _plausible_prefix(part):
            raise _Unreadable
        raise _Incomplete
    if _TOKEN.match(data, pos) is None:
        raise _Unreadable
    return data[pos:pos + 4], int(data[pos + 4:pos + TOKEN_LEN], 16), pos + TOKEN_LEN


def _string(data: bytes, pos: int, length: int) -> tuple[str, int]:
    if length > MAX_HEADER:
        raise _Unreadable
    end = pos + length
    if len(data) < end:
        raise _Incomplete
    raw = data[pos:end]
    if b"\0" in raw:
        # distccd makes each string a C string: the program sees only what
        # comes before a NUL, so `-wrapper\0` would be checked as one option
        # and run as another.
        raise _Unreadable
    return raw.decode("utf-8", "surrogateescape"), end


# One regex per check instead of a loop over bytes: a 49 KB head of 4,096
# arguments parsed in 8.7 ms with per-byte checks (issue 16's CPU burn).
_TOKEN = re.compile(rb"[A-Z]{4}[0-9a-fA-F]{8}")
_HEX8 = re.compile(rb"[0-9a-fA-F]{8}")
_TOKEN_PREFIX = re.compile(rb"[A-Z]{0,4}|[A-Z]{4}[0-9a-fA-F]{0,8}")


def is_hex8(digits: bytes) -> bool:
    """A token's number field: exactly 8 hex digits."""
    return _HEX8.fullmatch(digits) is not None


def _plausible_prefix(part: bytes) -> bool:
    return _TOKEN_PREFIX.fullmatch(part) is not None


def encode_request_head(argv: list[str], *, version: int = 1) -> bytes:
    """The head a distcc client would send for `argv` (for tests and benches)."""
    out = [b"DIST%08x" % version, b"ARGC%08x" % len(argv)]
    for arg in argv:
        raw = arg.encode()
        out.append(b"ARGV%08x" % len(raw))
        out.append(raw)
    return b"".join(out)
