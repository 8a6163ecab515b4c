"""Each query source as a `SourceOutput`: entries that passed the source's thresholds, the
number of candidate entries it saw, and its drops by reason.

Example:
    >>> import tempfile, os
    >>> d = tempfile.mkdtemp(); p = os.path.join(d, "q.txt")
    >>> _ = open(p, "w").write("dog\\ncat\\n")
    >>> out = list_source([p])
    >>> out.name, out.entries, out.seen
    ('list', [('dog', None, None), ('cat', None, None)], 2)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Literal

from wit_builder.config import ConfigError
from wit_builder.querybuild import default_list, lists, wordnet
from wit_builder.querybuild.build import SourceOutput
from wit_builder.querybuild.counts import SpillCounter
from wit_builder.querybuild.ngrams import NgramCounts, has_letter, select_ngrams
from wit_builder.querybuild.pageviews import add_views, open_maybe_compressed, select_titles
from wit_builder.querybuild.wordfreq_source import wordfreq_words


def list_source(paths: list[str], column: str = "") -> SourceOutput:
    entries: list[tuple[str, int | None, float | None]] = []
    for p in paths:
        entries.extend((t, None, None) for t in lists.read_list(p, column))
    return SourceOutput("list", entries, seen=len(entries), info={"files": paths})


def default_source(path: str = "") -> SourceOutput:
    rows = default_list.load_default(path)
    entries = [(t, c, None) for t, _, c in rows]
    return SourceOutput("default", entries, seen=len(entries), info={"file": path or default_list.default_path()})


def wordnet_source(wordnet_dir: str, names: Literal["head", "lemmas"]) -> SourceOutput:
    d = wordnet.find_wordnet_dir(wordnet_dir)
    entries: list[tuple[str, int | None, float | None]] = []
    synsets: dict[str, int] = {}
    for s in wordnet.iter_synsets(d):
        synsets[s.pos] = synsets.get(s.pos, 0) + 1
        entries.extend((n, None, None) for n in wordnet.synset_names(s, names))
    # one entry per synset name; repeats inside WordNet are duplicates within the source
    unique: dict[str, None] = dict.fromkeys(t for t, _, _ in entries)
    info = {
        "dir": d,
        "names": names,
        "synsets": sum(synsets.values()),
        "synsets_by_pos": synsets,
        "distinct_names": len(unique),
    }
    return SourceOutput(
        "wordnet",
        [(t, None, None) for t in unique],
        seen=len(entries),
        dropped={"duplicate": len(entries) - len(unique)},
        info=info,
    )


def wordfreq_source(lang: str, wordlist: str, top_n: int, min_zipf: float, skip_numeric: bool) -> SourceOutput:
    words, dropped, seen = wordfreq_words(lang, wordlist, top_n, min_zipf)
    entries: list[tuple[str, int | None, float | None]] = []
    numeric = possessive = 0
    for w, f in words:
        if skip_numeric and not has_letter(w):
            numeric += 1
        elif w.endswith(("'s", "\u2019s")):  # "dog's": the word mode already matches it via "dog"
            possessive += 1
        else:
            entries.append((w, f, None))
    dropped = {**dropped, "numeric": numeric, "possessive": possessive}
    return SourceOutput(
        "wordfreq",
        entries,
        seen,
        dropped,
        info={"lang": lang, "wordlist": wordlist, "top_n": top_n, "min_zipf": min_zipf},
    )


def ngram_sources(
    counts: NgramCounts,
    prefix: str,
    min_unigram_count: int,
    min_bigram_count: int,
    min_pmi: float,
    skip_numeric: bool,
    want_unigrams: bool,
    want_bigrams: bool,
    info: dict,
    skip_stopword_bigrams: bool = True,
) -> list[SourceOutput]:
    """`{prefix}_unigram` and/or `{prefix}_bigram` outputs from finished counts."""
    uni, uni_drop, uni_seen, bi, bi_drop, bi_seen, table = select_ngrams(
        counts, min_unigram_count, min_bigram_count, min_pmi, skip_numeric, skip_stopword_bigrams
    )
    info = {
        **info,
        "tokens": counts.tokens,
        "documents": counts.documents,
        "distinct_unigrams": uni_seen,
        "distinct_bigrams": bi_seen,
        "spills": {"unigrams": counts.unigrams.spills, "bigrams": counts.bigrams.spills},
        "bigrams_passing_pmi_at": table,
        "min_bigram_count": min_bigram_count,
        "min_pmi": min_pmi,
    }
    out = []
    if want_unigrams:
        out.append(
            SourceOutput(
                f"{prefix}_unigram",
                [(w, n, None) for w, n in uni],
                uni_seen,
                uni_drop,
                info={**info, "min_unigram_count": min_unigram_count},
            )
        )
    if want_bigrams:
        out.append(SourceOutput(f"{prefix}_bigram", [(b, n, s) for b, n, s in bi], bi_seen, bi_drop, info=info))
    return out


def title_source(
    pageview_files: list[str],
    projects: list[str],
    min_views: int,
    article_titles: SpillCounter | None,
    spill_keys: int,
    tmp_dir: str | None,
) -> SourceOutput:
    views = SpillCounter(spill_keys, tmp_dir, "pageviews")
    line_stats: dict[str, int] = {}
    try:
        for p in pageview_files:
            try:
                with open_maybe_compressed(p) as f:
                    s = add_views(f, views, projects)
            except (OSError, EOFError) as e:
                raise ConfigError(f"[queries] pageviews file {p}: unreadable ({e})") from None
            for k, v in s.items():
                line_stats[k] = line_stats.get(k, 0) + v
        kept, dropped, seen = select_titles(
            views.items(), min_views, article_titles.items() if article_titles is not None else None
        )
    finally:
        views.close()
    info = {
        "files": [os.path.basename(p) for p in pageview_files],
        "projects": projects,
        "min_views": min_views,
        "lines": line_stats,
        "restricted_to_dump_articles": article_titles is not None,
    }
    return SourceOutput("title", [(t, n, None) for t, n in kept], seen, dropped, info)


def iter_corpus_texts(path: str, column: str = "") -> Iterator[str]:
    """Texts of a caption corpus: a parquet column (`column`, else caption/text/TEXT, else the
    first string column) streamed in batches, or the lines of a text file."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        import pyarrow.types as pat

        f = pq.ParquetFile(path)
        strings = [fl.name for fl in f.schema_arrow if pat.is_string(fl.type) or pat.is_large_string(fl.type)]
        col = column or next((c for c in ("caption", "text", "TEXT", "Caption") if c in strings), None)
        col = col or (strings[0] if strings else None)
        if col is None or col not in f.schema_arrow.names:
            raise ConfigError(f"[queries] corpus {path}: no text column {column or '(caption/text)'} found")
        for batch in f.iter_batches(columns=[col], batch_size=65536):
            yield from (t for t in batch.column(0).to_pylist() if t)
    else:
        import fsspec

        with fsspec.open(path, "rt", encoding="utf-8", compression="infer") as fh:
            yield from (line.rstrip("\n") for line in fh)
