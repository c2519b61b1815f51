"""End-to-end harness: a real distccd, a compile-recording compiler wrapper, a generated project.

Nothing here knows about gatekeeper except `GatekeeperProcess`, which only starts it as a
subprocess. The concurrency figure comes from the compiler side (the wrapper distccd
runs), so it measures what the server really ran, independently of the proxy.

How the wrapper is wired in (Debian distccd 3.4, src/serve.c):

* The client rewrites `g++`/`gcc` to the target-qualified name (`x86_64-linux-gnu-g++`,
  `dcc_gcc_rewrite_fqn`) and sends that as argv[0].
* distccd refuses any argv[0] with no masquerade entry in /usr/lib/distcc (the whitelist);
  it checks the *name* only, never which file will run.
* It then runs the name through execvp(), i.e. through *its own* PATH.

So a directory holding wrappers with the whitelisted names, put first on distccd's PATH,
is run for every job while the whitelist still passes. No system directory is touched
and no DISTCC_CMDLIST or --enable-tcp-insecure is needed.

The wrapper is a tiny C program compiled at start-up (gcc is needed anyway), so it needs
no interpreter the unprivileged distccd user can reach. Started as root, distccd drops to
an unprivileged user (`distccd` on Debian) before it runs compilers, so the work
directory lives in /tmp with permissions that user can use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

LOOPBACK = "127.0.0.1"
DISTCC_WHITELIST_DIR = Path("/usr/lib/distcc")
REQUIRED_BINARIES: tuple[str, ...] = ("distcc", "distccd", "gcc", "g++", "make")
# Compiler names the client may send; only those also in the whitelist dir can run.
BASE_COMPILER_NAMES: tuple[str, ...] = ("gcc", "g++", "cc", "c++")
STARTUP_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
DEFAULT_HOLD_S = 0.3
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Launcher names never to take as the "real" compiler.
_LAUNCHERS = frozenset({"distcc", "ccache", "sccache", "icecc"})
# distccd logs this (dcc_log_daemon_started) after listen(), so it accepts connections.
_DISTCCD_READY = re.compile(r"daemon started")
_DISTCCD_BIND_FAILED = re.compile(r"bind of .* failed|EXIT_BIND_FAILED|Address already in use")
_JOB_SUMMARY = re.compile(
    r"\(dcc_job_summary\) client: (?P<client>\S+) (?P<result>[A-Z_]+) exit:(?P<exit>-?\d+)"
)
_GATEKEEPER_READY = re.compile(r"listening on 127\.0\.0\.1:(?P<port>\d+)")
# The distcc client reports trouble as "distcc[PID] ERROR: ..." / "... Warning: ...".
_CLIENT_COMPLAINT = re.compile(r"distcc\[\d+\].*\b(?:ERROR|WARNING|Warning|failed)\b")
_ENV_DROP_PREFIXES = ("DISTCC", "CCACHE", "MAKE", "MFLAGS", "GNUMAKE")


def missing_binaries(names: Iterable[str] = REQUIRED_BINARIES) -> list[str]:
    """Names of required executables not found on PATH."""
    return [name for name in names if shutil.which(name) is None]


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The current environment without distcc/ccache/make settings that would leak in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_ENV_DROP_PREFIXES)}
    env["LC_ALL"] = "C"
    if extra:
        env.update(extra)
    return env


def free_port() -> int:
    """A currently free loopback TCP port (the caller retries if it is taken meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


# --------------------------------------------------------------------------------------
# Reading a child's output without blocking it
# --------------------------------------------------------------------------------------


class LineCollector:
    """Drains a text stream in a background thread and keeps every line.

    `wait_for` blocks on a condition variable that the reader notifies for each new line
    and at EOF, so waiting is event-driven and bounded by a deadline.
    """

    def __init__(self, stream: IO[str], name: str) -> None:
        self._stream = stream
        self._lines: list[str] = []
        self._eof = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"{name}-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for raw in self._stream:
                with self._cond:
                    self._lines.append(raw.rstrip("\n"))
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str] | None:
        """First match of `pattern` in any line (past or future); None on EOF or timeout."""
        deadline = time.monotonic() + timeout
        index = 0
        with self._cond:
            while True:
                while index < len(self._lines):
                    match = pattern.search(self._lines[index])
                    index += 1
                    if match:
                        return match
                if self._eof:
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def wait_until(self, predicate: Callable[[Sequence[str]], bool], timeout: float) -> bool:
        """Block until `predicate(lines)` holds; False on EOF or timeout without it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self._lines):
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    @property
    def lines(self) -> list[str]:
        with self._cond:
            return list(self._lines)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def _stop_process_group(proc: subprocess.Popen[str], timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM, wait, SIGKILL a child started with start_new_session=True, then reap
    anything left in its process group (distccd's preforked workers, compilers)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


# --------------------------------------------------------------------------------------
# Compile log: what the wrapper recorded, and the concurrency it implies
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CompileInterval:
    pid: int
    compiler: str
    start_ns: int
    end_ns: int | None  # None: never finished (killed hard, or still running)
    status: int | None  # exit code, or -signal; None if unfinished


@dataclasses.dataclass(frozen=True)
class CompileLog:
    intervals: tuple[CompileInterval, ...]
    malformed: tuple[str, ...]

    @property
    def count(self) -> int:
        return len(self.intervals)

    @property
    def unfinished(self) -> list[CompileInterval]:
        return [i for i in self.intervals if i.end_ns is None]

    @property
    def failed(self) -> list[CompileInterval]:
        return [i for i in self.intervals if i.status not in (None, 0)]

    @property
    def max_concurrency(self) -> int:
        return max_overlap(self.intervals)


def parse_compile_log(text: str) -> CompileLog:
    """Parse `start PID NS NAME` / `end PID NS STATUS` lines written by the wrapper."""
    starts: dict[int, tuple[int, str]] = {}
    done: list[CompileInterval] = []
    malformed: list[str] = []
    for line in text.splitlines():
        parts = line.split()
        try:
            if len(parts) == 4 and parts[0] == "start":
                starts[int(parts[1])] = (int(parts[2]), parts[3])
                continue
            if len(parts) == 4 and parts[0] == "end" and int(parts[1]) in starts:
                pid = int(parts[1])
                start_ns, name = starts.pop(pid)
                done.append(CompileInterval(pid, name, start_ns, int(parts[2]), int(parts[3])))
                continue
        except ValueError:
            pass
        if line.strip():
            malformed.append(line)
    open_ones = [CompileInterval(pid, name, ns, None, None) for pid, (ns, name) in starts.items()]
    intervals = sorted(done + open_ones, key=lambda i: i.start_ns)
    return CompileLog(tuple(intervals), tuple(malformed))


def max_overlap(intervals: Iterable[CompileInterval]) -> int:
    """Largest number of compiles running at one instant.

    Intervals are closed on the left and open on the right: a compile ending at the same
    nanosecond another starts does not overlap it. An unfinished compile counts as running
    until the end of time, so a lost `end` line can only raise the figure, never hide an
    over-limit.
    """
    events: list[tuple[int, int]] = []
    for interval in intervals:
        events.append((interval.start_ns, +1))
        if interval.end_ns is not None:
            events.append((interval.end_ns, -1))
    events.sort()  # at equal times -1 sorts before +1
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


# --------------------------------------------------------------------------------------
# The compiler wrapper
# --------------------------------------------------------------------------------------

_WRAPPER_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static const char *const LOG_PATH = @LOG_PATH@;
static const long HOLD_MS = @HOLD_MS@;
static const char *const COMPILERS[][2] = {
@COMPILERS@
    {NULL, NULL},
};

static volatile sig_atomic_t child_pid = 0;
static volatile sig_atomic_t pending_signal = 0;

static void on_signal(int sig) {
    pending_signal = sig;
    if (child_pid > 0)
        kill((pid_t)child_pid, sig);
}

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* One short write to an O_APPEND file: lines from concurrent wrappers never interleave. */
static int record(const char *line) {
    int fd = open(LOG_PATH, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0)
        return -1;
    size_t len = strlen(line);
    ssize_t n = write(fd, line, len);
    close(fd);
    return n == (ssize_t)len ? 0 : -1;
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
        fprintf(stderr, "gk-e2e-ccwrap: no real compiler known for '%s'\n", name);
        return 127;
    }

    sigset_t term, saved;
    sigemptyset(&term);
    sigaddset(&term, SIGTERM);
    sigaddset(&term, SIGINT);
    sigaddset(&term, SIGHUP);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);

    char line[512];
    snprintf(line, sizeof line, "start %ld %lld %s\n", (long)getpid(), now_ns(), name);
    if (record(line) != 0) {
        fprintf(stderr, "gk-e2e-ccwrap: cannot append to %s: %s\n", LOG_PATH, strerror(errno));
        return 126;
    }

    /* Workload: hold the slot so that concurrent jobs really overlap. */
    struct timespec hold = {HOLD_MS / 1000, (HOLD_MS % 1000) * 1000000L};
    while (!pending_signal && nanosleep(&hold, &hold) == -1 && errno == EINTR) {
    }

    int code;
    int killed_by = pending_signal;
    if (!killed_by) {
        sigprocmask(SIG_BLOCK, &term, &saved);
        pid_t pid = fork();
        if (pid == 0) {
            signal(SIGTERM, SIG_DFL);
            signal(SIGINT, SIG_DFL);
            signal(SIGHUP, SIG_DFL);
            sigprocmask(SIG_SETMASK, &saved, NULL);
            argv[0] = (char *)real;
            execv(real, argv);
            fprintf(stderr, "gk-e2e-ccwrap: exec %s: %s\n", real, strerror(errno));
            _exit(127);
        }
        if (pid < 0) {
            fprintf(stderr, "gk-e2e-ccwrap: fork: %s\n", strerror(errno));
            sigprocmask(SIG_SETMASK, &saved, NULL);
            code = 125;
        } else {
            child_pid = pid;
            sigprocmask(SIG_SETMASK, &saved, NULL);
            int status = 0;
            while (waitpid(pid, &status, 0) == -1 && errno == EINTR) {
            }
            if (WIFSIGNALED(status)) {
                killed_by = WTERMSIG(status);
                code = -killed_by;
            } else {
                code = WEXITSTATUS(status);
            }
        }
    } else {
        code = -killed_by;
    }

    snprintf(line, sizeof line, "end %ld %lld %d\n", (long)getpid(), now_ns(), code);
    record(line);
    if (killed_by) {
        signal(killed_by, SIG_DFL);
        sigprocmask(SIG_UNBLOCK, &term, NULL);
        raise(killed_by);
    }
    return code;
}
"""


