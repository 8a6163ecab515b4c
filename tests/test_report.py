"""`wit-build stats`: the report builds for a tiny run with hostile text and a 12000-px panorama
and for a 1-query run, its plots are present and readable, its thumbnails are real images read
from the final tars, nothing from the data can run in it, and it prints the training commands."""

from __future__ import annotations

import base64
import io as _io
import os
import re
import shutil
from html.parser import HTMLParser

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fake_download import FakeSample, synthetic_jpeg
from tiny_run import QUERIES, build_run, default_samples
from wit_builder import io
from wit_builder.catalog import connect
from wit_builder.report import brace_pattern, log_histogram, write_report

PLOTS = ("funnel.png", "stage_seconds.png", "query_balance.png", "widths.png", "aspect.png", "captions.png")
HOSTILE_RUN_NAME = "run <img src=x onerror=\"document.title='pwned'\"> 'x'"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_session):
    """{"tiny": (run dir, results), "one_query": (...)}: finished tiny runs."""
    base = tmp_path_factory.mktemp("report")
    tiny = str(base / HOSTILE_RUN_NAME)  # the run path itself carries a payload
    one = str(base / "one_query")
    samples = [
        FakeSample(f"http://h.example/{i}.jpg", f"a red bicycle number {i}", 0, synthetic_jpeg(40 + i))
        for i in range(3)
    ]
    return {
        "tiny": (tiny, build_run(tiny, default_samples(), QUERIES)),
        "one_query": (one, build_run(one, samples, ["bicycle"])),
    }


@pytest.fixture(scope="module")
def tiny_report(runs) -> str:
    """The report of the tiny run, written once for the tests that only read it."""
    return write_report(runs["tiny"][0])


