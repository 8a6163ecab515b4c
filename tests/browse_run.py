"""A small finished run directory in the pipeline's formats (schema.py, tars via tario) for the
browser and report tests: every fate a sample can meet (download failed, dropped by the filter,
trimmed over the cap, kept), real JPEG/PNG images, and optionally hostile text (HTML/script
payloads and `javascript:` URLs) in captions, URLs and query texts. Written directly (no Ray, no
server) in well under a second. Not part of the package: tests import it from tests/.

Example:
    >>> import tempfile
    >>> d = write_run(tempfile.mkdtemp())
    >>> sorted(EXPECTED_STATUS) == ['dropped', 'failed', 'kept', 'trimmed']
    True
"""

from __future__ import annotations

import io as _io
import json
import os

import pyarrow as pa
import pytest

from wit_builder import io, schema, tario
from wit_builder.stages.base import StageResult

PAYLOADS = (
    "<script>document.title='pwned'</script>",
    "<img src=x onerror=\"document.title='pwned'\">",
    '"><svg onload="document.title=\'pwned\'">',
)
JS_URL = "javascript:document.title='pwned'"
QUERIES = ["cat", "dog", "red car", "tree"]
CAP = 3
# per query: (download status/error, filter drop reason) of each sample, in rank order
PLAN = {
    0: ["ok", "ok", "ok", "ok", "ok", "http_404", "dup"],  # 5 pass the filter, cap 3: 2 trimmed
    1: ["ok", "ok", "not_an_image", "small"],
    2: ["ok", "dup", "http_404"],
    3: ["ok", "ok"],
}
EXPECTED_STATUS = {"kept": 3 + 2 + 1 + 2, "trimmed": 2, "failed": 3, "dropped": 3}


@pytest.fixture(scope="module", autouse=True)
def index_cache(tmp_path_factory):
    """A fresh cache dir for the browser's indexes (XDG_CACHE_HOME) for the test module that
    imports this fixture, so no test reads or writes ~/.cache; its `serve` subprocesses inherit it."""
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("xdg_cache")
        mp.setenv("XDG_CACHE_HOME", str(cache))
        yield cache


COLORS = [(220, 30, 30), (30, 180, 40), (30, 60, 220), (230, 210, 30), (140, 40, 170), (240, 130, 20)]


def _image(i: int, ext: str) -> bytes:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (64, 48), (128, 128, 128))
    ImageDraw.Draw(im).ellipse((8, 6, 56, 42), fill=COLORS[i % len(COLORS)])
    buf = _io.BytesIO()
    im.save(buf, format="PNG" if ext == "png" else "JPEG", quality=90)
    return buf.getvalue()


