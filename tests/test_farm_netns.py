"""A farm on one machine (issue 20): three boxes, a director, a client, each in
a network namespace this test creates (a bridge in a namespace of its own, veth
pairs, 10.77.0.0/24; nothing touches the host's network).

Each box: a v1 memory cgroup of its own size, a real distccd in it on the box's
loopback, and gatekeeper in front (--agent, --metrics, --peer the other two,
--trusted-proxy the director, --state-dir). The director: real HAProxy,
send-proxy-v2 and agent-check. The client: the stock distcc client and make.

Asserted (not timings; those are the bench's):
- the farm builds the project with 0 failed compiles, every job seen by the box
  that ran it as coming from the client (the PROXY header), never the director;
- after one farm-wide build, a second build's jobs are known (est_from=learned)
  on whichever box runs them: over 90 %, including jobs on boxes that never
  compiled that file before (shared footprints);
- a box whose distccd is killed is taken out by HAProxy after the agent's
  next check, and a build with client fallback still completes.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from distcc_harness import PROJECT_ROOT, clean_env, generate_project

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy"
                                      if Path("/usr/sbin/haproxy").exists() else None)
V1_MEMORY = Path("/sys/fs/cgroup/memory")
NEEDED = ("ip", "nsenter", "distcc", "distccd", "make", "g++")


def _why_not() -> str | None:
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


WHY_NOT = _why_not()
pytestmark = [pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or ""),
              pytest.mark.timeout(600)]

NET = "gkf-net"
DIRECTOR, CLIENT = "10.77.0.2", "10.77.0.3"
BOXES = {"gkf-box1": ("10.77.0.11", 1024), "gkf-box2": ("10.77.0.12", 768),
         "gkf-box3": ("10.77.0.13", 512)}  # name: (address, memory cgroup limit MiB)
AGENT, METRICS, PORT = 3635, 3634, 3632
END = re.compile(r"end peer=(?P<peer>\S+) outcome=(?P<outcome>\S+) .*? job=(?P<job>\S+)"
                 r"(?: compile=\S+)?(?: est=\d+MiB est_from=(?P<source>\w+))?")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def in_ns(ns: str, argv: list[str]) -> list[str]:
    """`argv` in the namespace's network only: `ip netns exec` would also
    remount /sys, and the cgroup hierarchies mounted below it would be gone."""
    return ["nsenter", f"--net=/run/netns/{ns}", *argv]


@contextlib.contextmanager
def network() -> Iterator[None]:
    names = [NET, "gkf-dir", "gkf-cli", *BOXES]
    for name in names:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)  # a crashed run's
    try:
        for name in names:
            ip("netns", "add", name)
            ip("-n", name, "link", "set", "lo", "up")
        ip("-n", NET, "link", "add", "br0", "type", "bridge")
        ip("-n", NET, "link", "set", "br0", "up")
        hosts = {"gkf-dir": DIRECTOR, "gkf-cli": CLIENT,
                 **{name: address for name, (address, _) in BOXES.items()}}
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
    """Every process the test starts, each in its own session, logged to a file."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        out = (self.logs / f"{name}.log").open("wb")
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
                raise AssertionError(f"{name}: no {pattern!r}:\n{self.log(name)[-3000:]}")
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
    made: dict[str, Path] = {}
    try:
        for name, (_, limit) in BOXES.items():
            path = V1_MEMORY / f"{name}-{os.getpid()}"
            path.mkdir()
            (path / "memory.limit_in_bytes").write_text(str(limit * 2**20))
            made[name] = path
        yield made
    finally:
        for path in made.values():
            for _ in range(50):
                pids = (path / "cgroup.procs").read_text().split()
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), 9)
                try:
                    path.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


