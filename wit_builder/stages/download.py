"""Download stage: fetch, check, resize and store every selected image, one Ray task per shard.

Reads `selected/part-*.parquet` (schema.SELECTED) and cuts the rows, in part order, into
shards of `shard_size` rows (shard i = rows [i*shard_size, (i+1)*shard_size) of the
concatenated parts: deterministic, whatever the partitioning of the run). Each shard is one
Ray task (retried by Ray when its worker dies; failed shards are re-run in further rounds
with exponential backoff), which fetches with `threads_per_task` threads through our safe
fetch (wit_builder.fetch), checks the header and resizes with img2dataset's resizer
(wit_builder.resize), then writes, each atomically and in this order:

- `download/{shard:05d}.tar`: `{key}.jpg` (or .png/.webp), `{key}.json`, `{key}.txt` per
  successful sample, members sorted by name (= key order), fixed tar headers;
- `download/{shard:05d}.parquet`: schema.SAMPLES, one row for EVERY sample of the shard,
  sorted by key: status "success"/"failed", error reason, sizes, stored bytes, sha256;
- `download/{shard:05d}_stats.json` LAST: a shard is done iff this file exists, and a rerun
  skips done shards (all of them are redone with ctx.force).

`retry_failed(ctx, cfg)` (CLI: `wit-build download DIR --retry-failed`) re-fetches only the
transient failures (timeouts, resets, 5xx, 429) of finished shards and rewrites those shards
atomically; successes are kept byte for byte.

Example:
    >>> cfg = Config(shard_size=500, image_size=384, allow_private_network=True)
    >>> cfg.resize_settings().image_size, cfg.fetch_settings().allow_private_network
    (384, True)
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import hashlib
import ipaddress
import json
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable, Iterator, Sequence

from wit_builder import io, schema
from wit_builder.config import ConfigError
from wit_builder.fetch import DEFAULT_OPTOUT, FetchSettings, Fetcher, is_transient
from wit_builder.progress import bar
from wit_builder.resize import EncodeFormat, ImageRejected, ResizeMode, ResizeSettings
from wit_builder.stages.base import StageContext, StageResult, Timer

INPUT_COLUMNS = ["uid", "url", "caption", "query_id", "query_ids"]


@dataclass(frozen=True)
class Config:
    """`[download]` keys.

    shard_size: selected rows per shard (one Ray task, one tar); memory per task is about
        shard_size x the stored image size (successes are buffered to write in key order).
    threads_per_task: fetch threads in each task.
    timeout: total seconds per image (all redirect hops, headers and body).
    max_bytes: body size cap per image; larger is "too_large".
    max_pixels: width x height cap read from the header before decoding ("too_many_pixels").
    max_redirects: redirect hops followed, one at a time, each checked.
    allow_private_network: allow private/loopback/link-local addresses (demo, tests).
    allowed_networks: CIDRs allowed even when private (e.g. ["10.1.0.0/16"]).
    max_per_domain: concurrent requests per host name in one task.
    user_agent: the User-Agent header.
    user_agent_token: our token for scoped opt-outs ("X-Robots-Tag: <token>: noai").
    disallowed_header_directives: X-Robots-Tag directives that opt an image out ([] = ignore).
    verify_tls: verify HTTPS certificates.
    retries: immediate re-fetches of a URL after a transient failure (like img2dataset's).
    image_size, resize_mode, resize_only_if_bigger, upscale_interpolation,
    downscale_interpolation, encode_format, encode_quality: img2dataset's resizer settings.
        Defaults: 256 px, keep_ratio (smallest side to 256, aspect kept), never upscale
        (small images keep their size; the filter stage decides), area/lanczos, jpg q95.
    task_retries: Ray retries of a shard task whose worker died.
    shard_attempts: rounds over unfinished shards (after a task error) before the stage fails.
    retry_backoff: seconds before the second round, doubled for each further round.
    """

    shard_size: int = 1000
    threads_per_task: int = 32
    timeout: float = 10.0
    max_bytes: int = 20_000_000
    max_pixels: int = 50_000_000
    max_redirects: int = 5
    allow_private_network: bool = False
    allowed_networks: list[str] = field(default_factory=list)
    max_per_domain: int = 16
    user_agent: str = FetchSettings.user_agent
    user_agent_token: str = FetchSettings.user_agent_token
    disallowed_header_directives: list[str] = field(default_factory=lambda: list(DEFAULT_OPTOUT))
    verify_tls: bool = True
    retries: int = 0
    image_size: int = 256
    resize_mode: ResizeMode = "keep_ratio"
    resize_only_if_bigger: bool = True
    upscale_interpolation: str = "lanczos"
    downscale_interpolation: str = "area"
    encode_format: EncodeFormat = "jpg"
    encode_quality: int = 95
    task_retries: int = 3
    shard_attempts: int = 3
    retry_backoff: float = 2.0

    def __post_init__(self) -> None:
        positive = ("shard_size", "threads_per_task", "max_bytes", "max_pixels", "max_per_domain", "shard_attempts")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_redirects", "retries", "task_retries"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.timeout <= 0 or self.retry_backoff < 0:
            raise ValueError("timeout must be > 0 and retry_backoff >= 0")
        for net in self.allowed_networks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"allowed_networks: not a network: {net!r}") from None
        self.resize_settings()  # validates the resizer keys

    def fetch_settings(self) -> FetchSettings:
        return _settings_from(FetchSettings, self)

    def resize_settings(self) -> ResizeSettings:
        return _settings_from(ResizeSettings, self)


def _settings_from(cls: type, cfg: Config):
    """A settings dataclass filled from the Config keys of the same names (lists as tuples)."""
    values = {f.name: getattr(cfg, f.name) for f in fields(cls) if hasattr(cfg, f.name)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


# -- shard plan --------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardSpec:
    """Shard `index`: rows [start, stop) of each listed selected part, in order."""

    index: int
    pieces: tuple[tuple[str, int, int], ...]

    @property
    def name(self) -> str:
        return f"{self.index:05d}"

    @property
    def rows(self) -> int:
        return sum(stop - start for _, start, stop in self.pieces)


def selected_parts(selected_dir: str) -> list[str]:
    import os.path

    return [p for p in io.listdir(selected_dir, ".parquet") if os.path.basename(p).startswith("part-")]


def _num_rows(path: str) -> int:
    import pyarrow.parquet as pq

    fs, inner = io.filesystem(path)
    with fs.open(inner, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def plan_shards(parts: Sequence[str], shard_size: int) -> list[ShardSpec]:
    """Cut the concatenation of `parts` (in order) into shards of `shard_size` rows.

    >>> [(s.index, s.rows) for s in _plan([("a", 3), ("b", 4)], 3)]
    [(0, 3), (1, 3), (2, 1)]
    >>> _plan([("a", 3), ("b", 4)], 3)[1].pieces
    (('b', 0, 3),)
    """
    return _plan([(p, _num_rows(p)) for p in parts], shard_size)


def _plan(sizes: Sequence[tuple[str, int]], shard_size: int) -> list[ShardSpec]:
    specs: list[ShardSpec] = []
    pieces: list[tuple[str, int, int]] = []
    filled = 0
    for path, n in sizes:
        start = 0
        while start < n:
            take = min(n - start, shard_size - filled)
            pieces.append((path, start, start + take))
            filled += take
            start += take
            if filled == shard_size:
                specs.append(ShardSpec(len(specs), tuple(pieces)))
                pieces, filled = [], 0
    if pieces:
        specs.append(ShardSpec(len(specs), tuple(pieces)))
    return specs


def read_shard_rows(spec: ShardSpec) -> list[dict[str, Any]]:
    """The shard's selected rows (INPUT_COLUMNS), reading only the row groups it overlaps."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    target = pa.schema([schema.SELECTED.field(c) for c in INPUT_COLUMNS])
    tables = []
    for path, start, stop in spec.pieces:
        fs, inner = io.filesystem(path)
        with fs.open(inner, "rb") as f:
            pf = pq.ParquetFile(f)
            offset = 0
            for rg in range(pf.num_row_groups):
                n = pf.metadata.row_group(rg).num_rows
                lo, hi = offset, offset + n
                offset = hi
                if hi <= start or lo >= stop:
                    continue
                t = pf.read_row_group(rg, columns=INPUT_COLUMNS)
                a, b = max(start, lo), min(stop, hi)
                tables.append(t.slice(a - lo, b - a).cast(target))
                if hi >= stop:
                    break
    return pa.concat_tables(tables).to_pylist() if tables else []


# -- paths -------------------------------------------------------------------------------


def tar_path(out_dir: str, shard: str) -> str:
    return io.join(out_dir, f"{shard}.tar")


def samples_path(out_dir: str, shard: str) -> str:
    return io.join(out_dir, f"{shard}.parquet")


def stats_path(out_dir: str, shard: str) -> str:
    return io.join(out_dir, f"{shard}_stats.json")


# -- one shard ---------------------------------------------------------------------------


def _fetch_one(fetcher: Fetcher, url: str, max_pixels: int, retries: int) -> tuple[bytes | None, str | None]:
    """Fetch + header check + normalisation (worker thread); (prepared bytes, None) or (None, reason)."""
    from wit_builder.resize import inspect, prepare

    for _ in range(retries + 1):
        res = fetcher.fetch(url)
        if res.error is None or not is_transient(res.error):
            break
    if res.error is not None:
        return None, res.error
    info = inspect(res.data, max_pixels)
    if info.error:
        return None, info.error
    try:
        return prepare(res.data, info), None
    except ImageRejected as e:
        return None, e.reason


def _imap_unordered(pool: cf.Executor, fn: Callable, items: Iterable, window: int) -> Iterator[tuple[Any, Any]]:
    """(item, fn(item)) as they finish, with at most `window` in flight."""
    it = iter(items)
    pending: dict[cf.Future, Any] = {}
    while True:
        for item in it:
            pending[pool.submit(fn, item)] = item
            if len(pending) >= window:
                break
        if not pending:
            return
        done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
        for fut in done:
            yield pending.pop(fut), fut.result()


@functools.lru_cache(maxsize=4)
def _fetcher_for(settings: FetchSettings) -> Fetcher:
    """One Fetcher per settings per worker process."""
    return Fetcher(settings)


def _download_rows(rows: list[dict[str, Any]], cfg: Config) -> Iterator[tuple[int, Any, str | None]]:
    """Yield (row index, Resized or None, error) for every row, in completion order."""
    from wit_builder.resize import ImageResizer

    fetcher = _fetcher_for(cfg.fetch_settings())  # DNS cache and domain limits shared across shards
    resizer = ImageResizer(cfg.resize_settings())

    def work(i: int) -> tuple[bytes | None, str | None]:
        return _fetch_one(fetcher, rows[i]["url"], cfg.max_pixels, cfg.retries)

    with cf.ThreadPoolExecutor(cfg.threads_per_task, thread_name_prefix="fetch") as pool:
        for i, (prepared, error) in _imap_unordered(pool, work, range(len(rows)), 2 * cfg.threads_per_task):
            if error is not None:
                yield i, None, error
                continue
            try:
                yield i, resizer(prepared), None
            except ImageRejected as e:
                yield i, None, e.reason


def _record(row: dict[str, Any], shard: str, resized: Any, error: str | None) -> dict[str, Any]:
    ok = resized is not None
    return {
        "key": row["uid"],
        "uid": row["uid"],
        "url": row["url"],
        "caption": row["caption"],
        "query_id": row["query_id"],
        "query_ids": row["query_ids"],
        "shard": shard,
        "status": "success" if ok else "failed",
        "error": None if ok else error,
        "width": resized.width if ok else None,
        "height": resized.height if ok else None,
        "original_width": resized.original_width if ok else None,
        "original_height": resized.original_height if ok else None,
        "bytes": len(resized.data) if ok else None,
        "sha256": hashlib.sha256(resized.data).hexdigest() if ok else None,
    }


def _sample_members(rec: dict[str, Any], image: bytes, ext: str) -> list[tuple[str, bytes]]:
    meta = {k: rec[k] for k in ("key", "uid", "url", "query_id", "query_ids", "width", "height",
                                "original_width", "original_height", "sha256")}
    key = rec["key"]
    return [
        (f"{key}.{ext}", image),
        (f"{key}.json", json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()),
        (f"{key}.txt", rec["caption"].encode("utf-8", "surrogatepass")),
    ]


def _write_shard(out_dir: str, shard: str, records: list[dict[str, Any]], members: list[tuple[str, bytes]],
                 seconds: float) -> dict[str, Any]:
    """tar, then parquet, then stats (the completion marker), each atomic."""
    import pyarrow as pa

    from wit_builder.tarwriter import write_tar

    members.sort(key=lambda m: m[0])
    records.sort(key=lambda r: r["key"])
    tar_bytes = write_tar(tar_path(out_dir, shard), members)
    io.write_parquet(pa.Table.from_pylist(records, schema=schema.SAMPLES), samples_path(out_dir, shard))
    errors = Counter(r["error"] for r in records if r["status"] != "success")
    ok = sum(r["status"] == "success" for r in records)
    stats = {
        "shard": shard,
        "count": len(records),
        "successes": ok,
        "failed": len(records) - ok,
        "errors": dict(sorted(errors.items())),
        "image_bytes": sum(r["bytes"] or 0 for r in records),
        "tar_bytes": tar_bytes,
        "seconds": round(seconds, 3),
    }
    io.write_json(stats, stats_path(out_dir, shard))
    return stats


def download_shard(spec: ShardSpec, cfg: Config, out_dir: str) -> dict[str, Any]:
    """Download one shard and write its tar, parquet and stats; returns the stats."""
    start = time.monotonic()
    rows = read_shard_rows(spec)
    ext = cfg.encode_format
    records: list[dict[str, Any] | None] = [None] * len(rows)
    members: list[tuple[str, bytes]] = []
    first: dict[str, int] = {}
    todo = []
    for i, row in enumerate(rows):
        if row["uid"] in first:  # a uid twice in the selection: keep the first, count the rest
            records[i] = _record(row, spec.name, None, "duplicate_uid")
        else:
            first[row["uid"]] = i
            todo.append(i)
    sub = [rows[i] for i in todo]
    for j, resized, error in _download_rows(sub, cfg):
        rec = _record(sub[j], spec.name, resized, error)
        records[todo[j]] = rec
        if resized is not None:
            members.extend(_sample_members(rec, resized.data, ext))
    return _write_shard(out_dir, spec.name, [r for r in records if r is not None], members,
                        time.monotonic() - start)


def retry_shard(spec: ShardSpec, cfg: Config, out_dir: str) -> dict[str, Any]:
    """Re-fetch the transient failures of a finished shard; rewrite it if any changed."""
    from wit_builder.tarwriter import read_tar

    start = time.monotonic()
    shard = spec.name
    records = io.read_parquet(samples_path(out_dir, shard)).to_pylist()
    todo = [i for i, r in enumerate(records) if r["status"] != "success" and is_transient(r["error"])]
    stats = io.read_json(stats_path(out_dir, shard))
    if not todo:
        return {**stats, "retried": 0, "recovered": 0}
    sub = [records[i] for i in todo]
    changed, new_members = 0, []
    for j, resized, error in _download_rows(sub, cfg):
        old = sub[j]
        rec = _record(old, shard, resized, error)
        if rec != old:
            records[todo[j]] = rec
            changed += 1
        if resized is not None:
            new_members.extend(_sample_members(rec, resized.data, cfg.encode_format))
    recovered = sum(1 for i in todo if records[i]["status"] == "success")
    if changed:
        members = list(read_tar(tar_path(out_dir, shard))) + new_members
        stats = _write_shard(out_dir, shard, records, members, stats.get("seconds", 0) + time.monotonic() - start)
    return {**stats, "retried": len(todo), "recovered": recovered}


_SHARD_FUNCTIONS: dict[str, Callable[[ShardSpec, Config, str], dict]] = {}


def _guarded(job: tuple[str, ShardSpec, Config, str]) -> dict:
    """Ray task body for (function name, spec, cfg, out_dir); an exception comes back as
    {"error": ...} so the driver can retry the shard after a backoff."""
    name, spec, cfg, out_dir = job
    try:
        return _SHARD_FUNCTIONS[name](spec, cfg, out_dir)
    except Exception as e:  # a systemic problem (disk, permissions): the driver retries the shard
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}


