"""`filter` stage: decide, for every successfully downloaded sample, whether it is kept.

Reads download/{shard}.parquet (+ .tar), writes filtered/{shard}.parquet (schema.FILTERED): one
row per successful download, `drop_reason` null when kept, else the first reason that applies,
checked in this order:

    too_small        original width < min_width or height < min_height
    bad_aspect       max(w, h) / min(w, h) > max_aspect_ratio
    caption_short    fewer than min_caption_words words or min_caption_chars characters
    language         another language than `languages` detected with >= language_min_confidence
    decode_error     the stored image is missing from the tar or does not decode (should not happen)
    clip_score       CLIP image-caption cosine < clip_min_score (only with a clip_model)
    duplicate_exact  same image bytes (sha256) as another passing sample with a smaller uid
    duplicate_near   perceptual hash within near_dedup_distance bits of a kept sample with a smaller uid

The first four need no decoding (sizes and captions come from the download parquet), so images
they drop are never decoded (their phash is null). Duplicates are decided globally over the whole
run and only among samples that passed every per-sample check, so a sample is never dropped in
favour of a copy that was itself dropped.

Three steps: (1) an executor pass, per shard, on workers that load the language model and the
CLIP model once each (`setup`): checks + features -> filtered/_features/{shard}.parquet
(finished shards are skipped on rerun; byte-identical copies are hashed once per worker);
(2) one global dedup pass over the features' uid/sha256/phash, out of core in DuckDB
(`dedup_memory_limit`, spilling under filtered/_work/dedup; see filters/dedup_global.py);
(3) an executor pass in this process, per shard in order (it streams the dedup marks):
filtered/{shard}.parquet with the feature columns (sha256, phash, lang, lang_prob,
clip_score) after the required ones. Every file is written atomically, markers last.

Example:
    >>> from wit_builder.config import from_dict
    >>> from_dict(Config, {"languages": ["en", "de"], "near_dedup_distance": 2}, "x [filter]").languages
    ['en', 'de']
"""

from __future__ import annotations

import contextlib
import functools
import io as _io
import re
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from wit_builder import executor, io, schema
from wit_builder.config import ConfigError, path_field
from wit_builder.filters.basic import BasicRules
from wit_builder.filters.dedup_global import duplicate_marks
from wit_builder.filters.language import COMMON_WEB_LANGUAGES, is_other_language, known_languages
from wit_builder.stages.base import StageContext, StageResult

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SHARD_RE = re.compile(r"^(\d+)\.parquet$")
FEATURES_DIR = "_features"
PHASH_CACHE = 200_000  # entries per worker (~100 bytes each)


