"""Candidates stage: raw (url, caption) pairs from url lists or WARC/WAT into clean, unique rows.

Two passes on Ray (one task per input file, then one per partition), memory bounded by the
block size and by one partition:
1. read each input file in blocks, drop bad rows by reason, compute
   uid = blake2b-8(url + "\\x1f" + caption), and spill each row to the partition
   `uid mod partitions` (candidates/_spill/f{file}/b{partition}-c{chunk}.parquet);
2. per partition, sort by uid, keep the first row of each uid (input order: file, then row),
   write candidates/part-{partition:05d}.parquet (schema.CANDIDATES + extra columns).

Drop reasons: `undecodable` (url or caption not UTF-8), `missing_url`, `missing_caption`
(null, empty or whitespace only), `bad_scheme` (not http:// or https://, e.g. data:),
`caption_too_long` (> max_caption_chars characters), `bad_row` (a CSV row with the wrong
number of fields, a JSONL line that is not an object), `bad_record` (an unreadable WAT record),
`duplicate` (same uid as an earlier row). For WARC/WAT every <img>/IMG@ link is a raw row.

Parallelism: one Ray task per input file, or per run of row groups (>= `split_rows` rows) of
a big parquet file; then one task per partition. Other formats are read one task per file. Columns are checked before any work from each file's parquet schema, CSV/TSV
header or first JSONL record. Size `partitions` so that one partition (rows / partitions)
fits in a worker's memory (e.g. ~5M rows each).

Example:
    >>> Config(inputs=["urls.parquet"]).url_col
    'url'
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np

from wit_builder import io, schema
from wit_builder.config import ConfigError, path_field
from wit_builder.stages.base import StageContext, StageResult

RESERVED = set(schema.SELECTED.names)
REASONS = ("undecodable", "missing_url", "missing_caption", "bad_scheme", "caption_too_long")


@dataclass(frozen=True)
class Config:
    """`[candidates]` keys.

    inputs: input files, globs or directories (local or fsspec URLs).
    format: "auto" (by extension) | "parquet" | "csv" | "tsv" | "jsonl" | "warc" | "wat".
    url_col, caption_col: column names in url lists (default "url", "caption").
    extra_cols: more url-list columns carried through to the output (names must not clash
      with the pipeline's own columns).
    max_caption_chars: longer captions are dropped as `caption_too_long`.
    partitions: output parts (uid hash partitions); one partition must fit in memory.
    block_rows: rows per block read from an input file.
    split_rows: parquet files with more rows are read by several tasks (runs of row groups).
    """

    inputs: list[str] = path_field([])
    format: str = "auto"
    url_col: str = "url"
    caption_col: str = "caption"
    extra_cols: list[str] = field(default_factory=list)
    max_caption_chars: int = 4096
    partitions: int = 16
    block_rows: int = 65536
    split_rows: int = 2_000_000

    def __post_init__(self) -> None:
        from wit_builder.readers import FORMATS

        if self.format != "auto" and self.format not in FORMATS:
            raise ValueError(f"format must be 'auto' or one of {', '.join(FORMATS)}, got {self.format!r}")
        for name, value in (("max_caption_chars", self.max_caption_chars), ("partitions", self.partitions),
                            ("block_rows", self.block_rows), ("split_rows", self.split_rows)):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        clash = sorted(set(self.extra_cols) & RESERVED)
        if clash:
            raise ValueError(f"extra_cols {clash} clash with the pipeline's own columns")


# ------------------------------------------------------------------------------ row cleaning


def _decode(col) -> tuple["object", np.ndarray]:
    """binary column -> (string array, invalid-UTF-8 mask); nulls stay null."""
    import pyarrow as pa

    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    try:
        return arr.cast(pa.string()), np.zeros(len(arr), dtype=bool)
    except pa.ArrowInvalid:
        values, bad = [], np.zeros(len(arr), dtype=bool)
        for i, b in enumerate(arr.to_pylist()):
            try:
                values.append(None if b is None else b.decode("utf-8"))
            except UnicodeDecodeError:
                values.append(None)
                bad[i] = True
        return pa.array(values, pa.string()), bad


def clean_block(table, max_caption_chars: int) -> tuple["object", dict[str, int]]:
    """Drop bad rows (first failing reason wins, in REASONS order); add `uid`. Returns the
    kept rows (uid, url, caption, page_url, extras) and the dropped counts."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from wit_builder.uid import uids

    url, bad_url = _decode(table.column("url"))
    caption, bad_cap = _decode(table.column("caption"))
    filled = lambda mask: np.asarray(mask.fill_null(True), dtype=bool)  # noqa: E731
    blank_url = filled(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(url)), 0))
    blank_cap = filled(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(caption)), 0))
    good_scheme = np.asarray(pc.match_substring_regex(url, r"^https?://", ignore_case=True).fill_null(False), bool)
    too_long = np.asarray(pc.greater(pc.utf8_length(caption), max_caption_chars).fill_null(False), bool)
    masks = {
        "undecodable": bad_url | bad_cap,
        "missing_url": blank_url,
        "missing_caption": blank_cap,
        "bad_scheme": ~good_scheme,
        "caption_too_long": too_long,
    }
    dropped: dict[str, int] = {}
    gone = np.zeros(table.num_rows, dtype=bool)
    for reason in REASONS:
        hit = masks[reason] & ~gone
        dropped[reason] = int(hit.sum())
        gone |= hit
    keep = pa.array(~gone)
    url, caption = url.filter(keep), caption.filter(keep)
    cols = {
        "uid": pa.array(uids(url.to_pylist(), caption.to_pylist()), pa.string()),
        "url": url,
        "caption": caption,
    }
    for name in table.column_names:
        if name not in ("url", "caption"):
            cols[name] = table.column(name).filter(keep)
    return pa.table(cols), dropped


