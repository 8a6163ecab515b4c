"""`wit-build stats DIR`: a report of a run as `DIR/report/report.html`, PNG plots beside it.

What it shows: the commands that train on the shards (wit-train and open_clip_train, with the
real shard brace pattern and sample count); a grid of sample images with their captions
(thumbnails read from the final tars by offset); the stages (rows in/out, drops by reason,
seconds) with a funnel of row counts and the time per stage; samples removed for safety (drop
reasons and errors starting with `safety:`); per-query counts containing / selected / kept /
in the shards as sorted rank-count curves plus head and tail tables (readable for 1 query or
500,000); download errors and the top domains with their failure rates; image width, height
and aspect ratio and caption length histograms on log scales (one 12000-px panorama does not
squash them); filter drop reasons; caption languages when the filter recorded them.

Every figure is computed from the run's own metadata through the read-only DuckDB catalog;
histograms are binned in DuckDB, so memory does not grow with the run. Untrusted text
(captions, URLs, errors, query texts, the run path) is HTML-escaped everywhere, links are made
only for http(s) URLs, and the page's Content-Security-Policy allows no script at all; plots
and thumbnails are embedded as data: URIs, so the page is one self-contained file.

Example:
    >>> write_report("runs/demo")                       # doctest: +SKIP
    'runs/demo/report/report.html'
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
import shlex
from typing import Any

from wit_builder import io, tario
from wit_builder.catalog import connect, view_names
from wit_builder.runner import stage_states

GRID_SAMPLES = 24
GRID_TARS = 4  # the grid's samples come from this many tars, spread over the run
THUMB_PX = 160
TABLE_ROWS = 20
CURVE_POINTS = 2000  # rank-count curves: log-spaced ranks, however many queries
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SAFETY_PREFIX = "safety:"


def esc(value: Any) -> str:
    """HTML-escaped text, quotes included (safe inside attributes too).

    >>> esc('<img src=x onerror="alert(1)">')
    '&lt;img src=x onerror=&quot;alert(1)&quot;&gt;'
    """
    return html.escape("" if value is None else str(value), quote=True)


def link(url: str | None) -> str:
    """An escaped link for an http(s) URL; any other URL (javascript:, data:, ...) as plain text.

    >>> link("javascript:alert(1)")
    '<span class="url">javascript:alert(1)</span>'
    """
    if url and re.match(r"https?://", url):
        return f'<a href="{esc(url)}" rel="noreferrer nofollow">{esc(_short(url, 60))}</a>'
    return f'<span class="url">{esc(_short(url or "", 60))}</span>'


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


# ---------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _readable_log_axes(ax: Any, x: bool = True, y: bool = True) -> None:
    """Log axes labelled in plain numbers (1, 20, 300, 12k), not 2×10^0."""
    from matplotlib import ticker

    def plain(v: float, _pos: Any = None) -> str:
        if v >= 10_000:
            return f"{v / 1000:g}k"
        return f"{v:g}"

    for on, axis in ((x, ax.xaxis), (y, ax.yaxis)):
        if on:
            axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(ticker.FuncFormatter(plain))
            axis.set_minor_formatter(ticker.NullFormatter())


class Plots:
    """Writes each plot as a PNG beside the report and returns its <img> with a data: URI."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def save(self, fig: Any, name: str, alt: str) -> str:
        import io as _io

        buf = _io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
        _plt().close(fig)
        data = buf.getvalue()
        io.write_bytes(data, io.join(self.out_dir, name))  # local dir or object store alike
        uri = "data:image/png;base64," + base64.b64encode(data).decode()
        return f'<p><img class="plot" src="{uri}" alt="{esc(alt)}" title="{esc(name)}"></p>'


