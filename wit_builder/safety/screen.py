"""The two screens the stages apply: `UrlScreen` (candidates: blocklists and opt-out lists of
domains, URLs and URL prefixes, before anything is fetched) and `ImageScreen` (filter: sha256
and phash blocklists, then the evaluation-set index).

Drop reasons: `safety:blocklist:<list name>`, `safety:optout:<list name>`,
`safety:eval_duplicate`. The first list that matches, in config order (blocklists before
opt-outs), names the reason.

Example:
    >>> import pyarrow as pa, tempfile, os
    >>> from wit_builder.safety.lists import ListSpec
    >>> p = os.path.join(tempfile.mkdtemp(), "hosts.txt"); _ = open(p, "w").write("bad.example\\n")
    >>> screen = url_screen((ListSpec("hosts", "domain", p),), ())
    >>> kept, counts = screen.apply(pa.table({"url": ["http://img.bad.example/a.jpg", "http://ok.example/b.jpg"]}))
    >>> kept["url"].to_pylist(), counts
    (['http://ok.example/b.jpg'], {'safety:blocklist:hosts': 1})
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from wit_builder.config import ConfigError
from wit_builder.safety.hashes import HashIndex, parse_phash, parse_sha256
from wit_builder.safety.lists import ListSpec, file_sha256, read_entries
from wit_builder.safety.urls import UrlList, UrlParts, load_url_list, one_url

EVAL_REASON = "safety:eval_duplicate"


def reason_for(role: str, name: str) -> str:
    """`safety:blocklist:<name>` or `safety:optout:<name>`."""
    return f"safety:{role}:{name}"


class UrlScreen:
    """Drops rows whose `url` (or `page_url`, where a row has one) a list matches."""

    def __init__(self, lists: Sequence[tuple[str, UrlList]]):
        self.lists = list(lists)

    @property
    def reasons(self) -> list[str]:
        return [reason for reason, _ in self.lists]

    def apply(self, table: Any) -> tuple[Any, dict[str, int]]:
        """(the rows no list matches, {reason: rows dropped}) for a pyarrow table with `url`."""
        import pyarrow as pa

        keys = any(lst.kind != "domain" for _, lst in self.lists)  # domain lists need hosts only
        columns = [UrlParts.of(table.column("url"), keys)]
        if "page_url" in table.column_names and table.column("page_url").null_count < table.num_rows:
            columns.append(UrlParts.of(table.column("page_url").cast(pa.string()), keys))
        gone = np.zeros(table.num_rows, dtype=bool)
        counts: dict[str, int] = {}
        for reason, lst in self.lists:
            hit = np.zeros(table.num_rows, dtype=bool)
            for parts in columns:
                hit |= lst.mask(parts)
            hit &= ~gone
            counts[reason] = int(hit.sum())
            gone |= hit
        return (table.filter(pa.array(~gone)) if gone.any() else table), counts

    def check(self, url: str) -> str | None:
        """The drop reason of one URL (None: no list matches it); the download stage's fetcher
        asks this for every redirect hop, so a listed host is never contacted through one.

        >>> UrlScreen([("safety:blocklist:x", load_url_list("x", "domain", ["bad.example"]))]).check(
        ...     "https://cdn.bad.example/a.jpg")
        'safety:blocklist:x'
        """
        parts = one_url(url)
        if parts is None:
            return None
        return next((reason for reason, lst in self.lists if lst.matches(*parts)), None)


def url_screen(blocklists: Sequence[ListSpec], optouts: Sequence[ListSpec]) -> UrlScreen | None:
    """The candidates stage's screen (None when no list is configured); loaded once per worker
    process and reloaded when a list file's content changes (sha256)."""
    if not blocklists and not optouts:
        return None
    specs = tuple(blocklists), tuple(optouts)
    return _url_screen(*specs, tuple(file_sha256(s.path) for s in specs[0] + specs[1]))


@functools.lru_cache(maxsize=2)
def _url_screen(blocklists: tuple, optouts: tuple, _digests: tuple) -> UrlScreen:
    lists = []
    for role, specs in (("blocklist", blocklists), ("optout", optouts)):
        for spec in specs:
            lists.append((reason_for(role, spec.name), load_url_list(spec.name, spec.kind, read_entries(spec))))
    return UrlScreen(lists)


class ImageScreen:
    """sha256 and phash blocklists plus an optional eval index, for one image at a time."""

    def __init__(
        self,
        sha256_lists: Sequence[tuple[str, frozenset[str]]],
        phash_lists: Sequence[tuple[str, HashIndex]],
        eval_index: tuple[HashIndex, list[str]] | None = None,
    ):
        self.sha256_lists = list(sha256_lists)
        self.phash_lists = list(phash_lists)
        self.eval_index = eval_index

    @property
    def needs_phash(self) -> bool:
        return bool(self.phash_lists) or self.eval_index is not None

    def check(
        self, sha256: str | None, phash: int | None, original_sha256: str | None = None
    ) -> tuple[str | None, str | None]:
        """(drop reason or None, the matched eval image or None) for one image; a sha256 list
        matches the stored bytes' digest or the fetched (original) bytes' one."""
        digests_of_image = {d for d in (sha256, original_sha256) if d}
        for reason, digests in self.sha256_lists:
            if not digests_of_image.isdisjoint(digests):
                return reason, None
        if phash is None:
            return None, None
        for reason, index in self.phash_lists:
            if index.nearest(phash) is not None:
                return reason, None
        if self.eval_index is not None:
            index, names = self.eval_index
            hit = index.nearest(phash)
            if hit is not None:
                return EVAL_REASON, names[hit[0]]
        return None, None


def load_image_lists(specs: Sequence[ListSpec]) -> tuple[list, list]:
    """(sha256 lists, phash lists) for ImageScreen; ConfigError naming the list and the first
    bad entry."""
    sha_lists, phash_lists = [], []
    for spec in specs:
        entries = read_entries(spec)
        parse = parse_sha256 if spec.kind == "sha256" else parse_phash
        values = [parse(e.split()[0]) for e in entries]  # a line's first field (`phash  path` lines too)
        bad = [e for e, v in zip(entries, values) if v is None]
        if bad:
            want = "64 hex digits" if spec.kind == "sha256" else "16 hex digits or a decimal 64-bit integer"
            raise ConfigError(f"list {spec.name!r} ({spec.path}): {len(bad)} entries are not {want}, e.g. {bad[0]!r}")
        reason = reason_for("blocklist", spec.name)
        if spec.kind == "sha256":
            sha_lists.append((reason, frozenset(values)))
        else:
            phash_lists.append((reason, HashIndex(np.array(values, dtype=np.uint64), spec.max_distance)))
    return sha_lists, phash_lists
