"""Input paths: glob expansion over fsspec, format detection by extension.

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


def expand_inputs(patterns: list[str]) -> list[str]:
    """Expand globs (local or fsspec); directories list their files; sorted, de-duplicated.
    A pattern matching nothing raises FileNotFoundError naming it."""
    import fsspec

    out: list[str] = []
    for pattern in patterns:
        fs, _, paths = fsspec.get_fs_token_paths(pattern)
        protocol = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
        found: list[str] = []
        for p in paths:
            if fs.isdir(p):
                found += [f for f in fs.find(p) if not os.path.basename(f).startswith((".", "_"))]
            elif fs.exists(p):
                found.append(p)
        if not found:
            raise FileNotFoundError(f"no input file matches {pattern!r}")
        if protocol and protocol != "file://":
            found = [f if "://" in f else protocol + f for f in found]
        out += sorted(found)
    return list(dict.fromkeys(out))
