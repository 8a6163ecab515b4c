"""The match stage on Ray: real captions through candidates-shaped parts into matched parts."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wit_builder import schema
from wit_builder.config import ConfigError, from_dict
from wit_builder.stages import match
from wit_builder.stages.base import StageContext
from wit_builder.uid import uids

DATA = os.path.join(os.path.dirname(__file__), "data", "match")
QUERIES = ["dog", "cat", "Dog", "New York", "red car", "beach", "U.S.", "pizza", "a man"]


def make_run(tmp_path, n_parts: int = 3):
    t = pq.read_table(os.path.join(DATA, "captions.parquet"))
    run_dir = tmp_path / "run"
    (run_dir / "queries").mkdir(parents=True)
    q = pa.table(
        {
            "query_id": pa.array(range(len(QUERIES)), pa.int32()),
            "text": QUERIES,
            "source": ["list"] * len(QUERIES),
            "count": pa.nulls(len(QUERIES), pa.int64()),
        }
    )
    pq.write_table(q, run_dir / "queries" / "queries.parquet")
    (run_dir / "candidates").mkdir()
    urls, caps = t.column("url").to_pylist(), t.column("caption").to_pylist()
    cand = pa.table(
        {
            "uid": uids(urls, caps),
            "url": urls,
            "caption": caps,
            "source_file": ["captions.parquet"] * t.num_rows,
            "page_url": pa.nulls(t.num_rows, pa.string()),
            "origin": t.column("origin"),
        }
    )
    step = -(-cand.num_rows // n_parts)
    for i in range(n_parts):
        pq.write_table(cand.slice(i * step, step), run_dir / "candidates" / f"part-{i:05d}.parquet")
    return run_dir, caps


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["word", "metaclip"])
def test_stage_output_equals_matcher(tmp_path, ray_session, mode):
    run_dir, caps = make_run(tmp_path)
    ctx = StageContext(run_dir=str(run_dir), seed=0, num_cpus=2, progress=False)
    result = match.run(ctx, match.Config(mode=mode, batch_rows=700))
    result.check_accounting()
    expected = match.Matcher(QUERIES, mode=mode).match(caps)
    n_match = sum(1 for e in expected if e)
    assert result.rows_in == len(caps)
    assert result.rows_out == n_match > 100
    assert result.dropped == {"no_match": len(caps) - n_match}
    parts = sorted((run_dir / "matched").glob("part-*.parquet"))
    assert [p.name for p in parts] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    out = pa.concat_tables([pq.read_table(p) for p in parts])
    assert out.schema.names[: len(schema.MATCHED.names)] == schema.MATCHED.names
    assert out.schema.field("query_ids").type == schema.QUERY_IDS
    assert "origin" in out.column_names
    by_caption = {}
    for c, q in zip(out.column("caption").to_pylist(), out.column("query_ids").to_pylist()):
        by_caption[c] = q
    for c, e in zip(caps, expected):
        if e:
            assert by_caption[c] == e
    # a rerun skips the finished parts and reports the same counts
    again = match.run(ctx, match.Config(mode=mode, batch_rows=700))
    assert (again.rows_in, again.rows_out) == (result.rows_in, result.rows_out)


def test_missing_queries_is_a_config_error(tmp_path):
    ctx = StageContext(run_dir=str(tmp_path), progress=False)
    with pytest.raises(ConfigError, match="queries.parquet"):
        match.run(ctx, match.Config())
    with pytest.raises(ConfigError, match="mode"):
        from_dict(match.Config, {"mode": "regex"}, where="t.toml [match]")
    with pytest.raises(ConfigError, match="batch_rows"):
        from_dict(match.Config, {"batch_rows": 0}, where="t.toml [match]")
