"""Balancing speed and memory: the balance stage (Ray, 2 CPUs) on 10M synthetic Zipf matched rows,
against an in-memory numpy MetaCLIP-style balance of the same rows timed in the same run.

Rows: unique random uids, 1-4 query ids each drawn from a Zipf(1.3) law over --queries ids
(a few huge head queries, a long tail), written as matched/part-*.parquet (250k rows per part).
The stage streams them from disk (count pass, [strict: attribution + threshold passes], select
pass writing selected/part-*.parquet); the numpy peer holds every pair in RAM and does
bincount -> min(1, t/c) -> one random draw per pair -> any per row (MetaCLIP's rule), no I/O.
Peak memory is polled every 0.1 s from /proc over this process and all its descendants (Ray's
raylet, GCS and workers included): summed RSS (counts shared pages, e.g. the object store, once
per process that maps them) and summed PSS (shared pages split between their users).

Run:
    python benchmarks/bench_balance.py                  # 10M rows, both modes
    python benchmarks/bench_balance.py --rows 1000000 --modes strict
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from wit_builder import schema  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def _pss(pid: int) -> int:
    """Proportional set size (shared pages split between their users), bytes."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _tree_pids(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(name))
        except (OSError, IndexError, ValueError):
            continue
    out, stack = [], [root]
    while stack:
        p = stack.pop()
        out.append(p)
        stack += children.get(p, [])
    return out


def _tree_pss(root: int) -> int:
    return sum(_pss(p) for p in _tree_pids(root))


def _tree_rss(root: int) -> int:
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            pid, ppid = int(name), int(fields[1])
            rss[pid] = int(fields[21]) * PAGE
            children.setdefault(ppid, []).append(pid)
        except (OSError, IndexError, ValueError):
            continue
    total, stack = 0, [root]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack += children.get(p, [])
    return total


class PeakRSS:
    """Poll the summed RSS (`.peak`) and summed PSS (`.peak_pss`: shared pages such as Ray's
    object store counted once) of this process tree in a thread, in bytes."""

    def __enter__(self):
        self.peak, self.peak_pss, self._stop = 0, 0, threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss(os.getpid()))
            self.peak_pss = max(self.peak_pss, _tree_pss(os.getpid()))
            time.sleep(0.1)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def synth(n_rows: int, n_queries: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 5, n_rows)
    qids = (np.minimum(rng.zipf(1.3, int(lengths.sum())), n_queries) - 1).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    uids = rng.integers(0, 2**63, n_rows, dtype=np.int64).astype(np.uint64)  # collisions ~ 0
    return offsets, qids, uids


def write_parts(d: str, offsets, qids, uids, per_part: int = 250_000) -> int:
    os.makedirs(d)
    n = len(uids)
    n_parts = 0
    for i, lo in enumerate(range(0, n, per_part)):
        hi = min(n, lo + per_part)
        off = offsets[lo : hi + 1] - offsets[lo]
        lists = pa.ListArray.from_arrays(pa.array(off.astype(np.int32)), pa.array(qids[offsets[lo] : offsets[hi]]))
        k = hi - lo
        t = pa.table(
            {
                "uid": pa.array([f"{x:016x}" for x in uids[lo:hi].tolist()], pa.string()),
                "url": pa.array(["https://e.org/i.jpg"] * k),
                "caption": pa.array(["a caption"] * k),
                "source_file": pa.array(["synthetic"] * k),
                "page_url": pa.nulls(k, pa.string()),
                "query_ids": lists.cast(schema.QUERY_IDS),
            }
        )
        pq.write_table(t, os.path.join(d, f"part-{i:05d}.parquet"))
        n_parts += 1
    return n_parts


