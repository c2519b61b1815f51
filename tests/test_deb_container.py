"""The Debian package under a real systemd (issue 21): a bookworm root made with
`debootstrap` from the archive this machine's apt sources name, booted with
`systemd-nspawn --boot` (systemd as PID 1), the .deb from `.ci/build-deb` installed into
it, and both modes driven the way an admin would (tests/deb_container/check.sh, run by a
oneshot unit inside, which powers the container off). The README's first command runs in
the same root, with Debian's python3 and nothing else.

The root is cached in /var/cache/gatekeeper-test (debootstrap takes about a minute and
640 MB; each test boots a copy, so the cache stays clean). Needs root, systemd-nspawn and
debootstrap (.ci/install installs them); skips only without them, saying why.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shlex
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from distcc_harness import PROJECT_ROOT

# One boot builds a project six times and drains twice: about a minute here.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

CACHE = Path("/var/cache/gatekeeper-test")
SUITE = "bookworm"
# What the booted box needs before the package: systemd to boot, the stock distcc and
# a compiler, the package's dependencies (so `apt-get install ./gatekeeper.deb` needs no
# network), python3-venv for the README's pip route, ss and ps for the checks.
ROOT_PACKAGES = ("systemd", "systemd-sysv", "dbus", "distcc", "g++", "make", "python3",
                 "python3-trio", "python3-psutil", "python3-prometheus-client",
                 "python3-venv", "iproute2", "procps")
CHECK_SCRIPT = Path(__file__).parent / "deb_container" / "check.sh"
BOOT_TIMEOUT_S = 600.0
NSPAWN = shutil.which("systemd-nspawn")
DEBOOTSTRAP = shutil.which("debootstrap")


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "booting a container needs root"
    if NSPAWN is None:
        return "systemd-nspawn not installed (Debian: apt-get install systemd-container)"
    if DEBOOTSTRAP is None:
        return "debootstrap not installed (Debian: apt-get install debootstrap)"
    return None


pytestmark.append(pytest.mark.skipif(_why_not() is not None, reason=str(_why_not())))


def debian_mirror() -> str:
    """The Debian archive this machine's apt sources name (deb822 or one-line format)."""
    sources = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in sources:
        for stanza in path.read_text().split("\n\n"):
            fields = dict(line.split(":", 1) for line in stanza.splitlines()
                          if ":" in line and not line.startswith(("#", " ")))
            suites = fields.get("Suites", "").split()
            if SUITE in suites and "deb" in fields.get("Types", "").split():
                return fields["URIs"].split()[0]
    for path in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*.list")]:
        if path.exists():
            for line in path.read_text().splitlines():
                words = line.split()
                if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                    return words[1]
    pytest.fail(f"no {SUITE} archive in this machine's apt sources")


