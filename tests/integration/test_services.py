"""The test services are real servers: S3 over HTTP on loopback, reached through geco.storage."""
import pytest

from geco import storage

pytestmark = pytest.mark.s3


def test_s3_storage_roundtrip_and_atomic_commit(s3_bucket):
    uri = storage.join(s3_bucket, "a", "b.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"hello")
    assert storage.read_bytes(uri) == b"hello"
    assert storage.stat(uri)["size"] == 5
    assert storage.listdir(s3_bucket) == [uri]

    # A writer that fails midway leaves nothing visible.
    bad = storage.join(s3_bucket, "a", "broken.bin")
    with pytest.raises(ZeroDivisionError):
        with storage.atomic_writer(bad) as f:
            f.write(b"partial")
            raise ZeroDivisionError("killed mid-write")
    assert not storage.exists(bad)
    assert storage.listdir(s3_bucket) == [uri]


def test_local_atomic_commit(tmp_path):
    target = str(tmp_path / "x" / "out.bin")
    with pytest.raises(RuntimeError):
        with storage.atomic_writer(target) as f:
            f.write(b"partial")
            raise RuntimeError("killed")
    assert storage.listdir(str(tmp_path)) == []
    storage.write_bytes(target, b"whole")
    assert storage.read_bytes(target) == b"whole"


def test_unreachable_endpoint_fails_fast_with_a_clear_error(monkeypatch):
    from tests.services import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    storage._client.cache_clear()
    try:
        with pytest.raises(storage.StorageError, match="cannot reach S3 endpoint http://127.0.0.1"):
            storage.check_writable("s3://nowhere/prefix")
    finally:
        storage._client.cache_clear()


def test_missing_bucket_is_named(s3_env):
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket' does not exist"):
        storage.check_writable("s3://no-such-bucket/x")


def test_the_local_stack_serves_s3_and_mlflow_and_stops_on_ctrl_c(tmp_path):
    """`make stack` (python -m infra.stack): S3 with the bucket, MLflow with its artifacts on it, the
    variables to export printed; SIGINT stops every server it started."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    import mlflow

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "infra.stack", "--dir", str(tmp_path / "stack")], cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        env: dict[str, str] = {}
        deadline = time.monotonic() + 180
        while "MLFLOW_TRACKING_URI" not in env and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "the stack exited before it was up"
            if line.startswith("export "):
                k, v = line[len("export "):].strip().split("=", 1)
                env[k] = v
        assert urllib.request.urlopen(env["MLFLOW_TRACKING_URI"] + "/health", timeout=5).status == 200
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            storage._client.cache_clear()
            storage.write_text("s3://geco/hello.txt", "hi")
            assert storage.read_text("s3://geco/hello.txt") == "hi"
            client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
            run = client.create_run(client.create_experiment("stack-test"))
            (tmp_path / "a.txt").write_text("artifact")
            client.log_artifact(run.info.run_id, str(tmp_path / "a.txt"))
            assert [u for u in storage.listdir("s3://geco/mlartifacts") if u.endswith("/a.txt")]  # on the stack's S3
        storage._client.cache_clear()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)  # Ctrl-C
        code = proc.wait(timeout=120)
    assert code == 0
    import psutil

    left = [p for p in psutil.process_iter(["cmdline"]) if any(str(tmp_path / "stack") in a
                                                               for a in (p.info["cmdline"] or []))]
    assert left == [], left
