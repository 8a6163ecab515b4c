"""What every stage receives (StageContext) and returns (StageResult).

Example:
    >>> ctx = StageContext(run_dir="/tmp/r1", seed=0)
    >>> ctx.stage_dir("match")
    '/tmp/r1/matched'
    >>> r = StageResult(rows_in=10, rows_out=7, dropped={"no_match": 3})
    >>> r.check_accounting()
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from wit_builder import io
from wit_builder.stages import OUTPUT_DIR


@dataclass
class StageContext:
    """Run-wide facts a stage needs; the stage's own settings come in its Config."""

    run_dir: str
    seed: int = 0
    num_cpus: int = 2  # parallelism to aim for (Ray tasks/actors in flight)
    progress: bool = True  # show progress bars
    config_hash: str = ""  # the whole pipeline's config hash (recorded in the shards manifest)

    def stage_dir(self, stage: str) -> str:
        """The output directory of `stage` (e.g. "match" -> run_dir/matched)."""
        return io.join(self.run_dir, OUTPUT_DIR[stage])

    def path(self, *parts: str) -> str:
        return io.join(self.run_dir, *parts)

    def work_dir(self, stage: str) -> str:
        """Scratch space of a stage's passes; the runner removes it once the stage is done."""
        return io.join(self.stage_dir(stage), "_work")

    def marker_dir(self, stage: str, pass_name: str) -> str:
        """Where the executor keeps the part markers of one pass of a stage."""
        return io.join(self.stage_dir(stage), "_parts", pass_name)


@dataclass
class StageResult:
    """The one-line summary of a stage: every input row is kept or dropped with a reason."""

    rows_in: int
    rows_out: int
    dropped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # stage-specific figures (shards written, ...)

    def check_accounting(self) -> None:
        """Raise if kept + dropped != in (a bug, never a user error)."""
        total = self.rows_out + sum(self.dropped.values())
        if total != self.rows_in:
            raise AssertionError(
                f"accounting mismatch: in={self.rows_in} but kept={self.rows_out} + dropped={self.dropped}"
            )

    def line(self, stage: str) -> str:
        rate = self.rows_in / self.seconds if self.seconds > 0 else 0.0
        drops = ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items()) if v) or "none"
        return (
            f"{stage}: in={self.rows_in} out={self.rows_out} dropped: {drops} ({self.seconds:.1f}s, {rate:,.0f} rows/s)"
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StageResult:
        return cls(**d)


class Timer:
    """`with Timer() as t: ...; t.seconds`"""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
