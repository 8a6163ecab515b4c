"""The demo's last step in one call: train a tiny CLIP for a few CPU steps on the run's shards,
then zero-shot it on a labelled folder built from the demo photos (see demo_classes).

Example (needs a pipeline run's shards):
    >>> from wit_builder.train.demo_run import train_and_zero_shot
    >>> train_and_zero_shot("runs/demo/shards/manifest.json", "runs/demo/train",
    ...                     "demo/images", "demo/captions.parquet", overrides=["steps=20"])  # doctest: +SKIP
    {'steps': 20, 'first_loss': ..., 'loss': ..., 'zeroshot_top1': ..., ...}
"""

from __future__ import annotations

import os
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_TOML = os.path.join(REPO, "pipelines", "train-tiny.toml")


def train_and_zero_shot(
    manifest: str,
    out: str,
    images_dir: str,
    captions_parquet: str,
    table: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Build `out/zeroshot` from the photos, train per `table` (a `[train]` table; None = the
    repo's pipelines/train-tiny.toml) with `overrides` (`steps=20`, ...), and return steps,
    first/last loss, zero-shot top-1/top-5, the classes and the checkpoint path."""
    from wit_builder.train.config import apply_override, config_from_dict, load_config
    from wit_builder.train.demo_classes import build_zeroshot_folder
    from wit_builder.train.loop import train

    folder = os.path.join(out, "zeroshot")
    counts = build_zeroshot_folder(images_dir, captions_parquet, folder)
    sets = [*(overrides or []), f"eval.zeroshot_dir={_quote(folder)}"]
    if table is None:
        cfg = load_config(TINY_TOML, sets)
    else:
        raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in table.items()}
        for text in sets:
            apply_override(raw, text)
        cfg = config_from_dict(raw, "[train]")
    summary = train(cfg, manifest, out)
    ev = summary.get("eval") or {}
    return {
        "steps": summary["steps"],
        "first_loss": summary["first_loss"],
        "loss": summary["loss"],
        "zeroshot_top1": ev.get("zeroshot_top1"),
        "zeroshot_top5": ev.get("zeroshot_top5"),
        "zeroshot_classes": counts,
        "checkpoint": summary["checkpoint"],
    }


def _quote(path: str) -> str:
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'
