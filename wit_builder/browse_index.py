"""The browser's index of a run: a DuckDB database file in a local cache, built once per state of
the run and reused by every later `wit-build serve` of it.

It holds `browse` (a row per download attempt with its fate; see wit_builder/browse.py), `keys`
(key -> query_id in key order), `qtext` (query texts), `qstats` (one row per query) and `meta`.
The file is named after the run's path and a fingerprint of the files the index is made from
(the name, size and modification time or ETag of every file in download/, filtered/,
shards/metadata/, shards/, selected/ and queries/, and the contents of their `_SUCCESS.json`),
so a stage that finishes, reruns or writes another file makes a new index and the old one is
deleted. It lives under `cache_dir` (default `$XDG_CACHE_HOME/wit-builder/serve`, i.e.
`~/.cache/wit-builder/serve`), never in the run directory, which may be read-only or on an
object store.

The build streams: DuckDB runs it under `memory_limit` and spills its joins and sort to a temp
directory beside the cache file instead of growing, and writes a temporary file that is renamed
into place only when complete (a build killed midway leaves no index that looks finished; its
leftovers are removed by the next build of that run).

The cache keeps itself tidy (`tidy_cache`, on every open or build): beside a run's indexes lies
`<run hash>.json` naming the run and when it was last served; the indexes of a local run whose
directory is gone are deleted, and then, while the cache's indexes add up to more than
`max_bytes` (`wit-build serve --cache-max-gb`, default 10), the least recently served go first,
never the one being served. `clear_cache` empties it (`wit-build serve --clear-cache`). The
temporary files of a build still running (its pid in their names) are never touched; an index
another server has open may be deleted, which that server survives (it holds the file open) and
its next start rebuilds.

Example:
    >>> path, built = ensure_index("runs/demo", log=print)            # doctest: +SKIP
    indexing 1,204 sample rows of runs/demo into ~/.cache/wit-builder/serve/3f...duckdb
    ...
    >>> ensure_index("runs/demo")                                    # doctest: +SKIP
    ('/root/.cache/wit-builder/serve/3f2a...-91bc....duckdb', False)
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from wit_builder import io
from wit_builder.config import ConfigError

# bump when the tables' layout or meaning changes: every older index is then rebuilt
INDEX_VERSION = 1
DEFAULT_MEMORY_LIMIT = "1GB"
# the run's folders whose files the index is made from (catalog.VIEWS' samples, filtered,
# shards, query_counts, queries; shards/_SUCCESS.json for why a sample is missing)
FINGERPRINT_FOLDERS = ("download", "filtered", "shards/metadata", "shards", "selected", "queries")
SUCCESS = "_SUCCESS.json"
DEFAULT_CACHE_MAX_GB = 10.0  # a 10M-sample run's index is ~0.7 GB (benchmarks/RESULTS.md)
DEFAULT_CACHE_MAX_BYTES = int(DEFAULT_CACHE_MAX_GB * 1e9)
# the cache's own files: <run hash>-<fingerprint>.duckdb (an index), <run hash>.json (its run),
# each maybe followed by a build's `.tmp-<pid>-<id>...`; anything else in the dir is left alone
CACHE_NAME = re.compile(r"(?P<run>[0-9a-f]{16})(?:-[0-9a-f]{24}\.duckdb|\.json)(?P<rest>.*)", re.DOTALL)


def default_cache_dir() -> str:
    """`$XDG_CACHE_HOME/wit-builder/serve`, or `~/.cache/wit-builder/serve`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "wit-builder", "serve")


def resolve_cache_dir(cache_dir: str | None = None) -> str:
    """The cache directory as an absolute path (`default_cache_dir()` when None; `~` expanded)."""
    return os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))


def run_id(run_dir: str) -> str:
    """The run as the cache names it: an absolute local path, or the URL as given.

    >>> run_id("s3://bucket/r1/")
    's3://bucket/r1'
    """
    if io.is_local(run_dir):
        return os.path.realpath(run_dir.removeprefix("file://"))
    return run_dir.rstrip("/")


