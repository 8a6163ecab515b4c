"""DuckDB views over a run directory's parquet metadata, and the `sql` command.

Views (each only when its files exist): queries, candidates, matched, selected, query_counts,
samples (every download attempt), filtered, kept (successful samples the filter kept),
shards (one row per sample in the final tars), and dropped (every selected sample that did not
reach the shards, with the stage and the reason: a download error, a filter drop reason, or
`trimmed_over_cap` for a kept sample the shards stage trimmed back to the cap). Views over
parquet files, never materialised.

Files are listed through fsspec (local dirs and object stores alike) and passed to DuckDB as an
explicit list, with glob characters escaped, so a run dir named `out[1]` or `a*b` reads its own
files and no one else's. Object stores are reached through fsspec (`register_filesystem`), not
DuckDB's httpfs.

Read-only by default (`unsafe=False`): after the views are made, DuckDB may read only the files
they read (`allowed_paths`), external access is off (no COPY/EXPORT/ATTACH to any other file,
no read_text/read_csv of other files, no extension INSTALL/LOAD), extension autoloading is off
and the configuration is locked. `run` (behind `query` and `wit-build sql`) also accepts only
SELECT/EXPLAIN statements (DuckDB's own parser says which), because DuckDB lets
`COPY ... TO '<an allowed file>' (USE_TMP_FILE false)` overwrite a file it may read. A
notebook's `connect()` keeps the settings but, holding the connection, can run any statement.

Example:
    >>> con = connect("runs/demo")                                   # doctest: +SKIP
    >>> con.sql("SELECT count(*) FROM shards").fetchall()            # doctest: +SKIP
    [(57,)]
    >>> con.sql("SELECT stage, reason, count(*) FROM dropped GROUP BY ALL").fetchall()  # doctest: +SKIP
    [('download', 'http_404', 2), ('filter', 'too_small', 1), ('shards', 'trimmed_over_cap', 12)]
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
from collections.abc import Iterator
from typing import Any

from wit_builder import io
from wit_builder.config import ConfigError

# view name -> (directory under the run dir, file name pattern inside it)
VIEWS = {
    "queries": ("queries", "queries.parquet"),
    "candidates": ("candidates", "part-*.parquet"),
    "matched": ("matched", "part-*.parquet"),
    "selected": ("selected", "part-*.parquet"),
    "query_counts": ("selected", "query_counts.parquet"),
    "samples": ("download", "*.parquet"),
    "filtered": ("filtered", "*.parquet"),
    "shards": ("shards/metadata", "*.parquet"),
}

# views whose stage may finish with no files (nothing kept) -> the schema.py name of their rows;
# the stage's directory is the first part of the view's directory
EMPTY_WHEN_DONE = {
    "candidates": "CANDIDATES",
    "matched": "MATCHED",
    "selected": "SELECTED",
    "samples": "SAMPLES",
    "filtered": "FILTERED",
    "shards": "SHARD_SAMPLES",
}

# statement types `query` runs in read-only mode (DESCRIBE, SHOW, SUMMARIZE parse as SELECT)
READ_ONLY_STATEMENTS = ("SELECT", "EXPLAIN")

_GLOB_ESCAPES = {"[": "[[]", "*": "[*]", "?": "[?]"}


def glob_escape(path: str) -> str:
    """`path` as a DuckDB glob pattern that matches only itself.

    >>> glob_escape("runs/out[1]/a*b?.parquet")
    'runs/out[[]1]/a[*]b[?].parquet'
    """
    return "".join(_GLOB_ESCAPES.get(c, c) for c in path)


class _Lister:
    """Fresh listings of the run's directories, one request per directory per connect (a
    literal listing, never a glob of the run path)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.fs, self.root = io.filesystem(run_dir)  # drops cached listings of an object store
        self.protocol = "" if io.is_local(run_dir) else run_dir.split("://", 1)[0] + "://"
        self.listed: dict[str, list[str]] = {}

    def names(self, folder: str) -> list[str]:
        """Base names of the files directly under run_dir/folder (hidden ones skipped)."""
        if folder not in self.listed:
            try:
                entries = self.fs.ls(f"{self.root.rstrip('/')}/{folder}", detail=True)
            except (FileNotFoundError, NotADirectoryError):
                entries = []
            self.listed[folder] = sorted(
                name
                for e in entries
                if e.get("type") == "file" and not (name := e["name"].rstrip("/").rsplit("/", 1)[-1]).startswith(".")
            )
        return self.listed[folder]

    def files(self, view: str) -> list[str]:
        """Full paths (as the run dir is spelled) of one view's files, sorted."""
        folder, pattern = VIEWS[view]
        return [io.join(self.run_dir, folder, n) for n in self.names(folder) if fnmatch.fnmatchcase(n, pattern)]


