"""`filter` stage: decide, for every successfully downloaded sample, whether it is kept.

Reads download/{shard}.parquet (+ .tar), writes filtered/{shard}.parquet (schema.FILTERED): one
row per successful download, `drop_reason` null when kept, else the first reason that applies,
checked in this order:

    safety:blocklist:<name>  the sha256 of the stored or of the fetched (original) image bytes is
                     on that sha256 list, or the stored image's phash is
                     within the list's max_distance of an entry of that phash list
    safety:eval_duplicate  phash within eval_max_distance of an image in `eval_dirs` (the
                     matched eval image is kept in the `eval_match` column)
    too_small        original width < min_width or height < min_height
    bad_aspect       max(w, h) / min(w, h) > max_aspect_ratio
    caption_short    fewer than min_caption_words words or min_caption_chars characters
    language         another language than `languages` detected with >= language_min_confidence
    decode_error     the stored image is missing from the tar or does not decode (should not happen)
    safety:nsfw      NSFW score >= nsfw_threshold with nsfw_action = "drop" (only with nsfw on)
    clip_score       CLIP image-caption cosine < clip_min_score (only with a clip_model)
    duplicate_exact  same image bytes (sha256) as another passing sample with a smaller uid
    duplicate_near   perceptual hash within near_dedup_distance bits of a kept sample with a smaller uid

Safety checks come first, so a listed image is counted as removed for safety whatever else is
wrong with it; with a phash list or eval_dirs every image is hashed for them. The next four need
no decoding (sizes and captions come from the download parquet), so without phash lists images
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
clip_score, eval_match, nsfw_score) after the required ones. Every file is written atomically, markers
last. The eval images' phash index is built once, before step 1, and cached under
filtered/_work/ by the eval files' fingerprint (safety/evalset.py).

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
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from wit_builder import executor, io, schema
from wit_builder.config import ConfigError, path_field
from wit_builder.filters.basic import BasicRules
from wit_builder.filters.dedup_global import duplicate_marks
from wit_builder.filters.language import COMMON_WEB_LANGUAGES, is_other_language, known_languages
from wit_builder.safety import lists as safety_lists
from wit_builder.safety.lists import IMAGE_KINDS, MAX_PHASH_DISTANCE, ListSpec, check_specs
from wit_builder.safety.screen import EVAL_REASON, reason_for
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
    nsfw: NSFW score on the CLIP image embeddings (computed once per image, shared with the CLIP
        score; needs clip_model): "off", "zero_shot" (softmax mass on the unsafe prompts of
        nsfw_prompts) or "mlp" (LAION's CLIP-based NSFW-detector head from nsfw_head);
        filters/nsfw.py. The score is the `nsfw_score` column either way.
    nsfw_threshold: a score at or above this is NSFW (0..1).
    nsfw_action: "drop" (drop reason `safety:nsfw`) or "flag" (kept; counted as nsfw_flagged).
    nsfw_prompts: zero-shot prompt set, {unsafe = [...], safe = [...]}; empty = the defaults
        in filters/nsfw.py.
    nsfw_head: local PyTorch state-dict file of the MLP head (required with nsfw = "mlp";
        never downloaded; README "NSFW scoring" says where to get weights).
    workers: Ray actors for the per-shard step; 0 = the run's CPU count.
    gpus_per_worker: GPUs each actor reserves on a Ray cluster (e.g. 0.25 to share one GPU
        among four CLIP-scoring actors); 0 = CPU only, Ray then hides GPUs from the actor.
    blocklists: image lists, each `{name, kind = "sha256" | "phash", path, column, max_distance}`
        (safety.lists.ListSpec; a sha256 entry matches the stored image bytes or the bytes as
        fetched, before resizing/re-encoding: download's `original_sha256`; phash within max_distance
        bits, default 4); a listed image is dropped as `safety:blocklist:<name>`.
    eval_dirs: folders of evaluation images (local or fsspec; jpg, png, webp, gif, bmp, tiff);
        a sample whose image has a phash within eval_max_distance bits of one of them is
        dropped as `safety:eval_duplicate`, the eval image named in `eval_match`.
    eval_max_distance: Hamming distance (bits, 0..16) for eval decontamination.
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
    nsfw: Literal["off", "zero_shot", "mlp"] = "off"
    nsfw_threshold: float = 0.5
    nsfw_action: Literal["drop", "flag"] = "drop"
    nsfw_prompts: dict[str, list[str]] = field(default_factory=dict)
    nsfw_head: str = path_field("")
    workers: int = 0
    gpus_per_worker: float = 0.0
    blocklists: list[ListSpec] = field(default_factory=list)
    eval_dirs: list[str] = path_field([])
    eval_max_distance: int = 4

    def __post_init__(self) -> None:
        check_specs("blocklists", self.blocklists, IMAGE_KINDS)
        if not 0 <= self.eval_max_distance <= MAX_PHASH_DISTANCE:
            raise ValueError(f"eval_max_distance must be in 0..{MAX_PHASH_DISTANCE}, got {self.eval_max_distance}")
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
        if self.nsfw != "off" and not self.clip_model:
            raise ValueError("nsfw needs clip_model (the NSFW score uses its image embeddings)")
        if self.nsfw == "mlp" and not self.nsfw_head:
            raise ValueError("nsfw = 'mlp' needs nsfw_head (a local state-dict file; nothing is downloaded)")
        if not 0.0 <= self.nsfw_threshold <= 1.0:
            raise ValueError("nsfw_threshold must be in [0, 1]")
        if self.nsfw_prompts and (set(self.nsfw_prompts) != {"unsafe", "safe"} or not all(self.nsfw_prompts.values())):
            raise ValueError("nsfw_prompts must be {unsafe = [...], safe = [...]}, both non-empty")
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
        pa.field("eval_match", pa.string()),  # the eval image a safety:eval_duplicate matched
        pa.field("nsfw_score", pa.float32()),
    ]
)


@dataclass
class _Worker:
    cfg: Config
    lid: Any = None
    scorer: Any = None
    nsfw: Any = None  # filters.nsfw.ZeroShotNsfw or MlpNsfw: image embeddings -> scores
    screen: Any = None  # safety.screen.ImageScreen: image blocklists and the eval index
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


def _setup(cfg: Config, eval_index: str = "") -> _Worker:
    """Once per Ray actor: the language model, the CLIP model, the safety lists and the eval
    index (`eval_index`: the cached index file, "" = none)."""
    from wit_builder.filters.language import LanguageId  # py3langid: imported in workers only

    worker = _Worker(cfg, lid=LanguageId(cfg.candidates) if cfg.languages else None)
    if cfg.blocklists or eval_index:
        from wit_builder.safety.evalset import load_index
        from wit_builder.safety.screen import ImageScreen, load_image_lists

        index = load_index(eval_index, cfg.eval_max_distance) if eval_index else None
        worker.screen = ImageScreen(*load_image_lists(cfg.blocklists), eval_index=index)
    if cfg.clip_model:
        import torch

        from wit_builder.filters.clip_score import ClipScorer

        torch.set_num_threads(1)
        worker.scorer = ClipScorer(
            cfg.clip_model, cfg.clip_checkpoint, cfg.clip_model_config, cfg.clip_device, cfg.clip_batch_size
        )
        worker.nsfw = _nsfw_scorer(cfg, worker.scorer)
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
    if "original_sha256" in io.parquet_schema(parquet_path).names:  # absent from older runs
        cols.append("original_sha256")
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
        self.eval_match: list[str | None] = [None] * n
        self.nsfw: list[float | None] = [None] * n
        self.pending: list[tuple[int, Any]] = []  # (row, decoded image) awaiting a CLIP batch

    def safety_reason(self, i: int, data: bytes) -> str | None:
        """Image blocklists (sha256, phash) and the eval index: before every other check."""
        screen = self.worker.screen
        if screen is None:
            return None
        sha256 = self.rows[i]["sha256"]
        if screen.needs_phash:
            with contextlib.suppress(Exception):  # an image that does not decode: decode_error below
                self.phash[i] = self.worker.phash_of(sha256, data)
        reason, self.eval_match[i] = screen.check(sha256, self.phash[i], self.rows[i].get("original_sha256"))
        return reason

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

        self.reason[i] = self.safety_reason(i, data) or self.cheap_reason(i)
        if self.reason[i] is not None:  # dropped by a safety or cheap check: no need to decode
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
        """Embed the pending images once; NSFW-score them and score them against their captions."""
        if not self.pending:
            return
        scorer, cfg = self.worker.scorer, self.cfg
        embeddings = scorer.embed_images([im for _, im in self.pending])
        scores = scorer.score_embedded(embeddings, [self.rows[i]["caption"] for i, _ in self.pending])
        nsfw = self.worker.nsfw(embeddings).tolist() if self.worker.nsfw is not None else [None] * len(scores)
        for (i, _), score, unsafe in zip(self.pending, scores.tolist(), nsfw):
            self.clip[i], self.nsfw[i] = score, unsafe
            if unsafe is not None and unsafe >= cfg.nsfw_threshold and cfg.nsfw_action == "drop":
                self.reason[i] = NSFW_REASON
            elif score < cfg.clip_min_score:
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
                "eval_match": pa.array(self.eval_match, pa.string()),
                "nsfw_score": pa.array(self.nsfw, pa.float32()),
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


NSFW_REASON = "safety:nsfw"


def _nsfw_scorer(cfg: Config, scorer: Any) -> Any:
    """The NSFW scorer on `scorer`'s image embeddings, or None when nsfw is off."""
    if cfg.nsfw == "off":
        return None
    from wit_builder.filters import nsfw

    if cfg.nsfw == "mlp":
        return nsfw.MlpNsfw(cfg.nsfw_head, scorer.embed_dim, scorer.device)
    prompts = cfg.nsfw_prompts or {"unsafe": list(nsfw.DEFAULT_UNSAFE), "safe": list(nsfw.DEFAULT_SAFE)}
    return nsfw.ZeroShotNsfw(scorer, prompts["unsafe"], prompts["safe"])


