"""Memory-pressure bench: real distcc builds into a distccd inside a v1 memory cgroup.

Run as root from the repository root (either form works):

    python3 -m bench.memory_pressure            # or: python3 bench/memory_pressure.py

What it does, in one run (about 5-10 minutes on 2 cores):

1. Generates a project of heavy (~230 MB peak, ~4 s) and light (~40 MB, <1 s) C++ files
   (`bench/hungry.py`) with a `CXX = distcc g++` Makefile.
2. Calibrates: compiles one heavy and one light file locally, each under
   `/usr/bin/time -v` inside the bench cgroup (no limit yet), for its peak RSS and the
   cgroup's own peak charge (`memory.max_usage_in_bytes`).
3. Sets the cgroup's `memory.limit_in_bytes` midway between what one heavy plus one
   light compile need at most (sum of their peak RSS, which over-states the charge:
   shared library pages are charged to whoever loaded them first) and what two heavy
   compiles are charged (2 x the heavy's peak charge). So one heavy and one light
   fit, two heavies do not. `memory.swappiness` = 0 and, where swap exists,
   `memory.memsw.limit_in_bytes` = the same limit, so the limit really bites.
4. Builds the project with the stock distcc client (`make -k -j8`,
   `DISTCC_HOSTS=127.0.0.1:PORT/8`, no fallback, no local retry, no backoff) in:

   a. distccd alone in the cgroup, `--jobs` = CPUs
   b. distccd alone in the cgroup, `--jobs 1`
   c. gatekeeper proxy mode (outside the cgroup, `--cgroup` pointing at it,
      `-j` = CPUs), in front of distccd in the cgroup: cold (fresh `--state-dir`)
   d. the same, warm (gatekeeper restarted on the same state dir; objects removed)
   e. gatekeeper inetd mode, gatekeeper and its per-job `distccd --inetd` all in
      the cgroup (it watches its own cgroup): cold
   f. the same, warm

   and reads, per build: the cgroup's OOM kills (`oom_kill` in memory.oom_control)
   and `memory.failcnt` before and after, failed compiles (objects missing after
   `make -k`), make's exit code, distcc client errors, wall time; from a compiler
   wrapper that distccd runs, every compile's interval, exit status and peak RSS
   (`wait4`), hence the most compiles and the most heavy compiles at once; from
   gatekeeper's log, each job's estimate (`est=`) against its measured peak
   (`peak=`) and the `holding ...` lines; and requests distccd needed over a second
   to receive, with the host's TcpExt counters (TCP memory pressure from other work
   on the box stalls loopback transfers and makes a makespan meaningless).
5. Prints a table and writes it with the machine description and the raw numbers to
   `bench/RESULTS-memory.md` (`--results`).

Everything is bounded (startup and per-build timeouts) and cleaned up in `finally`:
daemons are stopped by process group, anything left in the cgroup is killed (every
task in it was started by the bench), the cgroup is removed. Loopback only.

Useful flags: `--only c d` (a subset), `--gatekeeper-src DIR` (another copy of the
package, e.g. a `git archive` snapshot), `--keep` (keep the work dir and all logs),
`--limit-mb`, `--heavy/--light`, `--results -` (no report file).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import pwd
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import timeline
from bench.hungry import CXXFLAGS, Project, Spec, generate
from bench.schedule import Job, area_bound, list_schedule, makespan
from bench.timeline import Sampler, bars_from_compiles, bars_from_samples

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
MiB = 2**20
V1_MEMORY = Path("/sys/fs/cgroup/memory")
DISTCC_WHITELIST_DIR = Path("/usr/lib/distcc")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
REQUIRED = ("distcc", "distccd", "g++", "gcc", "make")
GNU_TIME = "/usr/bin/time"
STARTUP_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
CALIBRATION_TIMEOUT = 120.0
_ENV_DROP_PREFIXES = ("DISTCC", "CCACHE", "MAKE", "MFLAGS", "GNUMAKE")
_LAUNCHERS = frozenset({"distcc", "ccache", "sccache", "icecc"})

_DISTCCD_READY = re.compile(r"daemon started")
_GATEKEEPER_READY = re.compile(r"listening on 127\.0\.0\.1:(?P<port>\d+)")
_CLIENT_ERROR = re.compile(r"distcc\[\d+\] (?:\(\w+\) )?ERROR:")
_KILLED = re.compile(r"Killed signal terminated program|killed by signal 9|signal 9")
_GK_END = re.compile(
    r"end peer=\S+ outcome=(?P<outcome>\S+) wait=(?P<wait>[\d.]+)s run=(?P<run>[\d.]+)s"
    r".*?(?: job=(?P<job>\S+))?(?: compile=(?P<compile>\S+))?(?: oom=yes)?"
    r"(?: est=(?P<est>\d+)MiB)?(?: est_from=(?P<est_from>\w+))?(?: peak=(?P<peak>\d+)MiB)?"
    r"(?: paused=\S+)?"
    r"(?: reason=.*)?$")
_GK_HOLD = re.compile(r"holding \d+: ")
_MAXRSS = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")


def log(message: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[bench {stamp}] {message}", flush=True)


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The current environment without distcc/ccache/make settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_ENV_DROP_PREFIXES)}
    env["LC_ALL"] = "C"
    if extra:
        env.update(extra)
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


# --------------------------------------------------------------------------------------
# The cgroup
# --------------------------------------------------------------------------------------


class Cgroup:
    """A v1 memory cgroup this bench created and removes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, parent: Path) -> Cgroup:
        path = parent / f"gk-bench-{os.getpid()}"
        path.mkdir()
        return cls(path)

    def read(self, name: str) -> str:
        return (self.path / name).read_text()

    def write(self, name: str, value: str) -> None:
        (self.path / name).write_text(value)

    def value(self, name: str) -> int:
        return int(self.read(name).split()[0])

    def oom_kills(self) -> int | None:
        for line in self.read("memory.oom_control").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return None  # older kernels: no counter

    def pids(self) -> list[int]:
        return [int(p) for p in self.read("cgroup.procs").split()]

    def set_limit(self, limit: int, *, memsw: bool) -> None:
        self.write("memory.limit_in_bytes", str(limit))
        if memsw and (self.path / "memory.memsw.limit_in_bytes").exists():
            self.write("memory.memsw.limit_in_bytes", str(limit))

    def reset_peak(self) -> None:
        self.write("memory.max_usage_in_bytes", "0")

    def empty_caches(self) -> None:
        """Drop the page cache still charged here (only possible with no tasks)."""
        if not self.pids():
            with contextlib.suppress(OSError):
                self.write("memory.force_empty", "0")

    def kill_all(self) -> None:
        """SIGKILL every task left in the cgroup (all were started by this bench)."""
        for _ in range(50):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)

    def remove(self) -> None:
        self.kill_all()
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)
        log(f"WARNING: could not remove {self.path} (tasks: {self.pids()})")

    def enter_argv(self, argv: Sequence[str]) -> list[str]:
        """argv that moves itself into this cgroup, then execs `argv` (same pid)."""
        procs = self.path / "cgroup.procs"
        return ["/bin/sh", "-c", f'echo $$ > "{procs}" && exec "$@"', "sh", *argv]


# --------------------------------------------------------------------------------------
# The compiler wrapper distccd runs: records interval, exit status and peak RSS
# --------------------------------------------------------------------------------------

