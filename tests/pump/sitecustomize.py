"""distcc pump mode's include server, made to run on Debian bookworm's Python 3.11.

Debian's `distcc-pump` ships its C helper (`distcc_pump_c_extensions`) built
without PY_SSIZE_T_CLEAN, so on Python 3.10+ every call that passes a
length-counted string raises SystemError and the include server dies: stock
pump then silently preprocesses on the client (distcc-facts.md). The tests
put this directory on the include server's PYTHONPATH; Python runs this file
at start-up, and it installs the same eight functions, written in Python,
under the module's name before the include server imports it. Test support
only: nothing of gatekeeper runs here.

The wire format is distcc's (doc/protocol-3.txt): tokens of 4 letters and 8
hex digits, strings after their length; LZO1X-1 through python3-lzo.
"""

from __future__ import annotations

import os
import sys
import types

import lzo  # type: ignore[import-not-found]


def _read_exactly(fd: int, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = os.read(fd, n - len(out))
        if not chunk:
            raise OSError("include server: client closed mid-request")
        out += chunk
    return out


def _token(fd: int, name: bytes) -> int:
    raw = _read_exactly(fd, 12)
    if raw[:4] != name:
        raise OSError(f"include server: expected {name!r}, got {raw[:4]!r}")
    return int(raw[4:], 16)


def _string(fd: int, name: bytes) -> str:
    return _read_exactly(fd, _token(fd, name)).decode("latin-1")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def RCwd(fd: int) -> str:
    return _string(fd, b"CDIR")


def RArgv(fd: int) -> list[str]:
    return [_string(fd, b"ARGV") for _ in range(_token(fd, b"ARGC"))]


def XArgv(fd: int, argv: list[str]) -> None:
    out = [b"ARGC%08x" % len(argv)]
    for arg in argv:
        raw = arg.encode("latin-1")
        out += [b"ARGV%08x" % len(raw), raw]
    _write_all(fd, b"".join(out))


def CompressLzo1xAlloc(text: str | bytes) -> bytes:
    data = text.encode("latin-1") if isinstance(text, str) else text
    return bytes(lzo.compress(data, 1, False))


module = types.ModuleType("distcc_pump_c_extensions")
module.RCwd = RCwd  # type: ignore[attr-defined]
module.RArgv = RArgv  # type: ignore[attr-defined]
module.XArgv = XArgv  # type: ignore[attr-defined]
module.CompressLzo1xAlloc = CompressLzo1xAlloc  # type: ignore[attr-defined]
module.OsPathExists = os.path.exists  # type: ignore[attr-defined]
module.OsPathIsFile = os.path.isfile  # type: ignore[attr-defined]
module.Realpath = os.path.realpath  # type: ignore[attr-defined]
module.Version = lambda: "3.4-gatekeeper-tests"  # type: ignore[attr-defined]
sys.modules["distcc_pump_c_extensions"] = module
