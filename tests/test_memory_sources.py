"""Memory sources: cgroup v1/v2 and PSI parsing on cgroupfs-like fixture trees, cgroup
discovery from real-format /proc/PID/cgroup and mountinfo texts, and, as root, a real
memory cgroup with a real memory-hungry process in it."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatekeeper.memory.cgroups import (
    REOPEN_INTERVAL,
    CgroupChain,
    CgroupDir,
    CgroupEntry,
    CgroupMount,
    CgroupV1Memory,
    CgroupV2Memory,
    locate,
    own_cgroups,
    parse_mountinfo,
    parse_proc_cgroup,
    read_mounts,
    resolve_cgroup,
    stat_value,
)
from gatekeeper.memory.job_cgroup import CgroupError, ChildCgroup
from gatekeeper.memory.pressure import PressureReader, parse_psi, parse_some_avg10
from gatekeeper.memory.sources import EffectiveMemory, FixedMemory, build_memory_source

MiB = 2**20
GiB = 2**30
V1_UNLIMITED_TEXT = "9223372036854771712\n"  # LONG_MAX rounded down to a 4 KiB page

# --- real-format samples ------------------------------------------------------------

# /proc/self/cgroup on this machine kind (hybrid: v1 controllers plus the v2 line)
HYBRID_PROC_CGROUP = """\
9:name=systemd:/
8:pids:/
7:blkio:/
6:freezer:/
5:devices:/
4:memory:/process_api/ad259fc08a22714d87271d3d47678ebd
3:cpuset:/
2:cpuacct:/
1:cpu:/
0::/
"""

# Debian 11 hybrid systemd host, distccd's cgroup (comma-joined controllers)
HYBRID_SERVICE_PROC_CGROUP = """\
12:memory:/system.slice/distcc.service
11:cpu,cpuacct:/system.slice/distcc.service
10:net_cls,net_prio:/
1:name=systemd:/system.slice/distcc.service
0::/system.slice/distcc.service
"""

PURE_V2_PROC_CGROUP = "0::/system.slice/distcc.service\n"

HYBRID_MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
31 23 0:28 / {root} rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / {root}/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / {root}/memory rw,relatime shared:14 - cgroup cgroup rw,memory
40 31 0:37 / {root}/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / {root}/unified rw,nosuid,nodev shared:5 - cgroup2 cgroup2 rw,nsdelegate
"""

PURE_V2_MOUNTINFO = """\
25 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
28 25 0:25 / {root} rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 \
rw,nsdelegate,memory_recursiveprot
"""

# v1 memory.stat as this machine's kernel writes it (all keys, real order)
V1_STAT = (
    "cache 0\nrss 0\nrss_huge 0\nshmem 0\nmapped_file 0\ndirty 0\nwriteback 0\n"
    "workingset_refault_anon 0\nworkingset_refault_file 0\nswap 0\nswapcached 0\n"
    "pgpgin 0\npgpgout 0\npgfault 0\npgmajfault 0\ninactive_anon 0\nactive_anon 0\n"
    "inactive_file {own}\nactive_file 0\nunevictable 0\n"
    "hierarchical_memory_limit 9223372036854771712\n"
    "hierarchical_memsw_limit 9223372036854771712\n"
    "total_cache 238239744\ntotal_rss 4288512\ntotal_rss_huge 0\ntotal_shmem 0\n"
    "total_mapped_file 3399680\ntotal_dirty 237568\ntotal_writeback 0\n"
    "total_workingset_refault_anon 0\ntotal_workingset_refault_file 202187\n"
    "total_swap 0\ntotal_swapcached 0\ntotal_pgpgin 7142656\ntotal_pgpgout 7086052\n"
    "total_pgfault 9631133\ntotal_pgmajfault 1984\ntotal_inactive_anon 4190208\n"
    "total_active_anon 28672\ntotal_inactive_file {total}\n"
    "total_active_file 173531136\ntotal_unevictable 0\n")

