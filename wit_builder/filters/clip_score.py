"""Image-caption CLIP score: cosine similarity of an open_clip model's normalised image and text
embeddings, in [-1, 1] (LAION's 0.28 threshold for ViT-B-32 is on this scale).

The weights come from a LOCAL checkpoint file only (never a hub tag or download). A custom
architecture can be registered from a model-config JSON (open_clip's format; its file stem is
the model name). Build one `ClipScorer` per worker (the filter stage does it in each Ray
actor's setup), then call `score` per batch.

`embed_images` is computed once per sample and shared with the NSFW score (filters/nsfw.py);
`score_embedded` turns those embeddings and the captions into the CLIP score.

Example (needs a checkpoint on disk; see tests/test_filter_clip.py for a tiny random model):
    >>> scorer = ClipScorer("ViT-B-32", "/models/vit-b-32.pt")            # doctest: +SKIP
    >>> scorer.score([pil_image], ["a photo of a dog"])                     # doctest: +SKIP
    array([0.31], dtype=float32)
"""

from __future__ import annotations

import functools
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

    def embed_images(self, images: Sequence):
        """L2-normalised image embeddings (torch, float32, on the model's device), one per PIL
        image: computed once per sample and shared by the CLIP score and the NSFW score."""
        torch = self._torch
        out = []
        for start in range(0, len(images), self.batch_size):
            imgs = [self.preprocess(im.convert("RGB")) for im in images[start : start + self.batch_size]]
            with torch.inference_mode():
                out.append(self.model.encode_image(torch.stack(imgs).to(self.device), normalize=True).float())
        if not out:
            return torch.zeros((0, self.embed_dim), dtype=torch.float32, device=self.device)
        return torch.cat(out)

    def embed_texts(self, texts: Sequence[str]):
        """L2-normalised text embeddings (torch, float32, on the model's device)."""
        torch = self._torch
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[start : start + self.batch_size]))
            with torch.inference_mode():
                out.append(self.model.encode_text(tokens.to(self.device), normalize=True).float())
        if not out:
            return torch.zeros((0, self.embed_dim), dtype=torch.float32, device=self.device)
        return torch.cat(out)

    @functools.cached_property
    def embed_dim(self) -> int:
        """The joint embedding's size (found by embedding one empty text)."""
        return int(self.embed_texts([""]).shape[-1])

    def score_embedded(self, image_features, captions: Sequence[str]) -> np.ndarray:
        """Cosine similarity of precomputed image embeddings (`embed_images`) and captions."""
        text_features = self.embed_texts(captions)
        sims = (image_features * text_features).sum(dim=-1)
        return sims.float().cpu().numpy().astype(np.float32)

    def score(self, images: Sequence, captions: Sequence[str]) -> np.ndarray:
        """Cosine similarity per (PIL image, caption) pair, float32."""
        if not len(images):
            return np.zeros(0, dtype=np.float32)
        return self.score_embedded(self.embed_images(images), captions)
