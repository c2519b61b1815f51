"""A compile's portable identity and what its head says of it (identity.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gatekeeper.distcc.identity import (
    features,
    language,
    optimisation,
    portable_key,
    project_paths,
    source_and_output,
)
from gatekeeper.distcc.request import DistccJob, encode_request_head, parse_request_head

GXX = "x86_64-linux-gnu-g++"


def cmake(checkout: str, *, flags: tuple[str, ...] = ("-O2", "-g"),
          target: str = "fmt") -> tuple[str, ...]:
    """What a plain distcc client sends for a CMake compile (-D, -I stripped)."""
    return (GXX, *flags, "-std=c++17", "-o", f"CMakeFiles/{target}.dir/src/format.cc.o",
            "-c", f"{checkout}/src/format.cc")


def test_the_same_compile_from_two_checkouts_is_one_identity() -> None:
    assert portable_key(cmake("/home/alice/src/fmt")) == portable_key(cmake("/srv/b/fmt-2"))


def test_what_changes_the_compile_changes_the_identity() -> None:
    base = portable_key(cmake("/a"))
    assert portable_key(cmake("/a", flags=("-O0", "-g"))) != base
    assert portable_key(cmake("/a", target="other")) != base
    assert portable_key((GXX, "-O2", "-g", "-std=c++17", "-o",
                         "CMakeFiles/fmt.dir/src/os.cc.o", "-c", "/a/src/os.cc")) != base
    assert portable_key(("clang++", *cmake("/a")[1:])) != base


def test_pump_mode_sends_what_a_plain_client_strips() -> None:
    """Protocol 3 ships the preprocessor's options too; the same compile
    through pump or plain mode is one identity."""
    plain = ("g++", "-O2", "-c", "lib/a.cc", "-o", "lib/a.o")
    pump = ("/usr/bin/g++", "-DNDEBUG", "-I", "include", "-Iother", "-isystem", "/x",
            "-MD", "-MF", "lib/a.d", "-O2", "-include", "pre.h", "-Wp,-D_FORTIFY_SOURCE=2",
            "-c", "lib/a.cc", "-o", "lib/a.o")
    assert portable_key(pump) == portable_key(plain)


def test_build_directories_at_other_depths() -> None:
    a = ("gcc", "-O2", "-c", "../src/x.c", "-o", "x.o")
    b = ("gcc", "-O2", "-c", "../../src/x.c", "-o", "x.o")
    assert portable_key(a) == portable_key(b)


def test_debug_prefix_maps_only_rename() -> None:
    a = cmake("/home/a/co", flags=("-O2", "-fdebug-prefix-map=/home/a/co=."))
    b = cmake("/home/b/co", flags=("-O2", "-fdebug-prefix-map=/home/b/co=."))
    assert portable_key(a) == portable_key(b)


def test_project_paths() -> None:
    assert project_paths("/h/a/src/lib/a.cc", "CMakeFiles/t.dir/lib/a.cc.o") == (
        "lib/a.cc", "CMakeFiles/t.dir")
    assert project_paths("foo.c", "foo.o") == ("foo.c", "")
    assert project_paths("/abs/x/foo.c", "/tmp/obj/foo.o") == ("foo.c", "")
    assert project_paths("/abs/x/foo.c", "/b/build/CMakeFiles/t.dir/x/foo.c.o") == (
        "x/foo.c", "CMakeFiles/t.dir")
    assert project_paths("/abs/src/foo.c", None) == ("foo.c", "")


def test_the_key_format_is_stable() -> None:
    """A key is what the state file holds: a change of how it is made must
    bump footprints.FORMAT, and this value with it."""
    assert portable_key(cmake("/anywhere")) == "p2-5aede8ec7a53c5d1ee4b"


def test_features() -> None:
    argv = (GXX, "-O3", "-g", "-c", "/a/b.cpp", "-o", "b.o")
    f = features(argv, version=2, size=1234)
    assert (f.compiler, f.language, f.optimisation, f.debug, f.encoding, f.size) == (
        GXX, "c++", "3", True, "lzo", 1234)
    assert f.kind == f"{GXX}/c++/O3/g/lzo"
    assert language(("gcc", "-c", "x.c")) == "c"
    assert language(("g++", "-c", "x.c")) == "c++"
    assert language(("gcc", "-x", "c++", "-c", "x.c")) == "c++"
    assert language(("gcc", "-x", "c-cpp-output", "-c", "x.i")) == "c"
    assert optimisation(("gcc", "-O", "-g", "-g0")) == ("1", False)
    assert optimisation(("gcc", "-Os", "-O2", "-ggdb")) == ("2", True)
    assert source_and_output(["-c", "x.c", "-ofoo.o"]) == ("x.c", "foo.o")


def test_features_from_the_head() -> None:
    argv = [GXX, "-O2", "-c", "a.cc", "-o", "a.o"]
    job = parse_request_head(encode_request_head(argv, version=2) + b"DOTI00000400")
    assert isinstance(job, DistccJob)
    assert job.features.size == job.request_bytes and job.features.encoding == "lzo"


def _pump_head(files: list[tuple[bytes, bytes]], count: int | None = None) -> bytes:
    argv = ["g++", "-O2", "-c", "a.cc", "-o", "a.o"]
    out = [b"DIST00000003", b"CDIR00000002/x", encode_request_head(argv)[12:],
           b"NFIL%08x" % (count if count is not None else len(files))]
    for name, body in files:
        out += [b"NAME%08x" % len(name), name]
        if body.startswith(b"->"):
            out += [b"LINK%08x" % len(body[2:]), body[2:]]
        else:
            out += [b"FILE%08x" % len(body), body]
    return b"".join(out)


def test_pump_mode_size_is_the_shipped_files() -> None:
    job = parse_request_head(_pump_head([(b"/x/a.cc", b"a" * 100), (b"/x/a.h", b"b" * 50),
                                         (b"/x/l.h", b"->/x/a.h")]))
    assert isinstance(job, DistccJob) and job.version == 3
    assert job.shipped_bytes == 150
    assert job.features.size == 150 and job.features.encoding == "pump"
    # Only part of the files in the look: the rest extrapolated from those.
    head = _pump_head([(b"/x/a.cc", b"a" * 100), (b"/x/a.h", b"b" * 300)], count=4)
    job = parse_request_head(head[:-(300 + 12 + 6 + 12)])  # to the first body's end
    assert isinstance(job, DistccJob) and job.shipped_bytes == 400
    # Not as it should be: no size, no harm.
    job = parse_request_head(_pump_head([], count=0))
    assert isinstance(job, DistccJob) and job.shipped_bytes is None


@given(st.lists(st.text(max_size=20), max_size=12), st.integers(1, 3),
       st.one_of(st.none(), st.integers(0, 2**40)))
def test_any_argv_has_an_identity_and_features(argv: list[str], version: int,
                                               size: int | None) -> None:
    key = portable_key(tuple(argv))
    assert key.startswith("p2-") and len(key) == 23
    f = features(tuple(argv), version=version, size=size)
    assert len(f.compiler) <= 64 and len(f.kind) < 400


@given(st.binary(max_size=300))
def test_pump_tail_never_raises(tail: bytes) -> None:
    head = encode_request_head(["g++", "-c", "a.cc"], version=3) + tail
    job = parse_request_head(head)
    if isinstance(job, DistccJob):
        assert job.shipped_bytes is None or job.shipped_bytes >= 0


def test_objects_not_named_for_their_source_stay_apart() -> None:
    """automake's per-target objects: one foo.c, two -D sets (stripped by a
    plain client), told apart only by the object's name."""
    a = portable_key(("gcc", "-O2", "-c", "foo.c", "-o", "prog1-foo.o"))
    b = portable_key(("gcc", "-O2", "-c", "foo.c", "-o", "prog2-foo.o"))
    assert a != b
    assert project_paths("foo.c", "sub/prog1-foo.o") == ("foo.c", "sub/prog1-foo")


def test_what_a_plain_client_strips_for_clang() -> None:
    plain = ("clang++", "-O2", "-c", "a.cc", "-o", "a.o")
    pump = ("clang++", "-stdlib=libc++", "-Xpreprocessor", "-DX", "-O2", "-c", "a.cc",
            "-o", "a.o")
    assert portable_key(pump) == portable_key(plain)


def test_made_up_levels_are_one_kind() -> None:
    assert optimisation(("gcc", "-O99")) == ("3", False)
    assert optimisation(("gcc", "-Oanything")) == ("other", False)
    assert optimisation(("gcc", "-O\u0663")) == ("other", False)  # not an ASCII digit


def test_a_hostile_path_of_dotdots_is_one_pass() -> None:
    """85,000 leading `..` once cost 0.9 s of the event loop (popped one by one);
    stripped with one slice now. Checked by result, not by a clock."""
    path = "../" * 85_000 + "a.c"
    assert project_paths(path, "../" * 85_000 + "x/a.o") == ("a.c", "x")
    assert portable_key(("gcc", "-c", path)) == portable_key(("gcc", "-c", "a.c"))