def view_files(run_dir: str, view: str) -> list[str]:
    """The files of one view, listed (not globbed) under the run dir; sorted."""
    return _Lister(run_dir).files(view)


def connect(run_dir: str, unsafe: bool = False) -> Any:
    """An in-memory DuckDB connection with a view per table of the run that exists; read-only
    (see the module docstring) unless `unsafe`.

    In a notebook: `con = connect("runs/r1"); con.sql("FROM dropped LIMIT 5").df()`.
    """
    import duckdb

    if not io.exists(run_dir):
        raise ConfigError(f"run directory not found: {run_dir}")
    con = duckdb.connect()
    if not io.is_local(run_dir):
        fs, _ = io.filesystem(run_dir)
        con.register_filesystem(fs)
    made: set[str] = set()
    allowed: list[str] = []
    lister = _Lister(run_dir)
    for view in VIEWS:
        files = lister.files(view)
        if files:
            patterns = [glob_escape(_duckdb_path(f)) for f in files]
            allowed += [_duckdb_path(f) for f in files] + patterns
            listed = ", ".join(f"'{_sql_str(p)}'" for p in patterns)
            con.execute(f"CREATE VIEW {view} AS SELECT * FROM read_parquet([{listed}], union_by_name=true)")
            made.add(view)
        elif view in EMPTY_WHEN_DONE and "_SUCCESS.json" in lister.names(VIEWS[view][0].split("/")[0]):
            from wit_builder import schema

            con.register(view, getattr(schema, EMPTY_WHEN_DONE[view]).empty_table())
            made.add(view)
    if {"samples", "filtered"} <= made:
        con.execute(
            "CREATE VIEW kept AS SELECT s.* FROM samples s JOIN filtered f USING (key) "
            "WHERE s.status = 'success' AND f.drop_reason IS NULL"
        )
        made.add("kept")
    dropped = _dropped_sql(run_dir, made, shards_done="_SUCCESS.json" in lister.names("shards"))
    if dropped:
        con.execute(f"CREATE VIEW dropped AS {dropped}")
    if not unsafe:
        _lock_down(con, allowed)
    return con


def _duckdb_path(path: str) -> str:
    """The spelling DuckDB gets for a listed file (local paths made absolute)."""
    import os

    if not io.is_local(path):
        return path
    return os.path.abspath(path.removeprefix("file://"))


def _lock_down(con: Any, allowed: list[str]) -> None:
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET allowed_paths = $1", [sorted(set(allowed))])
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


_DROPPED_COLUMNS = "uid, key, url, caption, query_id, query_text, shard"


