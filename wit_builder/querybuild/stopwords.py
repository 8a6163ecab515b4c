"""A small English function-word list, used to drop bigrams that begin or end with one
("of the", "has been", "Adventures of"): such pairs are not names of things.

The list is ours (articles, pronouns, auxiliaries, prepositions, conjunctions, determiners);
compare case-folded.

Example:
    >>> edge_stopword("teddy bear"), edge_stopword("THERE IS"), edge_stopword("Keep Calm")
    (False, True, False)
"""

from __future__ import annotations

STOPWORDS = frozenset(
    """
a an the this that these those there here some any each every no not nor all both either neither
i me my mine we us our ours you your yours he him his she her hers it its it's they them their theirs
who whom whose which what when where why how whatever whoever
am is are was were be been being do does did done doing have has had having
can could may might must shall should will would
of in on at by for with without from to into onto upon about above below over under after before
between among through during against along around across behind beyond near off out up down than
as like since until till via per
and or but so yet if then else because while although though whether
also just only very too more most much many such own same other another
s t
""".split()
)


def edge_stopword(bigram: str) -> bool:
    """True when the first or the last word of `bigram` is a function word."""
    words = bigram.casefold().split(" ")
    return words[0] in STOPWORDS or words[-1] in STOPWORDS
