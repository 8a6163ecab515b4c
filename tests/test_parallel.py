"""The Ray wrapper: tasks, per-worker setup, retries."""

from __future__ import annotations

import os

import pytest

from wit_builder import parallel


def _square(x: int) -> int:
    return x * x


def _setup() -> dict:
    return {"pid": os.getpid(), "offset": 100}


def _add_offset(state: dict, x: int) -> tuple[int, int]:
    return state["pid"], x + state["offset"]


def _fail_once(path: str) -> str:
    marker = path + ".tried"
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)  # the worker process dies, as on a crash or OOM kill
    return "ok"


@pytest.mark.timeout(120)
def test_map_tasks_yields_every_result(ray_session):
    out = dict(parallel.map_tasks(_square, list(range(20)), desc="square", progress=False))
    assert out == {i: i * i for i in range(20)}


@pytest.mark.timeout(120)
def test_map_actors_runs_setup_once_per_worker(ray_session):
    results = list(
        parallel.map_actors(_setup, _add_offset, iter(range(30)), desc="actors", num_actors=2, progress=False)
    )
    assert sorted(r for _, (_, r) in results) == [i + 100 for i in range(30)]
    assert len({pid for _, (pid, _) in results}) <= 2


@pytest.mark.timeout(120)
def test_a_killed_worker_is_retried(ray_session, tmp_path):
    out = list(parallel.map_tasks(_fail_once, [str(tmp_path / "a")], desc="crash", progress=False))
    assert out == [(str(tmp_path / "a"), "ok")]


@pytest.mark.timeout(120)
def test_map_tasks_takes_a_partial(ray_session):
    import functools

    out = dict(parallel.map_tasks(functools.partial(pow, 2), [1, 3, 5], desc="pow", progress=False))
    assert out == {1: 2, 3: 8, 5: 32}
    assert parallel._name_of(functools.partial(functools.partial(_square), 2)) == "_square"


def _config_error_once(path: str) -> str:
    from wit_builder.config import ConfigError

    with open(path, "a") as f:
        f.write("x")
    raise ConfigError(f"bad input {path}")


def _bug(x: int) -> int:
    return {}[x]


@pytest.mark.timeout(120)
def test_task_errors_surface_as_themselves_and_are_not_retried(ray_session, tmp_path):
    from wit_builder.config import ConfigError

    marker = str(tmp_path / "attempts")
    with pytest.raises(ConfigError, match="bad input"):
        list(parallel.map_tasks(_config_error_once, [marker], desc="e", progress=False))
    assert open(marker).read() == "x", "a deterministic error is not retried"
    with pytest.raises(RuntimeError, match=r"_bug failed: KeyError"):
        list(parallel.map_tasks(_bug, [1], desc="e", progress=False))


@pytest.mark.timeout(120)
def test_embedded_ray_ignores_ray_address_in_the_environment(tmp_path):
    """RAY_ADDRESS (as under `ray job submit`) or a cluster on the host never changes an embedded run."""
    import subprocess
    import sys

    code = (
        "from wit_builder import parallel\n"
        "parallel.init(num_cpus=1)\n"
        "print(sorted(r for _, r in parallel.map_tasks(abs, [-1, -2], desc='abs', progress=False)))\n"
        "parallel.shutdown()\n"
    )
    env = dict(os.environ, RAY_ADDRESS="127.0.0.1:9", RAY_USAGE_STATS_ENABLED="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=100)
    assert out.returncode == 0 and out.stdout.strip() == "[1, 2]", out.stderr[-2000:]
