"""Our safe HTTP fetch for image URLs: one hop at a time, a total deadline, a byte cap.

What img2dataset's urllib fetch lacks and this module does:
- only http/https (file://, ftp://, data: are refused with "bad_scheme");
- a *total* deadline per image (a watchdog thread shuts the socket down when it passes, so a
  slow-drip server cannot hold a thread past it, not even while headers trickle in);
- a max-bytes cap (Content-Length checked first, then the streamed body), the body read into
  one buffer (sized from Content-Length when given) and handed on without a second copy;
- redirects followed one hop at a time; each hop's scheme is checked, its host resolved once
  (cached) and the connection made to exactly that checked IP (TLS SNI, certificate check and
  the Host header keep the name), so DNS rebinding between the check and the connect is not
  possible;
- name resolution bounded by the same deadline (wit_builder.resolver: dnspython's stub
  resolver with a lifetime, a per-process cache of positive and negative answers, one query
  in flight per name), against `dns_servers` or the system's /etc/resolv.conf;
- private, loopback, link-local, multicast and reserved addresses refused unless
  `allow_private_network` (or the address lies in `allowed_networks`);
- a per-domain concurrency limit, in the process (a semaphore) and across the processes of
  the machine (wit_builder.hostslots: file locks), a configurable user agent;
- opt-out `X-Robots-Tag` directives respected (noai, noimageai, noindex, noimageindex by
  default: the list img2dataset uses), optionally scoped to our user-agent token.

Every failure is a short reason string: "bad_url", "bad_scheme", "private_address",
"dns_error" (the name does not resolve), "dns_timeout" (no DNS answer before the deadline),
"connection_refused", "connection_reset", "connection_error", "tls_error",
"timeout", "http_404" (any non-2xx status), "redirect_loop", "too_many_redirects",
"optout", "too_large", and whatever the `screen` hook returns for a URL (the download stage
passes its blocklists and opt-out lists: `safety:blocklist:<name>` / `safety:optout:<name>`;
asked before every hop, so a listed host is never contacted, not through a redirect either).

Known limits: /etc/hosts is not read (names go to DNS). The TCP connect and the TLS
handshake are bounded by socket timeouts set to the time left (the watchdog takes over once
the connection is up). The per-domain limit holds per machine, not across a cluster.

Example:
    >>> f = Fetcher(FetchSettings(timeout=2.0))
    >>> f.fetch("ftp://example.com/a.jpg").error
    'bad_scheme'
    >>> f.fetch("http://127.0.0.1:9/a.jpg").error
    'private_address'
"""

from __future__ import annotations

import heapq
import http.client
import io
import ipaddress
import itertools
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, urljoin, urlsplit

from wit_builder.hostslots import HostSlots
from wit_builder.resolver import DnsFailure, Lookup, Resolver

DEFAULT_OPTOUT = ("noai", "noimageai", "noindex", "noimageindex")
_READ_SIZE = 1 << 16  # bytes asked for per body read (one system call at most)

# failures worth another try later (`wit-build download --retry-failed`)
TRANSIENT_ERRORS = frozenset(
    {"timeout", "dns_timeout", "connection_reset", "connection_error", "connection_refused", "http_408", "http_429"}
)


def is_transient(error: str | None) -> bool:
    """True for failures that may succeed on a later attempt (timeouts, resets, 5xx, 429).

    >>> [is_transient(e) for e in ("timeout", "http_503", "http_404", "not_an_image", None)]
    [True, True, False, False, False]
    """
    if not error:
        return False
    return error in TRANSIENT_ERRORS or (error.startswith("http_5") and len(error) == 8)


