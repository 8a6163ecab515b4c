"""URL, URL-prefix and domain lists matched against blocks of candidate URLs.

A URL's host is taken the way the download's fetcher takes it (fetch.py: `urlsplit(url.strip())`,
so tabs and newlines inside are dropped and userinfo ends at the last `@`; lower case; a non-ASCII
name through Python's IDNA codec), trailing dots dropped. List entries match in that form and in
their UTS 46 form. A URL's match key is scheme-agnostic `host[:port]path?query`: the default
port of the scheme (80 for http, 443 for https) is dropped, an empty path is `/`, the fragment is
dropped; path and query keep their case. So a list entry `http://Example.COM./a` matches
`https://example.com:443/a#top`.

- `domain`: the host or any of its parent domains is listed (`example.com` blocks
  `img.example.com`); an entry may be a bare host, `*.host`, `.host` or a URL.
- `url`: the URL's key equals an entry's key.
- `prefix`: the URL's key starts with an entry's key (`example.com/private/`; an entry without a
  scheme is read as `http://...`).

Blocks are matched column-wise (pyarrow regex for the parts, Python only per distinct host).
Redirects are not seen here: the download stage's fetcher asks the same lists about every hop
(screen.UrlScreen.check), so a listed host reached through a redirect is never contacted.

Example:
    >>> url_key("HTTPS://user@Bücher.Example.:443/A?b=1#frag")
    'xn--bcher-kva.example/A?b=1'
    >>> m = UrlList("bad", "domain", ["example.com"])
    >>> import pyarrow as pa
    >>> m.mask(UrlParts.of(pa.array(["http://a.example.com/x.jpg", "http://notexample.com/y.jpg"]))).tolist()
    [True, False]
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from wit_builder.config import ConfigError

DEFAULT_PORTS = {"http": "80", "https": "443"}
DROPPED_CHARS = "[\t\r\n]"  # urlsplit removes these anywhere in a URL
_DROPPED = re.compile(DROPPED_CHARS)
URL_RE = (
    r"(?s)^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://(?:[^/?#]*@)?"
    r"(?P<host>\[[^\]/?#\s]*\]|[^:/?#@\s]*)(?::(?P<port>[0-9]*))?(?P<rest>[/?#].*)?$"
)
_URL = re.compile(URL_RE)


def normalize_host(host: str) -> str:
    """The host as the fetcher contacts it: lower case, no trailing dots, a non-ASCII name as
    Python's IDNA codec writes it (else its UTS 46 form, else as it is: such a name cannot be
    resolved anyway).

    >>> normalize_host("WWW.Bücher.DE..")
    'www.xn--bcher-kva.de'
    """
    host = host.strip().rstrip(".").lower()
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return _uts46(host) or host


def _uts46(host: str) -> str | None:
    import idna

    try:
        return idna.encode(host, uts46=True).decode("ascii")
    except idna.IDNAError:
        return None


def host_forms(host: str) -> set[str]:
    """A list entry's host in each form a URL's host may take (the fetcher's IDNA 2003 and UTS 46).

    >>> sorted(host_forms("straße.de"))
    ['strasse.de', 'xn--strae-oqa.de']
    """
    forms = {normalize_host(host)}
    plain = host.strip().rstrip(".").lower()
    if not plain.isascii() and (alt := _uts46(plain)):
        forms.add(alt)
    return forms


def _split(url: str, bare_as_http: bool = True) -> tuple[str, str, str | None, str] | None:
    """(scheme, host, port, rest) of a URL, or None; a bare `host/path` is read as http (list
    entries), or as no URL with `bare_as_http=False` (fetched URLs, as `UrlParts.of` reads them)."""
    url = _DROPPED.sub("", url.strip())
    if bare_as_http and "://" not in url:
        url = "http://" + url
    m = _URL.match(url)
    if m is None or not m.group("host"):
        return None
    return m.group("scheme"), m.group("host"), m.group("port"), m.group("rest") or ""


def _key(scheme: str, host: str, port: str | None, rest: str) -> str:
    rest = rest.split("#", 1)[0]
    if not rest.startswith("/"):
        rest = "/" + rest
    port_part = f":{port}" if port and port != DEFAULT_PORTS.get(scheme.lower()) else ""
    return host + port_part + rest


def url_key(url: str) -> str | None:
    """The scheme-agnostic match key of one URL (None when it has no host)."""
    parts = _split(url)
    if parts is None:
        return None
    scheme, host, port, rest = parts
    return _key(scheme, normalize_host(host), port, rest)


def entry_keys(entry: str) -> set[str]:
    """The match keys of a `url` or `prefix` list entry, one per host form (empty: no host)."""
    parts = _split(entry)
    if parts is None:
        return set()
    scheme, host, port, rest = parts
    return {_key(scheme, h, port, rest) for h in host_forms(host)}


def entry_key_set(entries: Sequence[str]) -> tuple[set[str], list[str]]:
    """(the match keys of all `url`/`prefix` entries, the entries without a host): `entry_keys`
    of each, computed column-wise (a list of millions loads in seconds), with Python only for
    entries holding non-ASCII characters (their UTS 46 host forms).

    >>> sorted(entry_key_set(["HTTP://A.example:80/x", " b.example/y ", "http:///nohost"])[0])
    ['a.example/x', 'b.example/y']
    """
    column = pc.replace_substring_regex(pc.utf8_trim_whitespace(pa.array(entries, pa.string())), DROPPED_CHARS, "")
    column = pc.if_else(pc.match_substring(column, "://"), column, pc.binary_join_element_wise("http://", column, ""))
    parts = UrlParts.of(column)
    ascii_rows = np.asarray(pc.string_is_ascii(column).fill_null(True), dtype=bool)
    keys = set(parts.keys.filter(pa.array(ascii_rows)).drop_null().to_pylist())
    bad = [entries[i] for i in np.flatnonzero((parts.codes < 0) & ascii_rows).tolist()]
    for i in np.flatnonzero(~ascii_rows).tolist():
        forms = entry_keys(entries[i])
        keys |= forms
        if not forms:
            bad.append(entries[i])
    return keys, bad


def domain_entries(entry: str) -> set[str]:
    """A domain list entry's hosts: `*.x.com`, `.x.com`, `x.com` or a URL (empty: no host)."""
    entry = entry.strip()
    if "://" in entry:
        parts = _split(entry)
        entry = parts[1] if parts else ""
    entry = entry.removeprefix("*.").lstrip(".")
    return {h for h in host_forms(entry) if h} if entry else set()


@dataclass
class UrlParts:
    """One column of URLs split for matching: the distinct normalised hosts, each row's host
    code (-1: no host / null), and each row's key (null where no host)."""

    hosts: list[str]
    codes: np.ndarray
    keys: pa.Array | None  # None when made with keys=False (domain lists need hosts only)

    @classmethod
    def of(cls, urls: pa.Array, keys: bool = True) -> UrlParts:
        if isinstance(urls, pa.ChunkedArray):
            urls = urls.combine_chunks()
        urls = pc.replace_substring_regex(pc.utf8_trim_whitespace(urls), DROPPED_CHARS, "")
        parts = pc.extract_regex(urls, URL_RE)
        encoded = pc.dictionary_encode(parts.field("host"))
        hosts = [normalize_host(h) for h in encoded.dictionary.to_pylist()]
        codes = np.asarray(encoded.indices.fill_null(-1), dtype=np.int64)
        no_host = np.array([not h for h in hosts] + [True], dtype=bool)
        codes = np.where(no_host[codes], -1, codes)  # code -1 indexes the trailing True
        return cls(hosts, codes, _keys(parts, hosts, codes) if keys else None)


def _keys(parts: pa.StructArray, hosts: list[str], codes: np.ndarray) -> pa.Array:
    """Each row's match key, column-wise (null where the row has no host)."""
    scheme = pc.utf8_lower(parts.field("scheme"))
    port = parts.field("port")
    rest = pc.replace_substring_regex(parts.field("rest"), r"#.*", "")  # fragment: not part of the key
    rest = pc.if_else(pc.starts_with(rest, "/"), rest, pc.binary_join_element_wise("/", rest, ""))
    default = pc.or_(
        pc.and_(pc.equal(scheme, "http"), pc.equal(port, "80")),
        pc.and_(pc.equal(scheme, "https"), pc.equal(port, "443")),
    )
    keep_port = pc.and_(pc.greater(pc.utf8_length(port), 0), pc.invert(default))
    port_part = pc.if_else(keep_port, pc.binary_join_element_wise(":", port, ""), "")
    host_col = pa.array(hosts + [""], pa.string()).take(pa.array(np.where(codes < 0, len(hosts), codes)))
    keys = pc.binary_join_element_wise(host_col, port_part, rest, "")
    return pc.if_else(pa.array(codes >= 0), keys, pa.scalar(None, pa.string()))


class UrlList:
    """One loaded list of a URL kind; `mask(parts)` says which rows it matches."""

    def __init__(self, name: str, kind: str, entries: Sequence[str]):
        self.name, self.kind = name, kind
        if kind == "domain":
            parsed = [domain_entries(e) for e in entries]
            self.bad = [e for e, forms in zip(entries, parsed) if not forms]  # entries without a host
            self.domains = set().union(*parsed)
        else:
            keys, self.bad = entry_key_set(entries)
            if kind == "url":
                self.url_key_set = frozenset(keys)  # one URL at a time (`matches`)
                self.url_keys = pa.array(sorted(keys), pa.string())  # a block (`mask`)
            else:  # prefix: per host, the lengths to cut at and the prefixes
                self.prefixes: dict[str, tuple[list[int], set[str]]] = {}
                by_host: dict[str, set[str]] = defaultdict(set)
                for k in keys:
                    by_host[_host_of_key(k)].add(k)
                for host, ks in by_host.items():
                    self.prefixes[host] = (sorted({len(k) for k in ks}), ks)
        self.size = len(entries)

    def host_matches(self, host: str) -> bool:
        """Domain lists: the host or a parent domain is listed."""
        domains = self.domains
        while host not in domains:
            dot = host.find(".")
            if dot < 0:
                return False
            host = host[dot + 1 :]
        return True

    def matches(self, host: str, key: str) -> bool:
        """One URL's verdict from its normalised host and match key (`one_url`): set lookups only,
        so the download's fetcher can ask about every redirect hop (`mask` is for blocks)."""
        if self.kind == "domain":
            return self.host_matches(host)
        if self.kind == "url":
            return key in self.url_key_set
        entry = self.prefixes.get(host)
        return entry is not None and any(key[:length] in entry[1] for length in entry[0])

    def mask(self, parts: UrlParts) -> np.ndarray:
        n = len(parts.codes)
        if self.kind == "domain":
            hit = np.array([self.host_matches(h) for h in parts.hosts] + [False], dtype=bool)
            return hit[parts.codes]
        if self.kind == "url":
            return np.asarray(pc.is_in(parts.keys, value_set=self.url_keys).fill_null(False), dtype=bool)
        hosts = np.array([h in self.prefixes for h in parts.hosts] + [False], dtype=bool)
        out = np.zeros(n, dtype=bool)
        rows = np.flatnonzero(hosts[parts.codes])
        if len(rows):
            keys = parts.keys.take(pa.array(rows)).to_pylist()
            for row, key in zip(rows.tolist(), keys):
                out[row] = self.matches(parts.hosts[parts.codes[row]], key)
        return out


def one_url(url: str) -> tuple[str, str] | None:
    """(normalised host, match key) of one URL the way `UrlParts.of` splits a column (a URL
    without a scheme or host: None, as a null there).

    >>> one_url(" HTTP://Img.Example.COM:80/a.jpg#x")
    ('img.example.com', 'img.example.com/a.jpg')
    """
    parts = _split(url, bare_as_http=False)
    if parts is None:
        return None
    scheme, host, port, rest = parts
    host = normalize_host(host)
    return (host, _key(scheme, host, port, rest)) if host else None


def _host_of_key(key: str) -> str:
    """The host of a match key (the key without port and path)."""
    end = len(key)
    for sep in (":", "/") if not key.startswith("[") else ("]",):
        i = key.find(sep)
        if i >= 0:
            end = min(end, i + (1 if sep == "]" else 0))
    return key[:end]


def load_url_list(name: str, kind: str, entries: Sequence[str]) -> UrlList:
    """A UrlList, or ConfigError naming the list when an entry has no host."""
    if kind not in ("domain", "url", "prefix"):
        raise ConfigError(f"list {name!r}: kind {kind!r} is not a URL kind")
    url_list = UrlList(name, kind, entries)
    if url_list.bad:
        raise ConfigError(f"list {name!r}: {len(url_list.bad)} entries have no host, e.g. {url_list.bad[0]!r}")
    return url_list
