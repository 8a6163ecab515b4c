"""`wit-build stats DIR`: a report of a run — stage funnel, drop reasons, query balance, image
and caption statistics — as `DIR/report/report.html` with PNG plots beside it.

Every figure is computed from the run's own metadata through the DuckDB catalog.

Example:
    >>> write_report("runs/demo")                       # doctest: +SKIP
    'runs/demo/report/report.html'
"""

from __future__ import annotations

import html
import os
from typing import Any

from wit_builder import io
from wit_builder.catalog import connect
from wit_builder.runner import stage_states


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out_dir: str, name: str) -> str:
    import io as _io

    buf = _io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    _plt().close(fig)
    io.write_bytes(buf.getvalue(), io.join(out_dir, name))  # local dir or object store alike
    return name


def _funnel(states: list, out_dir: str) -> str | None:
    done = [s for s in states if s.result]
    if not done:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = [s.name for s in done]
    ax.bar(names, [s.result.rows_in for s in done], color="#c8d6e5", label="in")
    ax.bar(names, [s.result.rows_out for s in done], color="#2e86de", label="out")
    ax.set_yscale("log")
    ax.set_ylabel("rows")
    ax.set_title("rows in and out of each stage")
    ax.legend()
    return _save(fig, out_dir, "funnel.png")


def _query_balance(con: Any, out_dir: str) -> str | None:
    rows = con.execute(
        "SELECT containing, attributed FROM query_counts WHERE containing > 0 ORDER BY containing DESC"
    ).fetchall()
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ranks = range(1, len(rows) + 1)
    ax.loglog(ranks, [r[0] for r in rows], label="captions containing the query")
    ax.loglog(ranks, sorted((max(r[1], 0.8) for r in rows), reverse=True), label="pairs attributed (selected)")
    ax.set_xlabel("query rank")
    ax.set_ylabel("pairs")
    ax.set_title("query balance: head queries capped, tail kept")
    ax.legend()
    return _save(fig, out_dir, "query_balance.png")


def _histogram(values: list[float], title: str, xlabel: str, out_dir: str, name: str) -> str | None:
    if not values:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.0))
    ax.hist(values, bins=min(50, max(5, len(set(values)))), color="#2e86de")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    return _save(fig, out_dir, name)


def _table(cols: list[str], rows: list[tuple]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


_STYLE = (
    "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}</style>"
)

Section = tuple[list[str], list[str | None]]  # (HTML parts, plot file names or None)


def write_report(run_dir: str) -> str:
    """Write `run_dir/report/report.html` (+ PNGs) and return its path (local or fsspec URL)."""
    if not io.exists(run_dir):
        from wit_builder.config import ConfigError

        raise ConfigError(f"run directory not found: {run_dir}")
    out_dir = io.join(run_dir, "report")
    con = connect(run_dir)
    have = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    where = os.path.abspath(run_dir) if io.is_local(run_dir) else run_dir
    parts = [f"<h1>wit-builder run report</h1><p>{html.escape(where)}</p>"]
    plots: list[str | None] = []
    for section in (
        _stages_section(stage_states(run_dir), out_dir),
        _queries_section(con, have, out_dir),
        _downloads_section(con, have, out_dir),
        _filter_section(con, have),
        _shards_section(con, have, run_dir, out_dir),
    ):
        parts += section[0]
        plots += section[1]
    parts += ["<h2>Plots</h2>"] + [f'<p><img src="{p}" alt="{p}"></p>' for p in plots if p]
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>wit-builder report</title>"
        f"{_STYLE}</head><body>" + "\n".join(parts) + "</body></html>\n"
    )
    path = io.join(out_dir, "report.html")
    io.write_bytes(page.encode(), path)
    return path


def _stages_section(states: list, out_dir: str) -> Section:
    rows = []
    for s in states:
        if s.result:
            drops = ", ".join(f"{k}={v}" for k, v in sorted(s.result.dropped.items()) if v) or "-"
            rows.append((s.name, s.state, s.result.rows_in, s.result.rows_out, drops, f"{s.result.seconds:.1f}"))
        else:
            rows.append((s.name, s.state, "", "", "", ""))
    table = _table(["stage", "state", "in", "out", "dropped by reason", "seconds"], rows)
    return ["<h2>Stages</h2>", table], [_funnel(states, out_dir)]


def _queries_section(con: Any, have: set[str], out_dir: str) -> Section:
    if "query_counts" not in have:
        return [], []
    top = []
    if "queries" in have:
        top = con.execute(
            "SELECT q.text, c.containing, c.attributed FROM query_counts c JOIN queries q USING (query_id) "
            "ORDER BY c.containing DESC, q.text LIMIT 20"
        ).fetchall()
    table = _table(["query", "containing", "attributed"], top)
    return ["<h2>Head queries</h2>", table], [_query_balance(con, out_dir)]


def _downloads_section(con: Any, have: set[str], out_dir: str) -> Section:
    if "samples" not in have:
        return [], []
    errs = con.execute(
        "SELECT status, coalesce(error, '') AS error, count(*) n FROM samples GROUP BY ALL ORDER BY n DESC"
    ).fetchall()
    widths = con.execute(
        "SELECT original_width FROM samples WHERE status = 'success' AND original_width IS NOT NULL"
    ).fetchall()
    plot = _histogram(
        [r[0] for r in widths], "original image width of downloaded images", "pixels", out_dir, "widths.png"
    )
    return ["<h2>Downloads</h2>", _table(["status", "error", "count"], errs)], [plot]


def _filter_section(con: Any, have: set[str]) -> Section:
    if "filtered" not in have:
        return [], []
    drops = con.execute(
        "SELECT coalesce(drop_reason, '(kept)') r, count(*) n FROM filtered GROUP BY 1 ORDER BY n DESC"
    ).fetchall()
    return ["<h2>Filter</h2>", _table(["drop reason", "count"], drops)], []


def _shards_section(con: Any, have: set[str], run_dir: str, out_dir: str) -> Section:
    if "shards" not in have:
        return [], []
    caps = [r[0] for r in con.execute("SELECT length(caption) FROM shards").fetchall()]
    plot = _histogram(caps, "caption length in the final shards", "characters", out_dir, "captions.png")
    parts = []
    manifest_path = io.join(run_dir, "shards", "manifest.json")
    if io.exists(manifest_path):
        m = io.read_json(manifest_path)
        parts.append(
            f"<h2>Shards</h2><p>{len(m['tars'])} tars, {m['total_samples']} samples, "
            f"{m['total_bytes']:,} bytes; config hash {html.escape(str(m.get('config_hash')))}</p>"
        )
    return parts, [plot]
