"""Balance stage: cap every query at `cap` attributed pairs (× `oversample` before download).

Reads matched/part-*.parquet and queries/queries.parquet, writes selected/part-*.parquet
(schema.SELECTED, same part names; each row also carries the text of the query it counts for,
so later stages need not read the queries) and selected/query_counts.parquet (query_id,
containing, attributed). Memory is bounded by the block size and the number of queries: every
pass is an executor pass over the parts, and only per-query arrays cross between passes, as
files under selected/_work/ (sparse per part; the driver's inputs content-addressed).

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
import hashlib
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

from wit_builder import balancing, executor, io, schema
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


# ------------------------------------------------------------------ per-query arrays as files


def _npz(**arrays: np.ndarray) -> bytes:
    import io as _io

    buf = _io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def read_npz(path: str) -> dict[str, np.ndarray]:
    """Every array of an .npz file (local or fsspec), read whole."""
    import io as _io

    with io.open_file(path, "rb") as f:
        data = np.load(_io.BytesIO(f.read()))
        return {k: data[k] for k in data.files}


def save_arrays(directory: str, **arrays: np.ndarray) -> str:
    """Write per-query arrays the workers read, under a name made of their content (workers
    cache them by path, so a path never holds two contents); returns the path."""
    data = _npz(**arrays)
    path = io.join(directory, f"arrays-{hashlib.sha256(data).hexdigest()[:20]}.npz")
    if not io.exists(path):
        io.write_bytes(data, path)
    return path


load_arrays = functools.lru_cache(maxsize=4)(read_npz)  # per worker: the driver's arrays, by path


def save_sparse(counts: np.ndarray, path: str) -> None:
    """A part's per-query counts, as (index, value) of the non-zero entries."""
    nz = np.flatnonzero(counts)
    io.write_bytes(_npz(index=nz.astype(np.int64), value=counts[nz]), path)


def add_sparse(paths: list[str], size: int) -> np.ndarray:
    """The sum of the parts' sparse counts, read one part at a time."""
    total = np.zeros(size, dtype=np.int64)
    for path in paths:
        data = read_npz(path)
        total[data["index"]] += data["value"]  # indices are unique within a part
    return total


# --------------------------------------------------------------------- per-part work (passes)


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


def count_part(task: tuple[str, int, int, str]) -> dict[str, int]:
    """Pass 1: containing count per query of one part (-> `out`); returns {"rows"}."""
    path, batch_rows, num_queries, out = task
    counts = np.zeros(num_queries, dtype=np.int64)
    rows = 0
    for batch, _, qids, _ in _blocks(path, batch_rows):
        rows += batch.num_rows
        if len(qids):
            if qids.max() >= num_queries or qids.min() < 0:
                raise ValueError(f"{path}: query id out of range 0..{num_queries - 1}")
            counts += np.bincount(qids, minlength=num_queries)
    save_sparse(counts, out)
    return {"rows": rows}


def attributed_part(task: tuple[str, int, str, str]) -> dict[str, int]:
    """Strict pass 2: rows attributed (rarest query) to each query in one part (-> `out`)."""
    path, batch_rows, arrays, out = task
    counts = load_arrays(arrays)["counts"]
    attributed = np.zeros(len(counts), dtype=np.int64)
    for _, offsets, qids, _ in _blocks(path, batch_rows):
        a = balancing.attribute_rarest(offsets, qids, counts)
        attributed += np.bincount(a[a >= 0], minlength=len(counts))
    save_sparse(attributed, out)
    return {"rows": int(attributed.sum())}


def superset_part(task: tuple[str, int, str, str, int, str]) -> dict[str, int]:
    """Strict pass 3: (query, hash, uid) of the rows under each head query's draw threshold
    (`fraction` per query: 0 = none, >= 1 = all) -> `out` (npz)."""

    path, batch_rows, counts_file, fraction_file, seed, out = task
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
    io.write_bytes(_npz(q=cat(qs, np.int64), h=cat(hs, np.uint64), u=cat(us, np.uint64)), out)
    return {"rows": int(sum(len(q) for q in qs))}


def select_part(task: tuple[dict, str, str, str, int, str]) -> dict[str, int]:
    """Final pass: write one selected part (-> `dst`) and its attributed counts (-> `out`);
    returns {"rows_in", "rows_out"}."""
    import pyarrow as pa

    plan, arrays_file, src, dst, batch_rows, out = task
    plan = {**plan, **load_arrays(arrays_file)}
    counts = plan["counts"]
    texts = _query_texts(plan["queries"], len(counts))
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
            kept_q = a[keep]
            attributed_counts[:] += np.bincount(kept_q, minlength=len(counts))
            table = pa.Table.from_batches([batch]).filter(pa.array(keep))
            table = table.append_column("query_id", pa.array(kept_q.astype(np.int32)))
            table = table.append_column("rank", pa.array(rank[keep].astype(np.float64)))
            table = table.append_column("query_text", texts.take(pa.array(kept_q)))
            yield from table.to_batches()

    out_schema = _output_schema(io.parquet_schema(src))
    # extra url-list columns may hold nulls: write every column as nullable
    nullable = pa.schema([f.with_nullable(True) for f in out_schema])
    rows_out = io.write_parquet_batches(batches(), dst, nullable)
    save_sparse(attributed_counts, out)
    return {"rows_in": rows_in, "rows_out": rows_out}