def numpy_metaclip_balance(offsets, qids, t: float, seed: int = 0) -> np.ndarray:
    """The ~10-line MetaCLIP-style balance, all in RAM (the peer)."""
    counts = np.bincount(qids)
    prob = np.minimum(1.0, t / np.maximum(counts, 1))
    draw = np.random.default_rng(seed).random(len(qids))
    hit = draw < prob[qids]
    rows = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    keep = np.zeros(len(offsets) - 1, dtype=bool)
    keep[rows[hit]] = True
    return keep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--queries", type=int, default=500_000)
    ap.add_argument("--cap", type=int, default=20_000)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--modes", default="strict,metaclip")
    ap.add_argument("--generate", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()

    from wit_builder import parallel
    from wit_builder.stages import balance
    from wit_builder.stages.base import StageContext

    if args.generate:  # child process: data + the numpy peer, so the stage's process tree starts clean
        generate(args)
        return
    tmp = tempfile.mkdtemp(prefix="bench_balance_")
    try:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--generate",
            tmp,
            "--rows",
            str(args.rows),
            "--queries",
            str(args.queries),
            "--cap",
            str(args.cap),
        ]
        subprocess.run(cmd, check=True)
        parallel.init(num_cpus=args.cpus)
        time.sleep(2)
        print(
            f"idle process tree after Ray start: RSS {_tree_rss(os.getpid()) / 2**30:.2f} GiB, "
            f"PSS {_tree_pss(os.getpid()) / 2**30:.2f} GiB"
        )
        for mode in args.modes.split(","):
            shutil.rmtree(os.path.join(tmp, "selected"), ignore_errors=True)
            ctx = StageContext(run_dir=tmp, seed=0, num_cpus=args.cpus, progress=False)
            cfg = balance.Config(cap=args.cap, mode=mode)
            with PeakRSS() as mem:
                t = time.perf_counter()
                result = balance.run(ctx, cfg)
                s = time.perf_counter() - t
            peer = float(open(os.path.join(tmp, "peer_seconds")).read())
            print(
                f"balance stage, mode={mode}, {args.cpus} CPUs (Ray, from/to parquet): {s:.1f}s "
                f"= {args.rows / s:,.0f} rows/s = {s / peer:.2f}x the numpy peer's time; "
                f"process tree peak RSS {mem.peak / 2**30:.2f} GiB (PSS {mem.peak_pss / 2**30:.2f} GiB); "
                f"kept {result.rows_out:,}; "
                f"max attributed/cap {result.extra['max_attributed_over_target']:.4f}"
            )
        parallel.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def generate(args) -> None:
    t0 = time.perf_counter()
    offsets, qids, uids = synth(args.rows, args.queries)
    n_parts = write_parts(os.path.join(args.generate, "matched"), offsets, qids, uids)
    os.makedirs(os.path.join(args.generate, "queries"))
    q = pa.table(
        {
            "query_id": pa.array(np.arange(args.queries, dtype=np.int32)),
            "text": [f"q{i}" for i in range(args.queries)],
            "source": ["synthetic"] * args.queries,
            "count": pa.nulls(args.queries, pa.int64()),
        }
    )
    pq.write_table(q, os.path.join(args.generate, "queries", "queries.parquet"))
    counts = np.bincount(qids)
    print(
        f"rows: {args.rows:,} ({len(qids):,} pairs, {int((counts > 0).sum()):,} queries used, "
        f"{int((counts > args.cap).sum()):,} above cap {args.cap:,}, largest {counts.max():,}); "
        f"{n_parts} parts written in {time.perf_counter() - t0:.1f}s",
        flush=True,
    )
    with PeakRSS() as mem:
        t = time.perf_counter()
        keep = numpy_metaclip_balance(offsets, qids, float(args.cap))
        peer = time.perf_counter() - t
    print(
        f"numpy MetaCLIP-style balance in RAM (1 core, no I/O): {peer:.1f}s, kept {int(keep.sum()):,} "
        f"(its process peak RSS {mem.peak / 2**30:.2f} GiB with the data in RAM)",
        flush=True,
    )
    with open(os.path.join(args.generate, "peer_seconds"), "w") as f:
        f.write(str(peer))


if __name__ == "__main__":
    main()
