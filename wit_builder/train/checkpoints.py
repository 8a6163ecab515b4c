"""Where a training run keeps its checkpoints, and which one is the newest.

`out` is a local folder or an fsspec URL (s3://bucket/run, ...). Locally a checkpoint folder
is written under a temporary name and renamed; an object store has no folder rename, so there
`latest.json` (written atomically, read afresh) is what makes a checkpoint complete: a folder
it does not point at may be partial and is never read.

Example:
    >>> import tempfile
    >>> latest_checkpoint(tempfile.mkdtemp()) is None
    True
"""

from __future__ import annotations

import json
import os

from wit_builder import io as wio


def join(out: str, *parts: str) -> str:
    """`out`/parts: os.path.join for a local folder, '/'-joined for a URL."""
    return os.path.join(out, *parts) if wio.is_local(out) else wio.join(out, *parts)


def checkpoint_dir(out: str) -> str:
    return join(out, "checkpoints")


def latest_checkpoint(out: str) -> str | None:
    """The newest complete checkpoint folder under `out`, or None."""
    pointer = join(checkpoint_dir(out), "latest.json")
    if wio.is_local(out):
        if not os.path.exists(pointer):
            return None
        with open(pointer) as f:
            return os.path.join(checkpoint_dir(out), json.load(f)["path"])
    try:
        return join(checkpoint_dir(out), wio.read_json(pointer)["path"])
    except FileNotFoundError:
        return None