_WRAPPER_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static const char *const LOG_PATH = @LOG_PATH@;
static const char *const COMPILERS[][2] = {
@COMPILERS@
    {NULL, NULL},
};
static volatile sig_atomic_t child_pid = 0;

static void forward(int sig) {
    if (child_pid > 0)
        kill((pid_t)child_pid, sig);
}

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void record(const char *line) {
    int fd = open(LOG_PATH, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0)
        return;
    ssize_t n = write(fd, line, strlen(line));
    (void)n;
    close(fd);
}

int main(int argc, char **argv) {
    (void)argc;
    const char *name = strrchr(argv[0], '/');
    name = name ? name + 1 : argv[0];
    const char *real = NULL;
    for (int i = 0; COMPILERS[i][0]; i++)
        if (strcmp(COMPILERS[i][0], name) == 0)
            real = COMPILERS[i][1];
    if (!real) {
        fprintf(stderr, "gk-bench-ccwrap: no real compiler known for '%s'\n", name);
        return 127;
    }
    char line[256];
    long long start = now_ns();
    snprintf(line, sizeof line, "start %ld %lld\n", (long)getpid(), start);
    record(line);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = forward;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    pid_t pid = fork();
    if (pid == 0) {
        signal(SIGTERM, SIG_DFL);
        signal(SIGINT, SIG_DFL);
        signal(SIGHUP, SIG_DFL);
        argv[0] = (char *)real;
        execv(real, argv);
        fprintf(stderr, "gk-bench-ccwrap: exec %s: %s\n", real, strerror(errno));
        _exit(127);
    }
    if (pid < 0) {
        fprintf(stderr, "gk-bench-ccwrap: fork: %s\n", strerror(errno));
        return 125;
    }
    child_pid = pid;
    int status = 0;
    struct rusage ru;
    memset(&ru, 0, sizeof ru);
    while (wait4(pid, &status, 0, &ru) == -1 && errno == EINTR) {
    }
    int code = WIFSIGNALED(status) ? -WTERMSIG(status) : WEXITSTATUS(status);
    /* ru_maxrss: the largest resident set of the child or any descendant it waited
       for (cc1plus, as), in KiB. */
    snprintf(line, sizeof line, "end %ld %lld %lld %d %ld\n", (long)getpid(), start, now_ns(),
             code, (long)ru.ru_maxrss);
    record(line);
    if (WIFSIGNALED(status)) {
        signal(WTERMSIG(status), SIG_DFL);
        raise(WTERMSIG(status));
    }
    return code;
}
"""


def _c_string(value: str) -> str:
    if not value.isprintable() or '"' in value or "\\" in value or not value.isascii():
        raise ValueError(f"path not usable in generated C: {value!r}")
    return f'"{value}"'


def find_real_compiler(name: str) -> str | None:
    """First `name` on the system PATH that is a real compiler, not a masquerade link."""
    for entry in f"{os.environ.get('PATH', '')}:{SYSTEM_PATH}".split(":"):
        if not entry:
            continue
        candidate = Path(entry) / name
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        if Path(os.path.realpath(candidate)).name in _LAUNCHERS:
            continue
        return str(candidate)
    return None


def build_wrapper(bin_dir: Path, log_path: Path) -> None:
    """Compile the wrapper into `bin_dir` under every name distccd's whitelist allows.

    distccd runs the client's compiler name through its own PATH (after checking the
    name against /usr/lib/distcc): with `bin_dir` first on its PATH, every remote
    compile goes through the wrapper.
    """
    names = {"gcc", "g++", "cc", "c++"}
    with contextlib.suppress(OSError):
        names.update(p.name for p in DISTCC_WHITELIST_DIR.iterdir())
    mapping = {n: real for n in sorted(names) if (real := find_real_compiler(n))}
    if "g++" not in mapping:
        raise RuntimeError("no real g++ found on PATH")
    table = "\n".join(f"    {{{_c_string(n)}, {_c_string(p)}}}," for n, p in mapping.items())
    source = _WRAPPER_C.replace("@LOG_PATH@", _c_string(str(log_path))).replace(
        "@COMPILERS@", table)
    bin_dir.mkdir(parents=True, exist_ok=True)
    src, binary = bin_dir.parent / "ccwrap.c", bin_dir.parent / "ccwrap"
    src.write_text(source)
    subprocess.run([mapping.get("gcc", "gcc"), "-O2", "-Wall", "-Werror",
                    "-o", str(binary), str(src)], check=True, timeout=60,
                   capture_output=True, env=clean_env())
    binary.chmod(0o755)
    for name in mapping:
        os.link(binary, bin_dir / name)
    bin_dir.chmod(0o755)


@dataclasses.dataclass(frozen=True)
class Compile:
    start_ns: int
    end_ns: int | None
    status: int | None
    maxrss_kib: int | None


def parse_compile_log(text: str) -> list[Compile]:
    started: dict[int, int] = {}
    done: list[Compile] = []
    for line in text.splitlines():
        parts = line.split()
        with contextlib.suppress(ValueError, IndexError):
            if parts[0] == "start" and len(parts) == 3:
                started[int(parts[1])] = int(parts[2])
            elif parts[0] == "end" and len(parts) == 6:
                started.pop(int(parts[1]), None)
                done.append(Compile(int(parts[2]), int(parts[3]), int(parts[4]),
                                    int(parts[5])))
    done += [Compile(ns, None, None, None) for ns in started.values()]
    return done


def median_seconds(compiles: Sequence[Compile]) -> float:
    spans = [(c.end_ns - c.start_ns) / 1e9 for c in compiles
             if c.end_ns is not None and c.status == 0]
    return round(statistics.median(spans), 2) if spans else 0.0


_TCP_COUNTERS = ("TCPMemoryPressures", "TCPRcvQDrop", "PruneCalled")
_SLOW_RECEIVE = re.compile(r"\(dcc_r_file_timed\) (\d+) bytes received in ([\d.]+)s")


def tcp_counters() -> dict[str, int]:
    """Host-wide TcpExt counters that show TCP memory pressure: under it the kernel
    drops loopback segments (TCPRcvQDrop) and senders back off exponentially, so a
    request can stall for many seconds whatever gatekeeper does."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return {}
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:") and values.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return {k: int(table[k]) for k in _TCP_COUNTERS if k in table}
    return {}


def slow_receives(distccd_log: str, threshold: float = 1.0) -> int:
    """Requests distccd took more than `threshold` seconds to receive (normally
    milliseconds on loopback; seconds mean the client's bytes were held up)."""
    return sum(1 for m in _SLOW_RECEIVE.finditer(distccd_log) if float(m[2]) > threshold)