# -------------------------------------------------------------------------- pass 1: spill


def _partition_of(uid_col, partitions: int) -> np.ndarray:
    from wit_builder.balancing import uids_to_u64

    return (uids_to_u64(uid_col) % np.uint64(partitions)).astype(np.int64)


@dataclass(frozen=True)
class ReadTask:
    """One unit of pass 1: a whole input file, or a run of row groups of a big parquet file."""

    file_index: int
    piece: int
    path: str
    fmt: str
    row_groups: list[int] | None = None  # None: the whole file
    first_row: int = 0  # the piece's first row in the file (keeps "first occurrence" global)


def read_tasks(plan: list[tuple[str, str]], split_rows: int) -> list[ReadTask]:
    """Split parquet files with more than `split_rows` rows into runs of row groups."""
    from wit_builder.readers.tabular import parquet_row_groups

    tasks = []
    for index, (path, fmt) in enumerate(plan):
        sizes = parquet_row_groups(path) if fmt == "parquet" else []
        if sum(sizes) <= split_rows:
            tasks.append(ReadTask(index, 0, path, fmt))
            continue
        group, rows, first, piece = [], 0, 0, 0
        for rg, n in enumerate(sizes):
            group.append(rg)
            rows += n
            if rows >= split_rows or rg == len(sizes) - 1:
                tasks.append(ReadTask(index, piece, path, fmt, group, first))
                first, group, rows, piece = first + rows, [], 0, piece + 1
    return tasks


def _checked(path: str, blocks):
    """`blocks`, with a truncated or corrupt compressed input turned into a clear error."""
    from wit_builder import readers

    try:
        yield from blocks
    except readers.decompression_errors() as e:
        raise ConfigError(f"[candidates] {path}: compressed data is truncated or corrupt "
                          f"({type(e).__name__}: {e})") from None


