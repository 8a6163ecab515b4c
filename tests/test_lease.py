"""The run directory's lease (`RUN_DIR/_LOCK.json`): one run at a time per --out, a killed
run's lease taken over, released however the run ends. Stand-in stages as in test_runner.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wit_builder import io, lease, runner
from wit_builder.config import ConfigError, RunConfig
from wit_builder.pipeline import Pipeline
from wit_builder.stages import STAGE_ORDER
from wit_builder.stages.base import StageResult

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOLD_IN_SUBPROCESS = """
import sys, time
from wit_builder.lease import RunLease
RunLease(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


@dataclass(frozen=True)
class FakeConfig:
    value: int = 1


def _pipeline() -> Pipeline:
    return Pipeline(source="fake.toml", run=RunConfig(), stages={n: FakeConfig() for n in STAGE_ORDER}, train={})


@pytest.fixture(autouse=True)
def quick_lease(monkeypatch):
    """Short heartbeat and settle times so the tests run in seconds."""
    monkeypatch.setenv(lease.HEARTBEAT_ENV, "0.2")
    monkeypatch.setenv(lease.STALE_ENV, "60")
    monkeypatch.setenv(lease.SETTLE_ENV, "0.05")


@pytest.fixture
def fake_stages(monkeypatch):
    """Stand-in stages; `fail[name] = exc` makes that stage raise; `seen` records the lease
    file as each stage saw it."""
    calls: list[str] = []
    fail: dict[str, BaseException] = {}
    seen: list[dict | None] = []

    def module(name: str):
        def run(ctx, cfg):
            calls.append(name)
            seen.append(lease.holder(ctx.run_dir))
            if name in fail:
                raise fail[name]
            io.write_json({"value": cfg.value}, io.join(ctx.stage_dir(name), "out.json"))
            return StageResult(rows_in=1, rows_out=1, dropped={})

        return types.SimpleNamespace(run=run)

    monkeypatch.setattr(runner, "stage_module", module)
    monkeypatch.setattr("wit_builder.parallel.init", lambda **kw: None)
    return types.SimpleNamespace(calls=calls, fail=fail, seen=seen)


@pytest.fixture
def holder_process(tmp_path):
    """A subprocess holding the lease of tmp_path/run (sleeping); yields (run_dir, Popen)."""
    run_dir = str(tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_IN_SUBPROCESS, run_dir],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        yield run_dir, proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


def _write_lease(run_dir: str, **fields) -> None:
    now = datetime.now(UTC).isoformat()
    record = {
        "host": socket.gethostname(),
        "boot_id": lease._boot_id(),
        "pid": os.getpid(),
        "token": "someone-else",
        "command": "wit-build run other.toml",
        "started_at": now,
        "heartbeat_at": now,
    }
    record.update(fields)
    io.write_json(record, lease.lock_path(run_dir))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    return proc.pid


@pytest.mark.timeout(60)
def test_second_run_is_refused_naming_the_holder(holder_process, fake_stages):
    run_dir, proc = holder_process
    held = lease.holder(run_dir)
    assert held["pid"] == proc.pid and held["host"] == socket.gethostname()
    assert {"token", "started_at", "heartbeat_at"} <= set(held)
    with pytest.raises(ConfigError, match=rf"in use: pid {proc.pid} on {socket.gethostname()}.*since "):
        runner.run_pipeline(_pipeline(), run_dir)
    with pytest.raises(ConfigError, match=rf"pid {proc.pid}"):  # a single stage too
        runner.run_pipeline(_pipeline(), run_dir, stages=["queries"])
    with pytest.raises(ConfigError, match=rf"pid {proc.pid}"):  # and download --retry-failed
        runner.retry_failed_downloads(_pipeline(), run_dir)
    assert fake_stages.calls == []
    assert not io.exists(io.join(run_dir, "pipeline.json")), "a refused run writes nothing"
    assert lease.holder(run_dir)["token"] == held["token"], "nor touches the holder's lease"


@pytest.mark.timeout(60)
def test_cli_exits_2_naming_the_holder(holder_process, tmp_path, capsys):
    from wit_builder.cli import main

    run_dir, proc = holder_process
    urls = str(tmp_path / "urls.parquet")
    pq.write_table(pa.table({"url": ["http://127.0.0.1/a.jpg"], "caption": ["a dog"]}), urls)
    demo = os.path.join(REPO, "pipelines", "demo.toml")
    code = main(["run", demo, "--out", run_dir, "--set", f'candidates.inputs=["{urls}"]'])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"pid {proc.pid} on {socket.gethostname()}" in err and "since" in err


@pytest.mark.timeout(60)
def test_status_does_not_take_the_lease(tmp_path, fake_stages, capsys):
    from wit_builder.cli import main

    run_dir = str(tmp_path / "run")
    runner.run_pipeline(_pipeline(), run_dir)
    with lease.RunLease(run_dir) as held:
        assert main(["status", run_dir]) == 0
        assert lease.holder(run_dir)["token"] == held.token
    assert "queries" in capsys.readouterr().out


@pytest.mark.timeout(60)
def test_two_overlapping_holders_in_one_process(tmp_path):
    run_dir = str(tmp_path)
    with lease.RunLease(run_dir):
        with pytest.raises(ConfigError, match=rf"pid {os.getpid()} "):
            lease.RunLease(run_dir).acquire()
    assert lease.holder(run_dir) is None


@pytest.mark.timeout(60)
def test_racing_runs_one_wins(tmp_path):
    """Both see no lease and write theirs; after the settle time only the last writer's is there."""
    run_dir = str(tmp_path)
    barrier = threading.Barrier(2)
    outcome: list[str] = []
    leases = [lease.RunLease(run_dir, settle_s=0.5) for _ in range(2)]

    def take(i: int) -> None:
        barrier.wait()
        try:
            leases[i].acquire()
            outcome.append("held")
        except ConfigError:
            outcome.append("refused")

    threads = [threading.Thread(target=take, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    try:
        assert sorted(outcome) == ["held", "refused"]
        winner = next(x for x in leases if x._thread is not None)
        assert lease.holder(run_dir)["token"] == winner.token
    finally:
        for x in leases:
            x.release()
    assert lease.holder(run_dir) is None


@pytest.mark.timeout(60)
def test_a_killed_holders_lease_is_taken_over(holder_process, fake_stages, capsys):
    run_dir, proc = holder_process
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert lease.holder(run_dir)["pid"] == proc.pid  # a fresh heartbeat, but its process is gone
    runner.run_pipeline(_pipeline(), run_dir)
    err = capsys.readouterr().err
    assert f"taking over the lease of {run_dir} from pid {proc.pid}" in err
    assert f"process {proc.pid} is no longer running" in err
    assert all(s["pid"] == os.getpid() for s in fake_stages.seen), "each stage ran under this run's lease"
    assert lease.holder(run_dir) is None


@pytest.mark.timeout(60)
def test_dead_pid_on_another_host_waits_for_the_stale_timeout(tmp_path):
    run_dir = str(tmp_path)
    _write_lease(run_dir, pid=_dead_pid(), host="another-host")
    with pytest.raises(ConfigError, match="pid .* on another-host"):
        lease.RunLease(run_dir).acquire()


@pytest.mark.timeout(60)
def test_a_stale_heartbeat_is_taken_over(tmp_path, fake_stages, monkeypatch, capsys):
    run_dir = str(tmp_path)
    monkeypatch.setenv(lease.STALE_ENV, "2")
    old = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
    _write_lease(run_dir, host="another-host", pid=1, started_at=old, heartbeat_at=old)
    runner.run_pipeline(_pipeline(), run_dir)
    err = capsys.readouterr().err
    assert "taking over the lease" in err and "pid 1 on another-host" in err
    assert "heartbeat is 5 s old (stale after 2 s)" in err
    assert fake_stages.calls == list(STAGE_ORDER)
    assert lease.holder(run_dir) is None


@pytest.mark.timeout(60)
def test_an_unreadable_lease_is_taken_over(tmp_path, capsys):
    run_dir = str(tmp_path)
    io.write_bytes(b"{not json", lease.lock_path(run_dir))
    with lease.RunLease(run_dir) as held:
        assert lease.holder(run_dir)["token"] == held.token
    assert "unreadable" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_heartbeat_renews_while_held(tmp_path):
    run_dir = str(tmp_path)
    with lease.RunLease(run_dir) as held:
        first = lease.holder(run_dir)
        deadline = time.monotonic() + 10
        while lease.holder(run_dir)["heartbeat_at"] == first["heartbeat_at"] and time.monotonic() < deadline:
            time.sleep(0.05)
        now = lease.holder(run_dir)
        assert now["heartbeat_at"] > first["heartbeat_at"]
        assert (now["token"], now["started_at"]) == (held.token, first["started_at"])


@pytest.mark.timeout(60)
def test_a_lease_lost_to_another_run_stops_this_one(tmp_path, capsys):
    run_dir = str(tmp_path)
    held = lease.RunLease(run_dir).acquire()
    try:
        _write_lease(run_dir, token="the-new-holder", pid=12345, host="another-host")
        deadline = time.monotonic() + 10
        while held.lost_to is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(ConfigError, match="lost the lease .* pid 12345 on another-host"):
            held.check()
    finally:
        held.release()
    assert lease.holder(run_dir)["token"] == "the-new-holder", "release leaves another run's lease alone"
    assert "took over the lease" in capsys.readouterr().err


@pytest.mark.timeout(60)
@pytest.mark.parametrize("error", [RuntimeError("stage broke"), KeyboardInterrupt()])
def test_released_when_a_stage_raises(tmp_path, fake_stages, error):
    run_dir = str(tmp_path)
    fake_stages.fail["match"] = error
    with pytest.raises(type(error)):
        runner.run_pipeline(_pipeline(), run_dir)
    assert fake_stages.calls == ["queries", "candidates", "match"]
    assert fake_stages.seen[-1]["pid"] == os.getpid()
    assert lease.holder(run_dir) is None
    assert not [n for n in os.listdir(run_dir) if n.startswith(".") or "LOCK" in n]


@pytest.mark.timeout(60)
def test_bad_timing_settings_are_config_errors(tmp_path, monkeypatch):
    monkeypatch.setenv(lease.HEARTBEAT_ENV, "90")
    with pytest.raises(ConfigError, match="shorter than the stale timeout"):
        lease.RunLease(str(tmp_path))
    monkeypatch.setenv(lease.HEARTBEAT_ENV, "soon")
    with pytest.raises(ConfigError, match="WIT_LEASE_HEARTBEAT_S='soon'"):
        lease.RunLease(str(tmp_path))
