"""Name resolution that cannot stall a download: every lookup ends by the caller's deadline.

`socket.getaddrinfo` blocks its thread for as long as the system resolver likes (resolv.conf's
timeouts times attempts times servers; 5-10 s per name seen on a slow resolver) and cannot be
bounded from Python. This module asks DNS servers directly through dnspython's stub resolver
with a *lifetime* (the time left before the image's deadline), and keeps a per-process cache:

- positive answers for min(the answer's TTL, `ttl`), at least 10 s;
- negative answers (NXDOMAIN, no A/AAAA record, every server failing) for `negative_ttl`;
- timeouts for min(`negative_ttl`, 30 s), so the URLs of a host whose name servers are dead
  fail at once instead of each waiting out its own deadline;
- at most `max_entries` names (least recently used dropped first);
- one query in flight per name: concurrent lookups of the same name wait for the first one
  (each still bounded by its own deadline).

Failures raise `DnsFailure` with reason "dns_error" (the name does not resolve) or
"dns_timeout" (no answer before the deadline). Servers are "IP" or "IP:PORT" ("[::1]:53" for
IPv6); none = the system's /etc/resolv.conf. /etc/hosts is not read: this resolves public web
host names. For big runs point `servers` at a local caching resolver (README, "DNS").

Example (a lookup function instead of DNS servers, as tests do):
    >>> import time
    >>> r = Resolver(lookup=lambda host, lifetime: (["127.0.0.7"], 60.0))
    >>> r.resolve("img.example", time.monotonic() + 1.0)
    ['127.0.0.7']
    >>> parse_server("[::1]:5353"), parse_server("10.0.0.2")
    (('::1', 5353), ('10.0.0.2', 53))
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

# lookup(host, lifetime seconds) -> (addresses, ttl seconds); raises DnsFailure
Lookup = Callable[[str, float], tuple[list[str], float]]

MIN_POSITIVE_TTL = 10.0
MAX_TIMEOUT_TTL = 30.0


class DnsFailure(Exception):
    """A name that did not resolve: `reason` is "dns_error" or "dns_timeout"."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def parse_server(text: str) -> tuple[str, int]:
    """("IP", port) from "IP", "IP:PORT", "[IPv6]:PORT" or a bare IPv6; ValueError otherwise.

    >>> parse_server("127.0.0.1:5353")
    ('127.0.0.1', 5353)
    """
    s = text.strip()
    host, port = s, 53
    if s.startswith("["):
        host, _, rest = s[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"not a DNS server address: {text!r}")
            port = int(rest[1:])
    elif s.count(":") == 1:
        host, p = s.split(":")
        port = int(p)
    ipaddress.ip_address(host)  # a name would need a resolver itself
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {text!r}")
    return host, port


def dns_lookup(servers: Sequence[str] = ()) -> Lookup:
    """A lookup through dnspython's stub resolver: A records, else AAAA, within `lifetime`.

    Raises ValueError when `servers` is empty and the system has no resolver configuration."""
    import dns.exception
    import dns.nameserver
    import dns.resolver

    try:
        res = dns.resolver.Resolver(configure=not servers)
    except dns.resolver.NoResolverConfiguration:
        raise ValueError("no DNS server in /etc/resolv.conf; give one in dns_servers") from None
    if servers:
        res.nameservers = [dns.nameserver.Do53Nameserver(*parse_server(s)) for s in servers]
    res.cache = None  # ours caches (with negative answers and timeouts)
    res.timeout = 1.0  # per-attempt: a lost UDP packet is asked again after 1 s, within the lifetime

    def lookup(host: str, lifetime: float) -> tuple[list[str], float]:
        end = time.monotonic() + lifetime
        try:
            for rdtype in ("A", "AAAA"):
                left = end - time.monotonic()
                if left <= 0:
                    raise DnsFailure("dns_timeout")
                ans = res.resolve(host, rdtype, lifetime=left, search=False, raise_on_no_answer=False)
                if ans.rrset is not None:
                    return [r.address for r in ans.rrset], float(ans.rrset.ttl)
        except dns.exception.Timeout:
            raise DnsFailure("dns_timeout") from None
        except dns.exception.DNSException:  # NXDOMAIN, all servers failed, a malformed name
            raise DnsFailure("dns_error") from None
        except (UnicodeError, ValueError):
            raise DnsFailure("dns_error") from None
        raise DnsFailure("dns_error")  # neither A nor AAAA

    return lookup


class _Pending:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.ips: list[str] | None = None
        self.reason = "dns_error"


class Resolver:
    """Thread-safe cached resolver; one per worker process (the Fetcher holds it)."""

    def __init__(
        self,
        servers: Sequence[str] = (),
        *,
        ttl: float = 300.0,
        negative_ttl: float = 60.0,
        max_entries: int = 100_000,
        lookup: Lookup | None = None,
    ):
        self._lookup = lookup or dns_lookup(servers)
        self.ttl, self.negative_ttl, self.max_entries = ttl, negative_ttl, max_entries
        self._cache: OrderedDict[str, tuple[float, list[str] | None, str]] = OrderedDict()
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self.queries = 0  # lookups actually sent (cache misses)

    def resolve(self, host: str, deadline: float) -> list[str]:
        """The addresses of `host`, or DnsFailure by `deadline` (a time.monotonic() value)."""
        key = host.lower().rstrip(".")
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > time.monotonic():
                self._cache.move_to_end(key)
                return _answer(hit[1], hit[2])
            pending = self._pending.get(key)
            owner = pending is None
            if owner:
                pending = self._pending[key] = _Pending()
                self.queries += 1
        assert pending is not None
        if not owner:
            if not pending.done.wait(max(0.0, deadline - time.monotonic())):
                raise DnsFailure("dns_timeout")
            return _answer(pending.ips, pending.reason)
        try:
            lifetime = deadline - time.monotonic()
            if lifetime <= 0:
                raise DnsFailure("dns_timeout")
            ips, ttl = self._lookup(key, lifetime)
            pending.ips = list(ips) or None
            keep = min(self.ttl, max(ttl, MIN_POSITIVE_TTL))
        except DnsFailure as f:
            pending.reason = f.reason
            keep = self.negative_ttl if f.reason == "dns_error" else min(self.negative_ttl, MAX_TIMEOUT_TTL)
        except Exception:  # a lookup hook's own error (a name it does not know): the name does not resolve
            keep = self.negative_ttl
        with self._lock:
            self._cache[key] = (time.monotonic() + keep, pending.ips, pending.reason)
            self._cache.move_to_end(key)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
            del self._pending[key]
        pending.done.set()
        return _answer(pending.ips, pending.reason)


def _answer(ips: list[str] | None, reason: str) -> list[str]:
    if not ips:
        raise DnsFailure(reason)
    return ips
