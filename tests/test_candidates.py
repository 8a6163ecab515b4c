"""Candidates stage: url lists in every format, bad rows by reason, dedup, WARC/WAT, config errors."""

from __future__ import annotations

import gzip
import html.parser
import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wit_builder import schema
from wit_builder.config import ConfigError, from_dict
from wit_builder.stages import candidates
from wit_builder.stages.base import StageContext
from wit_builder.uid import uid

DATA = os.path.join(os.path.dirname(__file__), "data", "match")
WARC = os.path.join(DATA, "sample-0001.warc.gz")


def _run(tmp_path, **kw):
    cfg = candidates.Config(**kw)
    ctx = StageContext(run_dir=str(tmp_path / "run"), seed=0, num_cpus=2, progress=False)
    result = candidates.run(ctx, cfg)
    parts = sorted((tmp_path / "run" / "candidates").glob("part-*.parquet"))
    table = pa.concat_tables([pq.read_table(p) for p in parts]) if parts else None
    return result, table, parts


def test_uid_is_the_fixed_formula():
    import hashlib

    u, c = "https://a.org/é.jpg", "a café"
    assert uid(u, c) == hashlib.blake2b(f"{u}\x1f{c}".encode(), digest_size=8).hexdigest()


def test_parquet_bad_rows_counted_by_reason_and_duplicates_removed(tmp_path, ray_session):
    rows = [
        ("https://a.org/1.jpg", b"a cat", "x1"),
        ("https://a.org/1.jpg", b"a cat", "x2"),  # duplicate of the first: dropped, first kept
        ("HTTP://A.org/2.jpg", b"a dog", "x3"),
        (None, b"no url", "x4"),
        ("", b"empty url", "x5"),
        ("https://a.org/3.jpg", None, "x6"),
        ("https://a.org/4.jpg", b"   ", "x7"),
        ("data:image/png;base64,AAAA", b"inline", "x8"),
        ("ftp://a.org/5.jpg", b"ftp", "x9"),
        ("https://a.org/6.jpg", b"x" * 50, "x10"),
        ("https://a.org/7.jpg", b"caf\xe9 latin-1", "x11"),  # not UTF-8
    ]
    t = pa.table(
        {
            "URL": pa.array([r[0] for r in rows], pa.string()),
            "TEXT": pa.array([r[1] for r in rows], pa.binary()),
            "note": [r[2] for r in rows],
        }
    )
    src = tmp_path / "in.parquet"
    pq.write_table(t, src)
    pq.write_table(t.slice(0, 1), tmp_path / "in2.parquet")  # the same pair again, in another file
    result, table, parts = _run(
        tmp_path,
        inputs=[str(tmp_path / "in*.parquet")],
        url_col="URL",
        caption_col="TEXT",
        extra_cols=["note"],
        max_caption_chars=40,
        partitions=4,
    )
    assert result.rows_in == 12
    assert result.dropped == {
        "undecodable": 1,
        "missing_url": 2,
        "missing_caption": 2,
        "bad_scheme": 2,
        "caption_too_long": 1,
        "duplicate": 2,
    }
    result.check_accounting()
    assert len(parts) == 4
    assert table.schema.names[:5] == schema.CANDIDATES.names
    assert table.num_rows == 2
    got = {r["url"]: r for r in table.to_pylist()}
    assert got["https://a.org/1.jpg"]["note"] == "x1"  # first occurrence wins
    assert got["https://a.org/1.jpg"]["source_file"] == str(src)
    assert got["HTTP://A.org/2.jpg"]["uid"] == uid("HTTP://A.org/2.jpg", "a dog")
    assert got["HTTP://A.org/2.jpg"]["page_url"] is None
    for p in parts:  # each part sorted by uid, uids unique across parts
        u = pq.read_table(p).column("uid").to_pylist()
        assert u == sorted(u)
    assert len(set(table.column("uid").to_pylist())) == table.num_rows


