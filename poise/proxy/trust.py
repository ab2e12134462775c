"""Which address a request comes from when proxies stand in front of poise.

A listener's ``trusted_proxies`` lists the networks of those proxies.  For a request
whose TCP peer is in them, the client is the right-most ``X-Forwarded-For`` address
*not* in them: each trusted proxy appends the address it received the request from, so
that entry was written by a proxy we trust, while everything to its left may be
forged by the client.  When every entry is trusted, the left-most one is the client.
A peer outside the networks is the client itself, whatever its headers say.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

# Decisions remembered per address (proxies are few; forwarded addresses many: the
# cache is dropped whole when full rather than grown).
_CACHE_MAX = 4096


class TrustedProxies:
    """``client_ip(peer, xff)`` for one listener's ``trusted_proxies``."""

    __slots__ = ("_networks", "_cache")

    def __init__(self, networks: Sequence[str]) -> None:
        self._networks = [ipaddress.ip_network(n, strict=False) for n in networks]
        self._cache: dict[bytes, bool] = {}

    def trusts(self, address: bytes) -> bool:
        """Whether ``address`` (ASCII, IPv4 or IPv6; unparsable: no) is a trusted proxy."""
        known = self._cache.get(address)
        if known is not None:
            return known
        try:
            ip = ipaddress.ip_address(address.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            trusted = False
        else:
            if ip.version == 6 and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            trusted = any(ip in net for net in self._networks)
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[address] = trusted
        return trusted

    def client_ip(self, peer: bytes, xff: bytes) -> bytes:
        """The client's address for a request from ``peer`` carrying ``xff`` (the
        X-Forwarded-For values, comma-separated)."""
        if not self.trusts(peer):
            return peer
        hops = [hop.strip() for hop in xff.split(b",")]
        hops = [hop for hop in hops if hop]
        for hop in reversed(hops):
            if not self.trusts(hop):
                return hop
        return hops[0] if hops else peer

    def __repr__(self) -> str:
        return f"<TrustedProxies {', '.join(map(str, self._networks))}>"