def log_histogram(con: Any, expr: str, source: str, bins: int = 40) -> list[tuple[float, float, int]]:
    """(low, high, count) of `expr` (> 0) over `source`, in log-spaced bins computed in DuckDB."""
    lo, hi, n = con.sql(f"SELECT min({expr}), max({expr}), count(*) FROM {source} WHERE {expr} > 0").fetchall()[0]
    if not n:
        return []
    lo, hi = float(lo), float(hi)
    if hi <= lo * 1.0001:
        return [(lo / 1.05, lo * 1.05, int(n))]
    step = (math.log(hi) - math.log(lo)) / bins
    rows = con.sql(
        f"SELECT least(CAST(floor((ln({expr}) - {math.log(lo)!r}) / {step!r}) AS INTEGER), {bins - 1}) AS b, "
        f"count(*) FROM {source} WHERE {expr} > 0 GROUP BY 1 ORDER BY 1"
    ).fetchall()
    edges = [lo] + [math.exp(math.log(lo) + i * step) for i in range(1, bins)] + [hi]
    return [(edges[b], edges[b + 1], int(c)) for b, c in rows]


def _hist_plot(
    plots: Plots, series: list[tuple[str, list[tuple[float, float, int]]]], title: str, xlabel: str, name: str
) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.0))
    for label, bins in series:
        if bins:
            ax.bar(
                [b[0] for b in bins],
                [b[2] for b in bins],
                width=[b[1] - b[0] for b in bins],
                align="edge",
                alpha=0.6,
                label=label,
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.8)
    _readable_log_axes(ax)
    ax.set_title(title)
    ax.set_xlabel(xlabel + " (log scale)")
    ax.set_ylabel("samples (log)")
    if len(series) > 1:
        ax.legend()
    return plots.save(fig, name, title)


# ---------------------------------------------------------------- the page

_STYLE = """<style>
body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;vertical-align:top}
td.n{text-align:right}pre{background:#f4f4f4;padding:.6em;white-space:pre-wrap;word-break:break-all}
.grid{display:flex;flex-wrap:wrap;gap:10px}.card{width:170px;font-size:12px;overflow-wrap:anywhere}
.card img{max-width:160px;max-height:160px;display:block}.url{color:#555}.note{color:#666}
img.plot{max-width:100%}
</style>"""
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _table(cols: list[str], rows: list[tuple], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="n">{esc(v)}</td>' if i in numeric else f"<td>{esc(v)}</td>" for i, v in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(run_dir: str) -> str:
    """Write `run_dir/report/report.html` (+ PNGs) and return its path (local or fsspec URL)."""
    if not io.exists(run_dir):
        from wit_builder.config import ConfigError

        raise ConfigError(f"run directory not found: {run_dir}")
    out_dir = io.join(run_dir, "report")
    con = connect(run_dir)
    have = set(view_names(con))
    plots = Plots(out_dir)
    states = stage_states(run_dir)
    manifest_path = io.join(run_dir, "shards", "manifest.json")
    manifest = io.read_json(manifest_path) if io.exists(manifest_path) else None
    where = os.path.abspath(run_dir) if io.is_local(run_dir) else run_dir
    parts = [f"<h1>wit-builder run report</h1><p>run: <code>{esc(where)}</code></p>"]
    parts += _train_section(where, manifest)
    parts += _grid_section(con, have, run_dir)
    parts += _stages_section(states, plots)
    parts += _safety_section(con, have, states)
    parts += _queries_section(con, have, plots)
    parts += _downloads_section(con, have, plots)
    parts += _filter_section(con, have)
    parts += _captions_section(con, have, plots)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        f"<title>wit-builder report</title>{_STYLE}</head><body>" + "\n".join(parts) + "</body></html>\n"
    )
    path = io.join(out_dir, "report.html")
    io.write_bytes(page.encode(), path)
    return path


# ---------------------------------------------------------------- sections


def brace_pattern(names: list[str]) -> str:
    """The shard names as one brace pattern (what webdataset and open_clip_train expand).

    >>> brace_pattern(["000000.tar", "000001.tar", "000002.tar"])
    '{000000..000002}.tar'
    >>> brace_pattern(["000007.tar"])
    '000007.tar'
    """
    stems = [n[: -len(".tar")] for n in names if n.endswith(".tar")]
    if len(stems) == 1:
        return names[0]
    width = len(stems[0])
    if all(s.isdigit() and len(s) == width for s in stems):
        first, last = int(stems[0]), int(stems[-1])
        if [int(s) for s in stems] == list(range(first, last + 1)):
            return f"{{{stems[0]}..{stems[-1]}}}.tar"
    return "{" + ",".join(stems) + "}.tar"


