"""Shared fixtures: real services on 127.0.0.1, started by the tests and stopped by PID.

- ``s3_server`` (session): a SeaweedFS S3 server; ``s3_bucket``: a fresh bucket per test, with the
  standard AWS environment variables pointing at the server for the duration of the test.
- ``ray_local`` (session): ``ray.init(address="local")`` with 2 CPUs.
- ``mlflow_server`` (session): a real ``mlflow server`` (sqlite + local artifact store).
"""
from __future__ import annotations

import os
import uuid

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GECO_OFFLINE", "1")  # LPIPS and weights never try a download in tests
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Tiny models: one torch thread. On a loaded 2-core machine OpenMP threads spin-wait on each
# other and tiny ops get ~30x slower; one thread loses nothing at these sizes.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads (see OMP_NUM_THREADS above); this also
    covers a torch imported before the environment variable was read."""
    try:
        import torch
    except ImportError:
        yield
        return
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    from tests.services import SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The standard AWS variables pointing at the local server, for this test only."""
    from geco import storage

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    storage._client.cache_clear()
    yield s3_server
    storage._client.cache_clear()


@pytest.fixture
def s3_bucket(s3_env):
    """A fresh, empty bucket: ``s3://geco-test-<random>``."""
    return s3_env.create_bucket(f"geco-test-{uuid.uuid4().hex[:10]}")


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A local Ray whose workers see the local S3 endpoint in their environment, as the nodes of
    a cluster see theirs (the standard AWS variables, never passed through configs)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True,
             ignore_reinit_error=True, runtime_env={"env_vars": s3_server.env()})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    from tests.services import MLflowServer

    server = MLflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server
    server.stop()
