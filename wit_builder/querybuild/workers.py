"""Strip markup and count n-grams in worker processes, for dumps too large for one core.

The main process reads and parses the dump (bz2 + expat, ~20+ MB/s) and sends batches of
article wikitext over a bounded queue to `workers` processes (``spawn``). Each worker strips,
tokenizes and counts into its own `NgramCounts` with ``spill_keys // workers`` keys per
counter (so total memory stays about what one process would use); at the end it spills
everything and hands its sorted run files back. The main counters `adopt` them, and
`SpillCounter.items()` merges all runs: the counts are exactly those of one process.

Example (the test suite checks the equality on the Wikipedia sample):
    >>> from wit_builder.querybuild.ngrams import NgramCounts
    >>> counts = NgramCounts()
    >>> pool = ParallelCounter(counts, workers=2)  # doctest: +SKIP
    >>> pool.add_wikitext("'''New York''' is big."); pool.finish()  # doctest: +SKIP
    >>> dict(counts.bigrams.items())  # doctest: +SKIP
    {'New York': 1, 'York is': 1, 'is big': 1}
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import tempfile
import traceback

from wit_builder.querybuild.markup import strip_markup
from wit_builder.querybuild.ngrams import NgramCounts

BATCH_CHARS = 4_000_000


def _worker(tasks, results, spill_keys: int, tmp_dir: str | None) -> None:
    counts = NgramCounts(spill_keys, tmp_dir)
    try:
        while (batch := tasks.get()) is not None:
            for text in batch:
                counts.add_text(strip_markup(text))
        results.put(("ok", counts.unigrams.detach(), counts.bigrams.detach(), counts.tokens, counts.documents))
    except BaseException:  # reported to the main process, which raises
        results.put(("error", traceback.format_exc()))
        counts.close()


class ParallelCounter:
    """Feeds article wikitext to worker processes counting into `counts` (see module docstring)."""

    def __init__(self, counts: NgramCounts, workers: int, batch_chars: int = BATCH_CHARS):
        ctx = mp.get_context("spawn")
        self.counts = counts
        self.batch: list[str] = []
        self.chars = 0
        self.batch_chars = batch_chars
        self.tasks = ctx.Queue(maxsize=2 * workers)
        self.results = ctx.Queue()
        keys = max(counts.unigrams.max_keys // workers, 50_000)
        tmp = counts.unigrams._tmp_parent or tempfile.gettempdir()
        self.procs = [
            ctx.Process(target=_worker, args=(self.tasks, self.results, keys, tmp), daemon=True) for _ in range(workers)
        ]
        for p in self.procs:
            p.start()

    def _check_alive(self) -> None:
        dead = [p for p in self.procs if not p.is_alive() and p.exitcode not in (0, None)]
        if dead:
            raise RuntimeError(f"queries: a counting worker died (exit code {dead[0].exitcode})")

    def _put(self, item: list[str] | None) -> None:
        while True:
            try:
                self.tasks.put(item, timeout=5)
                return
            except queue.Full:
                self._check_alive()

    def add_wikitext(self, text: str) -> None:
        self.batch.append(text)
        self.chars += len(text)
        if self.chars >= self.batch_chars:
            self._put(self.batch)
            self.batch, self.chars = [], 0

    def finish(self) -> None:
        """Send what is left, stop the workers and adopt their counts."""
        if self.batch:
            self._put(self.batch)
            self.batch, self.chars = [], 0
        for _ in self.procs:
            self._put(None)
        for _ in self.procs:
            while True:
                try:
                    msg = self.results.get(timeout=5)
                    break
                except queue.Empty:
                    self._check_alive()
            if msg[0] == "error":
                raise RuntimeError(f"queries: a counting worker failed:\n{msg[1]}")
            _, (u_dir, u_runs), (b_dir, b_runs), tokens, documents = msg
            self.counts.unigrams.adopt(u_dir, u_runs)
            self.counts.bigrams.adopt(b_dir, b_runs)
            self.counts.tokens += tokens
            self.counts.documents += documents
        for p in self.procs:
            p.join()

    def terminate(self) -> None:
        """Stop any worker still running (after an error)."""
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join()
