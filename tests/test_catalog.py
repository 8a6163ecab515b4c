"""The DuckDB catalog over a run directory."""

from __future__ import annotations

from wit_builder import io
from wit_builder.catalog import query, views


def test_a_finished_stage_with_no_files_gives_an_empty_view(tmp_path):
    run_dir = str(tmp_path)
    io.write_json({"fingerprint": "x"}, io.join(run_dir, "shards", "_SUCCESS.json"))
    assert "shards" in views(run_dir) and "samples" not in views(run_dir)
    cols, rows = query(run_dir, "SELECT count(*) AS n FROM shards")
    assert (cols, rows) == (["n"], [(0,)])
