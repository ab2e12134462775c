"""The ``dns`` source: the A, AAAA or SRV records of ``name``, re-resolved per TTL.

Each ``watch()`` call builds a resolver (``resolver: "ip[:port]"``, port 53 by default,
or the system's resolvers from ``/etc/resolv.conf`` when None), then loops: resolve,
yield the full set (sorted: primaries first, then by address), sleep the answer's TTL
clamped to ``[min_ttl, max_ttl]``, resolve again.  It yields after every resolution; the
runner only passes a set on when it differs from the last one.

* ``A`` / ``AAAA``: one instance ``ip:port`` (``[ip]:port`` for IPv6) per address, weight
  1; ``port`` is required.
* ``SRV`` (``name`` is the full owner name, e.g. ``_http._tcp.app.internal``): one
  instance per address of each record's target, with the record's port (``port`` is
  ignored).  Target addresses come from the answer's additional section when the server
  put any there for that target, else from A and AAAA queries for it.  The SRV weight is
  the weight of each of the target's addresses (0 becomes 1; above poise's ``MAX_WEIGHT``
  it is clamped).  The records with the lowest priority value are the primaries; all
  others become ``backup`` backends: poise has a single backup tier, so a third priority
  and beyond collapse into it.  A target of ``.`` ("no service here", RFC 2782) is
  dropped; a target with no addresses is skipped with a warning (once per change).
* The TTL slept is the smallest TTL of every record used (CNAMEs, SRV, target
  addresses).  A negative answer uses its SOA's negative TTL, or ``min_ttl`` when the
  server sent no SOA (RFC 2308: such an answer must not be cached).

Failures: an answer of NXDOMAIN, or NOERROR with no record of the type, comes from a
server that works and says the name has no backends: it is yielded as an explicitly
empty set ``[]``, which poise honours.  A timeout (no answer within ``timeout``, per
query), SERVFAIL, REFUSED, a refused or unreachable server, or any malformed answer
raises :class:`DnsError` out of ``watch()``: the runner keeps the last set and retries
with backoff.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Iterable

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.rdatatype
import dns.resolver

from poise.config.discovery import DnsDiscovery
from poise.config.model import MAX_WEIGHT
from poise.discovery.base import Instance, log

DNS_PORT = 53
_ADDRESS_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)


class DnsError(Exception):
    """The name could not be resolved: the server failed, refused or did not answer."""


def clamp_ttl(ttl: float, min_ttl: float, max_ttl: float) -> float:
    """``ttl`` brought within ``[min_ttl, max_ttl]`` (``min_ttl`` wins if they cross)."""
    return max(min_ttl, min(ttl, max_ttl))


def parse_resolver(text: str) -> tuple[str, int]:
    """``(ip, port)`` from ``"ip"``, ``"ip:port"``, ``"[v6]:port"`` or a bare IPv6
    address; the port is 53 unless given.  ValueError when it is not an IP address."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            host = text     # (invalid: reported below)
        port = rest[1:]
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"discovery resolver {text!r}: expected an IP address with an "
                         "optional :port (e.g. 127.0.0.1:5353 or [::1]:5353)") from None
    if not port:
        return host, DNS_PORT
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise ValueError(f"discovery resolver {text!r}: the port must be 1..65535")
    return host, int(port)


def check_spec(spec: DnsDiscovery) -> None:
    """Raise ValueError, with a message for the operator, when ``spec`` cannot work."""
    if spec.record in ("A", "AAAA") and spec.port is None:
        raise ValueError(f"dns discovery of {spec.name!r}: {spec.record} records carry no "
                         "port, so `port` is required (or use record: SRV)")
    if spec.resolver is not None:
        parse_resolver(spec.resolver)
    try:
        dns.name.from_text(spec.name)
    except dns.exception.DNSException as e:
        raise ValueError(f"dns discovery: invalid name {spec.name!r}: {e}") from None


def join(ip: str, port: int) -> str:
    """``ip:port``, with IPv6 addresses in brackets."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def tidy(instances: Iterable[Instance]) -> list[Instance]:
    """Instances in a stable order (primaries first, then by address), one per address:
    a primary wins over a backup, and repeats in the same tier add up their weights."""
    kept: dict[str, Instance] = {}
    for instance in sorted(instances, key=lambda i: (i.backup, i.address)):
        first = kept.get(instance.address)
        if first is None:
            kept[instance.address] = instance
        elif first.backup == instance.backup:
            kept[instance.address] = Instance(
                first.address, min(first.weight + instance.weight, MAX_WEIGHT),
                first.backup, first.zone, first.metadata)
    return list(kept.values())


def negative_ttl(response: dns.message.Message | None) -> float:
    """How long a negative answer holds: its SOA's negative TTL, else 0 (not cached)."""
    if response is not None:
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                return float(min(rrset.ttl, rrset[0].minimum))
    return 0.0


