"""`ray job submit` entry points: each runs a `geco` command on the cluster's driver.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python -m jobs.dag --config configs/paper.yaml            # the whole DAG
        -- python -m jobs.stage STAGE --config ...                   # one stage of pipelines.dag.STAGES
        -- python -m jobs.render --config ... [--force]              # geco render (its own options)
        -- python -m jobs.retrain --config ...                       # geco retrain (scheduled retraining)

Thin on purpose: the command line is the `geco` one (same options, same one-line errors and exit
status 2), with one difference: a job always joins the cluster it was submitted to
(``--set ray.address=auto`` comes first, so a later ``--set ray.address=...`` still wins).
"""
from __future__ import annotations

from cli.main import main as geco

JOIN_CLUSTER = ["--set", "ray.address=auto"]  # a job's driver runs inside the cluster (RAY_ADDRESS is set)


def run(command: list[str], argv: list[str]) -> int:
    """``geco <command> --set ray.address=auto <argv>``; returns its exit status."""
    return geco([*command, *JOIN_CLUSTER, *argv])
