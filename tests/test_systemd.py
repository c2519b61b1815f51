"""The systemd side: unit files checked by systemd's own tools, and gatekeeper started by
the real `systemd-socket-activate` (Debian systemd package), which binds the socket,
waits for the first connection, then execs gatekeeper with LISTEN_FDS/LISTEN_PID --
the same protocol PID 1 uses.

No systemd as PID 1 is needed: `systemd-analyze verify` and `security --offline`
read unit files directly. The units name /usr/bin/gatekeeper (where the Debian
package puts the script); the verify test points that one path at the script this
checkout really has, since verify insists the program exists. The package itself,
booted under a real systemd, is tests/test_deb_container.py.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from distcc_harness import (
    LOOPBACK,
    PROJECT_ROOT,
    DistccServer,
    NotifyReceiver,
    ServiceProcess,
    clean_env,
    distcc_build,
    free_port,
    generate_project,
    missing_binaries,
    run_program,
)

from gatekeeper.cli import parse_options

# Real processes and sockets: each test here is bounded well below the suite-wide limit.
pytestmark = pytest.mark.timeout(60)

UNITS = PROJECT_ROOT / "systemd"
INSTALLED_GATEKEEPER = "/usr/bin/gatekeeper"
DEFAULTS = UNITS / "gatekeeper.default"  # /etc/default/gatekeeper
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
SYSV_GENERATOR = Path("/lib/systemd/system-generators/systemd-sysv-generator")
DISTCC_INIT_SCRIPT = Path("/etc/init.d/distcc")

requires_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze not installed (Debian: apt-get install systemd)")
requires_activate = pytest.mark.skipif(
    SOCKET_ACTIVATE is None,
    reason="systemd-socket-activate not installed (Debian: apt-get install systemd)")


def unit_files() -> list[Path]:
    return sorted(p for p in UNITS.iterdir() if p.suffix in (".service", ".socket"))


def environment_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile= reads them (quotes removed)."""
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = " ".join(shlex.split(value))
    return env


def unit_environment(path: Path) -> dict[str, str]:
    """The unit's Environment= assignments (its defaults when the file is missing)."""
    env = {}
    for line in path.read_text().splitlines():
        if line.startswith("Environment="):
            for word in shlex.split(line.partition("=")[2]):
                key, _, value = word.partition("=")
                env[key] = value
    return env


def expand(argv: list[str], env: dict[str, str]) -> list[str]:
    """systemd's ExecStart= expansion: ${VAR} stays one word, a bare $VAR splits into
    words (an empty one vanishes)."""
    out: list[str] = []
    for word in argv:
        if re.fullmatch(r"\$[A-Za-z_][A-Za-z0-9_]*", word):
            out.extend(env[word[1:]].split())
        else:
            out.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env[m[1]], word))
    return out


def read_unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None,
                                       comment_prefixes=("#", ";"), delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


def exec_start(path: Path) -> list[str]:
    """The effective ExecStart= of a unit file or drop-in (the last non-empty one)."""
    lines = [line.partition("=")[2].strip() for line in path.read_text().splitlines()
             if line.startswith("ExecStart=")]
    return shlex.split([v for v in lines if v][-1])


def gatekeeper_program(tmp_path: Path) -> str:
    """An executable that runs this checkout's gatekeeper."""
    installed = shutil.which("gatekeeper")
    if installed:
        return os.path.realpath(installed)
    script = tmp_path / "gatekeeper"
    script.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m gatekeeper \"$@\"\n")
    script.chmod(0o755)
    return str(script)


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """systemd/ copied with the install path of gatekeeper made real, next to Debian's
    stock distcc.service as systemd-sysv-generator makes it from /etc/init.d/distcc."""
    dest = tmp_path / "units"
    dest.mkdir()
    program = gatekeeper_program(tmp_path)
    for path in unit_files():
        (dest / path.name).write_text(path.read_text().replace(INSTALLED_GATEKEEPER, program))
    if not (SYSV_GENERATOR.exists() and DISTCC_INIT_SCRIPT.exists()):
        pytest.skip("needs Debian's distcc package and systemd-sysv-generator for the stock "
                    "distcc.service the units conflict with")
    generated = tmp_path / "generated"
    generated.mkdir()
    proc = subprocess.run([str(SYSV_GENERATOR), str(generated), str(generated), str(generated)],
                          capture_output=True, text=True, timeout=30,
                          env={**clean_env(), "SYSTEMD_LOG_LEVEL": "err"})
    stock = generated / "distcc.service"
    assert stock.exists(), f"sysv generator made no distcc.service: {proc.stderr}"
    assert "ExecStart=/etc/init.d/distcc start" in stock.read_text()
    shutil.copy(stock, dest / "distcc.service")
    return dest