def train_commands(run_dir: str, manifest: dict[str, Any]) -> list[str]:
    """Shell commands that train CLIP on the run's shards: ours, then open_clip_train's."""
    shards = io.join(run_dir, "shards")
    names = [t["path"] for t in manifest["tars"]]
    n = manifest["total_samples"]
    ours = (
        f"wit-train --config pipelines/train-tiny.toml --data {shlex.quote(io.join(shards, 'manifest.json'))} "
        f"--out {shlex.quote(io.join(run_dir, 'train'))}"
    )
    torchrun = (
        "torchrun --nproc-per-node 8 -m wit_builder.train --config pipelines/train-vit-b32.toml "
        f"--data {shlex.quote(io.join(shards, 'manifest.json'))} --out {shlex.quote(io.join(run_dir, 'train'))}"
    )
    open_clip = (
        f"python -m open_clip_train.main --train-data {shlex.quote(io.join(shards, brace_pattern(names)))} "
        f"--train-num-samples {n} --dataset-type webdataset --model ViT-B-32 --batch-size 256 "
        "--epochs 32 --lr 5e-4 --warmup 2000 --workers 8 --precision amp_bf16"
    )
    return [ours, torchrun, open_clip] if names else []


def _train_section(run_dir: str, manifest: dict[str, Any] | None) -> list[str]:
    if not manifest:
        return ["<h2>Train on it</h2><p class='note'>no shards yet (the shards stage has not finished)</p>"]
    head = (
        f"<h2>Train on it</h2><p>{len(manifest['tars'])} tar(s), {manifest['total_samples']:,} samples, "
        f"{manifest['total_bytes']:,} bytes; config hash {esc(manifest.get('config_hash'))}</p>"
    )
    cmds = train_commands(run_dir, manifest)
    if not cmds:
        return [head + "<p class='note'>the shards are empty: nothing to train on</p>"]
    return [
        head
        + "<p>wit-train (CPU, tiny model; then GPUs with torchrun), and open_clip's trainer:</p>"
        + "".join(f"<pre>{esc(c)}</pre>" for c in cmds)
    ]


def _thumbnail(data: bytes) -> str | None:
    import io as _io

    from PIL import Image

    try:
        with Image.open(_io.BytesIO(data)) as im:
            im.thumbnail((THUMB_PX, THUMB_PX))
            buf = _io.BytesIO()
            im.convert("RGB").save(buf, "JPEG", quality=80)
    except Exception:  # a member that does not decode: shown as such, not fatal to the report
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def read_images(run_dir: str, tar: str, keys: set[str]) -> dict[str, bytes]:
    """key -> image bytes of the wanted keys in one final tar, located from the tar headers
    (`tario.member_offsets`, which stops being read once every key is found: ask for the first
    keys of a tar and little of it is read, on an object store too) and read by offset."""
    path = io.join(run_dir, "shards", tar)
    found: dict[str, tuple[int, int]] = {}
    members = tario.member_offsets(path, lambda n: n.rpartition(".")[0] in keys)
    for name, offset, size in members:
        key, _, ext = name.rpartition(".")
        if ext.lower() in IMAGE_EXTS:
            found[key] = (offset, size)
            if len(found) == len(keys):
                break
    members.close()
    out = {}
    with io.open_file(path, "rb") as f:
        for key, (offset, size) in found.items():
            f.seek(offset)
            out[key] = f.read(size)
    return out