def _c_string(value: str) -> str:
    if not value.isprintable() or '"' in value or "\\" in value or not value.isascii():
        raise ValueError(f"path not usable in the generated C source: {value!r}")
    return f'"{value}"'


def find_real_compiler(name: str, path: str | None = None) -> str | None:
    """First `name` on PATH that is a real compiler, not a distcc/ccache masquerade link."""
    for entry in (path if path is not None else os.environ.get("PATH", SYSTEM_PATH)).split(":"):
        if not entry:
            continue
        candidate = Path(entry) / name
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        if Path(os.path.realpath(candidate)).name in _LAUNCHERS:
            continue
        return str(candidate)
    return None


def whitelisted_compiler_names() -> list[str]:
    """Names distccd will agree to run (its masquerade whitelist) plus the base names."""
    names = set(BASE_COMPILER_NAMES)
    with contextlib.suppress(OSError):
        names.update(p.name for p in DISTCC_WHITELIST_DIR.iterdir())
    return sorted(names)


def build_compiler_wrapper(bin_dir: Path, log_path: Path, hold_s: float) -> dict[str, str]:
    """Compile the wrapper into `bin_dir` under every whitelisted compiler name.

    Returns {name: real compiler path} for the names wrapped.
    """
    real_path = ":".join([os.environ.get("PATH", ""), SYSTEM_PATH])
    mapping: dict[str, str] = {}
    for name in whitelisted_compiler_names():
        if "/" in name:
            continue
        real = find_real_compiler(name, real_path)
        if real is not None:
            mapping[name] = real
    if "gcc" not in mapping or "g++" not in mapping:
        raise RuntimeError(f"cannot find real gcc and g++ on PATH (found {mapping})")
    table = "\n".join(f"    {{{_c_string(n)}, {_c_string(p)}}}," for n, p in mapping.items())
    source = (
        _WRAPPER_C.replace("@LOG_PATH@", _c_string(str(log_path)))
        .replace("@HOLD_MS@", str(round(hold_s * 1000)))
        .replace("@COMPILERS@", table)
    )
    bin_dir.mkdir(parents=True, exist_ok=True)
    src = bin_dir.parent / "ccwrap.c"
    binary = bin_dir.parent / "ccwrap"
    src.write_text(source)
    proc = subprocess.run(
        [mapping["gcc"], "-O2", "-Wall", "-Werror", "-o", str(binary), str(src)],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"building the compiler wrapper failed:\n{proc.stderr}")
    binary.chmod(0o755)
    for name in mapping:
        os.link(binary, bin_dir / name)  # hard links: regular files to distccd's masq check
    return mapping


