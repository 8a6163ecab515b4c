"""Cheap per-sample checks: image size, aspect ratio, caption length.

Each check returns a drop reason (a short string) or None when the sample passes.

Example:
    >>> rules = BasicRules(min_width=64, min_height=64, max_aspect_ratio=3.0, min_caption_words=2)
    >>> rules.check(width=640, height=480, caption="a red bicycle")
    >>> rules.check(width=32, height=480, caption="a red bicycle")
    'too_small'
    >>> rules.check(width=900, height=200, caption="a red bicycle")
    'bad_aspect'
    >>> rules.check(width=640, height=480, caption="bicycle")
    'caption_short'
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BasicRules:
    """Thresholds; 0 turns a check off."""

    min_width: int = 0
    min_height: int = 0
    max_aspect_ratio: float = 0.0  # max(w, h) / min(w, h)
    min_caption_words: int = 0  # whitespace-separated words
    min_caption_chars: int = 0  # characters after stripping surrounding whitespace

    def check_image(self, width: int, height: int) -> str | None:
        """'too_small', 'bad_aspect' or None."""
        if width < self.min_width or height < self.min_height or width <= 0 or height <= 0:
            return "too_small"
        if self.max_aspect_ratio > 0 and max(width, height) / min(width, height) > self.max_aspect_ratio:
            return "bad_aspect"
        return None

    def check_caption(self, caption: str) -> str | None:
        """'caption_short' or None."""
        text = caption.strip()
        if len(text) < self.min_caption_chars or len(text.split()) < self.min_caption_words:
            return "caption_short"
        return None

    def check(self, width: int, height: int, caption: str) -> str | None:
        """The first failing check's reason (image checks first), or None."""
        return self.check_image(width, height) or self.check_caption(caption)
