"""Training throughput: our trainer vs `python -m open_clip_train.main`, same shards, model, batch.

Both sides train the same open_clip architecture on the same synthetic webdataset shards (written
by tests/synthetic_shards.py) with the same global batch, worker count, precision and thread
count, for the same number of epochs. Each side's own per-window step timings (data wait
included) give samples/s; the median over windows after the first (warm-up) is reported, plus
the end-to-end wall time of each process. open_clip_train is run through its own `main()` after
registering the custom architecture with `open_clip.add_model_config` (it has no flag for a
config file); with `--model ViT-B-32` no registration happens.

CPU (tiny model, what RESULTS_train.md records):
    $ python benchmarks/bench_train.py
GPU (ViT-B-32, bf16; prints our data-wait fraction too):
    $ python benchmarks/bench_train.py --model ViT-B-32 --image-size 224 --samples 20000 --batch 256 \\
        --workers 8 --precision bf16 --threads 0
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]  # tests/ holds the synthetic-shard writer

from synthetic_shards import write_shards  # noqa: E402
from wit_builder.train.model import TINY_ARCH  # noqa: E402

OPEN_CLIP_RUNNER = """
import json, sys
import open_clip
if sys.argv[1]:
    open_clip.add_model_config(sys.argv[1])
from open_clip_train.main import main
main(sys.argv[2:])
"""


def run_ours(args, manifest: str, arch_file: str, work: str) -> dict:
    out = os.path.join(work, "ours")
    sets = [
        "steps=0",
        f"epochs={args.epochs}",
        f"batch_size={args.batch}",
        f"log_every={args.log_every}",
        "save_every=0",
        f"threads={args.threads}",
        f'precision="{"fp32" if args.precision == "fp32" else "bf16"}"',
        f'device="{args.device}"',
        f"data.workers={args.workers}",
        f"data.shuffle_buffer={args.buffer}",
        'data.last_batch="drop"',
        f'model.name="{args.model}"',
        "optim.warmup_steps=10",
        "optim.lr=5e-4",
        "optim.weight_decay=0.2",
        "optim.grad_clip=0",
    ]
    if arch_file:
        sets.append(f"model.arch={_toml_inline(json.load(open(arch_file)))}")
    cmd = [sys.executable, "-m", "wit_builder.train", "--data", manifest, "--out", out, "--no-resume"]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(args))
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"our trainer failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(x) for x in open(os.path.join(out, "train_log.jsonl"))]
    windows = [r["samples_per_s"] for r in records[1:]] or [r["samples_per_s"] for r in records]
    return {
        "samples_per_s": statistics.median(windows),
        "steps": records[-1]["step"],
        "wall_s": wall,
        "data_wait": statistics.median(r["data_wait"] for r in records[1:] or records),
    }


def run_open_clip(args, manifest: str, arch_file: str, work: str) -> dict:
    m = json.load(open(manifest))
    folder = os.path.dirname(manifest)
    tars = [t["path"] for t in m["tars"]]
    pattern = os.path.join(folder, "{" + f"{tars[0][:-4]}..{tars[-1][:-4]}" + "}.tar")
    precision = {"fp32": "fp32", "bf16": "amp_bf16"}[args.precision]
    cmd = [
        sys.executable,
        "-c",
        OPEN_CLIP_RUNNER,
        arch_file or "",
        "--train-data",
        pattern,
        "--train-num-samples",
        str(m["total_samples"]),
        "--dataset-type",
        "webdataset",
        "--batch-size",
        str(args.batch),
        "--epochs",
        str(args.epochs),
        "--workers",
        str(args.workers),
        "--model",
        args.model,
        "--precision",
        precision,
        "--lr",
        "5e-4",
        "--wd",
        "0.2",
        "--warmup",
        "10",
        "--log-every-n-steps",
        str(args.log_every),
        "--save-frequency",
        "0",
        "--report-to",
        "",
        "--logs",
        os.path.join(work, "open_clip_logs"),
        "--name",
        f"bench-{time.time_ns()}",
        "--seed",
        "0",
        "--local-loss",
        "--gather-with-grad",
        "--device",
        args.device,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(args))
    wall = time.perf_counter() - t0
    text = proc.stdout + proc.stderr
    if proc.returncode or "Batch (t)" not in text:
        raise SystemExit(f"open_clip_train failed:\n{text[-3000:]}")
    # "... Batch (t): 0.123, 520.3/s, 520.3/s/gpu ..." — batch_time_m.avg over the window, in seconds
    avgs = [float(x) for x in re.findall(r"Batch \(t\): ([0-9.]+)", text)]
    windows = [args.batch / a for a in avgs[1:] or avgs]
    steps = [int(x) for x in re.findall(r"\[\s*(\d+)/", text)]
    return {
        "samples_per_s": statistics.median(windows),
        "log_lines": len(avgs),
        "wall_s": wall,
        "samples_logged": steps[-1] if steps else None,
    }


def _toml_inline(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_inline(v)}" for k, v in value.items()) + " }"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_inline(v) for v in value) + "]"
    return repr(value)


def _env(args) -> dict:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": REPO}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="wit-bench-tiny", help="open_clip name; the default is our tiny config")
    p.add_argument("--image-size", type=int, default=32, help="synthetic image side in pixels")
    p.add_argument("--samples", type=int, default=8192, help="fewer make the ratio noisy (windows of a few ms)")
    p.add_argument("--tars", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--buffer", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1, help="OMP threads per process (0 = default)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--log-every", type=int, default=8)
    p.add_argument("--repeat", type=int, default=1, help="alternate the two sides this many times")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as work:
        manifest = write_shards(os.path.join(work, "shards"), args.samples, args.tars, args.image_size)
        arch_file = ""
        if args.model == "wit-bench-tiny":
            arch_file = os.path.join(work, "wit-bench-tiny.json")
            with open(arch_file, "w") as f:
                json.dump(TINY_ARCH, f)
        ours, theirs = [], []
        for _ in range(args.repeat):
            ours.append(run_ours(args, manifest, arch_file, work))
            theirs.append(run_open_clip(args, manifest, arch_file, work))
    o = statistics.median(r["samples_per_s"] for r in ours)
    t = statistics.median(r["samples_per_s"] for r in theirs)
    print(
        f"setup: model={args.model} image={args.image_size}px samples={args.samples} tars={args.tars} "
        f"batch={args.batch} epochs={args.epochs} workers={args.workers} threads={args.threads} "
        f"precision={args.precision} device={args.device} repeat={args.repeat}"
    )
    for name, runs in (("wit-train", ours), ("open_clip_train", theirs)):
        for r in runs:
            print(f"  {name:<16} {r['samples_per_s']:9.1f} samples/s (median window)  wall {r['wall_s']:6.1f} s  {r}")
    print(f"wit-train / open_clip_train samples/s: {o / t:.2f}x   (ours {o:.1f}, theirs {t:.1f})")
    print(f"wit-train data-wait fraction (median window): {statistics.median(r['data_wait'] for r in ours):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
