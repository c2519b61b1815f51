"""Who a connection counts as for fair sharing (``--fair-by``, ``--priority``).

The admission core only knows opaque keys and weights; this module turns a
peer address into them. Keys are strings so they can be shown in status and
metrics as they are.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from gatekeeper.net.allow import Network, parse_network, peer_ip

# `subnet/N` names an IPv4 prefix; IPv6 clients are grouped by /64, the size of
# one LAN segment there (a single IPv6 host often has many addresses in it).
IPV6_SUBNET_PREFIX = 64


@dataclass(frozen=True, slots=True)
class FairBy:
    """How peers are grouped: not at all, by address, or by IPv4 prefix length."""

    mode: str  # "none", "client" or "subnet"
    prefix: int = 32

    @classmethod
    def parse(cls, text: str) -> FairBy:
        if text in ("none", "client"):
            return cls(text)
        if text.startswith("subnet/"):
            bits = text[len("subnet/"):]
            if bits.isdigit() and 0 <= int(bits) <= 32:
                return cls("subnet", int(bits))
        raise ValueError(f"{text!r}: expected none, client or subnet/N (N from 0 to 32)")

    def key(self, host: str | None) -> str | None:
        """The fairness key of a peer (None: everyone shares one queue)."""
        if self.mode == "none":
            return None
        if host is None:
            return "unix"
        addr = peer_ip(host)
        if addr is None:
            return host
        if self.mode == "client":
            return str(addr)
        prefix = self.prefix if addr.version == 4 else IPV6_SUBNET_PREFIX
        return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


@dataclass(frozen=True, slots=True)
class Priorities:
    """``--priority CIDR=WEIGHT``: the first network that holds the peer gives its weight."""

    rules: tuple[tuple[Network, int], ...] = ()

    @classmethod
    def parse(cls, texts: list[str]) -> Priorities:
        rules: list[tuple[Network, int]] = []
        for text in texts:
            cidr, sep, weight = text.partition("=")
            if not sep or not weight.isdigit() or not 1 <= int(weight) <= 1000:
                raise ValueError(f"{text!r}: expected CIDR=WEIGHT with WEIGHT from 1 to 1000")
            rules.append((parse_network(cidr), int(weight)))
        return cls(tuple(rules))

    def weight(self, host: str | None) -> int:
        if not self.rules:
            return 1
        addr = None if host is None else peer_ip(host)
        if addr is None:
            return 1
        for network, weight in self.rules:
            if addr in network:
                return weight
        return 1
