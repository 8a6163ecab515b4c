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
import time
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
        check_cluster_auth(address)
        forwarded = storage_env()
        if forwarded:
            kwargs["runtime_env"] = {"env_vars": forwarded}
        ray.init(address=address, logging_level=logging.WARNING, **kwargs)
    else:  # embedded: always a private local instance, whatever RAY_ADDRESS or a `ray start`
        # on this host says; quiet (its start-up warnings, e.g. about token auth, mean nothing here)
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), logging_level=logging.ERROR, **kwargs)


# Run in a child process: Ray's GCS client prints its own warnings and, for an address where
# nothing answers, blocks for tens of seconds; a child keeps both out of `wit-build`.
_AUTH_PROBE = """
import sys
from ray._raylet import GcsClient
from ray.exceptions import AuthenticationError
try:
    GcsClient(address=sys.argv[1])
except AuthenticationError:
    print("refused")
except Exception:
    print("unknown")
else:
    print("ok")
"""


def check_cluster_auth(address: str, timeout: float = 20) -> None:
    """Raise a ConfigError saying exactly what to set when the Ray cluster at `address` refuses
    this process for want of its token (Ray 2.60's `ray start --head` turns token auth on with
    RAY_AUTH_MODE=token, or unasked when the head machine has a token); `ray.init` would print
    InvalidAuthToken warnings for ~20 s, then raise an unexplained ConnectionError. Anything
    else (no cluster there, a `ray://` Ray Client address) is left to `ray.init` to report.

    >>> check_cluster_auth("ray://head:10001")  # not probed: Ray Client checks its own
    """
    import subprocess
    import sys

    from wit_builder.config import ConfigError

    if address.startswith("ray://"):
        return
    _ray()  # Ray's environment defaults, before its address helpers are imported
    from ray._private.services import canonicalize_bootstrap_address

    try:
        gcs = canonicalize_bootstrap_address(address)
    except Exception:  # e.g. "auto" with no cluster recorded: ray.init says so
        return
    if not gcs:
        return
    env = {**os.environ, "RAY_py_gcs_connect_timeout_s": "5"}
    try:
        probe = subprocess.run(
            [sys.executable, "-c", _AUTH_PROBE, gcs], capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired:
        return
    if probe.stdout.strip() == "refused":
        raise ConfigError(auth_hint(address, gcs, os.environ))


def auth_hint(address: str, gcs: str, environ: dict[str, str] | os._Environ) -> str:
    """What to set when the cluster at `gcs` (from --ray-address `address`) refused us.

    >>> print(auth_hint("auto", "10.0.0.5:6379", {}))  # doctest: +NORMALIZE_WHITESPACE
    --ray-address auto: the Ray cluster at 10.0.0.5:6379 requires token authentication: set
    RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<the cluster's token> (or RAY_AUTH_TOKEN_PATH=<a file
    holding it>, default ~/.ray/auth_token) where wit-build runs; `ray get-auth-token` on the
    head node prints the token
    """
    where = f"--ray-address {address}: the Ray cluster" + (f" at {gcs}" if address == "auto" else "")
    tail = "where wit-build runs; `ray get-auth-token` on the head node prints the token"
    if environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return (
            f"{where} requires token authentication: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<the "
            "cluster's token> (or RAY_AUTH_TOKEN_PATH=<a file holding it>, default ~/.ray/auth_token) " + tail
        )
    source = (
        "RAY_AUTH_TOKEN"
        if environ.get("RAY_AUTH_TOKEN")
        else f"the file {environ['RAY_AUTH_TOKEN_PATH']} (RAY_AUTH_TOKEN_PATH)"
        if environ.get("RAY_AUTH_TOKEN_PATH")
        else "~/.ray/auth_token (no RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH is set)"
    )
    return f"{where} refused the token from {source}: set RAY_AUTH_TOKEN=<the cluster's token> " + tail


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
    on_progress: Callable[[dict[str, tuple[str, dict]]], None] | None = None,
) -> Iterator[tuple[T, R]]:
    """Run `fn(item)` as Ray tasks; yield (item, result) as they finish.

    `fn` may be any picklable callable (a `functools.partial` included); it is shipped once.
    A task whose worker dies is retried `max_retries` times; an exception raised by `fn` is not
    retried here: it is raised (see `_get`), or with `capture_errors` yielded as the result.
    With `on_progress`, what tasks report through `wit_builder.progress.reporter()` is
    gathered by a small actor and passed on about once a second, as {part: (token, values)}.
    """
    ray = _ray()
    init()
    name = _name_of(fn)
    remote = ray.remote(_apply).options(max_retries=max_retries, retry_exceptions=False, num_cpus=num_cpus, name=name)
    fn_ref = ray.put(fn)
    sink = ray.remote(num_cpus=0)(_ProgressSink).remote() if on_progress is not None else None
    last_drain = time.monotonic()
    limit = max_in_flight or max(1, cluster_cpus() * 2)
    pending: dict[Any, T] = {}
    queue = list(items)
    queue.reverse()  # pop() from the end takes items in order
    try:
        with bar(total=len(queue), desc=desc, unit=unit, enabled=progress) as pbar:
            while queue or pending:
                while queue and len(pending) < limit:
                    item = queue.pop()
                    pending[remote.remote(fn_ref, item, sink)] = item
                done, _ = ray.wait(list(pending), num_returns=1, timeout=None if sink is None else 1.0)
                if sink is not None and time.monotonic() - last_drain >= 1.0:
                    last_drain = time.monotonic()
                    try:
                        updates = ray.get(sink.drain.remote(), timeout=10)
                    except ray.exceptions.RayError:  # progress is never worth failing the pass for
                        updates = {}
                    on_progress(updates)  # type: ignore[misc]
                for ref in done:
                    item = pending.pop(ref)
                    yield item, _get(ray, ref, name, capture_errors)
                    pbar.update(1)
    finally:  # the caller stopped early (an error): tasks still in flight are not left running
        for ref in pending:
            ray.cancel(ref)
        if sink is not None:
            ray.kill(sink)


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


