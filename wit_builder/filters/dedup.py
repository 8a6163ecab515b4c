"""Perceptual hashes for duplicate images, and the bit bands the global near-duplicate search
joins on (the decision itself, over a whole run, is `filters.dedup_global`).

`phash` is our own 64-bit DCT perceptual hash (numpy + Pillow): grey 32x32 thumbnail, 2-D
DCT-II, the 8x8 lowest frequencies compared with their median. Re-encoded, resized or lightly
recompressed copies of one photo land within a few bits of each other.

Near-duplicate search uses the pigeonhole trick: split the 64 bits into `max_distance + 1`
bands (`bands`); two hashes within `max_distance` bits agree exactly on at least one band, so
only hashes sharing a band value are compared.

Example:
    >>> bands(3)
    [(0, 16), (16, 16), (32, 16), (48, 16)]
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np

HASH_BITS = 64


@lru_cache(maxsize=4)
def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    return 2.0 * np.cos(np.pi * (2 * i + 1) * k / (2 * n))


def phash(image, hash_size: int = 8, highfreq_factor: int = 4) -> int:
    """64-bit perceptual hash of a PIL image (as an unsigned int).

    >>> from PIL import Image
    >>> img = Image.effect_mandelbrot((300, 200), (-2, -1, 1, 1), 50)
    >>> h1 = phash(img); h2 = phash(img.resize((150, 100)))
    >>> (h1 ^ h2).bit_count() <= 4  # Hamming distance
    True
    """
    from PIL import Image

    side = hash_size * highfreq_factor
    grey = image.convert("L").resize((side, side), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey, dtype=np.float64)
    d = _dct_matrix(side)
    low = (d @ pixels @ d.T)[:hash_size, :hash_size]
    bits = (low > np.median(low)).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def phash_bytes(data: bytes) -> int:
    """phash of encoded image bytes; JPEGs are decoded at reduced size (draft mode), which is
    several times faster and changes nothing a 32x32 thumbnail can see. Raises on bad data."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        if img.format == "JPEG":
            img.draft("L", (64, 64))
        return phash(img)


def bands(max_distance: int) -> list[tuple[int, int]]:
    """(shift, width) of `max_distance + 1` nearly equal bands covering 64 bits."""
    n = max_distance + 1
    widths = [HASH_BITS // n + (1 if i < HASH_BITS % n else 0) for i in range(n)]
    out, shift = [], 0
    for w in widths:
        out.append((shift, w))
        shift += w
    return out
