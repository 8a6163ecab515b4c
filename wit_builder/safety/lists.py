"""Named safety lists: their config table, reading them (plain text or parquet, local or fsspec),
and the record of which lists a run used (name, kind, sha256 of the file).

A list is a table in a stage's config, e.g.
`blocklists = [{name = "bad-hosts", kind = "domain", path = "lists/bad-hosts.txt"}]`.
Plain text: one entry per line; blank lines and lines starting with `#` are skipped; a `.gz`,
`.bz2`, `.zst`... name is decompressed. Parquet (a name ending in `.parquet`): the entries are
the values of `column` (or of the file's only column). Nulls and blanks are skipped.

Example:
    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "hosts.txt")
    >>> _ = open(p, "w").write("# hosts we never contact\\nbad.example\\n\\nWORSE.example.\\n")
    >>> read_entries(ListSpec(name="hosts", kind="domain", path=p))
    ['bad.example', 'WORSE.example.']
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from wit_builder import io
from wit_builder.config import ConfigError, path_field

URL_KINDS = ("domain", "url", "prefix")
IMAGE_KINDS = ("sha256", "phash")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_PHASH_DISTANCE = 16


@dataclass(frozen=True)
class ListSpec:
    """One list in a config: `name` (letters, digits, `.`, `_`, `-`; it names the drop reason),
    `kind`, `path` (local or fsspec; relative to the pipeline file), `column` (parquet only;
    default: the file's only column) and `max_distance` (phash lists only: Hamming distance
    in bits, 0..16, within which an image matches an entry)."""

    name: str
    kind: str
    path: str = path_field("")
    column: str = ""
    max_distance: int = 4

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise ValueError(f"name {self.name!r}: use letters, digits, '.', '_' or '-'")
        if not self.path:
            raise ValueError(f"list {self.name!r}: path is required")


def check_specs(key: str, specs: Sequence[ListSpec], kinds: Sequence[str]) -> None:
    """ValueError naming `key` for a kind not allowed here, a repeated name or a bad distance.

    >>> check_specs("blocklists", [ListSpec("a", "sha256", "x")], ("domain", "url"))
    Traceback (most recent call last):
    ...
    ValueError: blocklists[0] ('a'): kind must be one of domain, url, got 'sha256'
    """
    seen: set[str] = set()
    for i, spec in enumerate(specs):
        where = f"{key}[{i}] ({spec.name!r})"
        if spec.kind not in kinds:
            raise ValueError(f"{where}: kind must be one of {', '.join(kinds)}, got {spec.kind!r}")
        if spec.name in seen:
            raise ValueError(f"{where}: name used twice; each list needs its own name")
        seen.add(spec.name)
        if spec.column and not _is_parquet(spec.path):
            raise ValueError(f"{where}: `column` applies to parquet lists (a name ending in .parquet) only")
        if spec.kind == "phash" and not 0 <= spec.max_distance <= MAX_PHASH_DISTANCE:
            raise ValueError(f"{where}: max_distance must be in 0..{MAX_PHASH_DISTANCE}, got {spec.max_distance}")


def _is_parquet(path: str) -> bool:
    return path.lower().endswith(".parquet")


def read_entries(spec: ListSpec) -> list[str]:
    """The list's entries as text (stripped, blanks and comments skipped); ConfigError naming
    the list and file when it cannot be read."""
    try:
        if _is_parquet(spec.path):
            return _parquet_entries(spec)
        with io.open_file(spec.path, "rb", compression="infer") as f:
            text = f.read().decode("utf-8")
    except ConfigError:
        raise
    except UnicodeDecodeError:
        raise ConfigError(f"list {spec.name!r} ({spec.path}): not UTF-8 text") from None
    except Exception as e:  # missing, unreadable, corrupt compression
        raise ConfigError(f"list {spec.name!r} ({spec.path}): unreadable: {type(e).__name__}: {e}") from None
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _parquet_entries(spec: ListSpec) -> list[str]:
    names = io.parquet_schema(spec.path).names
    column = spec.column or (names[0] if len(names) == 1 else "")
    if not column:
        raise ConfigError(f"list {spec.name!r} ({spec.path}): set `column` (the file has columns {', '.join(names)})")
    if column not in names:
        raise ConfigError(f"list {spec.name!r} ({spec.path}): no column {column!r} (columns: {', '.join(names)})")
    values = io.read_parquet(spec.path, columns=[column]).column(column).to_pylist()
    out = []
    for v in values:
        if v is None:
            continue
        if isinstance(v, int) and v < 0:  # a 64-bit phash stored in a signed column
            v += 1 << 64
        text = (v.hex() if isinstance(v, bytes) else str(v)).strip()
        if text:
            out.append(text)
    return out


def file_sha256(path: str) -> str:
    """sha256 (hex) of a file's bytes, read afresh every time: a list rewritten in place with
    its size and mtime kept still changes it."""
    digest = hashlib.sha256()
    with io.open_file(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def describe(role: str, specs: Sequence[ListSpec]) -> list[dict[str, str]]:
    """What a run records about the lists it used (for fingerprints and the manifest):
    [{"role", "name", "kind", "sha256"}] (no path: the manifest is published with the data)."""
    out = []
    for s in specs:
        try:
            digest = file_sha256(s.path)
        except OSError as e:  # gone or unreadable since the config was loaded
            raise ConfigError(f"list {s.name!r} ({s.path}): unreadable: {type(e).__name__}: {e}") from None
        out.append({"role": role, "name": s.name, "kind": s.kind, "sha256": digest})
    return out


RECORD = "_safety_lists.json"


def write_record(stage_dir: str, used: list[dict[str, str]]) -> None:
    """Keep the lists a stage applied next to its output (the shards manifest gathers them)."""
    io.write_json(used, io.join(stage_dir, RECORD))


def read_record(stage_dir: str) -> list[dict[str, str]]:
    """The lists a finished stage applied ([] when it applied none or predates lists)."""
    path = io.join(stage_dir, RECORD)
    return io.read_json(path) if io.exists(path) else []
