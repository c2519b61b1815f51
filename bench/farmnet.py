"""A farm on one machine, in network namespaces: boxes, a director, clients.

Shared by tests/test_farm_netns.py (what must hold) and bench/farm.py (what it
costs, against HAProxy round-robin over bare distccd). Needs root, iproute2's
`ip`, util-linux's `nsenter`, distcc, HAProxy and the v1 memory controller.

Everything is created here and removed in `finally`: namespaces (a bridge in
a namespace of its own, veth pairs, 10.77.0.0/24: nothing touches the host's
network), memory cgroups, processes (each in its own session, stopped by
process group). Processes join a namespace's network only (`nsenter --net`):
`ip netns exec` would also remount /sys, and the cgroup hierarchies mounted
below it would vanish for them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy"
                                      if Path("/usr/sbin/haproxy").exists() else None)
V1_MEMORY = Path("/sys/fs/cgroup/memory")
NEEDED = ("ip", "nsenter", "distcc", "distccd", "make", "g++")
NET = "gkf-net"
DIRECTOR = "10.77.0.2"
AGENT, METRICS, PORT, DISTCCD_PORT = 3635, 3634, 3632, 3633
REPO = Path(__file__).resolve().parent.parent
_ENV_DROP = ("DISTCC", "CCACHE", "MAKE", "MFLAGS", "GNUMAKE")


@dataclass(frozen=True)
class Box:
    name: str
    address: str
    memory_mib: int


# Sizes that make round-robin hurt (bench/farm.py): the bench's heavy files are
# charged ~243 MiB each; the smallest box holds one, not two.
BOXES = (Box("gkf-box1", "10.77.0.11", 1024), Box("gkf-box2", "10.77.0.12", 768),
         Box("gkf-box3", "10.77.0.13", 384))


def why_not() -> str | None:
    """Why this machine cannot build the farm (None: it can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, memory cgroups)"
    missing = [n for n in NEEDED if shutil.which(n) is None]
    if missing or HAPROXY is None:
        return f"needs {', '.join(missing + ([] if HAPROXY else ['haproxy']))}"
    if not (V1_MEMORY / "cgroup.procs").exists():
        return "needs the cgroup v1 memory controller at /sys/fs/cgroup/memory"
    probe = subprocess.run(["ip", "netns", "add", "gkf-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create network namespaces: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "gkf-probe"], capture_output=True)
    return None


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_ENV_DROP)}
    env["LC_ALL"] = "C"
    env.update(extra or {})
    return env


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def in_ns(ns: str, argv: Sequence[str]) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{ns}", *argv]


@contextlib.contextmanager
def network(clients: Mapping[str, str]) -> Iterator[None]:
    """The namespaces: the bridge's, the director's, each box's, each client's
    (`clients`: namespace name -> address)."""
    hosts = {"gkf-dir": DIRECTOR, **{b.name: b.address for b in BOXES}, **clients}
    names = [NET, *hosts]
    for name in names:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)  # a crashed run's
    try:
        for name in names:
            ip("netns", "add", name)
            ip("-n", name, "link", "set", "lo", "up")
        ip("-n", NET, "link", "add", "br0", "type", "bridge")
        ip("-n", NET, "link", "set", "br0", "up")
        for i, (name, address) in enumerate(hosts.items()):
            ip("-n", NET, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0",
               "netns", name)
            ip("-n", NET, "link", "set", f"v{i}", "master", "br0")
            ip("-n", NET, "link", "set", f"v{i}", "up")
            ip("-n", name, "link", "set", "eth0", "up")
            ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
        yield
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


class Procs:
    """Every process started, each in its own session, logged to a file."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("wb") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=env or clean_env(),
                                    start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def wait_for(self, name: str, pattern: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.log(name)):
            if self.procs[name].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name}: no {pattern!r}:\n{self.log(name)[-3000:]}")
            time.sleep(0.05)  # another process's log: no event to wait on

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait(5)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


@contextlib.contextmanager
def cgroups() -> Iterator[dict[str, Path]]:
    """Each box's v1 memory cgroup, at its size; emptied and removed after."""
    made: dict[str, Path] = {}
    try:
        for box in BOXES:
            path = V1_MEMORY / f"{box.name}-{os.getpid()}"
            path.mkdir()
            (path / "memory.limit_in_bytes").write_text(str(box.memory_mib * 2**20))
            with contextlib.suppress(OSError):
                (path / "memory.swappiness").write_text("0")
            made[box.name] = path
        yield made
    finally:
        for path in made.values():
            for _ in range(50):
                for pid in (path / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), 9)
                try:
                    path.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


def oom_kills(cgroup: Path) -> int:
    for line in (cgroup / "memory.oom_control").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return 0


def start_distccd(procs: Procs, box: Box, cgroup: Path, work: Path, *, listen: str,
                  port: int, jobs: int) -> None:
    tmp = work / f"{box.name}-tmp"
    tmp.mkdir(mode=0o1777, exist_ok=True)
    tmp.chmod(0o1777)
    enter = ["sh", "-c", f'echo $$ > "{cgroup}/cgroup.procs" && exec "$@"', "sh"]
    allow = ["--allow", "127.0.0.1"] if listen == "127.0.0.1" else ["--allow", "10.77.0.0/24"]
    procs.start(f"{box.name}-distccd", in_ns(box.name, [
        *enter, shutil.which("distccd") or "distccd", "--daemon", "--no-detach",
        "--log-stderr", "--log-level", "info", "--listen", listen, "--port", str(port),
        *allow, "--jobs", str(jobs), "--user", "distccd"]), clean_env({"TMPDIR": str(tmp)}))
    procs.wait_for(f"{box.name}-distccd", "daemon started")


