"""Balance stage: cap every query at `cap` attributed pairs (× `oversample` before download).

Reads matched/part-*.parquet, writes selected/part-*.parquet (schema.SELECTED, same part
names) and selected/query_counts.parquet (query_id, containing, attributed). Memory is bounded
by the block size and the number of queries: every pass streams the parts (Ray tasks, one per
part) and only per-query arrays cross between passes.

Modes (DESIGN.md §2 "Balancing semantics"), t = cap · oversample:
- ``strict`` (default: a hard guarantee, which is what the post-download trim in the shards
  stage relies on): each row is attributed to its rarest query (fewest containing rows, ties:
  lower query_id); per query the min(t, attributed) rows with the smallest hash rank are kept.
  Passes: containing counts; attributed counts; a spill of each head query's small superset
  (rank below a per-query threshold set to hold ~t + 8√t + 16 rows; redone wider in the
  unlikely case it holds fewer than t) from which the exact t-th smallest rank is found;
  the selection. Never more than floor(t) attributed rows per query (uids are unique).
  The driver holds the spilled superset: ~(number of head queries) × (t + 8√t + 16) × 24 bytes
  (e.g. 4,000 heads at t = 20,000: ~2 GB); splitting it by query group is not implemented.
- ``metaclip``: MetaCLIP's rule. A pair (row, q) succeeds when u(uid, q, seed) < min(1, t/c(q));
  a row is kept when any of its pairs succeeds and is attributed to the rarest successful
  query. Tail queries (c(q) <= t) keep every pair. Attributed counts stay <= t·(1+ε) with
  ε = `balancing.metaclip_epsilon(t)` (failure probability <= 1e-9 per query; ε ≈ 0.046 at
  t = 20,000); the stage reports the largest attributed/t it saw.

`rank` in the output is the draw u(uid, attributed query_id, seed) in [0, 1).

Example:
    >>> Config(cap=5).mode
    'strict'
    >>> Config(cap=0)
    Traceback (most recent call last):
    ...
    ValueError: cap must be > 0, got 0
"""

from __future__ import annotations

import functools
import time
import uuid
from dataclasses import dataclass
from typing import Literal

import numpy as np

from wit_builder import balancing, io, schema
from wit_builder.stages.base import StageContext, StageResult


@dataclass(frozen=True)
class Config:
    """`[balance]` keys.

    cap: pairs per query after download (the shards stage trims to it); default 20000.
    mode: "strict" (default; exact cap) | "metaclip" (MetaCLIP's probabilistic rule).
    oversample: select up to cap · oversample per query before download (>= 1.0).
    batch_rows: rows per record batch read from a matched part.
    """

    cap: int = 20000
    mode: Literal["strict", "metaclip"] = "strict"
    oversample: float = 1.0
    batch_rows: int = 262144

    def __post_init__(self) -> None:
        if self.cap <= 0:
            raise ValueError(f"cap must be > 0, got {self.cap}")
        if not self.oversample >= 1.0:  # also rejects NaN
            raise ValueError(f"oversample must be >= 1.0, got {self.oversample}")
        if self.batch_rows <= 0:
            raise ValueError(f"batch_rows must be > 0, got {self.batch_rows}")


# -------------------------------------------------------------------- per-part work (Ray tasks)


def save_arrays(path: str, **arrays: np.ndarray) -> str:
    """Per-query arrays for the tasks go through a file (written once, read by each worker)
    rather than being pickled into every task."""
    import io as _io

    buf = _io.BytesIO()
    np.savez(buf, **arrays)
    io.write_bytes(buf.getvalue(), path)
    return path


@functools.lru_cache(maxsize=4)
def load_arrays(path: str) -> dict[str, np.ndarray]:
    import io as _io

    fs, inner = io.filesystem(path)
    with fs.open(inner, "rb") as f:
        data = np.load(_io.BytesIO(f.read()))
        return {k: data[k] for k in data.files}


def _blocks(path: str, batch_rows: int, columns: list[str] | None = ("uid", "query_ids")):
    """Yield (record batch, offsets, qids, uid64) per block of a matched part."""
    import pyarrow as pa

    for batch in io.iter_parquet_batches(path, columns=list(columns) if columns else None, batch_size=batch_rows):
        lists = batch.column("query_ids")
        if isinstance(lists, pa.ChunkedArray):  # pragma: no cover - batches are single-chunk
            lists = lists.combine_chunks()
        offsets = np.asarray(lists.offsets, dtype=np.int64)
        qids = np.asarray(lists.values.slice(offsets[0], offsets[-1] - offsets[0]), dtype=np.int64)
        offsets = offsets - offsets[0]
        yield batch, offsets, qids, balancing.uids_to_u64(batch.column("uid"))


def count_part(task: tuple[str, int, int]) -> tuple[int, np.ndarray]:
    """Pass 1: (rows, containing count per query) of one part."""
    path, batch_rows, num_queries = task
    counts = np.zeros(num_queries, dtype=np.int64)
    rows = 0
    for batch, _, qids, _ in _blocks(path, batch_rows):
        rows += batch.num_rows
        if len(qids):
            if qids.max() >= num_queries or qids.min() < 0:
                raise ValueError(f"{path}: query id out of range 0..{num_queries - 1}")
            counts += np.bincount(qids, minlength=num_queries)
    return rows, counts


