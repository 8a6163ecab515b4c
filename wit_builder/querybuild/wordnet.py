"""WordNet 3.0 synsets from its ``data.{noun,verb,adj,adv}`` files.

Reads the Princeton database files as Debian's ``wordnet-base`` installs them
(``/usr/share/wordnet``) or as NLTK ships them (``nltk_data/corpora/wordnet``): lines starting
with two spaces are the licence header; otherwise ``offset lex_filenum ss_type w_cnt(hex)
word lex_id [word lex_id ...] ...``. Adjective markers ``(a) (p) (ip)`` are removed.

Names: ``head`` (default) is each synset's head name as NLTK (and MetaCLIP) call it -- the first
lemma, lower-cased, as in ``dog.n.01`` -> ``dog``; ``lemmas`` is every lemma name as written in
the file (case kept, e.g. ``Abraham Lincoln``). Underscores become spaces in both.

Example:
    >>> parse_data_line("02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 023 @ ...", "n")
    Synset(pos='n', offset=2084071, lemmas=('dog', 'domestic_dog', 'Canis_familiaris'))
    >>> parse_data_line("00001740 00 a 01 able(a) 0 005 ...", "a").lemmas
    ('able',)
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from wit_builder.config import ConfigError

POS_FILES = (("n", "data.noun"), ("v", "data.verb"), ("a", "data.adj"), ("r", "data.adv"))
SEARCH_DIRS = (
    "/usr/share/wordnet",
    "/usr/share/nltk_data/corpora/wordnet",
    "/usr/local/share/nltk_data/corpora/wordnet",
    "~/nltk_data/corpora/wordnet",
)
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")


@dataclass(frozen=True)
class Synset:
    pos: str  # n, v, a (incl. satellites 's'), r
    offset: int
    lemmas: tuple[str, ...]  # as in the file, underscores kept


def parse_data_line(line: str, pos: str) -> Synset:
    """One synset line of a data.* file (`pos` = the file's part of speech)."""
    fields = line.split(" ", 4 + 2 * 256)
    n_words = int(fields[3], 16)
    lemmas = tuple(_ADJ_MARKER.sub("", fields[4 + 2 * i]) for i in range(n_words))
    return Synset(pos=pos, offset=int(fields[0]), lemmas=lemmas)


def find_wordnet_dir(path: str = "") -> str:
    """`path` if given, else the first WordNet directory found; ConfigError when none is."""
    candidates = [path] if path else [os.path.expanduser(p) for p in SEARCH_DIRS]
    for d in candidates:
        for sub in (d, os.path.join(d, "dict")):
            if os.path.exists(os.path.join(sub, "data.noun")):
                return sub
    where = path or ", ".join(SEARCH_DIRS)
    raise ConfigError(
        f"[queries] wordnet: no WordNet data.noun found in {where} "
        "(install it: apt-get install wordnet-base, or give wordnet_dir = an NLTK wordnet directory)"
    )


def iter_synsets(wordnet_dir: str) -> Iterator[Synset]:
    """Every synset, nouns then verbs, adjectives, adverbs, in file (offset) order."""
    for pos, name in POS_FILES:
        path = os.path.join(wordnet_dir, name)
        if not os.path.exists(path):
            raise ConfigError(f"[queries] wordnet: {path} missing (incomplete WordNet directory)")
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or not line.strip():
                    continue
                try:
                    yield parse_data_line(line, pos)
                except (ValueError, IndexError):
                    raise ConfigError(f"[queries] wordnet: {path}: not a WordNet data line: {line[:60]!r}") from None


def synset_names(synset: Synset, names: Literal["head", "lemmas"] = "head") -> list[str]:
    """The query strings of one synset (see the module docstring).

    >>> s = Synset("n", 1, ("Abraham_Lincoln", "Lincoln", "President_Lincoln"))
    >>> synset_names(s), synset_names(s, "lemmas")
    (['abraham lincoln'], ['Abraham Lincoln', 'Lincoln', 'President Lincoln'])
    """
    if names == "head":
        return [synset.lemmas[0].lower().replace("_", " ")]
    return [lemma.replace("_", " ") for lemma in synset.lemmas]
