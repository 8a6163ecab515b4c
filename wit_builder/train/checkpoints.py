"""Where a training run keeps its checkpoints, and which one is the newest.

Example:
    >>> import tempfile
    >>> latest_checkpoint(tempfile.mkdtemp()) is None
    True
"""

from __future__ import annotations

import json
import os


def checkpoint_dir(out: str) -> str:
    return os.path.join(out, "checkpoints")


def latest_checkpoint(out: str) -> str | None:
    """The newest complete checkpoint folder under `out`, or None."""
    pointer = os.path.join(checkpoint_dir(out), "latest.json")
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        return os.path.join(checkpoint_dir(out), json.load(f)["path"])
