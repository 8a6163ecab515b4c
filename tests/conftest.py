"""Shared fixtures: one embedded Ray per test session, one local static file server.

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
