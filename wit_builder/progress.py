"""Progress bars: tqdm on a terminal, a plain log line every few seconds otherwise; and live
progress from inside a part (a Ray task): `reporter().update(done=..., **counts)`.

A part's function calls `reporter()` (a no-op object when nobody listens) and updates it with
cumulative figures as it goes; they reach the driver's bar at most every `REPORT_EVERY`
seconds through the sink set in the worker (wit_builder.parallel for Ray tasks, the executor
in the driver itself). `WIT_PROGRESS_EVERY` sets the seconds between plain log lines (10).

Example:
    >>> with bar(total=3, desc="demo", enabled=False) as b:
    ...     b.update(3)
    >>> seen = []
    >>> set_sink(lambda part, token, values: seen.append((part, values)))
    >>> with reporting("00001"):
    ...     reporter().update(done=5, successes=4)
    ...     reporter().flush()
    >>> set_sink(None); seen[-1]
    ('00001', {'done': 5, 'successes': 4})
"""

from __future__ import annotations

import contextvars
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class _LineBar:
    """Minimal non-TTY progress: prints `desc: n/total (rate/s)` at most every `every` seconds."""

    def __init__(self, total: int | None, desc: str, unit: str, every: float | None = None):
        every = float(os.environ.get("WIT_PROGRESS_EVERY", "10")) if every is None else every
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.n = 0
        self.postfix = ""
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
        post = f" {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n}{tot} {self.unit}s ({rate:,.1f}/s){post}", file=sys.stderr, flush=True)

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


# -- live progress from inside a part ---------------------------------------------------------

REPORT_EVERY = 1.0  # seconds between a part's reports
Sink = Callable[[str, str, dict[str, Any]], None]  # (part name, attempt token, cumulative values)
_sink: Sink | None = None
_current: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar("wit_progress_reporter", default=None)


def set_sink(sink: Sink | None) -> None:
    """Where this process's parts send their reports (None: nowhere)."""
    global _sink
    _sink = sink


class Reporter:
    """Cumulative figures of one attempt at one part, sent at most every REPORT_EVERY seconds.

    `done` moves the bar (in the part's weight units, e.g. rows); the other values are counts
    the pass's postfix shows (e.g. successes, image_bytes)."""

    def __init__(self, part: str, sink: Sink | None):
        self.part, self.sink = part, sink
        self.token = uuid.uuid4().hex[:12]  # a retried part starts afresh, not on top
        self.values: dict[str, Any] = {}
        self.last = time.monotonic()

    def update(self, **values: Any) -> None:
        self.values = values
        if self.sink is not None and time.monotonic() - self.last >= REPORT_EVERY:
            self.flush()

    def flush(self) -> None:
        self.last = time.monotonic()
        if self.sink is not None and self.values:
            try:
                self.sink(self.part, self.token, dict(self.values))
            except Exception:  # progress never fails a part
                pass


_NO_REPORTER = Reporter("", None)


def reporter() -> Reporter:
    """The current part's reporter (one that sends nothing outside a reporting() block)."""
    return _current.get() or _NO_REPORTER


@contextmanager
def reporting(part: str) -> Iterator[Reporter]:
    """Run a part's function with a reporter to this process's sink."""
    rep = Reporter(part, _sink)
    token = _current.set(rep)
    try:
        yield rep
    finally:
        _current.reset(token)
