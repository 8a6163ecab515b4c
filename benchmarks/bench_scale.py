"""Per-core cost of the selection stages at scale, and the WARC reader vs a plain FastWARC loop.

1. Synthetic candidates (default 10,000,000 rows, `--rows` to run smaller): captions made of
   words drawn with their frequencies from the vocabulary of the 35,014 real captions in
   ../shared/data/captions, lengths drawn from theirs; URLs on 100,000 host names. Written once
   as 1M-row parquet url lists and cached under /tmp.
2. The stages `queries` (the default list), `candidates`, `match` (word mode), `balance`
   (strict, cap 20,000, oversample 1.5) run through `wit_builder.runner.run_pipeline`, as
   `wit-build run` does, one stage per call, on an embedded Ray with `--cores` CPUs. Per stage:
   rows in, wall seconds, rows/s per core (= rows/s / cores), rows per CPU-second of the whole
   process tree (driver, Ray's GCS and raylet, every worker; robust on a shared machine), and
   the peak RSS of each process (sampled from /proc every 0.1 s).
3. The WARC reader (`wit_builder.readers.warc.read_warc_blocks`, what the candidates stage runs
   on WARC inputs) against a plain loop in the style of cc2dataset: FastWARC's ArchiveIterator
   over response records, Resiliparse's HTMLTree, every <img> src + alt. Input: the real WARC in
   ../shared/data/warc concatenated (per-record gzip, so copies concatenate) to ~`--warc-mb` MB.
   One process, one core; the two alternate `--repeat` times, best run each; MB/s of the gzip
   WARC and of its uncompressed bytes, per CPU-second.

Run (results in benchmarks/RESULTS.md; 10M rows took ~13 min on 2 busy cores, ~2 GB under /tmp):
    nice .venv/bin/python benchmarks/bench_scale.py --rows 1000000
    nice .venv/bin/python benchmarks/bench_scale.py            # 10M rows
"""

from __future__ import annotations

import argparse
import collections
import gzip
import os
import shutil
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import DATA, TreeSampler, load_captions  # noqa: E402

WARC = os.path.join(DATA, "warc", "sample-0001.warc.gz")
FILE_ROWS = 1_000_000
STAGES = ["queries", "candidates", "match", "balance"]


# ------------------------------------------------------------------ synthetic candidates


def vocabulary() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(words, their probabilities, caption lengths in words) of the real captions."""
    counts: collections.Counter[str] = collections.Counter()
    lengths = []
    for caption in load_captions():
        words = caption.split()
        counts.update(words)
        lengths.append(len(words))
    words = np.array(list(counts), dtype=object)
    freq = np.array(list(counts.values()), dtype=np.float64)
    return words, freq / freq.sum(), np.array([n for n in lengths if n > 0])


def write_candidates(rows: int, seed: int) -> tuple[str, int]:
    """Parquet url lists of `rows` synthetic candidates (cached); returns (directory, bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = f"/tmp/wb_bench_scale_{rows}_{seed}"
    done = os.path.join(out, "DONE")
    if not os.path.exists(done):
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        words, p, lengths = vocabulary()
        rng = np.random.default_rng(seed)
        for f, start in enumerate(range(0, rows, FILE_ROWS)):
            n = min(FILE_ROWS, rows - start)
            lens = rng.choice(lengths, n)
            ids = rng.choice(len(words), int(lens.sum()), p=p)
            flat = words[ids].tolist()
            ends = np.cumsum(lens).tolist()
            captions, s = [], 0
            for e in ends:
                captions.append(" ".join(flat[s:e]))
                s = e
            idx = np.arange(start, start + n)
            urls = [
                f"https://img{h}.example.com/p/{i:x}.jpg" for i, h in zip(idx.tolist(), (idx * 7919 % 100_000).tolist())
            ]
            pq.write_table(pa.table({"url": urls, "caption": captions}), os.path.join(out, f"urls-{f:04d}.parquet"))
            print(f"  wrote {start + n:,} / {rows:,} candidates", flush=True)
        open(done, "w").close()
    size = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out) if n.endswith(".parquet"))
    return out, size