_SHARD_FUNCTIONS.update(download_shard=download_shard, retry_shard=retry_shard)


# -- driver ------------------------------------------------------------------------------


def _run_tasks(specs: list[ShardSpec], fn: Callable, cfg: Config, out_dir: str, progress: bool,
               desc: str, is_done: Callable[[ShardSpec], bool]) -> list[str]:
    """Run `fn` over `specs` as Ray tasks; rounds with backoff for shards not done after one.

    Returns the task errors seen (for shards that were done in the end, e.g. a retry that
    failed and left the shard as it was); raises if a shard is still not done.
    """
    from wit_builder import parallel

    remaining = list(specs)
    last_error = ""
    errors: list[str] = []
    total = sum(s.rows for s in specs)
    seen = ok = 0
    start = time.monotonic()
    with bar(total=total, desc=desc, unit="img", enabled=progress) as pbar:
        for attempt in range(cfg.shard_attempts):
            if not remaining:
                break
            if attempt:
                time.sleep(cfg.retry_backoff * 2 ** (attempt - 1))
            try:
                jobs = [(fn.__name__, spec, cfg, out_dir) for spec in remaining]
                for (_, spec, _, _), res in parallel.map_tasks(_guarded, jobs, desc=desc, progress=False,
                                                               max_retries=cfg.task_retries, unit="shard"):
                    if "error" in res:
                        last_error = f"shard {spec.name}: {res['error']}"
                        errors.append(last_error)
                        continue
                    seen += res["count"]
                    ok += res["successes"]
                    pbar.update(res["count"])
                    rate = seen / max(time.monotonic() - start, 1e-9)
                    pbar.set_postfix_str(f"ok {100 * ok / max(seen, 1):.1f}% {rate:,.0f} img/s")
            except Exception as e:  # Ray gave up on a task (its worker died more than task_retries times)
                last_error = f"{type(e).__name__}: {e}"
            remaining = [s for s in remaining if not is_done(s)]
    if remaining:
        names = ", ".join(s.name for s in remaining[:5])
        raise RuntimeError(
            f"download: {len(remaining)} shard(s) unfinished after {cfg.shard_attempts} attempts "
            f"({names}...); last error: {last_error}"
        )
    return errors


