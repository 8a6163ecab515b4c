"""`shards` stage: repack the kept samples into the final webdataset tars + manifest.

Reads filtered/{shard}.parquet (kept = drop_reason null), download/{shard}.parquet + .tar,
selected/part-*.parquet (the `rank` of each pair) and queries/queries.parquet (query texts);
writes shards/{n:06d}.tar, shards/metadata/{n:06d}.parquet (schema.SHARD_SAMPLES) and
shards/manifest.json.

Steps, each bounded in memory:
1. per download shard (Ray task): the kept rows, joined with their download row, and where each
   kept image lies in the download tar (byte offset, size) -> shards/_work/{shard}.parquet.
   Only tar headers are read here, no image bytes.
2. one DuckDB query (spills to disk past `memory_limit`): trim each query back to its cap
   (`cap`, default [balance] cap: per attributed query_id keep the `cap` pairs with the
   smallest balance `rank`, ties by uid; SAMPLES has no rank, so it is joined back from
   selected/, and a pair missing there gets blake2b(uid, query_id, seed) as rank), sort by key,
   cut into runs of `samples_per_shard` -> shards/_plan/{n:06d}.parquet.
3. per output tar (Ray task): copy each image's bytes from its download tar (seek + read, one
   sample at a time), write {key}.{jpg|png|webp}, {key}.json, {key}.txt in key order with fixed
   tar headers (mtime 0, uid/gid 0, no user names, mode 0644, ustar) -> byte-identical on rerun;
   plus the metadata parquet. A tar whose tar and metadata exist is not rewritten on resume.
4. manifest.json (tool_version, seed, config_hash, totals, per tar samples/bytes/sha256);
   the _work and _plan folders are removed.

Each sample's {key}.json: uid, key, url, query_id, query_text, query_ids, width, height, sha256,
and clip_score when the filter computed one.

Example:
    >>> from wit_builder.config import from_dict
    >>> from_dict(Config, {"samples_per_shard": 5000}, "x [shards]").samples_per_shard
    5000
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterable

import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from wit_builder import io, schema
from wit_builder.config import ConfigError
from wit_builder.stages.base import StageContext, StageResult
from wit_builder.stages.filter import remove_stale_tmp

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SHARD_RE = re.compile(r"^(\d+)\.parquet$")
WORK_DIR = "_work"
PLAN_DIR = "_plan"
MANIFEST = "manifest.json"
BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 10240: tar files are padded to whole records, as tarfile does


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

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")
        if self.cap < 0:
            raise ValueError("cap must be >= 0 (0 = [balance] cap)")
        if not re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]i?B", self.memory_limit):
            raise ValueError(f"memory_limit must look like '2GB' or '512MiB', got {self.memory_limit!r}")


# ---------------------------------------------------------------- deterministic tar writing


def tar_member(name: str, data: bytes) -> bytes:
    """One ustar member with fixed header fields, padded to 512 bytes.

    >>> len(tar_member("k.txt", b"hi"))
    1024
    """
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    header = info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")
    return header + data + b"\0" * (-len(data) % BLOCK)


class TarOut:
    """Stream members into a tar (atomically: temp name, rename on close), hashing as it goes.

    >>> import tempfile, os, tarfile
    >>> p = os.path.join(tempfile.mkdtemp(), "a.tar")
    >>> with TarOut(p) as t:
    ...     t.add("k.txt", b"hello")
    >>> tarfile.open(p).getnames(), t.bytes == os.path.getsize(p)
    (['k.txt'], True)
    """

    def __init__(self, path: str):
        self.path = path
        self.tmp = io._tmp_name(path)
        self.bytes = 0
        self.sha = hashlib.sha256()
        self._f: BinaryIO | None = None

    def __enter__(self) -> "TarOut":
        if "/" in self.path:
            io.makedirs(self.path.rsplit("/", 1)[0])
        self._f = fsspec.open(self.tmp, "wb").open()
        return self

    def _write(self, b: bytes) -> None:
        assert self._f is not None
        self._f.write(b)
        self.sha.update(b)
        self.bytes += len(b)

    def add(self, name: str, data: bytes) -> None:
        self._write(tar_member(name, data))

    def __exit__(self, exc_type, *rest) -> None:
        assert self._f is not None
        if exc_type is None:
            end = self.bytes + 2 * BLOCK
            self._write(b"\0" * (end - self.bytes + (-end % RECORD)))
        self._f.close()
        if exc_type is None:
            io._commit(self.tmp, self.path)
        else:
            io.remove(self.tmp)

    @property
    def sha256(self) -> str:
        return self.sha.hexdigest()


def file_sha256(path: str) -> tuple[int, str]:
    """(size, sha256) of a file, streamed."""
    h, n = hashlib.sha256(), 0
    with fsspec.open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


# ---------------------------------------------------------------- step 1: kept rows + offsets


def image_offsets(tar_path: str, wanted: set[str]) -> dict[str, tuple[int, int, str]]:
    """key -> (data offset, size, ext) of the image member of each wanted key; headers only."""
    out: dict[str, tuple[int, int, str]] = {}
    with fsspec.open(tar_path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for m in tar:
            key, _, ext = m.name.rpartition(".")
            if m.isfile() and key in wanted and ext.lower() in IMAGE_EXTS:
                out[key] = (m.offset_data, m.size, ext.lower())
    return out


def fallback_rank(uid: str, query_id: int, seed: int) -> float:
    """A uniform [0, 1) draw from (uid, query_id, seed), for a pair absent from selected/.

    >>> 0 <= fallback_rank("1da8d4821056da7a", 3, 0) < 1
    True
    """
    digest = hashlib.blake2b(f"{uid}\x1f{query_id}\x1f{seed}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


WORK_COLUMNS = ["key", "uid", "url", "caption", "query_id", "query_ids", "width", "height", "sha256"]


def collect_shard(job: tuple[str, str, str, str, int]) -> dict[str, int]:
    """Step 1 for one download shard. `job` = (filtered parquet, download parquet, download tar,
    output work parquet, seed). Returns {"kept": n, "missing_image": m}."""
    filtered_path, download_path, tar_path, out_path, seed = job
    filtered = io.read_parquet(filtered_path)
    kept = filtered.filter(pc.is_null(filtered["drop_reason"]))
    clip = dict(zip(kept["key"].to_pylist(),
                    kept["clip_score"].to_pylist() if "clip_score" in kept.column_names else [None] * kept.num_rows))
    samples = io.read_parquet(download_path, columns=WORK_COLUMNS)
    samples = samples.filter(pc.is_in(samples["key"], value_set=kept["key"]))
    offsets = image_offsets(tar_path, set(clip)) if clip else {}
    rows = []
    for r in samples.to_pylist():
        where = offsets.get(r["key"])
        if where is None:
            continue
        r.update(clip_score=clip[r["key"]], src_tar=tar_path, offset=where[0], size=where[1], ext=where[2],
                 fallback_rank=fallback_rank(r["uid"], r["query_id"], seed))
        rows.append(r)
    table = pa.Table.from_pylist(rows, schema=WORK_SCHEMA) if rows else WORK_SCHEMA.empty_table()
    io.write_parquet(table, out_path)
    return {"kept": kept.num_rows, "missing_image": kept.num_rows - len(rows)}


WORK_SCHEMA = pa.schema(
    [schema.SAMPLES.field(n) for n in WORK_COLUMNS]
    + [
        pa.field("clip_score", pa.float32()),
        pa.field("src_tar", pa.string()),
        pa.field("offset", pa.int64()),
        pa.field("size", pa.int64()),
        pa.field("ext", pa.string()),
        pa.field("fallback_rank", pa.float64()),
    ]
)


# ---------------------------------------------------------------- step 2: trim + sort + cut


def _dataset(paths: list[str]):
    import pyarrow.dataset as ds

    fs, _ = io.filesystem(paths[0])
    return ds.dataset([io.filesystem(p)[1] for p in paths], format="parquet", filesystem=fs)


def _connect(work_paths: list[str], selected_paths: list[str], queries_path: str, memory_limit: str, tmp: str):
    """A DuckDB connection with views work, sel (uid, query_id, rank) and queries."""
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET memory_limit = '{memory_limit}'")
    con.execute(f"SET temp_directory = '{tmp}'")
    con.register("work", _dataset(work_paths))
    if selected_paths:
        con.register("selected_raw", _dataset(selected_paths))
        con.execute("CREATE VIEW sel AS SELECT uid, query_id, min(rank) AS rank "
                    "FROM selected_raw GROUP BY uid, query_id")
    else:
        con.execute("CREATE TABLE sel (uid VARCHAR, query_id INTEGER, rank DOUBLE)")
    if io.exists(queries_path):
        con.register("queries", _dataset([queries_path]))
    else:
        con.execute("CREATE TABLE queries (query_id INTEGER, text VARCHAR)")
    return con


def _trimmed_in_key_order_sql(cap: int | None) -> str:
    cap_clause = f"WHERE qpos <= {int(cap)}" if cap is not None else ""
    return f"""
        WITH ranked AS (
            SELECT w.*, coalesce(s.rank, w.fallback_rank) AS pair_rank
            FROM work w LEFT JOIN sel s ON s.uid = w.uid AND s.query_id = w.query_id
        ), numbered AS (
            SELECT *, row_number() OVER (PARTITION BY query_id ORDER BY pair_rank, uid) AS qpos FROM ranked
        )
        SELECT n.key, n.uid, n.url, n.caption, n.query_id, coalesce(q.text, '') AS query_text,
               n.query_ids, n.width, n.height, n.sha256, n.clip_score, n.src_tar, n."offset", n."size", n.ext
        FROM numbered n LEFT JOIN queries q ON q.query_id = n.query_id
        {cap_clause}
        ORDER BY n.key, n.src_tar
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


