"""jobs/: the `ray job submit` entry points are the `geco` commands joined to the cluster
(``ray.address=auto`` unless the user overrides it), one per DAG stage for free, and the runtime env
ships the source without local state or credentials."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

import jobs
from pipelines.dag import STAGES

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def calls(monkeypatch):
    seen: list[list[str]] = []
    monkeypatch.setattr(jobs, "geco", lambda argv: seen.append(list(argv)) or 0)
    return seen


@pytest.mark.parametrize("module, command", [("jobs.dag", ["run"]), ("jobs.render", ["render"]),
                                             ("jobs.retrain", ["retrain"])])
def test_each_entry_point_is_its_geco_command_joined_to_the_cluster(calls, module, command):
    assert importlib.import_module(module).main(["--config", "c.yaml", "--set", "a=1"]) == 0
    assert calls == [[*command, "--set", "ray.address=auto", "--config", "c.yaml", "--set", "a=1"]]


def test_every_dag_stage_has_a_job(calls):
    from jobs import stage

    for name in STAGES:
        assert stage.main([name, "--config", "c.yaml"]) == 0
    assert calls == [["run", "--stages", name, "--set", "ray.address=auto", "--config", "c.yaml"] for name in STAGES]


def test_a_stage_job_without_or_with_an_unknown_stage_fails_in_one_line(capsys):
    from jobs import stage

    assert stage.main(["--config", "configs/local.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "name the stage first, one of render," in err
    assert stage.main(["bogus", "--config", str(ROOT / "configs/local.yaml")]) == 2  # the real `geco run`
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--stages: unknown stage(s) bogus; valid stages, in order: render" in err


def test_a_job_joins_the_cluster_unless_told_otherwise(capsys):
    assert jobs.run(["config"], ["--config", str(ROOT / "configs/local.yaml")]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["ray"]["address"] == "auto"
    assert jobs.run(["config"], ["--config", str(ROOT / "configs/local.yaml"), "--set", "ray.address=ray://h:10001"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["ray"]["address"] == "ray://h:10001"


def test_the_runtime_env_ships_source_only():
    env = yaml.safe_load((ROOT / "jobs/runtime_env.yaml").read_text())
    assert set(env) == {"excludes", "env_vars"}  # no pip/conda: the image has the dependencies
    assert {".git", ".venv", "outputs", "mlruns.db", "mlartifacts"} <= set(env["excludes"])
    assert not any(k.startswith(("AWS_", "MLFLOW_TRACKING_")) for k in env["env_vars"])  # shown in the dashboard
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(working_dir=str(ROOT), **env)  # Ray accepts it as is
