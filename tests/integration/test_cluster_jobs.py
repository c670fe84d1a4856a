"""`ray job submit` to a real Ray head (`ray start --head` on 127.0.0.1, Ray's token auth on, its own
temp folder and ports: :class:`infra.stack.RayHead`), as the README's cluster commands run.

* a small render + train job (`python -m jobs.dag --stages render,pretrain`, shards on S3, MLflow on a
  real server): `ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml` follows its logs,
  the job SUCCEEDS, the shards and the trained models are where the config says, and the DAG's MLflow
  runs are FINISHED;
* a job whose stage fails ends FAILED, and its logs end with the stage's one-line error;
* without the cluster's token, the head refuses the submission.

The head is stopped in teardown always, through its process group and temp folder (never `ray stop`,
which would stop every Ray on the machine).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.integration.test_dag import MODELS, RENDER

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
JOB = {"steps": 2, "batch_size": 2, "log_every": 1, "cpus_per_worker": 0.5, "torch_threads": 1, "keep_checkpoints": 1,
       "max_failures": 1, "checkpoint_every": 2, "eval_every": 2}


@pytest.fixture(scope="module")
def ray_head(s3_server):
    from tests.services import RayHead

    temp = Path(tempfile.mkdtemp(prefix="geco-rh-", dir="/tmp"))  # short: Ray's socket paths live under it
    head = RayHead(temp, num_cpus=2, env=s3_server.env())  # the node's own S3 environment, as an instance role
    try:
        head.start()
        yield head
    finally:
        head.stop()


def submit(head, entrypoint: list[str], *, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- ENTRYPOINT`, waiting
    for the job and printing its logs (the default: it follows them)."""
    client_env = {**os.environ, **head.env(), **(env or {})}
    client_env.pop("PYTHONPATH", None)  # the job gets the source from --working-dir alone
    args = [RAY, "job", "submit", "--address", head.address, "--working-dir", ".",
            "--runtime-env", "jobs/runtime_env.yaml", "--submission-id", f"geco-test-{uuid.uuid4().hex[:8]}",
            "--", *entrypoint]
    return subprocess.run(args, cwd=ROOT, env=client_env, capture_output=True, text=True, timeout=timeout)


def job_status(head, submission_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head.address, headers={"Authorization": f"Bearer {head.token}"})
    return str(client.get_job_status(submission_id).value)


def submission_id(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    return out.split("Job '", 1)[1].split("'", 1)[0]


@pytest.mark.blender
def test_render_and_train_job_on_a_real_head(ray_head, s3_bucket, mlflow_server, tmp_path):
    import mlflow

    data = f"{s3_bucket}/shards"
    jobs = [f"{section}.{k}={v}" for section in ("pretrain.teacher", "pretrain.reconstructor")
            for k, v in {**JOB, "storage_path": tmp_path / "train"}.items()]
    overrides = [o for o in RENDER if not o.startswith("source.num_procedural")] + MODELS + jobs + [
        "source.num_procedural=4", f"dataset.uri={data}", f"cache.dir={tmp_path / 'cache'}",
        f"pretrain.output_uri={tmp_path / 'pretrained'}", "pretrain.concurrent=true", "pretrain.teacher.eval_steps=2",
        f"tracking.uri={mlflow_server.uri}", "tracking.experiment=test-cluster-jobs", "name=cluster-job"]
    entry = ["python", "-m", "jobs.dag", "--stages", "render,pretrain"]
    for o in overrides:
        entry += ["--set", o]
    proc = submit(ray_head, entry)
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-6000:]
    assert "render: 4 rendered, 0 skipped" in logs, logs[-6000:]  # the job's own output, followed
    assert f"Job '{submission_id(proc)}' succeeded" in logs
    assert job_status(ray_head, submission_id(proc)) == "SUCCEEDED"

    # outputs where the config says: shards + manifest on S3, the two models on the driver's disk
    from geco.data import shards

    manifest = shards.read_latest_manifest(data)
    assert manifest["num_objects"] == 4 and manifest["failures"]["count"] == 0
    assert (tmp_path / "pretrained" / "teacher").is_dir()
    assert (tmp_path / "pretrained" / "reconstructor" / "model.safetensors").is_file()

    client = mlflow.MlflowClient(tracking_uri=mlflow_server.uri)
    exp = client.get_experiment_by_name("test-cluster-jobs")
    (parent,) = client.search_runs([exp.experiment_id], "attributes.run_name = 'cluster-job/dag'")
    assert parent.info.status == "FINISHED"
    kids = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {r.data.tags["geco.stage"]: r.info.status for r in kids} == {"render": "FINISHED", "pretrain": "FINISHED"}
    assert parent.data.params["dag.stages"] == "render,pretrain"


def test_a_failing_stage_fails_the_job_with_its_one_line_error(ray_head, tmp_path):
    missing = tmp_path / "no-shards-here"
    proc = submit(ray_head, ["python", "-m", "jobs.stage", "pretrain", "--set", f"dataset.uri={missing}",
                             "--set", "tracking.enabled=false"], timeout=600)
    logs = proc.stdout + proc.stderr
    assert proc.returncode != 0, logs[-4000:]
    assert f"Job '{submission_id(proc)}' failed" in logs, logs[-4000:]
    assert job_status(ray_head, submission_id(proc)) == "FAILED"
    errors = {line for line in logs.splitlines() if line.startswith("geco: ")}  # followed, then in the status
    assert len(errors) == 1 and "stage pretrain failed" in min(errors) and str(missing) in min(errors), logs[-4000:]
    assert "Traceback" not in logs


def test_the_head_refuses_a_submission_without_its_token(ray_head):
    proc = submit(ray_head, ["python", "-c", "print('should not run')"], env={"RAY_AUTH_TOKEN": "not-the-token"},
                  timeout=120)
    assert proc.returncode != 0
    assert "should not run" not in proc.stdout
    assert "token" in (proc.stdout + proc.stderr).lower()
