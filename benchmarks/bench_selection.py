"""Requests and bytes per kept pair: our pipeline (select, then download) vs img2dataset (download
everything, then cap).

A Zipf-skewed candidate list (default 1,000,000 rows) is served from one loopback nginx that
logs every request (status, bytes sent, URI), so requests and bytes are counted in the server:

- captions: with probability `--junk-share` (0.5) a web-junk alt text that no query matches
  (camera file names and ids: IMG_00012345, DSC01234, P1234567, hex; the match stage counts
  them), which is MetaCLIP's share of a raw pool that matching removes; else one
  of the 35,014 real captions in ../shared/data/captions (LAION 10k + COCO val2017) drawn with
  Zipf(`--zipf`, 1.0) multiplicities over a seeded permutation: web alt texts repeat, and the
  query terms in them follow the captions' own heavy-tailed word distribution;
- URLs: one per row, `http://127.0.0.1:PORT/{class}/{k}/{row}.jpg`, the class drawn per row:
  `gone` (404, `--dead` 0.25), `html` (a 200 text/html page, `--html` 0.05), `tiny` (a 32 px
  JPEG the filter drops as too_small, `--tiny` 0.04), else `ok` (photo k of a pool of the real
  photos in ../shared/data/images/coco_mini re-encoded at 160-400 px). A third of URLs fail or
  are dropped, as issue 12 describes real lists.

Ours: `wit_builder.runner.run_pipeline` (what `wit-build run` calls) with the default query
list, word matching, strict balance with `--oversample` (2.0), download (`--threads` per task,
`--cores` tasks; `max_per_domain` = all threads, as the one host is a benchmark server, not a
polite target; face blurring off where the stage has it, as img2dataset has none),
filter (sizes, caption, language en; dedup off: the pool repeats its photos on purpose), shards
with the trim back to the cap. The cap is chosen after matching so that the share of matched
pairs (query occurrences) in queries above the cap equals MetaCLIP's at 400M/20k: ~16k of 500k
entries have counts >= 20k and hold 5.35B of the 5.67B matches (94.4%) (Xu et al., "Demystifying
CLIP Data", sec. 3.3; checked against the released entry_counts_400m.json in MetaCLIP issue #24).

Peer: img2dataset (resize, timeout, retries as bench_download.py; `--threads`, `--cores` as ours) downloads every
URL of the list; the same cap is applied after, per query, to the rows that succeed and pass the
same filter. 1M downloads through img2dataset take hours here, so it runs on a uniform random
sample (`--peer-sample`, 10,000 rows): the script checks in the server log that it requests each
sampled URL exactly once, and scales requests and bytes by rows/sample. The peer's kept pairs
over the whole list are computed from each row's class and caption with the filter's own rules
(filters/basic.py, filters/language.py); that model is checked against every outcome measured
(ours: every download status and filter decision; img2dataset: every status of its sample).

Run (nginx-light needed; ~20 min at 1M rows on 2 busy cores, most of it the download of the
~271k selected URLs; ~10 GB of scratch under /tmp; results in benchmarks/RESULTS.md):
    nice .venv/bin/python benchmarks/bench_selection.py             # 1M rows
    nice .venv/bin/python benchmarks/bench_selection.py --rows 100000 --peer-sample 5000
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import DATA, free_port, load_captions, start_nginx  # noqa: E402

PHOTOS = os.path.join(DATA, "images", "coco_mini")
METACLIP_HEAD_SHARE = 5.35 / 5.67  # matches in entries with count >= 20k, MetaCLIP 400M
CLASSES = ("ok", "gone", "html", "tiny")
LOG_FORMAT = "log_format wb '$status $bytes_sent $request_uri';"


# ------------------------------------------------------------------ the simulated list and server


def _pool_one(args: tuple[str, str, int]) -> tuple[int, int]:
    from PIL import Image

    src, dst, side = args
    with Image.open(src) as im:
        im = im.convert("RGB")
        scale = side / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)
        im.save(dst, "JPEG", quality=85)
        return im.size


def make_site(root: str, workers: int) -> list[tuple[int, int]]:
    """The served files: pool/{k}.jpg (real photos, 160-400 px), tiny/0.jpg, page.html.
    Returns the pool's (width, height) by k."""
    from PIL import Image

    photos = sorted(os.path.join(PHOTOS, f) for f in os.listdir(PHOTOS) if f.lower().endswith(".jpg"))
    if not photos:
        sys.exit(f"no photos under {PHOTOS}")
    os.makedirs(os.path.join(root, "pool"))
    os.makedirs(os.path.join(root, "tiny"))
    jobs = [(p, os.path.join(root, "pool", f"{k}.jpg"), 160 + (k * 7919) % 241) for k, p in enumerate(photos)]
    with ProcessPoolExecutor(workers) as pool:
        sizes = list(pool.map(_pool_one, jobs, chunksize=8))
    Image.new("RGB", (32, 32), (200, 80, 40)).save(os.path.join(root, "tiny", "0.jpg"), "JPEG")
    with open(os.path.join(root, "page.html"), "w") as f:
        f.write("<html><head><title>Not an image</title></head><body>" + "<p>lorem ipsum</p>" * 200 + "</body></html>")
    return sizes


