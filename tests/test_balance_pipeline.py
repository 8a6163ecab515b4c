"""candidates -> match -> balance on real captions, as the demo runs them (word mode, cap 5)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wit_builder.stages import balance, candidates, match
from wit_builder.stages.base import StageContext

DATA = os.path.join(os.path.dirname(__file__), "data", "match")
QUERIES = ["dog", "cat", "man", "woman", "pizza", "train", "beach", "red", "table", "street", "Christmas"]


@pytest.mark.timeout(180)
def test_three_stages_chain(tmp_path, ray_session):
    run_dir = tmp_path / "run"
    src = tmp_path / "pairs.parquet"
    t = pq.read_table(os.path.join(DATA, "captions.parquet"), columns=["url", "caption"])
    pq.write_table(pa.concat_tables([t, t.slice(0, 100)]), src)  # 100 exact duplicates
    ctx = StageContext(run_dir=str(run_dir), seed=0, num_cpus=2, progress=False)
    (run_dir / "queries").mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "query_id": pa.array(range(len(QUERIES)), pa.int32()),
                "text": QUERIES,
                "source": ["list"] * len(QUERIES),
                "count": pa.nulls(len(QUERIES), pa.int64()),
            }
        ),
        run_dir / "queries" / "queries.parquet",
    )
    rc = candidates.run(ctx, candidates.Config(inputs=[str(src)], partitions=4))
    rm = match.run(ctx, match.Config(mode="word"))
    rb = balance.run(ctx, balance.Config(cap=5))
    for r in (rc, rm, rb):
        r.check_accounting()
    assert rc.rows_in == 5100 and rc.dropped["duplicate"] >= 100
    assert rm.rows_in == rc.rows_out and rb.rows_in == rm.rows_out
    counts = pq.read_table(run_dir / "selected" / "query_counts.parquet").to_pydict()
    assert counts["query_id"] == list(range(len(QUERIES)))
    assert max(counts["attributed"]) == 5
    assert sum(counts["attributed"]) == rb.rows_out
    sel = pa.concat_tables([pq.read_table(p) for p in sorted((run_dir / "selected").glob("part-*.parquet"))])
    for qid, qids in zip(sel.column("query_id").to_pylist(), sel.column("query_ids").to_pylist()):
        assert qid in qids
    ranks = sel.column("rank").to_numpy()
    assert np.all((ranks >= 0) & (ranks < 1))
