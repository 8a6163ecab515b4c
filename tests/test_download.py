"""The download stage end to end on the hostile server: one row per sample, deterministic tars,
resume, retry of transient failures, a Ray worker killed mid-stage."""

from __future__ import annotations

import hashlib
import os
import signal
import tarfile
import threading
import time

import pyarrow as pa
import pytest

from hostile_server import EXPECTED, HostileServer
from wit_builder import io, schema
from wit_builder.stages import download
from wit_builder.stages.base import StageContext
from wit_builder.tario import read_tar


@pytest.fixture(scope="session")
def hostile():
    s = HostileServer()
    yield s
    s.stop()


def uid_of(url: str, caption: str) -> str:
    return hashlib.blake2b((url + "\x1f" + caption).encode(), digest_size=8).hexdigest()


def make_selection(run_dir: str, urls: list[str], parts: int = 2) -> list[dict]:
    """Write selected/part-*.parquet (schema.SELECTED) for `urls`, split into `parts` files."""
    rows = []
    for i, url in enumerate(urls):
        caption = f"caption {i} for {url.rsplit('/', 1)[-1]}"
        rows.append(
            dict(
                uid=uid_of(url, caption),
                url=url,
                caption=caption,
                source_file="test.parquet",
                page_url=None,
                query_ids=[i % 3, 7],
                query_id=i % 3,
                rank=0.5,
                query_text=f"query {i % 3}",
            )
        )
    per = -(-len(rows) // parts)
    for p in range(parts):
        chunk = rows[p * per : (p + 1) * per]
        io.write_parquet(
            pa.Table.from_pylist(chunk, schema=schema.SELECTED), io.join(run_dir, "selected", io.part_name(p))
        )
    return rows


def cfg(**kw) -> download.Config:
    opts = dict(
        shard_size=7,
        threads_per_task=4,
        timeout=1.0,
        max_bytes=1_000_000,
        image_size=64,
        allow_private_network=True,
        retry_backoff=0.1,
    )
    opts.update(kw)
    return download.Config(**opts)


def all_samples(run_dir: str) -> pa.Table:
    parts = io.listdir(io.join(run_dir, "download"), ".parquet")
    return pa.concat_tables([io.read_parquet(p) for p in parts])


def outputs(run_dir: str) -> dict[str, bytes]:
    """name -> bytes of every tar and parquet (the stage's deterministic outputs)."""
    d = io.join(run_dir, "download")
    return {os.path.basename(p): open(p, "rb").read() for p in io.listdir(d) if p.endswith((".tar", ".parquet"))}


def test_hostile_run_accounts_for_every_sample(ray_session, hostile, tmp_path):
    paths = sorted(EXPECTED)
    rows = make_selection(str(tmp_path), [hostile.url(p) for p in paths], parts=3)
    ctx = StageContext(run_dir=str(tmp_path), seed=0, progress=False)
    res = download.run(ctx, cfg())
    res.check_accounting()
    assert res.rows_in == len(rows)
    want_fail = {p: e for p, e in EXPECTED.items() if e}
    assert res.rows_out == len(rows) - len(want_fail)
    reasons: dict[str, int] = {}
    for e in want_fail.values():
        reasons[e] = reasons.get(e, 0) + 1
    assert res.dropped == reasons

    samples = all_samples(str(tmp_path)).to_pylist()
    assert sorted(s["uid"] for s in samples) == sorted(r["uid"] for r in rows)  # each exactly once
    by_url = {s["url"]: s for s in samples}
    for p, err in EXPECTED.items():
        s = by_url[hostile.url(p)]
        assert s["error"] == err, p
        assert s["status"] == ("failed" if err else "success")
        if not err:
            assert s["sha256"] and s["bytes"] and s["width"] and s["height"]

    d = io.join(str(tmp_path), "download")
    n_shards = -(-len(rows) // 7)
    for k in range(n_shards):
        shard = f"{k:05d}"
        assert io.exists(io.join(d, "_parts", "download", f"{shard}.json"))  # the shard's marker
        meta = io.read_parquet(io.join(d, f"{shard}.parquet")).to_pylist()
        assert [m["key"] for m in meta] == sorted(m["key"] for m in meta)
        with tarfile.open(io.join(d, f"{shard}.tar")) as tar:
            members = tar.getmembers()
        names = [m.name for m in members]
        assert names == sorted(names)
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" and m.mode == 0o644 for m in members)
        ok = {m["key"]: m for m in meta if m["status"] == "success"}
        assert names == sorted(f"{k}.{ext}" for k in ok for ext in ("jpg", "json", "txt"))
        for name, data in read_tar(io.join(d, f"{shard}.tar")):
            key, ext = name.split(".")
            if ext == "jpg":
                assert hashlib.sha256(data).hexdigest() == ok[key]["sha256"]


def test_rerun_skips_done_shards_and_output_is_partition_independent(ray_session, hostile, tmp_path):
    urls = [hostile.url(f"/img/{i}.jpg") for i in range(20)] + [hostile.url("/status/404")]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    make_selection(a, urls, parts=1)
    make_selection(b, urls, parts=4)
    res_a = download.run(StageContext(run_dir=a, progress=False), cfg())
    download.run(StageContext(run_dir=b, progress=False), cfg())
    assert outputs(a) == outputs(b)  # same rows in the same order -> byte-identical shards
    assert res_a.rows_out == 20 and res_a.dropped == {"http_404": 1}
    before = hostile.counts.get("/img/3.jpg", 0)
    again = download.run(StageContext(run_dir=a, progress=False), cfg())
    assert again.extra["shards_skipped"] == again.extra["shards"] == 3
    assert hostile.counts.get("/img/3.jpg", 0) == before  # nothing fetched again
    assert (again.rows_in, again.rows_out, again.dropped) == (res_a.rows_in, res_a.rows_out, res_a.dropped)


def test_retry_failed_recovers_transient_failures_only(ray_session, hostile, tmp_path):
    run_dir = str(tmp_path)
    urls = (
        [hostile.url(f"/img/{100 + i}.jpg") for i in range(5)]
        + [hostile.url(f"/flaky/1/{200 + i}.jpg") for i in range(4)]
        + [hostile.url("/status/404"), hostile.url("/html.jpg")]
    )
    make_selection(run_dir, urls, parts=1)
    ctx = StageContext(run_dir=run_dir, progress=False)
    first = download.run(ctx, cfg(shard_size=6))
    fetched_404 = hostile.counts["/status/404"]
    assert first.dropped == {"http_503": 4, "http_404": 1, "not_an_image": 1}
    before = {name: data for p in io.listdir(io.join(run_dir, "download"), ".tar") for name, data in read_tar(p)}

    res = download.retry_failed(ctx, cfg(shard_size=6))
    res.check_accounting()
    assert res.rows_out == 9 and res.dropped == {"http_404": 1, "not_an_image": 1}
    assert res.extra["recovered"] == 4
    after = {name: data for p in io.listdir(io.join(run_dir, "download"), ".tar") for name, data in read_tar(p)}
    assert all(after[name] == data for name, data in before.items())  # successes untouched
    assert len(after) == 9 * 3
    assert hostile.counts["/status/404"] == fetched_404  # permanent failures are not re-fetched
    samples = all_samples(run_dir).to_pylist()
    assert sorted(s["uid"] for s in samples) == sorted(
        uid_of(u, f"caption {i} for {u.rsplit('/', 1)[-1]}") for i, u in enumerate(urls)
    )
    # a second retry finds nothing transient left
    again = download.retry_failed(ctx, cfg(shard_size=6))
    assert again.extra["shards_retried"] == 0 and again.rows_out == 9


@pytest.mark.timeout(60)
def test_retry_failed_progress_moves_within_a_shard(ray_session, hostile, tmp_path, capsys, monkeypatch):
    """The retry's bar counts the transient failures and moves as they are re-fetched inside the
    shard (the download's in-shard reports), not only when the one shard ends."""
    run_dir = str(tmp_path)
    # one shard: 8 timeouts (each re-fetch takes the 1 s deadline, 2 threads: ~4 s), 2 that recover,
    # one success and one permanent failure (neither retried)
    urls = (
        [hostile.url("/slow.jpg")] * 8
        + [hostile.url(f"/flaky/1/{300 + i}.jpg") for i in range(2)]
        + [hostile.url("/img/1.jpg"), hostile.url("/status/404")]
    )
    make_selection(run_dir, urls, parts=1)
    opts = dict(shard_size=16, threads_per_task=2)
    first = download.run(StageContext(run_dir=run_dir, progress=False), cfg(**opts))
    assert first.extra["shards"] == 1 and first.dropped == {"timeout": 8, "http_503": 2, "http_404": 1}
    monkeypatch.setenv("WIT_PROGRESS_EVERY", "0")  # a plain line at every move of the bar
    capsys.readouterr()
    res = download.retry_failed(StageContext(run_dir=run_dir, progress=True), cfg(**opts))
    assert res.extra["recovered"] == 2 and res.dropped == {"timeout": 8, "http_404": 1}
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("download retry: ")]
    done = [int(line.split()[2].split("/")[0]) for line in lines]
    assert all(line.split()[2].endswith("/10") for line in lines), lines  # total: the transient failures
    assert any(0 < n < 10 for n in done), lines  # moved inside the shard
    assert done[-1] == 10 and "recovered" in lines[-1], lines


def _busy_ray_workers() -> list[int]:
    """PIDs of Ray worker processes currently running a task (proctitle "ray::<task>")."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("ray::") and "IDLE" not in cmd and "ray::" + "download_shard" in cmd:
            pids.append(int(pid))
    return pids


@pytest.mark.timeout(120)
def test_killed_ray_worker_shard_is_retried(ray_session, hostile, tmp_path):
    hostile.set_slow_delay(0.15)
    run_dir = str(tmp_path)
    urls = [hostile.url(f"/slowimg/{300 + i}.jpg") for i in range(16)]
    rows = make_selection(run_dir, urls, parts=1)
    killed: list[int] = []

    def killer():
        deadline = time.monotonic() + 60
        while not killed and time.monotonic() < deadline:
            pids = _busy_ray_workers()
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.05)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    res = download.run(StageContext(run_dir=run_dir, progress=False), cfg(shard_size=4, threads_per_task=2))
    th.join()
    assert killed, "no busy Ray worker was found to kill"
    assert res.rows_in == 16 and res.rows_out == 16
    samples = all_samples(run_dir).to_pylist()
    assert sorted(s["uid"] for s in samples) == sorted(r["uid"] for r in rows)


def test_config_errors_name_the_key():
    from wit_builder.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="resize_mode"):
        from_dict(download.Config, {"resize_mode": "squash"}, "p.toml [download]")
    with pytest.raises(ConfigError, match="allowed_networks"):
        from_dict(download.Config, {"allowed_networks": ["not-a-net"]}, "p.toml [download]")
    with pytest.raises(ConfigError, match="unknown key 'threads'"):
        from_dict(download.Config, {"threads": 4}, "p.toml [download]")
    ok = from_dict(download.Config, {"image_size": 384, "encode_format": "webp", "encode_quality": 90}, "p")
    assert ok.resize_settings().encode_format == "webp"


def test_missing_selection_is_a_config_error(tmp_path):
    from wit_builder.config import ConfigError

    with pytest.raises(ConfigError, match="balance stage"):
        download.run(StageContext(run_dir=str(tmp_path), progress=False), cfg())