def _plan_from(ctx: StageContext, cfg: Config) -> list[ShardSpec]:
    in_dir = ctx.stage_dir("balance")
    parts = selected_parts(in_dir)
    if not parts:
        raise ConfigError(f"download: no selected/part-*.parquet under {in_dir} (run the balance stage first)")
    return plan_shards(parts, cfg.shard_size)


def _result(specs: list[ShardSpec], out_dir: str, seconds: float, extra: dict[str, Any]) -> StageResult:
    rows_in = ok = image_bytes = 0
    dropped: Counter = Counter()
    for spec in specs:
        path = stats_path(out_dir, spec.name)
        if not io.exists(path):
            continue
        st = io.read_json(path)
        rows_in += st["count"]
        ok += st["successes"]
        image_bytes += st.get("image_bytes", 0)
        dropped.update(st["errors"])
    res = StageResult(rows_in=rows_in, rows_out=ok, dropped=dict(sorted(dropped.items())), seconds=seconds,
                      extra={"shards": len(specs), "image_bytes": image_bytes, **extra})
    res.check_accounting()
    return res


def _remove_stale_tmp(out_dir: str) -> None:
    """Delete temporary files a killed run left behind (".{name}.{id}.tmp")."""
    import os.path

    fs, inner = io.filesystem(out_dir)
    for p in fs.ls(inner, detail=False):
        base = os.path.basename(p)
        if base.startswith(".") and base.endswith(".tmp"):
            fs.rm(p)


