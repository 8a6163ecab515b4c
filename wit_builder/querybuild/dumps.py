"""Stream Wikipedia dumps into n-gram counts, in this process or in worker processes.

Example:
    >>> from wit_builder.querybuild.ngrams import NgramCounts
    >>> count_dumps([], NgramCounts(), None, show_progress=False)["pages"]
    0
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from wit_builder import progress
from wit_builder.querybuild.counts import SpillCounter
from wit_builder.querybuild.markup import strip_markup
from wit_builder.querybuild.ngrams import NgramCounts, count_pages
from wit_builder.querybuild.wikidump import iter_pages
from wit_builder.querybuild.workers import ParallelCounter


def count_dumps(
    paths: Iterable[str],
    counts: NgramCounts,
    titles: SpillCounter | None = None,
    show_progress: bool = True,
    workers: int = 1,
) -> dict[str, int]:
    """Stream every dump in `paths` into `counts` (article text) and `titles` (article titles).

    With `workers` > 1, markup stripping and counting run in that many processes
    (`workers.ParallelCounter`); the counts are the same. Shows a progress bar in MB of
    (compressed) dump read. Returns page statistics.
    """
    paths = list(paths)
    total_mb = sum(os.path.getsize(p) for p in paths) / 1e6
    stats = {"pages": 0, "articles": 0, "redirects": 0, "other_namespaces": 0, "dump_bytes": 0}
    pool = None
    if workers > 1:
        pool = ParallelCounter(counts, workers)
        add = pool.add_wikitext
    else:

        def add(text: str) -> None:
            counts.add_text(strip_markup(text))

    try:
        with progress.bar(total=round(total_mb, 1), desc="queries: wiki dump", unit="MB", enabled=show_progress) as b:

            def on_read(n: int) -> None:
                stats["dump_bytes"] += n
                b.update(n / 1e6)

            for path in paths:
                count_pages(iter_pages(path, on_read=on_read), add, titles, stats)
        if pool is not None:
            pool.finish()
    finally:
        if pool is not None:
            pool.terminate()
    return stats