# --------------------------------------------------------------------------------------
# distccd
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class JobSummary:
    client: str
    result: str  # COMPILE_OK, COMPILE_ERROR, CLI_DISCONN, ...
    exit_code: int


def _job_summaries(lines: Iterable[str]) -> list[JobSummary]:
    out: list[JobSummary] = []
    for line in lines:
        match = _JOB_SUMMARY.search(line)
        if match:
            out.append(JobSummary(match["client"], match["result"], int(match["exit"])))
    return out


def _count_ok(summaries: Iterable[JobSummary]) -> int:
    return sum(1 for s in summaries if s.result == "COMPILE_OK")


def _drop_user() -> pwd.struct_passwd | None:
    """The account a root-started distccd should switch to (None when not root)."""
    if os.geteuid() != 0:
        return None
    for name in ("distccd", "distcc", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root but no distccd/distcc/nobody account exists")


class _Daemon:
    """A daemon started as its own process group with its output collected:
    what DistccServer and GatekeeperProcess share. Use as a context manager."""

    port: int
    _proc: subprocess.Popen[str] | None
    _output: LineCollector | None

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        assert self._proc is not None, "not started"
        return self._proc.pid

    @property
    def log_lines(self) -> list[str]:
        return self._output.lines if self._output else []

    @property
    def log_text(self) -> str:
        return "\n".join(self.log_lines)

    def wait_for(self, pattern: re.Pattern[str], timeout: float = STARTUP_TIMEOUT_S
                 ) -> re.Match[str]:
        """The first output line matching `pattern`, waiting up to `timeout`."""
        assert self._output is not None and self._proc is not None
        match = self._output.wait_for(pattern, timeout)
        if match is None:
            raise AssertionError(f"no line matching {pattern.pattern!r} within {timeout}s "
                                 f"(exit code {self._proc.poll()}); output:\n{self.log_text}")
        return match

    def wait_until(self, predicate: Callable[[Sequence[str]], bool],
                   timeout: float = STARTUP_TIMEOUT_S) -> bool:
        assert self._output is not None
        return self._output.wait_until(predicate, timeout)

    def start(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        if self._proc is not None:
            _stop_process_group(self._proc)
        if self._output is not None:
            self._output.join(STOP_TIMEOUT_S)

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None


class DistccServer(_Daemon):
    """A real distccd on 127.0.0.1 whose every compile goes through the recording wrapper.

    Use as a context manager. `compile_log()` reads what the wrapper recorded so far.
    """

    def __init__(
        self,
        *,
        jobs: int = 8,
        hold_s: float = DEFAULT_HOLD_S,
        startup_timeout: float = STARTUP_TIMEOUT_S,
        keep_workdir: bool = False,
        cgroup_procs: Path | None = None,
    ) -> None:
        """`cgroup_procs`: a cgroup's ``cgroup.procs``; distccd starts in that cgroup,
        so its pre-forked children and every compile they run are in it too."""
        self.jobs = jobs
        self.cgroup_procs = cgroup_procs
        self.hold_s = hold_s
        self.startup_timeout = startup_timeout
        self.keep_workdir = keep_workdir
        self.port = 0
        self.workdir: Path | None = None
        self.compile_log_path: Path | None = None
        self.wrapped: dict[str, str] = {}
        self._proc: subprocess.Popen[str] | None = None
        self._output: LineCollector | None = None
        self._launch: tuple[list[str], dict[str, str], Path] | None = None

    def _prepare_workdir(self) -> tuple[Path, Path, pwd.struct_passwd | None]:
        user = _drop_user()
        # Root: distccd runs compilers as `user`, so every parent must be traversable;
        # pytest's own tmp dirs are 0700, hence a private dir directly in /tmp.
        parent = "/tmp" if user is not None else None
        workdir = Path(tempfile.mkdtemp(prefix="gk-e2e-distccd-", dir=parent))
        workdir.chmod(0o755)
        self.workdir = workdir
        run_dir = workdir / "run"  # compile log + distccd's TMPDIR, owned by `user`
        (run_dir / "tmp").mkdir(parents=True)
        if user is not None:
            for path in (run_dir, run_dir / "tmp"):
                os.chown(path, user.pw_uid, user.pw_gid)
        run_dir.chmod(0o755)
        (run_dir / "tmp").chmod(0o700)
        self.compile_log_path = run_dir / "compiles.log"
        bin_dir = workdir / "bin"
        self.wrapped = build_compiler_wrapper(bin_dir, self.compile_log_path, self.hold_s)
        bin_dir.chmod(0o755)
        return bin_dir, run_dir, user

    def start(self) -> None:
        bin_dir, run_dir, user = self._prepare_workdir()
        distccd = shutil.which("distccd")
        if distccd is None:
            raise RuntimeError("distccd not found on PATH")
        env = clean_env({"PATH": f"{bin_dir}:{SYSTEM_PATH}", "TMPDIR": str(run_dir / "tmp")})
        last_output = ""
        for _attempt in range(3):  # a free port can be taken between probe and bind
            self.port = free_port()
            argv = [
                distccd,
                "--daemon",
                "--no-detach",
                "--log-stderr",
                "--log-level",
                "info",
                "--listen",
                LOOPBACK,
                "--port",
                str(self.port),
                "--allow",
                LOOPBACK,
                "--jobs",
                str(self.jobs),
            ]
            if user is not None:
                argv += ["--user", user.pw_name]
            if self.cgroup_procs is not None:
                argv = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.cgroup_procs), *argv]
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                env=env,
                cwd=run_dir,
                start_new_session=True,
            )
            assert self._proc.stdout is not None
            self._output = LineCollector(self._proc.stdout, "distccd")
            if self._output.wait_for(_DISTCCD_READY, self.startup_timeout):
                self._launch = (argv, env, run_dir)
                return
            _stop_process_group(self._proc)
            self._output.join(STOP_TIMEOUT_S)
            last_output = self._output.text
            if not _DISTCCD_BIND_FAILED.search(last_output):
                break
        raise RuntimeError(
            f"distccd did not become ready within {self.startup_timeout}s "
            f"(exit code {self._proc.returncode if self._proc else None}); output:\n"
            f"{last_output}"
        )

    def restart(self) -> None:
        """Kill distccd (and the compiles it runs) and start it again on the same
        port, as an admin's `systemctl restart distcc` would."""
        assert self._proc is not None and self._launch is not None
        _stop_process_group(self._proc)
        if self._output is not None:
            self._output.join(STOP_TIMEOUT_S)
        argv, env, run_dir = self._launch
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", env=env, cwd=run_dir, start_new_session=True)
        assert self._proc.stdout is not None
        self._output = LineCollector(self._proc.stdout, "distccd")
        if not self._output.wait_for(_DISTCCD_READY, self.startup_timeout):
            raise RuntimeError(f"distccd did not come back:\n{self._output.text}")

    def stop(self) -> None:
        super().stop()
        if self.workdir is not None and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def compile_log(self) -> CompileLog:
        if self.compile_log_path is None or not self.compile_log_path.exists():
            return CompileLog((), ())
        return parse_compile_log(self.compile_log_path.read_text())

    def job_summaries(self) -> list[JobSummary]:
        """distccd's one-line verdict per connection (COMPILE_OK, CLI_DISCONN, ...)."""
        return _job_summaries(self.log_lines)

    def wait_for_compile_start(self, count: int, timeout: float = 5.0) -> bool:
        """Whether `count` compiles have started within `timeout`. The wrapper's
        log is a plain file with no event to wait on: it is re-read every 20 ms,
        a bounded number of times."""
        for _ in range(max(1, int(timeout / 0.02))):
            if self.compile_log().count >= count:
                return True
            time.sleep(0.02)
        return self.compile_log().count >= count

    def wait_for_compile_ok(self, count: int, timeout: float = 5.0) -> list[JobSummary]:
        """Job summaries once `count` COMPILE_OK verdicts are logged (or the timeout passes).

        distccd logs the verdict only after replying, so it can trail the client's exit.
        """
        if self._output is not None:
            self._output.wait_until(
                lambda lines: _count_ok(_job_summaries(lines)) >= count, timeout
            )
        return self.job_summaries()



