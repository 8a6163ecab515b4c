"""`wit-build` on a multi-node Ray cluster on 127.0.0.1 (tests/raycluster.py: a head and two
worker nodes, separate `ray start` processes, one CPU each, token auth as Ray 2.60 sets it).

- An embedded run (no --ray-address) stays a private local Ray although RAY_ADDRESS points at
  the live cluster and Ray's temp dir holds a stale cluster file; it is the reference run.
- The demo pipeline on the cluster (`--ray-address`, url list and run dir on moto's S3 server,
  the storage settings reaching the cluster's workers only through the run) makes the
  reference's shards and stage counts, on the first attempt, fetching each sample's image once.
- Without the cluster's token, `--ray-address` exits 2 within seconds saying what to set.
- Faults, each ending with the reference's shards and the reference's counts at every stage
  (nothing lost, nothing twice): the wit-build driver SIGKILLed mid-download and the command
  rerun (the dead holder's lease is taken over); in one run, a worker node SIGKILLed during
  `match` and the other during `download`.

The fault runs reuse the reference's finished early stages (copied), so each redoes only the
stages from the one it disturbs.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from wit_builder import io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "pipelines", "demo.toml")
STAGE_DIRS = ("queries", "candidates", "matched", "selected", "download", "filtered", "shards")

pytestmark = pytest.mark.slow


class _Site(SimpleHTTPRequestHandler):
    """The demo photos, counting GETs per path and answering each after `server.delay` s."""

    def do_GET(self) -> None:  # noqa: N802
        with self.server.lock:
            self.server.counts[self.path] += 1
        time.sleep(self.server.delay)
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """(url list path, server): the demo photos on 127.0.0.1 and a url list pointing there."""
    from wit_builder.demo import prepare_site, url_rows, write_url_list

    root = tmp_path_factory.mktemp("cluster_site")
    www = str(root / "www")
    prepare_site(www)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Site, directory=www))
    httpd.daemon_threads = True
    httpd.counts, httpd.lock, httpd.delay = Counter(), threading.Lock(), 0.0
    thread = threading.Thread(target=httpd.serve_forever, daemon=True, name="cluster-site")
    thread.start()
    urls = str(root / "urls.parquet")
    write_url_list(urls, url_rows(f"http://127.0.0.1:{httpd.server_address[1]}"))
    yield urls, httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def _requests(httpd) -> Counter:
    with httpd.lock:
        counts = Counter(httpd.counts)
        httpd.counts.clear()
    return counts


def _cmd(out: str, urls: str, address: str | None = None, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "wit_builder.cli", "run", DEMO, "--out", out]
    cmd += ["--set", f'candidates.inputs=["{urls}"]', *extra]
    return cmd + (["--ray-address", address] if address else [])


def _wit(cmd: list[str], env: dict[str, str], timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def _tars(run_dir: str) -> list[tuple]:
    manifest = io.read_json(io.join(run_dir, "shards", "manifest.json"))
    return [(t["path"], t["samples"], t["sha256"]) for t in manifest["tars"]]


def _counts(run_dir: str) -> dict[str, tuple]:
    """Each stage's rows in, rows out and drops by reason: what a run accounted for."""
    out = {}
    for d in STAGE_DIRS:
        r = io.read_json(io.join(run_dir, d, "_SUCCESS.json"))["result"]
        out[d] = (r["rows_in"], r["rows_out"], {k: v for k, v in r["dropped"].items() if v})
    return out


@pytest.fixture(scope="module")
def reference(site, ray_cluster, tmp_path_factory):
    """The embedded run: no --ray-address, with RAY_ADDRESS at the live cluster (and its token),
    and Ray's temp dir holding a cluster file of a cluster long gone. Yields what it did."""
    urls, httpd = site
    out = str(tmp_path_factory.mktemp("cluster_ref") / "run")
    ray_tmp = tempfile.mkdtemp(prefix="wrt", dir="/tmp")  # short: Ray's socket paths
    try:
        os.makedirs(os.path.join(ray_tmp, "ray"))
        with open(os.path.join(ray_tmp, "ray", "ray_current_cluster"), "w") as f:
            f.write("127.0.0.1:9")  # stale: nothing listens there
        env = ray_cluster.client_env({**os.environ, "RAY_ADDRESS": ray_cluster.address, "RAY_TMPDIR": ray_tmp})
        jobs_before = ray_cluster.job_count()
        _requests(httpd)
        t = time.monotonic()
        run = _wit(_cmd(out, urls), env)
        seconds = time.monotonic() - t
        requests = _requests(httpd)
        jobs_after = ray_cluster.job_count()
        sessions = [d for d in os.listdir(os.path.join(ray_tmp, "ray")) if d.startswith("session_2")]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert run.returncode == 0, run.stderr[-3000:]
    yield {
        "out": out,
        "urls": urls,
        "requests": requests,
        "jobs": (jobs_before, jobs_after),
        "sessions": sessions,
        "seconds": seconds,
    }


