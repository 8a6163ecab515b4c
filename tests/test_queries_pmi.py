"""PMI on a hand-made corpus: NLTK-style log2 PMI with N = total tokens and a minimum count."""

from __future__ import annotations

import math

import pytest

from wit_builder.querybuild.ngrams import NgramCounts, select_ngrams
from wit_builder.querybuild.pmi import pmi, select_bigrams

pytestmark = pytest.mark.timeout(120)  # generous: the stage runs on a shared 2-core machine

# runs: [x y] [x y] [x z] [w z] [w z] [v u]  ->  N = 12 tokens
# c(x)=3 c(y)=2 c(z)=3 c(w)=2 c(v)=1 c(u)=1; c(x y)=2 c(x z)=1 c(w z)=2 c(v u)=1
CORPUS = "x y. x y. x z. w z. w z. v u."


def test_pmi_formula_by_hand():
    assert pmi(2, 3, 2, 12) == pytest.approx(math.log2(2 * 12 / (3 * 2)))  # = 2.0
    assert pmi(2, 3, 2, 12) == pytest.approx(2.0)
    assert pmi(1, 1, 1, 12) == pytest.approx(math.log2(12))  # the maximum: log2 N


def test_pmi_selection_on_hand_made_corpus():
    c = NgramCounts()
    c.add_text(CORPUS)
    try:
        assert c.tokens == 12
        uni, _, uni_seen, bi, bi_drop, bi_seen, table = select_ngrams(
            c, min_unigram_count=1, min_bigram_count=1, min_pmi=-100.0, skip_stopword_bigrams=False
        )
        scores = {b: s for b, _, s in bi}
        assert uni_seen == 6 and bi_seen == 4
        assert scores["x y"] == pytest.approx(2.0)  # log2(2*12 / (3*2))
        assert scores["x z"] == pytest.approx(math.log2(12 / 9))  # log2(1*12 / (3*3)) = 0.415
        assert scores["w z"] == pytest.approx(math.log2(24 / 6))  # = 2.0
        assert scores["v u"] == pytest.approx(math.log2(12))  # = 3.585
        assert table == {"0": 4, "5": 0, "10": 0, "15": 0, "20": 0, "25": 0, "30": 0}

        # min count 2 drops the two bigrams seen once (even "v u", which has the highest PMI)
        _, _, _, bi, bi_drop, _, _ = select_ngrams(c, 1, 2, 1.0, skip_stopword_bigrams=False)
        assert [b for b, _, _ in bi] == ["w z", "x y"]  # equal counts: higher PMI first, then text
        assert bi_drop["below_min_count"] == 2 and bi_drop["below_pmi"] == 0

        # a PMI threshold between the two scores
        kept, dropped, _ = select_bigrams(c.bigrams.items(), dict(c.unigrams.items()), c.tokens, 1, 3.0)
        assert [k for k, _, _ in kept] == ["v u"] and dropped == {"below_min_count": 0, "below_pmi": 3}
    finally:
        c.close()


def test_stopword_and_numeric_bigrams_are_counted_as_drops():
    c = NgramCounts()
    c.add_text("of the 1990 census. of the 1990 census. teddy bear. teddy bear.")
    try:
        _, _, _, bi, drop, seen, _ = select_ngrams(c, 1, 2, 0.0)
        assert [b for b, _, _ in bi] == ["teddy bear"]
        # numeric first ("the 1990", "1990 census"), then stopword ("of the")
        assert drop["numeric"] == 2 and drop["stopword"] == 1 and seen == 4
    finally:
        c.close()
