"""Image-caption CLIP score: cosine similarity of an open_clip model's normalised image and text
embeddings, in [-1, 1] (LAION's 0.28 threshold for ViT-B-32 is on this scale).

The weights come from a LOCAL checkpoint file only (never a hub tag or download). A custom
architecture can be registered from a model-config JSON (open_clip's format; its file stem is
the model name). Build one `ClipScorer` per worker (the filter stage does it in each Ray
actor's setup), then call `score` per batch.

Example (needs a checkpoint on disk; see tests/test_filter_clip.py for a tiny random model):
    >>> scorer = ClipScorer("ViT-B-32", "/models/vit-b-32.pt")            # doctest: +SKIP
    >>> scorer.score([pil_image], ["a photo of a dog"])                     # doctest: +SKIP
    array([0.31], dtype=float32)
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; anything else as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class ClipScorer:
    """An open_clip model + its preprocessing + its tokenizer, loaded once."""

    def __init__(
        self,
        model_name: str,
        checkpoint: str,
        model_config: str = "",
        device: str = "auto",
        batch_size: int = 64,
    ) -> None:
        import open_clip
        import torch

        if not checkpoint or not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"CLIP checkpoint not found: {checkpoint!r} (a local file is required)")
        if model_config:
            open_clip.add_model_config(model_config)
        self.device = resolve_device(device)
        self.batch_size = batch_size
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=checkpoint, device=self.device, pretrained_text=False
        )
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self._torch = torch

    def score(self, images: Sequence, captions: Sequence[str]) -> np.ndarray:
        """Cosine similarity per (PIL image, caption) pair, float32."""
        torch = self._torch
        out: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            imgs = [self.preprocess(im.convert("RGB")) for im in images[start : start + self.batch_size]]
            texts = self.tokenizer(list(captions[start : start + self.batch_size]))
            with torch.inference_mode():
                image_features = self.model.encode_image(torch.stack(imgs).to(self.device), normalize=True)
                text_features = self.model.encode_text(texts.to(self.device), normalize=True)
                sims = (image_features * text_features).sum(dim=-1)
            out.append(sims.float().cpu().numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, dtype=np.float32)