def _one_request_per_sample(run_dir: str) -> Counter:
    """The GETs a download that fetched each sample's image once makes: one per sample of an
    http URL (several samples may share a URL), except a uid repeated in the selection (recorded
    as duplicate_uid, never fetched)."""
    from urllib.parse import urlsplit

    from wit_builder.catalog import query

    cols, rows = query(run_dir, "SELECT url, error FROM samples")
    samples = [dict(zip(cols, row)) for row in rows]
    expected = Counter(
        urlsplit(r["url"]).path for r in samples if r["url"].startswith("http") and r["error"] != "duplicate_uid"
    )
    assert sum(expected.values()) > 100
    return expected


def _copy_until(reference: dict, stage_dir: str, dst: str) -> str:
    """A copy of the reference run dir with `stage_dir` and every later stage's dir removed."""
    later = STAGE_DIRS[STAGE_DIRS.index(stage_dir) :]
    shutil.copytree(
        reference["out"], dst, ignore=lambda d, names: [n for n in names if d == reference["out"] and n in later]
    )
    return dst


def _assert_same_as_reference(run_dir: str, reference: dict) -> None:
    assert _tars(run_dir) == _tars(reference["out"]) and _tars(run_dir)
    assert _counts(run_dir) == _counts(reference["out"])
    assert not os.path.exists(os.path.join(run_dir, "_LOCK.json"))


@pytest.mark.timeout(600)
def test_embedded_run_stays_local_whatever_ray_address_and_cluster_files_say(reference):
    """Today's reference run: it succeeded, started its own Ray (a session in its temp dir)
    and never connected to the cluster RAY_ADDRESS names (no new job there)."""
    assert reference["sessions"], "no local Ray was started"
    before, after = reference["jobs"]
    assert after == before, "the embedded run connected to the cluster"
    assert sum(reference["requests"].values()) > 100


@pytest.mark.timeout(600)
def test_cluster_run_on_s3_makes_the_reference_shards_on_the_first_attempt(reference, ray_cluster, s3_endpoint, site):
    import fsspec

    urls, httpd = site
    ray_cluster.ensure_workers(2)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    if not fs.exists("wit-cluster"):
        fs.mkdir("wit-cluster")
    with open(urls, "rb") as f:
        io.write_bytes(f.read(), "s3://wit-cluster/inputs/urls.parquet")
    out = "s3://wit-cluster/run"
    env = ray_cluster.client_env({**os.environ, "WIT_DEBUG": "1"})
    jobs_before = ray_cluster.job_count()
    _requests(httpd)
    run = _wit(_cmd(out, "s3://wit-cluster/inputs/urls.parquet", ray_cluster.address), env)
    requests = _requests(httpd)
    assert run.returncode == 0, run.stderr[-3000:]
    assert ray_cluster.job_count() == jobs_before + 1, "the run did not use the cluster"
    assert "resuming" not in run.stderr  # one attempt, nothing taken for unfinished
    _assert_same_as_reference(out, reference)
    assert requests == _one_request_per_sample(out), "an image fetched twice for one sample"
    assert not [k for k in fs.find("wit-cluster/run") if io.is_tmp_name(k) or "/_work/" in k]


@pytest.mark.timeout(120)
def test_cluster_without_its_token_exits_2_saying_what_to_set(ray_cluster, site, tmp_path):
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    cases = {
        "no token auth": (base, "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN="),
        "a wrong token": (
            {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},
            "refused the token from RAY_AUTH_TOKEN",
        ),
    }
    for name, (env, says) in cases.items():
        t = time.monotonic()
        run = _wit(_cmd(str(tmp_path / "run"), site[0], ray_cluster.address), env, timeout=90)
        assert run.returncode == 2, (name, run.stderr[-2000:])
        assert says in run.stderr and "Traceback" not in run.stderr, (name, run.stderr[-2000:])
        assert time.monotonic() - t < 60, name


