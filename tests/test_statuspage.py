"""The `/` status page, loaded in real headless Chromium (Debian `chromium`)."""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path

import pytest
import trio
from fakes import backend, config, gatekeeper, receive_all
from test_job_cgroups import preforked_backend  # noqa: F401  (a fixture)
from test_learning import request, run_job

from gatekeeper.net.addresses import TcpAddress
from gatekeeper.server import Server

MiB = 2**20
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (see .ci/install)")


async def chromium(tmp_path: Path, *args: str) -> bytes:
    assert CHROMIUM is not None
    # --virtual-time-budget: run the page's scripts (the first /status fetch)
    # before dumping; it ends as soon as the page is idle, no real waiting.
    result = await trio.run_process(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=3000", *args],
        capture_stdout=True, capture_stderr=True)
    return result.stdout


async def http_get(address: str, path: str) -> bytes:
    host, _, port = address.rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        answer = await receive_all(stream)
    return answer.partition(b"\r\n\r\n")[2]


def shown(dom: str, element: str) -> str:
    match = re.search(rf'id="{element}"[^>]*>([^<]*)<', dom)
    assert match is not None, element
    return match.group(1)


@pytest.mark.timeout(120)
async def test_page_shows_what_status_says(tmp_path: Path) -> None:
    release = trio.Event()

    async def hold(stream: trio.SocketStream) -> None:
        await release.wait()

    async with backend(hold) as be:
        cfg = config(be.address, metrics=TcpAddress("127.0.0.1", 0), max_jobs=1,
                     min_free_bytes=512 * MiB, identify=False)
        async with gatekeeper(cfg, available=3000 * MiB) as gk:
            first = await gk.connect()
            await gk.wait_for(lambda s: s.gate.snapshot().running == 1)
            second = await gk.connect()
            await gk.wait_for(lambda s: s.gate.snapshot().queued == 1)
            await second.send_all(b"x" * 3000)  # within the queued window: all in
            address = gk.server.metrics_addresses[0]
            url = f"http://{address}/"

            dom = (await chromium(tmp_path, "--dump-dom", url)).decode()
            status = json.loads(await http_get(address, "/status"))
            assert shown(dom, "state") == status["health"]["state"] == "up"
            assert shown(dom, "running") == str(status["running"]) == "1"
            assert shown(dom, "max_jobs") == str(status["max_jobs"]) == "1"
            assert shown(dom, "queued") == str(status["queued"]) == "1"
            assert shown(dom, "available") == str(status["available_bytes"] // MiB) == "3000"
            assert shown(dom, "min_free") == "512"
            assert shown(dom, "error") == ""
            held = status["queued_kernel_bytes"]
            assert held >= 3000 and shown(dom, "queued_kernel") == str(int(held / 1024 + 0.5))
            peer = "{}:{}".format(*second.socket.getsockname())
            assert peer in dom and [q["peer"] for q in status["queue"]] == [peer]

            shot = tmp_path / "status.png"
            await chromium(tmp_path, "--window-size=1000,700", f"--screenshot={shot}", url)
            assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 5000

            release.set()
            for stream in (first, second):
                await stream.aclose()


def running_now(server: Server, count: int) -> bool:
    return server.gate.snapshot().running == count


@pytest.mark.timeout(120)
async def test_page_and_status_show_a_paused_job(
        tmp_path: Path, preforked_backend: TcpAddress) -> None:  # noqa: F811
    """Issue 18: an admin sees a pause happen -- each running job's state, how
    long it was paused, its estimate and its charge, and the pause counts."""
    cfg = config(preforked_backend, metrics=TcpAddress("127.0.0.1", 0), max_jobs=2,
                 min_free_bytes=0, job_mem_bytes=MiB, job_cgroups=False,
                 pause_below_bytes=64 * MiB)
    async with gatekeeper(cfg) as gk, trio.open_nursery() as nursery:
        for running, name in enumerate(("old.o", "young.o"), 1):
            client = await gk.connect()
            nursery.start_soon(run_job, client, request(name, 1, hold=4.0))
            await gk.wait_for(functools.partial(running_now, count=running))
        # Both backend processes found by the meter (each sample notifies the
        # gate): either could be frozen, and the youngest is.
        await gk.wait_for(lambda s: all(j.usage is not None and j.usage.pid is not None
                                        for j in s.connections.live.values()))
        gk.memory.value = 32 * MiB  # memory runs out under both
        await gk.wait_for(lambda s: s.gate.admission.paused == 1)
        address = gk.server.metrics_addresses[0]
        status = json.loads(await http_get(address, "/status"))
        dom = (await chromium(tmp_path, "--dump-dom", f"http://{address}/")).decode()
        gk.memory.value = 2**40  # room again: it goes on
    states = {j["job"]: j["state"] for j in status["jobs"]}
    assert states == {"old.o": "running", "young.o": "paused"}, status["jobs"]
    young = next(j for j in status["jobs"] if j["job"] == "young.o")
    assert young["pauses"] == 1 and young["estimate_bytes"] == MiB
    assert status["pausing"]["paused"] == 1 and status["pausing"]["pauses_total"] == 1
    assert status["hold"] is None and status["health"]["state"] == "drain"
    assert shown(dom, "paused") == "1"
    assert re.search(r'<tr class="paused"><td>young\.o</td><td>paused</td>', dom), dom


@pytest.mark.timeout(120)
async def test_the_farm_on_one_page_and_in_status_farm(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 20: box b (--peer a) shows a's state and a's running job, live, on its
    page and in `gatekeeper status --farm`; a peer that does not answer says so."""
    from gatekeeper.farm.peers import Peers
    from gatekeeper.observe import statuscmd
    release = trio.Event()

    async def hold(stream: trio.SocketStream) -> None:
        await release.wait()

    async with backend(hold) as be:
        a_cfg = config(be.address, metrics=TcpAddress("127.0.0.1", 0), max_jobs=1,
                       identify=False)
        async with gatekeeper(a_cfg, available=3000 * MiB) as a:
            a_metrics = a.server.metrics_addresses[0]
            host, _, port = a_metrics.rpartition(":")
            down = TcpAddress("127.0.0.1", 1)
            b_cfg = config(be.address, metrics=TcpAddress("127.0.0.1", 0),
                           peers=(TcpAddress(host, int(port)), down), peer_interval=0.05,
                           identify=False)
            async with gatekeeper(b_cfg, available=2000 * MiB) as b:
                job = await a.connect()
                await a.wait_for(lambda s: s.gate.snapshot().running == 1)
                peers = b.server.peers
                assert isinstance(peers, Peers)

                def a_seen_running() -> bool:
                    status = peers.peers[0].status
                    return status is not None and status.get("running") == 1

                with trio.fail_after(20):
                    while not a_seen_running():
                        await peers.next_round()
                b_metrics = b.server.metrics_addresses[0]
                dom = (await chromium(tmp_path, "--dump-dom", f"http://{b_metrics}/")).decode()
                code = await trio.to_thread.run_sync(
                    statuscmd.main, "status", ["--metrics", b_metrics, "--farm"])
                release.set()
                await job.aclose()
    assert code == 0
    text = capsys.readouterr().out
    assert f"== peer {a_metrics}: answering" in text
    assert f"== peer {down}: NOT answering" in text
    assert text.count("running    1/1") == 1  # a's table (b runs nothing)
    assert f"<td>{a_metrics}</td><td>up</td><td>1 / 1</td><td>0</td>" in dom, dom
    assert f"<td>{down}</td><td>not answering" in dom
    assert re.search(rf"<tr><td>{re.escape(a_metrics)}</td><td>127\.0\.0\.1:\d+</td>"
                     r"<td>running</td>", dom), dom
