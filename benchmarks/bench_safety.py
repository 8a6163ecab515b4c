"""Cost of the safety lists: eval decontamination against a large phash index, and URL screening
of candidate blocks against large domain / URL / prefix lists. One process, one core.

1. Eval index: `--eval` random 64-bit hashes stand in for an evaluation set's phashes (the index
   only sees hashes); queries are half near copies of indexed hashes (1-`--distance` bits
   flipped, must match) and half random hashes (must not, with overwhelming probability).
   Figures: index build seconds, µs per sample lookup, the index's bytes and the process's RSS
   growth. Plus phash of real images (the demo photos, decoded from JPEG bytes): images/s, what
   building the index from image files costs per core.
2. URL screen: `--urls` synthetic URLs over 50k hosts in blocks of 65,536 rows, against
   `--list-size` listed domains, as many exact URLs and a tenth as many prefixes. Figure: rows/s.

Times are CPU seconds of this process (`time.process_time`), so per-core figures hold on a
shared, loaded machine too; the total wall time is printed at the end.

Run:
    nice .venv/bin/python benchmarks/bench_safety.py --eval 100000 --urls 1000000
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def bench_eval(n: int, distance: int, queries: int) -> None:
    from wit_builder.safety.hashes import HashIndex

    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) << np.uint64(1) | rng.integers(
        0, 2, n, dtype=np.int64
    ).astype(np.uint64)
    before = rss_mb()
    t = time.process_time()
    index = HashIndex(hashes, distance)
    build = time.process_time() - t
    grown = rss_mb() - before
    nbytes = hashes.nbytes + sum(k.nbytes + o.nbytes for _, _, k, o in index.bands)
    near = []
    for h in hashes[rng.integers(0, n, queries // 2)].tolist():
        for b in rng.choice(64, rng.integers(1, distance + 1), replace=False).tolist():
            h ^= 1 << b
        near.append(h)
    far = rng.integers(0, 2**63, queries - len(near), dtype=np.int64).tolist()
    t = time.process_time()
    hits_near = sum(index.nearest(h) is not None for h in near)
    hits_far = sum(index.nearest(h) is not None for h in far)
    per = (time.process_time() - t) / queries * 1e6
    print(
        f"eval index: {n:,} hashes, distance {distance}: build {build:.2f} s, {per:.1f} µs/sample "
        f"({queries:,} lookups), near copies found {hits_near}/{len(near)}, random hits {hits_far}/{len(far)}, "
        f"index arrays {nbytes / 1e6:.1f} MB, RSS +{grown:.1f} MB"
    )


def bench_phash_images(repeat: int) -> None:
    from wit_builder.filters.dedup import phash_bytes

    folder = os.path.join(REPO, "demo", "images")
    blobs = [open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))]
    t = time.process_time()
    for _ in range(repeat):
        for b in blobs:
            phash_bytes(b)
    rate = repeat * len(blobs) / (time.process_time() - t)
    print(f"phash of real JPEGs (demo photos, ~640x480): {rate:,.0f} images/s on one core")


def bench_urls(rows: int, list_size: int) -> None:
    import pyarrow as pa

    from wit_builder.safety.screen import UrlScreen
    from wit_builder.safety.urls import UrlList

    rng = np.random.default_rng(1)
    hosts = [f"img{i}.site{i % 7919}.example" for i in range(50_000)]
    listed = [f"bad{i}.example" for i in range(list_size - 100)] + [f"site{i}.example" for i in range(100)]
    urls_listed = [f"http://img{i}.site{i % 7919}.example/p/{i}.jpg" for i in range(list_size)]
    prefixes = [f"https://img{i}.site{i % 7919}.example/private/" for i in range(list_size // 10)]
    t = time.process_time()
    screen = UrlScreen(
        [
            ("safety:blocklist:d", UrlList("d", "domain", listed)),
            ("safety:blocklist:u", UrlList("u", "url", urls_listed)),
            ("safety:optout:p", UrlList("p", "prefix", prefixes)),
        ]
    )
    load = time.process_time() - t
    block = 65_536
    host_ix = rng.integers(0, len(hosts), rows)
    kinds = rng.integers(0, 3, rows)
    urls = [
        f"http://{hosts[h]}/{'private' if k == 0 else 'p'}/{h if k == 1 else j}.jpg"
        for j, (h, k) in enumerate(zip(host_ix.tolist(), kinds.tolist()))
    ]
    dropped: dict[str, int] = {}
    t = time.process_time()
    for start in range(0, rows, block):
        _, counts = screen.apply(pa.table({"url": urls[start : start + block]}))
        for k, v in counts.items():
            dropped[k] = dropped.get(k, 0) + v
    secs = time.process_time() - t
    print(
        f"URL screen: {rows:,} URLs against {list_size:,} domains + {list_size:,} URLs + {list_size // 10:,} "
        f"prefixes (lists built in {load:.2f} s): {rows / secs:,.0f} rows/s on one core; dropped {dropped}"
    )
    domains_only = UrlScreen(screen.lists[:1])
    t = time.process_time()
    for start in range(0, rows, block):
        domains_only.apply(pa.table({"url": urls[start : start + block]}))
    print(f"URL screen, the domain list alone: {rows / (time.process_time() - t):,.0f} rows/s on one core")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--eval", type=int, default=100_000, help="hashes in the eval index")
    ap.add_argument("--distance", type=int, default=4)
    ap.add_argument("--queries", type=int, default=20_000)
    ap.add_argument("--urls", type=int, default=1_000_000)
    ap.add_argument("--list-size", type=int, default=100_000)
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}")
    wall = time.perf_counter()
    bench_eval(args.eval, args.distance, args.queries)
    bench_phash_images(repeat=3)
    bench_urls(args.urls, args.list_size)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    print(f"peak RSS {peak:.0f} MB, wall {time.perf_counter() - wall:.0f} s")


if __name__ == "__main__":
    main()