def _grid_samples(con: Any) -> list[tuple]:
    """The first keys (key order = tar order) of up to GRID_TARS tars spread over the run."""
    tars = [r[0] for r in con.sql("SELECT DISTINCT tar FROM shards ORDER BY tar").fetchall()]
    if not tars:
        return []
    picked = sorted({tars[round(i * (len(tars) - 1) / max(GRID_TARS - 1, 1))] for i in range(GRID_TARS)})
    per_tar = -(-GRID_SAMPLES // len(picked))
    return con.sql(
        "SELECT key, tar, caption, query_text, url FROM shards WHERE list_contains($1, tar) "
        f"QUALIFY row_number() OVER (PARTITION BY tar ORDER BY key) <= {per_tar} ORDER BY tar, key",
        params=[picked],
    ).fetchall()[:GRID_SAMPLES]


def _grid_section(con: Any, have: set[str], run_dir: str) -> list[str]:
    if "shards" not in have:
        return []
    rows = _grid_samples(con)
    if not rows:
        return ["<h2>Samples</h2><p>none: the shards are empty</p>"]
    images: dict[str, bytes] = {}
    by_tar: dict[str, set[str]] = {}
    for key, tar, *_ in rows:
        by_tar.setdefault(tar, set()).add(key)
    for tar, keys in by_tar.items():
        try:
            images.update(read_images(run_dir, tar, keys))
        except (OSError, tario.TarFormatError):  # a missing or damaged tar: its cards say so
            pass
    cards = []
    for key, _tar, caption, query_text, url in rows:
        uri = _thumbnail(images[key]) if key in images else None
        img = (
            f'<img src="{uri}" alt="{esc(_short(caption, 100))}">' if uri else "<p class='note'>(image unreadable)</p>"
        )
        cards.append(
            f'<div class="card">{img}<div>{esc(_short(caption, 160))}</div>'
            f"<div class='note'>query: {esc(query_text)}</div><div>{link(url)}</div></div>"
        )
    return [
        f"<h2>Samples</h2><p class='note'>{len(rows)} samples from the final shards: the first of "
        f"{len(by_tar)} tar(s) spread over the run</p>",
        f'<div class="grid">{"".join(cards)}</div>',
    ]


def _stages_section(states: list, plots: Plots) -> list[str]:
    rows = []
    for s in states:
        if s.result:
            drops = ", ".join(f"{k}={v}" for k, v in sorted(s.result.dropped.items()) if v) or "-"
            rows.append((s.name, s.state, s.result.rows_in, s.result.rows_out, drops, f"{s.result.seconds:.1f}"))
        else:
            rows.append((s.name, s.state, "", "", "", ""))
    out = ["<h2>Stages</h2>", _table(["stage", "state", "in", "out", "dropped by reason", "seconds"], rows)]
    done = [s for s in states if s.result]
    pairs = [s for s in done if s.name != "queries"]  # the queries stage counts queries, not pairs
    if pairs:
        plt = _plt()
        fig, ax = plt.subplots(figsize=(7, 3.2))
        names = [s.name for s in pairs]
        ax.bar(names, [max(s.result.rows_in, 0.8) for s in pairs], color="#c8d6e5", label="in")
        ax.bar(names, [max(s.result.rows_out, 0.8) for s in pairs], color="#2e86de", label="out")
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.7)
        _readable_log_axes(ax, x=False)
        ax.set_ylabel("rows (image-text pairs, log)")
        ax.set_title("rows in and out of each stage")
        ax.legend()
        out.append(plots.save(fig, "funnel.png", "rows in and out of each stage"))
        queries = next((s for s in done if s.name == "queries"), None)
        if queries:
            out.append(f"<p class='note'>queries stage: {queries.result.rows_out:,} queries (not on the row axis)</p>")
    if done:
        plt = _plt()
        fig, ax = plt.subplots(figsize=(7, 0.5 + 0.35 * len(done)))
        ax.barh([s.name for s in done][::-1], [s.result.seconds for s in done][::-1], color="#10ac84")
        ax.set_xlabel("seconds")
        ax.set_title("time per stage")
        out.append(plots.save(fig, "stage_seconds.png", "time per stage"))
    return out


def _safety_section(con: Any, have: set[str], states: list) -> list[str]:
    counted = [
        (s.name, k, v)
        for s in states
        if s.result
        for k, v in sorted(s.result.dropped.items())
        if k.startswith(SAFETY_PREFIX) and v
    ]
    out = ["<h2>Removed for safety</h2>"]
    if counted:
        out.append(_table(["stage", "reason", "samples (stage summary)"], counted, {2}))
    rows = []
    if "dropped" in have:
        rows = con.sql(
            "SELECT stage, reason, count(*) FROM dropped WHERE starts_with(reason, ?) GROUP BY ALL ORDER BY 3 DESC, 2",
            params=[SAFETY_PREFIX],
        ).fetchall()
        if rows:
            out.append(
                "<p>rows of the <code>dropped</code> view:</p>" + _table(["stage", "reason", "samples"], rows, {2})
            )
    if not counted and not rows:
        out.append("<p>none</p>")
    return out