def plan(work_paths: list[str], selected_paths: list[str], queries_path: str, cap: int | None,
         samples_per_shard: int, plan_dir: str, memory_limit: str) -> tuple[int, int]:
    """Trim per query, order by key, write plan parts of `samples_per_shard` rows.

    Returns (rows in, rows planned)."""
    import tempfile

    planned = 0
    with tempfile.TemporaryDirectory(prefix="wb-shards-") as tmp:
        con = _connect(work_paths, selected_paths, queries_path, memory_limit, tmp)
        try:
            rows_in = con.sql("SELECT count(*) FROM work").fetchall()[0][0]
            reader = con.sql(_trimmed_in_key_order_sql(cap)).to_arrow_reader(min(samples_per_shard, 65536))
            for part, table in enumerate(_cut(reader, samples_per_shard)):
                io.write_parquet(table, io.join(plan_dir, f"{part:06d}.parquet"))
                planned += table.num_rows
        finally:
            con.close()
    return rows_in, planned


# ---------------------------------------------------------------- step 3: write one tar


def sample_json(r: dict[str, Any]) -> bytes:
    """The {key}.json member: sorted keys, no whitespace, so reruns give the same bytes."""
    meta = {
        "key": r["key"], "uid": r["uid"], "url": r["url"], "query_id": r["query_id"],
        "query_text": r["query_text"], "query_ids": list(r["query_ids"]),
        "width": r["width"], "height": r["height"], "sha256": r["sha256"],
    }
    if r.get("clip_score") is not None:
        meta["clip_score"] = r["clip_score"]
    return json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def _members(r: dict[str, Any], image: bytes) -> Iterable[tuple[str, bytes]]:
    return sorted([
        (f"{r['key']}.{r['ext']}", image),
        (f"{r['key']}.json", sample_json(r)),
        (f"{r['key']}.txt", r["caption"].encode("utf-8", "surrogatepass")),
    ])


