"""download -> filter -> shards on the bundled demo photos served over loopback: the stages'
files fit together, every row is accounted for, caps hold, a rerun is byte-identical."""

from __future__ import annotations

import os
import shutil
import tarfile

import pyarrow as pa
import pytest

from wit_builder import io, schema
from wit_builder.stages import download, shards
from wit_builder.stages import filter as filter_stage
from wit_builder.stages.base import StageContext
from wit_builder.uid import uid as make_uid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "demo")
QUERIES = ["table", "street", "dog", "food", "room"]
CAP = 6


def _selected(base_url: str, files: list[str], captions: dict[str, list[str]]) -> pa.Table:
    rows = []
    for i, f in enumerate(files):
        urls = [f"{base_url}/demo-photos/{f}"]
        if i % 10 == 0:
            urls.append(f"{base_url}/demo-photos/missing-{f}")  # a 404
        for url in urls:
            for caption in captions[f][:2]:  # two captions of one photo: exact duplicate images
                q = i % len(QUERIES)
                u = make_uid(url, caption)
                rows.append(
                    {
                        "uid": u,
                        "url": url,
                        "caption": caption,
                        "source_file": "demo",
                        "page_url": None,
                        "query_ids": [q],
                        "query_id": q,
                        "rank": int(u, 16) / 2**64,
                        "query_text": QUERIES[q],
                    }
                )
    return pa.Table.from_pylist(rows)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_download_filter_shards_fit_together(ray_session, static_server, tmp_path):
    base_url, www = static_server
    shutil.copytree(os.path.join(DEMO, "images"), os.path.join(www, "demo-photos"), dirs_exist_ok=True)
    caps = {}
    for r in io.read_parquet(os.path.join(DEMO, "captions.parquet")).to_pylist():
        caps.setdefault(r["file"], []).append(r["caption"])
    files = sorted(f for f in os.listdir(os.path.join(DEMO, "images")) if f in caps)[:40]
    run_dir = str(tmp_path / "run")
    selected = _selected(base_url, files, caps)
    io.write_parquet(selected, os.path.join(run_dir, "selected", "part-00000.parquet"), schema.SELECTED)
    io.write_parquet(
        pa.table(
            {
                "query_id": list(range(len(QUERIES))),
                "text": QUERIES,
                "source": ["list"] * len(QUERIES),
                "count": [None] * len(QUERIES),
            }
        ),
        os.path.join(run_dir, "queries", "queries.parquet"),
        schema.QUERIES,
    )
    ctx = StageContext(run_dir=run_dir, seed=3, num_cpus=2, progress=False, config_hash="abc")
    d = download.run(ctx, download.Config(shard_size=25, threads_per_task=4, allow_private_network=True))
    d.check_accounting()
    successes = d.rows_out
    assert successes == 2 * len(files) and d.rows_in == selected.num_rows

    f = filter_stage.run(ctx, filter_stage.Config(near_dedup_distance=2))
    f.check_accounting()
    assert f.rows_in == successes
    assert f.dropped.get("duplicate_exact", 0) >= len(files) - 1  # one of each caption pair (+ rare others)

    s = shards.run(ctx, shards.Config(samples_per_shard=7, cap=CAP))
    s.check_accounting()
    print("\n" + "\n".join(r.line(n) for n, r in (("download", d), ("filter", f), ("shards", s))))
    assert s.rows_in == f.rows_out
    out = os.path.join(run_dir, "shards")
    manifest = io.read_json(os.path.join(out, "manifest.json"))
    in_tars = 0
    for t in manifest["tars"]:
        with tarfile.open(os.path.join(out, t["path"])) as tar:
            in_tars += len({n.split(".")[0] for n in tar.getnames()})
    meta = pa.concat_tables([io.read_parquet(p) for p in io.listdir(os.path.join(out, "metadata"), ".parquet")])
    assert manifest["total_samples"] == in_tars == meta.num_rows == s.rows_out
    per_query = {}
    for q in meta["query_id"].to_pylist():
        per_query[q] = per_query.get(q, 0) + 1
    assert max(per_query.values()) <= CAP
    assert s.dropped["over_cap"] == f.rows_out - s.rows_out

    first = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out) if n.endswith((".tar", ".json"))}
    shutil.rmtree(out)
    shards.run(ctx, shards.Config(samples_per_shard=7, cap=CAP))
    again = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out) if n.endswith((".tar", ".json"))}
    assert again == first