@dataclass(frozen=True)
class Config:
    """`[filter]` keys (0 or empty turns a check off):

    min_width, min_height: smallest original image size kept (pixels).
    max_aspect_ratio: largest max(w, h) / min(w, h) kept.
    min_caption_words, min_caption_chars: shortest caption kept.
    languages: caption languages kept (py3langid codes, mostly ISO 639-1); empty = no check.
    language_candidates: the languages the identifier chooses among (`languages` are always
        added); default: ~40 common web languages (filters/language.py says why); [] = all 140.
    language_min_confidence: drop a caption only when another language wins with at least this
        probability (0..1; 0 = whenever another language wins).
    exact_dedup: drop byte-identical images (sha256), keeping the smallest uid.
    near_dedup_distance: drop images whose 64-bit perceptual hash is within this many bits of a
        kept image with a smaller uid; 0 = identical hashes only; -1 = off (max 16). The
        search grows with the square of the hashes per band bucket: 2M rows at 4 take ~26 s
        here, 10M at 4 many minutes; use 0-2 for runs of many millions (benchmarks/RESULTS.md).
    dedup_memory_limit: DuckDB's memory limit for the global dedup (it spills beyond it).
    clip_model: open_clip model name (e.g. "ViT-B-32"); empty = no CLIP score.
    clip_checkpoint: local checkpoint file for clip_model (required with it; never downloaded).
    clip_model_config: optional open_clip model-config JSON for a custom architecture.
    clip_min_score: drop samples whose image-caption cosine is below this (-1 = score only).
    clip_device: "auto" (CUDA if visible to the worker), "cpu" or "cuda".
    clip_batch_size: images per CLIP forward pass.
    workers: Ray actors for the per-shard step; 0 = the run's CPU count.
    gpus_per_worker: GPUs each actor reserves on a Ray cluster (e.g. 0.25 to share one GPU
        among four CLIP-scoring actors); 0 = CPU only, Ray then hides GPUs from the actor.
    """

    min_width: int = 64
    min_height: int = 64
    max_aspect_ratio: float = 3.0
    min_caption_words: int = 2
    min_caption_chars: int = 5
    languages: list[str] = field(default_factory=lambda: ["en"])
    language_candidates: list[str] = field(default_factory=lambda: list(COMMON_WEB_LANGUAGES))
    language_min_confidence: float = 0.5
    exact_dedup: bool = True
    near_dedup_distance: int = 4
    dedup_memory_limit: str = "2GB"
    clip_model: str = ""
    clip_checkpoint: str = path_field("")
    clip_model_config: str = path_field("")
    clip_min_score: float = 0.28
    clip_device: str = "auto"
    clip_batch_size: int = 64
    workers: int = 0
    gpus_per_worker: float = 0.0

    def __post_init__(self) -> None:
        if min(self.min_width, self.min_height, self.min_caption_words, self.min_caption_chars) < 0:
            raise ValueError("min_width, min_height, min_caption_words, min_caption_chars must be >= 0")
        if self.max_aspect_ratio < 0:
            raise ValueError("max_aspect_ratio must be >= 0 (0 = off)")
        if not 0.0 <= self.language_min_confidence <= 1.0:
            raise ValueError("language_min_confidence must be in [0, 1]")
        if not -1 <= self.near_dedup_distance <= 16:
            raise ValueError("near_dedup_distance must be in -1..16 (-1 = off)")
        if self.clip_model and not self.clip_checkpoint:
            raise ValueError("clip_model needs clip_checkpoint (a local file; nothing is downloaded)")
        if self.gpus_per_worker < 0:
            raise ValueError("gpus_per_worker must be >= 0")
        if self.clip_batch_size < 1 or self.workers < 0:
            raise ValueError("clip_batch_size must be >= 1 and workers >= 0")
        if self.clip_device not in ("auto", "cpu", "cuda") and not self.clip_device.startswith("cuda:"):
            raise ValueError(f"clip_device must be auto, cpu or cuda[:n], got {self.clip_device!r}")

    @property
    def candidates(self) -> list[str] | None:
        """Languages the identifier chooses among (None = all it knows)."""
        return sorted(set(self.language_candidates) | set(self.languages)) if self.language_candidates else None

    @property
    def rules(self) -> BasicRules:
        return BasicRules(
            self.min_width, self.min_height, self.max_aspect_ratio, self.min_caption_words, self.min_caption_chars
        )


# ---------------------------------------------------------------- step 1: per-shard features

FEATURES = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("uid", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("reason", pa.string()),  # first per-sample reason, null = passed them all
        pa.field("sha256", pa.string()),
        pa.field("phash", pa.uint64()),
        pa.field("lang", pa.string()),
        pa.field("lang_prob", pa.float32()),
        pa.field("clip_score", pa.float32()),
    ]
)


@dataclass
class _Worker:
    cfg: Config
    lid: Any = None
    scorer: Any = None
    phashes: dict[str, int] = field(default_factory=dict)  # sha256 -> phash: byte copies decode once

    def phash_of(self, sha256: str | None, data: bytes) -> int:
        from wit_builder.filters.dedup import phash_bytes

        if sha256 and sha256 in self.phashes:
            return self.phashes[sha256]
        value = phash_bytes(data)
        if sha256:
            if len(self.phashes) >= PHASH_CACHE:
                self.phashes.clear()
            self.phashes[sha256] = value
        return value


