"""A tiny finished run for catalog and report tests: queries, selected (+ query_counts) and
download written directly (tests/fake_download.py), then the real `filter` and `shards` stages,
and a `_SUCCESS.json` per stage as the runner writes it. Seconds, not a whole pipeline.

Example (needs Ray, as the filter and shards stages run their passes on it):
    >>> build_run("/tmp/r", default_samples(), QUERIES)      # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections import Counter

import pyarrow as pa

from fake_download import FakeSample, synthetic_jpeg, write_run
from wit_builder import io
from wit_builder.stages import filter as filter_stage
from wit_builder.stages import shards as shards_stage
from wit_builder.stages.base import StageContext, StageResult, Timer

QUERIES = ["bicycle", "harbour <script>document.title='q'</script>", "lantern"]
CAP = 3
HOSTILE_CAPTIONS = [
    "a bicycle <script>document.title='pwned'</script> by the sea",
    "a bicycle <img src=x onerror=\"document.title='pwned'\"> on a wall",
    "a bicycle \x1b]0;retitled\x07\x1b[2J in the rain\r\nFAKE | table | line",
]


def default_samples() -> list[FakeSample]:
    """Query 0: 6 downloadable pairs (3 over the cap) with hostile captions and URLs, plus a 404;
    query 1: 2 pairs and a panorama 12000 px wide (dropped by the filter's aspect ratio);
    query 2: one pair and one too-small image."""
    out = []
    for i in range(6):
        caption = HOSTILE_CAPTIONS[i] if i < len(HOSTILE_CAPTIONS) else f"a bicycle number {i}"
        url = f"http://h{i % 2}.example/0/{i}.jpg" if i != 1 else "javascript:document.title='pwned'//.jpg"
        out.append(FakeSample(url, caption, 0, synthetic_jpeg(i, (96, 72))))
    out.append(FakeSample("http://h0.example/0/missing.jpg", "a bicycle that is gone", 0, None))
    out += [
        FakeSample(f"http://h2.example/1/{i}.jpg", f"the harbour at dawn {i}", 1, synthetic_jpeg(10 + i))
        for i in range(2)
    ]
    out.append(FakeSample("http://h2.example/1/pano.jpg", "a harbour panorama", 1, synthetic_jpeg(20, (12000, 300))))
    out.append(FakeSample("http://h3.example/2/a.jpg", "an old lantern", 2, synthetic_jpeg(30, (80, 80))))
    out.append(FakeSample("http://h3.example/2/tiny.jpg", "a tiny lantern", 2, synthetic_jpeg(31, (20, 20))))
    return out


def _ctx(run_dir: str) -> StageContext:
    return StageContext(run_dir=run_dir, seed=3, num_cpus=2, progress=False, config_hash="c0ffee")


def _success(run_dir: str, folder: str, result: StageResult) -> None:
    io.write_json({"fingerprint": "test", "result": result.to_json()}, io.join(run_dir, folder, "_SUCCESS.json"))


def build_run(run_dir: str, samples: list[FakeSample], queries: list[str], cap: int = CAP) -> dict[str, StageResult]:
    """Write a finished run of `samples` into `run_dir`; returns each stage's StageResult."""
    write_run(run_dir, samples, queries=queries, shard_size=4)
    per_query = Counter(s.query_id for s in samples)
    io.write_parquet(
        pa.table(
            {
                "query_id": pa.array(list(range(len(queries))), pa.int32()),
                "containing": pa.array([per_query[q] + 2 for q in range(len(queries))], pa.int64()),
                "attributed": pa.array([per_query[q] for q in range(len(queries))], pa.int64()),
            }
        ),
        os.path.join(run_dir, "selected", "query_counts.parquet"),
    )
    errors = Counter("http_404" for s in samples if s.image is None)
    results = {
        "queries": StageResult(len(queries), len(queries), seconds=0.5),
        "balance": StageResult(len(samples) + 4, len(samples), {"over_cap": 4}, seconds=1.5),
        "download": StageResult(len(samples), len(samples) - sum(errors.values()), dict(errors), seconds=12.0),
    }
    ctx = _ctx(run_dir)
    with Timer() as t:
        results["filter"] = filter_stage.run(ctx, filter_stage.Config(languages=[], near_dedup_distance=-1))
    results["filter"].seconds = t.seconds
    with Timer() as t:
        results["shards"] = shards_stage.run(ctx, shards_stage.Config(samples_per_shard=4, cap=cap))
    results["shards"].seconds = t.seconds
    folders = {
        "queries": "queries",
        "balance": "selected",
        "download": "download",
        "filter": "filtered",
        "shards": "shards",
    }
    for name, result in results.items():
        result.check_accounting()
        _success(run_dir, folders[name], result)
    io.write_json(
        {"source": "tiny", "overrides": [], "config_hash": "c0ffee", "resolved": {}}, io.join(run_dir, "pipeline.json")
    )
    return results
