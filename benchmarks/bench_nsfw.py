"""Cost of NSFW scoring (issue 13): per core, and what turning it on does to the filter stage.

NSFW scores are computed on the CLIP image embeddings the filter already makes for the CLIP
score (filters/nsfw.py), so the cost of `nsfw = "zero_shot" | "mlp"` is (a) the CLIP image
embedding when the CLIP score is not on anyway, plus (b) the NSFW head on the embeddings. A
random-init open_clip model stands in for real weights (same architecture, same cost; nothing
downloaded): `--model ViT-B-32` (open_clip's bundled config) by default, `--model tiny` for the
tests' 32-d toy model.

1. Per core (torch.set_num_threads(1), one process, CPU seconds of the process): CLIP image
   embedding of the demo photos (decode + preprocess + encode, batches of 32) in images/s; the
   zero-shot NSFW score (prompt embedding once, then one matmul + softmax per batch) and the
   MLP head (LAION's layout, random weights) on those embeddings, in images/s.
2. End to end: the filter stage of a finished demo run (`--run`, made by `wit-build demo`),
   rerun through the runner with the CLIP score off / on / on + zero-shot NSFW / on + MLP NSFW
   (a copy of the run, so the demo is untouched); the filter's wall seconds, which include the
   Ray actors' start and the model load.

Run:
    wit-build demo --out runs/demo
    nice .venv/bin/python benchmarks/bench_nsfw.py --run runs/demo
"""

from __future__ import annotations

import argparse
import io as _io
import json
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))
DEMO_IMAGES = os.path.join(REPO, "demo", "images")


def make_model(kind: str, d: str) -> tuple[str, str, str]:
    """(model name, checkpoint, model config or "") of a random-init open_clip model saved in `d`."""
    import open_clip
    import torch

    cfg_path = ""
    name = kind
    if kind == "tiny":
        from test_filter_clip import TINY

        name, cfg_path = "wb-tiny-clip", os.path.join(d, "wb-tiny-clip.json")
        with open(cfg_path, "w") as f:
            json.dump(TINY, f)
        open_clip.add_model_config(cfg_path)
    torch.manual_seed(0)
    model = open_clip.create_model(name)
    ckpt = os.path.join(d, f"{name}.pt")
    torch.save({"state_dict": model.state_dict()}, ckpt)
    return name, ckpt, cfg_path


def per_core(name: str, ckpt: str, cfg_path: str, d: str, repeat: int) -> dict[str, float]:
    import torch
    from PIL import Image

    from wit_builder.filters.clip_score import ClipScorer
    from wit_builder.filters.nsfw import LAYERS, MlpNsfw, NsfwHead, ZeroShotNsfw

    torch.set_num_threads(1)
    scorer = ClipScorer(name, ckpt, cfg_path, device="cpu", batch_size=32)
    blobs = [open(os.path.join(DEMO_IMAGES, f), "rb").read() for f in sorted(os.listdir(DEMO_IMAGES))]
    t = time.process_time()
    for _ in range(repeat):
        emb = scorer.embed_images([Image.open(_io.BytesIO(b)) for b in blobs])
    embed_s = (time.process_time() - t) / repeat
    n = len(blobs)
    t = time.process_time()
    zero = ZeroShotNsfw(scorer)
    zero_setup = time.process_time() - t
    big = emb.repeat(200, 1)  # enough rows to time the heads
    t = time.process_time()
    zero(big)
    zero_s = time.process_time() - t
    torch.manual_seed(0)
    head = NsfwHead(scorer.embed_dim)
    head_path = os.path.join(d, "head.pt")
    torch.save({k: v for k, v in head.state_dict().items() if k.split(".")[0] in (*LAYERS, "norm")}, head_path)
    mlp = MlpNsfw(head_path, scorer.embed_dim)
    t = time.process_time()
    mlp(big)
    mlp_s = time.process_time() - t
    return {
        "images": n,
        "embed_dim": scorer.embed_dim,
        "clip_embed_images_per_s": n / embed_s,
        "zero_shot_prompt_setup_s": zero_setup,
        "zero_shot_images_per_s": len(big) / zero_s,
        "mlp_images_per_s": len(big) / mlp_s,
    }


def end_to_end(run: str, name: str, ckpt: str, cfg_path: str, d: str) -> dict[str, dict]:
    from wit_builder.pipeline import load_pipeline
    from wit_builder.runner import run_pipeline

    run = os.path.abspath(run)
    copy = os.path.join(d, "run")
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("train", "www", "report"))
    head_path = os.path.join(d, "head.pt")
    clip = [
        f'filter.clip_model="{name}"',
        f'filter.clip_checkpoint="{ckpt}"',
        f'filter.clip_model_config="{cfg_path}"',
        'filter.clip_device="cpu"',
        "filter.clip_min_score=-1.0",
    ]
    variants = {
        "off": [],
        "clip score": clip,
        "clip + zero_shot nsfw": clip + ['filter.nsfw="zero_shot"', 'filter.nsfw_action="flag"'],
        "clip + mlp nsfw": clip + ['filter.nsfw="mlp"', f'filter.nsfw_head="{head_path}"', 'filter.nsfw_action="flag"'],
    }
    base = [f'candidates.inputs=["{os.path.join(run, "inputs", "urls.parquet")}"]']
    out = {}
    for label, sets in variants.items():
        sets = base + sets
        results = run_pipeline(
            load_pipeline(os.path.join(REPO, "pipelines", "demo.toml"), sets),
            copy,
            stages=["filter"],
            force=True,  # "off" is the demo's own config: redo it rather than report the demo's time
            overrides=sets,
        )
        f = results["filter"]
        out[label] = {
            "rows_in": f.rows_in,
            "seconds": round(f.seconds, 2),
            "images_per_s": round(f.rows_in / f.seconds, 1),
            "nsfw": f.extra.get("nsfw", "off"),
        }
        print(label, out[label], file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ViT-B-32", help='open_clip model name, or "tiny"')
    ap.add_argument("--run", default="", help="a finished demo run dir for the end-to-end figures")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    wall = time.time()
    with tempfile.TemporaryDirectory() as d:
        name, ckpt, cfg_path = make_model(args.model, d)
        figures = {"model": args.model, "per_core": per_core(name, ckpt, cfg_path, d, args.repeat)}
        if args.run:
            figures["filter_stage"] = end_to_end(args.run, name, ckpt, cfg_path, d)
    figures["wall_s"] = round(time.time() - wall, 1)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
