"""The part executor: every stage pass is a plan of parts and a function per part; this module
owns everything else, for every stage and every pass.

- A part has a deterministic name; its **marker** `{marker_dir}/{name}.json` holds the counts
  its function returned. A part whose marker exists is skipped and its counts read back.
- The function writes its outputs (each atomically, through `wit_builder.io`); the marker is
  written after it returns, atomically, by the same worker: output first, marker last.
- Stale temporary files (`.{name}.{id}.tmp`, left by a killed run) are removed from the
  marker dir and the pass's `tmp_dirs` before any part runs.
- Parts run as Ray tasks, or on Ray actors when the pass gives a per-worker `setup()`
  (a model, an automaton), or in this process (`local=True`, for cheap parts that stream
  driver state). A dead worker is retried by Ray; an I/O error (OSError, timeouts) is retried
  in further rounds with exponential backoff; any other error stops the pass at once (a
  `ConfigError` as itself: exit code 2), naming the part.
- The markers' counts are returned in plan order; `sum_counts` adds them up for the
  StageResult, so a resumed pass reports what a fresh one would.
- Progress moves as parts finish, and within a part when its function reports through
  `wit_builder.progress.reporter().update(done=rows so far, **counts so far)` (the download
  stage does); the postfix shows finished plus live counts.

Stages never import Ray: they describe passes and call `run_pass`.

Example (in this process; see tests/test_executor.py for Ray tasks, actors and crashes):
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> p = Pass("square", f"{d}/_parts/square", lambda x: {"rows": 1, "sum": x * x}, local=True)
    >>> counts = run_pass(p, [Part(f"{i:02d}", i) for i in range(4)], progress=False)
    >>> sum_counts(counts.values())
    {'rows': 4, 'sum': 14}
    >>> run_pass(p, [Part("00", 0)], progress=False)["00"]   # done before: read back
    {'rows': 1, 'sum': 0}
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from wit_builder import io
from wit_builder import progress as _progress
from wit_builder.progress import bar

Counts = dict[str, Any]


@dataclass(frozen=True)
class Part:
    """One unit of a pass: a file-name-safe `name` unique in the pass, the picklable `args`
    its function takes, and its `weight` for the progress bar (e.g. rows)."""

    name: str
    args: Any
    weight: int = 1


@dataclass(frozen=True)
class Pass:
    """How to run one pass of a stage.

    fn: `fn(args) -> counts`, or `fn(state, args) -> counts` with `setup`; counts must be
        JSON-able (numbers, strings, nested dicts of them).
    setup: run once per worker (an actor) before its parts, e.g. loading a model.
    tmp_dirs: output dirs to clear of stale temp files before the pass.
    local: run the parts in this process, in plan order (no Ray).
    workers: actors (with setup) or tasks in flight; 0 = the cluster's CPUs.
    num_gpus: GPUs each actor reserves (with setup).
    attempts: rounds over parts that failed with an I/O error; backoff: seconds before the
        second round, doubled each further round; task_retries: Ray retries of a dead worker.
    desc, unit: the progress bar's label and unit; postfix(totals) -> a status string.
    """

    name: str
    marker_dir: str
    fn: Callable[..., Counts]
    setup: Callable[[], Any] | None = None
    tmp_dirs: tuple[str, ...] = ()
    local: bool = False
    workers: int = 0
    num_gpus: float = 0.0
    attempts: int = 3
    backoff: float = 2.0
    task_retries: int = 3
    desc: str = ""
    unit: str = "part"
    postfix: Callable[[Counts], str] | None = field(default=None, compare=False)


def marker_path(marker_dir: str, name: str) -> str:
    return io.join(marker_dir, f"{name}.json")


def finished_names(marker_dir: str) -> list[str]:
    """The names of the finished parts of a pass (one listing, no cache, no marker read)."""
    return [path.rsplit("/", 1)[-1][: -len(".json")] for path in io.listdir(marker_dir, ".json")]


def finished(marker_dir: str) -> dict[str, Counts]:
    """The counts of every finished part of a pass, by part name."""
    return {name: io.read_json(marker_path(marker_dir, name)) for name in finished_names(marker_dir)}


def reset(marker_dir: str) -> None:
    """Forget a pass's finished parts (their outputs are left to be overwritten)."""
    io.remove(marker_dir)


