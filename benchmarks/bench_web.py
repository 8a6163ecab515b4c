"""Download on a simulated web: our download stage vs img2dataset, same URLs, server, cores, run.

The web is tests/simweb.py: one server process answering for `--hosts` host names (Zipf-sized,
exponent measured on real LAION urls), each on its own loopback address, with the failure mix
documented there (dead names, refused connections, name servers that never answer, slow and
trickling hosts, 404/403/5xx, HTML pages, resets, opt-outs, huge images, redirects) and real
COCO JPEGs. Both tools reach it only through its DNS server on 127.0.0.1:
- ours: `[download] dns_servers = ["127.0.0.1:PORT"]` (its own resolver, deadline-bounded and
  cached per worker), `allowed_networks = ["127.0.0.0/8"]`;
- img2dataset (urllib, the system resolver): a sitecustomize.py on its PYTHONPATH routes
  Python's getaddrinfo for `*.test` names to the same DNS server, a lookup per connection — what
  the system resolver does without a local cache. No system file is touched, no LD_PRELOAD. The
  simulated DNS answers at once (a warm local resolver): img2dataset's best case for DNS.
Same settings for both: threads per process, processes = cores, timeout 10 s, retries 0, resize
(256, keep_ratio, no upscaling, jpg q95), shard size, the default opt-out list. Ours also keeps
at most `--max-per-domain` connections per host (all tasks together); img2dataset has no limit.
Our stage blurs faces by default; img2dataset does not, so `--blur-faces off` (the default
here) compares the same work; `--blur-faces on` measures the stage as shipped.

Figures per tool (the server counts what it saw during that tool's run only):
images/s end to end (successes / wall time of the tool's whole process, Ray or the
multiprocessing pool start included), successes, HTTP requests, bytes sent, DNS queries,
connections, and the peak concurrent connections of any one host.

Run (nice: the machine is shared):
    NO_ALBUMENTATIONS_UPDATE=1 nice .venv/bin/python benchmarks/bench_web.py --urls 20000 --hosts 2000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests"), os.path.join(REPO, "benchmarks")]

from bench_download import OPTOUT, run_measured  # noqa: E402

from simweb import SimWeb, build_spec, sitecustomize_dir  # noqa: E402

OURS = r"""
import json, sys, time
from wit_builder import parallel
from wit_builder.stages import download
from wit_builder.stages.base import StageContext
run_dir, shard_size, threads, cores, per_domain, dns, faces = sys.argv[1:8]
parallel.init(num_cpus=int(cores))
extra = {"blur_faces": faces == "on"} if "blur_faces" in download.Config.__dataclass_fields__ else {}
cfg = download.Config(**extra, shard_size=int(shard_size), threads_per_task=int(threads),
                      max_per_domain=int(per_domain),
                      timeout=10.0, retries=0, image_size=256, resize_mode="keep_ratio", resize_only_if_bigger=True,
                      encode_format="jpg", encode_quality=95, dns_servers=[dns], allowed_networks=["127.0.0.0/8"])
t1 = time.perf_counter()
res = download.run(StageContext(run_dir=run_dir, num_cpus=int(cores), progress=False), cfg)
print(json.dumps({"work_s": time.perf_counter() - t1, "successes": res.rows_out, "dropped": res.dropped}))
"""

THEIRS = r"""
import json, sys, time, glob
from img2dataset import download
url_list, out, shard_size, threads, cores, exif = sys.argv[1:7]
t1 = time.perf_counter()
download(url_list=url_list, input_format="parquet", url_col="url", caption_col="caption",
         output_format="webdataset", output_folder=out, processes_count=int(cores), thread_count=int(threads),
         image_size=256, resize_mode="keep_ratio", resize_only_if_bigger=True, encode_format="jpg",
         encode_quality=95, number_sample_per_shard=int(shard_size), distributor="multiprocessing",
         timeout=10, retries=0, disallowed_header_directives=OPTOUT_LIST, enable_wandb=False,
         extract_exif=exif == "true")
stats = [json.load(open(p)) for p in glob.glob(out + "/*_stats.json")]
errors = {}
for s in stats:
    for k, v in s["status_dict"].items():
        errors[k[:60]] = errors.get(k[:60], 0) + v
print(json.dumps({"work_s": time.perf_counter() - t1, "successes": sum(s["successes"] for s in stats),
                  "dropped": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:12])}))
