"""Exact counting of many string keys with bounded memory: spill sorted runs, merge at the end.

Choice (documented for the issue): *spill*, not prune. A `SpillCounter` counts in a dict; when
the dict holds more than `max_keys` distinct keys it is written to a temporary file as sorted
``key<TAB>count`` lines and emptied. `items()` then k-way merges the sorted files (heapq.merge)
and sums equal keys, yielding every key once, in sorted order, with its exact total. Pruning
(dropping rare keys, as in Misra–Gries or "prune below k every so often") would make counts
near the thresholds approximate; spilling keeps them exact at the price of temporary disk
(about 15-20 bytes per spilled key-count on a real dump). Memory is about
``max_keys x ~150 bytes`` per counter (4M keys -> ~0.6 GB).

Keys must not contain a tab or a newline (tokens and titles never do).

Example:
    >>> c = SpillCounter(max_keys=2)
    >>> c.update(["b", "a", "b"]); c.update(["c", "a"]); c.update(["b"])
    >>> list(c.items()), c.spills
    ([('a', 2), ('b', 3), ('c', 1)], 2)
    >>> c.close()
"""

from __future__ import annotations

import heapq
import itertools
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator


def _read_run(path: str) -> Iterator[tuple[str, int]]:
    with open(path, encoding="utf-8", newline="\n") as f:
        for line in f:
            key, _, n = line.rstrip("\n").rpartition("\t")
            yield key, int(n)


class SpillCounter:
    """Counter of string keys that spills sorted runs to disk past `max_keys` distinct keys."""

    def __init__(self, max_keys: int = 4_000_000, tmp_dir: str | None = None, name: str = "counts"):
        self.max_keys = max_keys
        self.name = name
        self.counts: Counter[str] = Counter()
        self._tmp_parent = tmp_dir or None
        self._dir: str | None = None
        self._runs: list[str] = []
        self._adopted_dirs: list[str] = []

    @property
    def spills(self) -> int:
        return len(self._runs)

    def update(self, keys: Iterable[str]) -> None:
        """Add 1 for every key in `keys`."""
        self.counts.update(keys)
        if len(self.counts) > self.max_keys:
            self.spill()

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] += n
        if len(self.counts) > self.max_keys:
            self.spill()

    def spill(self) -> None:
        """Write the in-memory counts as one sorted run file and empty the dict."""
        if not self.counts:
            return
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix=f"wit-{self.name}-", dir=self._tmp_parent)
        path = os.path.join(self._dir, f"run-{len(self._runs):05d}.tsv")
        with open(path, "w", encoding="utf-8", newline="\n", buffering=1 << 20) as f:
            f.writelines(f"{k}\t{v}\n" for k, v in sorted(self.counts.items()))
        self._runs.append(path)
        self.counts = Counter()

    def items(self) -> Iterator[tuple[str, int]]:
        """Every key once, sorted by key (code point order), with its exact total count."""
        if not self._runs:  # nothing spilled: sort in memory
            yield from sorted(self.counts.items())
            return
        self.spill()
        merged = heapq.merge(*(_read_run(p) for p in self._runs), key=lambda kv: kv[0])
        for key, group in itertools.groupby(merged, key=lambda kv: kv[0]):
            yield key, sum(n for _, n in group)

    def detach(self) -> tuple[str | None, list[str]]:
        """Spill, then hand over (spill dir, run files) to another counter's `adopt`; this one
        forgets them (so its `close` does not delete them)."""
        self.spill()
        out = (self._dir, self._runs)
        self._dir, self._runs = None, []
        return out

    def adopt(self, spill_dir: str | None, runs: list[str]) -> None:
        """Take over sorted run files written by another counter (e.g. in a worker process):
        `items()` merges them with this counter's own; `close` removes them."""
        self._runs.extend(runs)
        if spill_dir:
            self._adopted_dirs.append(spill_dir)

    def close(self) -> None:
        """Remove the spill files."""
        for d in [self._dir, *self._adopted_dirs]:
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)
        self._dir, self._adopted_dirs = None, []
        self._runs = []
        self.counts = Counter()

    def __enter__(self) -> SpillCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
