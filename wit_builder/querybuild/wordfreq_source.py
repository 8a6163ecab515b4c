"""Words from the `wordfreq` package (data CC-BY-SA 4.0; code Apache-2.0), most frequent first.

`wordfreq` is imported only when this source is used. Its English lists are case-folded, so
every entry is lower case. The count stored is the frequency per billion words (rounded).
The source (`sources.wordfreq_source`) also drops possessives ("dog's"): in the `word`
matching mode "dog" already matches them.

Example:
    >>> words, dropped, seen = wordfreq_words(top_n=3, min_zipf=0.0)  # doctest: +SKIP
    >>> [w for w, _ in words]  # doctest: +SKIP
    ['the', 'to', 'and']
"""

from __future__ import annotations

from wit_builder.config import ConfigError


def wordfreq_words(
    lang: str = "en", wordlist: str = "large", top_n: int = 0, min_zipf: float = 0.0
) -> tuple[list[tuple[str, int]], dict[str, int], int]:
    """([(word, frequency per 1e9 words)], dropped by reason, words seen); top_n 0 = all."""
    try:
        import wordfreq
    except ImportError:
        raise ConfigError("[queries] wordfreq = true needs the wordfreq package (pip install wordfreq)") from None
    try:
        words = wordfreq.top_n_list(lang, top_n or 10**7, wordlist=wordlist)
    except (LookupError, ValueError) as e:
        raise ConfigError(f"[queries] wordfreq: {e}") from None
    kept: list[tuple[str, int]] = []
    below = 0
    for w in words:
        freq = wordfreq.word_frequency(w, lang, wordlist=wordlist)
        if min_zipf and wordfreq.zipf_frequency(w, lang, wordlist=wordlist) < min_zipf:
            below += 1
            continue
        kept.append((w, round(freq * 1e9)))
    return kept, {"below_threshold": below}, len(words)