def _curve_points(counts: list[int]) -> tuple[list[int], list[int]]:
    """(ranks, counts) of a descending count list at log-spaced ranks (at most CURVE_POINTS)."""
    import numpy as np

    n = len(counts)
    idx = np.unique(np.geomspace(1, n, min(n, CURVE_POINTS)).astype(int)) - 1
    return [int(i) + 1 for i in idx], [max(counts[i], 0.8) for i in idx]


def _queries_section(con: Any, have: set[str], plots: Plots) -> list[str]:
    series: list[tuple[str, str]] = []
    if "query_counts" in have:
        series += [
            ("captions containing it (before balancing)", "SELECT query_id, containing AS n FROM query_counts"),
            ("selected (after balancing)", "SELECT query_id, attributed AS n FROM query_counts"),
        ]
    elif "selected" in have:
        series.append(("selected (after balancing)", "SELECT query_id, count(*) AS n FROM selected GROUP BY 1"))
    if "kept" in have:
        series.append(("kept by the filter", "SELECT query_id, count(*) AS n FROM kept GROUP BY 1"))
    if "shards" in have:
        series.append(("in the shards (after the final trim)", "SELECT query_id, count(*) AS n FROM shards GROUP BY 1"))
    if not series:
        return []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    drawn = 0
    for label, sql in series:
        counts = [r[0] for r in con.sql(f"SELECT n FROM ({sql}) WHERE n > 0 ORDER BY n DESC").fetchall()]
        if counts:
            ranks, ys = _curve_points(counts)
            ax.plot(
                ranks,
                ys,
                marker="o" if len(ranks) < 30 else None,
                markersize=4,
                label=f"{label}: {len(counts):,} quer{'y' if len(counts) == 1 else 'ies'}",
            )
            drawn += 1
    out = ["<h2>Queries</h2>"]
    if drawn:
        ax.set_xscale("log")
        ax.set_yscale("log")
        _readable_log_axes(ax)
        ax.set_xlabel("query rank (by count, log)")
        ax.set_ylabel("pairs (log)")
        ax.set_title("pairs per query, sorted: head capped, tail kept")
        ax.legend(fontsize=8)
        out.append(plots.save(fig, "query_balance.png", "pairs per query, sorted by count"))
    else:
        _plt().close(fig)
        out.append("<p>no query has any pair</p>")
    joined = _per_query_sql(have, series)
    if joined:
        cols = ["query_id", "query"] + [label for label, _ in series]
        num = set(range(2, len(cols)))
        top = con.sql(f"{joined} ORDER BY c0 DESC NULLS LAST, query_id LIMIT {TABLE_ROWS}").fetchall()
        bottom = con.sql(f"{joined} WHERE c0 > 0 ORDER BY c0 ASC, query_id LIMIT {TABLE_ROWS}").fetchall()
        out += [f"<h3>Head: the {TABLE_ROWS} largest queries</h3>", _table(cols, top, num)]
        out += [f"<h3>Tail: the {TABLE_ROWS} smallest queries with any pair</h3>", _table(cols, bottom, num)]
    return out


def _per_query_sql(have: set[str], series: list[tuple[str, str]]) -> str | None:
    """One row per query with each series' count as c0, c1, ... (query text when known)."""
    if not series:
        return None
    withs = ", ".join(f"s{i} AS ({sql})" for i, (_, sql) in enumerate(series))
    ids = " UNION ".join(f"SELECT query_id FROM s{i}" for i in range(len(series)))
    text = "q.text" if "queries" in have else "NULL"
    join_q = "LEFT JOIN queries q USING (query_id)" if "queries" in have else ""
    cols = ", ".join(f"coalesce(s{i}.n, 0) AS c{i}" for i in range(len(series)))
    joins = " ".join(f"LEFT JOIN s{i} USING (query_id)" for i in range(len(series)))
    inner = f"SELECT query_id, {text} AS query, {cols} FROM ids {joins} {join_q}"
    return f"WITH {withs}, ids AS ({ids}) SELECT * FROM ({inner})"


_DOMAIN = "lower(regexp_extract(url, '^[A-Za-z][A-Za-z0-9+.-]*://(?:[^/@?#]*@)?([^/:?#]+)', 1))"


