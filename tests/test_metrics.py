"""--metrics: /metrics and /status over loopback, and the HTTP handler's bounds."""

from __future__ import annotations

import json
import math
from typing import Any

import trio
import trio.testing
from fakes import backend, config, echo, gatekeeper, receive_all, receive_until_closed
from prometheus_client.parser import text_string_to_metric_families

from gatekeeper.net.addresses import TcpAddress
from gatekeeper.net.allow import AllowList
from gatekeeper.observe.web import (
    EXCHANGE_TIMEOUT,
    MAX_REQUEST,
    REQUEST_TIMEOUT,
    StatusWeb,
    parse_request_line,
)

MiB = 2**20
LOOPBACK = TcpAddress("127.0.0.1", 0)


async def request(address: str, raw: bytes) -> bytes:
    host, _, port = address.rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(raw)
        await stream.send_eof()
        return await receive_all(stream)


async def get(address: str, path: str) -> tuple[int, bytes]:
    answer = await request(address, f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    assert length == len(body)
    return status, body


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_count_a_finished_job_and_show_the_picture() -> None:
    async with backend(echo) as be, \
            gatekeeper(config(be.address, metrics=LOOPBACK, min_free_bytes=64 * MiB),
                       available=3000 * MiB) as gk:
        client = await gk.connect()
        await client.send_all(b"x" * 1000)
        await client.send_eof()
        assert await receive_all(client) == b"x" * 1000
        await client.aclose()
        await gk.wait_for(lambda s: s.observatory.completed["ok"] == 1)

        status, body = await get(gk.server.metrics_addresses[0], "/metrics")
        assert status == 200
        m = samples(body)
        assert m[("gatekeeper_completed_total", (("outcome", "ok"),))] == 1
        assert m[("gatekeeper_admitted_total", ())] == 1
        assert m[("gatekeeper_rejected_total", (("reason", "queue-full"),))] == 0
        assert m[("gatekeeper_running", ())] == 0
        assert m[("gatekeeper_queued", ())] == 0
        assert m[("gatekeeper_max_jobs", ())] == 2
        assert m[("gatekeeper_available_memory_bytes", ())] == 3000 * MiB
        assert m[("gatekeeper_min_free_memory_bytes", ())] == 64 * MiB
        assert m[("gatekeeper_reserved_memory_bytes", ())] == 0
        assert m[("gatekeeper_queue_wait_seconds_count", ())] == 1
        assert m[("gatekeeper_job_run_seconds_count", ())] == 1
        assert m[("gatekeeper_client_to_backend_bytes_total", ())] == 1000
        assert m[("gatekeeper_backend_to_client_bytes_total", ())] == 1000


async def test_status_names_queued_peers_and_rejections() -> None:
    release = trio.Event()

    async def hold(stream: trio.SocketStream) -> None:
        await release.wait()

    allow = AllowList.parse(["127.0.0.1/32"])
    async with backend(hold) as be, \
            gatekeeper(config(be.address, metrics=LOOPBACK, max_jobs=1, allow=allow,
                              identify=False)) as gk:
        first = await gk.connect()
        await gk.wait_for(lambda s: s.gate.snapshot().running == 1)
        second = await gk.connect()
        await gk.wait_for(lambda s: s.gate.snapshot().queued == 1)
        waiting_peer = "{}:{}".format(*second.socket.getsockname())

        address = gk.server.metrics_addresses[0]
        status, body = await get(address, "/status")
        assert status == 200
        doc: dict[str, Any] = json.loads(body)
        assert doc["running"] == 1 and doc["queued"] == 1 and doc["max_jobs"] == 1
        assert doc["hold"] == "slots"
        assert [q["peer"] for q in doc["queue"]] == [waiting_peer]
        assert doc["queue"][0]["waiting_seconds"] >= 0
        assert doc["backend"]["ok"] is True
        assert doc["health"]["state"] == "up"

        release.set()
        for stream in (first, second):
            await stream.aclose()
        await gk.wait_for(lambda s: s.gate.snapshot().running == 0
                          and s.gate.snapshot().queued == 0)
        _, body = await get(address, "/status")
        assert json.loads(body)["queue"] == []


async def test_a_denied_peer_is_counted_as_rejected() -> None:
    allow = AllowList.parse(["10.0.0.0/8"])
    async with backend(echo) as be, \
            gatekeeper(config(be.address, metrics=LOOPBACK, allow=allow)) as gk:
        client = await gk.connect()
        # Counted before the server closes the connection.
        assert await receive_until_closed(client) == b""
        await client.aclose()
        _, body = await get(gk.server.metrics_addresses[0], "/metrics")
        m = samples(body)
        assert m[("gatekeeper_rejected_total", (("reason", "denied"),))] == 1
        assert m[("gatekeeper_admitted_total", ())] == 0
        assert be.connections == 0


async def test_http_answers_errors_and_keeps_serving() -> None:
    async with backend(echo) as be, gatekeeper(config(be.address, metrics=LOOPBACK)) as gk:
        address = gk.server.metrics_addresses[0]
        assert (await request(address, b"garbage\r\n\r\n")).startswith(b"HTTP/1.0 400 ")
        assert (await request(address, b"\xff\xfe \x00 HTTP/1.1\r\n\r\n")) \
            .startswith(b"HTTP/1.0 400 ")
        huge = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (2 * MAX_REQUEST)
        assert (await request(address, huge)).startswith(b"HTTP/1.0 431 ")
        assert (await request(address, b"POST /status HTTP/1.1\r\n\r\n")) \
            .startswith(b"HTTP/1.0 405 ")
        assert (await get(address, "/nope"))[0] == 404
        head = await request(address, b"HEAD /status HTTP/1.0\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200 ") and head.endswith(b"\r\n\r\n")
        # A request that ends (EOF) without its blank line is still judged.
        assert (await request(address, b"GET /status?x=1 HTTP/1.0\r\n")) \
            .startswith(b"HTTP/1.0 200 ")
        # Connect-and-leave (a port check) harms nothing.
        await request(address, b"")
        status, _ = await get(address, "/metrics")
        assert status == 200
        assert gk.server.gate.snapshot().admitted_total == 0


async def test_a_silent_client_is_dropped_after_the_request_timeout(
        autojump_clock: trio.testing.MockClock) -> None:
    async with backend(echo) as be, gatekeeper(config(be.address)) as gk:
        web = StatusWeb(gk.server.observatory)
        ours, theirs = trio.testing.memory_stream_pair()
        start = trio.current_time()
        await theirs.send_all(b"GET /status HTTP/1.1\r\n")  # and then nothing
        await web.handle(ours)  # type: ignore[arg-type]
        # Its place goes to the next client after REQUEST_TIMEOUT, well within
        # the whole exchange's EXCHANGE_TIMEOUT (issue 16: idle connections).
        assert math.isclose(trio.current_time() - start, REQUEST_TIMEOUT)
        assert REQUEST_TIMEOUT < EXCHANGE_TIMEOUT
        assert await theirs.receive_some() == b""  # closed, unanswered


def test_parse_request_line() -> None:
    assert parse_request_line(b"GET /metrics?a=b HTTP/1.1\r\nHost: x") == ("GET", "/metrics")
    assert parse_request_line(b"GET /metrics HTTP/2\r\n") is None
    assert parse_request_line(b"GET metrics HTTP/1.1\r\n") is None
    assert parse_request_line(b"G3T / HTTP/1.1\r\n") is None
    assert parse_request_line(b"") is None
