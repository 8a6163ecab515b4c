"""Safety lists without a pipeline: URL/host normalisation, list matching, list files, the phash
band index against a brute-force scan, the image screen, config validation and fingerprints."""

from __future__ import annotations

import io as _io
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from wit_builder import runner
from wit_builder.config import ConfigError
from wit_builder.filters.dedup import phash, phash_bytes
from wit_builder.pipeline import load_pipeline
from wit_builder.safety.hashes import HashIndex
from wit_builder.safety.lists import ListSpec, read_entries
from wit_builder.safety.screen import ImageScreen, load_image_lists, url_screen
from wit_builder.safety.urls import UrlList, UrlParts, entry_key_set, entry_keys, url_key

pytestmark = pytest.mark.timeout(60)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_IMAGES = os.path.join(REPO, "demo", "images")

TRICKY = [
    "http://Example.COM/a.jpg",
    "https://example.com.:443/a.jpg#frag",
    "HTTP://EXAMPLE.com:80",
    "http://example.com:8080/a.jpg?x=1&Y=2",
    "https://user:pw@img.Example.com/P/Q.png",
    "http://bücher.example/x.jpg",
    "http://[::1]:80/v6.jpg",
    "https://example.com?q=1",
    "http://:80/nohost.jpg",
    "not a url",
    "http://a@b@bad.example/x.jpg",
    "http://bad.exa\nmple/x.jpg",
    "http://straße.de/x.jpg",
    None,
]


def test_url_keys_normalise_case_idna_dots_ports_and_fragments():
    assert url_key("https://example.com.:443/a.jpg#frag") == url_key("http://Example.COM/a.jpg") == "example.com/a.jpg"
    assert url_key("HTTP://EXAMPLE.com:80") == "example.com/"
    assert url_key("http://example.com:8080/A.jpg") == "example.com:8080/A.jpg", "paths keep their case"
    assert url_key("http://bücher.example/x.jpg") == "xn--bcher-kva.example/x.jpg"
    assert url_key("example.com/private/") == "example.com/private/", "an entry without a scheme"


def test_column_keys_equal_the_scalar_keys():
    parts = UrlParts.of(pa.array(TRICKY, pa.string()))
    assert parts.keys.to_pylist() == [url_key(u) if u else None for u in TRICKY]


def test_list_entries_keyed_column_wise_equal_the_scalar_keys():
    """A url/prefix list is loaded column-wise (`entry_key_set`): the same keys and the same
    host-less entries as `entry_keys` one at a time, non-ASCII and scheme-less entries too."""
    entries = [u for u in TRICKY if u] + [
        "example.com/private/",
        "  Bücher.example/x ",
        "https://EXAMPLE.com:443/Q?x#f",
        "ftp://x.example/a",
        "http://[::1]:8080/a",
        "http://:80/",
        "a b/c",
        "\tex\nample.com/p",
    ]
    keys, bad = entry_key_set(entries)
    assert keys == set().union(*(entry_keys(e) for e in entries))
    assert sorted(bad) == sorted(e for e in entries if not entry_keys(e)) and bad, "some entries have no host"


def test_domain_url_and_prefix_lists():
    urls = pa.array(
        [
            "http://IMG.bad.example./x.jpg",  # subdomain of a listed domain
            "http://notbad.example/x.jpg",  # only a suffix of the name: not listed
            "https://bad.example:443/y.jpg",
            "http://ok.example/private/1.jpg",
            "http://ok.example/privateer.jpg",
            "http://ok.example/public/1.jpg#top",
            "http://ok.example:8080/public/1.jpg",
            "http://xn--bcher-kva.example/z.jpg",
        ]
    )
    parts = UrlParts.of(urls)
    domains = UrlList("d", "domain", ["*.BAD.example", "bücher.example"])
    assert domains.mask(parts).tolist() == [True, False, True, False, False, False, False, True]
    prefixes = UrlList("p", "prefix", ["https://ok.example/private/"])
    assert prefixes.mask(parts).tolist() == [False, False, False, True, False, False, False, False]
    exact = UrlList("u", "url", ["http://OK.example/public/1.jpg"])
    assert exact.mask(parts).tolist() == [False, False, False, False, False, True, False, False]