def sum_counts(counts: Iterable[Mapping[str, Any]]) -> Counts:
    """Add up counts: numbers are summed, nested dicts summed key by key, other values dropped.

    >>> sum_counts([{"rows": 2, "errors": {"a": 1}}, {"rows": 3, "errors": {"a": 1, "b": 2}}])
    {'rows': 5, 'errors': {'a': 2, 'b': 2}}
    """
    total: Counts = {}
    for c in counts:
        for k, v in c.items():
            if isinstance(v, bool) or not isinstance(v, (int, float, dict)):
                continue
            if isinstance(v, dict):
                total[k] = sum_counts([total.get(k, {}), v])
            else:
                total[k] = total.get(k, 0) + v
    return total


class _MarkedCall:
    """The function a worker runs for a part: the pass's fn, then the part's marker."""

    def __init__(self, fn: Callable[..., Counts], marker_dir: str, with_state: bool):
        self.fn, self.marker_dir, self.with_state = fn, marker_dir, with_state
        inner = fn
        while isinstance(inner, functools.partial):
            inner = inner.func
        self.__name__ = getattr(inner, "__name__", type(inner).__name__)  # the Ray task's name

    def __call__(self, *args: Any) -> Counts:
        *state, part = args
        with _progress.reporting(part.name):
            counts = self.fn(*state, part.args) if self.with_state else self.fn(part.args)
        io.write_json(counts, marker_path(self.marker_dir, part.name))
        return counts


def run_pass(p: Pass, parts: Sequence[Part], *, progress: bool = True) -> dict[str, Counts]:
    """Run the parts of `p` not finished yet; returns every part's counts, in plan order."""
    names = [part.name for part in parts]
    if len(set(names)) != len(names):
        raise ValueError(f"pass {p.name}: part names are not unique")
    for d in (p.marker_dir, *p.tmp_dirs):
        io.remove_stale_tmp(d)
    done = finished(p.marker_dir)
    todo = [part for part in parts if part.name not in done]
    totals = sum_counts(done[n] for n in names if n in done)
    call = _MarkedCall(p.fn, p.marker_dir, with_state=p.setup is not None)
    weight = sum(part.weight for part in parts)
    with bar(total=weight, desc=p.desc or p.name, unit=p.unit, enabled=progress) as pbar:
        live = _LiveBar(pbar, {part.name: part.weight for part in parts}, p.postfix, totals)
        live.advance(sum(part.weight for part in parts if part.name in done))
        for attempt in range(p.attempts):
            if not todo:
                break
            if attempt:
                time.sleep(p.backoff * 2 ** (attempt - 1))
            failed: list[tuple[Part, BaseException]] = []
            for part, outcome in _dispatch(p, call, todo, live.report if progress else None):
                if isinstance(outcome, BaseException):
                    failed.append((part, outcome))
                    live.drop(part.name)
                    continue
                done[part.name] = outcome
                totals = sum_counts([totals, outcome])
                live.finish(part.name, outcome)
            todo = [part for part, _ in failed]
            last = failed[-1] if failed else None
    if todo and last is not None:
        part, error = last
        raise RuntimeError(
            f"{p.name}: {len(todo)} part(s) unfinished after {p.attempts} attempt(s) "
            f"(e.g. {part.name}: {type(error).__name__}: {error}); rerunning resumes"
        ) from error
    return {n: done[n] for n in names}


