"""Run pipeline stages in order, skip the ones already done, redo what a change made stale.

Each stage's output dir holds `_FINGERPRINT.json` (written when the stage starts) and
`_SUCCESS.json` (written when it finishes, with its StageResult). A stage's fingerprint hashes
its own config, the seed, its input files (path, size, mtime) for the stages that read user
input, and the fingerprint of the stage before it — so a change anywhere redoes that stage and
everything after it, and an unchanged finished stage is never redone.

Example (see tests/test_runner.py for a full run):
    >>> from wit_builder.config import load_pipeline  # doctest: +SKIP
    >>> run_pipeline(load_pipeline("pipelines/demo.toml"), "runs/r1")  # doctest: +SKIP
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
from dataclasses import dataclass, fields
from typing import Any, Callable

from wit_builder import __version__, io
from wit_builder.config import ConfigError, Pipeline, stage_module
from wit_builder.stages import OUTPUT_DIR, STAGE_ORDER
from wit_builder.stages.base import StageContext, StageResult, Timer

SUCCESS = "_SUCCESS.json"
FINGERPRINT = "_FINGERPRINT.json"


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _input_files(cfg: Any) -> list[list[Any]]:
    """(path, size, mtime) of every local file named by the config's path fields."""
    out: list[list[Any]] = []
    for f in fields(cfg):
        if not f.metadata.get("path"):
            continue
        value = getattr(cfg, f.name)
        for p in value if isinstance(value, (list, tuple)) else [value]:
            if not p or "://" in p:
                out.append([p, None, None])
                continue
            for hit in sorted(glob.glob(p)) or [p]:
                st = os.stat(hit) if os.path.exists(hit) else None
                out.append([hit, st.st_size if st else None, int(st.st_mtime) if st else None])
    return out


def fingerprints(pipeline: Pipeline) -> dict[str, str]:
    """Chained fingerprint per stage: own config + inputs + the previous stage's fingerprint."""
    out: dict[str, str] = {}
    prev = ""
    for name in STAGE_ORDER:
        payload = {
            "stage": name,
            "config": pipeline.stage_hash(name),
            "inputs": _input_files(pipeline.stages[name]),
            "prev": prev,
        }
        prev = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
        out[name] = prev
    return out


@dataclass
class StageState:
    name: str
    state: str  # done | stale | partial | pending
    result: StageResult | None


def stage_states(run_dir: str, fps: dict[str, str] | None = None) -> list[StageState]:
    """What is on disk for each stage; with `fps`, a finished stage of another config is stale."""
    states = []
    for name in STAGE_ORDER:
        d = io.join(run_dir, OUTPUT_DIR[name])
        success = io.join(d, SUCCESS)
        if io.exists(success):
            data = io.read_json(success)
            result = StageResult.from_json(data["result"])
            stale = fps is not None and data.get("fingerprint") != fps[name]
            states.append(StageState(name, "stale" if stale else "done", result))
        elif io.exists(io.join(d, FINGERPRINT)):
            states.append(StageState(name, "partial", None))
        else:
            states.append(StageState(name, "pending", None))
    return states


def save_run_config(pipeline: Pipeline, run_dir: str, overrides: list[str]) -> None:
    io.makedirs(run_dir)
    io.write_json(
        {"tool_version": __version__, "source": pipeline.source, "overrides": overrides,
         "config_hash": pipeline.config_hash(), "resolved": pipeline.to_json()},
        io.join(run_dir, "pipeline.json"),
    )


