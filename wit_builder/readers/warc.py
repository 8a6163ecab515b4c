"""Common Crawl WARC (HTML responses -> <img src alt>) and WAT (JSON links IMG@/src + alt).

Parsing uses FastWARC (records) and Resiliparse's Lexbor-based HTML parser, both from the
`resiliparse` project. Every <img> element becomes one raw row (url = src resolved against the
page URL, or the page's <base href>; caption = alt, stripped of surrounding whitespace), so the
candidates stage can count the bad ones by reason (no src, no alt, `data:`/non-http scheme).
wget writes `WARC-Target-URI: <https://...>` with angle brackets: they are stripped.

Example:
    >>> resolve("https://a.org/dir/page.html", " img/x.jpg ")
    'https://a.org/dir/img/x.jpg'
    >>> page_uri("<https://a.org/>")
    'https://a.org/'
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from urllib.parse import urljoin

import fsspec
import pyarrow as pa


def page_uri(value: str | None) -> str | None:
    """The WARC-Target-URI without wget's angle brackets and surrounding whitespace."""
    if value is None:
        return None
    value = value.strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1].strip()
    return value


def resolve(base: str | None, src: str | None) -> str | None:
    """`src` (whitespace-stripped) resolved against `base`; None when src is missing/empty."""
    if src is None:
        return None
    src = src.strip()
    if not src:
        return None
    if not base or src.startswith("data:"):
        return src
    try:
        return urljoin(base, src)
    except ValueError:  # e.g. a malformed IPv6 host
        return src


def _table(urls: list, captions: list, pages: list) -> pa.Table:
    enc = lambda xs: [None if x is None else x.encode("utf-8", "surrogatepass") for x in xs]  # noqa: E731
    return pa.table(
        {
            "url": pa.array(enc(urls), pa.binary()),
            "caption": pa.array(enc(captions), pa.binary()),
            "page_url": pa.array(pages, pa.string()),
        }
    )


def _records(path: str, record_type, parse_http: bool):
    from fastwarc.warc import ArchiveIterator

    with fsspec.open(path, "rb") as f:
        yield from ArchiveIterator(f, record_types=record_type, parse_http=parse_http)


def images_in_html(
    body: bytes, page_url: str | None, charset: str | None = None
) -> list[tuple[str | None, str | None]]:
    """(resolved src, stripped alt) for every <img> of an HTML document."""
    from resiliparse.parse.encoding import detect_encoding
    from resiliparse.parse.html import HTMLTree

    tree = HTMLTree.parse_from_bytes(body, charset or detect_encoding(body))
    doc = tree.document
    if doc is None:
        return []
    base = page_url
    base_el = doc.query_selector("base[href]")
    if base_el is not None:
        base = resolve(page_url, base_el.getattr("href")) or page_url
    out = []
    for el in doc.query_selector_all("img"):
        alt = el.getattr("alt")
        out.append((resolve(base, el.getattr("src")), alt.strip() if alt is not None else None))
    return out


def _in_blocks(rows: Iterator[tuple[str | None, str | None, str | None]], block_rows: int) -> Iterator[pa.Table]:
    """Group (url, caption, page_url) rows into tables of about `block_rows` rows."""
    urls, captions, pages = [], [], []
    for url, caption, page in rows:
        urls.append(url)
        captions.append(caption)
        pages.append(page)
        if len(urls) >= block_rows:
            yield _table(urls, captions, pages)
            urls, captions, pages = [], [], []
    if urls:
        yield _table(urls, captions, pages)


def read_warc_blocks(path: str, block_rows: int) -> Iterator[pa.Table]:
    """Rows (url, caption, page_url) for every <img> in the HTML responses of a WARC."""
    return _in_blocks(_warc_rows(path), block_rows)


def _warc_rows(path: str) -> Iterator[tuple[str | None, str | None, str | None]]:
    from fastwarc.warc import WarcRecordType

    for record in _records(path, WarcRecordType.response, parse_http=True):
        http = record.http_headers
        if http is None or http.status_code != 200:
            continue
        ctype = (record.http_content_type or "").lower()
        if ctype and "html" not in ctype:
            continue
        page = page_uri(record.headers.get("WARC-Target-URI"))
        body = record.reader.read()
        for src, alt in images_in_html(body, page, record.http_charset):
            yield src, alt, page


def read_wat_blocks(path: str, block_rows: int, counts: dict[str, int]) -> Iterator[pa.Table]:
    """Rows for every `IMG@/src` link of the WAT metadata records (alt may be absent)."""
    return _in_blocks(_wat_rows(path, counts), block_rows)


def _wat_rows(path: str, counts: dict[str, int]) -> Iterator[tuple[str | None, str | None, str | None]]:
    from fastwarc.warc import WarcRecordType

    for record in _records(path, WarcRecordType.metadata, parse_http=False):
        try:
            meta = json.loads(record.reader.read())
            envelope = meta["Envelope"]
        except (ValueError, KeyError, TypeError):
            counts["bad_record"] = counts.get("bad_record", 0) + 1
            continue
        page = page_uri(envelope.get("WARC-Header-Metadata", {}).get("WARC-Target-URI"))
        html = envelope.get("Payload-Metadata", {}).get("HTTP-Response-Metadata", {}).get("HTML-Metadata", {})
        base = resolve(page, (html.get("Head") or {}).get("Base")) or page
        for link in html.get("Links") or []:
            if not isinstance(link, dict) or link.get("path") != "IMG@/src":
                continue
            alt = link.get("alt")
            yield resolve(base, link.get("url")), alt.strip() if isinstance(alt, str) else None, page
