"""A waiting client's receive window: narrow from the handshake, opened at admission.

A distcc client writes its whole request at once, and TCP moves as much of it
as our receive window allows; while the job waits nobody reads, so all of that
sits in this box's kernel memory (131 KiB per queued connection at Debian's
tcp_rmem default, measured with ``ss -tm``), and the rest waits on the client,
blocked in its own write().

The window has to be narrow from the start. Linux never shrinks a window it
has offered (tcp_select_window, net.ipv4.tcp_shrink_window = 0), and the first
one is offered in the SYN-ACK, before accept(): a TCP_WINDOW_CLAMP set after
accept stops the growth but not the initial 64 KiB (measured: 76-125 KiB of
receive memory per queued connection either way), and a receive buffer shrunk
under an offered window makes the kernel drop what arrives, so the client backs
its retransmissions off (a stall of over 60 s measured after the window
opened, and a queued client that waits long enough would time out). So the
narrow buffer is set on the listener (`narrow_listener`): every accepted socket
inherits it, and its first window. The price: Linux derives the window scale
from the same buffer, so these connections get none and an admitted job's
window opens to 64 KiB at most (`open_window`). Single-stream loopback,
measured: 0.7-1.0 GB/s against 1.4-3.9 GB/s; a LAN with a 0.2 ms round trip
still gets 320 MB/s, above gigabit line rate. ``--queued-window 0`` keeps the
kernel's windows (and the scale) for links that need more.

Whether a socket is narrow is read from the socket itself (`is_narrow`), not
from the configuration: a socket-activated listener keeps the buffer a previous
run set on it, and connections accepted before the listener was narrowed are
not. Only TCP: a unix socket's buffer is the sender's.
"""

from __future__ import annotations

import contextlib
import socket

from gatekeeper.net.sockqueue import set_buffer

# --queued-window's default, in bytes (SO_RCVBUF on the listener; the kernel
# doubles it for its bookkeeping). Measured on loopback (MTU 65536 and 1500),
# 20 clients each writing 2 MiB: 4096 holds 4.0-4.2 KiB of request per queued
# connection (5.6-6.7 KiB of receive memory), 8192 holds 12-12.7 KiB (14-15
# KiB). 4096 keeps a queued client under the 16 KiB target with room to spare
# and still holds a whole distcc request head (typically well under 1 KiB;
# the head reader opens the window for a longer one).
DEFAULT_QUEUED_WINDOW = 4096
# The largest --queued-window: SO_RCVBUF is doubled by the kernel, and a socket
# whose buffer is below NARROW_BELOW counts as narrow (the kernel's own first
# buffer, tcp_rmem[1], is 128 KiB on Debian, and never below 64 KiB in practice).
MAX_QUEUED_WINDOW = 16 * 1024
NARROW_BELOW = 64 * 1024
# A long request head widens a narrow window step by step, at most to this:
# a head is at most 256 KiB (distcc.request.MAX_HEADER, refused past it), and
# the kernel doubles the buffer for its overhead per packet. It is also what a
# client that never finishes its head can make a connection hold until the
# request deadline refuses it (before the narrow window: 128 KiB each, the
# kernel's default).
WIDEN_MAX = 512 * 1024
# What an admitted job's socket gets. SO_RCVBUF is capped at net.core.rmem_max
# (208 KiB on Debian, so 416 KiB) and doubled; a limit, not an allocation: an
# unscaled connection never has more than 64 KiB in flight, and the relay
# empties the queue as it fills. Asking for more than rmem_max is harmless.
OPEN_RCVBUF = 4 << 20
# TCP_WINDOW_CLAMP at admission: the listener's narrow buffer also clamped the
# window (tcp_openreq_init_rwin); lift it past anything the buffer allows.
OPEN_CLAMP = 1 << 30
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


def _is_tcp(sock: socket.socket) -> bool:
    return sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM


def narrow_listener(sock: socket.socket, size: int) -> None:
    """Give every connection `sock` accepts from now on a receive buffer of
    `size` bytes (0: leave the kernel's)."""
    if size and _is_tcp(sock):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def is_narrow(sock: socket.socket) -> bool:
    """Whether this accepted TCP socket still has a narrow receive buffer."""
    if not _is_tcp(sock):
        return False
    try:
        return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)) < NARROW_BELOW
    except OSError:
        return False


def widen(sock: socket.socket, size: int) -> None:
    """Let a narrow socket take `size` bytes more or less (a long head), and
    no more: the buffer and the clamp both. As root past net.core.rmem_max
    (SO_RCVBUFFORCE; Debian's 212,992 would stop a 256 KiB head short)."""
    with contextlib.suppress(OSError):
        set_buffer(sock, socket.SO_RCVBUF, SO_RCVBUFFORCE, size)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_WINDOW_CLAMP, size)


def open_window(sock: socket.socket, size: int = OPEN_RCVBUF) -> None:
    """Let the client send at full speed: a receive buffer of `size` and no
    clamp. The client learns of the wider window from the next ACK, which our
    first read sends (tcp_cleanup_rbuf); nothing was dropped, so nothing waits
    on a retransmission. A socket already gone is left to whoever reads it.
    Only for a narrow socket (`is_narrow`; a head may have widened it since):
    setting SO_RCVBUF turns off the kernel's buffer autotuning, which a socket
    with a window scale needs."""
    if not _is_tcp(sock):
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_WINDOW_CLAMP, OPEN_CLAMP)