def _setup(cfg: Config) -> _Worker:
    """Once per Ray actor: the language model and the CLIP model."""
    from wit_builder.filters.language import LanguageId  # py3langid: imported in workers only

    worker = _Worker(cfg, lid=LanguageId(cfg.candidates) if cfg.languages else None)
    if cfg.clip_model:
        import torch

        from wit_builder.filters.clip_score import ClipScorer

        torch.set_num_threads(1)
        worker.scorer = ClipScorer(
            cfg.clip_model, cfg.clip_checkpoint, cfg.clip_model_config, cfg.clip_device, cfg.clip_batch_size
        )
    return worker


def _read_successes(parquet_path: str) -> pa.Table:
    cols = [
        "key",
        "uid",
        "shard",
        "status",
        "caption",
        "width",
        "height",
        "original_width",
        "original_height",
        "sha256",
    ]
    table = io.read_parquet(parquet_path, columns=cols)
    return table.filter(pc.equal(table["status"], "success"))


def _image_members(tar_path: str, wanted: set[str]):
    """Yield (key, image bytes) for the image members of `wanted` keys, in tar order."""
    from wit_builder import tario

    for name, data in tario.read_tar(tar_path):
        key, _, ext = name.rpartition(".")
        if ext.lower() in IMAGE_EXTS and key in wanted:
            yield key, data


class _ShardFeatures:
    """The per-sample columns of one shard's features, filled image by image."""

    def __init__(self, worker: _Worker, rows: list[dict[str, Any]]):
        n = len(rows)
        self.worker, self.cfg, self.rows = worker, worker.cfg, rows
        self.reason: list[str | None] = ["decode_error"] * n  # until the image is seen in the tar
        self.phash: list[int | None] = [None] * n
        self.lang: list[str | None] = [None] * n
        self.lang_prob: list[float | None] = [None] * n
        self.clip: list[float | None] = [None] * n
        self.pending: list[tuple[int, Any]] = []  # (row, decoded image) awaiting a CLIP batch

    def cheap_reason(self, i: int) -> str | None:
        """Size, aspect, caption and language checks: no decoding needed."""
        r, cfg = self.rows[i], self.cfg
        width = r["original_width"] or r["width"] or 0
        height = r["original_height"] or r["height"] or 0
        why = cfg.rules.check(width, height, r["caption"])
        if self.worker.lid is not None:
            self.lang[i], self.lang_prob[i] = self.worker.lid.detect(r["caption"])
            if why is None and is_other_language(
                self.lang[i], self.lang_prob[i], cfg.languages, cfg.language_min_confidence
            ):
                why = "language"
        return why

    def add(self, i: int, data: bytes) -> None:
        """Row i's stored image: checks, perceptual hash, and a place in the next CLIP batch."""
        from PIL import Image

        self.reason[i] = self.cheap_reason(i)
        if self.reason[i] is not None:  # dropped by a cheap check: no need to decode
            return
        try:
            self.phash[i] = self.worker.phash_of(self.rows[i]["sha256"], data)
            if self.worker.scorer is not None:
                with Image.open(_io.BytesIO(data)) as img:
                    self.pending.append((i, img.convert("RGB")))
        except Exception:  # a truncated or foreign file: a row with a reason, never a crash
            self.reason[i] = "decode_error"
            return
        if len(self.pending) >= self.cfg.clip_batch_size:
            self.flush()

    def flush(self) -> None:
        """Score the pending images against their captions."""
        if not self.pending:
            return
        scores = self.worker.scorer.score(
            [im for _, im in self.pending], [self.rows[i]["caption"] for i, _ in self.pending]
        )
        for (i, _), score in zip(self.pending, scores.tolist()):
            self.clip[i] = score
            if score < self.cfg.clip_min_score:
                self.reason[i] = "clip_score"
        self.pending.clear()

    def table(self) -> pa.Table:
        rows = self.rows
        return pa.table(
            {
                "key": [r["key"] for r in rows],
                "uid": [r["uid"] for r in rows],
                "shard": [r["shard"] for r in rows],
                "reason": self.reason,
                "sha256": [r["sha256"] for r in rows],
                "phash": pa.array(self.phash, pa.uint64()),
                "lang": self.lang,
                "lang_prob": pa.array(self.lang_prob, pa.float32()),
                "clip_score": pa.array(self.clip, pa.float32()),
            },
            schema=FEATURES,
        )


