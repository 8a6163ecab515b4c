"""Synthetic shards in the pipeline's format (manifest.json + webdataset tars) for tests and
benchmarks: coloured shapes captioned with their colour and shape, so a tiny CLIP can learn them.
Tars are written with wit_builder.tario, like the shards stage's. Not part of the package:
tests import it from tests/ (on sys.path under pytest), benchmarks put tests/ on sys.path.

Example:
    >>> import tempfile, json
    >>> d = tempfile.mkdtemp()
    >>> path = write_shards(d, samples=6, tars=2, image_size=16)
    >>> json.load(open(path))["total_samples"]
    6
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable

from wit_builder import tario

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 210, 30),
    "purple": (140, 40, 170),
    "orange": (240, 130, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("square", "circle", "triangle", "stripe")


def sample_key(i: int, salt: str = "") -> str:
    return hashlib.blake2b(f"{salt}{i}".encode(), digest_size=8).hexdigest()


def draw(color: str, shape: str, size: int, jitter: int = 0):
    """A PIL image: `shape` in `color` on a grey background (jitter moves it a little)."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), (128, 128, 128))
    d = ImageDraw.Draw(im)
    o = jitter % max(size // 8, 1)
    box = (size // 6 + o, size // 6 + o, size * 5 // 6 - 1 + o // 2, size * 5 // 6 - 1 + o // 2)
    fill = COLORS[color.split("_")[-1]]  # "navy_blue" draws blue
    if shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "triangle":
        d.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=fill)
    else:
        for y in range(0, size, max(size // 4, 2)):
            d.rectangle((0, y, size - 1, y + max(size // 8, 1)), fill=fill)
    return im


def jpeg_bytes(im, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_tars(folder: str, samples: Iterable[tuple[str, bytes, str]], tars: int) -> str:
    """Write (key, jpeg bytes, caption) samples round-robin into `tars` tars (key order within
    each) plus manifest.json; returns the manifest path."""
    os.makedirs(folder, exist_ok=True)
    buckets: list[list[tuple[str, bytes, str]]] = [[] for _ in range(tars)]
    for i, s in enumerate(samples):
        buckets[i % tars].append(s)
    entries = []
    for t, bucket in enumerate(buckets):
        name = f"{t:06d}.tar"
        path = os.path.join(folder, name)
        with tario.TarWriter(path) as tar:
            for key, jpg, caption in sorted(bucket):
                tar.add(f"{key}.jpg", jpg)
                tar.add(f"{key}.txt", caption.encode())
                tar.add(f"{key}.json", json.dumps({"uid": key, "caption": caption}).encode())
        entries.append({"path": name, "samples": len(bucket), "bytes": tar.bytes, "sha256": tar.sha256})
    manifest = {
        "tool_version": "synthetic",
        "seed": 0,
        "config_hash": "synthetic",
        "total_samples": sum(e["samples"] for e in entries),
        "total_bytes": sum(e["bytes"] for e in entries),
        "tars": entries,
    }
    path = os.path.join(folder, "manifest.json")
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)
    return path


def shape_samples(n: int, image_size: int, salt: str = "") -> list[tuple[str, bytes, str]]:
    colors, out = list(COLORS), []
    for i in range(n):
        color, shape = colors[i % len(colors)], SHAPES[(i // len(colors)) % len(SHAPES)]
        out.append((sample_key(i, salt), jpeg_bytes(draw(color, shape, image_size, jitter=i)), f"a {color} {shape}"))
    return out


def write_shards(folder: str, samples: int = 256, tars: int = 2, image_size: int = 32, salt: str = "") -> str:
    """Synthetic coloured-shape shards + manifest in `folder`; returns the manifest path."""
    return write_tars(folder, shape_samples(samples, image_size, salt), tars)


def write_image_folder(
    root: str, per_class: int = 4, image_size: int = 32, classes: Iterable[str] = ("red", "green", "blue", "yellow")
) -> str:
    """A folder per colour class of shape images (for zero-shot / linear-probe tests)."""
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            draw(c, SHAPES[i % len(SHAPES)], image_size, jitter=i).save(os.path.join(root, c, f"{i:03d}.jpg"))
    return root


def write_captioned_photo_shards(
    images_dir: str, captions_parquet: str, folder: str, size: int = 40, tars: int = 2
) -> str:
    """Shards of real photos (shrunk to fit `size` px) with their captions, one sample per caption
    (a parquet with columns `file`, `caption`, like demo/captions.parquet); returns the manifest."""
    import pyarrow.parquet as pq
    from PIL import Image

    small: dict[str, bytes] = {}
    samples = []
    for i, row in enumerate(pq.read_table(captions_parquet, columns=["file", "caption"]).to_pylist()):
        if row["file"] not in small:
            with Image.open(os.path.join(images_dir, row["file"])) as im:
                im = im.convert("RGB")
                im.thumbnail((size, size))
                small[row["file"]] = jpeg_bytes(im)
        samples.append((sample_key(i, "photo"), small[row["file"]], row["caption"] or ""))
    return write_tars(folder, samples, tars)
