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
inherits it, and its first window.

And then the listener's buffer lock is cleared (SO_BUF_LOCK, Linux 5.14): a
buffer the user set also caps the window scale offered in the SYN-ACK
(tcp_openreq_init_rwin clamps the window to the locked buffer, and the scale
is derived from that clamp), and a connection without a scale can never have
more than 64 KiB in flight, one segment on loopback. Unlocked, the scale comes
from tcp_rmem/rmem_max as for any socket, capped by the listener's
TCP_WINDOW_CLAMP (`LISTENER_CLAMP`), while the first window and the buffer
still come from the narrow size. Measured on loopback, one 4 GiB stream after
the window opened: 4.8-5.0 GB/s unlocked against 1.6 GB/s locked (5.2 GB/s
never narrowed). A kernel without SO_BUF_LOCK keeps the lock, and the unscaled
window.

An unlocked buffer is not a fixed one, though: when a queue overflows, the
kernel raises the buffer to what it holds (tcp_clamp_window), and a scaled
window is rounded up to the scale's unit, so a client dribbling small segments
could grow a queued socket's buffer step by step (to 49 KiB, measured with
tcp_rmem[2] at 1 GiB, a 10G tuning, and the scale it brings; 23 KiB with the
scale capped, at MTU 1500). So each accepted narrow socket is locked
again at once (`hold_narrow`): the scale is agreed by then and stays.

At admission (`open_window`) the socket gets the kernel's usual first buffer
(128 KiB, tcp_rmem[1] on Debian) back, unlocked, so autotuning takes it from there like any
other connection's, and the clamp is lifted. A locked 4 MiB buffer instead is
capped by net.core.rmem_max (Debian: 208 KiB), measured at 3.0 GB/s against
5.0 GB/s autotuned with Debian's rmem_max.

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
# doubles it for its bookkeeping). Measured on loopback, 20 clients each
# writing until blocked, with the listener's lock cleared as above: 4096 holds
# 6 KiB of request per queued connection (8.4 KiB of receive memory), 6144
# holds 10 KiB (12.4 KiB), 8192 holds 14 KiB (16.4 KiB). 4096 keeps a queued
# client well under the 16 KiB target and still holds a whole distcc request
# head (typically well under 1 KiB; the head reader widens the window for a
# longer one).
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
# What an admitted job's socket starts from: the kernel's usual first buffer
# (tcp_rmem[1] is 128 KiB on Debian; SO_RCVBUF is doubled, hence the half),
# then autotuning grows it as the relay reads, up to tcp_rmem[2]. A buffer a
# long head widened past it is kept.
OPEN_RCVBUF = 64 * 1024
# Where SO_BUF_LOCK is missing the buffer stays locked, so it gets what a fast
# stream needs at once: capped at net.core.rmem_max and doubled; a limit, not
# an allocation (the relay empties the queue as it fills).
OPEN_RCVBUF_LOCKED = 4 << 20
# TCP_WINDOW_CLAMP at admission: the narrow buffer also clamped the window
# (tcp_init_buffer_space); lift it past anything the buffer allows.
OPEN_CLAMP = 1 << 30
# SO_BUF_LOCK (asm-generic/socket.h, Linux 5.14; not in Python's socket
# module; sparc and parisc number it otherwise, and there it fails cleanly):
# which of the SO_SNDBUF (1) / SO_RCVBUF (2) locks are set. Without the
# receive lock the kernel autotunes the buffer.
SO_BUF_LOCK = 72
SOCK_RCVBUF_LOCK = 2
# TCP_WINDOW_CLAMP on the listener: the window scale offered in the SYN-ACK is
# derived from it when the buffer is unlocked (tcp_select_initial_window), so
# this caps the scale at 9 (512-byte units, 32 MiB of window at most), whatever
# tcp_rmem[2] says; a narrow window rounded up to a larger unit would hold
# more than asked (scale 14, at a 1 GiB tcp_rmem[2]: 16 KiB units).
LISTENER_CLAMP = 16 << 20
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


def _is_tcp(sock: socket.socket) -> bool:
    return sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM


def narrow_listener(sock: socket.socket, size: int) -> None:
    """Give every connection `sock` accepts from now on a receive buffer of
    `size` bytes (0: leave the kernel's), with a window scale all the same."""
    if size and _is_tcp(sock):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_WINDOW_CLAMP, LISTENER_CLAMP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        receive_lock(sock, False)


def hold_narrow(sock: socket.socket) -> None:
    """An accepted narrow socket: lock its buffer again, so that nothing grows
    it before admission (the scale is agreed by now)."""
    receive_lock(sock, True)


def receive_lock(sock: socket.socket, locked: bool) -> bool:
    """Set or clear `sock`'s receive buffer lock (SO_BUF_LOCK), keeping the
    buffer's size and the send buffer's lock; False where the kernel cannot
    (before 5.14)."""
    try:
        locks = int(sock.getsockopt(socket.SOL_SOCKET, SO_BUF_LOCK))
        want = locks | SOCK_RCVBUF_LOCK if locked else locks & ~SOCK_RCVBUF_LOCK
        if want != locks:
            sock.setsockopt(socket.SOL_SOCKET, SO_BUF_LOCK, want)
    except OSError:
        return False
    return True


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


def open_window(sock: socket.socket) -> None:
    """Let the client send at full speed: the kernel's first buffer, autotuned
    from there, and no clamp. The client learns of the wider window from the
    next ACK, which our first read sends (tcp_cleanup_rbuf); nothing was
    dropped, so nothing waits on a retransmission. A socket already gone is
    left to whoever reads it. Only for a narrow socket (`is_narrow`; a head
    may have widened it since)."""
    if not _is_tcp(sock):
        return
    with contextlib.suppress(OSError):
        # Never below what a long head widened it to: a locked buffer smaller
        # than its queue is the drop-and-back-off case above.
        now = int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
        if now < 2 * OPEN_RCVBUF:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, OPEN_RCVBUF)
        if not receive_lock(sock, False) and now < 2 * OPEN_RCVBUF_LOCKED:
            set_buffer(sock, socket.SO_RCVBUF, SO_RCVBUFFORCE, OPEN_RCVBUF_LOCKED)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_WINDOW_CLAMP, OPEN_CLAMP)
