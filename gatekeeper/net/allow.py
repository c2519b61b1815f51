"""Who may connect at all (``--allow CIDR``).

Behind a local proxy distccd sees every client as 127.0.0.1, so its own
``--allow`` check becomes useless: the peer check has to happen here, before a
connection is queued.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# distccd 3.4 without --allow admits loopback and the private ranges; so do we,
# so that putting gatekeeper in front changes nothing about who gets in.
DEFAULT_ALLOW: tuple[str, ...] = (
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
)


def parse_network(text: str) -> Network:
    """A CIDR (or a bare address, meaning just that host). Host bits must be zero."""
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        raise ValueError(f"{text!r} is not a network in CIDR form: {e}") from None


@dataclass(frozen=True, slots=True)
class AllowList:
    networks: tuple[Network, ...]

    @classmethod
    def parse(cls, texts: Iterable[str]) -> AllowList:
        return cls(tuple(parse_network(t) for t in texts))

    def permits(self, host: str) -> bool:
        """Whether an IP peer is allowed. IPv4-mapped IPv6 peers (``::ffff:a.b.c.d``,
        as a dual-stack listener reports IPv4 clients) are judged as IPv4."""
        addr = peer_ip(host)
        return addr is not None and any(addr in net for net in self.networks)


@functools.lru_cache(maxsize=4096)
def peer_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A peer's address as it should be judged: scope id dropped, IPv4-mapped IPv6
    (``::ffff:a.b.c.d``, how a dual-stack listener reports IPv4 clients) as IPv4;
    None if `host` is not an IP address. Cached: a build farm's clients are a
    few hundred hosts connecting thousands of times, and parsing is not free."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr
