"""The browser's data access: pages of samples, filter counts, one sample's full record, the
per-query distribution, and the image bytes of a sample read from its tar by offset.

`Browser(run_dir)` opens the run's index (wit_builder/browse_index.py: a DuckDB file in a
local cache, built on the first serve of the run as it is and reused after), read-only. Its
table `browse` has a row per download attempt (the `samples` view) joined with its filter row
and its final shard row, ordered by (query_id, key):

    status  kept | trimmed | missing_image | dropped | failed | passed_filter | downloaded
    stage   the stage that removed it: download (failed), filter (dropped), shards (trimmed)
    reason  the download error, the filter's drop_reason, "trimmed_over_cap" for a sample the
            shards stage trimmed back to the cap, "missing_image" for one whose image it did
            not find (the same stage and reason as the catalog's `dropped` view)

`passed_filter` means the filter kept it and the shards stage has not run; `downloaded` means
the filter has not run. Beside it: `keys` (key -> query_id in key order, for one-sample
lookups), `qtext` (query texts) and `qstats` (one row per query: containing and attributed
counts from balance, and its samples' fates). Every grid page, count and histogram is a query
over these tables, so the run's parquet files are read once per state of the run, when its index
is built (on an object store too); a sample's page also reads its rows from the one file of each
view that holds it, through the run's catalog (opened on the first sample page). Nothing is
written to the run directory.

Example:
    >>> b = Browser("runs/demo")                                      # doctest: +SKIP
    >>> f = Filters(query_id=3, status="dropped")                    # doctest: +SKIP
    >>> b.count(f), [r["key"] for r in b.page(f, limit=2)]           # doctest: +SKIP
    (4, ['0a1b...', '1c2d...'])
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from wit_builder import io
from wit_builder.browse_index import DEFAULT_CACHE_MAX_BYTES, DEFAULT_MEMORY_LIMIT, ensure_index, set_memory_limit

STATUSES = ("kept", "trimmed", "missing_image", "dropped", "failed", "passed_filter", "downloaded")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# views searched (by key or uid) for a sample's page; candidates and matched can be far larger
# than the selection, so they are only scanned on request (`sample(key, wide=True)`)
SAMPLE_VIEWS = ("selected", "samples", "filtered", "shards")
WIDE_VIEWS = ("dropped", "candidates", "matched")
# views whose rows for one sample all lie in one file, named after the sample's download shard
# (samples, filtered) or final tar (shards): a sample page reads that file, not the whole view
SHARD_FILES = {"samples": "shard", "filtered": "shard", "shards": "tar"}
DISTRIBUTION_ORDERS = {
    "containing": "matched pairs containing the query (before the cap)",
    "attributed": "pairs selected for it (after the cap)",
    "downloaded": "images downloaded",
    "passed": "images the filter kept",
    "kept": "samples in the final shards (after the trim)",
}


@dataclasses.dataclass(frozen=True)
class Filters:
    """What the grid shows; None = no constraint. Sizes are the image's original pixels.

    >>> Filters(query_id=1, status="kept").where()
    ('query_id = ? AND status = ?', [1, 'kept'])
    """

    query_id: int | None = None
    stage: str | None = None
    status: str | None = None
    reason: str | None = None
    lang: str | None = None
    min_width: int | None = None
    max_width: int | None = None
    min_height: int | None = None
    max_height: int | None = None
    text: str | None = None

    def where(self, skip: str = "") -> tuple[str, list[Any]]:
        """SQL condition and its parameters; `skip` names one field to leave out (for facets)."""
        parts: list[str] = []
        params: list[Any] = []
        for name in ("query_id", "stage", "status", "reason", "lang"):
            value = getattr(self, name)
            if value is not None and name != skip:
                parts.append(f"{name} = ?")
                params.append(value)
        for name, column, op in (
            ("min_width", "original_width", ">="),
            ("max_width", "original_width", "<="),
            ("min_height", "original_height", ">="),
            ("max_height", "original_height", "<="),
        ):
            value = getattr(self, name)
            if value is not None and name != skip:
                parts.append(f"{column} {op} ?")
                params.append(value)
        if self.text and skip != "text":
            parts.append("caption ILIKE ? ESCAPE '\\'")
            params.append("%" + _like_escape(self.text) + "%")
        return (" AND ".join(parts) or "TRUE"), params


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class Browser:
    """Read-only queries over one run for the web browser (see the module docstring).

    `cache_dir`, `memory_limit` and `cache_max_bytes` go to `browse_index.ensure_index`; `log`
    gets its progress lines. `built` says whether the index was built now (False: reused from
    the cache)."""

    def __init__(
        self,
        run_dir: str,
        tar_cache: int = 64,
        cache_dir: str | None = None,
        memory_limit: str = DEFAULT_MEMORY_LIMIT,
        log: Callable[[str], None] | None = None,
        cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES,
    ):
        import duckdb

        from wit_builder.config import ConfigError

        if not io.exists(run_dir):
            raise ConfigError(f"run directory not found: {run_dir}")
        self.run_dir = run_dir
        self._lock = threading.Lock()
        self._catalog_lock = threading.Lock()
        self.index_path, self.built = ensure_index(run_dir, cache_dir, memory_limit, log, cache_max_bytes)
        self.db = duckdb.connect()
        set_memory_limit(self.db, memory_limit)
        self.db.execute("ATTACH '" + self.index_path.replace("'", "''") + "' AS bx (READ_ONLY)")
        self.db.execute("SET enable_external_access = false")
        self.db.execute("SET lock_configuration = true")
        meta = json.loads(self.db.execute("SELECT json FROM bx.meta").fetchall()[0][0])
        self.has_samples: bool = meta["has_samples"]
        self.has_lang: bool = meta["has_lang"]
        self._catalog: Any = None  # the run's views, opened on the first sample page
        self._tars = _TarIndex(tar_cache)
        self._files: dict[str, dict[str, str]] = {}  # view -> file stem -> path (listed on first use)

    @property
    def con(self) -> Any:
        """The run's catalog (wit_builder.catalog.connect: read-only views), opened on first use."""
        with self._catalog_lock:
            if self._catalog is None:
                from wit_builder.catalog import connect

                con = connect(self.run_dir)
                names = {
                    r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()
                }
                names |= {
                    r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE NOT internal").fetchall()
                }
                self._views = names
                self._catalog = con
            return self._catalog

    @property
    def views(self) -> set[str]:
        """The run's views (as `wit-build sql` has them)."""
        _ = self.con
        return self._views

    def _columns(self, view: str) -> set[str]:
        return {r[0] for r in self._all(f"DESCRIBE {view}", catalog=True)}

    # ------------------------------------------------------------ SQL helpers

    def _cursor(self, catalog: bool = False) -> Any:
        """A connection of its own (one per call: the web server answers requests in threads) to
        the index or, with `catalog`, to the run's views; made under a lock, as the parent
        connection is not thread-safe."""
        parent = self.con if catalog else self.db
        with self._lock:
            return parent.cursor()

    def _all(self, sql: str, params: list[Any] | None = None, catalog: bool = False) -> list[tuple]:
        cur = self._cursor(catalog)
        try:
            return cur.execute(sql, params or []).fetchall()
        finally:
            cur.close()

    def _dicts(self, sql: str, params: list[Any] | None = None, catalog: bool = False) -> list[dict[str, Any]]:
        cur = self._cursor(catalog)
        try:
            rel = cur.execute(sql, params or [])
            cols = [d[0] for d in rel.description]
            return [dict(zip(cols, r)) for r in rel.fetchall()]
        finally:
            cur.close()

    # ------------------------------------------------------------ the grid

    def page(self, filters: Filters, offset: int = 0, limit: int = 60) -> list[dict[str, Any]]:
        """One page of samples matching `filters`, in (query_id, key) order, with query text."""
        if not self.has_samples:
            return []
        where, params = filters.where()
        return self._dicts(
            f"""SELECT b.*, q.text AS query_text FROM (
                    SELECT * FROM bx.browse WHERE {where} ORDER BY query_id, key LIMIT ? OFFSET ?
                ) b LEFT JOIN bx.qtext q USING (query_id) ORDER BY query_id, key""",
            [*params, int(limit), int(offset)],
        )

    def count(self, filters: Filters) -> int:
        """How many samples match `filters`."""
        if not self.has_samples:
            return 0
        where, params = filters.where()
        return int(self._all(f"SELECT count(*) FROM bx.browse WHERE {where}", params)[0][0])

    def facets(self, filters: Filters) -> dict[str, list[tuple[Any, int]]]:
        """Counts per value of status, stage, reason (and lang) under the other filters, most
        frequent first (each facet ignores its own filter, so every choice shows its count)."""
        if not self.has_samples:
            return {}
        out = {}
        for field in ("status", "stage", "reason") + (("lang",) if self.has_lang else ()):
            where, params = filters.where(skip=field)
            out[field] = [
                (v, int(n))
                for v, n in self._all(
                    f"SELECT {field}, count(*) n FROM bx.browse WHERE {where} AND {field} IS NOT NULL "
                    "GROUP BY 1 ORDER BY n DESC, 1 LIMIT 200",
                    params,
                )
            ]
        return out

    def query_text(self, query_id: int) -> str | None:
        rows = self._all("SELECT text FROM bx.qtext WHERE query_id = ?", [query_id])
        return rows[0][0] if rows else None

    # ------------------------------------------------------------ one sample

    def row(self, key: str) -> dict[str, Any] | None:
        """The sample's row of the browse table (None when no sample has that key)."""
        if not self.has_samples:
            return None
        found = self._all("SELECT query_id FROM bx.keys WHERE key = ? LIMIT 1", [key])
        if not found:
            return None
        rows = self._dicts(
            "SELECT b.*, q.text AS query_text FROM bx.browse b LEFT JOIN bx.qtext q USING (query_id) "
            "WHERE b.query_id = ? AND b.key = ?",
            [found[0][0], key],
        )
        return rows[0] if rows else None

    def sample(self, key: str, wide: bool = False) -> dict[str, Any] | None:
        """Everything known about one sample: `row` (the browse row), `why` (a sentence on what
        happened to it), `views` (its rows in each view of the run, by key or uid; candidates and
        matched only with `wide`) and `queries` (the queries its caption contains)."""
        row = self.row(key)
        if row is None:
            return None
        views: dict[str, list[dict[str, Any]]] = {}
        for view in SAMPLE_VIEWS + (WIDE_VIEWS if wide else ()):
            if view not in self.views:
                continue
            cols = self._columns(view)
            cond = "key = ?" if "key" in cols else "uid = ?" if "uid" in cols else None
            if cond is None:
                continue
            source = self._shard_file(view, row)
            views[view] = self._dicts(
                f"SELECT * FROM {source or view} WHERE {cond} LIMIT 20",
                [key if "key" in cols else row["uid"]],
                catalog=True,
            )
        qids = sorted({row["query_id"]} | {q for r in views.get("samples", []) for q in (r.get("query_ids") or [])})
        queries: list[dict[str, Any]] = []
        if "queries" in self.views and qids:
            marks = ", ".join("?" * len(qids))
            queries = self._dicts(
                f"SELECT * FROM queries WHERE query_id IN ({marks}) ORDER BY query_id", qids, catalog=True
            )
            if "query_counts" in self.views:
                counts = {
                    r["query_id"]: r
                    for r in self._dicts(f"SELECT * FROM query_counts WHERE query_id IN ({marks})", qids, catalog=True)
                }
                for q in queries:
                    c = counts.get(q["query_id"], {})
                    q["containing"], q["attributed"] = c.get("containing"), c.get("attributed")
        return {"row": row, "why": self._why(row), "views": views, "queries": queries}

    def _shard_file(self, view: str, row: dict[str, Any]) -> str | None:
        """`read_parquet('<the one file of view holding row>')`, or None (read the whole view)."""
        from wit_builder.catalog import glob_escape, view_files

        field = SHARD_FILES.get(view)
        if field is None or not row.get(field):
            return None
        if view not in self._files:
            self._files[view] = {f.rsplit("/", 1)[-1].rsplit(".", 1)[0]: f for f in view_files(self.run_dir, view)}
        path = self._files[view].get(row[field].rsplit(".", 1)[0])
        if path is None:
            return None
        if io.is_local(path):
            path = os.path.abspath(path.removeprefix("file://"))
        return "read_parquet('" + glob_escape(path).replace("'", "''") + "')"

    def _why(self, row: dict[str, Any]) -> str:
        status, reason = row["status"], row["reason"]
        if status == "failed":
            return f"The download failed: {reason}."
        if status == "dropped":
            return f"The filter dropped it: {reason}."
        if status == "downloaded":
            return "Downloaded; the filter stage has not run yet."
        if status == "missing_image":
            return "The filter kept it, but the shards stage found no image for it in its download tar."
        if status == "passed_filter":
            return "The filter kept it; the shards stage has not run yet."
        # kept or trimmed: its place in its query's order (rank, uid) among the filter's survivors
        place, total, kept = self._all(
            """SELECT count(*) FILTER (WHERE (rank, uid) < (?, ?)) + 1, count(*),
                      count(*) FILTER (WHERE status = 'kept')
               FROM bx.browse WHERE query_id = ? AND status IN ('kept', 'trimmed')""",
            [row["rank"], row["uid"], row["query_id"]],
        )[0]
        if status == "kept":
            return (
                f"In the final shards ({row['tar']}): number {place} (by balance rank) of the {total} samples of "
                f"its query that passed the filter, of which the first {kept} are kept."
            )
        return (
            f"Trimmed after filtering: number {place} (by balance rank) of the {total} samples of its query "
            f"that passed the filter, and the shards stage keeps the first {kept} (the cap)."
        )

    # ------------------------------------------------------------ the query distribution

    def distribution(
        self, order: str = "containing", tail: bool = False, offset: int = 0, limit: int = 50
    ) -> list[dict[str, Any]]:
        """Per query: containing and attributed counts (balance: before and after the cap) and the
        counts of attempted, downloaded, filter-kept and final samples, ordered by `order` (a key
        of DISTRIBUTION_ORDERS) descending (the head) or, with `tail`, ascending, among the
        queries with at least one such pair."""
        if order not in DISTRIBUTION_ORDERS:
            raise ValueError(f"order must be one of {sorted(DISTRIBUTION_ORDERS)}")
        direction = "ASC" if tail else "DESC"
        return self._dicts(
            f"SELECT * FROM bx.qstats WHERE {order} > 0 ORDER BY {order} {direction}, query_id LIMIT ? OFFSET ?",
            [int(limit), int(offset)],
        )

    def distribution_size(self, order: str = "containing") -> int:
        """How many queries have at least one pair counted by `order`."""
        if order not in DISTRIBUTION_ORDERS:
            raise ValueError(f"order must be one of {sorted(DISTRIBUTION_ORDERS)}")
        return int(self._all(f"SELECT count(*) FROM bx.qstats WHERE {order} > 0")[0][0])

    # ------------------------------------------------------------ images

    def image(self, key: str) -> tuple[bytes, str] | None:
        """(image bytes, extension) of a downloaded sample, read by offset from its download tar,
        or from its final shard tar when the download tar is gone; None when there is none."""
        row = self.row(key)
        if row is None or row["status"] == "failed":
            return None
        tars = [io.join(self.run_dir, "download", f"{row['shard']}.tar")]
        if row.get("tar"):
            tars.append(io.join(self.run_dir, "shards", row["tar"]))
        for tar in tars:
            found = self._tars.find(tar, key)
            if found is not None:
                offset, size, ext = found
                with io.open_file(tar, "rb") as f:
                    f.seek(offset)
                    data = f.read(size)
                if len(data) == size:
                    return data, ext
        return None


class _TarIndex:
    """Where each image member of a tar lies (offset, size, extension), by sample key; the
    indexes of the `capacity` most recently used tars are kept (thread-safe)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._cache: OrderedDict[str, dict[str, tuple[int, int, str]] | None] = OrderedDict()
        self._lock = threading.Lock()

    def find(self, tar: str, key: str) -> tuple[int, int, str] | None:
        with self._lock:
            if tar in self._cache:
                self._cache.move_to_end(tar)
                index = self._cache[tar]
                return None if index is None else index.get(key)
        index = self._scan(tar)
        with self._lock:
            self._cache[tar] = index
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return None if index is None else index.get(key)

    @staticmethod
    def _scan(tar: str) -> dict[str, tuple[int, int, str]] | None:
        from wit_builder import tario

        def is_image(name: str) -> bool:
            return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS

        if not io.exists(tar):
            return None
        index: dict[str, tuple[int, int, str]] = {}
        try:
            for name, offset, size in tario.member_offsets(tar, is_image):
                stem, ext = name.rsplit(".", 1)
                index.setdefault(stem, (offset, size, ext.lower()))
        except tario.TarFormatError:
            pass  # a damaged tar: the members before the damage are still served
        return index
