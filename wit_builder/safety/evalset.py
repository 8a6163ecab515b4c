"""The evaluation-set index for decontamination: the phash of every image in the user's eval
folders, computed once and cached as an .npz keyed by the eval files' fingerprint (path, size,
mtime of each), then searched by bands (safety.hashes.HashIndex), never scanned.

Images of any format Pillow reads (jpg, png, webp, gif, bmp, tiff) are indexed; files with other
extensions are ignored; an image that does not decode is reported on stderr and counted, and the
rest are indexed.

Example:
    >>> import tempfile, os
    >>> from PIL import Image
    >>> d = tempfile.mkdtemp(); Image.effect_mandelbrot((96, 64), (-2, -1, 1, 1), 40).save(os.path.join(d, "m.png"))
    >>> path, info = build_index([d], tempfile.mkdtemp())
    >>> info["eval_images"], load_index(path, 4)[1] == [os.path.join(d, "m.png")]
    (1, True)
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io as _io
import json
import sys
from typing import Any

import numpy as np

from wit_builder import io
from wit_builder.safety.hashes import HashIndex

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def eval_files(dirs: list[str]) -> list[str]:
    """The image files under `dirs` (folders, globs or files; local or fsspec), sorted."""
    return [p for p in io.expand(dirs) if p.lower().endswith(IMAGE_EXTS)]


def _phash_file(path: str) -> int | None:
    from wit_builder.filters.dedup import phash_bytes

    try:
        with io.open_file(path, "rb") as f:
            return phash_bytes(f.read())
    except Exception:  # not an image after all, truncated: reported by the caller
        return None


def build_index(dirs: list[str], cache_dir: str, threads: int = 4) -> tuple[str, dict[str, Any]]:
    """Hash the eval images (threads decode in parallel) into `cache_dir/eval-{fp}.npz`, unless
    that file exists; returns (its path, {"eval_images", "eval_unreadable"})."""
    files = eval_files(dirs)
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTS)}) under {dirs}")
    fp = hashlib.sha256(json.dumps(io.file_stats(files)).encode()).hexdigest()[:16]
    path = io.join(cache_dir, f"eval-{fp}.npz")
    if io.exists(path):
        with io.open_file(path, "rb") as f:
            data = np.load(_io.BytesIO(f.read()))
            return path, {"eval_images": int(len(data["hashes"])), "eval_unreadable": int(data["unreadable"])}
    with cf.ThreadPoolExecutor(max(1, threads), thread_name_prefix="eval-phash") as pool:
        hashes = list(pool.map(_phash_file, files))
    bad = [f for f, h in zip(files, hashes) if h is None]
    if bad:
        print(f"filter: {len(bad)} eval images do not decode and are not indexed, e.g. {bad[0]}", file=sys.stderr)
    good = [(f, h) for f, h in zip(files, hashes) if h is not None]
    buf = _io.BytesIO()
    np.savez(
        buf,
        hashes=np.array([h for _, h in good], dtype=np.uint64),
        names=np.frombuffer("\0".join(f for f, _ in good).encode(), dtype=np.uint8),  # NUL-separated UTF-8
        unreadable=np.int64(len(bad)),
    )
    io.write_bytes(buf.getvalue(), path)
    return path, {"eval_images": len(good), "eval_unreadable": len(bad)}


def load_index(path: str, max_distance: int) -> tuple[HashIndex, list[str]]:
    """(band index, eval image names) from a cached index file."""
    with io.open_file(path, "rb") as f:
        data = np.load(_io.BytesIO(f.read()))
        hashes, blob = data["hashes"], data["names"].tobytes().decode()
        return HashIndex(hashes, max_distance), blob.split("\0") if len(hashes) else []