def write_run(run_dir: str, hostile: bool = False) -> str:
    """Write the run under `run_dir`; returns it. With `hostile`, captions, URLs and the first
    query's text carry PAYLOADS and one URL is JS_URL."""
    queries = list(QUERIES)
    if hostile:
        queries[0] = "cat " + PAYLOADS[0]
    samples, filtered, shard_rows, download_members, shard_members = [], [], [], [], []
    counts = []
    n = 0
    for qid, fates in PLAN.items():
        passed = 0
        for pos, fate in enumerate(fates):
            key = f"{n:016x}"
            ext = "png" if n % 5 == 4 else "jpg"
            caption = f"a {queries[qid]} number {pos}"
            url = f"http://img.example/{key}.{ext}"
            if hostile:
                caption = f"{caption} {PAYLOADS[n % len(PAYLOADS)]}"
                url = JS_URL if n % 4 == 1 else f"https://img.example/{PAYLOADS[n % len(PAYLOADS)]}.{ext}"
            failed = fate in ("http_404", "not_an_image")
            row = {
                "key": key, "uid": key, "url": url, "caption": caption, "query_id": qid,
                "query_text": queries[qid], "query_ids": [qid], "rank": (pos + 0.5) / 10, "shard": "00000",
                "status": "failed" if failed else "success", "error": fate if failed else None,
                "width": None if failed else 64, "height": None if failed else 48,
                "original_width": None if failed else 640, "original_height": None if failed else 480,
                "bytes": None, "sha256": None,
            }  # fmt: skip
            if not failed:
                data = _image(n, ext)
                row["bytes"] = len(data)
                download_members += [(f"{key}.{ext}", data), (f"{key}.txt", caption.encode())]
                reason = {"dup": "duplicate_exact", "small": "too_small"}.get(fate)
                filtered.append({"key": key, "uid": key, "shard": "00000", "drop_reason": reason, "lang": "en"})
                if reason is None:
                    passed += 1
                    if passed <= CAP:
                        shard_rows.append(
                            {
                                "key": key,
                                "tar": "000000.tar",
                                "uid": key,
                                "url": url,
                                "caption": caption,
                                "query_id": qid,
                                "query_text": queries[qid],
                                "query_ids": [qid],
                                "width": 64,
                                "height": 48,
                                "sha256": None,
                                "clip_score": None,
                            }  # fmt: skip
                        )
                        shard_members += [(f"{key}.{ext}", data), (f"{key}.txt", caption.encode())]
            samples.append(row)
            n += 1
        counts.append({"query_id": qid, "containing": len(fates) + 2, "attributed": len(fates)})
    selected = [
        {k: r[k] for k in ("uid", "url", "caption", "query_ids", "query_id", "rank", "query_text")}
        | {"source_file": "urls.parquet", "page_url": None}
        for r in samples
    ]
    q_rows = [{"query_id": i, "text": t, "source": "list", "count": None} for i, t in enumerate(queries)]
    io.write_parquet(pa.Table.from_pylist(q_rows, schema.QUERIES), io.join(run_dir, "queries", "queries.parquet"))
    io.write_parquet(
        pa.Table.from_pylist(selected, schema.SELECTED), io.join(run_dir, "selected", "part-00000.parquet")
    )
    io.write_parquet(pa.Table.from_pylist(counts), io.join(run_dir, "selected", "query_counts.parquet"))
    io.write_parquet(pa.Table.from_pylist(samples, schema.SAMPLES), io.join(run_dir, "download", "00000.parquet"))
    tario.write_tar(io.join(run_dir, "download", "00000.tar"), sorted(download_members))
    f_schema = schema.FILTERED.append(pa.field("lang", pa.string()))
    io.write_parquet(pa.Table.from_pylist(filtered, f_schema), io.join(run_dir, "filtered", "00000.parquet"))
    io.write_parquet(
        pa.Table.from_pylist(sorted(shard_rows, key=lambda r: r["key"]), schema.SHARD_SAMPLES),
        io.join(run_dir, "shards", "metadata", "000000.parquet"),
    )
    tario.write_tar(io.join(run_dir, "shards", "000000.tar"), sorted(shard_members))
    matched = sum(c["containing"] for c in counts)
    n_ok = sum(r["status"] == "success" for r in samples)
    n_passed = sum(r["drop_reason"] is None for r in filtered)

    def errors(values: list) -> dict[str, int]:
        return {v: values.count(v) for v in sorted(set(values) - {None})}

    results = {  # the runner's stage markers (runner.SUCCESS), with each stage's accounting
        "queries": StageResult(len(queries), len(queries)),
        "selected": StageResult(matched, len(samples), {"over_cap": matched - len(samples)}),
        "download": StageResult(len(samples), n_ok, errors([r["error"] for r in samples])),
        "filtered": StageResult(n_ok, n_passed, errors([r["drop_reason"] for r in filtered])),
        "shards": StageResult(n_passed, len(shard_rows), {"over_cap": n_passed - len(shard_rows)}),
    }
    for stage_dir, result in results.items():
        result.check_accounting()
        io.write_json({"fingerprint": "test", "result": result.to_json()}, io.join(run_dir, stage_dir, "_SUCCESS.json"))
    io.write_json({"source": "pipelines/demo.toml", "overrides": [], "resolved": {}}, io.join(run_dir, "pipeline.json"))
    return run_dir


def hostile_dir(base: str) -> str:
    """A run directory under `base` whose path carries two payloads (one holds a '/', so it
    spans two directory levels)."""
    path = os.path.join(base, PAYLOADS[1], PAYLOADS[0])
    os.makedirs(path, exist_ok=True)
    return path


if __name__ == "__main__":
    import sys

    print(json.dumps(write_run(sys.argv[1], hostile="--hostile" in sys.argv)))
