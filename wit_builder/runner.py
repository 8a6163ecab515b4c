"""Run pipeline stages in order, skip the ones already done, redo what a change made stale.

Each stage's output dir holds `_FINGERPRINT.json` (written when the stage starts) and
`_SUCCESS.json` (written when it finishes, with its StageResult). A stage's fingerprint hashes
its own config, the seed, its input files (path, size, mtime) for the stages that read user
input, the sha256 of the files a stage's `input_digests(cfg)` names (its blocklists), and the
fingerprint of the stage before it — so a change anywhere redoes that stage and
everything after it, and an unchanged finished stage is never redone.
While stages run, the run holds the run dir's lease (`_LOCK.json`, wit_builder/lease.py): a
second run on the same dir is refused until this one ends.

Example (see tests/test_runner.py for a full run):
    >>> from wit_builder.config import load_pipeline  # doctest: +SKIP
    >>> run_pipeline(load_pipeline("pipelines/demo.toml"), "runs/r1")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from wit_builder import __version__, io
from wit_builder.config import ConfigError
from wit_builder.lease import RunLease
from wit_builder.pipeline import Pipeline
from wit_builder.stages import OUTPUT_DIR, STAGE_ORDER
from wit_builder.stages.base import StageContext, StageResult, Timer
from wit_builder.stages.registry import stage_module

SUCCESS = "_SUCCESS.json"
FINGERPRINT = "_FINGERPRINT.json"


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _input_files(cfg: Any) -> list[list[Any]]:
    """[path, size, mtime] of every file the config's path fields expand to (a directory input:
    every file inside it), local or on an object store."""
    patterns: list[str] = []
    for f in fields(cfg):
        if f.metadata.get("path"):
            value = getattr(cfg, f.name)
            patterns += [p for p in (value if isinstance(value, (list, tuple)) else [value]) if p]
    return io.file_stats(patterns)


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
        module, cfg = stage_module(name), pipeline.stages[name]
        digests = getattr(module, "input_digests", None)  # content hashes of inputs (safety lists)
        if digests is not None and isinstance(cfg, module.Config) and (listed := digests(cfg)):
            payload["digests"] = listed
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
        {
            "tool_version": __version__,
            "source": pipeline.source,
            "overrides": overrides,
            "config_hash": pipeline.config_hash(),
            "resolved": pipeline.to_json(),
        },
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
    selected = _selected(stages, from_stage)
    for name in selected:  # cheap input checks of every selected stage, before any work
        preflight = getattr(stage_module(name), "preflight", None)
        if preflight is not None:
            preflight(pipeline.config_for(name))
    fps = fingerprints(pipeline)
    with RunLease(run_dir) as lease:  # one run at a time per run dir; released however this ends
        return _run_stages(pipeline, run_dir, selected, fps, lease, force, ray_address, overrides, on_result)


def _run_stages(
    pipeline: Pipeline,
    run_dir: str,
    selected: list[str],
    fps: dict[str, str],
    lease: RunLease,
    force: bool,
    ray_address: str | None,
    overrides: list[str] | None,
    on_result: Callable[[str, StageResult, bool], None] | None,
) -> dict[str, StageResult]:
    save_run_config(pipeline, run_dir, overrides or [])
    ctx = _context(pipeline, run_dir)
    results: dict[str, StageResult] = {}
    announced_change = ray_started = False
    for name in (s for s in STAGE_ORDER if s in selected):
        lease.check()
        result = None if force else _finished_result(ctx, name, fps[name])
        skipped = result is not None
        if skipped:
            say(f"{name}: up to date, skipped ({result.rows_out} rows)")
        else:
            announced_change = _prepare_stage_dir(ctx, name, fps[name], force, announced_change)
            _check_inputs_ready(run_dir, name, fps)
            if not ray_started:
                _start_ray(pipeline, ray_address)
                ray_started = True
            result = _run_stage(ctx, name, pipeline.config_for(name), fps[name])
        results[name] = result
        if on_result:
            on_result(name, result, skipped)
    return results


def _selected(stages: list[str] | None, from_stage: str | None) -> list[str]:
    if not from_stage:
        return list(stages or STAGE_ORDER)
    if from_stage not in STAGE_ORDER:
        raise ConfigError(f"--from: unknown stage {from_stage!r} (stages: {', '.join(STAGE_ORDER)})")
    return list(STAGE_ORDER[STAGE_ORDER.index(from_stage) :])


def _finished_result(ctx: StageContext, name: str, fingerprint: str) -> StageResult | None:
    """The saved result of a stage finished with this fingerprint, else None."""
    success = io.join(ctx.stage_dir(name), SUCCESS)
    if io.exists(success):
        done = io.read_json(success)
        if done.get("fingerprint") == fingerprint:
            return StageResult.from_json(done["result"])
    return None


def _prepare_stage_dir(ctx: StageContext, name: str, fingerprint: str, force: bool, announced: bool) -> bool:
    """Keep an unfinished run of the same config (resume); clear one of another config, or all
    with --force; record the fingerprint. Returns whether a config change was announced."""
    out_dir = ctx.stage_dir(name)
    fp_path = io.join(out_dir, FINGERPRINT)
    if io.exists(fp_path):
        old = io.read_json(fp_path).get("fingerprint")
        if old != fingerprint or force:
            if not announced and old != fingerprint:
                later = ", ".join(STAGE_ORDER[STAGE_ORDER.index(name) :])
                say(f"{name}: config or inputs changed since the last run -> redoing {later}")
                announced = True
            io.remove(out_dir)
        else:
            say(f"{name}: resuming an unfinished run")
    io.makedirs(out_dir)
    io.write_json({"fingerprint": fingerprint}, fp_path)
    return announced


def _run_stage(ctx: StageContext, name: str, cfg: Any, fingerprint: str) -> StageResult:
    """Run one stage, check its accounting, mark it done, drop its scratch."""
    say(f"{name}: running")
    with Timer() as t:
        result = stage_module(name).run(ctx, cfg)
    result.seconds = t.seconds
    result.check_accounting()
    io.write_json({"fingerprint": fingerprint, "result": result.to_json()}, io.join(ctx.stage_dir(name), SUCCESS))
    io.remove(ctx.work_dir(name))  # the passes' scratch; their markers stay
    say(result.line(name))
    return result


def _context(pipeline: Pipeline, run_dir: str) -> StageContext:
    """What every stage gets from the run (its own Config comes separately); `--force` is the
    runner's business (it clears the stage's directory)."""
    return StageContext(
        run_dir=run_dir,
        seed=pipeline.run.seed,
        num_cpus=pipeline.run.num_cpus or (os.cpu_count() or 1),
        progress=pipeline.run.progress,
        config_hash=pipeline.config_hash(),
    )


def _start_ray(pipeline: Pipeline, ray_address: str | None) -> None:
    from wit_builder import parallel

    parallel.init(address=ray_address, num_cpus=pipeline.run.num_cpus or None)


def retry_failed_downloads(pipeline: Pipeline, run_dir: str, ray_address: str | None = None) -> StageResult:
    """`wit-build download DIR --retry-failed`: re-fetch the transient failures of a finished
    download stage; when shards changed, record the new download summary and make the next run
    redo what depends on them (filter work of those shards only, and the final shards)."""
    with RunLease(run_dir):  # as a run: not while another run (or retry) works in run_dir
        return _retry_failed(pipeline, run_dir, ray_address)


def _retry_failed(pipeline: Pipeline, run_dir: str, ray_address: str | None) -> StageResult:
    from wit_builder.stages import download

    fps = fingerprints(pipeline)
    success = io.join(run_dir, OUTPUT_DIR["download"], SUCCESS)
    if not io.exists(success) or io.read_json(success).get("fingerprint") != fps["download"]:
        raise ConfigError(
            f"--retry-failed: the download stage in {run_dir} is not finished with this pipeline "
            "(run `wit-build run ...` first)"
        )
    _start_ray(pipeline, ray_address)
    ctx = _context(pipeline, run_dir)
    result = download.retry_failed(ctx, pipeline.config_for("download"))
    rewritten = result.extra.pop("rewritten_names", [])
    if rewritten:
        done = io.read_json(success)
        result.seconds = done["result"]["seconds"]
        io.write_json({"fingerprint": done["fingerprint"], "result": result.to_json()}, success)
        for later in STAGE_ORDER[STAGE_ORDER.index("download") + 1 :]:
            invalidate = getattr(stage_module(later), "invalidate", None)
            if invalidate is not None:  # the stage forgets only what depends on those shards
                io.remove(io.join(ctx.stage_dir(later), SUCCESS))
                invalidate(ctx, rewritten)
            else:
                io.remove(ctx.stage_dir(later))
    result.extra["rewritten"] = len(rewritten)
    return result


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
            f"stage {name!r}: stage {prev!r} in {run_dir} was made with another config or inputs; redo it first {hint}"
        )
