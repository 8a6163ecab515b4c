"""SIGTERM (what `timeout`, Slurm and Kubernetes send) stops a real `wit-build run` like Ctrl-C:
exit 143 within seconds, one "rerun to resume" line and no traceback or Ray stack dump, the run
dir's lease released, Ray's processes gone; rerunning the same command finishes the run with the
same shards as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "pipelines", "demo.toml")
WORDS = ["dog", "cat", "horse", "giraffe", "elephant", "zebra", "bird", "sheep"]  # demo queries
N_IMAGES = 40


@pytest.fixture(scope="module")
def slow_server():
    from hostile_server import HostileServer

    s = HostileServer()
    yield s
    s.stop()


def _slow_requests(server) -> int:
    return sum(n for path, n in list(server.counts.items()) if path.startswith("/slowimg/"))


def _url_list(path: str, server) -> None:
    rows = [
        {"url": server.url(f"/slowimg/{i}.jpg"), "caption": f"A {WORDS[i % len(WORDS)]} near the old barn, photo {i}."}
        for i in range(N_IMAGES)
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)


def _start(out: str, urls: str, log: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "wit_builder.cli", "run", DEMO, "--out", out, "--set", f'candidates.inputs=["{urls}"]']
    env = dict(os.environ, PYTHONPATH=REPO, NO_ALBUMENTATIONS_UPDATE="1", RAY_USAGE_STATS_ENABLED="0")
    with open(log, "w") as f:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=f, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _group_gone(pgid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _terminate_in_download(proc: subprocess.Popen, server, *, group: bool) -> float:
    """Wait until the download stage is fetching, send SIGTERM (to the driver alone, as
    Kubernetes does, or to its whole process group, as `timeout` does); seconds to exit."""
    before = _slow_requests(server)
    deadline = time.monotonic() + 240
    while _slow_requests(server) == before:
        assert proc.poll() is None, "the run ended before the download stage fetched anything"
        assert time.monotonic() < deadline, "the download stage never started"
        time.sleep(0.1)
    time.sleep(0.5)  # Ray tasks in flight, sleeping in the server
    assert proc.poll() is None
    sent = time.monotonic()
    (os.killpg if group else os.kill)(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("wit-build did not exit within 60 s of SIGTERM")
    return time.monotonic() - sent


def _shard_files(run_dir: str) -> dict[str, bytes]:
    shards = os.path.join(run_dir, "shards")
    out = {}
    for root, _, files in os.walk(shards):
        for name in files:
            if name == "manifest.json" or name.endswith((".tar", ".parquet")):
                path = os.path.join(root, name)
                out[os.path.relpath(path, shards)] = open(path, "rb").read()
    return out


def _driver_stack_dump(stderr: str) -> bool:
    """Ray's crash handler in the driver ("*** SIGTERM received ..."); lines of Ray workers
    (prefixed "(name pid=N)") are not the driver's."""
    return any("SIGTERM received" in line and "pid=" not in line for line in stderr.splitlines())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigterm_exits_143_then_rerun_equals_uninterrupted(slow_server, tmp_path):
    urls = str(tmp_path / "urls.parquet")  # one path for both run dirs: the same config hash
    _url_list(urls, slow_server)
    out, ref = str(tmp_path / "run"), str(tmp_path / "ref")
    lock = os.path.join(out, "_LOCK.json")
    msg = "wit-build: interrupted (SIGTERM); rerun the same command to resume"

    for attempt, group in enumerate([False, True]):  # SIGTERM to the driver, then to its group
        slow_server.set_slow_delay(3.0)  # 40 images, 8 threads: ~15 s of download to interrupt
        log = str(tmp_path / f"stopped-{attempt}.log")
        proc = _start(out, urls, log)
        try:
            seconds = _terminate_in_download(proc, slow_server, group=group)
            stderr = open(log).read()
            to = "the process group" if group else "the driver"
            print(f"SIGTERM to {to}: exit {proc.returncode} in {seconds:.1f} s")
            assert proc.returncode == 143, stderr[-3000:]
            assert seconds < (30 if group else 15), f"{seconds:.1f} s from SIGTERM to exit"
            assert msg in stderr and "download: running" in stderr
            assert "Traceback" not in stderr, stderr[-3000:]
            assert not _driver_stack_dump(stderr), stderr[-3000:]
            assert not os.path.exists(lock), "the lease is released"
            assert _group_gone(proc.pid, 10), "Ray's processes outlived the driver"
        finally:
            _stop(proc)

    slow_server.set_slow_delay(0.02)
    resumed_log, ref_log = str(tmp_path / "resumed.log"), str(tmp_path / "ref.log")
    for run_dir, log in ((out, resumed_log), (ref, ref_log)):
        proc = _start(run_dir, urls, log)
        try:
            assert proc.wait(timeout=400) == 0, open(log).read()[-3000:]
        finally:
            _stop(proc)
    resumed = open(resumed_log).read()
    assert "queries: up to date, skipped" in resumed and "download: resuming an unfinished run" in resumed
    assert not os.path.exists(lock)
    got, want = _shard_files(out), _shard_files(ref)
    assert "manifest.json" in want and any(name.endswith(".tar") for name in want)
    assert got.keys() == want.keys()
    assert got == want, "a resumed run writes the same shards and manifest as an uninterrupted one"