# --------------------------------------------------------------------------------------
# gatekeeper (only started here; nothing about its internals is assumed)
# --------------------------------------------------------------------------------------

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class GatekeeperProcess(_Daemon):
    """`python -m gatekeeper ...` as a subprocess; ready once it logs its bound port."""

    def __init__(self, args: Sequence[str], *, startup_timeout: float = STARTUP_TIMEOUT_S,
                 cgroup_procs: Path | None = None) -> None:
        """`cgroup_procs`: a cgroup's ``cgroup.procs``; gatekeeper starts in that
        cgroup (and so do inetd-mode children and their job cgroups, below it)."""
        self.argv = [sys.executable, "-m", "gatekeeper", *args]
        if cgroup_procs is not None:
            self.argv = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cgroup_procs),
                         *self.argv]
        self.startup_timeout = startup_timeout
        self.port = 0
        self._proc: subprocess.Popen[str] | None = None
        self._output: LineCollector | None = None

    def start(self) -> None:
        pythonpath = os.pathsep.join(
            p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p
        )
        self._proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=clean_env({"PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1"}),
            cwd=PROJECT_ROOT,
            start_new_session=True,
        )
        assert self._proc.stdout is not None
        self._output = LineCollector(self._proc.stdout, "gatekeeper")
        match = self._output.wait_for(_GATEKEEPER_READY, self.startup_timeout)
        if match is None:
            exited = self._proc.poll()
            state = f"exited with {exited}" if exited is not None else "still running"
            raise RuntimeError(
                f"gatekeeper printed no 'listening on 127.0.0.1:PORT' line within "
                f"{self.startup_timeout}s ({state}); argv={self.argv}; output:\n{self.log_text}"
            )
        self.port = int(match["port"])