def _flag_at(cfg: Config) -> float | None:
    """The threshold whose kept samples are counted as nsfw_flagged (flag mode only)."""
    return cfg.nsfw_threshold if cfg.nsfw != "off" and cfg.nsfw_action == "flag" else None


def _check_nsfw(cfg: Config) -> None:
    """Before any work: the MLP head loads and takes the CLIP model's embedding size."""
    if cfg.nsfw != "mlp":
        return
    import open_clip

    from wit_builder.filters.nsfw import HeadError, load_head

    model_cfg = open_clip.get_model_config(cfg.clip_model) or {}
    try:
        load_head(cfg.nsfw_head, model_cfg.get("embed_dim"))
    except HeadError as e:
        raise ConfigError(f"[filter] key 'nsfw_head': {e}") from None


class _ShardDecisions:
    """Step 3 for one shard, in shard order: the per-sample reason, else the shard's global
    duplicate mark -> filtered/{shard}.parquet. `marks` yields (shard index, uid, reason)
    sorted by shard index; shards done before a crash just skip their marks."""

    def __init__(self, marks, nsfw_flag_at: float | None = None):
        self.marks = marks
        self.nsfw_flag_at = nsfw_flag_at
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
                "eval_match": part["eval_match"],
                "nsfw_score": part["nsfw_score"],
            }
        )
        io.write_parquet(table, out_path, schema.FILTERED)
        flagged = 0
        if self.nsfw_flag_at is not None:  # kept samples at or above the NSFW threshold
            flagged = sum(
                r is None and v is not None and v >= self.nsfw_flag_at
                for r, v in zip(reasons, part["nsfw_score"].to_pylist())
            )
        return {
            "rows": part.num_rows,
            "dropped": dict(Counter(r for r in reasons if r is not None)),
            "nsfw_flagged": flagged,
        }


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


