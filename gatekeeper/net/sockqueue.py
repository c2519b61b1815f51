"""What waits in a socket's kernel queues: how many bytes (Linux ioctls with
an int result: one syscall, the data untouched), and a copy of the first ones
(MSG_PEEK: they stay for whoever reads next)."""

from __future__ import annotations

import fcntl
import socket
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


def peek_now(sock: socket.socket, size: int) -> bytes | None:
    """Up to `size` bytes at the head of the receive queue, without taking
    them and without waiting: None if nothing is there yet; b"" when the peer
    closed before sending anything or the socket failed. `sock` is any object
    with a file descriptor and family/type/proto (a trio socket too)."""
    raw = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.fileno())
    try:
        return raw.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None
    except OSError:
        return b""
    finally:
        raw.detach()  # the fd stays the caller's
