"""Who a compile is, wherever it was checked out, and what its head says of it.

Pure: no trio, no socket, no clock (tests/test_purity.py checks the imports).

A learned footprint is only worth having if the next run of the same compile
finds it. Hashing the whole command line found it only for one tree in one
place (issue 19: a second checkout of fmtlib got a learned estimate for 2 of
45 jobs): CMake passes absolute source paths, and pump mode (protocol 3) sends
the preprocessor's options that a plain client strips. So the identity
(`portable_key`) keeps what changes the compile and drops where it happened:

- the compiler's file name (not its directory: `/usr/bin/g++` is `g++`);
- the flags, less the preprocessor's own (`-D`, `-I`, `-include`, `-M*`, ...:
  a plain distcc client strips them before sending, distcc's src/strip.c, so
  pump and plain mode agree; their effect is in the source's size) and less
  path maps (`-fdebug-prefix-map=`, which only rename);
- the source's path relative to the project: the longest tail it shares with
  the object's path (CMake's `-c /home/alice/src/lib/a.cc -o
  CMakeFiles/t.dir/lib/a.cc.o` gives `lib/a.cc`), at least its file name;
  a relative path loses its leading `./` and `../` (build directories at
  different depths);
- the object's directory in front of that tail when it is relative
  (`CMakeFiles/t.dir`: the target), nothing from an absolute one but what
  follows a `CMakeFiles` component.

Two projects can still share an identity (`main.cc`, same flags): the book
keeps the request size it learned a key with and does not trust a key whose
job now differs much in size (`footprints.SIZE_DRIFT`).

`features` reads what predicts a cold compile's peak before it runs: the
request's size (protocol 1: the preprocessed source; 2: its LZO-compressed
length; 3: the shipped files' compressed lengths), the compiler, the language,
the optimisation and debug levels.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass
from typing import Final

# Identity format, written into the key: a key from another way of reading a
# command line never matches one of these (footprints.FORMAT 2 holds them).
KEY_PREFIX: Final = "p2-"

# Preprocessor options a plain distcc client strips (distcc 3.4 src/strip.c,
# dcc_strip_local_args): with their value as the next argument...
_LOCAL_WITH_VALUE: Final = frozenset({
    "-D", "-I", "-U", "-L", "-l", "-MF", "-MT", "-MQ", "-include", "-imacros",
    "-iprefix", "-iwithprefix", "-isystem", "-iwithprefixbefore", "-idirafter",
    "-iquote", "-isysroot", "-Xpreprocessor",
})
# ...glued to it...
_LOCAL_PREFIXES: Final = ("-Wp,", "-Wl,", "-D", "-U", "-I", "-l", "-L", "-MF", "-MT", "-MQ",
                          "-stdlib",
                          "-isystem", "-iquote", "-idirafter", "-include", "-imacros",
                          "-fdebug-prefix-map=", "-ffile-prefix-map=",
                          "-fmacro-prefix-map=", "-fprofile-prefix-map=")
# ...or alone.
_LOCAL_ALONE: Final = frozenset({
    "-undef", "-nostdinc", "-nostdinc++", "-MD", "-MMD", "-MG", "-MP", "-MM", "-M",
})
# Options whose next argument is a value, not the source file.
_WITH_VALUE: Final = frozenset({"-o", "-x", "-arch", "-target", "--target", "-Xclang",
                                "-Xassembler", "-Xlinker", "-Xpreprocessor", "-aux-info",
                                "-MF", "-MT", "-MQ"}) | _LOCAL_WITH_VALUE

_LANGUAGES: Final = {
    ".c": "c", ".i": "c", ".cc": "c++", ".cp": "c++", ".cxx": "c++", ".cpp": "c++",
    ".c++": "c++", ".C": "c++", ".CPP": "c++", ".ii": "c++", ".m": "objc", ".mi": "objc",
    ".mm": "objc++", ".M": "objc++", ".mii": "objc++",
}
_OBJECT_SUFFIXES: Final = (".o", ".obj", ".s", ".lo")

# Bounds on what goes into a key or a feature: argv is the client's (see
# request.MAX_HEADER); a compiler name or language past this is not a real one.
MAX_NAME: Final = 64


@dataclass(frozen=True, slots=True)
class Features:
    """What a request head says of a compile before it runs."""

    compiler: str
    language: str
    optimisation: str
    """The last -O level: 0, 1, 2, 3, s, z, fast, g."""
    debug: bool
    encoding: str
    """How the size is counted: plain (preprocessed bytes), lzo (compressed),
    pump (shipped files, compressed)."""
    size: int | None
    """The request's size in `encoding`'s unit; None if the head did not say."""

    @property
    def kind(self) -> str:
        """The class a prediction is made in: same compiler, language, levels
        and size unit."""
        return (f"{self.compiler}/{self.language}/O{self.optimisation}"
                f"{'/g' if self.debug else ''}/{self.encoding}")


def _bounded(text: str) -> str:
    return text[:MAX_NAME]


def compiler_name(argv: tuple[str, ...]) -> str:
    return _bounded(posixpath.basename(argv[0])) if argv else ""


def _strip_local(args: tuple[str, ...]) -> list[str]:
    """The arguments a plain distcc client would have sent (src/strip.c)."""
    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in _LOCAL_WITH_VALUE:
            skip = True
            continue
        if arg in _LOCAL_ALONE or arg.startswith(_LOCAL_PREFIXES):
            continue
        kept.append(arg)
    return kept


def source_and_output(args: list[str]) -> tuple[str | None, str | None]:
    """The source file (the last argument that is not an option or an option's
    value) and the -o value."""
    source = output = None
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in _WITH_VALUE:
            if arg == "-o" and i + 1 < len(args):
                output = args[i + 1]
            i += 2
            continue
        if arg.startswith("-o") and len(arg) > 2:
            output = arg[2:]
        elif not arg.startswith("-") or arg == "-":
            source = arg
        i += 1
    return source, output


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


def _object_stem(name: str) -> str:
    for suffix in _OBJECT_SUFFIXES:
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name


def _stem(name: str) -> str:
    return posixpath.splitext(name)[0]


def _without_leading_dotdot(parts: list[str]) -> list[str]:
    """`../../src/a.c` -> `src/a.c`: one slice (a hostile path of 85,000 `..`
    cost 0.9 s when they were popped one at a time)."""
    i = 0
    while i < len(parts) and parts[i] == "..":
        i += 1
    return parts[i:]


def project_paths(source: str, output: str | None) -> tuple[str, str]:
    """(the source's path within its project, the object's directory in front
    of it), independent of where the project and its build directory are."""
    src = _without_leading_dotdot(_parts(source))
    if not src:
        return "", ""
    out = _parts(output) if output else []
    shared = 0
    if out:
        last = _object_stem(out[-1])
        if last == src[-1] or _stem(last) == _stem(src[-1]):
            shared = 1
            while (shared < len(src) and shared < len(out)
                   and src[-1 - shared] == out[-1 - shared]):
                shared += 1
    if source.startswith("/"):
        src = src[-max(shared, 1):]
    prefix = out[:len(out) - shared] if shared else out[:-1]
    if output is not None and output.startswith("/"):
        anchors = [i for i, p in enumerate(prefix) if p == "CMakeFiles"]
        prefix = prefix[anchors[-1]:] if anchors else []
    prefix = _without_leading_dotdot(prefix)
    if out and not shared:
        # An object not named for its source (automake's `prog1-foo.o` and
        # `prog2-foo.o` of one foo.c, differing only in -D, which a plain
        # client strips): its name is what tells the compiles apart.
        prefix.append(_object_stem(out[-1]))
    return "/".join(src), "/".join(prefix)


def portable_key(argv: tuple[str, ...]) -> str:
    """The compile's identity across checkouts, build directories and
    protocols (see the module's docstring)."""
    if not argv:
        return KEY_PREFIX + hashlib.blake2b(b"", digest_size=10).hexdigest()
    args = _strip_local(argv[1:])
    source, output = source_and_output(args)
    flags: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-o":
            i += 2
            continue
        if not (arg == source or (arg.startswith("-o") and len(arg) > 2)):
            flags.append(arg)
        i += 1
    where, target = project_paths(source, output) if source is not None else ("", "")
    text = "\0".join([compiler_name(argv), where, target, "\1", *flags])
    digest = hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=10)
    return KEY_PREFIX + digest.hexdigest()