def fingerprint(run_dir: str) -> str:
    """A hash of what the index is made from: one listing per folder of FINGERPRINT_FOLDERS
    (name, size, mtime or ETag of each file) and the contents of each `_SUCCESS.json`."""
    import duckdb

    fs, root = io.filesystem(run_dir)
    h = hashlib.sha256(f"{INDEX_VERSION}\0{duckdb.__version__}\0{run_id(run_dir)}".encode())
    for folder in FINGERPRINT_FOLDERS:
        try:
            entries = fs.ls(f"{root.rstrip('/')}/{folder}", detail=True)
        except (FileNotFoundError, NotADirectoryError):
            entries = []
        for e in sorted((e for e in entries if e.get("type") == "file"), key=lambda e: e["name"]):
            name = e["name"].rstrip("/").rsplit("/", 1)[-1]
            stamp = e.get("mtime") or e.get("LastModified") or e.get("ETag") or e.get("etag") or ""
            h.update(f"\0{folder}/{name}\0{e.get('size')}\0{stamp}".encode())
            if name == SUCCESS:
                with fs.open(e["name"], "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


def _run_prefix(run_dir: str) -> str:
    return hashlib.sha256(run_id(run_dir).encode()).hexdigest()[:16]


def index_path(run_dir: str, cache_dir: str | None = None) -> str:
    """Where the index of the run as it is now lies (or will): CACHE/<run hash>-<fingerprint>.duckdb."""
    cache_dir = resolve_cache_dir(cache_dir)
    return os.path.join(cache_dir, f"{_run_prefix(run_dir)}-{fingerprint(run_dir)[:24]}.duckdb")


def ensure_index(
    run_dir: str,
    cache_dir: str | None = None,
    memory_limit: str = DEFAULT_MEMORY_LIMIT,
    log: Callable[[str], None] | None = None,
    cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES,
) -> tuple[str, bool]:
    """(path of the run's index, whether it was built now): the cached one when the run has not
    changed since it was built, else a new one (and the run's older indexes are deleted); then
    the cache is tidied (`tidy_cache`) down to `cache_max_bytes`, keeping this index."""
    path = index_path(run_dir, cache_dir)
    if cache_max_bytes < 0:
        raise ConfigError(f"cache-max-gb: must be >= 0, got {cache_max_bytes / 1e9:g}")
    built = not os.path.exists(path)
    if not built:
        if log:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(path)))
            log(f"using the index {path} (built {when}; the run has not changed since)")
    else:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cache-dir: cannot create {os.path.dirname(path)}: {e.strerror or e}") from None
        build_index(run_dir, path, memory_limit=memory_limit, log=log)
        _remove_older(path)
    with contextlib.suppress(OSError):  # a cache that cannot be written to still serves what it holds
        _note_use(path, run_dir)
    tidied = tidy_cache(os.path.dirname(path), cache_max_bytes, keep=path)
    if log and tidied.removed:
        log(tidied.describe(os.path.dirname(path), cache_max_bytes))
    return path, built


def _remove_older(path: str) -> None:
    """Delete the run's other indexes (older states of it) and the leftovers of dead builds."""
    prefix = os.path.basename(path).split("-", 1)[0]
    for other in glob.glob(os.path.join(glob.escape(os.path.dirname(path)), prefix + "-*")):
        if other == path:
            continue
        pid = _builder_pid(other)
        if other.endswith(".duckdb") or (pid is not None and not _alive(pid)):
            _remove_path(other)


def _builder_pid(name: str) -> int | None:
    """The pid in a build's temporary name (`<index>.tmp-<pid>-<id>...`), else None."""
    if ".tmp-" not in name:
        return None
    try:
        return int(name.rsplit(".tmp-", 1)[1].split("-", 1)[0])
    except ValueError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- keeping the cache tidy ----------------------------------------------------------------


def _run_file(cache_dir: str, run_hash: str) -> str:
    return os.path.join(cache_dir, f"{run_hash}.json")


def _note_use(path: str, run_dir: str) -> None:
    """Write `<run hash>.json` beside the index `path`: the run's id and now as its last use
    (written through a temporary file, so a reader never sees half of it)."""
    target = _run_file(os.path.dirname(path), os.path.basename(path)[:16])
    _write_run_file(target, {"run": run_id(run_dir), "used": time.time()})


def _write_run_file(target: str, info: dict[str, Any]) -> None:
    tmp = f"{target}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.replace(tmp, target)


