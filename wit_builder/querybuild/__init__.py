"""Building blocks of the `queries` stage: the WIT / MetaCLIP query-list recipe.

One small module per job:

- `wikidump`   stream pages out of a MediaWiki pages-articles XML dump (.bz2 incl. multistream, .gz, plain)
- `markup`     strip wiki markup from page text (documented regex approach)
- `tokenize`   split plain text into word runs (bigrams never cross punctuation)
- `counts`     exact counting with bounded memory (sorted spill files + k-way merge)
- `ngrams`     unigram/bigram counts of a dump or caption corpus, and their selection
- `workers`    the same counting spread over worker processes (identical counts)
- `stopwords`  function words that may not start or end a mined bigram
- `pmi`        NLTK-style bigram PMI (log2, N = total tokens) and bigram selection
- `pageviews`  hourly pageviews / pagecounts files -> views per title, title selection
- `wordnet`    WordNet 3.0 `data.*` files (Debian wordnet-base or an NLTK wordnet dir)
- `wordfreq_source`  the `wordfreq` package's word list
- `lists`      user lists (txt/CSV/parquet) and MetaCLIP's metadata.json, in and out
- `sources`    each source as a `SourceOutput` (entries kept + drops by reason)
- `build`      combine sources in build order, first source wins, trim to max_queries
- `default_list`  where the shipped default list lives, and loading it
- `rebuild_default`  `python -m wit_builder.querybuild.rebuild_default` rebuilds it from queries/default.toml
"""