def test_csv_gz_tsv_zstd_jsonl_and_globs(tmp_path, ray_session):
    import zstandard

    d = tmp_path / "lists"
    d.mkdir()
    with gzip.open(d / "a.csv.gz", "wt", encoding="utf-8") as f:
        f.write('link,alt,w\nhttps://x.org/1.jpg,"a cat, on a mat",10\nhttps://x.org/2.jpg,"two\nlines",20\n')
        f.write("https://x.org/bad.jpg,too,many,fields\n")
    tsv = 'link\talt\tw\nhttps://x.org/3.jpg\ta "quoted" dog\t30\nmailto:a@b.c\tmail\t40\n'
    (d / "b.tsv.zst").write_bytes(zstandard.ZstdCompressor().compress(tsv.encode()))
    jl = [
        {"link": "https://x.org/4.jpg", "alt": "a bird", "w": 50},
        {"link": "https://x.org/5.jpg", "alt": None, "w": 60},
        "not an object",
    ]
    (d / "c.jsonl").write_text("\n".join(json.dumps(r) for r in jl) + "\n{broken\n")
    result, table, _ = _run(
        tmp_path, inputs=[str(d / "*")], url_col="link", caption_col="alt", extra_cols=["w"], partitions=2
    )
    result.check_accounting()
    assert result.rows_in == 9
    assert result.dropped["bad_row"] == 3  # csv row with 4 fields, a JSON string, a broken line
    assert result.dropped["bad_scheme"] == 1
    assert result.dropped["missing_caption"] == 1
    got = dict(zip(table.column("url").to_pylist(), table.column("caption").to_pylist()))
    assert got == {
        "https://x.org/1.jpg": "a cat, on a mat",
        "https://x.org/2.jpg": "two\nlines",
        "https://x.org/3.jpg": 'a "quoted" dog',
        "https://x.org/4.jpg": "a bird",
    }
    assert sorted(table.column("w").to_pylist()) == ["10", "20", "30", "50"]


def test_missing_column_is_a_config_error_naming_column_and_file(tmp_path):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"URL": ["https://a/b.jpg"], "TEXT": ["c"]}), src)
    run_dir = tmp_path / "run"
    ctx = StageContext(run_dir=str(run_dir), progress=False)
    with pytest.raises(ConfigError, match=r"caption_col: column 'caption' not found in .*in\.parquet"):
        candidates.run(ctx, candidates.Config(inputs=[str(src)], url_col="URL"))
    assert not run_dir.exists()  # raised before any work
    csv_path = tmp_path / "in.csv"
    csv_path.write_text("url,text\nhttps://a/b.jpg,c\n")
    with pytest.raises(ConfigError, match=r"column 'caption' not found in .*in\.csv"):
        candidates.plan_inputs(candidates.Config(inputs=[str(csv_path)]))
    with pytest.raises(ConfigError, match="no input file matches"):
        candidates.plan_inputs(candidates.Config(inputs=[str(tmp_path / "nothing*.csv")]))
    with pytest.raises(ConfigError, match="format"):
        from_dict(candidates.Config, {"format": "xml"}, where="t.toml [candidates]")
    with pytest.raises(ConfigError, match="clash"):
        from_dict(candidates.Config, {"extra_cols": ["uid"]}, where="t.toml [candidates]")


# ------------------------------------------------------------------------------- WARC


