"""Input formats: detection by file extension (expansion of input patterns is `io.expand`).

Example:
    >>> detect_format("captions.tsv.zst")
    'tsv'
"""

from __future__ import annotations

import os

COMPRESSION_SUFFIXES = (".gz", ".zst", ".zstd", ".bz2", ".xz")
_BY_EXTENSION = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".wat": "wat",
    ".warc": "warc",
    ".arc": "warc",
}


def detect_format(path: str) -> str | None:
    """The format implied by the file name (compression suffix ignored), or None."""
    name = path.rsplit("/", 1)[-1].lower()
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return _BY_EXTENSION.get(os.path.splitext(name)[1])
