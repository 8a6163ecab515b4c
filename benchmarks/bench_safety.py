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

In 1. and 2. times are CPU seconds of this process (`time.process_time`), so per-core figures
hold on a shared, loaded machine too; the total wall time is printed at the end.

3. `--end-to-end`: the lists on and off in the real stages, through `runner.run_pipeline` (what
   `wit-build run` calls) on an embedded Ray with `--cores` CPUs, started once before the timed
   stages. Each pair is timed off, on, on, off (`--rounds` times) so that drift in the machine's
   load falls on both; every "on" run reads freshly written copies of its list files, so every
   worker loads the lists as in a new run (a worker caches them by content).
   a. candidates: `--rows` url-list rows (4 parquet files; real captions from ../shared/data,
      synthetic URLs over 50k hosts as in 2.) without lists, then with `[candidates] blocklists`
      = a `--list-size` domain list, a `--list-size` URL list and a `--list-size`/10 prefix list,
      and `optout_lists` = a `--list-size`/10 domain list. A few entries of each are planted on
      real rows; the rest never match. Each list's removals are checked against the rows
      planted on it (first matching list wins, blocklists before opt-outs).
   b. download: `--images` distinct JPEGs (the demo photos and ../shared/data/images/coco_mini,
      each re-encoded whole once, then randomly cropped/flipped copies), served by nginx on
      127.0.0.1, taken through queries, candidates, match and balance once; then the download
      stage (256 px, no face blurring, so that the lists' share is not hidden) without lists and
      with `[download] blocklists` / `optout_lists` = the four URL lists of 3a (what the stage
      inherits from `[candidates]`; it asks them about every hop it fetches), none matching.
   c. filter, on that download: the filter stage (default checks, language ID, exact and
      near dedup) without lists, and with `[filter] blocklists` = a `--list-size` sha256 list and
      a `--list-size` phash list plus `eval_dirs` = a folder of 8 of the source photos. Planted:
      the fetched bytes' sha256 of 10 images, the phash of 10 other images (as served, before
      the download resized them), the 8 eval photos (their whole re-encoded copy is in the run).
   Figures per stage and variant: wall seconds, rows (images) per wall second, CPU seconds of
   the whole process tree (this driver, Ray's GCS and raylet, every worker and actor: sampled
   from /proc, benchmarks/_common.TreeSampler; `getrusage(RUSAGE_CHILDREN)` would miss Ray's
   workers, which are not reaped children of this process) per row, and the on/off ratios.

Run:
    nice .venv/bin/python benchmarks/bench_safety.py --eval 100000 --urls 1000000
    nice .venv/bin/python benchmarks/bench_safety.py --end-to-end          # ~5-7 min on 2 cores
    nice .venv/bin/python benchmarks/bench_safety.py --end-to-end --rows 4000000 --images 12000 \
        --rounds 1 --skip-download     # the slopes: per row / per image, apart from fixed costs
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


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


# ------------------------------------------------------------------ 3. end to end, lists on / off

SITES, HOSTS = 7919, 50_000
SOURCE_DIRS = [os.path.join(REPO, "demo", "images")]  # + ../shared/data/images/coco_mini (below)


def timed_stage(pipeline, run_dir: str, stage: str) -> dict:
    """Run one stage through the runner (forced), with the process tree's CPU sampled."""
    from _common import TreeSampler

    from wit_builder.runner import run_pipeline

    with TreeSampler(os.getpid(), interval=0.1) as sampler:
        t = time.perf_counter()
        result = run_pipeline(pipeline, run_dir, stages=[stage], force=True)[stage]
        wall = time.perf_counter() - t
    return {
        "rows": result.rows_in,
        "out": result.rows_out,
        "dropped": result.dropped,
        "wall": wall,
        "cpu": sampler.cpu_seconds,
        "load": os.getloadavg()[0],
    }


