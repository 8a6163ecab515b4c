"""Unigram/bigram counts on the Wikipedia sample equal an independent count; spilling is exact."""

from __future__ import annotations

import bz2
import html
import os
import random
import re
from collections import Counter

import pytest

from wit_builder.querybuild.counts import SpillCounter
from wit_builder.querybuild.dumps import count_dumps
from wit_builder.querybuild.markup import strip_markup
from wit_builder.querybuild.ngrams import NgramCounts
from wit_builder.querybuild.tokenize import word_runs

pytestmark = pytest.mark.timeout(120)  # generous: the stage runs on a shared 2-core machine

SAMPLE = os.path.join(os.path.dirname(__file__), "data", "queries", "enwiki_sample.xml.bz2")


def _independent_counts(path: str) -> tuple[Counter, Counter, int, list[str]]:
    """Count with no streaming parser and no spilling: regexes over the whole decompressed XML."""
    xml = bz2.decompress(open(path, "rb").read()).decode("utf-8")
    uni: Counter = Counter()
    bi: Counter = Counter()
    titles = []
    for page in re.findall(r"<page>(.*?)</page>", xml, re.S):
        ns = int(re.search(r"<ns>(\d+)</ns>", page).group(1))
        if ns != 0 or "<redirect" in page:
            continue
        titles.append(html.unescape(re.search(r"<title>(.*?)</title>", page).group(1)))
        m = re.search(r"<text[^>]*>(.*?)</text>", page, re.S)
        text = html.unescape(m.group(1)) if m else ""
        for run in word_runs(strip_markup(text)):
            uni.update(run)
            bi.update(f"{a} {b}" for a, b in zip(run, run[1:]))
    return uni, bi, sum(uni.values()), titles


@pytest.mark.timeout(120)
def test_sample_counts_equal_an_independent_count():
    uni, bi, n_tokens, titles = _independent_counts(SAMPLE)
    counts = NgramCounts(spill_keys=20_000)  # small: forces several spill files and a k-way merge
    title_counter = SpillCounter(1000, name="titles")
    try:
        stats = count_dumps([SAMPLE], counts, title_counter, show_progress=False)
        assert counts.unigrams.spills >= 2 and counts.bigrams.spills >= 2
        assert stats["articles"] == len(titles) == 106
        assert stats["pages"] == 206 and stats["dump_bytes"] == os.path.getsize(SAMPLE)
        assert counts.tokens == n_tokens > 400_000
        assert dict(counts.unigrams.items()) == dict(uni)
        assert dict(counts.bigrams.items()) == dict(bi)
        assert [t for t, _ in title_counter.items()] == sorted(titles)
        assert dict(counts.unigrams.items())["Aristotle"] == uni["Aristotle"] > 50
    finally:
        counts.close()
        title_counter.close()


def test_spill_counter_matches_counter_and_yields_sorted_keys():
    rng = random.Random(0)
    keys = [f"k{rng.randrange(5000)}" for _ in range(40_000)]
    expected = Counter(keys)
    with SpillCounter(max_keys=1000) as c:
        for i in range(0, len(keys), 777):
            c.update(keys[i : i + 777])
        assert c.spills > 3
        got = list(c.items())
    assert got == sorted(expected.items())


def test_spill_counter_without_spill_and_cleanup(tmp_path):
    c = SpillCounter(max_keys=2, tmp_dir=str(tmp_path))
    c.update(["x", "y", "z"])
    assert c.spills == 1 and any(tmp_path.iterdir())
    assert list(c.items()) == [("x", 1), ("y", 1), ("z", 1)]
    c.close()
    assert not any(tmp_path.iterdir())
    with SpillCounter() as d:
        d.add("b", 2)
        d.add("a")
        assert list(d.items()) == [("a", 1), ("b", 2)] and d.spills == 0


def test_word_runs_break_bigrams_at_punctuation_and_lines():
    assert word_runs("New York, NY.\nSan Francisco's bay") == [["New", "York"], ["NY"], ["San", "Francisco's", "bay"]]


def test_markup_stripping_keeps_prose_only():
    text = (
        "{{Infobox|name={{nested|x}}}}'''Paris''' is the [[capital city|capital]] of [[France]].<ref name=a>cite</ref>"
        "\n== History ==\n[[File:Paris.jpg|thumb|The [[Seine]]]][[Category:Cities]][[fr:Paris]]"
        "<!-- hidden -->{| class=wikitable\n| a || b\n|}[http://example.org Official site] &ndash; end"
    )
    assert strip_markup(text).split() == [
        "Paris",
        "is",
        "the",
        "capital",
        "of",
        "France.",
        "Official",
        "site",
        "–",
        "end",
    ]


@pytest.mark.timeout(180)
def test_worker_processes_give_the_same_counts():
    serial, parallel = NgramCounts(), NgramCounts(spill_keys=60_000)
    try:
        s1 = count_dumps([SAMPLE], serial, show_progress=False)
        s2 = count_dumps([SAMPLE], parallel, show_progress=False, workers=2)
        assert s1 == s2 and parallel.tokens == serial.tokens and parallel.documents == 106
        assert parallel.bigrams.spills >= 2  # each worker handed back its own runs
        assert list(parallel.unigrams.items()) == list(serial.unigrams.items())
        assert list(parallel.bigrams.items()) == list(serial.bigrams.items())
    finally:
        serial.close()
        parallel.close()
