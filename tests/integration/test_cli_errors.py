"""Every ``geco`` command, given bad input, ends with exit status 2 and exactly one line on stderr
that names the input, never a traceback (the project's own ``WARNING: ...`` lines may precede it;
nothing from Ray may).

Each case runs the real command (``python -m cli``) in a fresh process, so what is checked is what
a person sees, Ray's console output included. All but one fail before Ray starts; the training
failure starts an embedded Ray (the dataset's samples cannot be decoded: the worker raises).
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_train_preflight import make_dataset

ROOT = Path(__file__).resolve().parents[2]


def geco(*argv: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
                **(env or {})}
    return subprocess.run([sys.executable, "-m", "cli", *argv], capture_output=True, text=True, env=full_env,
                          cwd=ROOT, timeout=timeout)


PROGRESS = re.compile(r"^[\w-]+ steps: +\d+%\|")  # a stage's tqdm bar (pipelines/training/progress.py)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_one_line(proc: subprocess.CompletedProcess, *names: str) -> None:
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err)
    assert "Traceback" not in err, err
    # the project's own warnings and progress bars are what a person should see; anything else is noise
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("WARNING: ") and not PROGRESS.match(ln)]
    assert len(lines) == 1 and lines[0].startswith("geco: "), err
    for name in names:
        assert name in lines[0], (name, err)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A good config (tiny, everything under one folder), a tiny checkpoint, a broken image."""
    tmp = tmp_path_factory.mktemp("cli-errors")
    data = make_dataset(tmp / "shards")
    cfg = tmp / "good.yaml"
    cfg.write_text(f"""
name: cli-errors
dataset: {{uri: {data}}}
tracking: {{uri: "sqlite:///{tmp / 'm.db'}", experiment: cli-errors}}
models:
  teacher: {{tile_size: 16, cond_size: 32}}
pretrain:
  targets: [teacher]
  output_uri: {tmp / 'pretrained'}
  teacher: {{steps: 2, max_failures: 0, cpus_per_worker: 0.5, storage_path: {tmp / 'train'}}}
""")
    (tmp / "invalid.yaml").write_text("name: [unclosed\n")
    (tmp / "broken.png").write_bytes(b"this is not a PNG")
    ckpt = tmp / "tiny-ckpt"
    proc = geco("models", "init-tiny", str(ckpt))
    assert proc.returncode == 0, proc.stderr
    return tmp


# (case, argv, the names the line must carry); {t} is the module's folder
CASES = [
    ("missing config", ["config", "-c", "{t}/nope.yaml"], ["{t}/nope.yaml"]),
    ("invalid yaml", ["render", "-c", "{t}/invalid.yaml"], ["{t}/invalid.yaml"]),
    ("unknown field", ["config", "-c", "{t}/good.yaml", "--set", "render.blender.samplez=3"], ["samplez"]),
    ("--set without =", ["train", "stage1", "--set", "stage1.train.steps"], ["stage1.train.steps"]),
    ("--set bad value", ["run", "-c", "{t}/good.yaml", "--set", "render.blender.samples=many"],
     ["render.blender.samples"]),
    ("bad --stages", ["run", "-c", "{t}/good.yaml", "--stages", "render,polish"], ["--stages", "polish"]),
    ("missing --source", ["render", "-c", "{t}/good.yaml", "--source", "{t}/no-objects"], ["{t}/no-objects"]),
    ("missing --data", ["train", "pretrain", "-c", "{t}/good.yaml", "--data", "{t}/no-shards"], ["{t}/no-shards"]),
    ("missing --checkpoint", ["generate", "{t}/broken.png", "--checkpoint", "{t}/no-ckpt", "-o", "{t}/out"],
     ["{t}/no-ckpt"]),
    ("missing image", ["generate", "{t}/none.png", "--checkpoint", "{t}/tiny-ckpt", "-o", "{t}/out"],
     ["{t}/none.png"]),
    ("unreadable image", ["generate", "{t}/broken.png", "--checkpoint", "{t}/tiny-ckpt", "-o", "{t}/out"],
     ["{t}/broken.png"]),
    ("missing bundle", ["models", "info", "{t}/no-ckpt"], ["{t}/no-ckpt"]),
    ("missing weights", ["weights", "verify", "{t}/no-weights"], ["{t}/no-weights"]),
    ("missing weights source", ["weights", "import", "{t}/no-src", "{t}/dest"], ["{t}/no-src"]),
    ("missing results folder", ["report", "{t}/no-results"], ["{t}/no-results"]),
]


@pytest.mark.parametrize("argv,names", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(work, argv, names):
    t = str(work)
    proc = geco(*[a.format(t=t) for a in argv])
    assert_one_line(proc, *[n.format(t=t) for n in names])


S3_CASES = [
    ("models info", ["models", "info", "s3://geco-nowhere/ckpt"]),
    ("generate --checkpoint", ["generate", "{t}/broken.png", "--checkpoint", "s3://geco-nowhere/ckpt", "-o", "{t}/out"]),
    ("train --data", ["train", "pretrain", "-c", "{t}/good.yaml", "--data", "s3://geco-nowhere/shards"]),
    ("render --output", ["render", "-c", "{t}/good.yaml", "--output", "s3://geco-nowhere/shards"]),
]


@pytest.mark.parametrize("argv", [c[1] for c in S3_CASES], ids=[c[0] for c in S3_CASES])
def test_unreachable_s3_endpoint(work, argv):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
           "AWS_DEFAULT_REGION": "us-east-1"}
    proc = geco(*[a.format(t=str(work)) for a in argv], env=env)
    assert_one_line(proc, endpoint)


@pytest.mark.slow
def test_training_failure(work):
    """The worker raises on every sample (bytes that are no image) and max_failures is 0: Ray Train
    raises a WorkerGroupError, which the command reports as one line naming the job and the logs."""
    proc = geco("train", "pretrain", "-c", str(work / "good.yaml"), timeout=900)  # Ray on a busy machine: minutes
    assert_one_line(proc, "pretrain", "training failed", "worker rank 0", "logs")
