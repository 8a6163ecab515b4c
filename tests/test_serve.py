"""`wit-build serve`: the Flask app over a small run (tests/browse_run.py), through its test client."""

from __future__ import annotations

import functools
import io as _io
import re
import socket
import subprocess
import sys
from html.parser import HTMLParser

import pytest

from browse_run import (
    EXPECTED_STATUS,
    JS_URL,
    PAYLOADS,
    QUERIES,
    hostile_dir,
    index_cache,  # noqa: F401  (autouse: the indexes go to a tmp cache)
    write_run,
)
from wit_builder.browse import Browser, Filters
from wit_builder.catalog import connect
from wit_builder.serve import create_app

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return write_run(str(tmp_path_factory.mktemp("serve_run")))


@pytest.fixture(scope="module")
def client(run_dir):
    return create_app(Browser(run_dir)).test_client()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    run = write_run(hostile_dir(str(tmp_path_factory.mktemp("hostile"))), hostile=True)
    return run, create_app(Browser(run)).test_client()


@functools.lru_cache(maxsize=4)
def _catalog(run_dir: str):
    return connect(run_dir)


def _sql(run_dir: str, sql: str, params: list | None = None) -> int:
    """A count straight from the catalog's views (not through browse.py)."""
    return _catalog(run_dir).execute(sql, params or []).fetchall()[0][0]


