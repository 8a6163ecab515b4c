"""The bundled distributed CLIP trainer (DESIGN.md section 3).

Command line (any number of processes under torchrun; gloo on CPU, NCCL on CUDA):
    $ wit-train --config pipelines/train-tiny.toml --data RUN/shards/manifest.json --out RUN/train \\
        --set steps=20

Python (one process, or one call per torchrun process):
    >>> from wit_builder.train import load_config
    >>> load_config(None, ["steps=3", "model.name=RN50"]).model.name
    'RN50'

`train(cfg, manifest, out)` (wit_builder.train.loop) trains and returns a summary;
`wit_builder.train.eval` holds zero-shot / linear-probe / retrieval evaluation;
`wit_builder.train.demo_classes.build_zeroshot_folder` makes the demo's labelled folder.
Nothing here imports torch until a function that needs it runs.
"""

from __future__ import annotations

from typing import Any

from wit_builder.train.config import TrainConfig, config_from_dict, load_config

__all__ = ["TrainConfig", "config_from_dict", "load_config", "train"]


def train(cfg: TrainConfig, manifest: str, out: str, **kw: Any) -> dict[str, Any]:
    """Train per `cfg` on `manifest` into `out` (see wit_builder.train.loop.train)."""
    from wit_builder.train.loop import train as _train

    return _train(cfg, manifest, out, **kw)
