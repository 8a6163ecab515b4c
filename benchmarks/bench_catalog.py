"""The browser's main queries (wit_builder/browse.py) over a synthetic run of N sample rows.

Synthesises a run directory with DuckDB (no images): download/*.parquet (schema.SAMPLES, one
file per 100k-row download shard), filtered/*.parquet, shards/metadata/*.parquet,
selected/query_counts.parquet and queries/queries.parquet, with a skewed query distribution
(query_id = floor(Q * u^3)), ~30% failed downloads, ~20% of the rest dropped by the filter and
~10% of the survivors trimmed. Then times, through `Browser`:

  build        the run's index (wit_builder/browse_index.py), in a child process under DuckDB's
               --memory-limit: wall time and the child's peak RSS (which must stay within the
               limit + 512 MiB: the build spills instead of growing)
  restart      Browser(run) again: the cached index is reused (no rebuild)
  page/head    one grid page filtered by the largest query: count + facets + page of 60
  page/tail    the same for a query with a handful of samples
  page/search  a caption search over all samples (count + page; no 1 s target)
  row(key)     one sample's row (each thumbnail request), and the whole sample page
  histogram    the per-query distribution page (head and tail, ordered by containing and kept)

The page/* (by query) and histogram/* timings must be <= 1 s each, and the build's peak RSS within
the bound above (the script exits 1 if not).

and a per-query GROUP BY (count, downloaded, kept per query_id) in DuckDB vs pyarrow's
Table.group_by on the same rows, both from the parquet files and both in memory.

    nice .venv/bin/python benchmarks/bench_catalog.py                 # 10M rows (~3 GB on disk)
    nice .venv/bin/python benchmarks/bench_catalog.py --rows 1000000 --keep /tmp/run1m
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from wit_builder.browse import Browser, Filters  # noqa: E402

FILE_ROWS = 100_000
WORDS = ["a", "photo", "of", "the", "red", "small", "dog", "on", "beach", "with", "old", "house", "street", "view"]


def synthesise(run: str, rows: int, queries: int) -> None:
    """Write the run's parquet files (DuckDB COPY, one download shard per FILE_ROWS rows)."""
    con = duckdb.connect()
    words = "[" + ", ".join(f"'{w}'" for w in WORDS) + "]"
    for d in ("download", "filtered", "shards/metadata", "selected", "queries"):
        os.makedirs(os.path.join(run, d), exist_ok=True)
    for n, start in enumerate(range(0, rows, FILE_ROWS)):
        stop = min(rows, start + FILE_ROWS)
        shard = f"{n:05d}"
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE t AS
            SELECT printf('%016x', hash(i)) AS key,
                   (hash(i * 7 + 1) % 1000000) / 1e6 AS u1,
                   (hash(i * 7 + 2) % 1000000) / 1e6 AS u2,
                   (hash(i * 7 + 3) % 1000000) / 1e6 AS u3,
                   i
            FROM range({start}, {stop}) r(i)
        """).fetchall()
        con.execute(f"""
            COPY (
              SELECT key, key AS uid,
                     'https://img' || (i % 977)::VARCHAR || '.example.com/p/' || key || '.jpg' AS url,
                     concat_ws(' ', {words}[1 + i % 14], {words}[1 + (i // 14) % 14], {words}[1 + (i // 196) % 14],
                               {words}[1 + (i // 2744) % 14], 'number', i::VARCHAR) AS caption,
                     floor({queries} * pow(u1, 3))::INTEGER AS query_id,
                     'query_' || floor({queries} * pow(u1, 3))::INTEGER::VARCHAR AS query_text,
                     [floor({queries} * pow(u1, 3))::INTEGER] AS query_ids,
                     u3 AS rank, '{shard}' AS shard,
                     CASE WHEN u2 < 0.3 THEN 'failed' ELSE 'success' END AS status,
                     CASE WHEN u2 < 0.3 THEN (['http_404', 'timeout', 'not_an_image', 'too_large'])[1 + i % 4] END
                       AS error,
                     CASE WHEN u2 >= 0.3 THEN 256 END::INTEGER AS width,
                     CASE WHEN u2 >= 0.3 THEN 192 END::INTEGER AS height,
                     CASE WHEN u2 >= 0.3 THEN 256 + (i % 2000) END::INTEGER AS original_width,
                     CASE WHEN u2 >= 0.3 THEN 192 + (i % 1500) END::INTEGER AS original_height,
                     CASE WHEN u2 >= 0.3 THEN 10000 + i % 30000 END::BIGINT AS bytes,
                     CASE WHEN u2 >= 0.3 THEN sha256(key) END AS sha256
              FROM t
            ) TO '{run}/download/{shard}.parquet' (FORMAT parquet)
        """).fetchall()
        con.execute(f"""
            COPY (
              SELECT key, key AS uid, '{shard}' AS shard,
                     CASE WHEN u2 < 0.44 THEN (['duplicate_exact', 'too_small', 'language', 'near_dup'])[1 + i % 4]
                     END AS drop_reason,
                     CASE WHEN i % 10 = 0 THEN 'de' ELSE 'en' END AS lang
              FROM t WHERE u2 >= 0.3
            ) TO '{run}/filtered/{shard}.parquet' (FORMAT parquet)
        """).fetchall()
        con.execute(f"""
            COPY (
              SELECT key, printf('%06d.tar', {n}) AS tar, key AS uid,
                     'https://img' || (i % 977)::VARCHAR || '.example.com/p/' || key || '.jpg' AS url,
                     'caption ' || i::VARCHAR AS caption,
                     floor({queries} * pow(u1, 3))::INTEGER AS query_id,
                     'query_' || floor({queries} * pow(u1, 3))::INTEGER::VARCHAR AS query_text,
                     [floor({queries} * pow(u1, 3))::INTEGER] AS query_ids,
                     256::INTEGER AS width, 192::INTEGER AS height, sha256(key) AS sha256, NULL::FLOAT AS clip_score
              FROM t WHERE u2 >= 0.44 AND u3 < 0.9
            ) TO '{run}/shards/metadata/{n:06d}.parquet' (FORMAT parquet)
        """).fetchall()
        print(f"\rsynthesised {stop:,}/{rows:,} rows", end="", flush=True)
    print()
    con.execute(f"""
        COPY (SELECT query_id, (count(*) * 3)::BIGINT AS containing, count(*)::BIGINT AS attributed
              FROM '{run}/download/*.parquet' GROUP BY 1 ORDER BY 1)
        TO '{run}/selected/query_counts.parquet' (FORMAT parquet)
    """).fetchall()
    con.execute(f"""
        COPY (SELECT i::INTEGER AS query_id, 'query_' || i::VARCHAR AS text, 'list' AS source, NULL::BIGINT AS count
              FROM range({queries}) r(i))
        TO '{run}/queries/queries.parquet' (FORMAT parquet)
    """).fetchall()


BUILD_CHILD = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from wit_builder.browse_index import ensure_index
t = time.perf_counter()
path, built = ensure_index(sys.argv[2], cache_dir=sys.argv[3], memory_limit=sys.argv[4], log=print)
print(json.dumps({"seconds": time.perf_counter() - t, "built": built,
                  "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def memory_bytes(size: str) -> int:
    """DuckDB's spelling of a memory size in bytes (KB/MB/GB = powers of 1000, KiB/MiB/GiB of 1024).

    >>> memory_bytes("1GB"), memory_bytes("200MiB")
    (1000000000, 209715200)
    """
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", size, re.I)
    if not m:
        raise ValueError(f"not a memory size: {size!r}")
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


def build_in_child(run: str, cache: str, memory_limit: str) -> dict:
    """Build the run's index in a child process; its wall time and peak RSS."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    out = subprocess.run(
        [sys.executable, "-c", BUILD_CHILD, root, run, cache, memory_limit], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"index build failed:\n{out.stdout}{out.stderr}")
    lines = out.stdout.strip().splitlines()
    print("\n".join("  | " + line for line in lines[:-1]))
    return json.loads(lines[-1])


def timed(fn, repeat: int = 3) -> tuple[float, object]:
    """Best wall time of `repeat` calls, and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--queries", type=int, default=300_000)
    ap.add_argument("--keep", metavar="DIR", help="write (or reuse) the synthetic run here and keep it")
    ap.add_argument("--memory-limit", default="1GB", help="DuckDB memory limit of the index build (default 1GB)")
    args = ap.parse_args()
    run = args.keep or tempfile.mkdtemp(prefix="bench_catalog_")
    cache = None
    try:
        if not os.path.exists(os.path.join(run, "queries", "queries.parquet")):
            t = time.perf_counter()
            synthesise(run, args.rows, args.queries)
            print(f"synthesis: {time.perf_counter() - t:.1f}s")
        machine = platform.processor() or platform.machine()
        print(f"machine: {machine}, {os.cpu_count()} cores, duckdb {duckdb.__version__}, pyarrow {pa.__version__}")
        cache = tempfile.mkdtemp(prefix="bench_catalog_cache_")
        child = build_in_child(run, cache, args.memory_limit)
        limit = memory_bytes(args.memory_limit)
        rss_ok = child["max_rss"] <= limit + 512 * 2**20
        print(
            f"build        {child['seconds']:7.2f} s   (peak RSS {child['max_rss'] / 2**30:.2f} GiB; memory limit "
            f"{args.memory_limit}: {'within' if rss_ok else 'OVER'} limit + 512 MiB)"
        )
        t = time.perf_counter()
        b = Browser(run, cache_dir=cache, memory_limit=args.memory_limit)
        restart = time.perf_counter() - t
        total = b.count(Filters())
        assert not b.built
        size = os.path.getsize(b.index_path)
        print(f"restart      {restart:7.2f} s   ({total:,} samples; index reused: {size / 2**30:.2f} GiB on disk)")

        head = b.distribution("attributed", limit=1)[0]["query_id"]
        tail = b.distribution("attributed", tail=True, limit=1)[0]["query_id"]

        def grid(f: Filters):
            return b.count(f), b.facets(f), b.page(f, limit=60)

        results = {}
        for name, f in [("page/head", Filters(query_id=head)), ("page/tail", Filters(query_id=tail)),
                        ("page/head+dropped", Filters(query_id=head, status="dropped"))]:  # fmt: skip
            sec, (n, _, rows) = timed(lambda f=f: grid(f))
            results[name] = sec
            print(f"{name:17s}{sec:7.3f} s   ({n:,} samples, {len(rows)} on the page; count + facets + page)")
        sec, (n, rows) = timed(
            lambda: (b.count(Filters(text="beach number 2")), b.page(Filters(text="beach number 2")))
        )

        print(f"{'page/search':17s}{sec:7.3f} s   ({n:,} captions match; count + page, no facets)")
        key = b.page(Filters(query_id=head, status="trimmed"), limit=1)[0]["key"]
        sec, _ = timed(lambda: b.row(key))
        print(f"{'row(key)':17s}{sec:7.3f} s   (one sample's browse row: what each thumbnail request looks up)")
        sec, info = timed(lambda: b.sample(key), repeat=1)
        print(f"{'sample page':17s}{sec:7.3f} s   (its rows in {', '.join(info['views'])}: scans of the parquet views)")
        for order in ("containing", "kept"):
            sec, rows = timed(
                lambda o=order: (
                    b.distribution(o, limit=50),
                    b.distribution(o, tail=True, limit=50),
                    b.distribution_size(o),
                )
            )
            results[f"histogram/{order}"] = sec
            print(f"{'histogram/' + order:17s}{sec:7.3f} s   (head 50 + tail 50 + size)")

        # per-query GROUP BY: DuckDB vs pyarrow, same rows, from the files and in memory
        files = os.path.join(run, "download", "*.parquet")
        cols = ["query_id", "status"]
        con = duckdb.connect()
        sql = "SELECT query_id, count(*) n, count(*) FILTER (WHERE status = 'success') ok FROM {src} GROUP BY 1"
        duck_files, out1 = timed(lambda: con.sql(sql.format(src=f"read_parquet('{files}')")).to_arrow_table())

        def arrow_from_files():
            t = ds.dataset(os.path.join(run, "download"), format="parquet").to_table(columns=cols)
            t = t.append_column("ok", pc.cast(pc.equal(t["status"], "success"), pa.int64()))
            return t.group_by("query_id").aggregate([("query_id", "count"), ("ok", "sum")])

        arrow_files, out2 = timed(arrow_from_files)
        assert out1.num_rows == out2.num_rows
        table = ds.dataset(os.path.join(run, "download"), format="parquet").to_table(columns=cols)
        table = table.append_column("ok", pc.cast(pc.equal(table["status"], "success"), pa.int64()))
        con.register("mem", table)
        con.execute("CREATE TABLE native AS SELECT * FROM mem").fetchall()
        same = "SELECT query_id, count(*) n, sum(ok) ok FROM {src} GROUP BY 1"  # the same work as pyarrow's
        duck_arrow, _ = timed(lambda: con.sql(same.format(src="mem")).to_arrow_table())
        duck_native, _ = timed(lambda: con.sql(same.format(src="native")).to_arrow_table())
        arrow_mem, _ = timed(lambda: table.group_by("query_id").aggregate([("query_id", "count"), ("ok", "sum")]))
        print(f"{out1.num_rows:,} groups; pyarrow time / duckdb time:")
        ratio = arrow_files / duck_files
        print(f"group-by/files   duckdb {duck_files:.3f} s  pyarrow {arrow_files:.3f} s  ratio {ratio:.1f}x")
        print(f"group-by/memory  duckdb {duck_native:.3f} s (its own table)  pyarrow {arrow_mem:.3f} s (Arrow table)  "
              f"ratio {arrow_mem / duck_native:.1f}x")  # fmt: skip
        ratio = arrow_mem / duck_arrow
        print(f"group-by/arrow   duckdb {duck_arrow:.3f} s (scanning the same Arrow table)  ratio {ratio:.1f}x")
        slow = [k for k, v in results.items() if v > 1.0]
        print(f"{', '.join(results)}: " + ("all <= 1 s" if not slow else f"over 1 s: {', '.join(slow)}"))
        return 1 if slow or not rss_ok else 0
    finally:
        if not args.keep:
            shutil.rmtree(run, ignore_errors=True)
        if cache:
            shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
