"""Wikipedia page views from the public hourly files, summed, and titles above a threshold.

Line format (both the current ``pageviews-YYYYMMDD-HH0000.gz`` and the older ``pagecounts-*``):
``<project> <title> <views> <bytes>``, e.g. ``en Albert_Einstein 1234 0``; ``en`` is desktop
English Wikipedia and ``en.m`` mobile. Files may be gzip, bzip2 or plain. Only lines of the
chosen projects count; titles get ``_`` -> space and are URL-decoded when they contain ``%``
(pagecounts). Lines that do not parse are counted, not fatal. Which files (days/hours) to sum
is the user's sampling window and is recorded in the stats.

Views are summed in a `SpillCounter`, so many files of tens of millions of titles stay within
bounded memory; `select_titles` merge-joins the sorted view totals with the sorted article
titles of the dump (when a dump is given), or drops non-article namespaces otherwise.

Example:
    >>> import io
    >>> from wit_builder.querybuild.counts import SpillCounter
    >>> views = SpillCounter()
    >>> lines = io.BytesIO(b"en Cat 50 0\\nen.m Cat 30 0\\nde Katze 99 0\\nen Talk:Cat 500 0\\nbad line\\n")
    >>> add_views(lines, views, projects=("en", "en.m"))
    {'lines': 5, 'used': 3, 'other_project': 1, 'malformed': 1}
    >>> select_titles(views.items(), min_views=70)
    ([('Cat', 80)], {'below_views': 0, 'not_article': 1}, 2)
"""

from __future__ import annotations

import bz2
import gzip
from collections.abc import Iterable, Iterator
from typing import BinaryIO
from urllib.parse import unquote

from wit_builder.querybuild.counts import SpillCounter

# titles with these prefixes are not articles (MediaWiki namespaces, English names)
NON_ARTICLE_PREFIXES = (
    "Talk",
    "User",
    "User talk",
    "Wikipedia",
    "Wikipedia talk",
    "WP",
    "File",
    "File talk",
    "Image",
    "MediaWiki",
    "MediaWiki talk",
    "Template",
    "Template talk",
    "Help",
    "Help talk",
    "Category",
    "Category talk",
    "Portal",
    "Portal talk",
    "Draft",
    "Draft talk",
    "TimedText",
    "Module",
    "Module talk",
    "Special",
    "Media",
    "Book",
    "Education Program",
    "Gadget",
    "Topic",
)
_NON_ARTICLE = {p.lower() for p in NON_ARTICLE_PREFIXES}
NOT_TITLES = {"-", "Main Page", ""}


def open_maybe_compressed(path: str) -> BinaryIO:
    """Open `path` for binary reading, decompressing gzip/bzip2 by their magic bytes."""
    with open(path, "rb") as f:
        magic = f.read(3)
    if magic[:2] == b"\x1f\x8b":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if magic == b"BZh":
        return bz2.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def normalize_title(raw: str) -> str:
    """Pageview title -> article title: URL-decoded if needed, underscores as spaces.

    >>> normalize_title("Caf%C3%A9_de_Flore")
    'Café de Flore'
    """
    if "%" in raw:
        raw = unquote(raw, errors="strict") if _valid_escape(raw) else raw
    return raw.replace("_", " ").strip()


def _valid_escape(raw: str) -> bool:
    try:
        unquote(raw, errors="strict")
        return True
    except UnicodeDecodeError:
        return False


def add_views(lines: Iterable[bytes], views: SpillCounter, projects: Iterable[str]) -> dict[str, int]:
    """Add the views of every line of the chosen `projects` to `views`; returns line counts."""
    wanted = {p.encode() for p in projects}
    stats = {"lines": 0, "used": 0, "other_project": 0, "malformed": 0}
    for line in lines:
        stats["lines"] += 1
        parts = line.split(b" ")
        if len(parts) < 3 or not parts[2].strip().isdigit():
            stats["malformed"] += 1
            continue
        if parts[0] not in wanted:
            stats["other_project"] += 1
            continue
        try:
            title = normalize_title(parts[1].decode("utf-8"))
        except UnicodeDecodeError:
            stats["malformed"] += 1
            continue
        if "\t" in title or "\n" in title:
            stats["malformed"] += 1
            continue
        views.add(title, int(parts[2]))
        stats["used"] += 1
    return stats


def is_article_title(title: str) -> bool:
    """False for the main page, '-' and titles in a non-article namespace ("Talk:Cat")."""
    if title in NOT_TITLES:
        return False
    prefix, sep, _ = title.partition(":")
    return not (sep and prefix.lower() in _NON_ARTICLE)


def select_titles(
    views: Iterator[tuple[str, int]],
    min_views: int,
    article_titles: Iterator[tuple[str, int]] | None = None,
) -> tuple[list[tuple[str, int]], dict[str, int], int]:
    """Titles with summed views >= min_views. Both iterators must be sorted by title.

    With `article_titles` (the dump's article titles, sorted) only titles in the dump are
    kept (merge join); otherwise non-article titles are dropped by namespace. Returns
    (kept [(title, views)] sorted by views desc then title, dropped by reason, titles seen).
    """
    kept: list[tuple[str, int]] = []
    dropped = {"below_views": 0, "not_article": 0}
    seen = 0
    articles = iter(article_titles) if article_titles is not None else None
    current = next(articles, None) if articles is not None else None
    for title, n in views:
        seen += 1
        if articles is not None:
            while current is not None and current[0] < title:
                current = next(articles, None)
            in_dump = current is not None and current[0] == title
        else:
            in_dump = is_article_title(title)
        if not in_dump:
            dropped["not_article"] += 1
        elif n < min_views:
            dropped["below_views"] += 1
        else:
            kept.append((title, n))
    kept.sort(key=lambda tv: (-tv[1], tv[0]))
    return kept, dropped, seen