def shard_features(worker: _Worker, job: tuple[str, str, str]) -> dict[str, int]:
    """Step 1 for one download shard: per-sample checks and features -> features parquet.

    `job` = (download parquet, download tar, output features parquet); returns {"rows"}.
    """
    parquet_path, tar_path, out_path = job
    rows = _read_successes(parquet_path).to_pylist()
    index = {r["key"]: i for i, r in enumerate(rows)}
    features = _ShardFeatures(worker, rows)
    for key, data in _image_members(tar_path, set(index)) if rows else ():
        features.add(index[key], data)
    features.flush()
    io.write_parquet(features.table(), out_path)
    return {"rows": len(rows)}


# ---------------------------------------------------------------- the stage


def _download_shards(download_dir: str) -> list[tuple[str, str, str]]:
    """(shard name, parquet path, tar path) of every download shard, in order (the download
    stage is finished: the runner checks that before this stage starts)."""
    out = []
    for path in io.listdir(download_dir, ".parquet"):
        m = SHARD_RE.match(path.rsplit("/", 1)[-1])
        if m:
            out.append((m.group(1), path, io.join(download_dir, f"{m.group(1)}.tar")))
    return out


def invalidate(ctx: StageContext, shards: list[str]) -> None:
    """The download shards named were rewritten (`download --retry-failed`): forget their
    features, and every decision (duplicates are global), so that the next run redoes those."""
    out_dir = ctx.stage_dir("filter")
    for name in shards:
        io.remove(io.join(out_dir, FEATURES_DIR, f"{name}.parquet"))
        io.remove(executor.marker_path(ctx.marker_dir("filter", "features"), name))
    executor.reset(ctx.marker_dir("filter", "write"))
    for path in io.listdir(out_dir, ".parquet"):
        io.remove(path)


def _check_languages(cfg: Config) -> None:
    if not cfg.languages:
        return
    known = set(known_languages())
    for key in ("languages", "language_candidates"):
        unknown = [code for code in getattr(cfg, key) if code not in known]
        if unknown:
            raise ConfigError(
                f"[filter] key {key!r}: unknown language codes {unknown} (py3langid knows: {', '.join(sorted(known))})"
            )


def _check_clip(cfg: Config) -> None:
    if not cfg.clip_model:
        return
    import open_clip

    if cfg.clip_model_config:
        open_clip.add_model_config(cfg.clip_model_config)
    if cfg.clip_model not in open_clip.list_models():
        raise ConfigError(
            f"[filter] key 'clip_model': unknown open_clip model {cfg.clip_model!r} "
            "(give clip_model_config for a custom architecture)"
        )


class _ShardDecisions:
    """Step 3 for one shard, in shard order: the per-sample reason, else the shard's global
    duplicate mark -> filtered/{shard}.parquet. `marks` yields (shard index, uid, reason)
    sorted by shard index; shards done before a crash just skip their marks."""

    def __init__(self, marks):
        self.marks = marks
        self.next = next(marks, None)

    def __call__(self, job: tuple[int, str, str]) -> dict[str, Any]:
        index, feature_path, out_path = job
        shard_marks: dict[str, str] = {}
        while self.next is not None and self.next[0] <= index:
            if self.next[0] == index:
                shard_marks[self.next[1]] = self.next[2]
            self.next = next(self.marks, None)
        part = io.read_parquet(feature_path)
        reasons = [
            reason if reason is not None else shard_marks.get(uid)
            for uid, reason in zip(part["uid"].to_pylist(), part["reason"].to_pylist())
        ]
        table = pa.table(
            {
                "key": part["key"],
                "uid": part["uid"],
                "shard": part["shard"],
                "drop_reason": pa.array(reasons, pa.string()),
                "sha256": part["sha256"],
                "phash": part["phash"],
                "lang": part["lang"],
                "lang_prob": part["lang_prob"],
                "clip_score": part["clip_score"],
            }
        )
        io.write_parquet(table, out_path, schema.FILTERED)
        return {"rows": part.num_rows, "dropped": dict(Counter(r for r in reasons if r is not None))}