@dataclass(frozen=True)
class FetchSettings:
    """How one image is fetched (the download stage's Config carries the same keys)."""

    timeout: float = 10.0  # total seconds per image, all hops, headers and body included
    max_bytes: int = 20_000_000  # body cap
    max_redirects: int = 5
    allow_private_network: bool = False
    allowed_networks: tuple[str, ...] = ()  # CIDRs allowed even when private (e.g. a mirror)
    user_agent: str = "Mozilla/5.0 (compatible; wit-builder/0.1; image-text dataset builder)"
    user_agent_token: str = "wit-builder"  # matches "X-Robots-Tag: <token>: noai"
    disallowed_header_directives: tuple[str, ...] = DEFAULT_OPTOUT
    max_per_domain: int = 16  # concurrent connections per host name, per machine
    host_slots_dir: str = ""  # where the machine-wide per-host slots live ("" = hostslots.default_dir())
    verify_tls: bool = True
    dns_ttl: float = 300.0  # longest time a DNS answer is kept (shorter when its own TTL is)
    dns_servers: tuple[str, ...] = ()  # "IP" or "IP:PORT"; () = the system's /etc/resolv.conf


@dataclass
class FetchResult:
    """The body on success (`error` None), else a short reason in `error`."""

    url: str
    data: bytes | None = None
    error: str | None = None
    final_url: str | None = None
    status: int | None = None
    hops: int = 0


