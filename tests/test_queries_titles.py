"""Title selection by page views summed over hourly files (pageviews / pagecounts format)."""

from __future__ import annotations

import gzip

import pytest

from wit_builder.querybuild.counts import SpillCounter
from wit_builder.querybuild.pageviews import add_views, is_article_title, open_maybe_compressed, select_titles
from wit_builder.querybuild.sources import title_source

pytestmark = pytest.mark.timeout(60)


def _write_hours(tmp_path):
    h1 = tmp_path / "pageviews-20240101-000000.gz"
    with gzip.open(h1, "wb") as f:
        f.write(
            b"en Albert_Einstein 40 0\nen.m Albert_Einstein 20 0\nen Obscure_Page 3 0\n"
            b"de Albert_Einstein 900 0\nen Talk:Cats 500 0\nen Caf%C3%A9_de_Flore 69 0\n"
            b"en Main_Page 99999 0\nen broken\n"
        )
    h2 = tmp_path / "pageviews-20240101-010000"
    h2.write_text("en Albert_Einstein 10 0\nen Obscure_Page 60 0\nen Café_de_Flore 1 0\nen Not_In_Dump 500 0\n")
    return [str(h1), str(h2)]


def test_views_are_summed_over_files_and_thresholded(tmp_path):
    files = _write_hours(tmp_path)
    out = title_source(files, ["en", "en.m"], min_views=70, article_titles=None, spill_keys=1000, tmp_dir=None)
    got = dict((t, n) for t, n, _ in out.entries)
    # Einstein 40+20+10 = 70 (threshold inclusive); Café de Flore 69+1 = 70 (URL-decoded + merged);
    # Obscure Page 63 < 70; Talk: and Main Page are not articles; de is another project
    assert got == {"Albert Einstein": 70, "Café de Flore": 70, "Not In Dump": 500}
    assert [t for t, _, _ in out.entries][0] == "Not In Dump"  # most viewed first
    assert out.dropped == {"below_views": 1, "not_article": 2}
    assert out.seen == 6
    assert out.info["lines"] == {"lines": 12, "used": 10, "other_project": 1, "malformed": 1}
    assert out.info["files"] == ["pageviews-20240101-000000.gz", "pageviews-20240101-010000"]


def test_titles_restricted_to_dump_articles(tmp_path):
    files = _write_hours(tmp_path)
    articles = SpillCounter(2, name="titles")
    for t in ["Albert Einstein", "Obscure Page", "Zebra", "Café de Flore"]:
        articles.add(t)
    try:
        out = title_source(files, ["en", "en.m"], 70, articles, 1000, None)
    finally:
        articles.close()
    assert [t for t, _, _ in out.entries] == ["Albert Einstein", "Café de Flore"]
    assert out.dropped == {"below_views": 1, "not_article": 3}  # Main Page, Talk:Cats, Not In Dump


def test_pagecounts_lines_and_helpers(tmp_path):
    views = SpillCounter()
    p = tmp_path / "pagecounts-20120101-000000"
    p.write_bytes(b"en Rome 5 100\nen Rome 7 100\nfr Rome 9 1\n")
    with open_maybe_compressed(str(p)) as f:
        stats = add_views(f, views, ["en"])
    assert list(views.items()) == [("Rome", 12)] and stats["used"] == 2
    kept, dropped, seen = select_titles(iter([("Rome", 12)]), min_views=13)
    assert kept == [] and dropped == {"below_views": 1, "not_article": 0} and seen == 1
    assert is_article_title("Star Wars: A New Hope") and not is_article_title("Category:Cats")