def spill_file(task: tuple[Config, str, ReadTask]) -> dict[str, int]:
    """Read one input file (or piece), clean it and spill rows by uid partition; returns counts
    (`rows_in`, `rows_kept` and one entry per drop reason). Idempotent: a finished piece has
    a `_done.json` with its counts."""
    import pyarrow as pa

    from wit_builder import readers

    cfg, spill_root, rt = task
    index, path, fmt = rt.file_index, rt.path, rt.fmt
    out_dir = io.join(spill_root, f"f{index:05d}-{rt.piece:05d}")
    marker = io.join(out_dir, "_done.json")
    if io.exists(marker):
        return io.read_json(marker)
    io.remove(out_dir)
    counts: dict[str, int] = {"rows_in": 0, "rows_kept": 0}
    buffers: dict[int, list] = {}
    buffered: dict[int, int] = {}
    chunks: dict[int, int] = {}

    def flush(p: int) -> None:
        if buffers.get(p):
            name = f"b{p:05d}-c{chunks.get(p, 0):05d}.parquet"
            io.write_parquet(pa.concat_tables(buffers[p]), io.join(out_dir, name))
            chunks[p] = chunks.get(p, 0) + 1
            buffers[p], buffered[p] = [], 0

    row_base = rt.first_row
    blocks = _checked(path, readers.read_blocks(
        path, fmt, cfg.url_col, cfg.caption_col, cfg.extra_cols, cfg.block_rows, counts, rt.row_groups
    ))
    for raw in blocks:
        counts["rows_in"] += raw.num_rows
        order = (np.int64(index) << np.int64(40)) + row_base + np.arange(raw.num_rows, dtype=np.int64)
        row_base += raw.num_rows
        raw = raw.append_column("_order", pa.array(order))
        kept, dropped = clean_block(raw, cfg.max_caption_chars)
        for reason, n in dropped.items():
            counts[reason] = counts.get(reason, 0) + n
        counts["rows_kept"] += kept.num_rows
        if not kept.num_rows:
            continue
        kept = kept.append_column("source_file", pa.array([path] * kept.num_rows, pa.string()))
        part = _partition_of(kept.column("uid"), cfg.partitions)
        for p in np.unique(part).tolist():
            piece = kept.filter(pa.array(part == p))
            buffers.setdefault(p, []).append(piece)
            buffered[p] = buffered.get(p, 0) + piece.num_rows
            if buffered[p] >= cfg.block_rows:
                flush(p)
    for p in list(buffers):
        flush(p)
    # rows the reader itself could not parse (bad CSV rows, bad WAT records) were never "in" a
    # block: count them as input rows so that in = kept + dropped holds.
    unread = counts.get("bad_row", 0) + counts.get("bad_record", 0)
    counts["rows_in"] += unread
    io.write_json(counts, marker)
    return counts


# ------------------------------------------------------------------------ pass 2: dedup


def dedup_partition(task: tuple[Config, str, str, int]) -> dict[str, int]:
    """Merge one uid partition from every file's spill, keep the first row per uid, write the
    part; returns {"rows": kept, "duplicate": dropped}."""
    import pyarrow as pa
    import pyarrow.compute as pc

    cfg, spill_root, out_dir, partition = task
    dst = io.join(out_dir, io.part_name(partition))
    stats_path = io.join(spill_root, f"dedup-{partition:05d}.json")
    if io.exists(dst) and io.exists(stats_path):
        return io.read_json(stats_path)
    pieces = []
    piece_dirs = [d for d in io.listdir(spill_root) if d.rsplit("/", 1)[-1].startswith("f")]
    for piece_dir in piece_dirs:
        for name in io.listdir(piece_dir, ".parquet"):
            if name.rsplit("/", 1)[-1].startswith(f"b{partition:05d}-"):
                pieces.append(io.read_parquet(name))
    out_schema = _schema_with_extras(cfg, pieces)
    if pieces:
        table = _concat(pieces).sort_by([("uid", "ascending"), ("_order", "ascending")])
        uid = table.column("uid").combine_chunks()
        first = np.ones(table.num_rows, dtype=bool)
        if table.num_rows > 1:
            first[1:] = np.asarray(pc.not_equal(uid.slice(1), uid.slice(0, table.num_rows - 1)), dtype=bool)
        unique = table.filter(pa.array(first)).drop_columns(["_order"])
        duplicates = int(table.num_rows - unique.num_rows)
    else:
        unique = out_schema.empty_table()
        duplicates = 0
    io.write_parquet(unique, dst, out_schema)
    stats = {"rows": int(unique.num_rows), "duplicate": duplicates}
    io.write_json(stats, stats_path)
    return stats