def _dropped_sql(run_dir: str, made: set[str], shards_done: bool) -> str | None:
    """Every selected sample that did not reach the shards, as far as the run has got: download
    failures, filter drops (once the filter ran), and kept samples the finished shards stage
    left out."""
    parts = []
    if "samples" in made:
        parts.append(
            f"SELECT {_DROPPED_COLUMNS}, 'download' AS stage, coalesce(error, status) AS reason "
            "FROM samples WHERE status <> 'success'"
        )
    if {"samples", "filtered"} <= made:
        cols = ", ".join(f"s.{c.strip()}" for c in _DROPPED_COLUMNS.split(","))
        parts.append(
            f"SELECT {cols}, 'filter' AS stage, f.drop_reason AS reason FROM samples s JOIN filtered f USING (key) "
            "WHERE s.status = 'success' AND f.drop_reason IS NOT NULL"
        )
    if {"kept", "shards"} <= made and shards_done:
        parts.append(
            f"SELECT {_DROPPED_COLUMNS}, 'shards' AS stage, {_shards_reason(run_dir)} AS reason FROM kept k "
            "WHERE NOT EXISTS (SELECT 1 FROM shards sh WHERE sh.key = k.key)"
        )
    return " UNION ALL ".join(parts) or None


def _shards_reason(run_dir: str) -> str:
    """Why the shards stage left a kept sample out: trimmed back to the cap (`over_cap` in its
    summary) or, rarely, no image found in its download tar (`missing_image`). When the summary
    has both, a sample ranked before one that made it into the shards for the same query was not
    trimmed (the trim keeps the smallest ranks), so its image was missing."""
    dropped: dict[str, int] = {}
    success = io.join(run_dir, "shards", "_SUCCESS.json")
    if io.exists(success):
        dropped = io.read_json(success).get("result", {}).get("dropped", {})
    if not dropped.get("missing_image"):
        return "'trimmed_over_cap'"
    if not dropped.get("over_cap"):
        return "'missing_image'"
    return (
        "CASE WHEN EXISTS (SELECT 1 FROM kept k2 JOIN shards s2 USING (key) WHERE k2.query_id = k.query_id "
        "AND (k2.rank > k.rank OR (k2.rank = k.rank AND k2.uid > k.uid))) "
        "THEN 'missing_image' ELSE 'trimmed_over_cap' END"
    )


def _sql_str(s: str) -> str:
    return s.replace("'", "''")


def views(run_dir: str) -> list[str]:
    return view_names(connect(run_dir))