MAX_OPEN_SOURCES = 64  # download tars kept open by one writer task (key order jumps between them)


class _OpenFiles:
    """A small LRU of open read handles, so a run with thousands of download tars stays under
    the open-file limit."""

    def __init__(self, limit: int):
        from collections import OrderedDict

        self.limit = limit
        self.files: "OrderedDict[str, BinaryIO]" = OrderedDict()

    def get(self, path: str) -> BinaryIO:
        f = self.files.pop(path, None)
        if f is None:
            f = fsspec.open(path, "rb").open()
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
        with TarOut(tar_path) as out:
            for r in rows:
                f = sources.get(r["src_tar"])
                f.seek(r["offset"])
                image = f.read(r["size"])
                if len(image) != r["size"]:
                    raise IOError(f"{r['src_tar']}: short read for {r['key']} (download tar changed?)")
                for name, data in _members(r, image):
                    out.add(name, data)
    finally:
        sources.close()
    meta = planned.drop_columns(["src_tar", "offset", "size", "ext"])
    meta = meta.append_column("tar", pa.array([tar_name] * len(rows), pa.string()))
    io.write_parquet(meta, meta_path, schema.SHARD_SAMPLES)
    return {"samples": len(rows), "bytes": out.bytes, "sha256": out.sha256}


# ---------------------------------------------------------------- the stage


def _cap(ctx: StageContext, cfg: Config) -> int | None:
    if not cfg.trim_to_cap:
        return None
    if cfg.cap:
        return cfg.cap
    balance = ctx.configs.get("balance")
    cap = getattr(balance, "cap", None)
    if not cap:
        raise ConfigError("[shards] trim_to_cap needs a cap: set [shards] cap or [balance] cap "
                          "(or trim_to_cap = false)")
    return int(cap)