@contextlib.contextmanager
def _dedup_dir(ctx: StageContext, out_dir: str) -> Iterator[str]:
    """A fresh local directory for the dedup's DuckDB files, removed afterwards (also when the
    stage fails): filtered/_work/dedup for a local run dir, else one under the system temp dir."""
    if io.is_local(out_dir):
        tmp = io.join(ctx.work_dir("filter"), "dedup")
        io.remove(tmp)
        io.makedirs(tmp)
        try:
            yield tmp
        finally:
            io.remove(tmp)
    else:
        with tempfile.TemporaryDirectory(prefix="wit-dedup-") as tmp:
            yield tmp


def run(ctx: StageContext, cfg: Config) -> StageResult:
    """Filter every successful download; see the module docstring for reasons and steps."""
    download_dir = ctx.stage_dir("download")
    out_dir = ctx.stage_dir("filter")
    feat_dir = io.join(out_dir, FEATURES_DIR)
    shards = _download_shards(download_dir)
    _check_languages(cfg)
    _check_clip(cfg)
    names = [name for name, _, _ in shards]
    feature_paths = [io.join(feat_dir, f"{name}.parquet") for name in names]
    # step 1: per-shard checks and features, on actors holding the models
    features = executor.Pass(
        "features",
        ctx.marker_dir("filter", "features"),
        shard_features,
        setup=functools.partial(_setup, cfg),
        tmp_dirs=(feat_dir,),
        workers=cfg.workers or ctx.num_cpus,
        num_gpus=cfg.gpus_per_worker,
        desc="filter",
        unit="shard",
    )
    executor.run_pass(
        features,
        [executor.Part(name, (pq, tar, fp)) for (name, pq, tar), fp in zip(shards, feature_paths)],
        progress=ctx.progress,
    )
    # step 2: global dedup, out of core (DuckDB); marks come sorted by shard. DuckDB's database
    # and spill files need a local directory: the run's scratch when the run dir is local, a
    # temporary directory of this machine when it is an object store.
    with _dedup_dir(ctx, out_dir) as tmp:
        marks = duplicate_marks(
            feature_paths,
            exact=cfg.exact_dedup,
            max_distance=cfg.near_dedup_distance,
            tmp_dir=tmp,
            memory_limit=cfg.dedup_memory_limit,
        )
        try:
            # step 3: per-shard decisions, in this process (it streams the marks)
            write = executor.Pass(
                "write",
                ctx.marker_dir("filter", "write"),
                _ShardDecisions(marks),
                local=True,
                tmp_dirs=(out_dir,),
                desc="filter: write",
                unit="shard",
            )
            counts = executor.run_pass(
                write,
                [
                    executor.Part(name, (i, fp, io.join(out_dir, f"{name}.parquet")))
                    for i, (name, fp) in enumerate(zip(names, feature_paths))
                ],
                progress=False,
            )
        finally:  # DuckDB's connection closes before its directory goes
            marks.close()
    totals = executor.sum_counts(counts.values())
    dropped = totals.get("dropped", {})
    rows_in = totals.get("rows", 0)
    return StageResult(
        rows_in=rows_in,
        rows_out=rows_in - sum(dropped.values()),
        dropped=dropped,
        extra={"shards": len(names), "clip_model": cfg.clip_model or None},
    )
