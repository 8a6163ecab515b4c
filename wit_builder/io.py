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
from collections.abc import Iterable
from typing import Any

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


def _fresh(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, inner path) with any cached listing of the path dropped: other processes
    (Ray workers) write to the run dir, so a cached listing of an object store is never trusted."""
    fs, inner = filesystem(path)
    if not is_local(path):
        fs.invalidate_cache(inner)
    return fs, inner


def exists(path: str) -> bool:
    fs, inner = _fresh(path)
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
    fs, inner = _fresh(path)
    if not fs.exists(inner):
        return []
    protocol = path.split("://", 1)[0] + "://" if not is_local(path) else ""
    names = [p if not protocol else protocol + p for p in fs.ls(inner, detail=False)]
    return sorted(n for n in names if n.endswith(suffix) and not os.path.basename(n).startswith("."))


def expand(patterns: Iterable[str]) -> list[str]:
    """The files that input patterns name: globs expanded, directories listed recursively
    (names starting with "." or "_" skipped), local or fsspec; sorted per pattern, de-duplicated.
    The one input-expansion rule of the package. A pattern matching nothing raises
    FileNotFoundError naming it.

    >>> import tempfile, os
    >>> d = tempfile.mkdtemp(); open(os.path.join(d, "a.csv"), "w").close()
    >>> [os.path.basename(p) for p in expand([d, os.path.join(d, "*.csv")])]
    ['a.csv']
    """
    out: list[str] = []
    for pattern in patterns:
        fs, _, paths = fsspec.get_fs_token_paths(pattern)
        protocol = pattern.split("://", 1)[0] + "://" if not is_local(pattern) else ""
        if protocol:
            fs.invalidate_cache()
        found: list[str] = []
        for p in paths:
            if fs.isdir(p):
                found += [f for f in fs.find(p) if not f.rsplit("/", 1)[-1].startswith((".", "_"))]
            elif fs.exists(p):
                found.append(p)
        if not found:
            raise FileNotFoundError(f"no input file matches {pattern!r}")
        out += sorted(f if not protocol or "://" in f else protocol + f for f in found)
    return list(dict.fromkeys(out))


def file_stats(patterns: Iterable[str]) -> list[list[Any]]:
    """[path, size, mtime] of every file `expand` finds for each pattern ([pattern, None, None]
    for one that matches nothing), for fingerprints: rewriting a file inside a directory input
    changes them."""
    out: list[list[Any]] = []
    for pattern in patterns:
        try:
            paths = expand([pattern])
        except FileNotFoundError:
            out.append([pattern, None, None])
            continue
        for path in paths:
            fs, inner = filesystem(path)
            info = fs.info(inner)
            mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
            out.append([path, info.get("size"), str(mtime) if mtime is not None else None])
    return out


def is_tmp_name(name: str) -> bool:
    """True for the temporary names `write_*` use (".{name}.{id}.tmp")."""
    base = name.rstrip("/").rsplit("/", 1)[-1]
    return base.startswith(".") and base.endswith(".tmp")


def remove_stale_tmp(directory: str) -> None:
    """Delete the temporary files a killed run left directly under `directory`."""
    fs, inner = _fresh(directory)
    if not fs.exists(inner):
        return
    for p in fs.ls(inner, detail=False):
        if is_tmp_name(p):
            fs.rm(p, recursive=True)


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


def tmp_name(path: str) -> str:
    """The temporary name (".{name}.{id}.tmp", next to `path`) to stream a file to before
    `commit` renames it into place; for writers outside this module (wit_builder.tario)."""
    return _tmp_name(path)


def commit(tmp: str, path: str) -> None:
    """Rename a finished temporary file (`tmp_name`) to `path`, replacing any file there."""
    _commit(tmp, path)


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