def start_box(procs: Procs, name: str, cgroup: Path, work: Path) -> None:
    address, _ = BOXES[name]
    tmp = work / f"{name}-tmp"
    tmp.mkdir(mode=0o1777)
    tmp.chmod(0o1777)
    enter = ["sh", "-c", f'echo $$ > "{cgroup}/cgroup.procs" && exec "$@"', "sh"]
    procs.start(f"{name}-distccd", in_ns(name, [*enter, shutil.which("distccd") or "distccd",
                "--daemon", "--no-detach", "--log-stderr", "--log-level", "info",
                "--listen", "127.0.0.1", "--port", "3633", "--allow", "127.0.0.1",
                "--jobs", "4", "--user", "distccd"]), clean_env({"TMPDIR": str(tmp)}))
    procs.wait_for(f"{name}-distccd", "daemon started")
    peers = [arg for other, (a, _) in BOXES.items() if other != name
             for arg in ("--peer", f"http://{a}:{METRICS}")]
    env = clean_env({"PYTHONPATH": str(PROJECT_ROOT), "PYTHONUNBUFFERED": "1"})
    procs.start(f"{name}-gk", in_ns(name, [
        sys.executable, "-m", "gatekeeper", "--listen", f"{address}:{PORT}",
        "--backend", "127.0.0.1:3633", "--cgroup", str(cgroup), "--max-jobs", "2",
        "--min-free-mb", "32", "--allow", "10.77.0.0/24", "--fair-by", "client",
        "--trusted-proxy", DIRECTOR, "--agent", f"{address}:{AGENT}",
        "--agent-allow", DIRECTOR, "--metrics", f"{address}:{METRICS}",
        "--metrics-allow", "10.77.0.0/24", *peers, "--state-dir", str(work / f"{name}-state"),
        "--log-level", "info"]), env)
    procs.wait_for(f"{name}-gk", rf"listening on {re.escape(address)}:{PORT}")