SERVER_BLOCK = r"""
  root %(root)s;
  access_log %(log)s wb;
  location ~ ^/ok/(\d+)/ { try_files /pool/$1.jpg =404; }
  location ~ ^/tiny/ { try_files /tiny/0.jpg =404; }
  location ~ ^/html/ { try_files /page.html =404; }
  location / { return 404; }
"""


def junk_captions(rng: np.random.Generator, n: int) -> np.ndarray:
    """Alt texts no query matches (camera file names, ids), the share of a raw pool that matching
    removes (MetaCLIP keeps ~50% of English pairs). Real junk often carries an extension or a
    number ("IMG_1234.jpg", "3/12"), which the default list does match ("jpg", "3")."""
    kinds = rng.integers(0, 4, n)
    nums = rng.integers(0, 10**8, n)
    out = np.empty(n, dtype=object)
    for i, (k, v) in enumerate(zip(kinds.tolist(), nums.tolist())):
        if k == 0:
            out[i] = f"IMG_{v:08d}"
        elif k == 1:
            out[i] = f"DSC{v % 100000:05d}"
        elif k == 2:
            out[i] = f"{v:08x}{(v * 2654435761) % 2**32:08x}"
        else:
            out[i] = f"P{v % 10**7:07d}"
    return out


def make_list(path: str, base: str, args: argparse.Namespace, pool_size: int) -> np.ndarray:
    """Write the candidate list (url, caption); returns each row's class index."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(args.seed)
    real = np.array(load_captions(), dtype=object)
    perm = rng.permutation(len(real))
    w = 1.0 / np.arange(1, len(real) + 1) ** args.zipf
    picks = perm[rng.choice(len(real), args.rows, p=w / w.sum())]
    captions = real[picks]
    junk = rng.random(args.rows) < args.junk_share
    captions[junk] = junk_captions(rng, int(junk.sum()))
    u = rng.random(args.rows)
    cls = np.zeros(args.rows, dtype=np.int8)  # ok
    edges = np.cumsum([args.dead, args.html, args.tiny])
    cls[u < edges[2]] = 3
    cls[u < edges[1]] = 2
    cls[u < edges[0]] = 1
    k = (np.arange(args.rows) * 7919) % pool_size
    names = np.array(CLASSES, dtype=object)[cls]
    urls = [f"{base}/{c}/{kk}/{i:08d}.jpg" for i, (c, kk) in enumerate(zip(names.tolist(), k.tolist()))]
    pq.write_table(pa.table({"url": urls, "caption": captions.tolist()}), path, row_group_size=100_000)
    return cls


def read_log(path: str, start: int) -> tuple[list[str], int, collections.Counter, int]:
    """(URIs requested, bytes sent, count by status, end offset) of the log past `start`."""
    uris, total, status = [], 0, collections.Counter()
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read()
    for line in data.decode().splitlines():
        code, sent, uri = line.split(" ", 2)
        uris.append(uri)
        total += int(sent)
        status[code] += 1
    return uris, total, status, start + len(data)


def log_size(path: str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0


def url_class(url: str) -> str:
    return url.split("/", 4)[3]


# ------------------------------------------------------------------ the peer: img2dataset

PEER = r"""
import json, sys, time, glob
from img2dataset import download
url_list, out, cores, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
t = time.perf_counter()
download(url_list=url_list, input_format="parquet", url_col="url", caption_col="caption",
         output_format="webdataset", output_folder=out, processes_count=cores, thread_count=threads,
         image_size=256, resize_mode="keep_ratio", resize_only_if_bigger=True, encode_format="jpg",
         encode_quality=95, number_sample_per_shard=1000, distributor="multiprocessing",
         timeout=10, retries=0, disallowed_header_directives=["noai", "noimageai", "noindex", "noimageindex"],
         enable_wandb=False)