@pytest.fixture(scope="session")
def bookworm_root() -> Path:
    """The cached debootstrap root, made once (under a lock) for this package list."""
    key = hashlib.sha256(" ".join((SUITE, *ROOT_PACKAGES)).encode()).hexdigest()[:12]
    root = CACHE / f"{SUITE}-{key}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "etc" / "os-release").exists():
            partial = root.with_name(root.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            proc = subprocess.run(
                [str(DEBOOTSTRAP), "--variant=minbase", f"--include={','.join(ROOT_PACKAGES)}",
                 SUITE, str(partial), debian_mirror()],
                capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, f"debootstrap failed:\n{proc.stdout[-3000:]}"
            partial.rename(root)
    return root


@pytest.fixture(scope="session")
def deb() -> Path:
    """The package .ci/run built, or one built now the same way."""
    given = os.environ.get("GATEKEEPER_DEB")
    if given:
        return Path(given)
    proc = subprocess.run(["bash", str(PROJECT_ROOT / ".ci" / "build-deb")], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f".ci/build-deb failed:\n{proc.stderr[-3000:]}"
    return PROJECT_ROOT / proc.stdout.strip().splitlines()[-1]


@pytest.fixture
def box(bookworm_root: Path, tmp_path: Path) -> Iterator[Path]:
    """A throw-away copy of the cached root (the cache is never booted)."""
    root = tmp_path / "root"
    subprocess.run(["cp", "-a", "--reflink=auto", str(bookworm_root), str(root)], check=True,
                   timeout=300)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def nspawn(root: Path, *args: str,
           timeout: float = BOOT_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    assert NSPAWN is not None
    argv = [NSPAWN, "-D", str(root), "--register=no", "--keep-unit", "--console=pipe",
            "--quiet", *args]
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"container did not finish within {timeout:.0f} s: {shlex.join(argv)}\n"
                    f"{e.stdout!r}\n{e.stderr!r}")


def slow_source(functions: int = 1000, salt: int = 0) -> str:
    """A C++ file g++ -O2 takes a while over (1000 functions: about 3.5 s here, a job
    still running when the service is told to stop; 250: about 1 s, a job long enough
    to be measured by sampling)."""
    lines = ["#include <cstdint>", f"// {salt}", "template <int N> struct Mix {",
             "  static std::uint64_t run(std::uint64_t x) {",
             "    for (int i = 0; i < N; ++i) x = (x ^ (x >> 31)) * 0x9E3779B97F4A7C15ULL + i;",
             "    return x; } };"]
    lines += [f"std::uint64_t f{i}(std::uint64_t x) {{ return Mix<{i % 97 + 3}>::run(x + {i})"
              f" ^ Mix<{(i * 7) % 89 + 5}>::run(x * {i + 1}); }}" for i in range(functions)]
    return "\n".join(lines) + "\n"


OBJECTS = 10


def write_project(dest: Path) -> None:
    """Ten objects: eight C++ files of about a second each, two small C files."""
    (dest / "src").mkdir(parents=True)
    objs = []
    for i in range(OBJECTS - 2):
        (dest / "src" / f"m{i}.cc").write_text(slow_source(250, salt=i))
        objs.append(f"src/m{i}.o")
    for i in range(2):
        (dest / "src" / f"c{i}.c").write_text(
            f"int c{i}(int x) {{ int s = 0; for (int k = 0; k < x; ++k) s += k * {i + 3};"
            " return s; }\n")
        objs.append(f"src/c{i}.o")
    (dest / "Makefile").write_text(
        "CC = distcc gcc\nCXX = distcc g++\nCFLAGS = -O2 -Wall -Werror\n"
        "CXXFLAGS = -O2 -Wall -Werror\n"
        f"objs: {' '.join(objs)}\n"
        "src/%.o: src/%.cc\n\t$(CXX) $(CXXFLAGS) -c $< -o $@\n"
        "src/%.o: src/%.c\n\t$(CC) $(CFLAGS) -c $< -o $@\n")


class Evidence:
    """out/ as the check script left it."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def __getitem__(self, name: str) -> str:
        path = self.out / name
        assert path.exists(), f"the check never wrote {name}; its log:\n{self.log()}"
        return path.read_text()

    def log(self) -> str:
        path = self.out / "check.log"
        return path.read_text()[-6000:] if path.exists() else "(no check.log)"


SAMPLED_FLOOR_S = 0.6


def run_seconds(line: str) -> float:
    m = re.search(r" run=([0-9.]+)s", line)
    assert m, line
    return float(m[1])


def end_lines(journal: str) -> list[tuple[str, str]]:
    """The jobs' end lines with their objects (the client's -o), in order."""
    out = []
    for line in journal.splitlines():
        m = re.search(r"\bend peer=.*\bjob=(\S+)", line)
        if m:
            out.append((m[1], line))
    return out


def test_package_boots_admits_learns_and_drains_in_both_modes(box: Path, deb: Path,
                                                              tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    (mnt / "out").mkdir(parents=True)
    shutil.copy(deb, mnt / "gatekeeper.deb")
    write_project(mnt / "project")
    (mnt / "slow.cc").write_text(slow_source())
    # The check runs once the box is up, then powers it off.
    units = box / "etc" / "systemd" / "system"
    (units / "gk-check.service").write_text(
        "[Unit]\nDescription=gatekeeper package checks\nAfter=multi-user.target\n"
        "[Service]\nType=oneshot\nExecStart=/bin/bash /mnt/gk/check.sh\n"
        "ExecStopPost=/bin/systemctl poweroff --no-block\n")
    (units / "multi-user.target.wants").mkdir(exist_ok=True)
    (units / "multi-user.target.wants" / "gk-check.service").symlink_to("../gk-check.service")
    shutil.copy(CHECK_SCRIPT, mnt / "check.sh")
    # A reference build with the box's own compiler, for the objects' checksums.
    proc = nspawn(box, "--private-network", f"--bind={mnt}:/mnt/gk", "/bin/bash", "-c",
                  "cp -a /mnt/gk/project /root/ref && cd /root/ref && "
                  "make -j2 objs CC=gcc CXX=g++ >/dev/null && sha256sum src/*.o",
                  timeout=300)
    assert proc.returncode == 0, proc.stderr
    reference = proc.stdout
    proc = nspawn(box, "--boot", "--private-network", f"--bind={mnt}:/mnt/gk")
    (mnt / "reference").write_text(reference)
    ev = Evidence(mnt / "out")
    assert (mnt / "out" / "done").exists(), (
        f"the check did not finish (nspawn rc={proc.returncode}):\n{ev.log()}\n{proc.stderr}")
    check_evidence(ev, reference)


def check_evidence(ev: Evidence, reference: str) -> None:
    """What the admin would look at, step by step (split out so a kept out/ directory
    can be checked again without a boot)."""
    # A fresh install takes nothing: the running distccd keeps port 3632, every
    # gatekeeper unit is disabled and inactive.
    assert ev["install.rc"].strip() == "0", ev["install.log"]
    assert "distccd" in ev["before-install.ports"] and ":3632" in ev["before-install.ports"]
    assert ev["after-install.ports"] == ev["before-install.ports"]
    for line in ev["after-install.units"].splitlines():
        _unit, enabled, active = line.split()
        assert enabled in ("disabled", "static") and active == "inactive", line
    assert ev["which"].splitlines()[0] == "/usr/bin/gatekeeper"
    assert ev["which"].splitlines()[1].startswith("0.22")  # Debian's trio, Debian's python3

    # Proxy mode: systemd holds 3632, distccd moved to 127.0.0.1:3633.
    assert re.search(r'\*:3632\b.*systemd|\[::\]:3632\b.*systemd', ev["proxy.ports"]), \
        ev["proxy.ports"]
    assert re.search(r"127\.0\.0\.1:3633\b.*distccd", ev["proxy.ports"]), ev["proxy.ports"]
    assert re.search(r"^distccd\s+/usr/bin/python3 /usr/bin/gatekeeper --max-jobs 2 "
                     r"--min-free-mb 64 ", ev["proxy.ps"], re.M), ev["proxy.ps"]

    for mode in ("proxy", "inetd"):
        for build in ("cold", "warm"):
            assert ev[f"{mode}-{build}.rc"].strip() == "0", ev[f"{mode}-{build}.make"]
            # The objects are the ones the box's own compiler makes.
            assert ev[f"{mode}-{build}.objects"] == reference, f"{mode}-{build}"
        status = ev[f"{mode}.status"]
        assert re.search(r'Status: "\d+/2 running, \d+ queued, ', status), status
        journal = ev[f"{mode}.journal"]
        cold_lines = end_lines(ev[f"{mode}.journal-cold"])
        cold, warm = dict(cold_lines), dict(end_lines(journal)[len(cold_lines):])
        for build, ends in (("cold", cold), ("warm", warm)):
            assert len(ends) == OBJECTS, (mode, build, journal[-3000:])
            assert all("outcome=ok" in x and "compile=ok" in x for x in ends.values()), \
                [x for x in ends.values() if "compile=ok" not in x]
        # After the restart, every compile the first build measured is known.
        assert "footprints.json" in ev[f"{mode}.state"]
        # Sampled jobs shorter than the sampler's floor (0.6 s, which gatekeeper names at
        # start) may show a partial peak, which teaches nothing; longer ones must teach.
        learned = [job for job, line in cold.items()
                   if " peak=" in line and run_seconds(line) >= SAMPLED_FLOOR_S]
        assert learned, f"{mode}: the first build measured nothing\n{journal[-3000:]}"
        for job in learned:
            assert "est_from=learned" in warm[job], (mode, warm[job])
        print(f"{mode}: {len(learned)}/{OBJECTS} measured cold, all learned after a restart")
        # Stop drains: the job running at stop finishes, the client sees success.
        assert ev[f"{mode}-drain.seen"].splitlines()[:2] == ["running-seen", "stop-rc=0"], \
            ev[f"{mode}-drain.seen"]
        assert ev[f"{mode}-drain.rc"].strip() == "0", ev[f"{mode}-drain.client"]
        after = ev[f"{mode}.journal-after-stop"]
        _, stop, drained = after.partition("got SIGTERM, stopping")
        assert stop, after[-2000:]
        assert re.search(r"end peer=.*job=slow\.o.*compile=ok", drained), after[-2000:]

    # An upgrade restarts the service behind the same listening socket and keeps
    # the learned footprints and the admin's limits.
    assert ev["upgrade.rc"].strip() == "0", ev["upgrade.log"]
    old, new = ev["upgrade.before"].split(), ev["upgrade.after"].split()
    assert old[0] != new[0], "gatekeeper.service was not restarted by the upgrade"
    assert old[1:4] == new[1:4], "the listening socket was closed by the upgrade"
    assert "footprints.json" in ev["upgrade.after"]
    assert "MAX_JOBS=2" in ev["upgrade.after"]
    # The compile running at the upgrade finished (drained), into the same distccd.
    assert ev["upgrade-job.seen"].strip() == "running-seen"
    assert ev["upgrade-job.rc"].strip() == "0", ev["upgrade-job.client"]
    assert ev["upgrade.distccd-before"] == ev["upgrade.distccd-after"], \
        "the upgrade restarted distccd under the running jobs"

    # And back: the stock distccd on the public port again.
    assert re.search(r":3632\b.*distccd", ev["switched-back.ports"]), ev["switched-back.ports"]


def readme_first_command() -> str:
    """The line under "# 1. Run it" in the README's quick start, as written."""
    text = (PROJECT_ROOT / "README.md").read_text()
    m = re.search(r"^# 1\. Run it.*\n(.+)$", text, re.M)
    assert m, "README has no '# 1. Run it' command"
    return m[1]


QUICK_START_CHECK = r"""
set -u
cd /root/gatekeeper
bash -c "$GK_COMMAND" > /root/quick-start.log 2>&1 &
command=$!
# Until gatekeeper listens (apt-get update, the venv and pip come first), or the
# command has failed.
for _ in $(seq 1800); do
    ss -ltnH "( sport = :3632 )" | grep -q LISTEN && break
    kill -0 "$command" 2>/dev/null || { echo "the command exited"; break; }
    sleep 0.2
done
echo 'int answer(void) { return 42; }' > /root/t.c
cd /root
DISTCC_HOSTS=127.0.0.1:3632 DISTCC_FALLBACK=0 DISTCC_BACKOFF_PERIOD=0 \
    timeout 120 distcc gcc -O2 -c t.c -o t.o
echo "client-rc=$?"
gcc -O2 -c t.c -o local.o && cmp t.o local.o && echo "objects-identical"
sleep 1  # the end line is logged as the client closes; the log is read once, below
cat /root/quick-start.log
"""


def test_readme_quick_start_runs_on_debians_python(box: Path, tmp_path: Path) -> None:
    """The README's first command, as written, in a fresh bookworm root whose only python3
    is Debian's: it installs, starts distccd and gatekeeper, and a distcc compile goes
    through. Shares the host's network (apt-get update and pip need the package
    registries, as the command does on any box), so it binds ports 3632 and 3633 on
    this machine while it runs."""
    command = readme_first_command()
    assert "pip install ." in command and "python3 -m venv" in command
    for probe in (3632, 3633):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", probe)) == 0:
                pytest.skip(f"port {probe} is taken on this machine (the quick start binds it)")
    checkout = box / "root" / "gatekeeper"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], cwd=PROJECT_ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = PROJECT_ROOT / name
        if src.is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, checkout / name)
    # This machine reaches the registries through a TLS proxy whose CA is in its own
    # bundle (pip is told so by PIP_CERT); the box gets that bundle and that setting,
    # as a box on this network would. The command itself is untouched.
    trust = []
    host_cert = os.environ.get("PIP_CERT")
    if host_cert and Path(host_cert).is_file():
        trust = [f"--bind-ro={host_cert}:/etc/gatekeeper-test-ca.crt",
                 "--setenv=PIP_CERT=/etc/gatekeeper-test-ca.crt"]
    proc = nspawn(box, *trust, f"--setenv=GK_COMMAND={command}", "/bin/bash", "-c",
                  QUICK_START_CHECK, timeout=600)
    print(proc.stdout[-3000:])
    assert "client-rc=0" in proc.stdout, proc.stdout[-5000:] + proc.stderr[-2000:]
    assert "objects-identical" in proc.stdout
    assert re.search(r"gatekeeper: INFO: end peer=.* outcome=ok .*job=t\.o compile=ok",
                     proc.stdout), proc.stdout[-3000:]
    # Debian's python3, nothing else: the venv's interpreter is /usr/bin/python3.
    cfg = (box / "opt" / "gatekeeper" / "pyvenv.cfg").read_text()
    assert re.search(r"^home = /usr/bin$", cfg, re.M), cfg