def run(ctx: StageContext, cfg: Config) -> StageResult:
    """Trim, sort and repack the kept samples; see the module docstring for the steps."""
    from wit_builder import __version__, parallel

    cap = _cap(ctx, cfg)
    filtered_dir, download_dir = ctx.stage_dir("filter"), ctx.stage_dir("download")
    out_dir = ctx.stage_dir("shards")
    work_dir, plan_dir = io.join(out_dir, WORK_DIR), io.join(out_dir, PLAN_DIR)
    names = [m.group(1) for p in io.listdir(filtered_dir, ".parquet")
             if (m := SHARD_RE.match(p.rsplit("/", 1)[-1]))]
    jobs = [(io.join(filtered_dir, f"{n}.parquet"), io.join(download_dir, f"{n}.parquet"),
             io.join(download_dir, f"{n}.tar"), io.join(work_dir, f"{n}.parquet"), ctx.seed) for n in names]
    for d in (out_dir, io.join(out_dir, "metadata"), work_dir):
        remove_stale_tmp(d)
    counts = {"kept": 0, "missing_image": 0}
    todo = [j for j in jobs if ctx.force or not io.exists(j[3])]
    for job in jobs:
        if job not in todo:  # done before a crash: count from its work file and filter file
            n_kept = io.read_parquet(job[0], columns=["drop_reason"])["drop_reason"].null_count
            n_work = io.read_parquet(job[3], columns=["key"]).num_rows
            counts["kept"] += n_kept
            counts["missing_image"] += n_kept - n_work
    if todo:
        for _, c in parallel.map_tasks(collect_shard, todo, desc="shards: index", progress=ctx.progress,
                                       unit="shard"):
            counts["kept"] += c["kept"]
            counts["missing_image"] += c["missing_image"]
    io.remove(plan_dir)
    work_paths = [j[3] for j in jobs]
    selected_paths = [p for p in io.listdir(ctx.stage_dir("balance"), ".parquet")
                      if p.rsplit("/", 1)[-1].startswith("part-")]
    if work_paths:
        rows_in, planned = plan(work_paths, selected_paths, io.join(ctx.stage_dir("queries"), "queries.parquet"),
                                cap, cfg.samples_per_shard, plan_dir, cfg.memory_limit)
    else:
        rows_in, planned = 0, 0
    plans = io.listdir(plan_dir, ".parquet")
    write_jobs = []
    for p in plans:
        n = p.rsplit("/", 1)[-1].split(".")[0]
        write_jobs.append((p, io.join(out_dir, f"{n}.tar"), io.join(out_dir, "metadata", f"{n}.parquet")))
    done: dict[str, dict[str, Any]] = {}
    todo_w = []
    for job in write_jobs:
        if not ctx.force and io.exists(job[1]) and io.exists(job[2]):
            size, digest = file_sha256(job[1])
            samples = io.read_parquet(job[2], columns=["key"]).num_rows
            done[job[1]] = {"samples": samples, "bytes": size, "sha256": digest}
        else:
            todo_w.append(job)
    if todo_w:
        for job, r in parallel.map_tasks(write_shard, todo_w, desc="shards: write", progress=ctx.progress,
                                         unit="tar"):
            done[job[1]] = r
    tars = [{"path": job[1].rsplit("/", 1)[-1], **done[job[1]]} for job in write_jobs]
    manifest = {
        "tool_version": __version__,
        "seed": ctx.seed,
        "config_hash": ctx.configs.get("_config_hash", ""),
        "total_samples": sum(t["samples"] for t in tars),
        "total_bytes": sum(t["bytes"] for t in tars),
        "tars": tars,
    }
    written = manifest["total_samples"]
    if written != planned:  # a tar left by another plan: a bug or a hand-edited run dir
        raise RuntimeError(f"shards: tars hold {written} samples but {planned} were planned; rerun with --force")
    io.write_json(manifest, io.join(out_dir, MANIFEST))
    io.remove(plan_dir)
    io.remove(work_dir)
    dropped = {"over_cap": rows_in - planned}
    if counts["missing_image"]:
        dropped["missing_image"] = counts["missing_image"]
    return StageResult(
        rows_in=counts["kept"], rows_out=written, dropped=dropped,
        extra={"tars": len(tars), "total_bytes": manifest["total_bytes"], "cap": cap},
    )
