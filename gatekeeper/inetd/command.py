"""inetd mode: one COMMAND per admitted connection, on its stdin/stdout.

``gatekeeper [options] -- distccd --inetd ...`` works like inetd, tcpserver or
``systemd-socket-activate --inetd``, except that a connection waits in
gatekeeper's queue until admitted instead of getting its process at once. Why
run a process per job instead of splicing to a daemon:

* each job is one process tree, which is what a per-job memory meter needs:
  `CommandRunner.children` maps the pid of every running child to its
  `trio.Process`, and `on_start` reports each pid as it comes. The child
  leads its own process group (and session), so its tree is
  ``/proc/*/stat`` entries with that pgid, or can be signalled as one.

What the child gets as stdin/stdout is the server's choice (``--inetd-io``):
the client socket itself (this module's default: the child sees the real peer
address, and no byte passes through gatekeeper), or one end of a socketpair the
server relays (`inetd_wake` says why). `CommandRunner.run` takes either.

Resource handling:

* The client socket is given to the child as fds 0 and 1 (Popen dups it);
  ``close_fds`` keeps every other fd (listeners, other clients, the epoll set)
  out of the child. gatekeeper keeps its own reference until the child has
  exited, and its caller closes it afterwards -- so the client sees the end of
  the job when the child exits, whatever the child did with its copies.
* The open file description is shared with the child, and trio made it
  non-blocking; most inetd programs expect blocking stdio (``cat`` fails with
  EAGAIN otherwise), so the flag is cleared for the child's lifetime and set
  again afterwards. gatekeeper does no I/O on the socket in between.
* Every child is waited for, so none is left a zombie. If the job is cancelled
  (the drain timeout ran out), the child's process group gets SIGTERM, then
  SIGKILL after `KILL_GRACE` seconds, and is still waited for, shielded from
  the cancellation.
* A new session per child: a terminal's Ctrl-C reaches gatekeeper alone, which
  then drains gracefully instead of seeing its jobs killed under it.

Error handling: a command that cannot be started (exec fails) comes back as an
`Exit` with `error` set -- the server logs it and closes the client, which
falls back to a local compile. A non-zero exit status is the job's own
business: reported, never raised.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import trio

from gatekeeper.memory.freeze import thaw
from gatekeeper.memory.job_cgroup import JobCgroup
from gatekeeper.memory.meter import descendants

# After SIGTERM a cut-off job's process group gets this long before SIGKILL:
# distccd kills its compiler and exits within milliseconds; anything slower is
# stuck, and the drain timeout that led here has already been generous.
KILL_GRACE = 5.0


# `--clear-env` keeps these: the search path, HOME (ccache finds its cache
# there), the locale (compiler messages), where temporary files go, and
# distccd's and ccache's own settings (DISTCC_SAVE_TEMPS, DISTCC_CMDLIST,
# CCACHE_DIR...). Everything else gatekeeper was started
# with (credentials in a unit's Environment=, LD_PRELOAD...) stays out.
KEPT_ENV = frozenset({"PATH", "HOME", "LANG", "LANGUAGE", "TMPDIR", "TZ"})
KEPT_ENV_PREFIXES = ("LC_", "DISTCC_", "CCACHE_")


@dataclass(frozen=True, slots=True)
class Command:
    """The per-job command line, its program resolved once at start-up."""

    argv: tuple[str, ...]
    executable: str
    env: tuple[tuple[str, str], ...] | None = None
    """The child's whole environment (`--clear-env`); None: gatekeeper's own."""

    def clearing_env(self, environ: Mapping[str, str]) -> Command:
        """This command with only what a distccd needs of `environ` (`--clear-env`)."""
        kept = tuple(sorted((k, v) for k, v in environ.items()
                            if k in KEPT_ENV or k.startswith(KEPT_ENV_PREFIXES)))
        return dataclasses.replace(self, env=kept)

    @classmethod
    def resolve(cls, argv: Sequence[str], *, path: str | None = None) -> Command:
        """Find the program now, so a typo fails at start (one line) rather than on
        every job. Raises ValueError."""
        if not argv:
            raise ValueError("'--' must be followed by a COMMAND to run per connection")
        name = argv[0]
        found = shutil.which(name, path=path)
        if found is None:
            where = "" if "/" in name else " on PATH"
            raise ValueError(f"COMMAND {name!r}: no such executable{where}")
        return cls(tuple(argv), os.path.abspath(found))

    def __str__(self) -> str:
        return shlex.join(self.argv)


@dataclass(frozen=True, slots=True)
class Exit:
    """How one job's child ended."""

    pid: int | None
    returncode: int | None
    """Exit status, or minus the signal number; None if it never started."""
    error: str | None = None
    """Why the child could not be started (None if it was)."""

    @property
    def ok(self) -> bool:
        return self.error is None and self.returncode == 0

    def describe(self) -> str:
        if self.error is not None:
            return self.error
        if self.returncode is None:
            return "unknown"
        if self.returncode < 0:
            try:
                name = signal.Signals(-self.returncode).name
            except ValueError:
                name = f"signal {-self.returncode}"
            return f"killed by {name}"
        return f"exit status {self.returncode}"


