"""How many bytes wait in a socket's kernel queues (Linux ioctls with an int
result): read without touching the data, so they cost one syscall each."""

from __future__ import annotations

import fcntl
import struct
import termios

_INT = struct.Struct("i")


def _int_ioctl(fd: int, request: int) -> int:
    return int(_INT.unpack(fcntl.ioctl(fd, request, b"\0" * _INT.size))[0])


def receive_queue(fd: int) -> int:
    """Bytes in our receive queue, not yet read by us (FIONREAD; a FIN is not
    counted)."""
    return _int_ioctl(fd, termios.FIONREAD)


def send_queue(fd: int) -> int:
    """Bytes we sent that the peer has not taken yet (TIOCOUTQ; for AF_UNIX, 0
    exactly when the peer has read everything)."""
    return _int_ioctl(fd, termios.TIOCOUTQ)
