"""NSFW scores in [0, 1] from CLIP image embeddings (the ones the CLIP-score filter computes).

Two ways, both on the L2-normalised image embeddings of the filter's open_clip model
(`[filter] clip_model`), nothing downloaded:

- `ZeroShotNsfw` (`nsfw = "zero_shot"`): the prompts of an "unsafe" and a "safe" class list
  are embedded once; an image's score is the softmax probability mass on the unsafe prompts,
  with the model's own logit scale (CLIP zero-shot classification over all prompts at once).
- `MlpNsfw` (`nsfw = "mlp"`): a classifier head in the shape of LAION's CLIP-based NSFW
  detector (LAION-AI/CLIP-based-NSFW-Detector, as ported to PyTorch): input normalisation
  (`norm.mean`, `norm.variance`), then Linear(d, 64), ReLU, Linear(64, 512), ReLU,
  Linear(512, 256), ReLU, Linear(256, 1), sigmoid; d = the CLIP embedding size (768 for
  ViT-L/14, LAION's own detector). The hidden sizes are read from the state dict, so a head
  trained with other widths loads too. Loaded from a LOCAL PyTorch state-dict file.

Example:
    >>> _ = torch.manual_seed(0)
    >>> head = NsfwHead(8)
    >>> with torch.no_grad():
    ...     score = float(head(torch.nn.functional.normalize(torch.ones(1, 8), dim=-1))[0])
    >>> 0.0 < score < 1.0
    True
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

DEFAULT_UNSAFE = (
    "a photo of a naked person",
    "a pornographic image",
    "an explicit sexual photo",
    "a photo of genitals",
    "a graphic photo of blood and gore",
)
DEFAULT_SAFE = (
    "a photo",
    "a photo of people",
    "a photo of an everyday scene",
    "a photo of an object",
    "a photo of an animal",
    "a photo of food",
    "a landscape photo",
    "a drawing",
)
LAYERS = ("linear_1", "linear_2", "linear_3", "linear_4")


class HeadError(ValueError):
    """The head file is missing, unreadable or does not fit the CLIP model."""


class NsfwHead(nn.Module):
    """LAION's CLIP-based NSFW detector layout: normalisation, 3 ReLU layers, a sigmoid output."""

    def __init__(self, dim: int, hidden: Sequence[int] = (64, 512, 256)):
        super().__init__()
        self.norm = _Normalization(dim)
        sizes = [dim, *hidden, 1]
        for name, (a, b) in zip(LAYERS, zip(sizes[:-1], sizes[1:])):
            setattr(self, name, nn.Linear(a, b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        for name in LAYERS[:-1]:
            x = torch.relu(getattr(self, name)(x))
        return torch.sigmoid(self.linear_4(x)).squeeze(-1)


class _Normalization(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("variance", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.variance.sqrt()


def load_head(path: str, dim: int | None = None) -> NsfwHead:
    """An `NsfwHead` from a local state-dict file (a bare state dict or {"state_dict": ...});
    `dim`: the CLIP embedding size it must take. Raises HeadError saying what is wrong."""
    if not path or not os.path.isfile(path):
        raise HeadError(f"no such file: {path!r} (a local PyTorch state dict; nothing is downloaded)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise HeadError(f"{path}: not a PyTorch state dict ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise HeadError(f"{path}: expected a state dict, got {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    want = {"norm.mean", "norm.variance"} | {f"{n}.{p}" for n in LAYERS for p in ("weight", "bias")}
    missing = sorted(want - set(state))
    if missing:
        raise HeadError(f"{path}: not LAION's NSFW-head layout, missing {', '.join(missing)}")
    shapes = [tuple(state[f"{n}.weight"].shape) for n in LAYERS]
    in_dim = shapes[0][1]
    if dim is not None and in_dim != dim:
        raise HeadError(f"{path}: the head takes {in_dim}-d embeddings, the CLIP model gives {dim}-d")
    if shapes[-1][0] != 1 or any(shapes[i][0] != shapes[i + 1][1] for i in range(3)):
        raise HeadError(f"{path}: layer shapes do not chain: {shapes}")
    head = NsfwHead(in_dim, [s[0] for s in shapes[:-1]])
    try:
        head.load_state_dict({k: state[k] for k in want})
    except RuntimeError as e:
        raise HeadError(f"{path}: {e}") from None
    return head.eval()


class MlpNsfw:
    """Scores = the head's sigmoid output on L2-normalised image embeddings."""

    def __init__(self, head_path: str, dim: int, device: str = "cpu"):
        self.head = load_head(head_path, dim).to(device)

    def __call__(self, image_features: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            x = nn.functional.normalize(image_features.float(), dim=-1)
            return self.head(x).float().cpu().numpy().astype(np.float32)


class ZeroShotNsfw:
    """Scores = softmax mass on the unsafe prompts among all prompts (CLIP zero-shot)."""

    def __init__(self, scorer: Any, unsafe: Sequence[str] = DEFAULT_UNSAFE, safe: Sequence[str] = DEFAULT_SAFE):
        if not unsafe or not safe:
            raise ValueError("zero-shot NSFW needs at least one unsafe and one safe prompt")
        self.n_unsafe = len(unsafe)
        self.text = scorer.embed_texts([*unsafe, *safe])  # normalised, on the scorer's device
        scale = getattr(scorer.model, "logit_scale", None)
        self.scale = float(scale.detach().exp().clamp(max=100)) if scale is not None else 100.0

    def __call__(self, image_features: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            x = nn.functional.normalize(image_features.float(), dim=-1)
            probs = (self.scale * x @ self.text.T).softmax(dim=-1)
            return probs[:, : self.n_unsafe].sum(dim=-1).clamp(0, 1).float().cpu().numpy().astype(np.float32)