def attributed_part(task: tuple[str, int, str]) -> np.ndarray:
    """Strict pass 2: rows attributed (rarest query) to each query in one part."""
    path, batch_rows, arrays = task
    counts = load_arrays(arrays)["counts"]
    out = np.zeros(len(counts), dtype=np.int64)
    for _, offsets, qids, _ in _blocks(path, batch_rows):
        a = balancing.attribute_rarest(offsets, qids, counts)
        out += np.bincount(a[a >= 0], minlength=len(counts))
    return out


def superset_part(task: tuple[str, int, str, str, int]):
    """Strict pass 3: (query, hash, uid) of the rows under each head query's draw threshold
    (`fraction` per query: 0 = none, >= 1 = all)."""
    path, batch_rows, counts_file, fraction_file, seed = task
    counts, fraction = load_arrays(counts_file)["counts"], load_arrays(fraction_file)["fraction"]
    qs, hs, us = [], [], []
    limit = np.where(fraction >= 1.0, np.inf, fraction)
    for _, offsets, qids, uid64 in _blocks(path, batch_rows):
        a = balancing.attribute_rarest(offsets, qids, counts)
        ok = a >= 0
        a, uid64 = a[ok], uid64[ok]
        h = balancing.pair_hash(uid64, a, seed)
        take = balancing.to_unit(h) < limit[a]
        qs.append(a[take])
        hs.append(h[take])
        us.append(uid64[take])
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
    return cat(qs, np.int64), cat(hs, np.uint64), cat(us, np.uint64)


def select_part(task: tuple[dict, str, str, str, int]) -> tuple[int, int, np.ndarray]:
    """Final pass: write one selected part; returns (rows in, rows out, attributed per query)."""
    import pyarrow as pa

    plan, arrays_file, src, dst, batch_rows = task
    plan = {**plan, **load_arrays(arrays_file)}
    counts = plan["counts"]
    attributed_counts = np.zeros(len(counts), dtype=np.int64)
    rows_in = 0

    def batches():
        nonlocal rows_in
        for batch, offsets, qids, uid64 in _blocks(src, batch_rows, columns=None):
            rows_in += batch.num_rows
            if plan["mode"] == "metaclip":
                keep, a, rank = balancing.metaclip_select(offsets, qids, uid64, counts, plan["target"], plan["seed"])
            else:
                a = balancing.attribute_rarest(offsets, qids, counts)
                safe = np.maximum(a, 0)
                h = balancing.pair_hash(uid64, safe, plan["seed"])
                keep = (a >= 0) & balancing.within_threshold(h, uid64, plan["thr_h"][safe], plan["thr_u"][safe])
                rank = balancing.to_unit(h)
            if not keep.any():
                continue
            attributed_counts[:] += np.bincount(a[keep], minlength=len(counts))
            table = pa.Table.from_batches([batch])
            table = table.append_column("query_id", pa.array(a.astype(np.int32)))
            table = table.append_column("rank", pa.array(rank.astype(np.float64)))
            yield from table.filter(pa.array(keep)).to_batches()

    out_schema = _output_schema(_parquet_schema(src))
    # extra url-list columns may hold nulls: write every column as nullable
    nullable = pa.schema([f.with_nullable(True) for f in out_schema])
    rows_out = io.write_parquet_batches(batches(), dst, nullable)
    return rows_in, rows_out, attributed_counts


def _parquet_schema(path: str):
    import pyarrow.parquet as pq

    fs, inner = io.filesystem(path)
    with fs.open(inner, "rb") as f:
        return pq.ParquetFile(f).schema_arrow


def _output_schema(matched_schema):
    out = schema.SELECTED
    for f in matched_schema:
        if f.name not in out.names:
            out = out.append(f)
    return out


def recount_selected(task: tuple[str, int]) -> tuple[int, np.ndarray]:
    """Attributed counts of an already written selected part (resume)."""
    path, num_queries = task
    table = io.read_parquet(path, columns=["query_id"])
    q = table.column("query_id").to_numpy()
    return table.num_rows, np.bincount(q, minlength=num_queries)


# ------------------------------------------------------------------------------- the driver


def _num_queries(ctx: StageContext, parts: list[str], batch_rows: int) -> int:
    qpath = io.join(ctx.stage_dir("queries"), "queries.parquet")
    if io.exists(qpath):
        return int(io.read_parquet(qpath, columns=["query_id"]).num_rows)
    top = -1
    for p in parts:
        for _, _, qids, _ in _blocks(p, batch_rows):
            if len(qids):
                top = max(top, int(qids.max()))
    return top + 1


