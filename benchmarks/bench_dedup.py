"""The filter stage's global dedup: out-of-core DuckDB (`filters.dedup_global`) vs the in-memory
numpy reference (`find_duplicates` of tests/dedup_reference.py over every row at once), same rows,
same rule.

Synthetic feature files: N rows in parts of 100k, uids distinct random 64-bit hex, sha256 drawn
from 4N values (~12% exact duplicates), phash from N/2 cluster centres with 0-1 random bit flips
(near duplicates), 10% of rows already dropped by a per-sample reason. Each method runs in a
fresh process; figures: seconds, peak RSS of that process (ru_maxrss), and agreement.

Run:
    .venv/bin/python benchmarks/bench_dedup.py --rows 5000000 --memory-limit 1GB
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))  # dedup_reference: the in-memory reference

PART = 100_000


def write_parts(folder: str, rows: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    uids = rng.choice(np.iinfo(np.int64).max, size=rows, replace=False).astype(np.uint64)
    centres = rng.integers(0, 1 << 63, size=max(1, rows // 2), dtype=np.uint64)
    flips = np.left_shift(np.uint64(1), rng.integers(0, 64, size=rows).astype(np.uint64))
    ph = centres[rng.integers(0, len(centres), size=rows)] ^ np.where(rng.random(rows) < 0.5, flips, np.uint64(0))
    sha = rng.integers(0, 4 * rows, size=rows)  # ~12% exact duplicates
    dropped = rng.random(rows) < 0.1
    paths = []
    for k, a in enumerate(range(0, rows, PART)):
        b = min(rows, a + PART)
        path = os.path.join(folder, f"{k:05d}.parquet")
        pq.write_table(
            pa.table(
                {
                    "uid": [f"{int(u):016x}" for u in uids[a:b]],
                    "reason": pa.array(np.where(dropped[a:b], "too_small", None).tolist(), pa.string()),
                    "sha256": [f"{int(s):064x}" for s in sha[a:b]],
                    "phash": pa.array(ph[a:b], pa.uint64()),
                }
            ),
            path,
        )
        paths.append(path)
    return paths


def run_duckdb(paths: list[str], distance: int, memory_limit: str, tmp: str, out: mp.Queue) -> None:
    from wit_builder.filters.dedup_global import duplicate_marks

    start = time.perf_counter()
    marks = (
        (uid, reason)
        for _, uid, reason in duplicate_marks(
            paths, exact=True, max_distance=distance, tmp_dir=tmp, memory_limit=memory_limit
        )
    )
    digest = _digest(marks)  # streamed, as the stage consumes them
    seconds = time.perf_counter() - start
    out.put(("duckdb", seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, digest))


def run_in_memory(paths: list[str], distance: int, out: mp.Queue) -> None:
    import pyarrow.compute as pc

    from dedup_reference import find_duplicates

    start = time.perf_counter()
    table = pa.concat_tables([pq.read_table(p) for p in paths])
    table = table.filter(pc.is_null(table["reason"]))
    hexes = table["uid"].to_pylist()
    uids = np.array([int(u, 16) for u in hexes], dtype=np.uint64)
    exact, near = find_duplicates(uids, table["sha256"], table["phash"].to_numpy(), distance)
    marks = [(hexes[i], "duplicate_exact") for i in np.flatnonzero(exact)]
    marks += [(hexes[i], "duplicate_near") for i in np.flatnonzero(near)]
    seconds = time.perf_counter() - start
    out.put(("in-memory", seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, _digest(marks)))


def _digest(marks) -> tuple[int, int, int]:
    """(count, near count, order-free hash) of a stream of (uid, reason)."""
    import hashlib

    n = near = total = 0
    for uid, reason in marks:
        n += 1
        near += reason == "duplicate_near"
        total += int.from_bytes(hashlib.blake2b(f"{uid}{reason}".encode(), digest_size=8).digest(), "big")
    return n, near, total % (1 << 64)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--distance", type=int, default=4)
    ap.add_argument("--memory-limit", default="1GB", help="DuckDB's limit")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bench-dedup-") as tmp:
        t0 = time.perf_counter()
        paths = write_parts(tmp, args.rows)
        print(
            f"{args.rows:,} rows in {len(paths)} parts written in {time.perf_counter() - t0:.1f}s; "
            f"distance {args.distance}, DuckDB memory_limit {args.memory_limit}"
        )
        results = {}
        for name, target, extra in (("duckdb", run_duckdb, (args.memory_limit, tmp)), ("in-memory", run_in_memory, ())):
            q: mp.Queue = ctx.Queue()
            p = ctx.Process(target=target, args=(paths, args.distance, *extra, q))
            p.start()
            got = q.get()
            p.join()
            results[name] = got
            _, sec, rss_kb, (n, n_near, _) = got
            print(f"  {name:<10} {sec:7.1f} s  peak RSS {rss_kb / 1024:7.0f} MB  duplicates {n:,} (near {n_near:,})")
        d, m = results["duckdb"], results["in-memory"]
        print(f"agree: {d[3] == m[3]}; duckdb/in-memory: time {d[1] / m[1]:.2f}x, peak RSS {d[2] / m[2]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