def write_toml(path: str, sections: dict[str, dict]) -> str:
    """A pipeline file from {section: {key: python value}} (values written as TOML via json)."""
    import json

    with open(path, "w") as f:
        for section, keys in sections.items():
            f.write(f"[{section}]\n")
            for key, value in keys.items():
                text = json.dumps(value)
                if isinstance(value, list) and value and isinstance(value[0], dict):  # inline tables
                    text = (
                        "["
                        + ", ".join(
                            "{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in d.items()) + "}" for d in value
                        )
                        + "]"
                    )
                f.write(f"{key} = {text}\n")
            f.write("\n")
    return path


def write_list(path: str, entries: list[str], tag: str) -> str:
    """A plain-text list, headed by a comment naming the copy (a new copy has a new sha256)."""
    with open(path, "w") as f:
        f.write(f"# bench_safety list, copy {tag}\n")
        f.write("\n".join(entries))
        f.write("\n")
    return path


def real_captions() -> list[str]:
    """The real captions of ../shared/data that the candidates stage keeps (non-blank, short)."""
    from _common import load_captions

    return [c for c in load_captions() if c and c.strip() and len(c) <= 4096]


def report(name: str, off: list[dict], on: list[dict], unit: str) -> dict:
    """Mean figures per variant and the on/off ratios; prints them."""
    mean = lambda runs, k: sum(r[k] for r in runs) / len(runs)  # noqa: E731
    fig = {}
    for label, runs in (("off", off), ("on", on)):
        rows = runs[0]["rows"]
        fig[label] = {"wall": mean(runs, "wall"), "cpu": mean(runs, "cpu"), "rows": rows}
        walls = ", ".join(f"{r['wall']:.1f}" for r in runs)
        cpus = ", ".join(f"{r['cpu']:.1f}" for r in runs)
        loads = ", ".join(f"{r['load']:.1f}" for r in runs)
        print(
            f"  {name}, lists {label:>3}: {rows:,} {unit} in; wall s {walls} (mean {fig[label]['wall']:.1f}); "
            f"tree CPU s {cpus}; {rows / fig[label]['wall']:,.0f} {unit}/s wall, "
            f"{fig[label]['cpu'] / rows * 1e6:,.1f} CPU µs per {unit[:-1]}; load after {loads}",
            flush=True,
        )
    extra = (fig["on"]["cpu"] - fig["off"]["cpu"]) / fig["on"]["rows"] * 1e6
    print(
        f"  {name}: on/off wall x{fig['on']['wall'] / fig['off']['wall']:.3f}, "
        f"CPU x{fig['on']['cpu'] / fig['off']['cpu']:.3f}; {extra:+,.1f} CPU µs per {unit[:-1]}",
        flush=True,
    )
    return fig


