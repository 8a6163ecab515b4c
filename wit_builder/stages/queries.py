"""Queries stage: build the query list (CLIP's WIT recipe, MetaCLIP's build order) or load one.

Sources, combined in this build order (first source wins on duplicates, the same order is the
priority when trimming to `max_queries`; see `wit_builder.querybuild.build`):

    list -> default -> wordnet -> wiki_unigram -> wiki_bigram -> title -> wordfreq -> caption_bigram

Writes ``queries/queries.parquet`` (schema.QUERIES plus a ``score`` column: bigram PMI) and
``queries/queries_stats.json`` (counts by source, overlaps between sources, PMI threshold
effect, examples), and prints the stats. With `metadata_json`, also ``queries/metadata.json``
(MetaCLIP's format: a JSON list of strings).

Config keys (``[queries]`` table):

- ``lists``: query list files (txt one per line / CSV / TSV / parquet / MetaCLIP metadata.json);
  ``list_column``: column to read from CSV/parquet ("" = query, text, or the first column).
- ``default``: include the shipped default list (queries/default_queries.parquet);
  ``default_path``: another file in the same format.
- ``wordnet``: include WordNet synset names; ``wordnet_dir``: data.* directory ("" = auto-detect
  /usr/share/wordnet or nltk_data); ``wordnet_names``: "head" (first lemma lower-cased, as
  MetaCLIP: 86,571 names) or "lemmas" (every lemma, case kept).
- ``wiki_dumps``: pages-articles XML dumps (.bz2 incl. multistream, .gz, .xml);
  ``wiki_unigrams`` / ``wiki_bigrams``: use their unigrams / bigrams;
  ``min_unigram_count`` (100), ``min_bigram_count`` (5), ``min_pmi`` (30.0, NLTK-style log2 PMI;
  30 is MetaCLIP's value for a full dump -- nothing reaches it on a small sample, see
  queries/README.md).
- ``pageviews``: hourly pageviews/pagecounts files (the sampling window is your choice, recorded
  in the stats); ``pageview_projects`` (["en", "en.m"]); ``min_title_views`` (70, summed over
  the files); ``titles_from_dump``: with wiki_dumps, keep only article titles of the dump.
- ``wordfreq``: include the wordfreq package's list; ``wordfreq_lang`` ("en"), ``wordfreq_list``
  ("large"), ``wordfreq_top_n`` (0 = all), ``wordfreq_min_zipf`` (0 = no minimum).
- ``corpus_files``: caption corpora (parquet / txt) mined for bigrams (source caption_bigram);
  ``corpus_column``; ``corpus_min_bigram_count`` (5); ``corpus_min_pmi`` (10.0).
- ``skip_numeric``: drop mined entries without a letter ("1990"); ``skip_stopword_bigrams``:
  drop mined bigrams starting or ending with a function word ("of the", "has been"); ``dedup``: "exact" or
  "casefold"; ``max_queries`` (500000).
- ``spill_keys``: distinct keys per counter before spilling a sorted run to disk (memory
  bound, ~150 bytes per key); ``tmp_dir``: where spill files go ("" = system temp);
  ``workers``: processes that strip and count dump text (1 = in this process; the counts are
  identical, the spill_keys budget is split between them).
- ``metadata_json``: also write metadata.json.

Example (pipeline TOML):

    [queries]
    wordnet = true
    wiki_dumps = ["enwiki-latest-pages-articles-multistream.xml.bz2"]
    pageviews = ["pageviews/pageviews-20240101-*.gz"]

    >>> cfg = Config(lists=["queries.txt"]); cfg.max_queries
    500000
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Literal

from wit_builder import io, schema
from wit_builder.config import ConfigError, path_field
from wit_builder.stages.base import StageContext, StageResult, Timer

OUTPUT_FILE = "queries.parquet"
STATS_FILE = "queries_stats.json"


@dataclass(frozen=True)
class Config:
    """`[queries]`: which sources build the query list (keys documented in the module docstring)."""

    lists: list[str] = path_field([])
    list_column: str = ""
    default: bool = False
    default_path: str = path_field("")
    wordnet: bool = False
    wordnet_dir: str = path_field("")
    wordnet_names: Literal["head", "lemmas"] = "head"
    wiki_dumps: list[str] = path_field([])
    wiki_unigrams: bool = True
    wiki_bigrams: bool = True
    min_unigram_count: int = 100
    min_bigram_count: int = 5
    min_pmi: float = 30.0
    pageviews: list[str] = path_field([])
    pageview_projects: list[str] = field(default_factory=lambda: ["en", "en.m"])
    min_title_views: int = 70
    titles_from_dump: bool = True
    wordfreq: bool = False
    wordfreq_lang: str = "en"
    wordfreq_list: str = "large"
    wordfreq_top_n: int = 0
    wordfreq_min_zipf: float = 0.0
    corpus_files: list[str] = path_field([])
    corpus_column: str = ""
    corpus_min_bigram_count: int = 5
    corpus_min_pmi: float = 10.0
    skip_numeric: bool = True
    skip_stopword_bigrams: bool = True
    dedup: Literal["exact", "casefold"] = "exact"
    max_queries: int = 500_000
    spill_keys: int = 4_000_000
    tmp_dir: str = ""
    workers: int = 1
    metadata_json: bool = False

    def __post_init__(self) -> None:
        for name in ("min_unigram_count", "min_bigram_count", "min_title_views", "corpus_min_bigram_count"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queries < 1:
            raise ValueError(f"max_queries must be >= 1, got {self.max_queries}")
        if self.spill_keys < 1000:
            raise ValueError(f"spill_keys must be >= 1000, got {self.spill_keys}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.wordfreq_top_n < 0:
            raise ValueError("wordfreq_top_n must be >= 0 (0 = all)")

    def has_source(self) -> bool:
        return bool(
            self.lists
            or self.default
            or self.wordnet
            or self.wiki_dumps
            or self.pageviews
            or self.wordfreq
            or self.corpus_files
        )


def _expand(paths: list[str]) -> list[str]:
    """The files `paths` name (io.expand: globs, directories); ConfigError naming a pattern that
    matches nothing."""
    try:
        return io.expand(paths)
    except FileNotFoundError as e:
        raise ConfigError(f"[queries] {e}") from None


def build_sources(cfg: Config, show_progress: bool = True) -> list:
    """Run every configured source, in build order; returns their `SourceOutput`s."""
    from wit_builder.querybuild import sources
    from wit_builder.querybuild.counts import SpillCounter
    from wit_builder.querybuild.dumps import count_dumps
    from wit_builder.querybuild.ngrams import NgramCounts

    tmp = cfg.tmp_dir or None
    outputs = []
    if cfg.lists:
        outputs.append(sources.list_source(_expand(cfg.lists), cfg.list_column))
    if cfg.default:
        outputs.append(sources.default_source(cfg.default_path))
    if cfg.wordnet:
        outputs.append(sources.wordnet_source(cfg.wordnet_dir, cfg.wordnet_names))
    titles: SpillCounter | None = None
    try:
        if cfg.wiki_dumps:
            dumps = _expand(cfg.wiki_dumps)
            counts = NgramCounts(cfg.spill_keys, tmp)
            if cfg.pageviews and cfg.titles_from_dump:
                titles = SpillCounter(cfg.spill_keys, tmp, "titles")
            try:
                page_stats = count_dumps(dumps, counts, titles, show_progress, cfg.workers)
                outputs.extend(
                    sources.ngram_sources(
                        counts,
                        "wiki",
                        cfg.min_unigram_count,
                        cfg.min_bigram_count,
                        cfg.min_pmi,
                        cfg.skip_numeric,
                        cfg.wiki_unigrams,
                        cfg.wiki_bigrams,
                        info={"dumps": dumps, **page_stats},
                        skip_stopword_bigrams=cfg.skip_stopword_bigrams,
                    )
                )
            finally:
                counts.close()
        if cfg.pageviews:
            outputs.append(
                sources.title_source(
                    _expand(cfg.pageviews), cfg.pageview_projects, cfg.min_title_views, titles, cfg.spill_keys, tmp
                )
            )
    finally:
        if titles is not None:
            titles.close()
    if cfg.wordfreq:
        outputs.append(
            sources.wordfreq_source(
                cfg.wordfreq_lang, cfg.wordfreq_list, cfg.wordfreq_top_n, cfg.wordfreq_min_zipf, cfg.skip_numeric
            )
        )
    if cfg.corpus_files:
        counts = NgramCounts(cfg.spill_keys, tmp)
        try:
            files = _expand(cfg.corpus_files)
            for f in files:
                for text in sources.iter_corpus_texts(f, cfg.corpus_column):
                    counts.add_text(text)
            outputs.extend(
                sources.ngram_sources(
                    counts,
                    "caption",
                    cfg.corpus_min_bigram_count,
                    cfg.corpus_min_bigram_count,
                    cfg.corpus_min_pmi,
                    cfg.skip_numeric,
                    want_unigrams=False,
                    want_bigrams=True,
                    info={"files": files},
                    skip_stopword_bigrams=cfg.skip_stopword_bigrams,
                )
            )
        finally:
            counts.close()
    return outputs


def make_stats(cfg: Config, combined, outputs) -> dict:
    """Counts by source, overlaps, source details (PMI table, page counts...) and examples."""
    examples: dict[str, list[str]] = {}
    for text, source, _, _ in combined.rows:
        bucket = examples.setdefault(source, [])
        if len(bucket) < 10:
            bucket.append(text)
    return {
        "total": len(combined.rows),
        "max_queries": cfg.max_queries,
        "dedup": cfg.dedup,
        "build_order": [o.name for o in outputs],
        "by_source": combined.per_source,
        "source_drops": {o.name: o.dropped for o in outputs},
        "overlaps": combined.overlaps,
        "source_info": {o.name: o.info for o in outputs},
        "examples": examples,
    }


def format_stats(stats: dict) -> str:
    lines = [f"queries: {stats['total']:,} queries (max {stats['max_queries']:,}, dedup {stats['dedup']})"]
    lines.append(f"  {'source':<15}{'seen':>12}{'passed':>10}{'dup':>9}{'over_max':>10}{'kept':>10}")
    for name, s in stats["by_source"].items():
        lines.append(
            f"  {name:<15}{s['seen']:>12,}{s['passed']:>10,}{s['duplicate']:>9,}"
            f"{s['over_max_queries']:>10,}{s['kept']:>10,}"
        )
    for name, ov in stats["overlaps"].items():
        if ov:
            lines.append(f"  overlap: {name} already in " + ", ".join(f"{k} {v:,}" for k, v in ov.items()))
    for name, info in stats["source_info"].items():
        if "bigrams_passing_pmi_at" in info and name.endswith("bigram"):
            table = ", ".join(f">={t}: {n:,}" for t, n in info["bigrams_passing_pmi_at"].items())
            lines.append(
                f"  {name}: N={info['tokens']:,} tokens; bigrams with count >= "
                f"{info['min_bigram_count']} by PMI {table} (used >= {info['min_pmi']})"
            )
    for name, ex in stats["examples"].items():
        lines.append(f"  e.g. {name}: " + ", ".join(ex[:6]))
    return "\n".join(lines)


def run(ctx: StageContext, cfg: Config) -> StageResult:
    """Build the list from the configured sources and write queries.parquet + stats."""
    import pyarrow as pa

    from wit_builder.querybuild.build import combine
    from wit_builder.querybuild.lists import write_metadata_json

    if not cfg.has_source():
        raise ConfigError(
            "[queries]: no query source configured (set lists, default, wordnet, wiki_dumps, "
            "pageviews, wordfreq or corpus_files)"
        )
    with Timer() as t:
        outputs = build_sources(cfg, ctx.progress)
        combined = combine(outputs, cfg.dedup, cfg.max_queries)
        out_dir = ctx.stage_dir("queries")
        rows = combined.rows
        table = pa.table(
            {
                "query_id": pa.array(range(len(rows)), pa.int32()),
                "text": pa.array([r[0] for r in rows], pa.string()),
                "source": pa.array([r[1] for r in rows], pa.string()),
                "count": pa.array([r[2] for r in rows], pa.int64()),
                "score": pa.array([r[3] for r in rows], pa.float64()),
            }
        )
        io.write_parquet(table, io.join(out_dir, OUTPUT_FILE), schema.QUERIES.append(pa.field("score", pa.float64())))
        stats = make_stats(cfg, combined, outputs)
        io.write_json(stats, io.join(out_dir, STATS_FILE))
        if cfg.metadata_json:
            write_metadata_json([r[0] for r in rows], io.join(out_dir, "metadata.json"))
    print(format_stats(stats), file=sys.stderr, flush=True)
    result = StageResult(
        rows_in=combined.seen,
        rows_out=len(rows),
        dropped=combined.dropped,
        seconds=t.seconds,
        extra={"by_source": {k: v["kept"] for k, v in combined.per_source.items()}},
    )
    result.check_accounting()
    return result