def _read_run_file(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            info = json.load(f)
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _indexed_run(index: str) -> str | None:
    """The run an index was built from, read from its `meta` table (for an index older than
    the `<run hash>.json` files); None when it cannot be read."""
    import duckdb

    try:
        with duckdb.connect() as con:
            con.execute(f"ATTACH '{_sql_str(index)}' AS bx (READ_ONLY)")
            return json.loads(con.execute("SELECT json FROM bx.meta").fetchall()[0][0])["run_dir"]
    except (duckdb.Error, ValueError, KeyError, IndexError, TypeError):
        return None


def _run_is_gone(run: str | None) -> bool:
    """A local run (an absolute path) whose directory no longer exists.

    Runs on an object store are never reported gone: knowing would cost a request per cached
    run (credentials, an endpoint that may be slow or unreachable offline) on every start of
    `serve`, which otherwise opens a cached index in well under a second; their indexes stay
    until the size bound evicts them, least recently served first."""
    return run is not None and os.path.isabs(run) and not os.path.isdir(run)


@dataclass
class Tidied:
    """What `tidy_cache` or `clear_cache` removed, and the finished indexes' bytes kept."""

    gone_runs: int = 0  # indexes of deleted local runs
    evicted: int = 0  # indexes over the size bound (or cleared)
    other: int = 0  # run files and dead builds' leftovers
    freed: int = 0  # bytes
    kept_bytes: int = 0

    @property
    def removed(self) -> int:
        return self.gone_runs + self.evicted + self.other

    def describe(self, cache_dir: str, max_bytes: int) -> str:
        """One line for the log.

        >>> Tidied(gone_runs=2, other=1, freed=3_000_000, kept_bytes=9_000_000_000).describe("/c", 10**10)
        'cache /c: removed 2 index(es) of deleted runs, 1 leftover file(s) (3 MB freed; 9,000 MB kept)'
        """
        parts = []
        if self.gone_runs:
            parts.append(f"{self.gone_runs} index(es) of deleted runs")
        if self.evicted:
            parts.append(f"{self.evicted} least recently served over the {max_bytes / 1e9:g} GB bound")
        if self.other:
            parts.append(f"{self.other} leftover file(s)")
        return (
            f"cache {cache_dir}: removed {', '.join(parts)} "
            f"({self.freed / 1e6:,.0f} MB freed; {self.kept_bytes / 1e6:,.0f} MB kept)"
        )


@dataclass
class _Entry:
    path: str
    run_hash: str
    kind: str  # "index", "run", "live" (a running build's), "dead" (a dead build's)
    size: int = 0


def _entries(cache_dir: str) -> list[_Entry]:
    """The cache's own files (CACHE_NAME), each with its kind and size; others are not listed."""
    out = []
    try:
        names = os.listdir(cache_dir)
    except FileNotFoundError:
        return []  # (other errors: the caller's)
    for name in names:
        m = CACHE_NAME.fullmatch(name)
        if m is None:
            continue
        path = os.path.join(cache_dir, name)
        rest, kind = m["rest"], "run" if name[16:].startswith(".json") else "index"
        if rest:
            pid = _builder_pid(name)
            if pid is None:
                continue
            kind = "live" if _alive(pid) else "dead"
        try:
            size = _size(path)
        except OSError:  # removed meanwhile
            continue
        out.append(_Entry(path, m["run"], kind, size))
    return out


def _size(path: str) -> int:
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _remove_path(path: str) -> bool:
    """Delete a cache file or a build's temp directory; whether it is gone now (also when another
    process removed it first)."""
    with contextlib.suppress(OSError):
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return not os.path.lexists(path)


def tidy_cache(cache_dir: str, max_bytes: int, keep: str | None = None) -> Tidied:
    """Remove from `cache_dir` the indexes of local runs whose directory is gone, then the least
    recently served indexes while the indexes add up to more than `max_bytes`, and the run files
    and dead builds' leftovers nothing needs any more. Never `keep` (the index being served) nor
    a running build's files. Which run an index belongs to comes from its `<run hash>.json` (or,
    for an index written before those, from its `meta` table, and the file is written then).

    >>> import tempfile
    >>> tidy_cache(tempfile.mkdtemp(), max_bytes=0).removed
    0
    """
    try:
        entries = _entries(cache_dir)
    except OSError:  # an unreadable cache is left as it is
        return Tidied()
    runs: dict[str, dict[str, Any]] = {}
    for e in entries:
        if e.kind == "run":
            runs[e.run_hash] = _read_run_file(e.path)
    for e in entries:
        if e.kind == "index" and "run" not in runs.get(e.run_hash, {}):
            run = _indexed_run(e.path)
            runs[e.run_hash] = {"run": run, "used": os.path.getmtime(e.path)}
            if run is not None and not _run_is_gone(run):  # (a gone run's index goes below)
                with contextlib.suppress(OSError):
                    _write_run_file(_run_file(cache_dir, e.run_hash), runs[e.run_hash])
    keep_hash = os.path.basename(keep)[:16] if keep else None
    done = Tidied()
    left: list[_Entry] = []
    for e in entries:
        if e.kind == "dead":
            if _remove_path(e.path):
                done.other, done.freed = done.other + 1, done.freed + e.size
        elif e.kind == "index" and e.path != keep and _run_is_gone(runs.get(e.run_hash, {}).get("run")):
            if _remove_path(e.path):
                done.gone_runs, done.freed = done.gone_runs + 1, done.freed + e.size
        else:
            left.append(e)
    indexes = [e for e in left if e.kind == "index"]
    total = sum(e.size for e in indexes)

    def last_used(e: _Entry) -> tuple[float, float]:
        used = runs.get(e.run_hash, {}).get("used")
        mtime = os.path.getmtime(e.path) if os.path.exists(e.path) else 0.0
        return (used if isinstance(used, int | float) else mtime, mtime)

    for e in sorted((e for e in indexes if e.path != keep), key=last_used):
        if total <= max_bytes:
            break
        if _remove_path(e.path):
            done.evicted, done.freed = done.evicted + 1, done.freed + e.size
            total -= e.size
            left.remove(e)
    needed = {e.run_hash for e in left if e.kind in ("index", "live")} | {keep_hash}
    for e in left:
        if e.kind == "run" and e.run_hash not in needed and _remove_path(e.path):
            done.other, done.freed = done.other + 1, done.freed + e.size
    done.kept_bytes = total
    return done


def clear_cache(cache_dir: str | None = None) -> Tidied:
    """Empty the cache: every index and run file, and dead builds' leftovers; a running build's
    files stay (it finishes and is used). Servers running on a deleted index keep it open.

    >>> import tempfile
    >>> clear_cache(tempfile.mkdtemp()).removed
    0
    """
    cache_dir = resolve_cache_dir(cache_dir)
    done = Tidied()
    try:
        entries = _entries(cache_dir)
    except OSError as e:
        raise ConfigError(f"cache-dir: cannot read {cache_dir}: {e.strerror or e}") from None
    for e in entries:
        if e.kind == "live" or not _remove_path(e.path):
            continue
        if e.kind == "index":
            done.evicted += 1
        else:
            done.other += 1
        done.freed += e.size
    return done


def _sql_str(s: str) -> str:
    return s.replace("'", "''")


def set_memory_limit(con: Any, memory_limit: str) -> None:
    """`SET memory_limit` on `con`; a ConfigError naming --memory-limit when DuckDB refuses it:
    not a size, or below what the connection already holds (DuckDB cannot free enough)."""
    import duckdb

    try:
        con.execute(f"SET memory_limit = '{_sql_str(memory_limit)}'")
    except duckdb.OutOfMemoryException as e:
        raise ConfigError(
            f"memory-limit: {memory_limit!r} is below what DuckDB already holds (raise --memory-limit): "
            + str(e).splitlines()[0]
        ) from None
    except duckdb.Error as e:
        raise ConfigError(f"memory-limit: {memory_limit!r} is not a DuckDB memory size (e.g. 1GB): {e}") from None


def build_index(
    run_dir: str, path: str, memory_limit: str = DEFAULT_MEMORY_LIMIT, log: Callable[[str], None] | None = None
) -> None:
    """Write the run's index to `path` (through a temporary file renamed into place), reading the
    run's views once, under DuckDB's `memory_limit` with spilling to a temp directory."""
    import duckdb

    from wit_builder.catalog import connect

    say = log or (lambda _msg: None)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    spill = tmp + ".spill"
    con = connect(run_dir, unsafe=True)  # only this function's own SQL runs on it
    try:
        set_memory_limit(con, memory_limit)
        started = time.monotonic()
        try:
            has_samples, has_lang = _build_tables(con, run_dir, path, tmp, spill, memory_limit, say)
        except duckdb.OutOfMemoryException as e:
            raise ConfigError(
                f"memory-limit: indexing the run needs more than {memory_limit} (raise --memory-limit): "
                + str(e).splitlines()[0]
            ) from None
        meta = {"run_dir": run_id(run_dir), "has_samples": has_samples, "has_lang": has_lang, "version": INDEX_VERSION}
        con.execute("CREATE TABLE bx.meta AS SELECT ? AS json", [json.dumps(meta)])
        con.execute("DETACH bx")
        con.close()
        os.replace(tmp, path)
        say(f"done in {time.monotonic() - started:.1f} s ({os.path.getsize(path) / 2**20:.0f} MiB)")
    finally:
        con.close()
        for leftover in (tmp, tmp + ".wal"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(leftover)
        shutil.rmtree(spill, ignore_errors=True)


def _build_tables(
    con: Any, run_dir: str, path: str, tmp: str, spill: str, memory_limit: str, say: Callable[[str], None]
) -> tuple[bool, bool]:
    """Attach `tmp` as bx and write the tables into it; returns (has_samples, has_lang)."""
    con.execute(f"SET temp_directory = '{_sql_str(spill)}'")
    con.execute("SET preserve_insertion_order = false")  # lets DuckDB stream where order does not matter
    # DuckDB's own progress bar for the long steps, on a terminal only (not in logs)
    con.execute(f"SET enable_progress_bar = {str(sys.stdout.isatty()).lower()}")
    con.execute(f"ATTACH '{_sql_str(tmp)}' AS bx")
    views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    views |= {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE NOT internal").fetchall()}
    has_samples = "samples" in views
    has_lang = False
    if has_samples:
        n = con.execute("SELECT count(*) FROM samples").fetchall()[0][0]
        say(f"indexing {n:,} sample rows of {run_dir} into {path} (memory limit {memory_limit}) ...")
        has_lang = _build_browse(con, run_dir, views, say)
    else:
        say(f"indexing {run_dir} (no download results yet) ...")
    _step(say, "per-query table", lambda: _build_query_tables(con, views, has_samples))
    return has_samples, has_lang


def _step(say: Callable[[str], None], what: str, fn: Callable[[], Any]) -> Any:
    t = time.monotonic()
    out = fn()
    say(f"  {what}: {time.monotonic() - t:.1f} s")
    return out


def _columns(con: Any, view: str) -> set[str]:
    return {r[0] for r in con.execute(f"DESCRIBE {view}").fetchall()}


def _build_browse(con: Any, run_dir: str, views: set[str], say: Callable[[str], None]) -> bool:
    """bx.browse (ordered by query_id, key: a query's rows lie together, so a filter by query
    reads few row groups) and bx.keys; returns whether the filter recorded a language."""
    has_filter = "filtered" in views
    has_shards = "shards" in views
    has_lang = has_filter and "lang" in _columns(con, "filtered")
    lang = "f.lang" if has_lang else "NULL::VARCHAR"
    f_cols = "key, drop_reason" + (", lang" if has_lang else "")
    f_join = f"LEFT JOIN (SELECT {f_cols} FROM filtered) f ON f.key = s.key" if has_filter else ""
    s_join = "LEFT JOIN (SELECT key, tar FROM shards) sh ON sh.key = s.key" if has_shards else ""
    missing = has_shards and "dropped" in views and bool(_shards_dropped(run_dir).get("missing_image"))
    # the catalog's `dropped` view tells a trimmed sample from one whose image was missing
    m_join = (
        "LEFT JOIN (SELECT key, reason FROM dropped WHERE stage = 'shards' AND reason <> 'trimmed_over_cap') m "
        "ON m.key = s.key"
        if missing
        else ""
    )
    status = f"""CASE
        WHEN s.status <> 'success' THEN 'failed'
        WHEN {"f.key IS NULL" if has_filter else "TRUE"} THEN 'downloaded'
        WHEN f.drop_reason IS NOT NULL THEN 'dropped'
        WHEN {"sh.key IS NOT NULL" if has_shards else "FALSE"} THEN 'kept'
        WHEN {"m.key IS NOT NULL" if missing else "FALSE"} THEN 'missing_image'
        WHEN {"TRUE" if has_shards else "FALSE"} THEN 'trimmed'
        ELSE 'passed_filter' END"""
    _step(
        say,
        "samples joined with their filter and shard rows, sorted by query",
        lambda: con.execute(f"""
        CREATE TABLE bx.browse AS
        SELECT key, uid, shard, tar, query_id, rank, status,
               CASE status WHEN 'failed' THEN 'download' WHEN 'dropped' THEN 'filter'
                           WHEN 'trimmed' THEN 'shards' WHEN 'missing_image' THEN 'shards' END AS stage,
               CASE status WHEN 'failed' THEN coalesce(error, 'failed') WHEN 'dropped' THEN drop_reason
                           WHEN 'trimmed' THEN 'trimmed_over_cap' WHEN 'missing_image' THEN missing_reason END
                 AS reason,
               lang, width, height, original_width, original_height, bytes, url, caption
        FROM (
            SELECT s.key, s.uid, s.shard, {"sh.tar" if has_shards else "NULL::VARCHAR"} AS tar,
                   s.query_id, s.rank, s.error, {"f.drop_reason" if has_filter else "NULL::VARCHAR"} AS drop_reason,
                   {"m.reason" if missing else "NULL::VARCHAR"} AS missing_reason,
                   {lang} AS lang, s.width, s.height, s.original_width, s.original_height, s.bytes,
                   s.url, s.caption, {status} AS status
            FROM samples s
            {f_join}
            {s_join}
            {m_join}
        )
        ORDER BY query_id, key
    """).fetchall(),
    )
    # key -> query_id, in key order: a one-sample lookup reads one row group of it, then one
    # query's rows of `browse` (zonemaps), instead of scanning every key
    _step(
        say,
        "key lookup table",
        lambda: con.execute("CREATE TABLE bx.keys AS SELECT key, query_id FROM bx.browse ORDER BY key").fetchall(),
    )
    return has_lang


def _shards_dropped(run_dir: str) -> dict[str, int]:
    success = io.join(run_dir, "shards", SUCCESS)
    return io.read_json(success).get("result", {}).get("dropped", {}) if io.exists(success) else {}


def _build_query_tables(con: Any, views: set[str], has_samples: bool) -> None:
    """bx.qtext (query_id -> text) and bx.qstats: one row per query with its containing and
    attributed counts (balance: before and after the cap) and its samples' fates; the
    distribution pages sort this small table instead of grouping every sample per request."""
    if "queries" in views:
        con.execute("CREATE TABLE bx.qtext AS SELECT query_id, text FROM queries")
    elif has_samples:
        con.execute("CREATE TABLE bx.qtext AS SELECT query_id, any_value(query_text) AS text FROM samples GROUP BY 1")
    else:
        con.execute("CREATE TABLE bx.qtext (query_id INTEGER, text VARCHAR)")
    per_sample = (
        """SELECT query_id, count(*) AS attempted,
                  count(*) FILTER (WHERE status <> 'failed') AS downloaded,
                  count(*) FILTER (WHERE status IN ('kept', 'trimmed', 'missing_image', 'passed_filter'))
                    AS passed,
                  count(*) FILTER (WHERE status = 'kept') AS kept
           FROM bx.browse GROUP BY 1"""
        if has_samples
        else "SELECT NULL::INT query_id, 0 attempted, 0 downloaded, 0 passed, 0 kept WHERE FALSE"
    )
    counts = (
        "SELECT query_id, containing, attributed FROM query_counts"
        if "query_counts" in views
        else "SELECT NULL::INT query_id, NULL::BIGINT containing, NULL::BIGINT attributed WHERE FALSE"
    )
    con.execute(f"""
        CREATE TABLE bx.qstats AS
        SELECT d.*, t.text FROM (
            SELECT coalesce(c.query_id, s.query_id) AS query_id, c.containing, c.attributed,
                   coalesce(s.attempted, 0) attempted, coalesce(s.downloaded, 0) downloaded,
                   coalesce(s.passed, 0) passed, coalesce(s.kept, 0) kept
            FROM ({counts}) c FULL JOIN ({per_sample}) s ON c.query_id = s.query_id
        ) d LEFT JOIN bx.qtext t USING (query_id)
    """)
