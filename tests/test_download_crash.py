"""SIGKILL of the whole run in the middle of the download stage, then a rerun: the outputs equal
an uninterrupted run's, byte for byte; no sample twice, none missing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from test_download import all_samples, cfg, make_selection, outputs
from wit_builder import io
from wit_builder.stages import download
from wit_builder.stages.base import StageContext

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUN_IN_SUBPROCESS = """
import sys
from wit_builder import parallel
from wit_builder.stages import download
from wit_builder.stages.base import StageContext
sys.path.insert(0, {tests!r})
from test_download import cfg
parallel.init(num_cpus=1)
download.run(StageContext(run_dir=sys.argv[1], progress=False), cfg(shard_size=5, threads_per_task=2))
"""


@pytest.fixture(scope="module")
def slow_server():
    from hostile_server import HostileServer

    s = HostileServer()
    s.set_slow_delay(0.1)
    yield s
    s.stop()


@pytest.mark.timeout(240)
def test_sigkill_mid_download_then_rerun_equals_uninterrupted(ray_session, slow_server, tmp_path):
    urls = [slow_server.url(f"/slowimg/{500 + i}.jpg") for i in range(40)] + [slow_server.url("/status/404")]
    crashed, clean = str(tmp_path / "crashed"), str(tmp_path / "clean")
    rows = make_selection(crashed, urls, parts=2)
    make_selection(clean, urls, parts=2)
    n_shards = -(-len(urls) // 5)

    env = dict(os.environ, PYTHONPATH=REPO, NO_ALBUMENTATIONS_UPDATE="1", RAY_USAGE_STATS_ENABLED="0")
    script = RUN_IN_SUBPROCESS.format(tests=os.path.join(REPO, "tests"))
    proc = subprocess.Popen(
        [sys.executable, "-c", script, crashed],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    out_dir = io.join(crashed, "download")
    done_at_kill = 0
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and proc.poll() is None:
            done_at_kill = len(io.listdir(io.join(out_dir, "_parts", "download"), ".json"))
            if done_at_kill >= 1:
                break
            time.sleep(0.05)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
    assert 1 <= done_at_kill < n_shards, f"kill came too late or never: {done_at_kill}/{n_shards} shards done"

    ctx = StageContext(run_dir=crashed, progress=False)
    res = download.run(ctx, cfg(shard_size=5, threads_per_task=2))
    ref = download.run(StageContext(run_dir=clean, progress=False), cfg(shard_size=5, threads_per_task=2))
    assert res.extra["shards_skipped"] >= 1
    assert (res.rows_in, res.rows_out, res.dropped) == (ref.rows_in, ref.rows_out, ref.dropped)
    assert res.rows_in == len(urls) and res.dropped == {"http_404": 1}
    assert outputs(crashed) == outputs(clean)
    assert not [n for n in os.listdir(out_dir) if n.endswith(".tmp")]  # the killed run's litter is gone
    uids = all_samples(crashed).column("uid").to_pylist()
    assert sorted(uids) == sorted(r["uid"] for r in rows)  # none twice, none missing
