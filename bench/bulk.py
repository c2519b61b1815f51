"""Bulk throughput: 1 GiB one way and 1 GiB echoed through gatekeeper and its peers.

Run from the repository root:
``python3 bench/bulk.py [--gib N] [--rounds N] [--mode one-way|echoed|both]``.

Peers on the same loopback workload, in one run, interleaved round by round so
a noisy machine hurts them alike: a direct connection, systemd-socket-proxyd
(C, splice; under systemd-socket-activate), HAProxy in TCP mode, and
gatekeeper with its zero-copy (splice) and buffer-copy data paths. Reports the
best of the rounds per peer, in GB/s and as a ratio to systemd-socket-proxyd.
"Echoed": the client sends N bytes while it reads them back from an echo
backend, concurrently (both directions of the proxy busy at once); the rate is
N / time, i.e. bytes one way.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 4 * 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sink:
    """A backend that counts and drops what it receives, then answers 'ok'."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        view = memoryview(bytearray(CHUNK))
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            # A reset (wait_port's probe through a proxy) ends that connection only.
            with conn, contextlib.suppress(OSError):
                left = _length(conn)
                while left > 0:
                    n = conn.recv_into(view[:min(CHUNK, left)])
                    if not n:
                        break
                    self._received(conn, view[:n])
                    left -= n
                if left == 0:
                    self._done(conn)

    def _received(self, conn: socket.socket, data: memoryview) -> None:
        pass  # dropped

    def _done(self, conn: socket.socket) -> None:
        conn.sendall(b"ok")


class Echo(Sink):
    """A backend that sends back everything it receives (after the length header)."""

    def _received(self, conn: socket.socket, data: memoryview) -> None:
        conn.sendall(data)

    def _done(self, conn: socket.socket) -> None:
        pass


def _length(conn: socket.socket) -> int:
    """The 8-byte length a bulk client sends first, so no half-close is needed
    (systemd-socket-proxyd would not pass it on); 0 if the peer left early."""
    header = b""
    while len(header) < 8:
        more = conn.recv(8 - len(header))
        if not more:
            return 0
        header += more
    return int.from_bytes(header, "big")


def wait_port(port: int, timeout: float = 10.0) -> None:
    """Wait for an external daemon to listen (bounded; there is no event to wait on)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {port}")


def one_way(port: int, total: int) -> float:
    """Send `total` bytes, wait for the reply; seconds taken."""
    payload = memoryview(bytes(CHUNK))
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(total.to_bytes(8, "big"))
        sent = 0
        while sent < total:
            n = min(CHUNK, total - sent)
            c.sendall(payload[:n])
            sent += n
        reply = c.recv(16)
    elapsed = time.perf_counter() - start
    if reply != b"ok":
        raise RuntimeError(f"bad reply {reply!r} on port {port}")
    return elapsed


def echoed(port: int, total: int) -> float:
    """Send `total` bytes from a thread while reading them back; seconds taken."""
    payload = memoryview(bytes(CHUNK))
    buf = memoryview(bytearray(CHUNK))
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as c:
        def send() -> None:
            c.sendall(total.to_bytes(8, "big"))
            sent = 0
            while sent < total:
                n = min(CHUNK, total - sent)
                c.sendall(payload[:n])
                sent += n

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        got = 0
        while got < total:
            n = c.recv_into(buf)
            if not n:
                break
            got += n
        sender.join()
    elapsed = time.perf_counter() - start
    if got != total:
        raise RuntimeError(f"echoed {got} of {total} bytes on port {port}")
    return elapsed


@contextmanager
def process(argv: list[str], port: int, **kw: object) -> Iterator[int]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            **kw)  # type: ignore[call-overload]
    try:
        wait_port(port)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def gatekeeper(backend: int, data_path: str, *, scraped: bool = False,
               extra: tuple[str, ...] = ()) -> Callable[[], object]:
    """A gatekeeper peer; with `scraped`, --metrics on and /metrics fetched every 0.2 s
    while it works (issue 5: metrics must not slow the data path); `extra`
    flags appended."""
    @contextmanager
    def start() -> Iterator[int]:
        # Ports are picked at each start, not up front: a port picked early could be
        # taken meanwhile as an ephemeral port by another peer's connections.
        port = free_port()
        argv = [sys.executable, "-m", "gatekeeper", "--listen", f"127.0.0.1:{port}",
                "--backend", f"127.0.0.1:{backend}", "--min-free-mb", "0", "--identify",
                "none", "--data-path", data_path, "--log-level", "warning", *extra]
        metrics_port = free_port()
        if scraped:
            argv += ["--metrics", f"127.0.0.1:{metrics_port}"]
        with process(argv, port, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}):
            if not scraped:
                yield port
                return
            wait_port(metrics_port)
            stop = threading.Event()
            scraper = threading.Thread(target=scrape, args=(metrics_port, stop), daemon=True)
            scraper.start()
            try:
                yield port
            finally:
                stop.set()
                scraper.join(5)

    return start


def scrape(port: int, stop: threading.Event) -> None:
    while not stop.wait(0.2):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            while c.recv(65536):
                pass


def socket_proxyd(backend: int) -> Callable[[], object] | None:
    binary = next((p for p in ("/lib/systemd/systemd-socket-proxyd",
                               "/usr/lib/systemd/systemd-socket-proxyd") if Path(p).exists()),
                  None)
    if binary is None or shutil.which("systemd-socket-activate") is None:
        return None
    return lambda: (port := free_port(), process(
        ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", binary, f"127.0.0.1:{backend}"],
        port))[1]


def haproxy(backend: int, tmp: Path) -> Callable[[], object] | None:
    if shutil.which("haproxy") is None:
        return None
    def start() -> object:
        port = free_port()
        cfg = tmp / "haproxy.cfg"
        cfg.write_text(config(port))
        return process(["haproxy", "-f", str(cfg), "-db"], port)

    def config(port: int) -> str:
        return f"""global
    maxconn 1000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