@requires_analyze
def test_systemd_analyze_verify_every_unit(unit_dir: Path) -> None:
    units = sorted(p for p in unit_dir.iterdir() if p.is_file())
    covered = {p.name for p in units}
    shipped = {p.name for p in unit_files()}
    assert shipped <= covered, f"not verified: {shipped - covered}"
    # The package installs exactly these (debian/gatekeeper.install).
    installed = (PROJECT_ROOT / "debian" / "gatekeeper.install").read_text().split()
    assert {Path(x).name for x in installed if x.startswith("systemd/")} == shipped
    argv = [str(SYSTEMD_ANALYZE), "verify", "--man=no", *map(str, units)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=unit_dir)
    # verify exits 0 even for unknown keys or bad values ("..., ignoring"): any output
    # at all is a finding.
    assert proc.returncode == 0 and proc.stdout == proc.stderr == "", (
        f"$ {shlex.join(argv)}\n{proc.stdout}{proc.stderr}")


@requires_analyze
def test_verify_catches_a_broken_unit(unit_dir: Path) -> None:
    """The check above can fail: a typo in a unit is reported."""
    unit = unit_dir / "gatekeeper-distccd.service"
    unit.write_text(unit.read_text() + "\nKilMode=mixed\n")
    proc = subprocess.run([str(SYSTEMD_ANALYZE), "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, timeout=60)
    assert "KilMode" in proc.stderr


@requires_analyze
@pytest.mark.parametrize(("unit", "threshold"), [
    ("gatekeeper.service", 2.0), ("gatekeeper-inetd.service", 2.0)])
def test_hardening_exposure(unit_dir: Path, unit: str, threshold: float) -> None:
    proc = subprocess.run([str(SYSTEMD_ANALYZE), "security", "--offline=true", "--no-pager",
                           f"--threshold={threshold * 10:.0f}", str(unit_dir / unit)],
                          capture_output=True, text=True, timeout=60)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr
    print(summary)
    assert proc.returncode == 0, summary


def test_units_agree_with_each_other_and_with_the_cli() -> None:
    defaults = environment_file(DEFAULTS)
    for name in ("gatekeeper.service", "gatekeeper-inetd.service",
                 "gatekeeper-distccd.service"):
        # A missing /etc/default/gatekeeper means the same limits as the shipped one.
        unit_env = unit_environment(UNITS / name)
        assert unit_env and all(defaults[k] == v for k, v in unit_env.items()), name
        assert "EnvironmentFile=-/etc/default/gatekeeper" in (UNITS / name).read_text()
    proxy = expand(exec_start(UNITS / "gatekeeper.service"), defaults)
    inetd = expand(exec_start(UNITS / "gatekeeper-inetd.service"), defaults)
    distccd = expand(exec_start(UNITS / "gatekeeper-distccd.service"), defaults)
    # An admin's extra flags land as flags (a bare $VAR splits into words).
    extra = expand(exec_start(UNITS / "gatekeeper.service"),
                   {**defaults, "GATEKEEPER_OPTS": "--agent 3634 --allow 10.0.0.0/8"})
    assert extra[-4:] == ["--agent", "3634", "--allow", "10.0.0.0/8"]
    assert parse_options(extra[1:]).command is None
    assert proxy[0] == inetd[0] == INSTALLED_GATEKEEPER
    # The command lines parse (a flag typo in a unit would fail the service at start).
    proxy_options = parse_options(proxy[1:])
    assert proxy_options.command is None
    if shutil.which(inetd[inetd.index("--") + 1]):
        inetd_options = parse_options(inetd[1:])
        assert inetd_options.command is not None and "--inetd" in inetd_options.command.argv
    # gatekeeper-distccd puts distccd exactly where gatekeeper.service forwards to.
    assert distccd[0].endswith("/distccd") and "--no-detach" in distccd
    port = distccd[distccd.index("--port") + 1]
    listen = distccd[distccd.index("--listen") + 1]
    assert f"{listen}:{port}" == str(proxy_options.config.backend) == "127.0.0.1:3633"
    for name in ("gatekeeper.socket", "gatekeeper-inetd.socket"):
        socket_unit = read_unit(UNITS / name)
        assert socket_unit["Socket"]["ListenStream"] == "3632"
        assert socket_unit["Socket"].get("Accept", "no") == "no"
    for name in ("gatekeeper.service", "gatekeeper-inetd.service"):
        service = read_unit(UNITS / name)["Service"]
        assert service["Type"] == "notify"
        # SIGTERM to gatekeeper alone (inetd children must be allowed to finish), and
        # systemd's stop timeout above the drain timeout.
        assert service["KillMode"] == "mixed"
        assert float(service["TimeoutStopSec"].rstrip("s")) > proxy_options.drain_timeout
        assert "ExecReload" not in service  # SIGHUP is documented as unsupported
        # Learned footprints survive restarts (issue 17).
        assert service["StateDirectory"] == "gatekeeper"
        argv = exec_start(UNITS / name)
        assert argv[argv.index("--state-dir") + 1] == "/var/lib/gatekeeper"
        assert read_unit(UNITS / name)["Unit"]["Conflicts"].split()
    # Proxy mode measures jobs through distccd's processes: same user, /proc
    # visible, real uids (DynamicUser + ProtectProc=invisible measured nothing).
    proxy_service = read_unit(UNITS / "gatekeeper.service")["Service"]
    backend = read_unit(UNITS / "gatekeeper-distccd.service")
    assert proxy_service["User"] == backend["Service"]["User"] == "distccd"
    # Installing the package changes nothing about a running distccd: the backend is a
    # unit of its own, started only with gatekeeper.service, never with distcc.service.
    assert "distcc.service" in backend["Unit"]["Conflicts"].split()
    assert "gatekeeper-distccd.service" in read_unit(
        UNITS / "gatekeeper.service")["Unit"]["Wants"].split()
    assert "Install" not in backend
    for hidden in ("DynamicUser", "ProtectProc", "PrivateUsers"):
        assert hidden not in proxy_service, hidden
    # inetd mode may make job cgroups where the kernel delegates memory (v2).
    inetd_service = read_unit(UNITS / "gatekeeper-inetd.service")["Service"]
    assert inetd_service["Delegate"] == "yes"
    assert "ProtectControlGroups" not in inetd_service  # it makes /sys/fs/cgroup read-only


# -- under the real systemd-socket-activate ----------------------------------------------

_SA_LISTENING = re.compile(r"Listening on (?P<address>\S+) as 3\.")
_GK_LISTENING = re.compile(r"gatekeeper: INFO: listening on (?P<address>\S+)")


def socket_activated(args: list[str], *, address: str | None = None,
                     sa_flags: tuple[str, ...] = (), **env: str) -> ServiceProcess:
    """systemd-socket-activate -l ADDRESS ... python -m gatekeeper ARGS, once it listens.
    The address may be a unix path; a free TCP port is picked (and re-picked if taken)."""
    assert SOCKET_ACTIVATE is not None
    passed = {"PYTHONPATH": str(PROJECT_ROOT), "PYTHONUNBUFFERED": "1", "LC_ALL": "C", **env}
    for _attempt in range(3):
        listen = address or f"{LOOPBACK}:{free_port()}"
        argv = [SOCKET_ACTIVATE, "-l", listen, "--fdname=distcc", *sa_flags,
                *(f"-E{k}={v}" for k, v in passed.items()),
                sys.executable, "-m", "gatekeeper", *args]
        proc = ServiceProcess(argv, env=clean_env())
        proc.wait_until(lambda lines: any(_SA_LISTENING.search(x) or "in use" in x
                                          for x in lines))
        if _SA_LISTENING.search(proc.log_text):
            return proc
        proc.stop()
    raise AssertionError(f"systemd-socket-activate did not start listening:\n{proc.log_text}")


def tcp_port(proc: ServiceProcess) -> int:
    return int(proc.wait_for(_SA_LISTENING)["address"].rpartition(":")[2])


MISSING = missing_binaries()


@requires_activate
@pytest.mark.e2e
@pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)} on PATH")
def test_distcc_build_through_socket_activated_gatekeeper(tmp_path: Path) -> None:
    project = generate_project(tmp_path / "project")
    notify = NotifyReceiver()
    with DistccServer(jobs=8) as distccd, socket_activated(
            ["--backend", distccd.address, "--max-jobs", "2", "--min-free-mb", "0"],
            NOTIFY_SOCKET=notify.address) as sa:
        port = tcp_port(sa)
        # gatekeeper does not run yet: the build's first connection makes
        # systemd-socket-activate exec it, and waits in the socket's backlog meanwhile.
        assert "gatekeeper" not in sa.log_text.replace("Execing", "")
        build = distcc_build(project, port, jobs=12, host_slots=16)
        ready = notify.wait_for(lambda m: m.fields.get("READY") == "1")
        log = sa.log_text
        diag = f"{build.describe()}\n--- systemd-socket-activate + gatekeeper ---\n{log}"
        assert build.ok, diag
        assert build.client_complaints == [], diag
        assert "using 1 socket(s) from the service manager" in log, diag
        assert f"listening on {LOOPBACK}:{port}" in log, diag
        # LISTEN_PID named the process that then exec'd gatekeeper: the same pid
        # notified readiness (what systemd's NotifyAccess=main accepts).
        assert ready.pid == sa.pid
        compiles = distccd.compile_log()
        assert compiles.count == project.translation_units and compiles.failed == [], diag
        assert 1 <= compiles.max_concurrency <= 2, diag
        sa.send_signal(signal.SIGTERM)
        assert sa.wait(10) == 0, diag
    notify.close()
    run = run_program(project)
    assert run.returncode == 0 and run.stdout == project.expected_output
    print(f"socket-activated: {compiles.count} compiles, max concurrency "
          f"{compiles.max_concurrency}, build {build.seconds:.1f}s")


