"""The PROXY protocol header a director puts before a client's bytes (pure).

Behind HAProxy every client is the director: fairness, per-client limits,
`--allow` and `/status` would all see one peer. HAProxy's `send-proxy` (v1,
text) and `send-proxy-v2` (binary) put the real client's address in front of
the stream (haproxy's doc/proxy-protocol.txt); from a `--trusted-proxy` peer
gatekeeper reads it, takes it off the stream (distccd never sees it) and uses
its source address as the client.

Pure: no trio, no socket, no clock (tests/test_purity.py checks the imports).
Everything here is hostile input: the parser looks at a prefix of the stream
and says how long the header is, INCOMPLETE (look again with more) or why it
is malformed; it never raises, never reads past MAX_HEADER, and decides v1
within its 107 bytes.

    v1: "PROXY TCP4 1.2.3.4 10.0.0.1 51234 3632\\r\\n" (also TCP6, UNKNOWN)
    v2: 12-byte signature, version/command, family/transport, 2-byte length,
        addresses (TCP4 12 bytes, TCP6 36), then TLVs (ignored)

A v2 LOCAL command (a director's own health check) and v1 UNKNOWN carry no
client: the connection is the director's own (`source` None).
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass
from typing import Final

V1_PREFIX: Final = b"PROXY "
V1_MAX: Final = 107  # the spec's longest v1 line, CRLF included
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED: Final = 16
# A v2 header's address block and TLVs: HAProxy sends at most a few hundred
# bytes (addresses 36, plus TLVs such as unique-id up to 128 and SSL
# information); a larger one is not a director's, and is refused before it is
# waited for.
V2_MAX_BODY: Final = 1024
MAX_HEADER: Final = V2_FIXED + V2_MAX_BODY

_V1_LINE = re.compile(
    rb"PROXY (?:UNKNOWN[^\r\n]*|(?P<proto>TCP4|TCP6) (?P<src>[0-9A-Fa-f.:]{1,45}) "
    rb"(?P<dst>[0-9A-Fa-f.:]{1,45}) (?P<sport>[0-9]{1,5}) (?P<dport>[0-9]{1,5}))\r\n")


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    length: int
    """Bytes the header takes at the start of the stream (to be consumed)."""
    source: tuple[str, int] | None
    """The client's address and port; None for LOCAL / UNKNOWN (the director's
    own connection)."""


@dataclass(frozen=True, slots=True)
class Malformed:
    why: str


class _Incomplete:
    def __repr__(self) -> str:
        return "INCOMPLETE"


INCOMPLETE: Final = _Incomplete()

Parsed = ProxyHeader | Malformed | _Incomplete


def parse(data: bytes) -> Parsed:
    """The PROXY header at the start of `data`, INCOMPLETE, or Malformed."""
    if data[:len(V2_SIGNATURE)] == V2_SIGNATURE[:len(data)] and data[:1] == b"\r":
        return _v2(data)
    if data[:len(V1_PREFIX)] == V1_PREFIX[:len(data)] and data:
        return _v1(data)
    if not data:
        return INCOMPLETE
    return Malformed("no PROXY header (neither v1 nor v2 signature)")


def _v1(data: bytes) -> Parsed:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        # A line feed without its carriage return, or a carriage return with
        # something else after it, will never make a CRLF.
        if len(data) >= V1_MAX or b"\n" in data or b"\r" in data[:-1]:
            return Malformed("PROXY v1 line without CRLF within 107 bytes")
        return INCOMPLETE
    line = data[:end + 2]
    match = _V1_LINE.fullmatch(line)
    if match is None:
        return Malformed("PROXY v1 line not as the protocol writes it")
    if match["proto"] is None:
        return ProxyHeader(len(line), None)
    family = 4 if match["proto"] == b"TCP4" else 6
    source = _address(match["src"].decode("ascii"), family)
    destination = _address(match["dst"].decode("ascii"), family)
    sport, dport = int(match["sport"]), int(match["dport"])
    if source is None or destination is None:
        return Malformed(f"PROXY v1 addresses are not TCP{family}")
    if not (0 <= sport <= 65535 and 0 <= dport <= 65535):
        return Malformed("PROXY v1 port out of range")
    return ProxyHeader(len(line), (source, sport))


def _address(text: str, family: int) -> str | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if address.version != family:
        return None
    return str(address)


def _v2(data: bytes) -> Parsed:
    if len(data) < V2_FIXED:
        return INCOMPLETE
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2:
        return Malformed(f"PROXY v2 header of version {version}")
    if command not in (0, 1):
        return Malformed(f"PROXY v2 command {command}")
    family, transport = data[13] >> 4, data[13] & 0x0F
    (body,) = struct.unpack_from("!H", data, 14)
    if body > V2_MAX_BODY:
        return Malformed(f"PROXY v2 header of {body} bytes, more than {V2_MAX_BODY}")
    length = V2_FIXED + body
    if len(data) < length:
        return INCOMPLETE
    if command == 0:  # LOCAL: the director's own connection (its health check)
        return ProxyHeader(length, None)
    if family == 0:  # UNSPEC: the sender does not know the client
        return ProxyHeader(length, None)
    if transport not in (1, 2):
        return Malformed(f"PROXY v2 transport {transport}")
    if family == 1:  # AF_INET
        if body < 12:
            return Malformed("PROXY v2 TCP4 addresses short")
        src = ipaddress.IPv4Address(data[16:20])
        (sport,) = struct.unpack_from("!H", data, 24)
        return ProxyHeader(length, (str(src), sport))
    if family == 2:  # AF_INET6
        if body < 36:
            return Malformed("PROXY v2 TCP6 addresses short")
        src6 = ipaddress.IPv6Address(data[16:32])
        (sport,) = struct.unpack_from("!H", data, 48)
        mapped = src6.ipv4_mapped
        return ProxyHeader(length, (str(mapped) if mapped is not None else str(src6), sport))
    if family == 3:  # AF_UNIX: no address a client could be known by
        return ProxyHeader(length, None)
    return Malformed(f"PROXY v2 address family {family}")


def encode_v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """What HAProxy's `send-proxy` writes (for tests and benches)."""
    proto = "TCP6" if ":" in source[0] else "TCP4"
    return (f"PROXY {proto} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n"
            .encode("ascii"))


def encode_v2(source: tuple[str, int] | None, destination: tuple[str, int] = ("0.0.0.0", 0),
              *, tlvs: bytes = b"") -> bytes:
    """What HAProxy's `send-proxy-v2` writes (LOCAL when `source` is None)."""
    if source is None:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", len(tlvs)) + tlvs
    src = ipaddress.ip_address(source[0])
    dst = ipaddress.ip_address(destination[0])
    if src.version == 4:
        body = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
        family = 0x11
    else:
        dst6 = dst if dst.version == 6 else ipaddress.IPv6Address(f"::ffff:{dst}")
        body = src.packed + dst6.packed + struct.pack("!HH", source[1], destination[1])
        family = 0x21
    body += tlvs
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body
