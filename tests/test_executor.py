"""The part executor with a fake stage: markers, resume, a worker killed mid-part, stale temp
files, I/O retries, per-worker setup, --force through the runner. Nothing lost, nothing twice."""

from __future__ import annotations

import functools
import os
import types

import pytest

from wit_builder import executor, io


def square_part(args: tuple[int, str, str]) -> dict:
    """A fake stage's part: writes its output file, logs the call, returns its counts."""
    i, out_dir, log = args
    with open(log, "a") as f:
        f.write(f"{i}\n")
    io.write_json({"i": i, "square": i * i}, os.path.join(out_dir, f"{i:03d}.json"))
    return {"rows": 1, "sum": i * i, "by_parity": {"even" if i % 2 == 0 else "odd": 1}}


def dies_once_after_output(args: tuple[int, str, str], victim: int, flag: str) -> dict:
    """Like square_part, but the worker process dies once, after writing part `victim`'s output
    and before returning (so before its marker)."""
    counts = square_part(args)
    if args[0] == victim and not os.path.exists(flag):
        open(flag, "w").close()
        os._exit(1)  # a crash or an OOM kill, mid-part
    return counts


def fails_deterministically(args: tuple[int, str, str], bad: int) -> dict:
    if args[0] == bad:
        raise ValueError(f"cannot handle part {bad}")
    return square_part(args)


def io_error_once(args: tuple[int, str, str], flag: str) -> dict:
    if args[0] == 2 and not os.path.exists(flag):
        open(flag, "w").close()
        raise ConnectionResetError("the object store hung up")
    return square_part(args)


def _plan(n: int, out_dir: str, log: str) -> list[executor.Part]:
    return [executor.Part(f"{i:03d}", (i, out_dir, log)) for i in range(n)]


def _calls(log: str) -> list[int]:
    return sorted(int(x) for x in open(log).read().split()) if os.path.exists(log) else []


def _outputs(out_dir: str) -> dict[str, dict]:
    return {p.rsplit("/", 1)[-1]: io.read_json(p) for p in io.listdir(out_dir, ".json")}


@pytest.fixture
def dirs(tmp_path):
    out, markers = tmp_path / "out", tmp_path / "_parts" / "square"
    out.mkdir()
    return str(out), str(markers), str(tmp_path / "calls.log")


EXPECTED = {"rows": 10, "sum": sum(i * i for i in range(10)), "by_parity": {"even": 5, "odd": 5}}


@pytest.mark.timeout(180)
def test_parts_run_once_and_rerun_skips_them(ray_session, dirs):
    out, markers, log = dirs
    step = executor.Pass("square", markers, square_part, tmp_dirs=(out,), backoff=0)
    counts = executor.run_pass(step, _plan(10, out, log), progress=False)
    assert list(counts) == [f"{i:03d}" for i in range(10)], "counts come back in plan order"
    assert executor.sum_counts(counts.values()) == EXPECTED
    assert _calls(log) == list(range(10))
    again = executor.run_pass(step, _plan(10, out, log), progress=False)
    assert again == counts and _calls(log) == list(range(10)), "a finished part is never redone"


@pytest.mark.timeout(180)
def test_a_worker_killed_mid_part_loses_nothing_and_doubles_nothing(ray_session, dirs, tmp_path):
    out, markers, log = dirs
    fn = functools.partial(dies_once_after_output, victim=4, flag=str(tmp_path / "died"))
    counts = executor.run_pass(executor.Pass("square", markers, fn, backoff=0), _plan(10, out, log), progress=False)
    assert os.path.exists(tmp_path / "died")
    assert executor.sum_counts(counts.values()) == EXPECTED
    assert _calls(log).count(4) == 2, "the killed part ran again"
    assert _outputs(out) == {f"{i:03d}.json": {"i": i, "square": i * i} for i in range(10)}
    assert sorted(executor.finished(markers)) == [f"{i:03d}" for i in range(10)]


@pytest.mark.timeout(180)
def test_an_interrupted_pass_resumes_where_it_stopped(ray_session, dirs):
    out, markers, log = dirs
    broken = executor.Pass(
        "square", markers, functools.partial(fails_deterministically, bad=6), workers=1, backoff=0
    )  # one part at a time: the failure stops the pass at part 6
    with pytest.raises(RuntimeError, match="square part 006: ValueError: cannot handle part 6"):
        executor.run_pass(broken, _plan(10, out, log), progress=False)
    assert sorted(executor.finished(markers)) == [f"{i:03d}" for i in range(6)]
    assert _calls(log) == list(range(6)), "a deterministic error is not retried"
    fixed = executor.Pass("square", markers, square_part, backoff=0)
    counts = executor.run_pass(fixed, _plan(10, out, log), progress=False)
    assert executor.sum_counts(counts.values()) == EXPECTED, "a resumed pass reports what a fresh one would"
    assert _calls(log) == list(range(10)), "only the unfinished parts ran again, each once"


