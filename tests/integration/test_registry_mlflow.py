"""The register stage and `geco register` against a real MLflow store: the local sqlite file, and an
`mlflow server` whose artifacts go to a real S3 server.

* a bundle becomes a version with its GSO metrics (version tags, the register run's metrics, its
  LoggedModel's metrics) and the aliases candidate + production; registering it again does nothing;
* a bundle a training run logged (`weights/bundle`) is registered from that run, without a copy;
* a regression keeps the old production version (and says why); a better bundle moves production;
  `geco generate --checkpoint models:/geco@production` follows the alias;
* bad input (a metrics file that is no JSON, a folder that is no bundle, an alias that does not
  exist) is one line with exit status 2;
* with AWS credentials in the environment, nothing secret lands in params, tags or artifacts.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli.main import main
from geco.config import load_config
from geco.models.bundle import init_tiny_bundle, read_manifest, resolve_checkpoint
from geco.tracking import start_run
from pipelines import register
from pipelines.stage import RegisterInputs

FAST = ["--turntable-frames", "0", "--device", "cpu"]
M1 = {"gso/zero123/psnr": 18.0, "gso/zero123/ssim": 0.80, "gso/zero123/lpips": None, "gso/orbit/cd": 0.05,
      "gso/orbit/fscore": 0.5, "gso/orbit/seconds_generate": 0.3}
WORSE = {**M1, "gso/zero123/psnr": 15.0}  # -17% PSNR
BETTER = {**M1, "gso/zero123/psnr": 19.0, "gso/orbit/cd": 0.04}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GECO_CACHE", str(tmp_path / "geco-cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    return {name: Path(init_tiny_bundle(root / name, seed=seed)) for seed, name in enumerate("abc")}


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    img = np.zeros((40, 40, 4), np.uint8)
    img[8:32, 10:30] = (200, 60, 30, 255)
    path = tmp_path_factory.mktemp("img") / "object.png"
    Image.fromarray(img).save(path)
    return path


def _cfg(tracking_uri: str, *extra: str):
    return load_config(None, [f"tracking.uri={tracking_uri}", "tracking.experiment=test-registry", "name=reg-test",
                              *extra])


def _bundle_id(path) -> str:
    return read_manifest(path)["bundle_id"]


def test_register_aliases_metrics_regression_and_generate_from_production(bundles, image, tmp_path, capsys):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _cfg(uri)
    client = MlflowClient(tracking_uri=uri)

    # the first registration: a copy in a LoggedModel, candidate and production
    r1 = register.run(cfg, RegisterInputs(str(bundles["a"]), metrics=M1, evaluate_run_id="eval123",
                                          lineage={"dataset_uri": "s3://data/shards"}))
    print(r1.summary())
    assert (r1.version, r1.aliases, r1.promoted) == ("1", ["candidate", "production"], True)
    assert r1.model_uri == "models:/geco/1" and "no production version yet" in r1.why
    assert r1.source.startswith("models:/m-")
    v1 = client.get_model_version("geco", "1")
    assert v1.tags["gso/zero123/psnr"] == "18.0" and "gso/zero123/lpips" not in v1.tags  # unavailable: left out
    assert v1.tags["geco.bundle_id"] == _bundle_id(bundles["a"]) and v1.tags["geco.evaluate_run_id"] == "eval123"
    assert v1.tags["geco.lineage.dataset_uri"] == "s3://data/shards" and v1.run_id == r1.mlflow_run_id
    run = client.get_run(r1.mlflow_run_id)
    gso = {k: v for k, v in M1.items() if v is not None}
    assert {k: run.data.metrics[k] for k in gso} == gso  # on the version's run
    assert run.data.tags["geco.registry.promoted"] == "true" and run.data.tags["geco.model_uri"] == "models:/geco/1"
    assert run.data.tags["geco.input.bundle"] == str(bundles["a"]) and run.data.tags["geco.git.commit"]
    model = client.get_logged_model(v1.tags["geco.logged_model_id"])
    assert {m.key: m.value for m in model.metrics} == gso  # and on its LoggedModel

    # the same bundle again: nothing to do, no new run
    again = register.run(cfg, RegisterInputs(str(bundles["a"]), metrics=M1))
    assert not again.did_work and again.version == "1" and again.promoted
    assert "nothing to do" in again.summary()
    exp = client.get_experiment_by_name("test-registry")
    assert len(client.search_runs([exp.experiment_id], "attributes.run_name = 'reg-test/register'")) == 1

    # a bundle a training run logged: registered from that run; it regressed, so production stays
    with start_run(cfg.tracking, "reg-test/stage1") as tracker:
        tracker.log_artifacts(bundles["b"], "weights/bundle")
    r2 = register.run(cfg, RegisterInputs(str(bundles["b"]), metrics=WORSE,
                                          lineage={"bundle_run_id": tracker.run_id}))
    print(r2.summary())
    assert (r2.version, r2.aliases, r2.promoted) == ("2", ["candidate"], False)
    assert r2.source == f"runs:/{tracker.run_id}/weights/bundle"
    v2 = client.get_model_version("geco", "2")  # its run: the one holding the files; the register run in a tag
    assert v2.run_id == tracker.run_id and v2.tags["geco.register_run_id"] == r2.mlflow_run_id
    assert "gso/zero123/psnr 15 < 18" in r2.why and "production stays" in r2.why
    assert client.get_run(r2.mlflow_run_id).data.tags["geco.registry.why"] == r2.why
    assert str(client.get_model_version_by_alias("geco", "production").version) == "1"
    assert _bundle_id(resolve_checkpoint("models:/geco/2", tracking_uri=uri)) == _bundle_id(bundles["b"])

    # `geco register` with an evaluation summary: better, so production moves
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"metrics": {"stage1": BETTER, "teacher": M1}}))
    sets = ["--set", f"tracking.uri={uri}", "--set", "tracking.experiment=test-registry", "--set", "name=reg-test"]
    capsys.readouterr()
    assert main(["register", str(bundles["c"]), "--metrics", str(summary), "--model", "stage1", *sets]) == 0
    out = capsys.readouterr().out
    assert "models:/geco/3" in out and "production: this version" in out, out
    assert str(client.get_model_version_by_alias("geco", "production").version) == "3"
    assert str(client.get_model_version_by_alias("geco", "candidate").version) == "3"

    # generate follows the production alias (the project's default store when none is given: see below)
    gen = tmp_path / "gen"
    assert main(["generate", str(image), "--checkpoint", "models:/geco@production", "-o", str(gen),
                 "--tracking-uri", uri, *FAST]) == 0
    assert (gen / "object.ply").is_file()
    assert _bundle_id(resolve_checkpoint("models:/geco@production", tracking_uri=uri)) == _bundle_id(bundles["c"])

    # new metrics for a registered bundle update its version (no new version)
    r4 = register.run(cfg, RegisterInputs(str(bundles["a"]), metrics={**M1, "gso/orbit/cd": 0.045}))
    assert r4.version == "1" and r4.did_work and r4.aliases == ["candidate"]  # 1's metrics still below 3's
    assert client.get_model_version("geco", "1").tags["gso/orbit/cd"] == "0.045"

    # bad input: one line, exit 2, nothing registered
    capsys.readouterr()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["register", str(bundles["c"]), "--metrics", str(bad), *sets]) == 2
    err = capsys.readouterr().err
    assert err.startswith("geco: --metrics") and err.count("\n") == 1, err
    assert main(["register", str(bundles["c"]), "--metrics", str(summary), *sets]) == 2  # two models: which?
    assert "--model" in capsys.readouterr().err
    assert main(["register", str(tmp_path), *sets]) == 2
    err = capsys.readouterr().err
    assert "not a GECO checkpoint" in err and err.count("\n") == 1, err
    assert main(["generate", str(image), "--checkpoint", "models:/geco@staging", "-o", str(gen),
                 "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "models:/geco@staging" in err and err.count("\n") == 1, err
    assert len(client.search_model_versions("name = 'geco'")) == 3


def test_default_store_is_the_projects(bundles, image, tmp_path, monkeypatch):
    """`geco generate --checkpoint models:/geco@production` with no tracking URI anywhere reads the
    project's default store (tracking.uri: sqlite:///mlruns.db in the working directory)."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["tracking.experiment=test-registry", "name=reg-test"])
    assert cfg.tracking.uri == "sqlite:///mlruns.db"
    assert register.run(cfg, RegisterInputs(str(bundles["a"]))).promoted  # no metrics, no production: promoted
    assert main(["generate", str(image), "--checkpoint", "models:/geco@production", "-o", "gen", *FAST]) == 0
    assert (tmp_path / "gen" / "object.ply").is_file()


