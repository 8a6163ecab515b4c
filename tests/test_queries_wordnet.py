"""WordNet 3.0 totals from the Debian wordnet-base files (skipped where they are not installed)."""

from __future__ import annotations

import os
from collections import Counter

import pytest

from wit_builder.config import ConfigError
from wit_builder.querybuild.sources import wordnet_source
from wit_builder.querybuild.wordnet import find_wordnet_dir, iter_synsets, synset_names

pytestmark = pytest.mark.timeout(120)  # generous: the stage runs on a shared 2-core machine

DEBIAN_DIR = "/usr/share/wordnet"
needs_wordnet = pytest.mark.skipif(
    not os.path.exists(os.path.join(DEBIAN_DIR, "data.noun")),
    reason="Debian wordnet-base not installed (apt-get install wordnet-base)",
)


@needs_wordnet
@pytest.mark.timeout(60)
def test_wordnet_30_totals():
    by_pos = Counter(s.pos for s in iter_synsets(DEBIAN_DIR))
    assert by_pos == {"n": 82115, "v": 13767, "a": 18156, "r": 3621}
    assert sum(by_pos.values()) == 117659


@needs_wordnet
@pytest.mark.timeout(60)
def test_wordnet_source_head_names_and_lemmas():
    head = wordnet_source(DEBIAN_DIR, "head")
    assert head.info["synsets"] == 117659 and head.seen == 117659
    assert len(head.entries) == 86571  # MetaCLIP's count of distinct synset head names
    texts = {t for t, _, _ in head.entries}
    assert {"dog", "lincoln", "physical entity", "new york"} <= texts and "physical_entity" not in texts
    lemmas = wordnet_source(DEBIAN_DIR, "lemmas")
    assert lemmas.seen == 206978  # synset members (word-sense pairs)
    assert "Abraham Lincoln" in {t for t, _, _ in lemmas.entries}


def test_parse_nltk_style_dir_and_missing_dir(tmp_path):
    d = tmp_path / "wordnet"
    d.mkdir()
    header = "  1 This software and database is being provided to you, the LICENSEE...\n"
    (d / "data.noun").write_text(
        header + "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which exists\n"
        "02084071 05 n 02 dog 0 domestic_dog 0 000 | a dog\n"
    )
    (d / "data.verb").write_text(header)
    (d / "data.adj").write_text("00001740 00 a 01 able(a) 0 000 | able\n")
    (d / "data.adv").write_text("")
    assert find_wordnet_dir(str(d)) == str(d)
    synsets = list(iter_synsets(str(d)))
    assert [synset_names(s, "lemmas") for s in synsets] == [["entity"], ["dog", "domestic dog"], ["able"]]
    with pytest.raises(ConfigError, match="wordnet-base"):
        find_wordnet_dir(str(tmp_path / "nowhere"))
