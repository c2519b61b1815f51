"""Finding one TCP socket's inode by its exact addresses, through the kernel's sock_diag.

The meter needs the inode of the backend's end of each job's connection (to find
the process serving it). /proc/net/tcp answers that only by listing every TCP
socket on the host: 38,000 lines and 5 MB after a burst of small jobs, most of
them TIME_WAIT, read and searched under the GIL. NETLINK_SOCK_DIAG answers the
one question asked: an ``inet_diag_req_v2`` naming the four-tuple is looked up
in the kernel's hash tables and one ``inet_diag_msg`` comes back (linux/
inet_diag.h, sock_diag(7)); about 10 us whatever the host's socket count.

`SockDiag` keeps one netlink socket open and is used from one thread at a time
(the meter's worker). Where netlink is refused (not Linux, a seccomp filter),
`SockDiag.open` returns None and the caller falls back to /proc/net/tcp.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import struct
from typing import Final

NETLINK_SOCK_DIAG: Final = 4
SOCK_DIAG_BY_FAMILY: Final = 20
NLM_F_REQUEST: Final = 0x01
NLMSG_ERROR: Final = 2
INET_DIAG_NOCOOKIE: Final = 0xFFFFFFFF
ALL_STATES: Final = 0xFFFFFFFF

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# inet_diag_req_v2: family, protocol, ext, pad, states; then inet_diag_sockid:
# sport, dport (network order), src[16], dst[16] (network order), if, cookie[2].
_REQ = struct.Struct("=BBBxI")
_SOCKID = struct.Struct("!HH16s16s")
_SOCKID_TAIL = struct.Struct("=III")
# inet_diag_msg: family, state, timer, retrans, sockid (48 bytes), expires,
# rqueue, wqueue, uid, inode.
_INODE_OFFSET: Final = 4 + 48 + 16


class SockDiag:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._seq = 0

    @classmethod
    def open(cls) -> SockDiag | None:
        family = getattr(socket, "AF_NETLINK", None)
        if family is None:
            return None
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                                 NETLINK_SOCK_DIAG)
            sock.settimeout(1.0)  # the kernel answers at once; never hang the meter
        except OSError:
            return None
        return cls(sock)

    def inode(self, local: tuple[str, int], remote: tuple[str, int]) -> int | None:
        """Inode of the TCP socket whose own end is `local` and whose peer is
        `remote`; None if there is no such socket. Raises OSError if netlink
        itself fails (the caller may fall back)."""
        try:
            lhost = ipaddress.ip_address(local[0].split("%", 1)[0])
            rhost = ipaddress.ip_address(remote[0].split("%", 1)[0])
        except ValueError:
            return None
        if lhost.version != rhost.version:
            return None
        af = socket.AF_INET if lhost.version == 4 else socket.AF_INET6
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        body = (_REQ.pack(af, socket.IPPROTO_TCP, 0, ALL_STATES)
                + _SOCKID.pack(local[1], remote[1], lhost.packed.ljust(16, b"\0"),
                               rhost.packed.ljust(16, b"\0"))
                + _SOCKID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE))
        header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY,
                                NLM_F_REQUEST, self._seq, 0)
        self._sock.send(header + body)
        while True:
            reply = self._sock.recv(8192)
            if len(reply) < _NLMSGHDR.size:
                raise OSError(errno.EPROTO, "short sock_diag reply")
            length, kind, _, seq, _ = _NLMSGHDR.unpack_from(reply)
            if seq != self._seq:
                continue  # an answer to an earlier question that timed out
            if kind == NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", reply, _NLMSGHDR.size)
                if code in (0, -errno.ENOENT):
                    return None
                raise OSError(-code, os.strerror(-code))
            if kind != SOCK_DIAG_BY_FAMILY or length < _NLMSGHDR.size + _INODE_OFFSET + 4:
                raise OSError(errno.EPROTO, f"unexpected sock_diag reply type {kind}")
            # The kernel's lookup falls back to a listener on the local port when
            # no connection matches (its peer port is 0): only a connection with
            # the ports asked counts. (Addresses are not compared: a dual-stack
            # backend's socket answers with the IPv4-mapped form of the ones asked.)
            sport, dport = struct.unpack_from("!HH", reply, _NLMSGHDR.size + 4)
            if (sport, dport) != (local[1], remote[1]):
                return None
            (inode,) = struct.unpack_from("=I", reply, _NLMSGHDR.size + _INODE_OFFSET)
            return inode or None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()
