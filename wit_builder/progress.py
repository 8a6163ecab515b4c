"""Progress bars: tqdm on a terminal, a plain log line every few seconds otherwise.

Example:
    >>> with bar(total=3, desc="demo", enabled=False) as b:
    ...     b.update(3)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager


class _LineBar:
    """Minimal non-TTY progress: prints `desc: n/total (rate/s)` at most every `every` seconds."""

    def __init__(self, total: int | None, desc: str, unit: str, every: float = 10.0):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.n = 0
        self.start = self.last = time.monotonic()

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._print(now)

    def set_postfix_str(self, s: str) -> None:
        self.postfix = s

    def _print(self, now: float) -> None:
        rate = self.n / max(now - self.start, 1e-9)
        tot = f"/{self.total}" if self.total is not None else ""
        print(f"{self.desc}: {self.n}{tot} {self.unit}s ({rate:,.1f}/s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


class _NoBar:
    def update(self, k: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass


@contextmanager
def bar(total: int | None, desc: str, unit: str = "it", enabled: bool = True) -> Iterator[object]:
    """A progress bar with `.update(k)` and `.set_postfix_str(s)`."""
    if not enabled:
        yield _NoBar()
        return
    if sys.stderr.isatty():
        from tqdm import tqdm

        with tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False) as t:
            yield t
    else:
        b = _LineBar(total, desc, unit)
        yield b
        b.close()