@pytest.mark.s3
@pytest.mark.slow
def test_server_with_s3_artifacts_keeps_no_secret(bundles, image, s3_bucket, tmp_path, monkeypatch):
    """A real `mlflow server` storing artifacts in S3; the bundle comes from S3 too. With the AWS
    credentials in the environment, none of them (nor the names of secret variables: no environment
    dumps) is found in any param, tag, metric name or artifact."""
    from geco import storage
    from tests.services import SECRET_KEY, MLflowServer, mlflow_secrets

    canary = "geco-canary-8d1f0c2b9e"  # a secret-looking variable nobody should log
    monkeypatch.setenv("GECO_TEST_API_TOKEN", canary)
    # the server inherits this environment: the AWS variables s3_bucket set, for its S3 artifact store
    server = MLflowServer(tmp_path / "mlflow", artifacts=storage.join(s3_bucket, "mlartifacts")).start()
    try:
        bundle = storage.join(s3_bucket, "bundles", "a")
        assert main(["models", "init-tiny", bundle]) == 0
        cfg = _cfg(server.uri)
        out = register.run(cfg, RegisterInputs(bundle, metrics=M1))
        assert out.promoted and out.source.startswith("models:/m-")
        stored = storage.listdir(storage.join(s3_bucket, "mlartifacts"))
        assert any(f.endswith("/geco.json") for f in stored), stored[:5]  # the registered copy is in S3
        # a bundle a training run logged: registered from the run (a server checks that source)
        with start_run(cfg.tracking, "reg-test/stage1") as tracker:
            tracker.log_artifacts(bundles["b"], "weights/bundle")
        logged = register.run(cfg, RegisterInputs(str(bundles["b"]), metrics=WORSE,
                                                  lineage={"bundle_run_id": tracker.run_id}))
        assert logged.source == f"runs:/{tracker.run_id}/weights/bundle" and not logged.promoted
        gen = tmp_path / "gen"
        for checkpoint in ("models:/geco@production", "models:/geco@candidate"):
            assert main(["generate", str(image), "--checkpoint", checkpoint, "-o", str(gen),
                         "--tracking-uri", server.uri, *FAST]) == 0
            assert (gen / "object.ply").is_file()
        needles = [SECRET_KEY, canary, "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "GECO_TEST_API_TOKEN"]
        assert mlflow_secrets(server.uri, needles, tmp_path / "scan") == []
        # the scan does find one where it is: a tag and an artifact holding the canary
        with start_run(cfg.tracking, "reg-test/leaky") as leaky:
            leaky.set_tags({"token": canary})
            leaky.log_text(f"GECO_TEST_API_TOKEN={canary}", "env.txt")
        found = mlflow_secrets(server.uri, needles, tmp_path / "scan2")
        assert len(found) == 3 and all(leaky.run_id in f for f in found), found
    finally:
        server.stop()
