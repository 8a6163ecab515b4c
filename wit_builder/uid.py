"""The identity of a (url, caption) pair, fixed forever: determinism, dedup and resume depend on it.

uid = blake2b(url + "\\x1f" + caption, digest_size=8).hexdigest() over the raw strings.

Example:
    >>> uid("https://a.org/x.jpg", "a cat")
    '1da8d4821056da7a'
    >>> len(uid("u", "c"))
    16
"""

from __future__ import annotations

from collections.abc import Iterable
from hashlib import blake2b

SEPARATOR = "\x1f"


def uid(url: str, caption: str) -> str:
    """blake2b-8 hex of the raw url + "\\x1f" + the raw caption."""
    return blake2b((url + SEPARATOR + caption).encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def uids(urls: Iterable[str], captions: Iterable[str]) -> list[str]:
    """`uid` over two parallel sequences."""
    return [
        blake2b((u + SEPARATOR + c).encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
        for u, c in zip(urls, captions)
    ]
