"""Kernel-generated files (procfs, cgroupfs) read the cheap way: kept open,
re-read with one pread from offset 0. Every memory reading goes through here."""

from __future__ import annotations

import errno
import os


class KeptOpenFile:
    """A procfs/cgroupfs file opened once and re-read with `os.pread` from offset 0.

    Reopening a file per reading costs an open/close pair and a path walk on top of
    the read; pread on a kept fd is the cheapest way to get a fresh value (these
    files are generated at read time, so offset 0 is always the current text).
    """

    def __init__(self, path: str, *, size: int = 4096) -> None:
        self.path = path
        self._size = size
        self._fd: int | None = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def read(self) -> bytes:
        """The whole current content; raises OSError (ENODEV once the cgroup is removed)."""
        if self._fd is None:
            raise OSError(errno.EBADF, "closed", self.path)
        while True:
            data = os.pread(self._fd, self._size, 0)
            if len(data) < self._size:
                return data
            self._size *= 2  # a long memory.stat: learn the size once

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