def candidate_rows(rows: int, folder: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Write `rows` url-list rows in 4 parquet files; returns (urls, host index, private mask)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(2)
    captions = real_captions()
    hosts = [f"img{i}.site{i % SITES}.example" for i in range(HOSTS)]
    host_ix = rng.integers(0, HOSTS, rows)
    private = rng.integers(0, 3, rows) == 0
    urls = [
        f"{'https' if j % 2 else 'http'}://{hosts[h]}/{'private' if p else 'p'}/{j}.jpg"
        for j, (h, p) in enumerate(zip(host_ix.tolist(), private.tolist()))
    ]
    os.makedirs(folder, exist_ok=True)
    step = -(-rows // 4)
    for f, start in enumerate(range(0, rows, step)):
        end = min(rows, start + step)
        caps = [captions[j % len(captions)] for j in range(start, end)]
        pq.write_table(pa.table({"url": urls[start:end], "caption": caps}), os.path.join(folder, f"urls-{f}.parquet"))
    return urls, host_ix, private


def candidate_lists(urls: list[str], host_ix: np.ndarray, private: np.ndarray, size: int):
    """(list entries per list, rows each list must remove): every list `size` (domains, URLs) or
    size/10 (prefixes, opt-out domains) entries, a few planted on real rows, the rest matching
    nothing; removals counted in list order, the first matching list winning."""
    rng = np.random.default_rng(3)
    n = len(urls)
    sites = rng.choice(SITES, 30, replace=False)
    bad_sites, optout_sites = sites[:20], sites[20:]
    planted_rows = rng.choice(n, 1000, replace=False)
    planted_hosts = rng.choice(HOSTS, 500, replace=False)
    site_of = host_ix % SITES
    masks = {
        "bad-domains": np.isin(site_of, bad_sites),
        "bad-urls": np.isin(np.arange(n), planted_rows),
        "bad-prefixes": np.isin(host_ix, planted_hosts) & private,
        "optout-domains": np.isin(site_of, optout_sites),
    }
    expected, gone = {}, np.zeros(n, dtype=bool)
    for name, mask in masks.items():
        expected[name] = int((mask & ~gone).sum())
        gone |= mask
    small = size // 10
    entries = {
        "bad-domains": [f"bad{i}.example" for i in range(size - len(bad_sites))]
        + [f"site{s}.example" for s in bad_sites.tolist()],
        "bad-urls": [f"http://img{i}.nowhere{i % 977}.example/p/{i}.jpg" for i in range(size - len(planted_rows))]
        + [urls[j] for j in planted_rows.tolist()],
        "bad-prefixes": [f"http://img{i}.gone{i % 977}.example/private/" for i in range(small - len(planted_hosts))]
        + [f"http://img{h}.site{h % SITES}.example/private/" for h in planted_hosts.tolist()],
        "optout-domains": [f"optout{i}.example" for i in range(small - len(optout_sites))]
        + [f"site{s}.example" for s in optout_sites.tolist()],
    }
    return entries, expected


URL_KINDS = {"bad-domains": "domain", "bad-urls": "url", "bad-prefixes": "prefix", "optout-domains": "domain"}


def write_url_lists(entries: dict[str, list[str]], folder: str, tag: str) -> tuple[list[dict], list[dict]]:
    """Fresh copies of the four URL lists in `folder`: (blocklists, optout_lists) config tables."""
    os.makedirs(folder, exist_ok=True)
    specs = {
        name: {"name": name, "kind": URL_KINDS[name], "path": write_list(os.path.join(folder, f"{name}.txt"), e, tag)}
        for name, e in entries.items()
    }
    return [specs[n] for n in ("bad-domains", "bad-urls", "bad-prefixes")], [specs["optout-domains"]]


def unmatched_url_lists(size: int) -> dict[str, list[str]]:
    """The four URL lists at the sizes of 3a, none of whose entries matches 127.0.0.1."""
    small = size // 10
    return {
        "bad-domains": [f"bad{i}.example" for i in range(size)],
        "bad-urls": [f"http://img{i}.nowhere{i % 977}.example/p/{i}.jpg" for i in range(size)],
        "bad-prefixes": [f"http://img{i}.gone{i % 977}.example/private/" for i in range(small)],
        "optout-domains": [f"optout{i}.example" for i in range(small)],
    }


def e2e_candidates(args, tmp: str) -> dict:
    from wit_builder.pipeline import load_pipeline
    from wit_builder.runner import run_pipeline

    t = time.perf_counter()
    inputs = os.path.join(tmp, "urls")
    urls, host_ix, private = candidate_rows(args.rows, inputs)
    entries, expected = candidate_lists(urls, host_ix, private, args.list_size)
    del urls
    print(f"candidates: {args.rows:,} rows and the lists written in {time.perf_counter() - t:.0f} s", flush=True)
    base = {
        "run": {"seed": 0, "num_cpus": args.cores, "progress": False},
        "queries": {"lists": [os.path.join(REPO, "demo", "queries.txt")]},
        "candidates": {"inputs": [os.path.join(inputs, "*.parquet")], "partitions": max(4, args.rows // 250_000)},
    }

    def pipeline(tag: str, lists: bool):
        sections = {k: dict(v) for k, v in base.items()}
        if lists:
            blocklists, optouts = write_url_lists(entries, os.path.join(tmp, f"lists-{tag}"), tag)
            sections["candidates"].update(blocklists=blocklists, optout_lists=optouts)
        return load_pipeline(write_toml(os.path.join(tmp, f"cand-{tag}.toml"), sections))

    warm = os.path.join(tmp, "cand-warm")  # Ray's workers started and imports done, untimed
    run_pipeline(pipeline("warm", False), warm, stages=["queries", "candidates"])
    shutil.rmtree(warm)
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for r in range(args.rounds):
        for i, label in enumerate(("off", "on", "on", "off")):
            tag = f"{label}{r}{i}"
            run_dir = os.path.join(tmp, f"cand-{tag}")
            p = pipeline(tag, label == "on")
            run_pipeline(p, run_dir, stages=["queries"])
            runs[label].append(timed_stage(p, run_dir, "candidates"))
            shutil.rmtree(run_dir)
            shutil.rmtree(os.path.join(tmp, f"lists-{tag}"), ignore_errors=True)
    for run in runs["on"]:
        got = {
            name: run["dropped"].get(f"safety:{'optout' if name.startswith('optout') else 'blocklist'}:{name}", -1)
            for name in entries
        }
        if got != expected:
            sys.exit(f"candidates: removals per list {got} != planted {expected}")
    print(
        f"  candidates: rows removed per list (= planted, every 'on' run): {expected}; "
        f"rows out off {runs['off'][0]['out']:,}, on {runs['on'][0]['out']:,}"
    )
    fig = report("candidates", runs["off"], runs["on"], "rows")
    fig["removed"] = expected
    return fig


def make_images(n: int) -> tuple[str, list[str], dict[str, str]]:
    """`n` distinct JPEGs (cached under /tmp): each photo (by file name) re-encoded whole (`_v0`), then
    random crops (75-100% per side) with random flips. Returns (folder, file names, name -> its
    source photo path)."""
    import io as _io

    from _common import DATA
    from PIL import Image, ImageOps

    dirs = SOURCE_DIRS + [os.path.join(DATA, "images", "coco_mini")]
    sources, seen = [], set()
    for d in dirs:
        for name in sorted(os.listdir(d)):
            if name.lower().endswith(".jpg") and name not in seen:  # the demo's photos are COCO's too
                seen.add(name)
                sources.append(os.path.join(d, name))
    folder = f"/tmp/wb_bench_safety_images_{n}"
    names = [f"{i:06d}_{os.path.basename(sources[i % len(sources)])[:-4]}_v{i // len(sources)}.jpg" for i in range(n)]
    source_of = {name: sources[i % len(sources)] for i, name in enumerate(names)}
    if not os.path.exists(os.path.join(folder, "DONE")):
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        rng = np.random.default_rng(4)
        for i, name in enumerate(names):
            with Image.open(source_of[name]) as img:
                img = img.convert("RGB")
                if i >= len(sources):
                    w, h = img.size
                    cw, ch = int(w * rng.uniform(0.75, 1)), int(h * rng.uniform(0.75, 1))
                    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                    img = img.crop((x, y, x + cw, y + ch))
                    if rng.random() < 0.5:
                        img = ImageOps.mirror(img)
                buf = _io.BytesIO()
                img.save(buf, "JPEG", quality=int(rng.integers(80, 96)))
            with open(os.path.join(folder, name), "wb") as f:
                f.write(buf.getvalue())
        open(os.path.join(folder, "DONE"), "w").close()
    return folder, names, source_of


def shard_table(folder: str, columns: list[str]):
    """The rows of a stage's per-shard parquet files (`{shard}.parquet`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = sorted(n for n in os.listdir(folder) if re.fullmatch(r"\d+\.parquet", n))
    return pa.concat_tables([pq.read_table(os.path.join(folder, n), columns=columns) for n in names])


def e2e_filter(args, tmp: str) -> dict:
    import hashlib

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from _common import free_port, start_nginx

    from wit_builder.filters.dedup import phash_bytes
    from wit_builder.pipeline import load_pipeline
    from wit_builder.runner import run_pipeline
    from wit_builder.stages import OUTPUT_DIR

    t = time.perf_counter()
    folder, names, source_of = make_images(args.images)
    sources = sorted(set(source_of.values()))
    print(
        f"filter: {len(names):,} images from {len(sources)} photos ready in {time.perf_counter() - t:.0f} s", flush=True
    )
    # planted: 10 images' bytes (sha256), 10 others' phash, 8 whole photos as the eval set,
    # each from its own photo; v0 (the whole photo re-encoded) is in the run for every photo
    rng = np.random.default_rng(5)
    photos = rng.choice(len(sources), 28, replace=False).tolist()
    v0 = {source_of[n]: n for n in names if n.endswith("_v0.jpg")}
    sha_files = [v0[sources[p]] for p in photos[:10]]
    phash_files = [v0[sources[p]] for p in photos[10:20]]
    eval_photos = [sources[p] for p in photos[20:]]
    read = lambda name: open(os.path.join(folder, name), "rb").read()  # noqa: E731
    sha_entries = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(args.list_size - 10)]
    sha_entries += [hashlib.sha256(read(n)).hexdigest() for n in sha_files]
    randoms = np.random.default_rng(6).integers(0, 2**63, args.list_size - 10, dtype=np.int64).tolist()
    phash_entries = [f"{h:016x}" for h in randoms] + [f"{phash_bytes(read(n)):016x}" for n in phash_files]
    eval_dir = os.path.join(tmp, "eval")
    os.makedirs(eval_dir)
    for p in eval_photos:
        shutil.copy(p, eval_dir)
    lists = os.path.join(tmp, "image-lists")
    os.makedirs(lists)
    sha_path = write_list(os.path.join(lists, "known-sha256.txt"), sha_entries, "0")
    phash_path = write_list(os.path.join(lists, "known-phash.txt"), phash_entries, "0")

    # captions: real ones that name a demo query, so that every row is matched and selected
    queries = [q.strip() for q in open(os.path.join(REPO, "demo", "queries.txt")) if q.strip() and q[0] != "#"]
    word = re.compile(r"\b(" + "|".join(re.escape(q) for q in queries) + r")\b", re.IGNORECASE)
    captions = [c for c in real_captions() if word.search(c)]
    run_dir = os.path.join(tmp, "filter-run")
    nginx = start_nginx(tmp, f"root {folder};", port := free_port())
    try:
        urls = [f"http://127.0.0.1:{port}/{n}" for n in names]
        pq.write_table(
            pa.table({"url": urls, "caption": [captions[i % len(captions)] for i in range(len(urls))]}),
            os.path.join(tmp, "image-urls.parquet"),
        )
        base = {
            "run": {"seed": 0, "num_cpus": args.cores, "progress": False},
            "queries": {"lists": [os.path.join(REPO, "demo", "queries.txt")]},
            "candidates": {"inputs": [os.path.join(tmp, "image-urls.parquet")], "partitions": 2},
            "match": {"mode": "word"},
            "balance": {"cap": 10 * len(names), "mode": "strict"},
            "download": {
                "shard_size": 250,
                "threads_per_task": 16,
                "allow_private_network": True,
                "blur_faces": False,
                "image_size": 256,
            },
            "filter": {"workers": args.cores},
        }
        off = load_pipeline(write_toml(os.path.join(tmp, "filter-off.toml"), base))
        t = time.perf_counter()
        done = run_pipeline(off, run_dir, stages=["queries", "candidates", "match", "balance", "download"])
        print(
            f"  downloaded {done['download'].rows_out:,} of {done['download'].rows_in:,} rows "
            f"in {time.perf_counter() - t:.0f} s (untimed)",
            flush=True,
        )
        # the download stage asks the URL lists about every hop it fetches ([download] blocklists
        # and optout_lists default to the candidates' ones): the same four lists, none matching
        url_entries = unmatched_url_lists(args.list_size)
        dl_runs: dict[str, list[dict]] = {"off": [], "on": []}
        for r in range(0 if args.skip_download else args.rounds):
            for i, label in enumerate(("off", "on", "on", "off")):  # ends with off: what the filter reads
                p = off
                if label == "on":
                    tag = f"dl{r}{i}"
                    sections = {k: dict(v) for k, v in base.items()}
                    blocklists, optouts = write_url_lists(url_entries, os.path.join(tmp, f"lists-{tag}"), tag)
                    sections["download"].update(blocklists=blocklists, optout_lists=optouts)
                    p = load_pipeline(write_toml(os.path.join(tmp, f"download-{tag}.toml"), sections))
                dl_runs[label].append(timed_stage(p, run_dir, "download"))
        stored = [r["out"] for r in dl_runs["off"] + dl_runs["on"]]
        if any(n != done["download"].rows_out for n in stored):
            sys.exit(f"download: images stored differ between runs: {stored}")
        if stored:
            report("download", dl_runs["off"], dl_runs["on"], "images")
    finally:
        nginx.terminate()
        nginx.wait()
    on_sections = {k: dict(v) for k, v in base.items()}
    on_sections["filter"].update(
        blocklists=[
            {"name": "known-sha256", "kind": "sha256", "path": sha_path},
            {"name": "known-phash", "kind": "phash", "path": phash_path},
        ],
        eval_dirs=[eval_dir],
    )
    on = load_pipeline(write_toml(os.path.join(tmp, "filter-on.toml"), on_sections))
    download = shard_table(os.path.join(run_dir, OUTPUT_DIR["download"]), ["key", "url", "status"])
    file_of = dict(zip(download["key"].to_pylist(), (u.rsplit("/", 1)[1] for u in download["url"].to_pylist())))
    fetched = {
        file_of[k] for k, s in zip(download["key"].to_pylist(), download["status"].to_pylist()) if s == "success"
    }
    timed_stage(off, run_dir, "filter")  # warm-up, untimed (the first filter run is slower)
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    removed: dict[str, list[str]] = {}
    for _ in range(args.rounds):
        for label in ("off", "on", "on", "off"):
            runs[label].append(timed_stage(on if label == "on" else off, run_dir, "filter"))
            if label == "on":
                table = shard_table(os.path.join(run_dir, OUTPUT_DIR["filter"]), ["key", "drop_reason"])
                safety = table.filter(pc.starts_with(pc.fill_null(table["drop_reason"], ""), "safety:"))
                removed = {}
                for key, why in zip(safety["key"].to_pylist(), safety["drop_reason"].to_pylist()):
                    removed.setdefault(why, []).append(file_of[key])
    sha_hits = removed.get("safety:blocklist:known-sha256", [])
    want = sorted(n for n in sha_files if n in fetched)
    if sorted(sha_hits) != want:
        sys.exit(f"filter: sha256 list removed {sorted(sha_hits)}, planted {want}")
    eval_stems = {os.path.basename(p) for p in eval_photos}
    phash_hits = removed.get("safety:blocklist:known-phash", [])
    eval_hits = removed.get("safety:eval_duplicate", [])
    out = {
        "sha256": (len(sha_hits), len(want)),
        "phash": (len(phash_hits), sum(n in phash_hits for n in phash_files), len(phash_files)),
        "eval": (len(eval_hits), sum(n.endswith("_v0.jpg") for n in eval_hits), len(eval_photos)),
        "eval_from_eval_photos": all(os.path.basename(source_of[n]) in eval_stems for n in eval_hits),
    }
    print(
        f"  filter removals: sha256 list {out['sha256'][0]} (= the {out['sha256'][1]} planted); phash list "
        f"{out['phash'][0]} (the {out['phash'][1]}/{out['phash'][2]} planted images and other crops of their "
        f"photos); eval {out['eval'][0]} (whole copies of {out['eval'][1]}/{out['eval'][2]} eval photos, the rest "
        f"crops of them: {out['eval_from_eval_photos']}); rows out off {runs['off'][0]['out']:,}, "
        f"on {runs['on'][0]['out']:,}",
        flush=True,
    )
    fig = report("filter", runs["off"], runs["on"], "images")
    fig["removed"] = out
    return fig


def list_load_costs(size: int, tmp: str) -> None:
    """CPU seconds to read and index each kind of list once (what every worker pays per run)."""
    from wit_builder.safety.lists import ListSpec
    from wit_builder.safety.screen import load_image_lists, url_screen

    folder = os.path.join(tmp, "load")
    os.makedirs(folder)
    rng = np.random.default_rng(7)
    files = {
        "domain": [f"bad{i}.site{i % 977}.example" for i in range(size)],
        "url": [f"http://img{i}.x{i % 977}.example/p/{i}.jpg" for i in range(size)],
        "prefix": [f"http://img{i}.x{i % 977}.example/private/" for i in range(size // 10)],
        "sha256": [f"{h:016x}" * 4 for h in rng.integers(0, 2**63, size, dtype=np.int64).tolist()],
        "phash": [f"{h:016x}" for h in rng.integers(0, 2**63, size, dtype=np.int64).tolist()],
    }
    costs = []
    for kind, entries in files.items():
        spec = ListSpec(kind, kind, write_list(os.path.join(folder, f"{kind}.txt"), entries, "load"))
        t = time.process_time()
        if kind in ("sha256", "phash"):
            load_image_lists([spec])
        else:
            url_screen([spec], [])
        costs.append(f"{kind} ({len(entries):,}) {time.process_time() - t:.2f}")
    print(f"list load, CPU s per process: {', '.join(costs)}", flush=True)


def bench_end_to_end(args) -> None:
    from wit_builder import parallel

    tmp = tempfile.mkdtemp(prefix="wb_bench_safety_")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    print(f"end to end: {os.cpu_count()} CPUs, --cores {args.cores}, tmp {tmp}", flush=True)
    try:
        list_load_costs(args.list_size, tmp)
        parallel.init(num_cpus=args.cores)  # started once, before the timed stages, as a run does
        if args.rows:
            e2e_candidates(args, tmp)
        if args.images:
            e2e_filter(args, tmp)
    finally:
        parallel.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--eval", type=int, default=100_000, help="hashes in the eval index")
    ap.add_argument("--distance", type=int, default=4)
    ap.add_argument("--queries", type=int, default=20_000)
    ap.add_argument("--urls", type=int, default=1_000_000)
    ap.add_argument("--list-size", type=int, default=100_000)
    ap.add_argument(
        "--end-to-end", action="store_true", help="3.: the candidates, download and filter stages, lists off/on"
    )
    ap.add_argument("--rows", type=int, default=1_000_000, help="3a: url-list rows (0 = skip)")
    ap.add_argument("--images", type=int, default=3000, help="3b, 3c: distinct images downloaded (0 = skip)")
    ap.add_argument("--skip-download", action="store_true", help="3b off: the download runs once, untimed")
    ap.add_argument("--rounds", type=int, default=2, help="3: rounds of off, on, on, off")
    ap.add_argument("--cores", type=int, default=2, help="3: the embedded Ray's CPUs")
    args = ap.parse_args()
    now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"load average {os.getloadavg()[0]:.1f}, {now}", flush=True)
    wall = time.perf_counter()
    if args.end_to_end:
        bench_end_to_end(args)
        print(f"wall {time.perf_counter() - wall:.0f} s, load average {os.getloadavg()[0]:.1f}")
        return
    bench_eval(args.eval, args.distance, args.queries)
    bench_phash_images(repeat=3)
    bench_urls(args.urls, args.list_size)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    print(f"peak RSS {peak:.0f} MB, wall {time.perf_counter() - wall:.0f} s")


if __name__ == "__main__":
    main()