listen bulk
    bind 127.0.0.1:{port}
    server sink 127.0.0.1:{backend}
"""

    return start


def run_mode(mode: str, total: int, rounds: int) -> dict[str, float]:
    """Best seconds per peer, peers interleaved round by round."""
    backend: Sink = Echo() if mode == "echoed" else Sink()
    measure = echoed if mode == "echoed" else one_way
    with tempfile.TemporaryDirectory() as tmp:
        peers: dict[str, Callable[[], object] | None] = {
            "direct": None,
            "systemd-socket-proxyd": socket_proxyd(backend.port),
            "haproxy": haproxy(backend.port, Path(tmp)),
            "gatekeeper (splice)": gatekeeper(backend.port, "splice"),
            "gatekeeper (splice, --metrics scraped 5/s)": gatekeeper(backend.port, "splice",
                                                                     scraped=True),
            "gatekeeper (copy)": gatekeeper(backend.port, "copy"),
            # The kernel's windows (with window scaling) instead of the narrow
            # queued window that opens to 64 KiB at admission (net/window.py).
            "gatekeeper (splice, --queued-window 0)": gatekeeper(
                backend.port, "splice", extra=("--queued-window", "0")),
        }
        best: dict[str, float] = {}
        for _ in range(rounds):
            for name, start in peers.items():
                if name != "direct" and start is None:
                    continue
                if start is None:
                    seconds = measure(backend.port, total)
                else:
                    with start() as port:  # type: ignore[attr-defined]
                        measure(port, 64 * 2**20)  # warm-up
                        seconds = measure(port, total)
                best[name] = min(best.get(name, float("inf")), seconds)
    backend.sock.close()
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mode", choices=("one-way", "echoed", "both"), default="both")
    args = ap.parse_args()
    total = int(args.gib * 2**30)
    modes = ("one-way", "echoed") if args.mode == "both" else (args.mode,)
    for mode in modes:
        best = run_mode(mode, total, args.rounds)
        ref = best.get("systemd-socket-proxyd")
        print(f"{args.gib:g} GiB {mode}, best of {args.rounds} rounds, "
              f"{os.cpu_count()} CPUs, loopback")
        print("| path | GB/s | vs systemd-socket-proxyd |")
        print("|---|---|---|")
        for name, seconds in best.items():
            rate = total / seconds / 1e9
            ratio = f"{ref / seconds:.2f}x" if ref else "-"
            print(f"| {name} | {rate:.2f} | {ratio} |")
        print(flush=True)


if __name__ == "__main__":
    main()
