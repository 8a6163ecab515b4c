"""Trainer configuration: frozen dataclasses loaded from a TOML file plus `--set key=value` overrides.

A trainer TOML holds the top-level keys of `TrainConfig` and the tables `[model]`, `[data]`,
`[optim]`, `[eval]`. A pipeline TOML whose trainer settings sit in one `[train]` table works
too. Unknown keys and wrong types raise `ConfigError` naming the key (the CLI exits with 2).

Example:
    >>> cfg = config_from_dict({"steps": 20, "optim": {"lr": 1e-3}}, where="x.toml")
    >>> cfg.steps, cfg.optim.lr, cfg.data.last_batch
    (20, 0.001, 'pad')
    >>> config_from_dict({"stpes": 20}, where="x.toml")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    wit_builder.config.ConfigError: x.toml: unknown key 'stpes' (known: steps, epochs, batch_size, ...)
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any, Literal

from wit_builder.config import ConfigError, from_dict, parse_value, path_field, resolve_paths, set_path

PATH_KEYS = {
    "pretrained",
    "zeroshot_dir",
    "classnames",
    "templates",
    "probe_train_dir",
    "probe_test_dir",
    "retrieval_manifest",
}
DEFAULT_TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates", "clip_80.txt")


@dataclass(frozen=True)
class ModelConfig:
    """`[model]`.

    name: an open_clip architecture name (`ViT-B-32`, ...), or the name given to `arch`.
    arch: an inline open_clip model config (`embed_dim`, `vision_cfg`, `text_cfg`), registered
        with open_clip under `name` (for tiny test models); empty = use the named architecture.
    pretrained: an open_clip checkpoint (file, or a checkpoint dir of ours), local or an fsspec
        URL (s3://...: downloaded first); never a hub tag.
    grad_checkpointing: recompute activations in the backward pass (less memory, ~30% slower).
    """

    name: str = "ViT-B-32"
    arch: dict[str, Any] = field(default_factory=dict)
    pretrained: str = path_field("")
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.arch:
            missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in self.arch]
            if missing:
                raise ValueError(f"model.arch lacks {', '.join(missing)}")


@dataclass(frozen=True)
class DataConfig:
    """`[data]`.

    workers: DataLoader worker processes per rank (decode + augment there); 0 = in the main process.
    shuffle_buffer: samples held per worker for shuffling (raw bytes, before decoding).
    last_batch: "pad" (the epoch's tail is padded with masked rows: every sample is seen exactly
        once) or "drop" (the epoch ends at the first step where a rank cannot fill its batch).
    holdout_fraction: fraction of samples (by a hash of the key) kept out of training; they are
        the held-out pairs for retrieval eval.
    chunk: rows per message from a worker to the main process (0 = the per-rank batch).
    verify_sha256: check every tar's sha256 against the manifest before training (reads all data).
    """

    workers: int = 2
    shuffle_buffer: int = 1000
    last_batch: Literal["pad", "drop"] = "pad"
    holdout_fraction: float = 0.0
    chunk: int = 0
    verify_sha256: bool = False

    def __post_init__(self) -> None:
        if self.workers < 0 or self.shuffle_buffer < 1 or self.chunk < 0:
            raise ValueError("data.workers and data.chunk must be >= 0, data.shuffle_buffer >= 1")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError("data.holdout_fraction must be in [0, 1)")


@dataclass(frozen=True)
class OptimConfig:
    """`[optim]`: AdamW (no weight decay on gains, biases, logit scale), cosine schedule with
    linear warmup from 0 to `lr`, then down to `min_lr`; `grad_clip` = max global L2 norm (0 = off)."""

    lr: float = 5e-4
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 0
    min_lr: float = 0.0
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError("optim.lr must be > 0, optim.warmup_steps and optim.grad_clip >= 0")


@dataclass(frozen=True)
class EvalConfig:
    """`[eval]`: which evaluations run every `every` steps (0 = only at the end) and at the end.

    zeroshot_dir: image folder, one sub-folder per class; classnames: file with one class name per
        line in sorted sub-folder order (empty = folder names, `_` -> space); templates: prompt
        templates, `{}` = class name (default: the 80 CLIP templates shipped with the package).
    probe_train_dir / probe_test_dir: image folders for a linear probe (logistic regression on
        frozen image features); probe_l2: L2 strengths tried, the best on a validation split of
        the train folder is refitted on all of it.
    retrieval_manifest: a shards manifest of held-out pairs for image<->text recall@1/5/10
        (empty = the `data.holdout_fraction` pairs of the training manifest, if any).
    batch_size: images or texts per forward pass.
    """

    every: int = 0
    zeroshot_dir: str = path_field("")
    classnames: str = path_field("")
    templates: str = path_field("")
    probe_train_dir: str = path_field("")
    probe_test_dir: str = path_field("")
    probe_l2: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    retrieval_manifest: str = path_field("")
    batch_size: int = 64


@dataclass(frozen=True)
class TrainConfig:
    """The trainer's settings (top-level keys of the TOML).

    steps: optimizer steps to run (0 = `epochs` full epochs). epochs: upper bound on epochs.
    batch_size: GLOBAL batch per optimizer step (split over ranks, then over `accum_steps`).
    accum_steps: micro-batches per step; features are cached and recomputed so the negatives
        span the whole global batch. precision: "auto" = bf16 autocast on CUDA, fp32 on CPU.
    device: "auto" = CUDA when available. log_every / save_every (0 = only at the end): steps.
    keep_checkpoints: how many step checkpoints to keep (the newest).
    threads: CPU threads per process for torch (0 = torch's default). On a shared or small CPU,
        1 is often many times faster for tiny models (no spinning threads fighting for cores).
    """

    steps: int = 0
    epochs: int = 1
    batch_size: int = 256
    accum_steps: int = 1
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = 10
    save_every: int = 0
    keep_checkpoints: int = 2
    threads: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.steps < 0 or self.epochs < 1 or self.batch_size < 1 or self.accum_steps < 1:
            raise ValueError("steps must be >= 0, epochs, batch_size and accum_steps >= 1")
        if self.batch_size % self.accum_steps:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by accum_steps {self.accum_steps}")
        if self.log_every < 1 or self.save_every < 0 or self.keep_checkpoints < 1 or self.threads < 0:
            raise ValueError("log_every and keep_checkpoints must be >= 1, save_every and threads >= 0")


def config_from_dict(raw: dict[str, Any], where: str = "train config", base_dir: str | None = None) -> TrainConfig:
    """Validate a raw table into a TrainConfig; relative paths resolve against `base_dir`."""
    if set(raw) == {"train"} and isinstance(raw["train"], dict):
        raw = raw["train"]
    cfg = from_dict(TrainConfig, raw, where)
    return resolve_paths(cfg, base_dir or os.getcwd(), where)


def apply_override(raw: dict[str, Any], text: str) -> None:
    """Apply one `key=value` or `table.key=value` override (value parsed as TOML, bare words as
    strings) to the raw table, in place.

    >>> raw = {}
    >>> apply_override(raw, "optim.lr=1e-3"); apply_override(raw, "steps=20"); raw
    {'optim': {'lr': 0.001}, 'steps': 20}
    """
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, value_text = text.split("=", 1)
    keys = [k.strip() for k in key.split(".")]
    if len(keys) > 1 and keys[0] == "train":  # pipeline-style `train.steps=20`
        keys = keys[1:]
    node = raw.setdefault("train", {}) if set(raw) == {"train"} else raw
    set_path(node, keys, parse_value(value_text), text)


def load_config(path: str | None, overrides: list[str] | None = None) -> TrainConfig:
    """Load a trainer TOML (or only defaults when `path` is None) with `--set` overrides."""
    raw: dict[str, Any] = {}
    where = "train config"
    base_dir = os.getcwd()
    if path:
        if not os.path.exists(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        where, base_dir = path, os.path.dirname(os.path.abspath(path))
    for text in overrides or []:
        apply_override(raw, _absolute_path_override(text))
    return config_from_dict(raw, where, base_dir)


def _absolute_path_override(text: str) -> str:
    """A relative path given on the command line means relative to the current directory, not to
    the TOML file: make it absolute before the TOML-relative resolution sees it."""
    key, _, value = text.partition("=")
    if key.strip().rsplit(".", 1)[-1] not in PATH_KEYS:
        return text
    path = parse_value(value)
    if not isinstance(path, str) or not path or "://" in path or os.path.isabs(path):
        return text
    return f"{key}={json.dumps(os.path.abspath(path))}"
