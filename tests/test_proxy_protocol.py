"""PROXY headers from a trusted director, through a real gatekeeper (sockets,
in-process): consumed, never forwarded; the named client is the client."""

from __future__ import annotations

import logging

import pytest
import trio
from fakes import backend, config, echo, gatekeeper, receive_all, receive_until_closed

from gatekeeper.net.allow import AllowList
from gatekeeper.net.proxy_header import encode_v1, encode_v2

DIRECTOR = AllowList.parse(["127.0.0.1/32"])
PAYLOAD = b"DIST00000001ARGC00000000 and then the rest"


@pytest.mark.parametrize("header", [
    encode_v2(("192.0.2.7", 51234), ("127.0.0.1", 3632)),
    encode_v1(("192.0.2.7", 51234), ("127.0.0.1", 3632)),
], ids=["v2", "v1"])
async def test_the_header_is_taken_off_and_names_the_client(
        header: bytes, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gatekeeper")
    async with backend(echo) as be:
        cfg = config(be.address, trusted_proxies=DIRECTOR, identify=False,
                     allow=AllowList.parse(["192.0.2.0/24"]))
        async with gatekeeper(cfg) as gk:
            client = await gk.connect()
            await client.send_all(header + PAYLOAD)
            await client.send_eof()
            assert await receive_all(client) == PAYLOAD  # distccd never sees the header
    assert "end peer=192.0.2.7:51234 outcome=ok" in caplog.text


async def test_allow_judges_the_named_client_not_the_director(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gatekeeper")
    async with backend(echo) as be:
        cfg = config(be.address, trusted_proxies=DIRECTOR, identify=False,
                     allow=AllowList.parse(["10.0.0.0/8"]))
        async with gatekeeper(cfg) as gk:
            client = await gk.connect()
            await client.send_all(encode_v2(("192.0.2.7", 1), ("127.0.0.1", 3632)) + PAYLOAD)
            assert await receive_until_closed(client) == b""
            assert be.connections == 0
    assert "end peer=192.0.2.7:1 outcome=denied" in caplog.text


@pytest.mark.parametrize("sent", [PAYLOAD, b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n" + PAYLOAD],
                         ids=["missing", "malformed"])
async def test_a_director_without_a_good_header_is_closed_at_once(
        sent: bytes, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gatekeeper")
    async with backend(echo) as be:
        cfg = config(be.address, trusted_proxies=DIRECTOR, identify=False)
        async with gatekeeper(cfg) as gk:
            client = await gk.connect()
            await client.send_all(sent)
            with trio.fail_after(2):  # "at once": not after the header timeout
                assert await receive_until_closed(client) == b""
            assert be.connections == 0
    assert "outcome=proxy-header" in caplog.text


async def test_a_director_that_sends_nothing_is_closed_after_the_header_timeout(
        autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gatekeeper")
    async with backend(echo) as be:
        cfg = config(be.address, trusted_proxies=DIRECTOR, identify=False)
        async with gatekeeper(cfg) as gk:
            client = await gk.connect()
            await client.send_all(encode_v2(("192.0.2.7", 1))[:10])  # and no more
            assert await receive_until_closed(client) == b""
    assert "outcome=proxy-header" in caplog.text
    assert "no whole PROXY header within 3s" in caplog.text


async def test_from_anyone_else_a_header_is_just_bytes() -> None:
    header = encode_v1(("192.0.2.7", 1), ("127.0.0.1", 3632))
    async with backend(echo) as be:
        cfg = config(be.address, trusted_proxies=AllowList.parse(["10.9.9.9/32"]),
                     identify=False)
        async with gatekeeper(cfg) as gk:
            client = await gk.connect()
            await client.send_all(header + PAYLOAD)
            await client.send_eof()
            assert await receive_all(client) == header + PAYLOAD


async def test_a_local_header_is_the_directors_own_connection(
        caplog: pytest.LogCaptureFixture) -> None:
    """HAProxy's health checks with send-proxy-v2 say LOCAL: the director is the peer."""
    caplog.set_level(logging.INFO, logger="gatekeeper")
    async with backend(echo) as be:
        cfg = config(be.address, trusted_proxies=DIRECTOR, identify=False)
        async with gatekeeper(cfg) as gk:
            client = await gk.connect()
            await client.send_all(encode_v2(None) + PAYLOAD)
            await client.send_eof()
            assert await receive_all(client) == PAYLOAD
    assert "end peer=127.0.0.1:" in caplog.text


async def test_a_directors_health_check_is_counted_not_run_nor_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    """HAProxy's `check check-send-proxy`: a LOCAL header, then a close. Not a
    job: never queued, never sent to the backend, no end line every second."""
    caplog.set_level(logging.INFO, logger="gatekeeper")
    async with backend(echo) as be:
        cfg = config(be.address, trusted_proxies=DIRECTOR)
        async with gatekeeper(cfg) as gk:
            for _ in range(3):
                client = await gk.connect()
                await client.send_all(encode_v2(None))
                await client.send_eof()
                assert await receive_until_closed(client) == b""
            await gk.wait_for(lambda s: not s.connections.live)
            assert be.connections == 0
            assert gk.server.observatory.rejected["client-gone"] == 3
    assert "end peer=" not in caplog.text
