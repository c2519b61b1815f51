"""Held: many queued clients, each writing a request, and what holding them costs.

Run from the repository root: ``python3 bench/held.py [--clients N] [--idle S]
[--request-kib K] [--queued-window BYTES] [--mtu BYTES]``. As root it runs in a
network namespace of its own whose loopback has an Ethernet MTU (1500): with
loopback's own 65536 a client's capped send buffer is a single segment, and
Linux delays the ACK of a lone segment by 40 ms, which no farm sees.

gatekeeper runs with ``-j 1 --fair-by none``; a blocker job takes the one slot
(the backend holds it until told), then one client process opens N connections
one after another, each writing a K KiB request (default 256) that starts with
its sequence number, as far as TCP lets it: a request that does not fit waits
on the client, its write blocked, as a real distcc client's does. With all of
them queued, the bench reads:

* gatekeeper's RSS (``VmRSS`` in /proc/PID/status), before and while holding;
* the server side's kernel memory per queued connection: the receive memory
  of gatekeeper's accepted sockets as ``ss -tm`` shows it (skmem ``r``), apart
  from the clients' send buffers, which share this box only in the bench;
* the clients' side likewise (skmem ``t``, the send queue), for the record;
* the kernel's TCP memory (/proc/net/sockstat ``TCP ... mem``, in pages) and
  the MemAvailable drop (/proc/meminfo), both ends together;
* the CPU gatekeeper used (utime + stime, /proc/PID/stat) over `idle` seconds
  of holding.

Then the blocker is released and every queued job runs, one at a time, the
clients writing the rest of their requests; the backend records the order in
which the sequence numbers arrive, which must be 0, 1, 2, ... (global FIFO),
and compares each request's body with the pattern every client sends (a short
or corrupted request is recorded negated). Every phase is bounded in time; past
a bound the bench reports how far it got. RLIMIT_NOFILE is raised to the hard limit in the
bench's processes (gatekeeper raises its own). The kernel must be allowed to hold
every request: ``--raise-tcp-mem`` (root) raises net.ipv4.tcp_mem for the run if
it is too small, and puts it back after (``python3 -m bench`` passes it).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import multiprocessing as mp
import os
import random
import re
import resource
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bulk import free_port, wait_port

ROOT = Path(__file__).resolve().parent.parent
REQUEST = 256 * 1024
# Every request's body (after its 8-byte sequence number): pseudo-random, so a
# byte lost, doubled or moved shows when the backend compares.
PATTERN = b""
BLOCKER = 2**64 - 1
DEFAULT_CLIENT_SNDBUF = 32 * 1024
CLIENT_SNDBUF = DEFAULT_CLIENT_SNDBUF
PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")


def raise_nofile() -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _recv_exact(c: socket.socket, n: int, buf: memoryview) -> int:
    got = 0
    while got < n:
        k = c.recv_into(buf[got:n])
        if not k:
            break
        got += k
    return got


def _backend_main(lsock: socket.socket, conn: Connection) -> None:
    """Serve jobs one at a time; hold the blocker until told; send back the order."""
    order: list[int] = []
    buf = memoryview(bytearray(REQUEST))
    lsock.settimeout(5)
    deadline = None
    while True:
        if conn.poll() and conn.recv() == "stop":
            break
        if deadline is not None and time.monotonic() > deadline:
            break
        try:
            c, _ = lsock.accept()
        except TimeoutError:
            continue
        c.settimeout(30)
        with c, contextlib.suppress(OSError):
            if _recv_exact(c, 8, buf) < 8:
                continue  # a probe
            job = int.from_bytes(buf[:8], "big")
            if job == BLOCKER:
                conn.send("blocking")
                conn.recv()  # "release"
                deadline = time.monotonic() + 600
                continue
            if (_recv_exact(c, REQUEST - 8, buf[8:]) < REQUEST - 8
                    or buf[8:REQUEST] != PATTERN):
                order.append(-job - 1)  # short or corrupt request: recorded, negated
                continue
            order.append(job)
            c.sendall(b"ok")
    conn.send(order)


def _clients_main(port: int, n: int, serve_timeout: float, conn: Connection) -> None:
    """Open n connections in order, write each its request as far as TCP takes
    it; after "release", write the rest and read the replies."""
    raise_nofile()
    sel = selectors.DefaultSelector()
    payload = PATTERN
    assert len(payload) == REQUEST - 8
    socks: list[socket.socket] = []
    left: dict[int, memoryview] = {}
    error = ""

    def pump(timeout: float) -> None:
        for key, _ in sel.select(timeout):
            s: socket.socket = key.fileobj  # type: ignore[assignment]
            view = left[s.fileno()]
            try:
                k = s.send(view)
            except BlockingIOError:
                continue
            if k == len(view):
                del left[s.fileno()]
                sel.unregister(s)
            else:
                left[s.fileno()] = view[k:]

    t0 = time.monotonic()
    for i in range(n):
        try:
            s = socket.socket()
            # The clients of a farm are other machines: their send buffers are
            # capped here so that the kernel memory this shared box counts is
            # mostly the server side's (autotuned, 10,000 of them took 223 KiB
            # each and pushed tcp_mem to its limit: every job then crawled).
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CLIENT_SNDBUF)
            s.settimeout(10)
            s.connect(("127.0.0.1", port))
        except OSError as e:
            error = f"connect {i}: {e}"
            s.close()
            break
        s.setblocking(False)
        socks.append(s)
        # The sequence number alone first (a fresh socket takes 8 bytes), then
        # views of the one shared body: the clients' own memory stays small, so
        # MemAvailable's drop is the kernel's and gatekeeper's.
        view = memoryview(payload)
        try:
            if s.send(i.to_bytes(8, "big")) != 8:
                raise OSError("a fresh socket took less than 8 bytes")
            k = s.send(view)
        except BlockingIOError:
            k = 0
        except OSError as e:
            error = f"send {i}: {e}"
            break
        if k < len(view):
            left[s.fileno()] = view[k:]
            sel.register(s, selectors.EVENT_WRITE)
        if i % 64 == 0:
            pump(0)
    connect_time = time.monotonic() - t0
    # Write until every write blocks: nothing more moves while all are queued.
    deadline = time.monotonic() + 60
    while left and time.monotonic() < deadline:
        before = sum(len(v) for v in left.values())
        pump(0.5)
        if sum(len(v) for v in left.values()) == before:
            break
    conn.send((len(socks), len(socks) - len(left), connect_time, time.monotonic() - t0, error))
    conn.recv()  # "release": write the rest, read every reply to EOF
    for s in socks:
        if s.fileno() in left:
            sel.modify(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
        else:
            sel.register(s, selectors.EVENT_READ)
    served = 0
    deadline = time.monotonic() + serve_timeout
    open_ = len(socks)
    while open_ and time.monotonic() < deadline:
        for key, events in sel.select(1):
            s = key.fileobj  # type: ignore[assignment]
            if events & selectors.EVENT_WRITE:
                view = left[s.fileno()]
                try:
                    k = s.send(view)
                except BlockingIOError:
                    k = 0
                except OSError:
                    k = len(view)
                if k == len(view):
                    del left[s.fileno()]
                    sel.modify(s, selectors.EVENT_READ)
                else:
                    left[s.fileno()] = view[k:]
            if not events & selectors.EVENT_READ:
                continue
            try:
                data = s.recv(64)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                served += data == b"ok"
                continue
            sel.unregister(s)
            left.pop(s.fileno(), None)
            s.close()
            open_ -= 1
    conn.send(served)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14, 15)


def tcp_mem_pages() -> int:
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            words = line.split()
            return int(words[words.index("mem") + 1])
    return -1


def mem_available_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return -1


def skmem(port: int, side: str, field: str) -> list[int]:
    """One skmem field (``ss -tm``) of every established TCP socket whose
    `side` ("sport" or "dport") is `port`: a value per socket, in bytes."""
    out = subprocess.run(["ss", "-tmnH", "state", "established", f"( {side} = :{port} )"],
                         capture_output=True, text=True, check=False).stdout
    return [int(m) for m in re.findall(rf"skmem:\([^)]*?\b{field}(\d+)", out)]


TCP_MEM = Path("/proc/sys/net/ipv4/tcp_mem")


def tcp_mem_needed(clients: int, request: int) -> int:
    """Pages of kernel TCP memory that holding every request takes: measured at
    1.01 pages per page of request data (10,000 x 256 KiB held 660,261 pages),
    plus a margin."""
    return int(clients * request / PAGE * 1.15) + 16_384


@contextlib.contextmanager
def enough_tcp_mem(pages: int, allowed: bool) -> Iterator[str]:
    """Make the box's tcp_mem let the kernel hold `pages` (with `allowed`:
    raised for the run, put back after). Above its max the kernel stops taking
    data: the clients' sends stall and, once released, every job crawls
    (10,000 x 256 KiB on this box's 2.2 GiB: 6,805 sent in full, 1,237 served in
    300 s). Yields what was done, for the table."""
    old = TCP_MEM.read_text().split()
    low, pressure, high = (int(x) for x in old)
    if high >= pages:
        yield f"enough ({high} pages >= ~{pages} needed)"
        return
    if not allowed:
        yield (f"unchanged: {high} pages, below the ~{pages} whole requests would take "
               "(with a narrow --queued-window most of each waits unsent, outside it)")
        return
    TCP_MEM.write_text(f"{low} {max(pressure, pages)} {pages * 5 // 4}\n")
    try:
        yield f"raised for this run from {pressure} / {high} to {max(pressure, pages)} / " \
              f"{pages * 5 // 4} pages (~{pages} needed), put back after"
    finally:
        TCP_MEM.write_text(" ".join(old) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=10_000)
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of measured holding")
    ap.add_argument("--data-path", choices=("splice", "copy"), default="splice")
    ap.add_argument("--log-level", default="warning", help="gatekeeper's")
    ap.add_argument("--request-kib", type=int, default=256,
                    help="each client's request (the issue's case: 256)")
    ap.add_argument("--queued-window", type=int, default=None, metavar="BYTES",
                    help="gatekeeper's --queued-window (default: gatekeeper's default)")
    ap.add_argument("--client-sndbuf", type=int, default=DEFAULT_CLIENT_SNDBUF, metavar="BYTES",
                    help="each client's SO_SNDBUF (the kernel doubles it)")
    ap.add_argument("--serve-timeout", type=float, default=300.0,
                    help="bound on serving everyone after the release")
    ap.add_argument("--mtu", type=int, default=1500 if os.geteuid() == 0 else 0,
                    metavar="BYTES",
                    help="run in a network namespace of its own whose loopback has this "
                         "MTU (root; default as root 1500, a farm's Ethernet; 0: this "
                         "box's own loopback, MTU 65536, where the clients' capped send "
                         "buffers make one segment each)")
    ap.add_argument("--raise-tcp-mem", action="store_true",
                    help="if net.ipv4.tcp_mem is too small for the run, raise it for the "
                         "run and put it back after (root)")
    args = ap.parse_args()
    global REQUEST, PATTERN, CLIENT_SNDBUF  # read by the forked backend and client processes
    REQUEST = args.request_kib * 1024
    CLIENT_SNDBUF = args.client_sndbuf
    PATTERN = random.Random(22).randbytes(REQUEST - 8)
    with enough_tcp_mem(tcp_mem_needed(args.clients, REQUEST), args.raise_tcp_mem) as tcp_mem:
        limits = TCP_MEM.read_text().split()  # global, but not visible in another netns
        with own_loopback(args.mtu) if args.mtu else contextlib.nullcontext():
            _run(args, tcp_mem, limits)


CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def own_loopback(mtu: int) -> Iterator[None]:
    """Move this process, and so everything it forks, into a new network
    namespace whose loopback has `mtu`, and back at the end (where tcp_mem is
    put back: it is not visible from another namespace). Only while the
    process has one thread: unshare moves the calling thread alone.
    Loopback's own MTU of 65536 makes one segment of a client's 64 KiB send
    buffer, and Linux delays its ACK for a lone segment (40 ms): a bench
    artifact that a farm's Ethernet (MSS 1448) does not have."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        if libc.unshare(CLONE_NEWNET) != 0:
            raise SystemExit(f"held: --mtu: unshare: {os.strerror(ctypes.get_errno())}")
        try:
            subprocess.run(["ip", "link", "set", "lo", "up", "mtu", str(mtu)], check=True)
            yield
        finally:
            if libc.setns(home, CLONE_NEWNET) != 0:
                raise SystemExit(
                    f"held: could not return to this box's network namespace "
                    f"({os.strerror(ctypes.get_errno())}); if --raise-tcp-mem raised "
                    f"net.ipv4.tcp_mem, put it back by hand")
    finally:
        os.close(home)


