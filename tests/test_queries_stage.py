"""The queries stage: sources combined in build order, dedup, trimming, outputs, accounting."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wit_builder import schema
from wit_builder.config import ConfigError, from_dict
from wit_builder.querybuild.default_list import default_path, load_default_texts
from wit_builder.stages.base import StageContext
from wit_builder.stages.queries import Config, run

pytestmark = pytest.mark.timeout(120)  # generous: the stage runs on a shared 2-core machine

SAMPLE = os.path.join(os.path.dirname(__file__), "data", "queries", "enwiki_sample.xml.bz2")


def _ctx(tmp_path):
    return StageContext(run_dir=str(tmp_path / "run"), progress=False)


def _read(tmp_path):
    return pq.read_table(tmp_path / "run" / "queries" / "queries.parquet")


def test_user_lists_in_all_formats_dedup_and_outputs(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("# comment\ndog\nNew York\n\ndog\n")
    (tmp_path / "b.csv").write_text("id,query\n1,cat\n2,New York\n3,Dog\n")
    pq.write_table(pa.table({"n": [1, 2], "text": ["zebra", "cat"]}), tmp_path / "c.parquet")
    (tmp_path / "metadata.json").write_text(json.dumps(["giraffe", "zebra"]))
    cfg = Config(
        lists=[str(tmp_path / f) for f in ("a.txt", "b.csv", "c.parquet", "metadata.json")], metadata_json=True
    )
    result = run(_ctx(tmp_path), cfg)
    t = _read(tmp_path)
    assert t.schema.field("query_id").type == pa.int32()
    assert [(f.name, f.type) for f in t.schema][:4] == [(f.name, f.type) for f in schema.QUERIES]
    assert t.column("text").to_pylist() == ["dog", "New York", "cat", "Dog", "zebra", "giraffe"]
    assert t.column("query_id").to_pylist() == list(range(6))
    assert set(t.column("source").to_pylist()) == {"list"}
    assert result.rows_in == 10 and result.rows_out == 6 and result.dropped == {"duplicate": 4}
    result.check_accounting()
    out_dir = tmp_path / "run" / "queries"
    stats = json.loads((out_dir / "queries_stats.json").read_text())
    assert stats["by_source"]["list"]["kept"] == 6 and stats["examples"]["list"][:2] == ["dog", "New York"]
    assert json.loads((out_dir / "metadata.json").read_text()) == t.column("text").to_pylist()
    assert "queries: 6 queries" in capsys.readouterr().err


def test_casefold_dedup_build_order_and_max_queries(tmp_path):
    (tmp_path / "q.txt").write_text("Dog\nCat\n")
    cfg = Config(
        lists=[str(tmp_path / "q.txt")],
        wiki_dumps=[SAMPLE],
        min_unigram_count=200,
        min_bigram_count=3,
        min_pmi=12.0,
        dedup="casefold",
        max_queries=50,
    )
    result = run(_ctx(tmp_path), cfg)
    t = _read(tmp_path).to_pylist()
    assert len(t) == 50 and result.dropped["over_max_queries"] > 0
    assert [r["text"] for r in t[:2]] == ["Dog", "Cat"]  # lists come first
    assert [r["source"] for r in t[2:]] == ["wiki_unigram"] * 48  # unigrams before bigrams; bigrams trimmed
    counts = [r["count"] for r in t[2:]]
    assert counts == sorted(counts, reverse=True) and counts[0] > 10_000  # most frequent first ("the")
    assert {r["text"].casefold() for r in t}.__len__() == 50
    result.check_accounting()
    assert result.rows_in == result.rows_out + sum(result.dropped.values())


@pytest.mark.timeout(60)
def test_wiki_sample_stats_show_the_pmi_threshold_effect(tmp_path):
    cfg = Config(wiki_dumps=[SAMPLE], min_unigram_count=5, min_bigram_count=3, min_pmi=30.0)
    result = run(_ctx(tmp_path), cfg)
    stats = json.loads((tmp_path / "run" / "queries" / "queries_stats.json").read_text())
    table = stats["source_info"]["wiki_bigram"]["bigrams_passing_pmi_at"]
    assert table["30"] == 0 and table["10"] > 500  # PMI >= 30 is unreachable on ~0.45 M tokens
    assert stats["by_source"]["wiki_bigram"]["kept"] == 0
    assert result.dropped["below_pmi"] > 0 and result.dropped["below_threshold"] > 0
    assert stats["source_info"]["wiki_unigram"]["articles"] == 106


def test_no_source_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no query source"):
        run(_ctx(tmp_path), Config())
    with pytest.raises(ConfigError, match="min_unigram_count"):
        from_dict(Config, {"min_unigram_count": 0}, where="p.toml [queries]")
    with pytest.raises(ConfigError, match="unknown key 'wordnet_path'"):
        from_dict(Config, {"wordnet_path": "/x"}, where="p.toml [queries]")


def test_unreadable_list_is_a_config_error(tmp_path):
    (tmp_path / "bad.json").write_text('{"not": "a list"}')
    with pytest.raises(ConfigError, match="JSON list of strings"):
        run(_ctx(tmp_path), Config(lists=[str(tmp_path / "bad.json")]))


@pytest.mark.timeout(120)
def test_shipped_default_list_loads_and_matches(tmp_path):
    assert os.path.exists(default_path()), "queries/default_queries.parquet must be shipped"
    texts = load_default_texts()
    assert 200_000 < len(texts) <= 500_000 and len(set(texts)) == len(texts)
    assert all(t and t == t.strip() and "\n" not in t for t in texts)
    result = run(_ctx(tmp_path), Config(default=True))
    assert result.rows_out == len(texts) and _read(tmp_path).column("text").to_pylist() == texts
    from wit_builder.stages.match import Matcher

    m = Matcher(texts)
    hits = m.match(["A teddy bear next to a fire hydrant"])[0]
    assert {"teddy bear", "fire hydrant"} <= {texts[i] for i in hits}


def test_caption_corpus_bigrams(tmp_path):
    lines = ["a teddy bear on a bed", "the fire hydrant is red", "teddy bear and fire hydrant"] * 5
    lines += [f"word{i} thing{i}" for i in range(200)]  # many tokens, so the pairs above have a high PMI
    (tmp_path / "caps.txt").write_text("\n".join(lines) + "\n")
    cfg = Config(corpus_files=[str(tmp_path / "caps.txt")], corpus_min_bigram_count=5, corpus_min_pmi=5.0)
    result = run(_ctx(tmp_path), cfg)
    t = _read(tmp_path).to_pylist()
    assert [(r["text"], r["source"], r["count"]) for r in t] == [
        ("fire hydrant", "caption_bigram", 10),
        ("teddy bear", "caption_bigram", 10),
    ]
    assert t[0]["score"] > 5.0
    assert result.dropped["stopword"] > 0 and result.dropped["below_min_count"] > 0
