"""Stream pages out of a MediaWiki pages-articles XML dump with bounded memory.

The compression is detected from the first bytes, not the name: bzip2 (``BZh``; multistream
dumps are concatenated bz2 streams, which `bz2.open` reads through), gzip, or plain XML.
`xml.etree.ElementTree.iterparse` (expat) walks the file; each ``<page>`` is turned into a
`Page` and the tree is cleared right after, so memory holds one page at a time.

A dump that is cut short, is not bzip2 inside, or is not MediaWiki XML raises `DumpError`
(a `ConfigError`: the CLI prints one line and exits 2, no traceback).

Example:
    >>> import io
    >>> xml = (b'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">'
    ...        b'<page><title>Cat</title><ns>0</ns><revision><text>A [[cat]].</text></revision></page>'
    ...        b'<page><title>Kitty</title><ns>0</ns><redirect title="Cat"/><revision><text>#REDIRECT</text>'
    ...        b'</revision></page></mediawiki>')
    >>> [(p.title, p.ns, p.redirect, p.text) for p in iter_pages(io.BytesIO(xml))]
    [('Cat', 0, False, 'A [[cat]].'), ('Kitty', 0, True, '#REDIRECT')]
"""

from __future__ import annotations

import bz2
import gzip
import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO
from xml.etree.ElementTree import ParseError, iterparse

from wit_builder.config import ConfigError


class DumpError(ConfigError):
    """The dump file is unreadable: truncated, not bzip2/gzip inside, or not MediaWiki XML."""


@dataclass(frozen=True)
class Page:
    title: str
    ns: int
    redirect: bool
    text: str


class _CountingReader(io.RawIOBase):
    """Wraps a binary file and reports the (compressed) bytes read to `on_read`, for the MB progress bar."""

    def __init__(self, raw: BinaryIO, on_read: Callable[[int], None] | None):
        self.raw, self.on_read = raw, on_read

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # type: ignore[override]
        data = self.raw.read(len(buf))
        n = len(data)
        buf[:n] = data
        if self.on_read and n:
            self.on_read(n)
        return n


def _open_decompressed(raw: BinaryIO) -> BinaryIO:
    buffered = io.BufferedReader(raw, 1 << 20)  # type: ignore[arg-type]
    magic = buffered.peek(3)[:3]
    if magic == b"BZh":
        return bz2.open(buffered, "rb")  # type: ignore[return-value]
    if magic[:2] == b"\x1f\x8b":
        return gzip.open(buffered, "rb")  # type: ignore[return-value]
    return buffered


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def iter_pages(
    source: str | BinaryIO, on_read: Callable[[int], None] | None = None, name: str | None = None
) -> Iterator[Page]:
    """Yield every `Page` of the dump at `source` (a path or a binary file object).

    `on_read(n)` is called with the number of raw (compressed) bytes read, for progress.
    Raises `DumpError` naming the file when the dump is truncated or not MediaWiki XML.
    """
    label = name or (source if isinstance(source, str) else getattr(source, "name", "<stream>"))
    if isinstance(source, str):
        if not os.path.exists(source):
            raise DumpError(f"wiki dump not found: {source}")
        fh: BinaryIO = open(source, "rb")
    else:
        fh = source
    pages = 0
    try:
        stream = _open_decompressed(_CountingReader(fh, on_read))  # type: ignore[arg-type]
        root = None
        title, ns, redirect, text = "", 0, False, ""
        for event, elem in iterparse(stream, events=("start", "end")):
            if root is None:
                root = elem
                if _local(elem.tag) != "mediawiki":
                    raise DumpError(
                        f"{label}: not a MediaWiki XML dump (root element <{_local(elem.tag)}>, expected <mediawiki>)"
                    )
                continue
            if event != "end":
                continue
            tag = _local(elem.tag)
            if tag == "title":
                title = elem.text or ""
            elif tag == "ns":
                ns = int(elem.text or 0)
            elif tag == "redirect":
                redirect = True
            elif tag == "text":
                text = elem.text or ""
            elif tag == "page":
                pages += 1
                yield Page(title, ns, redirect, text)
                title, ns, redirect, text = "", 0, False, ""
                root.clear()  # drop the finished page (and everything before it) from the tree
        if root is None:
            raise DumpError(f"{label}: empty file, not a MediaWiki XML dump")
    except DumpError:
        raise
    except EOFError as e:  # bz2/gzip stream cut short
        raise DumpError(f"{label}: truncated dump ({e}) after {pages} complete pages") from None
    except ParseError as e:
        what = "truncated dump" if "no element found" in str(e) else "not well-formed XML"
        raise DumpError(f"{label}: {what} ({e}) after {pages} complete pages") from None
    except (OSError, ValueError) as e:  # e.g. "Invalid data stream" from bz2
        raise DumpError(f"{label}: unreadable dump ({e}) after {pages} complete pages") from None
    finally:
        if isinstance(source, str):
            fh.close()
