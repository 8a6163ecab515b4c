"""URL lists (parquet, CSV, TSV, JSONL; optionally gzip/zstd compressed), streamed in blocks.

The url and caption columns come out as raw binary so undecodable text becomes a counted
row, not a crashed file. CSV rows with the wrong number of fields are skipped and counted as
`bad_row`; JSONL lines that are not a JSON object are counted as `bad_row` too. TSV is read
without quoting (a quote is an ordinary character), CSV with standard double-quote quoting
(newlines allowed inside quoted values).

Example:
    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "list.tsv")
    >>> _ = open(p, "w").write("url\\tcaption\\nhttp://a/b.jpg\\ta cat\\n")
    >>> columns_of(p, "tsv")
    ['url', 'caption']
    >>> [t.num_rows for t in read_blocks(p, "tsv", "url", "caption", [], 1000, {})]
    [1]
"""

from __future__ import annotations

import csv
import io as _io
import json
from collections.abc import Iterator

import fsspec
import pyarrow as pa


def _open(path: str):
    return fsspec.open(path, "rb", compression="infer")


def columns_of(path: str, fmt: str) -> list[str] | None:
    """Column names from the parquet schema, the CSV/TSV header or the first JSON record;
    None for a CSV/TSV/JSONL file with no content at all."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with fsspec.open(path, "rb") as f:
            return list(pq.ParquetFile(f).schema_arrow.names)
    with _open(path) as f:
        text = _io.TextIOWrapper(f, encoding="utf-8", errors="replace", newline="")
        if fmt in ("csv", "tsv"):
            return next(csv.reader(text, delimiter="," if fmt == "csv" else "\t"), None)
        for line in text:
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError:
                    return []
                return list(record) if isinstance(record, dict) else []
    return None


def parquet_row_groups(path: str) -> list[int]:
    """Rows in each row group of a parquet file (for splitting one big file across tasks)."""
    import pyarrow.parquet as pq

    with fsspec.open(path, "rb") as f:
        meta = pq.ParquetFile(f).metadata
        return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


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
    """Blocks with columns url, caption (binary), page_url (null), extras; `row_groups` picks
    some row groups of a parquet file (default: all)."""
    if fmt == "parquet":
        blocks = _parquet(path, url_col, caption_col, extra_cols, block_rows, row_groups)
    elif fmt in ("csv", "tsv"):
        blocks = _csv(path, fmt, url_col, caption_col, extra_cols, counts)
    elif fmt == "jsonl":
        blocks = _jsonl(path, url_col, caption_col, extra_cols, block_rows, counts)
    else:
        raise ValueError(f"not a url-list format: {fmt!r}")
    for table in blocks:
        yield _standard(table, url_col, caption_col, extra_cols)


def _standard(table: pa.Table, url_col: str, caption_col: str, extra_cols: list[str]) -> pa.Table:
    cols = {
        "url": _binary(table.column(url_col)),
        "caption": _binary(table.column(caption_col)),
        "page_url": pa.nulls(table.num_rows, pa.string()),
    }
    for name in extra_cols:
        cols[name] = table.column(name)
    return pa.table(cols)


def _binary(col) -> pa.ChunkedArray:
    t = col.type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return col.cast(pa.binary())
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return col.cast(pa.binary())
    if pa.types.is_null(t):
        return pa.nulls(len(col), pa.binary())
    return col.cast(pa.string()).cast(pa.binary())  # numbers etc.: their text


def _parquet(path, url_col, caption_col, extra_cols, block_rows, row_groups=None):
    import pyarrow.parquet as pq

    columns = list(dict.fromkeys([url_col, caption_col, *extra_cols]))
    with fsspec.open(path, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=block_rows, columns=columns, row_groups=row_groups):
            yield pa.Table.from_batches([batch])


def _csv(path, fmt, url_col, caption_col, extra_cols, counts):
    from pyarrow import csv as pacsv

    def skip(row) -> str:
        counts["bad_row"] = counts.get("bad_row", 0) + 1
        return "skip"

    wanted = list(dict.fromkeys([url_col, caption_col, *extra_cols]))
    parse = (
        pacsv.ParseOptions(delimiter=",", newlines_in_values=True, invalid_row_handler=skip)
        if fmt == "csv"
        else pacsv.ParseOptions(delimiter="\t", quote_char=False, invalid_row_handler=skip)
    )
    convert = pacsv.ConvertOptions(
        include_columns=wanted,
        column_types={c: pa.binary() for c in (url_col, caption_col)} | {c: pa.string() for c in extra_cols},
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    with _open(path) as f:
        reader = pacsv.open_csv(
            f, read_options=pacsv.ReadOptions(block_size=8 << 20), parse_options=parse, convert_options=convert
        )
        for batch in reader:
            yield pa.Table.from_batches([batch])


def _json_text(value) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str):
        value = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return value.encode("utf-8", "surrogatepass")  # lone surrogates -> invalid UTF-8 -> undecodable


def _jsonl(path, url_col, caption_col, extra_cols, block_rows, counts):
    names = [url_col, caption_col, *extra_cols]
    rows: dict[str, list] = {n: [] for n in names}

    def flush():
        table = pa.table(
            {n: pa.array(rows[n], pa.binary() if n in (url_col, caption_col) else pa.string()) for n in names}
        )
        for n in names:
            rows[n] = []
        return table

    with _open(path) as f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                counts["bad_row"] = counts.get("bad_row", 0) + 1
                continue
            for n in names:
                v = _json_text(record.get(n))
                rows[n].append(v if n in (url_col, caption_col) or v is None else v.decode("utf-8", "replace"))
            if len(rows[url_col]) >= block_rows:
                yield flush()
    if rows[url_col]:
        yield flush()
