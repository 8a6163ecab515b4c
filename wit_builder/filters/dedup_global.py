"""Exact and near duplicates over a whole run, out of core: DuckDB with a memory limit and a
spill directory does the grouping and the band joins, so memory does not grow with the run.

Same decisions as the in-memory numpy reference (tests/dedup_reference.py, tested equal):
1. exact: per sha256, every sample but the smallest uid is `duplicate_exact` (null sha256:
   unique);
2. near, among the rest: per phash value, every sample but the smallest uid is
   `duplicate_near`; the survivors (one per distinct phash) are compared by the pigeonhole
   trick: split 64 bits into `max_distance + 1` bands, join on equal band values, keep pairs
   within `max_distance` bits; then greedily in uid order a survivor within distance of a kept
   smaller one is `duplicate_near`. Only the pairs reach Python (for the greedy pass), never
   the rows.

uids are the fixed-width lowercase hex of schema.CANDIDATES, so their string order is their
numeric order.

Example:
    >>> import pyarrow as pa, tempfile, os
    >>> d = tempfile.mkdtemp(); p = os.path.join(d, "a.parquet")
    >>> import pyarrow.parquet as pq
    >>> pq.write_table(pa.table({"uid": ["03", "01", "02", "04"], "reason": [None] * 4,
    ...     "sha256": ["a", "a", "b", "c"], "phash": pa.array([15, 15, 14, 4294901760], pa.uint64())}), p)
    >>> sorted(duplicate_marks([p], exact=True, max_distance=1, tmp_dir=d))
    [(0, '02', 'duplicate_near'), (0, '03', 'duplicate_exact')]
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from wit_builder import io
from wit_builder.filters.dedup import bands


def _connect(paths: list[str], memory_limit: str, tmp_dir: str):
    """DuckDB over the feature files as view `f` (file index `fi`, uid, reason, sha256, phash)."""
    import duckdb

    con = duckdb.connect(os.path.join(tmp_dir, "dedup.duckdb"))
    con.execute(f"SET memory_limit = '{memory_limit}'")
    con.execute(f"SET temp_directory = '{_q(os.path.join(tmp_dir, 'spill'))}'")
    con.execute("SET preserve_insertion_order = false")
    if paths and not io.is_local(paths[0]):
        con.register_filesystem(io.filesystem(paths[0])[0])
    con.execute("CREATE TABLE files (fi INTEGER, filename VARCHAR)")
    con.executemany("INSERT INTO files VALUES (?, ?)", [[i, p] for i, p in enumerate(paths)])
    listed = ", ".join(f"'{_q(p)}'" for p in paths)
    con.execute(
        f"CREATE VIEW f AS SELECT files.fi, r.uid, r.reason, r.sha256, r.phash "
        f"FROM read_parquet([{listed}], filename = true) r JOIN files ON files.filename = r.filename"
    )
    return con


def _q(s: str) -> str:
    return s.replace("'", "''")


def duplicate_marks(
    paths: list[str], *, exact: bool, max_distance: int, tmp_dir: str, memory_limit: str = "2GB"
) -> Iterator[tuple[int, str, str]]:
    """(file index, uid, reason) of every duplicate among the rows of `paths` whose `reason` is
    null, sorted by file index then uid. `max_distance < 0` turns near dedup off."""
    if not paths:
        return
    con = _connect(paths, memory_limit, tmp_dir)
    try:
        con.execute("CREATE TABLE cand AS SELECT fi, uid, sha256, phash FROM f WHERE reason IS NULL")
        con.execute("CREATE TABLE marks (fi INTEGER, uid VARCHAR, reason VARCHAR)")
        if exact:
            con.execute("""
                INSERT INTO marks
                SELECT c.fi, c.uid, 'duplicate_exact' FROM cand c
                JOIN (SELECT sha256, min(uid) AS first FROM cand WHERE sha256 IS NOT NULL GROUP BY sha256) g
                  ON c.sha256 = g.sha256 AND c.uid <> g.first
            """)
        if max_distance >= 0:
            _near(con, max_distance)
        cursor = con.execute("SELECT fi, uid, reason FROM marks ORDER BY fi, uid")
        while batch := cursor.fetchmany(65536):
            yield from batch
    finally:
        con.close()
        io.remove(os.path.join(tmp_dir, "dedup.duckdb"))


def _near(con, max_distance: int) -> None:
    con.execute("""
        CREATE TABLE rest AS SELECT c.fi, c.uid, c.phash FROM cand c
        WHERE c.phash IS NOT NULL AND c.uid NOT IN (SELECT uid FROM marks)
    """)
    con.execute("""
        INSERT INTO marks
        SELECT r.fi, r.uid, 'duplicate_near' FROM rest r
        JOIN (SELECT phash, min(uid) AS first FROM rest GROUP BY phash) g
          ON r.phash = g.phash AND r.uid <> g.first
    """)
    if max_distance == 0:
        return
    con.execute("CREATE TABLE reps AS SELECT phash, min(uid) AS uid FROM rest GROUP BY phash")
    joins = []
    for shift, width in bands(max_distance):
        band = f"((phash >> {shift}) & {(1 << width) - 1}::UBIGINT)"
        joins.append(f"""
            SELECT a.uid AS ui, b.uid AS uj
            FROM (SELECT uid, phash, {band} AS k FROM reps) a
            JOIN (SELECT uid, phash, {band} AS k FROM reps) b ON a.k = b.k AND a.uid < b.uid
            WHERE bit_count(xor(a.phash, b.phash)) <= {int(max_distance)}
        """)
    cursor = con.execute(f"SELECT DISTINCT ui, uj FROM ({' UNION ALL '.join(joins)}) ORDER BY uj, ui")
    dropped: set[str] = set()
    while batch := cursor.fetchmany(65536):
        for ui, uj in batch:  # greedy in uid order: drop uj when a kept smaller ui is near it
            if ui not in dropped and uj not in dropped:
                dropped.add(uj)
    if dropped:
        import pyarrow as pa

        con.register("dropped_reps", pa.table({"uid": sorted(dropped)}))
        con.execute("""
            INSERT INTO marks
            SELECT r.fi, r.uid, 'duplicate_near' FROM rest r JOIN dropped_reps d ON r.uid = d.uid
        """)
