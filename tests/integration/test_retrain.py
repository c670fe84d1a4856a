"""`geco retrain` end to end on a tiny config: real Blender, a local Ray, a real MLflow server.

* an overlapping run (another holder of the dataset's retrain lease) exits cleanly, naming the
  holder and the expiry, and writes nothing; with no production model there is nothing to continue
  from: one line, exit 2;
* after a first DAG run made production version 1, two objects added to the source: the retraining
  renders exactly those two into a new manifest version that keeps the old shards, continues stage 1
  from production's generator, makes pseudo-GT for the two new objects only, runs stage 2,
  evaluates, registers version 2 and moves production to it (nothing regressed), all in one
  `<name>/retrain` MLflow run; run again at once, it has nothing to do;
* a regression (production's recorded metrics far better than anything the candidate can reach)
  keeps production where it is: the candidate is registered, the run says why, exit status 3.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from geco.config import load_config
from geco.data import shards
from geco.lease import Lease, lease_uri
from geco.registry import metric_tags, metrics_from_tags
from tests.console import own_lines
from tests.integration.test_dag import tiny_overrides

pytestmark = [pytest.mark.blender, pytest.mark.slow]

STAGES = ["render", "stage1", "pseudo_gt", "stage2", "evaluate", "register"]  # the teacher is tiny: no pretrain
MODEL = "geco-retrain-test"


def _config(tmp_path: Path, tracking_uri: str, objects: int, *extra: str) -> Path:
    over = tiny_overrides(tmp_path, tracking_uri) + [
        f"source.num_procedural={objects}", "models.teacher.pretrained=tiny", "name=retrain-test",
        "tracking.experiment=test-retrain", f"registry.model_name={MODEL}", f"retrain.output_uri={tmp_path / 'retrain'}",
        f"retrain.stages=[{','.join(STAGES)}]", *extra]
    path = tmp_path / f"retrain-{objects}.yaml"
    path.write_text(yaml.safe_dump(load_config(None, over).model_dump(mode="json")))
    return path


def _retrain(capsys, conf: Path) -> tuple[int, str, list[str]]:
    from cli.main import main

    capsys.readouterr()
    rc = main(["retrain", "--config", str(conf)])
    out, err = capsys.readouterr()
    return rc, out, own_lines(err)


def test_retrain_renders_what_was_added_guards_production_and_refuses_overlap(tmp_path, ray_local, mlflow_server,
                                                                              monkeypatch, capsys):
    import mlflow

    from cli.main import main
    from pipelines import retrain

    monkeypatch.setenv("GECO_CACHE", str(tmp_path / "geco-cache"))
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.uri)
    data = str(tmp_path / "shards")
    first = _config(tmp_path, mlflow_server.uri, 6)

    # an overlapping run: refused cleanly, nothing written
    with Lease(lease_uri(data, "retrain"), holder="nightly@other-host pid 7 (geco retrain)"):
        rc, out, err = _retrain(capsys, first)
    assert rc == 0, err
    assert "skipped" in out and "held by nightly@other-host pid 7 (geco retrain) until" in out, out
    assert shards.read_latest_manifest(data) is None
    # no production model: nothing to continue from
    rc, out, err = _retrain(capsys, first)
    assert rc == 2 and len(err) == 1 and f"no models:/{MODEL}@production to continue from" in err[0], err

    # version 1: a first DAG run on six objects
    assert main(["run", "--config", str(first), "--stages", ",".join(STAGES)]) == 0
    v1 = client.get_model_version_by_alias(MODEL, "production")
    manifest_v1 = shards.read_latest_manifest(data)
    assert v1.tags[retrain.TRAINED_ON_TAG] == shards.manifest_uri(data, manifest_v1["version"])

    # two objects added: exactly those render, training continues from version 1, production moves
    # (registry.tolerance: any candidate counts as no regression here, so production moves whatever tiny
    # models score; the rule itself is the last part's, and geco.registry's unit tests')
    second = load_config(_config(tmp_path, mlflow_server.uri, 8, "registry.tolerance=1000"))
    result = retrain.run(second)
    print(result.summary())
    changes = result.changes
    assert [r.object_id for r in changes.added] == ["procedural-0006", "procedural-0007"] and not changes.changed
    assert (result.dag["render"].rendered, result.dag["render"].skipped, result.dag["render"].failed) == (2, 6, 0)
    manifest = shards.read_latest_manifest(data)
    old_shards = {s["name"] for s in manifest_v1["shards"]}
    assert manifest["version"] > manifest_v1["version"] and old_shards < {s["name"] for s in manifest["shards"]}
    s1, s2, pgt = result.dag["stage1"], result.dag["stage2"], result.dag["pseudo_gt"]
    assert s1.result.step == 4 and not s1.result.already_complete
    assert s1.bundle_uri.startswith(str(tmp_path / "retrain" / f"from-v{v1.version}-"))
    # pseudo-GT for the new objects only (the same teacher and reconstructor: the rest is done); stage 2
    # fine-tunes this run's stage-1 bundle, and its bundle is the one registered
    assert (pgt.computed, pgt.skipped, pgt.failed) == (2, 6, 0)
    assert s2.result.step == 4 and s2.bundle_uri.startswith(str(tmp_path / "retrain" / f"from-v{v1.version}-"))
    assert {"stage1", "stage2"} <= set(result.dag["evaluate"].metrics)
    assert result.promoted and result.exit_status == 0 and result.production_version == str(v1.version)
    v2 = client.get_model_version_by_alias(MODEL, "production")
    assert int(v2.version) == int(v1.version) + 1 and result.model_uri == f"models:/{MODEL}/{v2.version}"
    assert v2.tags[retrain.TRAINED_ON_TAG] == shards.manifest_uri(data, manifest["version"])
    run = client.get_run(result.mlflow_run_id)
    assert run.info.run_name == "retrain-test/retrain" and run.info.status == "FINISHED"
    tags = run.data.tags
    assert (tags["geco.retrain.from_version"], tags["geco.retrain.added"], tags["geco.retrain.promoted"]) == (
        str(v1.version), "2", "true")
    # the generator stage 1 started from is production's (version 1's bundle, from the registry)
    stage1_run = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}' "
                                                              "and tags.`geco.stage` = 'stage1'")[0]
    assert stage1_run.data.params["models.generator.pretrained"].endswith("/generator")

    # run again at once: nothing changed, production was trained on the latest dataset version
    rc, out, err = _retrain(capsys, _config(tmp_path, mlflow_server.uri, 8))
    assert rc == 0 and "nothing to do" in out and f"version {v2.version}" in out, out

    # a regression: production's recorded metrics are out of reach; one more object
    better = {k: (v + 100.0 if k.endswith(("psnr", "ssim", "viou", "fscore")) else v / 100.0)
              for k, v in metrics_from_tags(v2.tags).items()}
    assert better, v2.tags
    for k, v in metric_tags(better).items():
        client.set_model_version_tag(MODEL, v2.version, k, v)
    rc, out, err = _retrain(capsys, _config(tmp_path, mlflow_server.uri, 9))
    assert rc == retrain.KEPT, (out, err)
    assert "production stays" in out and "regressed beyond registry.tolerance" in out, out
    assert client.get_model_version_by_alias(MODEL, "production").version == v2.version
    candidate = client.get_model_version_by_alias(MODEL, "candidate")
    assert int(candidate.version) == int(v2.version) + 1
