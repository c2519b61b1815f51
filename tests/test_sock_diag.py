"""Finding a TCP socket's inode by its exact addresses: sock_diag and the /proc fallback."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from gatekeeper.memory.meter import SocketFinder, _table_inode
from gatekeeper.memory.sock_diag import SockDiag


@pytest.fixture
def diag() -> Iterator[SockDiag]:
    d = SockDiag.open()
    if d is None:
        print("SKIP: no NETLINK_SOCK_DIAG here")
        pytest.skip("no NETLINK_SOCK_DIAG here")
    yield d
    d.close()


def _pair(family: int, host: str, *, v6only: bool = True
          ) -> tuple[socket.socket, socket.socket, socket.socket]:
    listener = socket.socket(family)
    if family == socket.AF_INET6:
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
    listener.bind((host, 0))
    listener.listen()
    return listener, *_connect(listener, "127.0.0.1" if not v6only else host)


def _connect(listener: socket.socket, host: str) -> tuple[socket.socket, socket.socket]:
    client = socket.create_connection((host, listener.getsockname()[1]))
    server, _ = listener.accept()
    return client, server


def _ends(sock: socket.socket) -> tuple[tuple[str, int], tuple[str, int]]:
    local, remote = sock.getsockname(), sock.getpeername()
    return (local[0], local[1]), (remote[0], remote[1])


@pytest.mark.parametrize(("family", "host"), [(socket.AF_INET, "127.0.0.1"),
                                              (socket.AF_INET6, "::1")])
def test_both_ends_of_a_connection_are_found_exactly(diag: SockDiag, family: int,
                                                     host: str) -> None:
    listener, client, server = _pair(family, host)
    with listener, client, server:
        for sock in (client, server):
            local, remote = _ends(sock)
            assert diag.inode(local, remote) == os.fstat(sock.fileno()).st_ino
            assert _table_inode(local, remote) == os.fstat(sock.fileno()).st_ino


def test_no_such_connection_is_none_not_the_listener(diag: SockDiag) -> None:
    """The kernel falls back to the listener on the port asked; that is not an answer."""
    listener, client, server = _pair(socket.AF_INET, "127.0.0.1")
    with listener, client, server:
        local, _ = _ends(server)
        assert diag.inode(local, ("127.0.0.1", 1)) is None
        assert diag.inode(("127.0.0.1", 1), ("127.0.0.1", 2)) is None
        assert diag.inode(("not an address", 1), ("127.0.0.1", 2)) is None
        assert diag.inode(("127.0.0.1", 1), ("::1", 2)) is None


def test_a_dual_stack_backend_socket_is_found_from_the_ipv4_side(diag: SockDiag) -> None:
    """A backend listening on [::] serves an IPv4 client with an IPv4-mapped socket;
    gatekeeper knows the connection by its IPv4 addresses."""
    listener, client, server = _pair(socket.AF_INET6, "::", v6only=False)
    with listener, client, server:
        assert server.getsockname()[0].startswith("::ffff:")
        ours, theirs = _ends(client)
        assert diag.inode(theirs, ours) == os.fstat(server.fileno()).st_ino


def test_the_finder_falls_back_to_proc_net_tcp_without_netlink() -> None:
    listener, client, server = _pair(socket.AF_INET, "127.0.0.1")
    finder = SocketFinder()
    try:
        finder.close()  # as if netlink had been refused
        local, remote = _ends(server)
        assert finder.inode(local, remote) == os.fstat(server.fileno()).st_ino
    finally:
        for s in (listener, client, server):
            s.close()