class _Failure(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Watchdog:
    """One daemon thread that shuts sockets down when their deadline passes."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, list]] = []
        self._cv = threading.Condition()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, deadline: float, sock: socket.socket) -> list:
        entry = [sock]  # cleared by disarm
        with self._cv:
            heapq.heappush(self._heap, (deadline, next(self._ids), entry))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, daemon=True, name="fetch-watchdog")
                self._thread.start()
            self._cv.notify()
        return entry

    @staticmethod
    def disarm(entry: list) -> None:
        entry[0] = None

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._heap:
                    self._cv.wait()
                deadline, _, entry = self._heap[0]
                now = time.monotonic()
                if deadline > now:
                    self._cv.wait(deadline - now)
                    continue
                heapq.heappop(self._heap)
                sock = entry[0]
            if sock is not None:
                try:  # the plain socket's shutdown: SSLSocket's own would drop its SSL object under
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)  # a reader (ValueError, not EOF)
                except OSError:
                    pass


_WATCHDOG = _Watchdog()


def is_disallowed(header_values: list[str], token: str, directives: set[str]) -> bool:
    """X-Robots-Tag opt-out check, same semantics as img2dataset's.

    >>> is_disallowed(["noai"], "wit-builder", {"noai"})
    True
    >>> is_disallowed(["otherbot: noai", "index"], "wit-builder", {"noai"})
    False
    >>> is_disallowed(["Wit-Builder: noimageai, nofollow"], "wit-builder", {"noimageai"})
    True
    """
    for value in header_values:
        parts = value.split(":", 1)
        found = {d.strip().lower() for d in parts[-1].split(",")}
        scope = parts[0].strip().lower() if len(parts) == 2 else None
        if (scope is None or scope == token) and found & directives:
            return True
    return False


def _quote_target(parts) -> str:
    path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    if parts.query:
        path += "?" + quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
    return path


class Fetcher:
    """Thread-safe fetcher with a DNS cache and per-domain limits; one per worker process.

    Names are resolved by a `wit_builder.resolver.Resolver` over `settings.dns_servers`; a
    `resolver(host, port) -> list of IP strings` hook replaces DNS (tests map names with it;
    its answers are cached per host name like DNS answers, an exception or [] is "dns_error").
    `screen(url) -> reason or None` is asked about the URL of every hop before its host is
    resolved or contacted; a reason ends the fetch with that reason as the error.
    """

    def __init__(
        self,
        settings: FetchSettings,
        resolver: Callable[[str, int], list[str]] | None = None,
        screen: Callable[[str], str | None] | None = None,
    ):
        self.s = settings
        self._screen = screen
        lookup = None
        if resolver is not None:
            lookup = _hook_lookup(resolver, settings.dns_ttl)
        self.resolver = Resolver(settings.dns_servers, ttl=settings.dns_ttl, lookup=lookup)
        self._domain_sems: dict[str, threading.BoundedSemaphore] = {}
        self._slots = HostSlots(settings.max_per_domain, settings.host_slots_dir or None)
        self._sem_lock = threading.Lock()
        self._allowed = [ipaddress.ip_network(n, strict=False) for n in settings.allowed_networks]
        self._directives = {d.strip().lower() for d in settings.disallowed_header_directives}
        self._token = settings.user_agent_token.strip().lower()
        self._ssl = ssl.create_default_context()
        if not settings.verify_tls:
            self._ssl.check_hostname = False
            self._ssl.verify_mode = ssl.CERT_NONE
        else:
            try:
                import certifi

                self._ssl.load_verify_locations(certifi.where())
            except Exception:  # certifi missing: the system store alone
                pass

    # -- policy ------------------------------------------------------------------------
    def ip_allowed(self, ip: str) -> bool:
        """Public unicast addresses always; others only if allowed by the settings."""
        addr = ipaddress.ip_address(ip)
        if getattr(addr, "ipv4_mapped", None):
            addr = addr.ipv4_mapped
        if any(addr in n for n in self._allowed):
            return True
        if self.s.allow_private_network:
            return True
        return addr.is_global and not addr.is_multicast

    def _resolve(self, host: str, port: int, deadline: float) -> str:
        try:
            ipaddress.ip_address(host)
            return host
        except ValueError:
            pass
        try:
            return self.resolver.resolve(host, deadline)[0]
        except DnsFailure as f:
            raise _Failure(f.reason) from None

    def _domain_sem(self, host: str) -> threading.BoundedSemaphore:
        with self._sem_lock:
            sem = self._domain_sems.get(host)
            if sem is None:
                sem = self._domain_sems[host] = threading.BoundedSemaphore(self.s.max_per_domain)
            return sem

    # -- fetch -------------------------------------------------------------------------
    def fetch(self, url: str) -> FetchResult:
        """Fetch `url`; never raises for per-URL problems."""
        result = FetchResult(url=url)
        current = url
        visited: set[str] = set()
        deadline: float | None = None
        try:
            for hop in range(self.s.max_redirects + 1):
                result.hops = hop
                parts, host, port = self._check_url(current)
                if self._screen is not None and (reason := self._screen(current)):
                    raise _Failure(reason)
                with self._domain_sem(host), self._slots.hold(host):
                    if deadline is None:
                        deadline = time.monotonic() + self.s.timeout
                    ip = self._resolve(host, port, deadline)
                    if not self.ip_allowed(ip):
                        raise _Failure("private_address")
                    visited.add(current)
                    location = self._one_hop(parts, host, port, ip, deadline, result)
                if location is None:
                    result.final_url = current
                    return result
                nxt = urljoin(current, location)
                if nxt in visited:
                    raise _Failure("redirect_loop")
                current = nxt
            raise _Failure("too_many_redirects")
        except _Failure as f:
            result.error = f.reason
        result.data = None
        return result

    def _check_url(self, url: str):
        try:
            parts = urlsplit(url.strip())
            scheme = parts.scheme.lower()
            if scheme not in ("http", "https"):
                raise _Failure("bad_scheme")
            host = parts.hostname
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise _Failure("bad_url") from None
        if not host:
            raise _Failure("bad_url")
        try:
            host = host.encode("idna").decode("ascii") if not host.isascii() else host
        except UnicodeError:
            raise _Failure("bad_url") from None
        return parts, host, port

    def _one_hop(self, parts, host: str, port: int, ip: str, deadline: float, result: FetchResult) -> str | None:
        """One request to `ip`; returns the redirect Location, or None with result filled."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Failure("timeout")
        https = parts.scheme.lower() == "https"
        if https:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, port, timeout=remaining, context=self._ssl
            )
        else:
            conn = http.client.HTTPConnection(host, port, timeout=remaining)
        conn._create_connection = lambda _addr, timeout, source: socket.create_connection(  # type: ignore[attr-defined]
            (ip, port), timeout, source
        )
        entry = None
        try:
            try:
                conn.connect()
                sock = conn.sock  # getresponse() drops conn.sock when the server will close
                entry = _WATCHDOG.arm(deadline, sock)
                conn.putrequest("GET", _quote_target(parts), skip_host=True, skip_accept_encoding=True)
                default_port = 443 if https else 80
                host_header = f"[{host}]" if ":" in host else host
                conn.putheader("Host", host_header if port == default_port else f"{host_header}:{port}")
                conn.putheader("User-Agent", self.s.user_agent)
                conn.putheader("Accept", "image/*,*/*;q=0.8")
                conn.putheader("Accept-Encoding", "identity")
                conn.putheader("Connection", "close")
                conn.endheaders()
                resp = conn.getresponse()
                result.status = resp.status
                if resp.status in (301, 302, 303, 307, 308):
                    location = resp.getheader("Location")
                    if not location:
                        raise _Failure(f"http_{resp.status}")
                    return location
                if not (200 <= resp.status < 300) or resp.status in (204, 205):
                    raise _Failure(f"http_{resp.status}")
                if self._directives and is_disallowed(
                    resp.headers.get_all("X-Robots-Tag") or [], self._token, self._directives
                ):
                    raise _Failure("optout")
                if resp.length is not None and resp.length > self.s.max_bytes:  # Content-Length
                    raise _Failure("too_large")
                result.data = self._read_body(resp, sock, deadline)
                return None
            except _Failure:
                raise
            except TimeoutError:
                raise _Failure("timeout") from None
            except ssl.SSLError:
                raise _Failure("timeout" if time.monotonic() >= deadline else "tls_error") from None
            except ConnectionRefusedError:
                raise _Failure("connection_refused") from None
            except ConnectionResetError:
                raise _Failure("timeout" if time.monotonic() >= deadline else "connection_reset") from None
            except (http.client.HTTPException, OSError):
                raise _Failure("timeout" if time.monotonic() >= deadline else "connection_error") from None
        finally:
            if entry is not None:
                _WATCHDOG.disarm(entry)
            conn.close()

    def _read_body(self, resp: http.client.HTTPResponse, sock: socket.socket, deadline: float) -> bytes:
        """The body, under the byte cap and the deadline, read into one buffer and returned as is.

        With a Content-Length (already checked against max_bytes) the buffer is allocated once
        at that size; otherwise it grows as data comes. `getvalue()` hands the buffer itself
        on, so the body is never held twice. Each read is at most one system call, with the
        time left as socket timeout and the deadline checked between reads; the watchdog cuts
        a read that straddles it.
        """
        cap, expected = self.s.max_bytes, resp.length
        buf = io.BytesIO(bytes(expected)) if expected else io.BytesIO()  # zeroed lazily by the OS
        total = 0
        while expected is None or total < expected:
            _set_timeout(sock, deadline)
            chunk = resp.read1(min(_READ_SIZE, cap + 1 - total))
            if not chunk:
                break
            buf.write(chunk)
            total += len(chunk)
            if total > cap:
                raise _Failure("too_large")
        if time.monotonic() >= deadline:
            raise _Failure("timeout")
        if resp.length:  # the server closed before sending all of Content-Length
            raise _Failure("connection_error")
        return buf.getvalue()


def _set_timeout(sock: socket.socket, deadline: float) -> None:
    """Make the time left before `deadline` the socket's timeout; "timeout" once it has passed."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _Failure("timeout")
    try:
        sock.settimeout(remaining)
    except OSError:  # already closed by the response: its reads end on their own
        pass


def _hook_lookup(hook: Callable[[str, int], list[str]], ttl: float) -> Lookup:
    """A resolver Lookup from a `(host, port) -> [ip, ...]` hook (its port: 0, unknown)."""

    def lookup(host: str, lifetime: float) -> tuple[list[str], float]:
        return list(hook(host, 0) or []), ttl

    return lookup