""".replace("OPTOUT_LIST", repr(OPTOUT))


def write_inputs(tmp: str, urls: list[str]) -> tuple[str, str]:
    """img2dataset's url list and our selected/ part, the same rows in the same order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from wit_builder import io, schema

    caps = [f"a photo number {i}" for i in range(len(urls))]
    url_list = os.path.join(tmp, "urls.parquet")
    pq.write_table(pa.table({"url": urls, "caption": caps}), url_list)
    uids = [hashlib.blake2b((u + "\x1f" + c).encode(), digest_size=8).hexdigest() for u, c in zip(urls, caps)]
    n = len(urls)
    sel = pa.table(
        {
            "uid": uids,
            "url": urls,
            "caption": caps,
            "source_file": ["urls.parquet"] * n,
            "page_url": [None] * n,
            "query_ids": [[0]] * n,
            "query_id": [0] * n,
            "rank": [0.0] * n,
            "query_text": ["q"] * n,
        }
    )
    sel_dir = os.path.join(tmp, "selected")
    io.write_parquet(sel, os.path.join(sel_dir, "part-00000.parquet"), schema.SELECTED)
    return url_list, sel_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--urls", type=int, default=20_000)
    ap.add_argument("--hosts", type=int, default=2_000)
    ap.add_argument("--runs", type=int, default=1, help="runs per tool, alternating")
    ap.add_argument("--cores", type=int, default=os.cpu_count())
    ap.add_argument("--threads", type=int, default=64, help="fetch threads per process/task")
    ap.add_argument("--max-per-domain", type=int, default=16)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--first", choices=["ours", "img2dataset"], default="ours", help="which tool runs first")
    ap.add_argument("--img2dataset-extract-exif", choices=["true", "false"], default="true")
    ap.add_argument(
        "--blur-faces",
        choices=["on", "off"],
        default="off",
        help="our face blurring (on by default in the stage; img2dataset has none, so off compares like for like)",
    )
    args = ap.parse_args()

    spec = build_spec(args.urls, args.hosts, seed=args.seed)
    tmp = tempfile.mkdtemp(prefix="wb_bench_web_")
    site = sitecustomize_dir()
    results: dict[str, list[dict]] = {"ours": [], "img2dataset": []}
    with SimWeb(spec) as web:
        url_list, sel_dir = write_inputs(tmp, web.urls)
        base_env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", RAY_USAGE_STATS_ENABLED="0")
        for r in range(args.runs):
            first = ["ours", "img2dataset"] if args.first == "ours" else ["img2dataset", "ours"]
            for tool in first if r % 2 == 0 else first[::-1]:
                out = os.path.join(tmp, f"{tool}_{r}")
                shard, thr, cores = str(args.shard_size), str(args.threads), str(args.cores)
                if tool == "ours":
                    os.makedirs(out)
                    shutil.copytree(sel_dir, os.path.join(out, "selected"))
                    per_domain, faces = str(args.max_per_domain), args.blur_faces
                    cmd = [sys.executable, "-c", OURS, out, shard, thr, cores, per_domain, web.dns_server, faces]
                    env = dict(base_env, PYTHONPATH=REPO)
                else:
                    exif = args.img2dataset_extract_exif
                    cmd = [sys.executable, "-c", THEIRS, url_list, out, shard, thr, cores, exif]
                    env = dict(base_env, PYTHONPATH=os.pathsep.join([site, REPO]), SIMWEB_DNS=web.dns_server)
                web.reset()
                res = run_measured(["nice", *cmd], env)
                time.sleep(1.0)  # let the server see the last connections close
                s = web.stats()
                res.update(
                    e2e_ips=res["successes"] / res["wall_s"],
                    requests=s["requests"],
                    bytes_sent=s["bytes_sent"],
                    dns_queries=s["dns_queries"],
                    connections=s["connections"],
                    peak_host=max(s["peak_per_host"].values() or [0]),
                    top_host=max(s["peak_per_host"].items(), key=lambda kv: kv[1], default=("-", 0))[0],
                )
                results[tool].append(res)
                print(
                    f"run {r} {tool:12s} ok={res['successes']} {res['e2e_ips']:6.1f} img/s wall {res['wall_s']:6.1f}s "
                    f"requests {res['requests']} MB {res['bytes_sent'] / 1e6:.0f} dns {res['dns_queries']} "
                    f"peak conns/host {res['peak_host']} cpu {res['cpu_s']:.0f}s",
                    flush=True,
                )
                print("   drops:", json.dumps(res.get("dropped", {}))[:400], flush=True)
                shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(site, ignore_errors=True)

    def best(tool: str) -> dict:  # the median run by images/s
        rs = sorted(results[tool], key=lambda x: x["e2e_ips"])
        return rs[len(rs) // 2]

    o, i = best("ours"), best("img2dataset")
    print()
    print(
        f"{args.urls} URLs on {args.hosts} simulated hosts, {args.cores} cores, {args.threads} threads/process, "
        f"max_per_domain {args.max_per_domain} (ours), ours blur_faces={args.blur_faces}, "
        f"img2dataset extract_exif={args.img2dataset_extract_exif}, "
        f"{args.runs} run(s) per tool"
    )
    print("| tool | img/s end to end | successes | requests | MB sent | DNS queries | peak conns/host | CPU s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, m in (("ours", o), ("img2dataset", i)):
        print(
            f"| {name} | {m['e2e_ips']:.1f} | {m['successes']} | {m['requests']} | {m['bytes_sent'] / 1e6:.0f} | "
            f"{m['dns_queries']} | {m['peak_host']} | {m['cpu_s']:.0f} |"
        )
    print(f"ratio ours/img2dataset images/s end to end: {o['e2e_ips'] / i['e2e_ips']:.2f}x")
    per_cpu = (o["successes"] / o["cpu_s"]) / (i["successes"] / i["cpu_s"])
    print(f"ratio ours/img2dataset images per CPU-second (whole process tree): {per_cpu:.2f}x")
    if o["peak_host"] > args.max_per_domain:
        sys.exit(f"FAIL: ours opened {o['peak_host']} connections to one host (limit {args.max_per_domain})")


if __name__ == "__main__":
    main()