def pipeline_toml(path: str, inputs: str, rows: int, cores: int) -> None:
    with open(path, "w") as f:
        f.write(f"""
[run]
seed = 0
num_cpus = {cores}
progress = false

[queries]
default = true

[candidates]
inputs = ["{inputs}/*.parquet"]
partitions = {max(cores, rows // 250_000)}

[match]
mode = "word"

[balance]
cap = 20000
mode = "strict"
oversample = 1.5
""")


def run_stages(inputs: str, rows: int, cores: int, tmp: str) -> list[dict]:
    from wit_builder.pipeline import load_pipeline
    from wit_builder.runner import run_pipeline

    toml = os.path.join(tmp, "pipeline.toml")
    pipeline_toml(toml, inputs, rows, cores)
    pipeline = load_pipeline(toml)
    run_dir = os.path.join(tmp, "run")
    from wit_builder import parallel

    parallel.init(num_cpus=cores)  # started before the stages, as a run does: not in their times
    out = []
    for stage in STAGES:
        with TreeSampler(os.getpid(), interval=0.1) as sampler:
            t = time.perf_counter()
            result = run_pipeline(pipeline, run_dir, stages=[stage])[stage]
            wall = time.perf_counter() - t
        out.append(
            {
                "stage": stage,
                "rows_in": result.rows_in,
                "rows_out": result.rows_out,
                "wall": wall,
                "cpu": sampler.cpu_seconds,
                "peaks": sampler.peak_by_kind(),
                "peak_total": sampler.peak_total,
            }
        )
        r = out[-1]
        print(
            f"  {stage}: {r['rows_in']:,} rows in {wall:.1f}s, {r['rows_in'] / wall / cores:,.0f} rows/s per core, "
            f"{r['rows_in'] / max(r['cpu'], 1e-9):,.0f} rows per CPU-s",
            flush=True,
        )
    parallel.shutdown()
    return out


# ------------------------------------------------------------------ WARC reader vs a plain loop


def big_warc(target_mb: float) -> tuple[str, int, int]:
    """The sample WARC concatenated to ~target_mb (cached): (path, gzip bytes, raw bytes)."""
    with open(WARC, "rb") as f:
        one = f.read()
    copies = max(1, int(target_mb * 2**20 / len(one)))
    path = f"/tmp/wb_bench_scale_warc_{copies}.warc.gz"
    if not os.path.exists(path):
        with open(path + ".tmp", "wb") as f:
            for _ in range(copies):
                f.write(one)
        os.replace(path + ".tmp", path)
    return path, len(one) * copies, len(gzip.decompress(one)) * copies


def ours_reader(path: str) -> int:
    from wit_builder.readers.warc import read_warc_blocks

    return sum(t.num_rows for t in read_warc_blocks(path, 65536))


def plain_loop(path: str) -> int:
    """cc2dataset-style: every response record, parsed HTML, every <img> (src, alt)."""
    from fastwarc.warc import ArchiveIterator, WarcRecordType
    from resiliparse.parse.encoding import detect_encoding
    from resiliparse.parse.html import HTMLTree

    pairs = []
    with open(path, "rb") as f:
        for record in ArchiveIterator(f, record_types=WarcRecordType.response, parse_http=True):
            body = record.reader.read()
            tree = HTMLTree.parse_from_bytes(body, record.http_charset or detect_encoding(body))
            if tree.body is None:
                continue
            for img in tree.body.get_elements_by_tag_name("img"):
                pairs.append((img.getattr("src"), img.getattr("alt")))
    return len(pairs)


def bench_warc(target_mb: float, repeat: int) -> dict:
    path, gz_bytes, raw_bytes = big_warc(target_mb)
    best: dict[str, tuple[float, float, int]] = {}
    for r in range(repeat):
        for name, fn in (
            (("ours", ours_reader), ("plain", plain_loop))
            if r % 2 == 0
            else (
                ("plain", plain_loop),
                ("ours", ours_reader),
            )
        ):
            c0, t0 = time.process_time(), time.perf_counter()
            n = fn(path)
            cpu, wall = time.process_time() - c0, time.perf_counter() - t0
            if name not in best or cpu < best[name][0]:
                best[name] = (cpu, wall, n)
    return {"path": path, "gz_mb": gz_bytes / 2**20, "raw_mb": raw_bytes / 2**20, "best": best}


# ------------------------------------------------------------------ stored bytes per image


