"""Count unigrams and bigrams of a text collection (a wiki dump or a caption corpus), then
select unigrams by count and bigrams by count + PMI (optionally without bigrams that start
or end with a function word, `stopwords.edge_stopword`; those drops are counted as ``stopword``).

Only articles count from a dump: namespace 0, not redirects. Page text goes through
`markup.strip_markup` and `tokenize.word_runs`; N (for PMI) is the total number of words.

Example:
    >>> c = NgramCounts()
    >>> c.add_text("New York is big. New York is old.")
    >>> uni, uni_drop, uni_seen, bi, bi_drop, bi_seen, table = select_ngrams(c, 2, 2, 1.0)
    >>> uni, [b for b, _, _ in bi], c.tokens
    ([('New', 2), ('York', 2), ('is', 2)], ['New York'], 8)
    >>> bi_drop
    {'below_min_count': 2, 'below_pmi': 0, 'numeric': 0, 'stopword': 1}
    >>> c.close()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from wit_builder.querybuild.counts import SpillCounter
from wit_builder.querybuild.pmi import select_bigrams
from wit_builder.querybuild.stopwords import edge_stopword
from wit_builder.querybuild.tokenize import bigrams, word_runs
from wit_builder.querybuild.wikidump import Page


def has_letter(text: str) -> bool:
    """False for numbers and symbol-only strings ("1990", "3-2").

    >>> has_letter("1990"), has_letter("B-52")
    (False, True)
    """
    return any(ch.isalpha() for ch in text)


class NgramCounts:
    """Exact unigram and bigram counts (two SpillCounters) plus the token and document totals."""

    def __init__(self, spill_keys: int = 4_000_000, tmp_dir: str | None = None):
        self.unigrams = SpillCounter(spill_keys, tmp_dir, "unigrams")
        self.bigrams = SpillCounter(spill_keys, tmp_dir, "bigrams")
        self.tokens = 0
        self.documents = 0

    def add_text(self, text: str) -> None:
        words: list[str] = []
        pairs: list[str] = []
        for run in word_runs(text):
            words.extend(run)
            pairs.extend(bigrams(run))
        self.unigrams.update(words)
        self.bigrams.update(pairs)
        self.tokens += len(words)
        self.documents += 1

    def close(self) -> None:
        self.unigrams.close()
        self.bigrams.close()


def count_pages(
    pages: Iterable[Page], add_wikitext: Callable[[str], None], titles: SpillCounter | None, stats: dict[str, int]
) -> None:
    """Pass the wikitext of every article of `pages` to `add_wikitext` and its title to `titles`."""
    for page in pages:
        stats["pages"] += 1
        if page.ns != 0:
            stats["other_namespaces"] += 1
        elif page.redirect:
            stats["redirects"] += 1
        else:
            stats["articles"] += 1
            add_wikitext(page.text)
            if titles is not None:
                titles.add(page.title)


def select_ngrams(
    counts: NgramCounts,
    min_unigram_count: int,
    min_bigram_count: int,
    min_pmi: float,
    skip_numeric: bool = True,
    skip_stopword_bigrams: bool = True,
) -> tuple[
    list[tuple[str, int]], dict[str, int], int, list[tuple[str, int, float]], dict[str, int], int, dict[str, int]
]:
    """Unigrams with count >= min_unigram_count (most frequent first) and bigrams passing
    `pmi.select_bigrams` (most frequent first). Returns (unigrams, their drops, distinct
    unigrams seen, bigrams, their drops, distinct bigrams seen, bigrams passing per PMI threshold).
    """
    unigrams: list[tuple[str, int]] = []
    uni_dropped = {"below_threshold": 0, "numeric": 0}
    lookup: dict[str, int] = {}
    uni_seen = 0
    for word, n in counts.unigrams.items():
        uni_seen += 1
        if n >= min_bigram_count:
            lookup[word] = n
        if n < min_unigram_count:
            uni_dropped["below_threshold"] += 1
        elif skip_numeric and not has_letter(word):
            uni_dropped["numeric"] += 1
        else:
            unigrams.append((word, n))
    unigrams.sort(key=lambda wn: (-wn[1], wn[0]))

    bi_seen = 0
    numeric = stopword = 0

    def counted() -> Iterable[tuple[str, int]]:
        nonlocal bi_seen, numeric, stopword
        for key, n in counts.bigrams.items():
            bi_seen += 1
            if n >= min_bigram_count:
                if skip_numeric and not all(has_letter(w) for w in key.split(" ")):
                    numeric += 1
                    continue
                if skip_stopword_bigrams and edge_stopword(key):
                    stopword += 1
                    continue
            yield key, n

    kept, bi_dropped, table = select_bigrams(counted(), lookup, counts.tokens, min_bigram_count, min_pmi)
    bi_dropped["numeric"] = numeric
    bi_dropped["stopword"] = stopword
    kept.sort(key=lambda k: (-k[1], -k[2], k[0]))
    return unigrams, uni_dropped, uni_seen, kept, bi_dropped, bi_seen, table