# v2 memory.stat (Linux 6.x key set, abridged only in the event counters)
V2_STAT = (
    "anon 1245184\nfile {file}\nkernel 1478656\nkernel_stack 49152\npagetables 212992\n"
    "sec_pagetables 0\npercpu 1440\nsock 0\nvmalloc 0\nshmem 0\nzswap 0\nzswapped 0\n"
    "file_mapped 1052672\nfile_dirty 0\nfile_writeback 0\nswapcached 0\nanon_thp 0\n"
    "file_thp 0\nshmem_thp 0\ninactive_anon 1212416\nactive_anon 32768\n"
    "inactive_file {inactive}\nactive_file 4096000\nunevictable 0\n"
    "slab_reclaimable 389120\nslab_unreclaimable 512000\nslab 901120\n"
    "workingset_refault_anon 0\nworkingset_refault_file 37\npgfault 31021\n"
    "pgmajfault 0\nthp_fault_alloc 0\n")

PSI_TEXT = (b"some avg10=1.53 avg60=0.87 avg300=0.22 total=2184741\n"
            b"full avg10=0.61 avg60=0.30 avg300=0.07 total=874120\n")


def v2_cgroup(path: Path, *, max_: str = "max", high: str = "max", current: int = 0,
              inactive: int = 0, stat: bool = True, peak: int | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "memory.max").write_text(max_ + "\n")
    (path / "memory.high").write_text(high + "\n")
    (path / "memory.current").write_text(f"{current}\n")
    if stat:
        (path / "memory.stat").write_text(V2_STAT.format(file=inactive + 4096000,
                                                         inactive=inactive))
    if peak is not None:
        (path / "memory.peak").write_text(f"{peak}\n")
    return path


