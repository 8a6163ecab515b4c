"""Runner semantics with stand-in stages: skip finished, resume partial, redo after a change."""

from __future__ import annotations

import os
import types
from dataclasses import dataclass

import pytest

from wit_builder import io, runner
from wit_builder.config import ConfigError, RunConfig
from wit_builder.pipeline import Pipeline
from wit_builder.stages import STAGE_ORDER
from wit_builder.stages.base import StageResult


@dataclass(frozen=True)
class FakeConfig:
    value: int = 1


def _pipeline(**values: int) -> Pipeline:
    stages = {name: FakeConfig(values.get(name, 1)) for name in STAGE_ORDER}
    return Pipeline(source="fake.toml", run=RunConfig(), stages=stages, train={})


@pytest.fixture
def fake_stages(monkeypatch):
    calls: list[str] = []

    def module(name: str):
        def run(ctx, cfg):
            calls.append(name)
            io.write_json({"value": cfg.value}, io.join(ctx.stage_dir(name), "out.json"))
            io.write_json({"scratch": True}, io.join(ctx.work_dir(name), "scratch.json"))
            return StageResult(rows_in=10, rows_out=10 - cfg.value, dropped={"reason": cfg.value})

        return types.SimpleNamespace(run=run)

    monkeypatch.setattr(runner, "stage_module", module)
    monkeypatch.setattr("wit_builder.parallel.init", lambda **kw: None)
    return calls


def test_second_run_redoes_nothing(tmp_path, fake_stages):
    results = runner.run_pipeline(_pipeline(), str(tmp_path))
    assert fake_stages == list(STAGE_ORDER)
    assert all(r.rows_out == 9 for r in results.values())
    assert not any(io.exists(io.join(str(tmp_path), d, "_work")) for d in ("queries", "matched", "shards")), (
        "a finished stage's scratch is removed"
    )
    fake_stages.clear()
    again = runner.run_pipeline(_pipeline(), str(tmp_path))
    assert fake_stages == []
    assert {k: v.rows_out for k, v in again.items()} == {k: v.rows_out for k, v in results.items()}


def test_changed_stage_redoes_it_and_everything_after(tmp_path, fake_stages, capsys):
    runner.run_pipeline(_pipeline(), str(tmp_path))
    fake_stages.clear()
    runner.run_pipeline(_pipeline(balance=2), str(tmp_path))
    assert fake_stages == ["balance", "download", "filter", "shards"]
    assert "balance: config or inputs changed" in capsys.readouterr().err
    states = {s.name: s.state for s in runner.stage_states(str(tmp_path), runner.fingerprints(_pipeline(balance=2)))}
    assert set(states.values()) == {"done"}


def test_interrupted_stage_is_resumed_not_wiped(tmp_path, fake_stages):
    runner.run_pipeline(_pipeline(), str(tmp_path), stages=["queries", "candidates"])
    # simulate a crash inside match: fingerprint written, a part done, no _SUCCESS
    fps = runner.fingerprints(_pipeline())
    match_dir = io.join(str(tmp_path), "matched")
    io.write_json({"fingerprint": fps["match"]}, io.join(match_dir, runner.FINGERPRINT))
    io.write_json({"part": 0}, io.join(match_dir, "part-00000.json"))
    runner.run_pipeline(_pipeline(), str(tmp_path))
    assert io.exists(io.join(match_dir, "part-00000.json")), "a resumed stage keeps its finished parts"
    assert fake_stages.count("match") == 1


def test_stage_alone_needs_its_input_stage(tmp_path, fake_stages):
    with pytest.raises(ConfigError, match="needs stage 'balance' finished"):
        runner.run_pipeline(_pipeline(), str(tmp_path), stages=["download"])
    runner.run_pipeline(_pipeline(), str(tmp_path), stages=["queries"])
    with pytest.raises(ConfigError, match="made with another config"):
        runner.run_pipeline(_pipeline(queries=5), str(tmp_path), stages=["candidates"])


