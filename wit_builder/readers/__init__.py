"""Readers turn one input file into blocks of raw (url, caption) rows for the candidates stage.

Every reader yields `pyarrow.Table` blocks with columns `url`, `caption` (binary: the raw
bytes, decoded and checked later), `page_url` (string, null for url lists) and any requested
extra columns. Formats: parquet, csv, tsv, jsonl (url lists, optionally .gz/.zst compressed)
and warc, wat (Common Crawl). Paths may be local or fsspec URLs, and globs.

Example:
    >>> detect_format("s3://bucket/part-0.csv.gz"), detect_format("CC-MAIN-0.warc.wat.gz")
    ('csv', 'wat')
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from wit_builder.readers.paths import COMPRESSION_SUFFIXES, detect_format

FORMATS = ("parquet", "csv", "tsv", "jsonl", "warc", "wat")
TABULAR = ("parquet", "csv", "tsv", "jsonl")

__all__ = ["FORMATS", "TABULAR", "COMPRESSION_SUFFIXES", "detect_format", "columns_of", "read_blocks"]


def decompression_errors() -> tuple[type[BaseException], ...]:
    """What reading a truncated or corrupt .gz / .zst input raises."""
    import gzip
    import zlib

    errors: tuple[type[BaseException], ...] = (EOFError, zlib.error, gzip.BadGzipFile)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:  # pragma: no cover - zstandard is a dependency
        pass
    return errors


def columns_of(path: str, fmt: str) -> list[str] | None:
    """Column names of a url-list file (read from its header / first record only); None when
    the file is empty."""
    from wit_builder.readers import tabular

    return tabular.columns_of(path, fmt)


def read_blocks(
    path: str,
    fmt: str,
    url_col: str,
    caption_col: str,
    extra_cols: list[str],
    block_rows: int,
    counts: dict[str, int],
    row_groups: list[int] | None = None,
) -> Iterator[pa.Table]:
    """Raw row blocks of one file (or of some row groups of a parquet file); unreadable rows
    are added to `counts` by reason."""
    if fmt in TABULAR:
        from wit_builder.readers import tabular

        yield from tabular.read_blocks(path, fmt, url_col, caption_col, extra_cols, block_rows, counts, row_groups)
    elif fmt == "warc":
        from wit_builder.readers import warc

        yield from warc.read_warc_blocks(path, block_rows)
    elif fmt == "wat":
        from wit_builder.readers import warc

        yield from warc.read_wat_blocks(path, block_rows, counts)
    else:
        raise ValueError(f"unknown input format {fmt!r}")
