"""The one module that talks to Ray: start it, run tasks or per-worker actors, show progress.

The executor (wit_builder.executor) calls `map_tasks` (a pure function per item) or
`map_actors` (an expensive `setup()` run once per worker, e.g. building a 500k-query automaton
or loading a model, then a function per item); stages never call this module. Results come
back as items finish, with a progress bar.

Example:
    >>> init(num_cpus=1)                                    # doctest: +SKIP
    >>> sorted(r for _, r in map_tasks(abs, [-1, -2], desc="abs", progress=False))  # doctest: +SKIP
    [1, 2]
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from wit_builder.progress import bar

T = TypeVar("T")
R = TypeVar("R")


def _ray():
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    return ray


# Storage settings forwarded to the workers of a Ray cluster (an embedded Ray's workers inherit
# this process's environment anyway; a cluster's were started by `ray start` on each node):
# fsspec's config variables (FSSPEC_S3_ENDPOINT_URL=..., FSSPEC_S3='{...}', FSSPEC_GCS_...) and
# the AWS SDK's credentials, session token, endpoint and region. Not AWS_PROFILE or file paths:
# those name things on this machine that the nodes may not have.
STORAGE_ENV_PREFIXES = ("FSSPEC_",)
STORAGE_ENV_NAMES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)


def storage_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The storage settings of `environ` (default: this process's) that cluster workers get.

    >>> storage_env({"AWS_ENDPOINT_URL": "http://minio:9000", "FSSPEC_S3_ANON": "false", "HOME": "/root"})
    {'AWS_ENDPOINT_URL': 'http://minio:9000', 'FSSPEC_S3_ANON': 'false'}
    """
    env = os.environ if environ is None else environ
    return {k: v for k, v in sorted(env.items()) if k in STORAGE_ENV_NAMES or k.startswith(STORAGE_ENV_PREFIXES)}


def init(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start an embedded local Ray (or connect to `address`); a no-op if already up.

    On a cluster, this process's storage settings (`storage_env`) are passed to every worker
    of the run (Ray's runtime_env), so credentials and an endpoint set once, where `wit-build`
    runs, reach the run dir from every node. A SIGTERM handler the caller installed (wit-build:
    SIGTERM = interrupt, clean up, exit 143) is kept: `ray.init` replaces it with its own
    (sys.exit) and its core worker's crash handler (a stack dump, then abort)."""
    import signal
    import threading

    ray = _ray()
    if ray.is_initialized():
        return
    main_thread = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main_thread else None
    try:
        _init(ray, address, num_cpus)
    finally:
        if callable(handler):  # one a caller installed; a default one stays Ray's
            signal.signal(signal.SIGTERM, handler)


def _init(ray, address: str | None, num_cpus: int | None) -> None:
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=True, configure_logging=True)
    if address:
        forwarded = storage_env()
        if forwarded:
            kwargs["runtime_env"] = {"env_vars": forwarded}
        ray.init(address=address, logging_level=logging.WARNING, **kwargs)
    else:  # embedded: always a private local instance, whatever RAY_ADDRESS or a `ray start`
        # on this host says; quiet (its start-up warnings, e.g. about token auth, mean nothing here)
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), logging_level=logging.ERROR, **kwargs)


def shutdown() -> None:
    ray = _ray()
    if ray.is_initialized():
        ray.shutdown()


def cluster_cpus() -> int:
    ray = _ray()
    return int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else (os.cpu_count() or 1)