def stored_image_bytes() -> dict:
    """Mean source and stored bytes of the real photos through the download stage's resizer
    (256 px, keep_ratio, jpg q95: the pipeline defaults)."""
    from wit_builder.resize import ImageResizer, ResizeSettings, inspect, prepare

    photos_dir = os.path.join(DATA, "images", "coco_mini")
    resizer = ImageResizer(ResizeSettings(image_size=256))
    src, out = [], []
    for name in sorted(n for n in os.listdir(photos_dir) if n.lower().endswith(".jpg")):
        with open(os.path.join(photos_dir, name), "rb") as f:
            data = f.read()
        info = inspect(data, max_pixels=50_000_000)
        if info.error:
            continue
        src.append(len(data))
        out.append(len(resizer(prepare(data, info)).data))
    return {"photos": len(src), "source_kib": np.mean(src) / 1024, "stored_kib": np.mean(out) / 1024}


# ------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warc-mb", type=float, default=50.0)
    ap.add_argument("--repeat", type=int, default=3, help="WARC runs per reader, alternating")
    ap.add_argument("--skip-stages", action="store_true", help="only the WARC comparison")
    args = ap.parse_args()

    now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {now}")
    if not args.skip_stages:
        t = time.perf_counter()
        inputs, size = write_candidates(args.rows, args.seed)
        took = time.perf_counter() - t
        print(f"candidates: {args.rows:,} rows, {size / 2**20:.0f} MiB parquet ({took:.0f}s, cached in {inputs})")
        tmp = tempfile.mkdtemp(prefix="wb_bench_scale_")
        try:
            results = run_stages(inputs, args.rows, args.cores, tmp)
            run_bytes = {d: dir_bytes(os.path.join(tmp, "run", d)) for d in ("candidates", "matched", "selected")}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(
            f"\n{args.rows:,} candidates, {args.cores} CPUs (embedded Ray), load average now {os.getloadavg()[0]:.1f}"
        )
        print(
            "| stage | rows in | rows out | wall s | rows/s per core | rows per CPU-s "
            "| peak RSS by process (MiB) | peak RSS, tree (MiB) |"
        )
        print("|---|---:|---:|---:|---:|---:|---|---:|")
        for r in results:
            peaks = sorted(r["peaks"].items(), key=lambda kv: -kv[1])[:5]
            peak_text = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in peaks)
            print(
                f"| {r['stage']} | {r['rows_in']:,} | {r['rows_out']:,} | {r['wall']:.1f} | "
                f"{r['rows_in'] / r['wall'] / args.cores:,.0f} | {r['rows_in'] / max(r['cpu'], 1e-9):,.0f} | "
                f"{peak_text} | {r['peak_total'] / 2**20:,.0f} |"
            )
        print(
            "output bytes: "
            + ", ".join(
                f"{d}/ {b / 2**20:,.0f} MiB ({b / args.rows:.0f} B per candidate)" for d, b in run_bytes.items()
            )
        )

    img = stored_image_bytes()
    print(
        f"\nimages: the {img['photos']} real photos (COCO, ~640 px) average {img['source_kib']:.0f} KiB as "
        f"served, {img['stored_kib']:.1f} KiB stored at 256 px (keep_ratio, jpg q95)"
    )
    w = bench_warc(args.warc_mb, args.repeat)
    print(
        f"\nWARC: {w['gz_mb']:.1f} MiB gzip ({w['raw_mb']:.1f} MiB uncompressed), the real sample "
        f"concatenated; best of {args.repeat}, one core"
    )
    print("| reader | <img> rows | CPU s | MB/s per core (gzip) | MB/s per core (uncompressed) |")
    print("|---|---:|---:|---:|---:|")
    for name, label in (("ours", "wit_builder.readers.warc"), ("plain", "plain FastWARC + Resiliparse loop")):
        cpu, wall, n = w["best"][name]
        print(f"| {label} | {n:,} | {cpu:.2f} | {w['gz_mb'] / cpu:.1f} | {w['raw_mb'] / cpu:.1f} |")
    ratio = w["best"]["plain"][0] / w["best"]["ours"][0]
    print(f"ours / plain loop MB/s per core: {ratio:.2f}x")


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


if __name__ == "__main__":
    main()
