"""Download throughput: our download stage vs the plain img2dataset, same server, settings, cores.

A local nginx (Debian package `nginx-light` or `nginx`; started here on a free loopback port
with its own config in a temp dir) serves N distinct JPEGs: copies of the real photos in
../shared/data/images/coco_mini re-encoded at 300-1200 px on the longest side (distinct
sizes/qualities, so distinct bytes). Both tools get the same URL list, resize settings
(image_size 256, keep_ratio, no upscaling, jpg q95), opt-out list, timeout, retries (0),
shard size, threads per process and process count (= cores). Runs alternate between the tools;
the median of each is reported.

Figures per run:
- work images/s: successes / seconds of the download call itself, measured inside the tool's
  process after its imports (ours: `download.run` with Ray already started; img2dataset: its
  `download()` function, which is what its CLI calls);
- end-to-end images/s: the same over the whole process wall time (ours then includes starting
  Ray, img2dataset its multiprocessing pool);
- CPU ms per image: user+system CPU time of the tool's whole process tree (sampled from
  /proc every 50 ms, last value per process) per successful image: the figure that holds up
  on a machine shared with other work, where wall-clock rates swing with the neighbours' load;
- peak RSS: the largest sum of RSS over the tool's whole process tree (Ray's GCS, raylet and
  workers included), sampled every 50 ms.

Run (the images are generated once and cached under /tmp):
    . .venv/bin/activate && NO_ALBUMENTATIONS_UPDATE=1 python benchmarks/bench_download.py --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = os.path.join(os.path.dirname(REPO), "shared", "data", "images", "coco_mini")
OPTOUT = ["noai", "noimageai", "noindex", "noimageindex"]


def _make_one(args: tuple[str, str, int, int]) -> None:
    from PIL import Image

    src, dst, side, quality = args
    with Image.open(src) as im:
        im = im.convert("RGB")
        scale = side / max(im.size)
        size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        im.resize(size, Image.LANCZOS).save(dst, "JPEG", quality=quality)


def make_images(n: int, workers: int) -> str:
    """N distinct JPEGs at 300-1200 px, cached in /tmp/wb_bench_download_{n}."""
    out = f"/tmp/wb_bench_download_{n}"
    if os.path.exists(os.path.join(out, "DONE")):
        return out
    photos = sorted(os.path.join(PHOTOS, f) for f in os.listdir(PHOTOS) if f.lower().endswith(".jpg"))
    if not photos:
        sys.exit(f"no photos under {PHOTOS}")
    os.makedirs(out, exist_ok=True)
    jobs = [
        (photos[i % len(photos)], os.path.join(out, f"{i:06d}.jpg"), 300 + (i * 7919) % 901, 80 + i % 16)
        for i in range(n)
    ]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_make_one, jobs, chunksize=16))
    open(os.path.join(out, "DONE"), "w").close()
    return out


def start_nginx(root: str, tmp: str) -> tuple[subprocess.Popen, str]:
    """nginx serving `root` on a free loopback port (benchmarks/_common.py); (process, base url)."""
    port = _common.free_port()
    return _common.start_nginx(tmp, f"root {root};", port), f"http://127.0.0.1:{port}"


def write_inputs(tmp: str, base: str, names: list[str]) -> tuple[str, str]:
    """img2dataset's url list and our selected/ parts, with the same rows in the same order."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    sys.path.insert(0, REPO)
    from wit_builder import io, schema

    urls = [f"{base}/{n}" for n in names]
    caps = [f"a photo number {i}" for i in range(len(urls))]
    url_list = os.path.join(tmp, "urls.parquet")
    pq.write_table(pa.table({"url": urls, "caption": caps}), url_list)
    uids = [hashlib.blake2b((u + "\x1f" + c).encode(), digest_size=8).hexdigest() for u, c in zip(urls, caps)]
    sel = pa.table(
        {
            "uid": uids,
            "url": urls,
            "caption": caps,
            "source_file": ["urls.parquet"] * len(urls),
            "page_url": [None] * len(urls),
            "query_ids": [[0]] * len(urls),
            "query_id": [0] * len(urls),
            "rank": [0.0] * len(urls),
            "query_text": ["q"] * len(urls),
        }
    )
    sel_dir = os.path.join(tmp, "selected")
    io.write_parquet(sel, os.path.join(sel_dir, "part-00000.parquet"), schema.SELECTED)
    return url_list, sel_dir