def map_tasks(
    fn: Callable[[T], R],
    items: Sequence[T],
    *,
    desc: str,
    progress: bool = True,
    max_retries: int = 3,
    max_in_flight: int | None = None,
    num_cpus: float = 1,
    unit: str = "part",
    capture_errors: bool = False,
) -> Iterator[tuple[T, R]]:
    """Run `fn(item)` as Ray tasks; yield (item, result) as they finish.

    `fn` may be any picklable callable (a `functools.partial` included); it is shipped once.
    A task whose worker dies is retried `max_retries` times; an exception raised by `fn` is not
    retried here: it is raised (see `_get`), or with `capture_errors` yielded as the result.
    """
    ray = _ray()
    init()
    name = _name_of(fn)
    remote = ray.remote(_apply).options(max_retries=max_retries, retry_exceptions=False, num_cpus=num_cpus, name=name)
    fn_ref = ray.put(fn)
    limit = max_in_flight or max(1, cluster_cpus() * 2)
    pending: dict[Any, T] = {}
    queue = list(items)
    queue.reverse()  # pop() from the end takes items in order
    try:
        with bar(total=len(queue), desc=desc, unit=unit, enabled=progress) as pbar:
            while queue or pending:
                while queue and len(pending) < limit:
                    item = queue.pop()
                    pending[remote.remote(fn_ref, item)] = item
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    item = pending.pop(ref)
                    yield item, _get(ray, ref, name, capture_errors)
                    pbar.update(1)
    finally:  # the caller stopped early (an error): tasks still in flight are not left running
        for ref in pending:
            ray.cancel(ref)


def is_worker_death(error: BaseException) -> bool:
    """True for Ray's errors that mean a worker or actor died (not the task's own exception)."""
    ray = _ray()
    return isinstance(
        error,
        (
            ray.exceptions.WorkerCrashedError,
            ray.exceptions.ActorDiedError,
            ray.exceptions.ActorUnavailableError,
            ray.exceptions.NodeDiedError,
            ray.exceptions.OwnerDiedError,
            ray.exceptions.ObjectLostError,
        ),
    )


def _get(ray, ref, name: str, capture: bool = False):
    """ray.get, re-raising a task's own exception as itself when it is a ConfigError (a clear
    message, exit code 2), any other as a RuntimeError naming the task and the cause (remote
    traceback chained). With `capture`, the task's exception (or Ray's, for a dead worker) is
    returned instead of raised."""
    from wit_builder.config import ConfigError

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if capture:
            return cause if isinstance(cause, BaseException) else e
        if isinstance(cause, ConfigError):
            raise cause from None
        raise RuntimeError(f"Ray task {name} failed: {type(cause).__name__}: {cause}") from e
    except ray.exceptions.RayError as e:
        if capture:
            return e
        raise


def _name_of(fn: Callable) -> str:
    """The task name Ray shows (process title `ray::NAME`, dashboard): the wrapped function's."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


def _apply(fn: Callable[[T], R], item: T) -> R:
    return fn(item)


class _Worker:
    def __init__(self, setup: Callable[[], Any], fn: Callable[[Any, Any], Any]):
        self.state = setup()
        self.fn = fn

    def call(self, item: Any) -> Any:
        return self.fn(self.state, item)


def map_actors(
    setup: Callable[[], Any],
    fn: Callable[[Any, T], R],
    items: Iterable[T],
    *,
    desc: str,
    num_actors: int | None = None,
    progress: bool = True,
    total: int | None = None,
    unit: str = "part",
    num_gpus: float = 0,
    capture_errors: bool = False,
) -> Iterator[tuple[T, R]]:
    """Run `setup()` once in each of `num_actors` workers, then `fn(state, item)` per item there.

    Yields (item, result) as they finish; at most two items in flight per actor, so `items`
    may be a lazy stream. `num_gpus` reserves GPUs per actor (Ray hides GPUs from actors
    that reserve none). A dead actor is restarted and its call retried; errors as in `map_tasks`.
    """
    ray = _ray()
    init()
    n = max(1, num_actors or cluster_cpus())
    actor_cls = ray.remote(num_cpus=1, num_gpus=num_gpus, max_restarts=2, max_task_retries=2)(_Worker)
    actors = [actor_cls.remote(setup, fn) for _ in range(n)]
    name = _name_of(fn)
    try:
        it = iter(items)
        pending: dict[Any, tuple[T, int]] = {}
        load = [0] * n
        exhausted = False
        with bar(total=total, desc=desc, unit=unit, enabled=progress) as pbar:
            while True:
                while not exhausted and min(load) < 2:
                    try:
                        item = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                    a = load.index(min(load))
                    pending[actors[a].call.remote(item)] = (item, a)
                    load[a] += 1
                if not pending:
                    break
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    item, a = pending.pop(ref)
                    load[a] -= 1
                    yield item, _get(ray, ref, name, capture_errors)
                    pbar.update(1)
    finally:
        for actor in actors:
            ray.kill(actor)
