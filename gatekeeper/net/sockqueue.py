"""What waits in a socket's kernel queues: how many bytes (Linux ioctls with
an int result: one syscall, the data untouched), what the receive queue costs
the kernel (SO_MEMINFO), and a copy of the first bytes (MSG_PEEK: they stay
for whoever reads next)."""

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


# SO_MEMINFO (linux/sock_diag.h; not in Python's socket module): the socket's
# memory as `ss -tm` shows it (skmem), SK_MEMINFO_VARS u32s; [0] is rmem_alloc,
# the receive queue's memory with the kernel's per-packet overhead, [1] the
# receive buffer's size.
SO_MEMINFO = 55
_MEMINFO = struct.Struct("9I")


def receive_memory(sock: socket.socket) -> tuple[int, int]:
    """(kernel memory the receive queue holds, the receive buffer's size), in
    bytes. `sock` is any object with getsockopt (a trio socket too)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, _MEMINFO.size)
    values = _MEMINFO.unpack(raw[:_MEMINFO.size].ljust(_MEMINFO.size, b"\0"))
    return values[0], values[1]


def receive_memory_of(fd: int) -> int:
    """The kernel memory the receive queue of the socket at `fd` holds (0 if
    it is not a socket any more)."""
    try:
        raw = socket.socket(fileno=fd)
    except OSError:
        return 0
    try:
        return receive_memory(raw)[0]
    except OSError:
        return 0
    finally:
        raw.detach()


def set_buffer(sock: socket.socket, option: int, force: int, size: int) -> None:
    """SO_RCVBUF/SO_SNDBUF (`option`) to `size`: as root past net.core's
    rmem_max/wmem_max (`force`: SO_RCVBUFFORCE/SO_SNDBUFFORCE), otherwise up
    to them. OSError if neither can be set."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, option, size)


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
