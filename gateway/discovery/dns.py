"""DNS membership: a headless Service name resolved to every A and AAAA record, on an interval.

A Kubernetes headless Service (``clusterIP: None``) answers with one record per ready pod, so
resolving it repeatedly tracks the replica set without talking to the API server. Each address
becomes a replica named "ip:port" (IPv6 bracketed).

What the answers mean (the distinction matters: stale members would receive traffic forever):
- NXDOMAIN, or NOERROR with no records (no-data), for a record type: zero replicas of that type.
  Both are authoritative statements, so an empty snapshot is pushed.
- Resolver failure (timeout, SERVFAIL/REFUSED from every nameserver, connection refused): the
  authority did not answer. The last good membership stays; the failure is counted in
  ``errors`` and logged on the transition only.
- A round counts as good only when both the A and the AAAA query gave an answer; a partial
  round would silently drop one address family.

A headless Service publishes only ready pods (unless ``publishNotReadyAddresses``), so DNS
cannot announce replicas that are still loading; Kubernetes discovery can (they arrive as
not ready, i.e. *starting*).

The name goes through the resolv.conf search list (with its ``ndots``) like any libc lookup;
a trailing dot makes it absolute and skips the list. Nameservers come from /etc/resolv.conf
unless given explicitly (``nameservers`` and ``nameserver_port``; tests point them at a dnsmasq
on 127.0.0.1), in which case the name is used as is, with no search list. The resolver keeps
no cache: every round asks the server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from gateway.discovery.base import (
    DiscoveredReplica,
    DiscoveryErrors,
    MembershipSink,
    format_hostport,
)

__all__ = ["DnsDiscovery", "DnsResolveError"]

logger = logging.getLogger(__name__)

_RECORD_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)


class DnsResolveError(Exception):
    """The resolver got no usable answer (as opposed to an authoritative empty one)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class DnsDiscovery:
    """Replicas behind a DNS name, re-resolved every ``interval_s``."""

    def __init__(
        self,
        name: str,
        port: int,
        *,
        interval_s: float = 5.0,
        timeout_s: float = 2.0,
        scheme: str = "http",
        nameservers: Sequence[str] | None = None,
        nameserver_port: int = 53,
        source: str = "dns",
    ) -> None:
        """Without ``nameservers`` this reads /etc/resolv.conf (blocking file I/O), so construct
        it at startup, not on a hot path."""
        if not 0 < port < 65536:
            raise ValueError(f"port {port} out of range")
        if interval_s <= 0 or timeout_s <= 0:
            raise ValueError("interval_s and timeout_s must be > 0")
        if scheme not in ("http", "https"):
            raise ValueError(f"scheme {scheme!r}: expected http or https")
        self.source = source
        self.errors = DiscoveryErrors(source, logger)
        self._name = name
        self._port = port
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._scheme = scheme
        if nameservers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = list(nameservers)
            self._resolver.port = nameserver_port
            # configure=False still derives a search domain from the local hostname; explicit
            # nameservers mean explicit names, so a miss must be NXDOMAIN, not a suffixed retry.
            self._resolver.domain = dns.name.root
            self._resolver.search = []
        else:
            self._resolver = dns.asyncresolver.Resolver()
        self._resolver.lifetime = timeout_s
        # Per-try timeout: with several nameservers, one dead server must not eat the lifetime.
        self._resolver.timeout = timeout_s / max(1, len(self._resolver.nameservers))

    async def run(self, sink: MembershipSink) -> None:
        last: tuple[DiscoveredReplica, ...] | None = None
        while True:
            try:
                members = await self.resolve_once()
            except DnsResolveError as exc:
                self.errors.failure(exc.reason, f"{self._name}: {exc}")
            else:
                self.errors.success()
                if members != last:
                    logger.info(
                        "discovery %s: %s -> %d replicas", self.source, self._name, len(members)
                    )
                    last = members
                    sink.set_members(self.source, members)
            await asyncio.sleep(self._interval_s)

    async def resolve_once(self) -> tuple[DiscoveredReplica, ...]:
        """One round: the replicas the name resolves to now, sorted by name.

        Raises DnsResolveError when the resolver could not get an authoritative answer.
        """
        results = await asyncio.gather(
            *(self._addresses(rdtype) for rdtype in _RECORD_TYPES), return_exceptions=True
        )
        addresses: set[str] = set()
        for result in results:
            if isinstance(result, BaseException):
                raise result
            addresses.update(result)
        replicas = []
        for addr in sorted(addresses):
            hostport = format_hostport(addr, self._port)
            replicas.append(
                DiscoveredReplica(name=hostport, url=f"{self._scheme}://{hostport}", ready=True)
            )
        return tuple(replicas)

    async def _addresses(self, rdtype: dns.rdatatype.RdataType) -> list[str]:
        try:
            answer = await self._resolver.resolve(
                self._name, rdtype, raise_on_no_answer=False, search=True
            )
        except dns.resolver.NXDOMAIN:
            return []
        except dns.resolver.NoNameservers as exc:
            # Every server failed (SERVFAIL, REFUSED, connection refused...).
            raise DnsResolveError("no_nameservers", str(exc)) from exc
        except dns.exception.Timeout as exc:
            raise DnsResolveError("timeout", str(exc)) from exc
        except dns.exception.DNSException as exc:
            raise DnsResolveError("resolver", str(exc)) from exc
        if answer.rrset is None:
            return []  # no-data: the name exists without records of this type
        return [rdata.to_text() for rdata in answer.rrset]