def _start(cmd: list[str], env: dict[str, str], log: str) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=f, start_new_session=True)


def _wait_for_task(ray_cluster, proc: subprocess.Popen, title: str, nodes: list | None, log: str, timeout: float = 240):
    """The first node (of `nodes`, default every live one) running a Ray worker titled `title`
    while `proc` runs; polled every 50 ms."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for node in nodes or [n for n in ray_cluster.nodes.values() if n.alive]:
            if any(t.startswith(title) for t in node.titles()):
                return node
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait(timeout=30)
    pytest.fail(f"no {title} worker seen on {[n.name for n in nodes or []]}: {open(log).read()[-3000:]}")


@pytest.mark.timeout(600)
def test_driver_killed_mid_download_then_rerun_equals_the_reference(reference, ray_cluster, site, tmp_path):
    urls, httpd = site
    ray_cluster.ensure_workers(2)
    out = _copy_until(reference, "download", str(tmp_path / "run"))
    cmd, env, log = _cmd(out, urls, ray_cluster.address), ray_cluster.client_env(), str(tmp_path / "first.log")
    httpd.delay = 0.1
    try:
        proc = _start(cmd, env, log)
        _wait_for_task(ray_cluster, proc, "ray::download_shard", None, log)
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        httpd.delay = 0.0
    assert os.path.exists(os.path.join(out, "_LOCK.json")), "the killed driver held the lease"
    assert not os.path.exists(os.path.join(out, "shards", "manifest.json"))
    rerun = _wit(cmd, env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "taking over the lease" in rerun.stderr and "download: resuming" in rerun.stderr
    _assert_same_as_reference(out, reference)


@pytest.mark.timeout(600)
def test_worker_nodes_killed_in_match_and_in_download_end_as_the_reference(reference, ray_cluster, site, tmp_path):
    """One run from `match` on, on the head and two worker nodes: one worker node is SIGKILLed as
    soon as a match actor starts on it (its parts already sent to it), the other while it runs
    a download task (images answered slowly); the head alone finishes the run."""
    urls, httpd = site
    ray_cluster.ensure_workers(2)
    out = _copy_until(reference, "matched", str(tmp_path / "run"))
    cmd, env, log = _cmd(out, urls, ray_cluster.address), ray_cluster.client_env(), str(tmp_path / "run.log")
    httpd.delay = 0.1
    try:
        proc = _start(cmd, env, log)
        for title in ("ray::_Worker", "ray::download_shard"):
            node = _wait_for_task(ray_cluster, proc, title, ray_cluster.live_workers(), log)
            ray_cluster.kill(node.name)
        proc.wait(timeout=400)
    finally:
        httpd.delay = 0.0
    with open(log) as f:
        stderr = f.read()
    assert proc.returncode == 0, stderr[-3000:]
    assert not ray_cluster.live_workers()
    ray_cluster.wait_nodes(1, timeout=30)  # the cluster saw both die
    _assert_same_as_reference(out, reference)


def _worker_pid() -> int:
    return os.getpid()


def _die_once(flag_dir: str, pid: int, x: int) -> dict:
    """A part function whose worker process dies (as on its node's loss) the first time it meets 3."""
    flag = os.path.join(flag_dir, "died")
    if x == 3 and not os.path.exists(flag):
        open(flag, "w").close()
        os._exit(1)
    return {"rows": 1, "sum": x, "pids": {str(pid): 1}}


@pytest.mark.timeout(180)
def test_a_dead_actors_parts_are_redone_on_new_actors(ray_session, tmp_path):
    """An actor that dies is not restarted in place (on a lost node a restart could wait forever
    for a free CPU): its unfinished parts come back failed and the executor's next round runs
    them on new actors; every part is counted once."""
    from wit_builder import executor

    p = executor.Pass(
        "die",
        str(tmp_path / "markers"),
        functools.partial(_die_once, str(tmp_path)),
        setup=_worker_pid,
        workers=2,
        backoff=0.1,
    )
    counts = executor.run_pass(p, [executor.Part(f"{i:02d}", i) for i in range(8)], progress=False)
    assert os.path.exists(tmp_path / "died")
    total = executor.sum_counts(counts.values())
    assert (total["rows"], total["sum"]) == (8, 28)
    assert len(total["pids"]) >= 2  # the parts after the death ran on another actor