# --------------------------------------------------------------------------------------
# The generated C/C++ project
# --------------------------------------------------------------------------------------

_MUL = 6364136223846793005
_ADD = 1442695040888963407
_MASK = (1 << 64) - 1
PROGRAM = "gk_e2e_prog"


@dataclasses.dataclass(frozen=True)
class Module:
    func: str
    source: str  # relative to the project root, e.g. src/cxx_03.cc
    seed: int
    depth: int

    @property
    def obj(self) -> str:
        return str(Path(self.source).with_suffix(".o"))

    def value(self) -> int:
        v = self.seed
        for n in range(1, self.depth + 1):
            v = (v * _MUL + _ADD + n * self.seed) & _MASK
        return v


@dataclasses.dataclass(frozen=True)
class Project:
    root: Path
    modules: tuple[Module, ...]
    main_source: str
    expected_output: str

    @property
    def sources(self) -> list[str]:
        return [m.source for m in self.modules] + [self.main_source]

    @property
    def objects(self) -> list[str]:
        return [str(Path(s).with_suffix(".o")) for s in self.sources]

    @property
    def translation_units(self) -> int:
        return len(self.sources)

    @property
    def program(self) -> Path:
        return self.root / PROGRAM


_HEADER = """\
#ifndef GK_E2E_H
#define GK_E2E_H
#define GK_MUL {mul}ULL
#define GK_ADD {add}ULL
#ifdef __cplusplus
extern "C" {{
#endif
{decls}
#ifdef __cplusplus
}}
#endif
#endif
"""

