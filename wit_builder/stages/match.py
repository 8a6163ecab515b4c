"""Match stage: keep the candidates whose caption contains at least one query.

`Matcher` builds one Aho–Corasick automaton over all queries (ahocorasick-rs, contiguous NFA)
and matches captions in batches: the batch is transformed with a few `str.replace` calls,
joined into one string, scanned once in Rust, and the hits are mapped to captions with
`np.searchsorted` and de-duplicated with numpy (no Python loop per hit or per query).
Modes (DESIGN.md §2 "Matching semantics"):

- ``word`` (default): NFKC, case-folded, whitespace runs collapsed; a hit counts only when no
  word character (``str.isalnum()`` or ``_``) stands directly before or after it. Implemented
  without a per-hit check (see `Matcher`): non-word characters are wrapped in spaces in both
  the captions and the queries, and patterns are " " + query + " ".
- ``metaclip``: MetaCLIP's semantics: caption padded with a space on each side, each of
  ``, . ; : ? ! \\``` wrapped in spaces, ``\\t \\n \\r`` turned into spaces, case-sensitive
  search for ``" " + query + " "``.
- ``substring``: raw containment of the raw query in the raw caption.

Example:
    >>> m = Matcher(["cat", "U.S.", "New York", "york"])
    >>> m.match(["A Cat, in the U.S. flag", "category", "new  YORK city"])
    [[0, 1], [], [2, 3]]
    >>> Matcher(["cat", "U.S."], mode="metaclip").match(["a cat.", "the U.S. flag"])
    [[0], []]
    >>> Matcher(["cat"], mode="substring").match(["category", "Cat"])
    [[0], []]
"""

from __future__ import annotations

import functools
import itertools
import operator
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from wit_builder import executor, io, schema
from wit_builder.stages.base import StageContext, StageResult

Mode = Literal["word", "metaclip", "substring"]
MODES = ("word", "metaclip", "substring")

METACLIP_WRAP = ",.;:?!`"
METACLIP_SPACE = "\t\n\r"
_ASCII_NONWORD = [chr(c) for c in range(1, 128) if not (chr(c).isalnum() or chr(c) == "_" or chr(c).isspace())]


class _WordTable(dict):
    """str.translate table for word mode: a non-word char x other than space -> " x "."""

    def __missing__(self, code: int) -> int | str:
        ch = chr(code)
        out: int | str = code if (ch.isalnum() or ch == "_" or ch == " ") else f" {ch} "
        self[code] = out
        return out


def normalize_word(text: str) -> str:
    """Word-mode normalisation: NFKC, case-fold, collapse whitespace runs (and strip).

    >>> normalize_word("  The\\tU.S.  \ufb02ag ")
    'the u.s. flag'
    """
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def metaclip_spacing(text: str) -> str:
    """MetaCLIP's caption transform, in one pass (`str.translate`) instead of ten `replace`s.

    >>> metaclip_spacing("a cat, dog.\\n")
    ' a cat ,  dog .   '
    """
    return " " + text.translate(_METACLIP_TABLE) + " "


_METACLIP_TABLE = {ord(p): f" {p} " for p in METACLIP_WRAP} | {ord(c): " " for c in METACLIP_SPACE}


_first, _second = operator.itemgetter(0), operator.itemgetter(1)