OURS = r"""
import json, sys, time, shutil, os
t0 = time.perf_counter()
from wit_builder import parallel
from wit_builder.stages import download
from wit_builder.stages.base import StageContext
run_dir, shard_size, threads, cores = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
parallel.init(num_cpus=cores)
cfg = download.Config(shard_size=shard_size, threads_per_task=threads, max_per_domain=threads, timeout=10.0,
                      retries=0, image_size=256, resize_mode="keep_ratio", resize_only_if_bigger=True,
                      encode_format="jpg", encode_quality=95, allow_private_network=True)
t1 = time.perf_counter()
res = download.run(StageContext(run_dir=run_dir, num_cpus=cores, progress=False), cfg)
t2 = time.perf_counter()
print(json.dumps({"work_s": t2 - t1, "successes": res.rows_out, "dropped": res.dropped}))
"""

THEIRS = r"""
import json, sys, time, glob
t0 = time.perf_counter()
from img2dataset import download
url_list, out = sys.argv[1], sys.argv[2]
shard_size, threads, cores = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
extract_exif = sys.argv[6] == "true"
t1 = time.perf_counter()
download(url_list=url_list, input_format="parquet", url_col="url", caption_col="caption",
         output_format="webdataset", output_folder=out, processes_count=cores, thread_count=threads,
         image_size=256, resize_mode="keep_ratio", resize_only_if_bigger=True, encode_format="jpg",
         encode_quality=95, number_sample_per_shard=shard_size, distributor="multiprocessing",
         timeout=10, retries=0, disallowed_header_directives=%r, enable_wandb=False, extract_exif=extract_exif)
t2 = time.perf_counter()
ok = sum(json.load(open(p))["successes"] for p in glob.glob(out + "/*_stats.json"))
print(json.dumps({"work_s": t2 - t1, "successes": ok}))
"""
THEIRS = THEIRS % (OPTOUT,)


def _tree(root: int) -> dict[int, tuple[int, int]]:
    """pid -> (rss bytes, cpu ticks user+system) of `root` and all its descendants."""
    children: dict[int, list[int]] = {}
    info: dict[int, tuple[int, int]] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(parts[1]), []).append(int(pid))
            info[int(pid)] = (int(parts[21]) * page, int(parts[11]) + int(parts[12]))
        except (OSError, IndexError, ValueError):
            continue
    out, stack = {}, [root]
    while stack:
        p = stack.pop()
        if p in info:
            out[p] = info[p]
        stack.extend(children.get(p, []))
    return out