class DnsSource:
    """Yields the backends ``spec`` names (see the module's docstring); ValueError at
    construction when the spec cannot work (A/AAAA without a port, a bad resolver)."""

    def __init__(self, spec: DnsDiscovery) -> None:
        check_spec(spec)
        self.spec = spec
        self.name = dns.name.from_text(spec.name)
        self.where = spec.resolver or "the system resolvers"
        self._missing: frozenset[str] = frozenset()     # SRV targets warned about

    async def watch(self) -> AsyncIterator[list[Instance]]:
        resolver = self._resolver()
        while True:
            instances, ttl = await self.resolve(resolver)
            yield instances
            await asyncio.sleep(clamp_ttl(ttl, self.spec.min_ttl, self.spec.max_ttl))

    async def resolve(self, resolver: dns.asyncresolver.Resolver
                      ) -> tuple[list[Instance], float]:
        """The current set and the TTL (seconds, unclamped) it is good for."""
        if self.spec.record == "SRV":
            return await self._resolve_srv(resolver)
        answer, ttl = await self._query(resolver, self.name, self.spec.record)
        if answer is None:
            return [], ttl
        port = self.spec.port
        return tidy(Instance(join(rdata.address, port)) for rdata in answer.rrset), ttl

    def _resolver(self) -> dns.asyncresolver.Resolver:
        if self.spec.resolver is None:
            try:
                # (reads /etc/resolv.conf: a small local file, once per watch() call)
                resolver = dns.asyncresolver.Resolver()
            except dns.exception.DNSException as e:
                raise DnsError(f"no system resolvers: {e}") from None
        else:
            host, port = parse_resolver(self.spec.resolver)
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [host]
            resolver.port = port
        # One query (with its retries) gets `timeout` seconds in all.
        resolver.timeout = resolver.lifetime = self.spec.timeout
        resolver.cache = None       # the TTL is honoured here, by sleeping
        return resolver

    async def _query(self, resolver: dns.asyncresolver.Resolver, name: dns.name.Name,
                     rdtype: str) -> tuple[dns.resolver.Answer | None, float]:
        """The answer (None when the name or the type has no records) and its TTL."""
        try:
            answer = await resolver.resolve(name, rdtype, raise_on_no_answer=False,
                                            search=False)
        except dns.resolver.NXDOMAIN as e:
            responses = e.kwargs.get("responses") or {}
            return None, negative_ttl(next(iter(responses.values()), None))
        except dns.exception.DNSException as e:
            # Timeouts, SERVFAIL/REFUSED (NoNameservers), malformed answers...
            text = str(e) or type(e).__name__
            raise DnsError(f"resolving {name} {rdtype} at {self.where}: {text}") from None
        if answer.rrset is None:
            return None, negative_ttl(answer.response)
        return answer, float(answer.chaining_result.minimum_ttl)

    async def _resolve_srv(self, resolver: dns.asyncresolver.Resolver
                           ) -> tuple[list[Instance], float]:
        answer, ttl = await self._query(resolver, self.name, "SRV")
        if answer is None:
            return [], ttl
        records = [r for r in answer.rrset if r.target != dns.name.root]
        if not records:
            return [], ttl
        targets = {r.target for r in records}
        found = addresses_in(answer.response.additional, targets)
        asked = [t for t in targets if t not in found]
        for target, result in zip(asked, await asyncio.gather(
                *(self._addresses(resolver, t) for t in asked)), strict=True):
            found[target] = result
        self._warn_missing([t for t in targets if not found[t][0]])
        primary = min(r.priority for r in records)
        instances = []
        for r in records:
            addresses, target_ttl = found[r.target]
            ttl = min(ttl, target_ttl)      # (a missing target's negative TTL too)
            weight = min(max(r.weight, 1), MAX_WEIGHT)
            target = r.target.to_text(omit_final_dot=True)
            instances += [Instance(join(ip, r.port), weight, r.priority != primary,
                                   metadata={"target": target}) for ip in addresses]
        return tidy(instances), ttl

    async def _addresses(self, resolver: dns.asyncresolver.Resolver,
                         target: dns.name.Name) -> tuple[list[str], float]:
        """The A and AAAA addresses of an SRV target, and their smallest TTL."""
        results = await asyncio.gather(
            *(self._query(resolver, target, dns.rdatatype.to_text(t)) for t in _ADDRESS_TYPES))
        addresses = [rdata.address for answer, _ in results if answer is not None
                     for rdata in answer.rrset]
        return addresses, min(ttl for _, ttl in results)

    def _warn_missing(self, missing: list[dns.name.Name]) -> None:
        now = frozenset(t.to_text(omit_final_dot=True) for t in missing)
        if now - self._missing:
            log.warning("discovery: %s SRV: skipping target(s) with no addresses: %s",
                        self.spec.name, ", ".join(sorted(now - self._missing)))
        self._missing = now


def addresses_in(section: Iterable, targets: set[dns.name.Name]
                 ) -> dict[dns.name.Name, tuple[list[str], float]]:
    """The addresses (and their smallest TTL) a response's additional section gives for
    each of ``targets`` that it mentions."""
    found: dict[dns.name.Name, tuple[list[str], float]] = {}
    for rrset in section:
        if rrset.rdtype in _ADDRESS_TYPES and rrset.name in targets:
            addresses, ttl = found.get(rrset.name, ([], float("inf")))
            found[rrset.name] = (addresses + [r.address for r in rrset], min(ttl, rrset.ttl))
    return found