def loadavg() -> str:
    """The 1- and 5-minute load averages: other work on the box skews makespans."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:2])


def max_overlap(compiles: Sequence[Compile]) -> int:
    """Most compiles running at one instant (an unfinished one counts to the end)."""
    events: list[tuple[int, int]] = []
    for c in compiles:
        events.append((c.start_ns, 1))
        if c.end_ns is not None:
            events.append((c.end_ns, -1))
    events.sort()
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


# --------------------------------------------------------------------------------------
# Daemons
# --------------------------------------------------------------------------------------


def wait_for_line(path: Path, pattern: re.Pattern[str], proc: subprocess.Popen[bytes],
                  timeout: float) -> re.Match[str]:
    """First match of `pattern` in the log file `path`, bounded by `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        match = pattern.search(text)
        if match:
            return match
        if proc.poll() is not None or time.monotonic() > deadline:
            state = "exited " + str(proc.returncode) if proc.poll() is not None else "timeout"
            raise RuntimeError(f"{proc.args!r}: no line matching {pattern.pattern!r} ({state});"
                               f" log:\n{text[-3000:]}")
        time.sleep(0.05)


class Daemon:
    """A command in its own session, output to a log file; stopped by process group."""

    def __init__(self, argv: Sequence[str], log_path: Path, *, env: Mapping[str, str],
                 cwd: Path) -> None:
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("ab")
        self.proc: subprocess.Popen[bytes] = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env=dict(env), cwd=cwd, start_new_session=True)

    def wait_for(self, pattern: re.Pattern[str], timeout: float = STARTUP_TIMEOUT
                 ) -> re.Match[str]:
        return wait_for_line(self.log_path, pattern, self.proc, timeout)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait, then SIGKILL the whole group. Returns the exit code."""
        proc = self.proc
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        self._log.close()
        return proc.returncode

    @property
    def text(self) -> str:
        return self.log_path.read_text(errors="replace")


# --------------------------------------------------------------------------------------
# One bench run
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Calibration:
    heavy_rss: int
    light_rss: int
    heavy_charge: int
    light_charge: int
    heavy_seconds: float
    light_seconds: float


@dataclasses.dataclass
class GkSummary:
    """What gatekeeper's log says about one build."""

    outcomes: dict[str, int]
    holds: int
    hold_examples: list[str]
    heavy_est_mib: str
    heavy_peak_mib: str
    light_est_mib: str
    light_peak_mib: str
    unmeasured: int
    heavy_run_s: float
    """median seconds from admission to the end of a heavy job"""
    light_run_s: float
    median_wait_s: float
    max_wait_s: float
    problems: list[str]
    jobs: list[tuple[str, int, int, str]] = dataclasses.field(default_factory=list)
    """(object, est MiB, peak MiB, where the estimate came from) of every job
    that has both, in the order they ended."""
    pauses: int = 0
    """Times a running job was frozen (issue 18)."""
    cuts: int = 0
    """Paused jobs cut at --max-pause."""


@dataclasses.dataclass
class Result:
    name: str
    label: str
    oom_kills: int | None
    failcnt: int
    expected: int
    produced: int
    make_exit: int | None
    client_errors: int
    killed_lines: int
    seconds: float
    cgroup_peak: int
    compiles: int
    compiles_failed: int
    max_concurrent: int
    max_heavy_concurrent: int
    heavy_compile_s: float
    """median seconds of a heavy compile, as the wrapper saw it"""
    light_compile_s: float
    load_before: str
    load_after: str
    tcp_pressure: dict[str, int] = dataclasses.field(default_factory=dict)
    """increase of the TcpExt counters during the build"""
    slow_requests: int = 0
    """requests distccd needed more than 1 s to receive"""
    gk: GkSummary | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    round: int = 1
    """Which of the interleaved rounds (`--rounds`) this build was."""

    @property
    def failed(self) -> int:
        return self.expected - self.produced


# The workloads (`--workload`). mixed is issue 17's: heavy ~218 MiB and medium
# ~90 MiB charged (150 class templates: measured 2 s; this generator's floor is
# the <vector> header, so "a fraction of a second" is not reachable with it),
# all in the Makefile at once as make -j8 queues them.
WORKLOADS = {
    "default": Spec(),
    "mixed": Spec(heavy=3, light=14, heavy_classes=420, light_classes=150,
                  heavy_per_group=3, lights_per_group=14),
}


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cpus = os.cpu_count() or 1
        self.spec = Spec(heavy=args.heavy, light=args.light, heavy_classes=args.heavy_classes,
                         light_functions=args.light_functions,
                         light_classes=args.light_classes,
                         heavy_per_group=args.heavy_per_group,
                         lights_per_group=args.lights_per_group)
        self.workdir = Path(tempfile.mkdtemp(prefix="gk-bench-", dir="/tmp"))
        self.workdir.chmod(0o755)
        self.user = self._drop_user()
        self.run_dir = self.workdir / "run"  # distccd's TMPDIR and the compile log
        self.bin_dir = self.workdir / "bin"
        self.logs = self.workdir / "logs"
        self.logs.mkdir()
        self.compile_log = self.run_dir / "compiles.log"
        self.cgroup: Cgroup | None = None
        self.daemons: list[Daemon] = []
        self.project: Project | None = None
        self.calibration: Calibration | None = None
        self.limit = 0
        self.oracle: float | None = None
        """The oracle's makespan (`oracle_lines`), for the summary."""
        self.results: list[Result] = []
        self.status_url: str | None = None
        """The running gatekeeper's /status (None: no gatekeeper in this build)."""
        self.started = time.monotonic()

    @staticmethod
    def _drop_user() -> pwd.struct_passwd:
        for name in ("distccd", "distcc", "nobody"):
            with contextlib.suppress(KeyError):
                return pwd.getpwnam(name)
        raise RuntimeError("no distccd/distcc/nobody account for distccd to run compilers as")

    # -- setup -----------------------------------------------------------------------

    def prepare(self) -> None:
        (self.run_dir / "tmp").mkdir(parents=True)
        for path in (self.run_dir, self.run_dir / "tmp"):
            os.chown(path, self.user.pw_uid, self.user.pw_gid)
        self.run_dir.chmod(0o755)
        (self.run_dir / "tmp").chmod(0o700)
        build_wrapper(self.bin_dir, self.compile_log)
        self.project = generate(self.workdir / "project", self.spec)
        log(f"workdir {self.workdir}: {self.spec.heavy} heavy + {self.spec.light} light files")
        parent = Path(self.args.cgroup_parent)
        self.cgroup = Cgroup.create(parent)
        log(f"cgroup {self.cgroup.path}")

    def calibrate(self) -> Calibration:
        """Peak RSS (/usr/bin/time -v) and peak cgroup charge of one heavy and one light
        compile, each run alone in the (still unlimited) bench cgroup; best of N."""
        assert self.cgroup is not None and self.project is not None
        cg = self.cgroup
        figures: dict[str, tuple[int, int, float]] = {}
        for kind, source in (("heavy", self.project.heavy_sources[0]),
                             ("light", self.project.light_sources[0])):
            rss = charge = 0
            seconds = 0.0
            for _ in range(self.args.calibration_runs):
                cg.empty_caches()
                cg.reset_peak()
                argv = cg.enter_argv([GNU_TIME, "-v", "g++", *CXXFLAGS.split(), "-c", source,
                                      "-o", str(self.workdir / "calibration.o")])
                begin = time.monotonic()
                proc = subprocess.run(argv, cwd=self.project.root, capture_output=True,
                                      text=True, timeout=CALIBRATION_TIMEOUT, env=clean_env(),
                                      check=False)
                elapsed = time.monotonic() - begin
                if proc.returncode != 0:
                    raise RuntimeError(f"calibration compile of {source} failed:\n{proc.stderr}")
                match = _MAXRSS.search(proc.stderr)
                if match is None:
                    raise RuntimeError(f"no 'Maximum resident set size' from {GNU_TIME} -v")
                rss = max(rss, int(match[1]) * 1024)
                charge = max(charge, cg.value("memory.max_usage_in_bytes"))
                seconds = max(seconds, elapsed)
            figures[kind] = (rss, charge, seconds)
            log(f"calibration {kind} ({source}): peak RSS {rss / MiB:.0f} MiB, cgroup charge "
                f"{charge / MiB:.0f} MiB, {seconds:.1f} s")
        (self.workdir / "calibration.o").unlink(missing_ok=True)
        heavy, light = figures["heavy"], figures["light"]
        return Calibration(heavy[0], light[0], heavy[1], light[1], heavy[2], light[2])

    def choose_limit(self, cal: Calibration) -> int:
        """Midway between one heavy + one light at their peak RSS (fits) and two heavies at
        their peak charge (does not fit); rounded to MiB."""
        if self.args.limit_mb:
            return int(self.args.limit_mb * MiB)
        fits = cal.heavy_rss + cal.light_rss
        too_much = 2 * cal.heavy_charge
        if fits >= too_much:
            raise RuntimeError(
                f"heavy compiles are too small to separate the cases: heavy+light peak RSS "
                f"{fits / MiB:.0f} MiB >= 2 heavy charges {too_much / MiB:.0f} MiB; raise "
                f"--heavy-classes")
        return (fits + too_much) // 2 // MiB * MiB

    def configure_cgroup(self) -> None:
        assert self.cgroup is not None
        swap = Path("/proc/swaps").read_text().strip().splitlines()[1:]
        self.cgroup.write("memory.swappiness", "0")
        self.cgroup.set_limit(self.limit, memsw=bool(swap))
        log(f"cgroup limit {self.limit / MiB:.0f} MiB, swappiness "
            f"{self.cgroup.read('memory.swappiness').strip()}, swap devices: {len(swap)}")

    # -- daemons ---------------------------------------------------------------------

    def _distccd_env(self) -> dict[str, str]:
        return clean_env({"PATH": f"{self.bin_dir}:{SYSTEM_PATH}",
                          "TMPDIR": str(self.run_dir / "tmp")})

    def start_distccd(self, name: str, jobs: int) -> int:
        """distccd daemon inside the cgroup; returns its port."""
        assert self.cgroup is not None
        distccd = shutil.which("distccd") or "distccd"
        last = ""
        for attempt in range(3):
            port = free_port()
            argv = [distccd, "--daemon", "--no-detach", "--log-stderr", "--log-level", "info",
                    "--listen", LOOPBACK, "--port", str(port), "--allow", LOOPBACK,
                    "--jobs", str(jobs), "--user", self.user.pw_name]
            daemon = Daemon(self.cgroup.enter_argv(argv),
                            self.logs / f"{name}-distccd-{attempt}.log",
                            env=self._distccd_env(), cwd=self.run_dir)
            self.daemons.append(daemon)
            try:
                daemon.wait_for(_DISTCCD_READY)
            except RuntimeError as e:
                daemon.stop()
                last = str(e)
                continue
            if daemon.proc.pid not in self.cgroup.pids():
                raise RuntimeError("distccd did not enter the cgroup")
            return port
        raise RuntimeError(f"distccd did not start: {last}")

    def _gatekeeper_argv(self, state_dir: Path, extra: Sequence[str]) -> list[str]:
        # /status for the timeline's sampler (bench/timeline.py)
        metrics = free_port()
        self.status_url = f"http://{LOOPBACK}:{metrics}/status"
        return [sys.executable, "-m", "gatekeeper", "--listen", f"{LOOPBACK}:0",
                "--metrics", f"{LOOPBACK}:{metrics}",
                "-j", str(self.cpus), "--min-free-mb", str(self.args.min_free_mb),
                "--job-mem-mb", str(self.args.job_mem_mb), "--state-dir", str(state_dir),
                "--allow", LOOPBACK, "--log-level", "info", *extra]

    def _gatekeeper_env(self) -> dict[str, str]:
        src = str(Path(self.args.gatekeeper_src).resolve())
        return clean_env({"PYTHONPATH": src, "PYTHONUNBUFFERED": "1"})

    def start_gatekeeper_proxy(self, name: str, backend_port: int, state_dir: Path
                               ) -> tuple[Daemon, int]:
        assert self.cgroup is not None
        argv = self._gatekeeper_argv(state_dir, ["--backend", f"{LOOPBACK}:{backend_port}",
                                                 "--cgroup", str(self.cgroup.path)])
        daemon = Daemon(argv, self.logs / f"{name}-gatekeeper.log", env=self._gatekeeper_env(),
                        cwd=self.workdir)
        self.daemons.append(daemon)
        port = int(daemon.wait_for(_GATEKEEPER_READY)["port"])
        return daemon, port

    def start_gatekeeper_inetd(self, name: str, state_dir: Path) -> tuple[Daemon, int]:
        assert self.cgroup is not None
        distccd = shutil.which("distccd") or "distccd"
        env_bin = shutil.which("env") or "/usr/bin/env"
        command = [env_bin, f"PATH={self.bin_dir}:{SYSTEM_PATH}",
                   f"TMPDIR={self.run_dir / 'tmp'}", distccd, "--inetd", "--log-stderr",
                   "--log-level", "info", "--user", self.user.pw_name]
        # Clients are filtered by gatekeeper's --allow; distccd has none, so
        # --inetd-io auto relays each job and wakes distccd when its compiler ends.
        extra = ["--inetd-io", self.args.inetd_io]
        argv = self.cgroup.enter_argv([*self._gatekeeper_argv(state_dir, extra), "--",
                                       *command])
        daemon = Daemon(argv, self.logs / f"{name}-gatekeeper.log", env=self._gatekeeper_env(),
                        cwd=self.workdir)
        self.daemons.append(daemon)
        port = int(daemon.wait_for(_GATEKEEPER_READY)["port"])
        if daemon.proc.pid not in self.cgroup.pids():
            raise RuntimeError("gatekeeper did not enter the cgroup")
        return daemon, port

    def stop_all(self) -> None:
        while self.daemons:
            daemon = self.daemons.pop()
            code = daemon.stop()
            if code not in (0, None, -signal.SIGTERM, 128 + signal.SIGTERM):
                log(f"note: {daemon.proc.args!r} exited with {code}")
        if self.cgroup is not None:
            self.cgroup.kill_all()

    # -- building --------------------------------------------------------------------

    def clean_objects(self) -> None:
        assert self.project is not None
        for obj in self.project.objects:
            (self.project.root / obj).unlink(missing_ok=True)

    def build(self, name: str, port: int) -> tuple[int | None, str, float]:
        """`make -k -jN` with the stock distcc client against 127.0.0.1:port only."""
        assert self.project is not None
        distcc_dir = self.workdir / f"distcc-dir-{name}"
        distcc_dir.mkdir()
        env = clean_env({
            "DISTCC_HOSTS": f"{LOOPBACK}:{port}/{self.args.make_jobs}",
            "DISTCC_FALLBACK": "0",
            "DISTCC_SKIP_LOCAL_RETRY": "1",
            "DISTCC_BACKOFF_PERIOD": "0",
            "DISTCC_DIR": str(distcc_dir),
        })
        argv = ["make", "-k", f"-j{self.args.make_jobs}", "-C", str(self.project.root), "all"]
        begin = time.monotonic()
        with (self.logs / f"{name}-make.log").open("wb") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                code: int | None = proc.wait(self.args.build_timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code = None
        seconds = time.monotonic() - begin
        return code, (self.logs / f"{name}-make.log").read_text(errors="replace"), seconds

    def measure(self, name: str, label: str, port: int,
                gatekeeper: Daemon | None = None) -> Result:
        assert self.cgroup is not None and self.project is not None and self.calibration
        cg = self.cgroup
        self.clean_objects()
        self.compile_log.unlink(missing_ok=True)
        cg.reset_peak()
        oom_before, fail_before = cg.oom_kills(), cg.value("memory.failcnt")
        load_before = loadavg()
        tcp_before = tcp_counters()
        log(f"{name}: building ({label}); load average {load_before}")
        with Sampler(cg.path, self.status_url if gatekeeper is not None else None) as sampler:
            code, output, seconds = self.build(name, port)
        oom_after, fail_after = cg.oom_kills(), cg.value("memory.failcnt")
        load_after = loadavg()
        tcp_after = tcp_counters()
        produced = sum(1 for o in self.project.objects if (self.project.root / o).is_file())
        compiles = parse_compile_log(self.compile_log.read_text()
                                     if self.compile_log.exists() else "")
        threshold = (self.calibration.heavy_rss + self.calibration.light_rss) // 2 // 1024
        heavy = [c for c in compiles if c.maxrss_kib is not None and c.maxrss_kib > threshold]
        light = [c for c in compiles if c.maxrss_kib is not None and c.maxrss_kib <= threshold]
        result = Result(
            name=name, label=label,
            oom_kills=None if oom_before is None or oom_after is None else oom_after - oom_before,
            failcnt=fail_after - fail_before,
            expected=len(self.project.objects), produced=produced, make_exit=code,
            client_errors=len(_CLIENT_ERROR.findall(output)),
            killed_lines=len(_KILLED.findall(output)),
            seconds=seconds, cgroup_peak=cg.value("memory.max_usage_in_bytes"),
            compiles=len(compiles),
            compiles_failed=sum(1 for c in compiles if c.status not in (0,)),
            max_concurrent=max_overlap(compiles), max_heavy_concurrent=max_overlap(heavy),
            heavy_compile_s=median_seconds(heavy), light_compile_s=median_seconds(light),
            load_before=load_before, load_after=load_after)
        result.tcp_pressure = {k: tcp_after[k] - v for k, v in tcp_before.items()
                               if k in tcp_after}
        result.slow_requests = slow_receives(
            "\n".join(d.text for d in self.daemons if d.proc.poll() is None))
        if code is None:
            result.notes.append(f"make killed after the {self.args.build_timeout:.0f}s timeout")
        if any(result.tcp_pressure.values()) or result.slow_requests:
            result.notes.append(
                f"{result.slow_requests} request(s) took distccd over 1 s to receive; host TCP "
                f"counters moved during the build: {result.tcp_pressure} (TCP memory pressure "
                f"from other work on the box stalls loopback transfers; makespan unreliable)")
        if gatekeeper is not None:
            result.gk = gatekeeper_summary(gatekeeper.text, self.project)
            bars = bars_from_samples(sampler.samples)
        else:
            bars = bars_from_compiles([(c.start_ns, c.end_ns, c.status) for c in compiles],
                                      int(sampler.started * 1e9))
        title = (f"{name}: {label} -- {seconds:.1f} s, OOM kills {_fmt(result.oom_kills)}, "
                 f"failed compiles {result.failed}"
                 + (f", pauses {result.gk.pauses}" if result.gk is not None else ""))
        timeline.write(self.args.timelines / f"{name}.svg", title, sampler.samples, bars,
                       self.limit, seconds=seconds)
        log(f"{name}: {seconds:.1f}s, make exit {code}, objects {produced}/{result.expected}, "
            f"OOM kills {result.oom_kills}, failcnt +{result.failcnt}, max compiles at once "
            f"{result.max_concurrent} (heavy {result.max_heavy_concurrent})")
        return result

    # -- the configurations ----------------------------------------------------------

    def run_distccd_alone(self, name: str, jobs: int) -> Result:
        self.stop_all()
        assert self.cgroup is not None
        self.cgroup.empty_caches()
        port = self.start_distccd(name, jobs)
        try:
            return self.measure(name, f"distccd alone, --jobs {jobs}", port)
        finally:
            self.stop_all()

    def run_proxy(self, name: str, label: str, state_dir: Path) -> Result:
        self.stop_all()
        assert self.cgroup is not None
        self.cgroup.empty_caches()
        backend = self.start_distccd(name, self.args.make_jobs)
        gatekeeper, port = self.start_gatekeeper_proxy(name, backend, state_dir)
        try:
            return self.measure(name, label, port, gatekeeper)
        finally:
            self.stop_all()
            gatekeeper_exit_note(gatekeeper, self.results, name)

    def run_inetd(self, name: str, label: str, state_dir: Path) -> Result:
        self.stop_all()
        assert self.cgroup is not None
        self.cgroup.empty_caches()
        gatekeeper, port = self.start_gatekeeper_inetd(name, state_dir)
        try:
            return self.measure(name, label, port, gatekeeper)
        finally:
            self.stop_all()
            gatekeeper_exit_note(gatekeeper, self.results, name)

    def run(self) -> None:
        self.prepare()
        self.calibration = self.calibrate()
        self.limit = self.choose_limit(self.calibration)
        self.configure_cgroup()
        only = set(self.args.only) if self.args.only else None
        # Every configuration once per round, rounds one after another: slow
        # phases of a shared box hit every configuration alike (medians).
        for r in range(1, self.args.rounds + 1):
            proxy_state = self.workdir / f"state-proxy-{r}"  # cold again each round
            inetd_state = self.workdir / f"state-inetd-{r}"
            steps: list[tuple[str, Callable[[str], Result]]] = [
                ("a", lambda n: self.run_distccd_alone(n, self.cpus)),
                ("b", lambda n: self.run_distccd_alone(n, 1)),
                ("c", lambda n, d=proxy_state: self.run_proxy(n, "gatekeeper proxy, cold", d)),
                ("d", lambda n, d=proxy_state: self.run_proxy(n, "gatekeeper proxy, warm", d)),
                ("e", lambda n, d=inetd_state: self.run_inetd(n, "gatekeeper inetd, cold", d)),
                ("f", lambda n, d=inetd_state: self.run_inetd(n, "gatekeeper inetd, warm", d)),
            ]
            for key, step in steps:
                if only is not None and key not in only:
                    continue
                result = step(f"{key}{r}")  # logs and the distcc dir per build
                result.name, result.round = key, r
                self.results.append(result)

    def cleanup(self) -> None:
        try:
            self.stop_all()
        finally:
            if self.cgroup is not None:
                self.cgroup.remove()
            if not self.args.keep:
                shutil.rmtree(self.workdir, ignore_errors=True)
            else:
                log(f"kept {self.workdir}")


def gatekeeper_exit_note(daemon: Daemon, results: Sequence[Result], name: str) -> None:
    code = daemon.proc.returncode
    if code not in (0, None, -signal.SIGTERM, 128 + signal.SIGTERM):
        log(f"note: gatekeeper of {name} exited with {code}")


def gatekeeper_summary(text: str, project: Project) -> GkSummary:
    """What gatekeeper's log says: outcomes, holds, estimates against measured peaks."""
    outcomes: dict[str, int] = {}
    heavy_est: list[int] = []
    heavy_peak: list[int] = []
    light_est: list[int] = []
    light_peak: list[int] = []
    waits: list[float] = []
    runs: dict[bool, list[float]] = {True: [], False: []}
    unmeasured = 0
    jobs: list[tuple[str, int, int, str]] = []
    for line in text.splitlines():
        match = _GK_END.search(line)
        if match is None:
            continue
        outcomes[match["outcome"]] = outcomes.get(match["outcome"], 0) + 1
        waits.append(float(match["wait"]))
        job = match["job"] or ""
        heavy = project.is_heavy_object(job)
        runs[heavy].append(float(match["run"]))
        if match["est"] is not None:
            (heavy_est if heavy else light_est).append(int(match["est"]))
        if match["peak"] is not None:
            (heavy_peak if heavy else light_peak).append(int(match["peak"]))
            if match["est"] is not None:
                jobs.append((job, int(match["est"]), int(match["peak"]),
                             match["est_from"] or "?"))
        else:
            unmeasured += 1
    holds = [line.split("INFO: ", 1)[-1] for line in text.splitlines() if _GK_HOLD.search(line)]

    def span(values: list[int]) -> str:
        return f"{min(values)}-{max(values)}" if values else "-"

    return GkSummary(
        outcomes=outcomes, holds=len(holds), hold_examples=holds[:3],
        heavy_est_mib=span(heavy_est), heavy_peak_mib=span(heavy_peak),
        light_est_mib=span(light_est), light_peak_mib=span(light_peak),
        unmeasured=unmeasured,
        heavy_run_s=round(statistics.median(runs[True]), 2) if runs[True] else 0.0,
        light_run_s=round(statistics.median(runs[False]), 2) if runs[False] else 0.0,
        median_wait_s=round(statistics.median(waits), 2) if waits else 0.0,
        max_wait_s=round(max(waits), 1) if waits else 0.0,
        problems=[line for line in text.splitlines()
                  if "Traceback" in line or ": ERROR:" in line or ": WARNING:" in line][:5],
        jobs=jobs, pauses=text.count("INFO: pausing job="),
        cuts=text.count("WARNING: cutting job="))


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def _fmt(value: int | None) -> str:
    return "n/a" if value is None else str(value)


def medians(results: Sequence[Result]) -> dict[str, float]:
    """Median makespan per configuration over its rounds."""
    by: dict[str, list[float]] = {}
    for r in results:
        by.setdefault(r.name, []).append(r.seconds)
    return {k: statistics.median(v) for k, v in by.items()}


def summary_table(results: Sequence[Result], oracle: float | None) -> list[str]:
    """One row per configuration: medians over the rounds, every round's ratio
    to distccd --jobs 1 of the same round, and the worst."""
    med = medians(results)
    base = med.get("b")
    rounds = sorted({r.round for r in results})
    base_of = {r.round: r.seconds for r in results if r.name == "b"}
    rows = ["| configuration | rounds | OOM kills (all rounds) | failed compiles | median "
            "makespan s | median vs --jobs 1 | each round vs its --jobs 1 | vs oracle |",
            "|---|---|---|---|---|---|---|---|"]
    for key in sorted(med):
        mine = [r for r in results if r.name == key]
        kills = sum(r.oom_kills or 0 for r in mine)
        failed = sum(r.failed for r in mine)
        each = ", ".join(f"{r.seconds / base_of[r.round]:.2f}x" for r in mine
                         if base_of.get(r.round))
        ratio = f"{med[key] / base:.2f}x" if base else "-"
        vs_oracle = f"{med[key] / oracle:.2f}x" if oracle else "-"
        rows.append(f"| {key}: {mine[0].label} | {len(mine)}/{len(rounds)} | {kills} | "
                    f"{failed} | {med[key]:.1f} | {ratio} | {each or '-'} | {vs_oracle} |")
    return rows


def table(results: Sequence[Result]) -> list[str]:
    base_of = {r.round: r for r in results if r.name == "b"}
    rows = ["| run | configuration | OOM kills | failcnt | failed compiles | make exit | "
            "distcc errors | makespan s | vs --jobs 1 | most compiles at once (heavy) | "
            "cgroup peak MiB | stalled requests |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        base = base_of.get(r.round)
        ratio = f"{r.seconds / base.seconds:.2f}x" if base and base.seconds else "-"
        rows.append(
            f"| {r.name}{r.round} | {r.label} | {_fmt(r.oom_kills)} | {r.failcnt} | "
            f"{r.failed}/{r.expected} | {_fmt(r.make_exit)} | {r.client_errors} | "
            f"{r.seconds:.1f} | {ratio} | {r.max_concurrent} ({r.max_heavy_concurrent}) | "
            f"{r.cgroup_peak / MiB:.0f} | {r.slow_requests} |")
    return rows


def round_oracles(bench: Bench) -> dict[int, float]:
    """Each round's oracle from that round's own one-at-a-time durations (the
    median heavy and light compile of its distccd --jobs 1 build) and the
    calibrated charges: the box's speed drifts between the calibration and a
    later round (issue 18's mixed rounds: --jobs 1 took 125 s where calibration
    implied 110 s), and a yardstick on the same round is the fair one."""
    cal = bench.calibration
    if cal is None:
        return {}
    memory = bench.limit - bench.args.min_free_mb * MiB
    out: dict[int, float] = {}
    for r in bench.results:
        if r.name != "b" or not r.heavy_compile_s or not r.light_compile_s:
            continue
        jobs = ([Job(f"heavy{i}", cal.heavy_charge, r.heavy_compile_s)
                 for i in range(bench.spec.heavy)]
                + [Job(f"light{i}", cal.light_charge, r.light_compile_s)
                   for i in range(bench.spec.light)])
        out[r.round] = makespan(list_schedule(jobs, slots=bench.cpus, memory=memory))
    return out


def verdicts(results: Sequence[Result], oracle: float | None = None,
             per_round: dict[int, float] | None = None) -> list[str]:
    by = {r.name: r for r in results}
    out: list[str] = []

    def check(ok: bool, text: str) -> None:
        out.append(f"- {'PASS' if ok else 'MISS'}: {text}")

    for key in ("c", "d", "e", "f"):
        mine = [r for r in results if r.name == key]
        if mine:
            kills = sum(r.oom_kills or 0 for r in mine)
            failed = sum(r.failed for r in mine)
            check(kills == 0 and failed == 0 and all(r.make_exit == 0 for r in mine),
                  f"{mine[0].label}: 0 OOM kills and 0 failed compiles in every round "
                  f"(got {kills} and {failed})")
    med = medians(results)
    base_of = {r.round: r.seconds for r in results if r.name == "b"}
    for key in ("d", "f"):
        r = by.get(key)
        if r is not None and "b" in med:
            ratio = med[key] / med["b"]
            check(ratio <= 0.70, f"{r.label}: median makespan {med[key]:.1f}s <= 0.70 x "
                  f"distccd --jobs 1 ({med['b']:.1f}s): {ratio:.2f}x")
            worst = max(x.seconds / base_of[x.round] for x in results
                        if x.name == key and x.round in base_of)
            check(worst <= 0.80, f"{r.label}: no round above 0.80x of its --jobs 1: worst "
                  f"{worst:.2f}x")
    for key, target in (("c", 0.85), ("e", 0.85), ("d", 0.65), ("f", 0.65)):
        r = by.get(key)
        if r is not None and "b" in med:
            ratio = med[key] / med["b"]
            check(ratio <= target, f"issue 18: {r.label}: median {ratio:.2f}x of distccd "
                  f"--jobs 1, target <= {target:.2f}x")
    if oracle:
        for key in ("d", "f"):
            r = by.get(key)
            if r is not None:
                check(med[key] <= 1.2 * oracle, f"issue 18: {r.label}: median {med[key]:.1f}s "
                      f"within 1.2x of the oracle ({oracle:.1f}s): {med[key] / oracle:.2f}x")
    if per_round:
        for key in ("d", "f"):
            ratios = [r.seconds / per_round[r.round] for r in results
                      if r.name == key and r.round in per_round]
            if ratios:
                each = ", ".join(f"{x:.2f}x" for x in ratios)
                check(statistics.median(ratios) <= 1.2,
                      f"issue 18: {by[key].label}: median {statistics.median(ratios):.2f}x "
                      f"of its round's oracle (from that round's --jobs 1 durations; "
                      f"each {each}), target <= 1.2x")
    a_runs = [r for r in results if r.name == "a"]
    if a_runs:
        kills = sum(r.oom_kills or 0 for r in a_runs)
        check(kills > 0, f"{a_runs[0].label} shows OOM kills (got {kills} over "
              f"{len(a_runs)} rounds)")
    return out


def machine() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    meminfo = Path("/proc/meminfo").read_text().splitlines()
    total = next((int(line.split()[1]) * 1024 for line in meminfo
                  if line.startswith("MemTotal:")), 0)
    swaps = Path("/proc/swaps").read_text().strip().splitlines()[1:]
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": str(os.cpu_count()),
        "ram": f"{total / 2**30:.1f} GiB",
        "swap": "none" if not swaps else f"{len(swaps)} device(s)",
        "kernel": platform.release(),
        "os": first_line(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "g++": first_line(["g++", "--version"]),
        "distcc": first_line(["distcc", "--version"]),
        "python": platform.python_version(),
    }


def oracle_lines(bench: Bench) -> list[str]:
    """The yardstick (bench/schedule.py): the calibrated jobs scheduled by an oracle
    that knows each one's charge and duration, on the bench's CPUs and limit."""
    cal = bench.calibration
    assert cal is not None
    jobs = ([Job(f"heavy{i}", cal.heavy_charge, cal.heavy_seconds)
             for i in range(bench.spec.heavy)]
            + [Job(f"light{i}", cal.light_charge, cal.light_seconds)
               for i in range(bench.spec.light)])
    memory = bench.limit - bench.args.min_free_mb * MiB
    oracle = makespan(list_schedule(jobs, slots=bench.cpus, memory=memory))
    bound = area_bound(jobs, slots=bench.cpus, memory=memory)
    bench.oracle = oracle
    serial = sum(j.seconds for j in jobs)
    return [f"- oracle (`bench/schedule.py`: every job's calibrated charge and duration "
            f"known in advance, longest first, {bench.cpus} slots, {memory / MiB:.0f} MiB): "
            f"{oracle:.1f} s; no schedule beats {bound:.1f} s; one at a time {serial:.1f} s "
            f"(so {oracle / serial:.2f}x of one at a time is the best to hope for).", ""]


def estimate_lines(results: Sequence[Result]) -> list[str]:
    """Warm runs: each job's admission estimate beside the peak measured (its
    job cgroup's, where it had one): how exact learning is."""
    out = ["## Warm estimates against measured peaks", "",
           "Per warm build: jobs whose estimate (est, learned footprint + its margin) and "
           "peak are both logged; est/peak median and range, and how many jobs were within "
           "5 % (`est` includes the margin: 2-5 % for a repeat).", "",
           "| run | jobs | est/peak median | min | max | within 5 % | within 10 % |",
           "|---|---|---|---|---|---|---|"]
    for r in results:
        if r.name not in ("d", "f") or r.gk is None:
            continue
        ratios = [est / peak for _, est, peak, _ in r.gk.jobs if peak >= 8]  # MiB resolution
        if not ratios:
            continue
        close = sum(1 for x in ratios if abs(x - 1) <= 0.05)
        near = sum(1 for x in ratios if abs(x - 1) <= 0.10)
        out.append(f"| {r.name}{r.round} ({r.label}) | {len(ratios)} | "
                   f"{statistics.median(ratios):.3f} | {min(ratios):.3f} | {max(ratios):.3f} | "
                   f"{close} | {near} |")
    return out


# Issue 19's band of a good cold estimate, and from how many finished jobs on
# it is judged (the model needs some to learn from).
COLD_BAND = (0.8, 1.5)
COLD_AFTER = 30


def cold_estimate_lines(results: Sequence[Result]) -> list[str]:
    """Cold runs: how good the estimates of jobs never seen were (issue 19),
    from the COLD_AFTER-th finished job on."""
    out = ["## Cold estimates against measured peaks (issue 19)", "",
           f"Per cold build: jobs whose estimate was not learned (est_from predicted or "
           f"default), from the {COLD_AFTER + 1}th job to end on; est/peak, and how many were "
           f"within {COLD_BAND[0]:g}..{COLD_BAND[1]:g} (-20 %..+50 %; target: 70 %).", "",
           "| run | jobs judged | predicted | default | within band | share | "
           "est/peak median | min | max |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.name not in ("c", "e") or r.gk is None:
            continue
        judged = [(est / peak, source) for _, est, peak, source in r.gk.jobs[COLD_AFTER:]
                  if peak >= 8 and source != "learned"]
        if not judged:
            continue
        ratios = [x for x, _ in judged]
        within = sum(1 for x in ratios if COLD_BAND[0] <= x <= COLD_BAND[1])
        predicted = sum(1 for _, source in judged if source == "predicted")
        out.append(f"| {r.name}{r.round} ({r.label}) | {len(ratios)} | {predicted} | "
                   f"{len(ratios) - predicted} | {within} | {within / len(ratios):.0%} | "
                   f"{statistics.median(ratios):.3f} | {min(ratios):.3f} | "
                   f"{max(ratios):.3f} |")
    return out


def report(bench: Bench, runtime: float) -> str:
    cal = bench.calibration
    assert cal is not None
    m = machine()
    spec = bench.spec
    lines = [
        "# Memory-pressure bench results",
        "",
        "Written by `python3 -m bench.memory_pressure` (see bench/memory_pressure.py). "
        f"Stock distcc client, `make -k -j{bench.args.make_jobs}` of the generated project "
        "into distccd in a v1 memory cgroup.",
        "",
        "## Machine",
        "",
        *(f"- {k}: {v}" for k, v in m.items()),
        f"- bench runtime: {runtime:.0f} s",
        "",
        "## Workload and limit",
        "",
        f"- {spec.heavy} heavy files ({spec.heavy_classes} class templates each) and "
        f"{spec.light} light files ({spec.light_functions} small loop functions each), "
        f"`g++ {CXXFLAGS}`; Makefile order: groups of {spec.heavy_per_group} heavy then "
        f"{spec.lights_per_group} light.",
        f"- calibration (alone, local g++, best of {bench.args.calibration_runs}): heavy peak "
        f"RSS {cal.heavy_rss / MiB:.0f} MiB, cgroup charge {cal.heavy_charge / MiB:.0f} MiB, "
        f"{cal.heavy_seconds:.1f} s; light peak RSS {cal.light_rss / MiB:.0f} MiB, charge "
        f"{cal.light_charge / MiB:.0f} MiB, {cal.light_seconds:.1f} s.",
        f"- cgroup `memory.limit_in_bytes` = {bench.limit / MiB:.0f} MiB: midway between one "
        f"heavy + one light at peak RSS ({(cal.heavy_rss + cal.light_rss) / MiB:.0f} MiB, fits)"
        f" and two heavies at peak charge ({2 * cal.heavy_charge / MiB:.0f} MiB, does not); "
        f"memory.swappiness 0.",
        f"- gatekeeper: `-j {bench.cpus} --min-free-mb {bench.args.min_free_mb} --job-mem-mb "
        f"{bench.args.job_mem_mb} --state-dir DIR`; proxy mode adds `--cgroup "
        f"/sys/fs/cgroup/memory/gk-bench-PID` (gatekeeper outside it, distccd "
        f"`--jobs {bench.args.make_jobs}` inside); inetd mode runs gatekeeper in the cgroup "
        f"(auto-detected) with `-- distccd --inetd`. Warm = restarted on the same state dir.",
        "",
        *oracle_lines(bench),
        "## Results",
        "",
        f"Medians over {bench.args.rounds} interleaved round(s); each round builds every "
        "configuration once, in order.",
        "",
        *summary_table(bench.results, bench.oracle),
        "",
        "Every build:",
        "",
        *table(bench.results),
        "",
        "failed compiles = objects missing after `make -k`; failcnt = increase of "
        "memory.failcnt (times usage hit the limit); most compiles at once from the "
        "compiler wrapper distccd runs (heavy = peak RSS above the heavy/light midpoint); "
        "stalled requests = requests distccd needed over 1 s to receive (normally ms: "
        "seconds mean host-wide TCP memory pressure dropped loopback segments).",
        "",
        "## Targets (issues 3, 17 and 18)",
        "",
        *verdicts(bench.results, bench.oracle, round_oracles(bench)),
        "",
        "## gatekeeper's own view",
        "",
        "From its per-connection log: est = footprint it assumed when admitting "
        "(learned per compile, else the unknown-job estimate), peak = the job's measured "
        "peak as gatekeeper measured it (its own cgroup's peak where it gave the job "
        "one, else sampled private + shared memory); unmeasured = jobs with no peak.",
        "",
        "| run | outcomes | hold lines | pauses (cut) | heavy est / peak MiB | "
        "light est / peak MiB | unmeasured | median run s heavy / light | "
        "median / max wait s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in bench.results:
        g = r.gk
        if g is None:
            continue
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(g.outcomes.items()))
        lines.append(f"| {r.name}{r.round} | {outcomes} | {g.holds} | {g.pauses} ({g.cuts}) | "
                     f"{g.heavy_est_mib} / "
                     f"{g.heavy_peak_mib} | {g.light_est_mib} / {g.light_peak_mib} | "
                     f"{g.unmeasured} | {g.heavy_run_s} / {g.light_run_s} | "
                     f"{g.median_wait_s} / {g.max_wait_s} |")
    lines += ["", *estimate_lines(bench.results)]
    lines += ["", *cold_estimate_lines(bench.results)]
    notes = [f"- {r.name}{r.round}: {n}" for r in bench.results for n in r.notes]
    for r in bench.results:
        if r.gk is None:
            continue
        notes += [f"- {r.name}{r.round} hold: `{example}`" for example in r.gk.hold_examples]
        notes += [f"- {r.name}{r.round} log: `{line}`" for line in r.gk.problems]
    if notes:
        lines += ["", "## Notes", "", *notes]
    raw = {"machine": m, "calibration": dataclasses.asdict(cal), "limit_bytes": bench.limit,
           "spec": dataclasses.asdict(spec),
           "results": [dataclasses.asdict(r) | {"failed": r.failed} for r in bench.results]}
    lines += ["", "## Raw numbers", "", "```json", json.dumps(raw, indent=1), "```", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def preflight(args: argparse.Namespace) -> str | None:
    if os.geteuid() != 0:
        return "needs root (creates a memory cgroup; gatekeeper reads other users' /proc)"
    if not (Path(args.cgroup_parent) / "memory.limit_in_bytes").exists():
        return f"no cgroup v1 memory hierarchy at {args.cgroup_parent}"
    missing = [b for b in REQUIRED if shutil.which(b) is None]
    if not os.access(GNU_TIME, os.X_OK):
        missing.append(GNU_TIME)
    if missing:
        return f"missing: {', '.join(missing)} (apt-get install distcc g++ make time)"
    return None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m bench.memory_pressure",
                                description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="default",
                   help="default: 8 heavy (~230 MB) and 96 light (~12 MB charged, 0.6 s) "
                        "files; mixed: 3 heavy and 14 medium (~90 MB, ~2 s) files, where "
                        "a heavy and a medium fit together and two heavies do not "
                        "(issue 17); the flags below override either")
    p.add_argument("--rounds", type=int, default=3,
                   help="every configuration this many times, interleaved; medians "
                        "reported (default 3)")
    p.add_argument("--heavy", type=int, help="heavy files")
    p.add_argument("--light", type=int, help="light (mixed: medium) files")
    p.add_argument("--heavy-classes", type=int)
    p.add_argument("--light-functions", type=int)
    p.add_argument("--light-classes", type=int,
                   help="make light files medium ones of this many class templates")
    p.add_argument("--heavy-per-group", type=int,
                   help="heavy files side by side in the Makefile")
    p.add_argument("--lights-per-group", type=int, help="light files after each group")
    p.add_argument("--make-jobs", type=int, default=8,
                   help="make -jN and the client's host slots (default 8)")
    p.add_argument("--min-free-mb", type=int, default=16)
    p.add_argument("--job-mem-mb", type=int, default=256,
                   help="gatekeeper's seed for unknown jobs (default 256, its own default)")
    p.add_argument("--limit-mb", type=float, default=0,
                   help="cgroup limit instead of the calibrated one")
    p.add_argument("--calibration-runs", type=int, default=2)
    p.add_argument("--build-timeout", type=float, default=300.0,
                   help="seconds before a build is killed (default 300)")
    p.add_argument("--cgroup-parent", default=str(V1_MEMORY),
                   help=f"v1 memory cgroup to create the bench cgroup in (default {V1_MEMORY})")
    p.add_argument("--gatekeeper-src", default=str(REPO),
                   help="directory holding the gatekeeper package (default: this checkout)")
    p.add_argument("--only", nargs="*", choices=list("abcdef"),
                   help="run only these configurations")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "RESULTS-memory.md",
                   help="markdown report (default bench/RESULTS-memory.md); '-' for none")
    p.add_argument("--inetd-io", choices=["auto", "direct", "relay"], default="auto",
                   help="gatekeeper's --inetd-io for runs e and f")
    p.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    p.add_argument("--timelines", type=Path,
                   help="write each build's timeline SVG here (default: "
                        "bench/timelines/WORKLOAD)")
    args = p.parse_args(argv)
    if args.timelines is None:
        args.timelines = REPO / "bench" / "timelines" / args.workload
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    spec = WORKLOADS[args.workload]
    for name in ("heavy", "light", "heavy_classes", "light_functions", "light_classes",
                 "heavy_per_group", "lights_per_group"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(spec, name))
    problem = preflight(args)
    if problem:
        print(f"memory_pressure: cannot run: {problem}", file=sys.stderr)
        return 2
    bench = Bench(args)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        bench.run()
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        bench.cleanup()
        signal.signal(signal.SIGTERM, previous)
    runtime = time.monotonic() - bench.started
    print()
    if bench.calibration is not None:
        oracle_lines(bench)
    for row in summary_table(bench.results, bench.oracle):
        print(row)
    print()
    for row in table(bench.results):
        print(row)
    print()
    for line in verdicts(bench.results):
        print(line)
    print(f"\nbench runtime {runtime:.0f} s")
    if str(args.results) != "-":
        args.results.write_text(report(bench, runtime))
        print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