def run_measured(cmd: list[str], env: dict) -> dict:
    """Run `cmd` in its own session; wall time, peak tree RSS, CPU seconds of the tree."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    peak, cpu_ticks = 0, {}
    while proc.poll() is None:
        tree = _tree(proc.pid)
        peak = max(peak, sum(rss for rss, _ in tree.values()))
        for pid, (_, ticks) in tree.items():
            cpu_ticks[pid] = max(ticks, cpu_ticks.get(pid, 0))
        time.sleep(0.05)
    wall = time.perf_counter() - t
    out, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"{cmd[:3]} failed ({proc.returncode}):\n{err.decode()[-3000:]}")
    res = json.loads(out.decode().strip().splitlines()[-1])
    res.update(wall_s=wall, peak_rss_mb=peak / 2**20, cpu_s=sum(cpu_ticks.values()) / os.sysconf("SC_CLK_TCK"))
    try:  # Ray helpers still shutting down: end the processes of this run's session, wait for them
        os.killpg(proc.pid, 9)
        for _ in range(100):
            os.killpg(proc.pid, 0)
            time.sleep(0.05)
    except ProcessLookupError:
        pass
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--runs", type=int, default=5, help="runs per tool, alternating")
    ap.add_argument("--cores", type=int, default=os.cpu_count())
    ap.add_argument("--threads", type=int, default=64, help="fetch threads per process/task")
    ap.add_argument("--shard-size", type=int, default=250)
    ap.add_argument(
        "--img2dataset-extract-exif",
        choices=["true", "false"],
        default="true",
        help="img2dataset's own default is true (pure-Python EXIF parsing per image); we do not extract EXIF",
    )
    args = ap.parse_args()

    root = make_images(args.images, args.cores)
    names = sorted(n for n in os.listdir(root) if n.endswith(".jpg"))
    tmp = tempfile.mkdtemp(prefix="wb_bench_dl_")
    nginx, base = start_nginx(root, tmp)
    env = dict(os.environ, PYTHONPATH=REPO, NO_ALBUMENTATIONS_UPDATE="1", RAY_USAGE_STATS_ENABLED="0")
    results: dict[str, list[dict]] = {"ours": [], "img2dataset": []}
    try:
        url_list, sel_dir = write_inputs(tmp, base, names)
        for r in range(args.runs):
            order = ["ours", "img2dataset"] if r % 2 == 0 else ["img2dataset", "ours"]
            for tool in order:
                out = os.path.join(tmp, f"{tool}_{r}")
                if tool == "ours":
                    os.makedirs(out)
                    shutil.copytree(sel_dir, os.path.join(out, "selected"))
                    cmd = [sys.executable, "-c", OURS, out, str(args.shard_size), str(args.threads), str(args.cores)]
                else:
                    cmd = [
                        sys.executable,
                        "-c",
                        THEIRS,
                        url_list,
                        out,
                        str(args.shard_size),
                        str(args.threads),
                        str(args.cores),
                        args.img2dataset_extract_exif,
                    ]
                res = run_measured(cmd, env)
                res["work_ips"] = res["successes"] / res["work_s"]
                res["e2e_ips"] = res["successes"] / res["wall_s"]
                res["cpu_ms_per_img"] = 1000 * res["cpu_s"] / max(res["successes"], 1)
                results[tool].append(res)
                print(
                    f"run {r} {tool:12s} ok={res['successes']} work {res['work_ips']:7.1f} img/s "
                    f"e2e {res['e2e_ips']:7.1f} img/s cpu {res['cpu_ms_per_img']:5.2f} ms/img "
                    f"peak RSS {res['peak_rss_mb']:6.0f} MB",
                    flush=True,
                )
                shutil.rmtree(out, ignore_errors=True)
    finally:
        nginx.terminate()
        nginx.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)

    med = {
        t: {k: statistics.median(r[k] for r in rs) for k in ("work_ips", "e2e_ips", "cpu_ms_per_img", "peak_rss_mb")}
        for t, rs in results.items()
    }
    o, i = med["ours"], med["img2dataset"]
    print()
    print(
        f"{args.images} images, {args.cores} cores, {args.threads} threads/process, shard {args.shard_size}, "
        f"img2dataset extract_exif={args.img2dataset_extract_exif}, median of {args.runs} alternating runs"
    )
    print("| tool | work img/s | end-to-end img/s | CPU ms/img (whole process tree) | peak RSS MB |")
    print("|---|---|---|---|---|")
    for t in ("ours", "img2dataset"):
        m = med[t]
        print(
            f"| {t} | {m['work_ips']:.1f} | {m['e2e_ips']:.1f} | {m['cpu_ms_per_img']:.2f} | {m['peak_rss_mb']:.0f} |"
        )
    print(
        f"ratio ours/img2dataset: work img/s {o['work_ips'] / i['work_ips']:.2f}x, "
        f"end-to-end img/s {o['e2e_ips'] / i['e2e_ips']:.2f}x, "
        f"images per CPU-second {i['cpu_ms_per_img'] / o['cpu_ms_per_img']:.2f}x, "
        f"peak RSS {o['peak_rss_mb'] / i['peak_rss_mb']:.2f}x"
    )


if __name__ == "__main__":
    main()
