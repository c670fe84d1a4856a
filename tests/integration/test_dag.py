"""The DAG end to end (`geco run`): render -> pretrain -> stage1 -> pseudo_gt -> stage2 -> evaluate ->
register on a tiny config, real Blender, a local Ray and a real MLflow server.

* one parent run `<name>/dag` with the stages as child runs (pretrain's per-model runs under
  pretrain's), per-stage seconds and a stage table on the parent, the final bundle URI as a tag;
  the bundle works with `geco generate`;
* every run carries the lineage tags (git commit, config hash, manifest URI and hash, input URIs);
  the final bundle is registered (candidate + production) and `geco generate --checkpoint
  models:/geco@production` works; with AWS credentials in the environment, nothing secret is logged;
* a second `geco run` does no work: render and pseudo_gt have nothing to do (and open no MLflow run),
  every training job is already complete;
* an unknown stage name is refused (exit 2) before any work; a failing stage marks the parent run
  FAILED and the error names the stage.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from geco.config import load_config

pytestmark = [pytest.mark.blender, pytest.mark.slow]

# the tiny sizes of test_stage1.py: 8 procedural objects, procedural-0005 and -0007 in the val split
RENDER = ["source.kind=procedural", "source.num_procedural=8", "render.cond.resolution=32",
          "render.zero123.resolution=32", "render.random.count=1", "render.random.resolution=32",
          "render.blender.samples=4", "render.blender.threads=1", "dataset.samples_per_shard=4",
          "dataset.val_fraction=0.52", "ray.num_renderers=2", "ray.cpus_per_renderer=0.5"]
MODELS = ["models.teacher.tile_size=16", "models.teacher.cond_size=32",
          "models.reconstructor.input_size=16", "models.reconstructor.lgm.down_channels=[8,16,32]",
          "models.reconstructor.lgm.down_attention=[false,false,true]", "models.reconstructor.lgm.up_channels=[32,16]",
          "models.reconstructor.lgm.up_attention=[true,false]", "models.reconstructor.lgm.num_heads=2",
          "models.reconstructor.lgm.norm_groups=4", "models.reconstructor.lgm.layers_per_block=1"]
JOB = {"steps": 4, "batch_size": 2, "log_every": 1, "cpus_per_worker": 0.5, "torch_threads": 1, "keep_checkpoints": 2,
       "max_failures": 1, "checkpoint_every": 2, "eval_every": 2, "eval_objects": 2}


def tiny_overrides(tmp_path: Path, tracking_uri: str) -> list[str]:
    jobs = [f"{section}.{k}={v}" for section in ("pretrain.teacher", "pretrain.reconstructor", "stage1.train", "stage2.train")
            for k, v in {**JOB, "storage_path": tmp_path / "train"}.items()]
    return RENDER + MODELS + jobs + [
        f"dataset.uri={tmp_path / 'shards'}", f"cache.dir={tmp_path / 'cache'}",
        f"pretrain.output_uri={tmp_path / 'pretrained'}", "pretrain.concurrent=true", "pretrain.teacher.eval_steps=2",
        f"stage1.output_uri={tmp_path / 'stage1'}", f"stage2.output_uri={tmp_path / 'stage2'}", "stage2.views_per_step=2",
        f"pseudo_gt.output_uri={tmp_path / 'pseudo_gt'}",
        "pseudo_gt.steps=2", "pseudo_gt.num_views=8", "pseudo_gt.resolution=16", "pseudo_gt.batch_size=4",
        "pseudo_gt.cpus_per_actor=0.5", "pseudo_gt.torch_threads=1",
        "stage1.lr_generator=1e-3", "stage1.lr_fake=2e-3", "stage1.eval_teacher_steps=2", "stage1.lora_rank=2",
        f"tracking.uri={tracking_uri}", "tracking.experiment=test-dag", "name=dag-test",
        f"evaluate.output_uri={tmp_path / 'evaluate'}", "evaluate.demo_objects=1", "evaluate.resolution=32",
        "evaluate.input_resolution=32", "evaluate.geometry_resolution=32", "evaluate.orbit_views=4",
        "evaluate.geometry_views=4", "evaluate.teacher_steps=2", "evaluate.turntable_frames=0", "evaluate.num_cpus=0.5"]


def runs_named(client, name: str):
    exp = client.get_experiment_by_name("test-dag")
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'",
                              order_by=["attributes.start_time ASC"])


def children(client, parent) -> dict[str, object]:
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return {r.data.tags["geco.stage"]: r for r in runs}


def stage_table(client, run, tmp_path: Path) -> dict[str, dict]:
    path = client.download_artifacts(run.info.run_id, "stages.json", str(tmp_path / f"table-{run.info.run_id}"))
    table = json.loads(Path(path).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    return {r["stage"]: r for r in rows}


def test_dag_runs_tracks_reruns_for_free_and_refuses_bad_stages(tmp_path, ray_local, mlflow_server, monkeypatch,
                                                                 capsys, s3_env):
    import mlflow

    from cli.main import main
    from pipelines import dag

    monkeypatch.setenv("GECO_CACHE", str(tmp_path / "geco-cache"))
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.uri)
    cfg = load_config(None, tiny_overrides(tmp_path, mlflow_server.uri))

    # an unknown stage: refused before any work (no config read, no run, no output)
    conf = tmp_path / "dag.yaml"
    conf.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    capsys.readouterr()
    assert main(["run", "--config", str(conf), "--stages", "render,stage3"]) == 2
    err = capsys.readouterr().err
    assert "stage3" in err and "render, pretrain, stage1" in err, err
    assert not (tmp_path / "shards").exists() and runs_named(client, "dag-test/dag") == []

    # the first run does everything
    first = dag.run(cfg)
    print(first.summary())
    assert list(first.stages) == ["render", "pretrain", "stage1", "pseudo_gt", "stage2", "evaluate", "register"]
    assert first.did_work == dict.fromkeys(first.stages, True)
    assert first["render"].rendered == 8 and first["render"].failed == 0
    assert set(first["pretrain"].results) == {"teacher", "reconstructor"}
    assert all(r.step == 4 and not r.already_complete for r in first["pretrain"].results.values())
    s1 = first["stage1"]
    assert s1.result.step == 4 and not s1.result.already_complete
    # models.*.pretrained are "" (no weights): the DAG feeds stage 1 what pretrain trained, as its inputs
    assert s1.teacher_uri == str(tmp_path / "pretrained" / "teacher")
    assert s1.reconstructor_uri == str(tmp_path / "pretrained" / "reconstructor" / "model.safetensors")
    assert s1.bundle_uri == str(tmp_path / "stage1" / "bundle") and Path(s1.bundle_uri, "geco.json").is_file()
    # pseudo_gt runs the teacher and reconstructor stage 1 used, over every rendered object
    pgt = first["pseudo_gt"]
    assert (pgt.teacher_uri, pgt.reconstructor_uri) == (s1.teacher_uri, s1.reconstructor_uri)
    assert pgt.computed == 8 and pgt.failed == 0 and pgt.pseudo_gt_uri == str(tmp_path / "pseudo_gt")
    # stage 2 fine-tunes stage 1's bundle on the pseudo-GT; its bundle is the DAG's final one
    s2 = first["stage2"]
    assert s2.result.step == 4 and not s2.result.already_complete
    assert first.bundle_uri == s2.bundle_uri == str(tmp_path / "stage2" / "bundle")
    assert Path(first.bundle_uri, "geco.json").is_file()
    summary = first.summary()
    assert f"geco generate IMAGE --checkpoint {first.bundle_uri}" in summary
    # evaluate: both stages' bundles and the teacher stage 1 distilled, on a procedural GSO-layout object
    ev = first["evaluate"]
    assert set(ev.metrics) == {"teacher", "teacher_1step", "stage1", "stage2"} and ev.primary == "stage2"
    assert ev.leakage["clean"] and ev.metrics["stage1"]["gso/orbit/psnr"] > 0
    assert f"evaluation: {ev.uris.get('report') or ev.uris['results']}" in summary
    assert all(f"  {s} " in summary for s in dag.STAGES)

    # MLflow: one parent run, the stages as its children, pretrain's models under pretrain
    parent = client.get_run(first.mlflow_run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "dag-test/dag"
    assert parent.data.tags["geco.bundle_uri"] == first.bundle_uri
    assert {f"seconds/{s}" for s in dag.STAGES} | {"seconds"} <= set(parent.data.metrics)
    kids = children(client, parent)
    assert set(kids) == {"render", "pretrain", "stage1", "pseudo_gt", "stage2", "evaluate", "register"}
    assert kids["evaluate"].data.metrics["gso/orbit/psnr"] == pytest.approx(ev.metrics["stage2"]["gso/orbit/psnr"])
    assert all(r.info.status == "FINISHED" for r in kids.values())
    assert kids["render"].data.metrics["rendered"] == 8
    grandkids = children(client, kids["pretrain"])
    assert set(grandkids) == {"pretrain/teacher", "pretrain/reconstructor"}
    assert kids["stage1"].data.tags["geco.bundle_uri"] == s1.bundle_uri
    table = stage_table(client, parent, tmp_path)
    assert [table[s]["status"] for s in dag.STAGES] == ["done"] * len(dag.STAGES)
    assert json.loads(table["stage1"]["outputs"])["bundle"] == s1.bundle_uri
    assert json.loads(table["stage2"]["outputs"])["bundle"] == first.bundle_uri
    assert json.loads(table["pretrain"]["mlflow_runs"]) == {
        "pretrain": kids["pretrain"].info.run_id, "pretrain/teacher": grandkids["pretrain/teacher"].info.run_id,
        "pretrain/reconstructor": grandkids["pretrain/reconstructor"].info.run_id}
    assert json.loads(table["render"]["mlflow_runs"]) == {"render": kids["render"].info.run_id}

    # lineage on every run: the same code and config; the data and input weights each run used
    from geco.data import shards
    from geco.tracking import config_hash, git_state

    manifest = shards.manifest_uri(str(tmp_path / "shards"), shards.list_manifest_versions(str(tmp_path / "shards"))[-1])
    digest = hashlib.sha256(Path(manifest).read_bytes()).hexdigest()
    for run in [parent, *kids.values(), *grandkids.values()]:
        tags = run.data.tags
        assert (tags["geco.git.commit"], tags["geco.git.dirty"]) == git_state(), run.info.run_name
        assert tags["geco.config_hash"] == config_hash(cfg), run.info.run_name
    for run in (kids["pretrain"], kids["stage1"], *grandkids.values()):  # the manifest they trained on
        assert (run.data.tags["geco.dataset.manifest_uri"], run.data.tags["geco.dataset.manifest_hash"]) == (manifest, digest)
    assert kids["render"].data.tags["geco.dataset.manifest_uri"] == "none"  # the first render found none
    assert kids["stage1"].data.tags["geco.input.teacher"] == s1.teacher_uri
    assert kids["stage1"].data.tags["geco.input.reconstructor"] == s1.reconstructor_uri
    assert kids["register"].data.tags["geco.input.bundle"] == first.bundle_uri

    # the final bundle is registered from stage 2's logged copy: candidate and production (the first one)
    reg = first["register"]
    assert first.model_uri == reg.model_uri == "models:/geco/1" and reg.aliases == ["candidate", "production"]
    assert reg.source == f"runs:/{kids['stage2'].info.run_id}/weights/bundle"
    assert f"model:  {reg.model_uri}" in first.summary()
    version = client.get_model_version("geco", "1")
    assert version.tags["geco.lineage.dag_run_id"] == parent.info.run_id
    assert version.tags["geco.lineage.bundle_run_id"] == kids["stage2"].info.run_id

    # the bundle works with `geco generate`, from its folder and from the registry
    img = np.zeros((40, 40, 4), np.uint8)
    img[8:32, 10:30] = (200, 60, 30, 255)
    Image.fromarray(img).save(tmp_path / "object.png")
    assert main(["generate", str(tmp_path / "object.png"), "--checkpoint", first.bundle_uri, "-o",
                 str(tmp_path / "gen"), "--turntable-frames", "0", "--device", "cpu"]) == 0
    assert (tmp_path / "gen" / "object.ply").is_file()
    assert main(["generate", str(tmp_path / "object.png"), "--checkpoint", "models:/geco@production", "-o",
                 str(tmp_path / "gen-registered"), "--tracking-uri", mlflow_server.uri, "--turntable-frames", "0",
                 "--device", "cpu"]) == 0
    assert (tmp_path / "gen-registered" / "object.ply").is_file()
    # AWS credentials were in the environment all along (s3_env): none of them was logged anywhere
    from tests.services import SECRET_KEY, mlflow_secrets

    assert mlflow_secrets(mlflow_server.uri, [SECRET_KEY, "AWS_SECRET_ACCESS_KEY"], tmp_path / "scan") == []

    # a second `geco run` does no work
    capsys.readouterr()
    assert main(["run", "--config", str(conf)]) == 0
    printed = capsys.readouterr().out
    assert "render: nothing to do; 0 rendered, 8 skipped" in printed, printed
    assert "pseudo_gt: nothing to do; 0 computed, 8 skipped" in printed, printed
    assert printed.count("already complete") >= 4, printed  # teacher, reconstructor, stage1, stage2
    assert "register: nothing to do; models:/geco/1" in printed, printed
    second = client.get_run(runs_named(client, "dag-test/dag")[-1].info.run_id)
    assert second.info.run_id != parent.info.run_id and second.info.status == "FINISHED"
    assert {s: second.data.metrics[f"did_work/{s}"] for s in dag.STAGES} == dict.fromkeys(dag.STAGES, 0.0)
    assert second.data.tags["geco.bundle_uri"] == first.bundle_uri
    kids2 = children(client, second)
    assert "render" not in kids2 and "pseudo_gt" not in kids2  # nothing to do: no MLflow run
    assert {r["did_work"] for r in stage_table(client, second, tmp_path).values()} == {False}

    # a failing stage: the parent run is FAILED and the error names the stage; earlier outputs stay
    capsys.readouterr()
    assert main(["run", "--config", str(conf), "--stages", "render,stage1",
                 "--set", f"models.teacher.pretrained={tmp_path / 'no-such-teacher'}"]) == 2
    err = capsys.readouterr().err
    assert "stage stage1 failed" in err and "no-such-teacher" in err, err
    failed = runs_named(client, "dag-test/dag")[-1]
    assert failed.info.status == "FAILED" and failed.data.tags["geco.dag.failed_stage"] == "stage1"
    assert failed.data.tags["geco.dag.stages"] == "render,stage1"
    assert "render" not in children(client, failed)  # render had nothing to do: no run of its own
    assert stage_table(client, failed, tmp_path)["render"]["status"] == "done"
    assert Path(first.bundle_uri, "geco.json").is_file()