def _encodable(text: str) -> bool:
    """False for strings holding lone surrogates (no UTF-8 form, so no caption can hold them)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


_ASCII_SPACE = [c for c in "\t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"]  # str.split() whitespace besides " "


_WRAP_BYTE = np.zeros(256, dtype=bool)
_WRAP_BYTE[[0] + [ord(c) for c in _ASCII_NONWORD]] = True  # "\x00" (the separator) is wrapped too


_SPACE_BYTE = np.zeros(256, dtype=bool)
_SPACE_BYTE[[ord(" ")] + [ord(c) for c in _ASCII_SPACE]] = True


def _ascii_word_image(captions: Sequence[str]) -> tuple[bytes, np.ndarray] | None:
    """Word-mode image of ASCII captions as one byte string plus each caption's start offset.

    Captions are joined with "\\x00" and lower()ed (= NFKC + casefold for ASCII); then, in a
    few numpy passes over the bytes, each whitespace run becomes one space (none at a caption's
    edges) and every non-word byte (and the separator) is wrapped in spaces.
    None when a caption holds "\\x00".
    """
    text = "\x00".join(captions)
    if text.count("\x00") != len(captions) - 1:
        return None
    raw = np.frombuffer(text.lower().encode("ascii"), dtype=np.uint8)
    ws = _SPACE_BYTE[raw]
    if ws.any():  # collapse whitespace runs; drop those at either edge of a caption
        blocked = ws | (raw == 0)  # a run is kept only between two other bytes
        run_start = np.flatnonzero(ws & np.concatenate([[True], ~ws[:-1]]))
        run_end = np.flatnonzero(ws & np.concatenate([~ws[1:], [True]]))
        inner = (run_start > 0) & (run_end < len(raw) - 1)
        inner[inner] = ~blocked[run_start[inner] - 1] & ~blocked[run_end[inner] + 1]
        keep = ~ws
        keep[run_start[inner]] = True
        raw = raw[keep]
        raw[_SPACE_BYTE[raw]] = 32
    wrap = _WRAP_BYTE[raw]
    before = np.cumsum(wrap, dtype=np.int64) - wrap  # wrapped bytes before each byte
    dest = np.arange(len(raw), dtype=np.int64) + 2 * before + wrap + 1  # +1: the leading pad
    out = np.full(len(raw) + 2 * int(wrap.sum()) + 2, 32, dtype=np.uint8)
    out[dest] = raw
    starts = np.concatenate([[0], dest[raw == 0] + 1])
    return out.tobytes(), starts


def _char_positions(text: str, ch: str) -> np.ndarray:
    """Indices (in characters) of every `ch` in `text`, via a fixed-width encoding."""
    try:
        codes = np.frombuffer(text.encode("latin-1"), dtype=np.uint8)
    except UnicodeEncodeError:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return np.flatnonzero(codes == ord(ch))


class Matcher:
    """All-queries Aho–Corasick matcher; `.match(captions)` -> sorted query indices per caption.

    Word mode is MetaCLIP's spacing trick made exact for word boundaries: after normalising,
    every non-word character other than the space is wrapped in spaces (T), the caption is
    padded with one space on each side, and query q becomes the pattern " " + T(q) + " ".
    T is applied character by character and is one-to-one (whitespace runs were collapsed
    first), so the pattern occurs exactly where q occurs with a non-word character or an
    edge on each side.
    """

    def __init__(self, queries: Sequence[str], mode: Mode = "word"):
        import ahocorasick_rs

        if mode not in MODES:
            raise ValueError(f"unknown match mode {mode!r} (known: {', '.join(MODES)})")
        self.mode = mode
        self.num_queries = len(queries)
        self._word_table = _WordTable()
        patterns: dict[str, list[int]] = {}
        for qid, q in enumerate(queries):
            p = self._pattern(q)
            if p is not None and _encodable(p):
                patterns.setdefault(p, []).append(qid)
        self._sep = "\n" if mode == "word" else self._pick_separator(patterns)
        owners = list(patterns.values())
        # word mode scans UTF-8 bytes (its images are built as bytes); the others scan str
        impl = ahocorasick_rs.Implementation.ContiguousNFA
        if not patterns:
            self._automaton = None
        elif mode == "word":
            self._automaton = ahocorasick_rs.BytesAhoCorasick(
                [p.encode("utf-8") for p in patterns], implementation=impl
            )
        else:
            self._automaton = ahocorasick_rs.AhoCorasick(list(patterns), implementation=impl)
        # pattern id -> query ids (CSR); a plain gather when every pattern has exactly one query
        lengths = np.fromiter((len(o) for o in owners), dtype=np.int64, count=len(owners))
        self._one_to_one = bool(np.all(lengths == 1))
        self._owner_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self._owner_ids = np.fromiter(itertools.chain.from_iterable(owners), dtype=np.int64, count=int(lengths.sum()))
        self.num_patterns = len(owners)

    # -- per-mode transforms -------------------------------------------------------------
    def _pattern(self, query: str) -> str | None:
        if self.mode == "word":
            q = normalize_word(query)
            if not q or "\x00" in q:
                return None  # "\x00" separates captions in a batch: such a query never matches
            return f" {q.translate(self._word_table)} "
        if self.mode == "metaclip":
            if not query or any(c in query for c in METACLIP_SPACE):
                return None  # MetaCLIP's spaced text never contains these: cannot match
            return f" {query} "
        return query or None

    @staticmethod
    def _pick_separator(patterns: dict[str, list[int]]) -> str:
        used = set().union(*patterns) if patterns else set()
        for code in itertools.chain([0, 1, 2, 3], range(0xE000, 0xF900)):
            if chr(code) not in used:
                return chr(code)
        raise ValueError("no separator character free in the queries")  # pragma: no cover

    def _groups(self, captions: Sequence[str]) -> list[tuple[np.ndarray | None, str | bytes, np.ndarray]]:
        """Batch texts to scan: (caption indices or None for all, joined text, start offsets);
        word mode gives UTF-8 bytes and byte offsets."""
        n = len(captions)
        sep = self._sep
        if self.mode == "substring":
            lengths = np.fromiter(map(len, captions), dtype=np.int64, count=n) + 1
            return [(None, sep.join(captions), np.concatenate([[0], np.cumsum(lengths)[:-1]]))]
        if self.mode == "metaclip":
            text = f" {sep} ".join(captions)
            if text.count(sep) == n - 1:  # captions free of the separator: one batch transform
                for p in METACLIP_WRAP:
                    if p in text:
                        text = text.replace(p, f" {p} ")
                for c in METACLIP_SPACE:
                    if c in text:
                        text = text.replace(c, " ")
                text = f" {text} "
                return [(None, text, np.concatenate([[0], _char_positions(text, sep) + 1]))]
            return [self._joined(None, [metaclip_spacing(c) for c in captions])]
        is_ascii = np.fromiter(map(str.isascii, captions), dtype=bool, count=n)
        groups = []
        if is_ascii.any():
            rows = None if is_ascii.all() else np.flatnonzero(is_ascii)
            group = captions if rows is None else list(itertools.compress(captions, is_ascii))
            image = _ascii_word_image(group)
            if image is not None:
                groups.append((rows, image[0], image[1]))
            else:  # a caption holds the separator: transform caption by caption
                is_ascii[:] = False
        if not is_ascii.all():
            other = np.flatnonzero(~is_ascii)
            table = self._word_table
            images = [f" {normalize_word(captions[i]).translate(table)} " for i in other.tolist()]
            data = "\n".join(images).encode("utf-8")  # byte offsets: split at the "\n"s
            newlines = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
            groups.append((other, data, np.concatenate([[0], newlines + 1])))
        return groups

    def _joined(self, rows: np.ndarray | None, images: list[str]):
        lengths = np.fromiter(map(len, images), dtype=np.int64, count=len(images)) + len(self._sep)
        return rows, self._sep.join(images), np.concatenate([[0], np.cumsum(lengths)[:-1]])

    # -- matching ----------------------------------------------------------------------
    def match_csr(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(offsets int64[n+1], query_ids int32[...]): caption i's sorted unique matches are
        query_ids[offsets[i]:offsets[i+1]] (the layout of an Arrow ListArray)."""
        n = len(captions)
        if self._automaton is None or n == 0:
            return np.zeros(n + 1, dtype=np.int64), np.zeros(0, dtype=np.int32)
        all_rows, all_pids = [], []
        for rows_of_group, text, starts in self._groups(captions):
            hits = self._automaton.find_matches_as_indexes(text, overlapping=True)
            hit_pids = np.fromiter(map(_first, hits), dtype=np.int64, count=len(hits))
            hit_starts = np.fromiter(map(_second, hits), dtype=np.int64, count=len(hits))
            rows = np.searchsorted(starts, hit_starts, side="right") - 1
            all_rows.append(rows if rows_of_group is None else rows_of_group[rows])
            all_pids.append(hit_pids)
        rows = np.concatenate(all_rows)
        pids = np.concatenate(all_pids)
        if self._one_to_one:
            pids = self._owner_ids[pids]
        else:
            counts = np.diff(self._owner_offsets)[pids]
            rows = np.repeat(rows, counts)
            within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
            pids = self._owner_ids[np.repeat(self._owner_offsets[pids], counts) + within]
        width = max(self.num_queries, 1)
        key = np.sort(rows * width + pids)  # by (row, query id); np.unique is slower here
        if len(key):
            key = key[np.concatenate([[True], key[1:] != key[:-1]])]
        rows, qids = np.divmod(key, width)
        offsets = np.searchsorted(rows, np.arange(n + 1), side="left").astype(np.int64)
        return offsets, qids.astype(np.int32)

    def match(self, captions: Sequence[str]) -> list[list[int]]:
        """Per caption, the sorted list of matched query indices."""
        out: list[list[int]] = []
        for lo in range(0, len(captions), 8192):
            offsets, qids = self.match_csr(captions[lo : lo + 8192])
            flat = qids.tolist()
            bounds = offsets.tolist()
            out.extend(flat[a:b] for a, b in zip(bounds[:-1], bounds[1:]))
        return out


