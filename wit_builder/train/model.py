"""Build an open_clip model (named architecture or an inline tiny config), local weights only.

Example:
    >>> from wit_builder.train.config import ModelConfig
    >>> m = build(ModelConfig(name="wit-doctest-tiny", arch=TINY_ARCH))
    >>> m.model.visual.image_size, m.context_length
    ((32, 32), 16)
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from wit_builder.config import ConfigError

# A ~1.8M-parameter CLIP for CPU tests and the demo: 32 px ViT, 2-layer text tower.
TINY_ARCH: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}

WEIGHTS_FILE = "open_clip_pytorch_model.bin"


@dataclass
class Built:
    model: Any  # open_clip CLIP (output_dict=True)
    train_transform: Callable
    eval_transform: Callable
    tokenizer: Callable
    model_cfg: dict[str, Any]  # the open_clip config the model was built from

    @property
    def context_length(self) -> int:
        return int(self.model_cfg["text_cfg"].get("context_length", 77))

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)


def register_arch(name: str, arch: dict[str, Any]) -> None:
    """Make `name` known to open_clip (create_model, get_tokenizer) with config `arch`."""
    import open_clip

    if open_clip.get_model_config(name) == arch:
        return
    folder = tempfile.mkdtemp(prefix="wit-arch-")
    path = os.path.join(folder, f"{name}.json")
    with open(path, "w") as f:
        json.dump(arch, f)
    open_clip.add_model_config(path)


def resolve_weights(path: str, scratch: str | None = None) -> str:
    """A local weights file: the file itself, or the weights inside a checkpoint dir of ours. A
    URL (s3://...: a weights file or a checkpoint dir) is downloaded into the folder `scratch`."""
    from wit_builder import io as wio

    if not wio.is_local(path):
        fs, inner = wio.filesystem(path)
        if fs.isdir(inner):
            path, inner = wio.join(path, WEIGHTS_FILE), f"{inner.rstrip('/')}/{WEIGHTS_FILE}"
        if not fs.isfile(inner):
            raise ConfigError(f"pretrained weights not found: {path}")
        local = os.path.join(scratch or tempfile.mkdtemp(prefix="wit-weights-"), WEIGHTS_FILE)
        fs.get_file(inner, local)
        return local
    if os.path.isdir(path):
        path = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"pretrained weights not found: {path} (local files only, no hub downloads)")
    return path


def build(mcfg, device: str = "cpu", pretrained: str = "") -> Built:
    """Create the model, its train/eval transforms and its tokenizer from a ModelConfig."""
    import open_clip

    if mcfg.arch:
        register_arch(mcfg.name, dict(mcfg.arch))
    model_cfg = open_clip.get_model_config(mcfg.name)
    if model_cfg is None:
        raise ConfigError(f"model.name {mcfg.name!r} is not an open_clip architecture and no model.arch is given")
    weights = pretrained or mcfg.pretrained
    with tempfile.TemporaryDirectory(prefix="wit-weights-") as scratch:  # a downloaded s3:// one
        weights = resolve_weights(weights, scratch) if weights else None
        try:
            model, train_tf, eval_tf = open_clip.create_model_and_transforms(
                mcfg.name, pretrained=weights, device=device, output_dict=True
            )
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"cannot build model {mcfg.name!r}: {e}") from None
    if getattr(mcfg, "grad_checkpointing", False):
        model.set_grad_checkpointing(True)
    return Built(model, train_tf, eval_tf, open_clip.get_tokenizer(mcfg.name), model_cfg)


def save_for_open_clip(model, model_cfg: dict[str, Any], name: str, folder: str) -> None:
    """Write weights + configs so that open_clip loads them by itself, either as
    `create_model_and_transforms("local-dir:" + folder)` or, after
    `open_clip.add_model_config(folder + f"/{name}.json")` (named archs need no registration),
    as `create_model_and_transforms(name, pretrained=folder + "/open_clip_pytorch_model.bin")`."""
    import open_clip
    import torch

    os.makedirs(folder, exist_ok=True)
    state = {
        k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
        for k, v in model.state_dict().items()
    }
    torch.save(state, os.path.join(folder, WEIGHTS_FILE))
    preprocess = open_clip.get_model_preprocess_cfg(model)
    with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, f, indent=1)
    with open(os.path.join(folder, f"{name}.json"), "w") as f:
        json.dump(model_cfg, f, indent=1)