def _run(args: argparse.Namespace, tcp_mem: str, limits: list[str]) -> None:
    nofile = raise_nofile()
    window = ("gatekeeper's default" if args.queued_window is None
              else str(args.queued_window))
    print(f"held: {args.clients} clients x {REQUEST // 1024} KiB, -j 1, --fair-by none, "
          f"--queued-window {window}, data path {args.data_path}, {os.cpu_count()} CPUs, "
          f"loopback MTU {args.mtu or 'of this box'}; "
          f"bench RLIMIT_NOFILE {nofile}")
    print("| measure | value |")
    print("|---|---|", flush=True)

    def row(name: str, value: str) -> None:
        print(f"| {name} | {value} |", flush=True)

    ctx = mp.get_context("fork")
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(64)
    b_mine, b_theirs = ctx.Pipe()
    backend = ctx.Process(target=_backend_main, args=(lsock, b_theirs), daemon=True)
    backend.start()
    port = free_port()
    # Closed with the process, at exit: it outlives every phase below.
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115
    gk = subprocess.Popen(
        [sys.executable, "-m", "gatekeeper", "--listen", f"127.0.0.1:{port}", "--backend",
         f"127.0.0.1:{lsock.getsockname()[1]}", "-j", "1", "--min-free-mb", "0",
         "--identify", "none", "--fair-by", "none", "--max-queue", str(args.clients + 100),
         # Every bench client is 127.0.0.1: the per-client cap must not bite here.
         "--max-queued-per-client", str(args.clients + 100),
         "--queue-timeout", "3600", "--data-path", args.data_path, "--log-level", args.log_level,
         *(() if args.queued_window is None else ("--queued-window", str(args.queued_window)))],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=log)
    lsock.close()
    mem0 = tcp_mem_pages()
    err = ""
    try:
        wait_port(port)
        time.sleep(0.5)
        rss0 = rss_kib(gk.pid)
        avail0 = mem_available_kib()
        row("kernel tcp_mem (pressure / max)", f"{int(limits[1]) * PAGE / 2**30:.2f} / "
            f"{int(limits[2]) * PAGE / 2**30:.2f} GiB: {tcp_mem}")
        row("gatekeeper RSS idle, before clients", f"{rss0 / 1024:.1f} MiB")
        blocker = socket.create_connection(("127.0.0.1", port))
        blocker.sendall(BLOCKER.to_bytes(8, "big"))
        if not b_mine.poll(10):
            raise RuntimeError("the blocker never reached the backend")
        b_mine.recv()
        c_mine, c_theirs = ctx.Pipe()
        clients = ctx.Process(target=_clients_main,
                              args=(port, args.clients, args.serve_timeout, c_theirs),
                              daemon=True)
        clients.start()
        if not c_mine.poll(600):
            raise RuntimeError("clients did not finish connecting in 600 s")
        opened, sent, connect_time, send_time, error = c_mine.recv()
        if error:
            row("client error", error)
        row("connections opened / request wholly written (the rest: writer blocked)",
            f"{opened} / {sent}")
        row("time to open all / to send all (send bounded at 60 s)",
            f"{connect_time:.1f} s / {send_time:.1f} s")
        time.sleep(2)  # let gatekeeper settle after the burst
        rss1 = rss_kib(gk.pid)
        mem1 = tcp_mem_pages()
        avail1 = mem_available_kib()
        server = skmem(port, "sport", "r")
        client = skmem(port, "dport", "w")
        row("gatekeeper RSS holding", f"{rss1 / 1024:.1f} MiB "
            f"({(rss1 - rss0) / max(opened, 1):.1f} KiB per queued client)")
        row("server side: receive memory per queued connection (ss skmem r; max)",
            f"{sum(server) / max(len(server), 1) / 1024:.1f} KiB "
            f"({max(server, default=0) / 1024:.1f} KiB; {len(server)} sockets)")
        row("client side: send queue per connection (ss skmem w)",
            f"{sum(client) / max(len(client), 1) / 1024:.1f} KiB")
        row("MemAvailable drop (both ends and gatekeeper)",
            f"{(avail0 - avail1) / 1024:.0f} MiB")
        row("kernel TCP memory (sockstat mem) before / holding",
            f"{mem0 * PAGE / 2**20:.0f} / {mem1 * PAGE / 2**20:.0f} MiB ({mem1} pages)")
        cpu0, w0 = cpu_seconds(gk.pid), time.monotonic()
        time.sleep(args.idle)
        cpu1, w1 = cpu_seconds(gk.pid), time.monotonic()
        row(f"gatekeeper CPU over {w1 - w0:.1f} s of holding",
            f"{cpu1 - cpu0:.2f} s = {100 * (cpu1 - cpu0) / (w1 - w0):.2f} % of a core "
            f"(RSS after: {rss_kib(gk.pid) / 1024:.1f} MiB)")
        b_mine.send("release")
        # shutdown, not just close: the client process, forked later, holds a copy.
        blocker.shutdown(socket.SHUT_RDWR)
        blocker.close()
        t_release = time.monotonic()
        c_mine.send("release")
        if not c_mine.poll(args.serve_timeout + 30):
            raise RuntimeError("the client process did not report")
        served_clients = c_mine.recv()
        serve_time = time.monotonic() - t_release
        b_mine.send("stop")
        order: list[int] = b_mine.recv() if b_mine.poll(30) else []
        in_order = sum(1 for i, job in enumerate(order) if job == i)
        inversions = sum(1 for a, b in itertools.pairwise(order) if b < a)
        row(f"served after release (backend saw / clients got ok; bounded at "
            f"{args.serve_timeout:g} s)", f"{len(order)} / {served_clients} in {serve_time:.1f} s")
        row("FIFO: jobs at their place / descents in order", f"{in_order} / {inversions}")
    finally:
        gk.terminate()
        try:
            gk.wait(30)
        except subprocess.TimeoutExpired:
            gk.kill()
            gk.wait()
        log.seek(0)
        err = log.read()
        backend.kill()
        backend.join(5)
    if err.strip():
        print("gatekeeper stderr (last lines):")
        print("\n".join(err.strip().splitlines()[-5:]))


if __name__ == "__main__":
    main()
