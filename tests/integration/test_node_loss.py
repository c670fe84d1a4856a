"""Nodes lost mid-job, on a multi-node Ray on one machine (``ray.cluster_utils.Cluster``; the driver
runs in a process of its own: tests/integration/node_loss.py):

* a worker node removed in the middle of rendering: the job finishes, every object is exactly once
  in the final manifest, and nothing half-written is visible (no temporaries, no orphan shards);
* a worker node removed in the middle of training: Ray Train restarts the worker group, which
  resumes from its last checkpoint (step 2) and ends at the configured step with the count intact.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from geco.data import shards

pytestmark = [pytest.mark.blender, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def test_nodes_lost_mid_render_and_mid_training(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.run([sys.executable, "-m", "tests.integration.node_loss", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(result)
    assert "errors" not in result, result["errors"]

    # render: the node went away after the first commit and before the last object
    assert 1 <= result["render_committed_when_lost"] < 8, result
    assert (result["render"]["rendered"], result["render"]["failed"]) == (8, 0), result
    data = tmp_path / "shards"
    manifest = shards.read_latest_manifest(str(data))
    keys = Counter(s["key"] for shard in manifest["shards"] for s in shard["samples"])
    assert sorted(keys) == [f"procedural-{i:04d}" for i in range(8)] and set(keys.values()) == {1}, keys
    assert manifest["orphans"] == [] and shards.committed_state(str(data))["orphans"] == []
    assert not [p for p in data.rglob("*") if ".tmp-" in p.name]  # nothing half-written visible
    assert {s["name"] for s in manifest["shards"]} == {p.name for p in data.glob("shard-*.tar")}

    # training: restarted from the step-2 checkpoint, finished at step 6
    assert result["train_lost_rank"] in (0, 1)
    assert (result["train"]["step"], result["train"]["resumed_from"]) == (6, 2), result
    assert (tmp_path / "pretrained" / "reconstructor" / "model.safetensors").is_file()
