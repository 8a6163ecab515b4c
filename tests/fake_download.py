"""Fabricate the run-dir state the `filter` and `shards` stages read, without the download stage:
queries/queries.parquet, selected/part-00000.parquet (with rank), download/{shard:05d}.tar +
.parquet (schema.SAMPLES).

Example:
    >>> import tempfile
    >>> s = [FakeSample("http://x/1.jpg", "a red bus in town", query_id=0, image=synthetic_jpeg(1))]
    >>> write_run(tempfile.mkdtemp(), s, queries=["bus"])["download_rows"]
    1
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from PIL import Image

from wit_builder import io as wio
from wit_builder import schema
from wit_builder.tario import TarWriter
from wit_builder.uid import uid as make_uid


def synthetic_image(seed: int, size: tuple[int, int] = (128, 96)) -> Image.Image:
    """A photo-like image: smooth random colour field (distinct perceptual hash per seed)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), "RGB")
    return small.resize(size, Image.Resampling.BICUBIC)


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def synthetic_jpeg(seed: int, size: tuple[int, int] = (128, 96), quality: int = 90) -> bytes:
    return jpeg_bytes(synthetic_image(seed, size), quality)


@dataclass
class FakeSample:
    url: str
    caption: str
    query_id: int
    image: bytes | None = None  # None = a failed download
    query_ids: list[int] = field(default_factory=list)  # default: [query_id]
    rank: float | None = None  # default: a hash of the url

    @property
    def uid(self) -> str:
        return make_uid(self.url, self.caption)


def write_run(
    run_dir: str, samples: list[FakeSample], queries: list[str], shard_size: int = 4, image_ext: str = "jpg"
) -> dict:
    """Write queries/, selected/ and download/ for `samples` (in the given order, `shard_size`
    per download shard). Returns {"download_rows", "successes", "shards"}."""
    wio.write_parquet(
        pa.table(
            {
                "query_id": list(range(len(queries))),
                "text": queries,
                "source": ["list"] * len(queries),
                "count": [None] * len(queries),
            }
        ),
        os.path.join(run_dir, "queries", "queries.parquet"),
        schema.QUERIES,
    )

    def rank_of(s: FakeSample) -> float:
        if s.rank is not None:
            return s.rank
        return int(hashlib.sha256(s.url.encode()).hexdigest()[:12], 16) / 16**12

    wio.write_parquet(
        pa.table(
            {
                "uid": [s.uid for s in samples],
                "url": [s.url for s in samples],
                "caption": [s.caption for s in samples],
                "source_file": ["fake"] * len(samples),
                "page_url": [None] * len(samples),
                "query_ids": [s.query_ids or [s.query_id] for s in samples],
                "query_id": [s.query_id for s in samples],
                "rank": [rank_of(s) for s in samples],
                "query_text": [queries[s.query_id] for s in samples],
            }
        ),
        os.path.join(run_dir, "selected", "part-00000.parquet"),
        schema.SELECTED,
    )
    download = os.path.join(run_dir, "download")
    os.makedirs(download, exist_ok=True)
    shards = 0
    for start in range(0, len(samples), shard_size):
        name = f"{shards:05d}"
        rows, members = [], []
        for s in samples[start : start + shard_size]:
            ok = s.image is not None
            w = h = None
            if ok:
                try:
                    with Image.open(io.BytesIO(s.image)) as im:
                        w, h = im.size
                except OSError:  # a deliberately broken file: claim a plausible size
                    w, h = 128, 96
                members += [
                    (f"{s.uid}.{image_ext}", s.image),
                    (f"{s.uid}.txt", s.caption.encode()),
                    (f"{s.uid}.json", json.dumps({"uid": s.uid, "url": s.url}).encode()),
                ]
            rows.append(
                {
                    "key": s.uid,
                    "uid": s.uid,
                    "url": s.url,
                    "caption": s.caption,
                    "query_id": s.query_id,
                    "query_text": queries[s.query_id],
                    "query_ids": s.query_ids or [s.query_id],
                    "rank": rank_of(s),
                    "shard": name,
                    "status": "success" if ok else "failed",
                    "error": None if ok else "http_404",
                    "width": w,
                    "height": h,
                    "original_width": w,
                    "original_height": h,
                    "bytes": len(s.image) if ok else None,
                    "sha256": hashlib.sha256(s.image).hexdigest() if ok else None,
                }
            )
        with TarWriter(os.path.join(download, f"{name}.tar")) as tar:
            for member, data in members:
                tar.add(member, data)
        wio.write_parquet(pa.Table.from_pylist(rows), os.path.join(download, f"{name}.parquet"), schema.SAMPLES)
        shards += 1
    return {"download_rows": len(samples), "successes": sum(s.image is not None for s in samples), "shards": shards}