_CXX_MODULE = """\
// generated by distcc_harness: templates so the compiler has real work
#include "gk_e2e.h"

namespace {{
constexpr unsigned long long kSeed = {seed}ULL;

template <unsigned long long N>
struct Mix {{
    static constexpr unsigned long long value = Mix<N - 1>::value * GK_MUL + GK_ADD + N * kSeed;
}};

template <>
struct Mix<0> {{
    static constexpr unsigned long long value = kSeed;
}};
}}  // namespace

extern "C" unsigned long long {func}(void) {{ return Mix<{depth}>::value; }}
"""

_C_MODULE = """\
/* generated by distcc_harness */
#include "gk_e2e.h"

unsigned long long {func}(void) {{
    unsigned long long v = {seed}ULL;
    unsigned long long n;
    for (n = 1; n <= {depth}ULL; ++n)
        v = v * GK_MUL + GK_ADD + n * {seed}ULL;
    return v;
}}
"""

_MAIN = """\
// generated by distcc_harness
#include <cstdio>
#include "gk_e2e.h"

int main() {{
    unsigned long long sum = 0;
{mixes}
    std::printf("gk-e2e modules=%d checksum=%016llx\\n", {count}, sum);
    return 0;
}}
"""

_MAKEFILE = """\
# generated by distcc_harness
CC = distcc gcc
CXX = distcc g++
CPPFLAGS = -Iinclude
CFLAGS = -O2 -Wall -Werror
CXXFLAGS = -O2 -Wall -Werror -std=c++17
OBJS = {objs}

.PHONY: all objs
all: {program}
objs: $(OBJS)

{program}: $(OBJS)
\t$(CXX) -o $@ $(OBJS)

src/%.o: src/%.cc include/gk_e2e.h
\t$(CXX) $(CPPFLAGS) $(CXXFLAGS) -c $< -o $@

src/%.o: src/%.c include/gk_e2e.h
\t$(CC) $(CPPFLAGS) $(CFLAGS) -c $< -o $@
"""


def generate_project(dest: Path, *, cxx_files: int = 12, c_files: int = 3) -> Project:
    """Write a small deterministic C/C++ project with a Makefile using `distcc gcc/g++`."""
    modules: list[Module] = []
    for i in range(cxx_files):
        modules.append(
            Module(f"gk_cxx_{i:02d}", f"src/cxx_{i:02d}.cc", 1000003 * (i + 1) + 17, 200 + 25 * i)
        )
    for i in range(c_files):
        modules.append(
            Module(f"gk_c_{i:02d}", f"src/c_{i:02d}.c", 7919 * (i + 1) + 3, 5000 + 1000 * i)
        )
    (dest / "src").mkdir(parents=True, exist_ok=True)
    (dest / "include").mkdir(parents=True, exist_ok=True)
    decls = "\n".join(f"unsigned long long {m.func}(void);" for m in modules)
    (dest / "include" / "gk_e2e.h").write_text(_HEADER.format(mul=_MUL, add=_ADD, decls=decls))
    for m in modules:
        template = _CXX_MODULE if m.source.endswith(".cc") else _C_MODULE
        (dest / m.source).write_text(template.format(func=m.func, seed=m.seed, depth=m.depth))
    mixes = "\n".join(f"    sum = ((sum << 7) | (sum >> 57)) ^ {m.func}();" for m in modules)
    main_source = "src/main.cc"
    (dest / main_source).write_text(_MAIN.format(mixes=mixes, count=len(modules)))
    checksum = 0
    for m in modules:
        checksum = (((checksum << 7) | (checksum >> 57)) & _MASK) ^ m.value()
    project = Project(
        root=dest,
        modules=tuple(modules),
        main_source=main_source,
        expected_output=f"gk-e2e modules={len(modules)} checksum={checksum:016x}\n",
    )
    (dest / "Makefile").write_text(
        _MAKEFILE.format(objs=" ".join(project.objects), program=PROGRAM)
    )
    return project


