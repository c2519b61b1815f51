"""Which compile command lines may reach distccd: the argv policy at the gate.

Pure: no trio, no socket (tests/test_purity.py checks it). `ArgvPolicy.check`
takes the argv of a parsed request head and returns why it is refused, or
None. It runs before the job may queue; a refused client is closed and
compiles locally.

Why gatekeeper must do this: behind a local proxy distccd sees every client as
127.0.0.1, so its own ``--allow`` cannot tell them apart, and its compiler
check looks at argv[0] only. ``gcc -wrapper /bin/sh,-c,CMD -c x.c`` passes that
check and runs CMD as the distccd user.

**The compiler (argv[0])** must be a bare name from the gcc/clang family, as
Debian's ``update-distcc-symlinks`` lists them in /usr/lib/distcc: ``cc``,
``c++``, ``gcc``, ``g++``, ``clang``, ``clang++``, ``c89-gcc``/``c99-gcc``, each
with an optional target triplet prefix (``x86_64-linux-gnu-``) and an optional
version suffix (``-12``, ``-14.2``). No ``/``: a path picks the program to run,
and distccd 3.4 refuses paths too (unless built ``--enable-tcp-insecure``).
``--allow-compiler NAME`` adds names (exact, bare).

**Options** are refused when their purpose is one of these (gcc 12 and clang 16
driver manuals):

run another program
    ``-wrapper`` (runs every subcommand under it: the attack above), ``-B``
    and ``--prefix`` (where cc1, as, collect2 are looked up), ``-specs=`` /
    ``--specs`` (spec strings run commands), clang's ``-ccc-*`` driver
    overrides, ``--gcc-toolchain``/``--gcc-install-dir`` (where clang finds
    gcc's as and ld), ``--ld-path`` and a ``-fuse-ld=`` with a path;
load code into the compiler
    ``-fplugin=``, ``-fplugin-arg-*``, ``-iplugindir=`` (gcc plugins),
    ``-fpass-plugin=`` (clang), and through the pass-through options
    (``-Xclang``, ``-mllvm``, ``-Wa,``/``-Xassembler``, ``-Wp,``/``-Xpreprocessor``,
    ``-Wl,``/``-Xlinker``) any of ``-load``, ``-plugin``, ``-add-plugin``,
    ``--plugin``, ``-fplugin``, ``-fpass-plugin``, ``-wrapper``, ``-specs``;
read server files named by the client
    a ``@FILE`` response file anywhere (its contents are options this check
    never saw), ``--sysroot``/``-isysroot``, profile and list files
    (``-fprofile-use=``, ``-fauto-profile=``, ``-fprofile-instr-use=``,
    ``-fprofile-sample-use=``, ``-fsanitize-blacklist=``,
    ``-fsanitize-ignorelist=``), and ``-x`` (makes the compiler preprocess the
    sent source, which then #includes server files; distcc clients never send
    it: they compile ``-x`` locally);
write server files the client names
    ``-aux-info``, ``-dumpdir``, ``-dumpbase``, ``-fdump-*=``, ``-fopt-info*=``,
    ``-fcallgraph-info=``, ``-fprofile-note=``;
or hand the driver options unchecked
    ``-fcompare-debug=OPTS`` (a second compile with OPTS), clang's ``-cc1``
    (cc1 options directly: ``-load``), ``--driver-mode`` (cl mode's
    ``/clang:`` passes options on), ``--config`` (options read from a
    server file), and any ``--NAME`` that gcc reads as ``-fNAME`` or, for
    ``--warn-X``, ``-WX`` (gcc.cc's option_map), checked as what it becomes.

What no argv check can stop, and the unit's sandbox must: a compile reads
what the distccd user can read (``.incbin`` in inline assembly puts a file into
the object it returns). Run distccd as its own unprivileged user.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

_COMPILER = re.compile(
    r"(?:[A-Za-z0-9_]+(?:-[A-Za-z0-9_.]+)+-)?"   # target triplet: x86_64-linux-gnu-
    r"(?:cc|c\+\+|gcc|g\+\+|clang|clang\+\+|c89-gcc|c99-gcc)"
    r"(?:-[0-9]+(?:\.[0-9]+)*)?")                # version: -12, -14.2
# Only what the compiler's name can hold: the allowlist regex must never meet a path.
_BARE = re.compile(r"[A-Za-z0-9_.+-]{1,128}")

# Single-dash options refused alone (their value as the next argument).
_REFUSED_EXACT = frozenset({
    "-wrapper", "-specs", "-gcc-toolchain", "-isysroot", "-aux-info", "-dumpdir", "-x",
})
# Refused as prefixes of an argument (joined values, families).
_REFUSED_PREFIX = (
    "-B", "-specs=", "-ccc-", "-gcc-toolchain=", "-isysroot",
    # gcc: a second compile with driver options of the client's choosing
    "-fcompare-debug=",
    # clang: cc1 options directly, another driver (cl: /clang:, -clang:), a
    # config file of options read on the server
    "-cc1", "-clang:", "/clang:",
    # writes where the client says
    "-dumpbase", "-fprofile-note=",
    "-fplugin=", "-fplugin-arg-", "-iplugindir=", "-fpass-plugin=",
    "-fprofile-use=", "-fauto-profile=", "-fprofile-instr-use=", "-fprofile-sample-use=",
    "-fsanitize-blacklist=", "-fsanitize-ignorelist=", "-x",
)
# Long options refused, and every abbreviation of them: gcc's driver takes any
# unambiguous prefix of a long option (gcc.cc `option_map`: `--pref=DIR` is
# `--prefix=DIR`, which is -B), so `--NAME[=...]` is refused when NAME is a
# prefix of one of these. `--language` is -x, `--for-assembler`/`--for-linker`
# are -Xassembler/-Xlinker.
_REFUSED_LONG = (
    "--prefix", "--specs", "--sysroot", "--gcc-toolchain", "--gcc-install-dir",
    "--ld-path", "--language", "--for-assembler", "--for-linker", "--dumpdir",
    "--dumpbase", "--wrapper", "--plugin", "--include-prefix", "--driver-mode",
    "--config", "--compare-debug",
)
# Options whose next argument goes to a sub-tool (cc1, LLVM, as, cpp, ld)
# unchecked by the driver. (-Xarch_* and kin, which hand it back to the driver,
# are refused outright.)
_PASS_NEXT = frozenset({"-Xclang", "-mllvm", "-Xassembler", "-Xpreprocessor", "-Xlinker"})
# Options whose comma-separated (or joined) tail goes to a sub-tool. Its pieces
# are checked for what a sub-tool must not get, not as driver options:
# `-Wl,-Bstatic` is the linker's, not gcc's -B.
_PASS_JOINED = ("-Wa,", "-Wp,", "-Wl,", "-Xclang=", "-mllvm=")
# What a sub-tool must not be handed: loading code, running a program, an @file.
_SUBTOOL_REFUSED = ("-load", "-plugin", "-add-plugin", "--plugin", "-fplugin",
                    "-fpass-plugin", "-wrapper", "-specs", "--specs", "@")


@dataclass(frozen=True, slots=True)
class ArgvPolicy:
    """The compiler allowlist plus the refused options (see the module doc)."""

    extra_compilers: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def allowing(cls, names: Iterable[str]) -> ArgvPolicy:
        """With `--allow-compiler` names; ValueError for one that is not a bare name."""
        names = tuple(names)
        for name in names:
            if not _BARE.fullmatch(name):
                raise ValueError(f"{name!r} is not a bare compiler name "
                                 "(letters, digits, '.', '_', '+', '-'; no '/')")
        return cls(frozenset(names))

    def compiler_allowed(self, name: str) -> bool:
        return name in self.extra_compilers or bool(_COMPILER.fullmatch(name))

    def check(self, argv: Sequence[str]) -> str | None:
        """Why this command line is refused, or None if it may run."""
        if not argv:
            return "no compiler named (ARGC 0)"
        compiler = argv[0]
        if not self.compiler_allowed(compiler):
            return f"compiler {_show(compiler)} is not allowed (--allow-compiler adds one)"
        after_pass = False
        for arg in argv[1:]:
            if after_pass:
                after_pass = False
                if _subtool_refused(arg):
                    return f"option {_show(arg)} handed to a sub-tool is refused"
                continue
            if arg in _PASS_NEXT:
                after_pass = True
                continue
            reason = _option_refused(arg)
            if reason is not None:
                return reason
        return None


def _option_refused(arg: str) -> str | None:
    if arg.startswith("@"):
        return f"response file {_show(arg)} is refused (its options are read on the server)"
    if arg in _REFUSED_EXACT or arg.startswith(_REFUSED_PREFIX):
        return f"option {_show(arg)} is refused (it runs, loads or reads what the client names)"
    if arg.startswith("--"):
        name = arg.partition("=")[0]
        if any(long.startswith(name) or name.startswith(long) for long in _REFUSED_LONG):
            return f"option {_show(arg)} is refused (it runs, loads or reads what the client names)"
    if arg.startswith("--") and len(arg) > 2:
        # gcc reads an unknown `--NAME` as `-fNAME` and `--warn-X` as `-WX`
        # (gcc.cc option_map's catch-alls): check what the driver will see.
        rest = arg[2:]
        for alias in ("-f" + rest, "-W" + rest[5:] if rest.startswith("warn-") else ""):
            if alias and _option_refused(alias) is not None:
                return f"option {_show(arg)} is refused (gcc reads it as {_show(alias)})"
    if (arg.startswith(("-fdump-", "-fopt-info", "-fcallgraph-info")) and "=" in arg):
        return f"option {_show(arg)} is refused (it writes where the client names)"
    if arg.startswith("-fuse-ld=") and "/" in arg:
        return f"option {_show(arg)} is refused (a linker path)"
    for joined in _PASS_JOINED:
        if arg.startswith(joined):
            for piece in arg[len(joined):].split(","):
                if _subtool_refused(piece):
                    return f"option {_show(arg)} hands {_show(piece)} to a sub-tool, refused"
    if arg.startswith("-X") and arg not in _PASS_NEXT:
        # -Xarch_*, -Xopenmp-target, -Xcuda-*, -Xoffload-linker ...: forward an
        # argument this check would have to model per target; refused.
        return f"option {_show(arg)} is refused (it forwards arguments unchecked)"
    return None


def _show(arg: str) -> str:
    """An argument quoted for a log line: repr-escaped, and bounded."""
    return repr(arg[:80]) + ("..." if len(arg) > 80 else "")


def _subtool_refused(arg: str) -> bool:
    # `-x` too: `-Xclang -x -Xclang c` would make cc1 preprocess the sent source.
    # And what makes a sub-tool write where the client says: another output
    # (`-o`), a dependency file (`--MD`, `-MD`/`-MF` for cpp), an assembler
    # listing (`-al=FILE`, `-ahl=FILE`...).
    return (arg.startswith(_SUBTOOL_REFUSED) or arg in ("-x", "-o")
            or arg.startswith(("--MD", "-MD", "-MF", "-MMD"))
            or (arg.startswith("-a") and "=" in arg))