def start_gatekeeper(procs: Procs, box: Box, cgroup: Path, work: Path,
                     extra: Sequence[str] = ()) -> None:
    peers = [arg for other in BOXES if other is not box
             for arg in ("--peer", f"http://{other.address}:{METRICS}")]
    env = clean_env({"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})
    procs.start(f"{box.name}-gk", in_ns(box.name, [
        sys.executable, "-m", "gatekeeper", "--listen", f"{box.address}:{PORT}",
        "--backend", f"127.0.0.1:{DISTCCD_PORT}", "--cgroup", str(cgroup),
        "--allow", "10.77.0.0/24", "--fair-by", "client", "--trusted-proxy", DIRECTOR,
        "--agent", f"{box.address}:{AGENT}", "--agent-allow", DIRECTOR,
        "--metrics", f"{box.address}:{METRICS}", "--metrics-allow", "10.77.0.0/24",
        *peers, "--state-dir", str(work / f"{box.name}-state"), "--log-level", "info",
        *extra]), env)
    procs.wait_for(f"{box.name}-gk", rf"listening on {re.escape(box.address)}:{PORT}")


def start_box(procs: Procs, box: Box, cgroup: Path, work: Path,
              extra: Sequence[str] = ()) -> None:
    """distccd on the box's loopback in its cgroup, gatekeeper in front."""
    start_distccd(procs, box, cgroup, work, listen="127.0.0.1", port=DISTCCD_PORT, jobs=4)
    start_gatekeeper(procs, box, cgroup, work, extra)


def start_director(procs: Procs, work: Path, *, gatekeeper: bool = True,
                   maxconn: int = 2) -> Path:
    """HAProxy. With gatekeeper: send-proxy-v2, health checks (`check
    check-send-proxy`: HAProxy heeds an agent's `down` only with checks on the
    server's own port) and agent-check. Without: round-robin straight to each
    box's distccd, which then listens on the box's address."""
    sock = work / "haproxy.sock"
    if gatekeeper:
        options = (f"send-proxy-v2 maxconn {maxconn} weight 100 check check-send-proxy "
                   f"inter 1s agent-check agent-port {AGENT} agent-inter 200ms")
    else:
        options = "weight 100"
    servers = "\n".join(f"    server {b.name} {b.address}:{PORT} {options}" for b in BOXES)
    cfg = work / "haproxy.cfg"
    cfg.write_text(f"""global
    stats socket {sock} mode 600 level admin
defaults
    mode tcp
    timeout connect 2s
    timeout client 300s
    timeout server 300s
    timeout queue 300s
frontend distcc
    bind {DIRECTOR}:{PORT}
    default_backend farm
backend farm
    balance roundrobin
{servers}
""")
    assert HAPROXY is not None
    procs.start("haproxy", in_ns("gkf-dir", [HAPROXY, "-db", "-f", str(cfg)]))
    return sock


def haproxy_state(sock: Path) -> dict[str, str]:
    """Each box's status as HAProxy's stats socket says it."""
    return {name: row[17] for name, row in haproxy_rows(sock).items()}


def haproxy_sessions(sock: Path) -> dict[str, int]:
    """Each box's sessions so far (`stot`): connections HAProxy sent it."""
    return {name: int(row[7] or 0) for name, row in haproxy_rows(sock).items()}


def haproxy_rows(sock: Path) -> dict[str, list[str]]:
    """`show stat` rows of the farm's servers, by box name."""
    out = subprocess.run(in_ns("gkf-dir", [
        sys.executable, "-c", "import socket,sys; s=socket.socket(socket.AF_UNIX);"
        f"s.connect({str(sock)!r}); s.sendall(b'show stat\\n');"
        "sys.stdout.write(s.makefile().read())"]), capture_output=True, text=True,
        timeout=10).stdout
    names = {b.name for b in BOXES}
    rows = {}
    for line in out.splitlines():
        fields = line.split(",")
        if len(fields) > 17 and fields[0] == "farm" and fields[1] in names:
            rows[fields[1]] = fields
    return rows


def until(what: str, check: object, timeout: float = 30.0) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"never {what}")
        time.sleep(0.2)  # other processes' state: polled, bounded


def make(client_ns: str, project_root: Path, work: Path, name: str, *, jobs: int,
         fallback: bool, timeout: float = 600.0) -> tuple[subprocess.CompletedProcess[str], float]:
    """`make -k -jN` in a client's namespace with the stock distcc client
    through the director; (the result, seconds)."""
    distcc_dir = work / f"distcc-{name}"
    distcc_dir.mkdir()
    env = clean_env({"DISTCC_HOSTS": f"{DIRECTOR}:{PORT}/{max(jobs, 4)}",
                     "DISTCC_FALLBACK": "1" if fallback else "0",
                     "DISTCC_BACKOFF_PERIOD": "0", "DISTCC_IO_TIMEOUT": "300",
                     "DISTCC_DIR": str(distcc_dir)})
    begin = time.monotonic()
    done = subprocess.run(in_ns(client_ns, ["make", "-k", f"-j{jobs}", "-C", str(project_root)]),
                          env=env, capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - begin


def farm_view(box: Box) -> str:
    """The box's /farm, as JSON text ("" if it does not answer)."""
    url = f"http://{box.address}:{METRICS}/farm"
    return subprocess.run(in_ns(box.name, [
        sys.executable, "-c", f"import urllib.request,sys;sys.stdout.write(urllib.request"
        f".urlopen({url!r},timeout=3).read().decode())"]),
        capture_output=True, text=True, timeout=10).stdout