def copy_project(project: Project, dest: Path) -> Project:
    """The same sources in another directory (no build products)."""
    shutil.copytree(project.root, dest, ignore=shutil.ignore_patterns("*.o", PROGRAM))
    return dataclasses.replace(project, root=dest)


# --------------------------------------------------------------------------------------
# Building and checking
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BuildResult:
    argv: tuple[str, ...]
    returncode: int | None  # None: killed on timeout
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def client_complaints(self) -> list[str]:
        """distcc client lines reporting an error/warning (remote failure, backoff...)."""
        text = self.stdout + "\n" + self.stderr
        return [line for line in text.splitlines() if _CLIENT_COMPLAINT.search(line)]

    def describe(self) -> str:
        return (
            f"$ {' '.join(self.argv)}\nexit={self.returncode} after {self.seconds:.1f}s\n"
            f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"
        )


def run_make(
    project_root: Path,
    *,
    jobs: int,
    env: Mapping[str, str],
    target: str = "all",
    overrides: Sequence[str] = (),
    timeout: float = 45.0,
) -> BuildResult:
    """`make -jN target` in its own process group, killed as a whole on timeout."""
    make = shutil.which("make") or "make"
    argv = (make, f"-j{jobs}", "-C", str(project_root), *overrides, target)
    begin = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        env=dict(env),
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n[harness] make killed after {timeout}s timeout"
        code = None
    return BuildResult(argv, code, out, err, time.monotonic() - begin)


def distcc_client_env(
    host: str, port: int, distcc_dir: Path, *, host_slots: int = 16, io_timeout: int = 30
) -> dict[str, str]:
    """Client environment: only the given server, no local fallback, no backoff."""
    distcc_dir.mkdir(parents=True, exist_ok=True)
    return clean_env(
        {
            "DISTCC_HOSTS": f"{host}:{port}/{host_slots}",
            "DISTCC_FALLBACK": "0",
            "DISTCC_SKIP_LOCAL_RETRY": "1",
            "DISTCC_BACKOFF_PERIOD": "0",
            "DISTCC_IO_TIMEOUT": str(io_timeout),
            "DISTCC_DIR": str(distcc_dir),
        }
    )


def distcc_build(
    project: Project,
    port: int,
    *,
    jobs: int = 12,
    host_slots: int = 16,
    io_timeout: int = 30,
    timeout: float = 45.0,
) -> BuildResult:
    """Build the project with the stock distcc client against 127.0.0.1:`port` only."""
    env = distcc_client_env(
        LOOPBACK, port, project.root / ".distccdir", host_slots=host_slots, io_timeout=io_timeout
    )
    return run_make(project.root, jobs=jobs, env=env, timeout=timeout)


def local_build(project: Project, *, jobs: int = 2, timeout: float = 45.0) -> BuildResult:
    """Build with plain gcc/g++ and the very same flags (the Makefile's), no distcc."""
    return run_make(
        project.root,
        jobs=jobs,
        env=clean_env(),
        overrides=("CC=gcc", "CXX=g++"),
        timeout=timeout,
    )


def read_objects(project: Project) -> dict[str, bytes]:
    return {obj: (project.root / obj).read_bytes() for obj in project.objects}


def object_mismatches(expected: Mapping[str, bytes], project: Project) -> list[str]:
    """Object files of `project` that are missing or differ from `expected` byte for byte."""
    bad: list[str] = []
    for obj, data in expected.items():
        path = project.root / obj
        if not path.exists():
            bad.append(f"{obj}: missing")
        elif path.read_bytes() != data:
            bad.append(f"{obj}: differs ({path.stat().st_size} vs {len(data)} bytes)")
    return bad


