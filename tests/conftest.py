"""Shared fixtures: one embedded Ray per test session, one local static file server, one
local S3 server (moto).

Tests never touch the network beyond loopback.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
# Ray workers unpickle functions defined in test modules by name: let them import those modules.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [TESTS, REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)


@pytest.fixture(scope="session")
def ray_session():
    """An embedded 2-CPU Ray shared by every test that needs one."""
    from wit_builder import parallel

    parallel.init(num_cpus=2)
    yield
    parallel.shutdown()


@pytest.fixture(scope="session")
def ray_cluster():
    """A 3-node Ray cluster on 127.0.0.1 (head + 2 workers, `ray start --block` processes, one
    CPU each, token auth), shared by the tests that need one and stopped by its PIDs; see
    tests/raycluster.py. `ray_cluster.client_env()` is the environment a client needs."""
    from raycluster import LocalRayCluster

    with LocalRayCluster(workers=2) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def static_server(tmp_path_factory):
    """Serve a temporary directory over HTTP on 127.0.0.1; yields (base_url, directory)."""
    from wit_builder.demo_server import serve_directory

    root = tmp_path_factory.mktemp("www")
    server = serve_directory(str(root))
    yield server.base_url, str(root)
    server.stop()


@pytest.fixture
def one_torch_thread():
    """Tiny models on a shared 2-core machine run many times faster on one thread."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3 server (moto's, in a thread of this process) on 127.0.0.1 at a free port; yields
    its endpoint URL. While it runs, this process's environment holds test credentials and
    AWS_ENDPOINT_URL (and no AWS profile or config file), so s3fs here, `wit-build`
    subprocesses and the Ray workers they start reach it; a Ray started before this fixture
    does not (its workers' environment was fixed then). Afterwards the environment is restored
    and the server stopped by its handle. Skipped without s3fs and moto[server] (`.[dev]`)."""
    import logging

    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import fsspec

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # never probe an instance-metadata service
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    unset = ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_REGION")
    saved = {k: os.environ.get(k) for k in (*env, *unset)}
    os.environ.update(env)
    for k in unset:
        os.environ.pop(k, None)
    fsspec.get_filesystem_class("s3").clear_instance_cache()  # none made before with other settings
    try:
        yield endpoint
    finally:
        fsspec.get_filesystem_class("s3").clear_instance_cache()  # none left pointing at a stopped server
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
        if server._server is not None:
            server._server.server_close()  # stop() leaves the listening socket open