def language(argv: tuple[str, ...]) -> str:
    """What the compile's language is: -x's value, else the source's suffix
    (a C file given to a C++ driver is C++)."""
    args = list(argv[1:])
    for i, arg in enumerate(args[:-1]):
        if arg == "-x":
            return _bounded(args[i + 1].removesuffix("-cpp-output"))
    source, _ = source_and_output(_strip_local(argv[1:]))
    if source is None:
        return "?"
    lang = _LANGUAGES.get(posixpath.splitext(source)[1], "?")
    if lang == "c" and "++" in compiler_name(argv):
        return "c++"
    return lang


# -O levels as gcc and clang read them; a number above 3 is 3, and anything
# else one kind ("other"), so made-up levels cannot crowd out real kinds
# (prediction.MAX_KINDS).
_LEVELS: Final = frozenset({"0", "1", "2", "3", "s", "z", "fast", "g"})


def _level(rest: str) -> str:
    if rest == "":
        return "1"
    if rest in _LEVELS:
        return rest
    if rest.isdigit() and rest.isascii():
        return "3"
    return "other"


def optimisation(argv: tuple[str, ...]) -> tuple[str, bool]:
    """(the last -O level, whether debug information is on)."""
    level, debug = "0", False
    for arg in argv[1:]:
        if arg.startswith("-O"):
            level = _level(arg[2:])
        elif arg.startswith("-g") and arg[2:] in ("", "1", "2", "3", "gdb", "dwarf",
                                                   "gdb3", "dwarf-4", "dwarf-5"):
            debug = True
        elif arg == "-g0":
            debug = False
    return level, debug


def features(argv: tuple[str, ...], *, version: int, size: int | None) -> Features:
    """The features of a request of protocol `version` and `size` bytes."""
    level, debug = optimisation(argv)
    encoding = {1: "plain", 2: "lzo", 3: "pump"}.get(version, "plain")
    return Features(compiler=compiler_name(argv), language=language(argv),
                    optimisation=level, debug=debug, encoding=encoding, size=size)
