"""Pipeline files: one table per stage plus `[run]` and optional `[train]`, loaded into each
stage's frozen `Config` through the stage registry.

A pipeline file has one table per stage (`[queries]`, `[candidates]`, `[match]`, `[balance]`,
`[download]`, `[filter]`, `[shards]`) plus `[run]` (seed, cpus) and optional `[train]`. Every
key of a stage's table is a field of that stage's `Config`. Relative input paths are resolved
against the directory of the TOML file. `--set section.key=value` overrides take TOML values.
A stage's Config may name defaults taken from another stage (`inherit`, e.g. the shards
stage's `cap` = 0 means the balance stage's cap); `Pipeline.config_for` applies them.

Example:
    >>> p = load_pipeline("pipelines/demo.toml", check_paths=False)   # doctest: +SKIP
    >>> p.config_for("shards").cap == p.stages["balance"].cap          # doctest: +SKIP
    True
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tomllib
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

from wit_builder.config import ConfigError, RunConfig, from_dict, parse_override, resolve_paths, set_path
from wit_builder.stages import STAGE_ORDER
from wit_builder.stages.registry import config_class


@dataclass(frozen=True)
class Pipeline:
    """A loaded pipeline: the run settings, each stage's Config, and the raw `[train]` table."""

    source: str  # the TOML file
    run: RunConfig
    stages: dict[str, Any]  # stage name -> that stage's frozen Config
    train: dict[str, Any]  # passed to the trainer as-is (validated by it)

    def stage_hash(self, stage: str) -> str:
        """Hash of one stage's config (plus the seed), for change detection."""
        payload = {"stage": stage, "seed": self.run.seed, "config": _jsonable(self.stages[stage])}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "run": _jsonable(self.run),
            **{name: _jsonable(cfg) for name, cfg in self.stages.items()},
            "train": self.train,
        }

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]

    def config_for(self, stage: str) -> Any:
        """The stage's Config with its `inherit` defaults filled from the other stages: a field
        left at its zero value takes the named "stage.key" value."""
        cfg = self.stages[stage]
        links = getattr(type(cfg), "inherit", {})
        filled = {}
        for key, source in links.items():
            if not getattr(cfg, key):
                other, other_key = source.split(".", 1)
                filled[key] = getattr(self.stages[other], other_key)
        return dataclasses.replace(cfg, **filled) if filled else cfg


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    return obj


def load_pipeline(path: str, overrides: list[str] | None = None, check_paths: bool = True) -> Pipeline:
    """Load and validate a pipeline TOML; raises ConfigError naming the file and key."""
    if not os.path.exists(path):
        raise ConfigError(f"pipeline file not found: {path}")
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    for text in overrides or []:
        keys, value = parse_override(text)
        set_path(raw, keys, value, text)
    known = {"run", "train", *STAGE_ORDER}
    for section, value in raw.items():
        if section not in known:
            raise ConfigError(f"{path}: unknown section [{section}] (known: {', '.join(sorted(known))})")
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: [{section}] must be a table, got {value!r}")
    base_dir = os.path.dirname(os.path.abspath(path))
    run = from_dict(RunConfig, raw.get("run", {}), f"{path} [run]")
    stages: dict[str, Any] = {}
    for name in STAGE_ORDER:
        cls = config_class(name)
        cfg = from_dict(cls, raw.get(name, {}), f"{path} [{name}]")
        stages[name] = resolve_paths(cfg, base_dir, f"{path} [{name}]", check=check_paths)
    train = raw.get("train", {})
    if train:  # checked now, so that a bad [train] key fails before any stage runs
        from wit_builder.train.config import config_from_dict

        config_from_dict(train, f"{path} [train]", base_dir=base_dir)
    return Pipeline(source=os.path.abspath(path), run=run, stages=stages, train=train)