def _downloads_section(con: Any, have: set[str], plots: Plots) -> list[str]:
    if "samples" not in have:
        return []
    out = ["<h2>Downloads</h2>"]
    status = con.sql("SELECT status, count(*) n FROM samples GROUP BY 1 ORDER BY n DESC").fetchall()
    out.append(_table(["status", "samples"], status, {1}))
    errors = con.sql(
        "SELECT coalesce(error, '(none)') AS error, count(*) n, round(100.0 * count(*) / sum(count(*)) OVER (), 1) "
        f"FROM samples WHERE status <> 'success' GROUP BY 1 ORDER BY n DESC, 1 LIMIT {TABLE_ROWS * 2}"
    ).fetchall()
    out.append(
        "<h3>Error types</h3>"
        + (_table(["error", "samples", "% of failures"], errors, {1, 2}) if errors else "<p>none</p>")
    )
    domains = con.sql(
        f"SELECT coalesce(nullif({_DOMAIN}, ''), '(no host)') AS domain, count(*) n, "
        "count(*) FILTER (WHERE status <> 'success') AS failed, "
        "round(100.0 * count(*) FILTER (WHERE status <> 'success') / count(*), 1) "
        f"FROM samples GROUP BY 1 ORDER BY n DESC, 1 LIMIT {TABLE_ROWS}"
    ).fetchall()
    out.append("<h3>Top domains</h3>" + _table(["domain", "samples", "failed", "failure rate %"], domains, {1, 2, 3}))
    ok = "(SELECT * FROM samples WHERE status = 'success') t"
    widths = log_histogram(con, "original_width", ok)
    heights = log_histogram(con, "original_height", ok)
    if widths or heights:
        out.append("<h3>Image sizes (original, before resizing)</h3>")
        out.append(
            _hist_plot(
                plots,
                [("width", widths), ("height", heights)],
                "original image width and height",
                "pixels",
                "widths.png",
            )
        )
        aspect = log_histogram(con, "CAST(original_width AS DOUBLE) / original_height", ok)
        out.append(
            _hist_plot(
                plots, [("width / height", aspect)], "aspect ratio (width / height)", "width / height", "aspect.png"
            )
        )
        q = con.sql(
            "SELECT quantile_cont(original_width, [0.01, 0.5, 0.99]), max(original_width), "
            "quantile_cont(original_height, [0.01, 0.5, 0.99]), max(original_height) FROM samples "
            "WHERE status = 'success' AND original_width > 0"
        ).fetchall()[0]
        rows = [("width", *[round(v) for v in q[0]], q[1]), ("height", *[round(v) for v in q[2]], q[3])]
        out.append(_table(["", "p1", "median", "p99", "max"], rows, {1, 2, 3, 4}))
    return out


def _filter_section(con: Any, have: set[str]) -> list[str]:
    if "filtered" not in have:
        return []
    drops = con.sql(
        "SELECT coalesce(drop_reason, '(kept)') r, count(*) n FROM filtered GROUP BY 1 ORDER BY n DESC, 1"
    ).fetchall()
    out = ["<h2>Filter</h2>", _table(["drop reason", "samples"], drops, {1})]
    cols = {r[0] for r in con.sql("DESCRIBE filtered").fetchall()}
    langs = []
    if "lang" in cols:
        langs = con.sql(
            "SELECT lang, count(*) n FROM filtered WHERE lang IS NOT NULL "
            f"GROUP BY 1 ORDER BY n DESC, 1 LIMIT {TABLE_ROWS}"
        ).fetchall()
    out.append("<h3>Caption languages</h3>")
    if langs:
        out.append(_table(["language", "samples"], langs, {1}))
    elif "lang" in cols:
        out.append("<p class='note'>none recorded: the filter's language check was off in this run</p>")
    else:
        out.append("<p class='note'>not recorded in this run</p>")
    return out


def _captions_section(con: Any, have: set[str], plots: Plots) -> list[str]:
    if "shards" not in have:
        return []
    bins = log_histogram(con, "length(caption)", "shards")
    if not bins:
        return []
    return [
        "<h2>Captions</h2>",
        _hist_plot(plots, [("characters", bins)], "caption length in the final shards", "characters", "captions.png"),
    ]
