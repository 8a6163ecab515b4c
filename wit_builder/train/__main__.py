"""`wit-train` / `python -m wit_builder.train`: train CLIP on a shards manifest.

    $ wit-train --config pipelines/train-tiny.toml --data runs/demo/shards/manifest.json \\
        --out runs/demo/train --set steps=20
    $ torchrun --nproc-per-node 8 -m wit_builder.train --config pipelines/train-vit-b32.toml \\
        --data runs/r1/shards/manifest.json --out runs/r1/train

A run resumes from `OUT/checkpoints/latest.json` when it exists (`--no-resume` to refuse).
Config problems, a bad manifest or a missing shard: one error line, exit code 2. SIGTERM (a
preempted job; torchrun passes it on to every rank) or Ctrl-C: every rank finishes its current
step, the ranks agree to stop at the same step, rank 0 writes a checkpoint, and every rank exits,
with code 0 after a SIGTERM (the same command resumes) or 130 after a Ctrl-C. A second Ctrl-C
interrupts at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="wit-train",
        description="Train CLIP on wit-builder shards.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  wit-train --config pipelines/train-tiny.toml --data runs/demo/shards/manifest.json "
        "--out runs/demo/train-long --set steps=200\n"
        "  torchrun --nproc-per-node 8 -m wit_builder.train --config pipelines/train-vit-b32.toml "
        "--data RUN/shards/manifest.json --out RUN/train",
    )
    p.add_argument("--config", help="trainer TOML (pipelines/train-tiny.toml, ...); defaults when omitted")
    p.add_argument("--data", required=True, help="shards/manifest.json (a local path or an fsspec URL: s3://...)")
    p.add_argument("--out", required=True, help="output folder (local or s3://...): logs, checkpoints, eval.jsonl")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. steps=20 or optim.lr=1e-3 (TOML values)",
    )
    p.add_argument(
        "--pretrained",
        default="",
        help="open_clip checkpoint to start from (file or checkpoint dir, local or s3://...)",
    )
    p.add_argument("--no-resume", action="store_true", help="do not resume from OUT/checkpoints")
    p.add_argument(
        "--keys-log",
        default="",
        metavar="PREFIX",
        help="audit: append 'epoch<TAB>step<TAB>key' of every trained sample to PREFIX.<rank>",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s"))
    ours = logging.getLogger("wit_builder.train")
    ours.addHandler(handler)
    ours.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    ours.propagate = False
    from wit_builder.config import ConfigError
    from wit_builder.train.config import load_config

    try:
        cfg = load_config(args.config, args.set)
        from wit_builder.train.loop import train

        keys_log = f"{args.keys_log}.{rank}" if args.keys_log else None
        summary = train(
            cfg, args.data, args.out, pretrained=args.pretrained, resume=not args.no_resume, keys_log=keys_log
        )
    except ConfigError as e:
        print(f"wit-train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("wit-train: interrupted", file=sys.stderr)
        return 130
    if rank == 0:
        print(json.dumps(summary))
    if summary.get("stopped"):
        code = 130 if summary.get("signal") == "SIGINT" else 0
        print(
            f"wit-train: [rank {rank}] stopped by {summary.get('signal')} at step {summary.get('steps')}, "
            f"checkpoint saved; exit code {code}",
            file=sys.stderr,
        )
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