def strict_thresholds(ctx: StageContext, cfg: Config, parts: list[str], counts: np.ndarray, scratch: str):
    """Strict passes 2-3: attributed counts, then exact per-query (hash, uid) thresholds."""
    from wit_builder import parallel

    quota = balancing.strict_quota(cfg.cap, cfg.oversample)
    attributed = np.zeros(len(counts), dtype=np.int64)
    counts_file = save_arrays(io.join(scratch, "counts.npz"), counts=counts)
    tasks = [(p, cfg.batch_rows, counts_file) for p in parts]
    for _, a in parallel.map_tasks(attributed_part, tasks, desc="balance: attribute", progress=ctx.progress):
        attributed += a
    thr_h = np.full(len(counts), np.iinfo(np.uint64).max, dtype=np.uint64)
    thr_u = thr_h.copy()
    head = attributed > quota
    fraction = np.where(head, balancing.superset_fraction(attributed, quota), 1.0)
    rounds = 0
    while head.any():
        rounds += 1
        spill = save_arrays(io.join(scratch, f"fraction-{rounds}.npz"), fraction=np.where(head, fraction, 0.0))
        tasks = [(p, cfg.batch_rows, counts_file, spill, ctx.seed) for p in parts]
        qs, hs, us = [], [], []
        for _, (q, h, u) in parallel.map_tasks(superset_part, tasks, desc="balance: threshold", progress=ctx.progress):
            qs.append(q), hs.append(h), us.append(u)
        q, h, u = np.concatenate(qs), np.concatenate(hs), np.concatenate(us)
        th, tu, have = balancing.kth_smallest_per_query(q, h, u, quota, len(counts))
        done = head & (have >= quota)
        thr_h[done], thr_u[done] = th[done], tu[done]
        head = head & ~done
        fraction = np.minimum(1.0, fraction * 4.0)  # rare: widen and spill again for those left
    return attributed, thr_h, thr_u, rounds


def run(ctx: StageContext, cfg: Config) -> StageResult:
    """Count, (strict: threshold), select; see the module docstring."""
    import pyarrow as pa

    from wit_builder import parallel

    start = time.perf_counter()
    parts = io.listdir(ctx.stage_dir("match"), ".parquet")
    parts = [p for p in parts if p.rsplit("/", 1)[-1].startswith("part-")]
    out_dir = ctx.stage_dir("balance")
    num_queries = _num_queries(ctx, parts, cfg.batch_rows)
    counts = np.zeros(num_queries, dtype=np.int64)
    rows_in = 0
    for _, (n, c) in parallel.map_tasks(
        count_part, [(p, cfg.batch_rows, num_queries) for p in parts], desc="balance: count", progress=ctx.progress
    ):
        rows_in += n
        counts += c
    target = cfg.cap * cfg.oversample
    scratch = io.join(out_dir, f"_scratch-{uuid.uuid4().hex[:12]}")  # a fresh name: workers cache by path
    plan: dict = {"mode": cfg.mode, "seed": ctx.seed, "target": target}
    arrays = {"counts": counts}
    extra: dict = {"mode": cfg.mode, "cap": cfg.cap, "oversample": cfg.oversample}
    if cfg.mode == "strict":
        _, arrays["thr_h"], arrays["thr_u"], rounds = strict_thresholds(ctx, cfg, parts, counts, scratch)
        extra["quota"] = balancing.strict_quota(cfg.cap, cfg.oversample)
        extra["threshold_rounds"] = rounds
    else:
        extra["epsilon"] = balancing.metaclip_epsilon(target)
    arrays_file = save_arrays(io.join(scratch, "plan.npz"), **arrays)

    todo, done = [], []
    for src in parts:
        dst = io.join(out_dir, src.rsplit("/", 1)[-1])
        (done if io.exists(dst) and not ctx.force else todo).append((src, dst))
    attributed = np.zeros(num_queries, dtype=np.int64)
    rows_out = 0
    if done:  # resumed run: parts already written count as they are
        for _, (n, a) in parallel.map_tasks(
            recount_selected, [(d, num_queries) for _, d in done], desc="balance: resume", progress=ctx.progress
        ):
            rows_out += n
            attributed += a
    for _, (_, n_out, a) in parallel.map_tasks(
        select_part, [(plan, arrays_file, s, d, cfg.batch_rows) for s, d in todo], desc="balance: select",
        progress=ctx.progress,
    ):
        rows_out += n_out
        attributed += a
    io.remove(scratch)
    table = pa.table(
        {
            "query_id": pa.array(np.arange(num_queries, dtype=np.int32)),
            "containing": pa.array(counts),
            "attributed": pa.array(attributed),
        }
    )
    io.write_parquet(table, io.join(out_dir, "query_counts.parquet"))
    busy = counts > 0
    extra["queries_matched"] = int(busy.sum())
    extra["queries_capped"] = int((counts > target).sum())
    extra["max_attributed_over_target"] = float(attributed.max() / target) if num_queries else 0.0
    result = StageResult(
        rows_in=rows_in,
        rows_out=rows_out,
        dropped={"over_cap": rows_in - rows_out},
        seconds=time.perf_counter() - start,
        extra=extra,
    )
    result.check_accounting()
    return result
