"""How a connection ended, told right, against the real distccd (issue 15's
mislabels): a connect-then-close never asked for a job, an HTTP GET or random
bytes are the client's error (distccd closes or resets on them), and a client
that goes away mid-compile is not a failed compile."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator

import pytest
from distcc_harness import DistccServer, GatekeeperProcess, exchange, missing_binaries

from gatekeeper.distcc.request import encode_request_head

MISSING = missing_binaries()
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)} on PATH "
                       "(Debian: apt-get install -y distcc g++ make)"),
]

END = re.compile(r"end peer=\S+ outcome=(?P<outcome>\S+) .*")


@pytest.fixture(scope="module")
def gk() -> Iterator[tuple[DistccServer, GatekeeperProcess]]:
    # A compile held 5 s: time for a client to leave while it runs.
    with DistccServer(jobs=2, hold_s=5) as d, GatekeeperProcess(
            ["--listen", "127.0.0.1:0", "--backend", d.address, "--max-jobs", "2"]) as g:
        yield d, g


def ends(g: GatekeeperProcess) -> list[str]:
    return [line for line in g.log_lines if END.search(line)]


def one_more_end(g: GatekeeperProcess, before: int) -> str:
    assert g.wait_until(lambda lines: len([x for x in lines if END.search(x)]) > before, 30)
    return ends(g)[before]


def test_connect_then_close_is_client_gone(gk: tuple[DistccServer, GatekeeperProcess]) -> None:
    _, g = gk
    before = len(ends(g))
    socket.create_connection(("127.0.0.1", g.port), timeout=5).close()
    line = one_more_end(g, before)
    assert "outcome=client-gone" in line and "in=0 out=0" in line, line


# Random bytes behind a NUL: a first byte of "*" (a GSSAPI handshake) or "DIST"
# would make the argv policy refuse them instead (test_hostile).
@pytest.mark.parametrize("payload", [b"GET / HTTP/1.0\r\n\r\n", b"\0" + os.urandom(4999)],
                         ids=["http-get", "random-5000"])
def test_bytes_that_are_not_distcc_are_the_clients_error(
        gk: tuple[DistccServer, GatekeeperProcess], payload: bytes) -> None:
    _, g = gk
    before = len(ends(g))
    assert exchange(g.port, payload) == b""
    line = one_more_end(g, before)
    assert "outcome=client-error" in line and "not a distcc request" in line, line


def test_a_client_gone_mid_compile_is_not_a_failed_compile(
        gk: tuple[DistccServer, GatekeeperProcess]) -> None:
    d, g = gk
    source = b"int f(void) { return 42; }\n"
    argv = ["gcc", "-c", "gone.c", "-o", "gone.o"]
    request = encode_request_head(argv) + b"DOTI%08x" % len(source) + source
    before = len(ends(g))
    compiles = d.compile_log().count
    s = socket.create_connection(("127.0.0.1", g.port), timeout=5)
    s.sendall(request)
    # The compile has started (the wrapper logs its start; it holds for 5 s).
    assert d.wait_for_compile_start(compiles + 1, timeout=20)
    s.close()  # as a killed client's kernel does: a FIN mid-compile
    line = one_more_end(g, before)
    # Gone (its FIN passed on first) or a client error (distccd's answer met a
    # closed socket): either way the client's doing, and no compile verdict.
    assert re.search(r"outcome=client-(gone|error) ", line), line
    assert "compile=" not in line, line  # distccd's EXIT_IO_ERROR 107 is about the client
