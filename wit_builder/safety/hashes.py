"""Image hash lists: exact sha256 sets and perceptual-hash (phash) indexes searched by bands.

`HashIndex` holds 64-bit hashes and answers "which entry is within `max_distance` bits of h?"
without a scan: the 64 bits are split into `max_distance + 1` bands (filters.dedup.bands); a
hash within the distance agrees exactly with the entry on at least one band, so only entries
sharing a band value are compared (one sorted array per band, binary-searched).

phash entries are 16 hex digits (optionally `0x`-prefixed) or a decimal integer (in parquet also
an int64/uint64 column; negative int64 values are read as their unsigned 64 bits): the value of
`wit_builder.filters.dedup.phash` (big-endian bit order). Make a list from your own images with
`python -m wit_builder.safety phash DIR...`. sha256 entries are 64 hex digits.

Example:
    >>> ix = HashIndex(np.array([0x0F0F, 0xFFFF_0000_0000_0000], dtype=np.uint64), max_distance=2)
    >>> ix.nearest(0x0F0E), ix.nearest(0x00FF)
    ((0, 1), None)
    >>> parse_phash("0x000000000000ff00"), parse_sha256("AB" * 32) == "ab" * 32
    (65280, True)
"""

from __future__ import annotations

import re

import numpy as np

from wit_builder.filters.dedup import bands

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_HEX16 = re.compile(r"^(0x)?[0-9a-fA-F]{16}$")


def parse_sha256(entry: str) -> str | None:
    """Lower-case hex digest, or None when `entry` is not 64 hex digits."""
    entry = entry.strip()
    return entry.lower() if _HEX64.match(entry) else None


def parse_phash(entry: str) -> int | None:
    """A 64-bit phash from 16 hex digits or a decimal integer (None when neither)."""
    entry = entry.strip()
    if _HEX16.match(entry):
        return int(entry.removeprefix("0x"), 16)
    if entry.isdigit() and int(entry) < 1 << 64:
        return int(entry)
    return None


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(x)
    return np.array([int(v).bit_count() for v in x.tolist()], dtype=np.int64)


class HashIndex:
    """Band index over 64-bit hashes; memory ~ 16 bytes per hash per band."""

    def __init__(self, hashes: np.ndarray, max_distance: int):
        self.hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
        self.max_distance = max_distance
        self.bands = []
        for shift, width in bands(max_distance):
            mask = np.uint64((1 << width) - 1)
            keys = (self.hashes >> np.uint64(shift)) & mask
            order = np.argsort(keys, kind="stable")
            self.bands.append((np.uint64(shift), mask, keys[order], order))

    def __len__(self) -> int:
        return len(self.hashes)

    def nearest(self, h: int) -> tuple[int, int] | None:
        """(entry index, distance) of the closest entry within max_distance (the first entry on
        ties), else None."""
        h64 = np.uint64(h)
        best: tuple[int, int] | None = None  # (distance, entry index)
        for shift, mask, keys, order in self.bands:
            k = (h64 >> shift) & mask
            lo = keys.searchsorted(k, "left")
            hi = keys.searchsorted(k, "right")
            if hi == lo:
                continue
            found = order[lo:hi]  # ascending entry indices (stable sort)
            dist = _popcount(self.hashes[found] ^ h64)
            j = int(dist.argmin())  # the first minimum: the smallest index at that distance
            cand = (int(dist[j]), int(found[j]))
            if cand[0] <= self.max_distance and (best is None or cand < best):
                best = cand
        return None if best is None else (best[1], best[0])