def preflight(cfg: Config) -> None:
    """Checks the runner makes before any stage starts: the image lists read and parse."""
    from wit_builder.safety.screen import load_image_lists

    load_image_lists(cfg.blocklists)


def input_digests(cfg: Config) -> list[dict[str, str]]:
    """The image blocklists with the sha256 of each file: the runner adds them to the stage's
    fingerprint (a changed list redoes the stage); the shards manifest lists them."""
    return safety_lists.describe("blocklist", cfg.blocklists)


def _prepare_safety(ctx: StageContext, cfg: Config, out_dir: str) -> tuple[str, dict[str, Any]]:
    """Read the image lists once here (a bad entry fails before any work), record them, and
    build or reuse the eval index; returns (the index file or "", its figures)."""
    from wit_builder.safety.evalset import build_index
    from wit_builder.safety.screen import load_image_lists

    load_image_lists(cfg.blocklists)
    safety_lists.write_record(out_dir, input_digests(cfg))
    if not cfg.eval_dirs:
        return "", {}
    try:
        return build_index(cfg.eval_dirs, io.join(ctx.work_dir("filter"), "eval_index"), threads=ctx.num_cpus)
    except FileNotFoundError as e:
        raise ConfigError(f"[filter] key 'eval_dirs': {e}") from None


def run(ctx: StageContext, cfg: Config) -> StageResult:
    """Filter every successful download; see the module docstring for reasons and steps."""
    download_dir = ctx.stage_dir("download")
    out_dir = ctx.stage_dir("filter")
    feat_dir = io.join(out_dir, FEATURES_DIR)
    shards = _download_shards(download_dir)
    _check_languages(cfg)
    _check_clip(cfg)
    _check_nsfw(cfg)
    eval_index, eval_info = _prepare_safety(ctx, cfg, out_dir)
    names = [name for name, _, _ in shards]
    feature_paths = [io.join(feat_dir, f"{name}.parquet") for name in names]
    # step 1: per-shard checks and features, on actors holding the models
    features = executor.Pass(
        "features",
        ctx.marker_dir("filter", "features"),
        shard_features,
        setup=functools.partial(_setup, cfg, eval_index),
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
                _ShardDecisions(marks, _flag_at(cfg)),
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
    for reason in [reason_for("blocklist", s.name) for s in cfg.blocklists] + [EVAL_REASON] * bool(eval_index):
        dropped.setdefault(reason, 0)  # every list in the summary, also when it matched nothing
    rows_in = totals.get("rows", 0)
    return StageResult(
        rows_in=rows_in,
        rows_out=rows_in - sum(dropped.values()),
        dropped=dropped,
        extra={
            "shards": len(names),
            "clip_model": cfg.clip_model or None,
            **eval_info,
            **({"nsfw": cfg.nsfw, "nsfw_flagged": totals.get("nsfw_flagged", 0)} if cfg.nsfw != "off" else {}),
        },
    )