def _warc_records(path: str):
    """A minimal WARC walker written here (no WARC library): yields (headers, block bytes)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        head_end = data.index(b"\r\n\r\n", pos)
        lines = data[pos:head_end].decode("utf-8", "replace").split("\r\n")
        headers = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
        headers = {k.strip().lower(): v.strip() for k, v in headers.items()}
        length = int(headers["content-length"])
        block = data[head_end + 4 : head_end + 4 + length]
        yield headers, block
        pos = head_end + 4 + length
        while data[pos : pos + 2] == b"\r\n":
            pos += 2


class _ImgCounter(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs))

    handle_startendtag = handle_starttag


def _independent_img_counts(path: str) -> tuple[int, int]:
    total = with_alt = 0
    for headers, block in _warc_records(path):
        if headers.get("warc-type") != "response":
            continue
        http_head, _, body = block.partition(b"\r\n\r\n")
        if b"text/html" not in http_head.lower():
            continue
        parser = _ImgCounter()
        parser.feed(body.decode("utf-8", "replace"))
        total += len(parser.imgs)
        with_alt += sum(1 for a in parser.imgs if (a.get("alt") or "").strip())
    return total, with_alt


def test_warc_reader_counts_equal_an_independent_count():
    from wit_builder.readers import warc

    total, with_alt = _independent_img_counts(WARC)
    assert (total, with_alt) == (149, 126)  # the figures in tests/data/match/SOURCE.md
    table = pa.concat_tables(list(warc.read_warc_blocks(WARC, 50)))
    captions = table.column("caption").to_pylist()
    assert table.num_rows == total
    assert sum(1 for c in captions if c) == with_alt
    pages = set(table.column("page_url").to_pylist())
    assert all(p.startswith("http") and "<" not in p for p in pages)


def test_warc_stage_accounting(tmp_path, ray_session):
    result, table, _ = _run(tmp_path, inputs=[WARC], partitions=3)
    result.check_accounting()
    total, with_alt = _independent_img_counts(WARC)
    assert result.rows_in == total
    assert result.dropped["missing_caption"] == total - with_alt
    assert table.num_rows == result.rows_out > 0
    assert all(u.startswith(("http://", "https://")) for u in table.column("url").to_pylist())
    assert all(table.column("page_url").is_valid().to_pylist())
    kept_plus_dup = result.rows_out + result.dropped["duplicate"]
    assert kept_plus_dup == with_alt - result.dropped["bad_scheme"] - result.dropped["missing_url"]


def test_html_relative_urls_base_and_data_uris():
    from wit_builder.readers import warc

    body = (
        b'<html><head></head><body><img src="a.jpg" alt=" A cat "><img src="/b.png" alt="dog">'
        b'<img src="data:image/png;base64,AA" alt="inline"><img alt="no src"><img src="c.jpg"></body></html>'
    )
    got = warc.images_in_html(body, "https://x.org/dir/page.html")
    assert got == [
        ("https://x.org/dir/a.jpg", "A cat"),
        ("https://x.org/b.png", "dog"),
        ("data:image/png;base64,AA", "inline"),
        (None, "no src"),
        ("https://x.org/dir/c.jpg", None),
    ]
    based = warc.images_in_html(
        b'<head><base href="https://cdn.org/s/"></head><img src="a.jpg" alt="x">', "https://x.org/"
    )
    assert based == [("https://cdn.org/s/a.jpg", "x")]


def _warc_record(rec_type: str, uri: str, payload: bytes) -> bytes:
    head = (
        f"WARC/1.0\r\nWARC-Type: {rec_type}\r\nWARC-Target-URI: {uri}\r\n"
        f"WARC-Record-ID: <urn:uuid:{abs(hash((uri, payload))):032x}>\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload + b"\r\n\r\n"


def test_wat_reader(tmp_path, ray_session):
    meta = {
        "Envelope": {
            "WARC-Header-Metadata": {"WARC-Target-URI": "https://x.org/p/page.html"},
            "Payload-Metadata": {
                "HTTP-Response-Metadata": {
                    "HTML-Metadata": {
                        "Head": {},
                        "Links": [
                            {"path": "IMG@/src", "url": "img/a.jpg", "alt": "a red car"},
                            {"path": "IMG@/src", "url": "https://y.org/b.jpg"},
                            {"path": "A@/href", "url": "https://x.org/", "text": "home"},
                            {"path": "IMG@/src", "url": "data:image/gif;base64,R0", "alt": "pixel"},
                        ],
                    }
                }
            },
        }
    }
    data = _warc_record("metadata", "https://x.org/p/page.html", json.dumps(meta).encode())
    data += _warc_record("metadata", "https://x.org/q", b"{not json")
    path = tmp_path / "CC-MAIN-x.warc.wat.gz"
    path.write_bytes(gzip.compress(data))
    result, table, _ = _run(tmp_path, inputs=[str(path)], partitions=1)
    result.check_accounting()
    assert result.rows_in == 4  # three IMG links + one unreadable record
    assert result.dropped["bad_record"] == 1
    assert result.dropped["missing_caption"] == 1
    assert result.dropped["bad_scheme"] == 1
    assert table.to_pylist()[0]["url"] == "https://x.org/p/img/a.jpg"
    assert table.to_pylist()[0]["page_url"] == "https://x.org/p/page.html"


def test_rerun_is_identical_and_partition_independent(tmp_path, ray_session):
    src = os.path.join(DATA, "captions.parquet")
    r1, t1, _ = _run(tmp_path / "a", inputs=[src], partitions=3, extra_cols=["origin"])
    r2, t2, _ = _run(tmp_path / "b", inputs=[src], partitions=7, extra_cols=["origin"], block_rows=777)
    assert r1.rows_out == r2.rows_out and r1.dropped == r2.dropped
    assert sorted(t1.column("uid").to_pylist()) == sorted(t2.column("uid").to_pylist())
    assert r1.rows_in == 5000
    r1.check_accounting()
    assert re.fullmatch(r"[0-9a-f]{16}", t1.column("uid")[0].as_py())


def test_big_parquet_split_into_row_group_tasks(tmp_path, ray_session):
    t = pq.read_table(os.path.join(DATA, "captions.parquet"))
    t = pa.concat_tables([t, t.slice(0, 300)])  # 300 duplicates, later in the file
    t = t.append_column("row", pa.array(range(t.num_rows)))
    src = tmp_path / "big.parquet"
    pq.write_table(t, src, row_group_size=400)
    whole, t1, _ = _run(tmp_path / "a", inputs=[str(src)], extra_cols=["row"], partitions=3)
    split, t2, _ = _run(tmp_path / "b", inputs=[str(src)], extra_cols=["row"], partitions=3, split_rows=1000)
    assert whole.extra["read_tasks"] == 1 and split.extra["read_tasks"] == 5  # 14 row groups of <= 400 rows, 3 per task
    split.check_accounting()
    assert split.dropped == whole.dropped and split.dropped["duplicate"] >= 300
    assert t1.sort_by("uid").equals(t2.sort_by("uid"))
    assert max(t2.column("row").to_pylist()) < 5000  # the first occurrence wins across pieces


@pytest.mark.timeout(120)
def test_truncated_gzip_is_a_clear_error_and_an_empty_file_is_zero_rows(tmp_path, ray_session):
    body = "url,caption\n" + "".join(f"https://a.org/{i}.jpg,a dog number {i}\n" for i in range(20_000))
    data = gzip.compress(body.encode())
    (tmp_path / "cut.csv.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=r"cut\.csv\.gz: compressed data is truncated or corrupt"):
        _run(tmp_path, inputs=[str(tmp_path / "cut.csv.gz")])
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "one.csv").write_text("url,caption\nhttps://a.org/x.jpg,a cat\n")
    result, table, _ = _run(tmp_path, inputs=[str(tmp_path / n) for n in ("empty.csv", "empty.jsonl", "one.csv")])
    assert (result.rows_in, result.rows_out) == (1, 1)


def test_corrupt_parquet_page_is_a_config_error_naming_the_file(tmp_path, ray_session):
    rows = {
        "url": [f"https://a.org/{i}.jpg" for i in range(5000)],
        "caption": [f"a cat number {i}" for i in range(5000)],
    }
    pq.write_table(pa.table(rows), tmp_path / "good.parquet", compression="snappy")
    data = bytearray((tmp_path / "good.parquet").read_bytes())
    for i in range(200, 260):  # inside the first data page; the footer stays readable
        data[i] ^= 0x5A
    (tmp_path / "bad.parquet").write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"bad\.parquet: unreadable .*fix or remove the file"):
        _run(tmp_path, inputs=[str(tmp_path / "bad.parquet")])


def test_urls_are_trimmed_not_dropped(tmp_path, ray_session):
    (tmp_path / "urls.jsonl").write_text(
        json.dumps({"url": "  https://a.org/x.jpg\n", "caption": "a cat"})
        + "\n"
        + json.dumps({"url": "\thttps://a.org/y.jpg ", "caption": "a dog"})
        + "\n"
        + json.dumps({"url": "https://a.org/x.jpg", "caption": "a cat"})
        + "\n"  # the same pair, untrimmed
    )
    result, table, _ = _run(tmp_path, inputs=[str(tmp_path / "urls.jsonl")])
    assert sorted(table.column("url").to_pylist()) == ["https://a.org/x.jpg", "https://a.org/y.jpg"]
    assert result.dropped.get("bad_scheme", 0) == 0 and result.dropped["duplicate"] == 1
    assert uid("https://a.org/x.jpg", "a cat") in table.column("uid").to_pylist()
