"""The browser's index cache (wit_builder/browse_index.py): built once per state of a run, reused
on the next start, rebuilt when a stage's output changes, never half-written, never in the run
dir, built under DuckDB's memory limit (its peak RSS at 10M rows is in benchmarks/bench_catalog.py);
the cache keeps itself tidy (deleted runs' indexes go, a size bound evicts the least recently
served, `serve --clear-cache` empties it) and never touches a running build's files."""

from __future__ import annotations

import json
import os
import shutil
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


def _run_file(index: str) -> str:
    """The `<run hash>.json` beside an index, naming its run."""
    return os.path.basename(index)[:16] + ".json"


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
    # no temp file or spill dir left; the run file names the run
    assert _files(cache) == [os.path.basename(first.index_path), _run_file(first.index_path)]
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
    assert _files(cache) == [os.path.basename(new.index_path), _run_file(new.index_path)]  # the older one is deleted
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
    assert _files(cache) == [os.path.basename(path), _run_file(path)]


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


# -- the cache keeps itself tidy --------------------------------------------------------------


def _index_of(run: str, cache: str) -> str:
    return os.path.basename(browse_index.index_path(run, cache))


def test_indexes_of_deleted_local_runs_are_removed_others_kept(tmp_path):
    cache = str(tmp_path / "cache")
    gone, stays = write_run(str(tmp_path / "gone")), write_run(str(tmp_path / "stays"))
    gone_index = Browser(gone, cache_dir=cache).index_path
    # a run on an object store (not checked: see browse_index._run_is_gone), a build of the
    # deleted run still running in a live process (this one), and a file that is not the cache's
    remote = "0123456789abcdef-" + "0" * 24 + ".duckdb"
    (tmp_path / "cache" / remote).write_bytes(b"x" * 100)
    (tmp_path / "cache" / "0123456789abcdef.json").write_text(json.dumps({"run": "s3://bucket/r9", "used": 1.0}))
    live = f"{gone_index}.tmp-{os.getpid()}-abcd1234"
    open(live, "w").close()
    (tmp_path / "cache" / "notes.txt").write_text("mine")
    shutil.rmtree(gone)
    lines: list[str] = []
    served = Browser(stays, cache_dir=cache, log=lines.append)
    assert served.count(Filters()) == sum(EXPECTED_STATUS.values())
    assert not os.path.exists(gone_index)
    assert _files(cache) == sorted(
        [
            remote,
            "0123456789abcdef.json",
            os.path.basename(live),
            _run_file(gone_index),
            "notes.txt",
            os.path.basename(served.index_path),
            _run_file(served.index_path),
        ]
    )  # fmt: skip (the running build's run file stays with it)
    assert any(line.startswith(f"cache {cache}: removed 1 index(es) of deleted runs") for line in lines), lines
    os.remove(live)  # the build has ended without an index: its run file goes with the next tidy
    Browser(stays, cache_dir=cache)
    assert _run_file(gone_index) not in _files(cache) and remote in _files(cache)


def test_an_index_from_before_run_files_is_traced_to_its_run(tmp_path):
    """An index with no `<run hash>.json` (written by an older version): its run is read from
    the index's meta table, the file written, and the index removed once its run is deleted."""
    cache = str(tmp_path / "cache")
    old, other = write_run(str(tmp_path / "old")), write_run(str(tmp_path / "other"))
    old_index = Browser(old, cache_dir=cache).index_path
    os.remove(os.path.join(cache, _run_file(old_index)))
    Browser(other, cache_dir=cache)
    with open(os.path.join(cache, _run_file(old_index))) as f:
        assert json.load(f)["run"] == browse_index.run_id(old)  # traced, kept: the run exists
    os.remove(os.path.join(cache, _run_file(old_index)))
    shutil.rmtree(old)
    Browser(other, cache_dir=cache)
    assert _files(cache) == sorted([_index_of(other, cache), _run_file(_index_of(other, cache))])


def test_size_bound_evicts_the_least_recently_served_never_the_served_one(tmp_path):
    cache = str(tmp_path / "cache")
    a, b, c = (write_run(str(tmp_path / name)) for name in "abc")
    for run in (a, b, c, a):  # b is now the least recently served, then c, then a
        Browser(run, cache_dir=cache)
    size = {run: os.path.getsize(os.path.join(cache, _index_of(run, cache))) for run in (a, b, c)}
    lines: list[str] = []
    # room for c (served) and one more: b goes (served longest ago), a stays
    Browser(c, cache_dir=cache, cache_max_bytes=size[c] + size[a], log=lines.append)
    left = _files(cache)
    assert _index_of(b, cache) not in left and _run_file(_index_of(b, cache)) not in left
    assert _index_of(a, cache) in left and _index_of(c, cache) in left
    assert any("1 least recently served over the" in line for line in lines), lines
    # a bound below the served index alone: everything else goes, the served one stays and works
    served = Browser(c, cache_dir=cache, cache_max_bytes=0)
    assert _files(cache) == sorted([_index_of(c, cache), _run_file(_index_of(c, cache))])
    assert served.count(Filters(status="kept")) == EXPECTED_STATUS["kept"]
    with pytest.raises(ConfigError, match="cache-max-gb"):
        Browser(c, cache_dir=cache, cache_max_bytes=-1)


def test_clear_cache_command(tmp_path, capsys):
    from wit_builder.cli import main

    cache = str(tmp_path / "cache")
    a, b = write_run(str(tmp_path / "a")), write_run(str(tmp_path / "b"))
    for run in (a, b):
        Browser(run, cache_dir=cache)
    live = os.path.join(cache, _index_of(a, cache) + f".tmp-{os.getpid()}-abcd1234")
    open(live, "w").close()  # a build running now keeps its files
    (tmp_path / "cache" / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["serve", "--clear-cache", "--cache-dir", cache]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"cleared {cache}: 2 index(es) and 2 other file(s) removed"), out
    assert _files(cache) == sorted([os.path.basename(live), "notes.txt"])
    assert main(["serve", "--cache-dir", cache]) == 2  # neither a run nor --clear-cache
    assert "DIR is required" in capsys.readouterr().err
    assert main(["serve", "--clear-cache", "--cache-dir", str(tmp_path / "cache" / "notes.txt")]) == 2
    assert "cache-dir: cannot read" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse: usage error, exit 2
        main(["serve", a, "--cache-max-gb", "-1"])
    assert e.value.code == 2 and "--cache-max-gb" in capsys.readouterr().err
