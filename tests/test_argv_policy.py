"""The argv policy (distcc/policy.py): what may reach distccd, by table.

Each refused row names the option's purpose (run, load, read, write); each
allowed row is a command line real builds send (gcc, clang, CMake, kernel-ish
flags), so tightening the list cannot silently break builds."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatekeeper.distcc.policy import ArgvPolicy
from gatekeeper.distcc.request import UNREADABLE, encode_request_head, parse_request_head

POLICY = ArgvPolicy()
COMPILE = ["-c", "x.c", "-o", "x.o"]

ALLOWED_COMPILERS = [
    "gcc", "g++", "cc", "c++", "clang", "clang++", "gcc-12", "g++-12", "clang-16",
    "clang++-16", "x86_64-linux-gnu-gcc", "x86_64-linux-gnu-g++-12", "arm-none-eabi-gcc",
    "aarch64-linux-gnu-gcc-14.2", "c89-gcc", "c99-gcc", "i686-w64-mingw32-g++",
]
REFUSED_COMPILERS = [
    "sh", "/bin/sh", "/usr/bin/gcc", "../gcc", "gcc/", "python3", "evil-cc", "gcc-", "gcc-x",
    "", "gcc ", "gcc\n", "cc1", "bash-gcc;id", "g++-12/../../sh",
]

ALLOWED_ARGS = [
    ["-O2", "-g", "-Wall", "-Wextra", "-std=c++17", "-fPIC", "-pipe"],
    ["-Wa,--noexecstack", "-Wa,-mrelax-relocations=no"],
    ["-Xclang", "-fno-pch-timestamp"],
    ["-mllvm", "-inline-threshold=100"],
    ["--param=max-inline-insns-single=10", "--param", "l1-cache-size=32"],
    ["--std=c11", "--target=x86_64-linux-gnu", "--coverage"],
    ["-fdebug-prefix-map=/home/u=.", "-ffile-prefix-map=/a=/b", "-fprofile-arcs"],
    ["-Wl,-Bstatic", "-Wl,--as-needed"],
    ["-MD", "-MF", "x.d", "-fuse-ld=lld"],
    ["-fdiagnostics-color=always", "-fno-exceptions", "-march=native", "-DNAME=1"],
]
REFUSED_ARGS = {
    "run: the reported attack": ["-wrapper", "/bin/sh,-c,id>/tmp/x"],
    "run: wrapper, long form": ["--wrapper", "/bin/sh"],
    "run: program prefix": ["-B/tmp/evil"],
    "run: program prefix, separate": ["-B", "/tmp/evil"],
    "run: --prefix": ["--prefix=/tmp/evil"],
    "run: --prefix abbreviated": ["--pref=/tmp/evil"],
    "run: spec file": ["-specs=/tmp/evil.specs"],
    "run: spec file, long": ["--specs", "/tmp/evil.specs"],
    "run: clang driver override": ["-ccc-install-dir", "/tmp"],
    "run: clang gcc toolchain": ["--gcc-toolchain=/tmp"],
    "run: linker path": ["--ld-path=/tmp/ld"],
    "run: linker by path": ["-fuse-ld=/tmp/ld"],
    "load: gcc plugin": ["-fplugin=/tmp/x.so"],
    "load: plugin argument": ["-fplugin-arg-x-y=z"],
    "load: plugin dir": ["-iplugindir=/tmp"],
    "load: clang pass plugin": ["-fpass-plugin=/tmp/x.so"],
    "load: through -Xclang": ["-Xclang", "-load", "-Xclang", "/tmp/x.so"],
    "load: through -Xclang=": ["-Xclang=-load"],
    "load: clang -plugin": ["-Xclang", "-plugin", "-Xclang", "x"],
    "load: through -mllvm": ["-mllvm", "-load=/tmp/x.so"],
    "load: linker plugin": ["-Wl,-plugin,/tmp/x.so"],
    "load: linker plugin, -Xlinker": ["-Xlinker", "--plugin=/tmp/x.so"],
    "run: wrapper via assembler option": ["-Wa,-wrapper"],
    "read: response file": ["@/etc/passwd"],
    "read: response file for as": ["-Wa,@/etc/passwd"],
    "read: response file for cpp": ["-Xpreprocessor", "@/tmp/x"],
    "read: sysroot": ["--sysroot=/"],
    "read: sysroot, separate": ["--sysroot", "/"],
    "read: isysroot": ["-isysroot/"],
    "read: profile": ["-fprofile-use=/etc/shadow"],
    "read: sanitizer list": ["-fsanitize-ignorelist=/etc/shadow"],
    "read: preprocess the sent source": ["-x", "c"],
    "read: preprocess, joined": ["-xc++"],
    "read: preprocess, long": ["--language=c"],
    "read: cc1 told to preprocess": ["-Xclang", "-x", "-Xclang", "c"],
    "write: aux-info": ["-aux-info", "/tmp/x"],
    "write: dumpdir": ["-dumpdir", "/tmp/"],
    "forward: -Xarch_": ["-Xarch_x86_64", "-wrapper"],
    "forward: long for-assembler": ["--for-assembler=@/x"],
    # Found by review (issue 16 follow-up):
    "run: a second compile's driver options": ["-fcompare-debug=-wrapper /bin/sh"],
    "run: the same, long": ["--compare-debug=-B/tmp"],
    "load: clang cc1 directly": ["-cc1", "-load", "./evil.so"],
    "load: clang cl mode": ["--driver-mode=cl", "-clang:-fplugin=./evil.so"],
    "read: clang config file": ["--config", "/tmp/x.cfg"],
    "read: clang config dir": ["--config-system-dir=/tmp"],
    "load: --warn-p, is -Wp,": ["--warn-p,-fplugin=x.so"],
    "write: --warn-a, is -Wa, with a listing": ["--warn-a,-al=/tmp/listing"],
    "write: assembler listing": ["-Wa,-ahl=/tmp/listing"],
    "write: dumpbase": ["-dumpbase", "/tmp/x", "-fdump-tree-original"],
    "write: dump file": ["-fdump-tree-original=/tmp/x"],
    "write: opt-info file": ["-fopt-info-vec=/tmp/x"],
    "write: profile note": ["-fprofile-note=/tmp/x"],
}


@pytest.mark.parametrize("compiler", ALLOWED_COMPILERS)
def test_compiler_family_is_allowed(compiler: str) -> None:
    assert POLICY.check([compiler, *COMPILE]) is None


@pytest.mark.parametrize("compiler", REFUSED_COMPILERS)
def test_other_programs_are_refused(compiler: str) -> None:
    reason = POLICY.check([compiler, *COMPILE])
    assert reason is not None and "compiler" in reason


def test_allow_compiler_extends_by_exact_name() -> None:
    policy = ArgvPolicy.allowing(["icx", "nvcc"])
    assert policy.check(["icx", *COMPILE]) is None
    assert policy.check(["icx2", *COMPILE]) is not None
    for bad in ("/opt/intel/icx", "a b", "", "x;y"):
        with pytest.raises(ValueError):
            ArgvPolicy.allowing([bad])


@pytest.mark.parametrize("args", ALLOWED_ARGS)
def test_real_build_flags_pass(args: list[str]) -> None:
    assert POLICY.check(["gcc", *args, *COMPILE]) is None
    assert POLICY.check(["clang++", *COMPILE, *args]) is None


@pytest.mark.parametrize("why", REFUSED_ARGS)
def test_dangerous_options_are_refused(why: str) -> None:
    for argv in (["gcc", *REFUSED_ARGS[why], *COMPILE], ["clang", *COMPILE, *REFUSED_ARGS[why]]):
        assert POLICY.check(argv) is not None, (why, argv)


def test_a_nul_inside_an_argument_is_unreadable() -> None:
    """distccd makes each ARGV a C string: `-wrapper\\0` would be checked as one
    option and run as `-wrapper`. Such a head is refused as unreadable."""
    head = encode_request_head(["gcc", "-wrapper\0", "/bin/sh,-c,id", "-c", "x.c"])
    assert parse_request_head(head) is UNREADABLE


def test_no_argv_is_refused() -> None:
    assert POLICY.check([]) is not None


@given(st.lists(st.sampled_from([a for args in ALLOWED_ARGS for a in args]), max_size=12),
       st.sampled_from(sorted(REFUSED_ARGS)), st.integers(0, 12))
def test_a_refused_option_is_found_wherever_it_stands(
        allowed: list[str], why: str, at: int) -> None:
    bad = REFUSED_ARGS[why]
    # Not right after a pass-through option, which would take it as its value.
    at = min(at, len(allowed))
    while at > 0 and allowed[at - 1] in ("-Xclang", "-mllvm", "-MF", "--param"):
        at -= 1
    argv = ["gcc", *allowed[:at], *bad, *allowed[at:], *COMPILE]
    assert POLICY.check(argv) is not None


@given(st.lists(st.text(max_size=20), max_size=10))
def test_never_raises(argv: list[str]) -> None:
    POLICY.check(argv)
