"""The shipped default query list (`queries/default_queries.parquet` in the repository).

Found relative to the package (the repository root is two levels above this file), which
works for the source tree and editable installs; `path` overrides it elsewhere.

Example:
    >>> texts = load_default_texts()
    >>> len(texts) > 100_000, texts[:3]
    (True, ['entity', 'physical entity', 'abstraction'])
"""

from __future__ import annotations

import os

from wit_builder.config import ConfigError

FILE_NAME = "default_queries.parquet"


def default_path() -> str:
    """Absolute path of the shipped list (it may not exist in a non-editable install)."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(repo, "queries", FILE_NAME)


def load_default(path: str = "") -> list[tuple[str, str, int | None]]:
    """[(text, source, count)] of the shipped list, in its query_id order."""
    import pyarrow.parquet as pq

    p = path or default_path()
    if not os.path.exists(p):
        raise ConfigError(
            f"[queries] default = true: shipped list not found at {p} (install the repo editable, or set default_path)"
        )
    t = pq.read_table(p, columns=["text", "source", "count"])
    return list(zip(t.column("text").to_pylist(), t.column("source").to_pylist(), t.column("count").to_pylist()))


def load_default_texts(path: str = "") -> list[str]:
    """The shipped list as raw strings (what a Matcher needs)."""
    return [text for text, _, _ in load_default(path)]
