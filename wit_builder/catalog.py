"""DuckDB views over a run directory's parquet metadata, and the `sql` command.

Views (each only when its files exist): queries, candidates, matched, selected, query_counts,
samples (every download attempt), filtered, kept (successful samples the filter kept),
shards (one row per sample in the final tars). Object stores are reached through fsspec
(`register_filesystem`), not DuckDB's httpfs.

Example:
    >>> con = connect("runs/demo")                                   # doctest: +SKIP
    >>> con.sql("SELECT count(*) FROM shards").fetchone()            # doctest: +SKIP
    (57,)
"""

from __future__ import annotations

from typing import Any

from wit_builder import io

# view name -> glob under the run dir
VIEWS = {
    "queries": "queries/queries.parquet",
    "candidates": "candidates/part-*.parquet",
    "matched": "matched/part-*.parquet",
    "selected": "selected/part-*.parquet",
    "query_counts": "selected/query_counts.parquet",
    "samples": "download/*.parquet",
    "filtered": "filtered/*.parquet",
    "shards": "shards/metadata/*.parquet",
}


# views whose stage may finish with no files (nothing kept) -> the schema.py name of their rows;
# the stage's directory is the first part of the view's glob
EMPTY_WHEN_DONE = {
    "candidates": "CANDIDATES",
    "matched": "MATCHED",
    "selected": "SELECTED",
    "samples": "SAMPLES",
    "filtered": "FILTERED",
    "shards": "SHARD_SAMPLES",
}


def _has_files(pattern: str) -> bool:
    fs, inner = io.filesystem(pattern)
    return bool(fs.glob(inner))


def connect(run_dir: str) -> Any:
    """An in-memory DuckDB connection with a view per table of the run that exists."""
    import duckdb

    if not io.exists(run_dir):
        from wit_builder.config import ConfigError

        raise ConfigError(f"run directory not found: {run_dir}")
    con = duckdb.connect()
    if not io.is_local(run_dir):
        fs, _ = io.filesystem(run_dir)
        con.register_filesystem(fs)
    made = set()
    for view, rel in VIEWS.items():
        pattern = io.join(run_dir, rel)
        if _has_files(pattern):
            con.execute(f"CREATE VIEW {view} AS SELECT * FROM read_parquet('{_sql_str(pattern)}', union_by_name=true)")
            made.add(view)
        elif view in EMPTY_WHEN_DONE and io.exists(io.join(run_dir, rel.split("/", 1)[0], "_SUCCESS.json")):
            from wit_builder import schema

            con.register(view, getattr(schema, EMPTY_WHEN_DONE[view]).empty_table())
            made.add(view)
    if {"samples", "filtered"} <= made:
        con.execute(
            "CREATE VIEW kept AS SELECT s.* FROM samples s JOIN filtered f USING (key) "
            "WHERE s.status = 'success' AND f.drop_reason IS NULL"
        )
    return con


def _sql_str(s: str) -> str:
    return s.replace("'", "''")


def views(run_dir: str) -> list[str]:
    return _view_names(connect(run_dir))


def _view_names(con: Any) -> list[str]:
    return [r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY 1").fetchall()]


def query(run_dir: str, sql: str) -> tuple[list[str], list[tuple]]:
    """Run `sql` over the run's views; returns (column names, rows)."""
    import duckdb

    from wit_builder.config import ConfigError

    con = connect(run_dir)
    try:
        rel = con.execute(sql)
    except duckdb.Error as e:
        have = ", ".join(_view_names(con))
        raise ConfigError(f"SQL error: {e}\n(views in this run: {have or 'none yet'})") from None
    if rel is None:
        raise ConfigError("empty SQL query")
    cols = [d[0] for d in rel.description] if rel.description else []
    return cols, rel.fetchall()


def format_table(cols: list[str], rows: list[tuple], max_rows: int = 50) -> str:
    """A plain-text table for the terminal; `max_rows` 0 = all."""
    max_rows = max_rows or len(rows)
    shown = [tuple("NULL" if v is None else str(v) for v in r) for r in rows[:max_rows]]
    widths = [max([len(c)] + [min(len(r[i]), 80) for r in shown]) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v[:80].ljust(w) for v, w in zip(r, widths)) for r in shown]
    if len(rows) > max_rows:
        out.append(f"... {len(rows) - max_rows} more rows")
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)
