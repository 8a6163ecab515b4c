"""Safety lists through the whole pipeline (runner, embedded Ray, loopback servers that log every
request): blocked domains, URLs and opted-out prefixes are never requested; phash and sha256
lists drop the listed images and a resized, re-encoded copy; an eval folder's re-encoded copy
drops its sample with the eval image named; counts per list; lists in the manifest; a changed
list redoes only the filter and the shards; a sha256 list matches the fetched original's digest too."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
from PIL import Image

from logging_server import LoggingServer
from wit_builder import io
from wit_builder.filters.dedup import phash
from wit_builder.pipeline import load_pipeline
from wit_builder.runner import run_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_IMAGES = os.path.join(REPO, "demo", "images")


@pytest.fixture
def servers(tmp_path):
    www = tmp_path / "www"
    made = [LoggingServer(str(www), host) for host in ("127.0.0.1", "127.0.0.2", "127.0.0.3")]
    yield www, made
    for s in made:
        s.stop()


def _sha(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.timeout(300)
def test_lists_and_eval_decontamination_end_to_end(ray_session, servers, tmp_path):
    www, (main, blocked_host, other_host) = servers
    photos = sorted(os.listdir(DEMO_IMAGES))[:10]
    for d in ("pub", "private"):
        (www / d).mkdir(parents=True)
    for i, name in enumerate(photos):
        shutil.copy(os.path.join(DEMO_IMAGES, name), www / ("private" if i == 6 else "pub") / f"img{i}.jpg")
    listed = Image.open(www / "pub" / "img0.jpg").convert("RGB")  # on the phash list
    copy = listed.resize((listed.width * 3 // 5, listed.height * 3 // 5))
    copy.save(www / "pub" / "copy0.jpg", quality=60)  # a resized, re-encoded copy of it
    evals = tmp_path / "evals" / "set1"
    evals.mkdir(parents=True)
    contaminated = Image.open(www / "pub" / "img2.jpg").convert("RGB")
    contaminated.resize((contaminated.width // 2, contaminated.height // 2)).save(evals / "c.png")
    Image.open(www / "pub" / "img9.jpg").convert("RGB").rotate(90, expand=True).save(evals / "unrelated.webp")

    urls = [f"{main.base}/pub/img{i}.jpg" for i in (0, 1, 2, 3, 4, 5)] + [
        f"{main.base}/pub/copy0.jpg",
        f"{main.base}/private/img6.jpg",  # opted out by prefix
        f"{blocked_host.base}/pub/img7.jpg",  # a blocked host: never contacted
        f"{other_host.base}/pub/img8.jpg",  # another loopback host, not listed: fetched
    ]
    (tmp_path / "urls.csv").write_text(
        "url,caption\n" + "".join(f"{u},a photo of thing {i}\n" for i, u in enumerate(urls))
    )
    (tmp_path / "queries.txt").write_text("photo\n")
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "hosts.txt").write_text(f"# hosts\n{blocked_host.base.split('//')[1].split(':')[0]}.\n")
    (lists / "urls.txt").write_text(f"{main.base.upper()}/pub/img5.jpg#fragment\n")
    (lists / "artists.txt").write_text(f"{main.base}/private/\n")
    (lists / "known.txt").write_text(f"{phash(listed):016x}\n")
    (lists / "takedowns.txt").write_text("# nothing yet\n")
    pipeline_path = tmp_path / "p.toml"
    pipeline_path.write_text("""