def filters_peers(command: Command) -> bool:
    """Whether COMMAND checks its client's address itself (distccd's ``--allow``
    / ``-a``): then it must get the real client socket, since through a relay
    every client is a unix-domain socket, which distccd's access list refuses."""
    return any(arg.startswith("--allow") or (arg.startswith("-a") and not arg.startswith("--"))
               for arg in command.argv[1:])


class CommandRunner:
    """Runs `command` once per job; see the module docstring for who owns what."""

    def __init__(self, command: Command, *, kill_grace: float = KILL_GRACE,
                 on_start: Callable[[int], None] | None = None) -> None:
        self.command = command
        self.kill_grace = kill_grace
        self.on_start = on_start
        """Told each child's pid as it starts (tests count running children)."""
        self.children: dict[int, trio.Process] = {}
        """Running children by pid (a frozen copy is cheap: ``dict(children)``)."""

    async def run(self, stdio: socket.socket | trio.socket.SocketType, *, blocking: bool = True,
                  started: Callable[[int], None] | None = None,
                  cgroup: JobCgroup | None = None,
                  stopping: Callable[[], None] | None = None) -> Exit:
        """Run the command with `stdio` as its stdin and stdout until it exits.
        Does not close `stdio`. `blocking`: clear O_NONBLOCK (shared with the
        child) for the child's lifetime, as most inetd programs expect, and set
        it again afterwards; False leaves the flag as the caller set it.
        `started(pid)` runs once the child exists (before this waits);
        `stopping()` once it is being stopped because the wait was cancelled
        (pausing must then leave it alone: pauses.py).
        `cgroup`: the child joins it before it execs (so nothing it allocates is
        charged elsewhere); that costs a fork() where Python would otherwise use
        vfork(), measured in bench/small_jobs.py."""
        fd = stdio.fileno()
        if blocking:
            os.set_blocking(fd, True)
        try:
            try:
                proc = await trio.lowlevel.open_process(
                    list(self.command.argv), executable=self.command.executable,
                    stdin=fd, stdout=fd, stderr=None, close_fds=True,
                    start_new_session=True,
                    env=dict(self.command.env) if self.command.env is not None else None,
                    preexec_fn=cgroup.enter if cgroup is not None else None)
            except (OSError, subprocess.SubprocessError) as e:
                return Exit(None, None, f"cannot run {self.command.argv[0]}: "
                                        f"{getattr(e, 'strerror', None) or e}")
            finally:
                if cgroup is not None:
                    cgroup.close_fds()
            self.children[proc.pid] = proc
            try:
                if self.on_start is not None:
                    self.on_start(proc.pid)
                if started is not None:
                    started(proc.pid)
                await proc.wait()
            finally:
                if proc.returncode is None:  # cancelled while it ran
                    if stopping is not None:
                        stopping()
                    with trio.CancelScope(shield=True):
                        await self._stop(proc, cgroup)
                del self.children[proc.pid]
            return Exit(proc.pid, proc.returncode)
        finally:
            if blocking and stdio.fileno() != -1:  # closed already: nothing to restore
                with contextlib.suppress(OSError):
                    os.set_blocking(fd, False)

    async def _stop(self, proc: trio.Process, cgroup: JobCgroup | None) -> None:
        _signal_group(proc, signal.SIGTERM)
        # A paused job (pauses.py) must be let go on to see it: its whole tree,
        # since distccd's compiler is in a process group of its own.
        _signal_group(proc, signal.SIGCONT)
        if proc.returncode is None:
            for pid in descendants(proc.pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGCONT)
        if cgroup is not None:
            with contextlib.suppress(OSError):
                thaw(cgroup)
        with trio.move_on_after(self.kill_grace):
            await proc.wait()
            return
        _signal_group(proc, signal.SIGKILL)
        await proc.wait()


def _signal_group(proc: trio.Process, sig: int) -> None:
    """Signal the child's process group (its job's tree), or the child alone if it
    has left that group. A reaped child is never signalled: the pid may be reused."""
    if proc.returncode is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(OSError):
            proc.send_signal(sig)