def run_pipeline(
    pipeline: Pipeline,
    run_dir: str,
    *,
    stages: list[str] | None = None,
    from_stage: str | None = None,
    force: bool = False,
    ray_address: str | None = None,
    overrides: list[str] | None = None,
    on_result: Callable[[str, StageResult, bool], None] | None = None,
) -> dict[str, StageResult]:
    """Run `stages` (default: all, or all from `from_stage`) into `run_dir`; returns results.

    A finished stage with the same fingerprint is skipped (its saved result is returned);
    `force` redoes the selected stages anyway.
    """
    selected = list(stages or STAGE_ORDER)
    if from_stage:
        if from_stage not in STAGE_ORDER:
            raise ConfigError(f"--from: unknown stage {from_stage!r} (stages: {', '.join(STAGE_ORDER)})")
        selected = [s for s in STAGE_ORDER if STAGE_ORDER.index(s) >= STAGE_ORDER.index(from_stage)]
    for name in selected:  # cheap input checks of every selected stage, before any work
        preflight = getattr(stage_module(name), "preflight", None)
        if preflight is not None:
            preflight(pipeline.stages[name])
    fps = fingerprints(pipeline)
    save_run_config(pipeline, run_dir, overrides or [])
    configs: dict[str, Any] = dict(pipeline.stages)
    configs["_config_hash"] = pipeline.config_hash()
    ctx = StageContext(
        run_dir=run_dir, seed=pipeline.run.seed, num_cpus=pipeline.run.num_cpus or (os.cpu_count() or 1),
        progress=pipeline.run.progress, force=force, configs=configs,
    )
    results: dict[str, StageResult] = {}
    announced_change = False
    ray_started = False
    for name in STAGE_ORDER:
        if name not in selected:
            continue
        out_dir = ctx.stage_dir(name)
        success_path = io.join(out_dir, SUCCESS)
        fp_path = io.join(out_dir, FINGERPRINT)
        if io.exists(success_path) and not force:
            done = io.read_json(success_path)
            if done.get("fingerprint") == fps[name]:
                result = StageResult.from_json(done["result"])
                results[name] = result
                say(f"{name}: up to date, skipped ({result.rows_out} rows)")
                if on_result:
                    on_result(name, result, True)
                continue
        if io.exists(fp_path):
            old = io.read_json(fp_path).get("fingerprint")
            if old != fps[name] or force:
                if not announced_change and old != fps[name]:
                    later = ", ".join(STAGE_ORDER[STAGE_ORDER.index(name):])
                    say(f"{name}: config or inputs changed since the last run -> redoing {later}")
                    announced_change = True
                io.remove(out_dir)
            else:
                say(f"{name}: resuming an unfinished run")
        io.makedirs(out_dir)
        io.write_json({"fingerprint": fps[name]}, fp_path)
        _check_inputs_ready(run_dir, name, fps)
        if not ray_started:
            from wit_builder import parallel

            parallel.init(address=ray_address, num_cpus=pipeline.run.num_cpus or None)
            ray_started = True
        module = stage_module(name)
        say(f"{name}: running")
        with Timer() as t:
            result = module.run(ctx, pipeline.stages[name])
        result.seconds = t.seconds
        result.check_accounting()
        io.write_json({"fingerprint": fps[name], "result": result.to_json()}, success_path)
        results[name] = result
        say(result.line(name))
        if on_result:
            on_result(name, result, False)
    return results


def refresh_after_retry(run_dir: str, download_result: StageResult, rewritten: list[str]) -> None:
    """After `download --retry-failed` rewrote some shards: record the new download counts and
    make the next run redo what depends on them (filter features of those shards, the global
    filter decisions, and the final shards); untouched shards' filter features are kept."""
    from wit_builder.stages.filter import FEATURES_DIR

    dl_success = io.join(run_dir, OUTPUT_DIR["download"], SUCCESS)
    if io.exists(dl_success):
        done = io.read_json(dl_success)
        download_result.seconds = done["result"]["seconds"]
        io.write_json({"fingerprint": done["fingerprint"], "result": download_result.to_json()}, dl_success)
    filter_dir = io.join(run_dir, OUTPUT_DIR["filter"])
    if io.exists(filter_dir):
        for name in rewritten:
            io.remove(io.join(filter_dir, FEATURES_DIR, f"{name}.parquet"))
        for path in io.listdir(filter_dir, ".parquet"):
            io.remove(path)
        io.remove(io.join(filter_dir, SUCCESS))
    io.remove(io.join(run_dir, OUTPUT_DIR["shards"]))


def _check_inputs_ready(run_dir: str, name: str, fps: dict[str, str]) -> None:
    """A stage needs the stage before it finished, with this pipeline's config, in the run dir."""
    i = STAGE_ORDER.index(name)
    if i == 0:
        return
    prev = STAGE_ORDER[i - 1]
    success = io.join(run_dir, OUTPUT_DIR[prev], SUCCESS)
    hint = f"(run `wit-build {prev} ...` or `wit-build run ...`)"
    if not io.exists(success):
        raise ConfigError(f"stage {name!r} needs stage {prev!r} finished in {run_dir} first {hint}")
    if io.read_json(success).get("fingerprint") != fps[prev]:
        raise ConfigError(
            f"stage {name!r}: stage {prev!r} in {run_dir} was made with another config or inputs; "
            f"redo it first {hint}"
        )
