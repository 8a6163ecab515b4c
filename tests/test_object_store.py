"""Runs on an object store: `--out s3://bucket/run` against moto's S3 server on 127.0.0.1.

- io over S3 sees what other processes (Ray workers) wrote after this one listed a directory,
  and a failed write or commit leaves no temporary object behind;
- the demo pipeline (without [train]) run with `--out s3://...` on embedded Ray, first attempt:
  the same shards, byte for byte, as the same pipeline on a local dir, every image fetched once
  per sample, nothing temporary left, `wit-build status` and `wit-build sql` work over s3://;
- a run killed in the download or the filter stage on S3 resumes: finished parts are
  recognised (no image of a finished download shard is fetched again), files workers wrote
  after the driver listed their directory are read, and the final shards are the same.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wit_builder import io, tario

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "pipelines", "demo.toml")
STAGE_DIRS = ("queries", "candidates", "matched", "selected", "download", "filtered", "shards")


def _other_process_fs():
    """An s3fs instance with its own listing cache: what a Ray worker (another process) has."""
    import fsspec

    return fsspec.filesystem("s3", skip_instance_cache=True)


def _bucket(name: str) -> str:
    fs = _other_process_fs()
    if not fs.exists(name):
        fs.mkdir(name)
    return f"s3://{name}"


# ---------------------------------------------------------------- io over S3


def _table_bytes(rows: int) -> bytes:
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"x": list(range(rows))}), buf)
    return buf.getvalue().to_pybytes()


# (what a worker writes under the dir, relative paths -> bytes; what this process then checks)
AFTER_A_LISTING = {
    "a new file exists": ({"new.json": b"{}"}, lambda d: io.exists(f"{d}/new.json")),
    "a new file is read": ({"new.json": b'{"v": 2}'}, lambda d: io.read_json(f"{d}/new.json") == {"v": 2}),
    "a longer rewrite is read whole": (
        {"a.json": json.dumps({"v": "x" * 100}).encode()},
        lambda d: io.read_json(f"{d}/a.json") == {"v": "x" * 100},
    ),
    "a rewritten parquet is read": (
        {"t.parquet": _table_bytes(3)},
        lambda d: io.read_parquet(f"{d}/t.parquet").num_rows == 3,
    ),
    "a new tar is read": (
        {"t.tar": tario.member("k.txt", b"hi") + bytes(1024)},
        lambda d: list(tario.read_tar(f"{d}/t.tar")) == [("k.txt", b"hi")],
    ),
    "a new file is listed": ({"new.json": b"{}"}, lambda d: f"{d}/new.json" in io.listdir(d, ".json")),
    "a new subdirectory is expanded": ({"sub/c.json": b"{}"}, lambda d: io.expand([f"{d}/sub"]) == [f"{d}/sub/c.json"]),
    "a new subdirectory is removed": (
        {"sub/c.json": b"{}"},
        lambda d: io.remove(f"{d}/sub") or not _other_process_fs().find(f"{d}/sub".removeprefix("s3://")),
    ),
    "a killed writer's temp file is removed": (
        {".b.json.0123abcd.tmp": b"{"},
        lambda d: io.remove_stale_tmp(d) or not io.exists(f"{d}/.b.json.0123abcd.tmp"),
    ),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(AFTER_A_LISTING))
def test_io_sees_what_another_process_wrote_after_a_listing(s3_endpoint, case):
    """This process lists a dir (caching the listing, as the driver does before a pass), then a
    worker writes into it: every io call sees the worker's files, not the cached listing."""
    writes, check = AFTER_A_LISTING[case]
    d = f"{_bucket('wit-io')}/fresh-{sorted(AFTER_A_LISTING).index(case)}"
    io.write_json({"v": 1}, f"{d}/a.json")
    io.write_parquet(pa.table({"x": [1]}), f"{d}/t.parquet")
    assert io.listdir(d) == [f"{d}/a.json", f"{d}/t.parquet"]
    other = _other_process_fs()
    for rel, data in writes.items():
        other.pipe(f"{d.removeprefix('s3://')}/{rel}", data)
    assert check(d)