def v1_cgroup(path: Path, *, limit: str = V1_UNLIMITED_TEXT, usage: int = 0,
              inactive: int = 0, own_inactive: int = 0, hierarchy: str = "1",
              stat: str | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "memory.limit_in_bytes").write_text(limit)
    (path / "memory.usage_in_bytes").write_text(f"{usage}\n")
    (path / "memory.max_usage_in_bytes").write_text(f"{usage}\n")
    (path / "memory.use_hierarchy").write_text(hierarchy + "\n")
    (path / "memory.stat").write_text(
        stat if stat is not None else V1_STAT.format(own=own_inactive, total=inactive))
    return path


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def cgroupfs_removal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make deleted fixture files behave like a removed cgroup's: on cgroupfs a kept
    fd then fails with ENODEV, where a plain file would still read its old text."""
    real_pread = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(" (deleted)"):
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", pread)


# --- /proc/PID/cgroup and mountinfo ------------------------------------------------------


def test_proc_cgroup_hybrid() -> None:
    entries = parse_proc_cgroup(HYBRID_PROC_CGROUP)
    assert CgroupEntry(4, ("memory",), "/process_api/ad259fc08a22714d87271d3d47678ebd") in entries
    assert CgroupEntry(9, ("name=systemd",), "/") in entries
    assert [e for e in entries if e.is_v2] == [CgroupEntry(0, (), "/")]
    joined = parse_proc_cgroup(HYBRID_SERVICE_PROC_CGROUP)
    assert CgroupEntry(11, ("cpu", "cpuacct"), "/system.slice/distcc.service") in joined


def test_proc_cgroup_pure_v2_and_a_colon_in_the_path() -> None:
    assert parse_proc_cgroup(PURE_V2_PROC_CGROUP) == [
        CgroupEntry(0, (), "/system.slice/distcc.service")]
    assert parse_proc_cgroup("0::/a:b\n")[0].path == "/a:b"


def test_mountinfo_hybrid() -> None:
    mounts = parse_mountinfo(HYBRID_MOUNTINFO.format(root="/sys/fs/cgroup"))
    assert CgroupMount(1, "/sys/fs/cgroup/memory", "/", frozenset({"memory"})) in mounts
    assert CgroupMount(2, "/sys/fs/cgroup/unified", "/", frozenset()) in mounts
    assert CgroupMount(1, "/sys/fs/cgroup/systemd", "/",
                       frozenset({"xattr", "name=systemd"})) in mounts
    assert all(m.mount_point != "/sys/fs/cgroup" for m in mounts)  # the tmpfs is no cgroup


def test_mountinfo_pure_v2_container_root_and_escapes() -> None:
    assert parse_mountinfo(PURE_V2_MOUNTINFO.format(root="/sys/fs/cgroup")) == [
        CgroupMount(2, "/sys/fs/cgroup", "/", frozenset())]
    line = "50 40 0:30 /docker/abc /my\\040cgroups rw - cgroup cgroup rw,memory\n"
    assert parse_mountinfo(line) == [
        CgroupMount(1, "/my cgroups", "/docker/abc", frozenset({"memory"}))]


def test_this_machines_own_mountinfo_parses() -> None:
    for mount in read_mounts():
        assert mount.version in (1, 2) and mount.mount_point.startswith("/")


# --- locating and resolving cgroups -------------------------------------------------------


def hybrid_tree(tmp_path: Path) -> list[CgroupMount]:
    root = tmp_path / "cg"
    (root / "unified").mkdir(parents=True)
    (root / "unified" / "cgroup.controllers").write_text("hugetlb\n")
    (root / "memory").mkdir()
    return parse_mountinfo(HYBRID_MOUNTINFO.format(root=root))


def pure_v2_tree(tmp_path: Path) -> list[CgroupMount]:
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    return parse_mountinfo(PURE_V2_MOUNTINFO.format(root=root))


def test_locate_hybrid(tmp_path: Path) -> None:
    mounts = hybrid_tree(tmp_path)
    service = tmp_path / "cg/memory/system.slice/distcc.service"
    service.mkdir(parents=True)
    (tmp_path / "cg/unified/system.slice/distcc.service").mkdir(parents=True)
    dirs = locate(parse_proc_cgroup(HYBRID_SERVICE_PROC_CGROUP), mounts)
    assert dirs == [
        CgroupDir(1, str(service), str(tmp_path / "cg/memory"), True, True),
        CgroupDir(2, str(tmp_path / "cg/unified/system.slice/distcc.service"),
                  str(tmp_path / "cg/unified"), True, False),  # PSI only: memory is on v1
    ]


def test_locate_pure_v2_and_a_container_view(tmp_path: Path) -> None:
    mounts = pure_v2_tree(tmp_path)
    (tmp_path / "cg/system.slice/distcc.service").mkdir(parents=True)
    [found] = locate(parse_proc_cgroup(PURE_V2_PROC_CGROUP), mounts)
    assert found.version == 2 and found.memory
    assert found.path == str(tmp_path / "cg/system.slice/distcc.service")
    # a container without a cgroup namespace: the mount shows only its own subtree
    container = [CgroupMount(1, str(tmp_path / "cg"), "/docker/abc", frozenset({"memory"}))]
    [inside] = locate([CgroupEntry(4, ("memory",), "/docker/abc")], container)
    assert inside.path == str(tmp_path / "cg") and not inside.top_is_root
    # a path outside what the namespace shows cannot be mapped: skipped, no crash
    assert locate([CgroupEntry(0, (), "/../../elsewhere")], mounts) == []


def test_own_cgroups_of_this_process_and_of_pid_1() -> None:
    for pid in ("self", 1):
        for found in own_cgroups(pid):
            assert os.path.isdir(found.path)
    assert own_cgroups(pid=2**22 + 7) == []  # no such process: nothing, no error


def test_resolve_both_forms(tmp_path: Path) -> None:
    mounts = hybrid_tree(tmp_path)
    v1 = tmp_path / "cg/memory/system.slice/distcc.service"
    v2 = tmp_path / "cg/unified/system.slice/distcc.service"
    v1.mkdir(parents=True)
    v2.mkdir(parents=True)
    by_dir = resolve_cgroup(str(v1), mounts)
    assert [(d.version, d.path) for d in by_dir] == [(1, str(v1))]
    by_proc_path = resolve_cgroup("/system.slice/distcc.service/", mounts)
    assert sorted((d.version, d.path) for d in by_proc_path) == [(1, str(v1)), (2, str(v2))]


def test_resolve_errors_are_one_line(tmp_path: Path) -> None:
    mounts = hybrid_tree(tmp_path)
    (tmp_path / "cg/unified/only-v2").mkdir()
    cases = {
        "/no/such.service": r"not found \(looked in",
        str(tmp_path / "cg/memory/nope"): "no such directory",
        "system.slice": "absolute",
        "/only-v2": "no memory controller",
        str(tmp_path / "cg/cpu"): "no memory controller",
    }
    (tmp_path / "cg/cpu").mkdir()
    for path, words in cases.items():
        with pytest.raises(ValueError, match=words) as info:
            resolve_cgroup(path, mounts)
        assert "\n" not in str(info.value)
        with pytest.raises(ValueError):
            build_memory_source(path, mounts=mounts)


# --- reading cgroup memory ---------------------------------------------------------


def test_v2_max_means_no_limit(tmp_path: Path) -> None:
    reader = CgroupV2Memory(str(v2_cgroup(tmp_path / "a", current=5 * GiB)))
    assert reader.sample() is None and reader.headroom() is None
    assert reader.usage() == 5 * GiB


def test_v2_headroom_does_not_count_inactive_page_cache(tmp_path: Path) -> None:
    path = v2_cgroup(tmp_path / "a", max_=str(2 * GiB), current=GiB + 300 * MiB,
                     inactive=300 * MiB, peak=1500 * MiB)
    reader = CgroupV2Memory(str(path))
    sample = reader.sample()
    assert sample is not None
    assert (sample.limit, sample.used, sample.headroom) == (2 * GiB, GiB, GiB)
    assert reader.peak() == 1500 * MiB
    (path / "memory.high").write_text(f"{GiB + 100 * MiB}\n")  # throttling starts here
    assert reader.headroom() == 100 * MiB
    (path / "memory.current").write_text(f"{3 * GiB}\n")  # over the limit: no headroom
    assert reader.headroom() == 0


def test_v2_missing_files(tmp_path: Path) -> None:
    no_stat = v2_cgroup(tmp_path / "a", max_=str(GiB), current=GiB // 2, stat=False)
    reader = CgroupV2Memory(str(no_stat))
    assert reader.headroom() == GiB // 2  # nothing known to be reclaimable
    assert reader.peak() is None  # kernels before 5.19 have no memory.peak
    (tmp_path / "root").mkdir()  # a v2 root, or memory not enabled: no memory.max
    with pytest.raises(FileNotFoundError):
        CgroupV2Memory(str(tmp_path / "root"))


def test_v1_unlimited_and_total_inactive_file(tmp_path: Path) -> None:
    path = v1_cgroup(tmp_path / "a", usage=900 * MiB, inactive=100 * MiB, own_inactive=1)
    reader = CgroupV1Memory(str(path))
    assert reader.sample() is None  # 9223372036854771712 is "no limit"
    (path / "memory.limit_in_bytes").write_text(f"{GiB}\n")
    sample = reader.sample()
    assert sample is not None
    # usage_in_bytes counts the children, so the children's cache comes off too
    assert (sample.used, sample.headroom) == (800 * MiB, 224 * MiB)
    assert reader.peak() == 900 * MiB


def test_v1_without_total_keys_uses_inactive_file(tmp_path: Path) -> None:
    path = v1_cgroup(tmp_path / "a", limit=f"{GiB}\n", usage=GiB,
                     stat="cache 1\ninactive_file 268435456\nactive_file 0\n")
    assert CgroupV1Memory(str(path)).headroom() == 256 * MiB


@given(st.dictionaries(st.from_regex(r"[a-z_]{1,20}", fullmatch=True),
                       st.integers(0, 2**63), min_size=1))
def test_stat_value_matches_a_full_parse(stat: dict[str, int]) -> None:
    text = "".join(f"{k} {v}\n" for k, v in stat.items()).encode()
    for key, value in stat.items():
        assert stat_value(text, key.encode()) == value
    assert stat_value(text, b"no_such_key_here_x") is None


def test_nested_limits_the_tightest_ancestor_binds(tmp_path: Path) -> None:
    top = tmp_path / "v2"
    top.mkdir()
    slice_ = v2_cgroup(top / "build.slice", max_=str(4 * GiB), current=3 * GiB + GiB // 2)
    leaf = v2_cgroup(slice_ / "distcc.service", max_=str(2 * GiB), current=GiB)
    chain = CgroupChain.open(CgroupDir(2, str(leaf), str(top), True, True))
    assert [lvl.path for lvl in chain.levels] == [str(leaf), str(slice_)]  # not the root
    sample = chain.tightest()
    assert sample is not None and (sample.path, sample.headroom) == (str(slice_), GiB // 2)
    (slice_ / "memory.max").write_text("max\n")  # limits can change at run time
    sample = chain.tightest()
    assert sample is not None and (sample.path, sample.headroom) == (str(leaf), GiB)


def test_nested_v1_stops_at_a_non_hierarchical_parent(tmp_path: Path) -> None:
    top = v1_cgroup(tmp_path / "mem", limit=f"{GiB}\n", hierarchy="0")
    mid = v1_cgroup(top / "mid", limit=f"{GiB}\n", usage=GiB - 10 * MiB)
    leaf = v1_cgroup(mid / "leaf", limit=f"{2 * GiB}\n", usage=GiB - 10 * MiB)
    chain = CgroupChain.open(CgroupDir(1, str(leaf), str(top), False, True))
    assert [lvl.path for lvl in chain.levels] == [str(leaf), str(mid)]
    sample = chain.tightest()
    assert sample is not None and sample.headroom == 10 * MiB
    # a container's top is not the real root: it can carry a limit and is read
    chain = CgroupChain.open(CgroupDir(1, str(mid), str(mid), False, True))
    assert [lvl.path for lvl in chain.levels] == [str(mid)]


@pytest.mark.usefixtures("cgroupfs_removal")
def test_a_vanishing_cgroup_counts_as_no_limit_then_comes_back(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    top = tmp_path / "v2"
    top.mkdir()
    leaf = v2_cgroup(top / "distcc.service", max_=str(GiB), current=GiB // 2)
    clock = FakeClock()
    chain = CgroupChain.open(CgroupDir(2, str(leaf), str(top), True, True), clock=clock)
    reader = chain.levels[0]
    memory = EffectiveMemory(FixedMemory(8 * GiB), [chain])
    assert memory.available() == GiB // 2
    for f in leaf.iterdir():  # systemctl stop: the service's cgroup is removed
        f.unlink()
    leaf.rmdir()
    with caplog.at_level(logging.WARNING, logger="gatekeeper"):
        assert memory.available() == 8 * GiB
        assert reader.gone
        assert memory.available() == 8 * GiB
        clock.now += REOPEN_INTERVAL  # looked for again: still gone, still no crash
        assert memory.available() == 8 * GiB
    assert len([r for r in caplog.records if "unreadable" in r.message]) == 1
    assert "system MemAvailable" in memory.explain()
    v2_cgroup(leaf, max_=str(GiB), current=GiB - 100 * MiB)  # systemctl start
    assert memory.available() == 8 * GiB  # not looked for again yet
    clock.now += REOPEN_INTERVAL
    assert memory.available() == 100 * MiB
    assert not reader.gone


@pytest.mark.usefixtures("cgroupfs_removal")
def test_one_file_vanishing_does_not_crash(tmp_path: Path) -> None:
    path = v1_cgroup(tmp_path / "a", limit=f"{GiB}\n", usage=100)
    reader = CgroupV1Memory(str(path))
    (path / "memory.stat").unlink()
    assert reader.sample() is None and reader.gone


# --- PSI ----------------------------------------------------------------------------


def test_psi_parse() -> None:
    pressure = parse_psi(PSI_TEXT)
    assert (pressure.some.avg10, pressure.some.avg300, pressure.some.total) == (
        1.53, 0.22, 2184741)
    assert pressure.full is not None and pressure.full.avg60 == 0.30
    assert parse_some_avg10(PSI_TEXT) == 1.53
    assert parse_psi(PSI_TEXT.splitlines()[0]).full is None  # tolerated
    for bad in (b"", b"full avg10=1 avg60=1 avg300=1 total=1\n", b"some avg10=x\n",
                b"some avg10=1.0 total=3\n"):
        with pytest.raises(ValueError):
            parse_psi(bad)


def test_psi_reader_without_psi_reports_none(tmp_path: Path) -> None:
    reader = PressureReader(str(tmp_path / "no-such-pressure"))
    assert not reader.available
    assert reader.read() is None and reader.some_avg10() is None


@pytest.mark.usefixtures("cgroupfs_removal")
def test_psi_reader_survives_its_cgroup_vanishing(tmp_path: Path) -> None:
    path = tmp_path / "memory.pressure"
    path.write_bytes(PSI_TEXT)
    clock = FakeClock()
    reader = PressureReader(str(path), clock=clock)
    assert reader.some_avg10() == 1.53
    path.unlink()
    assert reader.some_avg10() is None and reader.read() is None
    path.write_bytes(PSI_TEXT.replace(b"1.53", b"42.00"))
    clock.now += REOPEN_INTERVAL
    assert reader.some_avg10() == 42.0
    path.write_bytes(b"garbage")
    assert reader.some_avg10() is None  # unparsable counts as unreadable, not a crash


def test_system_psi_on_this_kernel() -> None:
    reader = PressureReader()
    value = reader.some_avg10()
    if not reader.available:
        pytest.skip("this kernel has no /proc/pressure/memory (CONFIG_PSI off)")
    assert value is None or 0.0 <= value <= 100.0


# --- the effective source -----------------------------------------------------------


def test_effective_is_the_smallest_and_explains_it(tmp_path: Path) -> None:
    top = tmp_path / "v1"
    top.mkdir()
    leaf = v1_cgroup(top / "x", limit=f"{2 * GiB}\n", usage=GiB - 100 * MiB)
    pressure = tmp_path / "memory.pressure"
    pressure.write_bytes(PSI_TEXT)
    memory = EffectiveMemory(
        FixedMemory(5 * GiB), [CgroupChain.open(CgroupDir(1, str(leaf), str(top), True, True))],
        [PressureReader("/nonexistent/pressure"), PressureReader(str(pressure))])
    assert memory.explain() == (f"cgroup {leaf}: 1.1 GiB headroom "
                                f"(limit 2.0 GiB, used 924 MiB)")
    assert memory.available() == GiB + 100 * MiB
    assert memory.pressure() == 1.53
    memory.system = FixedMemory(512 * MiB)
    assert memory.available() == 512 * MiB
    assert memory.explain() == "system MemAvailable: 512 MiB"
    memory.close()


def test_build_from_fixture_mounts_and_own_cgroups(tmp_path: Path) -> None:
    mounts = pure_v2_tree(tmp_path)
    leaf = v2_cgroup(tmp_path / "cg/system.slice/distcc.service", max_=str(GiB),
                     current=GiB // 4)
    (leaf / "memory.pressure").write_bytes(PSI_TEXT.replace(b"1.53", b"7.50"))
    memory = build_memory_source("/system.slice/distcc.service", mounts=mounts)
    assert memory.available() <= 768 * MiB
    assert memory.pressure() is not None and memory.pressure() >= 7.5  # type: ignore[operator]
    assert "distcc.service" in memory.describe()
    own = build_memory_source(None, mounts=mounts, own=locate(
        parse_proc_cgroup(PURE_V2_PROC_CGROUP), mounts))
    assert own.available() <= 768 * MiB
    nothing = build_memory_source(None, mounts=[], own=[])
    assert nothing.chains == [] and nothing.available() > 0


def test_build_for_this_process_never_fails() -> None:
    memory = build_memory_source(None)
    assert memory.available() > 0
    assert memory.explain()
    memory.close()


# --- a real memory cgroup and a real memory-hungry process --------------------------------

HOG = 100 * MiB
LIMIT = 256 * MiB
# Waits for "go", allocates HOG bytes touching every page, says "ready", waits to exit.
HOG_SCRIPT = f"""
import sys
sys.stdin.readline()
block = bytearray({HOG})
block[::4096] = b"\\x01" * len(range(0, {HOG}, 4096))
sys.stdout.write("ready\\n")
sys.stdout.flush()
sys.stdin.readline()
"""
LINE_TIMEOUT = 30.0  # a bound, not a pace: the child answers in well under a second


def _memory_parent(version: int) -> CgroupDir:
    """The root of this machine's memory hierarchy of `version`, or skip saying why."""
    if os.geteuid() != 0:
        pytest.skip("real cgroup test needs root (cannot create cgroups as uid "
                    f"{os.geteuid()})")
    mounts = [m for m in read_mounts() if m.version == version and m.root == "/"]
    if version == 1:
        mounts = [m for m in mounts if "memory" in m.controllers]
    if not mounts:
        pytest.skip(f"no cgroup v{version} memory hierarchy mounted here")
    top = mounts[0].mount_point
    parent = CgroupDir(version, top, top, True, True)
    if version == 2:
        controllers = Path(top, "cgroup.controllers").read_text().split()
        if "memory" not in controllers:
            pytest.skip(f"cgroup v2 at {top} has no memory controller (it offers "
                        f"{controllers or 'none'}; memory is bound to cgroup v1 here)")
    return parent