def _concat(pieces):
    import pyarrow as pa

    try:
        return pa.concat_tables(pieces, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # extras typed differently across files: as text
        fixed = []
        for t in pieces:
            for i, name in enumerate(t.column_names):
                if name not in schema.CANDIDATES.names and name != "_order":
                    t = t.set_column(i, name, t.column(name).cast(pa.string()))
            fixed.append(t)
        return pa.concat_tables(fixed, promote_options="permissive")


def _schema_with_extras(cfg: Config, pieces) -> "object":
    import pyarrow as pa

    out = schema.CANDIDATES
    for name in cfg.extra_cols:
        types = {p.schema.field(name).type for p in pieces if name in p.column_names}
        out = out.append(pa.field(name, types.pop() if len(types) == 1 else pa.string()))
    return out


# ---------------------------------------------------------------------------- the driver


def input_paths(cfg: Config) -> list[str]:
    """The input files `inputs` names (globs and directories expanded); ConfigError if none."""
    from wit_builder import readers

    if not cfg.inputs:
        raise ConfigError("[candidates] inputs: no input files given")
    try:
        return readers.expand_inputs(cfg.inputs)
    except FileNotFoundError as e:
        raise ConfigError(f"[candidates] inputs: {e}") from None


def preflight(cfg: Config) -> None:
    """Checks the runner makes before any stage starts: the inputs exist."""
    input_paths(cfg)


def plan_inputs(cfg: Config) -> list[tuple[str, str]]:
    """(path, format) per input file; raises ConfigError for a missing file, an unknown
    format or a missing column, naming the file, before any work starts."""
    from wit_builder import readers

    paths = input_paths(cfg)
    plan = []
    for path in paths:
        fmt = cfg.format if cfg.format != "auto" else readers.detect_format(path)
        if fmt is None:
            raise ConfigError(f"[candidates] cannot tell the format of {path!r} from its name; set format")
        if fmt in readers.TABULAR:
            try:
                have = readers.columns_of(path, fmt)
            except Exception as e:  # unreadable header: a config problem with that file
                raise ConfigError(f"[candidates] cannot read the columns of {path!r}: {e}") from None
            if have is None:
                print(f"candidates: {path} is empty (0 rows), skipped", file=sys.stderr)
                continue
            for key, name in [("url_col", cfg.url_col), ("caption_col", cfg.caption_col)] + [
                ("extra_cols", c) for c in cfg.extra_cols
            ]:
                if name not in have:
                    raise ConfigError(
                        f"[candidates] {key}: column {name!r} not found in {path!r} (columns: {', '.join(have)})"
                    )
        elif cfg.extra_cols:
            raise ConfigError(f"[candidates] extra_cols apply to url lists only, not to {fmt} file {path!r}")
        plan.append((path, fmt))
    return plan


def run(ctx: StageContext, cfg: Config) -> StageResult:
    """Read, clean, spill by uid partition, de-duplicate; see the module docstring."""
    from wit_builder import parallel

    start = time.perf_counter()
    plan = plan_inputs(cfg)
    out_dir = ctx.stage_dir("candidates")
    spill_root = io.join(out_dir, "_spill")
    if ctx.force:
        io.remove(spill_root)
        for p in io.listdir(out_dir, ".parquet"):
            io.remove(p)
    totals: dict[str, int] = {"rows_in": 0, "rows_kept": 0}
    tasks = [(cfg, spill_root, rt) for rt in read_tasks(plan, cfg.split_rows)]
    for _, counts in parallel.map_tasks(spill_file, tasks, desc="candidates: read", progress=ctx.progress, unit="file"):
        for k, v in counts.items():
            totals[k] = totals.get(k, 0) + v
    rows_out = duplicates = 0
    parts = [(cfg, spill_root, out_dir, p) for p in range(cfg.partitions)]
    for _, stats in parallel.map_tasks(dedup_partition, parts, desc="candidates: dedup", progress=ctx.progress):
        rows_out += stats["rows"]
        duplicates += stats["duplicate"]
    io.remove(spill_root)
    dropped = {k: v for k, v in totals.items() if k not in ("rows_in", "rows_kept")}
    dropped["duplicate"] = duplicates
    result = StageResult(
        rows_in=totals["rows_in"],
        rows_out=rows_out,
        dropped=dropped,
        seconds=time.perf_counter() - start,
        extra={"files": len(plan), "read_tasks": len(tasks), "partitions": cfg.partitions},
    )
    result.check_accounting()
    return result
