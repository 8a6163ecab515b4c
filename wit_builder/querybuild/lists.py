"""User query lists in (txt / CSV / TSV / parquet / MetaCLIP metadata.json) and metadata.json out.

- ``.txt`` (or anything else): one query per line, stripped; empty lines and lines starting
  with ``#`` are skipped.
- ``.csv`` / ``.tsv``: the column `column`, else ``query`` or ``text``, else the first column.
- ``.parquet``: the same column choice among string columns.
- ``.json``: MetaCLIP's ``metadata.json`` -- a JSON list of strings.

Texts are returned raw (case kept). Files may be gzip/bzip2/xz compressed (by extension).

Example:
    >>> import tempfile, os
    >>> d = tempfile.mkdtemp(); p = os.path.join(d, "q.txt")
    >>> _ = open(p, "w").write("# comment\\ndog\\n\\nNew York\\n")
    >>> read_list(p)
    ['dog', 'New York']
    >>> write_metadata_json(["dog", "New York"], os.path.join(d, "metadata.json"))
    >>> read_list(os.path.join(d, "metadata.json"))
    ['dog', 'New York']
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence

import fsspec

from wit_builder.config import ConfigError

_COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}


def _base_ext(path: str) -> tuple[str, str | None]:
    root, ext = os.path.splitext(path.lower())
    comp = _COMPRESSIONS.get(ext)
    if comp:
        ext = os.path.splitext(root)[1]
    return ext, comp


def _pick_column(names: Sequence[str], column: str, path: str) -> str:
    if column:
        if column not in names:
            raise ConfigError(f"[queries] list {path}: no column {column!r} (columns: {', '.join(names)})")
        return column
    for name in ("query", "text"):
        if name in names:
            return name
    if not names:
        raise ConfigError(f"[queries] list {path}: no columns")
    return names[0]


def read_list(path: str, column: str = "") -> list[str]:
    """The raw query strings in `path` (format by extension, see the module docstring)."""
    ext, comp = _base_ext(path)
    try:
        if ext == ".parquet":
            import pyarrow.parquet as pq
            import pyarrow.types as pat

            schema = pq.read_schema(path)
            strings = [f.name for f in schema if pat.is_string(f.type) or pat.is_large_string(f.type)]
            col = _pick_column(strings, column, path)
            values = pq.read_table(path, columns=[col]).column(col).to_pylist()
            return [v for v in values if v is not None and v.strip()]
        with fsspec.open(path, "rb", compression=comp) as f:
            raw = f.read()
        text = raw.decode("utf-8-sig")
    except ConfigError:
        raise
    except (OSError, ValueError) as e:
        raise ConfigError(f"[queries] list {path}: unreadable ({e})") from None
    if ext == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"[queries] list {path}: not valid JSON ({e})") from None
        if not isinstance(data, list) or not all(isinstance(v, str) for v in data):
            raise ConfigError(f"[queries] list {path}: expected a JSON list of strings (MetaCLIP metadata.json)")
        return [v for v in data if v.strip()]
    if ext in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if ext == ".tsv" else ",")
        col = _pick_column(reader.fieldnames or [], column, path)
        return [row[col].strip() for row in reader if row.get(col) and row[col].strip()]
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def write_metadata_json(texts: Sequence[str], path: str) -> None:
    """Write `texts` as MetaCLIP's metadata.json (a JSON list of strings), atomically."""
    from wit_builder import io as wio

    wio.write_bytes(json.dumps(list(texts), ensure_ascii=False).encode("utf-8"), path)
