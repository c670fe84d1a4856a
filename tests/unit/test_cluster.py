"""``init_ray("local")``: every socket of the Ray it starts listens on loopback, and Ray's own log
lines go to its log folder, not the console.

Ray starts in a fresh process (this one may already be connected to the session's test Ray), with
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` unset as for a person who runs ``geco`` without the Makefile.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = r"""
import json, psutil, ray
from pipelines.cluster import DRIVER_LOG, init_ray, ray_log_dir

init_ray("local")
me = psutil.Process()
pids = {me.pid} | {p.pid for p in me.children(recursive=True)}
listening = sorted({(c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name())
                    for c in psutil.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN and c.pid in pids})
print(json.dumps({"listening": listening, "logs": ray_log_dir(), "driver_log": DRIVER_LOG}))
ray.shutdown()
"""

LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def test_embedded_ray_listens_on_loopback_only_and_logs_to_its_folder():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    env.update(PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    names = {name for _, _, name in out["listening"]}
    assert {"gcs_server", "raylet"} <= names, out["listening"]  # the probe sees Ray's processes
    exposed = [s for s in out["listening"] if s[0] not in LOOPBACK]
    assert exposed == [], exposed
    # Ray's start-up notices went to the log file, not the console
    assert "Started a local Ray instance" not in proc.stderr, proc.stderr
    assert "Started a local Ray instance" in (Path(out["logs"]) / out["driver_log"]).read_text()


def test_a_cluster_that_cannot_be_joined_is_named(monkeypatch):
    import ray

    from pipelines.cluster import RayStartError, init_ray

    def refuse(**kwargs):
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(RayStartError, match=r"ray\.address=auto: cannot join Ray \(ConnectionError: Could not find "
                                            r"any running Ray instance.*\); start the cluster"):
        init_ray("auto")