def start_director(procs: Procs, work: Path) -> Path:
    sock = work / "haproxy.sock"
    servers = "\n".join(
        # `check`: HAProxy heeds an agent's "down" only with health checks on
        # the server's own port (not with `check port AGENT`, tried: ignored);
        # `check-send-proxy` makes each probe say LOCAL, and gatekeeper counts
        # such empty connections without logging them.
        f"    server {name} {address}:{PORT} send-proxy-v2 maxconn 2 weight 100 "
        f"check check-send-proxy inter 1s agent-check agent-port {AGENT} agent-inter 200ms"
        for name, (address, _) in BOXES.items())
    cfg = work / "haproxy.cfg"
    cfg.write_text(f"""global
    stats socket {sock} mode 600 level admin
defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout queue 60s
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
    out = subprocess.run([*in_ns("gkf-dir", []), sys.executable, "-c",
                          "import socket,sys; s=socket.socket(socket.AF_UNIX);"
                          f"s.connect({str(sock)!r}); s.sendall(b'show stat\\n');"
                          "sys.stdout.write(s.makefile().read())"],
                         capture_output=True, text=True, timeout=10).stdout
    state = {}
    for line in out.splitlines():
        fields = line.split(",")
        if len(fields) > 17 and fields[0] == "farm" and fields[1] in BOXES:
            state[fields[1]] = fields[17]
    return state


def until(what: str, check: object, timeout: float = 30.0) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"never {what}")
        time.sleep(0.2)  # other processes' state: polled, bounded


def build(project_root: Path, work: Path, name: str, *,
          fallback: bool) -> subprocess.CompletedProcess[str]:
    env = clean_env({"DISTCC_HOSTS": f"{DIRECTOR}:{PORT}/16",
                     "DISTCC_FALLBACK": "1" if fallback else "0",
                     "DISTCC_BACKOFF_PERIOD": "0", "DISTCC_IO_TIMEOUT": "120",
                     "DISTCC_DIR": str(work / f"distcc-{name}")})
    (work / f"distcc-{name}").mkdir()
    return subprocess.run(in_ns("gkf-cli", ["make", "-k", "-j12", "-C", str(project_root)]),
                          env=env, capture_output=True, text=True, timeout=300)


def ends(procs: Procs, box: str, skip: int = 0) -> list[re.Match[str]]:
    return [m for line in procs.log(f"{box}-gk").splitlines()[skip:]
            if (m := END.search(line)) is not None]


def learned_from_peers(box: str) -> int:
    address, _ = BOXES[box]
    url = f"http://{address}:{METRICS}/farm"
    out = subprocess.run(in_ns(box, [sys.executable, "-c",
                                     f"import urllib.request,sys;sys.stdout.write("
                                     f"urllib.request.urlopen({url!r},timeout=3).read()"
                                     f".decode())"]),
                         capture_output=True, text=True, timeout=10).stdout
    import json
    try:
        return sum(int(p.get("learned", 0)) for p in json.loads(out)["peers"])
    except (ValueError, KeyError, TypeError):
        return 0


def test_a_farm_of_three_boxes_learns_as_one(tmp_path: Path) -> None:
    # distccd drops to its own user: its TMPDIR must be reachable, and pytest's
    # temporary directories are root's alone.
    work = Path(tempfile.mkdtemp(prefix="gkf-", dir="/tmp"))
    work.chmod(0o755)
    try:
        run_farm(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_farm(work: Path) -> None:
    project = generate_project(work / "project", cxx_files=24, c_files=6)
    procs = Procs(work)
    with network(), cgroups() as groups:
        try:
            for name in BOXES:
                start_box(procs, name, groups[name], work)
            sock = start_director(procs, work)
            until("every box served by HAProxy",
                  lambda: all(s == "UP" or s == "no check"
                              for s in haproxy_state(sock).values())
                  and len(haproxy_state(sock)) == 3)

            first = build(project.root, work, "1", fallback=False)
            assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
            ran_on: dict[str, set[str]] = {}
            marks = {}
            for box in BOXES:
                lines = ends(procs, box)
                marks[box] = len(procs.log(f"{box}-gk").splitlines())
                assert all(m["outcome"] == "ok" for m in lines), procs.log(f"{box}-gk")
                # The client, not the director: the PROXY header was read.
                assert all(m["peer"].startswith(f"{CLIENT}:") for m in lines), lines
                for m in lines:
                    ran_on.setdefault(m["job"], set()).add(box)
            assert sum(len(v) for v in ran_on.values()) == project.translation_units
            assert len({b for v in ran_on.values() for b in v}) == 3  # all three worked

            # Each box learns what the other two measured (one exchange: 10 s).
            expected = {box: sum(1 for v in ran_on.values() if box not in v) for box in BOXES}
            until("every box learned its peers' measurements",
                  lambda: all(learned_from_peers(b) >= expected[b] for b in BOXES),
                  timeout=40)

            for obj in project.objects:
                (project.root / obj).unlink()
            second = build(project.root, work, "2", fallback=False)
            assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
            jobs = [(box, m) for box in BOXES for m in ends(procs, box, marks[box])]
            assert len(jobs) == project.translation_units
            known = [m for _, m in jobs if m["source"] == "learned"]
            strangers = [(box, m) for box, m in jobs if box not in ran_on.get(m["job"], set())]
            print(f"second build: {len(known)}/{len(jobs)} learned; "
                  f"{len(strangers)} on a box that never compiled the file, "
                  f"{sum(1 for _, m in strangers if m['source'] == 'learned')} of them learned")
            assert len(known) > 0.9 * len(jobs), jobs
            assert strangers and all(m["source"] == "learned" for _, m in strangers)

            # A box's distccd dies: HAProxy takes the box out at the agent's next
            # check, and a build with client fallback completes.
            procs.stop("gkf-box2-distccd")
            try:
                until("box2 taken out", lambda: haproxy_state(sock).get("gkf-box2") not in (
                    "UP", "no check"), timeout=20)
            except AssertionError:
                agent = subprocess.run(in_ns("gkf-dir", [sys.executable, "-c", (
                    "import socket; s=socket.create_connection(('10.77.0.12', 3635), 3);"
                    "print(s.recv(200))")]), capture_output=True, text=True).stdout
                raise AssertionError(f"agent: {agent} {haproxy_state(sock)} "
                                     f"{procs.log('haproxy')[-2000:]}"
                                     f"{procs.log('gkf-box2-gk')[-2000:]}") from None
            for obj in project.objects:
                (project.root / obj).unlink()
            third = build(project.root, work, "3", fallback=True)
            assert third.returncode == 0, third.stdout[-2000:] + third.stderr[-2000:]
            assert all((project.root / obj).exists() for obj in project.objects)
        finally:
            procs.stop_all()