class EchoBackend:
    """A threaded loopback backend that echoes until EOF."""

    def __init__(self) -> None:
        self.sock = socket.create_server((LOOPBACK, 0))
        self.address = f"{LOOPBACK}:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def echo_backend() -> Iterator[EchoBackend]:
    be = EchoBackend()
    yield be
    be.close()


def roundtrip(sock: socket.socket, data: bytes) -> bytes:
    """Send, then read the echo back. No half-close: a client that half-closes while
    queued counts as gone (and the first client here is queued while gatekeeper starts)."""
    sock.settimeout(10)
    sock.sendall(data)
    got = b""
    while len(got) < len(data) and (chunk := sock.recv(65536)):
        got += chunk
    return got


@requires_activate
def test_unix_socket_activation(tmp_path: Path, echo_backend: EchoBackend) -> None:
    path = tmp_path / "gk.sock"
    with socket_activated(["--backend", echo_backend.address], address=str(path)) as sa:
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
            assert roundtrip(client, b"over unix") == b"over unix"
        assert f"listening on unix:{path}" in sa.log_text
        sa.send_signal(signal.SIGTERM)
        assert sa.wait(10) == 0, sa.log_text


@requires_activate
def test_listen_naming_the_activated_socket_is_accepted(echo_backend: EchoBackend) -> None:
    port = free_port()
    with socket_activated(["--listen", f"127.0.0.1:{port}", "--backend", echo_backend.address],
                          address=f"127.0.0.1:{port}") as sa:
        with socket.create_connection((LOOPBACK, port)) as client:
            assert roundtrip(client, b"same") == b"same"
        sa.send_signal(signal.SIGTERM)
        assert sa.wait(10) == 0, sa.log_text


