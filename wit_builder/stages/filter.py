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

Three steps: (1) per shard, on Ray actors that load the language model and the CLIP model once
each: checks + features -> filtered/_features/{shard}.parquet (skipped on rerun when present;
byte-identical copies are hashed once per worker); (2) one global dedup pass over the features'
uid/sha256/phash, out of core in DuckDB (`dedup_memory_limit`, spilling under
filtered/_dedup_tmp; see filters/dedup_global.py); (3) per shard,
filtered/{shard}.parquet with the feature columns (sha256, phash, lang, lang_prob, clip_score)
after the required ones. Every file is written atomically.

Example:
    >>> from wit_builder.config import from_dict
    >>> from_dict(Config, {"languages": ["en", "de"], "near_dedup_distance": 2}, "x [filter]").languages
    ['en', 'de']
"""

from __future__ import annotations

import functools
import io as _io
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from wit_builder import io, schema
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
        from wit_builder.filters.clip_score import ClipScorer

        import torch

        torch.set_num_threads(1)
        worker.scorer = ClipScorer(
            cfg.clip_model, cfg.clip_checkpoint, cfg.clip_model_config, cfg.clip_device, cfg.clip_batch_size
        )
    return worker


def _read_successes(parquet_path: str) -> pa.Table:
    cols = ["key", "uid", "shard", "status", "caption", "width", "height",
            "original_width", "original_height", "sha256"]
    table = io.read_parquet(parquet_path, columns=cols)
    return table.filter(pc.equal(table["status"], "success"))


def _image_members(tar_path: str, wanted: set[str]):
    """Yield (key, image bytes) for the image members of `wanted` keys, in tar order."""
    import tarfile

    import fsspec

    with fsspec.open(tar_path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for m in tar:
            key, _, ext = m.name.rpartition(".")
            if m.isfile() and ext.lower() in IMAGE_EXTS and key in wanted:
                yield key, tar.extractfile(m).read()


def shard_features(worker: _Worker, job: tuple[str, str, str]) -> int:
    """Step 1 for one download shard: per-sample checks and features -> features parquet.

    `job` = (download parquet, download tar, output features parquet); returns rows written.
    """
    from PIL import Image

    parquet_path, tar_path, out_path = job
    cfg = worker.cfg
    rows = _read_successes(parquet_path).to_pylist()
    index = {r["key"]: i for i, r in enumerate(rows)}
    n = len(rows)
    reason: list[str | None] = ["decode_error"] * n  # until the image is seen in the tar
    ph: list[int | None] = [None] * n
    lang: list[str | None] = [None] * n
    lang_prob: list[float | None] = [None] * n
    clip: list[float | None] = [None] * n
    pending: list[tuple[int, Any]] = []  # (row, decoded image) awaiting a CLIP batch

    def flush() -> None:
        if not pending:
            return
        scores = worker.scorer.score([im for _, im in pending], [rows[i]["caption"] for i, _ in pending])
        for (i, _), s in zip(pending, scores.tolist()):
            clip[i] = s
            if s < cfg.clip_min_score:
                reason[i] = "clip_score"
        pending.clear()

    for key, data in _image_members(tar_path, set(index)) if n else ():
        i = index[key]
        r = rows[i]
        width = r["original_width"] or r["width"] or 0
        height = r["original_height"] or r["height"] or 0
        why = cfg.rules.check(width, height, r["caption"])
        if worker.lid is not None:
            lang[i], lang_prob[i] = worker.lid.detect(r["caption"])
            if why is None and is_other_language(lang[i], lang_prob[i], cfg.languages,
                                                 cfg.language_min_confidence):
                why = "language"
        reason[i] = why
        if why is not None:  # dropped by a cheap check: no need to decode
            continue
        try:
            ph[i] = worker.phash_of(r["sha256"], data)
        except Exception:  # a truncated or foreign file: a row with a reason, never a crash
            reason[i] = "decode_error"
            continue
        if worker.scorer is not None:
            try:
                with Image.open(_io.BytesIO(data)) as img:
                    pending.append((i, img.convert("RGB")))
            except Exception:
                reason[i] = "decode_error"
                continue
            if len(pending) >= cfg.clip_batch_size:
                flush()
    flush()
    table = pa.table(
        {
            "key": [r["key"] for r in rows],
            "uid": [r["uid"] for r in rows],
            "shard": [r["shard"] for r in rows],
            "reason": reason,
            "sha256": [r["sha256"] for r in rows],
            "phash": pa.array(ph, pa.uint64()),
            "lang": lang,
            "lang_prob": pa.array(lang_prob, pa.float32()),
            "clip_score": pa.array(clip, pa.float32()),
        },
        schema=FEATURES,
    )
    io.write_parquet(table, out_path)
    return n


# ---------------------------------------------------------------- the stage


def _download_shards(download_dir: str) -> list[tuple[str, str, str]]:
    """(shard name, parquet path, tar path) of every finished download shard, in order."""
    out = []
    for path in io.listdir(download_dir, ".parquet"):
        m = SHARD_RE.match(path.rsplit("/", 1)[-1])
        if not m:
            continue
        name = m.group(1)
        if not io.exists(io.join(download_dir, f"{name}_stats.json")):
            raise ConfigError(f"download shard {name} in {download_dir} is unfinished (no {name}_stats.json): "
                              "finish the download stage first")
        out.append((name, path, io.join(download_dir, f"{name}.tar")))
    return out


def remove_stale_tmp(directory: str) -> None:
    """Delete the temporary files (".{name}.{id}.tmp") a killed run left in `directory`."""
    fs, inner = io.filesystem(directory)
    if not fs.exists(inner):
        return
    for p in fs.ls(inner, detail=False):
        base = p.rstrip("/").rsplit("/", 1)[-1]
        if base.startswith(".") and base.endswith(".tmp"):
            fs.rm(p)


def _check_languages(cfg: Config) -> None:
    if not cfg.languages:
        return
    known = set(known_languages())
    for key in ("languages", "language_candidates"):
        unknown = [code for code in getattr(cfg, key) if code not in known]
        if unknown:
            raise ConfigError(f"[filter] key {key!r}: unknown language codes {unknown} "
                              f"(py3langid knows: {', '.join(sorted(known))})")


def _check_clip(cfg: Config) -> None:
    if not cfg.clip_model:
        return
    import open_clip

    if cfg.clip_model_config:
        open_clip.add_model_config(cfg.clip_model_config)
    if cfg.clip_model not in open_clip.list_models():
        raise ConfigError(f"[filter] key 'clip_model': unknown open_clip model {cfg.clip_model!r} "
                          "(give clip_model_config for a custom architecture)")


def run(ctx: StageContext, cfg: Config) -> StageResult:
    """Filter every successful download; see the module docstring for reasons and steps."""
    download_dir = ctx.stage_dir("download")
    out_dir = ctx.stage_dir("filter")
    feat_dir = io.join(out_dir, FEATURES_DIR)
    shards = _download_shards(download_dir)
    _check_languages(cfg)
    _check_clip(cfg)
    for d in (out_dir, feat_dir):
        remove_stale_tmp(d)
    todo = [
        (pq, tar, io.join(feat_dir, f"{name}.parquet"))
        for name, pq, tar in shards
        if ctx.force or not io.exists(io.join(feat_dir, f"{name}.parquet"))
    ]
    if todo:
        from wit_builder import parallel

        workers = min(len(todo), cfg.workers or ctx.num_cpus or 1)
        for _ in parallel.map_actors(
            functools.partial(_setup, cfg), shard_features, todo,
            desc="filter", num_actors=workers, progress=ctx.progress, total=len(todo), unit="shard",
            num_gpus=cfg.gpus_per_worker,
        ):
            pass
    # step 2: global dedup, out of core (DuckDB); marks come sorted by shard
    names = [name for name, _, _ in shards]
    feature_paths = [io.join(feat_dir, f"{name}.parquet") for name in names]
    tmp = io.join(out_dir, "_dedup_tmp") if io.is_local(out_dir) else tempfile.mkdtemp(prefix="wit-dedup-")
    io.remove(tmp)
    io.makedirs(tmp)
    marks = duplicate_marks(feature_paths, exact=cfg.exact_dedup, max_distance=cfg.near_dedup_distance,
                            tmp_dir=tmp, memory_limit=cfg.dedup_memory_limit)
    next_mark = next(marks, None)
    # step 3: per-shard output
    dropped: dict[str, int] = {}
    rows_in = 0
    for fi, (name, feature_path) in enumerate(zip(names, feature_paths)):
        shard_marks: dict[str, str] = {}
        while next_mark is not None and next_mark[0] == fi:
            shard_marks[next_mark[1]] = next_mark[2]
            next_mark = next(marks, None)
        part = io.read_parquet(feature_path)
        rows_in += part.num_rows
        part_reasons = [
            reason if reason is not None else shard_marks.get(uid)
            for uid, reason in zip(part["uid"].to_pylist(), part["reason"].to_pylist())
        ]
        for reason, count in Counter(r for r in part_reasons if r is not None).items():
            dropped[reason] = dropped.get(reason, 0) + count
        out_path = io.join(out_dir, f"{name}.parquet")
        if io.exists(out_path) and not ctx.force:
            continue
        table = pa.table(
            {
                "key": part["key"], "uid": part["uid"], "shard": part["shard"],
                "drop_reason": pa.array(part_reasons, pa.string()),
                "sha256": part["sha256"], "phash": part["phash"], "lang": part["lang"],
                "lang_prob": part["lang_prob"], "clip_score": part["clip_score"],
            }
        )
        io.write_parquet(table, out_path, schema.FILTERED)
    io.remove(tmp)
    kept = rows_in - sum(dropped.values())
    return StageResult(
        rows_in=rows_in, rows_out=kept, dropped=dropped,
        extra={"shards": len(names), "clip_model": cfg.clip_model or None},
    )
