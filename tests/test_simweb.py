"""The download stage on the simulated web (tests/simweb.py): hundreds of host names through our
resolver, per-host connection limits across tasks, one status row per URL, a resolver that never
answers, and progress that moves inside a shard."""

from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager

import pytest

from simweb import PHOTOS_FALLBACK, SimWeb, build_spec
from test_download import all_samples, make_selection
from wit_builder import executor
from wit_builder.stages import download
from wit_builder.stages.base import StageContext

N_URLS, N_HOSTS = 300, 520


@pytest.fixture(scope="module")
def web():
    # the demo's photos, so the test does not depend on ../shared being there
    with SimWeb(build_spec(N_URLS, N_HOSTS, seed=3, photos_dir=PHOTOS_FALLBACK)) as w:
        yield w


def sim_cfg(web, **kw) -> download.Config:
    opts = dict(
        shard_size=1000,  # capped to rows / workers by the stage
        threads_per_task=16,
        max_per_domain=2,
        timeout=2.0,
        image_size=64,
        dns_servers=[web.dns_server],
        allowed_networks=["127.0.0.0/8"],  # loopback stays refused by default; the sim lives there
        retry_backoff=0.1,
    )
    if "blur_faces" in download.Config.__dataclass_fields__:
        opts["blur_faces"] = False  # not what these tests are about, and the costliest step per image
    opts.update(kw)
    return download.Config(**opts)


@pytest.mark.timeout(180)
def test_download_on_simweb_one_row_per_url_and_per_host_limit(ray_session, web, tmp_path):
    run_dir = str(tmp_path)
    make_selection(run_dir, web.urls, parts=3)
    web.reset()
    res = download.run(StageContext(run_dir=run_dir, num_cpus=2, progress=False), sim_cfg(web))
    samples = all_samples(run_dir).to_pylist()
    assert sorted(r["url"] for r in samples) == sorted(web.urls)  # every URL exactly once
    assert res.rows_in == N_URLS and res.extra["shards"] == 2  # 300 rows / 2 workers: both cores work
    errors = Counter(r["error"] for r in samples)
    for reason in ("dns_error", "connection_refused", "http_404", "http_403", "not_an_image"):
        assert errors[reason] > 0, errors
    assert 0.6 < errors[None] / N_URLS < 0.95, errors
    stats = web.stats()
    peaks = stats["peak_per_host"]
    assert max(peaks.values()) <= 2, sorted(peaks.items(), key=lambda kv: -kv[1])[:5]
    assert max(peaks.values()) == 2  # the limit was reached, so the check could fail
    # a rerun planned on other cores cuts the same shards (kept in _parts/plan.json): all skipped
    again = download.run(StageContext(run_dir=run_dir, num_cpus=7, progress=False), sim_cfg(web))
    assert again.extra["shards_skipped"] == again.extra["shards"] == 2


class _Recorder:
    """A progress bar that records its position after every update."""

    def __init__(self) -> None:
        self.n, self.positions = 0, []

    def update(self, k: int = 1) -> None:
        self.n += k
        self.positions.append((time.monotonic(), self.n))

    def set_postfix_str(self, s: str) -> None:
        self.postfix = s


@pytest.mark.timeout(120)
def test_resolver_that_never_answers(ray_session, web, tmp_path, monkeypatch):
    rec = _Recorder()

    @contextmanager
    def recording_bar(**kw):
        yield rec

    monkeypatch.setattr(executor, "bar", recording_bar)
    run_dir = str(tmp_path)
    urls = web.urls[:200]
    make_selection(run_dir, urls, parts=1)
    web.set_dns("silent")
    deadline = 1.0
    try:
        start = time.monotonic()
        cfg = sim_cfg(web, timeout=deadline, max_per_domain=16, threads_per_task=8, shard_size=100)
        res = download.run(StageContext(run_dir=run_dir, num_cpus=2, progress=True), cfg)
        elapsed = time.monotonic() - start
    finally:
        web.set_dns("normal")
    samples = all_samples(run_dir).to_pylist()
    assert sorted(r["url"] for r in samples) == sorted(urls)
    assert {r["error"] for r in samples} == {"dns_timeout"}
    assert res.dropped == {"dns_timeout": 200}
    # each name costs one deadline at most (timeouts are cached per name), 8 threads x 2 tasks
    names = len({u.split("/")[2] for u in urls})
    assert elapsed < (names / 16 + 2) * deadline + 15, (elapsed, names)
    # progress moved inside the shards: a position that is not a sum of whole shards (0, 100, 200)
    assert any(n not in (0, 100, 200) for _, n in rec.positions), rec.positions
    assert rec.n == 200


def test_each_fetch_ends_within_its_deadline_when_dns_is_silent(web):
    from concurrent.futures import ThreadPoolExecutor

    from wit_builder.fetch import Fetcher, FetchSettings

    f = Fetcher(FetchSettings(timeout=0.5, dns_servers=(web.dns_server,), allowed_networks=("127.0.0.0/8",)))
    web.set_dns("silent")

    def timed(url: str) -> tuple[str | None, float]:
        t = time.monotonic()
        return f.fetch(url).error, time.monotonic() - t

    try:
        with ThreadPoolExecutor(16) as pool:
            out = list(pool.map(timed, web.urls[:64]))
    finally:
        web.set_dns("normal")
    assert {e for e, _ in out} == {"dns_timeout"}
    assert max(s for _, s in out) < 0.5 + 0.3