# ---------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class Config:
    """`[match]` keys.

    mode: "word" (default) | "metaclip" | "substring" — see the module docstring.
    batch_rows: captions matched per call (one joined string per call).
    num_workers: Ray workers (each builds the automaton once); 0 = ctx.num_cpus.
    """

    mode: Mode = "word"
    batch_rows: int = 8192
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.batch_rows <= 0:
            raise ValueError(f"batch_rows must be > 0, got {self.batch_rows}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")


def load_queries(path: str) -> list[str]:
    """Query texts from queries.parquet, indexed by query_id (which must be 0..n-1)."""
    table = io.read_parquet(path, columns=["query_id", "text"])
    ids = table.column("query_id").to_numpy()
    if not np.array_equal(np.sort(ids), np.arange(len(ids))):
        raise ValueError(f"{path}: query_id must be 0..n-1")
    texts = [""] * len(ids)
    for i, t in zip(ids.tolist(), table.column("text").to_pylist()):
        texts[i] = t
    return texts


def build_matcher(queries_path: str, mode: str) -> Matcher:
    """Actor setup: read the queries and build the automaton once per worker."""
    return Matcher(load_queries(queries_path), mode=mode)  # type: ignore[arg-type]


def match_part(matcher: Matcher, task: tuple[str, str, int]) -> dict[str, int]:
    """Match one candidates part into one matched part; returns {"rows_in", "rows_out"}."""
    import pyarrow as pa

    src, dst, batch_rows = task
    rows_in = 0

    def batches():
        nonlocal rows_in
        for batch in io.iter_parquet_batches(src, batch_size=batch_rows):
            rows_in += batch.num_rows
            offsets, qids = matcher.match_csr(batch.column("caption").to_pylist())
            keep = np.diff(offsets) > 0
            if not keep.any():
                continue
            lists = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(qids))
            table = pa.Table.from_batches([batch]).append_column("query_ids", lists)
            yield from table.filter(pa.array(keep)).to_batches()

    out_schema = _output_schema(io.parquet_schema(src))
    # extra url-list columns may hold nulls: write every column as nullable
    nullable = pa.schema([f.with_nullable(True) for f in out_schema])
    rows_out = io.write_parquet_batches(batches(), dst, nullable)
    return {"rows_in": rows_in, "rows_out": rows_out}


