"""The DuckDB catalog over a run directory: views agree with the stage summaries, `dropped`
accounts for every selected sample, glob-safe run paths, output formats, read-only mode and
terminal escaping. One tiny finished run (tests/tiny_run.py) serves the module."""

from __future__ import annotations

import json
import os
import shutil

import pyarrow.parquet as pq
import pytest

from tiny_run import QUERIES, build_run, default_samples
from wit_builder import io
from wit_builder.catalog import connect, query, terminal_safe, view_names, views
from wit_builder.cli import main

COUNTED_VIEWS = ("queries", "selected", "query_counts", "samples", "filtered", "kept", "shards", "dropped")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, ray_session):
    """(run dir, stage results) of a tiny finished run."""
    run_dir = str(tmp_path_factory.mktemp("catalog") / "out1")
    return run_dir, build_run(run_dir, default_samples(), QUERIES)


def _count(run_dir: str, view: str) -> int:
    return query(run_dir, f"SELECT count(*) FROM {view}")[1][0][0]


def _counts(run_dir: str) -> dict[str, int]:
    con = connect(run_dir)
    return {v: con.sql(f"SELECT count(*) FROM {v}").fetchall()[0][0] for v in COUNTED_VIEWS}


def _put_metadata(fs, run_dir: str, dest: str, only: str = "") -> None:
    """Upload a run's metadata (parquet, json; not the tars, not the part markers) to `dest`."""
    for root, dirs, files in os.walk(os.path.join(run_dir, only)):
        dirs[:] = [d for d in dirs if d not in ("_parts", "_work")]
        for f in files:
            if f.endswith((".parquet", ".json")):
                rel = os.path.relpath(os.path.join(root, f), run_dir)
                fs.put_file(os.path.join(root, f), f"{dest}/{rel}")