@functools.lru_cache(maxsize=2)
def _query_texts(path: str, num_queries: int):
    """Query texts indexed by query_id ("" for ids the file lacks, or without the file), once
    per worker."""
    import pyarrow as pa

    texts = np.full(num_queries, "", dtype=object)
    if io.exists(path):
        table = io.read_parquet(path, columns=["query_id", "text"])
        ids = table.column("query_id").to_numpy()
        inside = ids < num_queries
        texts[ids[inside]] = np.array(table.column("text").to_pylist(), dtype=object)[inside]
    return pa.array(texts, pa.string())


def _output_schema(matched_schema):
    out = schema.SELECTED
    for f in matched_schema:
        if f.name not in out.names:
            out = out.append(f)
    return out


# ------------------------------------------------------------------------------- the driver


class _Passes:
    """The balance stage's passes over the matched parts: each part's per-pass output lies in
    selected/_work/{pass}/{part}.npz, its marker under selected/_parts/{pass}/."""

    def __init__(self, ctx: StageContext, parts: list[str]):
        self.ctx, self.parts = ctx, parts
        self.work = ctx.work_dir("balance")

    @staticmethod
    def name_of(path: str) -> str:
        return path.rsplit("/", 1)[-1].split(".")[0]

    def out(self, pass_name: str, part: str) -> str:
        return io.join(self.work, pass_name, f"{self.name_of(part)}.npz")

    def run(self, pass_name: str, fn, args_of, desc: str, **kw) -> tuple[list[str], dict]:
        """Run `fn(args_of(part, out))` over every part; returns the outputs, in part order,
        and the parts' counts summed."""
        step = executor.Pass(
            pass_name,
            self.ctx.marker_dir("balance", pass_name),
            fn,
            tmp_dirs=(io.join(self.work, pass_name), *kw.pop("tmp_dirs", ())),
            desc=desc,
            **kw,
        )
        plan = [executor.Part(self.name_of(p), args_of(p, self.out(pass_name, p))) for p in self.parts]
        counts = executor.run_pass(step, plan, progress=self.ctx.progress)
        return [self.out(pass_name, p) for p in self.parts], executor.sum_counts(counts.values())


def _num_queries(queries_path: str, parts: list[str], batch_rows: int) -> int:
    if io.exists(queries_path):
        return int(io.read_parquet(queries_path, columns=["query_id"]).num_rows)
    top = -1
    for p in parts:
        for _, _, qids, _ in _blocks(p, batch_rows):
            if len(qids):
                top = max(top, int(qids.max()))
    return top + 1


def strict_thresholds(passes: _Passes, cfg: Config, counts: np.ndarray, seed: int):
    """Strict passes 2-3: attributed counts, then exact per-query (hash, uid) thresholds."""

    quota = balancing.strict_quota(cfg.cap, cfg.oversample)
    counts_file = save_arrays(passes.work, counts=counts)
    outs, _ = passes.run(
        "attribute", attributed_part, lambda p, o: (p, cfg.batch_rows, counts_file, o), "balance: attribute"
    )
    attributed = add_sparse(outs, len(counts))
    thr_h = np.full(len(counts), np.iinfo(np.uint64).max, dtype=np.uint64)
    thr_u = thr_h.copy()
    head = attributed > quota
    fraction = np.where(head, balancing.superset_fraction(attributed, quota), 1.0)
    rounds = 0
    while head.any():
        rounds += 1
        spill = save_arrays(passes.work, fraction=np.where(head, fraction, 0.0))
        outs, _ = passes.run(
            f"threshold-{rounds}",
            superset_part,
            lambda p, o, spill=spill: (p, cfg.batch_rows, counts_file, spill, seed, o),
            "balance: threshold",
        )
        qs, hs, us = [], [], []
        for data in map(read_npz, outs):
            qs.append(data["q"]), hs.append(data["h"]), us.append(data["u"])
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

    start = time.perf_counter()
    parts = io.listdir(ctx.stage_dir("match"), ".parquet")
    parts = [p for p in parts if p.rsplit("/", 1)[-1].startswith("part-")]
    out_dir = ctx.stage_dir("balance")
    queries_path = io.join(ctx.stage_dir("queries"), "queries.parquet")
    num_queries = _num_queries(queries_path, parts, cfg.batch_rows)
    passes = _Passes(ctx, parts)
    outs, counted = passes.run("count", count_part, lambda p, o: (p, cfg.batch_rows, num_queries, o), "balance: count")
    counts = add_sparse(outs, num_queries)
    rows_in = counted.get("rows", 0)
    target = cfg.cap * cfg.oversample
    plan: dict = {"mode": cfg.mode, "seed": ctx.seed, "target": target, "queries": queries_path}
    arrays = {"counts": counts}
    extra: dict = {"mode": cfg.mode, "cap": cfg.cap, "oversample": cfg.oversample}
    if cfg.mode == "strict":
        _, arrays["thr_h"], arrays["thr_u"], rounds = strict_thresholds(passes, cfg, counts, ctx.seed)
        extra["quota"] = balancing.strict_quota(cfg.cap, cfg.oversample)
        extra["threshold_rounds"] = rounds
    else:
        extra["epsilon"] = balancing.metaclip_epsilon(target)
    arrays_file = save_arrays(passes.work, **arrays)

    def select_args(src: str, out: str):
        return (plan, arrays_file, src, io.join(out_dir, src.rsplit("/", 1)[-1]), cfg.batch_rows, out)

    outs, selected = passes.run("select", select_part, select_args, "balance: select", tmp_dirs=(out_dir,))
    attributed = add_sparse(outs, num_queries)
    rows_out = selected.get("rows_out", 0)
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