class _LiveBar:
    """The bar's position and postfix from finished parts plus the live reports of running ones."""

    def __init__(self, pbar: Any, weights: dict[str, int], postfix: Callable[[Counts], str] | None, totals: Counts):
        self.pbar, self.weights, self.postfix, self.totals = pbar, weights, postfix, totals
        self.done_weight = self.pos = 0
        self.live: dict[str, tuple[str, dict[str, Any]]] = {}
        self.finished: set[str] = set()

    def advance(self, weight: int) -> None:
        self.done_weight += weight
        self._refresh()

    def report(self, updates: Mapping[str, tuple[str, dict[str, Any]]]) -> None:
        for name, (token, values) in updates.items():
            if name in self.weights and name not in self.finished:
                self.live[name] = (token, values)
        self._refresh()

    def drop(self, name: str) -> None:
        self.live.pop(name, None)
        self._refresh()

    def finish(self, name: str, counts: Counts) -> None:
        self.live.pop(name, None)
        self.finished.add(name)
        self.totals = sum_counts([self.totals, counts])
        self.done_weight += self.weights[name]
        self._refresh()

    def _refresh(self) -> None:
        running = [v for _, v in self.live.values()]
        pos = self.done_weight + sum(min(int(v.get("done", 0)), self.weights[n]) for n, (_, v) in self.live.items())
        if pos != self.pos:
            self.pbar.update(pos - self.pos)
            self.pos = pos
        if self.postfix is not None:
            live = [{k: x for k, x in v.items() if k != "done"} for v in running]
            self.pbar.set_postfix_str(self.postfix(sum_counts([self.totals, *live])))


def _dispatch(
    p: Pass, call: _MarkedCall, todo: list[Part], on_progress: Callable[..., None] | None = None
) -> Iterable[tuple[Part, Any]]:
    """(part, counts or the transient exception that stopped it), as parts finish.

    A deterministic error is raised at once: ConfigError as itself, anything else as a
    RuntimeError naming the part. Live reports of running parts go to `on_progress`."""
    from wit_builder.config import ConfigError

    if p.local:
        state = (p.setup(),) if p.setup is not None else ()
        sink = None if on_progress is None else (lambda part, token, values: on_progress({part: (token, values)}))
        results: Iterable[tuple[Part, Any]] = ((part, _call_local(call, state, part, sink)) for part in todo)
    else:
        from wit_builder import parallel

        if p.setup is not None:
            results = parallel.map_actors(
                p.setup,
                call,
                todo,
                desc=p.desc or p.name,
                num_actors=min(len(todo), p.workers or parallel.cluster_cpus()),
                progress=False,
                num_gpus=p.num_gpus,
                capture_errors=True,
            )
        else:
            results = parallel.map_tasks(
                call,
                todo,
                desc=p.desc or p.name,
                progress=False,
                max_retries=p.task_retries,
                max_in_flight=p.workers or None,
                capture_errors=True,
                on_progress=on_progress,
            )
    for part, outcome in results:
        if isinstance(outcome, BaseException) and not is_transient(outcome):
            if isinstance(outcome, ConfigError):
                raise outcome
            raise RuntimeError(f"{p.name} part {part.name}: {type(outcome).__name__}: {outcome}") from outcome
        yield part, outcome


def _call_local(call: _MarkedCall, state: tuple, part: Part, sink: _progress.Sink | None = None) -> Any:
    _progress.set_sink(sink)
    try:
        return call(*state, part)
    except TRANSIENT as e:
        return e
    finally:
        _progress.set_sink(None)


# I/O hiccups worth another round; a crashed or killed worker is retried by Ray itself
TRANSIENT: tuple[type[BaseException], ...] = (OSError, TimeoutError, ConnectionError)


def is_transient(error: BaseException) -> bool:
    """An error worth retrying the part for (an I/O error, a worker that died too often)."""
    from wit_builder import parallel

    return isinstance(error, TRANSIENT) or parallel.is_worker_death(error)
