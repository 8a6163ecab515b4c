"""Paths, atomic writes and part naming over fsspec (local dirs and object stores alike).

Every file a stage produces is written to a temporary name and renamed when complete, so a
crashed run leaves no half-written part behind and a rerun can trust whatever exists. On an
object store (s3://, gs://, ...) "rename" is a server-side copy then a delete of the temporary
object: readers never see a partial object, and a write or commit that fails removes its
temporary object before the error propagates.

Object stores: every call here looks at the store afresh. fsspec caches directory listings per
filesystem instance, but other processes (Ray workers, another run) write to the run dir, so a
cached listing would hide their files or give a stale size; `filesystem` therefore drops the
cached listings of a non-local filesystem before returning it. Storage options (endpoint,
credentials) come from the environment (e.g. AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL) or fsspec's config (FSSPEC_S3_ENDPOINT_URL=..., FSSPEC_S3='{"key": ...}', or
a JSON file in ~/.config/fsspec/), never per call, so every process resolves them the same way.

Example:
    >>> import tempfile, pyarrow as pa
    >>> d = tempfile.mkdtemp()
    >>> p = join(d, "part-00000.parquet")
    >>> write_parquet(pa.table({"a": [1, 2]}), p)
    >>> exists(p), read_parquet(p).num_rows
    (True, 2)
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from typing import IO, Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return (filesystem, path inside it) for a local path or an fsspec URL.

    For a non-local path the filesystem's cached listings are dropped first: other processes
    (Ray workers) write to the run dir, so a listing this process cached earlier is never
    trusted (s3fs would answer `exists`, `info` and `open` from it: a file written since would
    be missing, an overwritten one would have its old size)."""
    fs, inner = fsspec.core.url_to_fs(path)
    if not is_local(path):
        fs.invalidate_cache()
    return fs, inner


def is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def open_file(path: str, mode: str = "rb", **kwargs: Any) -> IO[bytes]:
    """Open `path` (local or fsspec URL) through `filesystem`, so an object store is asked
    afresh; `kwargs` go to the filesystem's `open` (e.g. `block_size`)."""
    fs, inner = filesystem(path)
    return fs.open(inner, mode, **kwargs)


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
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile (another process)
            fs.rm(inner, recursive=True)


def listdir(path: str, suffix: str = "") -> list[str]:
    """Full paths of the entries directly under `path` ending in `suffix`, sorted (one fresh
    listing: on an object store, what other processes wrote up to now)."""
    fs, inner = filesystem(path)
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
    fs, inner = filesystem(directory)
    if not fs.exists(inner):
        return
    for p in fs.ls(inner, detail=False):
        if is_tmp_name(p):
            with contextlib.suppress(FileNotFoundError):
                fs.rm(p, recursive=True)


def _tmp_name(path: str) -> str:
    head, tail = path.rsplit("/", 1) if "/" in path else ("", path)
    tmp = f".{tail}.{uuid.uuid4().hex[:8]}.tmp"
    return f"{head}/{tmp}" if head else tmp


def _discard(tmp: str) -> None:
    """Best-effort removal of a temporary file after a failed write or commit (never raises:
    the original error is what the caller must see; a leftover is removed by the next run's
    `remove_stale_tmp`)."""
    with contextlib.suppress(Exception):
        remove(tmp)


def _commit(tmp: str, path: str) -> None:
    """Rename `tmp` to `path`. Local: os.replace (atomic). A filesystem without a native move
    (object stores: s3fs, gcsfs, ...): a server-side copy of the one object, then the
    temporary is deleted, with no directory guessing (fsspec's generic `mv` treats a path it
    believes to be a directory specially). On failure the temporary object is removed."""
    fs, inner_tmp = filesystem(tmp)
    _, inner = filesystem(path)
    try:
        if is_local(path):
            os.replace(inner_tmp, inner)
        elif type(fs).mv is fsspec.AbstractFileSystem.mv:
            fs.cp_file(inner_tmp, inner)
            fs.rm_file(inner_tmp)
        else:  # a filesystem with its own move (sftp, hdfs, ...)
            fs.mv(inner_tmp, inner)
    except BaseException:
        _discard(tmp)
        raise


@contextlib.contextmanager
def _atomic(path: str) -> Iterator[tuple[fsspec.AbstractFileSystem, str]]:
    """Yield (filesystem, temporary path) to write `path` to; on a clean exit the temporary is
    committed to `path`, on an exception it is removed (an object store has uploaded whatever
    was written when the writer closed) and the exception propagates."""
    if "/" in path:
        makedirs(path.rsplit("/", 1)[0])
    tmp = _tmp_name(path)
    fs, inner_tmp = filesystem(tmp)
    try:
        yield fs, inner_tmp
    except BaseException:
        _discard(tmp)
        raise
    _commit(tmp, path)


def tmp_name(path: str) -> str:
    """The temporary name (".{name}.{id}.tmp", next to `path`) to stream a file to before
    `commit` renames it into place; for writers outside this module (wit_builder.tario)."""
    return _tmp_name(path)


def commit(tmp: str, path: str) -> None:
    """Rename a finished temporary file (`tmp_name`) to `path`, replacing any file there; on
    failure the temporary file is removed and the error propagates."""
    _commit(tmp, path)


def discard(tmp: str) -> None:
    """Remove a temporary file (`tmp_name`) whose write failed; never raises."""
    _discard(tmp)


def write_bytes(data: bytes, path: str) -> None:
    """Write `data` to `path` atomically (temp name, then rename)."""
    with _atomic(path) as (fs, inner_tmp), fs.open(inner_tmp, "wb") as f:
        f.write(data)


def write_json(obj: Any, path: str) -> None:
    write_bytes((json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode(), path)


def read_json(path: str) -> Any:
    with open_file(path, "rb") as f:
        return json.loads(f.read())


def write_parquet(table: pa.Table, path: str, schema: pa.Schema | None = None) -> None:
    """Write a table atomically; cast to `schema` first when given."""
    if schema is not None:
        table = conform(table, schema)
    with _atomic(path) as (fs, inner_tmp):
        pq.write_table(table, inner_tmp, filesystem=fs, compression="zstd")


def write_parquet_batches(batches: Iterable[pa.RecordBatch], path: str, schema: pa.Schema) -> int:
    """Stream record batches into one parquet file atomically; returns rows written."""
    rows = 0
    with (
        _atomic(path) as (fs, inner_tmp),
        pq.ParquetWriter(inner_tmp, schema, filesystem=fs, compression="zstd") as writer,
    ):
        for batch in batches:
            if batch.num_rows:
                writer.write_table(conform(pa.Table.from_batches([batch]), schema).select(schema.names))
                rows += batch.num_rows
    return rows


def read_parquet(path: str, columns: list[str] | None = None) -> pa.Table:
    fs, inner = filesystem(path)
    return pq.read_table(inner, filesystem=fs, columns=columns)


def parquet_schema(path: str) -> pa.Schema:
    """The arrow schema of a parquet file, from its footer."""
    with open_file(path, "rb") as f:
        return pq.ParquetFile(f).schema_arrow


def parquet_num_rows(path: str) -> int:
    """The row count of a parquet file, from its footer."""
    with open_file(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def iter_parquet_batches(path: str, columns: list[str] | None = None, batch_size: int = 65536):
    """Stream a parquet file in record batches (bounded memory)."""
    with open_file(path, "rb") as f:
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