@pytest.mark.timeout(180)
def test_stale_temp_files_are_removed_before_the_pass(ray_session, dirs):
    out, markers, log = dirs
    os.makedirs(markers)
    stale = [os.path.join(out, ".003.json.ab12cd34.tmp"), os.path.join(markers, ".003.json.ab12cd34.tmp")]
    for p in stale:
        open(p, "w").write("half")
    executor.run_pass(
        executor.Pass("square", markers, square_part, tmp_dirs=(out,)), _plan(4, out, log), progress=False
    )
    assert not any(os.path.exists(p) for p in stale)


@pytest.mark.timeout(180)
def test_an_io_error_is_retried_in_a_further_round(ray_session, dirs, tmp_path):
    out, markers, log = dirs
    fn = functools.partial(io_error_once, flag=str(tmp_path / "reset"))
    counts = executor.run_pass(executor.Pass("square", markers, fn, backoff=0), _plan(10, out, log), progress=False)
    assert executor.sum_counts(counts.values()) == EXPECTED
    assert _calls(log) == list(range(10))


@pytest.mark.timeout(180)
def test_an_io_error_that_persists_fails_the_pass_naming_the_part(ray_session, dirs, tmp_path):
    out, markers, log = dirs

    step = executor.Pass(
        "square", markers, functools.partial(fails_io, path=str(tmp_path / "tries")), attempts=2, backoff=0
    )
    with pytest.raises(RuntimeError, match=r"1 part\(s\) unfinished after 2 attempt\(s\) \(e.g. 001: OSError"):
        executor.run_pass(step, _plan(3, out, log), progress=False)
    assert open(tmp_path / "tries").read() == "xx"


def fails_io(args: tuple[int, str, str], path: str) -> dict:
    if args[0] == 1:
        with open(path, "a") as f:
            f.write("x")
        raise OSError("disk on fire")
    return square_part(args)


def _setup_state() -> dict:
    return {"pid": os.getpid(), "offset": 100}


def with_state(state: dict, args: tuple[int, str, str]) -> dict:
    counts = square_part(args)
    return {**counts, "pids": {str(state["pid"]): 1}}


@pytest.mark.timeout(180)
def test_setup_runs_once_per_worker_on_actors(ray_session, dirs):
    out, markers, log = dirs
    step = executor.Pass("square", markers, with_state, setup=_setup_state, workers=2)
    total = executor.sum_counts(executor.run_pass(step, _plan(10, out, log), progress=False).values())
    assert total["sum"] == EXPECTED["sum"] and sum(total["pids"].values()) == 10
    assert len(total["pids"]) <= 2


@pytest.mark.timeout(60)
def test_local_parts_run_in_plan_order_in_this_process(dirs):
    out, markers, log = dirs
    seen: list[int] = []

    def fn(args):
        seen.append(args[0])
        return square_part(args)

    counts = executor.run_pass(executor.Pass("square", markers, fn, local=True), _plan(6, out, log), progress=False)
    assert seen == list(range(6)) and len(counts) == 6


@pytest.mark.timeout(60)
def test_duplicate_part_names_are_refused(dirs):
    out, markers, log = dirs
    with pytest.raises(ValueError, match="not unique"):
        executor.run_pass(
            executor.Pass("square", markers, square_part, local=True),
            [executor.Part("a", (0, out, log)), executor.Part("a", (1, out, log))],
            progress=False,
        )


@pytest.mark.timeout(180)
def test_force_through_the_runner_redoes_every_part(ray_session, tmp_path, monkeypatch):
    """A fake pipeline whose every stage is one executor pass: --force redoes all parts."""
    from test_runner import _pipeline
    from wit_builder import runner
    from wit_builder.stages.base import StageResult

    log = str(tmp_path / "calls.log")

    def module(name):
        def run(ctx, cfg):
            out = ctx.stage_dir(name)
            step = executor.Pass("square", ctx.marker_dir(name, "square"), square_part, tmp_dirs=(out,))
            counts = executor.sum_counts(executor.run_pass(step, _plan(3, out, log), progress=False).values())
            return StageResult(rows_in=counts["rows"], rows_out=counts["rows"])

        return types.SimpleNamespace(run=run)

    monkeypatch.setattr(runner, "stage_module", module)
    run_dir = str(tmp_path / "run")
    runner.run_pipeline(_pipeline(), run_dir, stages=["queries"])
    runner.run_pipeline(_pipeline(), run_dir, stages=["queries"])
    assert _calls(log) == [0, 1, 2]
    runner.run_pipeline(_pipeline(), run_dir, stages=["queries"], force=True)
    assert _calls(log) == [0, 0, 1, 1, 2, 2]
    assert sorted(executor.finished(str(tmp_path / "run" / "queries" / "_parts" / "square"))) == ["000", "001", "002"]