@pytest.mark.timeout(120)
def test_failed_writes_and_commits_leave_no_temporary_object(s3_endpoint, monkeypatch):
    base = _bucket("wit-io") + "/atomic"
    other = _other_process_fs()

    def keys() -> list[str]:
        return sorted(p.rsplit("/", 1)[-1] for p in other.find("wit-io/atomic"))

    io.write_json({"v": 1}, f"{base}/keep.json")
    io.write_json({"v": 2}, f"{base}/keep.json")  # a commit replaces the object
    assert io.read_json(f"{base}/keep.json") == {"v": 2}

    def batches():
        yield pa.record_batch({"x": [1, 2]})
        raise OSError("reader died")

    with pytest.raises(OSError, match="reader died"):
        io.write_parquet_batches(batches(), f"{base}/p.parquet", pa.schema([("x", pa.int64())]))
    with pytest.raises(ValueError, match="mid-tar"), tario.TarWriter(f"{base}/t.tar") as t:
        t.add("k.txt", b"x" * 5000)
        raise ValueError("mid-tar")
    assert keys() == ["keep.json"]

    fs, _ = io.filesystem(base)

    def failing_copy(*args, **kwargs):
        raise OSError("copy refused")

    monkeypatch.setattr(fs, "cp_file", failing_copy)
    with pytest.raises(OSError, match="copy refused"):
        io.write_json({"v": 3}, f"{base}/keep.json")
    with pytest.raises(OSError, match="copy refused"):
        tario.write_tar(f"{base}/t.tar", [("k.txt", b"hi")])
    monkeypatch.undo()
    assert keys() == ["keep.json"]
    assert io.read_json(f"{base}/keep.json") == {"v": 2}


@pytest.mark.timeout(120)
def test_storage_settings_from_fsspec_config_alone(s3_endpoint):
    """The other documented way to give the endpoint and credentials once: fsspec's config
    (here FSSPEC_S3 as JSON; FSSPEC_S3_ENDPOINT_URL=... or ~/.config/fsspec/*.json work alike),
    with no AWS variable set, in a fresh process as a Ray worker would be."""
    url = f"{_bucket('wit-io')}/fsspec-config/a.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    env["FSSPEC_S3"] = json.dumps({"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"})
    code = f"from wit_builder import io; io.write_json({{'v': 1}}, {url!r}); print(io.read_json({url!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "{'v': 1}"
    assert json.loads(_other_process_fs().cat(url.removeprefix("s3://"))) == {"v": 1}


def test_cluster_workers_get_the_storage_settings(monkeypatch):
    """On a cluster (--ray-address), workers do not inherit the driver's environment: the
    storage settings go with the run (Ray's runtime_env); an embedded Ray's workers inherit it."""
    import ray

    from wit_builder import parallel

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("FSSPEC_S3_ANON", "false")
    monkeypatch.setenv("AWS_PROFILE", "someone")  # names a file on this machine: not forwarded
    parallel.init(address="ray://head:10001")
    parallel.init(num_cpus=1)
    env = calls[0]["runtime_env"]["env_vars"]
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000" and env["FSSPEC_S3_ANON"] == "false"
    assert "AWS_PROFILE" not in env and "PATH" not in env
    assert "runtime_env" not in calls[1]


# ---------------------------------------------------------------- the demo pipeline on S3


