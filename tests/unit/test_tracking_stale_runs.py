"""A killed driver's MLflow runs do not stay RUNNING: the next run of the same name ends them as
KILLED when their owner is gone, and only then (a real sqlite store; a real killed process)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from geco.config import TrackingConfig
from geco.tracking import OWNER_TAG, owner, start_run

ROOT = Path(__file__).resolve().parents[2]
NAME = "demo/render"


def test_runs_whose_owner_is_gone_are_marked_killed(tmp_path):
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'm.db'}", experiment="stale", stale_run_hours=1)
    # a driver killed inside its run (os._exit: no clean-up, as with SIGKILL)
    code = ("import os, sys; from geco.config import TrackingConfig; from geco.tracking import start_run\n"
            f"cfg = TrackingConfig.model_validate_json({cfg.model_dump_json()!r})\n"
            f"with start_run(cfg, {NAME!r}) as t:\n    print(t.run_id, flush=True); os._exit(9)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 9, proc.stderr
    killed_driver = proc.stdout.split()[-1]

    mlflow.set_tracking_uri(cfg.uri)
    client = MlflowClient()
    exp = client.get_experiment_by_name("stale").experiment_id
    assert client.get_run(killed_driver).info.status == "RUNNING"
    assert client.get_run(killed_driver).data.tags[OWNER_TAG].startswith(f"{socket.gethostname()}:")
    now_ms = int(time.time() * 1000)

    def running(tag: str | None, hours_ago: float = 0.0, name: str = NAME) -> str:
        tags = {OWNER_TAG: tag} if tag is not None else {}
        return client.create_run(exp, start_time=now_ms - int(hours_ago * 3600e3), tags=tags, run_name=name).info.run_id

    host = socket.gethostname()
    runs = {
        "killed driver": (killed_driver, "KILLED"),
        "alive (this process)": (running(owner()), "RUNNING"),
        "pid reused by another process": (running(f"{host}:{os.getpid()}:1"), "KILLED"),
        "another host, recent": (running("elsewhere:123:456", hours_ago=0.5), "RUNNING"),
        "another host, old": (running("elsewhere:123:456", hours_ago=2), "KILLED"),
        "no owner tag, old": (running(None, hours_ago=2), "KILLED"),
        "another name, gone": (running(f"{host}:{2**22 + 7}:1", name="demo/stage1"), "RUNNING"),
    }
    with start_run(cfg, NAME) as tracker:
        new = client.get_run(tracker.run_id)
        assert new.info.status == "RUNNING" and new.data.tags[OWNER_TAG] == owner()
        got = {case: client.get_run(run_id).info.status for case, (run_id, _) in runs.items()}
        assert got == {case: status for case, (_, status) in runs.items()}
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


def test_other_hosts_runs_are_left_alone_by_default(tmp_path):
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'm.db'}", experiment="stale")
    assert cfg.stale_run_hours == 0
    mlflow.set_tracking_uri(cfg.uri)
    client = MlflowClient()
    exp = client.create_experiment("stale", artifact_location=(tmp_path / "a").as_uri())
    old = int(time.time() * 1000) - 30 * 24 * 3600 * 1000
    other = client.create_run(exp, start_time=old, tags={OWNER_TAG: "elsewhere:1:1"}, run_name=NAME).info.run_id
    untagged = client.create_run(exp, start_time=old, run_name=NAME).info.run_id
    with start_run(cfg, NAME):
        pass
    assert client.get_run(other).info.status == "RUNNING" and client.get_run(untagged).info.status == "RUNNING"
