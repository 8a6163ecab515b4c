"""A truncated, non-bzip2 or non-XML dump gives one clear error (DumpError, a ConfigError)."""

from __future__ import annotations

import bz2
import importlib
import io
import os

import pytest

from wit_builder.config import ConfigError
from wit_builder.querybuild.wikidump import DumpError, iter_pages
from wit_builder.stages import STAGE_ORDER
from wit_builder.stages.base import StageContext
from wit_builder.stages.queries import Config, run

pytestmark = pytest.mark.timeout(120)  # generous: the stage runs on a shared 2-core machine

SAMPLE = os.path.join(os.path.dirname(__file__), "data", "queries", "enwiki_sample.xml.bz2")


def _consume(path):
    return sum(1 for _ in iter_pages(path))


def test_truncated_bz2_dump(tmp_path):
    cut = tmp_path / "cut.xml.bz2"
    cut.write_bytes(open(SAMPLE, "rb").read()[:600_000])
    with pytest.raises(DumpError, match=r"truncated dump .* after \d+ complete pages"):
        _consume(str(cut))


def test_truncated_xml_inside_a_complete_bz2(tmp_path):
    xml = bz2.decompress(open(SAMPLE, "rb").read())
    cut = tmp_path / "cut-xml.xml.bz2"
    cut.write_bytes(bz2.compress(xml[: len(xml) // 2]))
    with pytest.raises(DumpError, match="truncated dump"):
        _consume(str(cut))


def test_non_xml_and_wrong_root_and_garbage(tmp_path):
    html = tmp_path / "page.xml.bz2"
    html.write_bytes(bz2.compress(b"<html><body>not a dump</body></html>"))
    with pytest.raises(DumpError, match="root element <html>"):
        _consume(str(html))
    text = tmp_path / "notes.xml"
    text.write_bytes(b"just some text, no XML at all\n")
    with pytest.raises(DumpError, match="not well-formed XML"):
        _consume(str(text))
    bad_bz2 = tmp_path / "bad.xml.bz2"
    bad_bz2.write_bytes(b"BZh9" + os.urandom(2000))
    with pytest.raises(DumpError, match="unreadable dump|truncated"):
        _consume(str(bad_bz2))
    empty = tmp_path / "empty.xml"
    empty.write_bytes(b"")
    with pytest.raises(DumpError):
        _consume(str(empty))


def test_multistream_dump_is_read_through(tmp_path):
    xml = bz2.decompress(open(SAMPLE, "rb").read())
    cut = xml.index(b"<page>", len(xml) // 2)
    multi = tmp_path / "multistream.xml.bz2"
    multi.write_bytes(bz2.compress(xml[:cut]) + bz2.compress(xml[cut:]))  # two bz2 streams, as in -multistream
    assert _consume(str(multi)) == 206
    assert sum(1 for _ in iter_pages(io.BytesIO(xml))) == 206  # plain XML from a stream


def test_stage_raises_config_error_for_a_bad_dump(tmp_path):
    cut = tmp_path / "cut.xml.bz2"
    cut.write_bytes(open(SAMPLE, "rb").read()[:300_000])
    cfg = Config(wiki_dumps=[str(cut)], min_unigram_count=5)
    with pytest.raises(ConfigError, match="cut.xml.bz2: truncated dump"):
        run(StageContext(run_dir=str(tmp_path / "run"), progress=False), cfg)


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    for name in STAGE_ORDER:
        try:
            importlib.import_module(f"wit_builder.stages.{name}")
        except ImportError as e:
            pytest.skip(f"stage module {name} not in this checkout yet ({e}); the CLI loads every stage's Config")
    from wit_builder import cli

    cut = tmp_path / "cut.xml.bz2"
    cut.write_bytes(open(SAMPLE, "rb").read()[:300_000])
    toml = tmp_path / "p.toml"
    toml.write_text('[queries]\nwiki_dumps = ["cut.xml.bz2"]\n')
    rc = cli.main(["queries", str(toml), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "truncated dump" in err and "Traceback" not in err
