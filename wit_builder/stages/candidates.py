"""Candidates stage: raw (url, caption) pairs from url lists or WARC/WAT into clean, unique rows.

Two executor passes (one part per input file or piece, then one per partition; markers under
candidates/_parts/), memory bounded by the block size and by one partition:
1. read each input file in blocks, drop bad rows by reason, compute
   uid = blake2b-8(url + "\\x1f" + caption), and spill each row to the partition
   `uid mod partitions` (candidates/_work/spill/f{file}-{piece}/b{partition}-c{chunk}.parquet);
2. per partition, sort by uid, keep the first row of each uid (input order: file, then row),
   write candidates/part-{partition:05d}.parquet (schema.CANDIDATES + extra columns).

URLs lose leading and trailing whitespace first (the uid is of the trimmed URL); captions are
kept as they are. Drop reasons: `undecodable` (url or caption not UTF-8), `missing_url`, `missing_caption`
(null, empty or whitespace only), `bad_scheme` (not http:// or https://, e.g. data:),
`caption_too_long` (> max_caption_chars characters), `bad_row` (a CSV row with the wrong
number of fields, a JSONL line that is not an object), `bad_record` (an unreadable WAT record),
`duplicate` (same uid as an earlier row), and `safety:blocklist:<name>` /
`safety:optout:<name>` (the url, or the page_url of a WARC/WAT row, is on that URL, URL-prefix or
domain list; see wit_builder/safety): such rows are dropped here, so the download stage never
contacts them. For WARC/WAT every <img>/IMG@ link is a raw row.

Parallelism: one part per input file, or per run of row groups (>= `split_rows` rows) of a
big parquet file; then one part per partition. Other formats are read one part per file.
Columns are checked before any work from each file's parquet schema, CSV/TSV header or
first JSONL record. Size `partitions` so that one partition (rows / partitions)
fits in a worker's memory (e.g. ~5M rows each).

Example:
    >>> Config(inputs=["urls.parquet"]).url_col
    'url'
"""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from wit_builder import executor, io, schema
from wit_builder.config import ConfigError, path_field
from wit_builder.safety import lists as safety_lists
from wit_builder.safety.lists import URL_KINDS, ListSpec, check_specs
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
    blocklists: URL lists whose rows are never fetched, each
      `{name, kind = "domain" | "url" | "prefix", path, column}` (safety.lists.ListSpec);
      dropped as `safety:blocklist:<name>`.
    optout_lists: domains and URL prefixes whose owners asked not to be crawled (same tables);
      dropped as `safety:optout:<name>`.
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
    blocklists: list[ListSpec] = field(default_factory=list)
    optout_lists: list[ListSpec] = field(default_factory=list)

    def __post_init__(self) -> None:
        from wit_builder.readers import FORMATS

        check_specs("blocklists", self.blocklists, URL_KINDS)
        check_specs("optout_lists", self.optout_lists, URL_KINDS)

        if self.format != "auto" and self.format not in FORMATS:
            raise ValueError(f"format must be 'auto' or one of {', '.join(FORMATS)}, got {self.format!r}")
        for name, value in (
            ("max_caption_chars", self.max_caption_chars),
            ("partitions", self.partitions),
            ("block_rows", self.block_rows),
            ("split_rows", self.split_rows),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        clash = sorted(set(self.extra_cols) & RESERVED)
        if clash:
            raise ValueError(f"extra_cols {clash} clash with the pipeline's own columns")


# ------------------------------------------------------------------------------ row cleaning


def _decode(col) -> tuple[object, np.ndarray]:
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


def clean_block(table, max_caption_chars: int) -> tuple[object, dict[str, int]]:
    """Drop bad rows (first failing reason wins, in REASONS order); add `uid`. Returns the
    kept rows (uid, url, caption, page_url, extras) and the dropped counts."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from wit_builder.uid import uids

    url, bad_url = _decode(table.column("url"))
    url = pc.utf8_trim_whitespace(url)  # " http://x/a.jpg\n" is the URL http://x/a.jpg
    caption, bad_cap = _decode(table.column("caption"))
    filled = lambda mask: np.asarray(mask.fill_null(True), dtype=bool)  # noqa: E731
    blank_url = filled(pc.equal(pc.utf8_length(url), 0))
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

    @property
    def name(self) -> str:
        return f"f{self.file_index:05d}-{self.piece:05d}"


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
    """`blocks`, with an unreadable input turned into a clear error naming the file: a truncated
    or corrupt compressed file, or a parquet file with a corrupt page or footer, is a
    ConfigError (exit code 2; retrying cannot help). On an object store an OSError may be a
    passing network fault: it is re-raised (the executor retries the part) with the file named."""
    import pyarrow as pa

    from wit_builder import readers

    try:
        yield from blocks
    except readers.decompression_errors() as e:
        raise ConfigError(
            f"[candidates] {path}: compressed data is truncated or corrupt ({type(e).__name__}: {e})"
        ) from None
    except (pa.ArrowException, OSError) as e:
        if isinstance(e, OSError) and not io.is_local(path):
            raise OSError(f"{path}: {e}") from e
        raise ConfigError(
            f"[candidates] {path}: unreadable ({type(e).__name__}: {e}); fix or remove the file and rerun"
        ) from None


def spill_file(rt: ReadTask, cfg: Config, spill_root: str) -> dict[str, int]:
    """Read one input file (or piece), clean it and spill rows by uid partition; returns counts
    (`rows_in`, `rows_kept` and one entry per drop reason)."""
    import pyarrow as pa

    from wit_builder import readers
    from wit_builder.safety.screen import url_screen

    index, path, fmt = rt.file_index, rt.path, rt.fmt
    out_dir = io.join(spill_root, rt.name)
    io.remove(out_dir)  # what an interrupted attempt left
    counts: dict[str, int] = {"rows_in": 0, "rows_kept": 0}
    screen = url_screen(cfg.blocklists, cfg.optout_lists)
    counts.update(dict.fromkeys(screen.reasons if screen else [], 0))  # every list in the summary
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
    blocks = _checked(
        path,
        readers.read_blocks(
            path, fmt, cfg.url_col, cfg.caption_col, cfg.extra_cols, cfg.block_rows, counts, rt.row_groups
        ),
    )
    for raw in blocks:
        counts["rows_in"] += raw.num_rows
        order = (np.int64(index) << np.int64(40)) + row_base + np.arange(raw.num_rows, dtype=np.int64)
        row_base += raw.num_rows
        raw = raw.append_column("_order", pa.array(order))
        kept, dropped = clean_block(raw, cfg.max_caption_chars)
        if screen is not None:  # blocklists and opt-outs: before anything is fetched
            kept, blocked = screen.apply(kept)
            dropped.update(blocked)
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
    counts["rows_in"] += counts.get("bad_row", 0) + counts.get("bad_record", 0)
    return counts


# ------------------------------------------------------------------------ pass 2: dedup


def dedup_partition(partition: int, cfg: Config, spill_root: str, out_dir: str) -> dict[str, int]:
    """Merge one uid partition from every file's spill, keep the first row per uid, write the
    part; returns {"rows": kept, "duplicate": dropped}."""
    import pyarrow as pa
    import pyarrow.compute as pc

    dst = io.join(out_dir, io.part_name(partition))
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
    return {"rows": int(unique.num_rows), "duplicate": duplicates}


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


def _schema_with_extras(cfg: Config, pieces) -> object:
    import pyarrow as pa

    out = schema.CANDIDATES
    for name in cfg.extra_cols:
        types = {p.schema.field(name).type for p in pieces if name in p.column_names}
        out = out.append(pa.field(name, types.pop() if len(types) == 1 else pa.string()))
    return out


# ---------------------------------------------------------------------------- the driver


def input_paths(cfg: Config) -> list[str]:
    """The input files `inputs` names (globs and directories expanded); ConfigError if none."""
    if not cfg.inputs:
        raise ConfigError("[candidates] inputs: no input files given")
    try:
        return io.expand(cfg.inputs)
    except FileNotFoundError as e:
        raise ConfigError(f"[candidates] inputs: {e}") from None


def preflight(cfg: Config) -> None:
    """Checks the runner makes before any stage starts: the inputs exist, the URL lists read."""
    from wit_builder.safety.screen import url_screen

    input_paths(cfg)
    url_screen(cfg.blocklists, cfg.optout_lists)


def input_digests(cfg: Config) -> list[dict[str, str]]:
    """The blocklists and opt-out lists applied, with the sha256 of each file: the runner adds
    them to the stage's fingerprint (a changed list redoes the stage); the shards manifest
    lists them."""
    return safety_lists.describe("blocklist", cfg.blocklists) + safety_lists.describe("optout", cfg.optout_lists)


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
    from wit_builder.safety.screen import url_screen

    start = time.perf_counter()
    plan = plan_inputs(cfg)
    url_screen(cfg.blocklists, cfg.optout_lists)  # a bad list entry fails here, before any work
    out_dir = ctx.stage_dir("candidates")
    safety_lists.write_record(out_dir, input_digests(cfg))
    spill_root = io.join(ctx.work_dir("candidates"), "spill")
    reads = read_tasks(plan, cfg.split_rows)
    read_pass = executor.Pass(
        "read",
        ctx.marker_dir("candidates", "read"),
        functools.partial(spill_file, cfg=cfg, spill_root=spill_root),
        desc="candidates: read",
        unit="file",
    )
    read = executor.run_pass(read_pass, [executor.Part(rt.name, rt) for rt in reads], progress=ctx.progress)
    dedup_pass = executor.Pass(
        "dedup",
        ctx.marker_dir("candidates", "dedup"),
        functools.partial(dedup_partition, cfg=cfg, spill_root=spill_root, out_dir=out_dir),
        tmp_dirs=(out_dir,),
        desc="candidates: dedup",
    )
    dedup = executor.run_pass(
        dedup_pass, [executor.Part(f"{p:05d}", p) for p in range(cfg.partitions)], progress=ctx.progress
    )
    totals = executor.sum_counts(read.values())
    dropped = {k: v for k, v in totals.items() if k not in ("rows_in", "rows_kept")}
    dropped["duplicate"] = executor.sum_counts(dedup.values()).get("duplicate", 0)
    result = StageResult(
        rows_in=totals.get("rows_in", 0),
        rows_out=executor.sum_counts(dedup.values()).get("rows", 0),
        dropped=dropped,
        seconds=time.perf_counter() - start,
        extra={"files": len(plan), "read_tasks": len(reads), "partitions": cfg.partitions},
    )
    result.check_accounting()
    return result