class _Active(HTMLParser):
    """Collects what a browser would run: script/svg/iframe elements, on* handlers, non-http(s)
    link or image targets."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in ("script", "svg", "iframe", "object", "embed"):
            self.found.append(tag)
        for name, value in attrs:
            if name.startswith("on"):
                self.found.append(f"{tag} {name}")
            if name in ("href", "src", "action") and value and not re.match(r"(https?:|/)", value.strip()):
                self.found.append(f"{tag} {name}={value}")


def _active_content(html: str) -> list[str]:
    parser = _Active()
    parser.feed(html)
    return parser.found


def _keys(html: str) -> list[str]:
    return re.findall(r'data-key="([0-9a-f]+)"', html)


def test_every_page_answers(client, run_dir):
    key = _keys(client.get("/").text)[0]
    for url in ["/", "/?status=dropped", "/?q=0&text=number", "/?lang=en&min_w=100&max_h=1000", "/?page=2",
                "/queries", "/queries?end=tail&order=kept", "/queries?order=attributed&page=1",
                f"/sample/{key}", f"/sample/{key}?wide=1", f"/image/{key}"]:  # fmt: skip
        r = client.get(url)
        assert r.status_code == 200, url
        assert "script-src" not in r.headers["Content-Security-Policy"]
        assert r.headers["Content-Security-Policy"].startswith("default-src 'none'")


def test_bad_keys_and_parameters_are_clear_errors(client):
    assert client.get("/sample/ffffffffffffffff").status_code == 404
    assert client.get("/image/ffffffffffffffff").status_code == 404
    r = client.get("/?q=cat")
    assert r.status_code == 400 and "q must be a whole number" in r.text
    assert client.get("/?status=gone").status_code == 400
    assert client.get("/queries?order=nope").status_code == 400


def test_grid_counts_equal_sql(client, run_dir):
    def shown(url: str) -> int:
        return int(re.search(r'id="total" data-count="(\d+)"', client.get(url).text).group(1))

    assert shown("/") == _sql(run_dir, "SELECT count(*) FROM samples") == sum(EXPECTED_STATUS.values())
    for qid in range(len(QUERIES)):
        assert shown(f"/?q={qid}") == _sql(run_dir, "SELECT count(*) FROM samples WHERE query_id = ?", [qid])
    for reason in ("duplicate_exact", "too_small"):
        want = _sql(run_dir, "SELECT count(*) FROM filtered WHERE drop_reason = ?", [reason])
        assert shown(f"/?reason={reason}") == want > 0
    assert shown("/?reason=http_404") == _sql(run_dir, "SELECT count(*) FROM samples WHERE error = 'http_404'")
    assert shown("/?status=kept") == _sql(run_dir, "SELECT count(*) FROM shards") == EXPECTED_STATUS["kept"]
    assert shown("/?status=failed") == _sql(run_dir, "SELECT count(*) FROM samples WHERE status <> 'success'")
    trimmed = _sql(
        run_dir,
        "SELECT count(*) FROM filtered f WHERE drop_reason IS NULL AND key NOT IN (SELECT key FROM shards)",
    )
    assert shown("/?status=trimmed") == shown("/?stage=shards") == trimmed == EXPECTED_STATUS["trimmed"]
    assert shown("/?text=NUMBER 1") == _sql(run_dir, "SELECT count(*) FROM samples WHERE caption ILIKE '%number 1%'")
    assert shown("/?text=100%25") == 0  # a LIKE wildcard in the search is literal
    by_reason = _catalog(run_dir).execute("SELECT stage, reason, count(*) FROM dropped GROUP BY ALL").fetchall()
    assert len(by_reason) == 5  # http_404, not_an_image, duplicate_exact, too_small, trimmed_over_cap
    for stage, reason, n in by_reason:
        assert shown(f"/?stage={stage}&reason={reason}") == shown(f"/?reason={reason}") == n, reason
    # each facet link's count is what choosing it shows
    html = client.get("/?q=0").text
    block = re.search(r'id="facet-status".*?</div>', html, re.S).group(0)
    facets = re.findall(r'data-value="([a-z_]+)" data-count="(\d+)"', block)
    assert {v for v, _ in facets} == {"kept", "trimmed", "dropped", "failed"}
    for value, n in facets:
        assert shown(f"/?q=0&status={value}") == int(n)


def test_thumbnails_are_real_images(client, run_dir):
    from PIL import Image

    keys = _keys(client.get("/?status=kept").text) + _keys(client.get("/?status=trimmed").text)
    assert len(keys) == EXPECTED_STATUS["kept"] + EXPECTED_STATUS["trimmed"]
    for key in keys:
        r = client.get(f"/image/{key}")
        assert r.status_code == 200 and r.mimetype in ("image/jpeg", "image/png")
        im = Image.open(_io.BytesIO(r.data))
        im.load()
        assert im.size == (64, 48)
        assert max(hi - lo for lo, hi in im.convert("RGB").getextrema()) > 60, "a blank image"
    failed = _keys(client.get("/?status=failed").text)
    assert failed and all(client.get(f"/image/{k}").status_code == 404 for k in failed)


def test_sample_page_says_why(client):
    for status, needle in [("trimmed", "Trimmed after filtering"), ("dropped", "The filter dropped it"),
                           ("failed", "The download failed"), ("kept", "In the final shards")]:  # fmt: skip
        key = _keys(client.get(f"/?status={status}").text)[0]
        html = client.get(f"/sample/{key}").text
        assert needle in html, status
        assert "view <code>samples</code> (1 row)" in html
    key = _keys(client.get("/?status=trimmed").text)[0]
    assert "keeps the first 3" in client.get(f"/sample/{key}").text
    wide = client.get(f"/sample/{key}?wide=1").text  # the catalog's own `dropped` row agrees
    assert re.search(r"view <code>dropped</code> \(1 row\).*?<th>reason</th><td>trimmed_over_cap</td>", wide, re.S)


def test_query_distribution_links_to_samples(client):
    html = client.get("/queries").text
    ids = [int(i) for i in re.findall(r'href="/\?q=(\d+)"', html)]
    assert ids == [0, 1, 2, 3]  # containing: 9, 6, 5, 4
    tail = [int(i) for i in re.findall(r'href="/\?q=(\d+)"', client.get("/queries?end=tail").text)]
    assert tail == ids[::-1]


def test_hostile_text_is_escaped(hostile):
    run, client = hostile
    pages = [client.get("/").text, client.get("/queries").text, client.get("/?text=<script>").text]
    keys = _keys(pages[0])
    pages += [client.get(f"/sample/{k}?wide=1").text for k in keys]
    for html in pages:
        for payload in PAYLOADS:
            assert payload not in html
        assert _active_content(html) == []
    joined = "".join(pages)
    assert "&lt;script&gt;document.title=&#39;pwned&#39;&lt;/script&gt;" in joined  # shown, escaped
    assert JS_URL.replace("'", "&#39;") in joined  # shown as text, not linked
    assert "&lt;img src=x onerror=" in pages[0]  # the run path, escaped


def test_cli_errors_exit_2(tmp_path, run_dir):
    missing = subprocess.run(
        [sys.executable, "-m", "wit_builder.cli", "serve", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "run directory not found" in missing.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        busy = subprocess.run(
            [sys.executable, "-m", "wit_builder.cli", "serve", run_dir, "--port", str(port)],
            capture_output=True,
            text=True,
        )
    assert busy.returncode == 2 and f"127.0.0.1:{port}" in busy.stderr and "--port" in busy.stderr


def test_filters_count_directly(run_dir):
    b = Browser(run_dir)
    assert b.count(Filters(status="kept", query_id=0)) == 3
    assert b.count(Filters(min_width=641)) == 0
    assert b.count(Filters(max_width=640, lang="en")) == _sql(run_dir, "SELECT count(*) FROM filtered")


@pytest.mark.timeout(120)
def test_a_run_on_an_object_store(s3_endpoint, run_dir):
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    if not fs.exists("wit-serve"):
        fs.mkdir("wit-serve")
    fs.put(run_dir, "wit-serve/run", recursive=True)
    client = create_app(Browser("s3://wit-serve/run")).test_client()
    local = create_app(Browser(run_dir)).test_client()
    for url in ["/", "/?status=kept", "/?reason=duplicate_exact", "/queries"]:
        assert client.get(url).text == local.get(url).text.replace(run_dir, "s3://wit-serve/run"), url
    key = _keys(client.get("/?status=trimmed").text)[0]
    assert client.get(f"/image/{key}").data == local.get(f"/image/{key}").data
    assert "Trimmed after filtering" in client.get(f"/sample/{key}").text


def test_images_come_from_the_final_shards_when_the_download_tar_is_gone(tmp_path):
    run = write_run(str(tmp_path / "run"))
    before = create_app(Browser(run)).test_client()
    kept = _keys(before.get("/?status=kept").text)
    trimmed = _keys(before.get("/?status=trimmed").text)
    images = {k: before.get(f"/image/{k}").data for k in kept}
    (tmp_path / "run" / "download" / "00000.tar").unlink()
    after = create_app(Browser(run)).test_client()
    assert {k: after.get(f"/image/{k}").data for k in kept} == images
    assert all(after.get(f"/image/{k}").status_code == 404 for k in trimmed)  # only in the download tar


def test_a_run_without_downloads_yet(tmp_path):
    (tmp_path / "pipeline.json").write_text("{}")
    client = create_app(Browser(str(tmp_path))).test_client()
    assert "no download results yet" in client.get("/").text
    assert client.get("/queries").status_code == 200
    assert client.get("/sample/0000000000000000").status_code == 404