def _apply(fn: Callable[[T], R], item: T, sink: Any = None) -> R:
    if sink is None:
        return fn(item)
    from wit_builder import progress

    progress.set_sink(lambda part, token, values: sink.put.remote(part, token, values))
    try:
        return fn(item)
    finally:
        progress.set_sink(None)


class _ProgressSink:
    """The latest report of each part's current attempt, until the driver drains them."""

    def __init__(self) -> None:
        self.latest: dict[str, tuple[str, dict]] = {}

    def put(self, part: str, token: str, values: dict) -> None:
        self.latest[part] = (token, values)

    def drain(self) -> dict[str, tuple[str, dict]]:
        out, self.latest = self.latest, {}
        return out


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
    that reserve none). Never more actors than the cluster has CPUs (each reserves one): an
    actor Ray cannot place would hold its items forever. A dead actor (its process or its node
    died) is not restarted, as a restart with no free CPU would wait forever: its items in
    flight come back as Ray's error (retried by the caller, see wit_builder.executor), later
    items go to the live actors, and when none is left the rest come back with that error too.
    Other errors as in `map_tasks`.
    """
    ray = _ray()
    init()
    cpus = cluster_cpus()
    n = max(1, min(num_actors or cpus, cpus))
    actor_cls = ray.remote(num_cpus=1, num_gpus=num_gpus, max_restarts=0, max_task_retries=0)(_Worker)
    actors = [actor_cls.remote(setup, fn) for _ in range(n)]
    name = _name_of(fn)
    try:
        it = iter(items)
        pending: dict[Any, tuple[T, int]] = {}
        load = [0] * n
        live = set(range(n))
        death: BaseException | None = None
        exhausted = False
        with bar(total=total, desc=desc, unit=unit, enabled=progress) as pbar:
            while True:
                while not exhausted and live and min(load[a] for a in live) < 2:
                    try:
                        item = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                    a = min(live, key=load.__getitem__)
                    pending[actors[a].call.remote(item)] = (item, a)
                    load[a] += 1
                if not pending:
                    break
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    item, a = pending.pop(ref)
                    load[a] -= 1
                    result = _get(ray, ref, name, capture_errors)
                    if isinstance(result, BaseException) and is_worker_death(result):
                        live.discard(a)
                        death = result
                    yield item, result
                    pbar.update(1)
            if not exhausted and death is not None:  # every actor died: the rest fail alike
                for item in it:
                    yield item, death  # type: ignore[misc]
                    pbar.update(1)
    finally:
        for actor in actors:
            ray.kill(actor)