def run_program(project: Project, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(project.program)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(),
        check=False,
    )


# --------------------------------------------------------------------------------------
# Running like a system service (socket activation, inetd mode, signals)
# --------------------------------------------------------------------------------------


def gatekeeper_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for `python -m gatekeeper` run from this checkout."""
    pythonpath = os.pathsep.join(
        p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    env = clean_env({"PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1"})
    if extra:
        env.update(extra)
    return env


class ServiceProcess(_Daemon):
    """Any command in its own session, stdout+stderr collected line by line.

    For runs GatekeeperProcess does not cover: under systemd-socket-activate (which
    only execs gatekeeper at the first connection), with NOTIFY_SOCKET, or to see the
    exit code after a signal. Stopping kills the whole process group.
    """

    def __init__(self, argv: Sequence[str], *, env: Mapping[str, str],
                 cwd: Path = PROJECT_ROOT) -> None:
        self.argv = list(argv)
        self._proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )
        assert self._proc.stdout is not None
        self._output = LineCollector(self._proc.stdout, Path(self.argv[0]).name)

    @property
    def proc(self) -> subprocess.Popen[str]:
        assert self._proc is not None, "not started"
        return self._proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        if self._output is not None:
            self._output.join(STOP_TIMEOUT_S)
        return code

    def poll(self) -> int | None:
        return self.proc.poll()

    def start(self) -> None:
        pass  # started by __init__

    def stop(self) -> None:
        super().stop()
        if self._proc is not None and self._proc.stdout is not None:
            self._proc.stdout.close()


def children_of(pid: int) -> list[tuple[int, str]]:
    """(pid, state letter) of every process whose parent is `pid`, from /proc."""
    found: list[tuple[int, str]] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # Field 2 (comm) is in parentheses and may hold spaces: split after it.
        fields = stat[stat.rfind(")") + 2:].split()
        if int(fields[1]) == pid:
            found.append((int(entry), fields[0]))
    return found


class InetdDistccd(DistccServer):
    """What `distccd --inetd` needs to run per job under gatekeeper: the recording
    compiler wrapper, its work directory, and the command line (`command`).

    Nothing runs until gatekeeper starts a child per admitted job; distccd's log
    lines then go to gatekeeper's stderr.
    """

    command: list[str]
    allow: bool = True
    """Pass distccd --allow (it then needs the real client socket: --inetd-io
    auto gives it that); False leaves distccd unfiltered, so auto relays it."""

    def start(self) -> None:
        bin_dir, run_dir, user = self._prepare_workdir()
        distccd = shutil.which("distccd")
        if distccd is None:
            raise RuntimeError("distccd not found on PATH")
        # `env` sets distccd's PATH (wrappers first) and TMPDIR, then execs it: the
        # child gatekeeper starts is distccd itself, under the same pid.
        self.command = [
            shutil.which("env") or "/usr/bin/env",
            f"PATH={bin_dir}:{SYSTEM_PATH}",
            f"TMPDIR={run_dir / 'tmp'}",
            distccd,
            "--inetd",
            "--log-stderr",
            "--log-level",
            "info",
        ]
        if self.allow:
            self.command += ["--allow", LOOPBACK]
        if user is not None:
            self.command += ["--user", user.pw_name]


_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid


@dataclasses.dataclass
class Message:
    """One sd_notify datagram: its KEY=VALUE fields and the sender's pid."""

    fields: dict[str, str]
    pid: int


class NotifyReceiver:
    """A test NOTIFY_SOCKET in the abstract namespace that, like systemd, learns the
    sender's pid from SCM_CREDENTIALS (what NotifyAccess=main checks)."""

    def __init__(self) -> None:
        self.name = f"gk-notify-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + self.name)
        self.seen: list[Message] = []

    @property
    def address(self) -> str:
        return "@" + self.name

    def receive(self, timeout: float) -> Message | None:
        self.sock.settimeout(timeout)
        try:
            data, ancillary, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
        except TimeoutError:
            return None
        pid = -1
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _UCRED.unpack(payload[:_UCRED.size])[0]
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        message = Message(fields, pid)
        self.seen.append(message)
        return message

    def wait_for(self, predicate: Callable[[Message], bool], timeout: float = 10.0) -> Message:
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            message = self.receive(remaining)
            if message is not None and predicate(message):
                return message
        raise AssertionError(f"no such notification within {timeout}s; got {self.seen}")

    def close(self) -> None:
        self.sock.close()


def exchange(port: int, data: bytes, *, timeout: float = 30.0) -> bytes:
    """Send `data` to 127.0.0.1:`port` and read until the peer closes (FIN or RST)."""
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
        if data:
            s.sendall(data)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
        return got