print(json.dumps({"seconds": time.perf_counter() - t}))
"""


def run_peer(list_path: str, tmp: str, log: str, args: argparse.Namespace) -> dict:
    """img2dataset on a uniform random sample of the list; what the server saw, checked."""
    import pyarrow.parquet as pq

    table = pq.read_table(list_path)
    rng = np.random.default_rng(args.seed + 1)
    rows = np.sort(rng.choice(table.num_rows, min(args.peer_sample, table.num_rows), replace=False))
    sample = table.take(rows)
    sample_path = os.path.join(tmp, "peer_sample.parquet")
    pq.write_table(sample, sample_path)
    out = os.path.join(tmp, "peer_out")
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    start = log_size(log)
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", PEER, sample_path, out, str(args.cores), str(args.threads)],
        env=env,
        capture_output=True,
        start_new_session=True,
    )
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"img2dataset failed ({proc.returncode}):\n{proc.stderr.decode()[-3000:]}")
    time.sleep(0.5)  # nginx writes each log line at request end
    uris, sent, status, _ = read_log(log, start)
    urls = sample.column("url").to_pylist()
    wanted = collections.Counter(u.split("/", 3)[3] for u in urls)
    got = collections.Counter(u.lstrip("/") for u in uris)
    outcome = pq.read_table([p for p in glob.glob(os.path.join(out, "*.parquet"))], columns=["url", "status"])
    by_url = dict(zip(outcome.column("url").to_pylist(), outcome.column("status").to_pylist()))
    ok_expected = {u for u in urls if url_class(u) in ("ok", "tiny")}
    mismatch = sum((by_url.get(u) == "success") != (u in ok_expected) for u in urls)
    return {
        "sample_rows": len(urls),
        "requests": len(uris),
        "bytes": sent,
        "status": dict(status),
        "every_url_once": got == wanted,
        "distinct_urls_requested": len(got),
        "seconds": seconds,
        "successes": sum(v == "success" for v in by_url.values()),
        "outcome_rows": len(by_url),
        "model_mismatches": mismatch,
    }


# ------------------------------------------------------------------ ours: the pipeline


def pipeline_toml(path: str, list_path: str, args: argparse.Namespace) -> None:
    from wit_builder.stages import download

    # img2dataset neither detects nor blurs faces: where our download has that step, it is off
    faces = "blur_faces = false" if "blur_faces" in download.Config.__dataclass_fields__ else ""
    with open(path, "w") as f:
        f.write(f"""
[run]
seed = {args.seed}
num_cpus = {args.cores}
progress = false

[queries]
default = true

[candidates]
inputs = ["{list_path}"]
partitions = 8

[match]
mode = "word"

[balance]
cap = 20000
mode = "strict"
oversample = {args.oversample}

[download]
shard_size = 2000
threads_per_task = {args.threads}
max_per_domain = {args.threads * args.cores}
timeout = 10.0
retries = 0
allow_private_network = true
image_size = 256
resize_mode = "keep_ratio"
{faces}

[filter]
languages = ["en"]
exact_dedup = false
near_dedup_distance = -1
workers = {args.cores}