def _sql(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["sql", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_finished_stage_with_no_files_gives_an_empty_view(tmp_path):
    run_dir = str(tmp_path)
    io.write_json({"fingerprint": "x"}, io.join(run_dir, "shards", "_SUCCESS.json"))
    assert "shards" in views(run_dir) and "samples" not in views(run_dir)
    cols, rows = query(run_dir, "SELECT count(*) AS n FROM shards")
    assert (cols, rows) == (["n"], [(0,)])


@pytest.mark.timeout(120)
def test_each_view_counts_what_the_stage_summaries_say(tiny):
    run_dir, r = tiny
    c = _counts(run_dir)
    manifest = io.read_json(io.join(run_dir, "shards", "manifest.json"))
    assert c["queries"] == r["queries"].rows_out == len(QUERIES) == c["query_counts"]
    assert c["selected"] == r["balance"].rows_out == r["download"].rows_in == c["samples"]
    assert c["filtered"] == r["filter"].rows_in == r["download"].rows_out
    assert c["kept"] == r["filter"].rows_out == r["shards"].rows_in
    assert c["shards"] == r["shards"].rows_out == manifest["total_samples"] > 0
    by_stage = dict(query(run_dir, "SELECT stage, count(*) FROM dropped GROUP BY 1")[1])
    assert by_stage == {
        "download": sum(r["download"].dropped.values()),
        "filter": sum(r["filter"].dropped.values()),
        "shards": r["shards"].dropped["over_cap"],
    }
    assert min(by_stage.values()) > 0  # the tiny run has a loss at every stage


@pytest.mark.timeout(120)
def test_dropped_accounts_for_every_selected_sample_not_in_the_shards(tiny):
    run_dir, _ = tiny
    con = connect(run_dir)
    selected = {r[0] for r in con.sql("SELECT uid FROM selected").fetchall()}
    in_shards = {r[0] for r in con.sql("SELECT uid FROM shards").fetchall()}
    dropped = con.sql("SELECT uid, stage, reason, url, caption, query_id, query_text FROM dropped").fetchall()
    dropped_uids = [d[0] for d in dropped]
    assert len(dropped_uids) == len(set(dropped_uids))  # each sample once
    assert set(dropped_uids) | in_shards == selected and not set(dropped_uids) & in_shards
    # the reasons are the stages' own: download errors, filter drop reasons, the post-filter trim
    errors = dict(con.sql("SELECT uid, error FROM samples WHERE status <> 'success'").fetchall())
    drops = dict(con.sql("SELECT uid, drop_reason FROM filtered WHERE drop_reason IS NOT NULL").fetchall())
    for uid, stage, reason, url, caption, _, query_text in dropped:
        assert url and caption and query_text
        want = {"download": errors.get(uid), "filter": drops.get(uid), "shards": "trimmed_over_cap"}[stage]
        assert reason == want, (uid, stage)
    assert sorted(r for _, s, r, *_ in dropped if s == "filter") == ["bad_aspect", "too_small"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["brackets/out[1]", "star/a*b?", "spaces and 'quotes'/run"])
def test_glob_characters_in_the_run_path_read_the_same_rows(tiny, name):
    """A run copied to a path with glob characters gives the counts of the original; a decoy
    run that an unescaped glob would also match is not read."""
    run_dir, _ = tiny
    base = os.path.dirname(run_dir)
    copy = os.path.join(base, name)
    if not os.path.exists(copy):
        shutil.copytree(run_dir, copy)
    if name.startswith("star/"):  # `a*b?` as a glob matches `aXbY`
        decoy = os.path.join(base, "star", "aXbY")
        if not os.path.exists(decoy):
            shutil.copytree(run_dir, decoy)
    assert _counts(copy) == _counts(run_dir)


@pytest.mark.timeout(120)
def test_parquet_csv_and_json_outputs_round_trip(tiny, tmp_path, capsys):
    run_dir, _ = tiny
    want = connect(run_dir).sql("FROM shards ORDER BY key").to_arrow_table()
    out = str(tmp_path / "shards.parquet")
    code, _, err = _sql(capsys, run_dir, "FROM shards ORDER BY key", "--format", "parquet", "--output", out)
    assert code == 0 and f"{want.num_rows} rows -> {out}" in err
    got = pq.read_table(out)
    assert got.schema == want.schema and got.to_pylist() == want.to_pylist()

    code, text, _ = _sql(capsys, run_dir, "FROM shards ORDER BY key", "--format", "json")
    rows = [json.loads(line) for line in text.splitlines()]
    assert code == 0 and rows == json.loads(json.dumps(want.to_pylist()))

    out_csv = str(tmp_path / "shards.csv")
    code, _, _ = _sql(
        capsys,
        run_dir,
        "SELECT key, caption, query_ids FROM shards ORDER BY key",
        "--format",
        "csv",
        "--output",
        out_csv,
    )
    import csv

    with open(out_csv, newline="", encoding="utf-8") as f:
        got_csv = list(csv.DictReader(f))
    assert code == 0 and [r["caption"] for r in got_csv] == want["caption"].to_pylist()
    assert [json.loads(r["query_ids"]) for r in got_csv] == want["query_ids"].to_pylist()

    code, _, err = _sql(capsys, run_dir, "FROM shards", "--format", "parquet")
    assert code == 2 and "--output" in err


@pytest.mark.timeout(120)
def test_schema_lists_every_view_with_its_columns(tiny, capsys):
    run_dir, _ = tiny
    code, text, _ = _sql(capsys, run_dir, "--schema", "--format", "json")
    assert code == 0
    rows = [json.loads(line) for line in text.splitlines()]
    con = connect(run_dir)
    for view in view_names(con):
        described = [(r[0], r[1]) for r in con.sql(f"DESCRIBE {view}").fetchall()]
        assert [(r["column"], r["type"]) for r in rows if r["view"] == view] == described, view
    assert {r["view"] for r in rows} == set(view_names(con)) >= set(COUNTED_VIEWS)
    code, text, _ = _sql(capsys, run_dir, "--schema")
    assert code == 0 and "dropped" in text and "reason" in text
    assert _sql(capsys, run_dir)[0] == 2  # neither a query nor --schema


@pytest.mark.timeout(120)
def test_read_only_by_default_and_unsafe_lifts_it(tiny, tmp_path, capsys):
    run_dir, _ = tiny
    own = os.path.join(run_dir, "download", "00000.parquet")
    before = open(own, "rb").read()
    target = str(tmp_path / "copy.csv")
    refused = [
        f"COPY shards TO '{target}'",
        f"COPY (SELECT 1 AS a) TO '{own}' (FORMAT parquet, USE_TMP_FILE false)",
        "SELECT * FROM read_text('/etc/passwd')",
        "SELECT * FROM read_csv('/etc/passwd')",
        "INSTALL httpfs",
        "LOAD httpfs",
        f"ATTACH '{tmp_path / 'x.duckdb'}' AS x",
        f"EXPORT DATABASE '{tmp_path / 'export'}'",
        "SET enable_external_access = true",
    ]
    for sql in refused:
        code, out, err = _sql(capsys, run_dir, sql)
        assert code == 2, sql
        assert "refused" in err and "--unsafe" in err and "Traceback" not in err, (sql, err)
    assert not os.path.exists(target) and not os.path.exists(tmp_path / "x.duckdb")
    assert open(own, "rb").read() == before
    # the notebook connection keeps the settings: no file outside the run
    con = connect(run_dir)
    with pytest.raises(Exception, match="disabled by configuration"):
        con.sql("SELECT * FROM read_text('/etc/passwd')").fetchall()
    # an --output inside the run dir is refused too
    code, _, err = _sql(capsys, run_dir, "FROM shards", "--format", "csv", "--output", os.path.join(run_dir, "x.csv"))
    assert code == 2 and "inside the run directory" in err

    code, _, err = _sql(capsys, run_dir, f"COPY shards TO '{target}'", "--unsafe")
    assert code == 0, err
    assert open(target).read().count("\n") == _count(run_dir, "shards") + 1
    code, out, _ = _sql(capsys, run_dir, "SELECT content FROM read_text('/etc/passwd')", "--unsafe")
    assert code == 0 and "root" in out


@pytest.mark.timeout(120)
def test_control_characters_reach_the_terminal_escaped(tiny, capsys):
    run_dir, _ = tiny
    code, out, _ = _sql(
        capsys, run_dir, 'SELECT caption AS "col\x1b[31m" FROM samples ORDER BY caption', "--max-rows", "0"
    )
    assert code == 0
    assert "\\x1b]0;retitled\\x07\\x1b[2J in the rain\\r\\nFAKE" in out
    assert "col\\x1b[31m" in out
    assert not any(ch in out.replace("\n", "") for ch in "\x1b\x07\r")
    assert out.count("\n") == _count(run_dir, "samples") + 3  # header, rule, rows, "(N rows)"
    # an error message quoting the caption is escaped too
    code, _, err = _sql(capsys, run_dir, "SELECT caption::INT FROM samples WHERE caption LIKE '%rain%'")
    assert code == 2 and "\\x1b]0;retitled" in err and "\x1b" not in err and "\r" not in err


def test_terminal_safe_escapes_c0_c1_and_bidi_controls():
    nasty = "a\x00b\x1b[2Jc\x7fd\x9be\u202egnp.exe\u2066f\u2069\u2028g\u200f"
    safe = terminal_safe(nasty)
    assert safe == "a\\x00b\\x1b[2Jc\\x7fd\\x9be\\u202egnp.exe\\u2066f\\u2069\\u2028g\\u200f"
    assert terminal_safe("plain text, ünïcödé, 日本語") == "plain text, ünïcödé, 日本語"


@pytest.mark.timeout(180)
def test_an_s3_run_dir_with_glob_characters_reads_its_own_files(tiny, s3_endpoint):
    import fsspec

    run_dir, _ = tiny
    fs = fsspec.filesystem("s3")
    if not fs.exists("catalog-test"):
        fs.mkdir("catalog-test")
    _put_metadata(fs, run_dir, "catalog-test/runs/out[1]")  # as a glob, `out[1]` matches only `out1`
    _put_metadata(fs, run_dir, "catalog-test/runs/a*b")
    _put_metadata(fs, run_dir, "catalog-test/runs/aXb", only="download")  # what the glob `a*b` also matches
    for remote in ("s3://catalog-test/runs/out[1]", "s3://catalog-test/runs/a*b"):
        assert _counts(remote) == _counts(run_dir), remote
    with pytest.raises(Exception, match="refused"):
        query(remote, "SELECT * FROM read_text('/etc/passwd')")
