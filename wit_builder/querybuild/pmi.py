"""Bigram pointwise mutual information, NLTK-style, and bigram selection by count and PMI.

``pmi(a b) = log2(c(a b) * N) - log2(c(a) * c(b))`` with N the total number of word tokens
(NLTK's ``BigramAssocMeasures.pmi`` with ``n_xx = N``).

The threshold depends on corpus size: PMI can never exceed ``log2(N)`` (reached when both
words occur only together, once), so MetaCLIP's PMI >= 30 needs N >= 2^30 (~1.07 G tokens,
i.e. a full English dump with ~3-4 G tokens) and even there only admits pairs whose words
almost never occur apart: ``c(a)c(b)/c(ab) <= N/2^30``. On the 6 MB sample (N ~ 0.9 M,
log2 N ~ 19.8) PMI >= 30 admits nothing; the stats print how many bigrams pass at each
threshold so the effect is visible.

Example:
    >>> round(pmi(2, 2, 2, 8), 6)   # two words always together in 8 tokens: log2(8/2)
    2.0
    >>> uni = {"new": 3, "york": 2, "a": 5}
    >>> kept, dropped, _ = select_bigrams([("new york", 2), ("a new", 1)], uni, n_tokens=20, min_count=2, min_pmi=1.0)
    >>> [(b, c, round(s, 4)) for b, c, s in kept], dropped
    ([('new york', 2, 2.737)], {'below_min_count': 1, 'below_pmi': 0})
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

PMI_REPORT_THRESHOLDS = (0, 5, 10, 15, 20, 25, 30)


def pmi(c_ab: int, c_a: int, c_b: int, n_tokens: int) -> float:
    """NLTK-style PMI (log base 2) of a bigram with count c_ab, word counts c_a, c_b, N tokens."""
    return math.log2(c_ab * n_tokens) - math.log2(c_a * c_b)


def select_bigrams(
    bigram_counts: Iterable[tuple[str, int]],
    unigram_counts: Mapping[str, int],
    n_tokens: int,
    min_count: int,
    min_pmi: float,
) -> tuple[list[tuple[str, int, float]], dict[str, int], dict[str, int]]:
    """Keep bigrams ("a b") with count >= min_count and PMI >= min_pmi.

    `unigram_counts` needs every word with count >= min_count (a word of a kept bigram occurs
    at least as often as the bigram). Returns (kept [(bigram, count, pmi)], dropped by reason
    {"below_min_count", "below_pmi"}, passing-count per PMI threshold in PMI_REPORT_THRESHOLDS
    among bigrams with count >= min_count).
    """
    kept: list[tuple[str, int, float]] = []
    dropped = {"below_min_count": 0, "below_pmi": 0}
    at_threshold = {str(t): 0 for t in PMI_REPORT_THRESHOLDS}
    for key, c_ab in bigram_counts:
        if c_ab < min_count:
            dropped["below_min_count"] += 1
            continue
        a, _, b = key.partition(" ")
        score = pmi(c_ab, unigram_counts[a], unigram_counts[b], n_tokens)
        for t in PMI_REPORT_THRESHOLDS:
            if score >= t:
                at_threshold[str(t)] += 1
        if score >= min_pmi:
            kept.append((key, c_ab, score))
        else:
            dropped["below_pmi"] += 1
    return kept, dropped, at_threshold