[shards]
samples_per_shard = 10000
""")


def choose_cap(counts: np.ndarray, share: float) -> tuple[int, float]:
    """The cap t whose share of pairs in queries with count > t is closest to `share`."""
    c = np.sort(counts[counts > 0])[::-1]
    total = c.sum()
    values = np.unique(c)
    above = np.array([c[c > v].sum() for v in values]) / total
    i = int(np.argmin(np.abs(above - share)))
    return int(values[i]), float(above[i])


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def zipf_exponent(counts: np.ndarray) -> float:
    """-slope of log(count) against log(rank) over ranks 10..10,000 (or fewer)."""
    c = np.sort(counts[counts > 0])[::-1][9:10_000]
    if len(c) < 2:
        return float("nan")
    ranks = np.arange(10, 10 + len(c))
    return float(-np.polyfit(np.log(ranks), np.log(c), 1)[0])


def read_dir(pattern: str, columns: list[str]):
    import pyarrow.parquet as pq

    paths = sorted(glob.glob(pattern))
    return pq.ParquetDataset(paths).read(columns=columns) if paths else None


# ------------------------------------------------------------------ main


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--zipf", type=float, default=1.0, help="exponent of caption multiplicities")
    ap.add_argument("--junk-share", type=float, default=0.5, help="rows with an alt text no query matches")
    ap.add_argument("--dead", type=float, default=0.25, help="share of URLs answering 404")
    ap.add_argument("--html", type=float, default=0.05, help="share of URLs answering an HTML page")
    ap.add_argument("--tiny", type=float, default=0.04, help="share of URLs answering a 32 px image")
    ap.add_argument("--oversample", type=float, default=2.0)
    ap.add_argument("--head-share", type=float, default=METACLIP_HEAD_SHARE)
    ap.add_argument("--peer-sample", type=int, default=10_000)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--threads", type=int, default=16, help="fetch threads per process, both tools")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (run dir, list, logs)")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="wb_bench_sel_")
    os.chmod(tmp, 0o755)  # nginx's worker (nobody) reads the site under it
    site = os.path.join(tmp, "site")
    log = os.path.join(tmp, "access.log")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    pool_sizes = make_site(site, args.cores)
    list_path = os.path.join(tmp, "candidates.parquet")
    cls = make_list(list_path, base, args, len(pool_sizes))
    print(
        f"list: {args.rows:,} rows ({time.perf_counter() - t0:.0f}s to build); classes: "
        + ", ".join(f"{c} {np.mean(cls == i):.1%}" for i, c in enumerate(CLASSES)),
        flush=True,
    )
    nginx = None
    try:
        nginx = start_nginx(tmp, SERVER_BLOCK % {"root": site, "log": log}, port, http_extra=LOG_FORMAT)
        report = run_all(tmp, log, list_path, pool_sizes, args)
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait(timeout=10)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}")
    return report


def run_all(tmp: str, log: str, list_path: str, pool_sizes: list[tuple[int, int]], args) -> dict:
    from wit_builder import balancing
    from wit_builder.pipeline import load_pipeline as load
    from wit_builder.runner import run_pipeline

    # the peer first, while no Ray runs in this process
    peer = run_peer(list_path, tmp, log, args)
    per_req = peer["requests"] / peer["sample_rows"]
    print(
        f"img2dataset on a uniform sample of {peer['sample_rows']:,} rows: {peer['requests']:,} requests "
        f"({per_req:.4f} per URL; every sampled URL requested exactly once: {peer['every_url_once']}), "
        f"{peer['bytes'] / 2**20:.1f} MiB, {peer['successes']:,} successes, {peer['seconds']:.0f}s; "
        f"outcomes differing from the URL classes: {peer['model_mismatches']}",
        flush=True,
    )

    toml = os.path.join(tmp, "pipeline.toml")
    pipeline_toml(toml, list_path, args)
    run_dir = os.path.join(tmp, "run")
    seconds: dict[str, float] = {}
    res = run_pipeline(load(toml), run_dir, stages=["queries", "candidates", "match"])
    seconds.update({k: v.seconds for k, v in res.items()})
    matched = read_dir(os.path.join(run_dir, "matched", "*.parquet"), ["uid", "url", "caption", "query_ids"])
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    queries = pq.read_table(os.path.join(run_dir, "queries", "queries.parquet"), columns=["query_id", "text"])
    nq = int(pc.max(queries["query_id"]).as_py()) + 1
    qids = pc.list_flatten(matched["query_ids"]).to_numpy().astype(np.int64)
    counts = np.bincount(qids, minlength=nq)
    cap, share = choose_cap(counts, args.head_share)
    print(f"query counts by rank: Zipf exponent {zipf_exponent(counts):.2f} (log-log slope, ranks 10-10,000)")
    n_head = int((counts > cap).sum())
    print(
        f"matched {matched.num_rows:,} of {args.rows:,} rows ({len(qids) / max(matched.num_rows, 1):.2f} "
        f"queries per matched caption); cap {cap}: {n_head:,} queries above it hold {share:.1%} of the "
        f"{len(qids):,} matches (MetaCLIP at 400M/20k: {args.head_share:.1%})",
        flush=True,
    )
    start = log_size(log)
    res = run_pipeline(load(toml, overrides=[f"balance.cap={cap}"]), run_dir)
    seconds.update({k: v.seconds for k, v in res.items() if k not in seconds})
    time.sleep(0.5)
    uris, sent, status, _ = read_log(log, start)
    selected = read_dir(os.path.join(run_dir, "selected", "part-*.parquet"), ["uid", "url", "query_id"])
    samples = read_dir(os.path.join(run_dir, "download", "*.parquet"), ["uid", "url", "status"])
    filtered = read_dir(os.path.join(run_dir, "filtered", "*.parquet"), ["uid", "drop_reason"])
    kept = read_dir(os.path.join(run_dir, "shards", "metadata", "*.parquet"), ["uid", "query_id"])
    for name, r in res.items():
        print(f"  {r.line(name)}", flush=True)

    # ---- the model of each row's fate, checked against every measured outcome
    from wit_builder.filters.language import LanguageId, is_other_language
    from wit_builder.stages import filter as filter_stage

    fcfg = filter_stage.Config(languages=["en"], exact_dedup=False, near_dedup_distance=-1)
    lid = LanguageId(fcfg.candidates)
    caption_ok: dict[str, bool] = {}

    def caption_passes(caption: str) -> bool:
        if caption not in caption_ok:
            lang, prob = lid.detect(caption)
            caption_ok[caption] = fcfg.rules.check_caption(caption) is None and not is_other_language(
                lang, prob, fcfg.languages, fcfg.language_min_confidence
            )
        return caption_ok[caption]

    def survives(url: str, caption: str) -> bool:
        c = url_class(url)
        if c != "ok":
            return False
        w, h = pool_sizes[int(url.split("/", 5)[4])]
        return fcfg.rules.check_image(w, h) is None and caption_passes(caption)

    m_urls = matched["url"].to_pylist()
    m_caps = matched["caption"].to_pylist()
    m_surv = np.fromiter((survives(u, c) for u, c in zip(m_urls, m_caps)), bool, len(m_urls))
    by_uid = dict(zip(matched["uid"].to_pylist(), range(matched.num_rows)))
    dl_mismatch = sum(
        (s == "success") != (url_class(u) in ("ok", "tiny"))
        for u, s in zip(samples["url"].to_pylist(), samples["status"].to_pylist())
    )
    kept_filter = {u for u, r in zip(filtered["uid"].to_pylist(), filtered["drop_reason"].to_pylist()) if r is None}
    filter_mismatch = sum(
        (uid in kept_filter) != bool(m_surv[by_uid[uid]])
        for uid, s in zip(samples["uid"].to_pylist(), samples["status"].to_pylist())
    )

    # ---- the peer's kept pairs: the same attribution and cap, after downloading everything
    lists = matched["query_ids"].combine_chunks()
    offsets = lists.offsets.to_numpy().astype(np.int64)
    attributed = balancing.attribute_rarest(offsets, qids, counts)
    sel_q = selected["query_id"].to_numpy()
    sel_attr = attributed[np.array([by_uid[u] for u in selected["uid"].to_pylist()], dtype=np.int64)]
    attribution_agrees = bool(np.array_equal(sel_q, sel_attr))
    a_all = np.bincount(attributed, minlength=nq)
    surv_q = np.bincount(attributed[m_surv], minlength=nq)
    peer_kept_q = np.minimum(surv_q, cap)
    ours_kept_q = np.bincount(kept["query_id"].to_numpy(), minlength=nq)
    sel_q_counts = np.bincount(sel_q, minlength=nq)

    ours_req, ours_kept = len(uris), kept.num_rows
    peer_req = per_req * args.rows
    peer_bytes = peer["bytes"] / peer["sample_rows"] * args.rows
    peer_kept = int(peer_kept_q.sum())
    ours_rpk, peer_rpk = ours_req / ours_kept, peer_req / peer_kept
    ours_bpk, peer_bpk = sent / ours_kept, peer_bytes / peer_kept
    ratio = peer_rpk / ours_rpk
    # a peer given only the matched rows (a user who matches before img2dataset)
    peer_m_rpk = per_req * matched.num_rows / peer_kept

    capped_both = int((peer_kept_q == cap).sum())
    met = int(((peer_kept_q == cap) & (ours_kept_q == cap)).sum())
    short = peer_kept_q - ours_kept_q
    print()
    print(
        f"model checks: download outcomes differing from the URL class: {dl_mismatch} of {samples.num_rows:,}; "
        f"filter decisions differing from the rules: {filter_mismatch}; stage attribution = ours: {attribution_agrees}"
    )
    print(
        f"ours: {ours_req:,} requests ({len(set(uris)):,} distinct URLs; {selected.num_rows:,} selected), "
        f"{sent / 2**20:.1f} MiB, {ours_kept:,} pairs kept in the shards"
    )
    print(
        f"img2dataset: {per_req:.4f} requests per URL x {args.rows:,} rows = {peer_req:,.0f} requests, "
        f"{peer_bytes / 2**20:,.1f} MiB (sample bytes x {args.rows / peer['sample_rows']:.2f}); "
        f"{peer_kept:,} pairs kept after the same filter and cap"
    )
    print(
        f"requests per kept pair: ours {ours_rpk:.3f}, img2dataset {peer_rpk:.3f}; "
        f"bytes per kept pair: ours {ours_bpk / 1024:.1f} KiB, img2dataset {peer_bpk / 1024:.1f} KiB"
    )
    print(
        f"caps after filtering: {capped_both:,} queries can reach the cap {cap} (img2dataset reaches it); "
        f"ours reaches it in {met:,}; max kept per query {int(ours_kept_q.max())} (cap {cap}); "
        f"pairs short of img2dataset's per-query count: {int(short[short > 0].sum()):,} in "
        f"{int((short > 0).sum()):,} queries"
    )
    text = dict(zip(queries["query_id"].to_pylist(), queries["text"].to_pylist()))
    print("\nhead queries (most attributed pairs; contain = matched rows containing the query):")
    print(f"{'query':24s} {'contain':>8s} {'attrib':>7s} {'select':>7s} {'ours':>5s} {'i2d':>5s} {'cap':>5s}")
    for q in np.argsort(-a_all)[:12]:
        print(
            f"{text.get(int(q), '?')[:24]:24s} {counts[q]:8d} {a_all[q]:7d} {sel_q_counts[q]:7d} "
            f"{ours_kept_q[q]:5d} {peer_kept_q[q]:5d} {cap:5d}"
        )
    disk = {d: dir_bytes(os.path.join(run_dir, d)) for d in ("download", "filtered", "shards")}
    print(
        "on disk: "
        + ", ".join(
            f"{d}/ {b / 2**20:,.0f} MiB ({b / ours_kept / 1024:.1f} KiB per kept pair)" for d, b in disk.items()
        )
    )
    print("\nstage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    print(
        f"(a user who matches first and gives img2dataset only the {matched.num_rows:,} matched rows: "
        f"{peer_m_rpk:.3f} requests per kept pair, {peer_m_rpk / ours_rpk:.2f}x ours)"
    )
    verdict = "meets" if ratio >= 3.0 else "does NOT meet"
    print(
        f"\n{ratio:.2f}x fewer requests per kept pair ({verdict} the >= 3x goal); "
        f"{peer_bpk / ours_bpk:.2f}x fewer bytes per kept pair"
    )
    return {"ratio": ratio}


if __name__ == "__main__":
    main()