def _gatekeeper_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("gatekeeper")]


@requires_activate
@pytest.mark.parametrize(("args", "sa_flags", "code", "says"), [
    (["--listen", "127.0.0.1:1"], (), 2, "--listen 127.0.0.1:1 is not among them"),
    ([], ("--accept",), 1, "is not listening"),
    ([], ("--datagram",), 1, "is not a stream socket"),
])
def test_unusable_activation_is_a_one_line_error(args: list[str], sa_flags: tuple[str, ...],
                                                 code: int, says: str) -> None:
    with socket_activated(["--backend", "127.0.0.1:9", *args], sa_flags=sa_flags) as sa:
        port = tcp_port(sa)
        kind = socket.SOCK_DGRAM if "--datagram" in sa_flags else socket.SOCK_STREAM
        with socket.socket(socket.AF_INET, kind) as poke:  # makes it exec gatekeeper
            poke.connect((LOOPBACK, port))
            poke.send(b"x")
            if "--accept" in sa_flags:
                # --accept runs a child per connection and keeps going itself; the
                # child's exit shows in its output.
                sa.wait_until(lambda lines: any(says in x for x in lines))
                lines = _gatekeeper_lines(sa.log_text)
                assert len(lines) == 1 and says in lines[0], sa.log_text
                return
            assert sa.wait(10) == code, sa.log_text
    lines = _gatekeeper_lines(sa.log_text)
    assert len(lines) == 1 and says in lines[0], sa.log_text
    assert "Traceback" not in sa.log_text
