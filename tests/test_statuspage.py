"""The `/` status page, loaded in real headless Chromium (Debian `chromium`)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import trio
from fakes import backend, config, gatekeeper, receive_all

from gatekeeper.net.addresses import TcpAddress

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
            peer = "{}:{}".format(*second.socket.getsockname())
            assert peer in dom and [q["peer"] for q in status["queue"]] == [peer]

            shot = tmp_path / "status.png"
            await chromium(tmp_path, "--window-size=1000,700", f"--screenshot={shot}", url)
            assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 5000

            release.set()
            for stream in (first, second):
                await stream.aclose()