def run(ctx: StageContext, cfg: Config) -> StageResult:
    """Download every selected sample (skipping finished shards unless ctx.force)."""
    with Timer() as t:
        specs = _plan_from(ctx, cfg)
        out_dir = ctx.stage_dir("download")
        io.makedirs(out_dir)
        _remove_stale_tmp(out_dir)
        if ctx.force:
            for spec in specs:
                io.remove(stats_path(out_dir, spec.name))
        done = lambda s: io.exists(stats_path(out_dir, s.name))  # noqa: E731
        todo = [s for s in specs if not done(s)]
        if todo:
            _run_tasks(todo, download_shard, cfg, out_dir, ctx.progress, "download", done)
        skipped = len(specs) - len(todo)
    res = _result(specs, out_dir, t.seconds, {"shards_skipped": skipped})
    expected = sum(s.rows for s in specs)
    if res.rows_in != expected:  # a stats file from another plan (shard_size changed by hand)
        raise RuntimeError(f"download: stats cover {res.rows_in} rows but the selection has {expected}")
    return res


def retry_failed(ctx: StageContext, cfg: Config) -> StageResult:
    """Re-attempt transient failures (timeout, 5xx, 429, resets) of finished shards."""
    with Timer() as t:
        specs = _plan_from(ctx, cfg)
        out_dir = ctx.stage_dir("download")
        finished = [s for s in specs if io.exists(stats_path(out_dir, s.name))]
        todo = []
        for spec in finished:
            errors = io.read_json(stats_path(out_dir, spec.name)).get("errors", {})
            if any(is_transient(e) for e in errors):
                todo.append(spec)
        before = _result(finished, out_dir, 0.0, {}).rows_out
        marker = {s.name: io.read_json(stats_path(out_dir, s.name)) for s in todo}
        done = lambda s: io.exists(stats_path(out_dir, s.name))  # noqa: E731
        if todo:
            errors = _run_tasks(todo, retry_shard, cfg, out_dir, ctx.progress, "download retry", done)
            if errors:
                raise RuntimeError(f"download --retry-failed: {len(errors)} shard(s) failed: {errors[0]}")
        rewritten = [s.name for s in todo if io.read_json(stats_path(out_dir, s.name)) != marker[s.name]]
    res = _result(finished, out_dir, t.seconds, {
        "shards_retried": len(todo), "shards_rewritten": len(rewritten), "rewritten_names": rewritten,
        "shards_unfinished": len(specs) - len(finished),
    })
    res.extra["recovered"] = res.rows_out - before
    return res
