"""The browser's index cache (wit_builder/browse_index.py): built once per state of a run, reused
on the next start, rebuilt when a stage's output changes, never half-written, never in the run
dir, built under DuckDB's memory limit (its peak RSS at 10M rows is in benchmarks/bench_catalog.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from browse_run import EXPECTED_STATUS, write_run
from wit_builder import browse_index
from wit_builder.browse import Browser, Filters
from wit_builder.config import ConfigError

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def run_dir(tmp_path):
    return write_run(str(tmp_path / "run"))


def _files(d) -> list[str]:
    return sorted(os.listdir(d)) if os.path.exists(d) else []


def test_second_start_reuses_the_index(run_dir, tmp_path):
    cache = str(tmp_path / "cache")
    before = set(_files(run_dir))
    lines: list[str] = []
    first = Browser(run_dir, cache_dir=cache, log=lines.append)
    assert first.built and any(line.startswith("indexing 16 sample rows") for line in lines)
    assert first.count(Filters()) == sum(EXPECTED_STATUS.values())
    mtime = os.stat(first.index_path).st_mtime_ns
    lines.clear()
    second = Browser(run_dir, cache_dir=cache, log=lines.append)
    assert not second.built and second.index_path == first.index_path
    assert os.stat(second.index_path).st_mtime_ns == mtime
    assert lines and lines[0].startswith("using the index") and not any("indexing" in line for line in lines)
    assert second.count(Filters(status="kept")) == EXPECTED_STATUS["kept"]
    assert _files(cache) == [os.path.basename(first.index_path)]  # no temp file or spill dir left
    assert set(_files(run_dir)) == before  # nothing written to the run


def test_a_changed_stage_output_makes_a_new_index(run_dir, tmp_path):
    cache = str(tmp_path / "cache")
    old = Browser(run_dir, cache_dir=cache)
    assert old.count(Filters(status="trimmed")) == EXPECTED_STATUS["trimmed"]
    # the shards stage reruns: its summary now says the two left-out samples' images were missing
    success = os.path.join(run_dir, "shards", "_SUCCESS.json")
    with open(success) as f:
        summary = json.load(f)
    summary["result"]["dropped"] = {"missing_image": EXPECTED_STATUS["trimmed"]}
    with open(success, "w") as f:
        json.dump(summary, f)
    new = Browser(run_dir, cache_dir=cache)
    assert new.built and new.index_path != old.index_path
    assert new.count(Filters(status="trimmed")) == 0
    assert new.count(Filters(status="missing_image")) == EXPECTED_STATUS["trimmed"]
    assert _files(cache) == [os.path.basename(new.index_path)]  # the older index is deleted
    assert old.count(Filters(status="trimmed")) == EXPECTED_STATUS["trimmed"]  # an open server keeps its own
    # another file in a stage's folder (a download shard written since) changes the fingerprint too
    with open(os.path.join(run_dir, "filtered", "extra.txt"), "w") as f:
        f.write("x")
    assert browse_index.index_path(run_dir, cache) != new.index_path


def test_a_failed_build_leaves_no_index(run_dir, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")

    def crash(*args, **kwargs):
        raise RuntimeError("killed midway")

    monkeypatch.setattr(browse_index, "_build_query_tables", crash)  # after browse and keys are written
    with pytest.raises(RuntimeError, match="killed midway"):
        Browser(run_dir, cache_dir=cache)
    assert _files(cache) == []
    monkeypatch.undo()
    assert Browser(run_dir, cache_dir=cache).built  # the next start builds it whole


def test_a_dead_builders_leftovers_are_removed(run_dir, tmp_path):
    cache = tmp_path / "cache"
    path = browse_index.index_path(run_dir, str(cache))
    cache.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = f"{path}.tmp-{int(dead.stdout)}-abcd1234"
    open(leftover, "w").close()
    os.mkdir(leftover + ".spill")
    Browser(run_dir, cache_dir=str(cache))
    assert _files(cache) == [os.path.basename(path)]


def test_memory_limit_is_applied_and_a_bad_one_is_a_clear_error(run_dir, tmp_path):
    with pytest.raises(ConfigError, match="memory-limit"):
        Browser(run_dir, cache_dir=str(tmp_path / "a"), memory_limit="lots")
    # a limit too small to index even this run: DuckDB enforces it, and the message names the option
    with pytest.raises(ConfigError, match="raise --memory-limit"):
        Browser(run_dir, cache_dir=str(tmp_path / "b"), memory_limit="1KB")
    assert [f for f in _files(tmp_path / "b")] == []
    cli = subprocess.run(
        [sys.executable, "-m", "wit_builder.cli", "serve", run_dir, "--port", "0", "--memory-limit", "lots",
         "--cache-dir", str(tmp_path / "c")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert cli.returncode == 2 and "memory-limit" in cli.stderr and "Traceback" not in cli.stderr


def test_a_cache_dir_that_cannot_be_made_is_a_clear_error(run_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cache-dir"):
        Browser(run_dir, cache_dir=str(blocker / "sub"))


def test_a_limit_below_what_duckdb_already_holds_names_the_option():
    """DuckDB may refuse the SET itself (it cannot free enough), not only the build: same message."""
    import duckdb

    from wit_builder.browse_index import set_memory_limit

    con = duckdb.connect()
    con.execute("CREATE TABLE t AS SELECT range AS r, repeat('x', 50) AS s FROM range(2000000)")
    with pytest.raises(ConfigError, match="raise --memory-limit"):
        set_memory_limit(con, "1KB")
    with pytest.raises(ConfigError, match="not a DuckDB memory size"):
        set_memory_limit(con, "lots")
