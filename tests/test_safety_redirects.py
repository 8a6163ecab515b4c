"""A blocked host is never contacted through a redirect either: the download stage's fetcher asks
the candidates stage's URL lists about every hop (loopback servers that log every request)."""

from __future__ import annotations

import os
import shutil

import pytest

from logging_server import LoggingServer
from wit_builder.pipeline import load_pipeline
from wit_builder.safety.lists import ListSpec
from wit_builder.stages import download

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTO = os.path.join(REPO, "demo", "images", sorted(os.listdir(os.path.join(REPO, "demo", "images")))[0])


@pytest.fixture
def hosts(tmp_path):
    """Four loopback addresses serving the same files: the photo at every path the test asks for."""
    www = tmp_path / "www"
    for rel in ("a.jpg", "private/b.jpg", "public/c.jpg", "d.jpg", "e.jpg"):
        (www / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PHOTO, www / rel)
    made = [LoggingServer(str(www), ip) for ip in ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4")]
    yield made
    for h in made:
        h.stop()


@pytest.mark.timeout(60)
def test_redirect_to_a_listed_host_is_a_status_row_and_never_requested(hosts, tmp_path):
    start, blocked, opted_out, fine = hosts
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "hosts.txt").write_text("127.0.0.2\n")
    (lists / "optout.txt").write_text(f"{opted_out.base}/private/\n")
    cfg = download.Config(
        allow_private_network=True,
        timeout=5.0,
        blur_faces=False,
        threads_per_task=2,
        blocklists=[ListSpec("bad-hosts", "domain", str(lists / "hosts.txt"))],
        optout_lists=[ListSpec("asked", "prefix", str(lists / "optout.txt"))],
    )
    rows = [
        {"url": f"{start.base}/r?to={blocked.base}/a.jpg"},
        {"url": f"{start.base}/r?to={opted_out.base}/private/b.jpg"},
        {"url": f"{start.base}/r?to={opted_out.base}/public/c.jpg"},  # not under the prefix: fetched
        {"url": f"{start.base}/r?to={fine.base}/d.jpg"},
        {"url": f"{start.base}/r?to={start.base}/r?to={blocked.base}/e.jpg"},  # blocked on the 2nd hop
    ]
    got = {i: error for i, _, error in download._download_rows(rows, cfg)}
    assert got == {
        0: "safety:blocklist:bad-hosts",
        1: "safety:optout:asked",
        2: None,
        3: None,
        4: "safety:blocklist:bad-hosts",
    }
    assert blocked.requests == []
    assert opted_out.requests == ["/public/c.jpg"]
    assert fine.requests == ["/d.jpg"]


def test_download_inherits_the_candidates_lists(tmp_path):
    """[download] blocklists/optout_lists left empty take the [candidates] ones (demo.toml has one)."""
    pipeline = load_pipeline(os.path.join(REPO, "pipelines", "demo.toml"))
    cands, down = pipeline.config_for("candidates"), pipeline.config_for("download")
    assert cands.blocklists and down.blocklists == cands.blocklists
    assert down.optout_lists == cands.optout_lists
    own = tmp_path / "own.txt"
    shutil.copyfile(os.path.join(REPO, "demo", "blocklist.txt"), own)
    mine = load_pipeline(
        os.path.join(REPO, "pipelines", "demo.toml"),
        [f'download.blocklists=[{{name = "own", kind = "domain", path = "{own}"}}]'],
    )
    assert [s.name for s in mine.config_for("download").blocklists] == ["own"]