def _read_line(proc: subprocess.Popen[bytes]) -> bytes:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], LINE_TIMEOUT)
    assert ready, f"child said nothing within {LINE_TIMEOUT} s"
    return proc.stdout.readline()


@pytest.fixture(params=[1, 2], ids=["v1", "v2"])
def job_cgroup(request: pytest.FixtureRequest) -> Iterator[ChildCgroup]:
    parent = _memory_parent(request.param)
    try:
        child = ChildCgroup(parent, f"gatekeeper-test-{os.getpid()}")
    except CgroupError as exc:
        pytest.skip(f"cannot create a real cgroup here: {exc}")
    try:
        yield child
    finally:
        for pid in child.pids():  # a failed test must not leave the hog behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        child.remove()


def test_real_cgroup_headroom_follows_a_real_allocation(
        job_cgroup: ChildCgroup, caplog: pytest.LogCaptureFixture) -> None:
    job_cgroup.set_limit(LIMIT)
    memory = build_memory_source(job_cgroup.path)
    assert memory.chains and memory.chains[0].levels[0].path == job_cgroup.path
    proc = subprocess.Popen([sys.executable, "-c", HOG_SCRIPT], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    assert proc.stdin is not None
    try:
        job_cgroup.add_pid(proc.pid)
        before = memory.available()
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        assert _read_line(proc) == b"ready\n"
        after = memory.available()
        peak = job_cgroup.peak()
        print(f"\nreal cgroup v{job_cgroup.parent.version} {job_cgroup.path}: limit "
              f"{LIMIT // MiB} MiB, available before {before / MiB:.1f} MiB, after "
              f"{after / MiB:.1f} MiB, drop {(before - after) / MiB:.1f} MiB, peak "
              f"{(peak or 0) / MiB:.1f} MiB; {memory.explain()}")
        assert before <= LIMIT
        assert after < LIMIT - 90 * MiB
        assert 90 * MiB <= before - after <= 130 * MiB
        assert peak is not None and peak >= HOG
        assert str(job_cgroup.path) in memory.explain()
        proc.stdin.write(b"done\n")
        proc.stdin.flush()
        assert proc.wait(timeout=LINE_TIMEOUT) == 0
    finally:
        proc.kill()
        proc.wait(timeout=LINE_TIMEOUT)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()
    # the cgroup is removed under the open reader: ENODEV, counted as no limit
    job_cgroup.remove()
    with caplog.at_level(logging.WARNING, logger="gatekeeper"):
        assert memory.available() > LIMIT
    assert "system MemAvailable" in memory.explain()
    assert any("unreadable" in r.message and "No such device" in r.message
               for r in caplog.records)
    memory.close()


def test_real_cgroup_errors_are_clean(job_cgroup: ChildCgroup) -> None:
    with pytest.raises(CgroupError, match="cannot move pid") as info:
        job_cgroup.add_pid(2**22 + 7)  # no such process
    assert "\n" not in str(info.value)
    with pytest.raises(CgroupError, match="cannot create cgroup"):
        ChildCgroup(job_cgroup.parent, os.path.basename(job_cgroup.path))  # exists


def test_real_v2_without_memory_controller_refuses_cleanly() -> None:
    """Where v2 lacks the memory controller (hybrid), a per-job v2 cgroup can't be made:
    the error says so in one line instead of half-creating a cgroup."""
    if os.geteuid() != 0:
        pytest.skip(f"creating a cgroup needs root (uid {os.geteuid()})")
    tops = [m.mount_point for m in read_mounts() if m.version == 2 and m.root == "/"]
    if not tops:
        pytest.skip("no cgroup v2 hierarchy mounted here")
    if "memory" in Path(tops[0], "cgroup.controllers").read_text().split():
        pytest.skip(f"cgroup v2 at {tops[0]} has the memory controller: nothing to refuse")
    name = f"gatekeeper-test-refused-{os.getpid()}"
    with pytest.raises(CgroupError, match="memory controller") as info:
        ChildCgroup(CgroupDir(2, tops[0], tops[0], True, False), name)
    print(f"\n{info.value}")
    assert "\n" not in str(info.value)
    assert not Path(tops[0], name).exists()


def test_real_v2_cgroup_pressure_file() -> None:
    """PSI is tracked per v2 cgroup even where memory is on v1 (hybrid)."""
    if os.geteuid() != 0:
        pytest.skip(f"creating a cgroup needs root (uid {os.geteuid()})")
    tops = [m.mount_point for m in read_mounts() if m.version == 2 and m.root == "/"]
    if not tops:
        pytest.skip("no cgroup v2 hierarchy mounted here")
    path = Path(tops[0], f"gatekeeper-test-psi-{os.getpid()}")
    try:
        path.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a v2 cgroup under {tops[0]}: {exc.strerror}")
    try:
        if not (path / "memory.pressure").exists():
            pytest.skip(f"{path} has no memory.pressure (kernel without PSI)")
        reader = PressureReader(str(path / "memory.pressure"))
        value = reader.some_avg10()
        assert value is not None and 0.0 <= value <= 100.0
    finally:
        path.rmdir()
    assert reader.some_avg10() is None  # removed under the open reader: no crash