def _output_schema(candidates_schema):
    extra = [f for f in candidates_schema if f.name not in schema.MATCHED.names]
    out = schema.MATCHED
    for f in extra:
        out = out.append(f)
    return out


def run(ctx: StageContext, cfg: Config) -> StageResult:
    """Match every candidates part against queries/queries.parquet into matched/part-*.parquet."""
    from wit_builder.config import ConfigError

    start = time.perf_counter()
    queries_path = io.join(ctx.stage_dir("queries"), "queries.parquet")
    if not io.exists(queries_path):
        raise ConfigError(f"match: {queries_path} not found (run the queries stage first)")
    parts = io.listdir(ctx.stage_dir("candidates"), ".parquet")
    parts = [p for p in parts if p.rsplit("/", 1)[-1].startswith("part-")]
    out_dir = ctx.stage_dir("match")
    step = executor.Pass(
        "match",
        ctx.marker_dir("match", "match"),
        match_part,
        setup=functools.partial(build_matcher, queries_path, cfg.mode),
        workers=cfg.num_workers or ctx.num_cpus,
        tmp_dirs=(out_dir,),
        desc="match",
    )
    plan = []
    for src in parts:
        name = src.rsplit("/", 1)[-1]
        plan.append(executor.Part(name.split(".")[0], (src, io.join(out_dir, name), cfg.batch_rows)))
    totals = executor.sum_counts(executor.run_pass(step, plan, progress=ctx.progress).values())
    rows_in, rows_out = totals.get("rows_in", 0), totals.get("rows_out", 0)
    result = StageResult(
        rows_in=rows_in,
        rows_out=rows_out,
        dropped={"no_match": rows_in - rows_out},
        seconds=time.perf_counter() - start,
        extra={"mode": cfg.mode, "parts": len(parts)},
    )
    result.check_accounting()
    return result