class _CountingHandler(SimpleHTTPRequestHandler):
    """Serves a directory and counts GET requests per path (on its server)."""

    def do_GET(self) -> None:  # noqa: N802
        with self.server.lock:
            self.server.counts[self.path] += 1
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture(scope="module")
def counting_site(tmp_path_factory):
    """The demo photos on 127.0.0.1, counting requests; yields (base_url, server)."""
    from wit_builder.demo import prepare_site

    www = str(tmp_path_factory.mktemp("www"))
    prepare_site(www)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_CountingHandler, directory=www))
    httpd.daemon_threads = True
    httpd.counts, httpd.lock = Counter(), threading.Lock()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True, name="counting-http")
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def _wit(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`wit-build ARGS` in a fresh process (its embedded Ray's workers inherit the S3 settings)."""
    return subprocess.run(
        [sys.executable, "-m", "wit_builder.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "WIT_DEBUG": "1"},
    )


def _requests(httpd) -> Counter:
    with httpd.lock:
        counts = Counter(httpd.counts)
        httpd.counts.clear()
    return counts


def _fetched_per_path(samples: list[dict]) -> Counter:
    """Requests a download makes for these sample rows: one per sample of an http URL, except
    a uid repeated in the selection (recorded as duplicate_uid, never fetched)."""
    from urllib.parse import urlsplit

    return Counter(
        urlsplit(r["url"]).path for r in samples if r["url"].startswith("http") and r["error"] != "duplicate_uid"
    )


def _tars(manifest: dict) -> list[tuple]:
    return [(t["path"], t["samples"], t["bytes"], t["sha256"]) for t in manifest["tars"]]


@pytest.fixture(scope="module")
def s3_and_local_runs(s3_endpoint, counting_site, ray_session, tmp_path_factory):
    """The demo pipeline (no [train]) into a local dir (in this process) and into
    s3://wit-e2e/run (`wit-build run`, one attempt), both fetching from the same counting server;
    yields a dict of what each did."""
    from wit_builder.demo import url_rows, write_url_list
    from wit_builder.pipeline import load_pipeline
    from wit_builder.runner import run_pipeline

    base_url, httpd = counting_site
    tmp = str(tmp_path_factory.mktemp("object_store"))
    urls = os.path.join(tmp, "urls.parquet")
    write_url_list(urls, url_rows(base_url))
    bucket = _bucket("wit-e2e")
    s3_urls = f"{bucket}/inputs/urls.parquet"
    with open(urls, "rb") as f:
        io.write_bytes(f.read(), s3_urls)  # the S3 run reads its url list from the store too

    local = os.path.join(tmp, "local")
    sets = [f'candidates.inputs=["{urls}"]']
    _requests(httpd)
    run_pipeline(load_pipeline(DEMO, sets), local, overrides=sets)
    local_requests = _requests(httpd)

    out = f"{bucket}/run"
    first = _wit("run", DEMO, "--out", out, "--set", f'candidates.inputs=["{s3_urls}"]')
    s3_requests = _requests(httpd)
    assert first.returncode == 0, first.stderr[-3000:]
    rerun = _wit("run", DEMO, "--out", out, "--set", f'candidates.inputs=["{s3_urls}"]')
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    yield {
        "local": local,
        "out": out,
        "s3_urls": s3_urls,
        "first": first,
        "rerun": rerun,
        "local_requests": local_requests,
        "s3_requests": s3_requests,
        "rerun_requests": _requests(httpd),
    }


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_s3_run_makes_the_shards_of_a_local_run(s3_and_local_runs):
    r = s3_and_local_runs
    assert "resuming" not in r["first"].stderr  # one attempt, nothing taken for unfinished
    with open(os.path.join(r["local"], "shards", "manifest.json")) as f:
        local_manifest = json.load(f)
    s3_manifest = io.read_json(f"{r['out']}/shards/manifest.json")
    assert _tars(s3_manifest) == _tars(local_manifest) and s3_manifest["total_samples"] > 0
    for t in s3_manifest["tars"]:  # the objects are what the manifest says
        with io.open_file(f"{r['out']}/shards/{t['path']}") as f:
            assert hashlib.sha256(f.read()).hexdigest() == t["sha256"]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_s3_run_fetches_each_image_once_per_sample_and_leaves_no_scratch(s3_and_local_runs):
    from wit_builder.catalog import query

    r = s3_and_local_runs
    cols, rows = query(r["out"], "SELECT url, error FROM samples")
    expected = _fetched_per_path([dict(zip(cols, row)) for row in rows])
    assert sum(expected.values()) > 100
    assert r["s3_requests"] == expected == r["local_requests"]
    assert r["rerun_requests"] == Counter()
    assert r["rerun"].stderr.count("up to date, skipped") == 7

    other = _other_process_fs()
    keys = [k.split("/", 2)[2] for k in other.find(r["out"].removeprefix("s3://"))]
    assert not [k for k in keys if io.is_tmp_name(k)]
    assert not [k for k in keys if "/_work/" in k]
    assert {d for d in STAGE_DIRS if f"{d}/_SUCCESS.json" in keys} == set(STAGE_DIRS)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_status_and_sql_over_s3(s3_and_local_runs):
    r = s3_and_local_runs
    status = _wit("status", r["out"], timeout=120)
    assert status.returncode == 0, status.stderr
    assert status.stdout.count(" done ") == 7
    sql = _wit("sql", r["out"], "select count(*) from shards", timeout=120)
    assert sql.returncode == 0, sql.stderr
    total = io.read_json(f"{r['out']}/shards/manifest.json")["total_samples"]
    assert sql.stdout.splitlines()[2].strip() == str(total)
    kept = _wit("sql", r["out"], "SELECT count(*) FROM kept", timeout=120)
    assert kept.returncode == 0 and kept.stdout.splitlines()[2].strip() == str(total), kept.stderr
    report = _wit("stats", r["out"], timeout=300)
    assert report.returncode == 0, report.stderr
    assert report.stdout.strip() == f"{r['out']}/report/report.html"
    assert io.exists(f"{r['out']}/report/funnel.png")
    assert not os.path.exists(os.path.join(REPO, "s3:")), "nothing written to a local folder named after the URL"


# a run killed mid-stage, by the stage that resumes: (what of the finished run is gone (prefixes
# of paths under it), where a killed writer left a temporary object, download shard refetched)
CRASHES = {
    # after download shards 0 and 1: shard 2's files and marker gone, no filter or shards yet
    "download": (
        ("download/_SUCCESS.json", "download/00002.", "download/_parts/download/00002.", "filtered/", "shards/"),
        "download/.00002.tar.0badc0de.tmp",
        "00002",
    ),
    # in the filter's first pass, after shards 0 and 1 (no write was under way): the driver
    # lists filtered/_features (for stale temp files) before the workers write shard 2's
    # features, which it then reads
    "filter": (
        (
            "filtered/_SUCCESS.json",
            "filtered/_features/00002.",
            "filtered/_parts/features/00002.",
            "filtered/_parts/write/",
            "filtered/0",
            "shards/",
        ),
        None,
        None,
    ),
}


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("stage", list(CRASHES))
def test_s3_run_killed_mid_stage_resumes(s3_and_local_runs, counting_site, stage):
    """A copy of the finished S3 run made to look like a run killed in the middle of `stage`:
    the rerun resumes that stage, fetches only the images of unfinished download shards, removes
    a killed writer's temporary object and makes the same shards."""
    from wit_builder.catalog import query

    gone, tmp, refetched = CRASHES[stage]
    r = s3_and_local_runs
    _, httpd = counting_site
    other = _other_process_fs()
    src = r["out"].removeprefix("s3://")
    dst = f"{src}-killed-in-{stage}"
    for key in other.find(src):
        rel = key[len(src) + 1 :]
        if not rel.startswith(gone):
            other.cp_file(key, f"{dst}/{rel}")
    if tmp:
        other.pipe(f"{dst}/{tmp}", b"half a file")
    expected = Counter()
    if refetched:
        cols, rows = query(r["out"], f"SELECT url, error FROM samples WHERE shard = '{refetched}'")
        expected = _fetched_per_path([dict(zip(cols, row)) for row in rows])
        assert expected, "the demo has a third download shard"

    _requests(httpd)
    resumed = _wit("run", DEMO, "--out", f"s3://{dst}", "--set", f'candidates.inputs=["{r["s3_urls"]}"]')
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{stage}: resuming an unfinished run" in resumed.stderr
    assert _requests(httpd) == expected
    assert _tars(io.read_json(f"s3://{dst}/shards/manifest.json")) == _tars(
        io.read_json(f"{r['out']}/shards/manifest.json")
    )
    assert not [k for k in other.find(dst) if io.is_tmp_name(k)]
