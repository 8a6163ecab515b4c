"""A per-host connection limit that holds across every process of one machine.

The fetch's in-process semaphore bounds one download task; several tasks on a machine (one
per core) would multiply it. Here a slot is an exclusive `flock` on a small file
`{dir}/{bucket}-{slot}` (bucket: a hash of the host name, so the number of files stays
bounded; two hosts in one bucket share its slots, which errs on the polite side). A lock dies
with its process, so a killed worker never leaks a slot. Across machines of a cluster the
limit is per machine.

Example:
    >>> import tempfile
    >>> slots = HostSlots(2, tempfile.mkdtemp())
    >>> a, b = slots.try_acquire("img.example"), slots.try_acquire("img.example")
    >>> slots.try_acquire("img.example") is None
    True
    >>> slots.release(a); slots.release(b)
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

BUCKETS = 4096


def default_dir() -> str:
    """/dev/shm (memory) when there is one, else the temp dir; one per user."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    return os.path.join(base, f"wit-builder-hostslots-{os.getuid()}")


class HostSlots:
    """At most `limit` holders per host name at once, over all processes using `directory`."""

    def __init__(self, limit: int, directory: str | None = None):
        self.limit = limit
        self.dir = directory or default_dir()
        os.makedirs(self.dir, mode=0o700, exist_ok=True)

    def _bucket(self, host: str) -> int:
        return int.from_bytes(hashlib.blake2b(host.lower().encode(), digest_size=4).digest(), "big") % BUCKETS

    def try_acquire(self, host: str) -> int | None:
        """A held slot (an open fd) for `host`, or None when all `limit` are taken."""
        bucket = self._bucket(host)
        first = random.randrange(self.limit)
        for k in range(self.limit):
            path = os.path.join(self.dir, f"{bucket:04x}-{(first + k) % self.limit}")
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                os.close(fd)
        return None

    @staticmethod
    def release(fd: int) -> None:
        os.close(fd)  # closing the only descriptor of the open file releases its flock

    @contextmanager
    def hold(self, host: str) -> Iterator[None]:
        """Wait (polling, 1-50 ms apart) for a slot of `host`, hold it for the block."""
        pause = 0.001
        while (fd := self.try_acquire(host)) is None:
            time.sleep(pause * (0.5 + random.random()))
            pause = min(pause * 2, 0.05)
        try:
            yield
        finally:
            self.release(fd)
