"""`shards` stage: repack the kept samples into the final webdataset tars + manifest.

Reads only its direct inputs: filtered/{shard}.parquet (kept = drop_reason null) and
download/{shard}.parquet + .tar (whose rows carry each pair's balance `rank` and query text);
writes shards/{n:06d}.tar, shards/metadata/{n:06d}.parquet (schema.SHARD_SAMPLES) and
shards/manifest.json.

Steps, each bounded in memory:
1. "index" pass, per download shard: the kept rows, joined with their download row, and where
   each kept image lies in the download tar (byte offset, size) -> shards/_work/index/{shard}.parquet.
   Only tar headers are read here, no image bytes.
2. one DuckDB query (spills to disk past `memory_limit`): trim each query back to its `cap`
   (per attributed query_id keep the `cap` pairs with the smallest balance `rank`, ties by
   uid), sort by key, cut into runs of `samples_per_shard` -> shards/_work/plan/{n:06d}.parquet.
3. "write" pass, per output tar: copy each image's bytes from its download tar (seek + read,
   one sample at a time), write {key}.{jpg|png|webp}, {key}.json, {key}.txt in key order with
   fixed tar headers (wit_builder.tario) -> byte-identical on rerun; plus the metadata parquet.
   The part's marker holds the tar's samples, bytes and sha256.
4. manifest.json (tool_version, seed, config_hash, totals, per tar samples/bytes/sha256, and
   `safety_lists`: the blocklists and opt-out lists the candidates and filter stages applied,
   each with role, name, kind and the sha256 of the list file).

Each sample's {key}.json: uid, key, url, query_id, query_text, query_ids, width, height, sha256,
and clip_score, nsfw_score (filter) and faces_blurred (download) when computed.

Example:
    >>> from wit_builder.config import from_dict
    >>> from_dict(Config, {"samples_per_shard": 5000}, "x [shards]").samples_per_shard
    5000
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, BinaryIO, ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from wit_builder import executor, io, schema, tario
from wit_builder.safety.lists import read_record
from wit_builder.stages.base import StageContext, StageResult

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SHARD_RE = re.compile(r"^(\d+)\.parquet$")
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Config:
    """`[shards]` keys:

    samples_per_shard: samples per final tar (the last tar holds the rest).
    trim_to_cap: trim each query back to its cap after filtering (turns balance's `oversample`
        into full caps of real images); false = keep every kept sample.
    cap: attributed pairs kept per query; 0 = [balance] cap.
    memory_limit: DuckDB memory limit for the trim-and-sort step (it spills to disk past it).
    """

    samples_per_shard: int = 10000
    trim_to_cap: bool = True
    cap: int = 0
    memory_limit: str = "2GB"

    inherit: ClassVar[dict[str, str]] = {"cap": "balance.cap"}  # cap 0 = [balance] cap

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")
        if self.cap < 0:
            raise ValueError("cap must be >= 0 (0 = [balance] cap)")
        if not re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]i?B", self.memory_limit):
            raise ValueError(f"memory_limit must look like '2GB' or '512MiB', got {self.memory_limit!r}")


# ---------------------------------------------------------------- step 1: kept rows + offsets


def image_offsets(tar_path: str, wanted: set[str]) -> dict[str, tuple[int, int, str]]:
    """key -> (data offset, size, ext) of the image member of each wanted key; headers only."""
    out: dict[str, tuple[int, int, str]] = {}
    for name, offset, size in tario.member_offsets(tar_path, lambda n: n.rpartition(".")[0] in wanted):
        key, _, ext = name.rpartition(".")
        if ext.lower() in IMAGE_EXTS:
            out[key] = (offset, size, ext.lower())
    return out


WORK_COLUMNS = [
    "key",
    "uid",
    "url",
    "caption",
    "query_id",
    "query_text",
    "query_ids",
    "rank",
    "width",
    "height",
    "sha256",
]


def collect_shard(job: tuple[str, str, str, str]) -> dict[str, int]:
    """Step 1 for one download shard. `job` = (filtered parquet, download parquet, download tar,
    output work parquet). Returns {"kept": n, "missing_image": m}."""
    filtered_path, download_path, tar_path, out_path = job
    filtered = io.read_parquet(filtered_path)
    kept = filtered.filter(pc.is_null(filtered["drop_reason"]))
    clip = dict(
        zip(
            kept["key"].to_pylist(),
            kept["clip_score"].to_pylist() if "clip_score" in kept.column_names else [None] * kept.num_rows,
        )
    )
    nsfw = dict(
        zip(
            kept["key"].to_pylist(),
            kept["nsfw_score"].to_pylist() if "nsfw_score" in kept.column_names else [None] * kept.num_rows,
        )
    )
    has_faces = "faces_blurred" in io.parquet_schema(download_path).names  # runs before face blurring lack it
    samples = io.read_parquet(download_path, columns=WORK_COLUMNS + ["faces_blurred"] * has_faces)
    samples = samples.filter(pc.is_in(samples["key"], value_set=kept["key"]))
    offsets = image_offsets(tar_path, set(clip)) if clip else {}
    rows = []
    for r in samples.to_pylist():
        where = offsets.get(r["key"])
        if where is None:
            continue
        r.setdefault("faces_blurred", None)
        r.update(
            clip_score=clip[r["key"]],
            nsfw_score=nsfw[r["key"]],
            src_tar=tar_path,
            offset=where[0],
            size=where[1],
            ext=where[2],
        )
        rows.append(r)
    table = pa.Table.from_pylist(rows, schema=WORK_SCHEMA) if rows else WORK_SCHEMA.empty_table()
    io.write_parquet(table, out_path)
    return {"kept": kept.num_rows, "missing_image": kept.num_rows - len(rows)}


WORK_SCHEMA = pa.schema(
    [schema.SAMPLES.field(n) for n in WORK_COLUMNS]
    + [
        pa.field("clip_score", pa.float32()),
        pa.field("nsfw_score", pa.float32()),
        pa.field("faces_blurred", pa.int32()),
        pa.field("src_tar", pa.string()),
        pa.field("offset", pa.int64()),
        pa.field("size", pa.int64()),
        pa.field("ext", pa.string()),
    ]
)


# ---------------------------------------------------------------- step 2: trim + sort + cut


def _dataset(paths: list[str]):
    import pyarrow.dataset as ds

    fs, _ = io.filesystem(paths[0])
    return ds.dataset([io.filesystem(p)[1] for p in paths], format="parquet", filesystem=fs)


def _connect(work_paths: list[str], memory_limit: str, tmp: str):
    """A DuckDB connection with the view `work` over the index files."""
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET memory_limit = '{memory_limit}'")
    con.execute(f"SET temp_directory = '{tmp}'")
    con.register("work", _dataset(work_paths))
    return con


def _trimmed_in_key_order_sql(cap: int | None) -> str:
    cap_clause = f"WHERE qpos <= {int(cap)}" if cap is not None else ""
    return f"""
        WITH numbered AS (
            SELECT *, row_number() OVER (PARTITION BY query_id ORDER BY rank, uid) AS qpos FROM work
        )
        SELECT key, uid, url, caption, query_id, query_text, query_ids, width, height, sha256, clip_score,
               nsfw_score, faces_blurred,
               src_tar, "offset", "size", ext
        FROM numbered
        {cap_clause}
        ORDER BY key, src_tar
    """


def _cut(batches: Iterable[pa.RecordBatch], size: int) -> Iterable[pa.Table]:
    """Regroup a stream of record batches into tables of exactly `size` rows (the last: the rest)."""
    buffer: list[pa.RecordBatch] = []
    buffered = 0
    for batch in batches:
        while batch.num_rows:
            take = min(batch.num_rows, size - buffered)
            buffer.append(batch.slice(0, take))
            buffered += take
            batch = batch.slice(take)
            if buffered == size:
                yield pa.Table.from_batches(buffer).combine_chunks()
                buffer, buffered = [], 0
    if buffered:
        yield pa.Table.from_batches(buffer).combine_chunks()


def plan(
    work_paths: list[str], cap: int | None, samples_per_shard: int, plan_dir: str, memory_limit: str
) -> tuple[int, list[tuple[str, int]]]:
    """Trim per query, order by key, write plan parts of `samples_per_shard` rows.

    Returns (rows in, [(plan part path, rows)])."""
    import tempfile

    parts = []
    with tempfile.TemporaryDirectory(prefix="wb-shards-") as tmp:
        con = _connect(work_paths, memory_limit, tmp)
        try:
            rows_in = con.sql("SELECT count(*) FROM work").fetchall()[0][0]
            reader = con.sql(_trimmed_in_key_order_sql(cap)).to_arrow_reader(min(samples_per_shard, 65536))
            for part, table in enumerate(_cut(reader, samples_per_shard)):
                path = io.join(plan_dir, f"{part:06d}.parquet")
                io.write_parquet(table, path)
                parts.append((path, table.num_rows))
        finally:
            con.close()
    return rows_in, parts


# ---------------------------------------------------------------- step 3: write one tar


def sample_json(r: dict[str, Any]) -> bytes:
    """The {key}.json member: sorted keys, no whitespace, so reruns give the same bytes."""
    meta = {
        "key": r["key"],
        "uid": r["uid"],
        "url": r["url"],
        "query_id": r["query_id"],
        "query_text": r["query_text"],
        "query_ids": list(r["query_ids"]),
        "width": r["width"],
        "height": r["height"],
        "sha256": r["sha256"],
    }
    for extra in ("clip_score", "nsfw_score", "faces_blurred"):
        if r.get(extra) is not None:
            meta[extra] = r[extra]
    return json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def _members(r: dict[str, Any], image: bytes) -> Iterable[tuple[str, bytes]]:
    return sorted(
        [
            (f"{r['key']}.{r['ext']}", image),
            (f"{r['key']}.json", sample_json(r)),
            (f"{r['key']}.txt", r["caption"].encode("utf-8", "surrogatepass")),
        ]
    )


MAX_OPEN_SOURCES = 64  # download tars kept open by one writer task (key order jumps between them)
REMOTE_BLOCK = 4 << 20  # read-ahead per open download tar on an object store (s3fs's default: 50 MB)


class _OpenFiles:
    """A small LRU of open read handles, so a run with thousands of download tars stays under
    the open-file limit."""

    def __init__(self, limit: int):
        from collections import OrderedDict

        self.limit = limit
        self.files: OrderedDict[str, BinaryIO] = OrderedDict()

    def get(self, path: str) -> BinaryIO:
        f = self.files.pop(path, None)
        if f is None:
            # reads within one download tar go forward (both are in key order): a read-ahead
            # block serves many images; a small one keeps 64 open tars' buffers small
            f = io.open_file(path, "rb") if io.is_local(path) else io.open_file(path, "rb", block_size=REMOTE_BLOCK)
            if len(self.files) >= self.limit:
                self.files.popitem(last=False)[1].close()
        self.files[path] = f
        return f

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()


def write_shard(job: tuple[str, str, str]) -> dict[str, Any]:
    """Step 3: (plan parquet, output tar, output metadata parquet) -> {"samples", "bytes", "sha256"}."""
    plan_path, tar_path, meta_path = job
    planned = io.read_parquet(plan_path)
    rows = planned.to_pylist()
    tar_name = tar_path.rsplit("/", 1)[-1]
    sources = _OpenFiles(MAX_OPEN_SOURCES)
    try:
        with tario.TarWriter(tar_path) as out:
            for r in rows:
                f = sources.get(r["src_tar"])
                f.seek(r["offset"])
                image = f.read(r["size"])
                if len(image) != r["size"]:
                    raise OSError(f"{r['src_tar']}: short read for {r['key']} (download tar changed?)")
                for name, data in _members(r, image):
                    out.add(name, data)
    finally:
        sources.close()
    meta = planned.drop_columns(["src_tar", "offset", "size", "ext"])
    meta = meta.append_column("tar", pa.array([tar_name] * len(rows), pa.string()))
    io.write_parquet(meta, meta_path, schema.SHARD_SAMPLES)
    return {"samples": len(rows), "bytes": out.bytes, "sha256": out.sha256}


# ---------------------------------------------------------------- the stage


def run(ctx: StageContext, cfg: Config) -> StageResult:
    """Trim, sort and repack the kept samples; see the module docstring for the steps."""
    from wit_builder import __version__

    cap = cfg.cap if cfg.trim_to_cap else None
    filtered_dir, download_dir = ctx.stage_dir("filter"), ctx.stage_dir("download")
    out_dir = ctx.stage_dir("shards")
    index_dir, plan_dir = io.join(ctx.work_dir("shards"), "index"), io.join(ctx.work_dir("shards"), "plan")
    names = [m.group(1) for p in io.listdir(filtered_dir, ".parquet") if (m := SHARD_RE.match(p.rsplit("/", 1)[-1]))]
    work_paths = [io.join(index_dir, f"{n}.parquet") for n in names]
    index = executor.Pass(
        "index",
        ctx.marker_dir("shards", "index"),
        collect_shard,
        tmp_dirs=(index_dir,),
        desc="shards: index",
        unit="shard",
    )
    indexed = executor.run_pass(
        index,
        [
            executor.Part(
                n,
                (
                    io.join(filtered_dir, f"{n}.parquet"),
                    io.join(download_dir, f"{n}.parquet"),
                    io.join(download_dir, f"{n}.tar"),
                    w,
                ),
            )
            for n, w in zip(names, work_paths)
        ],
        progress=ctx.progress,
    )
    counts = executor.sum_counts(indexed.values())
    io.remove(plan_dir)
    rows_in, plans = plan(work_paths, cap, cfg.samples_per_shard, plan_dir, cfg.memory_limit) if work_paths else (0, [])
    planned = sum(n for _, n in plans)
    write = executor.Pass(
        "write",
        ctx.marker_dir("shards", "write"),
        write_shard,
        tmp_dirs=(out_dir, io.join(out_dir, "metadata")),
        desc="shards: write",
        unit="tar",
    )
    parts = []
    for path, _ in plans:
        n = path.rsplit("/", 1)[-1].split(".")[0]
        parts.append(
            executor.Part(n, (path, io.join(out_dir, f"{n}.tar"), io.join(out_dir, "metadata", f"{n}.parquet")))
        )
    written = executor.run_pass(write, parts, progress=ctx.progress)
    tars = [{"path": f"{name}.tar", **written[name]} for name in written]
    manifest = {
        "tool_version": __version__,
        "seed": ctx.seed,
        "config_hash": ctx.config_hash,
        "total_samples": sum(t["samples"] for t in tars),
        "total_bytes": sum(t["bytes"] for t in tars),
        "tars": tars,
        "safety_lists": read_record(ctx.stage_dir("candidates")) + read_record(ctx.stage_dir("filter")),
    }
    if manifest["total_samples"] != planned:  # a marker left by another plan: a bug or a hand-edited run dir
        raise RuntimeError(
            f"shards: tars hold {manifest['total_samples']} samples but {planned} were planned; rerun with --force"
        )
    io.write_json(manifest, io.join(out_dir, MANIFEST))
    dropped = {"over_cap": rows_in - planned}
    if counts.get("missing_image"):
        dropped["missing_image"] = counts["missing_image"]
    return StageResult(
        rows_in=counts.get("kept", 0),
        rows_out=planned,
        dropped=dropped,
        extra={"tars": len(tars), "total_bytes": manifest["total_bytes"], "cap": cap},
    )