class _Page(HTMLParser):
    """Every tag with its attributes, and the text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _parse(path: str) -> tuple[str, _Page]:
    page = open(path, encoding="utf-8").read()
    parser = _Page()
    parser.feed(page)
    return page, parser


def _decode(uri: str) -> Image.Image:
    head, data = uri.split(",", 1)
    assert head in ("data:image/jpeg;base64", "data:image/png;base64")
    im = Image.open(_io.BytesIO(base64.b64decode(data)))
    im.load()
    return im


@pytest.mark.timeout(180)
def test_report_of_a_hostile_run_runs_nothing_from_the_data(tiny_report):
    page, parsed = _parse(tiny_report)
    tags = [t for t, _ in parsed.tags]
    assert "script" not in tags and "iframe" not in tags and "object" not in tags
    for tag, attrs in parsed.tags:
        assert not [a for a in attrs if a.startswith("on")], (tag, attrs)  # no event handler at all
        for a in [a for a in ("href", "src", "action", "formaction") if a in attrs]:
            v = (attrs[a] or "").strip().lower()
            assert not v.startswith(("javascript:", "vbscript:")), (tag, attrs)
            if a == "src":
                assert v.startswith("data:image/"), (tag, attrs)  # only our own embedded images
            if a == "href":
                assert v.startswith(("http://", "https://")), (tag, attrs)
    csp = [
        a.get("content", "") for t, a in parsed.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"
    ]
    assert csp and "default-src 'none'" in csp[0] and "script" not in csp[0]
    for raw in ("<script>document.title", "<img src=x onerror", 'onerror="document', "\x1b"):
        assert raw not in page, raw
    text = "".join(parsed.text)  # the payloads are shown, as text
    assert QUERIES[1] in text and HOSTILE_RUN_NAME in text
    assert "a bicycle <img src=x onerror=\"document.title='pwned'\"> on a wall" in text
    assert "javascript:document.title='pwned'//.jpg" in text


@pytest.mark.timeout(180)
def test_report_shows_real_thumbnails_plots_and_the_training_commands(runs, tiny_report):
    run_dir, results = runs["tiny"]
    page, parsed = _parse(tiny_report)
    manifest = io.read_json(io.join(run_dir, "shards", "manifest.json"))
    thumbs = [a["src"] for t, a in parsed.tags if t == "img" and a.get("src", "").startswith("data:image/jpeg")]
    assert len(thumbs) == manifest["total_samples"] == results["shards"].rows_out
    for uri in thumbs:
        im = _decode(uri).convert("L")
        lo, hi = im.getextrema()
        assert im.size[0] > 16 and hi - lo > 30  # decoded and not blank
    plots = [a for t, a in parsed.tags if t == "img" and a.get("src", "").startswith("data:image/png")]
    assert sorted(a["title"] for a in plots) == sorted(PLOTS)
    for name in PLOTS:
        assert os.path.getsize(os.path.join(run_dir, "report", name)) > 1000
    for name, r in results.items():  # the stages table
        assert f"<td>{name}</td><td>done</td><td>{r.rows_in}</td><td>{r.rows_out}</td>" in page
    text = "".join(parsed.text)
    assert f"{{000000..{len(manifest['tars']) - 1:06d}}}.tar" in text
    assert f"--train-num-samples {manifest['total_samples']} --dataset-type webdataset" in text
    assert "wit-train --config" in text and "manifest.json" in text
    assert "http_404" in text and "h0.example" in text  # error types and top domains
    assert re.search(r"Removed for safety\s*none", text)
    assert "bad_aspect" in text and "not recorded in this run" not in text.split("Caption languages")[0]


@pytest.mark.timeout(120)
def test_a_12000_px_panorama_does_not_squash_the_size_histogram(runs):
    run_dir, _ = runs["tiny"]
    con = connect(run_dir)
    ok = "(SELECT * FROM samples WHERE status = 'success') t"
    bins = log_histogram(con, "original_width", ok)
    assert max(hi for _, hi, _ in bins) >= 12000 and bins[0][0] <= 20
    assert len(bins) >= 4  # the ~100-px images spread over their own bins, the panorama in another
    assert sum(n for *_, n in bins) == con.sql(f"SELECT count(*) FROM {ok}").fetchall()[0][0]


@pytest.mark.timeout(180)
def test_a_one_query_run_gets_a_non_empty_query_plot(runs):
    run_dir, _ = runs["one_query"]
    page, parsed = _parse(write_report(run_dir))
    plot = Image.open(os.path.join(run_dir, "report", "query_balance.png")).convert("RGB")
    # matplotlib's first colour (#1f77b4) is drawn: the one query's point is on the plot
    blue = sum(1 for p in plot.getdata() if abs(p[0] - 31) < 30 and abs(p[1] - 119) < 30 and abs(p[2] - 180) < 30)
    assert blue > 20
    assert "brace" not in page and "--train-data" in page and "000000.tar" in page  # one tar: no braces
    assert brace_pattern(["000000.tar"]) == "000000.tar"


@pytest.mark.timeout(180)
def test_removed_for_safety_counts_reasons_from_summaries_and_rows(runs, tmp_path):
    run_dir, _ = runs["tiny"]
    copy = str(tmp_path / "safety_run")
    shutil.copytree(run_dir, copy)
    path = os.path.join(copy, "filtered", "00000.parquet")
    t = pq.read_table(path)
    reasons = t["drop_reason"].to_pylist()
    i = reasons.index(None)  # a kept sample becomes a safety drop
    reasons[i] = "safety:blocklist:test-list"
    pq.write_table(t.set_column(t.schema.get_field_index("drop_reason"), "drop_reason", pa.array(reasons)), path)
    success = io.read_json(os.path.join(copy, "filtered", "_SUCCESS.json"))
    success["result"]["dropped"]["safety:blocklist:test-list"] = 1
    success["result"]["rows_out"] -= 1
    io.write_json(success, os.path.join(copy, "filtered", "_SUCCESS.json"))
    page, parsed = _parse(write_report(copy))
    section = "".join(parsed.text).split("Removed for safety")[1].split("Queries")[0]
    assert "safety:blocklist:test-list" in section and "none" not in section
    assert section.count("safety:blocklist:test-list") == 2  # the stage summary and the dropped rows
