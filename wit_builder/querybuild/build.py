"""Combine query sources in build order: first source wins, then trim to max_queries.

Build order (= priority when trimming; MetaCLIP's order for its four sources, the extra
sources after them, the user's explicit lists first):

    list, default, wordnet, wiki_unigram, wiki_bigram, title, wordfreq, caption_bigram

Within a source the order is the source's own: file order for lists and WordNet, most
frequent first for unigrams, bigrams, titles (by views) and wordfreq. The combined list is
that concatenation with duplicates removed (an entry whose dedup key was already taken by an
earlier source is dropped as ``duplicate``); when it is longer than `max_queries`, the tail is
dropped as ``over_max_queries`` -- i.e. the last sources, and their least frequent entries,
go first. query_id is the position in the final list.

Dedup key: ``exact`` (raw string, case-sensitive, as MetaCLIP) or ``casefold`` (NFKC +
case-fold + collapsed whitespace, the `word` matching mode's normalisation, so no two queries
of the list match the same captions in that mode).

Example:
    >>> a = SourceOutput("wordnet", [("dog", None, None), ("cat", None, None)], seen=2)
    >>> b = SourceOutput("wiki_unigram", [("Dog", 9, None), ("dog", 8, None), ("the", 7, None)], seen=5,
    ...                  dropped={"below_threshold": 2})
    >>> r = combine([a, b], dedup="exact", max_queries=3)
    >>> [(t, s) for t, s, _, _ in r.rows]
    [('dog', 'wordnet'), ('cat', 'wordnet'), ('Dog', 'wiki_unigram')]
    >>> r.dropped
    {'below_threshold': 2, 'duplicate': 1, 'over_max_queries': 1}
    >>> [t for t, *_ in combine([a, b], dedup="casefold", max_queries=10).rows]
    ['dog', 'cat', 'the']
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

MAX_QUERY_CHARS = 256


@dataclass
class SourceOutput:
    """What one source produced: entries (text, count, score) that passed its own thresholds,
    how many candidate entries it saw, and how many it dropped by reason."""

    name: str
    entries: list[tuple[str, int | None, float | None]]
    seen: int
    dropped: dict[str, int] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if len(self.entries) + sum(self.dropped.values()) != self.seen:
            raise AssertionError(f"source {self.name}: {len(self.entries)} kept + {self.dropped} != {self.seen} seen")


@dataclass
class Combined:
    rows: list[tuple[str, str, int | None, float | None]]  # (text, source, count, score) in query_id order
    seen: int
    dropped: dict[str, int]
    per_source: dict[str, dict[str, int]]
    overlaps: dict[str, dict[str, int]]  # later source -> earlier source that already had it -> n


def dedup_key(text: str, dedup: Literal["exact", "casefold"]) -> str:
    if dedup == "exact":
        return text
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def is_valid(text: str) -> bool:
    """A usable query: non-empty, no surrounding whitespace, no control characters, not huge."""
    return (
        bool(text)
        and text == text.strip()
        and len(text) <= MAX_QUERY_CHARS
        and not any(unicodedata.category(ch) == "Cc" for ch in text)
    )


def combine(outputs: list[SourceOutput], dedup: Literal["exact", "casefold"], max_queries: int) -> Combined:
    """Concatenate `outputs` (already in build order), drop invalid and duplicate entries,
    keep the first `max_queries`."""
    first_source: dict[str, str] = {}
    rows: list[tuple[str, str, int | None, float | None]] = []
    dropped: Counter[str] = Counter()
    per_source: dict[str, dict[str, int]] = {}
    overlaps: dict[str, dict[str, int]] = {}
    seen = 0
    for out in outputs:
        out.check()
        seen += out.seen
        dropped.update(out.dropped)
        ps = {
            "seen": out.seen,
            "passed": len(out.entries),
            "invalid": 0,
            "duplicate": 0,
            "over_max_queries": 0,
            "kept": 0,
        }
        ov: Counter[str] = Counter()
        for text, count, score in out.entries:
            if not is_valid(text):
                ps["invalid"] += 1
                continue
            key = dedup_key(text, dedup)
            owner = first_source.get(key)
            if owner is not None:
                ps["duplicate"] += 1
                ov[owner] += 1
                continue
            first_source[key] = out.name
            if len(rows) >= max_queries:
                ps["over_max_queries"] += 1
                continue
            rows.append((text, out.name, count, score))
            ps["kept"] += 1
        for reason in ("invalid", "duplicate", "over_max_queries"):
            dropped[reason] += ps[reason]
        per_source[out.name] = ps
        overlaps[out.name] = dict(ov)
    return Combined(rows, seen, {k: v for k, v in sorted(dropped.items()) if v}, per_source, overlaps)
