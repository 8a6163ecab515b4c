"""Paths, atomic writes and part naming over fsspec (local dirs and object stores alike).

Every file a stage produces is written to a temporary name and renamed when complete, so a
crashed run leaves no half-written part behind and a rerun can trust whatever exists.

Example:
    >>> import tempfile, pyarrow as pa
    >>> d = tempfile.mkdtemp()
    >>> p = join(d, "part-00000.parquet")
    >>> write_parquet(pa.table({"a": [1, 2]}), p)
    >>> exists(p), read_parquet(p).num_rows
    (True, 2)
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any, Iterable

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return (filesystem, path inside it) for a local path or an fsspec URL."""
    fs, inner = fsspec.core.url_to_fs(path)
    return fs, inner


def is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def exists(path: str) -> bool:
    fs, inner = filesystem(path)
    return fs.exists(inner)


def makedirs(path: str) -> None:
    fs, inner = filesystem(path)
    fs.makedirs(inner, exist_ok=True)


def remove(path: str) -> None:
    """Remove a file or a directory tree; absent is fine."""
    fs, inner = filesystem(path)
    if fs.exists(inner):
        fs.rm(inner, recursive=True)


def listdir(path: str, suffix: str = "") -> list[str]:
    """Full paths of the entries directly under `path` ending in `suffix`, sorted."""
    fs, inner = filesystem(path)
    if not fs.exists(inner):
        return []
    protocol = path.split("://", 1)[0] + "://" if not is_local(path) else ""
    names = [p if not protocol else protocol + p for p in fs.ls(inner, detail=False)]
    return sorted(n for n in names if n.endswith(suffix) and not os.path.basename(n).startswith("."))


def _tmp_name(path: str) -> str:
    head, tail = path.rsplit("/", 1) if "/" in path else ("", path)
    tmp = f".{tail}.{uuid.uuid4().hex[:8]}.tmp"
    return f"{head}/{tmp}" if head else tmp


def _commit(tmp: str, path: str) -> None:
    fs, inner_tmp = filesystem(tmp)
    _, inner = filesystem(path)
    if is_local(path):
        os.replace(inner_tmp, inner)
    else:
        fs.mv(inner_tmp, inner)


def write_bytes(data: bytes, path: str) -> None:
    """Write `data` to `path` atomically (temp name, then rename)."""
    makedirs(path.rsplit("/", 1)[0]) if "/" in path else None
    tmp = _tmp_name(path)
    with fsspec.open(tmp, "wb") as f:
        f.write(data)
    _commit(tmp, path)


def write_json(obj: Any, path: str) -> None:
    write_bytes((json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode(), path)


def read_json(path: str) -> Any:
    with fsspec.open(path, "rb") as f:
        return json.loads(f.read())


def write_parquet(table: pa.Table, path: str, schema: pa.Schema | None = None) -> None:
    """Write a table atomically; cast to `schema` first when given."""
    if schema is not None:
        table = conform(table, schema)
    makedirs(path.rsplit("/", 1)[0]) if "/" in path else None
    tmp = _tmp_name(path)
    fs, inner_tmp = filesystem(tmp)
    pq.write_table(table, inner_tmp, filesystem=fs, compression="zstd")
    _commit(tmp, path)


def write_parquet_batches(batches: Iterable[pa.RecordBatch], path: str, schema: pa.Schema) -> int:
    """Stream record batches into one parquet file atomically; returns rows written."""
    makedirs(path.rsplit("/", 1)[0]) if "/" in path else None
    tmp = _tmp_name(path)
    fs, inner_tmp = filesystem(tmp)
    rows = 0
    with pq.ParquetWriter(inner_tmp, schema, filesystem=fs, compression="zstd") as writer:
        for batch in batches:
            if batch.num_rows:
                writer.write_table(conform(pa.Table.from_batches([batch]), schema).select(schema.names))
                rows += batch.num_rows
    _commit(tmp, path)
    return rows


def read_parquet(path: str, columns: list[str] | None = None) -> pa.Table:
    fs, inner = filesystem(path)
    return pq.read_table(inner, filesystem=fs, columns=columns)


def iter_parquet_batches(path: str, columns: list[str] | None = None, batch_size: int = 65536):
    """Stream a parquet file in record batches (bounded memory)."""
    fs, inner = filesystem(path)
    with fs.open(inner, "rb") as f:
        yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Order and cast the schema's columns first, keep any extra columns after them."""
    missing = [n for n in schema.names if n not in table.column_names]
    if missing:
        raise ValueError(f"table lacks columns {missing}")
    cols = [table.column(n).cast(schema.field(n).type) for n in schema.names]
    extra = [n for n in table.column_names if n not in schema.names]
    fields = [schema.field(n) for n in schema.names] + [table.schema.field(n) for n in extra]
    return pa.Table.from_arrays(cols + [table.column(n) for n in extra], schema=pa.schema(fields))


def part_name(index: int, suffix: str = ".parquet") -> str:
    """Deterministic part file name: part-00042.parquet."""
    return f"part-{index:05d}{suffix}"
