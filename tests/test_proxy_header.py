"""The PROXY protocol header parser (net/proxy_header.py): pure, hostile input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatekeeper.net.proxy_header import (
    INCOMPLETE,
    MAX_HEADER,
    V1_MAX,
    V2_SIGNATURE,
    Malformed,
    ProxyHeader,
    encode_v1,
    encode_v2,
    parse,
)

REQUEST = b"DIST00000001ARGC00000001ARGV00000003g++"


@pytest.mark.parametrize(("header", "source"), [
    (encode_v1(("192.0.2.7", 51234), ("10.0.0.1", 3632)), ("192.0.2.7", 51234)),
    (encode_v1(("2001:db8::7", 1), ("2001:db8::1", 3632)), ("2001:db8::7", 1)),
    (b"PROXY UNKNOWN\r\n", None),
    (b"PROXY UNKNOWN ffff:f...f ffff:f...f 65535 65535\r\n", None),
    (encode_v2(("192.0.2.7", 51234), ("10.0.0.1", 3632)), ("192.0.2.7", 51234)),
    (encode_v2(("2001:db8::7", 9), ("2001:db8::1", 3632)), ("2001:db8::7", 9)),
    (encode_v2(("::ffff:192.0.2.9", 9), ("::1", 3632)), ("192.0.2.9", 9)),
    (encode_v2(("192.0.2.7", 5), ("10.0.0.1", 3632), tlvs=b"\x05\x00\x03abc"), ("192.0.2.7", 5)),
    (encode_v2(None), None),  # LOCAL: the director's own health check
])
def test_headers_as_haproxy_writes_them(header: bytes, source: tuple[str, int] | None) -> None:
    assert parse(header + REQUEST) == ProxyHeader(len(header), source)
    # Any prefix is incomplete, never wrong.
    for cut in range(len(header)):
        assert parse(header[:cut]) is INCOMPLETE, cut


@pytest.mark.parametrize("data", [
    REQUEST,                                            # a client that sent none
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",                # LF without CR
    b"PROXY TCP4 1.2.3.4\r 5.6.7.8 1 2\r\n",            # a stray CR
    b"PROXY TCP4 ::1 ::1 1 2\r\n",                      # TCP4 with v6 addresses
    b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 70000 2\r\n",          # port out of range
    b"PROXY TCP4 1.2.3.400 5.6.7.8 1 2\r\n",
    b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY " + b"A" * V1_MAX,                          # no CRLF within 107 bytes
    V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12),      # version 1 in a v2 signature
    V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),      # command 2
    V2_SIGNATURE + b"\x21\x11\xff\xff",                  # 65,535 bytes: refused unread
    V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4),       # TCP4 addresses short
    V2_SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12),      # TCP6 addresses short
    V2_SIGNATURE + b"\x21\x13\x00\x0c" + bytes(12),      # transport 3
    V2_SIGNATURE + b"\x21\x41\x00\x0c" + bytes(12),      # family 4
])
def test_malformed_headers_say_why(data: bytes) -> None:
    result = parse(data)
    assert isinstance(result, Malformed), result
    assert result.why


@given(st.binary(max_size=MAX_HEADER + 64))
def test_any_bytes_parse_to_a_bounded_answer(data: bytes) -> None:
    result = parse(data)
    if isinstance(result, ProxyHeader):
        assert 0 < result.length <= min(len(data), MAX_HEADER)
    elif result is INCOMPLETE:
        assert len(data) < MAX_HEADER


@given(st.binary(max_size=MAX_HEADER + 64))
def test_after_a_signature_any_bytes_parse(tail: bytes) -> None:
    for head in (V2_SIGNATURE, b"PROXY TCP4 "):
        result = parse(head + tail)
        assert result is INCOMPLETE or isinstance(result, (Malformed, ProxyHeader))


@given(st.ip_addresses(), st.integers(0, 65535), st.binary(max_size=40))
def test_round_trip(address: object, port: int, rest: bytes) -> None:
    source = (str(address), port)
    destination = ("::1", 3632) if ":" in source[0] else ("127.0.0.1", 3632)
    for header in (encode_v1(source, destination), encode_v2(source, destination)):
        parsed = parse(header + rest)
        assert isinstance(parsed, ProxyHeader) and parsed.length == len(header)
        assert parsed.source is not None
        assert parsed.source[1] == port