def test_accounting_mismatch_is_a_bug(tmp_path, monkeypatch):
    bad = types.SimpleNamespace(run=lambda ctx, cfg: StageResult(rows_in=3, rows_out=1, dropped={}))
    monkeypatch.setattr(runner, "stage_module", lambda name: bad)
    monkeypatch.setattr("wit_builder.parallel.init", lambda **kw: None)
    with pytest.raises(AssertionError, match="accounting mismatch"):
        runner.run_pipeline(_pipeline(), str(tmp_path), stages=["queries"])


def test_a_retry_that_rewrote_shards_makes_filter_and_shards_redo(tmp_path, monkeypatch):
    """`download --retry-failed` through the runner: new download counts recorded, the filter
    forgets only the rewritten shards' features, the final shards are redone."""
    from wit_builder.stages import download
    from wit_builder.stages.base import StageContext

    run_dir = str(tmp_path)
    pipeline = _pipeline()
    fps = runner.fingerprints(pipeline)
    for rel in (
        "filtered/_features/00000.parquet",
        "filtered/_features/00001.parquet",
        "filtered/_parts/features/00000.json",
        "filtered/_parts/features/00001.json",
        "filtered/_parts/write/00000.json",
        "filtered/00000.parquet",
        "filtered/00001.parquet",
        "shards/000000.tar",
    ):
        io.write_bytes(b"x", io.join(run_dir, rel))
    io.write_json({"fingerprint": fps["filter"]}, io.join(run_dir, "filtered", runner.SUCCESS))
    io.write_json(
        {"fingerprint": fps["download"], "result": StageResult(10, 6, {"http_404": 4}, seconds=3.0).to_json()},
        io.join(run_dir, "download", runner.SUCCESS),
    )

    def fake_retry(ctx: StageContext, cfg):
        return StageResult(10, 8, {"http_404": 2}, extra={"rewritten_names": ["00001"]})

    monkeypatch.setattr(download, "retry_failed", fake_retry)
    monkeypatch.setattr(runner, "_start_ray", lambda *a: None)
    result = runner.retry_failed_downloads(pipeline, run_dir)
    assert result.extra["rewritten"] == 1
    done = io.read_json(io.join(run_dir, "download", runner.SUCCESS))
    assert done["fingerprint"] == fps["download"] and done["result"]["rows_out"] == 8
    assert done["result"]["seconds"] == 3.0
    assert io.exists(io.join(run_dir, "filtered/_features/00000.parquet")), "untouched shard features are kept"
    assert io.exists(io.join(run_dir, "filtered/_parts/features/00000.json"))
    assert not io.exists(io.join(run_dir, "filtered/_features/00001.parquet"))
    assert not io.exists(io.join(run_dir, "filtered/_parts/features/00001.json"))
    assert not io.exists(io.join(run_dir, "filtered/_parts/write"))
    assert io.listdir(io.join(run_dir, "filtered"), ".parquet") == []
    assert not io.exists(io.join(run_dir, "filtered", runner.SUCCESS))
    assert not io.exists(io.join(run_dir, "shards"))


def test_retry_failed_needs_a_finished_download_stage(tmp_path):
    with pytest.raises(ConfigError, match="download stage .* is not finished"):
        runner.retry_failed_downloads(_pipeline(), str(tmp_path))


def test_a_file_rewritten_inside_a_directory_input_changes_the_fingerprint(tmp_path):
    """Fingerprints cover every file a directory input expands to, not the directory's own stat."""
    from wit_builder.stages.candidates import Config as Candidates

    inputs = tmp_path / "lists"
    inputs.mkdir()
    (inputs / "a.csv").write_text("url,caption\nhttps://a.org/1.jpg,a cat\n")
    (inputs / "b.csv").write_text("url,caption\nhttps://a.org/2.jpg,a dog\n")
    pipeline = _pipeline()
    pipeline.stages["candidates"] = Candidates(inputs=[str(inputs)])
    before = runner.fingerprints(pipeline)
    dir_mtime = os.stat(inputs).st_mtime_ns
    (inputs / "b.csv").write_text("url,caption\nhttps://a.org/2.jpg,a dog on a sofa\n")  # in place
    os.utime(inputs, ns=(dir_mtime, dir_mtime))  # the directory itself looks unchanged
    after = runner.fingerprints(pipeline)
    assert after["queries"] == before["queries"]
    assert after["candidates"] != before["candidates"] and after["shards"] != before["shards"]
