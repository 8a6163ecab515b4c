"""Split plain text into word runs: words are counted as unigrams, neighbours in a run as bigrams.

A *word* is a run of letters/digits, optionally joined by inner hyphens or apostrophes
(``well-known``, ``don't``, ``O'Brien``); case is kept. A *run* is a sequence of words
separated only by spaces or tabs: punctuation and line breaks end it, so a bigram never
spans a comma, a full stop or a paragraph break (``"Paris. The"`` gives no bigram).
N for PMI is the total number of words.

Example:
    >>> word_runs("New York is big. Well-known, don't  you think?\\nNext line")
    [['New', 'York', 'is', 'big'], ['Well-known'], ["don't", 'you', 'think'], ['Next', 'line']]
    >>> list(bigrams(['New', 'York', 'is']))
    ['New York', 'York is']
"""

from __future__ import annotations

import re
from collections.abc import Iterator

_W = r"[^\W_]+(?:[-'\u2019][^\W_]+)*"
_RUN = re.compile(rf"{_W}(?:[ \t]+{_W})*")


def word_runs(text: str) -> list[list[str]]:
    """The runs of words in `text` (see the module docstring)."""
    return [m.split() for m in _RUN.findall(text)]


def bigrams(run: list[str]) -> Iterator[str]:
    """Adjacent word pairs of one run, joined by a single space."""
    return map(" ".join, zip(run, run[1:]))