def test_one_url_check_agrees_with_the_column_mask():
    """The fetcher's per-hop check (set lookups, `UrlScreen.check`) gives each URL the verdict the
    candidates' column-wise `mask` gives it, for every kind of list."""
    from wit_builder.safety.screen import UrlScreen

    urls = [u for u in TRICKY if u] + ["http://img.bad.example/p/1.jpg", "https://EXAMPLE.com/P/Q.png", "//x/y"]
    lists = [
        UrlList("d", "domain", ["bad.example", "Bücher.example", "straße.de", "[::1]"]),
        UrlList("u", "url", ["http://example.com/a.jpg", "example.com:8080/a.jpg?x=1&Y=2", "https://example.com/?q=1"]),
        UrlList("p", "prefix", ["http://img.example.com/P/", "example.com/P", "http://[::1]/"]),
    ]
    parts = UrlParts.of(pa.array(urls, pa.string()))
    for lst in lists:
        screen = UrlScreen([(lst.name, lst)])
        one_at_a_time = [screen.check(u) == lst.name for u in urls]
        assert one_at_a_time == lst.mask(parts).tolist(), lst.name
        assert any(one_at_a_time), f"list {lst.name} matches none of the URLs: the test would prove nothing"


def test_hosts_are_taken_as_the_fetcher_takes_them():
    """urlsplit's rules (the fetcher's): userinfo ends at the last @, tabs and newlines vanish,
    non-ASCII names through Python's IDNA codec; entries match in their UTS 46 form too."""
    from urllib.parse import urlsplit

    urls = ["http://a@b@bad.example/x.jpg", "http://bad.exa\nmple/y.jpg", "http://straße.de/z.jpg"]
    parts = UrlParts.of(pa.array(urls))
    contacted = [urlsplit(u).hostname.encode("idna").decode() for u in urls]
    assert [parts.hosts[c] for c in parts.codes] == contacted == ["bad.example", "bad.example", "strasse.de"]
    assert UrlList("d", "domain", ["bad.example", "strasse.de"]).mask(parts).all()
    either = UrlParts.of(pa.array(["http://strasse.de/", "http://xn--strae-oqa.de/", "http://other.de/"]))
    assert UrlList("d", "domain", ["Straße.de"]).mask(either).tolist() == [True, True, False]


def test_text_and_parquet_lists(tmp_path):
    text = tmp_path / "l.txt"
    text.write_text("# comment\n\n  a.example  \nb.example\n")
    assert read_entries(ListSpec("t", "domain", str(text))) == ["a.example", "b.example"]
    import gzip

    gz = tmp_path / "l.txt.gz"
    gz.write_bytes(gzip.compress(b"c.example\n"))
    assert read_entries(ListSpec("g", "domain", str(gz))) == ["c.example"]
    table = tmp_path / "l.parquet"
    pq.write_table(pa.table({"host": ["d.example", None, "e.example"], "n": [1, 2, 3]}), table)
    assert read_entries(ListSpec("p", "domain", str(table), column="host")) == ["d.example", "e.example"]
    with pytest.raises(ConfigError, match="set `column`"):
        read_entries(ListSpec("p", "domain", str(table)))
    with pytest.raises(ConfigError, match="no column 'nope'"):
        read_entries(ListSpec("p", "domain", str(table), column="nope"))


def test_url_screen_counts_per_list_and_checks_page_urls(tmp_path):
    (tmp_path / "block.txt").write_text("bad.example\n")
    (tmp_path / "optout.txt").write_text("https://ok.example/artist/\n")
    screen = url_screen(
        (ListSpec("hosts", "domain", str(tmp_path / "block.txt")),),
        (ListSpec("artists", "prefix", str(tmp_path / "optout.txt")),),
    )
    table = pa.table(
        {
            "url": [
                "http://cdn.example/1.jpg",
                "http://ok.example/artist/2.jpg",
                "http://bad.example/3.jpg",
                "http://x/4",
            ],
            "page_url": ["http://www.bad.example/page", None, None, None],
        }
    )
    kept, counts = screen.apply(table)
    assert kept["url"].to_pylist() == ["http://x/4"]
    assert counts == {"safety:blocklist:hosts": 2, "safety:optout:artists": 1}


