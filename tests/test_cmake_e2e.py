"""End-to-end: a CMake project from two checkouts through one gatekeeper (issue 19).

CMake passes absolute source paths and build-directory-relative object paths,
so a second checkout of the same tree at another path, built in another build
directory, used to be a stranger: every job unknown (a fmtlib checkout got a
learned estimate for 2 of 45). With portable identities the second build's
jobs find what the first one learned: at least 95 % of them (`est_from=learned`
on their end lines).

Real parts: cmake (Unix Makefiles), make, the stock distcc client as the
compiler (`CXX="distcc g++"`), a real distccd behind gatekeeper with --state-dir, g++.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from distcc_harness import (
    LOOPBACK,
    DistccServer,
    GatekeeperProcess,
    distcc_client_env,
    missing_binaries,
)

MISSING = missing_binaries((*("distcc", "distccd", "g++", "make"), "cmake"))
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"needs {', '.join(MISSING)} (apt-get install -y distcc g++ make cmake)")

# What each file pulls in: different preprocessed sizes, so the cold model
# has something to tell apart, and real compiles of a few hundred ms.
HEADERS = ["<vector>", "<map>", "<string>", "<algorithm>", "<memory>", "<sstream>",
           "<unordered_map>", "<functional>"]
FILES_PER_DIR = 12
END = re.compile(r"end peer=\S+ outcome=(?P<outcome>\S+) .*? job=(?P<job>\S+) .*?"
                 r"est=\d+MiB est_from=(?P<source>\w+)")


def write_project(root: Path) -> list[str]:
    """A library (src/lib) and a program (src) of FILES_PER_DIR files each;
    `util.cc` in both directories (same name, other compile). Returns the
    objects' names as CMake's Makefiles pass them to -o."""
    (root / "src" / "lib").mkdir(parents=True)
    objects = []
    for where, target in (("src/lib", "core"), ("src", "app")):
        for i in range(FILES_PER_DIR):
            name = "util" if i == 0 else f"{target}_{i:02d}"
            includes = "".join(f"#include {h}\n" for h in HEADERS[:1 + (i * 3) % len(HEADERS)])
            body = (f"{includes}\nint {target}_{name}_f(int x) {{\n"
                    f"  std::vector<int> v(x, {i});\n  int s = 0;\n"
                    f"  for (int y : v) s += y * {i + 1};\n  return s;\n}}\n")
            (root / where / f"{name}.cc").write_text(body)
            objects.append(f"CMakeFiles/{target}.dir/{where}/{name}.cc.o")
    lib = " ".join(f"lib/{p.name}" for p in sorted((root / "src" / "lib").glob("*.cc")))
    app = " ".join(p.name for p in sorted((root / "src").glob("*.cc")))
    (root / "src" / "main.cc").write_text("int main() { return 0; }\n")
    (root / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.13)\nproject(gkcmake CXX)\n"
        f"add_library(core STATIC {' '.join('src/' + s for s in lib.split())})\n"
        f"add_executable(app src/main.cc {' '.join('src/' + s for s in app.split())})\n"
        "target_link_libraries(app core)\n")
    return objects


def build(source: Path, build_dir: Path, port: int, distcc_dir: Path) -> None:
    env = distcc_client_env(LOOPBACK, port, distcc_dir, host_slots=8)
    cmake = shutil.which("cmake")
    assert cmake is not None
    configure = subprocess.run(
        [cmake, "-S", str(source), "-B", str(build_dir), "-G", "Unix Makefiles",
         "-DCMAKE_BUILD_TYPE=Release"],
        env={**env, "CXX": "distcc g++"}, capture_output=True, text=True, timeout=120)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    made = subprocess.run(["make", "-j6", "-C", str(build_dir)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stdout + made.stderr


def ends(lines: list[str], objects: list[str]) -> dict[str, str]:
    """Each project object's estimate source, from gatekeeper's end lines."""
    out = {}
    for line in lines:
        match = END.search(line)
        if match is not None and match["job"] in objects:
            assert match["outcome"] == "ok", line
            out[match["job"]] = match["source"]
    return out


def test_a_second_checkout_elsewhere_finds_what_the_first_learned(tmp_path: Path) -> None:
    first = tmp_path / "alice" / "src" / "proj"
    second = tmp_path / "bob" / "work" / "checkout-two"
    objects = write_project(first)
    shutil.copytree(first, second)
    with DistccServer(jobs=4) as distccd, GatekeeperProcess(
            ["--listen", f"{LOOPBACK}:0", "--backend", f"{LOOPBACK}:{distccd.port}",
             "--max-jobs", "2", "--min-free-mb", "0", "--state-dir", str(tmp_path / "state"),
             "--log-level", "info"]) as gk:
        build(first, first / "build", gk.port, tmp_path / "distcc")
        seen = len(gk.log_lines)
        cold = ends(gk.log_lines, objects)
        build(second, tmp_path / "bob" / "out-of-tree-build", gk.port, tmp_path / "distcc")
        warm = ends(gk.log_lines[seen:], objects)
        log = gk.log_text
    assert set(cold) == set(objects), log
    assert set(warm) == set(objects), log
    assert "learned" not in cold.values()
    learned = sum(1 for source in warm.values() if source == "learned")
    assert learned >= 0.95 * len(objects), (warm, log)