def view_names(con: Any) -> list[str]:
    """The views (and registered empty tables) of a catalog connection, sorted."""
    return [r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY 1").fetchall()]


SCHEMA_SQL = (
    "SELECT table_name AS view, ordinal_position AS position, column_name AS column, data_type AS type "
    "FROM information_schema.columns ORDER BY 1, 2"
)  # every view's columns and DuckDB types: what `sql --schema` prints


def run(con: Any, sql: str, unsafe: bool = False) -> Any:
    """Run `sql` (one or more statements) on a catalog connection; returns the DuckDB relation
    of the last statement (None when it returns no rows). Read-only mode refuses statements
    other than SELECT/EXPLAIN and any file access outside the run; refusals and SQL errors raise
    ConfigError with a one-line reason."""
    import duckdb

    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as e:
        raise ConfigError(
            f"SQL error: {_message(e)}\n(views in this run: {', '.join(view_names(con)) or 'none yet'})"
        ) from None
    if not statements:
        raise ConfigError("empty SQL query")
    if not unsafe:
        for s in statements:
            if s.type.name not in READ_ONLY_STATEMENTS:
                raise ConfigError(
                    f"refused: {s.type.name} statements are not run in read-only mode "
                    "(only SELECT, DESCRIBE, SUMMARIZE, EXPLAIN); pass --unsafe to allow"
                )
    try:
        return con.sql(sql)
    except duckdb.PermissionException as e:
        raise ConfigError(f"refused in read-only mode: {_first_line(e)}; pass --unsafe to allow") from None
    except duckdb.Error as e:
        have = ", ".join(view_names(con))
        raise ConfigError(f"SQL error: {_message(e)}\n(views in this run: {have or 'none yet'})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return terminal_safe(text.splitlines()[0]) if text else type(e).__name__


def _message(e: BaseException) -> str:
    """A DuckDB error's text for the terminal, on one line: it may quote a caption, whose line
    breaks and escape codes are escaped like everything else."""
    return terminal_safe(str(e).strip())


def query(run_dir: str, sql: str, unsafe: bool = False) -> tuple[list[str], list[tuple]]:
    """Run `sql` over the run's views; returns (column names, rows)."""
    con = connect(run_dir, unsafe=unsafe)
    rel = run(con, sql, unsafe=unsafe)
    if rel is None:
        return [], []
    with _sql_errors(con):
        return list(rel.columns), rel.fetchall()


# ---------------------------------------------------------------- terminal output

# C0 controls, DEL, C1 controls, bidi embeddings/overrides/isolates and marks, line/paragraph
# separators: anything that moves the cursor, retitles the window or reorders the text
_UNSAFE_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def terminal_safe(text: str) -> str:
    """`text` with every control, bidi and line-separator character written as an escape.

    >>> terminal_safe("red\\x1b]0;pwned\\x07 car\\r\\n\\u202egpj.exe")
    'red\\\\x1b]0;pwned\\\\x07 car\\\\r\\\\n\\\\u202egpj.exe'
    """
    return _UNSAFE_CHARS.sub(lambda m: _NAMED.get(m.group(), _code(m.group())), text)


def _code(ch: str) -> str:
    n = ord(ch)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}"


def _cell(v: Any) -> str:
    return "NULL" if v is None else terminal_safe(str(v))


def format_table(cols: list[str], rows: list[tuple], max_rows: int = 50, total: int | None = None) -> str:
    """A plain-text table for the terminal, control characters escaped; `max_rows` 0 = all;
    `total` = the result's row count when `rows` holds only the first ones."""
    total = len(rows) if total is None else total
    max_rows = max_rows or len(rows)
    head = [terminal_safe(c) for c in cols]
    shown = [tuple(_cell(v) for v in r) for r in rows[:max_rows]]
    widths = [max([len(c)] + [min(len(r[i]), 80) for r in shown]) for i, c in enumerate(head)]
    line = "  ".join(c.ljust(w) for c, w in zip(head, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v[:80].ljust(w) for v, w in zip(r, widths)) for r in shown]
    if total > len(shown):
        out.append(f"... {total - len(shown)} more rows")
    out.append(f"({total} row{'s' if total != 1 else ''})")
    return "\n".join(out)


# ---------------------------------------------------------------- writing results

FORMATS = ("table", "csv", "json", "parquet")


def _batches(rel: Any, size: int = 8192) -> Iterator[Any]:
    reader = rel.to_arrow_reader(size)
    yield from reader


def _rows(batch: Any) -> list[tuple]:
    """A record batch's rows as tuples (duplicate column names kept apart)."""
    return list(zip(*(c.to_pylist() for c in batch.columns))) if batch.num_columns else []


def table_text(rel: Any, max_rows: int) -> str:
    """The terminal table of a relation: its first `max_rows` rows (0 = all), the rest counted
    as they stream by (memory bounded by `max_rows`)."""
    cols = list(rel.columns)
    first: list[tuple] = []
    total = 0
    for batch in _batches(rel):
        if not max_rows or len(first) < max_rows:
            need = batch.num_rows if not max_rows else max_rows - len(first)
            first += _rows(batch.slice(0, need))
        total += batch.num_rows
    return format_table(cols, first, max_rows, total)


def _json_value(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.hex()
    return str(v)


def write_result(rel: Any, fmt: str, out: Any, escape: bool = False) -> int:
    """Stream a relation to the binary file `out` as csv, json (JSON Lines) or parquet; returns
    rows written. `escape`: control characters in csv/json text escaped (for a terminal)."""
    import csv
    import io as _io
    import json

    if fmt == "parquet":
        import pyarrow.parquet as pq

        reader = rel.to_arrow_reader(65536)
        rows = 0
        with pq.ParquetWriter(out, reader.schema, compression="zstd") as w:
            for batch in reader:
                w.write_batch(batch)
                rows += batch.num_rows
        return rows
    text = _io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=True)
    names = list(rel.columns)
    rows = 0
    writer = csv.writer(text) if fmt == "csv" else None
    if writer is not None:
        writer.writerow([terminal_safe(c) if escape else c for c in names])
    for batch in _batches(rel):
        for values in _rows(batch):
            rows += 1
            if writer is not None:
                cells = ["" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else str(v) for v in values]
                writer.writerow([terminal_safe(c) for c in cells] if escape else cells)
            else:
                line = json.dumps(dict(zip(names, values)), ensure_ascii=False, default=_json_value)
                text.write((terminal_safe(line) if escape else line) + "\n")
    text.flush()
    text.detach()
    return rows


def _inside(path: str, run_dir: str) -> bool:
    import os

    if io.is_local(path) and io.is_local(run_dir):
        return os.path.abspath(path).startswith(os.path.abspath(run_dir).rstrip(os.sep) + os.sep)
    return path.startswith(run_dir.rstrip("/") + "/")


def sql_command(
    run_dir: str,
    sql: str | None,
    *,
    schema: bool = False,
    fmt: str = "table",
    output: str | None = None,
    max_rows: int = 50,
    unsafe: bool = False,
) -> int:
    """`wit-build sql`: run `sql` (or list the views' columns with `schema`) and print the
    result as a terminal table, or write it as csv/json/parquet to stdout or `output`."""
    if schema == bool(sql):
        raise ConfigError("give a QUERY or --schema (not both)")
    if fmt not in FORMATS:
        raise ConfigError(f"--format: one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "parquet" and not output:
        raise ConfigError("--format parquet needs --output FILE")
    if output and not unsafe and _inside(output, run_dir):
        raise ConfigError(f"refused: --output {output} is inside the run directory (read-only); pass --unsafe to allow")
    con = connect(run_dir, unsafe=unsafe)
    rel = run(con, SCHEMA_SQL if schema else str(sql), unsafe=unsafe)
    if rel is None:  # a statement with no result (only with --unsafe)
        return 0
    with _sql_errors(con):
        return _emit(rel, fmt, output, max_rows)


@contextlib.contextmanager
def _sql_errors(con: Any) -> Iterator[None]:
    """DuckDB errors raised while a result streams (a failed cast, a refused file) as
    ConfigError, like those raised when the query is bound."""
    import duckdb

    try:
        yield
    except duckdb.PermissionException as e:
        raise ConfigError(f"refused in read-only mode: {_first_line(e)}; pass --unsafe to allow") from None
    except duckdb.Error as e:
        raise ConfigError(
            f"SQL error: {_message(e)}\n(views in this run: {', '.join(view_names(con)) or 'none yet'})"
        ) from None


def _emit(rel: Any, fmt: str, output: str | None, max_rows: int) -> int:
    import sys

    if output:
        tmp = io.tmp_name(output)
        try:
            if "/" in output:
                io.makedirs(output.rsplit("/", 1)[0])
            with io.open_file(tmp, "wb") as f:
                if fmt == "table":
                    f.write((table_text(rel, max_rows) + "\n").encode())
                    rows = None
                else:
                    rows = write_result(rel, fmt, f)
        except BaseException:
            io.discard(tmp)
            raise
        io.commit(tmp, output)
        if rows is not None:
            print(f"{rows} row{'s' if rows != 1 else ''} -> {output}", file=sys.stderr)
        return 0
    if fmt == "table":
        print(table_text(rel, max_rows))
    else:
        sys.stdout.flush()
        write_result(rel, fmt, sys.stdout.buffer, escape=sys.stdout.isatty())
    return 0