@pytest.mark.parametrize("distance", [0, 3, 6])
def test_band_index_equals_a_scan(distance):
    rng = np.random.default_rng(distance)
    hashes = rng.integers(0, 2**63, 3000, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    flips = [int(h) ^ (1 << int(b)) for h, b in zip(hashes[:200], rng.integers(0, 64, 200))]
    queries = flips + rng.integers(0, 2**63, 200, dtype=np.int64).tolist() + [int(hashes[5])]
    index = HashIndex(hashes, distance)
    for q in queries:
        dist = np.array([(int(h) ^ q).bit_count() for h in hashes])
        want = None if dist.min() > distance else (int(np.argmin(dist)), int(dist.min()))
        assert index.nearest(q) == want


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = _io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_image_screen_drops_listed_images_and_a_resized_reencoded_copy(tmp_path):
    import hashlib

    photos = sorted(os.listdir(DEMO_IMAGES))[:3]
    originals = [Image.open(os.path.join(DEMO_IMAGES, p)).convert("RGB") for p in photos]
    listed, other, exact = originals
    exact_bytes = _jpeg(exact)
    (tmp_path / "p.txt").write_text(f"{phash(listed):016x}  {photos[0]}\n")
    (tmp_path / "s.txt").write_text(hashlib.sha256(exact_bytes).hexdigest().upper() + "\n")
    screen = ImageScreen(
        *load_image_lists(
            [ListSpec("sha", "sha256", str(tmp_path / "s.txt")), ListSpec("ph", "phash", str(tmp_path / "p.txt"))]
        )
    )
    copy = _jpeg(listed.resize((listed.width // 2, listed.height // 2)), quality=60)
    assert screen.check(None, phash_bytes(copy)) == ("safety:blocklist:ph", None)
    assert screen.check(None, phash_bytes(_jpeg(other))) == (None, None)
    assert screen.check(hashlib.sha256(exact_bytes).hexdigest(), None) == ("safety:blocklist:sha", None)


def test_bad_list_entries_are_config_errors(tmp_path):
    (tmp_path / "s.txt").write_text("abc\n")
    with pytest.raises(ConfigError, match="'sha'.*not 64 hex digits.*'abc'"):
        load_image_lists([ListSpec("sha", "sha256", str(tmp_path / "s.txt"))])


def _pipeline_file(tmp_path, candidates: str = "", filter_: str = "") -> str:
    (tmp_path / "urls.csv").write_text("url,caption\nhttp://a.example/1.jpg,a cat\n")
    path = tmp_path / "p.toml"
    path.write_text(f'[queries]\nlists = []\n[candidates]\ninputs = ["urls.csv"]\n{candidates}\n[filter]\n{filter_}\n')
    return str(path)


@pytest.mark.parametrize(
    "candidates, filter_, message",
    [
        ('blocklists = [{name = "x", kind = "sha256", path = "l.txt"}]', "", r"blocklists\[0\] \('x'\): kind must be"),
        ('blocklists = [{name = "x", kind = "domain", path = "nope.txt"}]', "", r"'blocklists'\[0\] key 'path'.*nope"),
        ('optout_lists = [{name = "x", kind = "domain", path = "l.txt", colour = "red"}]', "", "unknown key 'colour'"),
        (
            'blocklists = [{name = "x", kind = "url", path = "l.txt"}, {name = "x", kind = "domain", path = "l.txt"}]',
            "",
            "name used twice",
        ),
        ("", 'blocklists = [{name = "p", kind = "phash", path = "l.txt", max_distance = 40}]', "max_distance"),
        ("", 'blocklists = [{name = "bad name", kind = "phash", path = "l.txt"}]', "'bad name'"),
        ("", 'eval_dirs = ["no-such-dir"]', "'eval_dirs'"),
    ],
)
def test_bad_list_config_is_a_config_error_naming_the_key(tmp_path, candidates, filter_, message):
    (tmp_path / "l.txt").write_text("")
    with pytest.raises(ConfigError, match=message):
        load_pipeline(_pipeline_file(tmp_path, candidates, filter_))


@pytest.mark.parametrize(
    "candidates, filter_, message",
    [
        ('blocklists = [{name = "x", kind = "domian", path = "l.txt"}]', "", "blocklists[0] ('x'): kind must be"),
        ("", 'blocklists = [{name = "s", kind = "sha256", path = "l.txt"}]', "list 's'"),  # "junk" is no sha256
    ],
)
def test_bad_lists_exit_2_from_the_cli_before_any_work(tmp_path, candidates, filter_, message):
    (tmp_path / "l.txt").write_text("junk\n")
    path = _pipeline_file(tmp_path, candidates, filter_)
    out = subprocess.run(
        [sys.executable, "-m", "wit_builder.cli", "run", path, "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and message in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "r").exists()


def test_a_changed_list_changes_the_fingerprint_even_with_size_and_mtime_kept(tmp_path):
    lst = tmp_path / "l.txt"
    lst.write_text("aaa.example\n")
    path = _pipeline_file(tmp_path, 'blocklists = [{name = "x", kind = "domain", path = "l.txt"}]', "languages = []")
    before = runner.fingerprints(load_pipeline(path))
    stat = os.stat(lst)
    lst.write_text("bbb.example\n")  # same size
    os.utime(lst, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime
    after = runner.fingerprints(load_pipeline(path))
    assert after["queries"] == before["queries"]
    assert after["candidates"] != before["candidates"] and after["filter"] != before["filter"]


def test_eval_index_is_cached_by_the_eval_files_fingerprint(tmp_path, monkeypatch):
    from wit_builder.safety import evalset

    evals = tmp_path / "evals"
    evals.mkdir()
    Image.effect_mandelbrot((96, 64), (-2, -1, 1, 1), 40).convert("RGB").save(evals / "a.jpg")
    (evals / "b.png").write_bytes(b"not a png")  # reported and counted, not indexed
    (evals / "notes.txt").write_text("ignored: not an image name")
    cache = str(tmp_path / "cache")
    path, info = evalset.build_index([str(evals)], cache)
    assert info == {"eval_images": 1, "eval_unreadable": 1}
    index, names = evalset.load_index(path, 4)
    assert names == [str(evals / "a.jpg")] and len(index) == 1
    monkeypatch.setattr(evalset, "_phash_file", lambda p: pytest.fail("the cached index must be reused"))
    assert evalset.build_index([str(evals)], cache) == (path, info)
    monkeypatch.undo()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(evals / "c.webp")  # the eval set changed: a new index
    new_path, new_info = evalset.build_index([str(evals)], cache)
    assert new_path != path and new_info["eval_images"] == 2


def test_lists_and_eval_images_on_an_object_store(s3_endpoint, tmp_path):
    """Lists and eval folders given as s3:// URLs: read, hashed and indexed like local ones."""
    import hashlib

    import fsspec

    from wit_builder.safety import evalset
    from wit_builder.safety.lists import file_sha256

    fs = fsspec.filesystem("s3")
    if not fs.exists("wit-safety"):
        fs.mkdir("wit-safety")
    fs.pipe("wit-safety/lists/hosts.txt", b"# hosts\nbad.example\n")
    table = _io.BytesIO()
    pq.write_table(pa.table({"url": ["http://x.example/a.jpg"]}), table)
    fs.pipe("wit-safety/lists/urls.parquet", table.getvalue())
    buf = _io.BytesIO()
    Image.effect_mandelbrot((96, 64), (-2, -1, 1, 1), 40).convert("RGB").save(buf, "PNG")
    fs.pipe("wit-safety/evals/m.png", buf.getvalue())
    assert read_entries(ListSpec("h", "domain", "s3://wit-safety/lists/hosts.txt")) == ["bad.example"]
    assert read_entries(ListSpec("u", "url", "s3://wit-safety/lists/urls.parquet")) == ["http://x.example/a.jpg"]
    hosts_sha = hashlib.sha256(b"# hosts\nbad.example\n").hexdigest()
    assert file_sha256("s3://wit-safety/lists/hosts.txt") == hosts_sha
    path, info = evalset.build_index(["s3://wit-safety/evals"], str(tmp_path / "cache"))
    assert info["eval_images"] == 1 and evalset.load_index(path, 4)[1] == ["s3://wit-safety/evals/m.png"]


def test_phash_command_makes_a_list_the_filter_reads(tmp_path, capsys):
    from wit_builder.safety.__main__ import main

    photo = os.path.join(DEMO_IMAGES, sorted(os.listdir(DEMO_IMAGES))[0])
    assert main(["phash", photo]) == 0
    (tmp_path / "mine.txt").write_text(capsys.readouterr().out)
    (_, index), *_ = load_image_lists([ListSpec("mine", "phash", str(tmp_path / "mine.txt"))])[1]
    assert index.nearest(phash(Image.open(photo))) == (0, 0)
    assert main(["phash", str(tmp_path / "nothing-here")]) == 2