[run]
num_cpus = 2
progress = false
[queries]
lists = ["queries.txt"]
[candidates]
inputs = ["urls.csv"]
partitions = 1
blocklists = [
  {name = "hosts", kind = "domain", path = "lists/hosts.txt"},
  {name = "urls", kind = "url", path = "lists/urls.txt"},
]
optout_lists = [{name = "artists", kind = "prefix", path = "lists/artists.txt"}]
[balance]
cap = 100
[download]
shard_size = 64
threads_per_task = 4
allow_private_network = true
image_size = 128
shard_attempts = 1
[filter]
languages = []
workers = 1
blocklists = [
  {name = "takedowns", kind = "sha256", path = "lists/takedowns.txt"},
  {name = "known", kind = "phash", path = "lists/known.txt", max_distance = 6},
]
eval_dirs = ["evals"]
[shards]
samples_per_shard = 40
""")
    out = str(tmp_path / "run")
    results = run_pipeline(load_pipeline(str(pipeline_path)), out)

    # never requested: the blocked host, the blocked URL, the opted-out prefix
    assert blocked_host.requests == []
    assert "/pub/img5.jpg" not in main.requests and "/private/img6.jpg" not in main.requests
    assert other_host.requests == ["/pub/img8.jpg"] and "/pub/img0.jpg" in main.requests
    cand = results["candidates"].dropped
    assert (cand["safety:blocklist:hosts"], cand["safety:blocklist:urls"], cand["safety:optout:artists"]) == (1, 1, 1)

    def reasons() -> dict[str, tuple[str | None, str | None]]:
        urls_by_uid = {}
        for p in io.listdir(os.path.join(out, "download"), ".parquet"):
            urls_by_uid.update({r["uid"]: r["url"] for r in io.read_parquet(p, columns=["uid", "url"]).to_pylist()})
        got = {}
        for p in io.listdir(os.path.join(out, "filtered"), ".parquet"):
            for r in io.read_parquet(p).to_pylist():
                got[urls_by_uid[r["uid"]].rsplit("/", 1)[1]] = (r["drop_reason"], r["eval_match"])
        return got

    got = reasons()
    assert got["img0.jpg"] == got["copy0.jpg"] == ("safety:blocklist:known", None)
    assert got["img2.jpg"] == ("safety:eval_duplicate", str(evals / "c.png"))
    assert got["img1.jpg"] == got["img3.jpg"] == got["img8.jpg"] == (None, None)
    filt = results["filter"]
    assert filt.dropped["safety:blocklist:known"] == 2 and filt.dropped["safety:eval_duplicate"] == 1
    assert filt.dropped["safety:blocklist:takedowns"] == 0  # listed, matched nothing
    assert filt.extra["eval_images"] == 2
    manifest = json.load(open(os.path.join(out, "shards", "manifest.json")))
    assert [(x["role"], x["name"], x["kind"], x["sha256"]) for x in manifest["safety_lists"]] == [
        ("blocklist", "hosts", "domain", _sha(lists / "hosts.txt")),
        ("blocklist", "urls", "url", _sha(lists / "urls.txt")),
        ("optout", "artists", "prefix", _sha(lists / "artists.txt")),
        ("blocklist", "takedowns", "sha256", _sha(lists / "takedowns.txt")),
        ("blocklist", "known", "phash", _sha(lists / "known.txt")),
    ]

    # takedowns by the sha256 of a stored image (img1) and of a fetched original (img3, stored
    # resized: other bytes): only the filter and the shards are redone
    digests = {
        r["url"].rsplit("/", 1)[1]: (r["sha256"], r["original_sha256"])
        for p in io.listdir(os.path.join(out, "download"), ".parquet")
        for r in io.read_parquet(p, columns=["url", "sha256", "original_sha256"]).to_pylist()
    }
    assert digests["img3.jpg"][1] == _sha(www / "pub" / "img3.jpg") != digests["img3.jpg"][0]
    (lists / "takedowns.txt").write_text(f"{digests['img1.jpg'][0]}\n{digests['img3.jpg'][1]}\n")
    redone: list[str] = []
    again = run_pipeline(
        load_pipeline(str(pipeline_path)), out, on_result=lambda n, r, skipped: None if skipped else redone.append(n)
    )
    assert redone == ["filter", "shards"]
    assert reasons()["img1.jpg"] == reasons()["img3.jpg"] == ("safety:blocklist:takedowns", None)
    assert again["filter"].dropped["safety:blocklist:takedowns"] == 2
    manifest = json.load(open(os.path.join(out, "shards", "manifest.json")))
    assert manifest["safety_lists"][3]["sha256"] == _sha(lists / "takedowns.txt")
    final = [
        r["url"]
        for p in io.listdir(os.path.join(out, "shards", "metadata"), ".parquet")
        for r in io.read_parquet(p, columns=["url"]).to_pylist()
    ]
    assert f"{other_host.base}/pub/img8.jpg" in final and not any(
        u.endswith(("/img0.jpg", "/img1.jpg", "/img2.jpg", "/img3.jpg")) for u in final
    )
